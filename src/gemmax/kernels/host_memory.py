"""Transparent huge pages for the large host blocks XLA:CPU allocates on every execution.

XLA:CPU allocates each execution's temporaries afresh (one block the size of the program's scratch: 2.6 GB
for a full fine-tuning step of Gemma 3 270M at 4 x 128 tokens) and frees them when it ends. glibc's malloc
serves every block above 32 MB with an ``mmap`` of its own and unmaps it on ``free``, so every step touches
gigabytes of new memory, and the kernel zero-fills it on first write one 4 KB page at a time. On a two-core
AMD EPYC VM that step took 813k page faults and 2.0-2.3 s of system time (3.8 s a step). glibc's
``glibc.malloc.hugetlb=1`` tunable asks for transparent huge pages (``madvise``) on those blocks: 2 MB
pages, 3.6k faults and 0.17 s of system time a step, 2.5 s a step, the same peak memory (6.2 GB).

A tunable is read when the process starts, so it cannot be switched on from inside a running program:
``restart_with_huge_pages`` replaces the process by the same command with the tunable added to
``GLIBC_TUNABLES``. The ``gemmax`` commands that run a model, ``python -m gemmax.finetune`` and
``python -m gemmax.demo`` do it first thing; a Python program that calls ``fit`` itself gets the same by
starting with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (``docs/finetuning.md``, "Host memory on Linux").

Nothing changes off Linux, with glibc older than 2.35 (no such tunable), with transparent huge pages
switched off (``never``), when ``GLIBC_TUNABLES`` already names a ``glibc.malloc.hugetlb`` setting (the
user's own wins), or with ``GEMMAX_HOST_MALLOC=system``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

#: The glibc tunable added to ``GLIBC_TUNABLES``.
TUNABLE = "glibc.malloc.hugetlb=1"

#: Environment variable: ``system`` leaves the C allocator as the environment sets it.
ENV = "GEMMAX_HOST_MALLOC"

_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def glibc_version() -> tuple[int, int] | None:
    """``(major, minor)`` of the process's glibc, or None for another C library."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    except (AttributeError, ValueError, OSError, TypeError):
        return None
    if name != "glibc":
        return None
    try:
        major, minor = version.split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return None


def thp_mode(path: str = _THP_ENABLED) -> str | None:
    """The kernel's transparent huge page mode (``always``, ``madvise`` or ``never``), None if unknown."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def huge_page_environ(environ: Mapping[str, str] | None = None, *, platform: str | None = None,
                      glibc: tuple[int, int] | None = None, thp: str | None = None) -> dict[str, str] | None:
    """The environment to restart with (``environ`` plus the tunable), or None when a restart would change
    nothing or is not wanted. ``platform`` / ``glibc`` / ``thp``: the host's, read when not given."""
    env = dict(os.environ if environ is None else environ)
    if env.get(ENV, "").strip().lower() == "system":
        return None
    tunables = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables:
        return None
    if not (platform or sys.platform).startswith("linux"):
        return None
    version = glibc if glibc is not None else glibc_version()
    if version is None or version < (2, 35):
        return None
    if (thp if thp is not None else thp_mode()) not in ("always", "madvise"):
        return None
    env["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}" if tunables else TUNABLE
    return env


def restart_with_huge_pages() -> None:
    """Replace this process by the same command (``sys.orig_argv``) with ``TUNABLE`` in ``GLIBC_TUNABLES``;
    return at once when ``huge_page_environ`` says there is nothing to do. Call it before any work: the
    process image is replaced, nothing after the call runs in this process."""
    env = huge_page_environ()
    if env is None or not sys.executable:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(sys.orig_argv), env)
