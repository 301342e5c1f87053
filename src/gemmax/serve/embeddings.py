"""``POST /v1/embeddings`` (OpenAI's format) for a server started on a text encoder (EmbeddingGemma).

An embedding request is one forward pass, with no decode loop to share, so there is no scheduler: each
request is validated here, then encoded on a worker thread under one lock (JAX runs one batch at a time, and
the encoder's length-sorted, bucketed batches already fill the device). The body:

- ``input``: a string, a list of strings, a list of token ids, or a list of lists of token ids (token ids are
  taken as they are: no prompt, no special tokens added);
- ``model``: a served name (absent: the first); ``encoding_format``: ``"float"`` (default) or ``"base64"``
  (little-endian float32, as OpenAI's clients decode it); ``dimensions``: keep the first N dimensions
  (EmbeddingGemma's Matryoshka sizes 512/256/128), re-normalized to unit length when the model normalizes
  its output, as OpenAI's shortened embeddings are; ``user``: accepted and ignored;
- gemmax's own ``prompt_name``: one of the model's prompts (``"query"``, ``"document"``...) put before
  every text.

Any other field is a 400 naming it, so a client never silently gets something it did not ask for.
"""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import FastAPI
from fastapi import Request as HTTPRequest

from gemmax.serve import protocol
from gemmax.serve.errors import APIError, bad
from gemmax.serve.routes import add_model_routes

#: Inputs in one request (OpenAI's limit).
MAX_INPUTS = 2048
#: Fields of an embeddings request gemmax reads.
FIELDS = ("input", "model", "encoding_format", "dimensions", "user", "prompt_name")


@dataclass
class EmbeddingService:
    """The served encoders (name -> ``gemmax.TextEncoder``) and the lock that runs one batch at a time."""

    models: dict[str, Any]
    api_key: str | None = None
    batch_size: int = 32
    lock: threading.Lock = field(default_factory=threading.Lock)
    created: int = field(default_factory=lambda: int(time.time()))

    def check_auth(self, request: HTTPRequest) -> None:
        protocol.check_api_key(self.api_key, request)

    @property
    def default_model(self) -> str:
        return next(iter(self.models))

    def pick(self, body: Mapping) -> tuple[str, Any]:
        name = body.get("model") or self.default_model
        if not isinstance(name, str):
            raise bad("'model' must be a string", "model", "invalid_type")
        if name not in self.models:
            raise APIError(404, f"the model '{name}' does not exist; available: {', '.join(self.models)}",
                           param="model", code="model_not_found")
        return name, self.models[name]

    def card(self, name: str) -> dict[str, Any]:
        enc = self.models[name]
        return {"id": name, "object": "model", "created": self.created, "owned_by": "gemmax",
                "max_model_len": enc.config.max_len, "dimensions": enc.dim}

    def model_list(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.card(n) for n in self.models]}

    def model_card(self, name: str) -> dict[str, Any]:
        if name not in self.models:
            raise APIError(404, f"the model '{name}' does not exist", param="model", code="model_not_found")
        return self.card(name)

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "models": list(self.models), "kind": "embeddings"}

    def encode(self, enc: Any, ids: list[list[int]], skip: list[int]) -> np.ndarray:
        with self.lock:
            return enc.encode_ids(ids, self.batch_size, skip)


