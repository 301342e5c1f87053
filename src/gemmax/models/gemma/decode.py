"""Generation for the Gemma decoder family: a static KV cache with ring buffers, prefill and decode step.

The cache is a pytree of fixed shape whose rows are independent engine slots. Global layers hold ``max_len``
slots; sliding-window layers hold a ring buffer of ``window`` slots indexed by absolute position modulo the
window, so Gemma 2/3 keep far less cache at long context (``cache_bytes_per_token``). Layers are scanned;
local vs global attention is chosen per layer with ``lax.cond`` on data, so compile time stays flat in depth.

``backend`` is the explicit choice of the engine: ``"cpu"`` runs the linears and attention through gemmax's
native CPU kernels (``gemmax.kernels.cpu``), which read each stacked weight in place; ``"xla"`` runs XLA
everywhere (GPU, TPU, sharded runs); ``"cudnn"`` is XLA with the prompt's attention as cuDNN's fused kernel
(``jax.nn.dot_product_attention``; an NVIDIA GPU, 16-bit activations, no attention soft-cap), the decode
step as ``"xla"``. The choice is made here and nowhere deeper: on ``"cpu"`` the step wraps
the weights it wants native as ``cpu_kernels.NativeWeight`` (``_native_params``, ``cpu_kernels.layer_view``),
whose type ``nn.layers`` and ``model`` dispatch on, and passes ``backend`` to ``decoder_layer`` for the
q/k norm + RoPE; with the kernels unavailable (no compiler, ``GEMMAX_CPU_KERNELS=0``) ``"cpu"`` runs XLA.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemmax.kernels import cpu as cpu_kernels
from gemmax.models.base import CPU, CUDNN, XLA, UnsupportedError
from gemmax.models.gemma import model as gm
from gemmax.models.gemma.config import LOCAL, ModelConfig
from gemmax.nn.layers import MASK_VALUE, attention_mask, dot_attention, einsum, rms_norm, softcap

Array = jax.Array


# ---- cache ---------------------------------------------------------------------------------------
#
# Local and global layers keep separate stacks: k/v_local [n_local, B, window, K, hd] (ring buffers indexed
# by absolute position modulo the window) and k/v_global [n_global, B, max_len, K, hd]. Inside the layer
# scan the caches are read-only closure constants (each layer dynamic-slices its own entry); the step's new
# keys/values come out of the scan and are scattered into the donated cache once per step. Carrying the
# caches through the scan instead makes XLA copy them at every layer (measured: 4x slower decode).


@dataclass(frozen=True)
class CacheLayout:
    """Static description of a cache: which layers are local, their ring width, the global length."""

    local_layers: tuple[int, ...]
    global_layers: tuple[int, ...]
    window: int  # ring width of local layers
    max_len: int  # slots of global layers

    @classmethod
    def for_config(cls, cfg: ModelConfig, max_len: int) -> CacheLayout:
        loc = tuple(i for i, t in enumerate(cfg.layer_types) if t == LOCAL)
        glob = tuple(i for i, t in enumerate(cfg.layer_types) if t != LOCAL)
        window = min(cfg.sliding_window or max_len, max_len) if loc else 1
        return cls(loc, glob, window, max_len)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any) -> dict[str, Array]:
    lay = CacheLayout.for_config(cfg, max_len)
    nl, ng = max(len(lay.local_layers), 1), max(len(lay.global_layers), 1)
    k, hd = cfg.num_kv_heads, cfg.head_dim
    s = lay.max_len if lay.global_layers else 1
    return {
        "k_local": jnp.zeros((nl, batch, lay.window, k, hd), dtype),
        "v_local": jnp.zeros((nl, batch, lay.window, k, hd), dtype),
        "k_global": jnp.zeros((ng, batch, s, k, hd), dtype),
        "v_global": jnp.zeros((ng, batch, s, k, hd), dtype),
    }


def cache_bytes_per_token(cfg: ModelConfig, context: int, dtype_bytes: int = 2) -> dict[str, float]:
    """KV-cache bytes per token of context, with ring buffers for local layers and without."""
    per_layer_tok = 2 * cfg.num_kv_heads * cfg.head_dim * dtype_bytes
    full = per_layer_tok * cfg.num_layers
    n_local = sum(t == LOCAL for t in cfg.layer_types)
    w = min(cfg.sliding_window or context, context)
    ring = (per_layer_tok * (cfg.num_layers - n_local) * context + per_layer_tok * n_local * w) / context
    return {"full": float(full), "ring": float(ring), "saving": float(full / ring)}


def _layer_slots(cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    is_local = np.array([t == LOCAL for t in cfg.layer_types])
    li = np.cumsum(is_local) - 1
    gi = np.cumsum(~is_local) - 1
    return is_local, np.maximum(li, 0).astype(np.int32), np.maximum(gi, 0).astype(np.int32)


# ---- prefill ----------------------------------------------------------------------------------------


def _as_bits(a: Array) -> Array:
    """A 16-bit float array as uint16 for a scan's stacked output: XLA:CPU updates a bfloat16 stack by
    converting all of it to float32 and back on every iteration (a 512-token Gemma 3 270M bfloat16 prefill:
    2 x 4.4 MB a layer, 5 ms), an integer one in place. Free: a bitcast."""
    return jax.lax.bitcast_convert_type(a, jnp.uint16) if a.dtype in (jnp.bfloat16, jnp.float16) else a


def _from_bits(a: Array, dtype: Any) -> Array:
    return jax.lax.bitcast_convert_type(a, dtype) if a.dtype == jnp.uint16 else a


def _native(backend: str) -> bool:
    """Whether a step on ``backend`` runs the native CPU kernels: asked for, and compiled here."""
    return backend == CPU and cpu_kernels.available()


def _native_params(params: dict, cfg: ModelConfig, gemm: bool) -> dict:
    """``params`` with the embedding table and the untied head (used whole, not per layer) wrapped as
    ``cpu_kernels.NativeWeight``: ``model._take_rows`` and ``model.logits_from_hidden`` dispatch on it."""
    out = dict(params)
    emb = params["token_embedding"]
    out["token_embedding"] = dict(emb, embeddings=cpu_kernels.NativeWeight(emb["embeddings"], None, gemm))
    if not cfg.tie_embeddings and "kernel" in params.get("lm_head", {}):
        out["lm_head"] = dict(params["lm_head"], kernel=cpu_kernels.NativeWeight(params["lm_head"]["kernel"],
                                                                                 None, gemm))
    return out


def prefill(params: dict, cfg: ModelConfig, tokens: Array, lengths: Array, max_len: int,
            backend: str = "xla") -> tuple[Array, dict]:
    """Run prompts [b, T] (right-padded, true lengths [b]) -> (last-token logits [b, V], per-row caches).

    The returned caches hold ``T`` slots for global layers and, for local ones, a ring as wide as an engine's
    of length ``max_len`` (or its first ``T`` slots when ``T`` fits in it), in the same layout as
    ``init_cache`` (batch b), ready for ``insert``.

    ``backend="cpu"``: the linears go through gemmax's native CPU GEMM (``gemmax.kernels.cpu``), which reads
    each stacked weight in place at its own width; the scan then walks layer indices, as in ``decode_step``.
    """
    if cfg.bidirectional:
        raise UnsupportedError("a bidirectional model (EmbeddingGemma) is an encoder: it has no causal cache to "
                               "generate from; embed with gemmax.TextEncoder")
    window = CacheLayout.for_config(cfg, max_len).window
    fused = CUDNN if backend == CUDNN and cfg.attn_logit_softcap is None else None
    return _prefill(params, cfg, tokens, lengths, window, _native(backend), fused)


def _prefill(params: dict, cfg: ModelConfig, tokens: Array, lengths: Array, window: int,
             in_place: bool, fused: str | None = None) -> tuple[Array, dict]:
    """``prefill`` with the backend resolved: ``in_place`` runs the native CPU kernels, ``fused`` names a
    ``jax.nn.dot_product_attention`` implementation for the attention (``dot_attention``'s)."""
    b, t = tokens.shape
    if in_place:  # the native GEMM for every product, whatever its rows (the kernel's in-major weights)
        params = _native_params(params, cfg, gemm=True)
    layer_backend = CPU if in_place else XLA
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    valid = idx < lengths[:, None]
    seg = valid.astype(jnp.int32)  # padding is segment 0: it never attends to or from the prompt
    x = gm.embed(params, cfg, tokens)
    has_local = LOCAL in cfg.layer_types

    blocks = params["decoder_block"]

    sin, cos, rope_row = gm.rope_tables(cfg, idx)

    windows = jnp.asarray(gm.layer_windows(cfg))
    n_layers = cfg.num_layers
    last_pos = (lengths - 1)[:, None]  # [b, 1]

    def layer(i, x, q_rows=None):
        """Layer ``i`` (traced index) -> (x, k, v). Weights are indexed in place (the scan over layer indices
        slices each layer as a scan over the stacked weights would, or the native kernel reads it in place)."""
        if in_place:
            p = cpu_kernels.layer_view(blocks, i, gemm=True)
        else:
            p = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False), blocks)
        w, row = windows[i], rope_row[i]
        kv = {}

        def attend(q, k, v):
            kv["k"], kv["v"] = k, v
            if q_rows is not None:  # the last layer: one query per row, against every key of its prompt
                mask = attention_mask(q_rows, idx, w if has_local else None, jnp.ones_like(q_rows), seg)
                return dot_attention(q, k, v, mask, cfg.attn_logit_softcap, fused)
            if in_place:  # blocked causal attention in the native kernel: no [H, T, T] scores
                return cpu_kernels.prefill_attention(q, k, v, lengths, w if has_local else gm.NO_WINDOW,
                                                     cfg.attn_logit_softcap)
            mask = attention_mask(idx, idx, w if has_local else None, seg, seg)
            return dot_attention(q, k, v, mask, cfg.attn_logit_softcap, fused)

        x = gm.decoder_layer(p, x, cfg, idx, (sin[row], cos[row]), attend, q_rows=q_rows, backend=layer_backend)
        return x, kv["k"], kv["v"]

    def body(x, i):
        x, k, v = layer(i, x)
        return x, (_as_bits(k), _as_bits(v))

    # every layer but the last over all positions; the last one needs keys and values everywhere but its
    # output only at each prompt's last position (decoder_layer's q_rows)
    x, (ks, vs) = jax.lax.scan(body, x, jnp.arange(n_layers - 1))  # ks: [L-1, b, T, K, hd]
    last, k_last, v_last = layer(jnp.asarray(n_layers - 1), x, q_rows=last_pos)
    ks, vs = _from_bits(ks, k_last.dtype), _from_bits(vs, v_last.dtype)
    ks = jnp.concatenate([ks, k_last[None].astype(ks.dtype)])
    vs = jnp.concatenate([vs, v_last[None].astype(vs.dtype)])
    last = rms_norm(last, params["final_normalization"]["scale"], cfg.norm_eps, cfg.norm_offset)
    logits = gm.logits_from_hidden(params, cfg, last)[:, 0]
    return logits, prompt_caches(cfg, ks, vs, lengths, window)


