"""Pure-function building blocks shared by every model in gemmax.

Numerics are pinned to the reference implementations (see docs/numerics.md): norms, RoPE angles, attention
logits and softmax run in float32 whatever the compute dtype, and the results are cast back at the end.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemmax.kernels import cpu as cpu_kernels
from gemmax.nn.quant import dequantize_kernel, in_axes_from_eq

_log = logging.getLogger(__name__)

Array = jax.Array
Params = dict[str, Any]

#: Large negative used instead of -inf so that a fully masked row (padding) gives a uniform softmax, not NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def rms_norm(x: Array, scale: Array, eps: float = 1e-6, offset: float = 1.0) -> Array:
    """RMSNorm in float32.

    Gemma (offset 1): ``x * rsqrt(mean(x^2) + eps) * (1 + scale)``, multiplied in float32 then cast.
    Llama (offset 0): the normalised value is cast to the input dtype *before* the weight multiply, as the
    reference does — the two orders differ in bfloat16.
    """
    dtype = x.dtype
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if offset:
        return (y * (offset + scale.astype(jnp.float32))).astype(dtype)
    return y.astype(dtype) * scale.astype(dtype)


_GELU_C = 0.044715


@jax.custom_jvp
def gelu_tanh(x: Array) -> Array:
    """The tanh approximation of GELU, as every Gemma reference uses (not the exact erf GELU).

    Its derivative is written out (``_gelu_tanh_jvp``): left to autodiff, a training step keeps five
    intermediates of every MLP activation for the backward pass (x³, the tanh, ...; five [tokens, 2048]
    arrays a layer for Gemma 3 270M) and reads them back in one transposing fusion, which on the CPU took
    longer than the layer's weight-gradient products. With the rule, it keeps one array, the derivative."""
    return jax.nn.gelu(x, approximate=True)


@gelu_tanh.defjvp
def _gelu_tanh_jvp(primals: tuple[Array], tangents: tuple[Array]) -> tuple[Array, Array]:
    (x,), (t,) = primals, tangents
    c = np.sqrt(2 / np.pi).astype(x.dtype)
    th = jnp.tanh(c * (x + _GELU_C * (x ** 3)))
    cdf = 0.5 * (1.0 + th)  # the forward value exactly as jax.nn.gelu computes it
    # d/dx [x cdf(x)] = cdf + x * 0.5 (1 - tanh²) * c (1 + 3 k x²)
    slope = cdf + 0.5 * x * (1.0 - th * th) * c * (1.0 + 3.0 * _GELU_C * x * x)
    return x * cdf, slope * t


def activation_fn(name: str):
    """The MLP's activation, evaluated in float32 and rounded once to the input's dtype, as torch does for
    bfloat16 tensors (its "opmath"); op by op in bfloat16 XLA would round after each of gelu's seven steps
    (less accurate, and on the CPU 4x slower: 33 vs 8 ms of a 270M prefill)."""
    fn = {"gelu_tanh": gelu_tanh, "silu": jax.nn.silu}[name]
    return lambda x: fn(x.astype(jnp.float32)).astype(x.dtype)


