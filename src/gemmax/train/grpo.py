"""GRPO: group relative policy optimisation against rewards written in Python.

Every step samples ``num_generations`` completions for each of ``batch_size / num_generations`` prompts with
gemmax's own engine (``engine.generate.generate_ids``: batched, on device, the policy's *current* weights —
the same arrays the trainer holds, adapters included, no copy), scores them with the reward functions, and
takes one optimizer step on the clipped objective. Names, defaults and formulas follow TRL's
``GRPOTrainer`` / ``GRPOConfig``:

* rewards: each function is ``f(prompts, completions, **columns) -> list[float]`` (the record's other fields
  arrive as keyword lists, as TRL passes dataset columns); several are combined as
  ``sum_i weight_i * r_i``. A function that raises, returns the wrong count, None or NaN stops training
  with ``RewardError`` naming the function and the record — the state up to the last step is kept and
  checkpointed (the data position is left before the failing batch).
* advantages: ``(r - mean_group(r)) / (std_group(r) + 1e-4)`` (``scale_rewards="group"``; "batch" uses one
  std over the batch, "none" does not divide), the std unbiased as ``torch.std``.
* per-token loss: ``-min(ρ A, clip(ρ, 1-ε_low, 1+ε_high) A) + β KL`` with ``ρ = exp(log π − log π_old)`` and
  the k3 estimator ``KL = exp(ref − log π) − (ref − log π) − 1``. With one update per generation (TRL's
  default ``num_iterations=1``) ``π_old`` is ``π`` without gradient and ρ = 1 in value; with
  ``num_iterations=μ > 1`` one generated batch serves μ consecutive optimizer steps and ``log π_old`` is
  computed once, at generation time, from the weights that sampled it, so from the second pass on ρ moves
  and the clip acts (TRL's meaning of μ). A checkpoint taken inside such a block holds the batch, so a
  resume continues it exactly.
* normalisation ``loss_type``: "grpo" (mean over tokens of each completion, then over completions),
  "bnpo" (mean over all completion tokens), "dr_grpo" (sum / (completions x ``max_completion_length``)).
* the KL reference (``beta > 0``): with LoRA the base with adapters off, inside the step; a full fine-tune
  keeps the starting weights (a second copy — say so with ``beta=0``, TRL's default, to avoid it).

The update reads a group as one row where the family allows it (``branches``): the prompt once, then its
completions, each seeing the prompt; the output head runs on the completion positions only (TRL's
``logits_to_keep``).
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemmax.engine.generate import SamplingParams, generate_ids
from gemmax.models.base import XLA
from gemmax.train.branches import LAYOUT_KEYS, branch_batch, continuation_log_probs, flat_rows
from gemmax.train.data import END_OF_TURN, START_OF_TURN, DataError, Record, read_records
from gemmax.train.objectives import Objective, merged, sequence_forward
from gemmax.train.optim import loss_kernel
from gemmax.train.preference import IndexIterator

__all__ = ["GRPO", "RewardError", "group_advantages", "grpo_per_token_loss", "reduce_grpo_loss"]

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo")


class RewardError(ValueError):
    """A reward function failed or returned something unusable; the message names it and the record."""


# ---- pure pieces ----------------------------------------------------------------------------------------


def group_advantages(rewards: np.ndarray, num_generations: int, scale_rewards: str = "group") -> np.ndarray:
    """Group-normalised advantages of completions laid out group after group ([n_prompts * G])."""
    r = np.asarray(rewards, np.float64).reshape(-1, num_generations)
    mean = r.mean(axis=1, keepdims=True)
    if scale_rewards == "group":
        std = r.std(axis=1, ddof=1, keepdims=True) if num_generations > 1 else np.zeros_like(mean)
    elif scale_rewards == "batch":
        std = np.full_like(mean, r.std(ddof=1) if r.size > 1 else 0.0)
    elif scale_rewards == "none":
        std = None
    else:
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
    adv = r - mean
    if std is not None:
        adv = adv / (std + 1e-4)
    return adv.reshape(-1).astype(np.float32)


def grpo_per_token_loss(logps: jax.Array, old_logps: jax.Array, advantages: jax.Array, *, epsilon_low: float,
                        epsilon_high: float, beta: float = 0.0, ref_logps: jax.Array | None = None
                        ) -> tuple[jax.Array, jax.Array]:
    """(per-token loss [B, T], per-token KL [B, T] or zeros) of the clipped objective."""
    ratio = jnp.exp(logps - old_logps)
    clipped = jnp.clip(ratio, 1 - epsilon_low, 1 + epsilon_high)
    a = advantages[:, None]
    loss = -jnp.minimum(ratio * a, clipped * a)
    kl = jnp.zeros_like(loss)
    if beta != 0.0:
        d = ref_logps - logps
        kl = jnp.exp(d) - d - 1
        loss = loss + beta * kl
    return loss, kl


def reduce_grpo_loss(per_token: jax.Array, mask: jax.Array, loss_type: str, max_completion_length: int
                     ) -> tuple[jax.Array, jax.Array]:
    """(sum, count) whose ratio is the ``loss_type`` normalisation of ``per_token`` [B, T] under ``mask``."""
    if loss_type == "grpo":
        per_seq = (per_token * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1.0)
        return per_seq.sum(), jnp.asarray(per_token.shape[0], jnp.float32)
    if loss_type == "bnpo":
        return (per_token * mask).sum(), mask.sum()
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / max_completion_length, jnp.asarray(per_token.shape[0], jnp.float32)
    raise ValueError(f"unknown GRPO loss_type {loss_type!r}; use one of {', '.join(LOSS_TYPES)}")


# ---- prompts and rollouts -------------------------------------------------------------------------------


def _prompt_text(rec: Record) -> str:
    if "prompt" not in rec.data or rec.data["prompt"] is None:
        raise DataError(f"{rec.origin}: missing field 'prompt' (GRPO reads prompts; the record has "
                        f"{', '.join(sorted(map(str, rec.data)))})")
    p = rec.data["prompt"]
    if isinstance(p, str):
        if not p.strip():
            raise DataError(f"{rec.origin}: empty prompt")
        return p
    if hasattr(p, "tolist"):
        p = p.tolist()
    if not isinstance(p, list) or not p:
        raise DataError(f"{rec.origin}: 'prompt' must be text or a list of messages")
    out, system = [], None
    for j, m in enumerate(p):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{rec.origin}: prompt message {j} must have 'role' and 'content'")
        if m["role"] == "system":
            system = m["content"]
            continue
        content = m["content"] if system is None or m["role"] != "user" else f"{system}\n\n{m['content']}"
        system = None if m["role"] == "user" else system
        role = "model" if m["role"] in ("assistant", "model") else m["role"]
        out.append(f"{START_OF_TURN}{role}\n{content}{END_OF_TURN}\n")
    return "".join(out) + f"{START_OF_TURN}model\n"


@dataclass
class Rollout:
    """One step's completions and their scores; ``as_dict`` is what the compiled step reads."""

    arrays: dict[str, np.ndarray]
    rewards: np.ndarray
    rewards_per_func: dict[str, np.ndarray]
    completion_lengths: np.ndarray
    generation_seconds: float
    completions: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, np.ndarray]:
        return self.arrays


