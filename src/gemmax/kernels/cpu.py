"""A native CPU kernel for decode-time matrix-vector products (XLA FFI), and the switch that turns it on.

At batch 1 every linear layer is a GEMV bound by memory bandwidth. XLA:CPU neither fuses the convert of
int8/bfloat16 weights into its dot nor the per-layer slice of a stacked weight inside a scan, so it writes a
float32 copy of every weight for every token: int8 and bfloat16 weights then decode *slower* than float32
(measured on Gemma 3 270M: 86 and 207 ms/token vs 77 for float32). ``csrc/cpu_gemv.cc`` reads each
weight byte once, converts in registers, accumulates in float32, splits rows over XLA's own thread pool,
and takes the whole stacked ``[L, ...]`` weight plus a layer index so nothing is sliced.

It is used only where it pays and is safe, and only where the caller asks for it by the weight's type: a
:class:`NativeWeight` goes to the kernel, a plain array to XLA's dot, so the model and layer math hold no
switch. The generation engine picks the backend (``"cpu"`` on the CPU backend, single device) and the
family's prefill / decode step wraps its weights (``layer_view``, ``NativeWeight``); never for training (it
has no gradient) nor under a distribution (XLA SPMD cannot partition a custom call). The library is compiled
on first use with the system ``g++`` (``-O3 -march=native``) into ``~/.cache/gemmax/kernels`` keyed by
source, jaxlib version and CPU; with no compiler everything falls back to XLA's dot with a one-time warning,
and ``GEMMAX_CPU_KERNELS=0`` turns the kernels off (silently: it was asked for). Numerics: float32
accumulation as XLA's path, but a different summation order, so results agree to float32 rounding, not bit
for bit.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_SOURCE = Path(__file__).with_name("csrc") / "cpu_gemv.cc"
_TARGET = "gemmax_cpu_gemv"
_TAKE = "gemmax_cpu_take_rows"
_ATTN = "gemmax_cpu_attention"
_DECODE_ATTN = "gemmax_cpu_decode_attention"
_NORM_ROPE = "gemmax_cpu_norm_rope"
_READ = "gemmax_cpu_read_sum"
_XENT = "gemmax_cpu_softmax_xent"
_WRITE_ROWS = "gemmax_cpu_write_rows"
_GEMM_TN = "gemmax_cpu_gemm_tn"
_state: dict[str, Any] = {"ok": None}
_lock = threading.Lock()

#: batch rows up to which decode-step products go to the kernel. From 8 rows on the kernel itself switches
#: to register-blocked GEMM paths (``kSkinnyRows`` in csrc/cpu_gemv.cc), so float32 weights stay in place
#: too: XLA's dot first slices a float32 copy of each stacked layer and ran the 270M head at 16 rows in
#: ~100 ms (the kernel: ~50).
MAX_ROWS = 32


def _cpu_id() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return hashlib.sha256(flags.encode()).hexdigest()[:12]


def _build() -> Path:
    src = _SOURCE.read_bytes()
    include = jax.ffi.include_dir()
    key = hashlib.sha256(src + jax.__version__.encode() + _cpu_id().encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gemmax" / "kernels"
    out = cache / f"cpu_gemv-{key}.so"
    if out.exists():
        return out
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise RuntimeError("no C++ compiler (g++) found")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        tmp_out = Path(tmp) / out.name
        cmd = [cxx, "-O3", "-march=native", "-std=c++17", "-fPIC", "-shared", "-fopenmp-simd",
               f"-I{include}", str(_SOURCE), "-o", str(tmp_out)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"compiling {_SOURCE.name} failed:\n{res.stderr[-2000:]}")
        os.replace(tmp_out, out)  # atomic: concurrent processes never load a half-written library
    return out


def available() -> bool:
    """True once the kernel is compiled and registered with XLA (CPU backend only)."""
    if _state["ok"] is not None:
        return _state["ok"]
    with _lock:
        if _state["ok"] is not None:
            return _state["ok"]
        ok = False
        if os.environ.get("GEMMAX_CPU_KERNELS", "1") != "0" and jax.default_backend() == "cpu":
            try:
                lib = ctypes.cdll.LoadLibrary(str(_build()))
                jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(lib.GemmaxGemv), platform="cpu")
                jax.ffi.register_ffi_target(_TAKE, jax.ffi.pycapsule(lib.GemmaxTakeRows), platform="cpu")
                jax.ffi.register_ffi_target(_ATTN, jax.ffi.pycapsule(lib.GemmaxAttention), platform="cpu")
                jax.ffi.register_ffi_target(_DECODE_ATTN, jax.ffi.pycapsule(lib.GemmaxDecodeAttention),
                                            platform="cpu")
                jax.ffi.register_ffi_target(_NORM_ROPE, jax.ffi.pycapsule(lib.GemmaxNormRope), platform="cpu")
                jax.ffi.register_ffi_target(_READ, jax.ffi.pycapsule(lib.GemmaxReadSum), platform="cpu")
                jax.ffi.register_ffi_target(_XENT, jax.ffi.pycapsule(lib.GemmaxSoftmaxXent), platform="cpu")
                jax.ffi.register_ffi_target(_WRITE_ROWS, jax.ffi.pycapsule(lib.GemmaxWriteRows), platform="cpu")
                jax.ffi.register_ffi_target(_GEMM_TN, jax.ffi.pycapsule(lib.GemmaxGemmTN), platform="cpu")
                _state["lib"] = lib
                ok = True
            except Exception as e:  # noqa: BLE001 - any failure means "use XLA's dot", said once
                warnings.warn(f"gemmax: native CPU decode kernel unavailable ({e}); using XLA's dot", stacklevel=2)
        _state["ok"] = ok
        return ok


@jax.tree_util.register_pytree_node_class
@dataclass(frozen=True)
class NativeWeight:
    """A weight the native kernel reads: layer ``index`` of a stacked ``[L, ...]`` array, in place (not
    sliced), or with ``index=None`` the array itself. The type is the whole switch: ``supports`` is true only
    for such a weight, so code that wraps its weights (a family's prefill / decode step on the ``"cpu"``
    backend) gets the kernel and every other caller XLA's dot, with no state anywhere.

    ``gemm``: products with more than ``MAX_ROWS`` rows also go to the kernel's GEMM (a prefill; in-major
    weights only: every decoder linear, an untied head). Make one only where ``available()``."""

    array: jax.Array
    index: jax.Array | None = None
    gemm: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape[1:] if self.index is not None else self.array.shape)

    @property
    def dtype(self) -> Any:
        return self.array.dtype

    def tree_flatten(self) -> tuple[tuple[Any, ...], bool]:
        return (self.array, self.index), self.gemm

    @classmethod
    def tree_unflatten(cls, gemm: bool, children: tuple[Any, ...]) -> NativeWeight:
        return cls(children[0], children[1], gemm)


def layer_view(tree: Any, index: jax.Array, gemm: bool = False) -> Any:
    """Layer ``index`` of stacked decoder weights for the kernel path: every linear ``kernel`` becomes a
    :class:`NativeWeight` (read in place), every other leaf (norm scales, quantization scales, LoRA
    factors) is sliced as the layer scan would slice it; a 4-bit ``qkernel`` is sliced and wrapped, so the
    float kernel ``layers.linear`` dequantizes from it is a native weight too (``map_weight``)."""
    if isinstance(tree, dict):
        if "kernel" in tree and hasattr(tree["kernel"], "shape"):
            rest = {k: layer_view(v, index, gemm) for k, v in tree.items() if k != "kernel"}
            return dict(rest, kernel=NativeWeight(tree["kernel"], index, gemm))
        out = {k: layer_view(v, index, gemm) for k, v in tree.items()}
        if "qkernel" in out:
            out["qkernel"] = NativeWeight(out["qkernel"], None, gemm)
        return out
    return jax.lax.dynamic_index_in_dim(tree, index, axis=0, keepdims=False)


def unstack(w: Any) -> jax.Array:
    """A plain array for XLA's path (a NativeWeight's layer is sliced here; a plain array is returned)."""
    if isinstance(w, NativeWeight):
        if w.index is None:
            return w.array
        return jax.lax.dynamic_index_in_dim(w.array, w.index, axis=0, keepdims=False)
    return w


def map_weight(w: Any, fn: Any) -> Any:
    """``fn`` of the plain weight, wrapped again (index ``None``, the same ``gemm``) when ``w`` was native:
    a 4-bit kernel dequantized inside the layer stays on the kernel path."""
    if isinstance(w, NativeWeight):
        return NativeWeight(fn(unstack(w)), None, w.gemm)
    return fn(w)


def _plan(eq: str, w_shape: tuple[int, ...]) -> tuple[bool, int, int, int] | None:
    """(in_minor, P, K, N) when ``eq`` is a product the kernel computes as [rows, K] x W -> [rows, P*N] in
    the output's own order, else None. W's contracted axes must be contiguous (leading, middle or
    trailing) and the input's contracted axes trailing in the same order."""
    ins, out = eq.replace(" ", "").split("->")
    xs, ws = ins.split(",")
    contracted = [c for c in ws if c in xs and c not in out]
    if not contracted or any(c in xs for c in ws if c not in contracted):
        return None
    i0 = ws.index(contracted[0])
    if ws[i0:i0 + len(contracted)] != "".join(contracted) or not xs.endswith("".join(contracted)):
        return None
    lead, trail = ws[:i0], ws[i0 + len(contracted):]
    batch = xs[: len(xs) - len(contracted)]
    if out != batch + lead + trail:
        return None
    dims = dict(zip(ws, w_shape, strict=True))
    p = int(np.prod([dims[c] for c in lead], dtype=np.int64))
    k = int(np.prod([dims[c] for c in contracted], dtype=np.int64))
    n = int(np.prod([dims[c] for c in trail], dtype=np.int64))
    if not trail:
        return True, 1, k, p
    return False, p, k, n


