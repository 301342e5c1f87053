"""Speculative decoding, exact: a drafter proposes the next tokens, the model checks them all in one pass.

Each step a row's last token and up to ``k`` draft tokens run through ``Family.extend`` at once (one read of
the weights instead of ``k + 1``); standard rejection sampling (Leviathan et al. 2023, Chen et al. 2023)
keeps the longest acceptable run of drafts and adds one token of the model's own, so a step emits 1 to
``k + 1`` tokens and ``Family.commit`` writes only the kept ones into the cache.

Exactness: draft ``d`` at position ``i`` is accepted with probability ``min(1, p_i(d) / q_i(d))``, where
``p_i`` is the model's *processed* distribution (temperature, top-k, top-p, min-p, as the engine's sampler
applies them) and ``q_i`` the drafter's; on rejection the token is drawn from ``max(p_i - q_i, 0)``
renormalised, and after ``k`` acceptances from ``p_k``. Every emitted token is then distributed exactly as
plain sampling's. Greedy rows have a one-hot ``p``: a draft is kept iff it is the argmax, so greedy output is
plain greedy decoding's, token for token. The random stream is the row's own (``fold_in(seed, position)``),
so a request's tokens do not depend on what shares its batch; they differ from plain decoding's draws.

Drafters:
- :class:`PromptLookup`: the tokens that followed the latest earlier occurrence of the context's last
  n-gram (no second model; pays off when the answer repeats its input: editing, summarising, code). Its
  ``q`` is one-hot on the proposal.
- :class:`DraftModel`: a smaller model of the same vocabulary, run through its own ``extend`` on its own
  cache (kept in step with the model's by the same ``commit`` counts), sampling from its processed ``q``.

When it falls back to plain decoding (``Speculator.applies``): the family has no ``extend`` / ``commit``
(RecurrentGemma: a recurrent state cannot be rolled back past rejected drafts; Gemma 3n, Gemma 4 for now),
or a live row samples with settings this module does not model (any ``SamplingParams`` field beyond
temperature / top-k / top-p / min-p / seed / limits / stops left at a non-default value, e.g. a grammar or
penalties): then the whole batch takes the engine's ordinary decode chunk for that step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemmax.engine.generate import (
    N_CAND,
    _compute_dtype,
    bucket,
    candidate_weights,
    compiled_functions,
    greedy_argmax,
    kept_weights,
    row_keys,
)
from gemmax.models import base
from gemmax.models.base import XLA, Family

Array = jax.Array

#: the SamplingParams fields whose effect on the distribution this module reproduces
_MODELLED = {"temperature", "top_k", "top_p", "min_p", "seed", "max_new_tokens", "stop_ids", "stop_strings"}


def row_supported(sp: Any) -> bool:
    """Whether speculation samples this row exactly: every field it does not model is at its default."""
    for f in dataclasses.fields(sp):
        if f.name in _MODELLED:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        if getattr(sp, f.name) != default:
            return False
    return True


# ---- the processed distribution ------------------------------------------------------------------------


def processed_probs(logits: Array, temperature: Array, top_k: Array, top_p: Array, min_p: Array) -> Array:
    """The distribution the engine's sampler draws from, over the whole vocabulary: ``[N, V]`` logits and
    per-row settings -> ``[N, V]`` probabilities (one-hot argmax for temperature 0). Filters as
    ``sample_tokens`` applies them: temperature, top-k, then top-p and min-p on the survivors. As there, a
    row whose kept set lies within the ``N_CAND`` most likely tokens is computed from them (rank order);
    one whose kept set may reach past them takes the exact path over the whole vocabulary (thresholds by
    bisection, tokens tied at a cutoff all kept), under a per-row ``lax.cond``."""
    lg = logits.astype(jnp.float32)
    n_rows, v = lg.shape
    t, p, m = temperature.astype(jnp.float32), top_p.astype(jnp.float32), min_p.astype(jnp.float32)
    k = jnp.where((top_k <= 0) | (top_k >= v), v, top_k).astype(jnp.int32)
    onehot = jax.nn.one_hot(greedy_argmax(lg), v, dtype=jnp.float32)
    lg = lg / jnp.where(t > 0, t, 1.0)[:, None]
    n = min(N_CAND, v)
    vals, idx = jax.lax.top_k(lg, n)
    keep, w = candidate_weights(lg, vals, k, p, m)
    probs = jnp.zeros_like(lg).at[jnp.arange(n_rows)[:, None], idx].set(w / w.sum(-1, keepdims=True))
    if n < v:  # rows whose kept set may reach past the candidates: the exact path
        need = (t > 0) & (keep[:, -1] | ((k > n) & (k < v) & (p < 1)))

        def one(args: tuple) -> Array:
            need_i, fast_i, *row = args
            return jax.lax.cond(need_i, lambda: _row_probs(*row), lambda: fast_i)

        probs = jax.lax.cond(jnp.any(need), lambda: jax.lax.map(one, (need, probs, lg, k, p, m)), lambda: probs)
    return jnp.where((t > 0)[:, None], probs, onehot)


def _row_probs(lg: Array, k: Array, p: Array, m: Array) -> Array:
    """One row's kept distribution over the whole vocabulary (``lg`` already divided by the temperature),
    with the thresholds of the sampler's exact path."""
    kept = kept_weights(lg, k, p, m)
    return kept / kept.sum()


