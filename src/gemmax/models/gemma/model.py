"""The decoder shared by Gemma 1, CodeGemma, Gemma 2, Gemma 3 and Llama 3.

Pure functions over a nested-dict pytree (paths in docs/architecture.md). All layers are stacked on a
leading axis and run under ``jax.lax.scan``; what differs between layers (local or global attention, the
RoPE base) is passed to the scan as per-layer *data*, so compile time does not grow with depth and one
compiled function serves every family.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemmax.kernels import cpu as cpu_kernels
from gemmax.models.gemma.config import LOCAL, ModelConfig
from gemmax.nn.layers import (
    attention_mask,
    dot_attention,
    einsum,
    gated_linear,
    linear,
    norm_rope,
    rms_norm,
    rope_inv_freq,
    rope_sin_cos,
    softcap,
)
from gemmax.nn.layers import remat as remat_layer
from gemmax.nn.params import LinearNode, ParamSpec, flatten, init_from_specs, unflatten  # noqa: F401

Array = jax.Array
Params = dict[str, Any]

#: Window given to global layers when local and global layers share one scan: wider than any context.
NO_WINDOW = 1 << 30

#: einsum equations of every linear in a decoder block: (main, (lora_in, lora_out)).
LINEAR_EQS: dict[str, tuple[str, tuple[str, str]]] = {
    "query": ("btd,ndh->btnh", ("btd,dr->btr", "btr,rnh->btnh")),
    "key": ("btd,ndh->btnh", ("btd,dr->btr", "btr,rnh->btnh")),
    "value": ("btd,ndh->btnh", ("btd,dr->btr", "btr,rnh->btnh")),
    "attention_output": ("btnh,nhd->btd", ("btnh,nhr->btr", "btr,rd->btd")),
    "ffw_gating": ("btd,df->btf", ("btd,dr->btr", "btr,rf->btf")),
    "ffw_gating_2": ("btd,df->btf", ("btd,dr->btr", "btr,rf->btf")),
    "ffw_linear": ("btf,fd->btd", ("btf,fr->btr", "btr,rd->btd")),
}

#: Where each linear node sits in the parameter tree (stacked over layers); LoRA and quantization address
#: kernels through this one table.
LINEAR_NODE_PATHS: dict[str, tuple[str, ...]] = {
    "query": ("decoder_block", "attention", "query"),
    "key": ("decoder_block", "attention", "key"),
    "value": ("decoder_block", "attention", "value"),
    "attention_output": ("decoder_block", "attention", "attention_output"),
    "ffw_gating": ("decoder_block", "ffw_gating"),
    "ffw_gating_2": ("decoder_block", "ffw_gating_2"),
    "ffw_linear": ("decoder_block", "ffw_linear"),
}

#: Number of leading "input" dims of each kernel (after the layer axis); the rest are outputs.
#: Used by LoRA (factor shapes) and quantization (per-output-channel scales).
KERNEL_IN_DIMS: dict[str, tuple[int, ...]] = {
    "query": (1,),  # [heads, embed, head_dim]: embed is the input
    "key": (1,),
    "value": (1,),
    "attention_output": (0, 1),  # [heads, head_dim, embed]
    "ffw_gating": (0,),
    "ffw_gating_2": (0,),
    "ffw_linear": (0,),
}


#: transformers module of each linear under ``model.layers.{i}`` and its PEFT / transformers short name.
HF_MODULES: dict[str, str] = {
    "query": "self_attn.q_proj", "key": "self_attn.k_proj", "value": "self_attn.v_proj",
    "attention_output": "self_attn.o_proj", "ffw_gating": "mlp.gate_proj", "ffw_gating_2": "mlp.up_proj",
    "ffw_linear": "mlp.down_proj",
}


def linear_nodes(cfg: ModelConfig, layers: str = "model.layers") -> dict[str, LinearNode]:
    """Every linear of a decoder block, stacked over layers, as LoRA and quantization address them.
    ``layers`` is the transformers prefix of the layer list (multimodal wrappers nest the decoder)."""
    ids = tuple(range(cfg.num_layers))
    return {name: LinearNode(path=LINEAR_NODE_PATHS[name], eq=eq, lora_eqs=lora_eqs,
                             in_dims=KERNEL_IN_DIMS[name], target=name, peft=HF_MODULES[name].split(".")[-1],
                             hf_module=HF_MODULES[name], layers=layers, layer_ids=ids)
            for name, (eq, lora_eqs) in LINEAR_EQS.items()}


def param_specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
    """Every weight of the decoder with its shape and logical axes, keyed by path."""
    L, D, H, K, hd, F = (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                         cfg.intermediate_size)
    norm_init = "zeros" if cfg.norm_offset else "ones"
    b = "decoder_block/"
    specs: dict[str, ParamSpec] = {
        "token_embedding/embeddings": ParamSpec((cfg.vocab_size, D), ("vocab", "embed"), "embedding"),
        b + "pre_attention_norm/scale": ParamSpec((L, D), ("layers", "embed"), norm_init),
        b + "attention/query/kernel": ParamSpec((L, H, D, hd), ("layers", "heads", "embed", "head_dim")),
        b + "attention/key/kernel": ParamSpec((L, K, D, hd), ("layers", "kv_heads", "embed", "head_dim")),
        b + "attention/value/kernel": ParamSpec((L, K, D, hd), ("layers", "kv_heads", "embed", "head_dim")),
        b + "attention/attention_output/kernel": ParamSpec(
            (L, H, hd, D), ("layers", "heads", "head_dim", "embed")),
    }
    if cfg.use_qk_norm:
        specs[b + "attention/query_norm/scale"] = ParamSpec((L, hd), ("layers", "head_dim"), norm_init)
        specs[b + "attention/key_norm/scale"] = ParamSpec((L, hd), ("layers", "head_dim"), norm_init)
    if cfg.use_post_norms:
        specs[b + "post_attention_norm/scale"] = ParamSpec((L, D), ("layers", "embed"), norm_init)
    specs[b + "pre_ffw_norm/scale"] = ParamSpec((L, D), ("layers", "embed"), norm_init)
    if cfg.use_post_norms:
        specs[b + "post_ffw_norm/scale"] = ParamSpec((L, D), ("layers", "embed"), norm_init)
    specs[b + "ffw_gating/kernel"] = ParamSpec((L, D, F), ("layers", "embed", "mlp"))
    specs[b + "ffw_gating_2/kernel"] = ParamSpec((L, D, F), ("layers", "embed", "mlp"))
    specs[b + "ffw_linear/kernel"] = ParamSpec((L, F, D), ("layers", "mlp", "embed"))
    specs["final_normalization/scale"] = ParamSpec((D,), ("embed",), norm_init)
    if not cfg.tie_embeddings:
        specs["lm_head/kernel"] = ParamSpec((D, cfg.vocab_size), ("embed", "vocab"))
    # initialisation: kernels scaled by their fan-in, the embedding by 1/sqrt(d) when it is scaled by sqrt(d)
    emb_std = 1.0 / math.sqrt(D) if cfg.scale_embeddings else 0.02
    specs["token_embedding/embeddings"] = dataclasses.replace(specs["token_embedding/embeddings"], std=emb_std)
    for path, s in specs.items():
        if path.endswith("/kernel"):
            specs[path] = dataclasses.replace(s, fan_in_axis=KERNEL_IN_DIMS_AXES[path.split("/")[-2]])
    return specs


def init_params(cfg: ModelConfig, key: Array, dtype: Any = jnp.float32) -> Params:
    """Random initialisation from the declarations (plain normals scaled by fan-in, norms at identity)."""
    return init_from_specs(param_specs(cfg), key, dtype)


#: Axis (in the stacked shape) holding the fan-in of each kernel, for initialisation.
KERNEL_IN_DIMS_AXES = {"query": 2, "key": 2, "value": 2, "attention_output": 2, "ffw_gating": 1,
                       "ffw_gating_2": 1, "ffw_linear": 1, "lm_head": 0}


# ---- per-layer data for the scan ------------------------------------------------------------------


def layer_windows(cfg: ModelConfig) -> np.ndarray:
    """Sliding window of each layer (int32 [L]) as ``attention_mask`` reads it; global layers get NO_WINDOW.
    A bidirectional model's local layers see ``|q - k| < W // 2 + 1``: transformers halves the published
    window for them (Gemma3TextConfig), so the whole span, both sides, is the published width."""
    local = cfg.sliding_window // 2 + 1 if cfg.bidirectional and cfg.sliding_window else cfg.sliding_window
    return np.array([local if t == LOCAL else NO_WINDOW for t in cfg.layer_types], dtype=np.int32)


def rope_tables(cfg: ModelConfig, positions: Array) -> tuple[Array, Array, Array]:
    """RoPE for a layer scan: (sin [2, B, T, hd/2], cos [...], per-layer row [L]) with row 0 the global
    base and row 1 the local one, evaluated once per call instead of once per layer (see ``apply_rope``)."""
    glob = rope_sin_cos(positions, rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
    loc = rope_sin_cos(positions, rope_inv_freq(cfg.head_dim, cfg.local_theta, None))
    rows = jnp.asarray([int(t == LOCAL) for t in cfg.layer_types], jnp.int32)
    return jnp.stack([glob[0], loc[0]]), jnp.stack([glob[1], loc[1]]), rows


# ---- the model -------------------------------------------------------------------------------------


def _take_rows(table: Array, tokens: Array) -> Array:
    """``table[tokens]``; a half-precision table wrapped as ``cpu_kernels.NativeWeight`` (a CPU prefill /
    decode step) goes through the native row copy (see ``cpu_kernels.take_rows``: XLA:CPU would convert the
    whole table to float32 on every chunk)."""
    if cpu_kernels.supports_take(table):
        return cpu_kernels.take_rows(table, tokens)
    return jnp.take(cpu_kernels.unstack(table), tokens, axis=0)


def embed(params: Params, cfg: ModelConfig, tokens: Array, dtype: Any | None = None) -> Array:
    """Token embedding lookup, multiplied by sqrt(d_model) cast to the compute dtype first (Gemma):
    in bfloat16 sqrt(3072) is 55.5, and the reference multiplies by that rounded value."""
    node = params["token_embedding"]
    table = node["embeddings"]
    dtype = dtype or (table.dtype if jnp.issubdtype(table.dtype, jnp.floating) else jnp.float32)
    x = _take_rows(table, tokens).astype(dtype)
    if "scale" in node:  # int8 embedding: per-row scales
        x = x * jnp.take(node["scale"], tokens, axis=0)[..., None].astype(dtype)
    if cfg.scale_embeddings:
        x = x * jnp.asarray(math.sqrt(cfg.hidden_size), dtype)
    return x


AttendFn = Callable[[Array, Array, Array], Array]


def _take_positions(a: Array, rows: Array) -> Array:
    """``a[b, rows[b, r], ...]`` for a [B, T, ...] array and int rows [B, R]."""
    idx = rows.reshape(rows.shape + (1,) * (a.ndim - 2))
    return jnp.take_along_axis(a, idx, axis=1)


def decoder_layer(p: Params, x: Array, cfg: ModelConfig, positions: Array, inv_freq: Array | tuple[Array, Array],
                  attend: AttendFn, q_rows: Array | None = None, backend: str = "xla") -> Array:
    """One block. ``attend(q, k, v)`` does the attention itself (full-sequence or against a KV cache), so
    training, prefill and decode share every other line.

    ``q_rows`` (int [B, R]): keys and values come from every position, but queries, the attention output and
    the MLP only from these rows, and the result is [B, R, D]. A prefill's last layer needs nothing more
    (the next token is read at each prompt's last position): 1/L of the prefill's work saved.

    ``backend``: ``"cpu"`` (only from a family's prefill / decode step, where the native kernels are
    available) lets the q/k norm + RoPE take the native pass (``norm_rope``'s ``native``); the linears follow
    their weights' type (``cpu_kernels.NativeWeight`` from ``cpu_kernels.layer_view``), not this argument.
    """
    native = backend == "cpu"
    eps, off = cfg.norm_eps, cfg.norm_offset
    a = p["attention"]
    h = rms_norm(x, p["pre_attention_norm"]["scale"], eps, off)
    k = linear(a["key"], h, *LINEAR_EQS["key"])
    v = linear(a["value"], h, *LINEAR_EQS["value"])
    q_pos, q_freq = positions, inv_freq
    if q_rows is not None:
        x, h, q_pos = _take_positions(x, q_rows), _take_positions(h, q_rows), _take_positions(positions, q_rows)
        if isinstance(inv_freq, tuple):
            q_freq = (_take_positions(inv_freq[0], q_rows), _take_positions(inv_freq[1], q_rows))
    q = linear(a["query"], h, *LINEAR_EQS["query"])
    qn, kn = (a["query_norm"]["scale"], a["key_norm"]["scale"]) if cfg.use_qk_norm else (None, None)
    q = norm_rope(q, qn, eps, off, q_pos, q_freq, cfg.query_scale, native=native)
    k = norm_rope(k, kn, eps, off, positions, inv_freq, native=native)
    o = attend(q, k, v)
    o = linear(a["attention_output"], o, *LINEAR_EQS["attention_output"])
    if cfg.use_post_norms:
        o = rms_norm(o, p["post_attention_norm"]["scale"], eps, off)
    x = x + o
    h = rms_norm(x, p["pre_ffw_norm"]["scale"], eps, off)
    gated = gated_linear(p["ffw_gating"], p["ffw_gating_2"], h, cfg.activation, *LINEAR_EQS["ffw_gating"])
    m = linear(p["ffw_linear"], gated, *LINEAR_EQS["ffw_linear"])
    if cfg.use_post_norms:
        m = rms_norm(m, p["post_ffw_norm"]["scale"], eps, off)
    return x + m


def forward_hidden(params: Params, cfg: ModelConfig, tokens: Array, positions: Array | None = None,
                   segment_ids: Array | None = None, remat: str | None = None, attention: str | None = None,
                   prefix_ids: Array | None = None) -> Array:
    """Causal forward over whole sequences -> final-normed hidden states [B, T, D] (every token sees every
    other, within the symmetric windows of local layers, when ``cfg.bidirectional``).

    ``segment_ids`` (0 = padding) keeps packed documents from attending to each other; ``positions``
    (default 0..T-1) feed RoPE and may restart per document. ``prefix_ids`` [B, T] (with segments) lets a
    token also see the earlier keys of segment ``prefix_ids[t]`` (its own segment when it has no prefix):
    one prompt followed in the same row by several continuations, each its own segment whose positions go
    on from the prompt's end, computes the prompt once for all of them (a preference pair, a GRPO group).
    Causality and the sliding windows are then read from ``positions``. ``remat`` ("full" | "dots" | None) wraps each
    layer in jax.checkpoint to trade compute for activation memory when training. ``attention`` ("cudnn": the
    caller's choice on an NVIDIA GPU) runs the attention as one fused ``jax.nn.dot_product_attention`` of that
    implementation, unless the config soft-caps attention logits.
    """
    tokens = jnp.asarray(tokens)
    b, t = tokens.shape
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    positions = idx if positions is None else jnp.asarray(positions, jnp.int32)
    seg = None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    prefix = None
    if prefix_ids is not None:
        if seg is None or cfg.bidirectional:
            raise ValueError("prefix_ids need segment_ids and a causal model")
        prefix, idx = jnp.asarray(prefix_ids, jnp.int32), positions
    fused = attention if cfg.attn_logit_softcap is None else None
    x = embed(params, cfg, tokens)
    has_local = LOCAL in cfg.layer_types

    sin, cos, rope_row = rope_tables(cfg, positions)

    def body(x: Array, xs: tuple[Params, Array, Array]) -> tuple[Array, None]:
        p, window, row = xs

        def attend(q: Array, k: Array, v: Array) -> Array:
            mask = attention_mask(idx, idx, window if has_local else None, seg, seg, causal=not cfg.bidirectional,
                                  q_prefix=prefix)
            return dot_attention(q, k, v, mask, cfg.attn_logit_softcap, fused)

        return decoder_layer(p, x, cfg, positions, (sin[row], cos[row]), attend), None

    xs = (params["decoder_block"], jnp.asarray(layer_windows(cfg)), rope_row)
    x, _ = jax.lax.scan(remat_layer(body, remat), x, xs)
    return rms_norm(x, params["final_normalization"]["scale"], cfg.norm_eps, cfg.norm_offset)


def output_kernel(params: Params, cfg: ModelConfig) -> tuple[Array, str, Array | None]:
    """The output projection as (matrix, einsum, per-vocab scale or None): the embedding transposed when
    tied (Gemma; not scaled by sqrt(d)), else ``lm_head``. The matrix is whatever the tree holds: a
    ``cpu_kernels.NativeWeight`` in a CPU prefill / decode step (``cpu_kernels.unstack`` gives the array)."""
    if cfg.tie_embeddings:
        node = params["token_embedding"]
        return node["embeddings"], "btd,vd->btv", node.get("scale")
    node = params["lm_head"]
    return node["kernel"], "btd,dv->btv", node.get("scale")


def logits_from_hidden(params: Params, cfg: ModelConfig, hidden: Array) -> Array:
    """Hidden [B, T, D] -> float32 logits with the final soft-cap (Gemma 2) applied."""
    w, eq, scale = output_kernel(params, cfg)
    if cpu_kernels.supports(eq, hidden, w):  # a NativeWeight head (CPU prefill / decode): the native GEMV
        return softcap(cpu_kernels.gemv(eq, hidden, w, scale), cfg.final_logit_softcap)
    logits = einsum(eq, hidden, cpu_kernels.unstack(w), jnp.float32)
    if scale is not None:
        logits = logits * scale.astype(jnp.float32)
    return softcap(logits, cfg.final_logit_softcap)


def forward(params: Params, cfg: ModelConfig, tokens: Array, positions: Array | None = None,
            segment_ids: Array | None = None) -> Array:
    """Full causal forward -> float32 logits [B, T, V]."""
    return logits_from_hidden(params, cfg, forward_hidden(params, cfg, tokens, positions, segment_ids))
