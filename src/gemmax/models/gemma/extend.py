"""A block of tokens on top of an existing cache: the primitive prefix caching and speculative decoding share.

``extend`` runs tokens ``[B, K]`` at positions ``pos .. pos + K - 1`` of each row against the row's cache
(its positions ``< pos``) and returns logits for every one of them, plus the block's keys and values *without
writing them*. ``commit`` writes the first ``counts[b]`` of those entries into chosen slots afterwards. The
split is what makes both users exact on Gemma 2/3's sliding-window ring buffers: a verifier that wrote all
``K`` drafts into a ring would overwrite entries still inside the window of the tokens that survive, so only
the accepted ones are written, once their number is known.

Keys/values of a block are kept for every layer in layer order (``{"k", "v"}: [L, B, K, kv_heads, hd]``):
the prefix cache stores exactly that and ``commit`` turns it into the ring / global layout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gemmax.kernels import cpu as cpu_kernels
from gemmax.models.base import CPU, XLA
from gemmax.models.gemma import decode as gd
from gemmax.models.gemma import model as gm
from gemmax.models.gemma.config import LOCAL, ModelConfig
from gemmax.nn.layers import dot_attention, rms_norm

Array = jax.Array


def extend(params: dict, cfg: ModelConfig, cache: dict, tokens: Array, pos: Array, backend: str = XLA,
           last: Array | None = None) -> tuple[Array, dict]:
    """Tokens ``[B, K]`` at positions ``pos[b] + j`` over ``cache`` (batch B, read only) -> (float32 logits
    ``[B, K, V]``, or ``[B, V]`` at block index ``last[b]`` when given, and the block's ``{"k", "v"}``).

    Each token sees the row's cached positions ``< pos`` (within its layer's window) and the block's earlier
    tokens. ``backend="cpu"`` runs the linears through the native GEMM as a prefill does; attention is XLA.
    """
    in_place = gd._native(backend)
    b, t = tokens.shape
    if in_place:
        params = gd._native_params(params, cfg, gemm=True)
    layer_backend = CPU if in_place else XLA
    blocks = params["decoder_block"]
    j = jnp.arange(t, dtype=jnp.int32)
    positions = pos[:, None] + j[None]  # [B, K]
    x = gm.embed(params, cfg, tokens)
    sin, cos, rope_row = gm.rope_tables(cfg, positions)
    windows = jnp.asarray(gm.layer_windows(cfg))
    is_local, li, gi = gd._layer_slots(cfg)
    kl, vl, kg, vg = cache["k_local"], cache["v_local"], cache["k_global"], cache["v_global"]
    w, s = kl.shape[2], kg.shape[2]
    # what each query may read of the cache: ring slot r holds the latest position < pos with p % w == r
    pj = pos[:, None] - 1 - jnp.mod(pos[:, None] - 1 - jnp.arange(w)[None], w)  # [B, W]
    local_ok = (pj[:, None, :] >= 0) & (pj[:, None, :] > positions[:, :, None] - w)  # [B, K, W]
    global_ok = jnp.broadcast_to((jnp.arange(s)[None] < pos[:, None])[:, None, :], (b, t, s))
    causal = j[None, :, None] >= j[None, None, :]  # [1, K, K]
    cap = cfg.attn_logit_softcap

    def layer(i: Array, x: Array, q_rows: Array | None = None) -> tuple[Array, Array, Array]:
        if in_place:
            p = cpu_kernels.layer_view(blocks, i, gemm=True)
        else:
            p = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False), blocks)
        box: dict[str, Array] = {}

        def attend(q: Array, k: Array, v: Array) -> Array:
            box["k"], box["v"] = k, v
            inblock = jnp.broadcast_to(causal & (j[None, :, None] - j[None, None, :] < windows[i]), (b, t, t))

            def over(kc: Array, vc: Array, ok: Array) -> Array:
                mask = jnp.concatenate([ok, inblock], axis=-1)
                if q_rows is not None:
                    mask = jnp.take_along_axis(mask, q_rows[:, :, None], axis=1)
                return dot_attention(q, jnp.concatenate([kc, k.astype(kc.dtype)], 1),
                                     jnp.concatenate([vc, v.astype(vc.dtype)], 1), mask, cap)

            def local() -> Array:
                return over(kl[jnp.asarray(li)[i]], vl[jnp.asarray(li)[i]], local_ok)

            def glob() -> Array:
                return over(kg[jnp.asarray(gi)[i]], vg[jnp.asarray(gi)[i]], global_ok)

            if not is_local.any():
                return glob()
            if is_local.all():
                return local()
            return jax.lax.cond(jnp.asarray(is_local)[i], local, glob)

        row = rope_row[i]
        x = gm.decoder_layer(p, x, cfg, positions, (sin[row], cos[row]), attend, q_rows=q_rows,
                             backend=layer_backend)
        return x, box["k"], box["v"]

    def body(x: Array, i: Array) -> tuple[Array, tuple[Array, Array]]:
        x, k, v = layer(i, x)
        return x, (gd._as_bits(k), gd._as_bits(v))

    n = cfg.num_layers
    x, (ks, vs) = jax.lax.scan(body, x, jnp.arange(n - 1))
    q_rows = None if last is None else last.astype(jnp.int32)[:, None]
    x, k_last, v_last = layer(jnp.asarray(n - 1), x, q_rows)
    ks = jnp.concatenate([gd._from_bits(ks, k_last.dtype), k_last[None]])
    vs = jnp.concatenate([gd._from_bits(vs, v_last.dtype), v_last[None]])
    x = rms_norm(x, params["final_normalization"]["scale"], cfg.norm_eps, cfg.norm_offset)
    logits = gm.logits_from_hidden(params, cfg, x)
    return (logits[:, 0] if last is not None else logits), {"k": ks, "v": vs}


def commit(cfg: ModelConfig, cache: dict, block: dict, slots: Array, pos: Array, counts: Array,
           backend: str = XLA) -> dict:
    """Write the first ``counts[b]`` entries of a block's keys/values (``extend``'s, or the prefix cache's)
    at positions ``pos[b]..`` into cache rows ``slots[b]`` (a slot past the cache's batch is dropped).
    Ring layers get only the last ``window`` of them, so no two writes land on one ring slot. On the
    ``"cpu"`` backend the entries' bytes are copied in place (``gd.insert``)."""
    ks, vs = block["k"], block["v"]
    t = ks.shape[2]
    is_local = np.array([kind == LOCAL for kind in cfg.layer_types])
    loc, glob = np.nonzero(is_local)[0], np.nonzero(~is_local)[0]
    out = dict(cache)
    j = jnp.arange(t, dtype=jnp.int32)[None]
    cnt = counts.astype(jnp.int32)[:, None]
    start = pos.astype(jnp.int32)[:, None]
    rows = slots.astype(jnp.int32)[:, None]
    kept = j < cnt
    native = gd._native(backend)

    def write(c: Array, src: Array, idx: Array) -> Array:
        if native:
            return cpu_kernels.write_entries(c, src, slots, idx)
        return c.at[:, rows, idx].set(src.astype(c.dtype), mode="drop")

    if len(glob):
        s = cache["k_global"].shape[2]
        idx = jnp.where(kept, start + j, s)  # s: out of range, dropped
        for name, src in (("k_global", ks), ("v_global", vs)):
            out[name] = write(cache[name], src[glob], idx)
    if len(loc):
        w = cache["k_local"].shape[2]
        idx = jnp.where(kept & (j >= cnt - w), jnp.mod(start + j, w), w)
        for name, src in (("k_local", ks), ("v_local", vs)):
            out[name] = write(cache[name], src[loc], idx)
    return out
