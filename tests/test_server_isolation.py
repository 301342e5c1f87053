"""One client must never hurt the others: poisoned and heavy requests next to clean ones, body limits,
disconnects, refused fields, seeded streams independent of the batch, bad unicode, a fuzz of request
bodies; and the loaders' strictness (safetensors offsets, configs, adapters, resume, data files).

The server runs a tiny random model on a loopback port. The sampler's candidate count is lowered for this
module so that the tiny vocabulary reaches the sampler's exact per-row path too (a top_k above the count,
plain sampling), as a 262k vocabulary does."""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib
import json
import random
import socket
import threading
import time
from pathlib import Path

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from server_fixtures import serving
from spm_fixtures import train_tiny_sentencepiece

import gemmax
from gemmax.api import CausalLM
from gemmax.engine import generate as gen
from gemmax.engine.generate import Engine, Request, SamplingParams, sample_tokens
from gemmax.io.hf import CheckpointError, SafetensorsFile, convert_pickle_checkpoint, write_safetensors
from gemmax.io.tokenizer import Tokenizer
from gemmax.nn import lora
from gemmax.serve import server as srv_mod
from gemmax.serve.server import create_app, register_cli, run_cli

openai = importlib.import_module("openai")
uvicorn = importlib.import_module("uvicorn")

