"""gemmax.kernels.host_memory: when a model-running command restarts itself with glibc's huge-page tunable."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gemmax.kernels import host_memory

LINUX = dict(platform="linux", glibc=(2, 36), thp="madvise")


def test_the_tunable_is_added_where_it_helps():
    env = host_memory.huge_page_environ({"PATH": "/bin"}, **LINUX)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": host_memory.TUNABLE}
    env = host_memory.huge_page_environ({"GLIBC_TUNABLES": "glibc.pthread.rseq=0"}, **dict(LINUX, thp="always"))
    assert env["GLIBC_TUNABLES"] == "glibc.pthread.rseq=0:" + host_memory.TUNABLE  # the user's tunables kept


@pytest.mark.parametrize("environ, host", [
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, LINUX),  # the user's own choice wins
    ({"GLIBC_TUNABLES": host_memory.TUNABLE}, LINUX),  # already restarted: no loop
    ({host_memory.ENV: "system"}, LINUX),  # asked to leave malloc alone
    ({}, dict(LINUX, platform="darwin")),
    ({}, dict(LINUX, glibc=(2, 34))),  # no such tunable before glibc 2.35
    ({}, dict(LINUX, thp="never")),  # huge pages switched off: nothing to gain
])
def test_no_restart_where_it_would_change_nothing(environ, host):
    assert host_memory.huge_page_environ(environ, **host) is None


def test_thp_mode_reads_the_bracketed_word(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert host_memory.thp_mode(str(f)) == "madvise"
    assert host_memory.thp_mode(str(tmp_path / "missing")) is None


def test_restart_replaces_the_process_with_the_tunable_set():
    """The restart re-runs the same command line; the restarted process sees the tunable and goes on."""
    code = ("import os, sys; from gemmax.kernels import host_memory; host_memory.restart_with_huge_pages(); "
            "print(os.environ.get('GLIBC_TUNABLES', ''), sys.argv[1:])")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_memory.ENV)}
    out = subprocess.run([sys.executable, "-c", code, "a", "b"], env=env, capture_output=True, text=True,
                         check=True).stdout.strip()
    want = host_memory.huge_page_environ(env)
    expected = want["GLIBC_TUNABLES"] if want is not None else ""
    assert out == f"{expected} ['a', 'b']"
    out = subprocess.run([sys.executable, "-c", code], env=dict(env, **{host_memory.ENV: "system"}),
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_only_model_commands_restart(monkeypatch):
    from gemmax import cli

    calls = []
    monkeypatch.setattr(host_memory, "restart_with_huge_pages", lambda: calls.append(True))
    monkeypatch.setattr(cli, "main", lambda argv: 0)
    for argv, restarts in ((["info", "x"], False), (["finetune", "--help"], False), (["serve", "m"], True),
                           (["generate", "m", "hi"], True), ([], False)):
        calls.clear()
        monkeypatch.setattr(sys, "argv", ["gemmax", *argv])
        assert cli.entry() == 0
        assert bool(calls) is restarts, argv
