"""Chunked cross-entropy: the language-model loss without ever building [batch, seq, vocab] logits.

With Gemma's 256k vocabulary the logits of one 8k-token row are 8 GB in float32 — more than the rest of a
fine-tuning step. Here the flattened tokens are cut into chunks of ``chunk_size``; each chunk's logits are
computed, reduced to (loss, correct) and thrown away inside ``jax.lax.scan``: peak memory is one chunk's
[chunk, V] logits (and their gradient).

The loss carries its own VJP. Its forward rule computes, while a chunk's logits are alive, the gradient of
the loss with respect to those logits (``softmax - onehot``) and from it the gradients of exactly the inputs
being differentiated: the hidden states always in fine-tuning, the head only when it is trained. The
backward pass then only scales what was stored. Left to autodiff, the same step either keeps every chunk's
logits or recomputes them, a third product the size of the head (256k x 640 for Gemma 3 270M, about half of
a LoRA step's work).

The functions return *sums* (loss, target count, correct count), not means, so that gradient accumulation
can divide by the number of target tokens of all micro-batches together (the token-weighted mean), which a
mean of per-micro-batch means is not when micro-batches hold different numbers of target tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from gemmax.kernels import cpu as cpu_kernels
from gemmax.models.base import CPU, XLA
from gemmax.nn.layers import einsum

__all__ = ["LossSums", "chunked_cross_entropy", "naive_cross_entropy", "output_head", "lm_loss"]


class LossSums(NamedTuple):
    """Sums over the target tokens of one (micro-)batch; ``sum_loss / n_tokens`` is the mean loss."""

    sum_loss: jax.Array
    n_tokens: jax.Array
    n_correct: jax.Array


def _softcap(x: jax.Array, cap: float | None) -> jax.Array:
    return x if cap is None else cap * jnp.tanh(x / cap)


def _chunk_logits(h: jax.Array, head: jax.Array, head_is_vd: bool, scale: jax.Array | None = None) -> jax.Array:
    # float32 accumulation whatever the compute dtype: log-softmax over 256k entries needs it.
    eq = "nd,vd->nv" if head_is_vd else "nd,dv->nv"
    logits = einsum(eq, h, head, jnp.float32)
    return logits if scale is None else logits * scale.astype(jnp.float32)


def _token_terms(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token (masked loss, masked correct) from float32 logits [N, V].

    A token counts as correct when its target's logit is the row's largest (a target tied for the top counts
    too): one comparison against the max the log-sum-exp needs anyway, instead of a separate argmax pass over
    [N, V]."""
    vocab = logits.shape[-1]
    safe = jnp.clip(targets, 0, vocab - 1)  # padding targets may be anything; they are masked below
    top = jnp.max(logits, axis=-1)
    lse = top + jnp.log(jnp.sum(jnp.exp(logits - top[:, None]), axis=-1))
    tgt = jnp.take_along_axis(logits, safe[:, None], axis=-1)[:, 0]
    on = mask > 0
    loss = jnp.where(on, (lse - tgt) * mask, 0.0)
    correct = jnp.where(on, (tgt >= top).astype(jnp.float32) * mask, 0.0)
    return loss, correct


class _Head(NamedTuple):
    """The static description of the output head the fused loss needs (hashable: it keys the custom VJP)."""

    softcap: float | None
    head_is_vd: bool
    has_scale: bool
    kernel: str = XLA

    @property
    def native(self) -> bool:
        """Whether the chunk's softmax passes go to the native CPU kernel: asked for, and plain logits (a
        soft-cap or a quantized head's scale stay with XLA's passes)."""
        return self.kernel == CPU and self.softcap is None and not self.has_scale


def _native_pass(hc: jax.Array, yc: jax.Array, wc: jax.Array, head: jax.Array, head_is_vd: bool,
                 want: tuple[bool, bool, bool]) -> tuple[jax.Array, ...]:
    """``_chunk_pass`` with the log-sum-exp, the loss terms and ``softmax - onehot`` from the native CPU
    kernel (one read of the logits for the statistics, one for the gradient, a vectorised exp)."""
    vocab = head.shape[0] if head_is_vd else head.shape[1]
    logits = _chunk_logits(hc, head, head_is_vd)  # float32 [c, V]
    safe = jnp.clip(yc, 0, vocab - 1)
    on = wc > 0
    w = jnp.where(on, wc, 0.0)
    want_h, want_head, _ = want
    half = hc.dtype == jnp.bfloat16
    grad_dtype = (jnp.bfloat16 if half else jnp.float32) if (want_h or want_head) else None
    tok, hit, g = cpu_kernels.softmax_xent(logits, safe, w, grad_dtype, in_place=True)
    g = g.astype(hc.dtype) if g is not None else None
    tok = jnp.where(on, tok, 0.0)
    out = ((tok * wc).sum(), jnp.where(on, hit * wc, 0.0).sum(), tok)
    return out + _head_grads(g, hc, head, head_is_vd, want_h, want_head, native=True)