def parse_inputs(body: Mapping, enc: Any) -> tuple[list[list[int]], list[int]]:
    """The request's inputs as token ids (texts tokenized with the prompt) and, per input, the prompt tokens
    pooling skips (only for a model whose pooling leaves the prompt out)."""
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise bad(f"unsupported field '{unknown[0]}' (an embeddings request takes {', '.join(FIELDS)})",
                  unknown[0], "unsupported_parameter")
    if "input" not in body:
        raise bad("'input' is required", "input", "missing_required_parameter")
    x = body["input"]
    if isinstance(x, str) or (isinstance(x, list) and x and all(_is_id(t) for t in x)):
        items: list[Any] = [x]
    elif isinstance(x, list) and x:
        items = x
    else:
        raise bad("'input' must be a string, a list of strings, a list of token ids or a list of such lists "
                  "(not empty)", "input", "invalid_type")
    if len(items) > MAX_INPUTS:
        raise bad(f"at most {MAX_INPUTS} inputs per request, got {len(items)}", "input", "invalid_value")
    prompt_name = body.get("prompt_name")
    if prompt_name is not None and (not isinstance(prompt_name, str) or prompt_name not in enc.config.prompts):
        raise bad(f"unknown prompt_name {prompt_name!r}; this model's prompts: "
                  f"{', '.join(enc.config.prompts) or '(none)'}", "prompt_name", "invalid_value")
    prompt = enc.resolve_prompt(prompt_name)
    skip_text = enc._prompt_length(prompt)
    ids, skip = [], []
    for i, item in enumerate(items):
        if isinstance(item, str):
            if not item:
                raise bad(f"input {i} is an empty string", "input", "invalid_value")
            if enc.tokenizer is None:
                raise bad("this model has no tokenizer: send token ids", "input", "invalid_type")
            ids.append(enc._text_ids(prompt + item if prompt else item))
            skip.append(skip_text)
        elif isinstance(item, list) and item and all(_is_id(t) for t in item):
            try:
                ids.extend(enc.tokenize([item]))
            except ValueError as e:
                raise bad(f"input {i}: {e}", "input", "invalid_value") from None
            skip.append(0)
        else:
            raise bad(f"input {i} must be a non-empty string or a non-empty list of token ids", "input",
                      "invalid_type")
    return ids, skip


def _is_id(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


def _dimensions(body: Mapping, enc: Any) -> int | None:
    d = body.get("dimensions")
    if d is None:
        return None
    if not _is_id(d) or not 0 < d <= enc.dim:
        raise bad(f"'dimensions' must be an integer between 1 and {enc.dim}, got {d!r}", "dimensions",
                  "invalid_value")
    return d


def _format(body: Mapping) -> str:
    f = body.get("encoding_format") or "float"
    if f not in ("float", "base64"):
        raise bad(f"'encoding_format' must be 'float' or 'base64', got {f!r}", "encoding_format", "invalid_value")
    return f


async def embeddings(svc: EmbeddingService, request: HTTPRequest) -> dict[str, Any]:
    """``POST /v1/embeddings``."""
    svc.check_auth(request)
    body = await protocol.read_body(request)
    name, enc = svc.pick(body)
    dims, fmt = _dimensions(body, enc), _format(body)
    ids, skip = await asyncio.to_thread(parse_inputs, body, enc)  # tokenizing 2048 texts would stall the loop
    out = await asyncio.to_thread(svc.encode, enc, ids, skip)
    if dims is not None:
        out = out[:, :dims]
        if enc.config.normalize:
            out = out / np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
    data = []
    for i, row in enumerate(out.astype("<f4")):
        emb: Any = base64.b64encode(row.tobytes()).decode() if fmt == "base64" else row.tolist()
        data.append({"object": "embedding", "index": i, "embedding": emb})
    n = sum(len(x) for x in ids)
    return {"object": "list", "data": data, "model": name, "usage": {"prompt_tokens": n, "total_tokens": n}}


def not_generative(svc: EmbeddingService) -> None:
    raise APIError(400, f"'{svc.default_model}' is an embedding model: it answers POST /v1/embeddings, not "
                        "completions", code="model_not_generative")


def add_routes(app: FastAPI, svc: EmbeddingService) -> None:
    """The HTTP surface of an embedding server: health, models, embeddings; completions say why not."""

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return svc.health()

    add_model_routes(app, svc)

    @app.post("/v1/embeddings")
    async def create_embeddings(request: HTTPRequest) -> dict[str, Any]:
        return await embeddings(svc, request)

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest) -> Any:
        svc.check_auth(request)
        not_generative(svc)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest) -> Any:
        svc.check_auth(request)
        not_generative(svc)
