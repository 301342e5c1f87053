"""The scheduler thread: the one owner of every engine, and the jobs it runs for the HTTP handlers.

See the design notes in :mod:`gemmax.serve.server`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemmax.engine.constrain import token_text
from gemmax.engine.generate import Engine, Request, SamplingParams
from gemmax.engine.repetition import loop_period
from gemmax.kernels import cpu as cpu_kernels
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
    sampling: dict[str, Any] = field(default_factory=dict)  # the checkpoint's sampling defaults, for chat
    instruction_tuned: bool = True  # False: a base model; the server says so at start

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
                 inputs: dict[str, Any] | None = None, keep_special: bool = False, request_id: str = "",
                 timeout: float | None = None, stop_loops: bool = True):
        # what is asked, by whom, and where the events go
        self.model = model
        self.req = Request(list(prompt_ids), sp, inputs=inputs)  # inputs: the family's, e.g. pixel_values
        self.index = index
        self.request_id = request_id  # the HTTP request's id, for log lines about this job
        self.loop = loop
        self.events = events
        # when the choice ends
        self.stop = stop
        self.stop_ids = frozenset(sp.stop_ids)
        self.stop_loops = stop_loops  # finish ("stop") when the text falls into a repetition loop
        self.submitted = time.perf_counter()
        self.deadline = None if timeout is None else self.submitted + timeout
        self.cancelled = False
        self.finished = False
        # the text stream: what has been decoded and sent
        # keep_special: control tokens decoded as their text (Gemma 4's tool-call markers must reach the parser)
        self.decoder = model.tokenizer.stream_decoder(skip_special=not keep_special)
        self.pending = ""  # decoded text not yet sent: held back while it could be the start of a stop string
        self.seen = 0  # how many of req.new_ids have been decoded
        self.lp_seen = 0  # how many of req.logprobs have been sent
        self.last_token_at: float | None = None  # for the inter-token latency histogram

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


# ---- batch widths ---------------------------------------------------------------------------------------


#: an arrival within this long of the previous one counts as the same burst (seconds; 0 turns gathering off)
GATHER_S = 0.01
#: the longest a burst's first request waits for the rest before its prefill (seconds)
MAX_GATHER_S = 0.1


def default_max_batch() -> int:
    """Slots per model when none are asked for. On a CPU, ``cpu_kernels.MAX_ROWS`` (32): past it a decode step
    leaves the native kernels for XLA's dot and each token costs more than in two 32-row steps, so further
    clients queue instead; on an accelerator, 64."""
    return cpu_kernels.MAX_ROWS if jax.default_backend() == "cpu" else 64


def widths(capacity: int) -> list[int]:
    """The batch widths an engine runs at: 1, 4, 8, 16 ... below ``capacity``, then ``capacity``. Each is one
    set of compiled shapes (a decode chunk, greedy and sampled, and its inserts), warmed at start-up. A step
    costs more with more rows (Gemma 3 270M float32 on a 2-core Zen 4: 40 ms at 1 row, 75 at 8, 92 at 16, 139
    at 32; a 16-row step for 8 clients gave 0.7x an 8-row one's throughput), so widths double; 2 is left out
    to save its compiles, as 4 rows cost little more."""
    out, w = [], 1
    while w < capacity:
        out.append(w)
        w = 4 if w == 1 else w * 2
    return [*out, capacity]


def batch_axes(eng: Engine) -> Any:
    """The batch axis of each leaf of the engine's cache (-1 for a leaf without one), read off the family's
    ``init_cache`` at two batch sizes, so that caches of every family are resized without knowing their
    layouts."""
    make = functools.partial(eng.family.init_cache, eng.cfg, max_len=eng.max_len, dtype=eng.dtype)
    one, two = jax.eval_shape(lambda: make(batch=1)), jax.eval_shape(lambda: make(batch=2))

    def axis(a: Any, b: Any) -> int:
        return next((i for i, (x, y) in enumerate(zip(a.shape, b.shape, strict=True)) if x != y), -1)

    return jax.tree.map(axis, one, two)


def row_taker(axes: Any) -> Any:
    """A compiled ``(cache, rows) -> cache`` taking the given rows along each leaf's batch axis; one compile
    per (old width, new width) pair, all of them warmed."""
    leaf_axes = jax.tree.leaves(axes)

    def take(cache: Any, rows: jax.Array) -> Any:
        leaves, tdef = jax.tree.flatten(cache)
        return tdef.unflatten([x if a < 0 else jnp.take(x, rows, axis=a) for x, a in zip(leaves, leaf_axes,
                                                                                          strict=True)])

    return jax.jit(take)


def resize(eng: Engine, width: int, take: Any) -> None:
    """Give the engine ``width`` rows, moving its live requests to the first ones (their ``slot`` follows).

    Rows past the live ones copy a live row's cache and state but are marked done, so they decode nothing
    (a freed slot is reused the same way). Per-row state and processor arrays of any shape are carried along
    axis 0; a request put in a row later resets that row's."""
    live = [s for s, r in enumerate(eng.requests) if r is not None]
    if len(live) > width:
        raise RuntimeError(f"{len(live)} live requests do not fit {width} rows")
    rows = np.asarray(live + [live[0] if live else 0] * (width - len(live)), np.int32)
    eng.cache = take(eng.cache, jnp.asarray(rows))
    st = {k: np.asarray(v)[rows] for k, v in eng.state.items()}
    st["done"][len(live):] = True
    eng.state = eng._put_state(st)
    extra = getattr(eng, "_extra", None)  # per-row processor arrays (penalty counts, logit bias), when made
    if extra:
        eng._extra = eng._put_state({k: jnp.take(v, jnp.asarray(rows), axis=0) for k, v in extra.items()})
    eng.requests = [eng.requests[s] for s in live] + [None] * (width - len(live))
    for i, r in enumerate(eng.requests[: len(live)]):
        r.slot = i
    eng.max_batch = width
    eng.kernels = eng.native and width <= cpu_kernels.MAX_ROWS


# ---- the scheduler --------------------------------------------------------------------------------------


class Scheduler:
    """Owns the engines; admits, steps, detokenizes and retires jobs on one background thread.

    Each engine's batch width follows the load: it starts at one row, grows to the next width of
    :func:`widths` when admitted requests need more (up to ``max_batch``) and steps down again once the
    smaller width has held the live requests for ``shrink_after_s``. A decode step costs more with more rows,
    so a lone request does not pay for a full batch; every width's shapes are compiled at start-up
    (``warmup``), so growing never compiles at request time."""

    def __init__(self, models: Mapping[str, ServedModel], max_batch: int | None = None, chunk: int = 8,
                 max_queue: int = 256, warmup: bool = False, max_chunk_s: float = 0.5,
                 request_timeout: float | None = None, stop_loops: bool = True, shrink_after_s: float = 2.0,
                 metrics: Any = None, gather_s: float = GATHER_S, max_gather_s: float = MAX_GATHER_S):
        self.models = dict(models)
        # batch widths: grown with the load, shrunk after shrink_after_s at a smaller one
        self.max_batch = max_batch or default_max_batch()
        self.shrink_after_s = shrink_after_s
        self._under_since: dict[str, float | None] = {n: None for n in self.models}
        self._take: dict[str, Any] = {}
        # decode chunks: their compiled shapes and measured cost
        self.chunk = chunk
        self.max_chunk_s = max_chunk_s
        self.warmup = warmup
        self._tok_s: dict[str, float] = {}  # seconds per decode step of each engine at its current width
        self._step_s: dict[tuple[str, int], float] = {}  # the same per (engine, width)
        self._compiled: dict[str, set[tuple[int, int]]] = {n: set() for n in self.models}  # (width, chunk)
        self._warmed: dict[tuple[str, int], list[int]] = {}  # chunk lengths compiled at warm-up, per width
        # requests: queued, waiting for a row, live
        self.max_queue = max_queue
        self.request_timeout = request_timeout
        self.stop_loops = stop_loops
        self._inbox: queue.Queue[Job] = queue.Queue()
        self._waiting: dict[str, deque[Job]] = {n: deque() for n in self.models}
        self._live: dict[str, dict[int, Job]] = {n: {} for n in self.models}
        self._n_queued = 0
        # admission: a burst of arrivals is gathered into one prefill (see _gathering)
        self.gather_s = gather_s
        self.max_gather_s = max_gather_s
        self._last_arrival = 0.0
        # the loop's thread
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # what it reports
        self.metrics = metrics
        self.counters = {"completed": 0, "cancelled": 0, "errors": 0, "timeouts": 0, "loops_stopped": 0,
                         "generated_tokens": 0, "steps": 0, "max_live": 0, "prefills": 0}
        self.busy_s = {"decode": 0.0, "prefill": 0.0, "detokenize": 0.0}  # where the scheduler's time goes

    # -- lifecycle --
    def start(self) -> None:
        """Build the engines (one per served name, one row wide to begin with) and start the loop."""
        built: list[ServedModel] = []
        for m in self.models.values():
            if m.engine is None:
                m.engine = Engine(m.params, m.config, max_batch=self._ladder(m)[0], max_len=m.max_len,
                                  chunk=self.chunk, tokenizer=m.tokenizer, prefix_cache=m.prefix_cache,
                                  speculator=m.speculator)
                twin = next((b for b in built if b.config == m.config and b.max_len == m.max_len), None)
                if twin is not None:  # same shapes: reuse the compiled prefill/decode (params are inputs)
                    for attr in ("_prefill", "_insert", "_chunk", "_first"):
                        if hasattr(twin.engine, attr):
                            setattr(m.engine, attr, getattr(twin.engine, attr))
                    self._take[m.name] = self._take[twin.name]
                    for (name, w), v in list(self._warmed.items()):
                        if name == twin.name:
                            self._warmed[(m.name, w)] = v
                            self._step_s[(m.name, w)] = self._step_s[(name, w)]
                            self._compiled[m.name] |= {(w, k) for k in v}
                    if twin.name in self._tok_s:
                        self._tok_s[m.name] = self._tok_s[twin.name]
                else:
                    self._take[m.name] = row_taker(batch_axes(m.engine))
                    if self.warmup:
                        self._warm(m)
            elif m.name not in self._take:
                self._take[m.name] = row_taker(batch_axes(m.engine))
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
        """Compile, at every width the engine may take, what serving runs there: prefill + insert for each
        admission-group size (16-token prompts), the decode chunk, greedy and sampled (sampling settings are
        data: one variant each), and the row moves between widths. The chunk length of each width is fixed
        here, from its measured step time (``_fit_chunk``), so that serving uses only compiled lengths."""
        eng = m.engine
        bos = getattr(m.tokenizer, "bos_id", 2)
        new = max(1, min(64, m.max_len - 9))
        ladder = self._ladder(m)
        for w in ladder:
            if w != eng.max_batch:
                resize(eng, w, self._take[m.name])
            b = 1
            while True:  # group sizes 1, 2, 4 ... and w (prefill pads a group to a power of two)
                self._warm_group(eng, [Request([bos] * 8, SamplingParams(max_new_tokens=new))
                                       for _ in range(min(b, w))])
                if b >= w:
                    break
                b *= 2
            self._warmed[(m.name, w)] = self._warm_decode(m, w, bos, new)
        for w in reversed(ladder[:-1]):  # and the moves back down, one width at a time
            resize(eng, w, self._take[m.name])
        self._tok_s[m.name] = self._step_s[(m.name, eng.max_batch)]

    @staticmethod
    def _warm_group(eng: Engine, reqs: list[Request]) -> None:
        eng.add(reqs)
        for r in reqs:
            eng.release(r)

    def _warm_decode(self, m: ServedModel, w: int, bos: int, new: int) -> list[int]:
        """Compile and time the greedy chunk of ``chunk`` tokens at width ``w``, halving it while it takes
        longer than ``max_chunk_s``; then compile the sampled variant of the length kept."""
        eng = m.engine
        req = Request([bos] * 8, SamplingParams(max_new_tokens=new))
        eng.add([req])
        n = self.chunk
        while True:
            eng.step(n)  # compiles
            t0 = time.perf_counter()
            eng.step(n)
            self._step_s[(m.name, w)] = (time.perf_counter() - t0) / n
            self._compiled[m.name].add((w, n))
            if self._fit_chunk(self._step_s[(m.name, w)]) >= n:
                break
            n //= 2
        eng.release(req)
        req = Request([bos] * 8, SamplingParams(temperature=1.0, max_new_tokens=new))
        eng.add([req])
        eng.step(n)
        eng.release(req)
        return [n]

    def _fit_chunk(self, t: float | None) -> int:
        """``chunk``, halved while a chunk of step time ``t`` would take longer than ``max_chunk_s``."""
        n = self.chunk
        if t is not None:
            while n > 1 and n * t > self.max_chunk_s:
                n //= 2
        return n

    def _n_steps(self, name: str) -> int:
        """Tokens to decode in the next chunk: ``chunk``, halved while a chunk would take longer than
        ``max_chunk_s``. A request that arrives mid-chunk waits for the chunk to end, so on a slow machine
        (or a big batch) short chunks keep time-to-first-token down; on a fast one long chunks amortise the
        per-dispatch overhead. After a warm-up, only the lengths compiled at the current width are used."""
        n = self._fit_chunk(self._tok_s.get(name))
        m = self.models.get(name)
        warmed = self._warmed.get((name, m.engine.max_batch)) if m is not None and m.engine is not None else None
        if warmed:
            return next((k for k in warmed if k <= n), warmed[-1])
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

    def live(self) -> int:
        return sum(len(v) for v in self._live.values())

    def kv_tokens(self) -> tuple[int, int]:
        """(context positions held by live requests, positions the current caches hold), over all engines."""
        used = cap = 0
        for name, m in self.models.items():
            if m.engine is None:
                continue
            cap += m.engine.max_batch * m.engine.max_len
            used += sum(len(j.req.prompt_ids) + len(j.req.new_ids) for j in list(self._live[name].values()))
        return used, cap

    def stats(self) -> dict[str, Any]:
        width = {n: m.engine.max_batch for n, m in self.models.items() if m.engine is not None}
        return {"max_batch": self.max_batch, "chunk": self.chunk, "live": self.live(), "queued": self._n_queued,
                "width": width, "step_ms": {k: round(v * 1000, 2) for k, v in self._tok_s.items()},
                "busy_s": {k: round(v, 3) for k, v in self.busy_s.items()}, **self.counters}

    # -- the loop --
    def _run(self) -> None:
        while not self._stop.is_set():
            busy = any(self._live.values()) or any(self._waiting.values())
            self._intake(block=not busy)
            wait = self._gathering()
            if wait > 0:
                self._intake(block=True, timeout=wait)
                continue
            for name, m in self.models.items():
                self._admit(name, m)
            for name, m in self.models.items():
                if self._live[name]:
                    self._step(name, m)
                self._maybe_shrink(name, m)

    def _intake(self, block: bool, timeout: float = 0.05) -> None:
        try:
            job = self._inbox.get(timeout=timeout) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._waiting[job.model.name].append(job)
            self._last_arrival = time.perf_counter()
            try:
                job = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _gathering(self) -> float:
        """Seconds to wait for more of a burst before admitting (0: admit now).

        A prefill reads every weight once whatever its number of prompts (the 270M: ~60 ms for one short
        prompt, ~18 ms a prompt in a group of 32), so a burst admitted as it trickles in (the first arrival
        alone, then the next few, ...) pays that read several times, and runs decode steps with the batch
        half full in between. While requests keep arriving (one within ``gather_s``) and there is room for
        more than are waiting, the loop waits for the burst to end, at most ``max_gather_s`` after the
        oldest waiting request arrived (decode steps of live rows pause that long at most)."""
        if self.gather_s <= 0:
            return 0.0
        now = time.perf_counter()
        quiet = now - self._last_arrival
        if quiet >= self.gather_s:
            return 0.0
        oldest = min((w[0].submitted for w in self._waiting.values() if w), default=None)
        if oldest is None or now - oldest >= self.max_gather_s:
            return 0.0
        room = self.max_batch - self.live() - sum(len(w) for w in self._waiting.values())
        if room <= 0:
            return 0.0
        return min(self.gather_s - quiet, self.max_gather_s - (now - oldest))

    def _dequeued(self, n: int) -> None:
        with self._lock:
            self._n_queued -= n

    def _expired(self, j: Job, now: float) -> bool:
        return j.deadline is not None and now > j.deadline

    def _time_out(self, j: Job) -> None:
        waited = time.perf_counter() - j.submitted
        log.info("request timed out after %.1fs", waited, extra={"request_id": j.request_id})
        self.counters["timeouts"] += 1
        j.emit("error", APIError(504, f"the request did not finish within {waited:.0f}s (the server's "
                                      "--request-timeout)", type="server_error", code="timeout"))

    def _ladder(self, m: ServedModel) -> list[int]:
        """The widths ``m``'s engine runs at: :func:`widths`, or only ``max_batch`` when it decodes
        speculatively (a draft model's cache and the speculator's compiled steps are sized once)."""
        return [self.max_batch] if m.speculator is not None else widths(self.max_batch)

    def _width_for(self, m: ServedModel, n: int) -> int:
        return next(w for w in self._ladder(m) if w >= n)

    def _resize(self, name: str, m: ServedModel, width: int) -> None:
        resize(m.engine, width, self._take[name])
        self._live[name] = {j.req.slot: j for j in self._live[name].values()}
        t = self._step_s.get((name, width))
        if t is not None:
            self._tok_s[name] = t
        else:
            self._tok_s.pop(name, None)

    def _maybe_shrink(self, name: str, m: ServedModel) -> None:
        """Step down to the next smaller width once it has held the live requests for ``shrink_after_s`` (the
        delay keeps a load that hovers around a width from moving rows back and forth)."""
        w = m.engine.max_batch
        want = self._width_for(m, max(1, len(self._live[name])))
        if want >= w or self._waiting[name]:
            self._under_since[name] = None
            return
        now = time.perf_counter()
        since = self._under_since[name]
        if since is None:
            self._under_since[name] = now
        elif now - since >= self.shrink_after_s:
            self._resize(name, m, self._ladder(m)[self._ladder(m).index(w) - 1])
            self._under_since[name] = None

    def _admit(self, name: str, m: ServedModel) -> None:
        waiting = self._waiting[name]
        room = self.max_batch - len(self._live[name])
        batch, popped = [], 0
        now = time.perf_counter()
        while waiting and (len(batch) < room or waiting[0].cancelled or self._expired(waiting[0], now)):
            j = waiting.popleft()
            popped += 1
            if j.cancelled:
                self.counters["cancelled"] += 1
            elif self._expired(j, now):
                self._time_out(j)
            else:
                batch.append(j)
        if popped:
            self._dequeued(popped)
        if not batch:
            return
        need = len(self._live[name]) + len(batch)
        if need > m.engine.max_batch:
            self._resize(name, m, self._width_for(m, need))
        t0 = time.perf_counter()
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
        self.busy_s["prefill"] += time.perf_counter() - t0
        self.counters["prefills"] += 1
        log.debug("admit: %d prompts, %d live, width %d, in %.3fs", len(batch), len(self._live[name]),
                  m.engine.max_batch, time.perf_counter() - t0)
        for j in batch:
            self._live[name][j.req.slot] = j
            if self.metrics is not None:
                self.metrics.first_token(j.req.first_token_time - j.submitted)
        live = self.live()
        self.counters["max_live"] = max(self.counters["max_live"], live)
        for j in batch:
            self._progress(name, m, j)

    def _step(self, name: str, m: ServedModel) -> None:
        live = self._live[name]
        now = time.perf_counter()
        for j in list(live.values()):
            if j.cancelled:
                self._retire(name, m, j, cancelled=True)
            elif self._expired(j, now):
                self._time_out(j)
                self._retire(name, m, j)
        if not m.engine.has_work():
            return
        n = min(self._n_steps(name), m.engine.step_limit() or self.chunk)  # 1 while a constrained row is live
        w = m.engine.max_batch
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
        elapsed = time.perf_counter() - t0
        self.busy_s["decode"] += elapsed
        log.debug("decode: %d live, width %d, %d tokens in %.3fs", len(live), w, n, elapsed)
        dt = elapsed / max(1, m.engine.steps_run if m.engine.speculator is None else n)  # a chunk may end early
        if (w, n) in self._compiled[name]:  # the first call of a chunk length includes its compilation
            old = self._tok_s.get(name)
            self._tok_s[name] = dt if old is None else 0.8 * old + 0.2 * dt
            self._step_s[(name, w)] = self._tok_s[name]
        self._compiled[name].add((w, n))
        self.counters["steps"] += 1
        t0 = time.perf_counter()
        for j in list(live.values()):
            self._progress(name, m, j)
        self.busy_s["detokenize"] += time.perf_counter() - t0

    def _progress(self, name: str, m: ServedModel, j: Job) -> None:
        """Detokenize a job's new ids, apply stop strings and the loop check, send what is safe, retire it
        when done."""
        if j.cancelled:
            self._retire(name, m, j, cancelled=True)
            return
        r = j.req
        new = r.new_ids[j.seen:]
        j.seen = len(r.new_ids)
        if new and self.metrics is not None:
            now = time.perf_counter()
            if j.last_token_at is not None:
                self.metrics.tokens(len(new), (now - j.last_token_at) / len(new))
            else:
                self.metrics.tokens(len(new), None)
            j.last_token_at = now
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
        if reason is None and j.stop_loops and new and loop_period(r.new_ids):
            reason = "stop"  # a repetition loop: what was sent stays, the rest of the loop is not decoded
            self.counters["loops_stopped"] += 1
            log.info("stopped a repetition loop after %d tokens", len(r.new_ids),
                     extra={"request_id": j.request_id})
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
            log.info("choice %d finished (%s): %d prompt + %d new tokens in %.2fs", j.index, reason,
                     len(r.prompt_ids), len(r.new_ids), time.perf_counter() - j.submitted,
                     extra={"request_id": j.request_id})
            self._retire(name, m, j)

    def _retire(self, name: str, m: ServedModel, j: Job, cancelled: bool = False) -> None:
        if j.finished:
            return
        j.finished = True
        if cancelled:
            self.counters["cancelled"] += 1
            log.info("choice %d cancelled (client gone)", j.index, extra={"request_id": j.request_id})
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
