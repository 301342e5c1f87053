"""Suite-wide settings.

Memory: each xdist worker runs many test files in one process, and the compiled programs of every file's tiny
models would otherwise stay alive until the worker exits. Dropping JAX's caches when a test file finishes
keeps a worker's memory flat over the run (a long-lived worker grew past 8 GB and compiles then failed for
lack of memory); files that share shapes within themselves still share their compilations.

Time: most tests run tiny models, so most of the suite's time is XLA compiling them. Two settings cut it
without changing what is computed:
- XLA:CPU's LLVM back end runs at optimisation level 0 (``--xla_backend_optimization_level=0``): the HLO
  passes, and so the programs' operations and their order, are the same; only machine-code quality drops,
  which tiny models do not feel (the native kernels are compiled by g++ either way). A subprocess a test
  starts inherits it.
- A persistent compilation cache for this run only (a fresh folder, shared by both xdist workers, removed
  at the end): a program that a later test file compiles again, after ``jax.clear_caches()``, is read back.
Benchmarks and the demo run with JAX's defaults.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
from pathlib import Path

os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"),
                                                 "--xla_backend_optimization_level=0"]))

import jax  # noqa: E402 - after XLA_FLAGS, which the CPU backend reads when it starts
import pytest  # noqa: E402

# named by the first process (pytest itself, or xdist's controller), whose environment the workers inherit
_CACHE = Path(os.environ.setdefault("GEMMAX_TEST_XLA_CACHE",
                                    str(Path(tempfile.gettempdir()) / f"gemmax-test-xla-cache-{os.getpid()}")))
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.3)


def pytest_sessionfinish(session: pytest.Session) -> None:
    if not hasattr(session.config, "workerinput"):  # the controller (or a run without xdist): workers are done
        shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def _free_compiled_programs():
    yield
    jax.clear_caches()
    gc.collect()
