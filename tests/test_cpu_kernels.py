"""The native CPU decode GEMV (gemmax.kernels.cpu) against XLA's einsum, and the engine with it on and off.

The kernel is chosen by the weight's type (``ck.NativeWeight``) and, for the q/k norm + RoPE, by an explicit
argument; ``_targets`` reads which native kernels a compiled function actually calls."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from gemmax.engine.generate import Engine, Request, SamplingParams
from gemmax.kernels import cpu as ck
from gemmax.models.gemma import model as gm
from gemmax.models.gemma.config import tiny_config
from gemmax.models.gemma.decode import decode_step, init_cache, prefill
from gemmax.nn import layers, lora, quant
from gemmax.nn.params import get_node, set_node

EQS = dict(gm.LINEAR_EQS)
TARGETS = (ck._TARGET, ck._TAKE, ck._ATTN, ck._DECODE_ATTN, ck._NORM_ROPE, ck._WRITE_ROWS)


def _targets(fn, *args, **kwargs) -> set[str]:
    """The native kernels (FFI targets) the lowered ``fn(*args, **kwargs)`` calls; ``fn`` jitted."""
    text = fn.lower(*args, **kwargs).as_text()
    return {t for t in TARGETS if t in text}


@pytest.fixture(autouse=True, scope="module")
def _kernels_registered() -> None:
    """Tests here call the kernels directly, so the FFI targets must be registered in this process whatever
    test runs first (``available()`` registers them)."""
    ck.available()


def test_kernel_builds_here() -> None:
    """This machine has g++: the kernel must build (a silent fallback would hide a broken kernel)."""
    assert ck.available()


@pytest.mark.parametrize("k, m, n", [(1, 1, 1), (5, 7, 3), (13, 100, 70), (37, 333, 129), (512, 700, 640)])
def test_gemm_tn_is_the_transposed_product(k: int, m: int, n: int) -> None:
    """``gemm_tn(a, b) = a.T @ b``: partial row blocks, partial 64-column panels, K not a multiple of the
    transpose's 8-row step; float32 sums within the float32 rounding of the reference's."""
    rng = np.random.default_rng(k * m + n)
    a = rng.standard_normal((k, m)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    y = np.asarray(jax.jit(ck.gemm_tn)(a, b))
    ref = a.astype(np.float64).T @ b.astype(np.float64)
    assert y.shape == (m, n)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=2e-5 * np.sqrt(k))
    with pytest.raises(ValueError, match="same K"):
        ck.gemm_tn(a, b[:-1] if k > 1 else np.zeros((2, n), np.float32))


def test_read_kernel_sums_every_element() -> None:
    """The bandwidth benchmark's read kernel touches every element once: whole 1 MiB blocks, a partial last
    block and a tail shorter than one vector step all count."""
    for n in (1, 63, 262144, 262144 * 3 + 77):
        x = np.random.default_rng(n).integers(-3, 4, n).astype(np.float32)  # integers: the sum is exact
        assert float(ck.read_sum(jnp.asarray(x))) == float(x.sum()), n
    assert ck.read_bandwidth(8, repeats=1) > 0


@pytest.mark.parametrize("eq,shape,plan", [
    ("btd,hdk->bthk", (4, 64, 16), (False, 4, 64, 16)),      # query: contracted axis in the middle
    ("bthk,hkd->btd", (4, 16, 64), (False, 1, 64, 64)),      # attention output: leading axes contracted
    ("btd,df->btf", (64, 128), (False, 1, 64, 128)),         # MLP in
    ("btd,vd->btv", (300, 64), (True, 1, 64, 300)),          # tied head: trailing axis contracted
    ("btd,dv->btv", (64, 300), (False, 1, 64, 300)),         # untied head
])
def test_plan(eq: str, shape: tuple[int, ...], plan: tuple) -> None:
    assert ck._plan(eq, shape) == plan


def test_plan_rejects_what_it_cannot_do() -> None:
    assert ck._plan("btd,dhk->bkh", (64, 4, 16)) is None  # output order differs from the weight's
    assert ck._plan("bd,hdk->bhk", (4, 64, 16)) is not None
    assert ck._plan("bdk,dk->b", (8, 4)) is not None


def _x_shape(eq: str, shape: tuple[int, ...], rows: int) -> tuple[int, ...]:
    """x's shape for ``rows`` decode rows of ``eq`` against a weight of ``shape``."""
    xs, ws = eq.split(",")[0], eq.split(",")[1].split("->")[0]
    return (rows, 1, *[shape[ws.index(c)] for c in xs[2:]])


def _np_product(eq: str, x: jax.Array, w: jax.Array, scale: np.ndarray | None = None) -> np.ndarray:
    """The reference: the same einsum in float64 NumPy on the same values (bfloat16 / int8 widened exactly)."""
    out = np.einsum(eq, np.asarray(x, np.float64), np.asarray(w, np.float64))
    return out if scale is None else out * scale


def _to_bf16(a: jax.Array) -> np.ndarray:
    """float32 values rounded to bfloat16 (nearest even, as XLA's convert), back in float32."""
    return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("eqs", "gemm", "out_dtypes", "plain"))