def supports(eq: str, x: jax.Array, w: Any) -> bool:
    """Whether ``einsum(eq, x, w)`` goes to the kernel: ``w`` a :class:`NativeWeight`, a plan exists, and
    few rows (or, for a ``gemm`` weight, an in-major one at any rows)."""
    plan = _plan(eq, tuple(w.shape)) if isinstance(w, NativeWeight) else None
    if plan is None:
        return False
    rows = x.size // plan[2]
    return rows <= MAX_ROWS or (w.gemm and not plan[0])


def _io(x: jax.Array) -> jax.Array:
    """A kernel operand: bfloat16 as it is (the kernels read it), anything else as float32."""
    return x if x.dtype == jnp.bfloat16 else x.astype(jnp.float32)


ACTIVATIONS = {"gelu_tanh": 1, "silu": 2}  # the kernel's epilogue codes


def gemv(eq: str, x: jax.Array, w: Any, scale: jax.Array | None = None, out_dtype: Any = jnp.float32,
         act: str | None = None, mul: jax.Array | None = None) -> jax.Array:
    """``einsum(eq, x, w) * scale`` by the native kernel, float32 sums; ``w`` a plain array or NativeWeight.
    ``out_dtype`` float32 or bfloat16 (rounded by the kernel, as XLA's convert of the float32 result).

    The gated MLP's element-wise step rides along on each finished tile: ``act`` (a name in ``ACTIVATIONS``)
    returns ``act(y)``, ``mul`` (y's shape) returns ``y * mul``; with a bfloat16 result y is rounded first, as
    ``layers.activation_fn`` and a bfloat16 multiply would see it."""
    if isinstance(w, NativeWeight) and w.index is not None:
        stacked, index = w.array, jnp.asarray(w.index, jnp.int32).reshape(1)
    else:
        stacked, index = unstack(w), jnp.zeros((1,), jnp.int32)
    plan = _plan(eq, tuple(w.shape))
    assert plan is not None, eq
    in_minor, p, k, n = plan
    rows = x.size // k
    has_scale = scale is not None
    s = scale.astype(jnp.float32).reshape(-1) if has_scale else jnp.zeros((1,), jnp.float32)
    m = mul.astype(out_dtype).reshape(rows, p * n) if mul is not None else jnp.zeros((1,), out_dtype)
    y = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct((rows, p * n), out_dtype))(
        _io(x).reshape(rows, k), stacked, s, index, m,
        in_minor=bool(in_minor), has_scale=has_scale, p=np.int64(p), k=np.int64(k), n=np.int64(n),
        act=np.int64(ACTIVATIONS[act] if act else 0), has_mul=mul is not None)
    tail = _out_tail(eq, tuple(w.shape))
    n_contracted = len(w.shape) - len(tail)  # x's trailing axes (checked by _plan)
    return y.reshape(*x.shape[: x.ndim - n_contracted], *tail)


