"""Load test of ``gemmax serve`` on loopback: throughput and latency at several client concurrencies.

Starts the server as a subprocess bound to 127.0.0.1 (default model: the real Gemma 3 270M Q4_K_M GGUF,
loaded as float32), then for each concurrency C runs C clients that each send ``--requests`` streaming
completions of exactly ``--max-tokens`` new tokens (``ignore_eos``), one after the other. Everything is bounded:
a per-level deadline, per-request timeouts, and the server is stopped at the end.

    python benchmarks/serve.py                       # 1, 8 and 32 clients, 32 new tokens each
    python benchmarks/serve.py --concurrency 1 8 --requests 2 --baseline

Throughput counts generated tokens over the level's wall time; latency is per request (submit to last
token), TTFT to the first streamed text. ``--baseline`` adds a run at 1 client against a second server with
one slot, i.e. without the cost of padding a single request to a full batch.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
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


def start_server(args: argparse.Namespace, max_batch: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "gemmax.serve.server", "--host", "127.0.0.1", "--port", str(port),
           "--max-batch", str(max_batch), "--chunk", str(args.chunk), "--max-len", str(args.max_len),
           "--log-level", "warning"]
    if args.model:
        cmd += ["--model", args.model]
    proc = subprocess.Popen(cmd, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + args.startup_timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).json().get("status") == "ok":
                return proc, url
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(1)
    stop_server(proc)
    raise SystemExit("server did not start in time")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> dict[str, float]:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft = None
    tokens = 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                raise RuntimeError(ev["error"]["message"])
            if ev.get("choices") and ev["choices"][0]["text"] and ttft is None:
                ttft = time.perf_counter() - t0
            if ev.get("usage"):
                tokens = ev["usage"]["completion_tokens"]
    return {"latency": time.perf_counter() - t0, "ttft": ttft or 0.0, "tokens": tokens}


async def run_level(url: str, concurrency: int, requests: int, max_tokens: int, deadline_s: float
                    ) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=deadline_s, limits=limits) as client:
        async def worker(w: int) -> list[dict[str, float]]:
            return [await one_request(client, url, PROMPTS[(w + k) % len(PROMPTS)], max_tokens)
                    for k in range(requests)]

        t0 = time.perf_counter()
        results = await asyncio.wait_for(asyncio.gather(*(worker(w) for w in range(concurrency))), deadline_s)
        wall = time.perf_counter() - t0
    flat = [x for rs in results for x in rs]
    lat = sorted(x["latency"] for x in flat)
    tokens = sum(x["tokens"] for x in flat)
    return {"concurrency": concurrency, "requests": len(flat), "tokens": tokens, "wall_s": wall,
            "tok_s": tokens / wall, "p50_s": statistics.median(lat), "p99_s": _pct(lat, 0.99),
            "ttft_p50_s": statistics.median(x["ttft"] for x in flat)}


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def table(rows: list[dict[str, Any]]) -> str:
    head = f"{'server':>10} {'clients':>7} {'reqs':>5} {'tokens':>7} {'wall s':>8} {'tok/s':>8} {'p50 s':>7} " \
           f"{'p99 s':>7} {'TTFT p50':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['server']:>10} {r['concurrency']:>7} {r['requests']:>5} {r['tokens']:>7} "
                     f"{r['wall_s']:>8.1f} {r['tok_s']:>8.1f} {r['p50_s']:>7.2f} {r['p99_s']:>7.2f} "
                     f"{r['ttft_p50_s']:>9.2f}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model handle (default: Gemma 3 270M from PyPI)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=2, help="requests per client at each level")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=1, help="measure each level this many times; medians reported")
    ap.add_argument("--level-timeout", type=float, default=600.0)
    ap.add_argument("--startup-timeout", type=float, default=600.0)
    ap.add_argument("--baseline", action="store_true", help="also 1 client against a 1-slot server")
    ap.add_argument("--json", default=None, help="write the rows here too")
    args = ap.parse_args()

    rows: list[dict[str, Any]] = []
    servers = [(f"batch{args.max_batch}", args.max_batch, args.concurrency)]
    if args.baseline:
        servers.append(("batch1", 1, [1]))
    for label, mb, levels in servers:
        t_start = time.time()
        proc, url = start_server(args, mb)
        print(f"[{label}] server up in {time.time() - t_start:.0f}s (load + warm-up compile)", flush=True)
        try:
            # one short untimed round so the first measured requests do not pay for lazy set-up
            asyncio.run(run_level(url, 1, 1, 4, args.level_timeout))
            for c in levels:
                runs = [asyncio.run(run_level(url, c, args.requests, args.max_tokens, args.level_timeout))
                        for _ in range(args.repeats)]
                row = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                row.update(server=label, concurrency=c, requests=runs[0]["requests"], tokens=runs[0]["tokens"])
                rows.append(row)
                print(table([row]).splitlines()[-1], flush=True)
        finally:
            stop_server(proc)
    print()
    print(table(rows))
    main_rows = {r["concurrency"]: r for r in rows if r["server"] == servers[0][0]}
    lo, hi = min(main_rows), max(main_rows)
    if lo != hi:
        ratio = main_rows[hi]["tok_s"] / main_rows[lo]["tok_s"]
        print(f"\nthroughput@{hi} / throughput@{lo} (same server): {ratio:.1f}x")
    base = [r for r in rows if r["server"] == "batch1"]
    if base and hi in main_rows:
        print(f"throughput@{hi} / single-slot server @1: {main_rows[hi]['tok_s'] / base[0]['tok_s']:.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