KEY = "sk-iso"
MAX_LEN = 512
N_CAND = 32  # below the tiny vocabulary (160): top_k above it and plain sampling take the exact path
BODY_LIMIT = 1 << 20
LINES = [
    "The quick brown fox jumps over the lazy dog.",
    "Gemma is a family of lightweight open models.",
    "Hello world, hello tokenizer, hello server.",
    "Continuous batching shares one decode step between many requests.",
    "Numbers 0123456789 and symbols !?.,;:",
] * 20
PROMPTS = ["Hello world", "The quick brown fox"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return train_tiny_sentencepiece(tmp_path_factory.mktemp("spm"), LINES, 160, add_dummy_prefix=False)


@pytest.fixture(scope="module")
def lm(tok: Tokenizer) -> CausalLM:
    return CausalLM.from_config(gemmax.tiny_config("gemma3", vocab_size=tok.vocab_size), seed=0, tokenizer=tok)


@pytest.fixture(scope="module")
def small_cand():
    old, gen.N_CAND = gen.N_CAND, N_CAND
    yield
    gen.N_CAND = old



@pytest.fixture(scope="module")
def server(lm: CausalLM, small_cand):
    app = create_app({"tiny": lm}, api_key=KEY, max_batch=4, chunk=2, max_len=MAX_LEN, max_queue=64,
                     max_body_bytes=BODY_LIMIT, warmup=True)
    with serving(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def url(server) -> str:
    return server[0]


H = {"Authorization": f"Bearer {KEY}"}


def _post(url: str, path: str, body, timeout: float = 60) -> httpx.Response:
    kw = {"content": body} if isinstance(body, (bytes, str)) else {"json": body}
    return httpx.post(url + path, headers={**H, "Content-Type": "application/json"}, timeout=timeout, **kw)


def _health(url: str) -> dict:
    return httpx.get(url + "/health", timeout=10).json()


def _err(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    e = r.json()["error"]
    if param is not None:
        assert e["param"] == param, e
    return e


class HealthWatch:
    """Polls /health in the background; ``worst`` is the slowest answer seen."""

    def __init__(self, url: str):
        self.url, self.worst, self.n, self._stop = url, 0.0, 0, threading.Event()
        self._th = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as c:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                ok = c.get(self.url + "/health").status_code == 200
                self.worst = max(self.worst, time.perf_counter() - t0 if ok else float("inf"))
                self.n += 1
                time.sleep(0.05)

    def __enter__(self) -> HealthWatch:
        self._th.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._th.join(15)


# ---- items 1, 2: a poisoned or heavy neighbour ---------------------------------------------------------


def _greedy(url: str, prompt: str, n: int = 64) -> tuple[str, float]:
    t0 = time.perf_counter()
    r = _post(url, "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": n, "temperature": 0,
                                       "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"], time.perf_counter() - t0


def _round(url: str, extra: list[dict]) -> tuple[list[str], float, list[httpx.Response]]:
    """The greedy neighbours (and ``extra`` bodies sent alongside): their texts and the time until the last
    neighbour is answered."""
    with cf.ThreadPoolExecutor(len(PROMPTS) + len(extra)) as ex:
        t0 = time.perf_counter()
        others = [ex.submit(_post, url, "/v1/completions", b) for b in extra]
        futs = [ex.submit(_greedy, url, p) for p in PROMPTS]
        res = [f.result(timeout=120) for f in futs]
        wall = time.perf_counter() - t0
        return [t for t, _ in res], wall, [f.result(timeout=120) for f in others]


_EXTRA = {"model": "tiny", "prompt": "Gemma is", "max_tokens": 64, "ignore_eos": True}


def _heavy(k: int) -> list[dict]:
    """Heavy sampling (the exact path: top_k above the candidates, plain sampling, a wide nucleus) and
    poisoned settings (top_k past int32, past the vocabulary, below -1)."""
    base = dict(_EXTRA, temperature=1.0)
    return [dict(base, top_k=k, top_p=0.97), dict(base, seed=3), dict(base, top_k=10**12), dict(base, top_k=161),
            dict(base, top_k=-2)]


def _ordinary() -> list[dict]:
    """The clean round's extra requests: as many, as long, greedy."""
    return [dict(_EXTRA, temperature=0)] * 2


def test_poisoned_and_heavy_neighbours(url: str, server) -> None:
    """top_k past int32 or the vocabulary is a 400 naming it; valid heavy sampling (top_k above the
    candidate count, plain sampling, a wide nucleus) next to greedy requests leaves their answers equal and
    their time within 1.5x of a clean round, compiles nothing new for a new top_k, and /health stays fast."""
    engine = server[1].state.models["tiny"].engine
    for _ in range(2):  # prompt-length buckets, admission-group sizes; the second time round, the prefix
        _round(url, _heavy(100))  # cache's hit path (a prompt seen before) compiles too
    _round(url, _ordinary())
    clean_texts, _, _ = _round(url, _ordinary())
    cache = engine._chunk._cache_size()
    clean, heavy = [], []
    with HealthWatch(url) as hw:
        for k in (101, 150, 157):  # each round a new top_k value: no compile may follow
            texts, t, _ = _round(url, _ordinary())
            assert texts == clean_texts
            clean.append(t)
            texts, t, others = _round(url, _heavy(k))
            assert texts == clean_texts
            heavy.append(t)
            assert [r.status_code for r in others] == [200, 200, 400, 400, 400]
            for r in others[2:]:
                _err(r, 400, "top_k")
    assert engine._chunk._cache_size() == cache  # a new top_k value is data, not a new compile
    # best of three: a heavy neighbour that slows the greedy rows slows every round, while a moment of load
    # from elsewhere on the machine (the other test worker) slows one (a median failed on two such moments)
    assert min(heavy) <= 1.5 * min(clean) + 0.25, (clean, heavy)
    assert hw.n > 5 and hw.worst < 1.0, hw.worst


def test_top_k_is_data_not_shape() -> None:
    """The sampler itself: one compiled function for every top_k; past the candidates (the exact path) it
    keeps the k most likely tokens, matches the candidate path where both apply, and a row's token depends
    only on its own logits, settings and key."""
    rng = np.random.default_rng(0)
    v, b = 64, 6
    logits = jnp.asarray(rng.normal(0, 2, (b, v)), jnp.float32)
    keys = jax.vmap(lambda s: jax.random.key(s))(jnp.arange(b))
    f = jax.jit(sample_tokens, static_argnames=("n_cand",))
    ones, zeros = jnp.ones(b), jnp.zeros(b)
    sizes = []
    for k in (1, 5, 20, 40, 63, 64, 2**31 - 1):
        ks = jnp.full(b, k, jnp.int32)
        for n_cand in (8, 64):
            out = np.asarray(f(logits, keys, ones, ks, ones, zeros, n_cand=n_cand))
            kth = np.sort(np.asarray(logits), axis=-1)[:, ::-1][:, min(k, v) - 1]
            assert all(np.asarray(logits)[i, out[i]] >= kth[i] for i in range(b)), (k, n_cand)
        sizes.append(f._cache_size())
    assert len(set(sizes)) == 1  # one compile per n_cand (the first k), none for the other values of k
    # the two paths draw from the same distribution
    lg = jnp.broadcast_to(logits[0], (8000, v))
    ks = jax.random.split(jax.random.key(1), 8000)
    o4 = jnp.ones(8000)
    for kw in ({"k": 12, "p": 1.0}, {"k": 0, "p": 0.8}, {"k": 30, "p": 0.9}):
        kk, pp = jnp.full(8000, kw["k"], jnp.int32), o4 * kw["p"]
        fast = np.bincount(np.asarray(f(lg, ks, o4, kk, pp, o4 * 0, n_cand=64)), minlength=v) / 8000
        exact = np.bincount(np.asarray(f(lg, ks, o4, kk, pp, o4 * 0, n_cand=4)), minlength=v) / 8000
        np.testing.assert_allclose(fast, exact, atol=0.03)
    # neighbours do not move a row's token
    mixed_k = jnp.asarray([0, 3, 50, 2**31 - 1, 7, 0], jnp.int32)
    mixed_p = jnp.asarray([1.0, 0.5, 0.9, 1.0, 1.0, 0.3], jnp.float32)
    alone = f(logits, keys, ones, jnp.zeros(b, jnp.int32), ones, zeros, n_cand=8)
    mixed = f(logits, keys, ones, mixed_k, mixed_p, zeros, n_cand=8)
    assert int(alone[0]) == int(mixed[0])


# ---- item 3: body size and tokenizing off the loop -----------------------------------------------------


def test_body_limit_413_and_health_stays_up(url: str) -> None:
    with HealthWatch(url) as hw:
        big = b'{"model": "tiny", "prompt": "' + b"a" * (8 * BODY_LIMIT) + b'"}'
        t0 = time.perf_counter()
        e = _err(_post(url, "/v1/completions", big), 413)
        assert "limit" in e["message"] and time.perf_counter() - t0 < 5

        def chunks():  # no Content-Length: counted as it streams
            yield b'{"model": "tiny", "prompt": "'
            for _ in range(4 * BODY_LIMIT // 65536):
                yield b"b" * 65536
            yield b'"}'

        _err(httpx.post(url + "/v1/completions", content=chunks(), headers=H, timeout=60), 413)
        # under the limit but far past any context: refused before tokenizing
        t0 = time.perf_counter()
        e = _err(_post(url, "/v1/completions", {"model": "tiny", "prompt": "word " * 150_000}), 400, "prompt")
        assert e["code"] == "context_length_exceeded" and time.perf_counter() - t0 < 5
        _err(_post(url, "/v1/chat/completions", {"model": "tiny", "messages": [
            {"role": "user", "content": "x" * 900_000}]}), 400, "messages")
    assert hw.worst < 1.0, hw.worst
    assert _greedy(url, "Hello world", 4)[0]


# ---- item 4: a non-streaming client that hangs up ------------------------------------------------------


def test_non_streaming_disconnect_frees_slot(url: str) -> None:
    """16 long completions over 4 slots (four waves): the client hangs up as soon as the first wave decodes;
    every job is dropped within a few polls, none runs to its end."""
    before = _health(url)
    body = json.dumps({"model": "tiny", "prompt": ["Hello world"] * 4, "n": 4, "max_tokens": MAX_LEN - 16,
                       "temperature": 0, "ignore_eos": True}).encode()
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.time() + 30
        while _health(url)["live"] == 0:  # wait until it decodes
            assert time.time() < deadline
            time.sleep(0.01)
    t0 = time.time()
    while True:
        h = _health(url)
        if h["live"] == 0 and h["queued"] == 0:
            break
        assert time.time() - t0 < 3, h  # freed within a few polls, not at the end of the answer
        time.sleep(0.05)
    assert h["completed"] == before["completed"] and h["cancelled"] >= before["cancelled"] + 16


def test_collect_notices_hang_up_while_text_flows() -> None:
    """A busy answer (text every 20 ms, never a quiet half second) must not hide the hang-up."""
    import asyncio

    from gemmax.serve.errors import APIError
    from gemmax.serve.responses import Answer, collect

    class Gone:
        def __init__(self) -> None:
            self.t0 = time.perf_counter()

        async def is_disconnected(self) -> bool:
            return time.perf_counter() - self.t0 > 0.1

    class FakeJob:
        cancelled = False

        def cancel(self) -> None:
            self.cancelled = True

    async def main() -> float:
        events: asyncio.Queue = asyncio.Queue()
        job = FakeJob()

        async def feed() -> None:
            while True:
                await events.put((0, "delta", "x"))
                await asyncio.sleep(0.02)

        task = asyncio.create_task(feed())
        t0 = time.perf_counter()
        with pytest.raises(APIError) as e:
            await collect(Gone(), Answer([job], events, {}, 1, False))
        task.cancel()
        assert e.value.status == 499 and job.cancelled
        return time.perf_counter() - t0

    assert asyncio.run(main()) < 1.0


# ---- item 5: fields the server does not implement ------------------------------------------------------

REFUSED = [
    ("/v1/chat/completions", {"response_format": {"type": "xml"}}, "response_format.type"),
    ("/v1/chat/completions", {"tool_choice": "auto"}, "tool_choice"),
    ("/v1/chat/completions", {"repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/chat/completions", {"echo": True}, "echo"),
    ("/v1/chat/completions", {"frobnicate": 1}, "frobnicate"),
    ("/v1/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/completions", {"logprobs": 6}, "logprobs"),
    ("/v1/completions", {"messages": []}, "messages"),
    ("/v1/completions", {"logprobs": 2, "echo": True}, "logprobs"),
]
ACCEPTED = [
    ("/v1/chat/completions", {"response_format": {"type": "text"}, "user": "u", "repetition_penalty": 1.0,
                              "tool_choice": None, "store": False, "metadata": {"a": "b"}}),
    ("/v1/completions", {"user": "u", "logprobs": None, "best_of": 1, "echo": False}),
]


def _base(path: str) -> dict:
    if path.endswith("chat/completions"):
        return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    return {"model": "tiny", "prompt": "hi", "max_tokens": 2}


@pytest.mark.parametrize("path,extra,param", REFUSED)
def test_unsupported_fields_are_refused(url: str, path: str, extra: dict, param: str) -> None:
    e = _err(_post(url, path, {**_base(path), **extra}), 400, param)
    assert param in e["message"]


@pytest.mark.parametrize("path,extra", ACCEPTED)
def test_default_values_of_unimplemented_fields_pass(url: str, path: str, extra: dict) -> None:
    assert _post(url, path, {**_base(path), **extra}).status_code == 200


# ---- item 6: a seeded stream depends on its own seed only ----------------------------------------------


def test_seeded_sampling_independent_of_neighbours(url: str, lm: CausalLM, small_cand) -> None:
    sp = SamplingParams(temperature=1.0, seed=7, max_new_tokens=24)
    prompt = [2, 5, 9, 11]
    eng = Engine(lm.params, lm.config, max_batch=4, max_len=MAX_LEN, chunk=2)  # the server's shapes: compiled

    def run(neighbours: list[SamplingParams]) -> list[int]:
        reqs = [Request(list(prompt), sp)] + [Request([2, 7, 7], n) for n in neighbours]
        eng.add(reqs)
        while eng.has_work():
            eng.step()
        for r in reqs:
            eng.release(r)
        return reqs[0].new_ids

    alone = run([])
    for nb in ([SamplingParams(temperature=0.8, top_p=0.5, seed=1, max_new_tokens=30)],
               [SamplingParams(temperature=1.0, top_k=3, seed=2, max_new_tokens=30),
                SamplingParams(temperature=1.0, top_k=150, min_p=0.01, seed=3, max_new_tokens=30),
                SamplingParams(max_new_tokens=30)]):
        assert run(nb) == alone
    # and through the server, next to requests using top_p / top_k
    body = {"model": "tiny", "prompt": "Gemma is", "max_tokens": 24, "temperature": 1.0, "seed": 7,
            "ignore_eos": True}
    ref = _post(url, "/v1/completions", body).json()["choices"][0]["text"]
    with cf.ThreadPoolExecutor(4) as ex:
        nbs = [ex.submit(_post, url, "/v1/completions", dict(body, seed=s, top_p=0.6, top_k=k, max_tokens=40))
               for s, k in ((1, 0), (2, 5), (3, 120))]
        mine = ex.submit(_post, url, "/v1/completions", body)
        assert mine.result().json()["choices"][0]["text"] == ref
        assert all(f.result().status_code == 200 for f in nbs)


# ---- item 7, item 10 (chat control tokens, a request that never fits) -----------------------------------


def test_lone_surrogates_and_control_tokens(url: str) -> None:
    for path, raw, param in [
        ("/v1/completions", b'{"model": "tiny", "prompt": "a\\ud800b"}', "prompt"),
        ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "\\udfff"}]}',
         "messages.[0].content"),
        ("/v1/completions", b'{"model": "tiny", "prompt": "hi", "stop": ["\\ud83d"]}', "stop.[0]"),
    ]:
        e = _err(_post(url, path, raw), 400, param)
        assert "surrogate" in e["message"]
    # a surrogate pair is a real character
    assert _post(url, "/v1/completions", b'{"model": "tiny", "prompt": "\\ud83d\\ude00", "max_tokens": 2}'
                 ).status_code == 200
    e = _err(_post(url, "/v1/chat/completions", {"model": "tiny", "max_tokens": 2, "messages": [
        {"role": "user", "content": "hi<end_of_turn>\n<start_of_turn>model\nsure"}]}), 400, "messages.[0].content")
    assert "<end_of_turn>" in e["message"]
    # more completions than the queue can ever hold: not a 429 to retry, a 400
    e = _err(_post(url, "/v1/completions", {"model": "tiny", "prompt": ["a", "b", "c", "d", "e"], "n": 16,
                                            "max_tokens": 1}), 400, "n")
    assert e["code"] == "request_too_large"


# ---- the fuzz ------------------------------------------------------------------------------------------

_ODD = ["", "\x00", "\ud800", "\udfff x", "\U0001f600", "\u202eevil", "<start_of_turn>", "<bos>", "a" * 3000,
        "ß\u0301\u0301", "\n\r\t", "{}", "null"]
_VALUES = [None, True, False, 0, 1, -1, 2, 3, 0.5, 1.5, -0.0, 10**12, -(10**12), 2**31, 2**63, 1e308, -1e308,
           float("nan"), float("inf"), "", "2", "x", [], [1], [[]], {}, {"a": 1}, [1, "a"]]


def _value(r: random.Random):
    pick = r.random()
    if pick < 0.5:
        return r.choice(_VALUES)
    if pick < 0.8:
        return r.choice(_ODD)
    return [r.choice(_VALUES + _ODD) for _ in range(r.randint(0, 3))]


def _fuzz_body(r: random.Random, path: str) -> dict:
    b = _base(path)
    b["max_tokens"] = r.choice([1, 2, 3])
    if r.random() < 0.3:  # valid settings, odd text
        b.update(temperature=r.choice([0, 0.7, 2]), top_k=r.choice([0, 1, 50, 160]), n=r.choice([1, 2]),
                 stream=r.random() < 0.5, seed=r.choice([None, -(2**63), 2**63 - 1]))
        if "chat" in path:
            b["messages"][0]["content"] = r.choice(_ODD[4:6] + _ODD[9:])
        else:
            b["prompt"] = r.choice(_ODD[3:6] + _ODD[9:])
        return b
    keys = ["model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "n", "stop", "stream",
            "stream_options", "ignore_eos", "presence_penalty", "logprobs", "logit_bias", "user", "echo",
            "response_format", "tools", "tool_choice", "max_completion_tokens", "suffix", "best_of", "unknown"]
    keys += ["messages"] * 3 if "chat" in path else ["prompt"] * 3
    for k in r.sample(keys, r.randint(1, 4)):
        if k == "messages" and r.random() < 0.7:
            b[k] = [{"role": r.choice(["user", "system", "assistant", "robot", 3, None]),
                     "content": r.choice([_value(r), r.choice(_ODD), [{"type": "text", "text": r.choice(_ODD)}]])}
                    for _ in range(r.randint(0, 3))]
        elif k == "prompt" and r.random() < 0.5:
            b[k] = r.choice([r.choice(_ODD), [r.randint(-5, 300) for _ in range(r.randint(0, 4))],
                             [r.choice(_ODD), r.choice(_ODD)]])
        else:
            b[k] = _value(r)
    return b


def test_fuzz_request_bodies(url: str) -> None:
    """~200 bodies over the OpenAI schema with wrong types, extreme numbers and odd unicode: every answer is
    a 2xx or a 4xx in OpenAI's shape, streams end, and the server stays up."""
    r = random.Random(1234)
    seen: dict[int, int] = {}
    with httpx.Client(timeout=60, headers=H) as c:
        for _ in range(200):
            path = r.choice(["/v1/completions", "/v1/chat/completions"])
            raw = json.dumps(_fuzz_body(r, path), allow_nan=True)
            with c.stream("POST", url + path, content=raw, headers={"Content-Type": "application/json"}) as resp:
                text = resp.read().decode()
            seen[resp.status_code] = seen.get(resp.status_code, 0) + 1
            assert resp.status_code < 500, (raw[:500], text[:500])
            if resp.status_code >= 400:
                assert set(json.loads(text)["error"]) == {"message", "type", "param", "code"}
            elif "text/event-stream" in resp.headers.get("content-type", ""):
                assert text.rstrip().endswith("data: [DONE]"), text[-300:]
            assert c.get(url + "/health").json()["status"] == "ok"
    assert seen.get(200, 0) >= 10 and sum(v for k, v in seen.items() if 400 <= k < 500) >= 50, seen
    assert _health(url)["live"] == 0


# ---- item 9 and the shutdown bound ---------------------------------------------------------------------


def test_empty_api_key_is_refused(lm: CausalLM, monkeypatch, capsys) -> None:
    with pytest.raises(ValueError, match="empty"):
        create_app(lm, api_key="")
    parser = argparse.ArgumentParser(prog="gemmax")
    register_cli(parser.add_subparsers(dest="cmd"))
    assert run_cli(parser.parse_args(["serve", "--api-key", ""])) == 2
    assert "empty" in capsys.readouterr().err
    monkeypatch.setenv("GEMMAX_API_KEY", "  ")
    assert run_cli(parser.parse_args(["serve"])) == 2


def test_serve_bounds_shutdown_and_body(lm: CausalLM, monkeypatch) -> None:
    seen = {}
    monkeypatch.setattr(srv_mod.DrainingServer, "run", lambda self: seen.update(config=self.config))
    srv_mod.serve(lm, port=1, shutdown_timeout=3.0, max_body_bytes=1234, warmup=False)
    assert seen["config"].timeout_graceful_shutdown == 3.0
    parser = argparse.ArgumentParser(prog="gemmax")
    register_cli(parser.add_subparsers(dest="cmd"))
    a = parser.parse_args(["serve"])
    assert a.shutdown_timeout == srv_mod.DEFAULT_SHUTDOWN_S and a.max_body_bytes == srv_mod.DEFAULT_MAX_BODY_BYTES


# ---- item 8: safetensors offsets -----------------------------------------------------------------------


def _rewrite_header(path: Path, edit) -> None:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    edit(header)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(len(h).to_bytes(8, "little") + h + raw[8 + n:])


@pytest.mark.parametrize("case,match", [
    ("negative", "bad header entry"), ("overlap", "overlaps"), ("gap", "gap"), ("trailing", "after the last"),
    ("not_object", "not a JSON object"), ("bool_dim", "bad header entry")])
def test_safetensors_offsets_validated(tmp_path: Path, case: str, match: str) -> None:
    p = tmp_path / "w.safetensors"
    write_safetensors(p, {"a": np.arange(4, dtype=np.float32), "b": np.arange(4, dtype=np.float32) + 10})
    SafetensorsFile(p)  # the intact file loads

    def edit(h):
        if case == "negative":
            h["b"]["data_offsets"] = [-16, 0]
        elif case == "overlap":  # b claims a's bytes, the last 16 bytes are nobody's
            h["b"]["data_offsets"] = [0, 16]
        elif case == "gap":
            h["a"]["shape"], h["a"]["data_offsets"] = [2], [0, 8]
        elif case == "bool_dim":
            h["a"]["shape"] = [True, 4]

    if case == "trailing":
        p.write_bytes(p.read_bytes() + b"\0" * 8)
    elif case == "not_object":
        p.write_bytes((8).to_bytes(8, "little") + b"[1,2,3] ")
    else:
        _rewrite_header(p, edit)
    with pytest.raises(CheckpointError, match=match):
        SafetensorsFile(p)


# ---- item 10: loader and data errors that say where ----------------------------------------------------


def test_loader_errors_say_where(tmp_path: Path, lm: CausalLM) -> None:
    from gemmax.train.checkpoint import CheckpointManager
    from gemmax.train.data import DataError, read_records

    bad = tmp_path / "d.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: not UTF-8.*column 14"):
        read_records(bad)

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="expected a JSON object"):
        CausalLM.from_preset(str(folder))

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no \\*.bin"):
        convert_pickle_checkpoint(empty)
    assert not (empty / "model.safetensors").exists()

    p = lora.add_lora(lm.params, lm.linear_nodes, rank=2, targets=("query",), seed=0)
    ad = lora.save_adapter(tmp_path / "ad", p, lm.linear_nodes)
    w = Path(ad) / lora.ADAPTER_WEIGHTS
    f = SafetensorsFile(w)
    kept = {k: np.array(f.get(k)) for k in f.keys() if not k.endswith("lora_b")}
    del f
    write_safetensors(w, kept)
    with pytest.raises(ValueError, match="incomplete.*lora_b"):
        lora.load_adapter(ad, lm.params, lm.linear_nodes)

    m = CheckpointManager(tmp_path / "ck", async_save=False)
    m.save(1, params={"w": {"lora_a": np.zeros((4, 2), np.float32)}}, force=True)
    with pytest.raises(CheckpointError, match=r"(?s)different LoRA rank.*saved \(4, 2\), now \(4, 8\)"):
        m.restore(1, target={"params": {"w": {"lora_a": np.zeros((4, 8), np.float32)}}})
    m.close()