def prompt_caches(cfg: ModelConfig, ks: Array, vs: Array, lengths: Array, window: int) -> dict[str, Array]:
    """Per-row caches in ``init_cache``'s layout from a prompt's keys and values of every layer
    ``[L, b, T, K, hd]``: global layers keep all ``T`` positions, local ones a ``window``-slot ring."""
    return ring_caches(cfg.layer_types, ks, vs, lengths, window)


def ring_caches(layer_types: Sequence[str], ks: Array, vs: Array, lengths: Array, window: int,
                ) -> dict[str, Array]:
    """``k/v_global`` and ``k/v_local`` from the keys and values ``[L, b, T, K, hd]`` of right-padded prompts
    (true lengths [b]) of layers of these types: global layers keep all ``T`` positions, local ones a
    ``window``-slot ring (the layout of every Gemma decoder's cache), or its first ``T`` slots when the prompts
    fit in it."""
    t = ks.shape[2]
    is_local = np.array([tp == LOCAL for tp in layer_types])
    loc, glob = np.nonzero(is_local)[0], np.nonzero(~is_local)[0]
    caches = {}
    if len(glob):
        caches["k_global"], caches["v_global"] = ks[glob], vs[glob]
    if len(loc) and t <= window:
        # a prompt no longer than the ring: slot j holds position j, so its first t slots are the prompt's keys
        # (past each row's length zeros). The ring's other slots are left to ``insert``: a decode step counts
        # a slot valid only once its position is written. Writing whole rings instead cost a 32-prompt
        # admission of 16-token prompts 187 ms of copying on Gemma 3 270M (512-slot rings, 15 layers).
        ok = (jnp.arange(t)[None, :] < lengths[:, None])[None, :, :, None, None]
        caches["k_local"] = jnp.where(ok, ks[loc], 0).astype(ks.dtype)
        caches["v_local"] = jnp.where(ok, vs[loc], 0).astype(vs.dtype)
    elif len(loc):
        # ring slot j holds the latest prompt position p < length with p % window == j
        j = jnp.arange(window)
        src = j[None] + window * jnp.floor_divide(lengths[:, None] - 1 - j[None], window)  # [b, W]
        ok = (src >= 0)[None, :, :, None, None]
        src = jnp.clip(src, 0, t - 1)[None, :, :, None, None]
        caches["k_local"] = jnp.where(ok, jnp.take_along_axis(ks[loc], src, axis=2), 0).astype(ks.dtype)
        caches["v_local"] = jnp.where(ok, jnp.take_along_axis(vs[loc], src, axis=2), 0).astype(vs.dtype)
    return caches


