"""What the benchmark scripts share: their argument parser, integer flags from a table, the report that prints
each line and can save them all (``--out``), and the runner of one fresh subprocess per configuration.

The scripts run as ``python benchmarks/NAME.py``, so this file is on their import path as ``_common``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def parser(doc: str | None) -> argparse.ArgumentParser:
    """A script's parser, its module docstring as the description, laid out as written."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def int_flags(ap: argparse.ArgumentParser, **defaults: int) -> None:
    """``--NAME N`` (an integer) for each keyword, its value the default; ``_`` in a name becomes ``-``."""
    for name, default in defaults.items():
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=default)


def save_lines(path: str | None, lines: list[str]) -> None:
    """Write the report's lines to ``path`` (the ``--out`` file), when one is given."""
    if path:
        Path(path).write_text("\n".join(lines) + "\n")


class Report:
    """``say(line)`` prints a line at once (a long run shows its progress) and keeps it for ``save``."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, s: str = "") -> None:
        print(s, flush=True)
        self.lines.append(s)

    def save(self, path: str | None) -> None:
        save_lines(path, self.lines)


def host_malloc_flag(ap: argparse.ArgumentParser) -> None:
    """``--host-malloc``: the C allocator setting every child process (each peer alike) starts with."""
    ap.add_argument("--host-malloc", default="huge-pages", choices=("huge-pages", "system"),
                    help="huge-pages (default): every child starts with glibc's transparent-huge-page tunable, "
                         "as the gemmax commands that run a model do (gemmax.kernels.host_memory); system: "
                         "the environment as it is")


def child_environ(host_malloc: str) -> tuple[dict[str, str], str]:
    """The children's environment for ``--host-malloc`` and a line that names it for the report's header."""
    from gemmax.kernels import host_memory

    env = dict(os.environ)  # run_children adds JAX_PLATFORMS
    if host_malloc == "huge-pages":
        tuned = host_memory.huge_page_environ(env)
        env = tuned if tuned is not None else env
    return env, f"children (both peers) start with GLIBC_TUNABLES={env.get('GLIBC_TUNABLES', '')!r}"


def run_children(script: str, names: Iterable[str], flags: dict[str, Any], stderr_tail: int = 2000,
                 env: dict[str, str] | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """Run each named configuration of ``script`` in a fresh CPU-only process (``--child NAME`` and ``flags``
    as ``--key=value``; ``env``, default this process's), so that each one's peak memory is its own. Yields
    the name and the child's ``RESULT`` JSON, with ``median_step_s`` (of its ``step_seconds``) and the
    process's ``wall_s`` added; a child that fails is reported with the tail of its stderr and skipped."""
    env = dict(env if env is not None else os.environ, JAX_PLATFORMS="cpu")
    for name in names:
        cmd = [sys.executable, script, "--child", name] + [f"--{k}={v}" for k, v in flags.items()]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0 or "RESULT" not in proc.stdout:
            print(f"{name}: failed\n{proc.stderr[-stderr_tail:]}", flush=True)
            continue
        r = json.loads(proc.stdout.split("RESULT", 1)[1])
        r["median_step_s"] = statistics.median(r["step_seconds"])
        r["wall_s"] = time.perf_counter() - t0
        yield name, r


def result_line(name: str, r: dict[str, Any], width: int) -> str:
    """One configuration's row: throughput, median step, peak memory, trainable parameters, process time."""
    return (f"{name:{width}s} {r['tokens_per_s']:8.1f} tok/s  median step {r['median_step_s']:6.2f}s  "
            f"peak RSS {r['peak_rss_mb']:7.0f} MB  trainable {r['trainable']:>11,}  (process {r['wall_s']:.0f}s)")


def dump_json(path: str | None, results: dict[str, Any]) -> None:
    """Write the results to ``path`` (the ``--json`` file), when one is given."""
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
