"""Reading requests: every check on a body happens here, before anything reaches the scheduler.

Each helper raises :class:`~gemmax.serve.errors.APIError` with the parameter at fault, so a client learns
exactly what to fix; nothing here touches JAX.
"""

from __future__ import annotations

import hmac
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import Request as HTTPRequest

from gemmax.engine.generate import SamplingParams
from gemmax.io.images import message_images, part_image
from gemmax.models import base
from gemmax.serve.errors import APIError, bad
from gemmax.serve.scheduler import ServedModel

MAX_N = 16  # choices per request
MAX_PROMPTS = 32  # prompts in one /v1/completions request
MAX_STOP_STRINGS = 16
SEED_MOD = 2**31 - 1  # engine seeds are int32


# ---- request validation ---------------------------------------------------------------------------------


_MISSING = object()


def _number(body: Mapping, key: str, default: float | None, lo: float, hi: float) -> float | None:
    v = body.get(key, _MISSING)
    if v is _MISSING or v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise bad(f"'{key}' must be a number, got {type(v).__name__}", key, "invalid_type")
    if not lo <= v <= hi:
        raise bad(f"'{key}' must be between {lo} and {hi}, got {v}", key, "invalid_value")
    return float(v)


def _integer(body: Mapping, key: str, default: int | None, lo: int, hi: int | None = None) -> int | None:
    v = body.get(key, _MISSING)
    if v is _MISSING or v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise bad(f"'{key}' must be an integer, got {type(v).__name__}", key, "invalid_type")
    if v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise bad(f"'{key}' must be {rng}, got {v}", key, "invalid_value")
    return v


def _boolean(body: Mapping, key: str, default: bool = False) -> bool:
    v = body.get(key, _MISSING)
    if v is _MISSING or v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"'{key}' must be a boolean, got {type(v).__name__}", key, "invalid_type")
    return v


def _stops(body: Mapping) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise bad("'stop' must be a string or a list of strings", "stop", "invalid_type")
    if len(v) > MAX_STOP_STRINGS:
        raise bad(f"at most {MAX_STOP_STRINGS} stop strings are supported", "stop", "invalid_value")
    if any(s == "" for s in v):
        raise bad("stop strings must not be empty", "stop", "invalid_value")
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
                raise bad(f"'{key}' is not supported (only 0)", key, "unsupported_parameter")
        allowed = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "logit_bias": (None, {}),
                   "tools": (None, []), "functions": (None, []), "suffix": (None, ""), "best_of": (None, 1)}
        for key, ok in allowed.items():
            if body.get(key) not in ok:
                raise bad(f"'{key}' is not supported by this server", key, "unsupported_parameter")
        seed = _integer(body, "seed", None, -(2**63), 2**63 - 1)
        stream_options = body.get("stream_options")
        if stream_options is not None and not isinstance(stream_options, dict):
            raise bad("'stream_options' must be an object", "stream_options", "invalid_type")
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


def messages(body: Mapping) -> list[dict[str, Any]]:
    """The chat ``messages`` as plain ``{role, content}`` turns, the shape the chat templates take
    (``developer`` is OpenAI's newer name for ``system``; text parts are joined, ``image_url`` parts read,
    other parts refused: see ``_content_parts``)."""
    msgs = body.get("messages", _MISSING)
    if msgs is _MISSING:
        raise bad("'messages' is required", "messages", "missing_required_parameter")
    if not isinstance(msgs, list):
        raise bad("'messages' must be a list", "messages", "invalid_type")
    if not msgs:
        raise bad("'messages' must contain at least one message", "messages", "invalid_value")
    out = []
    for i, m in enumerate(msgs):
        p = f"messages.[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{p} must be an object", p, "invalid_type")
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise bad(f"{p}.role must be one of system, user, assistant; got {role!r}", f"{p}.role",
                       "invalid_value")
        content = m.get("content")
        if isinstance(content, list):
            content = _content_parts(content, f"{p}.content")
        elif content is None and role == "assistant":
            content = ""
        elif not isinstance(content, str):
            raise bad(f"{p}.content must be a string or a list of text parts", f"{p}.content", "invalid_type")
        out.append({"role": role, "content": content})
    return out



# ---- per endpoint ---------------------------------------------------------------------------------------


def check_api_key(api_key: str | None, request: HTTPRequest) -> None:
    """401 unless the request carries ``Authorization: Bearer <api_key>`` (when a key is set). The
    comparison takes the same time whatever the token, so the key cannot be guessed byte by byte."""
    if api_key is None:
        return
    got = request.headers.get("authorization", "")
    scheme, _, token = got.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                       code="invalid_api_key")


async def read_body(request: HTTPRequest) -> dict[str, Any]:
    """The JSON object every POST endpoint takes. Parsed here rather than by FastAPI so that a bad body gets
    an OpenAI-style 400, not FastAPI's 422."""
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", code="invalid_json")
    return body


def _token_ids(p: Any) -> bool:
    return isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)


