"""How the ``gemmax`` command starts its process: with glibc's transparent-huge-page malloc on Linux.

XLA:CPU allocates a step's large temporaries (a fine-tuning step's [chunk, vocab] logits and their
gradient, ~1.5 GB a step for Gemma 3 270M) afresh on every execution, and glibc serves each from a new
``mmap``: every 4 KiB page is faulted in again, every step. With ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``
glibc asks for transparent huge pages on those mappings (``madvise``), and the same step takes 30x fewer
page faults (a mixed-precision LoRA step of the 270M on a 2-core Zen 4: 2.48 -> 2.07 s). The tunable is read
only when a process starts, so the command re-executes itself once with it set; ``import gemmax`` in a
Python program changes nothing (set the variable before starting Python to get the same effect).

Skipped when the variable already names ``glibc.malloc.hugetlb``, when ``GEMMAX_HUGE_PAGES=0``, off Linux or
glibc, and when the kernel's transparent huge pages are off (``never``).
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb=1"
_MARK = "GEMMAX_RELAUNCHED"


def huge_page_env(environ: dict[str, str] | None = None) -> dict[str, str] | None:
    """The environment to restart with, or None when the process should go on as it is."""
    env = dict(os.environ if environ is None else environ)
    if env.get("GEMMAX_HUGE_PAGES", "1") == "0" or env.get(_MARK) or sys.platform != "linux":
        return None
    if "glibc.malloc.hugetlb" in env.get("GLIBC_TUNABLES", "") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        if "[never]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text():
            return None
    except OSError:
        return None
    tunables = env.get("GLIBC_TUNABLES")
    env["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}" if tunables else TUNABLE
    env[_MARK] = "1"
    return env


def relaunch_with_huge_pages() -> None:
    """Re-execute this process (same interpreter, same command line) with the huge-page tunable, when
    ``huge_page_env`` says so; returns only when it does not."""
    env = huge_page_env()
    if env is None:
        return
    argv = list(getattr(sys, "orig_argv", [])) or [sys.executable, *sys.argv]
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, argv, env)
    except OSError:  # cannot re-execute (an unusual launcher): run as is
        return
