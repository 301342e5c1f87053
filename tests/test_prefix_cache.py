"""Prefix caching: hits give the same tokens as misses, the memory bound and LRU order hold, families it
cannot serve bypass it, and the command line takes its options."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemmax
from gemmax.cli import build_parser
from gemmax.engine.generate import Engine, SamplingParams, generate_ids
from gemmax.engine.prefix_cache import PrefixCache
from gemmax.models import recurrent_gemma
from gemmax.models.gemma import FAMILY as GEMMA

BLOCK = 8


@pytest.fixture(scope="module")
def model():
    """Local, local, global layers with a 4-token window: cached prefixes are far longer than the ring."""
    cfg = gemmax.tiny_config("gemma3", num_layers=3, sliding_window=4, vocab_size=64)
    return cfg, GEMMA.init_params(cfg, jax.random.key(0))


def _prompts(seed: int, shared: int, tails: tuple[int, ...]) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    head = rng.integers(3, 64, shared).tolist()
    return [head + rng.integers(3, 64, n).tolist() for n in tails]


def _gen(model, prompts, pc=None):
    cfg, params = model
    sp = [SamplingParams(max_new_tokens=8) for _ in prompts]
    return [r.new_ids for r in generate_ids(params, cfg, prompts, sp, family=GEMMA, prefix_cache=pc)]


def test_extend_equals_step_by_step_decoding(model):
    """The primitive: blocks on a cache (partly committed, longer than the ring) give the logits that one
    decode step per token gives, and leave the cache those steps leave."""
    cfg, params = model
    toks = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 20)), jnp.int32)
    cache = GEMMA.init_cache(cfg, 2, 32, jnp.float32)
    step = jax.jit(lambda c, t, p: GEMMA.decode_step(params, cfg, c, t, p))
    ext = jax.jit(lambda c, t, p: GEMMA.extend(params, cfg, c, t, p))
    commit = jax.jit(lambda c, b, p, n: GEMMA.commit(cfg, c, b, jnp.arange(2), p, n))
    ref, c = [], cache
    for i in range(20):
        logits, c = step(c, toks[:, i], jnp.full((2,), i, jnp.int32))
        ref.append(logits)
    ref = jnp.stack(ref, 1)
    c2, at = cache, 0
    for n, keep in ((3, 3), (11, 6), (11, 11)):  # the second block is cut after 6: a rejected tail
        logits, blk = ext(c2, toks[:, at:at + n], jnp.full((2,), at, jnp.int32))
        np.testing.assert_allclose(logits[:, :keep], ref[:, at:at + keep], atol=1e-4)
        c2 = commit(c2, blk, jnp.full((2,), at, jnp.int32), jnp.full((2,), keep, jnp.int32))
        at += keep
    assert at == 20
    for name in c:
        np.testing.assert_allclose(c2[name], c[name], atol=1e-5, err_msg=name)


def test_hits_give_the_same_tokens_as_misses(model):
    prompts = _prompts(0, 27, (3, 9, 14))  # a 27-token shared head: 3 full blocks, then a partial one
    plain = _gen(model, prompts)
    pc = PrefixCache(1, block=BLOCK)
    assert _gen(model, prompts, pc) == plain  # one admission group: the first request computes, the rest hit
    first = pc.stats()
    assert first["hit_tokens"] == 2 * 24 and first["blocks"] > 0
    assert _gen(model, prompts, pc) == plain  # again: every full block (up to the last token) is a hit
    assert pc.hit_tokens - first["hit_tokens"] == 24 + 32 + 40
    # a chat's next turn: the earlier turns (prompt + answer) hit, only the new text is computed
    turn2 = [p + a + [5, 6, 7] for p, a in zip(prompts, plain, strict=True)]
    before = pc.computed_tokens
    assert _gen(model, turn2, pc) == _gen(model, turn2)
    assert pc.computed_tokens - before < sum(map(len, turn2)) - 3 * 24


def test_eviction_respects_the_bound_least_recently_used_first(model):
    k = np.zeros((3, BLOCK, 1, 16), np.float32)  # one block's keys: 1536 bytes, 3072 with values
    pc = PrefixCache(3 * 3072 / 2**20, block=BLOCK)
    a, b = pc.keys(list(range(2 * BLOCK))), pc.keys(list(range(100, 100 + 2 * BLOCK)))
    for key in a + b[:1]:
        pc.store(key, k, k)
    assert pc.bytes == 3 * 3072 and list(pc.entries) == a + b[:1]
    pc.touch(a)  # chain a used again: its root ends most recent, its leaf just before it
    pc.store(b[1], k, k)  # over the bound: the least recently used block (b's root) goes
    assert pc.bytes <= pc.max_bytes and set(pc.entries) == {a[0], a[1], b[1]}
    assert pc.cached_blocks(b, 2) == 0  # a chain without its root is a miss
    # end to end (the shapes of the test above): distinct prompts under a bound of 8 blocks, 6 new a call
    pc = PrefixCache(0.05, block=BLOCK)
    for seed in range(1, 4):
        _gen(model, _prompts(seed, 27, (3, 9, 14)), pc)
        assert 0 < pc.bytes <= pc.max_bytes
    assert len(pc.entries) < 3 * 6
    assert pc.cached_blocks(pc.keys(_prompts(3, 27, (3, 9, 14))[2]), 5) == 5  # the latest prompts are kept


def test_families_without_extend_bypass_it():
    cfg = recurrent_gemma.tiny_config()
    params = jax.eval_shape(lambda: recurrent_gemma.FAMILY.init_params(cfg, jax.random.key(0)))
    eng = Engine(params, cfg, max_batch=1, max_len=32, family=recurrent_gemma.FAMILY, prefix_cache=PrefixCache())
    assert eng.prefix_cache is None


def test_options():
    with pytest.raises(ValueError, match=">= 0 MiB"):
        PrefixCache(-1)
    with pytest.raises(ValueError, match="block"):
        PrefixCache(1, block=0)
    a = build_parser().parse_args(["serve", "--prefix-cache-mb", "64", "--speculate", "prompt-lookup",
                                   "--speculate-tokens", "6"])
    assert (a.prefix_cache_mb, a.speculate, a.speculate_tokens, a.draft) == (64, "prompt-lookup", 6, None)
    g = build_parser().parse_args(["generate", "hi", "--draft", "small/"])
    assert (g.draft, g.speculate) == ("small/", None)
