"""Post-training objectives: what ``fit(..., objective=...)`` trains besides next-token prediction.

An objective plugs into the one trainer (``gemmax.train.trainer.fit``) at four points and leaves the rest —
optimizer, LoRA split, donation, accumulation, non-finite guard, checkpoints, exact resume, metrics file,
progress bar — as it is for supervised fine-tuning:

* ``load(lm, data, sequence_length, format)`` reads the data into a dataset whose ``iterator`` yields fixed-
  shape batches with a small restorable state (as ``gemmax.train.data.Dataset`` does);
* ``loss_sums_fn(family, config, precision, remat, chunk_size, kernel=)`` returns the step's
  ``(trainable, batch, frozen) -> (sum_loss, aux)``: *sums* and a count ``aux["n_tokens"]`` (pairs,
  sequences or tokens, whatever the loss is a mean over) so gradient accumulation divides once; other
  ``aux`` entries are metric sums, summed over micro-batches as well;
* ``prepare(lm, dataset, params_fn, ...)`` runs once before the first step (and before a resume replaces the
  weights): precompute reference log-probabilities, bind a sampler to the policy's current weights;
* ``step_metrics(metrics, batch, seconds)`` turns the summed metrics into the per-step record (TRL's names).

``eval_dataset`` and ``eval_weight`` serve ``fit(eval_data=...)``: held-out data read and prepared as the
training data, then scored with the same loss and metrics (no update).

The objectives live in ``preference`` (DPO, SimPO, ORPO), ``distill`` and ``grpo``; ``post_training`` names them
(``make_objective("dpo", beta=0.1)``) for ``lm.fit(objective=...)`` and ``gemmax finetune --method``.

With LoRA the frozen base is an argument of the step that is never differentiated, so "the reference model"
is simply the forward pass over ``frozen`` (the adapters left out): no second copy of the weights.

``token_log_probs`` is the shared piece: per-token ``log p(target)`` from final hidden states, chunk by chunk
like the chunked cross-entropy, so no [B, T, V] logits are ever built.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from gemmax.kernels import cpu as cpu_kernels
from gemmax.models.base import CPU, XLA
from gemmax.nn.layers import einsum
from gemmax.nn.lora import merge_trees
from gemmax.train.losses import _chunk_logits, _head_grads, _softcap, in_chunks, output_head, scan_summing
from gemmax.train.optim import attention_choice

__all__ = ["Objective", "merged", "sequence_forward", "token_log_probs"]


#: bytes of one chunk's float32 [chunk, V] logits ``token_log_probs`` aims at: the chunk shrinks to fit (at
#: least 16 tokens), so a 262k vocabulary takes 128-token chunks. Not smaller: each chunk's products read the
#: whole [V, D] table; on a 2-core Xeon the 270M head's logits product ran at 115-198 GFLOP/s with 64 rows
#: against 159-222 with 128, its hidden-gradient product at 109-144 against 161-200 (alternated runs in two
#: periods of the machine's speed; 256 rows measured no clear gain more). With a batch's positions in one
#: chunk XLA also computes a trained head's logits once for the forward and backward rules (full DPO on the
#: 270M shapes, 128 positions: 3.2-4.3 -> 2.6-3.3 s a step against 64-token chunks, alternated runs)
LOGITS_CHUNK_BYTES = 128 * 2**20


def token_log_probs(params: dict[str, Any], config: Any, hidden: jax.Array, targets: jax.Array, *,
                    chunk_size: int = 1024, temperature: float = 1.0, kernel: str = XLA) -> jax.Array:
    """``log softmax(logits / temperature)[target]`` per position, [B, T] float32, without [B, T, V] logits.

    The head, soft-cap and quantization scale are the model's (``losses.output_head``). Chunks hold at most
    ``chunk_size`` tokens and about ``LOGITS_CHUNK_BYTES`` of logits. A position's log-prob depends on its
    own hidden state only, so when the head is frozen (LoRA, or a reference pass) the forward pass also
    keeps each position's gradient ``d logp / d hidden`` ([B*T, D], small) and the backward pass only scales
    it: no logits are recomputed or kept. A trained head's backward pass recomputes each chunk's logits
    once (``_trained_head_backward``).

    ``kernel``: ``"xla"``, or ``"cpu"`` (``optim.loss_kernel``) for the native CPU kernel's softmax pass and,
    through a tied head, its GEMM for ``d logp / d hidden`` (a plain head: no soft-cap, not quantized). On a
    262k-token vocabulary in 64-token chunks that halves the pass (fwd + gradient of 256 positions: 1.0 s
    against XLA's 2.0 s on a two-core Xeon).
    """
    if kernel not in (XLA, CPU):
        raise ValueError(f"unknown log-prob kernel {kernel!r}: use {XLA!r} or {CPU!r}")
    head, vd, scale = output_head(params, config)
    cap = getattr(config, "final_logit_softcap", None)
    b, t, d = hidden.shape
    n = b * t
    vocab = head.shape[0] if vd else head.shape[1]
    chunk = max(1, min(chunk_size, n, max(16, LOGITS_CHUNK_BYTES // (4 * vocab))))
    has_scale = scale is not None
    fn = _log_probs_fn(_LogProbHead(None if cap is None else float(cap), bool(vd), has_scale,
                                    float(temperature), kernel), chunk)
    out = fn(hidden.reshape(n, d), head, scale if has_scale else jnp.zeros((0,), jnp.float32),
             targets.reshape(n).astype(jnp.int32))
    return out.reshape(b, t)


class _LogProbHead(NamedTuple):
    softcap: float | None
    head_is_vd: bool
    has_scale: bool
    temperature: float
    kernel: str = XLA

    @property
    def native(self) -> bool:
        """The native softmax pass: asked for, and plain logits (a soft-cap or a scale stay with XLA)."""
        return self.kernel == CPU and self.softcap is None and not self.has_scale


def _native_chunk_log_probs(spec: _LogProbHead, hc: jax.Array, yc: jax.Array, head: jax.Array,
                            want_grad: bool) -> tuple[jax.Array, jax.Array | None]:
    """``_chunk_log_probs`` on the native CPU kernel: the cross-entropy kernel's per-token loss is
    ``-log p`` and its logits' gradient ``softmax - onehot`` is ``-d log p / d z``."""
    logits = _chunk_logits(hc, head, spec.head_is_vd)
    if spec.temperature != 1.0:
        logits = logits / spec.temperature
    safe = jnp.clip(yc, 0, logits.shape[-1] - 1)
    grad_dtype = (jnp.bfloat16 if hc.dtype == jnp.bfloat16 else jnp.float32) if want_grad else None
    # weights -1 / temperature: the kernel's w (softmax - onehot) is then d log p / d z itself, with no
    # further pass over the [c, V] gradient to negate and scale it
    weights = jnp.full(yc.shape, -1.0 / spec.temperature, jnp.float32)
    tok, _, g = cpu_kernels.softmax_xent(logits, safe, weights, grad_dtype, in_place=True)
    if not want_grad:
        return -tok, None
    return -tok, _head_grads(g.astype(hc.dtype), hc, head, spec.head_is_vd, True, False, native=True)[0]


def _chunk_log_probs(spec: _LogProbHead, hc: jax.Array, yc: jax.Array, head: jax.Array, scale: jax.Array,
                     want_grad: bool) -> tuple[jax.Array, jax.Array | None]:
    """One chunk's log-probs [c] and, if ``want_grad``, their gradients with respect to ``hc`` [c, D]:
    ``(onehot - softmax) * d(logits)/dz`` through the head, computed while the [c, V] logits are alive."""
    if spec.native:
        return _native_chunk_log_probs(spec, hc, yc, head, want_grad)
    z = _chunk_logits(hc, head, spec.head_is_vd, scale if spec.has_scale else None)
    logits = _softcap(z, spec.softcap) / spec.temperature
    safe = jnp.clip(yc, 0, logits.shape[-1] - 1)
    lse = jax.nn.logsumexp(logits, axis=-1)
    lp = jnp.take_along_axis(logits, safe[:, None], axis=-1)[:, 0] - lse
    if not want_grad:
        return lp, None
    hit = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) == safe[:, None]
    g = (hit.astype(jnp.float32) - jnp.exp(logits - lse[:, None])) / spec.temperature
    if spec.softcap is not None:
        g = g * (1.0 - jnp.square(logits * spec.temperature / spec.softcap))
    if spec.has_scale:
        g = g * scale.astype(jnp.float32)
    gd = g.astype(hc.dtype)
    return lp, einsum("nv,vd->nd" if spec.head_is_vd else "nv,dv->nd", gd, head, jnp.float32)


