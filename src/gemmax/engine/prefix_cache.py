"""Prefix caching: prompts that share a beginning (a long system prompt, few-shot examples, a chat's earlier
turns) reuse its keys and values instead of computing them again.

A prompt is cut into blocks of ``block`` tokens; block ``i`` is keyed by a hash chain (the key of block
``i - 1`` and its own tokens), so a key names the whole prefix up to the block's end, and two prompts share a
block only when everything before it matches too. A block's entry is every layer's keys and values for its
positions (``[L, block, kv_heads, head_dim]``, host memory), in the layout ``Family.extend`` returns and
``Family.commit`` writes. Entries are evicted least-recently-used under a byte bound; a chain is touched
deepest block first, so its root is the last of it to go and an evicted block never strands its ancestors.

On admission (``admit``, called by the engine) each request's longest cached prefix is written into its slot
(``commit``) and only the rest of the prompt runs (``extend``), one compiled call per shape bucket; the new
full blocks are stored for the next request. Requests of one admission group that share blocks nobody has
cached yet go in two waves, so the second wave hits what the first computed.

It applies to families with ``extend`` / ``commit`` and no image inputs (PaliGemma's prompt attends both
ways and an image changes every key after it). A cache belongs to one set of weights: bound to another
``params`` object, it empties itself.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemmax.engine.generate import bucket
from gemmax.models.base import Family

Array = jax.Array

#: default memory bound (MiB) of ``lm.generate``'s and ``gemmax serve``'s prefix cache
DEFAULT_MB = 256
#: tokens per cached block
BLOCK = 32


class PrefixCache:
    """Blocks of prompt keys/values by hash chain, LRU under ``max_bytes``."""

    def __init__(self, max_mb: float = DEFAULT_MB, block: int = BLOCK):
        if max_mb < 0:
            raise ValueError(f"prefix cache bound must be >= 0 MiB, got {max_mb}")
        if block < 1:
            raise ValueError(f"prefix cache block must be >= 1 token, got {block}")
        self.max_bytes = int(max_mb * 2**20)
        self.block = block
        self.entries: OrderedDict[bytes, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self.bytes = 0
        self.hit_tokens = 0
        self.computed_tokens = 0
        self._owner: Any = None

    def bind(self, params: Any) -> None:
        """Serve the weights ``params``; other weights' entries are dropped (their keys/values differ). JAX
        arrays are immutable, so the identities of the leaves name the weights (a dict edited in place,
        as LoRA or quantization do, has new leaves)."""
        owner = tuple(id(a) for a in jax.tree.leaves(params))
        if self._owner != owner:
            self.clear()
            self._owner = owner

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0

    def keys(self, ids: Sequence[int]) -> list[bytes]:
        """The chain key of every full block of ``ids``."""
        out, prev = [], b""
        arr = np.asarray(ids, np.int32)
        for i in range(len(arr) // self.block):
            prev = hashlib.blake2b(prev + arr[i * self.block:(i + 1) * self.block].tobytes(),
                                   digest_size=16).digest()
            out.append(prev)
        return out

    def cached_blocks(self, keys: Sequence[bytes], limit: int) -> int:
        """How many leading blocks of a chain (at most ``limit``) are cached."""
        n = 0
        while n < min(limit, len(keys)) and keys[n] in self.entries:
            n += 1
        return n

    def touch(self, keys: Sequence[bytes]) -> None:
        for k in reversed(keys):  # deepest first: the root ends most recent
            if k in self.entries:
                self.entries.move_to_end(k)

    def store(self, key: bytes, k: np.ndarray, v: np.ndarray) -> None:
        """Keep one block's keys/values, evicting least-recently-used blocks to stay within the bound."""
        size = k.nbytes + v.nbytes
        if key in self.entries or size > self.max_bytes:
            return
        self.entries[key] = (k, v)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (ok, ov) = self.entries.popitem(last=False)
            self.bytes -= ok.nbytes + ov.nbytes

    def applies_to(self, family: Family) -> bool:
        return applies(family)

    def admit(self, eng: Any, reqs: Sequence[Any], slots: Sequence[int]) -> Array:
        """The engine's admission through this cache (module function ``admit``)."""
        return admit(eng, reqs, slots)

    def stats(self) -> dict[str, int]:
        return {"blocks": len(self.entries), "bytes": self.bytes, "hit_tokens": self.hit_tokens,
                "computed_tokens": self.computed_tokens}


def applies(family: Family) -> bool:
    """Whether the engine can prefix-cache this family's prompts."""
    return family.extend is not None and family.commit is not None and not family.extra_inputs


_ADMIT: dict[tuple[str, str, int], Any] = {}


def _admit_fn(family: Family, cfg: Any, max_len: int) -> Any:
    """The jitted admission: write cached prefixes into the slots, run the rest of each prompt on top, write
    it too. One compile per (batch, prefix, remainder) bucket; the cache is donated."""
    key = (family.name, json.dumps(cfg.to_dict(), sort_keys=True, default=str), max_len)
    if key not in _ADMIT:
        def admit(params: dict, cache: dict, pk: Array, pv: Array, n_hit: Array, tokens: Array, n_rest: Array,
                  slots: Array, backend: str) -> tuple[Array, dict, dict]:
            if pk.shape[2] == 0:  # no prefix in this wave: extend over an empty one-slot cache, not max_len
                rows = family.init_cache(cfg, tokens.shape[0], 1, pk.dtype)
            else:
                cache = family.commit(cfg, cache, {"k": pk, "v": pv}, slots, jnp.zeros_like(n_hit), n_hit, backend)
                batch = jax.tree.leaves(cache)[0].shape[1]
                rows = jax.tree.map(lambda a: a[:, jnp.minimum(slots, batch - 1)], cache)
            logits, blk = family.extend(params, cfg, rows, tokens, n_hit, backend, last=n_rest - 1)
            cache = family.commit(cfg, cache, blk, slots, n_hit, n_rest, backend)
            return logits, cache, blk

        _ADMIT[key] = jax.jit(admit, static_argnames=("backend",), donate_argnums=(1,))
    return _ADMIT[key]