def supports_norm_rope(x: jax.Array, sincos: Any) -> bool:
    """Whether the q/k normalisation + RoPE of a caller that asked for the kernel (``layers.norm_rope``'s
    ``native``: a prefill on the ``"cpu"`` backend) goes to it: float32 or bfloat16 x [B, T, H, hd] with more
    than ``MAX_ROWS`` positions, and RoPE given as precomputed (sin, cos) tables."""
    return (x.dtype in (jnp.float32, jnp.bfloat16) and x.ndim == 4 and x.shape[0] * x.shape[1] > MAX_ROWS
            and isinstance(sincos, tuple))


def norm_rope(x: jax.Array, scale: jax.Array | None, eps: float, offset: float, sincos: tuple[jax.Array, jax.Array],
              mult: float | None) -> jax.Array:
    """``rms_norm`` (when ``scale`` is given), then rotate-half RoPE with tables ``sincos`` ([B, T, rd/2]),
    then ``* mult``, in one native pass over x [B, T, H, hd], float32 inside and rounded once to x's dtype
    (XLA's bfloat16 path rounds after the norm, the rotation and the scale)."""
    b, t, h, d = x.shape
    sin, cos = (jnp.broadcast_to(a, (b, t, a.shape[-1])).astype(jnp.float32) for a in sincos)
    w = scale.astype(jnp.float32).reshape(-1) if scale is not None else jnp.zeros((1,), jnp.float32)
    xin = _io(x)
    return jax.ffi.ffi_call(_NORM_ROPE, jax.ShapeDtypeStruct(x.shape, xin.dtype))(
        xin, w, sin, cos, heads=np.int64(h), dim=np.int64(d), has_norm=scale is not None,
        eps=np.float32(eps), offset=np.float32(offset), mult=np.float32(1.0 if mult is None else mult)
    ).astype(x.dtype)


