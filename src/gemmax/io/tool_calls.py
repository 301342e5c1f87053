"""Reading a model's tool calls out of its text, in each family's function-calling format.

The inverse of the chat templates' tool rendering (:mod:`gemmax.io.tokenizer`, docs/tools.md):

- Gemma 3 and Llama 3.1 write a call as JSON, ``{"name": ..., "parameters": {...}}`` (Gemma 3: several calls
  as a JSON list of those; Llama 3 models also separate several with ``;``);
- Gemma 4 writes ``<|tool_call>call:name{key:value,...}<tool_call|>`` in its own notation (strings between
  ``<|"|>``, bare keys).

It lives beside the templates, below both the Python API and the server, so that ``CausalLM.chat`` and
``gemmax serve`` read calls the same way. Nothing here knows HTTP or OpenAI's wire shapes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ToolCall", "Parsed", "ForcedCall", "forced_call", "parse_calls", "call_start", "call_state", "call_opener",
           "call_closer", "call_error", "JSON_FAMILIES"]

#: chat formats whose calls are JSON objects
JSON_FAMILIES = ("gemma", "gemma2", "gemma3", "codegemma", "llama3", "llama")
G4_CALL, G4_END, G4_QUOTE = "<|tool_call>", "<tool_call|>", '<|"|>'
_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
_FENCE = re.compile(r"```(?:json|tool_code|tool_call)?[ \t]*\n?")


@dataclass
class ToolCall:
    """One call the model made: the function's name and its arguments (a JSON object)."""

    name: str
    arguments: dict[str, Any]


@dataclass
class Parsed:
    """An answer split into the text before its calls (``content``) and the calls. ``error`` says why text
    that opened like a call is not one (it is then left in ``content``)."""

    content: str
    calls: list[ToolCall] = field(default_factory=list)
    error: str | None = None


def call_opener(family: str, name: str | None = None) -> str:
    """The text that opens a call (to ``name``, when given) in ``family``'s format: what a forced call primes
    the answer with. Gemma 4's opener ends before the arguments' ``{``; JSON formats end before the arguments
    object (or, without a name, before the call object)."""
    if family == "gemma4":
        return G4_CALL + "call:" + (name or "")
    if family in JSON_FAMILIES:
        return "" if name is None else '{"name": ' + json.dumps(name) + ', "parameters": '
    raise ValueError(f"the {family!r} chat format has no tool calls")


def call_closer(family: str, name: str | None = None) -> str:
    """What follows a forced call's arguments: ``}`` closing the JSON call object, ``<tool_call|>`` in Gemma 4."""
    if family == "gemma4":
        return G4_END
    return "}" if name is not None else ""


@dataclass
class ForcedCall:
    """A call the answer must be: the text that opens it (primed into the answer), what the text after the
    opener must follow (a JSON ``schema``, or ``alternatives`` where that text is a tool's name then its JSON
    arguments: Gemma 4 choosing among several tools), and what closes it after that text."""

    name: str | None
    opener: str
    schema: dict[str, Any] | None
    closer: str
    #: tool name -> parameters schema, where the text after the opener is a name then its JSON arguments
    alternatives: dict[str, dict[str, Any]] | None = None


#: the parameters of a tool that declares none
EMPTY_PARAMS: dict[str, Any] = {"type": "object", "properties": {}}


def forced_call(tools: list[dict[str, Any]], tool_choice: str, family: str) -> ForcedCall:
    """The call ``tool_choice`` ("required", or a function's name) forces: the opener to prime the answer
    with and the JSON schema of what the model writes after it. With one candidate function the opener names
    it and the schema is its parameters; "required" among several tools in a JSON format leaves the whole
    call object to the model, constrained to any tool's name with that tool's parameters."""
    by_name = {t["function"]["name"]: t["function"].get("parameters", EMPTY_PARAMS) for t in tools}
    if tool_choice != "required":
        name = tool_choice
    elif len(by_name) == 1:
        name = next(iter(by_name))
    else:
        name = None
    if name is not None:
        return ForcedCall(name, call_opener(family, name), by_name[name], call_closer(family, name))
    if family == "gemma4":  # after "call:": one tool's name, then its arguments (JSON, which the reader takes)
        return ForcedCall(None, call_opener(family), None, call_closer(family), by_name)
    schema = {"anyOf": [{"type": "object", "properties": {"name": {"const": n}, "parameters": p},
                         "required": ["name", "parameters"], "additionalProperties": False}
                        for n, p in by_name.items()]}
    return ForcedCall(None, call_opener(family), schema, call_closer(family))


def call_start(text: str, family: str) -> int | None:
    """Where a call may begin in ``text`` (or a suffix that may still become its opening), so a stream can
    send the text before it and hold the rest; None when no call can start in ``text``."""
    if family == "gemma4":
        i = text.find(G4_CALL)
        if i >= 0:
            return i
        for k in range(min(len(G4_CALL) - 1, len(text)), 0, -1):
            if text.endswith(G4_CALL[:k]):
                return len(text) - k
        return None
    starts = [i for i in (text.find("{"), text.find("["), text.find("`")) if i >= 0]
    return min(starts) if starts else None


