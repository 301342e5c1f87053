"""Chunked cross-entropy: the language-model loss without ever building [batch, seq, vocab] logits.

With Gemma's 256k vocabulary the logits of one 8k-token row are 8 GB in float32 — more than the rest of a
fine-tuning step. Here the flattened tokens are cut into chunks of ``chunk_size``; each chunk's logits are
computed, reduced to (loss, correct) and thrown away inside ``jax.lax.map``. The per-chunk function is
wrapped in ``jax.checkpoint`` so the backward pass recomputes each chunk's logits instead of keeping them
as residuals: peak memory is one chunk's [chunk, V] logits, forwards and backwards.

The functions return *sums* (loss, target count, correct count), not means, so that gradient accumulation
can divide by the number of target tokens of all micro-batches together (the token-weighted mean), which a
mean of per-micro-batch means is not when micro-batches hold different numbers of target tokens.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

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
    """Per-token (masked loss, masked correct) from float32 logits [N, V]."""
    vocab = logits.shape[-1]
    safe = jnp.clip(targets, 0, vocab - 1)  # padding targets may be anything; they are masked below
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, safe[:, None], axis=-1)[:, 0]
    on = mask > 0
    loss = jnp.where(on, (lse - tgt) * mask, 0.0)
    correct = jnp.where(on, (jnp.argmax(logits, axis=-1) == safe).astype(jnp.float32) * mask, 0.0)
    return loss, correct


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
) -> LossSums:
    """Cross-entropy sums of ``hidden @ head`` against ``targets``, chunk by chunk.

    Args:
      hidden: [B, T, D] final hidden states (after the final norm), any float dtype.
      head: output projection, [V, D] (a tied embedding, ``head_is_vd=True``) or [D, V] (``lm_head``).
      targets: [B, T] int next-token ids.
      mask: [B, T] weights (1 = a target that counts, 0 = prompt / padding).
      softcap: final logit soft-cap ``c * tanh(x / c)`` (Gemma 2), or None.
      chunk_size: tokens per chunk; the peak extra memory is ``chunk_size * V`` float32 values.
      head_is_vd: layout of ``head``.
      head_scale: [V] per-vocab scale of a quantized (int8) head, applied to the logits before the cap.

    Returns ``LossSums(sum_loss, n_tokens, n_correct)`` as float32 scalars.
    """
    b, t, d = hidden.shape
    n = b * t
    h = hidden.reshape(n, d)
    y = targets.reshape(n).astype(jnp.int32)
    w = mask.reshape(n).astype(jnp.float32)
    chunk = max(1, min(chunk_size, n))
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n
    if pad:
        h = jnp.pad(h, ((0, pad), (0, 0)))
        y = jnp.pad(y, (0, pad))
        w = jnp.pad(w, (0, pad))

    @jax.checkpoint
    def one_chunk(xs: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        hc, yc, wc = xs
        logits = _softcap(_chunk_logits(hc, head, head_is_vd, head_scale), softcap)
        loss, correct = _token_terms(logits, yc, wc)
        return loss.sum(), correct.sum()

    xs = (h.reshape(n_chunks, chunk, d), y.reshape(n_chunks, chunk), w.reshape(n_chunks, chunk))
    losses, corrects = jax.lax.map(one_chunk, xs)
    return LossSums(losses.sum(), w.sum(), corrects.sum())


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
) -> LossSums:
    """The model's loss sums from ``model.forward_hidden`` output, with the config's head and soft-cap.

    Equal to cross-entropy on ``model.logits_from_hidden`` without building those logits.
    """
    head, vd, scale = output_head(params, config)
    return chunked_cross_entropy(
        hidden, head, targets, mask, softcap=getattr(config, "final_logit_softcap", None),
        chunk_size=chunk_size, head_is_vd=vd, head_scale=scale,
    )