def _over_chunks(spec: _LogProbHead, chunk: int, h: jax.Array, y: jax.Array, head: jax.Array, scale: jax.Array,
                 want_grad: bool) -> tuple[jax.Array, jax.Array | None]:
    n, d = h.shape
    n_chunks, xs = in_chunks(chunk, h, y)
    lp, grad = jax.lax.map(lambda c: _chunk_log_probs(spec, c[0], c[1], head, scale, want_grad), tuple(xs))
    lp = lp.reshape(-1)[:n]
    return lp, (grad.reshape(n_chunks * chunk, d)[:n] if want_grad else None)


def _chunk_backward(spec: _LogProbHead, hc: jax.Array, yc: jax.Array, cc: jax.Array, head: jax.Array,
                    scale: jax.Array, want_head: bool, want_scale: bool) -> tuple[jax.Array, ...]:
    """A trained head's backward pass over one chunk: from the log-probs' cotangents ``cc`` [c], the logits
    recomputed once and ``(d hc, d head or None, d scale or None)``.

    ``d log p / d z`` is ``(onehot - softmax) / temperature`` (times the soft-cap's slope); scaled by ``cc``
    it is the native cross-entropy kernel's gradient with weights ``-cc / temperature``."""
    vd = spec.head_is_vd
    safe = jnp.clip(yc, 0, (head.shape[0] if vd else head.shape[1]) - 1)
    if spec.native:
        logits = _chunk_logits(hc, head, vd)
        if spec.temperature != 1.0:
            logits = logits / spec.temperature
        grad_dtype = jnp.bfloat16 if hc.dtype == jnp.bfloat16 else jnp.float32
        _, _, g = cpu_kernels.softmax_xent(logits, safe, -cc / spec.temperature, grad_dtype)
        grads = _head_grads(g.astype(hc.dtype), hc, head, vd, True, want_head, native=True)
        return grads[0], grads[1] if want_head else None, None
    raw = _chunk_logits(hc, head, vd)
    z = raw * scale.astype(jnp.float32) if spec.has_scale else raw
    logits = _softcap(z, spec.softcap) / spec.temperature
    lse = jax.nn.logsumexp(logits, axis=-1)
    hit = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) == safe[:, None]
    g = (hit.astype(jnp.float32) - jnp.exp(logits - lse[:, None])) * (cc / spec.temperature)[:, None]
    if spec.softcap is not None:
        g = g * (1.0 - jnp.square(logits * spec.temperature / spec.softcap))
    d_scale = (g * raw).sum(axis=0) if want_scale else None
    if spec.has_scale:
        g = g * scale.astype(jnp.float32)
    grads = _head_grads(g.astype(hc.dtype), hc, head, vd, True, want_head)
    return grads[0], grads[1] if want_head else None, d_scale


