"""The generation engine: greedy equals step-by-step argmax, parity with transformers, samplers, limits."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_fixtures import hf_model, save_hf

import gemmax
from gemmax.api import CausalLM
from gemmax.engine.generate import (
    Engine,
    Request,
    SamplingParams,
    decode_chunk,
    generate_ids,
    sample_tokens,
)
from gemmax.models.gemma import model as gm
from gemmax.models.gemma.decode import cache_bytes_per_token


def _argmax_continuations(params, cfg, prompts, ns):
    """The reference: the whole-sequence forward, re-run after every token, its argmax at each row's last
    position; the prompts advance together, right-padded to one width so the forward compiles once per test
    (causal: padding after a row's last token cannot change its logits, nor can the other rows)."""
    width = 16 * 2 ** int(np.ceil(np.log2(max(len(p) + n for p, n in zip(prompts, ns, strict=True)) / 16)))
    fwd = jax.jit(lambda p, ids: gm.forward(p, cfg, ids))
    seqs = [list(p) for p in prompts]
    for step in range(max(ns)):
        logits = np.asarray(fwd(params, jnp.asarray([s + [0] * (width - len(s)) for s in seqs])))
        for i, (s, n) in enumerate(zip(seqs, ns, strict=True)):
            if step < n:
                s.append(int(logits[i, len(s) - 1].argmax()))
    return [s[len(p):] for s, p in zip(seqs, prompts, strict=True)]


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3", "llama"])
def test_greedy_equals_stepwise_argmax_mixed_batch(family):
    cfg = gemmax.tiny_config(family)
    params = gm.init_params(cfg, jax.random.key(1))
    rng = np.random.RandomState(0)
    # lengths 3, 13 and new tokens up to 20: crosses the window of 8 during prefill and during decode
    prompts = [list(rng.randint(3, cfg.vocab_size, n)) for n in (3, 13, 6)]
    sps = [SamplingParams(max_new_tokens=m) for m in (20, 12, 17)]
    reqs = generate_ids(params, cfg, prompts, sps, chunk=4)
    want = _argmax_continuations(params, cfg, prompts, [sp.max_new_tokens for sp in sps])
    for r, sp, w in zip(reqs, sps, want, strict=True):
        assert len(r.new_ids) == sp.max_new_tokens
        assert r.new_ids == w


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "llama"])
def test_greedy_matches_transformers_generate(tmp_path, family):
    m, cfg = hf_model(family, seed=2)
    lm = CausalLM.from_preset(str(save_hf(m, tmp_path)))
    rng = np.random.RandomState(3)
    for n in (4, 11):
        ids = rng.randint(3, cfg.vocab_size, (1, n))
        ref = m.generate(torch.tensor(ids), max_new_tokens=18, do_sample=False, eos_token_id=None,
                         pad_token_id=0)[0].numpy()
        got = lm.generate(ids[0], max_new_tokens=18)
        np.testing.assert_array_equal(got, ref)


def test_engine_slots_join_and_leave():
    """A request added mid-way into a free slot gets the same tokens as when generated alone."""
    cfg = gemmax.tiny_config("gemma3")
    params = gm.init_params(cfg, jax.random.key(2))
    a, b = [5, 6, 7, 8, 9], [10, 11, 12]
    alone, a_alone = _argmax_continuations(params, cfg, [b, a], [10, 6])
    eng = Engine(params, cfg, max_batch=2, max_len=64, chunk=3)
    ra = Request(a, SamplingParams(max_new_tokens=6))
    eng.add([ra])
    eng.step()
    rb = Request(b, SamplingParams(max_new_tokens=10))
    eng.add([rb])
    while eng.has_work():
        eng.step()
        for r in (ra, rb):
            if r.done:
                eng.release(r)
    assert rb.new_ids == alone
    assert ra.new_ids == a_alone
    assert eng.free_slots() == [0, 1]


