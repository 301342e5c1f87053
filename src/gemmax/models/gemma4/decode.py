"""Generation for Gemma 4: a static KV cache, prefill and decode step through the family interface.

Only layers that compute keys and values keep a cache: local owners a ring of ``window`` slots
(``k_local`` [n, B, W, K, hd], indexed by absolute position modulo the window), global owners ``max_len``
slots (``k_global`` [n, B, S, K_g, hd_g]). A layer that shares keys and values (E2B / E4B: the last
``num_kv_shared_layers``) reads its producer's cache entry and the producer's key and value of the current
step, which the layer scan carries; it writes nothing, so the cache is ``num_kv_shared_layers`` layers
smaller. Rows are independent engine slots. Everything runs on XLA (``backend`` is accepted and ignored:
the native CPU kernels are the Gemma family's).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemmax.models.gemma.decode import _attend_cached
from gemmax.models.gemma4 import model as m4
from gemmax.models.gemma4.config import GLOBAL, LOCAL, Gemma4Config
from gemmax.nn.layers import attention_mask, dot_attention

Array = jax.Array


def _owners(cfg: Gemma4Config) -> dict[str, tuple[int, ...]]:
    groups = cfg.group_layers()
    return {LOCAL: groups.get("local", ()), GLOBAL: groups.get("global", ())}


def _window(cfg: Gemma4Config, max_len: int) -> int:
    return min(cfg.sliding_window, max_len) if _owners(cfg)[LOCAL] else 1


def init_cache(cfg: Gemma4Config, batch: int, max_len: int, dtype: Any) -> dict[str, Array]:
    own = _owners(cfg)
    w = _window(cfg, max_len)
    s = max_len if own[GLOBAL] else 1
    nl, ng = max(len(own[LOCAL]), 1), max(len(own[GLOBAL]), 1)
    local = (nl, batch, w, cfg.num_kv_heads, cfg.head_dim)
    glob = (ng, batch, s, cfg.global_kv_heads, cfg.global_hd)
    # four distinct buffers: the engine donates the cache, and one buffer may not be donated twice
    return {"k_local": jnp.zeros(local, dtype), "v_local": jnp.zeros(local, dtype),
            "k_global": jnp.zeros(glob, dtype), "v_global": jnp.zeros(glob, dtype)}


def cache_bytes_per_token(cfg: Gemma4Config, context: int, dtype_bytes: int = 2) -> float:
    """KV-cache bytes per token of context (local rings, shared layers keeping nothing)."""
    own = _owners(cfg)
    w = min(cfg.sliding_window, context)
    loc = 2 * cfg.num_kv_heads * cfg.head_dim * dtype_bytes * len(own[LOCAL]) * w
    glob = 2 * cfg.global_kv_heads * cfg.global_hd * dtype_bytes * len(own[GLOBAL]) * context
    return (loc + glob) / context


def prefill(params: dict, cfg: Gemma4Config, tokens: Array, lengths: Array, max_len: int,
            backend: str = "xla") -> tuple[Array, dict]:
    """Prompts [b, T] (right-padded, true lengths [b]) -> (last-token logits [b, V], per-row caches in
    ``init_cache``'s layout: ``T`` global slots, a ``window``-slot ring for local layers)."""
    del backend
    tokens = jnp.asarray(tokens, jnp.int32)
    x = m4.embed(params, cfg, tokens)
    return prefill_embedded(params, cfg, x, m4.per_layer_inputs(params, cfg, tokens, x), lengths, max_len)


#: prompt_mask(layer type, key positions [b, T], valid [b, T]) -> [b, T, T]: who sees whom inside the prompt
PromptMask = Callable[[str, Array, Array], Array]


def causal_prompt_mask(cfg: Gemma4Config) -> PromptMask:
    """Causal attention inside each prompt (sliding window on local layers); padding never meets the prompt."""
    def mask(ltype: str, idx: Array, valid: Array) -> Array:
        seg = valid.astype(jnp.int32)  # padding is segment 0
        return attention_mask(idx, idx, cfg.sliding_window if ltype == LOCAL else None, seg, seg)
    return mask


def prefill_embedded(params: dict, cfg: Gemma4Config, x: Array, ple: Array | None, lengths: Array, max_len: int,
                     prompt_mask: PromptMask | None = None) -> tuple[Array, dict]:
    """:func:`prefill` from the input embeddings x [b, T, D] and per-layer inputs (a multimodal prompt puts
    image features into x); ``prompt_mask`` (default causal) masks the layers that run over the whole prompt.
    The sharing layers run at each prompt's last position only, which sees every earlier prompt position
    under any of these masks (nothing of the prompt lies after it)."""
    lengths = jnp.asarray(lengths, jnp.int32)
    b, t = x.shape[:2]
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    valid = idx < lengths[:, None]
    seg = valid.astype(jnp.int32)
    full = {lt: (prompt_mask or causal_prompt_mask(cfg))(lt, idx, valid) for lt in (LOCAL, GLOBAL)}

    def make_attend(ltype: str, q_idx: Array | None = None, q_seg: Array = seg) -> m4.AttendFn:
        window = cfg.sliding_window if ltype == LOCAL else None

        def attend(q, k, v):
            mask = full[ltype] if q_idx is None else attention_mask(q_idx, idx, window, q_seg, seg)
            return dot_attention(q, k, v, mask)
        return attend

    # layers that compute keys and values run over the whole prompt; the sharing layers after them write no
    # cache, so only each prompt's last position goes through them (as transformers' generate does)
    last_pos = (lengths - 1)[:, None]
    x, kvs, carry = m4.run_layers(params, cfg, x, idx, ple, make_attend, layers=range(cfg.first_shared))
    x = jnp.take_along_axis(x, last_pos[:, :, None], axis=1)
    if cfg.num_kv_shared_layers:
        ple_last = None if ple is None else jnp.take_along_axis(ple, last_pos[None, :, :, None], axis=2)
        ones = jnp.ones_like(last_pos)
        x, _, _ = m4.run_layers(params, cfg, x, last_pos, ple_last,
                                lambda lt: make_attend(lt, last_pos, ones), layers=range(cfg.first_shared,
                                                                                         cfg.num_layers),
                                carry=carry)
    last = m4.norm(x, params["final_normalization"]["scale"], cfg.norm_eps)
    logits = m4.logits_from_hidden(params, cfg, last)[:, 0]
    own = _owners(cfg)
    caches: dict[str, Array] = {}
    if own[GLOBAL]:
        ids = np.asarray(own[GLOBAL])
        caches["k_global"], caches["v_global"] = kvs[GLOBAL][0][ids], kvs[GLOBAL][1][ids]
    if own[LOCAL]:
        ids = np.asarray(own[LOCAL])
        window = _window(cfg, max_len)
        # ring slot j holds the latest prompt position p < length with p % window == j
        j = jnp.arange(window)
        src = j[None] + window * jnp.floor_divide(lengths[:, None] - 1 - j[None], window)  # [b, W]
        ok = (src >= 0)[None, :, :, None, None]
        src = jnp.clip(src, 0, t - 1)[None, :, :, None, None]
        for name, a in (("k_local", kvs[LOCAL][0][ids]), ("v_local", kvs[LOCAL][1][ids])):
            caches[name] = jnp.where(ok, jnp.take_along_axis(a, src, axis=2), 0).astype(a.dtype)
    return logits, caches


def insert(cache: dict, new: dict, slots: Array, backend: str = "xla") -> dict:
    """Write prefilled per-row caches into engine slots (rows); slots past the batch are dropped. One
    backend (XLA's)."""
    del backend
    out = dict(cache)
    for name, arr in new.items():
        out[name] = cache[name].at[:, slots, :arr.shape[2]].set(arr.astype(cache[name].dtype), mode="drop")
    return out


def decode_step(params: dict, cfg: Gemma4Config, cache: dict, tokens: Array, pos: Array,
                backend: str = "xla") -> tuple[Array, dict]:
    """One token per row: tokens [B] at absolute positions pos [B] -> (logits [B, V], updated cache)."""
    del backend
    b = tokens.shape[0]
    rows = jnp.arange(b)
    x = m4.embed(params, cfg, tokens[:, None])
    positions = pos[:, None]
    ple = m4.per_layer_inputs(params, cfg, tokens[:, None], x)
    kl, vl, kg, vg = cache["k_local"], cache["v_local"], cache["k_global"], cache["v_global"]
    w, s = kl.shape[2], kg.shape[2]
    # absolute position held by ring slot j: the latest p < pos with p % w == j; valid inside the window
    pj = pos[:, None] - 1 - jnp.mod(pos[:, None] - 1 - jnp.arange(w)[None], w)
    valid = {LOCAL: (pj >= 0) & (pj > pos[:, None] - cfg.sliding_window), GLOBAL: jnp.arange(s)[None] < pos[:, None]}
    stores = {LOCAL: (kl, vl), GLOBAL: (kg, vg)}
    own = _owners(cfg)
    # the cache entry each shared group reads: its producer's index among the owners of its type
    producer = {lt: own[lt].index(cfg.producer(lt)) for lt in (LOCAL, GLOBAL)
                if cfg.num_kv_shared_layers and lt in cfg.layer_types[cfg.first_shared:]}
    names, gid, gpos = m4.layer_plan(cfg)
    tables = m4.rope_tables(cfg, positions)
    blocks = params["decoder_block"]
    dtype = x.dtype
    zero_new = {LOCAL: jnp.zeros((b, 1, cfg.num_kv_heads, cfg.head_dim), dtype),
                GLOBAL: jnp.zeros((b, 1, cfg.global_kv_heads, cfg.global_hd), dtype)}

    def branch(group: str):
        ltype, shared, _, _ = m4.group_dims(cfg, group)

        def run(i, x, carry, ple_i):
            p = m4.layer_params(blocks, group, i)
            entry = producer[ltype] if shared else i
            kc, vc = stores[ltype]

            def attend(q, k, v):
                return _attend_cached(q, k, v, kc[entry], vc[entry], valid[ltype], None)

            x, k, v = m4.block(p, x, cfg, group, tables[ltype], attend, ple_i, kv=carry[ltype] if shared else None)
            carry = dict(carry)
            out = {lt: (z[:, 0], z[:, 0]) for lt, z in zero_new.items()}
            if not shared:
                carry[ltype] = (k.astype(dtype), v.astype(dtype))
                out[ltype] = (carry[ltype][0][:, 0], carry[ltype][1][:, 0])
            return x, carry, out

        return run

    ple_xs = ple if ple is not None else jnp.zeros((cfg.num_layers,), dtype)
    carry0 = {lt: (z, z) for lt, z in zero_new.items()}
    (x, _), new = m4.scan_groups([branch(g) for g in names], x, carry0, gid, gpos, ple_xs)
    cache = dict(cache)
    if own[LOCAL]:
        ids = np.asarray(own[LOCAL])
        slot = pos % w
        cache["k_local"] = kl.at[:, rows, slot].set(new[LOCAL][0][ids].astype(kl.dtype))
        cache["v_local"] = vl.at[:, rows, slot].set(new[LOCAL][1][ids].astype(vl.dtype))
    if own[GLOBAL]:
        ids = np.asarray(own[GLOBAL])
        cache["k_global"] = kg.at[:, rows, pos].set(new[GLOBAL][0][ids].astype(kg.dtype))
        cache["v_global"] = vg.at[:, rows, pos].set(new[GLOBAL][1][ids].astype(vg.dtype))
    x = m4.norm(x, params["final_normalization"]["scale"], cfg.norm_eps)
    return m4.logits_from_hidden(params, cfg, x)[:, 0], cache
