"""Operating the server: Prometheus metrics, request ids, the bounded queue (429), per-request timeouts,
graceful shutdown, repetition-loop stops, sampling defaults from the checkpoint and ``--dtype`` /
``--quantize`` on the CLI — on a tiny random model served by uvicorn on a loopback port, through the
official ``openai`` client where it fits."""

from __future__ import annotations

import argparse
import importlib
import io
import json
import logging
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import jax
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from spm_fixtures import train_tiny_sentencepiece

import gemmax
from gemmax import cli
from gemmax.api import CausalLM
from gemmax.engine.generate import Engine, Request, SamplingParams, generate_ids
from gemmax.engine.repetition import loop_period
from gemmax.io.generation_config import GEMMA_SAMPLING, instruction_tuned, sampling_defaults
from gemmax.io.tokenizer import Tokenizer
from gemmax.serve import server as srv
from gemmax.serve.scheduler import batch_axes, resize, row_taker

openai = importlib.import_module("openai")
uvicorn = importlib.import_module("uvicorn")

MAX_LEN = 96
MAX_QUEUE = 4
LINES = ["The quick brown fox jumps over the lazy dog.", "Gemma is a family of lightweight open models.",
         "Hello world, hello tokenizer, hello server.", "Numbers 0123456789 and symbols !?.,;:"] * 20
PROMPTS = ["Hello world", "The quick brown fox", "Gemma is", "Numbers 42", "lazy dog.", "hello server"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return train_tiny_sentencepiece(tmp_path_factory.mktemp("spm"), LINES, 160, add_dummy_prefix=False)


@pytest.fixture(scope="module")
def lm(tok: Tokenizer) -> CausalLM:
    return CausalLM.from_config(gemmax.tiny_config("gemma3", vocab_size=tok.vocab_size), seed=0, tokenizer=tok)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(lm: CausalLM):
    """One server for the module (its shutdown is the last test's subject)."""
    app = srv.create_app({"tiny": lm}, max_batch=1, chunk=2, max_len=MAX_LEN, max_queue=MAX_QUEUE)
    svc = app.state.service
    server = srv.DrainingServer(uvicorn.Config(app, host="127.0.0.1", port=_free_port(), log_level="warning",
                                               timeout_graceful_shutdown=20), on_exit=svc.begin_shutdown)
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    deadline = time.time() + 60
    while not server.started:
        assert time.time() < deadline and th.is_alive(), "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{server.config.port}", app, server, th
    server.should_exit = True
    th.join(30)


@pytest.fixture(scope="module")
def url(served) -> str:
    return served[0]


@pytest.fixture(scope="module")
def client(url: str):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)


