"""Preference tuning: DPO (sigmoid, IPO, hinge), SimPO and ORPO on TRL's preference datasets.

**Data.** Records in TRL's preference format, from anything ``read_records`` reads (JSONL, Parquet, a
``datasets`` object...): ``prompt`` / ``chosen`` / ``rejected`` as text (plain: the completion gets an EOS),
or as message lists (conversational: the prompt is the conversation so far, ``chosen`` / ``rejected`` a
model turn each, rendered in Gemma's turn format; the completion's ``<end_of_turn>`` is a target). Each pair
is the prompt and its two completions, each truncated to ``sequence_length`` input tokens as a row of
``prompt + completion`` would be (one pair per row, no packing: the loss is per sequence), so gradient
accumulation splits pairs, never a pair. On a family that takes ``prefix_ids`` the pair is one row, the prompt
computed once for both completions (``branches``); otherwise two rows. Either way the output head runs on the
completion positions only (and, for ORPO's NLL, on the chosen row's prompt positions).

**Losses** (per pair, then the mean over pairs; names and formulas as TRL's ``DPOTrainer`` / ``CPOTrainer``),
with ``Δ = (log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r))`` summed over completion tokens:

* ``sigmoid`` (DPO): ``−log σ(β Δ)``;
* ``ipo``: ``(Δ̄ − 1/(2β))²`` where Δ̄ uses per-token *averages* (TRL's normalisation);
* ``hinge``: ``relu(1 − β Δ)``;
* SimPO (reference-free): ``−log σ(β (avg log π(c) − avg log π(r)) − γ)`` (with ``label_smoothing`` ε:
  ``−(1−ε) log σ(z) − ε log σ(−z)``, as TRL's CPO trainer).
* ORPO (reference-free): the chosen sequence's NLL plus an odds-ratio penalty,
  ``NLL(c) − β log σ(log odds(c) − log odds(r))`` with ``log odds(y) = ℓ − log(1 − e^ℓ)`` of the per-token
  *average* completion log-prob ℓ (TRL's ``ORPOTrainer``). As TRL, the NLL is the mean over every token of
  the chosen row, prompt included, and the penalty the mean over pairs.

**Reference log-probs.** With LoRA the reference is the same weights with the adapters off — the frozen
base the step already holds — so it costs a second forward pass but no memory. Or they are precomputed once
before training (``reference="precompute"``, the only option for a full fine-tune, which would otherwise
need a second copy of the model) and ride in the batch.

Metrics per step as TRL names them: ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
``rewards/margins``, ``logps/chosen``, ``logps/rejected``; ``accuracy`` is ``rewards/accuracies`` too.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemmax.models.base import XLA
from gemmax.train.branches import branch_batch, continuation_log_probs, flat_rows, gather_log_probs, row_length
from gemmax.train.data import END_OF_TURN, START_OF_TURN, DataError, EpochCursor, Record, read_records
from gemmax.train.objectives import Objective, merged, sequence_forward
from gemmax.train.optim import Precision, loss_kernel

__all__ = ["DPO", "ORPO", "PairBatch", "PreferenceDataset", "SimPO", "dpo_loss", "orpo_odds_ratio", "simpo_loss"]

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


# ---- losses (pure, on sequence log-probs) -----------------------------------------------------------------


def dpo_loss(chosen: jax.Array, rejected: jax.Array, ref_chosen: jax.Array, ref_rejected: jax.Array, *,
             beta: float, loss_type: str = "sigmoid", n_chosen: jax.Array | None = None,
             n_rejected: jax.Array | None = None) -> jax.Array:
    """Per-pair DPO loss from summed completion log-probs [P]; ``n_*`` (completion token counts) for IPO."""
    cl, rl = chosen - ref_chosen, rejected - ref_rejected
    delta = cl - rl
    if loss_type == "sigmoid":
        return -jax.nn.log_sigmoid(beta * delta)
    if loss_type == "hinge":
        return jax.nn.relu(1 - beta * delta)
    if loss_type == "ipo":
        if n_chosen is None or n_rejected is None:
            raise ValueError("the ipo loss needs the completion token counts")
        d = cl / jnp.maximum(n_chosen, 1.0) - rl / jnp.maximum(n_rejected, 1.0)
        return (d - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown DPO loss_type {loss_type!r}; use one of {', '.join(LOSS_TYPES)}")


def simpo_loss(avg_chosen: jax.Array, avg_rejected: jax.Array, *, beta: float, gamma: float,
               label_smoothing: float = 0.0) -> jax.Array:
    """Per-pair SimPO loss from per-token *average* completion log-probs [P] (no reference model)."""
    z = beta * (avg_chosen - avg_rejected) - gamma
    return -(1 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)


def _log1mexp(x: jax.Array) -> jax.Array:
    """``log(1 − eˣ)`` for x < 0 without cancellation (branch at −ln 2, as Mächler's note).

    ``x`` is capped just below 0: a completion the model is certain of (average log-prob exactly 0 in float32)
    would give −inf here and a NaN gradient; the cap leaves every other value as it is.
    """
    x = jnp.minimum(x, -1e-6)
    return jnp.where(x < -0.6931471805599453, jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


def orpo_odds_ratio(avg_chosen: jax.Array, avg_rejected: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(``log σ(log odds ratio)``, log odds ratio) per pair [P] from per-token *average* completion log-probs;
    ORPO's loss is the chosen NLL minus β times the first."""
    log_odds = (avg_chosen - avg_rejected) - (_log1mexp(avg_chosen) - _log1mexp(avg_rejected))
    return jax.nn.log_sigmoid(log_odds), log_odds


# ---- data ------------------------------------------------------------------------------------------------


def _messages(rec: Record, name: str) -> list[dict[str, Any]]:
    v = rec.data[name]
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except json.JSONDecodeError:
            raise DataError(f"{rec.origin}: field {name!r} is a string that is not a JSON list of messages") from None
    if hasattr(v, "tolist"):
        v = v.tolist()
    if not isinstance(v, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in v):
        raise DataError(f"{rec.origin}: field {name!r} must be a list of {{role, content}} messages")
    return v


def _turns(rec: Record, msgs: list[dict[str, Any]], system: str | None) -> tuple[list[str], str | None]:
    """Gemma turn texts of a prompt's messages (a system message is folded into the first user turn)."""
    out = []
    for j, m in enumerate(msgs):
        role, content = m["role"], m["content"]
        if not isinstance(content, str):
            raise DataError(f"{rec.origin}: message {j} content must be text")
        if role == "system":
            system = content
        elif role == "user":
            if system is not None:
                content, system = f"{system}\n\n{content}", None
            out.append(f"{START_OF_TURN}user\n{content}{END_OF_TURN}\n")
        elif role in ("assistant", "model"):
            out.append(f"{START_OF_TURN}model\n{content}{END_OF_TURN}\n")
        else:
            raise DataError(f"{rec.origin}: message {j}: unknown role {role!r}")
    return out, system


def _completion_text(rec: Record, name: str, conversational: bool) -> str:
    if name not in rec.data or rec.data[name] is None:
        raise DataError(f"{rec.origin}: missing field {name!r} (a preference record needs 'prompt', 'chosen' "
                        f"and 'rejected'; it has {', '.join(sorted(map(str, rec.data)))})")
    if conversational:
        msgs = _messages(rec, name)
        if len(msgs) != 1 or msgs[0]["role"] not in ("assistant", "model") or not isinstance(msgs[0]["content"], str):
            raise DataError(f"{rec.origin}: {name!r} must be one assistant message")
        text = msgs[0]["content"]
    else:
        text = rec.data[name]
        if not isinstance(text, str):
            raise DataError(f"{rec.origin}: field {name!r} must be text or a list of messages, got "
                            f"{type(text).__name__}")
    if not text.strip():
        raise DataError(f"{rec.origin}: field {name!r} is an empty completion")
    return text


def encode_pair(rec: Record, tokenizer: Any) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, chosen ids, rejected ids) of one preference record, in TRL's plain or conversational form."""
    if "prompt" not in rec.data or rec.data["prompt"] is None:
        raise DataError(f"{rec.origin}: missing field 'prompt' (a preference record needs 'prompt', 'chosen' "
                        f"and 'rejected'; it has {', '.join(sorted(map(str, rec.data)))})")
    prompt = rec.data["prompt"]
    conversational = not isinstance(prompt, str)
    chosen = _completion_text(rec, "chosen", conversational)
    rejected = _completion_text(rec, "rejected", conversational)
    if conversational:
        turns, _ = _turns(rec, _messages(rec, "prompt"), None)
        prompt_text = "".join(turns) + f"{START_OF_TURN}model\n"
        tails = [c + END_OF_TURN for c in (chosen, rejected)]
        eos: list[int] = []
    else:
        prompt_text, tails, eos = prompt, [chosen, rejected], [tokenizer.eos_id]
    p = [tokenizer.bos_id] + list(tokenizer.encode(prompt_text, add_bos=False))
    c, r = (list(tokenizer.encode(t, add_bos=False)) + eos for t in tails)
    return p, c, r


