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
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemmax import distribution as _dist
from gemmax.engine.constrain import Constraint, RowMatcher, vocabulary
from gemmax.kernels import cpu as cpu_kernels
from gemmax.models import base
from gemmax.models.base import CPU, CUDNN, XLA, Family

Array = jax.Array
log = logging.getLogger("gemmax.engine")


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
    gives an in-range id (the last).

    Blocked, so that only small arrays are searched: each row's vocabulary is cut into up to 64 blocks, the
    blocks' maxima give the row's maximum and the first block holding it, and only that block is searched
    for the first match. XLA:CPU runs the one large reduction (the block maxima) on all its threads; the
    first-match search of a whole row (a max, then a min over ``where(logits == max, iota, V)``) ran on one
    and took ~18 ms of each 32-row decode step of a 262k vocabulary, this ~2 ms (1 row: 0.5 -> 0.1 ms)."""
    *lead, n = logits.shape
    c = _blocks(n)
    blocks = logits.reshape(-1, c, n // c)
    # [R, c]; the barrier keeps XLA from folding the two maxima below into a second whole-row reduction
    # (~1 ms of the [32, 262144] search, ~3 ms inside a decode step)
    block_max = jax.lax.optimization_barrier(blocks.max(axis=-1))
    m = block_max.max(axis=-1, keepdims=True)  # NaN in a row: NaN, and nothing below equals it
    first_block = jnp.argmax(block_max == m, axis=-1)
    row = jnp.take_along_axis(blocks, first_block[:, None, None], axis=1)[:, 0]  # [R, n / c]
    hit = row == m
    tok = jnp.where(hit.any(axis=-1), first_block * (n // c) + jnp.argmax(hit, axis=-1), n - 1)
    return tok.astype(jnp.int32).reshape(lead)


def _blocks(n: int) -> int:
    """Blocks a row of ``n`` logits is cut into by the blocked searches: the largest divisor of n up to 64."""
    return max(d for d in range(1, 65) if n % d == 0)


def _last_true(mask: Array) -> Array:
    """Index of the last True along the last axis (0 where there is none)."""
    n = mask.shape[-1]
    return jnp.where(mask.any(axis=-1), n - 1 - jnp.argmax(mask[..., ::-1], axis=-1), 0)


def plain_draw(lg: Array, u: Array) -> Array:
    """An inverse-CDF draw over every token of each row of ``lg`` [R, V] (temperature already applied, no
    filter), one uniform ``u`` [R] per row, blocked as :func:`greedy_argmax`: the weights ``exp(lg - max)``
    summed per block, the block whose running sum passes ``u`` times the total found among the block sums,
    and only that block's running sum formed. Each token is drawn with probability its weight over the
    row's total, as a cumulative sum over the whole row would draw it (only the float summation order
    differs); a token of zero weight is never drawn. The whole batch at once: the per-row exact path
    (a cumulative sum over the vocabulary under a ``lax.map``) cost ~30 ms of each 8-row step of a 262k
    vocabulary, this a few."""
    r, n = lg.shape
    c = _blocks(n)
    blocks = lg.reshape(r, c, n // c)
    w = jnp.exp(blocks - blocks.max(axis=-1).max(axis=-1)[:, None, None])
    block_sums = w.sum(axis=-1)  # [R, c]
    ends = jnp.cumsum(block_sums, axis=-1)
    t = u * ends[:, -1]
    b = jnp.minimum(jnp.sum(ends <= t[:, None], axis=-1), _last_true(block_sums > 0))
    before = jnp.where(b > 0, jnp.take_along_axis(ends, jnp.maximum(b - 1, 0)[:, None], axis=-1)[:, 0], 0.0)
    wb = jnp.take_along_axis(w, b[:, None, None], axis=1)[:, 0]  # [R, n / c]
    j = jnp.minimum(jnp.sum(jnp.cumsum(wb, axis=-1) <= (t - before)[:, None], axis=-1), _last_true(wb > 0))
    return (b * (n // c) + j).astype(jnp.int32)


def candidate_weights(lg: Array, vals: Array, k: Array, p: Array, m: Array) -> tuple[Array, Array]:
    """The fast path's filters over the candidates ``vals``, the ``[N, n]`` largest of the temperature-scaled
    logits ``lg`` ``[N, V]`` in descending order: top-k (``k``, already clamped to ``V``), then top-p and min-p
    on the renormalised survivors. The normaliser is the whole vocabulary's where top-k keeps all of it, so
    the nucleus sees the true mass. Returns the kept mask and the unnormalised weights ``exp(vals - max)``
    (0 where dropped); ``sample_tokens`` draws from them and ``speculative.processed_probs`` scatters them.
    """
    n, v = vals.shape[-1], lg.shape[-1]
    r = jnp.arange(n)[None]
    keep = r < k[:, None]
    lse_kept = jax.nn.logsumexp(jnp.where(keep, vals, -jnp.inf), axis=-1)
    log_z = jnp.where(k >= v, jax.nn.logsumexp(lg, axis=-1), lse_kept) if n < v else lse_kept
    q = jnp.where(keep, jnp.exp(vals - log_z[:, None]), 0.0)
    cum = jnp.cumsum(q, axis=-1)
    keep = keep & ((cum - q < p[:, None]) | (r == 0) | (p[:, None] >= 1))
    keep = keep & (q >= m[:, None] * q[:, :1])
    return keep, jnp.where(keep, jnp.exp(vals - vals[:, :1]), 0.0)


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

    sampled = temperature > 0
    # rows with no filter draw over the whole vocabulary at once (plain_draw); the others take the candidates
    plain = (k >= v) & (p >= 1) & (m <= 0)

    def filtered() -> Array:
        # fast path: the n most likely tokens, in order (rank semantics, like transformers)
        # (the barriers keep XLA:CPU's top-k rewrite: folding the gather below into the sort would turn the
        # top-k into a full sort of the vocabulary, ~100x slower. One barrier per array: XLA's SPMD partitioner
        # aborts the process on a barrier over top_k's tuple, i.e. on every sampled generation under a mesh)
        vals, idx = jax.lax.top_k(lg, n)
        vals, idx = jax.lax.optimization_barrier(vals), jax.lax.optimization_barrier(idx)
        keep, w = candidate_weights(lg, vals, k, p, m)
        c = jnp.cumsum(w, axis=-1)
        j = jnp.minimum(jnp.sum(c <= u[:, None] * c[:, -1:], axis=-1), n - 1)
        fast = jnp.take_along_axis(idx, j[:, None], axis=-1)[:, 0]
        if n < v:  # rows whose kept set may reach past the candidates: exact, one row at a time
            need = sampled & ~plain & (keep[:, -1] | ((k > n) & (k < v) & (p < 1)))

            def one(args: tuple) -> Array:
                need_i, fast_i, *row = args
                return jax.lax.cond(need_i, lambda: _sample_row_exact(*row), lambda: fast_i)

            fast = jax.lax.cond(jnp.any(need), lambda: jax.lax.map(one, (need, fast, lg, k, p, m, u)),
                                lambda: fast)
        return fast

    zeros = jnp.zeros(lg.shape[0], jnp.int32)
    fast = jax.lax.cond(jnp.any(sampled & ~plain), filtered, lambda: zeros)
    drawn = jax.lax.cond(jnp.any(sampled & plain), lambda: plain_draw(lg, u), lambda: zeros)
    return jnp.where(sampled, jnp.where(plain, drawn, fast), greedy_tok).astype(jnp.int32)


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


def kept_weights(lg: Array, k: Array, p: Array, m: Array) -> Array:
    """One row's unnormalised probabilities (``exp(lg - max)``) with every token the top-k, nucleus and
    min-p filters drop set to 0, by thresholds instead of a sort: the k-th largest logit and the nucleus
    cutoff by bisection on the logits' bit patterns (tokens tied at a cutoff are all kept), min-p in closed
    form. The sampler's exact path draws from it; speculative decoding compares distributions with it."""
    o = _ordered(lg)
    mx = lg.max()
    w = jnp.exp(lg - mx)
    lo, hi = o.min(), o.max() + 1
    tk = jax.lax.cond(k < lg.shape[-1], lambda: _bisect(lambda t: jnp.sum(o >= t) >= k, lo, hi), lambda: lo)
    mass = lambda t: jnp.sum(jnp.where(o >= t, w, 0.0))  # noqa: E731
    z = mass(tk)
    tp = jax.lax.cond(p < 1, lambda: _bisect(lambda t: mass(jnp.maximum(t, tk)) >= p * z, tk, hi), lambda: tk)
    tm = jnp.where(m > 0, _ordered(mx + jnp.log(jnp.maximum(m, 1e-30))), lo)
    return jnp.where(o >= jnp.maximum(jnp.maximum(tk, tp), tm), w, 0.0)