# ---- rotary embeddings ---------------------------------------------------------------------------


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None = None,
                  rotary_dim: int | None = None) -> Array:
    """Inverse frequencies [rotary_dim/2] in float32, with linear or llama3 scaling folded in.

    Linear scaling divides positions by the factor, which is the same as dividing the frequencies.
    """
    rd = rotary_dim or head_dim
    inv = 1.0 / (theta ** (jnp.arange(0, rd, 2, dtype=jnp.float32) / rd))
    if not scaling:
        return inv
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        return inv / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        orig = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = orig / low, orig / high
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (orig / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(is_mid, mid, scaled)
    if kind == "default":
        return inv
    raise ValueError(f"unsupported rope scaling {kind!r}")


def rope_sin_cos(positions: Array, inv_freq: Array) -> tuple[Array, Array]:
    """(sin, cos) of positions [B, T] x inv_freq [rd/2] -> two [B, T, rd/2] float32 arrays."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x: Array, positions: Array, inv_freq: Array | tuple[Array, Array]) -> Array:
    """Rotate-half RoPE (first half / second half, not interleaved) on x [B, T, N, hd].

    ``inv_freq`` may instead be ``rope_sin_cos(positions, inv_freq)`` computed once by the caller: inside a
    layer scan each layer would otherwise evaluate its own sin and cos (for q and for k) although a model
    has at most two RoPE bases (40 ms of a 0.75 s Gemma 3 270M prefill of 512 tokens).
    If inv_freq covers fewer than hd/2 frequencies (RecurrentGemma rotates half the head), the remaining
    channels pass through unchanged.
    """
    sin, cos = inv_freq if isinstance(inv_freq, tuple) else rope_sin_cos(positions, inv_freq)
    rd = 2 * sin.shape[-1]
    sin, cos = sin[:, :, None, :], cos[:, :, None, :]
    xr = x[..., :rd].astype(jnp.float32)
    x1, x2 = xr[..., : rd // 2], xr[..., rd // 2 :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
    if rd == x.shape[-1]:
        return out
    return jnp.concatenate([out, x[..., rd:]], axis=-1)


def norm_rope(x: Array, scale: Array | None, eps: float, offset: float, positions: Array,
              inv_freq: Array | tuple[Array, Array], mult: float | None = None, native: bool = False) -> Array:
    """A layer's query or key after its projection: ``rms_norm`` (Gemma 3's q/k norm, when ``scale`` is
    given), then ``apply_rope``, then ``* mult`` (the query scale).

    ``native`` (set by a family's prefill on the ``"cpu"`` backend, through ``decoder_layer``'s ``backend``;
    only where ``cpu_kernels.available()``): a prefill's many rows with RoPE tables do the three in one native
    pass (``cpu_kernels.norm_rope``): XLA re-read the input for each half of the rotation and concatenated
    them."""
    # (a bfloat16 norm without offset, Llama's order, rounds before its weight: left to XLA)
    if (native and cpu_kernels.supports_norm_rope(x, inv_freq)
            and (x.dtype == jnp.float32 or scale is None or offset)):
        return cpu_kernels.norm_rope(x, scale, eps, offset, inv_freq, mult)
    if scale is not None:
        x = rms_norm(x, scale, eps, offset)
    x = apply_rope(x, positions, inv_freq)
    return x if mult is None else x * jnp.asarray(mult, x.dtype)


# ---- linear maps: plain, quantized, LoRA --------------------------------------------------------


#: Below this many rows a half-precision product on the CPU is multiplied in float32 (see ``dot_dtype``).
CPU_HALF_GEMM_ROWS = 16


def _explicit(eq: str, x_ndim: int, w_ndim: int) -> tuple[str, str, str]:
    """``(x, w, out)`` subscripts of ``eq`` with spaces removed and any ``...`` spelled out in unused letters
    (leading axes, broadcast as numpy does), so that the rows and gradients below read one letter an axis."""
    ins, out = eq.replace(" ", "").split("->")
    xs, ws = ins.split(",")
    if "..." not in eq:
        return xs, ws, out
    free = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in eq]
    nx = x_ndim - len(xs.replace("...", "")) if "..." in xs else 0
    nw = w_ndim - len(ws.replace("...", "")) if "..." in ws else 0
    n = max(nx, nw)
    ell = "".join(free[:n])
    return xs.replace("...", ell[n - nx:]), ws.replace("...", ell[n - nw:]), out.replace("...", ell)


def _rows(eq: str, x_shape: tuple[int, ...], w_ndim: int) -> int:
    """The rows of ``einsum(eq, x, w)`` as a matrix product: the size of ``x``'s axes that are neither
    contracted with ``w`` nor shared with it as batch axes."""
    xs, ws, _ = _explicit(eq, len(x_shape), w_ndim)
    return math.prod(n for c, n in zip(xs, x_shape, strict=True) if c not in ws)


def dot_dtype(dtype: Any, rows: int | None = None) -> Any:
    """The dtype a matmul of ``dtype`` operands with ``rows`` rows multiplies in on the current backend.

    On the CPU, a half-precision product with few rows (a decode GEMV) is converted to float32: XLA:CPU's
    bfloat16 matrix-vector product is ~8x slower than the float32 one with the conversion fused into the
    operand read (the 270M head GEMV: 241 vs 29 ms). A product with ``CPU_HALF_GEMM_ROWS`` rows or more (a
    prefill, a training step) keeps its bfloat16 operands: XLA's bfloat16 GEMM with float32 sums runs at
    1.6-2x the float32 one on CPUs with bfloat16 dot instructions (AVX512-BF16, AMX), and the result is the
    same, since the product of two bfloat16 values is exact in float32. The sums are float32 in both cases.
    GPUs and TPUs have native half-precision dots: unchanged there. ``rows=None``: a product with few rows.
    """
    dtype = jnp.dtype(dtype)
    if dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and jax.default_backend() == "cpu":
        if rows is not None and rows >= CPU_HALF_GEMM_ROWS and dtype == jnp.dtype(jnp.bfloat16):
            return dtype
        return jnp.dtype(jnp.float32)
    return dtype


def _accumulation(dtype: Any) -> Any:
    """The dtype a product's sums are kept in: float32 for half-precision operands on the CPU (as the
    conversion to float32 did before), the operands' own dtype elsewhere."""
    dtype = jnp.dtype(dtype)
    if dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and jax.default_backend() == "cpu":
        return jnp.dtype(jnp.float32)
    return dtype


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _half_product(eq: str, x: Array, w: Array) -> Array:
    """A CPU product of half-precision operands with float32 sums, whose backward products also take
    half-precision operands. Left to autodiff, the float32 cotangent meets the bfloat16 operand and XLA
    converts that operand to float32: the backward pass would run at float32 speed."""
    return jnp.einsum(eq, x, w, preferred_element_type=jnp.float32)