def _out_tail(eq: str, w_shape: tuple[int, ...]) -> tuple[int, ...]:
    ins, out = eq.replace(" ", "").split("->")
    xs, ws = ins.split(",")
    dims = dict(zip(ws, w_shape, strict=True))
    return tuple(dims[c] for c in ws if c in out)


def supports_take(table: Any) -> bool:
    """Whether ``table[tokens]`` goes to ``take_rows``: a half-precision :class:`NativeWeight` table (XLA's
    gather is as fast for the others)."""
    return isinstance(table, NativeWeight) and table.dtype in (jnp.bfloat16, jnp.float16)


def take_rows(table: Any, tokens: jax.Array) -> jax.Array:
    """``table[tokens]`` (bytes copied) for the decode step: XLA:CPU gathers from a bfloat16 table by
    converting all of it to float32 first, hoisted out of the decode loop (671 MB written per chunk for
    Gemma 3 270M's embedding; measured 36 -> 106 ms/token at 4 steps a chunk). Ids must be in range.
    ``table`` a plain array or a NativeWeight."""
    table = unstack(table)
    out = jax.ffi.ffi_call(_TAKE, jax.ShapeDtypeStruct((tokens.size, table.shape[1]), table.dtype))(
        table, tokens.reshape(-1).astype(jnp.int32))
    return out.reshape(*tokens.shape, table.shape[1])