def _head_grads(g: jax.Array | None, hc: jax.Array, head: jax.Array, head_is_vd: bool, want_h: bool,
                want_head: bool, native: bool = False) -> tuple[jax.Array, ...]:
    """From the logits' gradient ``g`` [c, V] (in the hidden states' dtype), the hidden states' and the
    head's gradients, each only when wanted, in that order.

    ``native`` (a caller on the CPU kernels' path): the hidden states' gradient through a head stored [V, D]
    (g [c, V] x head [V, D], contracting over the vocabulary, the head read row by row) on the native GEMM
    (float32 tiles, or bfloat16 pairs / AMX tiles): 161 / 383 GFLOP/s against XLA's 150 / 327 on a
    262k x 640 head (512 rows, Xeon, two threads). The logits product (contracting over D, the head
    transposed) stays with XLA's dot, which was faster there (134 / 325 vs 119 / 309). A trained head's
    float32 gradient ``g^T h`` (contracting over the rows) takes the native ``gemm_tn``: 393-412 ms
    against XLA's 599-631 for 512 rows of a 262k x 640 head (two-core Zen 5, alternated)."""
    out: tuple[jax.Array, ...] = ()
    if want_h and native and head_is_vd:
        out += (cpu_kernels.gemv("nv,vd->nd", g, cpu_kernels.NativeWeight(head, None, gemm=True)),)
    elif want_h:
        out += (einsum("nv,vd->nd" if head_is_vd else "nv,dv->nd", g, head, jnp.float32),)
    if want_head and native and head_is_vd and g.dtype == jnp.float32:
        out += (cpu_kernels.gemm_tn(g, hc),)  # g float32: hc is too (the native pass casts g to it)
    elif want_head:
        eq = "nv,nd->vd" if head_is_vd else "nv,nd->dv"
        out += (jnp.einsum(eq, g, hc.astype(g.dtype), preferred_element_type=jnp.float32),)
    return out


def _chunk_pass(head_spec: _Head, hc: jax.Array, yc: jax.Array, wc: jax.Array, head: jax.Array,
                scale: jax.Array, want: tuple[bool, bool, bool]) -> tuple[jax.Array, ...]:
    """One chunk's (loss, correct, per-token loss) and then, in that order, the gradient of the chunk's loss
    for each input ``want`` (hidden, head, scale) asks for.

    The gradient of ``sum_n w_n (lse_n - z_n[y_n])`` with respect to the logits is ``w_n (softmax_n - onehot)``,
    known as soon as the forward pass has the log-sum-exp; the gradients the step needs follow from it by one
    product each. Computing them here, while the chunk's [chunk, V] logits are alive, is what saves the
    backward pass from recomputing those logits (a third head-sized product) or keeping them.
    """
    if head_spec.native:
        return _native_pass(hc, yc, wc, head, head_spec.head_is_vd, want)
    vocab = head.shape[0] if head_spec.head_is_vd else head.shape[1]
    raw = _chunk_logits(hc, head, head_spec.head_is_vd)  # float32 [c, V]
    z = raw * scale.astype(jnp.float32) if head_spec.has_scale else raw
    logits = _softcap(z, head_spec.softcap)
    safe = jnp.clip(yc, 0, vocab - 1)
    top = jnp.max(logits, axis=-1)
    lse = top + jnp.log(jnp.sum(jnp.exp(logits - top[:, None]), axis=-1))
    tgt = jnp.take_along_axis(logits, safe[:, None], axis=-1)[:, 0]
    on = wc > 0
    tok = jnp.where(on, lse - tgt, 0.0)  # unweighted: d(sum_loss)/d(mask)
    loss = (tok * wc).sum()
    correct = jnp.where(on, (tgt >= top).astype(jnp.float32) * wc, 0.0).sum()
    want_h, want_head, want_scale = want
    if not (want_h or want_head or want_scale):
        return loss, correct, tok
    hit = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) == safe[:, None]
    g = (jnp.exp(logits - lse[:, None]) - hit.astype(jnp.float32)) * jnp.where(on, wc, 0.0)[:, None]
    if head_spec.softcap is not None:
        g = g * (1.0 - jnp.square(logits / head_spec.softcap))  # d(c tanh(z / c))/dz
    out: tuple[jax.Array, ...] = (loss, correct, tok)
    d_scale = (g * raw).sum(axis=0) if want_scale else None
    if head_spec.has_scale:
        g = g * scale.astype(jnp.float32)
    out += _head_grads(g.astype(hc.dtype), hc, head, head_spec.head_is_vd, want_h, want_head)
    return out if d_scale is None else out + (d_scale,)