#: how a JSON call object may open (whitespace after the brace aside)
_JSON_OPENINGS = ('{"name"', '{"parameters"', '{"arguments"')


def call_state(text: str, family: str) -> str:
    """Whether ``text``, which begins where :func:`call_start` says a call may, is one: "yes" once a call's
    opening is written (``<|tool_call>``; ``{"name"`` or a list or fence holding one), "maybe" while the text
    is still a prefix of such an opening, "no" when it cannot be one (``{braces}`` in prose). A stream holds
    "maybe" text, sends "no" text on, and holds a "yes" call to the end."""
    if family == "gemma4":
        return "yes" if text.startswith(G4_CALL) else "maybe" if G4_CALL.startswith(text) else "no"
    s = text
    if s.startswith("`"):
        if "```".startswith(s):
            return "maybe"
        if not s.startswith("```"):
            return "no"
        nl = s.find("\n", 3)
        lang = (s[3:] if nl < 0 else s[3:nl]).strip()
        if not any(w.startswith(lang) for w in ("json", "tool_code", "tool_call")):  # "" too: a bare fence
            return "no"
        if nl < 0:
            return "maybe"
        s = s[nl + 1:].lstrip()
        if not s:
            return "maybe"
    if s.startswith("["):
        s = s[1:].lstrip()
        if not s:
            return "maybe"
    if not s.startswith("{"):
        return "no"
    compact = "{" + s[1:].lstrip()
    if any(compact.startswith(o) for o in _JSON_OPENINGS):
        return "yes"
    return "maybe" if any(o.startswith(compact) for o in _JSON_OPENINGS) else "no"


def parse_calls(text: str, family: str) -> Parsed:
    """``text`` split into content and calls. Text that is no call stays content; a call-like tail that does
    not parse is kept as content too, with ``error`` saying what is wrong with it."""
    if family == "gemma4":
        return _parse_gemma4(text)
    if family in JSON_FAMILIES:
        return _parse_json(text)
    raise ValueError(f"the {family!r} chat format has no tool calls")


# ---- JSON formats (Gemma 3, Llama 3.1) ------------------------------------------------------------------


def _call_from_json(obj: Any) -> ToolCall:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise ValueError('a call must be a JSON object with a string "name"')
    args = obj.get("parameters", obj.get("arguments", {}))
    if isinstance(args, str):  # some models write the arguments as JSON text
        args = json.loads(args)
    if not isinstance(args, dict):
        raise ValueError(f'the "parameters" of the call to {obj["name"]!r} must be a JSON object')
    extra = set(obj) - {"name", "parameters", "arguments"}
    if extra:
        raise ValueError(f"a call has unexpected keys: {', '.join(sorted(extra))}")
    return ToolCall(obj["name"], args)


def _json_calls(tail: str) -> list[ToolCall]:
    """The calls of a whole tail: one object, a list of objects, or objects separated by ``;`` / newlines,
    optionally in a ``` fence; anything else after them is an error."""
    s = tail.strip()
    fenced = _FENCE.match(s)
    if fenced and s.startswith("```"):
        if not s.endswith("```") or len(s) < fenced.end() + 3:
            raise ValueError("an unclosed ``` block")
        s = s[fenced.end(): -3].strip()
    dec = json.JSONDecoder()
    calls: list[ToolCall] = []
    pos = 0
    while pos < len(s):
        obj, pos = dec.raw_decode(s, pos)
        items = obj if isinstance(obj, list) else [obj]
        if not items:
            raise ValueError("an empty list of calls")
        calls += [_call_from_json(o) for o in items]
        while pos < len(s) and s[pos] in " \t\r\n;":
            pos += 1
    if not calls:
        raise ValueError("no call")
    return calls


def _parse_json(text: str) -> Parsed:
    start = call_start(text, "gemma")
    error = None
    while start is not None:
        try:
            return Parsed(text[:start].rstrip(), _json_calls(text[start:]))
        except (ValueError, RecursionError) as e:
            error = error or str(e)[:200] or type(e).__name__
        nxt = call_start(text[start + 1:], "gemma")
        start = None if nxt is None else start + 1 + nxt
    return Parsed(text, [], error)


# ---- Gemma 4 --------------------------------------------------------------------------------------------


