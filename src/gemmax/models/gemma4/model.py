"""The Gemma 4 text decoder: declarations (``param_specs``, ``linear_nodes``) and the causal forward.

Layers fall into groups (``config.GROUPS``: local / global, owning their keys and values or reading a
producer's) whose weights have different shapes, so each group is stacked on its own leading axis under
``decoder_block/<group>/``. The forward still scans over *all* layers in order (compile time flat in depth):
each step picks its group's branch with ``lax.switch`` on per-layer data and indexes that group's stack; the
branches are compiled once each. Per layer, as transformers' ``Gemma4TextDecoderLayer``:

    h = attn(norm(x)) -> post-norm; x += h
    m = mlp(norm(x)) [-> post-norm 1 + post-norm 2(experts(norm 2(x)))] -> post-norm; x += m
    [x += norm(proj(gelu(gate(x)) * ple_i))]          per-layer embeddings (E2B / E4B)
    x *= layer_scalar

Norms multiply by their weight as stored (no ``1 +``); queries are not scaled (q/k RMS norms carry the
scale); values get a weightless RMS norm; global layers rotate only the first ``global_partial_rotary`` of
each head half (proportional RoPE: frequencies over the whole head dimension, the rest left as is) and, with
``attention_k_eq_v``, reuse the key projection's output (before its norm) as values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemmax.models.base import UnsupportedError
from gemmax.models.gemma import model as gm
from gemmax.models.gemma4.config import GLOBAL, LOCAL, Gemma4Config, group_dims, has_value_proj, param_specs
from gemmax.nn.layers import activation_fn, apply_rope, attention_mask, dot_attention, einsum, linear, rope_sin_cos
from gemmax.nn.layers import remat as remat_layer
from gemmax.nn.params import LinearNode, init_from_specs
from gemmax.nn.quant import dequantize_kernel

Array = jax.Array
Params = dict[str, Any]

#: einsum equations of every linear of a block: (main, (lora_in, lora_out)).
LINEAR_EQS: dict[str, tuple[str, tuple[str, str]]] = {
    **gm.LINEAR_EQS,
    "ple_gate": ("btd,dp->btp", ("btd,dr->btr", "btr,rp->btp")),
    "ple_projection": ("btp,pd->btd", ("btp,pr->btr", "btr,rd->btd")),
}
#: where each linear sits under ``decoder_block/<group>/``
NODE_PATHS: dict[str, tuple[str, ...]] = {
    "query": ("attention", "query"), "key": ("attention", "key"), "value": ("attention", "value"),
    "attention_output": ("attention", "attention_output"), "ffw_gating": ("ffw_gating",),
    "ffw_gating_2": ("ffw_gating_2",), "ffw_linear": ("ffw_linear",), "ple_gate": ("ple_gate",),
    "ple_projection": ("ple_projection",),
}
KERNEL_IN_DIMS: dict[str, tuple[int, ...]] = {**gm.KERNEL_IN_DIMS, "ple_gate": (0,), "ple_projection": (0,)}
#: transformers module of each linear under ``model.layers.{i}``
HF_MODULES: dict[str, str] = {**gm.HF_MODULES, "ple_gate": "per_layer_input_gate",
                              "ple_projection": "per_layer_projection"}
NO_WINDOW = gm.NO_WINDOW

#: GELU (tanh) in float32, rounded once to the input's dtype, as torch computes it on bfloat16 tensors
gelu = activation_fn("gelu_tanh")


def init_params(cfg: Gemma4Config, key: Array, dtype: Any = jnp.float32) -> Params:
    """Random weights from the declarations (normals scaled by fan-in, norms and scalars at one)."""
    return init_from_specs(param_specs(cfg), key, dtype)


def linear_nodes(cfg: Gemma4Config, layers: str = "model.layers") -> dict[str, LinearNode]:
    """Every linear of every group as LoRA and quantization address it: key ``<group>/<name>``, target the
    Gemma name (``query``...), so ``targets=("query", "value")`` reaches every group that has the linear.
    The experts' two kernels are nodes too (``experts_gate_up``, ``experts_down``) for quantization; LoRA on
    them is refused (they run grouped by expert). The router is a plain weight."""
    nodes: dict[str, LinearNode] = {}
    for g, ids in cfg.group_layers().items():
        _, shared, _, _ = group_dims(cfg, g)
        for name, (eq, lora_eqs) in LINEAR_EQS.items():
            if name in ("key", "value") and shared or name == "value" and not has_value_proj(cfg, g):
                continue
            if name.startswith("ple_") and not cfg.ple_dim:
                continue
            nodes[f"{g}/{name}"] = LinearNode(
                path=("decoder_block", g, *NODE_PATHS[name]), eq=eq, lora_eqs=lora_eqs, in_dims=KERNEL_IN_DIMS[name],
                target=name, peft=HF_MODULES[name].split(".")[-1], hf_module=HF_MODULES[name], layers=layers,
                layer_ids=ids)
        if cfg.num_experts:  # quantizable (dequantized per layer before the grouped products); no LoRA
            for name, eq in EXPERT_EQS.items():
                nodes[f"{g}/{name}"] = LinearNode(
                    path=("decoder_block", g, "experts", name.split("_", 1)[1]), eq=eq, lora_eqs=("", ""),
                    in_dims=(1,), target=name, peft=name, hf_module="experts." + EXPERT_HF[name], layers=layers,
                    layer_ids=ids)
    return nodes


#: the experts' kernels as linear nodes: [E, in, out] per layer
EXPERT_EQS = {"experts_gate_up": "td,edf->tef", "experts_down": "tf,efd->ted"}
EXPERT_HF = {"experts_gate_up": "gate_up_proj", "experts_down": "down_proj"}


# ---- pieces ----------------------------------------------------------------------------------------------


def norm(x: Array, scale: Array | None, eps: float) -> Array:
    """RMS norm as transformers' Gemma4RMSNorm: float32, times the weight as stored (none: no weight), cast
    back once."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if scale is not None:
        y = y * scale.astype(jnp.float32)
    return y.astype(x.dtype)


