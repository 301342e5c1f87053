"""Text generation: a static KV cache, compiled prefill and chunked decode, on-device sampling.

Design (after gpt-fast and jax-llm-examples):
- The cache is a pytree of fixed shape, donated to the decode step. Global layers hold ``max_len`` slots;
  sliding-window layers hold a ring buffer of ``window`` slots indexed by absolute position modulo the
  window, so Gemma 2/3 keep far less cache at long context (``cache_bytes_per_token``).
- Every row (slot) of the batch carries its own position, length limit, sampling parameters, RNG key and
  stop ids, so rows are independent: a server can prefill a new request into a free slot and retire a
  finished one between decode chunks (continuous batching) without touching the others.
- Prefill compiles once per prompt-length bucket (powers of two); decode compiles once per chunk size and
  runs ``chunk`` tokens per Python dispatch inside ``lax.scan``.
- Layers are scanned; local vs global attention is chosen per layer with ``lax.cond`` on data, so compile
  time stays flat in depth.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemmax.kernels import cpu as cpu_kernels
from gemmax.models.gemma import model as gm
from gemmax.models.gemma.config import LOCAL, ModelConfig
from gemmax.nn.layers import MASK_VALUE, attention_mask, dot_attention, einsum, rms_norm, softcap

Array = jax.Array


def bucket(n: int, minimum: int = 16) -> int:
    b = minimum
    while b < n:
        b *= 2
    return b


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


def prefill(params: dict, cfg: ModelConfig, tokens: Array, lengths: Array, window: int,
            kernels: bool = False) -> tuple[Array, dict]:
    """Run prompts [b, T] (right-padded, true lengths [b]) -> (last-token logits [b, V], per-row caches).

    The returned caches hold ``T`` slots for global layers and a ``window``-slot ring for local ones, in the
    same layout as ``init_cache`` (batch b), ready to be inserted into an engine's slots.

    ``kernels``: the linears go through gemmax's native CPU GEMM (``gemmax.kernels.cpu``), which reads each
    stacked weight in place at its own width; the scan then walks layer indices, as in ``decode_step``.
    """
    with cpu_kernels.decode_kernels(kernels, prefill=True) as on:
        return _prefill(params, cfg, tokens, lengths, window, on)


def _prefill(params: dict, cfg: ModelConfig, tokens: Array, lengths: Array, window: int,
             in_place: bool) -> tuple[Array, dict]:
    b, t = tokens.shape
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
            p = cpu_kernels.layer_view(blocks, i)
        else:
            p = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False), blocks)
        w, row = windows[i], rope_row[i]
        kv = {}

        def attend(q, k, v):
            kv["k"], kv["v"] = k, v
            if q_rows is not None:  # the last layer: one query per row, against every key of its prompt
                mask = attention_mask(q_rows, idx, w if has_local else None, jnp.ones_like(q_rows), seg)
                return dot_attention(q, k, v, mask, cfg.attn_logit_softcap)
            if in_place:  # blocked causal attention in the native kernel: no [H, T, T] scores
                return cpu_kernels.prefill_attention(q, k, v, lengths, w if has_local else gm.NO_WINDOW,
                                                     cfg.attn_logit_softcap)
            mask = attention_mask(idx, idx, w if has_local else None, seg, seg)
            return dot_attention(q, k, v, mask, cfg.attn_logit_softcap)

        x = gm.decoder_layer(p, x, cfg, idx, (sin[row], cos[row]), attend, q_rows=q_rows)
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

    is_local, _, _ = _layer_slots(cfg)
    loc = np.nonzero(is_local)[0]
    glob = np.nonzero(~is_local)[0]
    caches = {}
    if len(glob):
        caches["k_global"], caches["v_global"] = ks[glob], vs[glob]
    if len(loc):
        # ring slot j holds the latest prompt position p < length with p % window == j
        j = jnp.arange(window)
        src = j[None] + window * jnp.floor_divide(lengths[:, None] - 1 - j[None], window)  # [b, W]
        ok = (src >= 0)[None, :, :, None, None]
        src = jnp.clip(src, 0, t - 1)[None, :, :, None, None]
        caches["k_local"] = jnp.where(ok, jnp.take_along_axis(ks[loc], src, axis=2), 0).astype(ks.dtype)
        caches["v_local"] = jnp.where(ok, jnp.take_along_axis(vs[loc], src, axis=2), 0).astype(vs.dtype)
    return logits, caches


def insert(cache: dict, new: dict, slots: Array) -> dict:
    """Write prefilled per-row caches into engine slots (rows) of the big cache."""
    out = dict(cache)
    for name, arr in new.items():
        t = arr.shape[2]
        out[name] = cache[name].at[:, slots, :t].set(arr.astype(cache[name].dtype))
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
                kernels: bool = False) -> tuple[Array, dict]:
    """One token per row: tokens [B] at absolute positions pos [B] -> logits [B, V], updated cache.

    ``kernels``: run the linears through gemmax's native CPU GEMV (``gemmax.kernels.cpu``); the layer scan
    then walks layer indices and the kernel reads each stacked weight in place instead of a sliced copy.
    """
    with cpu_kernels.decode_kernels(kernels) as on:
        return _decode_step(params, cfg, cache, tokens, pos, on)


def _decode_step(params: dict, cfg: ModelConfig, cache: dict, tokens: Array, pos: Array,
                 in_place: bool) -> tuple[Array, dict]:
    b = tokens.shape[0]
    rows = jnp.arange(b)
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

    def body(x, xs):
        p, inv, loc, l_i, g_i = xs
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

        x = gm.decoder_layer(p, x, cfg, positions, inv, attend)
        return x, (box["k"], box["v"])

    xs = (jnp.arange(cfg.num_layers) if in_place else blocks, gm.layer_inv_freqs(cfg), jnp.asarray(is_local),
          jnp.asarray(li), jnp.asarray(gi))
    x, (ks, vs) = jax.lax.scan(body, x, xs)  # [L, B, K, hd]
    loc_idx, glob_idx = np.nonzero(is_local)[0], np.nonzero(~is_local)[0]
    cache = dict(cache)
    if len(loc_idx):
        slot = pos % w
        cache["k_local"] = kl.at[:, rows, slot].set(ks[loc_idx].astype(kl.dtype))
        cache["v_local"] = vl.at[:, rows, slot].set(vs[loc_idx].astype(vl.dtype))
    if len(glob_idx):
        cache["k_global"] = kg.at[:, rows, pos].set(ks[glob_idx].astype(kg.dtype))
        cache["v_global"] = vg.at[:, rows, pos].set(vs[glob_idx].astype(vg.dtype))
    x = rms_norm(x, params["final_normalization"]["scale"], cfg.norm_eps, cfg.norm_offset)
    return gm.logits_from_hidden(params, cfg, x)[:, 0], cache


# ---- sampling -----------------------------------------------------------------------------------------


def greedy_argmax(logits: Array) -> Array:
    """``argmax`` over the last axis, ties to the lowest index, as ``jnp.argmax``; a row with NaNs still
    gives an in-range id. As max + first-match it is two plain vectorised reductions: XLA:CPU's variadic (value, index)
    argmax reduce over a 262k vocabulary took 1.1 ms of every decode step, this 0.3."""
    m = logits.max(axis=-1, keepdims=True)
    n = logits.shape[-1]
    first = jnp.min(jnp.where(logits == m, jnp.arange(n, dtype=jnp.int32), n), axis=-1)
    return jnp.minimum(first, n - 1)


def sample_tokens(logits: Array, keys: Array, temperature: Array, top_k: Array, top_p: Array, min_p: Array,
                  n_cand: int, vocab_limit: int | None = None) -> Array:
    """Per-row sampling. temperature <= 0 means greedy. Filters apply in the order transformers uses:
    temperature, top-k, then top-p and min-p on the renormalised survivors.

    Filtering works on the ``n_cand`` most likely tokens (a static size, so it compiles once); with top-k
    off, probabilities are still normalised over the whole vocabulary, so top-p/min-p are exact unless the
    nucleus needs more than ``n_cand`` tokens, where it is cut at ``n_cand``.
    """
    logits = logits.astype(jnp.float32)
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)
    greedy_tok = greedy_argmax(logits)
    if n_cand < 0:  # every row greedy: no random numbers, no softmax (a 262k-vocab draw costs ~25 ms on CPU)
        return greedy_tok.astype(jnp.int32)
    t = jnp.where(temperature > 0, temperature, 1.0)[:, None]
    lg = logits / t
    if n_cand == 0:
        # inverse-CDF draw: one uniform per row instead of a Gumbel per vocabulary entry (jax.random.categorical
        # over 262k logits is ~25 ms of threefry on a CPU; this is ~2 ms). A zero-probability token can
        # never be picked: the CDF does not rise at it.
        cdf = jnp.cumsum(jax.nn.softmax(lg, axis=-1), axis=-1)
        u = jax.vmap(jax.random.uniform)(keys)[:, None] * cdf[:, -1:]
        sampled = jnp.minimum(jnp.sum(cdf <= u, axis=-1), lg.shape[-1] - 1)  # first index with cdf > u
    else:
        vals, idx = jax.lax.top_k(lg, n_cand)
        r = jnp.arange(n_cand)[None]
        keep = (top_k[:, None] <= 0) | (r < top_k[:, None])
        lse_full = jax.nn.logsumexp(lg, axis=-1, keepdims=True)
        lse_kept = jax.nn.logsumexp(jnp.where(keep, vals, -jnp.inf), axis=-1, keepdims=True)
        logp = vals - jnp.where(top_k[:, None] > 0, lse_kept, lse_full)
        p = jnp.where(keep, jnp.exp(logp), 0.0)
        cum = jnp.cumsum(p, axis=-1)
        keep = keep & ((cum - p < top_p[:, None]) | (r == 0))
        keep = keep & (p >= min_p[:, None] * p[:, :1])
        choice = jax.vmap(jax.random.categorical)(keys, jnp.where(keep, vals, -jnp.inf))
        sampled = jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0]
    return jnp.where(temperature > 0, sampled, greedy_tok).astype(jnp.int32)


def row_keys(seeds: Array, pos: Array) -> Array:
    """One key per row from its own seed and position: a request samples the same tokens whatever else
    shares its batch."""
    return jax.vmap(lambda s, p: jax.random.fold_in(jax.random.key(s), p))(seeds, pos)


_row_keys = jax.jit(row_keys)  # for Engine.add: an eager vmap re-traces on every call (~8 ms per prefill)


def decode_chunk(params: dict, cfg: ModelConfig, cache: dict, state: dict, n_steps: int, n_cand: int,
                 kernels: bool = False) -> tuple[dict, dict, Array]:
    """``n_steps`` decode steps on the device. state: token [B] (last sampled, not yet in cache), pos [B],
    done [B], limit [B] (last position allowed), seed [B], sampling arrays [B], stop_ids [B, S].
    Returns (cache, state, tokens [B, n_steps]) with -1 for rows that were already done."""

    def step(carry, _):
        cache, st = carry
        logits, cache = decode_step(params, cfg, cache, st["token"], st["pos"], kernels)
        pos = st["pos"] + 1
        nxt = sample_tokens(logits, row_keys(st["seed"], pos), st["temperature"], st["top_k"], st["top_p"],
                            st["min_p"], n_cand)
        active = ~st["done"]
        emitted = jnp.where(active, nxt, -1)
        stop = jnp.any(nxt[:, None] == st["stop_ids"], axis=-1)
        done = st["done"] | (active & (stop | (pos >= st["limit"])))
        st = dict(st, token=jnp.where(active, nxt, st["token"]), pos=jnp.where(active, pos, st["pos"]),
                  done=done)
        return (cache, st), emitted

    (cache, state), toks = jax.lax.scan(step, (cache, state), None, length=n_steps)
    return cache, state, toks.T


# ---- the engine --------------------------------------------------------------------------------------


@dataclass
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0
    max_new_tokens: int = 64
    stop_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    slot: int = -1
    new_ids: list[int] = field(default_factory=list)
    done: bool = False
    finish_reason: str | None = None
    first_token_time: float | None = None


MAX_STOP = 8


_COMPILED: dict[tuple[str, int], tuple[Any, Any, Any, Any]] = {}


def compiled_functions(cfg: ModelConfig, window: int) -> tuple[Any, Any, Any, Any]:
    """The engine's jitted (prefill, insert, decode_chunk, first-token sampler), shared by every engine of
    the same architecture: ``lm.generate`` builds an engine per call, and without this each call would
    trace and compile again. XLA's own cache then keys on shapes (prompt bucket, batch, chunk)."""
    key = (cfg.to_json(), window)
    if key not in _COMPILED:
        _COMPILED[key] = (
            jax.jit(functools.partial(prefill, cfg=cfg, window=window), static_argnames=("kernels",)),
            jax.jit(insert, donate_argnums=(0,)),
            jax.jit(functools.partial(decode_chunk, cfg=cfg), static_argnames=("n_steps", "n_cand", "kernels"),
                    donate_argnames=("cache",)),
            jax.jit(sample_tokens, static_argnames=("n_cand",)),
        )
    return _COMPILED[key]


