"""llama.cpp as a peer for benchmarks and tests, through the prebuilt CPU library that the PyPI package
``llama-cpp-cffi`` ships (llama-cpp-python has no wheel for this machine and takes ~37 min to build).

Only its raw cffi module ``llama._llama_cpp_cpu`` is used, loaded by file path: the package's Python layer
pins transformers < 5 and huggingface-hub < 0.29, so the Makefile installs it with ``--no-deps`` and this
module never imports that layer. The binary was built with GCC 14 and needs one libstdc++ symbol that older
systems (Debian 12: GCC 12) lack, ``__cxa_call_terminate``; when it is missing a two-line shim is compiled
with the system g++ once and loaded first. Tokens go in and logits come out as numpy arrays, so both
sides of a comparison see the same ids and nothing depends on llama.cpp's own sampler or tokenizer.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import importlib.util
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

_SHIM = ('#include <exception>\n'
         'extern "C" [[noreturn]] void __cxa_call_terminate(void*) noexcept { std::terminate(); }\n')
_lib: Any = None
_ffi: Any = None


def _package_dir() -> Path:
    for entry in sys.path:
        cand = Path(entry or ".") / "llama"
        if glob.glob(str(cand / "_llama_cpp_cpu*.so")):
            return cand
    raise ImportError("llama.cpp peer: the package llama-cpp-cffi is not installed "
                      "(`pip install --no-deps llama-cpp-cffi==0.4.42 cffi`)")


def _shim() -> Path:
    """Compile (once, cached) the libstdc++ symbol the GCC 14 build expects."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gemmax"
    cache.mkdir(parents=True, exist_ok=True)
    out = cache / "libcxa_call_terminate.so"
    if not out.exists():
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "shim.cc"
            src.write_text(_SHIM)
            tmp_out = Path(tmp) / out.name
            subprocess.run(["g++", "-shared", "-fPIC", "-O2", str(src), "-o", str(tmp_out)], check=True)
            os.replace(tmp_out, out)
    return out