def completion_prompts(body: Mapping, tokenizer: Any) -> tuple[list[list[int]], list[str], bool]:
    """``/v1/completions``' ``prompt`` (a string, token ids, or a list of either) as one list of token ids per
    prompt, the prompts' text (what ``echo`` sends back; empty for token ids unless echoed) and ``echo``."""
    if "prompt" not in body:
        raise bad("'prompt' is required", "prompt", "missing_required_parameter")
    prompt = body["prompt"]
    echo = _boolean(body, "echo")
    if isinstance(prompt, str) or (prompt and _token_ids(prompt)):  # a single prompt
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise bad("'prompt' must be a string, a list of strings, or token ids", "prompt", "invalid_type")
    if len(prompt) > MAX_PROMPTS:
        raise bad(f"at most {MAX_PROMPTS} prompts per request", "prompt", "invalid_value")
    ids, texts = [], []
    for p in prompt:
        if isinstance(p, str):
            if not p:
                raise bad("the prompt is empty", "prompt", "invalid_value")
            ids.append(tokenizer.encode(p, add_bos=True))
            texts.append(p)
        elif _token_ids(p):
            ids.append(list(p))
            texts.append(tokenizer.decode(p) if echo else "")
        else:
            raise bad("'prompt' must be a string, a list of strings, or token ids", "prompt", "invalid_type")
    return ids, texts, echo


def chat_prompt_ids(m: ServedModel, msgs: list[dict[str, Any]]) -> list[int]:
    """The chat turns rendered in the model family's template, ending where the assistant answers. A template
    that refuses the turns (e.g. roles out of order) is the client's error: 400 on ``messages``."""
    try:
        prompt = m.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, family=m.chat_family)
    except ValueError as e:
        raise bad(str(e), "messages", "invalid_value") from None
    return m.tokenizer.encode(prompt, add_bos=True)


def _content_parts(parts: list, where: str) -> str | list[dict[str, Any]]:
    """A content list: its text parts joined into one string or, when it holds images (``image_url`` parts
    with base64 PNG / JPEG ``data:`` URIs, read here), the text and image parts in order, for the chat
    template and the family's ``encode_prompt``. Another URL scheme, an unreadable image or another part
    type: 400 naming the part."""
    out: list[dict[str, Any]] = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            out.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            try:
                out.append({"type": "image", "image": part_image(part)})
            except ValueError as e:
                raise bad(f"{where}.[{j}].image_url: {e}", f"{where}.[{j}].image_url", "invalid_value") from None
        else:
            raise bad(f"{where}.[{j}]: only text and image_url parts are supported", f"{where}.[{j}]",
                      "invalid_value")
    if any(x["type"] == "image" for x in out):
        return out
    return "".join(x["text"] for x in out)


def chat_prompt(m: ServedModel, msgs: list[dict[str, Any]]) -> tuple[list[int], dict[str, Any] | None]:
    """The chat prompt's token ids and, when the messages hold images, the family's inputs for them
    (``pixel_values``...): the template's text, with a placeholder per image, goes through the family's
    ``encode_prompt`` (Gemma 3: each image's block of soft tokens in place; PaliGemma: the images in front of
    its task prompt). A model that reads no images: 400. Tokenizes, so the server calls it off the loop."""
    images = message_images(msgs)
    fam = base.for_config(m.config)
    if images and fam.encode_prompt is None:
        raise bad(f"the model '{m.name}' reads no images", "messages", "invalid_value")
    ids = chat_prompt_ids(m, msgs)
    if not images:
        return ids, None
    prompt = m.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, family=m.chat_family)
    try:
        ids, inputs = fam.encode_prompt(m.config, m.tokenizer, prompt, images, True)
    except ValueError as e:
        raise bad(str(e), "messages", "invalid_value") from None
    return ids, inputs


def tokens_to_generate(m: ServedModel, ids: list[int], sampling: Sampling, param: str) -> int:
    """The number of new tokens to generate; 400 when the prompt and the request do not fit the slot.
    Checked before queueing, so the scheduler never meets a prompt it cannot place."""
    if not ids:
        raise bad("the prompt is empty", param, "invalid_value")
    vocab = m.config.vocab_size
    if any(not 0 <= t < vocab for t in ids):
        raise bad(f"token ids must be in [0, {vocab})", param, "invalid_value")
    room = m.max_len - len(ids)
    want = sampling.max_tokens if sampling.max_tokens is not None else room
    if room < 1 or want > room:
        raise bad(f"this server's context is {m.max_len} tokens; the request has {len(ids)} prompt tokens "
                  f"and asks for {want} more", param if room < 1 else "max_tokens", "context_length_exceeded")
    return want


def include_usage(body: Mapping) -> bool:
    """``stream_options.include_usage``: streamed chunks carry ``"usage": null`` and a last chunk the totals.
    (``Sampling.parse`` has already checked that ``stream_options`` is an object or absent.)"""
    return bool((body.get("stream_options") or {}).get("include_usage"))
