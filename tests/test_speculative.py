"""Speculative decoding is exact: greedy output equals plain decoding token for token for both drafters, and
sampled output follows the model's processed distribution (chi-square against marginals enumerated from the
full forward, with an independent NumPy sampler); families that cannot verify blocks decode plainly."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import gemmax
from gemmax.api import CausalLM
from gemmax.engine.generate import Engine, Request, SamplingParams, generate_ids
from gemmax.engine.speculative import (
    DraftModel,
    PromptLookup,
    Speculator,
    processed_probs,
    row_supported,
    speculator_for,
)
from gemmax.models import recurrent_gemma
from gemmax.models.gemma import FAMILY as GEMMA

V = 16  # a tiny vocabulary: the sampled marginals can be enumerated exactly


@pytest.fixture(scope="module")
def models():
    """Target (3 layers: local, local, global with a 4-token window, so drafts cross the ring) and a
    different random drafter of the same vocabulary (they disagree often: both accept and reject paths run)."""
    cfg = gemmax.tiny_config("gemma3", num_layers=3, sliding_window=4, vocab_size=V)
    dcfg = gemmax.tiny_config("gemma3", num_layers=2, sliding_window=4, vocab_size=V, hidden_size=32)
    return cfg, GEMMA.init_params(cfg, jax.random.key(0)), dcfg, GEMMA.init_params(dcfg, jax.random.key(1))


@pytest.fixture(scope="module")
def plain(models):
    return _run(models)


PROMPTS = [[3, 4, 5, 6, 7, 8, 9, 3, 4, 5, 6, 7], [2, 11, 12, 13, 2, 11], [5, 5, 6, 5, 5, 6, 5, 5]]


def _run(models, speculator=None, sp=None, prompts=PROMPTS):
    cfg, params, _, _ = models
    sp = sp or [SamplingParams(max_new_tokens=14) for _ in prompts]
    return [r.new_ids for r in generate_ids(params, cfg, prompts, sp, family=GEMMA, speculator=speculator)]


@pytest.mark.parametrize("kind", ["lookup", "draft", "self"])
def test_greedy_equals_plain(models, plain, kind):
    cfg, params, dcfg, dparams = models
    drafter = {"lookup": PromptLookup(), "draft": DraftModel(dparams, dcfg, GEMMA),
               "self": DraftModel(params, cfg, GEMMA)}[kind]
    spec = Speculator(drafter, num_tokens=3)
    assert _run(models, spec) == plain
    st = spec.stats
    assert st["steps"] > 0 and st["drafted"] > 0
    assert st["emitted"] > st["steps"]  # several tokens per step: drafts were kept
    if kind == "self":  # the model as its own drafter: every draft is the argmax
        assert st["accepted"] == st["drafted"]
    if kind == "draft":  # a random drafter: some drafts rejected, so the correction path ran too
        assert st["accepted"] < st["drafted"]


# ---- the sampling test ---------------------------------------------------------------------------------

SETTINGS = dict(temperature=0.9, top_k=12, top_p=0.95, min_p=0.02)
N = 1024
NEW = 4


def _np_probs(logits: np.ndarray, temperature: float = SETTINGS["temperature"], top_k: int = SETTINGS["top_k"],
              top_p: float = SETTINGS["top_p"], min_p: float = SETTINGS["min_p"]) -> np.ndarray:
    """temperature, top-k, top-p, min-p over [..., V] logits, as transformers orders them (sort-based)."""
    v = logits.shape[-1]
    z = logits.astype(np.float64) / temperature
    order = np.argsort(-z, axis=-1, kind="stable")
    zs = np.take_along_axis(z, order, -1)
    rank = np.arange(v)
    keep = rank < (top_k or v)
    q = np.where(keep, np.exp(zs - zs[..., :1]), 0.0)
    q /= q.sum(-1, keepdims=True)
    cum = np.cumsum(q, -1)
    keep = keep & ((cum - q < top_p) | (rank == 0)) & (q >= min_p * q[..., :1])
    w = np.where(keep, np.exp(zs - zs[..., :1]), 0.0)
    out = np.zeros_like(w)
    np.put_along_axis(out, order, w / w.sum(-1, keepdims=True), -1)
    return out


def test_processed_distribution_matches_numpy():
    """Both paths of ``processed_probs`` (kept set within the 256 candidates, and past them) over a 1000-token
    vocabulary, against the sort-based reference; temperature 0 is one-hot."""
    rows = [(0.7, 0, 1.0, 0.0), (1.0, 40, 0.9, 0.0), (1.3, 0, 0.97, 0.0), (0.8, 600, 1.0, 0.01),
            (1.0, 0, 1.0, 0.05), (2.0, 300, 0.5, 0.0), (0.0, 5, 0.9, 0.0)]
    logits = np.random.default_rng(0).normal(0, 3, (len(rows), 1000)).astype(np.float32)
    t, k, p, m = (jnp.asarray(c) for c in zip(*rows, strict=True))
    got = np.asarray(processed_probs(jnp.asarray(logits), t, k, p, m))
    for i, (ti, ki, pi, mi) in enumerate(rows):
        want = np.eye(1000)[logits[i].argmax()] if ti == 0 else _np_probs(logits[i], ti, ki, pi, mi)
        np.testing.assert_allclose(got[i], want, atol=2e-6, err_msg=str(rows[i]))


@pytest.fixture(scope="module")
def marginals(models) -> list[np.ndarray]:
    """Exact distribution of each of the first NEW tokens after PROMPTS[0], by enumerating every
    continuation (one compiled forward: every batch right-padded to V**(NEW-1) rows of one length)."""
    cfg, params, _, _ = models
    fwd = jax.jit(lambda t: GEMMA.logits_from_hidden(params, cfg, GEMMA.forward_hidden(params, cfg, t)))
    prompt, rows = PROMPTS[0], V ** (NEW - 1)
    joint = {(): 1.0}  # prefix -> probability
    out = []
    for step in range(NEW):
        prefixes = list(joint)
        ids = np.zeros((rows, len(prompt) + NEW - 1), np.int32)
        for i, p in enumerate(prefixes):
            ids[i, : len(prompt) + step] = prompt + list(p)
        logits = np.asarray(fwd(jnp.asarray(ids)))[: len(prefixes), len(prompt) + step - 1]
        probs = _np_probs(logits)
        nxt = {}
        for p, row in zip(prefixes, probs, strict=True):
            for t in np.nonzero(row)[0]:
                nxt[p + (int(t),)] = joint[p] * row[t]
        joint = nxt
        m = np.zeros(V)
        for p, w in joint.items():
            m[p[-1]] += w
        out.append(m)
    return out


def _chi2_p(counts: np.ndarray, probs: np.ndarray) -> float:
    exp = probs * counts.sum()
    big = exp >= 5  # pool the rare cells so the chi-square approximation holds
    obs = np.append(counts[big], counts[~big].sum())
    ex = np.append(exp[big], exp[~big].sum())
    if ex[-1] == 0:
        obs, ex = obs[:-1], ex[:-1]
    assert counts[probs == 0].sum() == 0, "a token outside the processed distribution's support was sampled"
    return float(stats.chisquare(obs, ex).pvalue)


@pytest.mark.parametrize("kind", ["lookup", "draft"])
def test_sampling_follows_the_processed_distribution(models, marginals, kind):
    cfg, params, dcfg, dparams = models
    prompt = PROMPTS[0]
    spec = Speculator(PromptLookup() if kind == "lookup" else DraftModel(dparams, dcfg, GEMMA), num_tokens=2)
    sp = [SamplingParams(**SETTINGS, seed=i, max_new_tokens=NEW) for i in range(N)]
    reqs = generate_ids(params, cfg, [prompt] * N, sp, family=GEMMA, speculator=spec)
    toks = np.asarray([r.new_ids for r in reqs])
    assert toks.shape == (N, NEW)
    st = spec.stats
    assert 0 < st["accepted"] < st["drafted"]  # acceptance and the residual draw both exercised
    # positions 2.. come from speculative steps (the first from the prefill)
    for i, m in enumerate(marginals[1:], start=1):
        p = _chi2_p(np.bincount(toks[:, i], minlength=V), m)
        assert p > 1e-3, (kind, i, p)


# ---- fallbacks and errors ----------------------------------------------------------------------------


def test_recurrent_family_decodes_plainly():
    cfg = recurrent_gemma.tiny_config()
    params = jax.eval_shape(lambda: recurrent_gemma.FAMILY.init_params(cfg, jax.random.key(0)))
    spec = Speculator(PromptLookup())
    eng = Engine(params, cfg, max_batch=2, max_len=32, family=recurrent_gemma.FAMILY, speculator=spec)
    eng.requests[0] = Request([1, 2, 3], SamplingParams())  # a live row
    assert spec.reason and "recurrent_gemma" in spec.reason
    assert not spec.applies(eng)  # so Engine.step takes the plain decode chunk


@dataclasses.dataclass
class _Penalised(SamplingParams):
    """A row with a sampling field speculation does not model (as a penalty or grammar would add)."""

    repetition_penalty: float = 1.0


def test_rows_with_unmodelled_sampling_decode_plainly(models):
    assert row_supported(SamplingParams(temperature=0.7, top_k=5))
    assert row_supported(_Penalised()) and not row_supported(_Penalised(repetition_penalty=1.3))
    spec = Speculator(PromptLookup(), num_tokens=3)
    sp = [_Penalised(max_new_tokens=8, repetition_penalty=1.3)] + [SamplingParams(max_new_tokens=8)] * 2
    assert _run(models, spec, sp) == _run(models, None, sp)
    assert spec.stats["steps"] == 0


def test_prompt_lookup_proposals():
    pl = PromptLookup(max_ngram=3)
    assert pl.propose([1, 2, 3, 4, 5, 1, 2, 3], 2) == [4, 5]
    assert pl.propose([1, 2, 3, 9, 1, 2, 3, 7, 2, 3], 3) == [7, 2, 3]  # the latest earlier match of "2 3"
    assert pl.propose([1, 2, 3], 4) == []
    assert pl.propose([5, 6, 5], 0) == []
    with pytest.raises(ValueError, match="min_ngram"):
        PromptLookup(max_ngram=1, min_ngram=2)


def test_bad_drafters(models):
    cfg, params, _, _ = models
    other = gemmax.tiny_config("gemma3", num_layers=2, vocab_size=V + 1)
    with pytest.raises(ValueError, match="vocabulary"):
        Engine(params, cfg, max_batch=1, max_len=32, family=GEMMA,
               speculator=Speculator(DraftModel(None, other, GEMMA)))
    with pytest.raises(ValueError, match="not both"):
        speculator_for(draft=object(), prompt_lookup=True)
    with pytest.raises(TypeError, match="CausalLM"):
        speculator_for(draft=object())
    with pytest.raises(ValueError, match="at least 1"):
        Speculator(PromptLookup(), num_tokens=-1)


def test_causal_lm_generate_takes_drafters(models, plain):
    cfg, params, dcfg, dparams = models
    lm, draft = CausalLM(cfg, params), CausalLM(dcfg, dparams)
    ids = [np.asarray(p, np.int32) for p in PROMPTS]  # the shapes of the tests above: nothing new to compile
    for kw in (dict(prompt_lookup=True, speculate_tokens=3), dict(draft=draft, speculate_tokens=3)):
        out = lm.generate(ids, max_new_tokens=14, **kw)
        assert [list(o[len(p):]) for o, p in zip(out, PROMPTS, strict=True)] == plain


def test_server_speculates_and_caches_prefixes(tmp_path):
    """``gemmax serve --speculate prompt-lookup`` with a prefix cache: the same greedy text as
    ``lm.generate``, with speculative steps taken and the second request's prompt prefix reused."""
    from fastapi.testclient import TestClient
    from spm_fixtures import train_tiny_sentencepiece

    from gemmax.serve.server import create_app

    lines = ["the cat sat on the mat and the dog sat on the log"] * 30
    tok = train_tiny_sentencepiece(tmp_path, lines, 40, add_dummy_prefix=False)
    lm = CausalLM.from_config(gemmax.tiny_config("gemma3", num_layers=3, vocab_size=tok.vocab_size), tokenizer=tok)
    prompt = " ".join(lines[:4])
    assert len(tok.encode(prompt)) > 40  # past the cache's 32-token block
    want = lm.generate(prompt, max_new_tokens=10)[len(prompt):].removesuffix("<end_of_turn>")
    app = create_app({"tiny": lm}, max_batch=2, chunk=4, max_len=128, speculate="prompt-lookup",
                     prefix_cache_mb=1)
    with TestClient(app) as c:
        for _ in range(2):
            r = c.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 10,
                                                "temperature": 0})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == want
    m = app.state.models["tiny"]
    assert m.speculator.stats["steps"] > 0
    assert m.prefix_cache.hit_tokens >= 32