def test_a_chunk_ends_once_every_row_is_done():
    """Rows that finish inside a chunk end it: an 8-step chunk over rows with 3 and 2 tokens left runs 3
    steps, emits exactly the remaining tokens (the stepwise argmax), and later chunk positions stay empty."""
    cfg = gemmax.tiny_config("gemma3")
    params = gm.init_params(cfg, jax.random.key(5))
    a, b = list(range(5, 15)), [9, 10]  # the reference pads to 16 positions
    want_a, want_b = _argmax_continuations(params, cfg, [a, b], [4, 3])
    eng = Engine(params, cfg, max_batch=2, max_len=64, chunk=8)
    ra, rb = Request(a, SamplingParams(max_new_tokens=4)), Request(b, SamplingParams(max_new_tokens=3))
    eng.add([ra, rb])  # the first token of each comes from the prefill
    calls = []

    def counted(*args):
        jax.debug.callback(lambda: calls.append(1))
        return eng.family.decode_step(*args)

    family = dataclasses.replace(eng.family, decode_step=counted)
    *_, toks, _ = decode_chunk(params, family, cfg, eng.cache, eng.state, n_steps=8, n_cand=-1)
    jax.effects_barrier()
    assert len(calls) == 3 and np.asarray(toks)[:, 3:].max() == -1  # the decode steps taken
    eng.step()
    assert eng.steps_run == 3 and not eng.has_work()
    assert ra.new_ids == want_a and rb.new_ids == want_b
    assert ra.finish_reason == rb.finish_reason == "length"
    eng.release(ra)
    rc = Request(a, SamplingParams(max_new_tokens=6))
    eng.add([rc])
    eng.step()  # one live row with 5 to go: 5 of the 8 steps
    assert eng.steps_run == 5 and rc.new_ids == _argmax_continuations(params, cfg, [a], [6])[0]


def test_a_repeated_prompt_is_prefilled_once():
    """A group holding one prompt several times (GRPO's groups, n > 1) prefills it once: the prefill sees
    the distinct prompts only, and every request decodes as it would alone (greedy), or by its own seed."""
    cfg = gemmax.tiny_config("gemma3")
    params = gm.init_params(cfg, jax.random.key(6))
    a, b = list(range(5, 15)), [9, 10, 11]
    want_a, want_b = _argmax_continuations(params, cfg, [a, b], [5, 5])
    eng = Engine(params, cfg, max_batch=4, max_len=64, chunk=4)
    seen = []
    prefill = eng._prefill

    def counted(*args, **kw):
        seen.append(np.asarray(kw["tokens"]))
        return prefill(*args, **kw)

    eng._prefill = counted
    greedy = [Request(p, SamplingParams(max_new_tokens=5)) for p in (a, b, a, a)]
    eng.add(greedy)
    while eng.has_work():
        eng.step()
    assert len(seen) == 1 and seen[0].shape[0] == 2  # two distinct prompts
    assert [r.new_ids for r in greedy] == [want_a, want_b, want_a, want_a]
    for r in greedy:
        eng.release(r)
    sampled = [Request(a, SamplingParams(max_new_tokens=8, temperature=1.0, seed=sd)) for sd in (1, 2, 1, 3)]
    eng.add(sampled)
    while eng.has_work():
        eng.step()
    ids = [r.new_ids for r in sampled]
    assert ids[0] == ids[2] and ids[0] != ids[1] and ids[0] != ids[3] and ids[1] != ids[3]


def test_stop_ids_end_each_row():
    cfg = gemmax.tiny_config("gemma")
    params = gm.init_params(cfg, jax.random.key(3))
    prompt = [4, 5, 6]
    (cont,) = _argmax_continuations(params, cfg, [prompt], [8])
    stop = cont[4]
    first = cont.index(stop)
    (r,) = generate_ids(params, cfg, [prompt], [SamplingParams(max_new_tokens=8, stop_ids=(stop,))], chunk=2)
    assert r.new_ids == cont[: first + 1] and r.finish_reason == "stop"


def test_seeded_sampling_reproducible_and_seed_dependent():
    cfg = gemmax.tiny_config("gemma2")
    lm = CausalLM.from_config(cfg, seed=4)
    p = np.array([3, 4, 5, 6])
    a = lm.generate(p, max_new_tokens=24, sampler="random", temperature=1.5, seed=11)
    b = lm.generate(p, max_new_tokens=24, sampler="random", temperature=1.5, seed=11)
    c = lm.generate(p, max_new_tokens=24, sampler="random", temperature=1.5, seed=12)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # a row samples the same tokens whatever shares its batch
    batch = lm.generate([p, np.array([7, 8])], max_new_tokens=24, sampler="random", temperature=1.5, seed=11)
    np.testing.assert_array_equal(batch[0], a)


_sample = jax.jit(sample_tokens, static_argnames=("n_cand",))  # settings are data: one compile per n_cand


def _draws(logits, n=400, **kw):
    v = logits.shape[-1]
    lg = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, v))
    keys = jax.random.split(jax.random.key(0), n)
    args = {k: jnp.full((n,), kw.get(k, d), dt) for k, d, dt in
            [("temperature", 1.0, jnp.float32), ("top_k", 0, jnp.int32), ("top_p", 1.0, jnp.float32),
             ("min_p", 0.0, jnp.float32)]}
    return np.asarray(_sample(lg, keys, args["temperature"], args["top_k"], args["top_p"], args["min_p"],
                              n_cand=kw.get("n_cand", 8)))


