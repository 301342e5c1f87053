"""Token-level knowledge distillation: a student learns a teacher's next-token distributions.

The data is ordinary fine-tuning data (``gemmax.train.data.Dataset``: text, prompt/completion or chat; the
loss mask says which positions count). Each batch, the teacher — another gemmax ``CausalLM`` of any family
sharing the tokenizer — runs forward once (no gradient) and its ``top_k`` log-probabilities and token ids
per position ride in the batch; ``top_k=None`` keeps the whole vocabulary (exact, for small vocabularies).

The divergence per position is TRL's generalised Jensen-Shannon (``GKDTrainer.generalized_jsd_loss``) on
temperature-scaled distributions, averaged over the masked positions:

* ``beta = 0``: forward KL, ``KL(teacher || student)`` (``loss="forward_kl"``);
* ``beta = 1``: reverse KL, ``KL(student || teacher)`` (``loss="reverse_kl"``);
* otherwise ``beta KL(t || m) + (1 - beta) KL(s || m)`` with ``m = beta t + (1 - beta) s`` (``loss="jsd"``).

With a top-k teacher both distributions are renormalised over the teacher's k tokens (exact when k is the
vocabulary). Student logits come chunk by chunk as in the chunked cross-entropy: no [B, T, V] tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemmax.train.losses import _chunk_logits, _softcap, output_head
from gemmax.train.objectives import Objective, merged, sequence_forward

__all__ = ["Distill", "generalized_jsd"]


def generalized_jsd(student_logp: jax.Array, teacher_logp: jax.Array, beta: float) -> jax.Array:
    """Per-position generalised JSD over the last axis of two log-distributions."""
    s, t = student_logp, teacher_logp
    if beta == 0:
        return jnp.sum(jnp.exp(t) * (t - s), axis=-1)
    if beta == 1:
        return jnp.sum(jnp.exp(s) * (s - t), axis=-1)
    m = jnp.logaddexp(s + jnp.log1p(-beta), t + jnp.log(beta))
    kl_t = jnp.sum(jnp.exp(t) * (t - m), axis=-1)
    kl_s = jnp.sum(jnp.exp(s) * (s - m), axis=-1)
    return beta * kl_t + (1 - beta) * kl_s


_BETA = {"forward_kl": 0.0, "reverse_kl": 1.0}


@dataclass
class Distill(Objective):
    """Distil ``teacher`` (a ``CausalLM``) into the model being trained. ``loss``: "forward_kl",
    "reverse_kl" or "jsd" (with ``beta``); ``temperature`` scales both logits; ``top_k`` teacher tokens
    per position (None: all)."""

    name = "distill"
    teacher: Any = None
    loss: str = "forward_kl"
    beta: float = 0.5
    temperature: float = 1.0
    top_k: int | None = 64
    _teacher_fn: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.teacher is None:
            raise ValueError("distillation needs a teacher: a gemmax CausalLM with the same tokenizer")
        if self.loss not in ("forward_kl", "reverse_kl", "jsd"):
            raise ValueError(f"unknown distillation loss {self.loss!r}; use forward_kl, reverse_kl or jsd")

    @property
    def jsd_beta(self) -> float:
        return _BETA.get(self.loss, self.beta)

    def load(self, lm: Any, data: Any, sequence_length: int, format: str) -> tuple[Any, int]:
        from gemmax.train.trainer import _load_data  # the SFT data path, unchanged

        if self.teacher.config.vocab_size != lm.config.vocab_size:
            raise ValueError(f"teacher vocabulary ({self.teacher.config.vocab_size}) differs from the student's "
                             f"({lm.config.vocab_size}): distillation needs the same tokenizer")
        ds, seq = _load_data(lm, data, sequence_length, format)
        return _TeacherDataset(ds, self), seq

    def teacher_topk(self, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """The teacher's (ids, log-probs) [B, T, k] at every position of ``batch``."""
        if self._teacher_fn is None:
            t = self.teacher
            fwd = sequence_forward(t.family, t.config, _Identity(), None)
            k = self.top_k or t.config.vocab_size
            temp = self.temperature

            def fn(params: Any, b: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
                p, hidden = fwd(params, b)
                head, vd, scale = output_head(p, t.config)
                bb, tt, d = hidden.shape
                logits = _softcap(_chunk_logits(hidden.reshape(bb * tt, d), head, vd, scale),
                                  getattr(t.config, "final_logit_softcap", None)) / temp
                logp = jax.nn.log_softmax(logits, axis=-1)
                vals, ids = jax.lax.top_k(logp, k)
                return ids.reshape(bb, tt, k), vals.reshape(bb, tt, k)

            self._teacher_fn = jax.jit(fn)
        ids, vals = self._teacher_fn(self.teacher.params, {k: jnp.asarray(batch[k]) for k in
                                                           ("tokens", "positions", "segment_ids")})
        return np.asarray(ids), np.asarray(vals)

    def loss_sums_fn(self, family: Any, config: Any, precision: Any, remat: str | None, chunk_size: int
                     ) -> Callable[..., tuple[jax.Array, dict[str, jax.Array]]]:
        fwd = sequence_forward(family, config, precision, remat)
        beta, temp = self.jsd_beta, self.temperature

        def loss_sums(trainable: Any, batch: dict[str, jax.Array], frozen: Any) -> tuple[jax.Array, dict]:
            p, hidden = fwd(merged(trainable, frozen), batch)
            head, vd, scale = output_head(p, config)
            cap = getattr(config, "final_logit_softcap", None)
            b, t, d = hidden.shape
            k = batch["teacher_ids"].shape[-1]
            n = b * t
            chunk = max(1, min(chunk_size, n))
            n_chunks = -(-n // chunk)
            pad = n_chunks * chunk - n

            def flat(x: jax.Array, tail: tuple[int, ...]) -> jax.Array:
                x = x.reshape((n,) + tail)
                return jnp.pad(x, [(0, pad)] + [(0, 0)] * len(tail)) if pad else x

            @jax.checkpoint
            def one(xs: tuple[jax.Array, ...]) -> jax.Array:
                hc, ids, tlp, w = xs
                logits = _softcap(_chunk_logits(hc, head, vd, scale), cap) / temp
                s = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), ids, axis=-1)
                s = jax.nn.log_softmax(s, axis=-1)  # renormalised over the teacher's k tokens
                tl = jax.nn.log_softmax(tlp, axis=-1)
                return (generalized_jsd(s, tl, beta) * w).sum()

            xs = (flat(hidden, (d,)), flat(batch["teacher_ids"], (k,)), flat(batch["teacher_logps"], (k,)),
                  flat(batch["loss_mask"], ()))
            xs = tuple(x.reshape((n_chunks, chunk) + x.shape[1:]) for x in xs)
            total = jax.lax.map(one, xs).sum()
            return total, {"n_tokens": batch["loss_mask"].sum(), "n_correct": jnp.zeros(())}

        return loss_sums