def _products(eqs: tuple[str, ...], xs, ws, scales, at: jax.Array, gemm: bool = False,
              out_dtypes: tuple[Any, ...] = (jnp.float32,), plain: bool = False) -> list:
    """``ck.gemv`` of every case (``scales`` may be None) on each stacked weight read in place at each layer
    of ``at``, one result per out dtype; with ``plain``, also on the weight's layer ``at[0]`` sliced out: as a
    plain array (gemv's own API) and as a NativeWeight with no index. Every case of a parametrised test in
    one compiled program: [case][layer, then the plain pair][out dtype]."""
    out = []
    for eq, x, w, s in zip(eqs, xs, ws, scales, strict=True):
        out.append([[ck.gemv(eq, x, ck.NativeWeight(w, i, gemm=gemm), s, out_dtype=d) for d in out_dtypes]
                    for i in at])
        if plain:
            one = jax.lax.dynamic_index_in_dim(w, at[0], keepdims=False)
            out[-1].append([ck.gemv(eq, x, one, s), ck.gemv(eq, x, ck.NativeWeight(one), s)])
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "int8"])
@pytest.mark.parametrize("rows", [1, 3, 6, 8, 17, 32])
def test_gemv_equals_einsum(dtype: str, rows: int) -> None:
    """Decode-step rows: the GEMV kernels below 8 rows, the GEMM paths (in-major and the in-minor head) from
    8 on; a stacked weight read in place at layer 0 and the last (a per-column scale), and a plain one
    (gemv's own API, and a NativeWeight with no index), against a float64 einsum of the same values."""
    rng = np.random.default_rng(rows)
    cases = [("btd,hdk->bthk", (3, 40, 12)), ("bthk,hkd->btd", (3, 12, 40)), ("btd,vd->btv", (301, 40)),
             ("btf,fd->btd", (130, 37)), ("btd,hdk->bthk", (2, 70, 64)), ("btf,fd->btd", (130, 128)),
             # widths that are multiples of 16 take the AVX2 int8 paths (a full and a partial 64-block of K)
             ("btd,vd->btv", (301, 80)), ("btd,vd->btv", (37, 128)), ("btf,fd->btd", (80, 48)),
             ("btd,hdk->bthk", (2, 64, 32)),
             # the float32 AVX2 head kernel needs K % 8 == 0 (40, 80 and 128 above: 32-wide steps and the
             # 8-wide tail); K = 36 takes the portable one
             ("btd,vd->btv", (45, 36))]
    # float paths: float32 rounding; the int8 paths quantize x to 16 bits per block of 64
    # (error <= max|x| / 65534 per element: ~1e-4 of the output's scale, 30x below int8 weight rounding)
    tol = 3e-4 if dtype == "int8" else 1e-5
    eqs, xs, ws, scales = tuple(eq for eq, _ in cases), [], [], []
    for eq, shape in cases:
        stacked = rng.normal(size=(5, *shape)) * (50 if dtype == "int8" else 1)
        w = jnp.asarray(stacked.astype(np.int8) if dtype == "int8" else stacked, dtype)
        x = jnp.asarray(rng.normal(size=_x_shape(eq, shape, rows)), jnp.float32)
        assert ck.supports(eq, x, ck.NativeWeight(w, jnp.int32(0))) and ck.supports(eq, x, ck.NativeWeight(w[0]))
        assert not ck.supports(eq, x, w[0])  # a plain array: XLA's dot
        xs.append(x)
        ws.append(w)
        scales.append(jnp.asarray(rng.uniform(0.5, 2, ck._out_tail(eq, shape)), jnp.float32))
    layer_ids = (0, 4)
    scaled = _products(eqs, xs, ws, scales, jnp.asarray(layer_ids, jnp.int32))
    plain = _products(eqs, xs, ws, [None] * len(cases), jnp.asarray([2], jnp.int32), plain=True)
    for eq, x, w, s, got_scaled, got_plain in zip(eqs, xs, ws, scales, scaled, plain, strict=True):
        for layer, (got,) in zip(layer_ids, got_scaled, strict=True):
            want = _np_product(eq, x, w[layer], np.asarray(s))
            assert got.shape == want.shape
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=tol * np.abs(want).max(),
                                       err_msg=f"{eq} {layer}")
        want = _np_product(eq, x, w[2])
        for got in [*got_plain[0], *got_plain[1]]:  # in place at layer 2, plain, NativeWeight with no index
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=tol * np.abs(want).max(),
                                       err_msg=eq)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "bfloat16-x", "float16", "int8"])