def in_chunks(chunk: int, *arrays: jax.Array) -> tuple[int, list[jax.Array]]:
    """``(n_chunks, arrays)``: each [N, ...] array zero-padded to whole chunks and reshaped to
    [n_chunks, chunk, ...], ready for ``lax.scan`` / ``lax.map`` over the chunks."""
    n = arrays[0].shape[0]
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n
    out = [jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1)) if pad else a for a in arrays]
    return n_chunks, [a.reshape(n_chunks, chunk, *a.shape[1:]) for a in out]


def scan_summing(step: Callable[[Any], tuple[Any, Any]], xs: Any) -> tuple[Any, Any]:
    """``lax.scan`` of ``step(x) -> (sums, outputs)`` over the leading axis of ``xs``: the sums added over
    the steps, the outputs stacked. The first step's sums start the total, so a head-sized gradient (the
    262k x 640 embedding of a small Gemma: 671 MB in float32) is neither zero-filled nor added to zeros."""
    sums, first = step(jax.tree_util.tree_map(lambda a: a[0], xs))

    def body(acc: Any, x: Any) -> tuple[Any, Any]:
        s, out = step(x)
        return jax.tree_util.tree_map(jnp.add, acc, s), out

    sums, rest = jax.lax.scan(body, sums, jax.tree_util.tree_map(lambda a: a[1:], xs))
    return sums, jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a[None], b]), first, rest)