def _row(prompt: list[int], completion: list[int], seq: int, origin: str) -> tuple[np.ndarray, ...]:
    """(inputs, targets, mask) of prompt + completion, truncated to ``seq`` input positions."""
    ids = np.asarray(prompt + completion, np.int32)
    w = np.asarray([0.0] * len(prompt) + [1.0] * len(completion), np.float32)
    n = min(len(ids) - 1, seq)
    if w[1:n + 1].sum() == 0:
        raise DataError(f"{origin}: the prompt is {len(prompt)} tokens, which leaves no completion token within "
                        f"sequence_length={seq}")
    return ids[:n], ids[1:n + 1], w[1:n + 1]


def _group(pair: tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]) -> tuple[list[int], list[list[int]]]:
    """A pair's two rows as (prompt, [chosen targets, rejected targets]) for ``branches.branch_batch``: the
    first target of the completion is predicted at the prompt's last position."""
    x, _, w = pair[0]
    p = int(np.argmax(w > 0)) + 1
    return [int(v) for v in x[:p]], [[int(v) for v in y[p - 1:]] for _, y, _ in pair]


@dataclass
class PairBatch:
    """The pairs as ``[B, 2, T]`` rows of ``prompt + completion`` (chosen first: what a plain forward pass per
    sequence reads), ``pair_mask`` [B] (0 on padding pairs), ``ref_logps`` [B, 2], and ``layout``: the arrays
    the step reads (``branches.branch_batch``: one row or two per pair)."""

    tokens: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    positions: np.ndarray
    segment_ids: np.ndarray
    pair_mask: np.ndarray
    ref_logps: np.ndarray
    layout: dict[str, np.ndarray] = field(default_factory=dict)

    def as_dict(self) -> dict[str, np.ndarray]:
        return {**self.layout, "pair_mask": self.pair_mask, "ref_logps": self.ref_logps}