def _trained_head_backward(spec: _LogProbHead, chunk: int, h: jax.Array, y: jax.Array, ct: jax.Array,
                           head: jax.Array, scale: jax.Array, want_head: bool, want_scale: bool
                           ) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """``_chunk_backward`` over the chunks (``lax.scan``): d h [N, D], and the head's and scale's gradients
    summed over the chunks."""
    n, d = h.shape
    n_chunks, xs = in_chunks(chunk, h, y, ct)

    def step(c: tuple[jax.Array, ...]) -> tuple[Any, jax.Array]:
        d_h, d_head, d_scale = _chunk_backward(spec, *c, head, scale, want_head, want_scale)
        as32 = (lambda a: None if a is None else a.astype(jnp.float32))
        return (as32(d_head), as32(d_scale)), d_h

    (d_head, d_scale), d_h = scan_summing(step, tuple(xs))
    return d_h.reshape(n_chunks * chunk, d)[:n], d_head, d_scale


@functools.cache
def _log_probs_fn(spec: _LogProbHead, chunk: int) -> Callable[..., jax.Array]:
    """``(h [N, D], head, scale, targets [N]) -> log-probs [N]`` with a custom VJP (``symbolic_zeros``).

    A frozen head: the forward pass keeps each position's ``d log p / d h`` and the backward pass scales it.
    A trained head (or scale): the backward pass recomputes each chunk's logits once and forms every
    gradient from them by hand (``_trained_head_backward``); left to autodiff, the log-sum-exp's backward
    took several element-wise passes over each [chunk, V] block (1.4 s of a 6.5 s full DPO step of Gemma 3
    270M on a two-core Xeon)."""

    @jax.custom_vjp
    def log_probs(h: jax.Array, head: jax.Array, scale: jax.Array, y: jax.Array) -> jax.Array:
        return _over_chunks(spec, chunk, h, y, head, scale, False)[0]

    def fwd(h: Any, head: Any, scale: Any, y: Any) -> tuple[jax.Array, tuple]:
        want_scale = scale.perturbed and spec.has_scale
        if head.perturbed or want_scale:
            lp = _over_chunks(spec, chunk, h.value, y.value, head.value, scale.value, False)[0]
            # the flags ride in the residuals' structure (() or None), so the backward pass sees them statically
            flags = (() if head.perturbed else None, () if want_scale else None)
            return lp, (None, (head.value, scale.value, y.value, flags), h.value)
        lp, grad = _over_chunks(spec, chunk, h.value, y.value, head.value, scale.value, h.perturbed)
        return lp, (grad, None, h.value)

    def bwd(res: tuple, ct: Any) -> tuple[Any, ...]:
        grad, trained, h = res
        if isinstance(ct, SymbolicZero):
            return (None, None, None, None)
        if trained is not None:
            head, scale, y, (want_head, want_scale) = trained
            d_h, d_head, d_scale = _trained_head_backward(spec, chunk, h, y, ct, head, scale,
                                                          want_head is not None, want_scale is not None)
            return (d_h.astype(h.dtype), None if d_head is None else d_head.astype(head.dtype),
                    None if d_scale is None else d_scale.astype(scale.dtype), None)
        return ((grad * ct[:, None]).astype(h.dtype) if grad is not None else None, None, None, None)

    log_probs.defvjp(fwd, bwd, symbolic_zeros=True)
    return log_probs