def _sample_row_exact(lg: Array, k: Array, p: Array, m: Array, u: Array) -> Array:
    """One row over its whole vocabulary: an inverse-CDF draw over :func:`kept_weights`."""
    c = jnp.cumsum(kept_weights(lg, k, p, m))
    return jnp.minimum(jnp.sum(c <= u * c[-1]), lg.shape[-1] - 1).astype(jnp.int32)


def row_keys(seeds: Array, pos: Array) -> Array:
    """One key per row from its own seed and position: a request samples the same tokens whatever else
    shares its batch."""
    return jax.vmap(lambda s, p: jax.random.fold_in(jax.random.key(s), p))(seeds, pos)


_row_keys = jax.jit(row_keys)  # for Engine.add: an eager vmap re-traces on every call (~8 ms per prefill)


#: the most alternatives a row may ask for per token (OpenAI's ``top_logprobs`` bound); the compiled step
#: always computes this many when any row wants logprobs, and each row keeps its own count of them
MAX_TOP_LOGPROBS = 20
#: the most ``logit_bias`` entries a row may carry (OpenAI's documented bound)
MAX_BIAS = 300


def adjust_logits(logits: Array, st: Mapping[str, Array], extra: Mapping[str, Array]) -> Array:
    """The per-row logit processors, in the order transformers applies them, before temperature and the
    filters of :func:`sample_tokens`: ``logit_bias`` (added, as OpenAI and transformers'
    ``SequenceBiasLogitsProcessor`` for one-token sequences), ``repetition_penalty`` over every token of
    the prompt and the output (transformers' ``RepetitionPenaltyLogitsProcessor``: a positive logit divided,
    a negative one multiplied), ``presence_penalty`` / ``frequency_penalty`` over the output's tokens
    (OpenAI's ``logit - count * frequency - (count > 0) * presence``), then the structured-output mask.

    Only the parts whose arrays are in ``extra`` run (``bias_ids``/``bias_vals`` [B, MAX_BIAS],
    ``seen`` [B, V] bool, ``counts`` [B, V], ``mask`` [B, ceil(V / 32)] int32 bits): a batch in which no row
    uses a feature compiles without it. A row that does not use one carries neutral values (no bias
    entries, penalty 1 and 0, all mask bits set), so rows with and without share a step."""
    lg = logits.astype(jnp.float32)
    b, v = lg.shape
    if "bias_ids" in extra:  # padding entries hold id v: out of range, dropped
        rows = jnp.arange(b)[:, None]
        lg = lg.at[rows, extra["bias_ids"]].add(extra["bias_vals"], mode="drop")
    if "seen" in extra:
        p = st["repetition"][:, None]
        lg = jnp.where(extra["seen"], jnp.where(lg < 0, lg * p, lg / p), lg)
    if "counts" in extra:
        c = extra["counts"].astype(jnp.float32)
        lg = lg - c * st["frequency"][:, None] - (c > 0) * st["presence"][:, None]
    if "mask" in extra:
        lg = jnp.where(unpack_mask(extra["mask"], v), lg, -jnp.inf)
    return lg