@dataclass
class PreferenceDataset:
    """Tokenized pairs: ``rows[i] = ((x, y, w) chosen, (x, y, w) rejected)``; ``ref_logps`` [N, 2] once
    precomputed (zeros before). ``shared``: a pair's batch layout is one row (the family takes
    ``prefix_ids``), else two."""

    rows: list[tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]]
    origins: list[str]
    sequence_length: int
    pad_id: int = 0
    ref_logps: np.ndarray | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    shared: bool = False

    def __post_init__(self) -> None:
        self._groups = [_group(pair) for pair in self.rows]
        self._row = row_length(self._groups, self.shared)
        self._length = max(len(c) for _, cs in self._groups for c in cs)
        self._prompt = max(len(p) for p, _ in self._groups) - 1

    @classmethod
    def from_source(cls, source: Any, tokenizer: Any, sequence_length: int, shared: bool = False
                    ) -> PreferenceDataset:
        recs = source if isinstance(source, list) and source and isinstance(source[0], Record) \
            else read_records(source)
        rows, origins, truncated = [], [], 0
        for rec in recs:
            p, c, r = encode_pair(rec, tokenizer)
            truncated += int(len(p) + max(len(c), len(r)) - 1 > sequence_length)
            rows.append((_row(p, c, sequence_length, rec.origin), _row(p, r, sequence_length, rec.origin)))
            origins.append(rec.origin)
        if not rows:
            raise DataError(f"{source}: no preference pairs")
        pad = max(int(getattr(tokenizer, "pad_id", 0) or 0), 0)
        ds = cls(rows, origins, int(sequence_length), pad, shared=shared)
        ds.stats = {"pairs": len(rows), "truncated": truncated}
        return ds

    def __len__(self) -> int:
        return len(self.rows)

    def report(self) -> str:
        return f"{len(self.rows)} preference pairs, rows of {self.sequence_length}, {self.stats['truncated']} truncated"

    def batch(self, idx: list[int], batch_size: int) -> PairBatch:
        t = self.sequence_length
        shape = (batch_size, 2, t)
        tokens = np.full(shape, self.pad_id, np.int32)
        targets = np.full(shape, self.pad_id, np.int32)
        mask = np.zeros(shape, np.float32)
        pos = np.zeros(shape, np.int32)
        seg = np.zeros(shape, np.int32)
        pair = np.zeros(batch_size, np.float32)
        ref = np.zeros((batch_size, 2), np.float32)
        for b, i in enumerate(idx):
            for k in range(2):
                x, y, w = self.rows[i][k]
                n = len(x)
                tokens[b, k, :n], targets[b, k, :n], mask[b, k, :n] = x, y, w
                pos[b, k, :n], seg[b, k, :n] = np.arange(n), 1
            pair[b] = 1.0
            if self.ref_logps is not None:
                ref[b] = self.ref_logps[i]
        layout = branch_batch([self._groups[i] for i in idx], size=batch_size, continuations=2, shared=self.shared,
                              row=self._row, length=self._length, pad_id=self.pad_id,
                              prompt_targets=max(self._prompt, 1))
        return PairBatch(tokens, targets, mask, pos, seg, pair, ref, layout)

    def iterator(self, batch_size: int, *, seed: int = 0, shuffle: bool = True, num_epochs: int | None = None,
                 drop_remainder: bool = False) -> IndexIterator:
        return IndexIterator(len(self.rows), batch_size, lambda idx: self.batch(idx, batch_size), seed=seed,
                             shuffle=shuffle, num_epochs=num_epochs, drop_remainder=drop_remainder)

    def evaluation(self, batch_size: int) -> IndexIterator:
        """One pass over every pair in order; the last batch is padded with empty pairs (``pair_mask`` 0)."""
        return self.iterator(batch_size, shuffle=False, num_epochs=1)


