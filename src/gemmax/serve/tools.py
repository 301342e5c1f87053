"""Tool calling over the OpenAI API: ``tools`` / ``tool_choice`` / ``parallel_tool_calls`` read and checked,
forced calls primed and constrained to their tools' schemas, the model's calls parsed out of
its text (:mod:`gemmax.io.tool_calls`), checked against each tool's parameter schema and written in OpenAI's
``tool_calls`` shapes, whole or streamed.

A call that does not match its tool's schema is never returned as a call: under ``"auto"`` it stays text
(``content``), and under a forced ``tool_choice`` the request fails with a 500 naming the mismatch.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jsonschema

from gemmax.engine.constrain import Constraint
from gemmax.engine.generate import SamplingParams
from gemmax.io.tool_calls import (
    EMPTY_PARAMS,
    JSON_FAMILIES,
    ForcedCall,
    Parsed,
    ToolCall,
    arguments_json,
    call_error,
    call_start,
    call_state,
    forced_call,
    parse_calls,
)
from gemmax.serve.errors import APIError, bad

__all__ = ["ForcedCall", "ToolRequest", "ToolStream", "apply_call_constraint", "forced_call", "parse_request",
           "finish_answer", "openai_calls"]

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
TOOL_FAMILIES = (*JSON_FAMILIES, "gemma4")


@dataclass
class ToolRequest:
    """A chat request's tools, checked: the OpenAI tool objects, the choice ("none", "auto", "required" or
    "function"), the forced call if any, whether several calls may come back, and the chat format."""

    tools: list[dict[str, Any]]
    choice: str
    family: str
    parallel: bool = True
    forced: ForcedCall | None = None
    schemas: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        """Whether the tools are declared to the model and its answer read for calls (not under "none")."""
        return self.choice != "none" and bool(self.tools)


# ---- reading the request --------------------------------------------------------------------------------


def _check_tool(i: int, tool: Any) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(name, parameters schema, the tool as rendered) of ``tools[i]``; 400 naming what is malformed."""
    p = f"tools.[{i}]"
    if not isinstance(tool, dict):
        raise bad(f"{p} must be an object", p, "invalid_type")
    if tool.get("type") != "function":
        raise bad(f"{p}.type must be 'function', got {tool.get('type')!r}", f"{p}.type", "invalid_value")
    extra = set(tool) - {"type", "function"}
    if extra:
        raise bad(f"{p} has unknown fields: {', '.join(sorted(extra))}", p, "invalid_value")
    fn = tool.get("function")
    if not isinstance(fn, dict):
        raise bad(f"{p}.function must be an object", f"{p}.function", "invalid_type")
    name = fn.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise bad(f"{p}.function.name must be 1-64 letters, digits, '_' or '-', got {name!r}",
                  f"{p}.function.name", "invalid_value")
    extra = set(fn) - {"name", "description", "parameters", "strict"}
    if extra:
        raise bad(f"{p}.function has unknown fields: {', '.join(sorted(extra))}", f"{p}.function", "invalid_value")
    desc = fn.get("description")
    if desc is not None and not isinstance(desc, str):
        raise bad(f"{p}.function.description must be a string", f"{p}.function.description", "invalid_type")
    if fn.get("strict") not in (None, True, False):
        raise bad(f"{p}.function.strict must be a boolean", f"{p}.function.strict", "invalid_type")
    params = fn.get("parameters", EMPTY_PARAMS)
    where = f"{p}.function.parameters"
    if not isinstance(params, dict) or params.get("type") != "object":
        raise bad(f"{where} must be a JSON schema of type 'object'", where, "invalid_value")
    try:
        jsonschema.validators.validator_for(params).check_schema(params)
    except jsonschema.SchemaError as e:
        raise bad(f"{where} is not a valid JSON schema: {e.message}", where, "invalid_schema") from None
    rendered = {"type": "function", "function": {"name": name, **({"description": desc} if desc else {}),
                                                 "parameters": params}}
    return name, params, rendered