def write_rows(cache: jax.Array, rows: jax.Array, pos: jax.Array) -> jax.Array:
    """``cache.at[:, arange(B), pos].set(rows)`` for a stacked cache [L, B, S, ...] and rows [L, B, ...] (a
    decode step's new keys or values): :func:`write_entries` with one entry a row."""
    b = cache.shape[1]
    return write_entries(cache, rows[:, :, None], jnp.arange(b, dtype=jnp.int32), pos.reshape(b, 1))


def write_entries(cache: jax.Array, entries: jax.Array, slots: jax.Array, pos: jax.Array) -> jax.Array:
    """``cache.at[:, slots[:, None], pos].set(entries, mode="drop")`` for a stacked cache [L, B, S, ...],
    entries [L, b, t, ...], slots [b] and positions [b, t], written in place by the native library (the result
    aliases ``cache``; donate it). XLA:CPU converts a whole bfloat16 operand to float32 and back around a
    scatter: a bfloat16 decode step's cache writes cost as much as its head, and admitting 32 prompts into a
    32-slot cache of the 270M ~290 ms; here only the entries' bytes move. A slot past ``B`` or a position past
    ``S`` is dropped, as the scatter drops it (a negative one too, where the scatter would count from the
    end; no caller writes one)."""
    return jax.ffi.ffi_call(_WRITE_ROWS, jax.ShapeDtypeStruct(cache.shape, cache.dtype), input_output_aliases={0: 0})(
        cache, entries.astype(cache.dtype), slots.astype(jnp.int32), pos.astype(jnp.int32))