class IndexIterator(EpochCursor):
    """Batches of record indices, shuffled per epoch from ``(seed, epoch)``, turned into batches by
    ``make``; its state ``{"epoch", "batch", "seed"}`` restores the exact position (as ``BatchIterator``)."""

    def __init__(self, n: int, batch_size: int, make: Callable[[list[int]], Any], *, seed: int = 0,
                 shuffle: bool = True, num_epochs: int | None = None, drop_remainder: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.n, self.batch_size, self.make = n, int(batch_size), make
        self.seed, self.shuffle, self.num_epochs, self.drop_remainder = int(seed), shuffle, num_epochs, drop_remainder
        self.epoch = self.batch = 0

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle else np.arange(self.n)

    def batches_in_epoch(self, epoch: int | None = None) -> int:
        return self._batches_of(self.n)

    def next_indices(self) -> list[int]:
        window = self._next_window()
        return [int(i) for i in self.order(self.epoch)[window]]

    def __next__(self) -> Any:
        before = self.state()
        idx = self.next_indices()
        try:
            return self.make(idx)
        except Exception:
            self.restore(before)  # a failed batch (e.g. a reward function raised) is not consumed
            raise

    def restore(self, state: dict[str, Any]) -> None:
        if "seed" in state and int(state["seed"]) != self.seed:
            raise ValueError(f"data state was saved with seed {state['seed']}, this iterator uses {self.seed}")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])