def unpack_mask(words: Array, v: int) -> Array:
    """[B, W] int32 words (bit ``t % 32`` of word ``t // 32`` allows token ``t``) -> [B, v] bool."""
    bits = (words[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1
    return bits.reshape(words.shape[0], -1)[:, :v].astype(bool)


def token_logprobs(logits: Array, tokens: Array, n_top: int) -> dict[str, Array]:
    """Log-probabilities of the model's own distribution (``log_softmax`` of the raw logits: no temperature,
    penalty, bias or mask), as OpenAI reports them: the sampled token's and the ``n_top`` most likely."""
    lsm = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    top_lps, top_ids = jax.lax.top_k(lsm, n_top)
    return {"chosen": jnp.take_along_axis(lsm, tokens[:, None], axis=-1)[:, 0], "top_ids": top_ids,
            "top_lps": top_lps}


def sample_step(logits: Array, keys: Array, st: Mapping[str, Array], extra: Mapping[str, Array], n_cand: int,
                n_top: int) -> tuple[Array, dict[str, Array]]:
    """One token per row: the processors of :func:`adjust_logits`, then :func:`sample_tokens`; with
    ``n_top`` >= 0 also the tokens' log-probabilities (:func:`token_logprobs`)."""
    lg = adjust_logits(logits, st, extra) if extra else logits
    tok = sample_tokens(lg, keys, st["temperature"], st["top_k"], st["top_p"], st["min_p"], n_cand)
    return tok, (token_logprobs(logits, tok, n_top) if n_top >= 0 else {})


def decode_chunk(params: dict, family: Family, cfg: Any, cache: dict, state: dict, n_steps: int, n_cand: int,
                 backend: str = XLA, extra: dict | None = None, n_top: int = -1
                 ) -> tuple[dict, dict, dict, Array, dict]:
    """Up to ``n_steps`` decode steps on the device. state: token [B] (last sampled, not yet in cache), pos
    [B], done [B], limit [B] (last position allowed), seed [B], sampling arrays [B], stop_ids [B, S].
    ``extra``: the per-row processor arrays of :func:`adjust_logits` the batch needs (``counts`` and ``seen``
    are updated with each sampled token). Returns (cache, state, extra, tokens [B, n_steps] with -1 for rows
    that were already done, logprobs: arrays [B, n_steps, ...] when ``n_top`` >= 0).

    The chunk ends early once every row is done (a ``while_loop``): rows that finish together (a batch of
    equal-length completions, every row at its stop token) do not pay for the chunk's remaining steps."""
    extra = extra or {}

    def step(carry):
        cache, st, ex = carry
        logits, cache = family.decode_step(params, cfg, cache, st["token"], st["pos"], backend)
        pos = st["pos"] + 1
        nxt, lps = sample_step(logits, row_keys(st["seed"], pos), st, ex, n_cand, n_top)
        active = ~st["done"]
        emitted = jnp.where(active, nxt, -1)
        if "counts" in ex:
            rows = jnp.arange(nxt.shape[0])
            ex = dict(ex, counts=ex["counts"].at[rows, nxt].add(active.astype(ex["counts"].dtype)),
                      seen=ex["seen"].at[rows, nxt].set(ex["seen"][rows, nxt] | active))
        stop = jnp.any(nxt[:, None] == st["stop_ids"], axis=-1)
        done = st["done"] | (active & (stop | (pos >= st["limit"])))
        st = dict(st, token=jnp.where(active, nxt, st["token"]), pos=jnp.where(active, pos, st["pos"]),
                  done=done)
        return (cache, st, ex), (emitted, lps)

    b = state["token"].shape[0]
    lps0 = {} if n_top < 0 else {"chosen": jnp.zeros((n_steps, b), jnp.float32),
                                 "top_ids": jnp.zeros((n_steps, b, n_top), jnp.int32),
                                 "top_lps": jnp.zeros((n_steps, b, n_top), jnp.float32)}
    outs = (jnp.full((n_steps, b), -1, jnp.int32), lps0)  # (tokens, log-probs) of each step, as token_logprobs

    def more(c: tuple) -> Array:
        i, (_, st, _), _ = c
        return (i < n_steps) & ~jnp.all(st["done"])

    def body(c: tuple) -> tuple:
        i, carry, outs = c
        carry, new = step(carry)
        return i + 1, carry, jax.tree.map(lambda buf, x: jax.lax.dynamic_update_index_in_dim(buf, x, i, 0), outs, new)

    _, (cache, state, extra), (toks, lps) = jax.lax.while_loop(more, body, (jnp.int32(0), (cache, state, extra),
                                                                            outs))
    return cache, state, extra, toks.T, jax.tree.map(lambda a: jnp.moveaxis(a, 0, 1), lps)


# ---- the engine --------------------------------------------------------------------------------------


@dataclass
class SamplingParams:
    """How one request samples; every row of the engine carries its own. The fields come in groups: the
    distribution (temperature and its filters, then the logit adjustments: bias and penalties), the random
    stream, where the output ends, and what else it reports or obeys."""

    temperature: float = 0.0
    """0: greedy (argmax)."""
    top_k: int = 0
    """Keep the k most likely tokens; 0: off."""
    top_p: float = 1.0
    """Keep the smallest set whose probability reaches p; 1: off."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely one; 0: off."""
    logit_bias: Mapping[int, float] | None = None
    """Token id -> value added to its logit (OpenAI's -100..100: -100 bans a token, 100 forces it)."""
    presence_penalty: float = 0.0
    """OpenAI's: subtracted from the logit of every token the output already holds; in [-2, 2]."""
    frequency_penalty: float = 0.0
    """OpenAI's: subtracted once per earlier occurrence in the output; in [-2, 2]."""
    repetition_penalty: float = 1.0
    """transformers': logits of tokens in the prompt or the output divided (positive) or multiplied
    (negative) by it; 1: off, > 1 discourages repeats."""
    seed: int = 0
    """The row's random stream is fold_in(key(seed), position): the same whatever shares the batch."""
    max_new_tokens: int = 64
    stop_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    logprobs: int | None = None
    """Report each new token's log-probability and this many most likely alternatives (0..20); None: off."""
    constraint: Constraint | None = None
    """Structured output: every token keeps the output a prefix of what the constraint accepts
    (:mod:`gemmax.engine.constrain`: a JSON schema, any JSON object, a regex or a Lark grammar)."""

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
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}] or None, got {self.logprobs}")
        if self.logit_bias:
            if len(self.logit_bias) > MAX_BIAS:
                raise ValueError(f"logit_bias takes at most {MAX_BIAS} tokens, got {len(self.logit_bias)}")
            for t, b in self.logit_bias.items():
                if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 0:
                    raise ValueError(f"logit_bias keys must be token ids (ints >= 0), got {t!r}")
                if not -100 <= b <= 100:
                    raise ValueError(f"logit_bias values must be in [-100, 100], got {b} for token {t}")

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


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
    #: with ``params.logprobs``: per new token, (its log-probability, [(id, log-probability)] of the
    #: ``params.logprobs`` most likely tokens)
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    #: with ``params.constraint``: the row's grammar state (built by the engine from its tokenizer)
    matcher: RowMatcher | None = None


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
            jax.jit(family.insert, donate_argnums=(0,), static_argnames=("backend",)),
            jax.jit(functools.partial(decode_chunk, family=family, cfg=cfg),
                    static_argnames=("n_steps", "n_cand", "backend", "n_top"), donate_argnames=("cache", "extra")),
            jax.jit(sample_step, static_argnames=("n_cand", "n_top")),
        )
    return _COMPILED[key]


