"""The generation engine and sampler, one for every family: compiled prefill, chunked decode, on-device
sampling, slots that requests join and leave.

Design (after gpt-fast and jax-llm-examples):
- The cache is the family's pytree of fixed shape (``Family.init_cache``), donated to the decode step.
- Every row (slot) of the batch carries its own position, length limit, sampling parameters, RNG key and
  stop ids, so rows are independent: a server can prefill a new request into a free slot and retire a
  finished one between decode chunks (continuous batching) without touching the others.
- Prefill compiles once per prompt-length bucket (powers of two); decode compiles once per chunk size and
  runs ``chunk`` tokens per Python dispatch inside ``lax.scan``.
- The backend (native CPU kernels or XLA) is chosen here and passed to the family as a value.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemmax import distribution as _dist
from gemmax.kernels import cpu as cpu_kernels
from gemmax.models import base
from gemmax.models.base import CPU, XLA, Family

Array = jax.Array


def bucket(n: int, minimum: int = 16) -> int:
    b = minimum
    while b < n:
        b *= 2
    return b


# ---- sampling -----------------------------------------------------------------------------------------

#: candidates the sampler's fast path considers (a fixed size: the compiled step never depends on top_k)
N_CAND = 256


def greedy_argmax(logits: Array) -> Array:
    """``argmax`` over the last axis, ties to the lowest index, as ``jnp.argmax``; a row with NaNs still
    gives an in-range id. As max + first-match it is two plain vectorised reductions: XLA:CPU's variadic (value, index)
    argmax reduce over a 262k vocabulary took 1.1 ms of every decode step, this 0.3."""
    m = logits.max(axis=-1, keepdims=True)
    n = logits.shape[-1]
    first = jnp.min(jnp.where(logits == m, jnp.arange(n, dtype=jnp.int32), n), axis=-1)
    return jnp.minimum(first, n - 1)


def sample_tokens(logits: Array, keys: Array, temperature: Array, top_k: Array, top_p: Array, min_p: Array,
                  n_cand: int = N_CAND, vocab_limit: int | None = None) -> Array:
    """Per-row sampling. temperature <= 0 means greedy. Filters apply in the order transformers uses:
    temperature, top-k, then top-p and min-p on the renormalised survivors.

    Every setting is per-row *data* of one compiled function: a new ``top_k`` value never recompiles, and
    a row's token depends only on its own logits, settings and key, never on what shares the batch (the
    random draw is one uniform per row, inverse-CDF). ``n_cand`` (static) only says how many of the most
    likely tokens the fast path looks at (-1: every row is greedy, skip sampling altogether). A row whose
    kept set fits in those candidates is sampled from them; a row whose kept set may reach past them
    (plain sampling, a ``top_k`` above ``n_cand``, a wide nucleus) takes the exact path over the whole
    vocabulary, under a per-row ``lax.cond``: its cost is paid once per such row, not by the batch.
    """
    logits = logits.astype(jnp.float32)
    v = logits.shape[-1]
    if vocab_limit is not None and vocab_limit < v:
        logits = jnp.where(jnp.arange(v) < vocab_limit, logits, -jnp.inf)
    greedy_tok = greedy_argmax(logits)
    if n_cand < 0:  # every row greedy: no random numbers, no softmax (a 262k-vocab draw costs ~25 ms on CPU)
        return greedy_tok.astype(jnp.int32)
    n = min(n_cand or N_CAND, v)
    t = jnp.where(temperature > 0, temperature, 1.0)[:, None]
    lg = logits / t
    u = jax.vmap(jax.random.uniform)(keys)
    k = jnp.where((top_k <= 0) | (top_k >= v), v, top_k).astype(jnp.int32)
    p, m = top_p.astype(jnp.float32), min_p.astype(jnp.float32)

    # fast path: the n most likely tokens, in order (rank semantics, like transformers)
    # (the barrier keeps XLA:CPU's top-k rewrite: folding the gather below into the sort would turn the
    # top-k into a full sort of the vocabulary, ~100x slower)
    vals, idx = jax.lax.optimization_barrier(jax.lax.top_k(lg, n))
    r = jnp.arange(n)[None]
    keep = r < k[:, None]
    lse_kept = jax.nn.logsumexp(jnp.where(keep, vals, -jnp.inf), axis=-1)
    log_z = jnp.where(k >= v, jax.nn.logsumexp(lg, axis=-1), lse_kept) if n < v else lse_kept
    q = jnp.where(keep, jnp.exp(vals - log_z[:, None]), 0.0)
    cum = jnp.cumsum(q, axis=-1)
    keep = keep & ((cum - q < p[:, None]) | (r == 0) | (p[:, None] >= 1))
    keep = keep & (q >= m[:, None] * q[:, :1])
    w = jnp.where(keep, jnp.exp(vals - vals[:, :1]), 0.0)
    c = jnp.cumsum(w, axis=-1)
    j = jnp.minimum(jnp.sum(c <= u[:, None] * c[:, -1:], axis=-1), n - 1)
    fast = jnp.take_along_axis(idx, j[:, None], axis=-1)[:, 0]
    if n < v:  # rows whose kept set may reach past the candidates: exact, one row at a time
        need = (temperature > 0) & (keep[:, -1] | ((k > n) & (k < v) & (p < 1)))

        def one(args: tuple) -> Array:
            need_i, fast_i, *row = args
            return jax.lax.cond(need_i, lambda: _sample_row_exact(*row), lambda: fast_i)

        fast = jax.lax.cond(jnp.any(need), lambda: jax.lax.map(one, (need, fast, lg, k, p, m, u)), lambda: fast)
    return jnp.where(temperature > 0, fast, greedy_tok).astype(jnp.int32)


def _ordered(x: Array) -> Array:
    """float32 -> int32 with the same order, so thresholds can be found exactly by integer bisection."""
    b = jax.lax.bitcast_convert_type(x, jnp.int32)
    return jnp.where(b < 0, b ^ jnp.int32(0x7FFFFFFF), b)


def _bisect(ok: Any, lo: Array, hi: Array) -> Array:
    """The largest ``t`` in ``[lo, hi)`` with ``ok(t)``, for ``ok`` true at ``lo``, false at ``hi`` and
    monotone: 33 halvings cover the whole int32 range, so the loop has a fixed length."""

    def body(_: Any, c: tuple[Array, Array]) -> tuple[Array, Array]:
        lo, hi = c
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without int32 overflow
        good = ok(mid)
        return jnp.where(good, mid, lo), jnp.where(good, hi, mid)

    return jax.lax.fori_loop(0, 33, body, (lo, hi))[0]


def _sample_row_exact(lg: Array, k: Array, p: Array, m: Array, u: Array) -> Array:
    """One row over its whole vocabulary, with thresholds instead of a sort: the k-th largest logit and
    the nucleus cutoff by bisection on the logits' bit patterns (tokens tied at a cutoff are all kept),
    min-p in closed form, then an inverse-CDF draw over the survivors."""
    v = lg.shape[-1]
    o = _ordered(lg)
    mx = lg.max()
    w = jnp.exp(lg - mx)
    lo, hi = o.min(), o.max() + 1
    tk = jax.lax.cond(k < v, lambda: _bisect(lambda t: jnp.sum(o >= t) >= k, lo, hi), lambda: lo)
    mass = lambda t: jnp.sum(jnp.where(o >= t, w, 0.0))  # noqa: E731
    z = mass(tk)
    tp = jax.lax.cond(p < 1, lambda: _bisect(lambda t: mass(jnp.maximum(t, tk)) >= p * z, tk, hi), lambda: tk)
    tm = jnp.where(m > 0, _ordered(mx + jnp.log(jnp.maximum(m, 1e-30))), lo)
    cut = jnp.maximum(jnp.maximum(tk, tp), tm)
    c = jnp.cumsum(jnp.where(o >= cut, w, 0.0))
    return jnp.minimum(jnp.sum(c <= u * c[-1]), v - 1).astype(jnp.int32)


def row_keys(seeds: Array, pos: Array) -> Array:
    """One key per row from its own seed and position: a request samples the same tokens whatever else
    shares its batch."""
    return jax.vmap(lambda s, p: jax.random.fold_in(jax.random.key(s), p))(seeds, pos)


_row_keys = jax.jit(row_keys)  # for Engine.add: an eager vmap re-traces on every call (~8 ms per prefill)


def decode_chunk(params: dict, family: Family, cfg: Any, cache: dict, state: dict, n_steps: int, n_cand: int,
                 backend: str = XLA) -> tuple[dict, dict, Array]:
    """``n_steps`` decode steps on the device. state: token [B] (last sampled, not yet in cache), pos [B],
    done [B], limit [B] (last position allowed), seed [B], sampling arrays [B], stop_ids [B, S].
    Returns (cache, state, tokens [B, n_steps]) with -1 for rows that were already done."""

    def step(carry, _):
        cache, st = carry
        logits, cache = family.decode_step(params, cfg, cache, st["token"], st["pos"], backend)
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
    """How one request samples; every row of the engine carries its own."""

    temperature: float = 0.0
    """0: greedy (argmax)."""
    top_k: int = 0
    """Keep the k most likely tokens; 0: off."""
    top_p: float = 1.0
    """Keep the smallest set whose probability reaches p; 1: off."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely one; 0: off."""
    seed: int = 0
    """The row's random stream is fold_in(key(seed), position): the same whatever shares the batch."""
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
    #: inputs besides tokens for the family's prefill (e.g. ``pixel_values``), as the user gave them
    inputs: dict[str, Any] | None = None


