"""The sampling fields of the OpenAI API (logprobs, penalties, logit_bias, seed, n, stop, max_completion_tokens):
the sampler's processors against transformers' on the same logits, the engine against a full forward pass,
and the server through the official ``openai`` client on a tiny random model."""

from __future__ import annotations

import concurrent.futures as cf
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from server_fixtures import serving
from spm_fixtures import train_tiny_sentencepiece
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor, SequenceBiasLogitsProcessor

import gemmax
from gemmax.api import CausalLM
from gemmax.engine.constrain import token_text
from gemmax.engine.generate import adjust_logits
from gemmax.io.tokenizer import Tokenizer
from gemmax.serve.server import create_app

openai = importlib.import_module("openai")
uvicorn = importlib.import_module("uvicorn")

LINES = ["The quick brown fox jumps over the lazy dog.", "Hello world, hello tokenizer, hello server.",
         "Numbers 0123456789 and symbols !?.,;:"] * 20
PROMPT = "The quick brown fox"


# ---- the processors against transformers' ---------------------------------------------------------------


def _rows(rng: np.random.Generator, b: int, v: int) -> tuple[np.ndarray, list[list[int]], list[list[int]]]:
    logits = rng.normal(0, 3, (b, v)).astype(np.float32)
    prompts = [rng.integers(0, v, rng.integers(1, 8)).tolist() for _ in range(b)]
    outs = [rng.integers(0, v, rng.integers(0, 10)).tolist() for _ in range(b)]
    return logits, prompts, outs


def _extra(prompts: list[list[int]], outs: list[list[int]], v: int) -> dict[str, jax.Array]:
    seen = np.zeros((len(prompts), v), bool)
    counts = np.zeros((len(prompts), v), np.int32)
    for i, (p, o) in enumerate(zip(prompts, outs, strict=True)):
        seen[i, p + o] = True
        np.add.at(counts[i], o, 1)
    return {"seen": jnp.asarray(seen), "counts": jnp.asarray(counts)}