def sequence_forward(family: Any, config: Any, precision: Any, remat: str | None
                     ) -> Callable[[Any, dict[str, jax.Array]], tuple[dict[str, Any], jax.Array]]:
    """``(params, batch) -> (compute params, final hidden [B, T, D])`` for rows of ``batch`` (``tokens``,
    ``positions``, ``segment_ids``, [B, T]; ``prefix_ids`` too where a row holds one prompt's several
    continuations, see ``branches``) in the compute precision."""

    attention = attention_choice(family, precision)

    def run(params: Any, batch: dict[str, jax.Array]) -> tuple[dict[str, Any], jax.Array]:
        p = precision.compute_params(params)
        shared = {"prefix_ids": batch["prefix_ids"]} if "prefix_ids" in batch else {}
        hidden = family.forward_hidden(p, config, batch["tokens"], batch["positions"], batch["segment_ids"],
                                       remat=remat, **attention, **shared)
        return p, hidden

    return run


def merged(trainable: Any, frozen: Any) -> Any:
    """The full parameter tree of a step (adapters merged onto the frozen base)."""
    return merge_trees(trainable, frozen) if frozen else trainable


@dataclasses.dataclass
class Objective:
    """Base of the post-training objectives; the settings are dataclass fields (see ``objective_options``)."""

    name = "objective"

    def load(self, lm: Any, data: Any, sequence_length: int, format: str) -> tuple[Any, int]:
        raise NotImplementedError

    def loss_sums_fn(self, family: Any, config: Any, precision: Any, remat: str | None, chunk_size: int,
                     kernel: str = XLA) -> Callable[..., tuple[jax.Array, dict[str, jax.Array]]]:
        """The step's loss; ``kernel`` (``optim.loss_kernel``) is ``token_log_probs``'s."""
        raise NotImplementedError

    def prepare(self, lm: Any, dataset: Any, params_fn: Callable[[], Any], *, batch_size: int,
                is_lora: bool, precision: Any = None) -> None:
        """Called once before the first step (``precision``: the step's); nothing to do by default."""

    def eval_dataset(self, lm: Any, data: Any, sequence_length: int, format: str, params_fn: Callable[[], Any],
                     *, batch_size: int, is_lora: bool, precision: Any = None) -> Any:
        """Held-out ``data`` read and prepared like the training data (before training, so a precomputed
        reference comes from the same starting weights); its ``evaluation(batch_size)`` is one pass."""
        ds, _ = self.load(lm, data, sequence_length, format)
        self.prepare(lm, ds, params_fn, batch_size=batch_size, is_lora=is_lora, precision=precision)
        return ds

    def eval_weight(self, m: dict[str, Any]) -> float:
        """How much one evaluation batch's metrics weigh in the mean over batches (its ``n_tokens``: pairs,
        tokens...; the loss itself is always the summed loss over the summed count)."""
        return float(m["n_tokens"])

    def step_metrics(self, m: dict[str, Any], batch: Any, seconds: float) -> dict[str, float]:
        return {}

    def cache_key(self) -> tuple:
        """What the compiled step depends on (the compiled-step cache key): the settings that are numbers,
        strings or tuples of them (callables such as reward functions do not reach the step)."""
        out = [self.name]
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (int, float, str, bool, type(None))):
                out.append((f.name, v))
        return tuple(out)