MAX_STOP = 8


_COMPILED: dict[tuple[str, str, int], tuple[Any, Any, Any, Any]] = {}


def compiled_functions(family: Family, cfg: Any, max_len: int) -> tuple[Any, Any, Any, Any]:
    """The engine's jitted (prefill, insert, decode_chunk, first-token sampler), shared by every engine of
    the same architecture: ``lm.generate`` builds an engine per call, and without this each call would
    trace and compile again. XLA's own cache then keys on shapes (prompt bucket, batch, chunk)."""
    key = (family.name, json.dumps(cfg.to_dict(), sort_keys=True, default=str), max_len)
    if key not in _COMPILED:
        _COMPILED[key] = (
            jax.jit(functools.partial(family.prefill, cfg=cfg, max_len=max_len), static_argnames=("backend",)),
            jax.jit(family.insert, donate_argnums=(0,)),
            jax.jit(functools.partial(decode_chunk, family=family, cfg=cfg),
                    static_argnames=("n_steps", "n_cand", "backend"), donate_argnames=("cache",)),
            jax.jit(sample_tokens, static_argnames=("n_cand",)),
        )
    return _COMPILED[key]


class Engine:
    """A fixed number of slots over one static cache; requests join and leave between decode chunks.

    It serves every family through its :class:`~gemmax.models.base.Family` functions (cache, prefill,
    insert, decode step) and samples for all of them. The backend is chosen here, once: the native CPU
    kernels where they pay and the family has them, XLA otherwise."""

    def __init__(self, params: dict, cfg: Any, max_batch: int = 1, max_len: int | None = None,
                 dtype: Any = None, chunk: int = 16, family: Family | None = None, prefix_cache: Any = None,
                 speculator: Any = None):
        """``prefix_cache``: a :class:`~gemmax.engine.prefix_cache.PrefixCache` that admission reuses prompt
        keys/values through (ignored for families it does not apply to); ``speculator``: a
        :class:`~gemmax.engine.speculative.Speculator` that decodes several tokens per step when it can."""
        self.params = params
        self.cfg = cfg
        self.family = family or base.for_config(cfg)
        self.max_batch = max_batch
        self.max_len = min(max_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.dtype = dtype or _compute_dtype(params)
        self.chunk = chunk
        self.cache = self.family.init_cache(cfg, max_batch, self.max_len, self.dtype)
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
        self._prefill, self._insert, self._chunk, self._first = compiled_functions(self.family, cfg, self.max_len)
        # the native CPU kernels: one device only (XLA SPMD cannot split a custom call). Prefill always (its
        # GEMM reads the weights in place at their own width); decode with few rows, where reading the
        # weights once per token is the whole cost
        leaf = jax.tree.leaves(params)[0]
        self.native = (self._replicated is None and len(getattr(leaf.sharding, "device_set", ())) <= 1
                       and CPU in self.family.backends and cpu_kernels.available())
        self.kernels = self.native and max_batch <= cpu_kernels.MAX_ROWS
        self.prefix_cache = prefix_cache if prefix_cache is not None and prefix_cache.applies_to(self.family) else None
        self.speculator = speculator
        if speculator is not None:
            speculator.attach(self)

    @property
    def prefill_backend(self) -> str:
        """Prefill always takes the native kernels when the engine may use them (its GEMM reads the weights
        in place at their own width)."""
        return CPU if self.native else XLA

    @property
    def decode_backend(self) -> str:
        """Decode takes them with few rows, where reading the weights once per token is the whole cost."""
        return CPU if self.kernels else XLA

    def _place_on_mesh(self) -> None:
        """Under a gemmax distribution the weights live on a mesh: put the cache and per-row state there too
        (replicated; XLA SPMD partitions the step by the weights' shardings), so jit sees one device set."""
        dist = _dist.distribution()
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
        """Prefill new requests (one compiled call per length bucket) into free slots. Requests that carry
        inputs besides tokens (images) are prefilled one at a time, each with its own inputs."""
        free = self.free_slots()
        if len(reqs) > len(free):
            raise RuntimeError(f"{len(reqs)} requests but only {len(free)} free slots")
        for r in reqs:
            n = len(r.prompt_ids)
            if n == 0:
                raise ValueError("empty prompt")
            if n + 1 > self.max_len:
                raise ValueError(f"prompt of {n} tokens does not fit the context of {self.max_len} tokens")
            unknown = set(r.inputs or ()) - set(self.family.extra_inputs)
            if unknown:
                raise ValueError(f"{self.family.name} models take no {', '.join(sorted(unknown))}")
        plain = [r for r in reqs if not r.inputs]
        if plain:
            self._add_group(plain)
        for r in reqs:
            if r.inputs:
                self._add_group([r], r.inputs)

    def _add_group(self, reqs: Sequence[Request], inputs: dict[str, Any] | None = None) -> None:
        free = self.free_slots()
        t = min(bucket(max(len(r.prompt_ids) for r in reqs)), self.max_len)
        b = len(reqs)
        bb = bucket(b, 1)
        toks = np.zeros((bb, t), np.int32)
        lens = np.ones(bb, np.int32)
        for i, r in enumerate(reqs):
            toks[i, : len(r.prompt_ids)] = r.prompt_ids
            lens[i] = len(r.prompt_ids)
        inputs = _pad_token_inputs(inputs or {}, self.family.token_inputs, t)
        slots = free[:b]
        pc = self.prefix_cache
        if pc is not None and not inputs and max(len(r.prompt_ids) for r in reqs) > pc.block:
            logits = pc.admit(self, reqs, slots)
        else:
            logits, new = self._prefill(self.params, tokens=jnp.asarray(toks), lengths=jnp.asarray(lens),
                                        backend=self.prefill_backend, **inputs)
            # padding rows of the prefill batch go to slot index max_batch: out of range, so insert drops them
            padded_slots = np.full(bb, self.max_batch, np.int32)
            padded_slots[:b] = slots
            self.cache = self._insert(self.cache, new, jnp.asarray(padded_slots))
        st = {k: np.array(v) for k, v in self.state.items()}
        for r, s in zip(reqs, slots, strict=True):
            r.slot = s
            self.requests[s] = r
            sp = r.params
            st["pos"][s] = len(r.prompt_ids)
            st["limit"][s] = min(len(r.prompt_ids) + sp.max_new_tokens, self.max_len) - 1
            st["seed"][s] = sp.seed
            st["temperature"][s], st["top_k"][s] = sp.temperature, min(sp.top_k, self.cfg.vocab_size)
            st["top_p"][s], st["min_p"][s] = sp.top_p, sp.min_p
            ids = list(sp.stop_ids)[:MAX_STOP]
            st["stop_ids"][s] = ids + [-1] * (MAX_STOP - len(ids))
            st["done"][s] = False
        # first new token comes from the prefill logits
        # (over all bb rows of the prefill batch, padding rows repeating the first: one compile per batch
        # bucket, not one per admission-group size)
        rows = np.asarray(slots + [slots[0]] * (bb - b))
        first = np.asarray(self._first(
            logits, _row_keys(jnp.asarray(st["seed"][rows]), jnp.asarray(st["pos"][rows])),
            jnp.asarray(st["temperature"][rows]), jnp.asarray(st["top_k"][rows]),
            jnp.asarray(st["top_p"][rows]), jnp.asarray(st["min_p"][rows]), n_cand=self._n_cand(reqs)))[:b]
        now = time.perf_counter()
        for r, s, tok in zip(reqs, slots, first, strict=True):
            st["token"][s] = tok
            r.first_token_time = now
            self._append(r, int(tok), st)
        self.state = self._put_state(st)
        if self.speculator is not None:
            self.speculator.admit(self, reqs, slots, inputs)

    def _append(self, r: Request, tok: int, st: dict) -> None:
        r.new_ids.append(tok)
        if tok in r.params.stop_ids:
            r.done, r.finish_reason = True, "stop"
        elif len(r.new_ids) >= r.params.max_new_tokens or st["pos"][r.slot] >= self.max_len - 1:
            r.done, r.finish_reason = True, "length"
        if r.done:
            st["done"][r.slot] = True

    def _n_cand(self, reqs: Sequence[Request | None]) -> int:
        """Static sampling mode of a batch: -1 when every row is greedy (no sampling compiled in), else the
        sampler's fixed candidate count. Never a function of the rows' settings beyond that, so a new
        ``top_k`` or ``top_p`` value reuses the compiled step."""
        if not any(r is not None and r.params.temperature > 0 for r in reqs):
            return -1
        return min(N_CAND, self.cfg.vocab_size)

    def step(self, n_steps: int | None = None) -> list[Request]:
        """Run one decode chunk for all live slots; returns the requests that got new tokens."""
        if self.speculator is not None and self.speculator.applies(self):
            return self.speculator.step(self)
        n = n_steps or self.chunk
        self.cache, self.state, toks = self._chunk(self.params, cache=self.cache, state=self.state,
                                                   n_steps=n, n_cand=self._n_cand(self.requests),
                                                   backend=self.decode_backend)
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


def _pad_token_inputs(inputs: dict[str, Any], fills: Mapping[str, int], t: int) -> dict[str, Any]:
    """The family's token-aligned inputs padded on their last axis to the prompt bucket ``t`` (with each one's
    value after the prompt, ``Family.token_inputs``), so a prompt's exact length does not reach the compiled
    prefill's shapes."""
    out = dict(inputs)
    for name, fill in fills.items():
        if name in out:
            a = np.asarray(out[name])
            if a.shape[-1] < t:
                a = np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, t - a.shape[-1])], constant_values=fill)
            out[name] = a
    return out