class _G4Reader:
    """A reader of Gemma 4's value notation (strings between ``<|"|>``, bare or quoted keys, JSON scalars);
    plain JSON is read too, which is what a schema-constrained forced call produces."""

    def __init__(self, s: str):
        self.s, self.i = s, 0

    def error(self, what: str) -> ValueError:
        return ValueError(f"{what} at character {self.i} of {self.s[:80]!r}")

    def ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i] in " \t\r\n":
            self.i += 1

    def value(self, depth: int = 0) -> Any:
        if depth > 64:
            raise self.error("nesting too deep")
        self.ws()
        s, i = self.s, self.i
        if s.startswith(G4_QUOTE, i):
            end = s.find(G4_QUOTE, i + len(G4_QUOTE))
            if end < 0:
                raise self.error("an unclosed string")
            self.i = end + len(G4_QUOTE)
            return s[i + len(G4_QUOTE): end]
        if i < len(s) and s[i] == '"':
            v, self.i = json.JSONDecoder().raw_decode(s, i)
            return v
        if i < len(s) and s[i] == "{":
            return self.mapping(depth)
        if i < len(s) and s[i] == "[":
            self.i += 1
            out = []
            self.ws()
            if s.startswith("]", self.i):
                self.i += 1
                return out
            while True:
                out.append(self.value(depth + 1))
                self.ws()
                if s.startswith(",", self.i):
                    self.i += 1
                elif s.startswith("]", self.i):
                    self.i += 1
                    return out
                else:
                    raise self.error("expected , or ]")
        m = re.compile(r"-?\d+(\.\d+)?([eE][+-]?\d+)?|true|false|null|None").match(s, i)
        if not m:
            raise self.error("expected a value")
        self.i = m.end()
        word = m.group(0)
        if word in ("null", "None"):
            return None
        if word in ("true", "false"):
            return word == "true"
        return json.loads(word)

    def key(self) -> str:
        self.ws()
        if self.s.startswith(G4_QUOTE, self.i) or self.s.startswith('"', self.i):
            k = self.value()
            if not isinstance(k, str):
                raise self.error("expected a key")
            return k
        m = _NAME.match(self.s, self.i)
        if not m:
            raise self.error("expected a key")
        self.i = m.end()
        return m.group(0)

    def mapping(self, depth: int = 0) -> dict[str, Any]:
        self.ws()
        if not self.s.startswith("{", self.i):
            raise self.error("expected {")
        self.i += 1
        out: dict[str, Any] = {}
        self.ws()
        if self.s.startswith("}", self.i):
            self.i += 1
            return out
        while True:
            k = self.key()
            self.ws()
            if not self.s.startswith(":", self.i):
                raise self.error("expected :")
            self.i += 1
            out[k] = self.value(depth + 1)
            self.ws()
            if self.s.startswith(",", self.i):
                self.i += 1
            elif self.s.startswith("}", self.i):
                self.i += 1
                return out
            else:
                raise self.error("expected , or }")


def _parse_gemma4(text: str) -> Parsed:
    start = text.find(G4_CALL)
    if start < 0:
        return Parsed(text)
    calls: list[ToolCall] = []
    pos = start
    try:
        while pos < len(text) and text.startswith(G4_CALL, pos):
            pos += len(G4_CALL)
            if not text.startswith("call:", pos):
                raise ValueError("a call must start with 'call:'")
            m = _NAME.match(text, pos + 5)
            if not m:
                raise ValueError("a call has no function name")
            r = _G4Reader(text)
            r.i = m.end()
            args = r.mapping()
            r.ws()
            if not text.startswith(G4_END, r.i):
                raise ValueError(f"the call to {m.group(0)!r} is not closed with {G4_END}")
            calls.append(ToolCall(m.group(0), args))
            pos = r.i + len(G4_END)
            while pos < len(text) and text[pos] in " \t\r\n":
                pos += 1
    except (ValueError, RecursionError) as e:
        return Parsed(text, [], str(e)[:200] or type(e).__name__)
    rest = text[pos:].replace("<|tool_response>", "").strip()
    content = text[:start].rstrip()
    if rest:
        content = (content + "\n" + rest).strip()
    return Parsed(content, calls)


def call_error(call: ToolCall, schemas: Mapping[str, Mapping[str, Any]], forced: str | None = None) -> str | None:
    """Why ``call`` is not a valid call of the tools whose parameter schemas are ``schemas`` (an unknown name,
    another function than the ``forced`` one, arguments off the schema, checked with jsonschema), or None."""
    import jsonschema

    if call.name not in schemas:
        return f"the model called '{call.name}', which is not among the tools ({', '.join(schemas)})"
    if forced is not None and call.name != forced:
        return f"the model called '{call.name}' where tool_choice forces '{forced}'"
    schema = schemas[call.name]
    try:
        err = jsonschema.exceptions.best_match(jsonschema.validators.validator_for(schema)(schema).iter_errors(
            call.arguments))
    except Exception as e:  # noqa: BLE001 - e.g. a $ref the schema does not define: jsonschema cannot apply it
        return f"the parameters schema of '{call.name}' cannot be applied: {type(e).__name__}: {str(e)[:200]}"
    if err is None:
        return None
    where = "/".join(str(p) for p in err.absolute_path) or "(the arguments)"
    return f"the arguments of the call to '{call.name}' do not match its parameters schema at {where}: {err.message}"


def arguments_json(args: Mapping[str, Any]) -> str:
    """The arguments as OpenAI carries them: JSON text."""
    return json.dumps(args, ensure_ascii=False)