def draw(probs: Array, u: Array) -> Array:
    """Inverse-CDF draw of one token per row from (unnormalised) ``probs`` ``[N, V]`` with uniforms ``[N]``."""
    c = jnp.cumsum(probs, axis=-1)
    return jnp.minimum(jnp.sum(c <= u[:, None] * c[:, -1:], axis=-1), probs.shape[-1] - 1).astype(jnp.int32)


# ---- drafters ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PromptLookup:
    """Drafts by n-gram match in the row's own context (prompt + generated)."""

    max_ngram: int = 3
    min_ngram: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"prompt lookup needs 1 <= min_ngram <= max_ngram, got {self.min_ngram}, "
                             f"{self.max_ngram}")

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        """Up to ``k`` tokens that followed the latest earlier occurrence of the longest matching suffix."""
        ctx = np.asarray(context, np.int64)
        n_ctx = len(ctx)
        if k <= 0:
            return []
        for n in range(min(self.max_ngram, n_ctx - 1), self.min_ngram - 1, -1):
            wins = np.lib.stride_tricks.sliding_window_view(ctx[: n_ctx - 1], n)
            hits = np.nonzero((wins == ctx[n_ctx - n:]).all(axis=1))[0]
            if len(hits):
                i = int(hits[-1]) + n
                return ctx[i: i + k].tolist()
        return []


@dataclasses.dataclass
class DraftModel:
    """A smaller model of the same vocabulary: its weights, config and family."""

    params: Any
    config: Any
    family: Family

    @classmethod
    def of(cls, lm: Any) -> DraftModel:
        """From a ``CausalLM`` (or anything with ``params``, ``config`` and ``family``)."""
        return cls(lm.params, lm.config, getattr(lm, "family", None) or base.for_config(lm.config))


# ---- the speculator ------------------------------------------------------------------------------------