def _half_product_fwd(eq: str, x: Array, w: Array) -> tuple[Array, tuple[Array, Array]]:
    return _half_product(eq, x, w), (x, w)


def _half_product_bwd(eq: str, res: tuple[Array, Array], ct: Array) -> tuple[Array, Array]:
    x, w = res
    xs, ws, out = _explicit(eq, x.ndim, w.ndim)
    c = ct.astype(x.dtype)
    dx = jnp.einsum(f"{out},{ws}->{xs}", c, w, preferred_element_type=jnp.float32).astype(x.dtype)
    dw = jnp.einsum(f"{xs},{out}->{ws}", x, c, preferred_element_type=jnp.float32).astype(w.dtype)
    return dx, dw


_half_product.defvjp(_half_product_fwd, _half_product_bwd)


def _transposable(eq: str, x_ndim: int, w_ndim: int) -> bool:
    """Whether both input gradients of ``eq`` are again plain einsums (every axis of each operand appears in
    the output or in the other operand, none repeated): true of every linear map and attention product."""
    xs, ws, out = _explicit(eq, x_ndim, w_ndim)
    return (len(set(xs)) == len(xs) and len(set(ws)) == len(ws)
            and all(c in out or c in ws for c in xs) and all(c in out or c in xs for c in ws))