def test_sampler_filters():
    logits = np.log(np.array([0.4, 0.3, 0.15, 0.1, 0.05] + [0.0] * 11) + 1e-12)
    assert set(_draws(logits, temperature=0.0)) == {0}
    assert set(_draws(logits, top_k=2)) == {0, 1}
    assert set(_draws(logits, top_k=1)) == {0}
    assert set(_draws(logits, top_p=0.65)) == {0, 1}  # 0.4 + 0.3 reaches 0.65
    assert set(_draws(logits, top_p=0.35)) == {0}
    assert set(_draws(logits, min_p=0.3)) == {0, 1, 2}  # p >= 0.12
    assert set(_draws(logits, n_cand=0)) <= {0, 1, 2, 3, 4}
    freq = np.bincount(_draws(logits, n=4000, n_cand=0), minlength=5)[:5] / 4000
    np.testing.assert_allclose(freq, [0.4, 0.3, 0.15, 0.1, 0.05], atol=0.03)


def test_plain_draw_is_the_inverse_cdf_over_the_whole_vocabulary():
    """Rows with no filter draw blocked (``plain_draw``): the frequencies are the softmax's, a token of zero
    weight is never drawn (whole blocks of them, and the last ones of a block, at u near 0 and near 1), and
    the batch's rows draw independently of each other."""
    from gemmax.engine.generate import plain_draw

    rng = np.random.default_rng(3)
    v = 256  # 64 blocks of 4
    lg = rng.normal(0, 1.5, v).astype(np.float32)
    lg[8:16] = -np.inf  # two whole blocks
    lg[[3, 255, 254]] = -np.inf  # the last token of a block, and the row's last two
    probs = np.exp(lg - lg.max())
    probs /= probs.sum()
    n = 20000
    u = jax.random.uniform(jax.random.key(0), (n,))
    tok = np.asarray(jax.jit(plain_draw)(jnp.broadcast_to(jnp.asarray(lg), (n, v)), u))
    assert np.all(probs[tok] > 0)
    freq = np.bincount(tok, minlength=v) / n
    within = np.abs(freq - probs) <= 4 * np.sqrt(probs * (1 - probs) / n) + 1e-4  # 4 standard errors
    assert within.all(), np.flatnonzero(~within)
    edges = np.asarray(plain_draw(jnp.broadcast_to(jnp.asarray(lg), (4, v)),
                                  jnp.asarray([0.0, 1e-9, 1 - 1e-7, 0.9999999], jnp.float32)))
    assert np.all(probs[edges] > 0) and edges[0] == np.flatnonzero(probs)[0]
    assert edges[2] == np.flatnonzero(probs)[-1]
    # through the sampler: a plain row and a top-k row in one batch, each as it draws alone
    both = _sample(jnp.stack([jnp.asarray(lg)] * 2), jax.random.split(jax.random.key(1), 2), jnp.ones(2),
                   jnp.asarray([0, 3], jnp.int32), jnp.ones(2), jnp.zeros(2), n_cand=8)
    alone = [_sample(jnp.asarray(lg)[None], jax.random.split(jax.random.key(1), 2)[i][None], jnp.ones(1),
                     jnp.asarray([k], jnp.int32), jnp.ones(1), jnp.zeros(1), n_cand=8)[0] for i, k in ((0, 0), (1, 3))]
    np.testing.assert_array_equal(np.asarray(both), np.asarray(alone))


def test_sampling_params_validated():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)


def test_context_overflow_is_an_error_or_truncates_left():
    cfg = gemmax.tiny_config("gemma", max_position_embeddings=32)
    lm = CausalLM.from_config(cfg, seed=5)
    long = np.arange(3, 33)
    with pytest.raises(ValueError, match="exceeds the model's context of 32"):
        lm.generate(long, max_new_tokens=8)
    out = lm.generate(np.concatenate([[2], long]), max_new_tokens=8, truncate="left")
    assert out[0] == 2 and len(out) == 32
    with pytest.raises(ValueError, match="leaves no room"):
        lm.generate(long[:5], max_length=3)


def test_max_length_counts_prompt():
    lm = CausalLM.from_config(gemmax.tiny_config("gemma3"), seed=6)
    assert len(lm.generate(np.array([3, 4, 5]), max_length=10)) == 10


