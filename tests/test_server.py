"""The OpenAI-compatible server: the official client, streaming, continuous batching under concurrent load,
LoRA adapters by model name, stop strings, bad inputs, disconnects and auth — on a tiny random model served
by uvicorn on a loopback port."""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib
import json
import re
import time
from pathlib import Path

import httpx
import jax
import numpy as np
import pytest
from server_fixtures import serving
from spm_fixtures import train_tiny_sentencepiece

import gemmax
from gemmax.api import CausalLM
from gemmax.io.tokenizer import Tokenizer
from gemmax.models.gemma import model as gm
from gemmax.nn import lora
from gemmax.serve.server import _held_back, create_app, register_cli

openai = importlib.import_module("openai")
uvicorn = importlib.import_module("uvicorn")

KEY = "sk-test-key"
MAX_LEN = 128
LINES = [
    "The quick brown fox jumps over the lazy dog.",
    "Gemma is a family of lightweight open models.",
    "Hello world, hello tokenizer, hello server.",
    "Continuous batching shares one decode step between many requests.",
    "Numbers 0123456789 and symbols !?.,;:",
] * 20
PROMPTS = ["Hello world", "The quick brown fox", "Gemma is", "Numbers 42", "one decode step", "lazy dog."]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return train_tiny_sentencepiece(tmp_path_factory.mktemp("spm"), LINES, 160, add_dummy_prefix=False)


@pytest.fixture(scope="module")
def lm(tok: Tokenizer) -> CausalLM:
    cfg = gemmax.tiny_config("gemma3", vocab_size=tok.vocab_size)
    return CausalLM.from_config(cfg, seed=0, tokenizer=tok)