def _compute_dtype(params: dict) -> Any:
    """The activations' dtype: the embedding table's, or bfloat16 under an integer (quantized) table."""
    d = params["token_embedding"]["embeddings"].dtype
    return d if jnp.issubdtype(d, jnp.floating) else jnp.bfloat16


# ---- convenience over the engine ---------------------------------------------------------------------


def generate_ids(params: dict, cfg: Any, prompts: Sequence[Sequence[int]], sp: Sequence[SamplingParams],
                 chunk: int = 16, stop_check: Any = None, inputs: Sequence[dict[str, Any] | None] | None = None,
                 family: Family | None = None, prefix_cache: Any = None, speculator: Any = None) -> list[Request]:
    """Generate for a batch of token-id prompts; one engine sized to the batch and the longest request.
    ``inputs``: per prompt, the family's inputs besides tokens (e.g. ``pixel_values``) or None;
    ``prefix_cache`` / ``speculator``: as :class:`Engine` takes them."""
    need = max(len(p) + s.max_new_tokens for p, s in zip(prompts, sp, strict=True))
    max_len = min(bucket(need + 1), cfg.max_position_embeddings)
    eng = Engine(params, cfg, max_batch=bucket(len(prompts), 1), max_len=max_len, chunk=chunk, family=family,
                 prefix_cache=prefix_cache, speculator=speculator)
    inputs = inputs or [None] * len(prompts)
    reqs = [Request(list(p), s, inputs=x) for p, s, x in zip(prompts, sp, inputs, strict=True)]
    eng.add(reqs)
    while eng.has_work():
        eng.step()
        if stop_check is not None:
            for r in reqs:
                if not r.done and stop_check(r):
                    eng.finish(r, "stop")
    return reqs