def test_ring_cache_figure():
    cfg = gemmax.get_preset("gemma3_270m")
    f = cache_bytes_per_token(cfg, 32768)
    # 15 of 18 layers keep only 512 slots
    assert f["full"] == 2 * 256 * 2 * 18
    assert f["saving"] > 5
    tiny = gemmax.tiny_config("gemma3")
    eng = Engine(gm.init_params(tiny, jax.random.key(0)), tiny, max_batch=1, max_len=256)
    assert eng.cache["k_local"].shape[:3] == (6, 1, 8) and eng.cache["k_global"].shape[:3] == (1, 1, 256)


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "llama"])
@pytest.mark.parametrize("kernels", [False, True])
def test_prefill_logits_and_keys_equal_full_forward(family, kernels):
    """The prefill's last layer runs queries, attention output and MLP at each prompt's last position only
    (decoder_layer's q_rows): its logits must equal the full forward's at that position, per row of a
    mixed-length batch longer than the sliding window (its keys and values are checked by the greedy
    decode tests, which attend to them). Random non-zero norm scales, so (1 + w) norms are exercised."""
    from gemmax.models.gemma.decode import prefill

    cfg = gemmax.tiny_config(family)
    rng = np.random.default_rng(7)
    params = gm.unflatten({p: jnp.asarray(rng.normal(0, 0.3 if "norm" in p else 1 / np.sqrt(s.shape[-1]),
                                                     s.shape), jnp.float32)
                           for p, s in gm.param_specs(cfg).items()})
    lengths = [40, 13, 1]
    tokens = np.zeros((3, 40), np.int32)
    for i, n in enumerate(lengths):
        tokens[i, :n] = rng.integers(3, cfg.vocab_size, n)
    max_len = cfg.sliding_window or 64  # the local layers' ring is the window (an engine's is min(window, max_len))
    backend = "cpu" if kernels else "xla"
    logits, _ = jax.jit(lambda p, t, n: prefill(p, cfg, t, n, max_len, backend))(
        params, jnp.asarray(tokens), jnp.asarray(lengths, jnp.int32))
    full = np.asarray(jax.jit(lambda p, t: gm.forward(p, cfg, t))(params, jnp.asarray(tokens)))
    for i, n in enumerate(lengths):
        want = full[i, n - 1]  # (causal: the padding after a row's last token cannot change its logits)
        np.testing.assert_allclose(np.asarray(logits[i]), want, rtol=2e-4, atol=2e-4 * np.abs(want).max())


def test_fused_attention_path_equals_the_einsum_one():
    """The ``cudnn`` backend's call (``jax.nn.dot_product_attention``) gets the same masks, grouped heads and
    scale as gemmax's einsum attention: run through XLA's implementation of the same call on the CPU, a
    prompt's logits and caches are equal. On the CPU the engine never picks it."""
    from gemmax.models.base import CUDNN
    from gemmax.models.gemma import decode as gd
    from gemmax.nn.layers import dot_attention

    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((2, 5, 4, 8), (2, 7, 2, 8), (2, 7, 2, 8)))
    mask = jnp.asarray(rng.random((2, 5, 7)) > 0.4).at[:, :, 0].set(True)
    np.testing.assert_allclose(dot_attention(q, k, v, mask, implementation="xla"), dot_attention(q, k, v, mask),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="soft-cap"):
        dot_attention(q, k, v, mask, logit_cap=50.0, implementation="xla")
    # where cuDNN's kernel does not apply (here: no cuDNN at all) the einsum attention runs
    np.testing.assert_array_equal(dot_attention(q, k, v, mask, implementation="cudnn"), dot_attention(q, k, v, mask))
    cfg = gemmax.tiny_config("gemma3")  # sliding window and global layers, GQA
    lm = gemmax.CausalLM.from_config(cfg, seed=2)
    tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (2, 19)), jnp.int32)
    lengths = jnp.asarray([19, 11], jnp.int32)
    want = gd._prefill(lm.params, cfg, tokens, lengths, 16, False)
    got = gd._prefill(lm.params, cfg, tokens, lengths, 16, False, "xla")
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    engine = Engine(lm.params, cfg, max_batch=2, max_len=64)
    assert not engine.fused_attention and engine.prefill_backend != CUDNN
    # training: forward_hidden(attention=...) and its gradient, the same through the fused call
    seg = jnp.asarray([[1] * 19, [1] * 11 + [0] * 8], jnp.int32)

    def loss(p, attention):
        h = gm.forward_hidden(p, cfg, tokens, segment_ids=seg, attention=attention)
        return jnp.sum(jnp.sin(h) * (seg[..., None] > 0))

    for a, b in zip(jax.tree.leaves(jax.value_and_grad(loss)(lm.params, "xla")),
                    jax.tree.leaves(jax.value_and_grad(loss)(lm.params, None)), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
    from gemmax.train.optim import Precision, attention_choice

    assert attention_choice(lm.family, Precision.named("bfloat16")) == {}  # a CPU: the einsum attention