@pytest.mark.parametrize("rows", [33, 70, 150])
def test_gemm_equals_einsum(dtype: str, rows: int) -> None:
    """More than MAX_ROWS rows of an in-major weight take the GEMM (prefill): every row-tile remainder
    (rows % 6), partial 64-column panels, several heads (P > 1), a per-column scale, layer 0 and the last,
    and a K long enough (> 1024; 2100: also where a 1 MB L2 holds a whole 1100-row panel) to be summed in K
    blocks; float32 weights, and bfloat16 pairs with bfloat16 x, packed by each block's first row tile (full
    panels, whole pairs) or ahead of it (partial panels, odd K); enough panels (on a few threads) that a thread
    claims several in turn, prefetching the next (panel, K block) while one computes, across heads and K
    blocks and ending on a partial panel; with 150 rows the last items go out in row slices (150 rows split
    48 + 48 + 54: whole 6-row tiles, the remainder in the last slice). "bfloat16-x": bfloat16 activations
    too (the bfloat16 model's prefill), which on AVX512-BF16 takes the row-pair tile (vdpbf16ps), with an
    odd K (33) and K blocks that must start on even rows (1100 in blocks of 368); on a CPU with AMX, the
    tile products wherever K (96) or the K blocks (8224 in blocks of 384 and a last of 160) are whole
    32-element steps: 32-row and 16-row slices, the rest of the rows by the pair tile, partial sums carried
    from block to block. Against a float64 einsum of the same values."""
    x_dtype = jnp.bfloat16 if dtype == "bfloat16-x" else jnp.float32
    dtype = dtype.removesuffix("-x")
    rng = np.random.default_rng(rows)
    cases = [("btd,hdk->bthk", (3, 40, 12)), ("bthk,hkd->btd", (3, 12, 40)), ("btf,fd->btd", (130, 37)),
             ("btd,hdk->bthk", (2, 70, 64)), ("btf,fd->btd", (33, 200)), ("btf,fd->btd", (1100, 70)),
             ("btd,hdk->bthk", (2, 40, 600)), ("btf,fd->btd", (1100, 1040)), ("btf,fd->btd", (2100, 130)),
             ("btd,hdk->bthk", (2, 96, 70)), ("btf,fd->btd", (8224, 70))]
    eqs, xs, ws, scales = tuple(eq for eq, _ in cases), [], [], []
    for eq, shape in cases:
        stacked = rng.normal(size=(5, *shape)) * (50 if dtype == "int8" else 1)
        w = jnp.asarray(stacked.astype(np.int8) if dtype == "int8" else stacked, dtype)
        x = jnp.asarray(rng.normal(size=_x_shape(eq, shape, rows)), x_dtype)
        assert ck.supports(eq, x, ck.NativeWeight(w, jnp.int32(0), gemm=True))
        assert not ck.supports(eq, x, ck.NativeWeight(w, jnp.int32(0)))  # a decode weight: XLA past MAX_ROWS
        xs.append(x)
        ws.append(w)
        scales.append(jnp.asarray(rng.uniform(0.5, 2, ck._out_tail(eq, shape)), jnp.float32))
    layer_ids = (0, 4)
    res = _products(eqs, xs, ws, scales, jnp.asarray(layer_ids, jnp.int32), gemm=True,
                    out_dtypes=(jnp.float32, jnp.bfloat16))
    for eq, x, w, s, per_layer in zip(eqs, xs, ws, scales, res, strict=True):
        for layer, (got, got16) in zip(layer_ids, per_layer, strict=True):
            want = _np_product(eq, x, w[layer], np.asarray(s))
            assert got.shape == want.shape
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max(),
                                       err_msg=f"{eq} {layer}")
            # bfloat16 out (the bfloat16 model's linears): each finished tile rounded to nearest even in
            # the kernel, bit for bit the convert of the float32 result
            assert got16.dtype == jnp.bfloat16
            np.testing.assert_array_equal(np.asarray(got16, np.float32), _to_bf16(got), err_msg=eq)


@pytest.mark.parametrize("rows, k, n", [(301, 16384, 600), (40, 65536, 80), (10, 1040, 200), (16, 640, 2048)])
def test_split_k_gemm_equals_einsum(rows: int, k: int, n: int) -> None:
    """A float32 product whose contraction is far longer than its rows and columns (the hidden states'
    gradient through a [V, D] head, contracting over the vocabulary), or one of a batched decode's 8-16
    rows, takes the split-K GEMM: K slices claimed by the threads, each summing into its own copy of y,
    added up at the end; rows in chunks of at most a quarter of L2 (301 rows of 600 columns: two chunks on
    a 2 MB L2, a 1-row last tile), a partial last panel (600 = 9 x 64 + 24; 80 = 64 + 16 and 200 = 3 x 64 +
    8, copied rather than packed by the first tile), a last K block of 16 rows (1040 in blocks of 64), more
    slices than blocks would allow (640 rows of W: ten blocks), a scale. Against float64 NumPy; and bit for
    bit the same on every call, whichever thread sums which slice (the slices' copies are added in order)."""
    rng = np.random.default_rng(rows)
    x = jnp.asarray(rng.normal(size=(rows, k)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, n)) * 0.05, jnp.float32)
    s = jnp.asarray(rng.uniform(0.5, 2, n), jnp.float32)
    assert ck.supports("bv,vd->bd", x, ck.NativeWeight(w, None, gemm=True))
    fn = jax.jit(lambda x, w, s: ck.gemv("bv,vd->bd", x, ck.NativeWeight(w, None, gemm=True), s))
    got = fn(x, w, s)
    want = _np_product("bv,vd->bd", x, w, np.asarray(s))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    for _ in range(4):
        np.testing.assert_array_equal(np.asarray(fn(x, w, s)), np.asarray(got))


@pytest.mark.parametrize("norm,offset,rot,mult,dtype", [
    (True, 1.0, 1.0, 0.0625, "float32"), (True, 0.0, 1.0, None, "float32"), (False, 1.0, 1.0, 0.125, "float32"),
    (True, 1.0, 0.5, 0.25, "float32"), (True, 1.0, 1.0, 0.0625, "bfloat16"), (False, 1.0, 0.5, None, "bfloat16")])
