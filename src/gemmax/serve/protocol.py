"""Reading requests: every check on a body happens here, before anything reaches the scheduler.

Each check raises :class:`~gemmax.serve.errors.APIError` with the parameter at fault, so a client learns
exactly what to fix; nothing here touches JAX.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import Request as HTTPRequest

from gemmax.engine.constrain import Constraint, ConstraintError
from gemmax.engine.generate import MAX_BIAS, MAX_TOP_LOGPROBS, SamplingParams
from gemmax.io.images import message_images, part_image
from gemmax.models import base
from gemmax.serve.errors import APIError, bad
from gemmax.serve.scheduler import ServedModel

MAX_N = 16  # choices per request
MAX_PROMPTS = 32  # prompts in one /v1/completions request
MAX_STOP_STRINGS = 16
MAX_COMPLETION_LOGPROBS = 5  # /v1/completions' ``logprobs`` bound (OpenAI's)
SEED_MOD = 2**31 - 1  # engine seeds are int32
#: a prompt longer than this many characters per token of context cannot fit (no vocabulary piece is
#: longer), so it is refused before the tokenizer spends time on it
MAX_CHARS_PER_TOKEN = 64
_PARSE_INLINE_BYTES = 1 << 16  # bodies above this are parsed off the event loop

# What each endpoint reads. A field outside its table is refused with a 400 naming it instead of being
# silently ignored: ``None`` marks a field the server reads; a tuple lists the only values accepted for an
# OpenAI field this server does not implement (its "off" values).
_SAMPLING_FIELDS: dict[str, tuple | None] = {
    "model": None, "max_tokens": None, "temperature": None, "top_p": None, "top_k": None, "min_p": None,
    "seed": None, "n": None, "stop": None, "stream": None, "stream_options": None, "ignore_eos": None,
    "presence_penalty": None, "frequency_penalty": None, "user": None, "max_completion_tokens": None,
    "logprobs": None, "logit_bias": None, "repetition_penalty": None, "response_format": None,
}
FIELDS: dict[str, dict[str, tuple | None]] = {
    "completions": {**_SAMPLING_FIELDS, "prompt": None, "echo": None, "suffix": (None, ""), "best_of": (None, 1)},
    "chat": {**_SAMPLING_FIELDS, "messages": None, "top_logprobs": None,
             "tools": None, "functions": (None, []), "tool_choice": None, "function_call": (None,),
             "parallel_tool_calls": None,
             "metadata": None, "store": (None, False), "service_tier": (None, "auto", "default"),
             "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,),
             "reasoning_effort": (None,), "web_search_options": (None,)},
}


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


def _logit_bias(body: Mapping, vocab: int | None) -> dict[int, float]:
    """``logit_bias``: token ids (as JSON object keys, so strings of digits) -> values in [-100, 100]."""
    v = body.get("logit_bias")
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise bad("'logit_bias' must be an object mapping token ids to numbers", "logit_bias", "invalid_type")
    if len(v) > MAX_BIAS:
        raise bad(f"'logit_bias' takes at most {MAX_BIAS} tokens, got {len(v)}", "logit_bias", "invalid_value")
    out = {}
    for k, b in v.items():
        if not (isinstance(k, str) and k.isdigit() and k.isascii()):
            raise bad(f"'logit_bias' keys must be token ids, got {k!r}", "logit_bias", "invalid_value")
        t = int(k)
        if vocab is not None and t >= vocab:
            raise bad(f"'logit_bias' names token {t}, outside the vocabulary of {vocab}", "logit_bias",
                      "invalid_value")
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not -100 <= b <= 100:
            raise bad(f"'logit_bias' values must be numbers in [-100, 100]; token {k} has {b!r}", "logit_bias",
                      "invalid_value")
        out[t] = float(b)
    return out


def _logprobs(body: Mapping, chat: bool) -> int | None:
    """How many alternatives per token to report, or None for no log-probabilities. Chat takes OpenAI's
    ``logprobs`` (bool) and ``top_logprobs`` (0..20, only with ``logprobs``); completions its integer
    ``logprobs`` (0..5), which ``echo`` cannot join (prompt log-probabilities are not computed)."""
    if chat:
        on = _boolean(body, "logprobs")
        top = _integer(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
        if top and not on:
            raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs", "invalid_value")
        return (top or 0) if on else None
    if isinstance(body.get("logprobs"), bool):
        raise bad("'logprobs' must be an integer on /v1/completions", "logprobs", "invalid_type")
    n = _integer(body, "logprobs", None, 0, MAX_COMPLETION_LOGPROBS)
    if n is not None and body.get("echo"):
        raise bad("'logprobs' with 'echo' is not supported (prompt log-probabilities are not computed)",
                  "logprobs", "unsupported_parameter")
    return n


_FORMAT_KEYS = {"text": (), "json_object": (), "json_schema": ("json_schema",), "regex": ("regex",),
                "grammar": ("grammar",)}


def response_format(body: Mapping) -> Constraint | None:
    """``response_format``: OpenAI's ``{"type": "text" | "json_object" | "json_schema", "json_schema":
    {"name", "schema", "strict", "description"}}`` and gemmax's ``{"type": "regex", "regex": ...}`` and
    ``{"type": "grammar", "grammar": <Lark>}``, as a :class:`Constraint`. A bad schema, regex or grammar is
    a 400 naming the problem."""
    rf = body.get("response_format")
    if rf is None:
        return None
    p = "response_format"
    if not isinstance(rf, dict):
        raise bad(f"'{p}' must be an object", p, "invalid_type")
    kind = rf.get("type")
    if not isinstance(kind, str) or kind not in _FORMAT_KEYS:
        raise bad(f"{p}.type must be one of {', '.join(_FORMAT_KEYS)}; got {kind!r}", f"{p}.type", "invalid_value")
    extra = set(rf) - {"type", *_FORMAT_KEYS[kind]}
    if extra:
        raise bad(f"{p} of type {kind!r} takes no {', '.join(sorted(extra))}", p, "invalid_value")
    for key in _FORMAT_KEYS[kind]:
        if key not in rf:
            raise bad(f"{p}.{key} is required for type {kind!r}", f"{p}.{key}", "missing_required_parameter")
    try:
        if kind == "text":
            return None
        if kind == "json_object":
            return Constraint.json_object()
        if kind == "regex":
            return Constraint.regex(_string(rf, "regex", f"{p}.regex"))
        if kind == "grammar":
            return Constraint.grammar(_string(rf, "grammar", f"{p}.grammar"))
        return Constraint.json_schema(_json_schema(rf["json_schema"]))
    except ConstraintError as e:
        where = f"{p}.json_schema.schema" if kind == "json_schema" else f"{p}.{kind}"
        raise bad(f"{where}: {e}", where, "invalid_value") from None


def _string(d: Mapping, key: str, param: str) -> str:
    v = d.get(key)
    if not isinstance(v, str) or not v:
        raise bad(f"{param} must be a non-empty string", param, "invalid_type")
    return v


def _json_schema(js: Any) -> dict[str, Any]:
    """OpenAI's ``json_schema`` object: ``name`` (required: letters, digits, ``_`` and ``-``, at most 64),
    ``schema`` (gemmax requires it: there is nothing to enforce without one), ``strict``, ``description``."""
    p = "response_format.json_schema"
    if not isinstance(js, dict):
        raise bad(f"{p} must be an object", p, "invalid_type")
    extra = set(js) - {"name", "schema", "strict", "description"}
    if extra:
        raise bad(f"{p} takes no {', '.join(sorted(extra))}", p, "invalid_value")
    name = js.get("name")
    if not isinstance(name, str) or not name or len(name) > 64 or not all(c.isalnum() or c in "_-" for c in name):
        raise bad(f"{p}.name must be 1 to 64 letters, digits, '_' or '-'", f"{p}.name", "invalid_value")
    if js.get("strict") is not None and not isinstance(js["strict"], bool):
        raise bad(f"{p}.strict must be a boolean", f"{p}.strict", "invalid_type")
    if "schema" not in js:
        raise bad(f"{p}.schema is required", f"{p}.schema", "missing_required_parameter")
    if not isinstance(js["schema"], dict):
        raise bad(f"{p}.schema must be an object", f"{p}.schema", "invalid_type")
    return js["schema"]


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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    logprobs: int | None = None
    constraint: Constraint | None = None

    @classmethod
    def parse(cls, body: Mapping, default_max_tokens: int | None, vocab: int | None = None,
              endpoint: str | None = None) -> Sampling:
        """The request's sampling settings, range-checked (``top_k`` within ``[-1, vocab]``, -1 and 0 off);
        fields outside the endpoint's table are ``check_fields``' business. ``endpoint`` ("chat" or
        "completions"; by default chat when the body has ``messages``) decides how ``logprobs`` reads."""
        chat = endpoint == "chat" if endpoint is not None else "messages" in body
        max_tokens = _integer(body, "max_tokens", None, 1)
        max_completion = _integer(body, "max_completion_tokens", default_max_tokens, 1)
        if max_tokens is None:
            max_tokens = max_completion
        seed = _integer(body, "seed", None, -(2**63), 2**63 - 1)
        stream_options = body.get("stream_options")
        if stream_options is not None and not isinstance(stream_options, dict):
            raise bad("'stream_options' must be an object", "stream_options", "invalid_type")
        rep = _number(body, "repetition_penalty", 1.0, 0.0, 2.0)
        if rep == 0:
            raise bad("'repetition_penalty' must be > 0 (1 is off)", "repetition_penalty", "invalid_value")
        return cls(
            max_tokens=max_tokens,
            temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
            top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
            top_k=_integer(body, "top_k", 0, -1, vocab) or 0,
            min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
            seed=seed,
            n=_integer(body, "n", 1, 1, MAX_N),
            stop=_stops(body),
            stream=_boolean(body, "stream"),
            ignore_eos=_boolean(body, "ignore_eos"),
            presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
            frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
            repetition_penalty=rep,
            logit_bias=_logit_bias(body, vocab),
            logprobs=_logprobs(body, chat),
            constraint=response_format(body),
        )

    def params_for(self, choice: int, max_tokens: int, stop_ids: tuple[int, ...]) -> SamplingParams:
        greedy = self.temperature == 0 or self.top_p == 0
        seed = self.seed if self.seed is not None else int.from_bytes(os.urandom(4), "little")
        return SamplingParams(
            temperature=0.0 if greedy else self.temperature, top_k=max(self.top_k, 0),
            top_p=1.0 if greedy else self.top_p, min_p=self.min_p, seed=(seed + choice) % SEED_MOD,
            max_new_tokens=max_tokens, stop_ids=() if self.ignore_eos else tuple(stop_ids),
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, logit_bias=self.logit_bias or None,
            logprobs=self.logprobs, constraint=self.constraint)


def messages(body: Mapping) -> list[dict[str, Any]]:
    """The chat ``messages`` as the plain turns the chat templates take: ``{role, content}``, an assistant's
    ``tool_calls`` (arguments read from their JSON text) and a tool result's ``tool_call_id`` with the called
    function's ``name`` (``developer`` is OpenAI's newer name for ``system``; text parts are joined,
    ``image_url`` parts read, other parts refused: see ``_content_parts``). A tool message must answer a call
    of an earlier assistant message: 400 otherwise."""
    msgs = body.get("messages", _MISSING)
    if msgs is _MISSING:
        raise bad("'messages' is required", "messages", "missing_required_parameter")
    if not isinstance(msgs, list):
        raise bad("'messages' must be a list", "messages", "invalid_type")
    if not msgs:
        raise bad("'messages' must contain at least one message", "messages", "invalid_value")
    out = []
    calls: dict[str, str] = {}  # tool call id -> function name, for the tool messages that answer them
    for i, m in enumerate(msgs):
        p = f"messages.[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{p} must be an object", p, "invalid_type")
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant", "tool"):
            raise bad(f"{p}.role must be one of system, user, assistant, tool; got {role!r}", f"{p}.role",
                       "invalid_value")
        content = m.get("content")
        tool_calls = _tool_calls(m.get("tool_calls"), f"{p}.tool_calls") if role == "assistant" else None
        if isinstance(content, list):
            content = _content_parts(content, f"{p}.content")
        elif content is None and role == "assistant":
            content = ""
        elif not isinstance(content, str):
            raise bad(f"{p}.content must be a string or a list of text parts", f"{p}.content", "invalid_type")
        msg: dict[str, Any] = {"role": role, "content": content}
        if tool_calls:
            msg["tool_calls"] = tool_calls
            calls.update((c["id"], c["function"]["name"]) for c in tool_calls)
        if role == "tool":
            if not isinstance(content, str):
                raise bad(f"{p}.content of a tool message must be text", f"{p}.content", "invalid_value")
            cid = m.get("tool_call_id")
            if not isinstance(cid, str):
                raise bad(f"{p}.tool_call_id is required on a tool message", f"{p}.tool_call_id",
                          "missing_required_parameter")
            if cid not in calls:
                raise bad(f"{p}.tool_call_id '{cid}' matches no tool call of an earlier assistant message",
                          f"{p}.tool_call_id", "invalid_value")
            msg.update(tool_call_id=cid, name=calls[cid])
        out.append(msg)
    return out


def _tool_calls(calls: Any, where: str) -> list[dict[str, Any]] | None:
    """An assistant message's ``tool_calls`` checked, each function's arguments read from their JSON text."""
    if calls is None:
        return None
    if not isinstance(calls, list):
        raise bad(f"{where} must be a list", where, "invalid_type")
    out = []
    for j, c in enumerate(calls):
        p = f"{where}.[{j}]"
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(c.get("id"), str) or c.get("type", "function") != "function":
            raise bad(f"{p} must be {{'id': str, 'type': 'function', 'function': {{'name', 'arguments'}}}}", p,
                      "invalid_value")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad(f"{p}.function.name must be a non-empty string", f"{p}.function.name", "invalid_value")
        args = fn.get("arguments", "{}")
        try:
            args = json.loads(args) if isinstance(args, str) else args
        except ValueError:
            args = None
        if not isinstance(args, dict):
            raise bad(f"{p}.function.arguments must be a JSON object (as text)", f"{p}.function.arguments",
                      "invalid_value")
        out.append({"id": c["id"], "type": "function", "function": {"name": fn["name"], "arguments": args}})
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
    an OpenAI-style 400, not FastAPI's 422; a large one is parsed on a worker thread, so that it does not
    stall every other client on the event loop (the body's size is bounded by the server's middleware)."""
    raw = await request.body()
    if len(raw) > _PARSE_INLINE_BYTES:
        return await asyncio.to_thread(parse_body, raw)
    return parse_body(raw)


