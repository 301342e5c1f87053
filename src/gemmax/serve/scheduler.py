"""The scheduler thread: the one owner of every engine, and the jobs it runs for the HTTP handlers.

See the design notes in :mod:`gemmax.serve.server`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gemmax.engine.constrain import token_text
from gemmax.engine.generate import Engine, Request, SamplingParams
from gemmax.models import base
from gemmax.serve.errors import APIError

log = logging.getLogger("gemmax.serve.server")  # the server's logger: one name for the whole server's logs


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
    #: the engine's prefix cache and speculator (``gemmax.engine.prefix_cache`` / ``speculative``), or None
    prefix_cache: Any = None
    speculator: Any = None

    @property
    def chat_family(self) -> str:
        return base.for_config(self.config).chat_format(self.config)


class Job:
    """One choice of one HTTP request, as the scheduler sees it.

    The scheduler thread fills it; events go back to the handler's event loop through ``call_soon_threadsafe``
    as ``(index, kind, payload)``: ``("delta", text)``, ``("done", (finish_reason, n_tokens))`` or
    ``("error", APIError)``; with ``logprobs`` asked for, ``("logprobs", entries)`` comes before the delta
    of the same tokens, one entry per token (:meth:`logprob_entries`).
    """

    def __init__(self, model: ServedModel, prompt_ids: list[int], sp: SamplingParams, stop: tuple[str, ...],
                 index: int, loop: asyncio.AbstractEventLoop, events: asyncio.Queue,
                 inputs: dict[str, Any] | None = None, keep_special: bool = False):
        self.model = model
        self.req = Request(list(prompt_ids), sp, inputs=inputs)  # inputs: the family's, e.g. pixel_values
        self.stop = stop
        self.index = index
        self.loop = loop
        self.events = events
        self.cancelled = False
        self.finished = False
        # keep_special: control tokens decoded as their text (Gemma 4's tool-call markers must reach the parser)
        self.decoder = model.tokenizer.stream_decoder(skip_special=not keep_special)
        self.stop_ids = frozenset(sp.stop_ids)
        self.pending = ""  # decoded text not yet sent: held back while it could be the start of a stop string
        self.seen = 0  # how many of req.new_ids have been decoded
        self.lp_seen = 0  # how many of req.logprobs have been sent
        self.submitted = time.perf_counter()

    def cancel(self) -> None:
        """Called from the event loop when the client is gone; the scheduler frees the slot."""
        self.cancelled = True

    def logprob_entries(self) -> list[tuple[str, list[int], float, list[tuple[str, list[int], float]]]]:
        """The new tokens' log-probabilities as (text, bytes, logprob, [(text, bytes, logprob)] of the
        alternatives), stop tokens left out (they are not part of the text)."""
        r = self.req

        def text(t: int) -> tuple[str, list[int]]:
            b = token_text(self.model.tokenizer, t)
            return b.decode("utf-8", "replace"), list(b)

        out = []
        for i in range(self.lp_seen, len(r.logprobs)):
            if r.new_ids[i] in self.stop_ids:
                continue
            lp, top = r.logprobs[i]
            out.append((*text(r.new_ids[i]), lp, [(*text(t), v) for t, v in top]))
        self.lp_seen = len(r.logprobs)
        return out

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
                                  chunk=self.chunk, tokenizer=m.tokenizer, prefix_cache=m.prefix_cache,
                                  speculator=m.speculator)
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
            # the sampling variant of the first-token sampler and the decode chunk (one each, whatever the
            # settings: they are data), so the first sampled request does not stall everyone on a compile
            reqs = [Request([bos] * 8, SamplingParams(temperature=1.0, max_new_tokens=new))
                    for _ in range(min(b, self.max_batch))]
            eng.add(reqs)
            if b == 1:
                for n in self._chunk_sizes():
                    eng.step(n)
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
        if len(jobs) > self.max_queue:  # would be refused forever: not a reason to retry (429) but a 400
            raise APIError(400, f"this request asks for {len(jobs)} completions (prompts x n); this server "
                                f"queues at most {self.max_queue}", param="n", code="request_too_large")
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
        n = min(self._n_steps(name), m.engine.step_limit() or self.chunk)  # 1 while a constrained row is live
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
        if r.params.logprobs is not None and len(r.logprobs) > j.lp_seen:
            j.emit("logprobs", j.logprob_entries())
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