def inv_freqs(cfg: Gemma4Config) -> tuple[Array, Array]:
    """RoPE inverse frequencies (local [hd/2], global [global_hd/2]). Global layers' proportional RoPE: the
    first ``int(partial * hd / 2)`` frequencies over the whole head dimension, zeros (no rotation) after."""
    hd = cfg.head_dim
    loc = 1.0 / (cfg.rope_local_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    ghd = cfg.global_hd
    n_rot = int(cfg.global_partial_rotary * ghd // 2)
    rot = 1.0 / (cfg.rope_theta ** (jnp.arange(0, 2 * n_rot, 2, dtype=jnp.float32) / ghd))
    glob = jnp.concatenate([rot, jnp.zeros((ghd // 2 - n_rot,), jnp.float32)]) / cfg.global_rope_factor
    return loc, glob


def rope_tables(cfg: Gemma4Config, positions: Array) -> dict[str, tuple[Array, Array]]:
    """(sin, cos) per layer type for these positions, once per call (every layer of a type shares them)."""
    loc, glob = inv_freqs(cfg)
    return {LOCAL: rope_sin_cos(positions, loc), GLOBAL: rope_sin_cos(positions, glob)}


def embed(params: Params, cfg: Gemma4Config, tokens: Array, dtype: Any | None = None) -> Array:
    """Token embeddings times sqrt(hidden) in the compute dtype (the Gemma family's lookup)."""
    return gm.embed(params, cfg, tokens, dtype)


def per_layer_inputs(params: Params, cfg: Gemma4Config, tokens: Array, x: Array) -> Array | None:
    """Per-layer embeddings [L, B, T, P] (E2B / E4B): the token's row of the per-layer table times
    sqrt(P), plus the normed projection of the scaled token embedding ``x``, times 1/sqrt(2)."""
    if not cfg.ple_dim:
        return None
    L, P = cfg.num_layers, cfg.ple_dim
    table = params["per_layer_embedding"]["embeddings"]
    tok = jnp.take(table, jnp.clip(tokens, 0, table.shape[0] - 1), axis=0).astype(x.dtype)
    tok = tok * jnp.asarray(math.sqrt(P), x.dtype)
    proj = einsum("btd,dp->btp", x, params["per_layer_projection"]["kernel"])
    proj = proj * jnp.asarray(cfg.hidden_size ** -0.5, x.dtype)
    proj = norm(proj.reshape(*x.shape[:2], L, P), params["per_layer_projection_norm"]["scale"], cfg.norm_eps)
    out = (proj + tok.reshape(*x.shape[:2], L, P)) * jnp.asarray(2.0 ** -0.5, x.dtype)
    return jnp.moveaxis(out, 2, 0)


def _expert_kernel(node: Params, in_axis: int, dtype: Any) -> Array:
    """One layer's expert kernel [E, in, out] as a float array (int8 / 4-bit experts dequantized here)."""
    if "lora_a" in node:
        raise UnsupportedError("LoRA on the experts is not supported (they run grouped by expert); adapt the "
                               "attention or the dense MLP instead")
    if set(node) == {"kernel"}:
        return node["kernel"].astype(dtype)
    return dequantize_kernel(node, (in_axis,), dtype)


def route(p: Params, cfg: Gemma4Config, x: Array) -> tuple[Array, Array]:
    """Router of one layer on the residual stream x [N, D] -> (weights [N, k], expert ids [N, k]): softmax
    over experts in float32, the top k renormalised to sum to one, times each chosen expert's scale."""
    r = p["router"]
    h = norm(x, None, cfg.norm_eps)
    h = h * (r["scale"].astype(h.dtype) * jnp.asarray(cfg.hidden_size ** -0.5, h.dtype))
    # expert logits in the compute dtype (as the reference's linear), the softmax in float32
    logits = einsum("nd,de->ne", h, r["kernel"]).astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    w, idx = jax.lax.top_k(probs, cfg.top_k)
    w = w / w.sum(-1, keepdims=True)
    return w * r["expert_scale"].astype(jnp.float32)[idx], idx


def experts_grouped(h: Array, idx: Array, w: Array, gate_up: Array, down: Array) -> Array:
    """The experts on tokens grouped by expert: each (token, choice) pair is sorted by its expert, the
    sorted rows go through ``lax.ragged_dot`` (one contiguous group per expert) for the gate/up and the down
    projections, then are weighted and summed back per token. Work: k rows per token, not E.

    h [N, D], idx / w [N, k], gate_up [E, D, 2I], down [E, I, D] -> [N, D]."""
    n, k = idx.shape
    e = gate_up.shape[0]
    inter = down.shape[1]
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token = order // k
    sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
    xs = jnp.take(h, token, axis=0)
    dt = xs.dtype
    gu = jax.lax.ragged_dot(xs, gate_up.astype(dt), sizes, preferred_element_type=jnp.float32).astype(dt)
    a = gelu(gu[:, :inter]) * gu[:, inter:]
    y = jax.lax.ragged_dot(a, down.astype(dt), sizes, preferred_element_type=jnp.float32).astype(dt)
    y = (y.astype(jnp.float32) * jnp.take(w.reshape(-1), order)[:, None]).astype(dt)  # weighted in float32
    return jnp.zeros((n, h.shape[1]), dt).at[token].add(y)


#: rows of one tile of :func:`experts_tiled`
TILE = 16


def experts_tiled(h: Array, idx: Array, w: Array, gate_up: Array, down: Array, tile: int = TILE) -> Array:
    """:func:`experts_grouped` for XLA:CPU, whose ``ragged_dot`` multiplies every group's rows by every
    expert (measured 0.2x the all-experts einsum at 128 experts, benchmarks/moe.py). Each expert's sorted rows
    are padded to whole tiles of ``tile`` rows, so every tile belongs to one expert; a scan over the tiles
    multiplies each by its expert's weights, and tiles past the last real one are skipped (``lax.cond``):
    at most ``N * k / tile + E`` tiles, a decode step's few rows touch only their chosen experts.
    Differentiable (a scan, not a while loop), so LoRA training runs through it."""
    n, k = idx.shape
    e, d = gate_up.shape[0], h.shape[1]
    inter = down.shape[1]
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token = order // k
    sorted_e = jnp.take(flat, order)
    sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
    padded = (sizes + tile - 1) // tile * tile
    start = jnp.cumsum(sizes) - sizes
    pstart = jnp.cumsum(padded) - padded
    dest = jnp.take(pstart, sorted_e) + jnp.arange(n * k, dtype=jnp.int32) - jnp.take(start, sorted_e)
    n_tiles = (n * k + e * (tile - 1) + tile - 1) // tile
    dt = h.dtype
    rows = jnp.zeros((n_tiles * tile, d), dt).at[dest].set(jnp.take(h, token, axis=0))
    ends = jnp.cumsum(padded)
    tile_expert = jnp.minimum(jnp.searchsorted(ends, jnp.arange(n_tiles) * tile, side="right"), e - 1)
    used = jnp.arange(n_tiles) * tile < ends[-1]

    def one(_, xs):
        x, ex, real = xs

        def run(x):
            gu = einsum("bd,df->bf", x, jax.lax.dynamic_index_in_dim(gate_up, ex, 0, keepdims=False))
            a = gelu(gu[:, :inter]) * gu[:, inter:]
            return einsum("bf,fd->bd", a, jax.lax.dynamic_index_in_dim(down, ex, 0, keepdims=False))

        return None, jax.lax.cond(real, run, jnp.zeros_like, x)

    _, y = jax.lax.scan(one, None, (rows.reshape(n_tiles, tile, d), tile_expert, used))
    y = jnp.take(y.reshape(n_tiles * tile, d), dest, axis=0)
    y = (y.astype(jnp.float32) * jnp.take(w.reshape(-1), order)[:, None]).astype(dt)  # weighted in float32
    return jnp.zeros((n, d), dt).at[token].add(y)


def experts(h: Array, idx: Array, w: Array, gate_up: Array, down: Array) -> Array:
    """The expert computation on tokens grouped by expert: ``ragged_dot`` (:func:`experts_grouped`) where
    the backend has a grouped product (GPU, TPU), the tiled scan (:func:`experts_tiled`) on XLA:CPU."""
    if jax.default_backend() == "cpu":
        return experts_tiled(h, idx, w, gate_up, down)
    return experts_grouped(h, idx, w, gate_up, down)


def experts_dense(h: Array, idx: Array, w: Array, gate_up: Array, down: Array) -> Array:
    """The same as :func:`experts_grouped` by running every expert on every token and zeroing the unchosen
    ones (E / k times the work): the reference the grouped form is tested and benchmarked against."""
    e = gate_up.shape[0]
    inter = down.shape[1]
    dense_w = jnp.zeros((h.shape[0], e), jnp.float32).at[jnp.arange(h.shape[0])[:, None], idx].add(w)
    gu = jnp.einsum("nd,edf->enf", h, gate_up.astype(h.dtype))
    a = gelu(gu[..., :inter]) * gu[..., inter:]
    y = jnp.einsum("enf,efd->end", a, down.astype(h.dtype))
    return jnp.einsum("end,ne->nd", y, dense_w.astype(h.dtype))


def moe(p: Params, cfg: Gemma4Config, x: Array) -> Array:
    """The expert branch of one layer on the residual stream x [B, T, D] (before its post-norm)."""
    b, t, d = x.shape
    xf = x.reshape(b * t, d)
    w, idx = route(p, cfg, xf)
    h = norm(xf, p["pre_ffw_norm_2"]["scale"], cfg.norm_eps)
    gate_up = _expert_kernel(p["experts"]["gate_up"], 1, h.dtype)
    down = _expert_kernel(p["experts"]["down"], 1, h.dtype)
    return experts(h, idx, w, gate_up, down).reshape(b, t, d)


#: attend(q, k, v) -> attention output; k, v are this layer's own (or the producer's, when shared)
AttendFn = Callable[[Array, Array, Array], Array]


def block(p: Params, x: Array, cfg: Gemma4Config, group: str, sincos: tuple[Array, Array],
          attend: AttendFn, ple: Array | None = None, kv: tuple[Array, Array] | None = None,
          q_rows: Array | None = None) -> tuple[Array, Array, Array]:
    """One decoder layer -> (x, k, v): the keys and values it attended over (its own, or ``kv`` when the
    group reads a producer's). ``sincos``: this layer type's RoPE table at x's positions. ``q_rows``
    ([B, R]): queries, attention output, MLP and the rest only at these rows (a prefill's last layer)."""
    ltype, shared, hd, _ = group_dims(cfg, group)
    eps = cfg.norm_eps
    a = p["attention"]
    h = norm(x, p["pre_attention_norm"]["scale"], eps)
    if shared:
        assert kv is not None
        k, v = kv
    else:
        k = linear(a["key"], h, *LINEAR_EQS["key"])
        v = linear(a["value"], h, *LINEAR_EQS["value"]) if "value" in a else k
        k = apply_rope(norm(k, a["key_norm"]["scale"], eps), None, sincos)
        v = norm(v, None, eps)
    q_sc = sincos
    if q_rows is not None:
        x, h = gm._take_positions(x, q_rows), gm._take_positions(h, q_rows)
        q_sc = (gm._take_positions(sincos[0], q_rows), gm._take_positions(sincos[1], q_rows))
        if ple is not None:
            ple = gm._take_positions(ple, q_rows)
    q = linear(a["query"], h, *LINEAR_EQS["query"])
    q = apply_rope(norm(q, a["query_norm"]["scale"], eps), None, q_sc)
    o = linear(a["attention_output"], attend(q, k, v), *LINEAR_EQS["attention_output"])
    x = x + norm(o, p["post_attention_norm"]["scale"], eps)
    h = norm(x, p["pre_ffw_norm"]["scale"], eps)
    m = linear(p["ffw_linear"], gelu(linear(p["ffw_gating"], h, *LINEAR_EQS["ffw_gating"]))
               * linear(p["ffw_gating_2"], h, *LINEAR_EQS["ffw_gating_2"]), *LINEAR_EQS["ffw_linear"])
    if cfg.num_experts:
        m = norm(m, p["post_ffw_norm_1"]["scale"], eps) + norm(moe(p, cfg, x), p["post_ffw_norm_2"]["scale"], eps)
    x = x + norm(m, p["post_ffw_norm"]["scale"], eps)
    if cfg.ple_dim:
        g = gelu(linear(p["ple_gate"], x, *LINEAR_EQS["ple_gate"])) * ple
        x = x + norm(linear(p["ple_projection"], g, *LINEAR_EQS["ple_projection"]), p["post_ple_norm"]["scale"], eps)
    return x * p["layer_scalar"].astype(x.dtype), k, v


# ---- the layer walk shared by the forward and the prefill --------------------------------------------------


def layer_plan(cfg: Gemma4Config) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """(present groups in ``GROUPS`` order, group number of each layer [L], index inside its group [L])."""
    groups = cfg.group_layers()
    names = tuple(groups)
    gid = np.zeros(cfg.num_layers, np.int32)
    pos = np.zeros(cfg.num_layers, np.int32)
    for j, ids in enumerate(groups.values()):
        for n, i in enumerate(ids):
            gid[i], pos[i] = j, n
    return names, gid, pos


def layer_params(blocks: Params, group: str, i: Array) -> Params:
    """Group ``group``'s weights of its ``i``-th layer (traced index), sliced from the stack."""
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False), blocks[group])


def _kv_shapes(cfg: Gemma4Config, b: int, t: int, dtype: Any) -> dict[str, tuple[Array, Array]]:
    """Zero (k, v) per layer type [b, t, K, hd]: the carried keys and values of each type's latest owner."""
    out = {}
    for ltype, hd, kvh in ((LOCAL, cfg.head_dim, cfg.num_kv_heads), (GLOBAL, cfg.global_hd, cfg.global_kv_heads)):
        z = jnp.zeros((b, t, kvh, hd), dtype)
        out[ltype] = (z, z)
    return out


def run_layers(params: Params, cfg: Gemma4Config, x: Array, positions: Array, ple: Array | None,
               make_attend: Callable[[str], AttendFn], remat: str | None = None, layers: range | None = None,
               carry: dict[str, tuple[Array, Array]] | None = None,
               ) -> tuple[Array, dict[str, tuple[Array, Array]], dict[str, tuple[Array, Array]]]:
    """Scan the layers ``layers`` (default all; a contiguous range) over x [B, T, D] in order ->
    (x, keys and values of every layer stacked per type: ``{type: (k [n, B, T, K, hd], v ...)}`` with zeros
    at the other type's layers and at shared layers, the final carry).

    The carry holds the latest owner's keys and values of each type, which are what a shared layer reads
    (every owner of a type precedes the shared layers, so the latest is the producer). ``carry`` passes in
    the producers' keys and values when ``layers`` holds only sharing layers; x may then hold fewer positions
    than the keys (a prefill's last rows)."""
    b, t = x.shape[:2]
    layers = range(cfg.num_layers) if layers is None else layers
    _, gid_all, pos_all = layer_plan(cfg)
    all_names = tuple(cfg.group_layers())
    names = tuple(dict.fromkeys(cfg.group_of(i) for i in layers))  # the branches this range needs
    gid = np.asarray([names.index(all_names[gid_all[i]]) for i in layers], np.int32)
    pos = pos_all[layers.start:layers.stop]
    tables = rope_tables(cfg, positions)
    blocks = params["decoder_block"]
    dtype = x.dtype

    def branch(group: str) -> Callable:
        ltype, shared, _, _ = group_dims(cfg, group)

        def run(i, x, carry, ple_i):
            p = layer_params(blocks, group, i)
            x, k, v = block(p, x, cfg, group, tables[ltype], make_attend(ltype), ple_i,
                            kv=carry[ltype] if shared else None)
            carry = dict(carry)
            out = dict(_kv_shapes(cfg, b, t, dtype))
            if not shared:
                carry[ltype] = (k.astype(dtype), v.astype(dtype))
                out[ltype] = carry[ltype]
            return x, carry, out

        return run

    ple_xs = ple[layers.start:layers.stop] if ple is not None else jnp.zeros((len(layers),), dtype)
    carry = _kv_shapes(cfg, b, t, dtype) if carry is None else carry
    (x, carry), kvs = scan_groups([branch(g) for g in names], x, carry, gid, pos, ple_xs, remat)
    return x, kvs, carry


def scan_groups(fns: Sequence[Callable], x: Array, carry: Any, gid: Any, pos: Any, ple: Array,
                remat: str | None = None) -> tuple[tuple[Array, Any], Any]:
    """Scan layers of several groups: layer ``l`` runs ``fns[gid[l]](pos[l], x, carry, ple[l]) -> (x, carry,
    out)``, its group's branch at its index in the group (one ``lax.switch``: the compiled body holds each
    group's layer once) -> ((x, carry), the outs stacked over the layers)."""
    def body(state, xs):
        x, carry = state
        g, i, ple_i = xs
        x, carry, out = jax.lax.switch(g, fns, i, x, carry, ple_i)
        return (x, carry), out

    return jax.lax.scan(remat_layer(body, remat), (x, carry), (jnp.asarray(gid), jnp.asarray(pos), ple))


def forward_hidden(params: Params, cfg: Gemma4Config, tokens: Array, positions: Array | None = None,
                   segment_ids: Array | None = None, remat: str | None = None) -> Array:
    """Causal forward over whole sequences -> final-normed hidden states [B, T, D]. ``segment_ids``
    (0 = padding) keep packed documents apart; ``positions`` (default 0..T-1) feed RoPE."""
    tokens = jnp.asarray(tokens, jnp.int32)
    b, t = tokens.shape
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    positions = idx if positions is None else jnp.asarray(positions, jnp.int32)
    seg = None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    x = embed(params, cfg, tokens)
    ple = per_layer_inputs(params, cfg, tokens, x)

    def make_attend(ltype: str) -> AttendFn:
        window = cfg.sliding_window if ltype == LOCAL else None

        def attend(q, k, v):
            return dot_attention(q, k, v, attention_mask(idx, idx, window, seg, seg))
        return attend

    x, _, _ = run_layers(params, cfg, x, positions, ple, make_attend, remat)
    return norm(x, params["final_normalization"]["scale"], cfg.norm_eps)


def logits_from_hidden(params: Params, cfg: Gemma4Config, hidden: Array) -> Array:
    """Hidden [B, T, D] -> float32 logits through the tied embedding, final soft-cap applied: the Gemma
    decoder's head (``Gemma4Config.tie_embeddings`` is always true)."""
    return gm.logits_from_hidden(params, cfg, hidden)


def forward(params: Params, cfg: Gemma4Config, tokens: Array, positions: Array | None = None,
            segment_ids: Array | None = None) -> Array:
    """Full causal forward -> float32 logits [B, T, V]."""
    return logits_from_hidden(params, cfg, forward_hidden(params, cfg, tokens, positions, segment_ids))