class Engine:
    """A fixed number of slots over one static cache; requests join and leave between decode chunks.

    It serves every family through its :class:`~gemmax.models.base.Family` functions (cache, prefill,
    insert, decode step) and samples for all of them. The backend is chosen here, once: the native CPU
    kernels where they pay and the family has them, XLA otherwise.

    ``tokenizer`` is needed only for structured output (a request with ``SamplingParams.constraint``): the
    grammar engine reads the vocabulary's bytes. A constrained row needs its mask before each token, so
    while one is live every decode chunk is one token long (the mask costs tens of microseconds; the
    shorter chunk costs one dispatch per token)."""

    def __init__(self, params: dict, cfg: Any, max_batch: int = 1, max_len: int | None = None,
                 dtype: Any = None, chunk: int = 16, family: Family | None = None, tokenizer: Any = None,
                 prefix_cache: Any = None, speculator: Any = None):
        """``tokenizer``: for requests whose sampling carries a ``constraint`` (structured output);
        ``prefix_cache``: a :class:`~gemmax.engine.prefix_cache.PrefixCache` that admission reuses prompt
        keys/values through (ignored for families it does not apply to); ``speculator``: a
        :class:`~gemmax.engine.speculative.Speculator` that decodes several tokens per step when it can."""
        self.params = params
        self.cfg = cfg
        self.family = family or base.for_config(cfg)
        self.max_batch = max_batch
        self.max_len = min(max_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.dtype = dtype or _compute_dtype(params)
        self.chunk = chunk
        self.steps_run = 0  # decode steps the last chunk ran (it ends early once every row is done)
        self.cache = self.family.init_cache(cfg, max_batch, self.max_len, self.dtype)
        self.requests: list[Request | None] = [None] * max_batch
        zeros_i = np.zeros(max_batch, np.int32)
        self.state = {
            "token": zeros_i, "pos": zeros_i, "done": np.ones(max_batch, bool), "limit": zeros_i,
            "seed": zeros_i, "temperature": np.zeros(max_batch, np.float32), "top_k": zeros_i,
            "top_p": np.ones(max_batch, np.float32), "min_p": np.zeros(max_batch, np.float32),
            "stop_ids": np.full((max_batch, MAX_STOP), -1, np.int32),
            "presence": np.zeros(max_batch, np.float32), "frequency": np.zeros(max_batch, np.float32),
            "repetition": np.ones(max_batch, np.float32),
        }
        self.tokenizer = tokenizer
        # the per-row processor arrays (penalty counts, logit bias), made when a request first needs them
        self._extra: dict[str, Array] = {}
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
        # cuDNN's fused attention for prefill: on an NVIDIA GPU, with 16-bit activations, where the family has it
        self.fused_attention = (not self.native and CUDNN in self.family.backends
                                and jnp.dtype(self.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
                                and all(d.platform == "gpu" for d in leaf.devices()))
        self.prefix_cache = prefix_cache if prefix_cache is not None and prefix_cache.applies_to(self.family) else None
        self.speculator = speculator
        if speculator is not None:
            speculator.attach(self)

    @property
    def prefill_backend(self) -> str:
        """Prefill always takes the native kernels when the engine may use them (its GEMM reads the weights
        in place at their own width); on a GPU, cuDNN's fused attention where it applies (see ``__init__``)."""
        return CPU if self.native else CUDNN if self.fused_attention else XLA

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
            bias = r.params.logit_bias or {}
            if any(t >= self.cfg.vocab_size for t in bias):
                raise ValueError(f"logit_bias names token ids outside the vocabulary of {self.cfg.vocab_size}")
        for r in reqs:
            if r.params.constraint is not None and r.matcher is None:
                r.matcher = self._matcher(r)
        plain = [r for r in reqs if not r.inputs]
        if plain:
            self._add_group(plain)
        for r in reqs:
            if r.inputs:
                self._add_group([r], r.inputs)

    def _matcher(self, r: Request) -> RowMatcher:
        if self.tokenizer is None:
            raise ValueError("structured output needs the model's tokenizer (Engine(..., tokenizer=...))")
        stops = r.params.stop_ids or tuple(self.tokenizer.stop_ids)
        m = r.params.constraint.matcher(vocabulary(self.tokenizer, self.cfg.vocab_size, stops))
        m.check_writable(r.params.constraint.kind.replace("_", " "))
        return m

    def _add_group(self, reqs: Sequence[Request], inputs: dict[str, Any] | None = None) -> None:
        free = self.free_slots()
        t = min(bucket(max(len(r.prompt_ids) for r in reqs)), self.max_len)
        b = len(reqs)
        bb = bucket(b, 1)
        # a prompt repeated in the group (a GRPO group, a request with n > 1) is prefilled once; its rows
        # of logits and cache are copied to each of its requests (`sel`: each request's prefill row)
        first_of: dict[tuple[int, ...], int] = {}
        sel = [first_of.setdefault(tuple(r.prompt_ids), len(first_of)) for r in reqs]
        uniq = [reqs[sel.index(u)] for u in range(len(first_of))] if not inputs else list(reqs)
        bu = bucket(len(uniq), 1)
        toks = np.zeros((bu, t), np.int32)
        lens = np.ones(bu, np.int32)
        for i, r in enumerate(uniq):
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
            if len(uniq) < b:
                rows = jnp.asarray(sel + [0] * (bb - b), jnp.int32)
                logits, new = _take_rows(logits, new, rows)
            # padding rows of the prefill batch go to slot index max_batch: out of range, so insert drops them
            padded_slots = np.full(bb, self.max_batch, np.int32)
            padded_slots[:b] = slots
            self.cache = self._insert(self.cache, new, jnp.asarray(padded_slots), backend=self.prefill_backend)
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
            st["presence"][s], st["frequency"][s] = sp.presence_penalty, sp.frequency_penalty
            st["repetition"][s] = sp.repetition_penalty
            ids = list(sp.stop_ids)[:MAX_STOP]
            st["stop_ids"][s] = ids + [-1] * (MAX_STOP - len(ids))
            st["done"][s] = False
        # first new token comes from the prefill logits
        # (over all bb rows of the prefill batch, padding rows repeating the first: one compile per batch
        # bucket, not one per admission-group size)
        rows = np.asarray(slots + [slots[0]] * (bb - b))
        padded = list(reqs) + [reqs[0]] * (bb - b)
        extra = self._first_extra(padded)
        self._store_rows(reqs, slots, extra)
        small = {k: jnp.asarray(st[k][rows]) for k in ("temperature", "top_k", "top_p", "min_p", "presence",
                                                        "frequency", "repetition")}
        keys = _row_keys(jnp.asarray(st["seed"][rows]), jnp.asarray(st["pos"][rows]))
        first, lps = self._first(logits, keys, small, {k: jnp.asarray(v) for k, v in extra.items()},
                                 n_cand=self._n_cand(reqs), n_top=self._n_top(reqs))
        first = np.asarray(first)[:b]
        lps = {k: np.asarray(v)[:, None] for k, v in lps.items()}
        now = time.perf_counter()
        for i, (r, s, tok) in enumerate(zip(reqs, slots, first, strict=True)):
            st["token"][s] = tok
            r.first_token_time = now
            self._record(r, [int(tok)], lps, i)
            self._append(r, int(tok), st)
        self.state = self._put_state(st)
        if self.speculator is not None:
            self.speculator.admit(self, reqs, slots, inputs)

    def _first_extra(self, reqs: Sequence[Request]) -> dict[str, np.ndarray]:
        """The processor arrays for the first token of each prefill row (host arrays, rows in order): the
        prompt's tokens for the repetition penalty (no output yet, so no presence / frequency counts), the
        bias entries and the constrained rows' masks."""
        v = self.cfg.vocab_size
        out: dict[str, np.ndarray] = {}
        if any(r.params.penalized for r in reqs):
            seen = np.zeros((len(reqs), v), bool)
            for i, r in enumerate(reqs):
                seen[i, r.prompt_ids] = True
            out["seen"] = seen
        if any(r.params.logit_bias for r in reqs) or "bias_ids" in self._extra:
            out["bias_ids"], out["bias_vals"] = _bias_rows(reqs, v)
        if any(r.matcher is not None for r in reqs):
            out["mask"] = self._masks(reqs)
        return out

    def _store_rows(self, reqs: Sequence[Request], slots: Sequence[int], extra: dict[str, np.ndarray]) -> None:
        """Reset the new slots' rows of the engine's processor arrays (made on first need): a penalized
        row's counts start at zero over its prompt's tokens, every new row's bias entries are its own."""
        b, v = len(slots), self.cfg.vocab_size
        idx = jnp.asarray(slots, jnp.int32)
        if "seen" in extra:
            if "counts" not in self._extra:
                self._extra["counts"] = jnp.zeros((self.max_batch, v), jnp.int32)
                self._extra["seen"] = jnp.zeros((self.max_batch, v), bool)
            self._extra["counts"] = _put_rows(self._extra["counts"], idx, jnp.zeros((b, v), jnp.int32))
            self._extra["seen"] = _put_rows(self._extra["seen"], idx, jnp.asarray(extra["seen"][:b]))
        if "bias_ids" in extra:
            if "bias_ids" not in self._extra:
                self._extra["bias_ids"] = jnp.full((self.max_batch, MAX_BIAS), v, jnp.int32)
                self._extra["bias_vals"] = jnp.zeros((self.max_batch, MAX_BIAS), jnp.float32)
            for k in ("bias_ids", "bias_vals"):
                self._extra[k] = _put_rows(self._extra[k], idx, jnp.asarray(extra[k][:b]))
        self._extra = self._put_state(self._extra) if self._extra else self._extra

    def _masks(self, rows: Sequence[Request | None]) -> np.ndarray:
        """The allowed-token bitmask of each row (all bits set for a free row), from its matcher."""
        words = (self.cfg.vocab_size + 31) // 32
        mask = np.full((len(rows), words), -1, np.int32)
        for i, r in enumerate(rows):
            if r is not None and r.matcher is not None and not r.done:
                r.matcher.fill(mask[i])
        return mask

    def _record(self, r: Request, new: list[int], lps: dict[str, np.ndarray], i: int) -> None:
        """Follow the new tokens of row ``i`` (its index in the step's arrays): the constraint's matcher
        (a token it refuses ends the row; none should, as the mask allowed only what it accepts) and the
        requested log-probabilities."""
        if r.params.logprobs is not None and lps:
            k = r.params.logprobs
            for j in range(len(new)):
                top = [(int(a), float(b)) for a, b in zip(lps["top_ids"][i, j, :k], lps["top_lps"][i, j, :k],
                                                           strict=True)]
                r.logprobs.append((float(lps["chosen"][i, j]), top))
        if r.matcher is not None:
            for t in new:
                if t not in r.params.stop_ids and not r.matcher.consume(t):
                    log.warning("constrained row ended: its grammar refused token %d (%s)", t, r.matcher.error)
                    r.finish_reason = "stop"
                    self.finish(r, "stop")
                    break

    def _append(self, r: Request, tok: int, st: dict) -> None:
        r.new_ids.append(tok)
        if r.done:
            pass
        elif tok in r.params.stop_ids:
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

    def _n_top(self, reqs: Sequence[Request | None]) -> int:
        """Static: the alternatives computed per token, ``MAX_TOP_LOGPROBS`` when any row wants
        log-probabilities (one compiled variant whatever each row's count), else -1 (none computed)."""
        want = any(r is not None and not r.done and r.params.logprobs is not None for r in reqs)
        return min(MAX_TOP_LOGPROBS, self.cfg.vocab_size) if want else -1

    def step_limit(self) -> int | None:
        """The longest decode chunk the live rows allow: 1 while a constrained row needs a mask before each
        token, else None (no limit)."""
        return 1 if any(r is not None and not r.done and r.matcher is not None for r in self.requests) else None

    def _step_extra(self) -> dict[str, Array]:
        """The processor arrays the live rows need this chunk (see :func:`adjust_logits`)."""
        live = [r for r in self.requests if r is not None and not r.done]
        out: dict[str, Array] = {}
        if any(r.params.penalized for r in live):
            out["counts"], out["seen"] = self._extra["counts"], self._extra["seen"]
        if any(r.params.logit_bias for r in live):
            out["bias_ids"], out["bias_vals"] = self._extra["bias_ids"], self._extra["bias_vals"]
        if any(r.matcher is not None for r in live):
            out["mask"] = self._put_state({"m": self._masks(self.requests)})["m"]
        return out

    def step(self, n_steps: int | None = None) -> list[Request]:
        """Run one decode chunk for all live slots; returns the requests that got new tokens."""
        if self.speculator is not None and self.speculator.applies(self):
            return self.speculator.step(self)
        n = n_steps or self.chunk
        n = min(n, self.step_limit() or n)
        extra = self._step_extra()
        self.cache, self.state, extra, toks, lps = self._chunk(
            self.params, cache=self.cache, state=self.state, n_steps=n, n_cand=self._n_cand(self.requests),
            backend=self.decode_backend, extra=extra, n_top=self._n_top(self.requests))
        self._extra.update({k: v for k, v in extra.items() if k != "mask"})
        toks = np.asarray(toks)
        # steps the chunk ran: it stops early once every row is done (a step emits for some row or ends it)
        self.steps_run = int((toks >= 0).any(axis=0).sum())
        lps = {k: np.asarray(v) for k, v in lps.items()}
        done = np.asarray(self.state["done"])
        touched = []
        for s, r in enumerate(self.requests):
            if r is None or r.done:
                continue
            new = [int(t) for t in toks[s] if t >= 0]
            r.new_ids.extend(new)
            if new:
                touched.append(r)
                self._record(r, new, lps, s)
            if done[s] and not r.done:
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


_put_rows = jax.jit(lambda a, idx, rows: a.at[idx].set(rows), donate_argnums=(0,))


@jax.jit
def _take_rows(logits: Array, cache_rows: Any, rows: Array) -> tuple[Array, Any]:
    """Prefill rows ``rows`` of the logits [b, V] and of the per-row caches (batch axis 1, as ``insert``
    takes them): one prefill row copied for each request that shares its prompt."""
    return logits[rows], jax.tree.map(lambda a: jnp.take(a, rows, axis=1), cache_rows)


def _bias_rows(reqs: Sequence[Request], v: int) -> tuple[np.ndarray, np.ndarray]:
    """Each request's ``logit_bias`` as [len(reqs), MAX_BIAS] ids (padding: ``v``, out of range) and values."""
    ids = np.full((len(reqs), MAX_BIAS), v, np.int32)
    vals = np.zeros((len(reqs), MAX_BIAS), np.float32)
    for i, r in enumerate(reqs):
        items = sorted((r.params.logit_bias or {}).items())
        if items:
            ids[i, : len(items)] = [t for t, _ in items]
            vals[i, : len(items)] = [b for _, b in items]
    return ids, vals


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
                 family: Family | None = None, tokenizer: Any = None, prefix_cache: Any = None,
                 speculator: Any = None) -> list[Request]:
    """Generate for a batch of token-id prompts; one engine sized to the batch and the longest request.
    ``inputs``: per prompt, the family's inputs besides tokens (e.g. ``pixel_values``) or None.
    ``tokenizer``: for prompts whose sampling carries a ``constraint`` (structured output);
    ``prefix_cache`` / ``speculator``: as :class:`Engine` takes them."""
    need = max(len(p) + s.max_new_tokens for p, s in zip(prompts, sp, strict=True))
    max_len = min(bucket(need + 1), cfg.max_position_embeddings)
    eng = Engine(params, cfg, max_batch=bucket(len(prompts), 1), max_len=max_len, chunk=chunk, family=family,
                 tokenizer=tokenizer, prefix_cache=prefix_cache, speculator=speculator)
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
