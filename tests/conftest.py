"""Suite-wide hygiene: each xdist worker runs many test files in one process, and the compiled programs of
every file's tiny models would otherwise stay alive until the worker exits. Dropping JAX's caches when a test
file finishes keeps a worker's memory flat over the run (a long-lived worker grew past 8 GB and compiles
then failed for lack of memory); files that share shapes within themselves still share their compilations."""

from __future__ import annotations

import gc

import jax
import pytest


@pytest.fixture(scope="module", autouse=True)
def _free_compiled_programs():
    yield
    jax.clear_caches()
    gc.collect()