class Speculator:
    """Speculative decoding for one engine (``Engine(..., speculator=...)``)."""

    def __init__(self, drafter: PromptLookup | DraftModel, num_tokens: int | None = None):
        if not isinstance(drafter, PromptLookup | DraftModel):
            raise TypeError(f"a drafter is PromptLookup or DraftModel, got {type(drafter).__name__}")
        self.drafter = drafter
        self.k = num_tokens or (8 if isinstance(drafter, PromptLookup) else 4)
        if self.k < 1:
            raise ValueError(f"speculation needs at least 1 draft token, got {self.k}")
        self.reason: str | None = None
        self.stats = {"steps": 0, "drafted": 0, "accepted": 0, "emitted": 0}
        self.dcache: Any = None

    def attach(self, eng: Any) -> None:
        """Check the pairing and make the drafter's cache; a family that cannot verify blocks leaves the
        engine decoding plainly (``reason`` says why)."""
        fam = eng.family
        if fam.extend is None or fam.commit is None:
            self.reason = (f"{fam.name} models cannot check a block of draft tokens (their cache cannot be rolled "
                           "back to a rejected draft); decoding plainly")
            return
        d = self.drafter
        if isinstance(d, DraftModel):
            if d.config.vocab_size != eng.cfg.vocab_size:
                raise ValueError(f"the draft model's vocabulary ({d.config.vocab_size}) differs from the model's "
                                 f"({eng.cfg.vocab_size}): a drafter must share the tokenizer")
            if d.family.extend is None or d.family.commit is None:
                raise ValueError(f"a {d.family.name} model cannot draft: its family has no extend/commit")
            self.dcache = d.family.init_cache(d.config, eng.max_batch, eng.max_len, _compute_dtype(d.params))

    def applies(self, eng: Any) -> bool:
        """Whether the next step speculates: a supported family and every live row sampled as modelled."""
        if self.reason is not None:
            return False
        live = [r for r in eng.requests if r is not None and not r.done]
        return bool(live) and all(row_supported(r.params) for r in live)

    def admit(self, eng: Any, reqs: Sequence[Any], slots: Sequence[int], inputs: Any = None) -> None:
        """Prefill the draft model's rows for newly admitted requests (prompt lookup needs nothing)."""
        d = self.drafter
        if self.reason is not None or not isinstance(d, DraftModel):
            return
        prefill, insert, _, _ = compiled_functions(d.family, d.config, eng.max_len)
        t = max(len(r.prompt_ids) for r in reqs)
        t, bb = min(bucket(t), eng.max_len), bucket(len(reqs), 1)
        toks = np.zeros((bb, t), np.int32)
        lens = np.ones(bb, np.int32)
        for i, r in enumerate(reqs):
            toks[i, : len(r.prompt_ids)] = r.prompt_ids
            lens[i] = len(r.prompt_ids)
        _, rows = prefill(d.params, tokens=jnp.asarray(toks), lengths=jnp.asarray(lens), backend=XLA)
        padded = np.full(bb, eng.max_batch, np.int32)
        padded[: len(slots)] = slots
        self.dcache = insert(self.dcache, rows, jnp.asarray(padded))

    def step(self, eng: Any) -> list[Any]:
        """One speculative step for every live row; returns the requests that got tokens."""
        st = {k: np.array(v) for k, v in eng.state.items()}
        b, k = eng.max_batch, self.k
        block = np.zeros((b, k + 1), np.int32)
        n_draft = np.zeros(b, np.int32)
        live = np.zeros(b, bool)
        lookup = isinstance(self.drafter, PromptLookup)
        for s, r in enumerate(eng.requests):
            if r is None or r.done:
                continue
            live[s] = True
            block[s, 0] = st["token"][s]
            room = max(0, min(k, int(st["limit"][s]) - int(st["pos"][s]) - 1))
            if lookup:
                d = self.drafter.propose(r.prompt_ids + r.new_ids, room)
                block[s, 1: 1 + len(d)] = d
                n_draft[s] = len(d)
            else:
                n_draft[s] = room
        greedy = not any(r is not None and not r.done and r.params.temperature > 0 for r in eng.requests)
        fn = _step_fn(eng, self.drafter, k)
        dparams = None if lookup else self.drafter.params
        eng.cache, self.dcache, out, n_acc, nxt = fn(
            eng.params, eng.cache, dparams, self.dcache, jnp.asarray(block), eng.state["pos"],
            jnp.asarray(n_draft), jnp.asarray(live), eng.state["seed"], eng.state["temperature"],
            eng.state["top_k"], eng.state["top_p"], eng.state["min_p"], greedy=greedy,
            backend=eng.prefill_backend)
        out, n_acc, nxt = np.asarray(out), np.asarray(n_acc), np.asarray(nxt)
        touched = []
        for s, r in enumerate(eng.requests):
            if not live[s]:
                continue
            emitted = [int(t) for t in out[s, 1: 1 + n_acc[s]]] + [int(nxt[s])]
            pos = int(st["pos"][s])
            self.stats["drafted"] += int(n_draft[s])
            self.stats["accepted"] += int(n_acc[s])
            for i, tok in enumerate(emitted):
                st["pos"][s], st["token"][s] = pos + 1 + i, tok
                eng._append(r, tok, st)
                self.stats["emitted"] += 1
                if r.done:
                    break
            touched.append(r)
        self.stats["steps"] += 1
        eng.state = eng._put_state(st)
        return touched


