"""Token-level knowledge distillation: a student learns a teacher's next-token distributions.

The data is ordinary fine-tuning data (``gemmax.train.data.Dataset``: text, prompt/completion or chat; the
loss mask says which positions count). The teacher is either another gemmax ``CausalLM`` of any family
sharing the tokenizer — it runs forward once per batch, without gradient — or a file of its top-k
log-probabilities precomputed once (``save_teacher_topk``: one table per document, so packing and
shuffling place them exactly where the tokens go). Either way the teacher's ``top_k`` log-probabilities
and token ids per position ride in the batch; ``top_k=None`` keeps the whole vocabulary (exact, for small
vocabularies).

The divergence per position is TRL's generalised Jensen-Shannon (``GKDTrainer.generalized_jsd_loss``) on
temperature-scaled distributions, averaged over the masked positions:

* ``beta = 0``: forward KL, ``KL(teacher || student)`` (``loss="forward_kl"``);
* ``beta = 1``: reverse KL, ``KL(student || teacher)`` (``loss="reverse_kl"``);
* otherwise ``beta KL(t || m) + (1 - beta) KL(s || m)`` with ``m = beta t + (1 - beta) s`` (``loss="jsd"``).

With a top-k teacher both distributions are renormalised over the teacher's k tokens (exact when k is the
vocabulary). Student logits come chunk by chunk as in the chunked cross-entropy: no [B, T, V] tensor.
"""

from __future__ import annotations

import os
import types
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemmax.models.base import XLA
from gemmax.train.losses import _chunk_logits, _softcap, output_head
from gemmax.train.objectives import Objective, merged, sequence_forward