def _chunked(head_spec: _Head, chunk: int, h: jax.Array, head: jax.Array, scale: jax.Array, y: jax.Array,
             w: jax.Array, want: tuple[bool, bool, bool]) -> tuple[jax.Array, ...]:
    """Run ``_chunk_pass`` over the [N] tokens chunk by chunk (``lax.scan``): sums of loss and correct, the
    per-token losses, and the wanted gradients (the hidden's per chunk, the head's and scale's summed)."""
    n, d = h.shape
    n_chunks, xs = in_chunks(chunk, h, y, w)
    want_h, want_head, want_scale = want

    def step(xs: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[Any, tuple[jax.Array, ...]]:
        loss, correct, tok, *grads = _chunk_pass(head_spec, *xs, head, scale, want)
        d_h = grads.pop(0) if want_h else None
        d_head = grads.pop(0).astype(jnp.float32) if want_head else None
        d_scale = grads.pop(0).astype(jnp.float32) if want_scale else None
        return (d_head, d_scale), (loss, correct, tok, d_h)

    (d_head, d_scale), (loss, correct, tok, d_h) = scan_summing(step, tuple(xs))
    d_h = d_h.reshape(n_chunks * chunk, d)[:n] if want_h else None
    return loss.sum(), correct.sum(), tok.reshape(-1)[:n], d_h, d_head, d_scale


@functools.cache
def _fused_loss(head_spec: _Head, chunk: int) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """``(h [N, D], head, scale, targets [N], mask [N]) -> (sum_loss, n_correct)`` with a custom VJP whose
    forward rule computes the gradients of exactly the inputs being differentiated (``symbolic_zeros``): a
    LoRA step, whose head is frozen, pays for the hidden's gradient only."""

    @jax.custom_vjp
    def loss_fn(h: jax.Array, head: jax.Array, scale: jax.Array, y: jax.Array, w: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
        loss, correct, *_ = _chunked(head_spec, chunk, h, head, scale, y, w, (False, False, False))
        return loss, correct

    def fwd(h: Any, head: Any, scale: Any, y: Any, w: Any) -> tuple[tuple[jax.Array, jax.Array], tuple]:
        want = (h.perturbed, head.perturbed, scale.perturbed and head_spec.has_scale)
        loss, correct, tok, d_h, d_head, d_scale = _chunked(
            head_spec, chunk, h.value, head.value, scale.value, y.value, w.value, want)
        like = (h.value, head.value, scale.value, w.value)
        return (loss, correct), (tok if w.perturbed else None, d_h, d_head, d_scale, like)

    def bwd(res: tuple, cts: tuple[Any, Any]) -> tuple[Any, ...]:
        tok, d_h, d_head, d_scale, (h, head, scale, w) = res
        g = cts[0]
        if isinstance(g, SymbolicZero):  # only n_correct was differentiated: it is piecewise constant
            return (None, None, None, None, None)

        def scaled(d: jax.Array | None, like: jax.Array) -> jax.Array | None:
            return None if d is None else (d * g).astype(like.dtype)  # None: a zero cotangent

        return (scaled(d_h, h), scaled(d_head, head), scaled(d_scale, scale), None, scaled(tok, w))

    loss_fn.defvjp(fwd, bwd, symbolic_zeros=True)
    return loss_fn


def chunked_cross_entropy(
    hidden: jax.Array,
    head: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    *,
    softcap: float | None = None,
    chunk_size: int = 1024,
    head_is_vd: bool = True,
    head_scale: jax.Array | None = None,
    kernel: str = XLA,
) -> LossSums:
    """Cross-entropy sums of ``hidden @ head`` against ``targets``, chunk by chunk.

    Args:
      hidden: [B, T, D] final hidden states (after the final norm), any float dtype.
      head: output projection, [V, D] (a tied embedding, ``head_is_vd=True``) or [D, V] (``lm_head``).
      targets: [B, T] int next-token ids.
      mask: [B, T] weights (1 = a target that counts, 0 = prompt / padding).
      softcap: final logit soft-cap ``c * tanh(x / c)`` (Gemma 2), or None.
      chunk_size: tokens per chunk; the peak extra memory is about ``2 * chunk_size * V`` float32 values.
      head_is_vd: layout of ``head``.
      head_scale: [V] per-vocab scale of a quantized (int8) head, applied to the logits before the cap.
      kernel: ``"xla"``, or ``"cpu"`` for the native CPU kernel's softmax passes (where
        ``kernels.cpu.available()``; a soft-capped or scaled head keeps XLA's).

    Returns ``LossSums(sum_loss, n_tokens, n_correct)`` as float32 scalars. Differentiable in ``hidden``,
    ``head``, ``head_scale`` and ``mask``; each gradient is computed in the forward pass only when it is
    asked for (see ``_fused_loss``).
    """
    b, t, d = hidden.shape
    n = b * t
    if kernel not in (XLA, CPU):
        raise ValueError(f"unknown loss kernel {kernel!r}: use {XLA!r} or {CPU!r}")
    spec = _Head(None if softcap is None else float(softcap), bool(head_is_vd), head_scale is not None, kernel)
    scale = head_scale if head_scale is not None else jnp.zeros((0,), jnp.float32)
    w = mask.reshape(n).astype(jnp.float32)
    loss, correct = _fused_loss(spec, max(1, min(chunk_size, n)))(
        hidden.reshape(n, d), head, scale, targets.reshape(n).astype(jnp.int32), w)
    return LossSums(loss, w.sum(), correct)


def naive_cross_entropy(
    hidden: jax.Array,
    head: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    *,
    softcap: float | None = None,
    head_is_vd: bool = True,
    head_scale: jax.Array | None = None,
) -> LossSums:
    """Reference implementation with the full [B, T, V] logits (tests, tiny models)."""
    b, t, d = hidden.shape
    logits = _softcap(_chunk_logits(hidden.reshape(b * t, d), head, head_is_vd, head_scale), softcap)
    w = mask.reshape(-1).astype(jnp.float32)
    loss, correct = _token_terms(logits, targets.reshape(-1).astype(jnp.int32), w)
    return LossSums(loss.sum(), w.sum(), correct.sum())


def output_head(params: dict[str, Any], config: Any) -> tuple[jax.Array, bool, jax.Array | None]:
    """(head matrix, head_is_vd, per-vocab scale or None), by the same rule as ``model.output_kernel``:
    the tied embedding [V, D] when ``config.tie_embeddings``, else ``lm_head/kernel`` [D, V]."""
    if getattr(config, "tie_embeddings", True):
        node = params["token_embedding"]
        return node["embeddings"], True, node.get("scale")
    node = params["lm_head"]
    return node["kernel"], False, node.get("scale")


def lm_loss(
    params: dict[str, Any],
    config: Any,
    hidden: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    *,
    chunk_size: int = 1024,
    kernel: str = XLA,
) -> LossSums:
    """The model's loss sums from ``model.forward_hidden`` output, with the config's head and soft-cap.

    Equal to cross-entropy on ``model.logits_from_hidden`` without building those logits. ``kernel``: as in
    ``chunked_cross_entropy``.
    """
    head, vd, scale = output_head(params, config)
    return chunked_cross_entropy(
        hidden, head, targets, mask, softcap=getattr(config, "final_logit_softcap", None),
        chunk_size=chunk_size, head_is_vd=vd, head_scale=scale, kernel=kernel,
    )