def _metrics(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of ``/metrics``, parsed by prometheus-client's own parser."""
    text = httpx.get(url + "/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


class paused:
    """Holds the scheduler's admissions (queued choices stay queued) for a deterministic queue."""

    def __init__(self, app) -> None:
        self.s = app.state.scheduler

    def __enter__(self) -> None:
        self.s._admit = lambda name, m: None

    def __exit__(self, *exc) -> None:
        del self.s._admit


def _wait(cond, what: str, timeout: float = 20.0) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, what
        time.sleep(0.02)


# ---- metrics and request ids ---------------------------------------------------------------------------


def test_metrics_parse_and_move(url: str, client) -> None:
    before = _metrics(url)
    r = client.completions.create(model="tiny", prompt="Hello world", max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 6
    after = _metrics(url)
    ok = ("gemmax_requests_total", (("endpoint", "/v1/completions"), ("status", "200")))
    assert after[ok] == before.get(ok, 0) + 1
    tokens = ("gemmax_generated_tokens_total", ())
    assert after[tokens] == before.get(tokens, 0) + 6
    ttft = ("gemmax_time_to_first_token_seconds_count", ())
    assert after[ttft] == before.get(ttft, 0) + 1
    itl = ("gemmax_inter_token_latency_seconds_count", ())
    assert after[itl] == before.get(itl, 0) + 5  # the tokens after the first
    assert after[("gemmax_tokens_per_second", ())] > 0
    for gauge in ("gemmax_queue_depth", "gemmax_running_slots", "gemmax_kv_cache_usage_ratio",
                  "gemmax_kv_cache_capacity_tokens", "gemmax_batch_width", "gemmax_max_slots"):
        assert (gauge, ()) in after, gauge
    assert after[("gemmax_max_slots", ())] == 1 and after[("gemmax_kv_cache_capacity_tokens", ())] >= MAX_LEN
    httpx.get(url + "/v1/nope")
    missing = ("gemmax_requests_total", (("endpoint", "other"), ("status", "404")))
    assert _metrics(url)[missing] == before.get(missing, 0) + 1


def test_request_id_echoed_and_logged(url: str, caplog) -> None:
    caplog.set_level(logging.INFO, logger="gemmax.serve")
    body = {"prompt": "Gemma is", "max_tokens": 3, "temperature": 0}
    r = httpx.post(url + "/v1/completions", json=body, headers={"X-Request-Id": "req-42.a"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "req-42.a"
    fresh = httpx.post(url + "/v1/completions", json=body).headers["x-request-id"]
    odd = httpx.post(url + "/v1/completions", json=body, headers={"X-Request-Id": "x" * 200}).headers["x-request-id"]
    assert len(fresh) == 32 and len(odd) == 32 and fresh != odd  # generated (uuid4 hex) when absent or unusable
    _wait(lambda: sum(getattr(rec, "request_id", "") == "req-42.a" for rec in caplog.records) >= 2, "log lines")
    mine = [rec.getMessage() for rec in caplog.records if getattr(rec, "request_id", "") == "req-42.a"]
    assert any("finished" in m for m in mine) and any("/v1/completions 200" in m for m in mine)


# ---- the bounded queue and timeouts ---------------------------------------------------------------------


def test_full_queue_answers_429_and_server_keeps_serving(url: str, served, client) -> None:
    app = served[1]
    holder: dict = {}
    with paused(app):
        th = threading.Thread(target=lambda: holder.update(r=client.completions.create(
            model="tiny", prompt="Hello", max_tokens=2, temperature=0, n=MAX_QUEUE)))
        th.start()
        _wait(lambda: app.state.scheduler.stats()["queued"] == MAX_QUEUE, "queue filled")
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model="tiny", prompt="Hello", max_tokens=2)
        err = e.value.body
        assert e.value.status_code == 429 and err["code"] == "queue_full" and err["type"] == "rate_limit_error"
        assert "message" in err and "param" in err
    th.join(30)
    assert len(holder["r"].choices) == MAX_QUEUE  # the queued request was served once there was room
    assert client.completions.create(model="tiny", prompt="Hello", max_tokens=2).choices[0].finish_reason


def test_request_timeout(url: str, served, client) -> None:
    app = served[1]
    svc = app.state.service
    before = app.state.scheduler.counters["timeouts"]
    svc.request_timeout = 0.3  # what --request-timeout sets, for the jobs submitted from now on
    try:
        with paused(app):
            holder: dict = {}

            def call() -> None:
                try:
                    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=4)
                except openai.APIStatusError as exc:
                    holder["e"] = exc

            th = threading.Thread(target=call)
            th.start()
            _wait(lambda: app.state.scheduler.stats()["queued"] == 1, "queued")
            time.sleep(0.4)
        th.join(30)
    finally:
        svc.request_timeout = None
    assert holder["e"].status_code == 504 and holder["e"].body["code"] == "timeout"
    assert app.state.scheduler.counters["timeouts"] == before + 1
    assert app.state.scheduler.stats()["live"] == 0


# ---- repetition loops -----------------------------------------------------------------------------------


def test_loop_period() -> None:
    line = list(range(10, 22))  # a 12-token "line"
    assert loop_period([5, 6, 7] + line * 4) == 12
    assert loop_period([5, 6, 7] + line * 3) == 0  # three copies: not yet a loop
    assert loop_period([9] * 40) == 1 and loop_period([9] * 31) == 0  # one token: needs 32 of them
    assert loop_period([1, 2] * 16) == 2
    assert loop_period(list(range(200))) == 0
    assert loop_period(line * 4 + [99]) == 0  # the loop was left
    assert loop_period(line * 4, min_repeats=5) == 0


def test_repetition_loop_stops(url: str, served, lm: CausalLM) -> None:
    """Greedy decoding of the random tiny model falls into loops; the server stops them ("stop") at the
    chunk where they become one, and runs to max_tokens with the stop switched off."""
    n = 64
    looping = []
    for p in PROMPTS:
        sp = SamplingParams(max_new_tokens=n, stop_ids=tuple(lm.tokenizer.stop_ids))
        r = generate_ids(lm.params, lm.config, [lm.tokenizer.encode(p)], [sp])[0]
        first = next((k for k in range(1, len(r.new_ids) + 1) if loop_period(r.new_ids[:k])), None)
        if r.finish_reason == "length" and first is not None and first < n - 4:  # loops, never meets eos
            looping.append((p, first))
            break
    assert looping, "no prompt loops on this model: pick other prompts"
    p, first = looping[0]
    body = {"model": "tiny", "prompt": p, "max_tokens": n, "temperature": 0}
    r = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
    assert r["choices"][0]["finish_reason"] == "stop"
    assert first <= r["usage"]["completion_tokens"] <= first + 2  # noticed at the end of its chunk (2 tokens)
    svc = served[1].state.service
    svc.stop_loops = False
    try:
        r = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
    finally:
        svc.stop_loops = True
    assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] == n
    r = httpx.post(url + "/v1/completions", json=dict(body, ignore_eos=True), timeout=60).json()
    assert r["usage"]["completion_tokens"] == n  # ignore_eos: exactly max_tokens, loop or not


def test_chat_cli_says_base_model_and_stops_loops(lm: CausalLM, tmp_path: Path, monkeypatch, capsys) -> None:
    folder = lm.save(tmp_path / "tiny-base")
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\n\n"))
    assert cli.main(["chat", "--model", str(folder), "--max-new-tokens", "120", "--temperature", "0"]) == 0
    err = capsys.readouterr().err
    assert "looks like a base (pretrained) model" in err and "gemma-3-270m-it" in err
    assert "sampling: greedy" in err and "stopped: the reply was repeating itself" in err


# ---- batch widths ---------------------------------------------------------------------------------------


def test_resize_keeps_every_request_exact(lm: CausalLM) -> None:
    """Requests that live through a grow (1 -> 4 rows) and a shrink that moves them (4 -> 1) decode exactly
    what each decodes alone: cache rows, positions, seeds and sampling settings move with them."""
    tok = lm.tokenizer
    sps = [SamplingParams(max_new_tokens=20), SamplingParams(temperature=1.0, top_k=20, seed=5, max_new_tokens=30),
           SamplingParams(max_new_tokens=6)]
    prompts = [tok.encode(p) for p in PROMPTS[:3]]
    alone = []
    for p, sp in zip(prompts, sps, strict=True):
        eng = Engine(lm.params, lm.config, max_batch=1, max_len=MAX_LEN, chunk=2)
        r = Request(list(p), sp)
        eng.add([r])
        while eng.has_work():
            eng.step(2)
        alone.append(r.new_ids)
    eng = Engine(lm.params, lm.config, max_batch=1, max_len=MAX_LEN, chunk=2)
    take = row_taker(batch_axes(eng))
    a, b, c = (Request(list(p), sp) for p, sp in zip(prompts, sps, strict=True))
    eng.add([a])
    eng.step(2)
    resize(eng, 4, take)
    eng.add([c, b])  # c takes slot 1, b slot 2
    assert (a.slot, c.slot, b.slot) == (0, 1, 2)
    while not (a.done and c.done):
        eng.step(2)
    eng.release(a)
    eng.release(c)
    resize(eng, 1, take)  # b moves from slot 2 to slot 0
    assert b.slot == 0 and eng.max_batch == 1 and eng.requests == [b]
    while eng.has_work():
        eng.step(2)
    assert [a.new_ids, b.new_ids, c.new_ids] == alone


# ---- sampling defaults from the checkpoint --------------------------------------------------------------


def test_sampling_defaults_read_from_checkpoints(tmp_path: Path) -> None:
    folder = tmp_path / "gemma-3-1b-it"
    folder.mkdir()
    (folder / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "top_k": 40, "top_p": 0.9, "temperature": 0.7, "bos_token_id": 2}))
    assert sampling_defaults(folder, "gemma3") == {"temperature": 0.7, "top_k": 40, "top_p": 0.9}
    (folder / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    assert sampling_defaults(folder, "gemma3") == {"temperature": 0.0}
    gguf = importlib.import_module("gguf")
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_string("general.name", "Gemma 3 270m")
    w.add_uint32("general.sampling.top_k", 20)
    w.add_float32("general.sampling.top_p", 0.5)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert sampling_defaults(path, "gemma3") == {"top_k": 20, "top_p": 0.5}
    assert sampling_defaults(tmp_path / "absent", "gemma3") == GEMMA_SAMPLING  # Gemma's published ones
    assert sampling_defaults(None, "llama") == {}
    assert instruction_tuned(folder) and not instruction_tuned(path)
    assert instruction_tuned("hf://google/gemma-3-270m-it") and not instruction_tuned("hf://google/gemma-3-270m")


def test_chat_takes_checkpoint_defaults(url: str, served, lm: CausalLM, tmp_path: Path) -> None:
    app = served[1]
    m = app.state.models["tiny"]
    assert m.sampling == {**GEMMA_SAMPLING} and not m.instruction_tuned  # a random model: a base model
    seen: list = []
    sched = app.state.scheduler
    submit = sched.submit
    sched.submit = lambda jobs: (seen.extend(jobs), submit(jobs))[1]
    m.sampling = {"temperature": 0.5, "top_k": 7, "top_p": 0.8}
    try:
        msgs = [{"role": "user", "content": "hi"}]
        httpx.post(url + "/v1/chat/completions", json={"messages": msgs, "max_tokens": 2}, timeout=60)
        httpx.post(url + "/v1/chat/completions", json={"messages": msgs, "max_tokens": 2, "top_k": 3,
                                                       "temperature": 0}, timeout=60)
        httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
    finally:
        m.sampling = dict(GEMMA_SAMPLING)
        del sched.submit
    sp = [j.req.params for j in seen]
    assert (sp[0].temperature, sp[0].top_k, sp[0].top_p) == (0.5, 7, pytest.approx(0.8))
    assert (sp[1].temperature, sp[1].top_k) == (0.0, 3)  # what the request sets wins
    assert (sp[2].temperature, sp[2].top_k, sp[2].top_p) == (1.0, 0, 1.0)  # completions: OpenAI's defaults
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "generation_config.json").write_text(json.dumps({"top_k": 11, "temperature": 0.9}))
    other = CausalLM(lm.config, lm.params, lm.tokenizer, source=str(folder))
    assert srv.build_models(other)[srv._default_name(other)].sampling == {"top_k": 11, "temperature": 0.9}