def test_norm_rope_equals_xla(norm: bool, offset: float, rot: float, mult: float | None, dtype: str) -> None:
    """The prefill's native q/k pass (RMSNorm with a random non-zero scale, rotate-half RoPE from sin/cos
    tables, the query scale) against rms_norm + apply_rope + multiply in XLA: Gemma (offset 1) and Llama
    (offset 0) norms, no norm (Gemma 1/2), a table covering half the head (the rest passes through), rows
    that split over several tasks. bfloat16 x: float32 inside, one rounding at the end, so within half a
    bfloat16 ulp of XLA's float32 result on the same input."""
    rng = np.random.default_rng(11)
    b, t, h, d = 2, 90, 3, 64
    x = jnp.asarray(rng.normal(size=(b, t, h, d)) * 3, dtype).astype(jnp.float32)
    scale = jnp.asarray(rng.normal(size=d), jnp.float32) if norm else None
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    inv = layers.rope_inv_freq(int(d * rot), 10_000.0)
    sincos = layers.rope_sin_cos(pos, inv)
    want = x if scale is None else layers.rms_norm(x, scale, 1e-6, offset)
    want = layers.apply_rope(want, pos, sincos)
    want = want if mult is None else want * mult
    xin = x.astype(dtype)
    assert ck.supports_norm_rope(xin, sincos)
    assert not ck.supports_norm_rope(xin, inv)  # RoPE as frequencies: the XLA path
    assert not ck.supports_norm_rope(xin.astype(jnp.float16), sincos)
    assert not ck.supports_norm_rope(xin[:, : ck.MAX_ROWS // b], sincos)  # few rows (a decode step): XLA
    run = {native: jax.jit(lambda x, native=native: layers.norm_rope(x, scale, 1e-6, offset, pos, sincos, mult,
                                                                     native=native)) for native in (False, True)}
    assert _targets(run[True], xin) == {ck._NORM_ROPE}  # asked for: the native pass
    assert _targets(run[False], xin) == set()  # the default: XLA, whatever the shapes
    got = run[True](xin)
    assert got.dtype == xin.dtype
    if dtype == "bfloat16":
        g, w = np.asarray(got, np.float32), np.asarray(want)
        np.testing.assert_allclose(g, w, rtol=2.0**-8 * 1.001, atol=1e-6)  # half an ulp: one rounding
        assert (g == np.asarray(want.astype(jnp.bfloat16), np.float32)).mean() > 0.99
        return
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    if rot < 1:  # channels past the table pass through (normalised, scaled)
        np.testing.assert_allclose(np.asarray(got)[..., d // 2:], np.asarray(want)[..., d // 2:], rtol=1e-6)


@pytest.mark.parametrize("t,heads,kv,hd,window,cap,dtype", [
    (150, 4, 2, 40, 1 << 30, None, "float32"), (150, 2, 1, 64, 37, 50.0, "float32"),
    (70, 3, 3, 130, 64, None, "float32"), (5, 2, 1, 16, 3, 30.0, "float32"),
    (151, 4, 2, 40, 1 << 30, None, "bfloat16"), (133, 2, 1, 130, 37, 50.0, "bfloat16"),
    (9, 2, 2, 15, 4, None, "bfloat16")])
def test_prefill_attention_equals_masked_softmax(t: int, heads: int, kv: int, hd: int, window: int,
                                                 cap: float | None, dtype: str) -> None:
    """The blocked kernel against layers.dot_attention with layers.attention_mask (segments = position <
    length): several query blocks and 64-key panels, partial panels of keys and of head dims, grouped
    heads, sliding windows, soft-capping, and a padded row whose padding attends only padding. bfloat16
    (the row-pair products on AVX512-BF16: odd key counts, an odd head dim that falls back to float32):
    against float32 attention on the same values, within the rounding of the probabilities and the output
    to bfloat16."""
    from gemmax.nn.layers import attention_mask, dot_attention

    rng = np.random.default_rng(t + hd)
    q = jnp.asarray(rng.normal(size=(2, t, heads, hd)) * 0.5, dtype)
    k = jnp.asarray(rng.normal(size=(2, t, kv, hd)), dtype)
    v = jnp.asarray(rng.normal(size=(2, t, kv, hd)), dtype)
    lengths = jnp.asarray([t, max(1, t - 23)], jnp.int32)
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (2, t))
    seg = (idx < lengths[:, None]).astype(jnp.int32)
    f32 = [a.astype(jnp.float32) for a in (q, k, v)]
    want = dot_attention(*f32, attention_mask(idx, idx, window, seg, seg), cap)
    assert ck.available()
    got = jax.jit(ck.prefill_attention, static_argnames=("cap",))(q, k, v, lengths, jnp.int32(window), cap=cap)
    assert got.dtype == q.dtype
    if dtype == "float32":
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=2e-5)
    else:  # probabilities to 2^-9 relative; the output's own rounding to half an ulp (2^-8 relative)
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), rtol=2.0**-8 * 1.001, atol=5e-3)


@pytest.mark.parametrize("dtype,heads,kv,hd,cap", [("float32", 4, 2, 40, None), ("bfloat16", 4, 1, 64, 50.0),
                                                   ("float16", 3, 3, 16, None)])
def test_decode_attention_equals_reference(dtype: str, heads: int, kv: int, hd: int, cap: float | None) -> None:
    """The decode attention kernel reading layer 2 of a stacked cache in place against _attend_cached on the
    sliced layer: grouped heads, soft-capping, invalid slots skipped (one row with none valid at all)."""
    from gemmax.models.gemma.decode import _attend_cached

    rng = np.random.default_rng(hd)
    b, s = 3, 37
    q = jnp.asarray(rng.normal(size=(b, 1, heads, hd)) * 0.3, jnp.float32)
    kn = jnp.asarray(rng.normal(size=(b, 1, kv, hd)), jnp.float32)
    vn = jnp.asarray(rng.normal(size=(b, 1, kv, hd)), jnp.float32)
    kc = jnp.asarray(rng.normal(size=(4, b, s, kv, hd)), dtype)
    vc = jnp.asarray(rng.normal(size=(4, b, s, kv, hd)), dtype)
    valid = jnp.asarray(rng.random((b, s)) < 0.6).at[2].set(False)
    want = _attend_cached(q, kn, vn, kc[2].astype(jnp.float32), vc[2].astype(jnp.float32), valid, cap)
    assert ck.available()
    got = jax.jit(ck.decode_attention, static_argnames=("cap",))(q, kn, vn, kc, vc, jnp.int32(2), valid, cap=cap)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


def test_greedy_argmax_is_argmax() -> None:
    from gemmax.engine.generate import greedy_argmax

    x = np.random.default_rng(0).normal(size=(5, 1000)).astype(np.float32)
    x[1, [7, 500]] = 9.0  # a tie: the lowest index wins, as jnp.argmax
    x[2] = -np.inf
    np.testing.assert_array_equal(np.asarray(greedy_argmax(jnp.asarray(x))), np.argmax(x, -1))
    x[3, 4] = np.nan
    assert 0 <= int(greedy_argmax(jnp.asarray(x))[3]) < 1000  # a NaN row still gives a valid token id