def admit(eng: Any, reqs: Sequence[Any], slots: Sequence[int]) -> Array:
    """Prefill ``reqs`` into ``slots`` of engine ``eng`` through its prefix cache -> logits of each prompt's
    last token, ``[bucket(len(reqs)), V]`` (padding rows repeat row 0), as the engine's prefill gives them."""
    pc: PrefixCache = eng.prefix_cache
    pc.bind(eng.params)
    chains = [pc.keys(r.prompt_ids) for r in reqs]
    first, second = _waves(pc, reqs, chains)
    out: dict[int, Array] = {}
    for wave in (first, second):
        if wave:
            logits = _admit_wave(eng, [reqs[i] for i in wave], [chains[i] for i in wave], [slots[i] for i in wave])
            out.update({i: logits[j] for j, i in enumerate(wave)})
    rows = [out[i] for i in range(len(reqs))]
    rows += [rows[0]] * (bucket(len(reqs), 1) - len(reqs))
    return jnp.stack(rows)


def _waves(pc: PrefixCache, reqs: Sequence[Any], chains: Sequence[list[bytes]]) -> tuple[list[int], list[int]]:
    """Requests that would compute a block an earlier request of the group also computes wait for it."""
    first, second, seen = [], [], set()
    for i, (r, chain) in enumerate(zip(reqs, chains, strict=True)):
        usable = chain[: (len(r.prompt_ids) - 1) // pc.block]
        fresh = [k for k in usable if k not in pc.entries]
        (second if any(k in seen for k in fresh) else first).append(i)
        seen.update(fresh)
    return first, second


def _admit_wave(eng: Any, reqs: Sequence[Any], chains: Sequence[list[bytes]], slots: Sequence[int]) -> Array:
    pc: PrefixCache = eng.prefix_cache
    blk = pc.block
    n_hits = [pc.cached_blocks(c, (len(r.prompt_ids) - 1) // blk) * blk for r, c in zip(reqs, chains, strict=True)]
    bb = bucket(len(reqs), 1)
    t = bucket(max(len(r.prompt_ids) - h for r, h in zip(reqs, n_hits, strict=True)))
    t = min(t, eng.max_len)
    hmax = bucket(max(n_hits), blk) if max(n_hits) else 0
    tokens = np.zeros((bb, t), np.int32)
    n_rest = np.ones(bb, np.int32)
    n_hit = np.zeros(bb, np.int32)
    padded_slots = np.full(bb, eng.max_batch, np.int32)
    pk = pv = None
    for i, (r, chain, h, s) in enumerate(zip(reqs, chains, n_hits, slots, strict=True)):
        rest = r.prompt_ids[h:]
        tokens[i, : len(rest)] = rest
        n_rest[i], n_hit[i], padded_slots[i] = len(rest), h, s
        for j, key in enumerate(chain[: h // blk]):
            k, v = pc.entries[key]
            if pk is None:
                shape = (k.shape[0], bb, hmax) + k.shape[2:]
                pk, pv = np.zeros(shape, k.dtype), np.zeros(shape, v.dtype)
            pk[:, i, j * blk:(j + 1) * blk], pv[:, i, j * blk:(j + 1) * blk] = k, v
        pc.hit_tokens += h
        pc.computed_tokens += len(rest)
    if pk is None:  # nothing cached: an empty prefix of the right layout
        shape, dtype = _block_layout(eng)
        pk = pv = np.zeros((shape[0], bb, hmax) + shape[3:], dtype)
    fn = _admit_fn(eng.family, eng.cfg, eng.max_len)
    logits, eng.cache, new = fn(eng.params, eng.cache, jnp.asarray(pk), jnp.asarray(pv), jnp.asarray(n_hit),
                                jnp.asarray(tokens), jnp.asarray(n_rest), jnp.asarray(padded_slots),
                                backend=eng.prefill_backend)
    _store(pc, chains, n_hits, new)
    return logits


def _block_layout(eng: Any) -> tuple[tuple[int, ...], Any]:
    """Shape and dtype of the engine's ``extend`` blocks (batch and length 1), from an abstract evaluation
    made once per engine."""
    if getattr(eng, "_prefix_layout", None) is None:
        cache = jax.eval_shape(lambda: eng.family.init_cache(eng.cfg, 1, eng.max_len, eng.dtype))
        _, blk = jax.eval_shape(lambda p, c: eng.family.extend(p, eng.cfg, c, jnp.zeros((1, 1), jnp.int32),
                                                               jnp.zeros((1,), jnp.int32)), eng.params, cache)
        eng._prefix_layout = (tuple(blk["k"].shape), blk["k"].dtype)
    return eng._prefix_layout


def _store(pc: PrefixCache, chains: Sequence[list[bytes]], n_hits: Sequence[int],
           new: dict) -> None:
    """Keep the full blocks each request just computed, then touch its whole chain."""
    blk = pc.block
    k_all = v_all = None
    for i, (chain, h) in enumerate(zip(chains, n_hits, strict=True)):
        fresh = [j for j in range(h // blk, len(chain)) if chain[j] not in pc.entries]
        if fresh and k_all is None:
            k_all, v_all = np.asarray(new["k"]), np.asarray(new["v"])
        for j in fresh:
            a, z = j * blk - h, (j + 1) * blk - h
            pc.store(chain[j], k_all[:, i, a:z].copy(), v_all[:, i, a:z].copy())
        pc.touch(chain)