# ---- --dtype / --quantize ------------------------------------------------------------------------------


def _dtypes(params) -> set[str]:
    return {str(x.dtype) for x in jax.tree.leaves(params)}


def test_dtype_and_quantize_reach_the_model(lm: CausalLM, tmp_path: Path, monkeypatch, capsys) -> None:
    folder = lm.save(tmp_path / "tiny")
    loaded = []
    load = cli.load_model
    monkeypatch.setattr(cli, "load_model", lambda *a: loaded.append(load(*a)) or loaded[-1])
    monkeypatch.setattr(CausalLM, "stream", lambda self, *a, **k: iter(()))  # what is loaded is the question
    assert cli.main(["generate", "hi", "--model", str(folder), "--dtype", "bfloat16", "--quantize", "int8",
                     "--max-new-tokens", "2"]) == 0
    assert {"int8", "bfloat16"} <= _dtypes(loaded[-1].params)
    assert cli.main(["info", str(folder), "--quantize", "int4"]) == 0
    assert "int4" in _dtypes(loaded[-1].params)
    served_app = {}
    monkeypatch.setattr(srv.DrainingServer, "run", lambda self: served_app.update(app=self.config.app))
    monkeypatch.setattr(srv, "configure_logging", lambda level: None)  # no handler on pytest's captured stderr
    parser = argparse.ArgumentParser(prog="gemmax")
    srv.register_cli(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["serve", "--model", str(folder), "--dtype", "bfloat16", "--quantize", "int8",
                              "--no-warmup", "--max-queue", "7", "--request-timeout", "5"])
    assert srv.run_cli(args) == 0
    app = served_app["app"]
    assert {"int8", "bfloat16"} <= _dtypes(next(iter(app.state.models.values())).params)
    assert app.state.scheduler.max_queue == 7 and app.state.service.request_timeout == 5
    float32 = srv.load(str(folder))
    assert "int8" not in _dtypes(float32.params) and "float32" in _dtypes(float32.params)
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--quantize", "int3"])
    assert "invalid choice: 'int3'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown quantization 'int3'; choose one of int8, int4"):
        srv.load(str(folder), quantize="int3")
    with pytest.raises(ValueError, match="unknown dtype 'float64'"):
        srv.load(str(folder), dtype="float64")


# ---- graceful shutdown (last: it stops the module's server) ---------------------------------------------


def test_graceful_shutdown_finishes_running_request(url: str, served) -> None:
    _, app, server, th = served
    sched = app.state.scheduler
    step = sched._step
    sched._step = lambda name, m: (time.sleep(0.05), step(name, m))[1]  # slow enough to be mid-answer
    n = 40
    body = {"model": "tiny", "prompt": "Hello world", "max_tokens": n, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    events: list = []
    with httpx.Client(timeout=60) as c, c.stream("POST", url + "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            events.append(json.loads(line[6:]))
            if len(events) == 1:  # running: now the signal
                server.handle_exit(signal.SIGTERM, None)
                assert app.state.service.draining
                refused = TestClient(app).post("/v1/completions", json={"prompt": "hi"})  # a request that got in
                assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
    th.join(30)
    assert not th.is_alive()
    assert events[-1]["usage"]["completion_tokens"] == n  # the running request was finished, not cut
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "length"
    with pytest.raises(httpx.ConnectError):
        httpx.post(url + "/v1/completions", json={"prompt": "hi"})