def test_processors_match_transformers_and_openai() -> None:
    rng = np.random.default_rng(0)
    b, v = 4, 64
    logits, prompts, outs = _rows(rng, b, v)
    rep = np.array([1.0, 1.3, 0.7, 2.0], np.float32)
    pres = np.array([0.0, 0.5, -1.0, 2.0], np.float32)
    freq = np.array([0.0, 0.25, 1.5, -0.5], np.float32)
    bias = [{}, {3: 5.0, 7: -100.0}, {0: 100.0}, {v - 1: -2.5}]
    st = {"repetition": jnp.asarray(rep), "presence": jnp.asarray(pres), "frequency": jnp.asarray(freq)}
    ids = np.full((b, 300), v, np.int32)
    vals = np.zeros((b, 300), np.float32)
    for i, d in enumerate(bias):
        ids[i, : len(d)], vals[i, : len(d)] = list(d), list(d.values())
    ex = {**_extra(prompts, outs, v), "bias_ids": jnp.asarray(ids), "bias_vals": jnp.asarray(vals)}
    got = np.asarray(adjust_logits(jnp.asarray(logits), st, ex))
    for i in range(b):
        x = torch.tensor(logits[i: i + 1])
        seq = torch.tensor([prompts[i] + outs[i]])
        if bias[i]:  # transformers' bias for one-token sequences, then its repetition penalty
            x = SequenceBiasLogitsProcessor([[[t], float(c)] for t, c in bias[i].items()])(seq, x)
        x = RepetitionPenaltyLogitsProcessor(float(rep[i]))(seq, x).numpy()[0]
        c = np.bincount(np.asarray(outs[i], int), minlength=v)  # OpenAI's presence / frequency formula
        want = x - c * freq[i] - (c > 0) * pres[i]
        np.testing.assert_allclose(got[i], want, rtol=1e-6, atol=1e-5)
    # one feature alone, with the others absent from the batch (a different compiled variant)
    only_rep = np.asarray(adjust_logits(jnp.asarray(logits), st, {"seen": ex["seen"]}))
    seq = torch.tensor([prompts[1] + outs[1]])
    np.testing.assert_allclose(only_rep[1], RepetitionPenaltyLogitsProcessor(1.3)(seq, torch.tensor(logits[1:2]))
                               .numpy()[0], rtol=1e-6)
    # the structured-output mask: bit t % 32 of word t // 32
    allowed = rng.random((b, v)) < 0.3
    words = np.zeros((b, (v + 31) // 32), np.uint32)
    for i, t in zip(*np.nonzero(allowed), strict=True):
        words[i, t // 32] |= np.uint32(1) << np.uint32(t % 32)
    masked = np.asarray(adjust_logits(jnp.asarray(logits), st, {"mask": jnp.asarray(words.view(np.int32))}))
    np.testing.assert_array_equal(np.isfinite(masked), allowed)
    np.testing.assert_array_equal(masked[allowed], logits[allowed])


# ---- the engine and the server on a tiny model ----------------------------------------------------------


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return train_tiny_sentencepiece(tmp_path_factory.mktemp("spm"), LINES, 120, add_dummy_prefix=False)


@pytest.fixture(scope="module")
def lm(tok: Tokenizer) -> CausalLM:
    cfg = gemmax.tiny_config("gemma3", vocab_size=tok.vocab_size)
    return CausalLM.from_config(cfg, seed=0, tokenizer=tok)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


PAD = 48  # every reference forward pass has this length (one compile); the model is causal


def _logits(lm: CausalLM, ids: list[int]) -> np.ndarray:
    """The model's next-token logits after each prefix of ``ids`` (row t: after ids[: t + 1])."""
    return np.asarray(lm.logits(np.array([ids + [0] * (PAD - len(ids))])))[0, : len(ids)]



@pytest.fixture(scope="module")
def url(lm: CausalLM):
    app = create_app({"tiny": lm}, max_batch=4, chunk=1, max_len=64)
    with serving(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(url: str):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def id_of(tok: Tokenizer) -> dict[str, int]:
    """Token text -> id (the tiny vocabulary's pieces are distinct texts), to read ids back from logprobs."""
    out = {token_text(tok, i).decode(): i for i in range(tok.vocab_size) if not tok.is_special(i)}
    assert len(out) == tok.vocab_size - len([i for i in range(tok.vocab_size) if tok.is_special(i)])
    return out


def test_logprobs_and_penalties_against_the_model(client, lm: CausalLM, tok: Tokenizer, id_of) -> None:
    """Greedy, with logprobs: each reported log-probability is ``log_softmax`` of the model's logits (a
    direct forward pass) and each token their argmax; with penalties, each token is the argmax of
    transformers' repetition processor plus OpenAI's presence / frequency formula over the same logits,
    while the reported log-probabilities stay the model's. The penalized and the free request run at once,
    sharing decode steps, and the free one is unchanged by its neighbour."""
    ids = tok.encode(PROMPT)
    n = 10
    base = dict(model="tiny", prompt=ids, max_tokens=n, temperature=0, logprobs=3, extra_body={"ignore_eos": True})
    pen = dict(base, presence_penalty=0.7, frequency_penalty=0.4,
               extra_body={"ignore_eos": True, "repetition_penalty": 1.8})
    alone = client.completions.create(**base).choices[0]
    with cf.ThreadPoolExecutor(2) as ex:
        fa, fb = ex.submit(client.completions.create, **base), ex.submit(client.completions.create, **pen)
        free, penal = fa.result().choices[0], fb.result().choices[0]
    assert free.text == alone.text and free.logprobs.token_logprobs == alone.logprobs.token_logprobs
    assert penal.text != free.text  # the penalties changed the output (the test can fail)
    for choice, penalized in ((free, False), (penal, True)):
        lp = choice.logprobs
        new = [id_of[t] for t in lp.tokens]
        assert len(new) == n and tok.decode(new) == choice.text
        full = _logits(lm, ids + new)[len(ids) - 1: -1]
        ref = _log_softmax(full)
        np.testing.assert_allclose(lp.token_logprobs, ref[np.arange(n), new], atol=1e-4)
        for t in range(n):
            top = np.argsort(-ref[t], kind="stable")[:3]
            assert lp.top_logprobs[t] == pytest.approx({token_text(tok, i).decode(): ref[t, i] for i in top},
                                                       abs=1e-4)
            x = full[t]
            if penalized:
                out = new[:t]
                x = RepetitionPenaltyLogitsProcessor(1.8)(torch.tensor([ids + out]), torch.tensor(x[None])).numpy()[0]
                c = np.bincount(np.asarray(out, int), minlength=x.shape[-1])
                x = x - 0.4 * c - 0.7 * (c > 0)
            assert x[new[t]] >= x.max() - 1e-4, (penalized, t)
        assert lp.text_offset == list(np.cumsum([0] + [len(x) for x in lp.tokens[:-1]]))
    streamed = list(client.completions.create(**pen, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == penal.text
    assert [x for c in streamed if c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs] == \
        penal.logprobs.token_logprobs


def test_chat_logprobs_and_stream(client, lm: CausalLM, tok: Tokenizer, id_of) -> None:
    msgs = [{"role": "user", "content": "Hello world"}]
    chat_ids = tok.encode(tok.apply_chat_template(msgs))
    kw = dict(model="tiny", messages=msgs, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2,
              extra_body={"ignore_eos": True})
    c = client.chat.completions.create(**kw).choices[0].logprobs.content
    new = [id_of[e.token] for e in c]
    ref = _log_softmax(_logits(lm, chat_ids + new)[len(chat_ids) - 1: -1])
    assert [e.bytes for e in c] == [list(token_text(tok, t)) for t in new]
    np.testing.assert_allclose([e.logprob for e in c], ref[np.arange(4), new], atol=1e-4)
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob == pytest.approx(e.logprob) for e in c)
    streamed = [e for ch in client.chat.completions.create(**kw, stream=True) if ch.choices and ch.choices[0].logprobs
                for e in ch.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in c]
    plain = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_logit_bias(client, tok: Tokenizer, id_of) -> None:
    """+100 forces a token at every step; -100 bans the greedy first token."""
    ids = tok.encode(PROMPT)
    base = dict(model="tiny", prompt=ids, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    t = tok.piece_to_id("fox")
    assert client.completions.create(**base, logit_bias={str(t): 100}).choices[0].text == tok.decode([t] * 6)
    first = client.completions.create(**dict(base, max_tokens=1), logprobs=0).choices[0].logprobs.tokens[0]
    banned = client.completions.create(**dict(base, max_tokens=1), logprobs=0, logit_bias={str(id_of[first]): -100})
    assert banned.choices[0].logprobs.tokens[0] != first


def test_seed_n_stop_and_max_completion_tokens(client, tok: Tokenizer, id_of) -> None:
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Hello"}], temperature=1.0, seed=11, n=3,
              max_completion_tokens=5, extra_body={"ignore_eos": True})
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1, 2] and a.usage.completion_tokens == 15
    assert len({c.message.content for c in a.choices}) > 1  # each choice its own stream (seed + index)
    # a stop string made of the end of one token and the start of the next
    base = dict(model="tiny", prompt=tok.encode(PROMPT), max_tokens=8, temperature=0,
                extra_body={"ignore_eos": True})
    full = client.completions.create(**base, logprobs=0).choices[0]
    pieces = full.logprobs.tokens
    j = next(j for j in range(2, 8) if pieces[j - 1].strip() and pieces[j].strip())
    stop = pieces[j - 1][-1] + pieces[j][0]
    r = client.completions.create(**base, stop=[stop])
    assert r.choices[0].text == full.text[: full.text.index(stop)] and r.choices[0].finish_reason == "stop"


BAD = [
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": "high"}, "frequency_penalty"),
    ({"repetition_penalty": -1}, "repetition_penalty"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"99999": 1}}, "logit_bias"),
    ({"logit_bias": [1, 2]}, "logit_bias"),
    ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": "yes"}, "logprobs"),
    ({"n": 17}, "n"),
    ({"seed": "x"}, "seed"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"stop": [""]}, "stop"),
]


@pytest.mark.parametrize("extra,param", BAD)
def test_bad_fields_get_400_and_the_server_keeps_serving(client, extra: dict, param: str) -> None:
    msgs = [{"role": "user", "content": "Hi"}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2, extra_body=extra)
    assert e.value.status_code == 400 and e.value.body["param"] == param, e.value.body
    assert client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2).choices[0].finish_reason


def test_completion_logprobs_bounds(client) -> None:
    for bad in (6, True):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny", prompt="Hi", max_tokens=2, logprobs=bad)
        assert e.value.body["param"] == "logprobs"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="Hi", max_tokens=2, logprobs=2, echo=True)