_STEPS: dict[tuple, Any] = {}


def _cfg_key(cfg: Any) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True, default=str)


def _step_fn(eng: Any, drafter: PromptLookup | DraftModel, k: int) -> Any:
    """The jitted step for this engine's shapes and drafter kind (one compile per greedy / sampled mode)."""
    dm = drafter if isinstance(drafter, DraftModel) else None
    key = (eng.family.name, _cfg_key(eng.cfg), eng.max_len, k,
           None if dm is None else (dm.family.name, _cfg_key(dm.config)))
    if key not in _STEPS:
        _STEPS[key] = jax.jit(_make_step(eng.family, eng.cfg, dm, k), static_argnames=("greedy", "backend"),
                              donate_argnums=(1, 3))
    return _STEPS[key]


def _make_step(fam: Family, cfg: Any, dm: DraftModel | None, k: int) -> Any:
    def step(params: Any, cache: Any, dparams: Any, dcache: Any, block: Array, pos: Array, n_draft: Array,
             live: Array, seed: Array, temperature: Array, top_k: Array, top_p: Array, min_p: Array,
             greedy: bool, backend: str) -> tuple[Any, Any, Array, Array, Array]:
        b = block.shape[0]
        keys = row_keys(seed, pos)
        settings = (temperature, top_k, top_p, min_p)
        qs = None
        if dm is not None:
            block, qs, dblk = _draft(dm, dparams, dcache, block, pos, keys, settings, greedy, k)
        logits, tblk = fam.extend(params, cfg, cache, block, pos, backend)  # [B, k+1, V]
        n_acc, nxt = _accept(logits, block, n_draft, qs, keys, settings, greedy, k)
        counts = jnp.where(live, n_acc + 1, 0)
        rows = jnp.arange(b)
        cache = fam.commit(cfg, cache, tblk, rows, pos, counts, backend)
        if dm is not None:
            dcache = dm.family.commit(dm.config, dcache, dblk, rows, pos, counts, backend)
        return cache, dcache, block, n_acc, nxt

    return step


def _draft(dm: DraftModel, dparams: Any, dcache: Any, block: Array, pos: Array, keys: Array,
           settings: tuple[Array, ...], greedy: bool, k: int) -> tuple[Array, Array | None, dict]:
    """``k`` draft tokens from the draft model, each through ``extend`` over the block so far (its cache is
    only written after acceptance) -> (block with drafts, their distributions ``[B, k, V]``, the block's
    keys/values for the draft cache)."""
    b = block.shape[0]
    v = dm.config.vocab_size
    qs = jnp.zeros((b, k, v), jnp.float32)

    def one(i: int, carry: tuple[Array, Array]) -> tuple[Array, Array]:
        block, qs = carry
        lg, _ = dm.family.extend(dparams, dm.config, dcache, block, pos, XLA, last=jnp.full((b,), i))
        if greedy:
            d = greedy_argmax(lg)
        else:
            q = processed_probs(lg, *settings)
            u = jax.vmap(lambda kk: jax.random.uniform(jax.random.fold_in(kk, 3 + i)))(keys)
            d = draw(q, u)
            qs = qs.at[:, i].set(q)
        return block.at[:, i + 1].set(d), qs

    block, qs = jax.lax.fori_loop(0, k, one, (block, qs))
    _, dblk = dm.family.extend(dparams, dm.config, dcache, block, pos, XLA, last=jnp.full((b,), k))
    return block, (None if greedy else qs), dblk