# ---- the objectives --------------------------------------------------------------------------------------


#: an objective's loss on the pair forward pass: (params, hidden, batch, frozen) -> (loss sum, aux)
PairLossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def sequence_log_probs(params: Any, config: Any, hidden: jax.Array, batch: dict[str, jax.Array],
                       chunk_size: int, kernel: str = XLA) -> tuple[jax.Array, jax.Array]:
    """(summed completion log-probs [B, 2], completion token counts [B, 2])."""
    lp = continuation_log_probs(params, config, hidden, batch, chunk_size, kernel)
    return lp.sum(-1), batch["mask"].sum(-1)


@dataclass
class _PreferenceObjective(Objective):
    """What DPO and SimPO share: the data, the pair forward pass and the metrics."""

    beta: float = 0.1

    def load(self, lm: Any, data: Any, sequence_length: int, format: str) -> tuple[Any, int]:
        shared = bool(lm.family.shared_prefix)
        if isinstance(data, PreferenceDataset):
            if data.shared and not shared:
                raise ValueError(f"this PreferenceDataset lays a pair out as one row (shared=True), which the "
                                 f"{lm.family.name} family's forward pass does not take: build it with shared=False")
            return data, data.sequence_length
        if lm.tokenizer is None:
            raise DataError("this model has no tokenizer: pass a PreferenceDataset built with one")
        if sequence_length > lm.config.max_position_embeddings:
            raise ValueError(f"sequence_length={sequence_length} exceeds the model's context of "
                             f"{lm.config.max_position_embeddings}")
        return PreferenceDataset.from_source(data, lm.tokenizer, sequence_length, shared), sequence_length

    def step_metrics(self, m: dict[str, Any], batch: Any, seconds: float) -> dict[str, float]:
        n = max(float(m["n_tokens"]), 1.0)
        out = {k: float(m[k]) / n for k in ("rewards/chosen", "rewards/rejected", "rewards/margins",
                                             "logps/chosen", "logps/rejected")}
        out["rewards/accuracies"] = float(m["n_correct"]) / n
        out["tokens_per_second"] = float(np.prod(batch.tokens.shape)) / seconds
        return out

    def loss_sums_fn(self, family: Any, config: Any, precision: Any, remat: str | None, chunk_size: int,
                     kernel: str = XLA) -> Callable[..., tuple[jax.Array, dict[str, jax.Array]]]:
        fwd = sequence_forward(family, config, precision, remat)
        pair_loss = self._pair_loss_fn(fwd, config, chunk_size, kernel)

        def loss_sums(trainable: Any, batch: dict[str, jax.Array], frozen: Any) -> tuple[jax.Array, dict]:
            p, hidden = fwd(merged(trainable, frozen), flat_rows(batch))
            return pair_loss(p, hidden, batch, frozen)

        return loss_sums

    def _pair_loss_fn(self, fwd: Callable, config: Any, chunk_size: int, kernel: str) -> PairLossFn:
        """The objective's loss on the policy's forward pass over the pairs' rows (``branches.flat_rows``),
        run by ``loss_sums_fn``: ``pair_loss(params, hidden, batch, frozen)`` -> ``(loss sum, aux)``. ``fwd``
        runs another pass (DPO's reference)."""
        raise NotImplementedError

    def _aux(self, w: jax.Array, r_c: jax.Array, r_r: jax.Array, logps: jax.Array) -> dict[str, jax.Array]:
        return {"n_tokens": w.sum(), "n_correct": ((r_c > r_r) * w).sum(),
                "rewards/chosen": (r_c * w).sum(), "rewards/rejected": (r_r * w).sum(),
                "rewards/margins": ((r_c - r_r) * w).sum(),
                "logps/chosen": (logps[:, 0] * w).sum(), "logps/rejected": (logps[:, 1] * w).sum()}