def _merged_rows(eq: str, x: Array, w_ndim: int) -> tuple[str, Array, tuple[int, ...]] | None:
    """``eq`` and ``x`` with ``x``'s leading row axes merged into one, and the output's leading shape, when
    ``x`` has two or more leading axes that ``w`` lacks and the output starts with in the same order (a
    linear map over ``[batch, time, ...]``); None otherwise.

    Why: the product is then a plain 2-D matrix product in both directions. Over ``[batch, time, d]``,
    XLA:CPU lays the weight gradient ``sum over (b, t) of x (x) g`` out with a transposing copy of the
    cotangent before each product ([2048, 512] a gated-MLP product of Gemma 3 270M, ~10 ms each on two
    cores: a third of the MLP's backward); over ``[rows, d]`` it multiplies in place.
    """
    xs, ws, out = _explicit(eq, x.ndim, w_ndim)
    n = 0
    while n < len(xs) and n < len(out) and xs[n] == out[n] and xs[n] not in ws:
        n += 1
    if n < 2:
        return None
    row = next(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz" if c not in xs + ws + out)
    merged = f"{row}{xs[n:]},{ws}->{row}{out[n:]}"
    return merged, x.reshape((math.prod(x.shape[:n]),) + x.shape[n:]), x.shape[:n]


def einsum(eq: str, x: Array, w: Array, out_dtype: Any | None = None) -> Array:
    """``jnp.einsum(eq, x, w)`` with ``w`` cast to ``x``'s dtype, multiplied in ``dot_dtype`` (see there) and
    returned in ``out_dtype`` (default: ``x``'s dtype). Leading row axes of ``x`` are multiplied as one
    (``_merged_rows``), except in a CPU half-precision product: XLA:CPU runs that product's merged weight
    gradient (bfloat16 operands, float32 sums, rows contracted) on a dot it has no bfloat16 kernel for."""
    dt = dot_dtype(x.dtype, _rows(eq, x.shape, w.ndim))
    acc = _accumulation(dt)
    merged = _merged_rows(eq, x, w.ndim) if acc == dt else None
    if merged is not None:
        eq2, x2, lead = merged
        y = einsum(eq2, x2, w, out_dtype)
        return y.reshape(lead + y.shape[1:])
    if acc != dt and _transposable(eq, x.ndim, w.ndim):  # half-precision operands on the CPU: float32 sums both ways
        y = _half_product(eq, x.astype(dt), w.astype(dt))
    else:
        y = jnp.einsum(eq, x.astype(dt), w.astype(dt), preferred_element_type=acc)
    return y.astype(out_dtype or x.dtype)


def linear(node: Params, x: Array, eq: str, lora_eqs: tuple[str, str] | None = None) -> Array:
    """Apply a linear node with an einsum equation.

    The node is ``{"kernel": W}`` plus, optionally, ``"scale"`` (int8/int4 weight-only quantization: per
    output-channel scales, shaped like the output's trailing dims) and ``"lora_a"``/``"lora_b"`` (low-rank
    adapters, multiplied by ``node["lora_scale"]``). Keeping all three behind one function is what lets LoRA
    and quantization be pytree transforms that never touch model code.
    """
    if "qkernel" in node:
        # grouped 4-bit (int4 / NF4): dequantize this one kernel inside the layer, never the whole model
        rest = {k: v for k, v in node.items() if k not in ("qkernel", "qscale")}
        node = dict(rest, kernel=cpu_kernels.map_weight(node["qkernel"], lambda q: dequantize_kernel(
            dict(node, qkernel=q), in_axes_from_eq(eq), x.dtype)))
    w = node["kernel"]
    dt = dot_dtype(x.dtype)
    # a weight wrapped as ``cpu_kernels.NativeWeight`` (a family's prefill / decode step on the "cpu"
    # backend) goes to the native GEMV / GEMM where it pays; any other weight to XLA's dot
    if cpu_kernels.supports(eq, x, w):
        if x.dtype == jnp.bfloat16 and "lora_a" not in node:  # rounded by the kernel, as below
            return cpu_kernels.gemv(eq, x, w, node.get("scale"), out_dtype=x.dtype)
        y = cpu_kernels.gemv(eq, x, w, node.get("scale")).astype(dt)
    else:
        y = einsum(eq, x, cpu_kernels.unstack(w), dt)
        if "scale" in node:
            y = y * node["scale"].astype(dt)
    if "lora_a" in node:
        if lora_eqs is None:
            raise ValueError(f"LoRA factors on a linear with no LoRA equations ({eq})")
        h = einsum(lora_eqs[0], x, node["lora_a"].astype(x.dtype))
        y = y + einsum(lora_eqs[1], h, node["lora_b"].astype(x.dtype), dt) * jnp.asarray(
            node.get("lora_scale", 1.0), dt)
    return y.astype(x.dtype)


def gated_linear(gate: Params, up: Params, x: Array, activation: str, eq: str,
                 lora_eqs: tuple[str, str] | None = None) -> Array:
    """``activation_fn(activation)(linear(gate, x)) * linear(up, x)``: the gated MLP's input to its down
    projection. On the CPU kernel path (``cpu_kernels.NativeWeight`` kernels, plain or int8, no LoRA,
    float32 or bfloat16 x) the activation and the product are applied by the GEMM to each finished tile
    (``cpu_kernels.gemv``'s ``act``/``mul``), in the same order and roundings, instead of an XLA fusion that
    re-reads both products from memory."""
    plain = all(set(n) <= {"kernel", "scale"} for n in (gate, up))
    if (plain and x.dtype in (jnp.float32, jnp.bfloat16) and activation in cpu_kernels.ACTIVATIONS
            and cpu_kernels.supports(eq, x, gate["kernel"]) and cpu_kernels.supports(eq, x, up["kernel"])):
        g = cpu_kernels.gemv(eq, x, gate["kernel"], gate.get("scale"), out_dtype=x.dtype, act=activation)
        return cpu_kernels.gemv(eq, x, up["kernel"], up.get("scale"), out_dtype=x.dtype, mul=g)
    return activation_fn(activation)(linear(gate, x, eq, lora_eqs)) * linear(up, x, eq, lora_eqs)


def softcap(x: Array, cap: float | None) -> Array:
    if not cap:
        return x
    return cap * jnp.tanh(x / cap)


# ---- attention -----------------------------------------------------------------------------------


def remat(body: Callable, policy: str | bool | None) -> Callable:
    """``body`` (a scanned layer) under a rematerialisation policy: ``"full"`` (or True) recomputes the whole
    layer in the backward pass, ``"dots"`` keeps the matrix products and recomputes the rest, None / "none"
    (or False) keeps every activation. One place, so every family's ``remat=`` means the same."""
    if policy in ("full", True):
        return jax.checkpoint(body)
    if policy == "dots":
        return jax.checkpoint(body, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    if policy not in (None, False, "none"):
        raise ValueError(f"unknown remat policy {policy!r} (use 'full', 'dots' or None)")
    return body


def attention_mask(q_idx: Array, k_idx: Array, window: Array | int | None, q_seg: Array | None = None,
                   k_seg: Array | None = None, k_valid: Array | None = None, causal: bool = True,
                   q_prefix: Array | None = None) -> Array:
    """Boolean [B, T, S]: causal, within the sliding window (which includes the current token:
    ``q - W < k <= q``), inside the same packed segment, and only over valid cache slots.

    ``q_prefix`` [B, T] (with segments) lets a query also see the keys of that segment: its shared prompt,
    when several continuations of one prompt share a row (see ``forward_hidden``'s ``prefix_ids``). The
    indices are then the tokens' positions, which restart after the prompt in each continuation.

    ``causal=False`` (bidirectional encoders such as EmbeddingGemma) lets a query see keys on both sides;
    the window is then symmetric, ``|q - k| < W``."""
    q = q_idx[:, :, None]
    k = k_idx[:, None, :]
    if causal:
        m = k <= q
        if window is not None:
            m = m & (q - k < window)
    else:
        m = jnp.abs(q - k) < window if window is not None else jnp.ones(q.shape[:2] + k.shape[2:], bool)
    if q_seg is not None and k_seg is not None:
        same = q_seg[:, :, None] == k_seg[:, None, :]
        if q_prefix is not None:
            same = same | (q_prefix[:, :, None] == k_seg[:, None, :])
        m = m & same
    if k_valid is not None:
        m = m & k_valid[:, None, :]
    return m


def dot_attention(q: Array, k: Array, v: Array, mask: Array, logit_cap: float | None = None,
                  implementation: str | None = None) -> Array:
    """Grouped-query attention. q [B,T,H,hd] (already scaled), k/v [B,S,K,hd], mask [B,T,S] -> [B,T,H,hd].

    Logits and softmax in float32; query heads are grouped onto their KV head without repeating K/V.
    ``implementation`` ("cudnn", or "xla" for the same call compiled by XLA) runs it as one fused
    ``jax.nn.dot_product_attention`` instead, which has no logit soft-cap. Where cuDNN's kernel does not
    apply (no cuDNN, a head or sequence shape it lacks: JAX says so while tracing) this einsum attention runs
    instead, and the reason is logged.
    """
    if implementation is not None:
        if logit_cap is not None:
            raise ValueError("fused attention has no logit soft-cap (Gemma 2's attn_logit_softcapping)")
        try:
            return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=1.0,
                                                implementation=implementation)
        except (NotImplementedError, RuntimeError, ValueError) as e:
            if implementation != "cudnn":
                raise
            _log.info("cuDNN attention does not apply to q %s, k %s (%s): XLA's attention runs", q.shape, k.shape, e)
    b, t, h, hd = q.shape
    kv = k.shape[2]
    g = h // kv
    qg = q.reshape(b, t, kv, g, hd)
    logits = einsum("btkgd,bskd->bkgts", qg, k, jnp.float32)
    logits = softcap(logits, logit_cap)
    logits = jnp.where(mask[:, None, None, :, :], logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, hd)