def parse_request(body: Mapping[str, Any], family: str) -> ToolRequest | None:
    """The request's ``tools``, ``tool_choice`` and ``parallel_tool_calls``, checked (400 naming the fault:
    a malformed tool or schema, a duplicate name, a ``tool_choice`` naming no tool); None without tools."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    parallel = body.get("parallel_tool_calls", True)
    if parallel is not None and not isinstance(parallel, bool):
        raise bad("'parallel_tool_calls' must be a boolean", "parallel_tool_calls", "invalid_type")
    if tools is None or tools == []:
        if choice is not None:  # as OpenAI: a choice among no tools is a mistake, whatever it says
            raise bad("'tool_choice' is only allowed when 'tools' are given", "tool_choice", "invalid_value")
        return None
    if not isinstance(tools, list):
        raise bad("'tools' must be a list of tools", "tools", "invalid_type")
    if family not in TOOL_FAMILIES:
        raise bad(f"this model's chat format ({family}) has no tool calls", "tools", "unsupported_parameter")
    checked = [_check_tool(i, t) for i, t in enumerate(tools)]
    names = [n for n, _, _ in checked]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise bad(f"two tools are named '{dup}'", "tools", "invalid_value")
    req = ToolRequest([r for _, _, r in checked], "auto", family, parallel is not False,
                      schemas={n: s for n, s, _ in checked})
    if choice is None or choice in ("none", "auto", "required"):
        req.choice = choice or "auto"
    elif isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise bad("'tool_choice' must be 'none', 'auto', 'required' or "
                      '{"type": "function", "function": {"name": ...}}', "tool_choice", "invalid_value")
        if name not in req.schemas:
            raise bad(f"'tool_choice' names the function '{name}', which is not among the tools "
                      f"({', '.join(names)})", "tool_choice", "invalid_value")
        req.choice = name
    else:
        raise bad("'tool_choice' must be 'none', 'auto', 'required' or an object naming a function",
                  "tool_choice", "invalid_value")
    if req.choice not in ("none", "auto"):
        req.forced = forced_call(req.tools, req.choice, family)
        req.choice = "required" if req.choice == "required" else "function"
    return req


def apply_call_constraint(sp: SamplingParams, forced: ForcedCall | None, family: str) -> SamplingParams:
    """``sp`` with the forced call constrained (``SamplingParams.constraint``): the text after the opener can
    only be a conforming JSON value (Gemma 4: arguments written as JSON, which its call syntax reads, or one
    tool's name then its arguments), the answer ends where the grammar does, and :func:`finish_answer` adds
    the closer."""
    if forced is None or (forced.schema is None and forced.alternatives is None):
        return sp
    if sp.constraint is not None:
        raise bad("response_format cannot be combined with a forced tool call (tool_choice constrains the "
                  "answer to the call's schema)", "tool_choice", "invalid_value")
    sp.constraint = (Constraint.json_schema(forced.schema) if forced.schema is not None
                     else Constraint.named_json(forced.alternatives))
    return sp


# ---- reading the answer ---------------------------------------------------------------------------------


def _parse(text: str, req: ToolRequest) -> Parsed:
    """The answer (the forced call's opener in front) split into content and calls; a forced call whose
    closer the model left to the grammar's end gets it added."""
    f = req.forced
    full = (f.opener if f else "") + text
    parsed = parse_calls(full, req.family)
    if not parsed.calls and f is not None and f.closer:
        again = parse_calls(full + f.closer, req.family)
        if again.calls:
            return again
    return parsed


def finish_answer(text: str, reason: str, req: ToolRequest) -> tuple[str | None, list[ToolCall], str]:
    """(content, calls, finish reason) of one finished choice. Valid calls: finish reason "tool_calls" and
    content the text before them (None when there is none). Under "auto", text that is no valid call is
    content. A forced call the model did not complete (``max_tokens``) comes back as content with finish
    reason "length"; one that does not match its schema is a 500 (:class:`APIError`), never a call."""
    parsed = _parse(text, req)
    forced = req.forced.name if req.forced is not None else None
    errors = [e for e in (call_error(c, req.schemas, forced) for c in parsed.calls) if e]
    if parsed.calls and not errors:
        calls = parsed.calls if req.parallel else parsed.calls[:1]
        return parsed.content or None, calls, "tool_calls"
    if req.forced is None or reason == "length":
        return (req.forced.opener if req.forced else "") + text, [], reason
    why = errors[0] if errors else (parsed.error or "no call in the answer")
    raise APIError(500, f"the model's answer to a forced tool call is not a valid call: {why}",
                   type="server_error", code="invalid_tool_call")


def openai_calls(calls: list[ToolCall]) -> list[dict[str, Any]]:
    """Calls in OpenAI's message shape, each with a fresh id."""
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c.name, "arguments": arguments_json(c.arguments)}} for c in calls]


class ToolStream:
    """One streamed choice's text, split as it arrives: text that cannot be part of a call is sent as content
    at once; where a call may begin (:func:`gemmax.io.tool_calls.call_start`) the text is held while it may
    still open one (:func:`~gemmax.io.tool_calls.call_state`), sent on once it cannot (``{braces}`` in
    prose), and held to the end of the answer once a call has opened, then parsed (:func:`finish_answer`). A
    forced call holds everything."""

    def __init__(self, req: ToolRequest):
        self.req = req
        self.text = ""
        self.sent = 0
        self.held = req.forced is not None

    def feed(self, piece: str) -> str:
        """Add decoded text; return the content that can be sent now."""
        self.text += piece
        if self.held:
            return ""
        out = []
        while True:
            start = call_start(self.text[self.sent:], self.req.family)
            if start is None:
                out.append(self.text[self.sent:])
                self.sent = len(self.text)
                break
            at = self.sent + start
            out.append(self.text[self.sent:at])
            self.sent = at
            state = call_state(self.text[at:], self.req.family)
            if state == "yes":
                self.held = True
                break
            if state == "maybe":
                break
            out.append(self.text[at])  # it opens no call: send it and look further on
            self.sent = at + 1
        return "".join(out)

    def finish(self, reason: str) -> tuple[str, list[ToolCall], str]:
        """(content not yet sent, calls, finish reason) once the choice is done."""
        content, calls, reason = finish_answer(self.text, reason, self.req)
        content = content or ""
        done = self.text[: self.sent]
        if content.startswith(done):
            return content[len(done):], calls, reason
        return ("" if calls else self.text[self.sent:]), calls, reason


def tool_stop_ids(tokenizer: Any, req: ToolRequest) -> tuple[int, ...]:
    """Tokens that end an answer once it has called: Gemma 4 writes ``<|tool_response>`` after its calls (the
    tool's turn to speak), so generation stops there."""
    if req.family != "gemma4" or not hasattr(tokenizer, "piece_to_id"):
        return ()
    i = tokenizer.piece_to_id("<|tool_response>")
    return (i,) if i >= 0 else ()