def test_supports_only_native_weights() -> None:
    """The weight's type is the switch: a plain array never goes to the kernel, a NativeWeight up to
    MAX_ROWS rows, and a ``gemm`` one (prefill) at any rows for in-major weights, never the tied head's."""
    x = jnp.ones((1, 1, 64))
    w = jnp.ones((64, 128))
    nw = ck.NativeWeight(w)
    assert nw.shape == (64, 128) and nw.dtype == w.dtype
    assert ck.NativeWeight(jnp.ones((3, 64, 128)), jnp.int32(1)).shape == (64, 128)
    assert not ck.supports("btd,df->btf", x, w)
    assert ck.supports("btd,df->btf", x, nw)
    assert not ck.supports("btd,df->btf", jnp.ones((ck.MAX_ROWS + 1, 1, 64)), nw)
    many = jnp.ones((ck.MAX_ROWS + 1, 1, 64))
    head = jnp.ones((128, 64))
    assert ck.supports("btd,df->btf", many, ck.NativeWeight(w, gemm=True))
    assert not ck.supports("btd,df->btf", many, w)
    assert not ck.supports("btd,vd->btv", many, ck.NativeWeight(head, gemm=True))
    # float32 weights at 9..32 rows too: the kernel's own GEMM paths
    assert ck.supports("btd,df->btf", jnp.ones((9, 1, 64)), nw)
    assert ck.supports("btd,vd->btv", jnp.ones((ck.MAX_ROWS, 1, 64)), ck.NativeWeight(head))
    assert not ck.supports("btd,dhk->bkh", x, ck.NativeWeight(jnp.ones((64, 4, 16))))  # no plan: XLA
    # the views a family's step builds: kernels wrapped in place, everything else sliced; unstack undoes it
    stacked = {"kernel": jnp.arange(24.0).reshape(3, 2, 4), "scale": jnp.ones((3, 4)),
               "norm": {"scale": jnp.ones((3, 2))}}
    view = ck.layer_view(stacked, jnp.int32(2), gemm=True)
    assert isinstance(view["kernel"], ck.NativeWeight) and view["kernel"].gemm and view["kernel"].shape == (2, 4)
    assert view["scale"].shape == (4,) and view["norm"]["scale"].shape == (2,)
    np.testing.assert_array_equal(ck.unstack(view["kernel"]), stacked["kernel"][2])
    assert ck.unstack(w) is w and ck.unstack(nw) is w
    # a native weight goes through jit, scan and cond as a pytree, its gemm flag intact
    out = jax.jit(lambda v: v)(ck.NativeWeight(w, jnp.int32(0), gemm=True))
    assert isinstance(out, ck.NativeWeight) and out.gemm and out.index is not None


def _params(cfg, seed=0):
    rng = np.random.default_rng(seed)
    return gm.unflatten({p: jnp.asarray(rng.normal(0, 0.3 if "norm" in p else 1 / np.sqrt(s.shape[-1] if
                                                  len(s.shape) > 1 else 1), s.shape).astype(np.float32))
                         for p, s in gm.param_specs(cfg).items()})


@pytest.mark.parametrize("family,variant", [("gemma3", "f32"), ("gemma3", "int8"), ("gemma2", "bf16"),
                                            ("llama", "int8"), ("gemma3", "int8+lora")])
def test_decode_step_kernel_vs_xla(family: str, variant: str) -> None:
    """The same decode step with and without the kernel: logits agree to float32 rounding."""
    cfg = tiny_config(family)
    params = _params(cfg)
    if variant.startswith("int8"):
        params = quant.quantize_params(params, gm.linear_nodes(cfg), mode="int8")
    if variant.endswith("lora"):  # LoRA factors stay on XLA's path beside the kernel's base product
        nodes = gm.linear_nodes(cfg)
        params = lora.add_lora(params, nodes, rank=4, targets=("query", "ffw_linear"))
        rng = np.random.default_rng(5)
        for t in lora.lora_targets(params, nodes):
            node = get_node(params, nodes[t].path)
            params = set_node(params, nodes[t].path, dict(node, lora_b=jnp.asarray(
                rng.normal(0, 0.05, node["lora_b"].shape), node["lora_b"].dtype)))
    if variant == "bf16":
        params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    dtype = jnp.bfloat16 if variant == "bf16" else jnp.float32
    cache = init_cache(cfg, 2, 32, dtype)
    tokens, pos = jnp.asarray([5, 9]), jnp.asarray([0, 0])
    step = jax.jit(functools.partial(decode_step, cfg=cfg), static_argnames=("backend",))
    # the backend is the only switch: "cpu" lowers every linear, the head and the attention to the kernels,
    # the bfloat16 embedding to the row copy; "xla" (the default) not one of them
    want = {ck._TARGET, ck._DECODE_ATTN, ck._WRITE_ROWS} | ({ck._TAKE} if variant == "bf16" else set())
    assert _targets(step, params, cache=cache, tokens=tokens, pos=pos, backend="cpu") == want
    assert _targets(step, params, cache=cache, tokens=tokens, pos=pos, backend="xla") == set()
    outs = {}
    for kern in (False, True):
        c = cache
        logits = []
        for t in range(12):  # walk past the sliding window (8) so ring slots are reused
            lg, c = step(params, cache=c, tokens=tokens, pos=pos + t, backend="cpu" if kern else "xla")
            logits.append(np.asarray(lg, np.float32))
            tokens = jnp.asarray(np.argmax(logits[-1], -1))
        outs[kern] = np.stack(logits)
        tokens = jnp.asarray([5, 9])
    # int8: the int8 paths round x to 16 bits per block of 64 (see test_gemv_equals_einsum), over 12 steps
    tol = {"bf16": 3e-2, "int8": 1e-3, "int8+lora": 1e-3}.get(variant, 1e-4)
    np.testing.assert_allclose(outs[True], outs[False], atol=tol * float(np.abs(outs[False]).max()))