def load_library() -> tuple[Any, Any]:
    """(lib, ffi) of the llama.cpp CPU build; the backend is initialised once per process."""
    global _lib, _ffi
    if _lib is not None:
        return _lib, _ffi
    so = glob.glob(str(_package_dir() / "_llama_cpp_cpu*.so"))[0]
    spec = importlib.util.spec_from_file_location("_llama_cpp_cpu", so)
    assert spec is not None and spec.loader is not None
    try:
        mod = importlib.util.module_from_spec(spec)
    except ImportError as e:
        if "__cxa_call_terminate" not in str(e):
            raise
        ctypes.CDLL(str(_shim()), mode=ctypes.RTLD_GLOBAL)
        mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    _lib, _ffi = mod.lib, mod.ffi
    with quiet_stderr():
        _lib.llama_backend_init()
    return _lib, _ffi


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """llama.cpp logs thousands of lines to fd 2 while loading; keep them out of test and benchmark output."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class LlamaCpp:
    """One llama.cpp model + context on the CPU: feed token ids, read float32 logits.

    ``kv_cache`` is llama.cpp's K/V cache dtype: "f16" is its default (and what its tools use, so what a
    speed comparison should use); "f32" removes that rounding, so that an f32 model file is computed in
    float32 throughout and agreement with gemmax can be checked to ~1e-5 rather than to f16 noise.

    ``threads``: ggml's threads wait for each other at every graph node by spinning, so when the machine
    has fewer free cores than ``threads`` (a shared 2-core box) each barrier can cost a scheduler time
    slice: the tiny test models then take ~0.7 s per token with 2 threads and ~0.3 ms with 1. Tests use 1.
    """

    def __init__(self, path: str | os.PathLike, n_ctx: int = 2048, threads: int = 2, n_batch: int = 512,
                 kv_cache: str = "f16"):
        lib, ffi = load_library()
        self.lib, self.ffi = lib, ffi
        mp = lib.llama_model_default_params()
        mp.n_gpu_layers = 0
        with quiet_stderr():
            self.model = lib.llama_model_load_from_file(str(path).encode(), mp)
        if self.model == ffi.NULL:
            raise ValueError(f"llama.cpp could not load {path}")
        self.n_vocab = int(lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model)))
        cp = lib.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, n_batch, n_batch
        cp.n_threads = cp.n_threads_batch = threads
        cp.type_k = cp.type_v = {"f16": lib.GGML_TYPE_F16, "f32": lib.GGML_TYPE_F32}[kv_cache]
        with quiet_stderr():
            self.ctx = lib.llama_init_from_model(self.model, cp)
        if self.ctx == ffi.NULL:
            raise ValueError(f"llama.cpp could not create a context for {path}")
        self.n_batch, self.n_ctx = n_batch, n_ctx
        self.n_past = 0

    def reset(self) -> None:
        """Forget the KV cache (a new sequence starts at position 0)."""
        self.lib.llama_kv_self_clear(self.ctx)
        self.n_past = 0

    def _last_logits_view(self) -> np.ndarray:
        """The last position's logits in llama.cpp's own buffer (valid until the next decode)."""
        ptr = self.lib.llama_get_logits_ith(self.ctx, -1)
        return np.frombuffer(self.ffi.buffer(ptr, self.n_vocab * 4), np.float32)

    @property
    def size_bytes(self) -> int:
        """Bytes of the model's tensors as stored (quantized blocks): what one decode step reads."""
        return int(self.lib.llama_model_size(self.model))

    def feed(self, ids: Sequence[int]) -> np.ndarray:
        """Append ``ids`` to the sequence (in n_batch pieces) and return the last position's logits."""
        self.feed_only(ids)
        return self._last_logits_view().copy()

    def feed_only(self, ids: Sequence[int]) -> None:
        """Append ``ids`` to the sequence (in n_batch pieces); the last position's logits are computed.

        Ids are checked here because llama.cpp reports a bad id (or a full context) by throwing a C++
        exception through its C API, which aborts the whole Python process with no traceback."""
        bad = [int(t) for t in ids if not 0 <= int(t) < self.n_vocab]
        if bad:
            raise ValueError(f"token ids outside the vocabulary [0, {self.n_vocab}): {bad[:5]}")
        if len(ids) == 0:
            raise ValueError("feed needs at least one token id")
        if self.n_past + len(ids) > self.n_ctx:
            raise ValueError(f"{self.n_past} + {len(ids)} tokens do not fit n_ctx={self.n_ctx}")
        for i in range(0, len(ids), self.n_batch):
            part = self.ffi.new("int32_t[]", [int(t) for t in ids[i:i + self.n_batch]])
            rc = self.lib.llama_decode(self.ctx, self.lib.llama_batch_get_one(part, len(part)))
            if rc != 0:
                raise RuntimeError(f"llama_decode failed ({rc})")
            self.n_past += len(part)

    def next_token(self, ids: Sequence[int]) -> int:
        """Feed ``ids`` and return the argmax of the last logits, without copying the [vocab] row (a
        decode-speed loop should not pay 1 MB of copying per token for the 262k-token Gemma vocabulary)."""
        self.feed_only(ids)
        return int(np.argmax(self._last_logits_view()))

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """[len(ids), vocab] logits of a fresh sequence, every position."""
        self.reset()
        return np.stack([self.feed([t]) for t in ids])

    def greedy(self, prompt: Sequence[int], new: int) -> list[int]:
        """Greedy continuation of a fresh sequence: ``new`` token ids (prompt excluded)."""
        self.reset()
        out = [self.next_token(prompt)]
        while len(out) < new:
            out.append(self.next_token([out[-1]]))
        return out

    def close(self) -> None:
        """Free the context and the model (also done by the garbage collector, but tests load many)."""
        if getattr(self, "ctx", None) is not None:
            self.lib.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None) is not None:
            self.lib.llama_model_free(self.model)
            self.model = None

    def __del__(self) -> None:
        # no contextlib here: at interpreter exit module globals may already be None
        try:
            self.close()
        except Exception:
            pass