def insert(cache: dict, new: dict, slots: Array, backend: str = XLA) -> dict:
    """Write prefilled per-row caches into engine slots (rows) of the big cache; a slot index past the
    cache's batch (the engine's padding rows) is dropped. On the ``"cpu"`` backend the entries' bytes are
    copied in place (XLA:CPU's scatter would convert a 16-bit cache to float32 and back, whole)."""
    out = dict(cache)
    for name, arr in new.items():
        t = arr.shape[2]
        if _native(backend):
            pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (slots.shape[0], t))
            out[name] = cpu_kernels.write_entries(cache[name], arr, slots, pos)
        else:
            out[name] = cache[name].at[:, slots, :t].set(arr.astype(cache[name].dtype), mode="drop")
    return out


# ---- decode -------------------------------------------------------------------------------------------


def _attend_cached(q: Array, k_new: Array, v_new: Array, kc: Array, vc: Array, valid: Array,
                   cap: float | None) -> Array:
    """One query per row against (read-only cache + the row's own new key). q [B,1,H,hd], k_new [B,1,K,hd],
    kc [B,S,K,hd], valid [B,S] -> [B,1,H,hd]. Softmax in float32 over both parts jointly."""
    b, _, h, hd = q.shape
    kv = kc.shape[2]
    qg = q.reshape(b, kv, h // kv, hd)
    lc = einsum("bkgd,bskd->bkgs", qg, kc, jnp.float32)
    ls = einsum("bkgd,bkd->bkg", qg, k_new[:, 0], jnp.float32)[..., None]
    lc, ls = softcap(lc, cap), softcap(ls, cap)
    lc = jnp.where(valid[:, None, None, :], lc, MASK_VALUE)
    m = jnp.maximum(lc.max(-1, keepdims=True), ls)
    pc, ps = jnp.exp(lc - m), jnp.exp(ls - m)
    z = pc.sum(-1, keepdims=True) + ps
    out = einsum("bkgs,bskd->bkgd", (pc / z).astype(vc.dtype), vc)
    out = out + (ps / z).astype(v_new.dtype) * v_new[:, 0][:, :, None, :]
    return out.reshape(b, 1, h, hd)


def decode_step(params: dict, cfg: ModelConfig, cache: dict, tokens: Array, pos: Array,
                backend: str = "xla") -> tuple[Array, dict]:
    """One token per row: tokens [B] at absolute positions pos [B] -> logits [B, V], updated cache.

    ``backend="cpu"``: run the linears through gemmax's native CPU GEMV (``gemmax.kernels.cpu``); the layer
    scan then walks layer indices and the kernel reads each stacked weight in place instead of a sliced copy.
    """
    return _decode_step(params, cfg, cache, tokens, pos, _native(backend))


def _decode_step(params: dict, cfg: ModelConfig, cache: dict, tokens: Array, pos: Array,
                 in_place: bool) -> tuple[Array, dict]:
    b = tokens.shape[0]
    rows = jnp.arange(b)
    if in_place:  # the native GEMV (GEMM paths up to MAX_ROWS rows; XLA's dot beyond)
        params = _native_params(params, cfg, gemm=False)
    layer_backend = CPU if in_place else XLA
    x = gm.embed(params, cfg, tokens[:, None])
    positions = pos[:, None]
    is_local, li, gi = _layer_slots(cfg)
    kl, vl, kg, vg = cache["k_local"], cache["v_local"], cache["k_global"], cache["v_global"]
    w, s = kl.shape[2], kg.shape[2]
    # absolute position held by ring slot j: the latest p < pos with p % w == j; valid inside the window
    pj = pos[:, None] - 1 - jnp.mod(pos[:, None] - 1 - jnp.arange(w)[None], w)
    local_valid = (pj >= 0) & (pj > pos[:, None] - w)
    global_valid = jnp.arange(s)[None] < pos[:, None]
    cap = cfg.attn_logit_softcap

    blocks = params["decoder_block"]
    # RoPE's sines and cosines once per step (global and local base), not once per layer: XLA evaluated them
    # inside each layer's rotation fusions, ~4 ms of a 32-row Gemma 3 270M step
    sin, cos, rope_row = gm.rope_tables(cfg, positions)

    def body(x, xs):
        p, row, loc, l_i, g_i = xs
        inv = (sin[row], cos[row])
        if in_place:
            p = cpu_kernels.layer_view(blocks, p)
        box = {}

        def attend(q, k, v):
            box["k"], box["v"] = k[:, 0], v[:, 0]

            def local(q, k, v):
                if in_place:  # the native kernel reads the stacked cache in place
                    return cpu_kernels.decode_attention(q, k, v, kl, vl, l_i, local_valid, cap)
                return _attend_cached(q, k, v, kl[l_i], vl[l_i], local_valid, cap)

            def glob(q, k, v):
                if in_place:
                    return cpu_kernels.decode_attention(q, k, v, kg, vg, g_i, global_valid, cap)
                return _attend_cached(q, k, v, kg[g_i], vg[g_i], global_valid, cap)

            if not is_local.any():
                return glob(q, k, v)
            if is_local.all():
                return local(q, k, v)
            return jax.lax.cond(loc, local, glob, q, k, v)

        x = gm.decoder_layer(p, x, cfg, positions, inv, attend, backend=layer_backend)
        return x, (box["k"], box["v"])

    xs = (jnp.arange(cfg.num_layers) if in_place else blocks, rope_row, jnp.asarray(is_local),
          jnp.asarray(li), jnp.asarray(gi))
    x, (ks, vs) = jax.lax.scan(body, x, xs)  # [L, B, K, hd]
    loc_idx, glob_idx = np.nonzero(is_local)[0], np.nonzero(~is_local)[0]
    cache = dict(cache)

    def write(c: Array, new: Array, at: Array) -> Array:  # c[:, b, at[b]] = new[:, b]
        if in_place:  # bytes copied in place (XLA:CPU widens a 16-bit scatter's whole operand to float32)
            return cpu_kernels.write_rows(c, new, at)
        return c.at[:, rows, at].set(new.astype(c.dtype))

    if len(loc_idx):
        slot = pos % w
        cache["k_local"] = write(kl, ks[loc_idx], slot)
        cache["v_local"] = write(vl, vs[loc_idx], slot)
    if len(glob_idx):
        cache["k_global"] = write(kg, ks[glob_idx], pos)
        cache["v_global"] = write(vg, vs[glob_idx], pos)
    x = rms_norm(x, params["final_normalization"]["scale"], cfg.norm_eps, cfg.norm_offset)
    return gm.logits_from_hidden(params, cfg, x)[:, 0], cache