@pytest.mark.parametrize("family,variant", [("gemma3", "f32"), ("gemma3", "bf16"), ("gemma2", "int8"),
                                            ("llama", "f32")])
def test_prefill_kernel_vs_xla(family: str, variant: str) -> None:
    """Prefill of two prompts (96 rows: the GEMM) with and without the kernel: logits and caches agree."""
    cfg = tiny_config(family)
    params = _params(cfg, 3)
    if variant == "int8":
        params = quant.quantize_params(params, gm.linear_nodes(cfg), mode="int8")
    if variant == "bf16":
        params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    tokens = jnp.asarray(np.random.default_rng(4).integers(1, cfg.vocab_size, (2, 48)), jnp.int32)
    lengths = jnp.asarray([48, 30], jnp.int32)
    run = jax.jit(functools.partial(prefill, cfg=cfg, max_len=64), static_argnames=("backend",))
    # 96 rows: the GEMM, the blocked attention and the q/k norm + RoPE pass; the bfloat16 table's row copy
    want = {ck._TARGET, ck._ATTN, ck._NORM_ROPE} | ({ck._TAKE} if variant == "bf16" else set())
    assert _targets(run, params, tokens=tokens, lengths=lengths, backend="cpu") == want
    assert _targets(run, params, tokens=tokens, lengths=lengths, backend="xla") == set()
    (lg0, c0), (lg1, c1) = (run(params, tokens=tokens, lengths=lengths, backend=b) for b in ("xla", "cpu"))
    tol = 3e-2 if variant == "bf16" else 1e-4
    scale = float(jnp.abs(lg0).max())
    np.testing.assert_allclose(np.asarray(lg1, np.float32), np.asarray(lg0, np.float32), atol=tol * scale)
    for name in c0:
        a, b = np.asarray(c0[name], np.float32), np.asarray(c1[name], np.float32)
        np.testing.assert_allclose(b, a, atol=tol * max(1.0, float(np.abs(a).max())), err_msg=name)


def test_engine_uses_kernel_and_matches_greedy() -> None:
    cfg = tiny_config("gemma3")
    params = quant.quantize_params(_params(cfg, 1), gm.linear_nodes(cfg), mode="int8")
    prompts = [[2, 5, 17, 33], [2, *range(8, 48)]]  # 2 x 64 prefill rows: the prefill GEMM too
    out = {}
    for flag in ("1", "0"):
        eng = Engine(params, cfg, max_batch=2, max_len=64, chunk=8)
        if flag == "0":
            eng.kernels = eng.native = False
        else:
            assert eng.kernels and eng.native
        reqs = [Request(list(p), SamplingParams(max_new_tokens=20)) for p in prompts]
        eng.add(reqs)
        while eng.has_work():
            eng.step()
        out[flag] = [r.new_ids for r in reqs]
    assert out["1"] == out["0"]


def _run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", **env}, timeout=300)


#: asks for the "cpu" backend everywhere (engine, prefill, decode step) and prints whether the kernels are
#: available, whether the engine took them, and the native targets the compiled prefill and decode call
_FALLBACK = """
import functools, warnings
warnings.simplefilter("always")
import jax, jax.numpy as jnp, numpy as np
from gemmax.kernels import cpu as ck
from gemmax.engine.generate import Engine, Request, SamplingParams
from gemmax.models.gemma import model as gm
from gemmax.models.gemma.config import tiny_config
from gemmax.models.gemma.decode import decode_step, init_cache, prefill
cfg = tiny_config("gemma3")
params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), gm.init_params(cfg, jax.random.PRNGKey(0)))
step = jax.jit(functools.partial(decode_step, cfg=cfg), static_argnames=("backend",))
pre = jax.jit(functools.partial(prefill, cfg=cfg, max_len=64), static_argnames=("backend",))
names = (ck._TARGET, ck._TAKE, ck._ATTN, ck._DECODE_ATTN, ck._NORM_ROPE, ck._WRITE_ROWS)
texts = [step.lower(params, cache=init_cache(cfg, 2, 64, jnp.bfloat16), tokens=jnp.asarray([5, 9]),
                    pos=jnp.asarray([0, 3]), backend="cpu").as_text(),
         pre.lower(params, tokens=jnp.ones((2, 48), jnp.int32), lengths=jnp.asarray([48, 30]),
                   backend="cpu").as_text()]
eng = Engine(params, cfg, max_batch=2, max_len=64, chunk=8)
req = Request([2, 5, 17, 33], SamplingParams(max_new_tokens=3))
eng.add([req])
while eng.has_work():
    eng.step()
print("ON" if ck.available() else "OFF", "ENGINE", eng.prefill_backend, eng.decode_backend, len(req.new_ids),
      "TARGETS", sorted(n for n in names if any(n in t for t in texts)))
"""