def read_bandwidth(megabytes: int = 1024, repeats: int = 5) -> float:
    """The machine's read bandwidth in GB/s as the kernels see it (best of ``repeats``): a ``megabytes``
    float32 buffer summed by the native library on XLA's own thread pool, the threads a decode step reads its
    weights with. Far larger than any cache, so it measures memory; the figure a decode step's weight
    traffic is compared with. Raises RuntimeError when the native kernels are unavailable."""
    if not available():
        raise RuntimeError("the native CPU kernels are unavailable (no compiler, GEMMAX_CPU_KERNELS=0 or "
                           "not a CPU backend): no read-bandwidth measurement")
    n = megabytes * (1 << 20) // 4
    x = jnp.ones((n,), jnp.float32)
    if float(read_sum(x)) != float(n):  # also the warm-up: compiled, pages touched
        raise RuntimeError("read-bandwidth kernel returned a wrong sum")
    best = float("inf")
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        read_sum(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return n * 4 / best / 1e9


def softmax_xent(logits: jax.Array, targets: jax.Array, weights: jax.Array, grad_dtype: Any | None = None,
                 in_place: bool = False) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """The cross-entropy terms of float32 ``logits`` [n, V] against ``targets`` [n] (in range) by the native
    kernel: ``(lse - z[y], 1.0 where z[y] is the row's max, gradient)``, the gradient with respect to the
    logits ``weights[:, None] * (softmax - onehot)`` in ``grad_dtype`` (float32 or bfloat16), or None when
    ``grad_dtype`` is None. One pass for the log-sum-exp and one for the gradient per row, a vectorised exp;
    the fine-tuning loss takes it on the ``"cpu"`` backend (``train.losses``). Only where ``available()``.

    ``in_place`` (a caller whose logits are dead after this call): a float32 gradient is written over the
    logits' buffer, each row read before it is overwritten. XLA then needs no second [n, V] array: for the
    270M's 512-token loss 537 MB less at the peak, and 537 MB less of fresh pages to fault in every step."""
    n, v = logits.shape
    g_shape = (n, v) if grad_dtype is not None else (1,)
    out = (jax.ShapeDtypeStruct((n,), jnp.float32), jax.ShapeDtypeStruct((n,), jnp.float32),
           jax.ShapeDtypeStruct(g_shape, grad_dtype if grad_dtype is not None else jnp.float32))
    alias = {0: 2} if in_place and grad_dtype is not None and jnp.dtype(grad_dtype) == jnp.float32 else {}
    tok, hit, g = jax.ffi.ffi_call(_XENT, out, input_output_aliases=alias)(
        logits.astype(jnp.float32), targets.astype(jnp.int32), weights.astype(jnp.float32))
    return tok, hit, g if grad_dtype is not None else None


def gemm_tn(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a.T @ b`` for float32 ``a`` [K, M] and ``b`` [K, N] by the native kernel: the weight gradient of a
    tied head, ``g^T h``, contracting over the rows (``train.losses``), where XLA:CPU reads the transposed
    operand with a stride of the whole vocabulary. Only where ``available()``."""
    k, m = a.shape
    if b.ndim != 2 or b.shape[0] != k:
        raise ValueError(f"gemm_tn: a [K, M] and b [K, N] with the same K, got {a.shape} and {b.shape}")
    return jax.ffi.ffi_call(_GEMM_TN, jax.ShapeDtypeStruct((m, b.shape[1]), jnp.float32))(
        a.astype(jnp.float32), b.astype(jnp.float32))


@jax.jit
def read_sum(x: jax.Array) -> jax.Array:
    """The sum of a 1-D float32 array by the native read kernel (``read_bandwidth``'s workload)."""
    return jax.ffi.ffi_call(_READ, jax.ShapeDtypeStruct((1,), jnp.float32))(x)[0]


def prefill_attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, window: jax.Array | int,
                      cap: float | None) -> jax.Array:
    """Causal grouped-query attention of whole right-padded prompts, blocked: q [b, T, H, hd] (already
    scaled), k/v [b, T, K, hd], lengths [b] -> [b, T, H, hd] in v's dtype, float32 inside.

    The same masking as ``layers.attention_mask`` with segments ``position < length`` (prompt positions see
    ``[i - window + 1, i]``, padding sees only padding) and the same soft-cap; each block of queries meets
    only the keys it can see (half the work of a dense causal product, O(T x window) on local layers) and no
    [H, T, T] score tensor is formed. bfloat16 q, k and v on a CPU with AVX512-BF16: both products in
    bfloat16 with float32 sums, the probabilities rounded to bfloat16 for the product with v (as torch's
    bfloat16 attention), softmax in float32."""
    dtype = v.dtype
    if not q.dtype == k.dtype == v.dtype == jnp.bfloat16:
        q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
    out = jax.ffi.ffi_call(_ATTN, jax.ShapeDtypeStruct(q.shape, v.dtype))(
        q, k, v, lengths.astype(jnp.int32), jnp.asarray(window, jnp.int32).reshape(1), cap=np.float32(cap or 0.0))
    return out.astype(dtype)


def decode_attention(q: jax.Array, k_new: jax.Array, v_new: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                     layer: jax.Array, valid: jax.Array, cap: float | None) -> jax.Array:
    """``generate._attend_cached`` for layer ``layer`` of stacked caches [L, B, S, K, hd], read in place:
    q [B, 1, H, hd] (scaled), k_new/v_new [B, 1, K, hd], valid [B, S] -> [B, 1, H, hd] in v_new's dtype."""
    b, _, h, hd = q.shape
    out = jax.ffi.ffi_call(_DECODE_ATTN, jax.ShapeDtypeStruct((b, h, hd), jnp.float32))(
        q.astype(jnp.float32).reshape(b, h, hd), k_new.astype(jnp.float32).reshape(b, -1, hd),
        v_new.astype(jnp.float32).reshape(b, -1, hd), k_cache, v_cache,
        jnp.asarray(layer, jnp.int32).reshape(1), valid.astype(jnp.bool_), cap=np.float32(cap or 0.0))
    return out.reshape(b, 1, h, hd).astype(v_new.dtype)