class _TeacherBatch:
    def __init__(self, inner: Any, ids: np.ndarray, logps: np.ndarray) -> None:
        self.inner, self.ids, self.logps = inner, ids, logps

    def as_dict(self) -> dict[str, np.ndarray]:
        return {**self.inner.as_dict(), "teacher_ids": self.ids.astype(np.int32),
                "teacher_logps": self.logps.astype(np.float32)}


class _TeacherIterator:
    """The SFT batch iterator with the teacher's top-k attached to every batch; state and resume are the
    inner iterator's."""

    def __init__(self, inner: Any, objective: Distill) -> None:
        self.inner, self.objective = inner, objective

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("inner", "objective"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.inner, name, value)

    def __iter__(self) -> _TeacherIterator:
        return self

    def __next__(self) -> _TeacherBatch:
        b = next(self.inner)
        ids, logps = self.objective.teacher_topk(b.as_dict())
        return _TeacherBatch(b, ids, logps)


class _TeacherDataset:
    def __init__(self, ds: Any, objective: Distill) -> None:
        self.ds, self.objective = ds, objective
        self.sequence_length = ds.sequence_length

    def report(self) -> str:
        return self.ds.report() + f"; teacher top-{self.objective.top_k or 'all'}"

    def iterator(self, batch_size: int, **kw: Any) -> _TeacherIterator:
        return _TeacherIterator(self.ds.iterator(batch_size, **kw), self.objective)


class _Identity:
    @staticmethod
    def compute_params(params: Any) -> Any:
        return params