__all__ = ["Distill", "TeacherTable", "generalized_jsd", "save_teacher_topk"]


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
    """Distil ``teacher`` into the model being trained: a ``CausalLM``, or the path of a file written by
    ``save_teacher_topk`` (or a loaded ``TeacherTable``). ``loss``: "forward_kl", "reverse_kl" or "jsd"
    (with ``beta``); ``temperature`` scales both logits; ``top_k`` teacher tokens per position (None: all;
    a file holds the k it was written with)."""

    name = "distill"
    teacher: Any = None
    loss: str = "forward_kl"
    beta: float = 0.5
    temperature: float = 1.0
    top_k: int | None = 64
    _teacher_fn: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.teacher is None:
            raise ValueError("distillation needs a teacher: a gemmax CausalLM with the same tokenizer, or a "
                             "file of its top-k log-probabilities (save_teacher_topk)")
        if isinstance(self.teacher, (str, os.PathLike)):
            self.teacher = TeacherTable.load(self.teacher)
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
        if isinstance(self.teacher, TeacherTable):
            self.teacher.check(ds)
        return _TeacherDataset(ds, self), seq

    def eval_dataset(self, lm: Any, data: Any, sequence_length: int, format: str, params_fn: Callable[[], Any],
                     *, batch_size: int, is_lora: bool, precision: Any = None) -> Any:
        if isinstance(self.teacher, TeacherTable):
            raise ValueError("eval_data needs a live teacher: a teacher file holds the top-k of the training data "
                             "only (pass the teacher CausalLM, or evaluate the held-out data separately)")
        return super().eval_dataset(lm, data, sequence_length, format, params_fn, batch_size=batch_size,
                                    is_lora=is_lora, precision=precision)

    def teacher_topk(self, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """The teacher's (ids, log-probs at temperature 1) [B, T, k] at every position of ``batch``."""
        if self._teacher_fn is None:
            self._teacher_fn = _topk_fn(self.teacher, self.top_k)
        ids, vals = self._teacher_fn(self.teacher.params, {k: jnp.asarray(batch[k]) for k in
                                                           ("tokens", "positions", "segment_ids")})
        return np.asarray(ids), np.asarray(vals)

    def loss_sums_fn(self, family: Any, config: Any, precision: Any, remat: str | None, chunk_size: int,
                     kernel: str = XLA) -> Callable[..., tuple[jax.Array, dict[str, jax.Array]]]:
        # ``kernel`` is not used: the distillation losses' passes over the teacher's top-k are XLA's
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
                tl = jax.nn.log_softmax(tlp / temp, axis=-1)  # top-k is the same at any temperature
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
        teacher = self.objective.teacher
        if isinstance(teacher, TeacherTable):
            # the rows of the batch just returned: its epoch's plan, the batch before the new position
            it = self.inner
            rows = it._rows[(it.batch - 1) * it.batch_size:it.batch * it.batch_size]
            ids, logps = teacher.assemble(it.dataset, rows, it.batch_size)
        else:
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

    def evaluation(self, batch_size: int) -> _TeacherIterator:
        """One pass in order (the last batch padded), each batch with the live teacher's top-k."""
        return self.iterator(batch_size, shuffle=False, num_epochs=1)


class _Identity:
    @staticmethod
    def compute_params(params: Any) -> Any:
        return params


def _topk_fn(teacher: Any, top_k: int | None) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """Jitted ``(params, rows) -> (ids, log-probs)`` [B, T, k] of a teacher ``CausalLM``."""
    cfg = teacher.config
    fwd = sequence_forward(teacher.family, cfg, _Identity(), None)
    k = min(top_k or cfg.vocab_size, cfg.vocab_size)

    def fn(params: Any, b: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        p, hidden = fwd(params, b)
        head, vd, scale = output_head(p, cfg)
        bb, tt, d = hidden.shape
        logits = _softcap(_chunk_logits(hidden.reshape(bb * tt, d), head, vd, scale),
                          getattr(cfg, "final_logit_softcap", None))
        vals, ids = jax.lax.top_k(jax.nn.log_softmax(logits, axis=-1), k)
        return ids.reshape(bb, tt, k), vals.reshape(bb, tt, k)

    return jax.jit(fn)


def _doc_key(ids: np.ndarray) -> int:
    """A cheap fingerprint of a document's tokens (to refuse a table written for other data)."""
    return int(zlib.crc32(np.ascontiguousarray(ids, np.int32).tobytes()))


@dataclass
class TeacherTable:
    """A teacher's top-k per position of every document of a dataset: ``ids`` / ``logps`` [P, k] with
    document ``i`` at ``offsets[i]:offsets[i + 1]`` (its input positions after truncation)."""

    ids: np.ndarray
    logps: np.ndarray
    offsets: np.ndarray
    keys: np.ndarray
    vocab_size: int

    @property
    def config(self) -> Any:
        return types.SimpleNamespace(vocab_size=self.vocab_size)

    params = None

    @classmethod
    def load(cls, path: str | os.PathLike) -> TeacherTable:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"{p}: no teacher top-k file (write one with save_teacher_topk)")
        z = np.load(p)
        try:
            return cls(z["ids"], z["logps"], z["offsets"], z["keys"], int(z["vocab_size"]))
        except KeyError as e:
            raise ValueError(f"{p}: not a teacher top-k file (missing {e})") from None

    def check(self, ds: Any) -> None:
        """Refuse data other than what the table was written for (document count and tokens)."""
        if len(ds.documents) != len(self.keys):
            raise ValueError(f"the teacher table has {len(self.keys)} documents, the data {len(ds.documents)}: "
                             "write it for this data, sequence_length and format")
        for i, d in enumerate(ds.documents):
            n = int(self.offsets[i + 1] - self.offsets[i])
            if min(len(d.ids) - 1, ds.sequence_length) != n or _doc_key(d.ids[:n]) != int(self.keys[i]):
                raise ValueError(f"{d.origin}: the document differs from the one the teacher table was written "
                                 "for (other data or tokenizer)")

    def assemble(self, ds: Any, rows: list[list[int]], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """[B, T, k] tables laid out as ``data._assemble`` lays out the rows' documents."""
        t, k = ds.sequence_length, self.ids.shape[1]
        ids = np.zeros((batch_size, t, k), np.int32)
        logps = np.full((batch_size, t, k), -1e9, np.float32)
        logps[..., 0] = 0.0  # padding positions: a one-hot distribution (masked out of the loss)
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                a, b = int(self.offsets[i]), int(self.offsets[i + 1])
                ids[r, at:at + b - a], logps[r, at:at + b - a] = self.ids[a:b], self.logps[a:b]
                at += b - a
        return ids, logps


def save_teacher_topk(teacher: Any, data: Any, path: str | os.PathLike, *, sequence_length: int = 128,
                      format: str = "auto", top_k: int = 64, batch_size: int = 8) -> Path:
    """Run ``teacher`` once over every document of ``data`` (read as ``fit`` reads it) and write its top-k
    log-probabilities per position to ``path`` (.npz), for ``Distill(teacher=path)`` — the student then
    never needs the teacher in memory."""
    from gemmax.train.data import Dataset
    from gemmax.train.trainer import _as_dataset

    ds = data if isinstance(data, Dataset) else _as_dataset(teacher, data, sequence_length, format)
    fn = _topk_fn(teacher, top_k)
    seq = ds.sequence_length
    all_ids, all_lp, offsets, keys = [], [], [0], []
    for start in range(0, len(ds.documents), batch_size):
        docs = ds.documents[start:start + batch_size]
        tokens = np.zeros((batch_size, seq), np.int32)
        pos = np.zeros((batch_size, seq), np.int32)
        seg = np.zeros((batch_size, seq), np.int32)
        lens = []
        for r, d in enumerate(docs):
            n = min(len(d.ids) - 1, seq)
            tokens[r, :n], pos[r, :n], seg[r, :n] = d.ids[:n], np.arange(n), 1
            lens.append(n)
            keys.append(_doc_key(d.ids[:n]))
        ids, lp = fn(teacher.params, {"tokens": jnp.asarray(tokens), "positions": jnp.asarray(pos),
                                      "segment_ids": jnp.asarray(seg)})
        ids, lp = np.asarray(ids), np.asarray(lp)
        for r, n in enumerate(lens):
            all_ids.append(ids[r, :n])
            all_lp.append(lp[r, :n])
            offsets.append(offsets[-1] + n)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:
        np.savez(f, ids=np.concatenate(all_ids).astype(np.int32), logps=np.concatenate(all_lp).astype(np.float32),
                 offsets=np.asarray(offsets, np.int64), keys=np.asarray(keys, np.int64),
                 vocab_size=np.asarray(teacher.config.vocab_size))
    return out