def test_switch_off_and_missing_compiler_fall_back(tmp_path: Path) -> None:
    """``GEMMAX_CPU_KERNELS=0`` (silent: asked for) and a missing compiler (one warning, however often the
    kernels are asked for): XLA everywhere, even where the "cpu" backend is passed explicitly. Both leave
    ``available()`` false, which is all the engine and the families read, so the whole script runs once,
    with no compiler; with the kernels it must find every one of them (so its "none" can fail)."""
    code = "from gemmax.kernels import cpu as ck; print('ON' if ck.available() else 'OFF')"
    res = _run(code, {"GEMMAX_CPU_KERNELS": "0"})
    assert res.returncode == 0 and res.stdout.strip() == "OFF", res.stderr
    assert "native CPU decode kernel unavailable" not in res.stderr, res.stderr
    # a fresh cache and no usable compiler: one clear warning, then XLA's dot
    res = _run(_FALLBACK, {"XDG_CACHE_HOME": str(tmp_path), "CXX": "/bin/false"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["OFF", "ENGINE", "xla", "xla", "3", "TARGETS", "[]"], res.stdout
    assert res.stderr.count("native CPU decode kernel unavailable") == 1, res.stderr
    res = _run(_FALLBACK, {})  # the same script with the kernels: every one of them called
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[:5] == ["ON", "ENGINE", "cpu", "cpu", "3"], res.stdout
    assert res.stdout.split("TARGETS")[1].strip() == str(sorted(TARGETS)), res.stdout


@pytest.mark.parametrize("rows", [1, 5, 9, 16, 17, 40, 64])
def test_bfloat16_activations(rows: int) -> None:
    """bfloat16 x with bfloat16 weights (the bfloat16 model's decode) on the GEMV paths and, from 8 rows,
    the GEMM paths (batched decode): the in-major pair GEMM and the head's pair tile as wide as the rows of x
    (1 to 4 zmm: 9-16, 17, 40 and 64 rows; 1000 weight rows leave a remainder of every tile height); with
    AMX, from 16 rows, the tile products where K is whole 32-element steps (64), and for the head from 8 to 32
    rows with the weights as the tile's A operand (1000 x 64, scaled: whole 32-row blocks, then a tail of 8
    weight rows in the pair tile). Products of bfloat16 values are exact in float32, so only the summation
    order differs from a float64 einsum of the same values (and float32 rounding)."""
    rng = np.random.default_rng(7)
    cases = [("btd,vd->btv", (1000, 70)), ("btd,df->btf", (70, 96)), ("btd,df->btf", (71, 64)),
             ("btd,hdk->bthk", (3, 40, 32)), ("btd,df->btf", (64, 80)), ("btd,vd->btv", (1000, 64))]
    ws = [jnp.asarray(rng.normal(size=(2, *shape)), jnp.bfloat16) for _, shape in cases]
    xs = [jnp.asarray(rng.normal(size=_x_shape(eq, shape, rows)), jnp.bfloat16) for eq, shape in cases]
    scales = [None] * (len(cases) - 1) + [jnp.asarray(rng.uniform(0.5, 2, 1000), jnp.float32)]
    res = _products(tuple(eq for eq, _ in cases), xs, ws, scales, jnp.asarray([1], jnp.int32),
                    out_dtypes=(jnp.float32, jnp.bfloat16))
    for (eq, _), x, w, s, [(got, got16)] in zip(cases, xs, ws, scales, res, strict=True):
        want = _np_product(eq, x, w[1], None if s is None else np.asarray(s))
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max(), err_msg=eq)
        # a bfloat16 result is the kernel's float32 one rounded to nearest even, as XLA's convert
        assert got16.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(got16, np.float32), _to_bf16(got), err_msg=eq)


def test_take_rows_copies_bytes() -> None:
    """The decode step's embedding lookup for half-precision tables (XLA:CPU would convert the whole table)."""
    assert ck.available()
    rng = np.random.default_rng(3)
    for dtype in (jnp.bfloat16, jnp.float16, jnp.float32):
        table = jnp.asarray(rng.normal(size=(50, 12)), dtype)
        ids = jnp.asarray([[3, 49, 0], [7, 7, 1]], jnp.int32)
        got = jax.jit(ck.take_rows)(table, ids)
        assert got.dtype == table.dtype and got.shape == (2, 3, 12)
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(table[ids], np.float32))


def test_write_rows_sets_one_row_per_batch_row_in_place() -> None:
    """The decode step's cache write: equal to the scatter it replaces, any dtype, a position out of range
    dropped; donated, the result is written where the cache was (no copy)."""
    rng = np.random.default_rng(4)
    pos = jnp.asarray([3, 0, 7, 8, 11], jnp.int32)  # the last two are past the 8 positions: dropped
    for dtype in (jnp.bfloat16, jnp.float16, jnp.float32):
        cache = jnp.asarray(rng.normal(size=(2, 5, 8, 3, 4)), dtype)
        rows = jnp.asarray(rng.normal(size=(2, 5, 3, 4)), dtype)
        want = cache.at[:, jnp.arange(5), pos].set(rows)
        got = jax.jit(ck.write_rows)(cache, rows, pos)
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
        ptr = cache.unsafe_buffer_pointer()
        got = jax.jit(ck.write_rows, donate_argnums=0)(cache, rows, pos)
        assert cache.is_deleted() and got.unsafe_buffer_pointer() == ptr
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    with pytest.raises(Exception, match="rows must be"):
        jax.jit(ck.write_rows)(jnp.zeros((2, 5, 8, 3)), jnp.zeros((2, 4, 3)), jnp.zeros(5, jnp.int32))