@dataclass
class DPO(_PreferenceObjective):
    """Direct preference optimisation. ``loss_type``: "sigmoid" (DPO), "ipo" or "hinge". ``reference``:
    "auto" (LoRA: the base with adapters off, each step; full: precomputed), "base" or "precompute"."""

    name = "dpo"
    loss_type: str = "sigmoid"
    reference: str = "auto"
    _precomputed: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown DPO loss_type {self.loss_type!r}; use one of {', '.join(LOSS_TYPES)}")
        if self.reference not in ("auto", "base", "precompute"):
            raise ValueError(f"reference must be 'auto', 'base' or 'precompute', got {self.reference!r}")

    def prepare(self, lm: Any, dataset: Any, params_fn: Callable[[], Any], *, batch_size: int,
                is_lora: bool, precision: Any = None) -> None:
        if self.reference == "base" and not is_lora:
            raise ValueError("reference='base' needs LoRA adapters (the base is the weights with them off); "
                             "a full fine-tune precomputes the reference (reference='precompute')")
        self._precomputed = self.reference == "precompute" or (self.reference == "auto" and not is_lora)
        if self._precomputed and dataset.ref_logps is None:
            dataset.ref_logps = reference_log_probs(lm, dataset, params_fn(), batch_size)

    def _pair_loss_fn(self, fwd: Callable, config: Any, chunk_size: int, kernel: str) -> PairLossFn:
        precomputed = self._precomputed

        def pair_loss(p: Any, hidden: jax.Array, batch: dict[str, jax.Array], frozen: Any
                      ) -> tuple[jax.Array, dict]:
            logps, n = sequence_log_probs(p, config, hidden, batch, chunk_size, kernel)
            if precomputed:
                ref = batch["ref_logps"]
            else:  # the same weights with the adapters off: the frozen base, never differentiated
                base = jax.lax.stop_gradient(frozen)
                pr, hr = fwd(base, flat_rows(batch))
                ref = sequence_log_probs(pr, config, hr, batch, chunk_size, kernel)[0]
            loss = dpo_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], beta=self.beta, loss_type=self.loss_type,
                            n_chosen=n[:, 0], n_rejected=n[:, 1])
            w = batch["pair_mask"]
            r_c, r_r = self.beta * (logps[:, 0] - ref[:, 0]), self.beta * (logps[:, 1] - ref[:, 1])
            return (loss * w).sum(), self._aux(w, jax.lax.stop_gradient(r_c), jax.lax.stop_gradient(r_r),
                                               jax.lax.stop_gradient(logps))

        return pair_loss


@dataclass
class SimPO(_PreferenceObjective):
    """Simple preference optimisation: reference-free, length-normalised, with a target margin ``gamma``
    (TRL's ``CPOTrainer(loss_type="simpo", cpo_alpha=0)``; rewards are ``beta`` x average log-probs)."""

    name = "simpo"
    beta: float = 2.0
    gamma: float = 1.0
    label_smoothing: float = 0.0

    def _pair_loss_fn(self, fwd: Callable, config: Any, chunk_size: int, kernel: str) -> PairLossFn:
        def pair_loss(p: Any, hidden: jax.Array, batch: dict[str, jax.Array], frozen: Any
                      ) -> tuple[jax.Array, dict]:
            logps, n = sequence_log_probs(p, config, hidden, batch, chunk_size, kernel)
            avg = logps / jnp.maximum(n, 1.0)
            loss = simpo_loss(avg[:, 0], avg[:, 1], beta=self.beta, gamma=self.gamma,
                              label_smoothing=self.label_smoothing)
            w = batch["pair_mask"]
            r = jax.lax.stop_gradient(self.beta * avg)
            return (loss * w).sum(), self._aux(w, r[:, 0], r[:, 1], jax.lax.stop_gradient(avg))

        return pair_loss