@dataclass
class PromptDataset:
    """Prompts (token ids and text), the records' other fields (reward-function keyword arguments), and the
    sampler that turns a batch of prompt indices into a ``Rollout`` (bound by ``GRPO.prepare``)."""

    records: list[Record]
    texts: list[str]
    ids: list[list[int]]
    sequence_length: int
    rollout: Callable[[list[int], int], Rollout] | None = None
    num_generations: int = 1
    num_iterations: int = 1
    #: a group is one row (the family takes ``prefix_ids``), else one row per completion
    shared: bool = False

    def __len__(self) -> int:
        return len(self.records)

    def report(self) -> str:
        return f"{len(self.records)} prompts, {self.num_generations} completions each"

    def iterator(self, batch_size: int, *, seed: int = 0, shuffle: bool = True, num_epochs: int | None = None,
                 drop_remainder: bool = False, repeat: bool = True) -> IndexIterator | RepeatIterator:
        """Rollouts of ``batch_size`` completions; each one ``num_iterations`` times in a row (``repeat``)."""
        def make(idx: list[int]) -> Rollout:
            assert self.rollout is not None, "GRPO.prepare binds the sampler"
            # the sampling seed follows the data position, so a resumed run draws the same completions
            return self.rollout(idx, it.epoch * 1_000_003 + it.batch)

        # a batch is batch_size completions: batch_size / G prompts; the last partial group is dropped
        it = IndexIterator(len(self.records), batch_size // self.num_generations, make, seed=seed,
                           shuffle=shuffle, num_epochs=num_epochs, drop_remainder=True)
        return RepeatIterator(it, self.num_iterations) if repeat and self.num_iterations > 1 else it

    def evaluation(self, batch_size: int) -> IndexIterator:
        """One pass over the prompts in order (whole groups only), each rollout used once."""
        per_batch = batch_size // self.num_generations
        if len(self.records) < per_batch:
            raise DataError(f"{len(self.records)} evaluation prompts are fewer than one batch of {per_batch} "
                            f"(batch_size={batch_size} / num_generations={self.num_generations})")
        return self.iterator(batch_size, shuffle=False, num_epochs=1, repeat=False)