def parse_body(raw: bytes) -> dict[str, Any]:
    """``raw`` as a JSON object whose every string is valid Unicode; 400 otherwise."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, a 5000-digit number, deep nesting
        raise bad(f"the request body is not valid JSON: {str(e)[:200]}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", code="invalid_json")
    where = _lone_surrogate(body)
    if where is not None:
        raise bad(f"{where or 'the request body'} contains a lone UTF-16 surrogate (not valid Unicode)",
                  where or None, "invalid_unicode")
    return body


def _lone_surrogate(obj: Any) -> str | None:
    """The path of the first string (or key) that is not valid Unicode: JSON's ``\\ud800`` escapes decode to
    lone surrogates, which no tokenizer or UTF-8 writer accepts. Iterative, since bodies may nest deeply."""
    stack: list[tuple[str, Any]] = [("", obj)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return path
        elif isinstance(v, dict):
            for k, x in v.items():
                sub = f"{path}.{k}" if path else str(k)
                if _lone_surrogate(k) is not None:
                    return path or sub
                stack.append((sub, x))
        elif isinstance(v, list):
            stack.extend((f"{path}.[{i}]", x) for i, x in enumerate(v))
    return None


def check_fields(body: Mapping, endpoint: str) -> None:
    """400 naming the first field the endpoint does not implement (``FIELDS``), rather than ignoring it: a
    client that sends ``response_format`` or ``repetition_penalty`` must learn it had no effect."""
    table = FIELDS[endpoint]
    for key, value in body.items():
        if key not in table:
            known = any(key in t for t in FIELDS.values())
            what = "is not supported on this endpoint" if known else "is not a known parameter"
            raise bad(f"'{key}' {what}", key, "unsupported_parameter" if known else "unknown_parameter")
        ok = table[key]
        if ok is not None and not any(value == o and type(value) is type(o) for o in ok):
            raise bad(f"'{key}' is not supported by this server (only {', '.join(json.dumps(o) for o in ok)})",
                      key, "unsupported_parameter")


def _token_ids(p: Any) -> bool:
    return isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)


def _fits(text_len: int, max_len: int, param: str) -> None:
    """400 before tokenizing a text too long to fit ``max_len`` tokens whatever its tokens: tokenizing a
    megabyte costs seconds for nothing."""
    if text_len > max_len * MAX_CHARS_PER_TOKEN:
        raise bad(f"the text has {text_len} characters; this server's context is {max_len} tokens", param,
                  "context_length_exceeded")


def completion_prompts(body: Mapping, tokenizer: Any, max_len: int | None = None
                       ) -> tuple[list[list[int]], list[str], bool]:
    """``/v1/completions``' ``prompt`` (a string, token ids, or a list of either) as one list of token ids per
    prompt, the prompts' text (what ``echo`` sends back; empty for token ids unless echoed) and ``echo``.
    Tokenizes, so the server calls it off the event loop."""
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
            if max_len is not None:
                _fits(len(p), max_len, "prompt")
            ids.append(tokenizer.encode(p, add_bos=True))
            texts.append(p)
        elif _token_ids(p):
            ids.append(list(p))
            texts.append(tokenizer.decode(p) if echo else "")
        else:
            raise bad("'prompt' must be a string, a list of strings, or token ids", "prompt", "invalid_type")
    return ids, texts, echo


def chat_prompt_ids(m: ServedModel, msgs: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
                    ) -> list[int]:
    """The chat turns rendered in the model family's template, ending where the assistant answers. A template
    that refuses the turns (e.g. roles out of order) is the client's error: 400 on ``messages``. Content that
    spells a control token (``<end_of_turn>``...) is refused: the template's text is encoded with control
    tokens parsed, so it would forge turns. Tokenizes, so the server calls it off the event loop."""
    _fits(sum(len(t) for t in _texts(msgs)), m.max_len, "messages")
    if tools:
        tok = m.tokenizer.find_special(json.dumps(tools)) if hasattr(m.tokenizer, "find_special") else None
        if tok is not None:
            raise bad(f"'tools' contains the control token {tok!r}, which only the chat template may write",
                      "tools", "invalid_value")
    for i, msg in enumerate(msgs):
        for t in _texts([msg]):
            tok = m.tokenizer.find_special(t) if hasattr(m.tokenizer, "find_special") else None
            if tok is not None:
                raise bad(f"messages.[{i}].content contains the control token {tok!r}, which only the chat "
                          "template may write", f"messages.[{i}].content", "invalid_value")
    try:
        prompt = m.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, family=m.chat_family,
                                                 **({"tools": tools} if tools else {}))
    except ValueError as e:
        raise bad(str(e), "messages", "invalid_value") from None
    return m.tokenizer.encode(prompt, add_bos=True)


def _texts(msgs: list[dict[str, Any]]) -> list[str]:
    """The text of each message's content (a string, or the text of its parts)."""
    out = []
    for msg in msgs:
        c = msg.get("content")
        if isinstance(c, str):
            out.append(c)
        elif isinstance(c, list):
            out += [p["text"] for p in c if isinstance(p, dict) and isinstance(p.get("text"), str)]
        out += [json.dumps(call["function"]) for call in msg.get("tool_calls") or ()]
    return out


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


def chat_prompt(m: ServedModel, msgs: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
                ) -> tuple[list[int], dict[str, Any] | None]:
    """The chat prompt's token ids and, when the messages hold images, the family's inputs for them
    (``pixel_values``...): the template's text, with a placeholder per image, goes through the family's
    ``encode_prompt`` (Gemma 3: each image's block of soft tokens in place; PaliGemma: the images in front of
    its task prompt). A model that reads no images: 400. Tokenizes, so the server calls it off the loop."""
    images = message_images(msgs)
    fam = base.for_config(m.config)
    if images and fam.encode_prompt is None:
        raise bad(f"the model '{m.name}' reads no images", "messages", "invalid_value")
    ids = chat_prompt_ids(m, msgs, tools)
    if not images:
        return ids, None
    prompt = m.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, family=m.chat_family,
                                             **({"tools": tools} if tools else {}))
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