def _accept(logits: Array, block: Array, n_draft: Array, qs: Array | None, keys: Array,
            settings: tuple[Array, ...], greedy: bool, k: int) -> tuple[Array, Array]:
    """Rejection sampling of the drafts against the model's processed distributions -> (accepted count,
    the next token: the correction at the first rejection, else the bonus token)."""
    b, _, v = logits.shape
    drafts = block[:, 1:]
    j = jnp.arange(k)[None]
    if greedy:
        tgt = greedy_argmax(logits)  # [B, k+1]
        ok = (drafts == tgt[:, :k]) & (j < n_draft[:, None])
        n_acc = jnp.sum(jnp.cumprod(ok, axis=1), axis=1)
        return n_acc, jnp.take_along_axis(tgt, n_acc[:, None], axis=1)[:, 0]
    flat = [jnp.repeat(x, k + 1) for x in settings]
    p = processed_probs(logits.reshape(b * (k + 1), v), *flat).reshape(b, k + 1, v)
    pd = jnp.take_along_axis(p[:, :k], drafts[..., None], axis=-1)[..., 0]
    qd = 1.0 if qs is None else jnp.take_along_axis(qs, drafts[..., None], axis=-1)[..., 0]
    u = jax.vmap(lambda kk: jax.random.uniform(jax.random.fold_in(kk, 1), (k,)))(keys)
    ok = (u * qd < pd) & (j < n_draft[:, None])
    n_acc = jnp.sum(jnp.cumprod(ok, axis=1), axis=1)
    p_n = jnp.take_along_axis(p, n_acc[:, None, None], axis=1)[:, 0]
    at = jnp.minimum(n_acc, k - 1)[:, None]
    if qs is None:
        q_n = jax.nn.one_hot(jnp.take_along_axis(drafts, at, axis=1)[:, 0], v, dtype=jnp.float32)
    else:
        q_n = jnp.take_along_axis(qs, at[:, :, None], axis=1)[:, 0]
    resid = jnp.maximum(p_n - q_n, 0.0)
    rejected = (n_acc < n_draft)[:, None] & (resid.sum(-1, keepdims=True) > 0)
    u_next = jax.vmap(lambda kk: jax.random.uniform(jax.random.fold_in(kk, 2)))(keys)
    return n_acc, draw(jnp.where(rejected, resid, p_n), u_next)


def add_speculation_flags(p: argparse.ArgumentParser) -> None:
    """``--draft``, ``--speculate`` and ``--speculate-tokens``: how ``gemmax generate`` and ``gemmax serve``
    ask for a speculator (each loads the draft model its own way, then :func:`speculator_for` builds it)."""
    p.add_argument("--draft", default=None, metavar="HANDLE",
                   help="speculative decoding with this smaller model of the same tokenizer as drafter")
    p.add_argument("--speculate", default=None, choices=["prompt-lookup"],
                   help="speculative decoding drafting from n-gram matches in the context (no second model)")
    p.add_argument("--speculate-tokens", type=int, default=None,
                   help="draft tokens checked per step (default 8 for prompt lookup, 4 for a draft model)")


def speculator_for(draft: Any = None, prompt_lookup: bool = False, num_tokens: int | None = None) -> Speculator | None:
    """The speculator a user asked for: ``draft`` (a ``CausalLM`` of the same vocabulary) or ``prompt_lookup``,
    not both; None for neither."""
    if draft is not None and prompt_lookup:
        raise ValueError("speculate with a draft model or with prompt lookup, not both")
    if draft is not None:
        if not all(hasattr(draft, a) for a in ("params", "config")):
            raise TypeError(f"draft must be a CausalLM (params and config), got {type(draft).__name__}")
        return Speculator(DraftModel.of(draft), num_tokens)
    if prompt_lookup:
        return Speculator(PromptLookup(), num_tokens)
    if num_tokens is not None:
        raise ValueError("speculate_tokens needs a drafter: pass draft= or prompt_lookup=True")
    return None