class RepeatIterator:
    """Each rollout of ``inner`` served ``times`` times in a row (GRPO's ``num_iterations``).

    Its state is the inner position plus, inside a block, how many passes are done and the rollout itself
    (``npz`` bytes in base64: the sampled completions, advantages and old log-probs came from weights that no
    longer exist, so a resume cannot draw them again)."""

    def __init__(self, inner: IndexIterator, times: int) -> None:
        self.inner, self.times = inner, int(times)
        self.done = 0
        self.current: Rollout | None = None

    @property
    def epoch(self) -> int:
        return self.inner.epoch

    @property
    def num_epochs(self) -> int | None:
        return self.inner.num_epochs

    @num_epochs.setter
    def num_epochs(self, value: int | None) -> None:
        self.inner.num_epochs = value

    def batches_in_epoch(self, epoch: int | None = None) -> int:
        return self.inner.batches_in_epoch(epoch) * self.times

    def __iter__(self) -> RepeatIterator:
        return self

    def __next__(self) -> Rollout:
        if self.current is None:
            self.current, self.done = next(self.inner), 0  # a failed rollout leaves the inner position as it was
        out = self.current if self.done == 0 else dataclasses.replace(self.current, generation_seconds=0.0)
        self.done += 1
        if self.done == self.times:
            self.current, self.done = None, 0
        return out

    def state(self) -> dict[str, Any]:
        st: dict[str, Any] = dict(self.inner.state())
        if self.current is not None:
            st["iteration"], st["rollout"] = self.done, _encode_rollout(self.current)
        return st

    def restore(self, state: dict[str, Any]) -> None:
        rollout = _decode_rollout(state["rollout"]) if state.get("rollout") is not None else None
        if rollout is not None:
            _check_rollout_layout(rollout)  # before anything changes: a refused state leaves this iterator as it was
        self.inner.restore(state)
        self.current, self.done = rollout, int(state["iteration"]) if rollout is not None else 0


#: the arrays a stored rollout must hold to resume inside a ``num_iterations`` block: ``branches.branch_batch``'s
#: group-leading layout, the advantages [G, n] and the old log-probs [G, n, L]
_ROLLOUT_KEYS = (*LAYOUT_KEYS, "advantages", "old_logps")


def _check_rollout_layout(r: Rollout) -> None:
    """Refuse a rollout stored in another batch layout (a checkpoint taken inside a ``num_iterations`` block
    by a build whose GRPO batches had one flat row per completion): resuming it would fail inside the
    compiled step with a shape error that names nothing."""
    a = r.arrays
    if any(k not in a for k in _ROLLOUT_KEYS) or a["old_logps"].ndim != 3 or a["advantages"].ndim != 2:
        shapes = {k: tuple(v.shape) for k, v in sorted(a.items())}
        raise ValueError(
            f"this checkpoint's GRPO batch (saved inside a num_iterations block) is in a layout this version "
            f"does not read: {shapes}; expected {list(_ROLLOUT_KEYS)} with advantages [groups, generations] "
            "and old_logps [groups, generations, length]. Resume from a checkpoint at a block boundary (a step "
            "that is a multiple of num_iterations) or start the run again")


def _encode_rollout(r: Rollout) -> str:
    arrays = {f"a/{k}": v for k, v in r.arrays.items()}
    arrays.update({f"f/{k}": v for k, v in r.rewards_per_func.items()})
    buf = io.BytesIO()
    np.savez(buf, rewards=r.rewards, lengths=r.completion_lengths, **arrays)
    return json.dumps({"npz": base64.b64encode(buf.getvalue()).decode("ascii"), "completions": r.completions,
                       "generation_seconds": r.generation_seconds})