@pytest.fixture(scope="module")
def adapters(lm: CausalLM, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny LoRA adapters with non-zero B, saved as gemmax adapter folders."""
    out = {}
    for i, name in enumerate(("tiny-a", "tiny-b")):
        p = lora.add_lora(lm.params, lm.linear_nodes, rank=2, targets=("query", "value"), seed=i)
        flat = gm.flatten(p)
        rng = np.random.default_rng(10 + i)
        for k in flat:
            if k.endswith("lora_b"):
                flat[k] = jax.numpy.asarray(rng.normal(0, 0.5, flat[k].shape).astype(np.float32))
        out[name] = lora.save_adapter(tmp_path_factory.mktemp(name), gm.unflatten(flat), lm.linear_nodes)
    return out



@pytest.fixture(scope="module")
def server(lm: CausalLM, adapters: dict[str, Path]):
    app = create_app({"tiny": lm}, api_key=KEY, max_batch=8, chunk=4, max_len=MAX_LEN, adapters=adapters)
    with serving(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def url(server) -> str:
    return server[0]


@pytest.fixture(scope="module")
def client(url: str):
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def _expected(lm: CausalLM, prompts: list[str], n: int) -> list[str]:
    """What CausalLM.generate produces for each prompt, without the prompt; a generated end-of-turn is a
    stop token, which the server does not show."""
    outs = lm.generate(prompts, max_new_tokens=n)
    return [o[len(p):].removesuffix("<end_of_turn>") for p, o in zip(prompts, outs, strict=True)]


@pytest.fixture(scope="module")
def expected(lm: CausalLM) -> dict[str, str]:
    return dict(zip(PROMPTS, _expected(lm, PROMPTS, 12), strict=True))


def _stats(url: str) -> dict:
    return httpx.get(url + "/health", timeout=10).json()


# ---- the official client ------------------------------------------------------------------------------


def test_models_and_health(url: str, client) -> None:
    assert {m.id for m in client.models.list().data} == {"tiny", "tiny-a", "tiny-b"}
    h = _stats(url)
    assert h["status"] == "ok" and h["max_batch"] == 8


def test_completion_plain_and_stream(client, lm: CausalLM, tok: Tokenizer, expected: dict[str, str]) -> None:
    p = PROMPTS[0]
    r = client.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0)
    assert r.choices[0].text == expected[p]
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(tok.encode(p))
    assert 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == 12
    chunks = list(client.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected[p]
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_chat_plain_and_stream(client, lm: CausalLM, tok: Tokenizer) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"}]
    prompt = tok.apply_chat_template(msgs)
    want = _expected(lm, [prompt], 10)[0]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want
    assert r.usage.prompt_tokens == len(tok.encode(prompt))
    stream = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason


def test_sampling_is_seeded_and_n_choices(client) -> None:
    kw = dict(model="tiny", prompt="Gemma is", max_tokens=10, temperature=0.9, top_p=0.9, seed=7, n=2)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1]
    g = client.completions.create(model="tiny", prompt="Gemma is", max_tokens=10, temperature=0, n=3)
    assert len({c.text for c in g.choices}) == 1


def test_stop_strings(client, expected: dict[str, str]) -> None:
    p = next(p for p in PROMPTS if len(expected[p]) >= 8)
    full = expected[p]
    stop = full[3:6]
    want = full[: full.index(stop)]
    r = client.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0, stop=[stop, "§never§"])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0, stop=stop,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_held_back_suffix() -> None:
    assert _held_back("abc<en", ["<end>"]) == 3
    assert _held_back("abc", ["<end>"]) == 0
    assert _held_back("xx", ["xyz", "x"]) == 1


def test_lora_adapters_by_model_name(client, lm: CausalLM, adapters: dict[str, Path]) -> None:
    p = "Hello world"
    got = {}
    for name in ("tiny", "tiny-a", "tiny-b"):
        got[name] = client.completions.create(model=name, prompt=p, max_tokens=12, temperature=0).choices[0].text
    for name, path in adapters.items():
        nodes = lm.linear_nodes
        merged = CausalLM(lm.config, lora.merge_lora(lora.load_adapter(path, lm.params, nodes), nodes), lm.tokenizer)
        assert got[name] == _expected(merged, [p], 12)[0]
    assert len(set(got.values())) == 3


# ---- continuous batching under load --------------------------------------------------------------------


def test_concurrent_load_each_gets_its_own_answer(url: str, expected: dict[str, str]) -> None:
    """24 requests from 12 threads at once; the batch is shared, and every answer is the one the prompt
    gets alone."""
    before = _stats(url)
    jobs = [(PROMPTS[i % len(PROMPTS)], i % 3 == 0) for i in range(24)]

    def one(job: tuple[str, bool]) -> str:
        prompt, stream = job
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0, "stream": stream}
        with httpx.Client(timeout=30) as c:
            if not stream:
                r = c.post(url + "/v1/completions", json=body, headers=_auth())
                r.raise_for_status()
                return r.json()["choices"][0]["text"]
            text = ""
            with c.stream("POST", url + "/v1/completions", json=body, headers=_auth()) as r:
                for line in r.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        text += json.loads(line[6:])["choices"][0]["text"]
            return text

    t0 = time.time()
    with cf.ThreadPoolExecutor(12) as ex:
        futs = [ex.submit(one, j) for j in jobs]
        results = [f.result(timeout=max(1.0, 30 - (time.time() - t0))) for f in futs]
    assert time.time() - t0 < 30
    for (prompt, _), text in zip(jobs, results, strict=True):
        assert text == expected[prompt], prompt
    after = _stats(url)
    assert after["completed"] - before["completed"] == 24
    assert after["max_live"] > 1  # requests really shared decode steps
    assert after["live"] == 0 and after["queued"] == 0


SMALL_SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                "additionalProperties": False}
WORDS = "[a-z]{2,5}( [a-z]{2,5}){0,2}"


def _mixed_job(i: int) -> tuple[str, dict]:
    """Request ``i`` of the mixed load: (endpoint, body), cycling through the features the server offers."""
    prompt = PROMPTS[i % len(PROMPTS)]
    chat = {"messages": [{"role": "user", "content": prompt}]}
    kind = i % 8
    if kind == 0:
        return "completions", {"prompt": prompt, "max_tokens": 12, "temperature": 0}
    if kind == 1:
        return "completions", {"prompt": prompt, "max_tokens": 12, "temperature": 0, "stream": True}
    if kind == 2:
        return "chat/completions", {**chat, "max_tokens": 6, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    if kind == 3:  # the tiny vocabulary has letters but no JSON punctuation
        return "chat/completions", {**chat, "max_tokens": 24, "response_format": {"type": "regex", "regex": WORDS}}
    if kind == 4:
        return "completions", {"prompt": prompt, "max_tokens": 8, "n": 2, "seed": i, "temperature": 1.0}
    if kind == 5:
        return "completions", {"prompt": prompt, "max_tokens": 8, "presence_penalty": 1.0,
                               "frequency_penalty": 0.5, "logit_bias": {"5": 3}, "temperature": 0}
    if kind == 6:
        return "chat/completions", {**chat, "max_tokens": 8, "temperature": 0, "stream": True,
                                    "stream_options": {"include_usage": True}}
    return "completions", {"model": "tiny-a", "prompt": prompt, "max_tokens": 8, "temperature": 0, "stop": ["o"]}


def test_64_clients_with_mixed_features(url: str, expected: dict[str, str]) -> None:
    """64 clients at once on loopback, each with another mix of features (plain and streamed completions,
    chat with log-probabilities, a JSON schema, n=2 with seeds, penalties and logit bias, streamed chat with
    usage, an adapter with a stop string) sharing one continuous batch: every request gets a 200 and an
    answer that keeps its own contract, and the server ends with nothing live or queued."""
    import asyncio

    jobs = [_mixed_job(i) for i in range(64)]

    async def one(c: httpx.AsyncClient, path: str, body: dict) -> tuple[dict, list[dict]]:
        body = {"model": "tiny", **body}
        if not body.get("stream"):
            r = await c.post(f"{url}/v1/{path}", json=body, headers=_auth())
            assert r.status_code == 200, r.text
            return r.json(), []
        events = []
        async with c.stream("POST", f"{url}/v1/{path}", json=body, headers=_auth()) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    events.append(json.loads(line[6:]))
        return {}, events

    async def run() -> list[tuple[dict, list[dict]]]:
        limits = httpx.Limits(max_connections=70)
        async with httpx.AsyncClient(timeout=120, limits=limits) as c:
            return await asyncio.gather(*(one(c, p, b) for p, b in jobs))

    before = _stats(url)
    results = asyncio.run(run())
    for i, ((_, body), (resp, events)) in enumerate(zip(jobs, results, strict=True)):
        kind = i % 8
        prompt = body.get("prompt")
        if kind == 0:
            assert resp["choices"][0]["text"] == expected[prompt][: len(resp["choices"][0]["text"])]
        elif kind == 1:
            assert "".join(e["choices"][0]["text"] for e in events if e.get("choices")) == \
                expected[prompt][: sum(len(e["choices"][0]["text"]) for e in events if e.get("choices"))]
        elif kind == 2:
            lp = resp["choices"][0]["logprobs"]["content"]
            assert len(lp) == resp["usage"]["completion_tokens"] and all(len(x["top_logprobs"]) == 2 for x in lp)
        elif kind == 3:
            assert re.fullmatch(WORDS, resp["choices"][0]["message"]["content"]), resp
        elif kind == 4:
            assert sorted(c["index"] for c in resp["choices"]) == [0, 1]
        elif kind == 5:
            assert resp["choices"][0]["finish_reason"] in ("length", "stop")
        elif kind == 6:
            assert events[-1]["usage"]["completion_tokens"] >= 1
            assert any(e["choices"] and e["choices"][0]["delta"].get("content") for e in events)
        else:
            assert resp["model"] == "tiny-a" and "o" not in resp["choices"][0]["text"]
    after = _stats(url)
    assert after["completed"] - before["completed"] == 64 + 8  # n=2 requests count each choice
    assert after["max_live"] > 1 and after["live"] == 0 and after["queued"] == 0


def test_format_the_vocabulary_cannot_write_is_refused(url: str) -> None:
    """JSON asked of a tokenizer without ``{``: a 400 naming the problem, not an empty answer marked done."""
    fmt = {"type": "json_schema", "json_schema": {"name": "flag", "schema": SMALL_SCHEMA}}
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "response_format": fmt}
    r = httpx.post(url + "/v1/chat/completions", json=body, headers=_auth(), timeout=30)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "unwritable_format" and err["param"] == "response_format"
    assert "no token that can begin" in err["message"]


# ---- robustness ----------------------------------------------------------------------------------------

LONG = " ".join(["The quick brown fox jumps over the lazy dog."] * 40)

BAD = [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"model": "tiny"}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": [10**6]}, 400, "prompt"),
    ("/v1/completions", {"model": "nope", "prompt": "hi"}, 404, "model"),
    ("/v1/completions", {"model": 3, "prompt": "hi"}, 400, "model"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 10**6}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "temperature": 5}, 400, "temperature"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "n": 0}, 400, "n"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "stop": 5}, 400, "stop"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "seed": "x"}, 400, "seed"),
    ("/v1/completions", {"model": "tiny", "prompt": LONG}, 400, "prompt"),
    ("/v1/chat/completions", {"model": "tiny"}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages.[0].role"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": 7}]}, 400,
     "messages.[0].content"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "assistant", "content": "x"}]}, 400,
     "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": LONG}]}, 400, "messages"),
    ("/v1/nothing", {}, 404, None),
]


@pytest.mark.parametrize("path,body,status,param", BAD)
def test_bad_requests_get_openai_errors(url: str, path: str, body, status: int, param: str | None) -> None:
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(url + path, headers={**_auth(), "Content-Type": "application/json"}, timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param


def test_still_serving_after_bad_requests(client, expected: dict[str, str]) -> None:
    p = PROMPTS[1]
    assert client.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0).choices[0].text == \
        expected[p]


def test_api_key_required(url: str) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "hi"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url + "/v1/models").status_code == 401
    bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_client_disconnect_frees_slot(url: str, tok: Tokenizer) -> None:
    before = _stats(url)
    prompt = "Hello world"
    body = {"model": "tiny", "prompt": prompt, "max_tokens": MAX_LEN - len(tok.encode(prompt)), "temperature": 0,
            "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=30) as c, c.stream("POST", url + "/v1/completions", json=body,
                                                 headers=_auth()) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # one event, then hang up
    deadline = time.time() + 10
    while True:
        s = _stats(url)
        if s["live"] == 0 and s["cancelled"] > before["cancelled"]:
            break
        assert time.time() < deadline, s
        time.sleep(0.05)
    assert s["completed"] == before["completed"]  # it was cut short, not run to the end


# ---- CLI -----------------------------------------------------------------------------------------------


def test_register_cli() -> None:
    parser = argparse.ArgumentParser(prog="gemmax")
    register_cli(parser.add_subparsers(dest="cmd"))
    a = parser.parse_args(["serve", "--lora", "a=/x", "--lora", "b=/y", "--max-batch", "4"])
    assert (a.host, a.port, a.model, a.lora, a.max_batch) == ("127.0.0.1", 8000, None, ["a=/x", "b=/y"], 4)
    assert callable(a.func)


def test_chunk_adapts_to_step_time() -> None:
    from gemmax.serve.server import Scheduler

    s = Scheduler({}, chunk=8, max_chunk_s=0.5)
    assert s._n_steps("m") == 8  # not measured yet
    for t, n in ((0.001, 8), (0.1, 4), (0.2, 2), (1.0, 1)):
        s._tok_s["m"] = t
        assert s._n_steps("m") == n


@pytest.mark.parametrize("gather_ms", [500.0, 0.0])
def test_a_burst_of_arrivals_is_prefilled_together(lm: CausalLM, expected: dict[str, str], gather_ms: float) -> None:
    """Requests arriving 100 ms apart form one burst for a 500 ms gathering window: one prefill takes them all
    (a prefill reads every weight whatever its number of prompts). Without gathering the first is admitted at
    once and the others after it: several prefills. The answers are the same either way. (Windows far wider
    than the spacing, so that a loaded machine's delays cannot split the burst.)"""
    with pytest.raises(ValueError, match="gather_ms and max_gather_ms must be >= 0"):
        create_app({"tiny": lm}, gather_ms=-1)
    app = create_app({"tiny": lm}, max_batch=8, chunk=4, max_len=MAX_LEN, warmup=True, gather_ms=gather_ms,
                     max_gather_ms=5000)
    prompts = PROMPTS[:4]

    def one(i: int) -> str:
        time.sleep(0.1 * i)
        r = httpx.post(url + "/v1/completions", timeout=30, json={
            "model": "tiny", "prompt": prompts[i], "max_tokens": 12, "temperature": 0})
        r.raise_for_status()
        return r.json()["choices"][0]["text"]

    with serving(app) as url:
        before = _stats(url)
        with cf.ThreadPoolExecutor(len(prompts)) as ex:
            texts = list(ex.map(one, range(len(prompts))))
        after = _stats(url)
    assert texts == [expected[p] for p in prompts]
    prefills = after["prefills"] - before["prefills"]
    if gather_ms:
        assert prefills == 1
    else:
        assert prefills >= 2