class Engine:
    """A fixed number of slots over one static cache; requests join and leave between decode chunks."""

    def __init__(self, params: dict, cfg: ModelConfig, max_batch: int = 1, max_len: int | None = None,
                 dtype: Any = None, chunk: int = 16):
        self.params = params
        self.cfg = cfg
        self.max_batch = max_batch
        self.max_len = min(max_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.dtype = dtype or _compute_dtype(params)
        self.chunk = chunk
        self.layout = CacheLayout.for_config(cfg, self.max_len)
        self.cache = init_cache(cfg, max_batch, self.max_len, self.dtype)
        self.requests: list[Request | None] = [None] * max_batch
        zeros_i = np.zeros(max_batch, np.int32)
        self.state = {
            "token": zeros_i, "pos": zeros_i, "done": np.ones(max_batch, bool), "limit": zeros_i,
            "seed": zeros_i, "temperature": np.zeros(max_batch, np.float32), "top_k": zeros_i,
            "top_p": np.ones(max_batch, np.float32), "min_p": np.zeros(max_batch, np.float32),
            "stop_ids": np.full((max_batch, MAX_STOP), -1, np.int32),
        }
        self.state = {k: jnp.asarray(v) for k, v in self.state.items()}
        self._replicated = None
        self._place_on_mesh()
        self._prefill, self._insert, self._chunk, self._first = compiled_functions(cfg, self.layout.window)
        # the native CPU kernels: one device only (XLA SPMD cannot split a custom call). Prefill always (its
        # GEMM reads the weights in place at their own width); decode with few rows, where reading the
        # weights once per token is the whole cost
        leaf = jax.tree.leaves(params)[0]
        self.native = (self._replicated is None and len(getattr(leaf.sharding, "device_set", ())) <= 1
                       and cpu_kernels.available())
        self.kernels = self.native and max_batch <= cpu_kernels.MAX_ROWS

    def _place_on_mesh(self) -> None:
        """Under a gemmax distribution the weights live on a mesh: put the cache and per-row state there too
        (replicated; XLA SPMD partitions the step by the weights' shardings), so jit sees one device set."""
        from gemmax.api import current_distribution

        dist = current_distribution()
        leaf = jax.tree.leaves(self.params)[0]
        if dist is None or len(getattr(leaf.sharding, "device_set", ())) <= 1:
            return
        rep = dist.replicated()
        self.cache = jax.device_put(self.cache, rep)
        self.state = jax.device_put(self.state, rep)
        self._replicated = rep

    def _put_state(self, st: dict) -> dict:
        state = {k: jnp.asarray(v) for k, v in st.items()}
        rep = getattr(self, "_replicated", None)
        return jax.device_put(state, rep) if rep is not None else state

    # -- slots --
    def free_slots(self) -> list[int]:
        return [i for i, r in enumerate(self.requests) if r is None]

    def has_work(self) -> bool:
        return any(r is not None and not r.done for r in self.requests)

    def add(self, reqs: Sequence[Request]) -> None:
        """Prefill new requests (one compiled call per length bucket) into free slots."""
        free = self.free_slots()
        if len(reqs) > len(free):
            raise RuntimeError(f"{len(reqs)} requests but only {len(free)} free slots")
        for r in reqs:
            n = len(r.prompt_ids)
            if n == 0:
                raise ValueError("empty prompt")
            if n + 1 > self.max_len:
                raise ValueError(f"prompt of {n} tokens does not fit the context of {self.max_len} tokens")
        t = min(bucket(max(len(r.prompt_ids) for r in reqs)), self.max_len)
        b = len(reqs)
        bb = bucket(b, 1)
        toks = np.zeros((bb, t), np.int32)
        lens = np.ones(bb, np.int32)
        for i, r in enumerate(reqs):
            toks[i, : len(r.prompt_ids)] = r.prompt_ids
            lens[i] = len(r.prompt_ids)
        logits, new = self._prefill(self.params, tokens=jnp.asarray(toks), lengths=jnp.asarray(lens),
                                    kernels=self.native)
        slots = free[:b]
        new = {k: v[:, :b] for k, v in new.items()}
        self.cache = self._insert(self.cache, new, jnp.asarray(slots, jnp.int32))
        st = {k: np.array(v) for k, v in self.state.items()}
        for r, s in zip(reqs, slots, strict=True):
            r.slot = s
            self.requests[s] = r
            sp = r.params
            st["pos"][s] = len(r.prompt_ids)
            st["limit"][s] = min(len(r.prompt_ids) + sp.max_new_tokens, self.max_len) - 1
            st["seed"][s] = sp.seed
            st["temperature"][s], st["top_k"][s] = sp.temperature, sp.top_k
            st["top_p"][s], st["min_p"][s] = sp.top_p, sp.min_p
            ids = list(sp.stop_ids)[:MAX_STOP]
            st["stop_ids"][s] = ids + [-1] * (MAX_STOP - len(ids))
            st["done"][s] = False
        # first new token comes from the prefill logits
        rows = np.asarray(slots)
        first = np.asarray(self._first(
            logits[:b], _row_keys(jnp.asarray(st["seed"][rows]), jnp.asarray(st["pos"][rows])),
            jnp.asarray(st["temperature"][rows]), jnp.asarray(st["top_k"][rows]),
            jnp.asarray(st["top_p"][rows]), jnp.asarray(st["min_p"][rows]), n_cand=self._n_cand(reqs)))
        now = time.perf_counter()
        for r, s, tok in zip(reqs, slots, first, strict=True):
            st["token"][s] = tok
            r.first_token_time = now
            self._append(r, int(tok), st)
        self.state = self._put_state(st)

    def _append(self, r: Request, tok: int, st: dict) -> None:
        r.new_ids.append(tok)
        if tok in r.params.stop_ids:
            r.done, r.finish_reason = True, "stop"
        elif len(r.new_ids) >= r.params.max_new_tokens or st["pos"][r.slot] >= self.max_len - 1:
            r.done, r.finish_reason = True, "length"
        if r.done:
            st["done"][r.slot] = True

    def _n_cand(self, reqs: Sequence[Request | None]) -> int:
        """Static sampling mode of a batch: -1 all greedy, 0 plain sampling, else the candidate count."""
        live = [r.params for r in reqs if r is not None and r.params.temperature > 0]
        if not live:
            return -1
        if not any(p.top_k or p.top_p < 1 or p.min_p > 0 for p in live):
            return 0
        k = max([p.top_k for p in live if p.top_k] or [0])
        need = bucket(k, 64) if k else 256
        return min(need, self.cfg.vocab_size)

    def step(self, n_steps: int | None = None) -> list[Request]:
        """Run one decode chunk for all live slots; returns the requests that got new tokens."""
        n = n_steps or self.chunk
        self.cache, self.state, toks = self._chunk(self.params, cache=self.cache, state=self.state,
                                                   n_steps=n, n_cand=self._n_cand(self.requests),
                                                   kernels=self.kernels)
        toks = np.asarray(toks)
        done = np.asarray(self.state["done"])
        touched = []
        for s, r in enumerate(self.requests):
            if r is None or r.done:
                continue
            new = [int(t) for t in toks[s] if t >= 0]
            r.new_ids.extend(new)
            if new:
                touched.append(r)
            if done[s]:
                r.done = True
                r.finish_reason = "stop" if r.new_ids and r.new_ids[-1] in r.params.stop_ids else "length"
        return touched

    def finish(self, r: Request, reason: str | None = None) -> None:
        """Mark a request done (stop string hit, client gone) so its slot stops decoding."""
        r.done = True
        r.finish_reason = reason or r.finish_reason or "stop"
        if r.slot >= 0:
            self.state = dict(self.state, done=self.state["done"].at[r.slot].set(True))

    def release(self, r: Request) -> None:
        if r.slot >= 0 and self.requests[r.slot] is r:
            self.finish(r, r.finish_reason)
            self.requests[r.slot] = None


def _compute_dtype(params: dict) -> Any:
    d = params["token_embedding"]["embeddings"].dtype
    return d if jnp.issubdtype(d, jnp.floating) else jnp.bfloat16


# ---- convenience over the engine ---------------------------------------------------------------------


def generate_ids(params: dict, cfg: ModelConfig, prompts: Sequence[Sequence[int]], sp: Sequence[SamplingParams],
                 chunk: int = 16, stop_check: Any = None) -> list[Request]:
    """Generate for a batch of token-id prompts; one engine sized to the batch and the longest request."""
    need = max(len(p) + s.max_new_tokens for p, s in zip(prompts, sp, strict=True))
    max_len = min(bucket(need + 1), cfg.max_position_embeddings)
    eng = Engine(params, cfg, max_batch=bucket(len(prompts), 1), max_len=max_len, chunk=chunk)
    reqs = [Request(list(p), s) for p, s in zip(prompts, sp, strict=True)]
    eng.add(reqs)
    while eng.has_work():
        eng.step()
        if stop_check is not None:
            for r in reqs:
                if not r.done and stop_check(r):
                    eng.finish(r, "stop")
    return reqs