def _decode_rollout(text: str) -> Rollout:
    d = json.loads(text)
    with np.load(io.BytesIO(base64.b64decode(d["npz"]))) as z:
        arrays = {k[2:]: z[k] for k in z.files if k.startswith("a/")}
        per_func = {k[2:]: z[k] for k in z.files if k.startswith("f/")}
        return Rollout(arrays, z["rewards"], per_func, z["lengths"], float(d["generation_seconds"]),
                       list(d["completions"]))


def _function_name(f: Any) -> str:
    return getattr(f, "__name__", None) or type(f).__name__


@dataclass
class GRPO(Objective):
    """Group relative policy optimisation (see the module docstring). ``batch_size`` of ``fit`` counts
    completions and must be a multiple of ``num_generations``."""

    name = "grpo"
    reward_funcs: Any = None
    reward_weights: Sequence[float] | None = None
    num_generations: int = 8
    max_completion_length: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    loss_type: str = "dr_grpo"
    scale_rewards: str = "group"
    seed: int = 0
    num_iterations: int = 1
    _ref_in_batch: bool = field(default=False, repr=False)
    _ref_params: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        funcs = self.reward_funcs
        if funcs is None:
            raise ValueError("GRPO needs reward_funcs: a callable f(prompts, completions, **columns) -> scores, "
                             "or a list of them")
        self.reward_funcs = list(funcs) if isinstance(funcs, (list, tuple)) else [funcs]
        if not all(callable(f) for f in self.reward_funcs):
            raise ValueError("every reward function must be callable")
        w = self.reward_weights
        self.reward_weights = [1.0] * len(self.reward_funcs) if w is None else [float(x) for x in w]
        if len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"{len(self.reward_weights)} reward_weights for {len(self.reward_funcs)} reward functions")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown GRPO loss_type {self.loss_type!r}; use one of {', '.join(LOSS_TYPES)}")
        if self.num_generations < 2:
            raise ValueError("num_generations must be >= 2 (advantages are relative to the group)")
        if self.num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1 (optimizer steps per generated batch), got "
                             f"{self.num_iterations}")

    # -- data
    def load(self, lm: Any, data: Any, sequence_length: int, format: str) -> tuple[Any, int]:
        if lm.tokenizer is None:
            raise DataError("GRPO needs the model's tokenizer (rewards read text)")
        recs = read_records(data)
        texts = [_prompt_text(r) for r in recs]
        ids = [list(lm.tokenizer.encode(t, add_bos=True)) for t in texts]
        for r, p in zip(recs, ids, strict=True):
            if len(p) + self.max_completion_length > sequence_length:
                raise DataError(f"{r.origin}: the prompt is {len(p)} tokens; with max_completion_length="
                                f"{self.max_completion_length} it exceeds sequence_length={sequence_length}")
        if sequence_length > lm.config.max_position_embeddings:
            raise ValueError(f"sequence_length={sequence_length} exceeds the model's context of "
                             f"{lm.config.max_position_embeddings}")
        return PromptDataset(recs, texts, ids, sequence_length, num_generations=self.num_generations,
                             num_iterations=self.num_iterations, shared=bool(lm.family.shared_prefix)
                             ), sequence_length

    def prepare(self, lm: Any, dataset: Any, params_fn: Callable[[], Any], *, batch_size: int,
                is_lora: bool, precision: Any = None) -> None:
        self._check_batch(batch_size)
        self._ref_in_batch = self.beta != 0.0 and not is_lora
        if self._ref_in_batch:  # a full fine-tune has no frozen base to switch back to: keep the start
            self._ref_params = jax.tree_util.tree_map(jnp.copy, lm.params)
        self._bind(lm, dataset, params_fn, precision)

    def eval_dataset(self, lm: Any, data: Any, sequence_length: int, format: str, params_fn: Callable[[], Any],
                     *, batch_size: int, is_lora: bool, precision: Any = None) -> Any:
        """Held-out prompts sampled with the current weights (the reference, if any, is the training one)."""
        self._check_batch(batch_size)
        if self.beta != 0.0 and not is_lora and self._ref_params is None:
            # scored outside a run (``evaluate``): the weights as they are are the KL reference
            self._ref_in_batch, self._ref_params = True, lm.params
        ds, _ = self.load(lm, data, sequence_length, format)
        self._bind(lm, ds, params_fn, precision)
        return ds

    def eval_weight(self, m: dict[str, Any]) -> float:
        return float(m["completions"])  # rewards are means over completions, whatever the loss normalises by

    def _check_batch(self, batch_size: int) -> None:
        if batch_size % self.num_generations:
            raise ValueError(f"batch_size={batch_size} (completions per step) is not a multiple of "
                             f"num_generations={self.num_generations}")

    def _bind(self, lm: Any, dataset: Any, params_fn: Callable[[], Any], precision: Any) -> None:
        """Give ``dataset`` its sampler: completions from the policy's current weights, scored and laid out."""
        tok = lm.tokenizer
        stop = tuple(getattr(tok, "stop_ids", None) or lm.config.eos_ids)
        logps_fn = _logps_fn(lm, precision or _Identity(), self.max_completion_length)

        g, length = self.num_generations, self.max_completion_length
        prompt_max = max(len(p) for p in dataset.ids)
        row = prompt_max + (g if dataset.shared else 1) * (length - 1)

        def rollout(idx: list[int], position: int) -> Rollout:
            prompts = [dataset.ids[i] for i in idx for _ in range(g)]
            base = (self.seed * 7919 + position * 104_729) % (2 ** 31 - 1)
            sp = [SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                                 seed=(base + j) % (2 ** 31 - 1), max_new_tokens=self.max_completion_length,
                                 stop_ids=stop) for j in range(len(prompts))]
            t0 = time.perf_counter()
            reqs = generate_ids(params_fn(), lm.config, prompts, sp, family=lm.family)
            gen_s = time.perf_counter() - t0
            params = params_fn() if self.num_iterations > 1 else None
            outs = [list(r.new_ids[:self.max_completion_length]) for r in reqs]
            texts = [tok.decode([x for x in o if x not in stop]) for o in outs]
            recs = [dataset.records[i] for i in idx for _ in range(g)]
            per_func = self._score(recs, [dataset.texts[i] for i in idx for _ in range(g)], texts)
            total = sum(w * per_func[_function_name(f)] for f, w in zip(self.reward_funcs, self.reward_weights,
                                                                           strict=True))
            adv = group_advantages(total, g, self.scale_rewards)
            groups = [(dataset.ids[i], outs[j * g:(j + 1) * g]) for j, i in enumerate(idx)]
            arrays = branch_batch(groups, size=len(idx), continuations=g, shared=dataset.shared, row=row,
                                  length=length)
            arrays["advantages"] = adv.astype(np.float32).reshape(len(idx), g)
            placed = {k: jnp.asarray(v) for k, v in arrays.items()}
            if self._ref_in_batch:
                arrays["ref_logps"] = np.asarray(logps_fn(self._ref_params, placed))
            if params is not None:  # π_old of the num_iterations passes: the weights that sampled the batch
                arrays["old_logps"] = np.asarray(logps_fn(params, placed))
            return Rollout(arrays, total, per_func, np.asarray([len(o) for o in outs]), gen_s, texts)

        dataset.rollout = rollout

    def _score(self, recs: list[Record], prompts: list[str], completions: list[str]) -> dict[str, np.ndarray]:
        columns = {k: [r.data.get(k) for r in recs] for k in recs[0].data if k != "prompt"}
        out = {}
        for f in self.reward_funcs:
            name = _function_name(f)
            try:
                vals = f(prompts=prompts, completions=completions, **columns)
            except Exception as e:
                raise RewardError(f"reward function {name!r} raised {type(e).__name__}: {e} (batch starting at "
                                  f"{recs[0].origin})") from e
            vals = list(vals) if vals is not None else []
            if len(vals) != len(completions):
                raise RewardError(f"reward function {name!r} returned {len(vals)} scores for {len(completions)} "
                                  f"completions (batch starting at {recs[0].origin})")
            for j, v in enumerate(vals):
                if v is None or not isinstance(v, (int, float, np.number)) or not math.isfinite(float(v)):
                    raise RewardError(f"reward function {name!r} returned {v!r} for completion "
                                      f"{j % self.num_generations} of {recs[j].origin} ({completions[j]!r}); "
                                      "scores must be finite numbers")
            out[name] = np.asarray(vals, np.float64)
        return out

    # -- the step
    def loss_sums_fn(self, family: Any, config: Any, precision: Any, remat: str | None, chunk_size: int,
                     kernel: str = XLA) -> Callable[..., tuple[jax.Array, dict[str, jax.Array]]]:
        fwd = sequence_forward(family, config, precision, remat)
        eps_low = self.epsilon
        eps_high = self.epsilon if self.epsilon_high is None else self.epsilon_high
        beta, ref_in_batch, loss_type = self.beta, self._ref_in_batch, self.loss_type
        max_len, stored_old = self.max_completion_length, self.num_iterations > 1

        def logps_of(p: Any, hidden: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
            """[B, L] log-probs of the completion targets, B = groups x completions."""
            return continuation_log_probs(p, config, hidden, batch, chunk_size, kernel).reshape(-1, max_len)

        def loss_sums(trainable: Any, batch: dict[str, jax.Array], frozen: Any) -> tuple[jax.Array, dict]:
            rows = flat_rows(batch)
            p, hidden = fwd(merged(trainable, frozen), rows)
            logps = logps_of(p, hidden, batch)
            ref = None
            if beta != 0.0:
                if ref_in_batch:
                    ref = batch["ref_logps"].reshape(logps.shape)
                else:  # LoRA: the base with the adapters off
                    pr, hr = fwd(jax.lax.stop_gradient(frozen), rows)
                    ref = logps_of(pr, hr, batch)
            mask = batch["mask"].reshape(logps.shape)
            now = jax.lax.stop_gradient(logps)
            # π_old from generation time; off the completion it is set to π so padding has ρ = 1 (an overflowing
            # ratio there would turn the masked sum into NaN)
            old = jnp.where(mask > 0, batch["old_logps"].reshape(logps.shape), now) if stored_old else now
            adv = batch["advantages"].reshape(-1)
            per_token, kl = grpo_per_token_loss(logps, old, adv, epsilon_low=eps_low, epsilon_high=eps_high,
                                                beta=beta, ref_logps=ref)
            s, n = reduce_grpo_loss(per_token, mask, loss_type, max_len)
            ratio = jnp.exp(now - old)
            low = (ratio < 1 - eps_low) & (adv[:, None] < 0)
            high = (ratio > 1 + eps_high) & (adv[:, None] > 0)
            return s, {"n_tokens": n, "n_correct": jnp.zeros(()),
                       "kl": (jax.lax.stop_gradient(kl) * mask).sum(), "completion_tokens": mask.sum(),
                       "completions": jnp.asarray(mask.shape[0], jnp.float32),
                       "clip_low": (low * mask).sum(), "clip_high": (high * mask).sum(),
                       "clip_region": ((low | high) * mask).sum()}

        return loss_sums

    def step_metrics(self, m: dict[str, Any], batch: Any, seconds: float) -> dict[str, float]:
        toks = max(float(m["completion_tokens"]), 1.0)
        out = {"reward": float(np.mean(batch.rewards)), "reward_std": float(np.std(batch.rewards)),
               "kl": float(m["kl"]) / toks, "clip_ratio/low_mean": float(m["clip_low"]) / toks,
               "clip_ratio/high_mean": float(m["clip_high"]) / toks,
               "clip_ratio/region_mean": float(m["clip_region"]) / toks,
               "completions/mean_length": float(np.mean(batch.completion_lengths)),
               "generation_seconds": batch.generation_seconds,
               "tokens_per_second": float(m["completion_tokens"]) / (seconds + batch.generation_seconds)}
        for name, v in batch.rewards_per_func.items():
            out[f"rewards/{name}/mean"] = float(np.mean(v))
        return out


_LOGPS_FNS: dict[str, Any] = {}


def _logps_fn(lm: Any, precision: Any, length: int) -> Callable[[Any, dict[str, jax.Array]], jax.Array]:
    """Jitted [G, K, L] completion log-probs under given weights in ``precision`` (the step's, so the first
    pass's ratio against the generation-time log-probs is 1), one compiled function per architecture."""
    kernel = loss_kernel()
    key = lm.family.name + json.dumps(lm.config.to_dict(), sort_keys=True, default=str) + \
        str(getattr(precision, "compute_dtype", "float32")) + f"/{length}/{kernel}"
    if key not in _LOGPS_FNS:
        fwd = sequence_forward(lm.family, lm.config, precision, None)
        config = lm.config

        def logps(p: Any, b: dict[str, jax.Array]) -> jax.Array:
            pp, hidden = fwd(p, flat_rows(b))
            return continuation_log_probs(pp, config, hidden, b, kernel=kernel)

        _LOGPS_FNS.clear()  # the compiled function holds no weights, only code: keep the latest architecture
        _LOGPS_FNS[key] = jax.jit(logps)
    return _LOGPS_FNS[key]


class _Identity:
    @staticmethod
    def compute_params(params: Any) -> Any:
        return params

