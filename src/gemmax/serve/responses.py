"""Writing answers: the OpenAI response bodies, usage, and server-sent-event streaming.

An endpoint hands its queued jobs over as an :class:`Answer`; it is either collected into one JSON body or
streamed as ``data: {...}`` events, one per decoded piece of text, ending with ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request as HTTPRequest
from fastapi.responses import StreamingResponse

from gemmax.models import base as family_base
from gemmax.serve.errors import APIError
from gemmax.serve.scheduler import Job, ServedModel
from gemmax.serve.tools import ToolRequest, ToolStream, finish_answer, openai_calls

ChunkFn = Callable[[int, str | None, str | None], dict[str, Any]]  # (choice index, text, finish reason)
#: a choice's token log-probabilities as the scheduler sends them (``Job.logprob_entries``)
Entries = list[tuple[str, list[int], float, list[tuple[str, list[int], float]]]]
LogprobFn = Callable[[int, Entries], dict[str, Any]]  # (choice index, entries) -> the endpoint's shape


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def model_card(m: ServedModel) -> dict[str, Any]:
    """A served name as ``/v1/models`` lists it; an adapter names its base model as ``parent``.
    ``input_modalities`` says whether chat messages may carry ``image_url`` parts, so that a client (the chat
    page) offers an image upload only where the model reads images; ``instruction_tuned`` false marks a base
    (pretrained) model, which continues text rather than answering, so that the page can say so up front."""
    reads_images = family_base.for_config(m.config).encode_prompt is not None
    card = {"id": m.name, "object": "model", "created": m.created, "owned_by": "gemmax",
            "max_model_len": m.max_len, "input_modalities": ["text", "image"] if reads_images else ["text"],
            "instruction_tuned": m.instruction_tuned}
    if m.base:
        card["parent"] = m.base
    return card


@dataclass
class Answer:
    """One request's queued jobs (one per choice, in choice order) and what every reply to it shares."""

    jobs: list[Job]
    events: asyncio.Queue  # (choice index, kind, payload) from the scheduler thread, see Job
    base: dict[str, Any]  # id, object, created, model: the fields every body and chunk starts with
    prompt_tokens: int
    include_usage: bool  # streamed chunks carry "usage": null, and a last chunk carries the totals
    #: each choice's token log-probabilities (filled by ``collect`` when the request asked for them)
    logprobs: list[Entries] = field(default_factory=list)

    def final(self, base: dict[str, Any]) -> Callable[[int], dict[str, Any]] | None:
        """The last streamed chunk, given the completion tokens (only when ``include_usage``)."""
        if not self.include_usage:
            return None
        return lambda t: dict(base, choices=[], usage=usage(self.prompt_tokens, t))


# ---- waiting for the whole answer -----------------------------------------------------------------------


DISCONNECT_POLL_S = 0.25  # how often a non-streaming handler checks that its client is still there


async def collect(request: HTTPRequest, a: Answer) -> tuple[list[str], list[str], int]:
    """Every choice's text and finish reason, and the tokens generated. Checks for a vanished client every
    ``DISCONNECT_POLL_S`` of wall time, however busy its jobs are (text arriving every chunk must not hide
    the hang-up): its jobs are cancelled (slots freed) rather than decoded for nobody, and it gets a 499."""
    jobs, events = a.jobs, a.events
    texts = [""] * len(jobs)
    reasons = [""] * len(jobs)
    a.logprobs = [[] for _ in jobs]
    tokens = 0
    left = len(jobs)
    loop = asyncio.get_running_loop()
    next_poll = loop.time() + DISCONNECT_POLL_S
    try:
        while left:
            if loop.time() >= next_poll:
                if await request.is_disconnected():  # nobody will read the answer: free the slots
                    raise APIError(499, "client closed the request", code="client_closed")
                next_poll = loop.time() + DISCONNECT_POLL_S
            try:
                i, kind, payload = await asyncio.wait_for(events.get(), timeout=max(0.0, next_poll - loop.time()))
            except TimeoutError:
                continue
            if kind == "delta":
                texts[i] += payload
            elif kind == "logprobs":
                a.logprobs[i] += payload
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