@dataclass
class ORPO(_PreferenceObjective):
    """Odds-ratio preference optimisation (TRL's ``ORPOTrainer``): reference-free; the chosen sequence's NLL
    keeps the supervised signal while ``beta`` x the log odds ratio moves chosen above rejected. Rewards are
    ``beta`` x average completion log-probs; ``nll_loss``, ``log_odds_ratio`` (mean ``log σ`` of the log odds
    ratio) and ``log_odds_chosen`` (mean log odds ratio) are logged under TRL's names."""

    name = "orpo"
    beta: float = 0.1

    def _pair_loss_fn(self, fwd: Callable, config: Any, chunk_size: int, kernel: str) -> PairLossFn:
        beta = self.beta

        def pair_loss(p: Any, hidden: jax.Array, batch: dict[str, jax.Array], frozen: Any
                      ) -> tuple[jax.Array, dict]:
            lp, n = sequence_log_probs(p, config, hidden, batch, chunk_size, kernel)
            avg = lp / jnp.maximum(n, 1.0)
            # the NLL is TRL's: over every real position of the chosen rows (prompt included), a token mean
            plp = gather_log_probs(p, config, hidden, batch, batch["prompt_index"], batch["prompt_targets"],
                                   chunk_size, kernel) * batch["prompt_mask"]
            real = batch["prompt_mask"].sum() + n[:, 0].sum()
            nll = -(plp.sum() + lp[:, 0].sum()) / jnp.maximum(real, 1.0)
            ratio, log_odds = orpo_odds_ratio(avg[:, 0], avg[:, 1])
            w = batch["pair_mask"]
            pairs = w.sum()
            # a sum over pairs whose mean is TRL's loss (the NLL is already a mean: weigh it by the pairs)
            loss = pairs * nll - beta * (ratio * w).sum()
            r = jax.lax.stop_gradient(beta * avg)
            aux = self._aux(w, r[:, 0], r[:, 1], jax.lax.stop_gradient(avg))
            aux.update(jax.lax.stop_gradient({"nll_loss": pairs * nll, "log_odds_ratio": (ratio * w).sum(),
                                              "log_odds_chosen": (log_odds * w).sum()}))
            return loss, aux

        return pair_loss

    def step_metrics(self, m: dict[str, Any], batch: Any, seconds: float) -> dict[str, float]:
        out = super().step_metrics(m, batch, seconds)
        n = max(float(m["n_tokens"]), 1.0)
        out.update({k: float(m[k]) / n for k in ("nll_loss", "log_odds_ratio", "log_odds_chosen")})
        return out


_REF_FNS: dict[str, Any] = {}


def reference_log_probs(lm: Any, dataset: PreferenceDataset, params: Any, batch_size: int) -> np.ndarray:
    """Summed completion log-probs [N, 2] of every pair under ``params`` (one pass, in order, no gradient)."""
    kernel = loss_kernel()
    key = lm.family.name + json.dumps(lm.config.to_dict(), sort_keys=True, default=str) + kernel
    if key not in _REF_FNS:
        fwd = sequence_forward(lm.family, lm.config, Precision(), None)
        config = lm.config

        def fn(p: Any, batch: dict[str, jax.Array]) -> jax.Array:
            pp, hidden = fwd(p, flat_rows(batch))
            return sequence_log_probs(pp, config, hidden, batch, 1024, kernel)[0]

        _REF_FNS.clear()  # one architecture at a time: the compiled function holds no weights, only code
        _REF_FNS[key] = jax.jit(fn)
    fn = _REF_FNS[key]

    out = np.zeros((len(dataset), 2), np.float32)
    for start in range(0, len(dataset), batch_size):
        idx = list(range(start, min(start + batch_size, len(dataset))))
        d = dataset.batch(idx, batch_size).as_dict()
        out[idx] = np.asarray(fn(params, {k: jnp.asarray(v) for k, v in d.items()}))[:len(idx)]
    return out