def test_write_entries_equals_the_dropping_scatter() -> None:
    """Admission and block writes (rows into chosen slots at chosen positions): equal to
    ``cache.at[:, slots[:, None], pos].set(entries, mode="drop")`` with a slot past the batch (an engine's
    padding row) and positions past the cache dropped, in place when donated; shapes that do not line up are
    named."""
    rng = np.random.default_rng(5)
    slots = jnp.asarray([4, 0, 5, 2], jnp.int32)  # 5: past the 5 slots, dropped
    pos = jnp.asarray([[0, 1, 2], [6, 7, 0], [0, 1, 2], [3, 9, 8]], jnp.int32)  # a ring's wrap; 9 and 8 dropped
    for dtype in (jnp.bfloat16, jnp.float32):
        cache = jnp.asarray(rng.normal(size=(2, 5, 8, 3)), dtype)
        entries = jnp.asarray(rng.normal(size=(2, 4, 3, 3)), dtype)
        want = cache.at[:, slots[:, None], pos].set(entries, mode="drop")
        assert not np.array_equal(np.asarray(want, np.float32), np.asarray(cache, np.float32))
        got = jax.jit(ck.write_entries)(cache, entries, slots, pos)
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
        ptr = cache.unsafe_buffer_pointer()
        got = jax.jit(ck.write_entries, donate_argnums=0)(cache, entries, slots, pos)
        assert cache.is_deleted() and got.unsafe_buffer_pointer() == ptr
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    with pytest.raises(Exception, match="trailing shape"):
        jax.jit(ck.write_entries)(jnp.zeros((2, 5, 8, 3)), jnp.zeros((2, 4, 3, 2)), slots, pos)
    with pytest.raises(Exception, match="pos \\[b, t\\]"):
        jax.jit(ck.write_entries)(jnp.zeros((2, 5, 8, 3)), jnp.zeros((2, 4, 3, 3)), slots, pos[:, :2])


@pytest.mark.parametrize("act", ["gelu_tanh", "silu"])
@pytest.mark.parametrize("rows", [3, 12, 70])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_gated_epilogue_equals_xla(act: str, rows: int, dtype: str) -> None:
    """The gated MLP on the kernel (layers.gated_linear: the activation on the gate GEMM's tiles, the product
    on the up GEMM's) against activation_fn(gate) * up in XLA: decode rows (GEMV, or at 12 rows of float32
    the split-K GEMM, then the epilogue over the rows) and prefill rows (the GEMM's tiles, partial panels:
    N = 200), float32 and bfloat16 activations with weights of the same dtype, int8 weights with scales.
    bfloat16: within one rounding of the result (the kernel's sums and tanh differ from XLA's in the last
    float32 bits)."""
    rng = np.random.default_rng(rows)
    k, n = 96, 200
    x_dtype = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    x = jnp.asarray(rng.normal(size=(rows, 1, k)), x_dtype)
    nodes = []
    for _ in range(2):
        w = jnp.asarray(rng.normal(size=(2, k, n)) / np.sqrt(k), jnp.float32)
        if dtype == "int8":
            s = jnp.abs(w).max(axis=1) / 127
            nodes.append({"kernel": jnp.round(w / s[:, None]).astype(jnp.int8), "scale": s})
        else:
            nodes.append({"kernel": w.astype(x_dtype)})
    layer = jnp.int32(1)

    def run(gate, up, x):
        view = [dict(nd, kernel=ck.NativeWeight(nd["kernel"], layer, gemm=rows > ck.MAX_ROWS), **(
            {"scale": nd["scale"][layer]} if "scale" in nd else {})) for nd in (gate, up)]
        return layers.gated_linear(view[0], view[1], x, act, "btd,df->btf")

    assert _targets(jax.jit(run), *nodes, x) == {ck._TARGET}
    got = jax.jit(run)(*nodes, x)
    plain = [dict(nd, kernel=nd["kernel"][1], **({"scale": nd["scale"][1]} if "scale" in nd else {}))
             for nd in nodes]
    want = layers.activation_fn(act)(layers.linear(plain[0], x, "btd,df->btf")) * layers.linear(
        plain[1], x, "btd,df->btf")
    assert got.dtype == want.dtype == x_dtype and got.shape == want.shape
    g, w = np.asarray(got, np.float32), np.asarray(want, np.float32)
    if dtype == "bfloat16":
        np.testing.assert_allclose(g, w, rtol=2.0**-7, atol=1e-3 * np.abs(w).max())
        assert (g == w).mean() > 0.9
    else:
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(w).max())


def test_bfloat16_products_keep_bfloat16_operands_both_ways():
    """On the CPU a bfloat16 product with many rows multiplies bfloat16 operands with float32 sums, forwards
    and in both gradient products (autodiff alone would convert the weight to float32 for the backward);
    with one row (a decode GEMV) it multiplies in float32. The values equal the float32 product of the same
    bfloat16 numbers."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 8, 64)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(64, 3, 16)), jnp.bfloat16)
    eq = "btd,dnh->btnh"

    def f(x, w):
        return (layers.einsum(eq, x, w, jnp.float32) ** 2).sum()

    def ref(x, w):
        return (jnp.einsum(eq, x.astype(jnp.float32), w.astype(jnp.float32)) ** 2).sum()

    eqns = jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(x, w).eqns
    inner = [e for outer in eqns for e in ([outer] + list(_sub_eqns(outer)))]
    dots = [e for e in inner if e.primitive.name == "dot_general"]
    assert len(dots) == 3
    for eqn in dots:
        assert [v.aval.dtype for v in eqn.invars] == [jnp.bfloat16, jnp.bfloat16], eqn
    np.testing.assert_allclose(f(x, w), ref(x, w), rtol=1e-5)
    for a, b in zip(jax.grad(f, argnums=(0, 1))(x, w), jax.grad(ref, argnums=(0, 1))(x, w), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2e-2, atol=0.5)
    one = jax.make_jaxpr(lambda x, w: layers.einsum(eq, x[:1, :1], w))(x, w)
    dot = next(e for e in one.eqns if e.primitive.name == "dot_general")
    assert [v.aval.dtype for v in dot.invars] == [jnp.float32, jnp.float32]


def _sub_eqns(eqn: Any) -> Any:
    """The equations inside an equation's sub-jaxprs (a custom VJP's rules, a pjit), recursively."""
    for p in eqn.params.values():
        for j in (p if isinstance(p, (list, tuple)) else [p]):
            inner = getattr(j, "jaxpr", j)
            for e in getattr(inner, "eqns", []):
                yield e
                yield from _sub_eqns(e)