# ---- streaming ------------------------------------------------------------------------------------------


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class SSEResponse(StreamingResponse):
    """Closes the event generator however the response ends, so an abandoned stream frees its slot at
    once instead of whenever the generator is garbage collected."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


class _Chunks:
    """A stream's chunk maker that holds each choice's token log-probabilities until that choice's next chunk,
    which carries them (``logprobs`` shapes them; without it they are dropped)."""

    def __init__(self, make_chunk: ChunkFn, logprobs: LogprobFn | None) -> None:
        self._make = make_chunk
        self._logprobs = logprobs
        self._pending: dict[int, Entries] = {}

    def hold(self, i: int, entries: Entries) -> None:
        self._pending.setdefault(i, []).extend(entries)

    def __call__(self, i: int, text: str | None, reason: str | None) -> dict[str, Any]:
        d = self._make(i, text, reason)
        if self._logprobs is not None and i in self._pending:
            d["choices"][0]["logprobs"] = self._logprobs(i, self._pending.pop(i))
        return d


async def stream_events(jobs: list[Job], events: asyncio.Queue, make_chunk: ChunkFn, first: list[str],
                        final_usage: Callable[[int], dict[str, Any]] | None,
                        logprobs: LogprobFn | None = None) -> AsyncIterator[str]:
    """The event stream: ``first`` as is, one chunk per delta and per finished choice, an error as its
    OpenAI body (ending the stream), the usage chunk when asked for, then ``[DONE]``. Token
    log-probabilities ride on the next chunk of their choice (``logprobs`` shapes them). However it ends,
    the jobs are cancelled: a no-op for finished ones, a freed slot for abandoned ones."""
    tokens = 0
    left = len(jobs)
    chunk = _Chunks(make_chunk, logprobs)
    try:
        for s in first:
            yield s
        while left:
            i, kind, payload = await events.get()
            if kind == "delta":
                yield sse(chunk(i, payload, None))
            elif kind == "logprobs":
                chunk.hold(i, payload)
            elif kind == "done":
                reason, n = payload
                tokens += n
                left -= 1
                yield sse(chunk(i, None, reason))
            else:
                yield sse(payload.body())
                break
        if final_usage is not None and not left:
            yield sse(final_usage(tokens))
        yield "data: [DONE]\n\n"
    finally:
        for j in jobs:
            j.cancel()


def _stream(a: Answer, chunk: ChunkFn, first: list[str], base: dict[str, Any],
            logprobs: LogprobFn | None = None) -> SSEResponse:
    return SSEResponse(stream_events(a.jobs, a.events, chunk, first, a.final(base), logprobs),
                       media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# ---- token log-probabilities ----------------------------------------------------------------------------


def completion_logprobs(entries: Entries, offset: int = 0) -> dict[str, Any]:
    """/v1/completions' shape: parallel lists of tokens, their log-probabilities, the alternatives (token
    -> log-probability) and each token's character offset in the choice's text (from ``offset``)."""
    offsets = []
    for tok, _, _, _ in entries:
        offsets.append(offset)
        offset += len(tok)
    return {"tokens": [e[0] for e in entries], "token_logprobs": [e[2] for e in entries],
            "top_logprobs": [{t: v for t, _, v in e[3]} for e in entries], "text_offset": offsets}


def chat_logprobs(entries: Entries) -> dict[str, Any]:
    """/v1/chat/completions' shape: one ``{token, logprob, bytes, top_logprobs}`` per token."""
    return {"content": [{"token": t, "logprob": lp, "bytes": b,
                         "top_logprobs": [{"token": x, "logprob": v, "bytes": xb} for x, xb, v in top]}
                        for t, b, lp, top in entries], "refusal": None}


def _wants_logprobs(a: Answer) -> bool:
    return any(j.req.params.logprobs is not None for j in a.jobs)


# ---- /v1/completions ------------------------------------------------------------------------------------


def completion_base(m: ServedModel) -> dict[str, Any]:
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": m.name}


def stream_completion(a: Answer, texts: list[str], n: int, echo: bool) -> SSEResponse:
    """Streamed completions; with ``echo`` each choice opens with its prompt's text."""

    def chunk(i: int, text: str | None, reason: str | None) -> dict[str, Any]:
        d = dict(a.base, choices=[{"text": text or "", "index": i, "logprobs": None, "finish_reason": reason}])
        if a.include_usage:
            d["usage"] = None
        return d

    first = [sse(chunk(p * n + c, texts[p], None)) for p in range(len(texts)) for c in range(n)] if echo else []
    offsets = [len(texts[i // n]) if echo else 0 for i in range(len(a.jobs))]

    def logprobs(i: int, entries: Entries) -> dict[str, Any]:
        out = completion_logprobs(entries, offsets[i])
        offsets[i] += sum(len(e[0]) for e in entries)
        return out

    return _stream(a, chunk, first, a.base, logprobs if _wants_logprobs(a) else None)


def completion_body(a: Answer, outs: list[str], reasons: list[str], tokens: int, texts: list[str], n: int,
                    echo: bool) -> dict[str, Any]:
    """The whole completions answer; choice ``i`` belongs to prompt ``i // n``."""
    lps = a.logprobs if _wants_logprobs(a) else None
    choices = [{"text": (texts[i // n] if echo else "") + outs[i], "index": i,
                "logprobs": completion_logprobs(lps[i], len(texts[i // n]) if echo else 0) if lps else None,
                "finish_reason": reasons[i]} for i in range(len(a.jobs))]
    return dict(a.base, choices=choices, usage=usage(a.prompt_tokens, tokens))


# ---- /v1/chat/completions -------------------------------------------------------------------------------


def chat_base(m: ServedModel) -> dict[str, Any]:
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": m.name, "system_fingerprint": None}


def stream_chat(a: Answer, tools: ToolRequest | None = None) -> SSEResponse:
    """Streamed chat: each choice opens with an empty assistant turn (OpenAI clients expect the role first),
    then content deltas; a finished choice gets an empty delta with its finish reason. With tools, each
    choice's calls come as ``tool_calls`` deltas (the call's id, type and name, then its arguments) before
    its finish reason "tool_calls"."""
    cbase = dict(a.base, object="chat.completion.chunk")

    def chunk(i: int, text: str | None, reason: str | None) -> dict[str, Any]:
        delta = {} if text is None else {"content": text}
        d = dict(cbase, choices=[{"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}])
        if a.include_usage:
            d["usage"] = None
        return d

    first = []
    for i in range(len(a.jobs)):
        c = chunk(i, "", None)
        c["choices"][0]["delta"] = {"role": "assistant", "content": ""}
        first.append(sse(c))
    lp = (lambda i, e: chat_logprobs(e)) if _wants_logprobs(a) else None
    if tools is None:
        return _stream(a, chunk, first, cbase, lp)
    events = _tool_events(a, tools, chunk, lp)
    return SSEResponse(_tool_stream(events, first, a.final(cbase)), media_type="text/event-stream",
                       headers={"Cache-Control": "no-cache"})


async def _tool_events(a: Answer, tools: ToolRequest, make_chunk: ChunkFn, logprobs: LogprobFn | None
                       ) -> AsyncIterator[dict[str, Any] | int]:
    """The chunks of a streamed chat with tools (then, last, the tokens generated): content passes through each
    choice's :class:`ToolStream`, which holds back what may be a call; at a choice's end its calls are sent as
    ``tool_calls`` deltas. Token log-probabilities ride on the next chunk their choice sends. An error (a
    forced call off its schema) is sent as its body and ends the stream."""
    streams = [ToolStream(tools) for _ in a.jobs]
    tokens, left = 0, len(a.jobs)
    chunk = _Chunks(make_chunk, logprobs)
    try:
        while left:
            i, kind, payload = await a.events.get()
            if kind == "logprobs":
                chunk.hold(i, payload)
            elif kind == "delta":
                out = streams[i].feed(payload)
                if out:
                    yield chunk(i, out, None)
            elif kind == "done":
                reason, n = payload
                tokens += n
                left -= 1
                try:
                    rest, calls, reason = streams[i].finish(reason)
                except APIError as e:
                    yield e.body()
                    return
                if rest:
                    yield chunk(i, rest, None)
                for k, call in enumerate(openai_calls(calls)):
                    head = {"index": k, "id": call["id"], "type": "function",
                            "function": {"name": call["function"]["name"], "arguments": ""}}
                    for part in (head, {"index": k, "function": {"arguments": call["function"]["arguments"]}}):
                        c = chunk(i, None, None)
                        c["choices"][0]["delta"] = {"tool_calls": [part]}
                        yield c
                yield chunk(i, None, reason)
            else:
                yield payload.body()
                return
        yield tokens
    finally:
        for j in a.jobs:
            j.cancel()


async def _tool_stream(events: AsyncIterator[dict[str, Any] | int], first: list[str],
                       final_usage: Callable[[int], dict[str, Any]] | None) -> AsyncIterator[str]:
    """``first``, then the chunks as server-sent events, the usage chunk when asked for (and the stream
    completed), ``[DONE]``."""
    try:
        for s in first:
            yield s
        async for ev in events:
            if isinstance(ev, int):
                if final_usage is not None:
                    yield sse(final_usage(ev))
            else:
                yield sse(ev)
        yield "data: [DONE]\n\n"
    finally:
        await events.aclose()


def chat_body(a: Answer, outs: list[str], reasons: list[str], tokens: int, tools: ToolRequest | None = None
              ) -> dict[str, Any]:
    """The whole chat answer; with tools, each choice's calls parsed out of its text into ``tool_calls``
    (``finish_answer``: a forced call off its schema raises the 500)."""
    lps = a.logprobs if _wants_logprobs(a) else None
    choices = []
    for i in range(len(a.jobs)):
        message: dict[str, Any] = {"role": "assistant", "content": outs[i]}
        reason = reasons[i]
        if tools is not None:
            content, calls, reason = finish_answer(outs[i], reason, tools)
            message["content"] = content
            if calls:
                message["tool_calls"] = openai_calls(calls)
        choices.append({"index": i, "message": message, "logprobs": chat_logprobs(lps[i]) if lps else None,
                        "finish_reason": reason})
    return dict(a.base, choices=choices, usage=usage(a.prompt_tokens, tokens))
