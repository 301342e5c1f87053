"""The trainer: ``fit``, ``evaluate``, loss-curve plots and the ``gemmax finetune`` command.

``fit`` assembles the fine-tuning building blocks into one loop:

* data: ``gemmax.train.data.Dataset`` (packed rows, loss masks, a resumable ``BatchIterator``);
* the step: ``model.forward_hidden`` (optionally rematerialised) + ``losses.lm_loss`` (chunked cross-entropy,
  so [B, T, V] logits never exist) + ``optim.accumulate_gradients`` (token-weighted mean over micro-batches)
  + AdamW from ``optim.make_optimizer``, compiled once with the trainable weights and optimizer state
  *donated* (updated in place, no second copy of a 9B model's Adam moments);
* what is trained: only the LoRA factors when the params carry adapters (``lora.split_trainable``; the
  frozen base is an argument of the step that is never differentiated, so it holds no gradients or
  optimizer state), every weight otherwise;
* placement: under the current ``gemmax.distribution`` every weight gets its layout-map sharding, optimizer
  moments follow their weight (``shard_like``) and batches are split on the batch axis; without one,
  everything stays on the default device. The same code runs in both cases — XLA inserts the collectives;
* checkpoints: ``checkpoint.CheckpointManager`` (atomic, keep N, async) holding the trainable weights, the
  optimizer state, the RNG key, the data iterator's position and the history so far — restoring them gives
  bit-for-bit the same continuation as an uninterrupted run;
* safety: a step whose loss or gradient norm is not finite is *not applied* (selected away inside the
  compiled step, so donation cannot have destroyed the last good weights); training stops with
  ``NonFiniteLossError``, the model keeps the last good weights and the last good state is checkpointed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gemmax import distribution as _dist
from gemmax.models.base import XLA
from gemmax.nn.lora import add_lora, count_trainable, merge_trees, split_trainable
from gemmax.train.checkpoint import CheckpointManager
from gemmax.train.data import DataError, Dataset
from gemmax.train.losses import lm_loss
from gemmax.train.optim import (
    Precision,
    accumulate_gradients,
    attention_choice,
    loss_kernel,
    make_optimizer,
    make_schedule,
)

__all__ = [
    "DEMO_SETTINGS",
    "History",
    "NonFiniteLossError",
    "demo_settings",
    "device_peak_flops",
    "enable_lora",
    "evaluate",
    "fit",
    "plot_loss",
]

#: Settings of ``make demo``: a LoRA fine-tune of the real Gemma 3 270M on ``data/movie_reviews.jsonl``
#: that takes a few minutes on a 2-core CPU and visibly changes the greedy continuation of ``prompt``
#: (measured figures in docs/finetuning.md).
DEMO_SETTINGS: dict[str, Any] = {
    "data": "data/movie_reviews.jsonl",
    "prompt": "Best comedy movies in the 90s ",
    "max_length": 64,
    "lora_rank": 8,
    "lora_alpha": 16.0,
    "targets": ("query", "value"),
    "steps": 24,
    "batch_size": 4,
    "sequence_length": 64,
    "learning_rate": 2e-3,
    "warmup_steps": 2,
    "schedule": "cosine",
    "weight_decay": 0.0,
    "precision": "float32",
}


def demo_settings() -> dict[str, Any]:
    """A copy of ``DEMO_SETTINGS`` with ``data`` resolved against the repository (or the working dir)."""
    s = dict(DEMO_SETTINGS)
    for base in (Path(__file__).resolve().parents[2], Path.cwd()):
        p = base / s["data"]
        if p.exists():
            s["data"] = str(p)
            break
    return s


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/inf loss or gradient; the model holds the last good weights.

    ``step`` is the failing step (1-based), ``last_good_step`` the step the weights are from,
    ``checkpoint`` the last good checkpoint's folder (or None) and ``history`` what was recorded so far.
    """

    def __init__(self, message: str, *, step: int, last_good_step: int, checkpoint: str | None,
                 history: History) -> None:
        super().__init__(message)
        self.step = step
        self.last_good_step = last_good_step
        self.checkpoint = checkpoint
        self.history = history


# ---- history ---------------------------------------------------------------------------------------


#: The per-step fields every run records (``History.append``); an objective's own metrics go to ``extra``.
_STEP_KEYS = ("step", "epoch", "loss", "accuracy", "tokens_per_second", "learning_rate", "grad_norm",
              "step_seconds", "target_tokens")


@dataclass
class History:
    """Per-step training metrics (and evaluations), like Keras' ``History`` with more detail.

    ``history`` is the Keras view: ``{"loss": [...], "accuracy": [...], "val_loss": [...], ...}``.
    ``mfu`` is ``flops_per_token * tokens_per_second / peak_flops`` (None when the peak is unknown); the
    first step's throughput includes compilation, so summaries use the median of the others.
    """

    step: list[int] = field(default_factory=list)
    epoch: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    tokens_per_second: list[float] = field(default_factory=list)
    learning_rate: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    target_tokens: list[int] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    #: per step, the metrics a post-training objective adds (e.g. ``rewards/margins``); empty dicts for SFT
    extra: list[dict[str, float]] = field(default_factory=list)
    flops_per_token: float = 0.0
    peak_flops: float | None = None
    tokens_per_step: int = 0
    trainable_params: int = 0
    stopped: str | None = None

    def append(self, rec: dict[str, Any]) -> None:
        self.extra[:0] = [{} for _ in range(len(self.step) - len(self.extra))]  # a history saved without them
        for k in _STEP_KEYS:
            getattr(self, k).append(rec[k])
        self.extra.append({k: v for k, v in rec.items() if k not in _STEP_KEYS})

    def truncate(self, step: int) -> None:
        """Forget records after ``step`` (a resumed run replays them)."""
        keep = [i for i, s in enumerate(self.step) if s <= step]
        extra = [{} for _ in range(len(self.step) - len(self.extra))] + self.extra  # aligned with the steps
        for k in _STEP_KEYS:
            setattr(self, k, [getattr(self, k)[i] for i in keep])
        self.extra = [extra[i] for i in keep]
        self.evals = [e for e in self.evals if e.get("step", 0) <= step]

    @property
    def mfu(self) -> list[float | None]:
        if not self.peak_flops or not self.flops_per_token:
            return [None] * len(self.step)
        return [self.flops_per_token * t / self.peak_flops for t in self.tokens_per_second]

    @property
    def history(self) -> dict[str, list[float]]:
        h: dict[str, list[float]] = {"loss": list(self.loss), "accuracy": list(self.accuracy)}
        for e in self.evals:
            for k, v in e.items():
                if k.startswith("val_"):
                    h.setdefault(k, []).append(v)
        return h

    def median_tokens_per_second(self) -> float:
        tps = self.tokens_per_second[1:] or self.tokens_per_second
        return float(np.median(tps)) if tps else 0.0

    def summary(self) -> dict[str, Any]:
        tps = self.median_tokens_per_second()
        out: dict[str, Any] = {
            "steps": len(self.step), "final_loss": self.loss[-1] if self.loss else None,
            "final_accuracy": self.accuracy[-1] if self.accuracy else None,
            "median_tokens_per_second": tps, "flops_per_token": self.flops_per_token,
            "trainable_params": self.trainable_params, "stopped": self.stopped,
        }
        if self.peak_flops:
            out["mfu"] = self.flops_per_token * tps / self.peak_flops
        if self.evals:
            out["final_eval"] = self.evals[-1]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> History:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def records(self) -> list[dict[str, Any]]:
        """One dict per step (what the metrics JSONL holds), evaluations interleaved at their step."""
        out = []
        mfu = self.mfu
        for i, s in enumerate(self.step):
            out.append({"step": s, "epoch": self.epoch[i], "loss": self.loss[i], "accuracy": self.accuracy[i],
                        "tokens_per_second": self.tokens_per_second[i], "learning_rate": self.learning_rate[i],
                        "grad_norm": self.grad_norm[i], "step_seconds": self.step_seconds[i],
                        "target_tokens": self.target_tokens[i], "mfu": mfu[i],
                        **(self.extra[i] if i < len(self.extra) else {})})
        out.extend(dict(e) for e in self.evals)
        return sorted(out, key=lambda r: (r["step"], "val_loss" in r))


# ---- peak FLOPs (for MFU) ---------------------------------------------------------------------------

#: Dense bf16 peak FLOP/s per device by ``device_kind`` substring (vendor figures, no sparsity).
_PEAK_FLOPS = {
    "h200": 989e12, "h100": 989e12, "a100": 312e12, "l4": 121e12, "a10": 125e12, "v100": 125e12,
    "tpu v6": 918e12, "tpu v5p": 459e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v4": 275e12,
}


def device_peak_flops(device: Any = None) -> float | None:
    """Peak FLOP/s of one device, for MFU: ``GEMMAX_PEAK_FLOPS`` if set, a table for known accelerators, and
    for CPUs an estimate ``cores x clock x FLOPs/cycle`` (32 with AVX2 FMA, 64 with AVX-512; float32). None
    when unknown."""
    env = os.environ.get("GEMMAX_PEAK_FLOPS")
    if env:
        return float(env)
    device = device or jax.devices()[0]
    kind = str(getattr(device, "device_kind", "")).lower()
    for k, v in _PEAK_FLOPS.items():
        if k in kind:
            return v
    if device.platform != "cpu":
        return None
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    ghz, per_cycle = 2.5, 32
    with contextlib.suppress(OSError):
        info = Path("/proc/cpuinfo").read_text()
        mhz = [float(line.split(":")[1]) for line in info.splitlines() if line.startswith("cpu MHz")]
        if mhz:
            ghz = max(mhz) / 1000.0
        if " avx512f" in info:
            per_cycle = 64
    return cores * ghz * 1e9 * per_cycle


# ---- LoRA switch ----------------------------------------------------------------------------------


def enable_lora(lm: Any, rank: int = 4, alpha: float | None = None,
                targets: str | Iterable[str] = ("query", "value"), seed: int = 0) -> int:
    """Add fresh adapters to ``lm.params`` (the next ``fit`` then trains only them); returns their count.

    Adapters are created with the params' sharding when a distribution is active (they follow their kernel).
    """
    params = add_lora(lm.params, lm.linear_nodes, rank=rank, alpha=alpha, targets=targets, seed=seed)
    dist = _dist.distribution()
    if dist is not None:
        shardings = dist.param_shardings(params)
        params = jax.tree_util.tree_map(_dist._put, params, shardings)
    lm.params = params
    return count_trainable(params)


# ---- compiled functions -----------------------------------------------------------------------------


def _loss_sums_fn(family: Any, config: Any, precision: Precision, remat: str | None, chunk_size: int,
                  kernel: str = XLA) -> Callable[..., tuple[jax.Array, dict[str, jax.Array]]]:
    """``(trainable, batch, frozen) -> (sum_loss, {"n_tokens", "n_correct"})``: sums, so that accumulation
    can divide once by all micro-batches' target tokens. ``kernel``: the loss's (``optim.loss_kernel``)."""
    attention = attention_choice(family, precision)

    def loss_sums(trainable: Any, batch: dict[str, jax.Array], frozen: Any) -> tuple[jax.Array, dict]:
        params = merge_trees(trainable, frozen) if frozen else trainable
        params = precision.compute_params(params)  # the bf16 copy lives only inside the step
        inputs = {k: batch[k] for k in family.extra_inputs if k in batch}  # e.g. PaliGemma's pixel_values
        hidden = family.forward_hidden(params, config, batch["tokens"], batch["positions"], batch["segment_ids"],
                                       remat=remat, **inputs, **attention)
        s = lm_loss(params, config, hidden, batch["targets"], batch["loss_mask"], chunk_size=chunk_size,
                    kernel=kernel)
        return s.sum_loss, {"n_tokens": s.n_tokens, "n_correct": s.n_correct}

    return loss_sums


def _make_train_step(family: Any, config: Any, optimizer: optax.GradientTransformation, precision: Precision,
                     remat: str | None, grad_accum: int, chunk_size: int, objective: Any = None,
                     kernel: str = XLA) -> Callable[..., Any]:
    # An objective (gemmax.train.objectives) brings its own loss sums; the step around them is the same.
    if objective is not None:
        loss_sums = objective.loss_sums_fn(family, config, precision, remat, chunk_size, kernel)
    else:
        loss_sums = _loss_sums_fn(family, config, precision, remat, chunk_size, kernel)

    def update(grads: Any, opt_state: Any, trainable: Any) -> tuple[Any, Any]:
        updates, new_opt = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), new_opt

    def step(trainable: Any, opt_state: Any, frozen: Any, batch: dict[str, jax.Array]) -> tuple[Any, Any, dict]:
        loss, grads, aux = accumulate_gradients(loss_sums, trainable, batch, grad_accum, frozen)
        gnorm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        # A bad step leaves the state untouched (the inputs are donated: this is the only place the last good
        # weights still exist). A branch rather than a select per leaf: the update is one pass over each
        # weight's optimizer state instead of a pass per select, each recomputing its part of the update.
        new_params, new_opt = jax.lax.cond(ok, update, lambda g, o, p: (p, o), grads, opt_state, trainable)
        metrics = {**aux, "loss": loss, "grad_norm": gnorm, "ok": ok}
        return new_params, new_opt, metrics

    return step


def _config_key(lm: Any) -> str:
    """A hashable identity of the model's architecture, for the caches of compiled steps."""
    return lm.family.name + json.dumps(lm.config.to_dict(), sort_keys=True, default=str)


def _flops_per_token(config: Any, seq: int) -> float:
    """Training FLOPs per token: the config's own count where it has one, else 6 x parameters."""
    if hasattr(config, "flops_per_token"):
        return float(config.flops_per_token(seq))
    return 6.0 * config.param_count()["total"]


@jax.jit
def _next_key(key: jax.Array, step: int) -> jax.Array:
    return jax.random.fold_in(key, step)


#: Compiled train/eval steps by their settings (most recent last), so repeated calls compile once.
_STEP_CACHE: dict[Any, Any] = {}
_EVAL_CACHE: dict[Any, Any] = {}
_CACHE_SIZE = 8


def _eval_fn(lm: Any, precision: str, chunk_size: int) -> Callable[..., Any]:
    """Jitted ``(params, batch) -> (sum_loss, n_tokens, n_correct)``, cached by config and settings so repeated
    evaluations (e.g. after every epoch) compile once."""
    cache = _EVAL_CACHE
    kernel = loss_kernel()
    key = (_config_key(lm), precision, chunk_size, kernel)
    if key not in cache:
        while len(cache) >= _CACHE_SIZE:
            cache.pop(next(iter(cache)))
        prec = Precision.named(precision)
        loss_sums = _loss_sums_fn(lm.family, lm.config, prec, None, chunk_size, kernel)

        def fn(params: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
            s, aux = loss_sums(params, batch, {})
            return s, aux["n_tokens"], aux["n_correct"]

        cache[key] = jax.jit(fn)
    return cache[key]


# ---- data --------------------------------------------------------------------------------------------


def _as_dataset(lm: Any, data: Any, sequence_length: int, format: str) -> Dataset:
    if isinstance(data, Dataset):
        return data
    if lm.tokenizer is None:
        raise DataError("this model has no tokenizer: pass a gemmax.train.data.Dataset built with one")
    family = lm.family
    encode = None
    if family.encode_prompt is not None:
        def encode(text: str, images: list[Any]) -> tuple[list[int], dict[str, Any]]:
            return family.encode_prompt(lm.config, lm.tokenizer, text, images)
    return Dataset.from_source(data, lm.tokenizer, sequence_length, format=format, encode_prompt=encode,
                               token_inputs=family.token_inputs)


def _commit(tree: Any) -> Any:
    """``tree`` committed to the device its first leaf is on (no copy for arrays already there)."""
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        return tree
    device = next(iter(jnp.asarray(leaves[0]).devices()))
    return jax.device_put(tree, device)


def _place_batch(batch: Any, dist: Any) -> dict[str, jax.Array]:
    """The batch on the devices, split over the mesh's batch axis. A post-training batch may lead with its
    prompt groups (``branches``: a GRPO batch of 2 prompts x 4 completions has 2 groups), which that axis may
    not divide: such arrays go whole to every device, and XLA splits the work where it can."""
    d = batch.as_dict()
    if dist is None:
        return {k: jnp.asarray(v) for k, v in d.items()}
    n = _batch_axis_size(dist)
    split = {k: v for k, v in d.items() if np.ndim(v) == 0 or np.shape(v)[0] % n == 0}
    whole = {k: v for k, v in d.items() if k not in split}
    return {**dist.shard_batch(split), **(dist.replicate_batch(whole) if whole else {})}


def _batch_axis_size(dist: Any) -> int:
    if not dist.batch_dim_name or dist.batch_dim_name not in dist.device_mesh.axis_names:
        return 1
    return dist.device_mesh.axis_size(dist.batch_dim_name)


def _check_batch_axis(dist: Any, batch_size: int, grad_accum: int) -> None:
    if dist is None or _batch_axis_size(dist) == 1:
        return
    n = _batch_axis_size(dist)
    if batch_size % n or (batch_size // grad_accum) % n:
        raise ValueError(f"batch_size={batch_size} with grad_accum={grad_accum} gives micro-batches of "
                         f"{batch_size // grad_accum} rows, which the {n}-way '{dist.batch_dim_name}' mesh "
                         "axis does not divide; use a multiple")


# ---- evaluate ----------------------------------------------------------------------------------------


def evaluate(lm: Any, data: Any, batch_size: int = 4, sequence_length: int = 128, *, format: str = "auto",
             precision: str = "float32", chunk_size: int = 1024, objective: Any = None) -> dict[str, float]:
    """Mean loss, perplexity and token accuracy over every target token of ``data`` (one pass, in order).

    Sums are accumulated over all batches and divided once, so the figures are per *token*, not a mean of
    per-batch means (which would over-weight a short last batch).

    ``objective`` (a post-training objective): its loss and metrics instead (``evaluate_objective``), with
    the reference it would train against *now* — under LoRA the base with the adapters off; without LoRA a
    DPO reference is the current weights, so use ``fit(eval_data=...)`` to score against the starting ones.
    """
    if objective is not None:
        trainable, frozen = split_trainable(lm.params)
        is_lora = bool(jax.tree_util.tree_leaves(trainable))
        if not is_lora:
            trainable, frozen = lm.params, {}
        ds = objective.eval_dataset(lm, data, sequence_length, format, lambda: lm.params, batch_size=batch_size,
                                    is_lora=is_lora, precision=Precision.named(precision))
        return evaluate_objective(lm, objective, ds, trainable, frozen, batch_size=batch_size, precision=precision,
                                  chunk_size=chunk_size)
    ds = _as_dataset(lm, data, sequence_length, format)
    dist = _dist.distribution()
    _check_batch_axis(dist, batch_size, 1)
    fn = _eval_fn(lm, precision, chunk_size)
    params = lm.params
    total = n = correct = 0.0
    for batch in ds.evaluation(batch_size):
        if batch.n_targets == 0:
            continue
        s, t, c = fn(params, _place_batch(batch, dist))
        total += float(s)
        n += float(t)
        correct += float(c)
    if n == 0:
        raise DataError("evaluation data holds no target tokens")
    loss = total / n
    return {"loss": loss, "perplexity": float(math.exp(min(loss, 700.0))), "accuracy": correct / n,
            "tokens": int(n)}


def _objective_eval_fn(lm: Any, objective: Any, precision: str, chunk_size: int) -> Callable[..., Any]:
    """The objective's ``(trainable, batch, frozen) -> (sum, aux)`` jitted without a gradient, cached like
    ``_eval_fn`` so the evaluations of one run (and of identical runs) compile once."""
    kernel = loss_kernel()
    key = ("objective", _config_key(lm), objective.cache_key(), precision, chunk_size, kernel)
    if key not in _EVAL_CACHE:
        while len(_EVAL_CACHE) >= _CACHE_SIZE:
            _EVAL_CACHE.pop(next(iter(_EVAL_CACHE)))
        _EVAL_CACHE[key] = jax.jit(objective.loss_sums_fn(lm.family, lm.config, Precision.named(precision), None,
                                                          chunk_size, kernel))
    return _EVAL_CACHE[key]


#: per-step figures that say nothing about held-out data
_NOT_EVAL_METRICS = ("tokens_per_second", "generation_seconds")


def evaluate_objective(lm: Any, objective: Any, dataset: Any, trainable: Any, frozen: Any, *, batch_size: int,
                       precision: str = "float32", chunk_size: int = 1024) -> dict[str, float]:
    """An objective's loss and metrics over one pass of ``dataset`` (from ``objective.eval_dataset``) with the
    weights ``trainable`` (+ ``frozen`` under LoRA), no update.

    The loss is the summed loss over the summed count (``n_tokens``), as a step with every batch at once
    would report it; each metric is the mean of the batches' ``step_metrics`` weighted by
    ``objective.eval_weight`` (pairs for preferences, completions for GRPO), so a padded last batch counts
    for what it holds.
    """
    dist = _dist.distribution()
    _check_batch_axis(dist, batch_size, 1)
    fn = _objective_eval_fn(lm, objective, precision, chunk_size)
    total = count = weight = 0.0
    sums: dict[str, float] = {}
    for batch in dataset.evaluation(batch_size):
        t0 = time.perf_counter()
        s, aux = fn(trainable, _place_batch(batch, dist), frozen)
        m = jax.device_get(aux)
        total, count = total + float(s), count + float(m["n_tokens"])
        w = objective.eval_weight(m)
        if w <= 0:
            continue
        for k, v in objective.step_metrics(m, batch, time.perf_counter() - t0).items():
            if k not in _NOT_EVAL_METRICS:
                sums[k] = sums.get(k, 0.0) + w * v
        weight += w
    if count == 0:
        raise DataError(f"the evaluation data holds nothing the {objective.name} objective scores")
    return {"loss": total / count, **{k: v / weight for k, v in sums.items()}}


# ---- progress ------------------------------------------------------------------------------------------


class _Progress:
    """A Keras-like bar: ``12/100 ━━━━━──── 00:41<02:58, loss=2.31, acc=0.452, tok/s=1.2k`` (tqdm, stderr)."""

    def __init__(self, enabled: bool, total: int, initial: int) -> None:
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, ascii=" ━",
                            bar_format="{n_fmt}/{total_fmt} {bar:24} {elapsed}<{remaining}{postfix}",
                            file=sys.stderr)

    def update(self, rec: dict[str, Any]) -> None:
        if self.bar is None:
            return
        tps = rec["tokens_per_second"]
        self.bar.set_postfix_str(f"loss: {rec['loss']:.4f} - accuracy: {rec['accuracy']:.4f} - "
                                 + (f"{tps / 1000:.2f}k tok/s" if tps >= 1000 else f"{tps:.0f} tok/s"), refresh=False)
        self.bar.update(1)

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _MetricsFile:
    """JSONL metrics, one line per logged step and per evaluation. A resumed run first drops the lines of
    steps after the checkpoint (they are replayed), so the file always describes one consistent run."""

    def __init__(self, path: str | os.PathLike | None, resume_step: int) -> None:
        self.path = Path(path) if path else None
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept: list[str] = []
        if resume_step > 0 and self.path.exists():
            for line in self.path.read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
        self.path.write_text("".join(k + "\n" for k in kept))

    def write(self, rec: dict[str, Any]) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")


# ---- fit -------------------------------------------------------------------------------------------------


def _is_float(x: Any) -> bool:
    return jnp.issubdtype(x.dtype, jnp.floating)


def _check_options(steps: int | None, epochs: int | None, batch_size: int, grad_accum: int,
                   log_every: int) -> None:
    """Reject contradictory or impossible settings before anything is loaded or compiled."""
    if steps is not None and epochs is not None:
        raise ValueError("give steps= or epochs=, not both")
    if grad_accum < 1 or batch_size % grad_accum:
        raise ValueError(f"batch_size={batch_size} is not divisible by grad_accum={grad_accum}")
    if log_every < 1:
        raise ValueError(f"log_every must be >= 1, got {log_every}")


def _load_data(lm: Any, data: Any, sequence_length: int, format: str) -> tuple[Dataset, int]:
    """The training dataset and its row length, which must fit the model's context."""
    ds = _as_dataset(lm, data, sequence_length, format)
    seq = ds.sequence_length
    if seq > lm.config.max_position_embeddings:
        raise ValueError(f"sequence_length={seq} exceeds the model's context of {lm.config.max_position_embeddings}")
    return ds, seq


@dataclass
class _Schedule:
    """How long the run is: the batch iterator, the total step count, the steps that end each epoch (empty
    when ``steps=`` was given) and the warmup length."""

    iterator: Any
    total_steps: int
    epoch_ends: list[int]
    warmup: int


def _schedule(ds: Dataset, batch_size: int, seed: int, epochs: int | None, steps: int | None,
              warmup_steps: int | None) -> _Schedule:
    """Total steps from the data (``epochs``, default 1) or as given; warmup defaults to 5% of them.

    The step count must be known up front: the learning-rate schedule (and so the compiled step's cache key)
    depends on it.
    """
    iterator = ds.iterator(batch_size, seed=seed, shuffle=True, num_epochs=epochs if steps is None else None)
    if steps is None:
        n_epochs = 1 if epochs is None else int(epochs)
        iterator.num_epochs = n_epochs
        epoch_ends = np.cumsum([iterator.batches_in_epoch(e) for e in range(n_epochs)]).tolist()
        total_steps = int(epoch_ends[-1])
    else:
        total_steps, epoch_ends = int(steps), []
    if total_steps < 1:
        raise ValueError("nothing to train: zero steps")
    warm = max(1, round(0.05 * total_steps)) if warmup_steps is None else int(warmup_steps)
    return _Schedule(iterator, total_steps, epoch_ends, warm)


def _split_params(lm: Any, prec: Precision) -> tuple[Any, Any, bool]:
    """``(trainable, frozen, is_lora)``: only the adapters when the params carry LoRA factors (the base is
    frozen, so it holds no gradients or optimizer state), every weight otherwise. The trainable part is
    returned as master weights of ``prec``."""
    trainable, frozen = split_trainable(lm.params)
    is_lora = bool(jax.tree_util.tree_leaves(trainable))
    if not is_lora:
        trainable, frozen = lm.params, {}
        ints = [p for p, x in jax.tree_util.tree_leaves_with_path(trainable) if not _is_float(x)]
        if ints:
            raise ValueError("the model has integer (quantized) weights, which a full fine-tune cannot update; "
                             "enable LoRA (enable_lora / --lora-rank) to train adapters on the quantized base")
    return prec.master_params(trainable), frozen, is_lora


@dataclass(frozen=True)
class _StepSpec:
    """Every setting the compiled step depends on (besides the model's architecture)."""

    learning_rate: float
    weight_decay: float
    warmup: int
    total_steps: int
    schedule: str
    end_lr_ratio: float
    clip_norm: float | None
    precision: str
    remat: str | None
    grad_accum: int
    chunk_size: int
    is_lora: bool
    objective: Any = None

    def cache_key(self, lm: Any) -> tuple:
        """The ``_STEP_CACHE`` key: the model's architecture and these settings."""
        return (_config_key(lm), float(self.learning_rate), self.weight_decay, self.warmup, self.total_steps,
                self.schedule, self.end_lr_ratio, self.clip_norm, self.precision, self.remat, self.grad_accum,
                self.chunk_size, self.is_lora,
                None if self.objective is None else self.objective.cache_key())


@dataclass
class _Compiled:
    """The compiled pieces of a run: the rate of every step, the optimizer's init and the train step, plus
    ``(trainable, frozen)`` shardings under a distribution (None without one)."""

    lr_table: np.ndarray
    init_fn: Callable[..., Any]
    train_step: Callable[..., Any]
    shardings: tuple[Any, Any] | None = None


def _compiled_step(lm: Any, spec: _StepSpec, prec: Precision, dist: Any, trainable: Any, frozen: Any
                   ) -> _Compiled:
    """Build (or reuse) the jitted optimizer init and train step for ``spec``.

    Identical settings reuse them (a notebook calling fit again, a resumed run, tests); under a distribution
    the step also bakes in output shardings, so it is built afresh and not cached.
    """
    key = spec.cache_key(lm)
    cached = _STEP_CACHE.get(key) if dist is None else None
    if cached is not None:
        return _Compiled(*cached)
    lr_fn = make_schedule(spec.learning_rate, warmup_steps=spec.warmup, total_steps=spec.total_steps,
                          schedule=spec.schedule, end_lr_ratio=spec.end_lr_ratio)
    optimizer = make_optimizer(lr_fn, weight_decay=spec.weight_decay, clip_norm=spec.clip_norm,
                               mu_dtype=prec.mu_dtype)
    # The rate of every step, computed once: eager jnp calls in the loop would each dispatch (and at
    # first compile) tiny kernels.
    lr_table = np.asarray(jax.jit(jax.vmap(lr_fn))(jnp.arange(spec.total_steps + 1)))
    step_fn = _make_train_step(lm.family, lm.config, optimizer, prec, spec.remat, spec.grad_accum, spec.chunk_size,
                               spec.objective, loss_kernel(distributed=dist is not None))
    if dist is not None:
        return _jit_distributed(dist, optimizer, step_fn, lr_table, trainable, frozen, spec.is_lora)
    init_fn = jax.jit(optimizer.init)
    train_step = jax.jit(step_fn, donate_argnums=(0, 1))
    _STEP_CACHE[key] = (lr_table, init_fn, train_step)
    while len(_STEP_CACHE) > _CACHE_SIZE:
        _STEP_CACHE.pop(next(iter(_STEP_CACHE)))
    return _Compiled(lr_table, init_fn, train_step)


def _jit_distributed(dist: Any, optimizer: optax.GradientTransformation, step_fn: Callable[..., Any],
                     lr_table: np.ndarray, trainable: Any, frozen: Any, is_lora: bool) -> _Compiled:
    """Jit init and step with the distribution's layouts: every weight by the layout map, optimizer moments
    following their weight (``shard_like``), metrics replicated; XLA inserts the collectives."""
    full_sh = dist.param_shardings(merge_trees(trainable, frozen) if frozen else trainable)
    tr_sh, fr_sh = split_trainable(full_sh) if is_lora else (full_sh, {})
    opt_sh = _dist.shard_like(jax.eval_shape(optimizer.init, trainable), tr_sh, trainable)
    init_fn = jax.jit(optimizer.init, out_shardings=opt_sh)
    train_step = jax.jit(step_fn, donate_argnums=(0, 1), out_shardings=(tr_sh, opt_sh, dist.replicated()))
    return _Compiled(lr_table, init_fn, train_step, (tr_sh, fr_sh))


@dataclass
class _RunState:
    """What a step advances and a checkpoint holds, plus the frozen base the step reads.

    Kept in one object so the loop, the checkpoint writer, evaluation and the ``finally`` that hands the
    weights back to ``lm`` all see the latest values: the step's inputs are donated, so a stale reference
    would be a deleted buffer.
    """

    trainable: Any
    frozen: Any
    opt_state: Any
    rng: jax.Array
    history: History
    step: int = 0
    last_saved: int | None = None
    #: The frozen base as the step reads it: under LoRA with a compute dtype narrower than the weights
    #: (``mixed_bfloat16``) a copy cast once, so that no step converts the whole base again (on the 270M a
    #: tenth of a step); ``frozen`` keeps the weights as they are, for ``params()``.
    step_frozen: Any = None

    def params(self) -> Any:
        """The full parameter tree (adapters merged back onto the frozen base)."""
        return merge_trees(self.trainable, self.frozen) if self.frozen else self.trainable


def _initial_state(lm: Any, compiled: _Compiled, trainable: Any, frozen: Any, *, seq: int, batch_size: int,
                   peak_flops: float | None, seed: int, prec: Precision) -> _RunState:
    """Place the weights (under a distribution), initialise the optimizer and start an empty history."""
    if compiled.shardings is not None:
        tr_sh, fr_sh = compiled.shardings
        trainable = jax.tree_util.tree_map(_dist._put, trainable, tr_sh)
        frozen = jax.tree_util.tree_map(_dist._put, frozen, fr_sh)
    opt_state = compiled.init_fn(trainable)
    if compiled.shardings is None:
        # Committed to their device, as every later step's outputs are: jit compiles per committedness, so
        # uncommitted weights or optimizer state (fresh adapters, the step count init makes) would compile
        # the whole step a second time at step 2 (measured: 8 s more per fit of a tiny Gemma 4).
        trainable, opt_state = _commit((trainable, opt_state))
    history = History(flops_per_token=_flops_per_token(lm.config, seq),
                      peak_flops=peak_flops if peak_flops is not None else device_peak_flops(),
                      tokens_per_step=batch_size * seq,
                      trainable_params=sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(trainable)))
    return _RunState(trainable, frozen, opt_state, jax.random.key(seed), history,
                     step_frozen=prec.compute_params(frozen) if frozen else frozen)


def _resume(manager: CheckpointManager, state: _RunState, iterator: Any) -> None:
    """Continue from the newest checkpoint, if any: weights, optimizer state, RNG key, data position and
    the history up to that step (later records are replayed) — bit-for-bit an uninterrupted run."""
    latest = manager.latest_step()
    if latest is None:
        return
    restored = manager.restore(latest, target={"params": state.trainable, "opt_state": state.opt_state})
    state.trainable, state.opt_state = restored["params"], restored["opt_state"]
    if restored["rng"] is not None:
        state.rng = restored["rng"]
    if restored["data_state"]:
        iterator.restore(restored["data_state"])
    extra = restored.get("extra") or {}
    if extra.get("history"):
        state.history = History.from_dict({**extra["history"], "peak_flops": state.history.peak_flops})
        state.history.truncate(latest)
    state.step = latest
    state.last_saved = latest if latest else None


def _announce(progress: bool, state: _RunState, sched: _Schedule, checkpoint_dir: Any, *, is_lora: bool,
              ds: Dataset, batch_size: int, seq: int) -> None:
    """Say what is trained (a fresh run, when showing progress) or where a resumed run continues; printed
    before the bar exists so it stays above it."""
    bar = _Progress(False, sched.total_steps, state.step)
    if progress and state.step == 0:
        bar.write(f"Training {'LoRA adapters' if is_lora else 'all weights'}: {state.history.trainable_params:,} "
                  f"params; data: {ds.report()}; {sched.total_steps} steps of {batch_size}x{seq} tokens")
    elif state.step:
        bar.write(f"Resumed from {checkpoint_dir} at step {state.step}/{sched.total_steps}")


@dataclass
class _Run:
    """The step loop of one ``fit`` call and its bookkeeping (metrics, evaluation, checkpoints, callbacks)."""

    lm: Any
    state: _RunState
    sched: _Schedule
    compiled: _Compiled
    dist: Any
    manager: CheckpointManager | None
    metrics_file: _MetricsFile
    bar: _Progress
    batch_size: int
    seq: int
    progress: bool
    log_every: int
    save_every: int | None
    eval_data: Any
    eval_every: int | None
    format: str
    chunk_size: int
    callbacks: Sequence[Callable[[int, dict[str, Any]], Any]]
    objective: Any = None
    eval_set: Any = None
    precision: str = "float32"

    def train(self) -> History:
        """Step until the schedule ends or a callback stops it, then evaluate and checkpoint the end state.

        Whatever happens, ``lm`` gets the latest weights back and the checkpoint manager is closed.
        """
        s = self.state
        try:
            while s.step < self.sched.total_steps:
                rec = self._step()
                if rec is None:  # pragma: no cover - total_steps is derived from the same iterator
                    break
                self._bookkeep(rec)
                if self._callbacks_stop(rec):
                    s.history.stopped = f"stopped by a callback at step {s.step}"
                    break
            if self.eval_data is not None and (not s.history.evals or s.history.evals[-1]["step"] != s.step):
                self._evaluate(s.step)
            if self.manager is not None and s.last_saved != s.step and s.step > 0:
                self._save(s.step, force=True)
                s.last_saved = s.step
        finally:
            self.bar.close()
            self.lm.params = s.params()
            if self.manager is not None:
                self.manager.close()
        return s.history

    def _step(self) -> dict[str, Any] | None:
        """Run one optimizer step and record it; None when the data ran out. A non-finite step raises."""
        s, it = self.state, self.sched.iterator
        data_before = it.state()
        try:
            batch = next(it)
        except StopIteration:  # pragma: no cover - total_steps is derived from the same iterator
            return None
        except Exception:
            # the batch could not be made (e.g. an objective's reward function raised): keep what was
            # trained so far, positioned before that batch, then let the error name the problem
            if self.manager is not None and s.last_saved != s.step and s.step > 0:
                self._save(s.step, force=True, data_state=data_before)
                s.last_saved = s.step
            raise
        epoch = it.epoch
        t0 = time.perf_counter()
        new_tr, new_opt, m = self.compiled.train_step(s.trainable, s.opt_state, s.step_frozen,
                                                      _place_batch(batch, self.dist))
        m = jax.device_get(m)
        dt = time.perf_counter() - t0
        s.trainable, s.opt_state = new_tr, new_opt
        loss, gnorm = float(m["loss"]), float(m["grad_norm"])
        if not bool(m["ok"]):
            self._stop_non_finite(loss, gnorm, data_before)
        s.rng = _next_key(s.rng, s.step)  # per-step key, kept in checkpoints for stochastic layers
        s.step += 1
        n_tok = float(m["n_tokens"])
        rec = {"step": s.step, "epoch": epoch, "loss": loss, "accuracy": float(m["n_correct"]) / max(n_tok, 1.0),
               "tokens_per_second": self.batch_size * self.seq / dt,
               "learning_rate": float(self.compiled.lr_table[s.step - 1]),
               "grad_norm": gnorm, "step_seconds": dt, "target_tokens": int(n_tok)}
        if self.objective is not None:
            rec.update(self.objective.step_metrics(m, batch, dt))
        s.history.append(rec)
        self.bar.update(rec)
        return rec

    def _stop_non_finite(self, loss: float, gnorm: float, data_before: dict[str, int]) -> NoReturn:
        """Stop with ``NonFiniteLossError``. The compiled step did not apply the update, so the state is still
        the one after the previous step: checkpoint it (positioned at the bad batch) and name it."""
        s, step = self.state, self.state.step
        what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {gnorm}"
        s.history.stopped = f"non-finite at step {step + 1}: {what}"
        ckpt = None
        if self.manager is not None:
            if s.last_saved != step and step > 0:
                self._save(step, force=True, data_state=data_before)
            self.manager.wait_until_finished()
            good = self.manager.latest_step()
            ckpt = str(Path(self.manager.directory) / str(good)) if good is not None else None
        lr_now = float(self.compiled.lr_table[step])
        raise NonFiniteLossError(
            f"training stopped at step {step + 1}/{self.sched.total_steps}: {what} (learning rate {lr_now:.3g}). "
            f"The update was not applied: the model keeps the weights after step {step}"
            + (f"; last good checkpoint: {ckpt}" if ckpt else "")
            + ". Lower the learning rate, enable clipping, or check the data around this step.",
            step=step + 1, last_good_step=step, checkpoint=ckpt, history=s.history)

    def _bookkeep(self, rec: dict[str, Any]) -> None:
        """After a step: log it, summarise a finished epoch, evaluate and checkpoint when due (the last step's
        evaluation and checkpoint are left to the end of ``train``)."""
        step, total, ends = self.state.step, self.sched.total_steps, self.sched.epoch_ends
        if step % self.log_every == 0 or step == total:
            self.metrics_file.write({**rec, "mfu": self.state.history.mfu[-1]})
        if ends and step in ends:
            self._epoch_summary(ends.index(step))
            if self.eval_data is not None and step != total:
                self._evaluate(step)
        elif self.eval_data is not None and self.eval_every and step % self.eval_every == 0 and step != total:
            self._evaluate(step)
        if self.manager is not None and self.save_every and step % self.save_every == 0 and step != total:
            self._save(step)
            self.state.last_saved = step

    def _epoch_summary(self, e: int) -> None:
        """Keras-style line for epoch ``e``: mean loss and accuracy, median throughput."""
        h = self.state.history
        idx = [i for i, ep in enumerate(h.epoch) if ep == e]
        if self.progress and idx:
            self.bar.write(f"Epoch {e + 1}/{len(self.sched.epoch_ends)} - loss: {np.mean([h.loss[i] for i in idx]):.4f}"
                           f" - accuracy: {np.mean([h.accuracy[i] for i in idx]):.4f} - "
                           f"{np.median([h.tokens_per_second[i] for i in idx]):.0f} tok/s")

    def _callbacks_stop(self, rec: dict[str, Any]) -> bool:
        """Call every callback (all of them, even after one asks to stop); True when any returned False."""
        stop = False
        for cb in self.callbacks:
            if cb(self.state.step, rec) is False:
                stop = True
        return stop

    def _save(self, step: int, force: bool = False, data_state: dict[str, int] | None = None) -> None:
        """Checkpoint the current state (and the history so far) as ``step``."""
        if self.manager is None:
            return
        s = self.state
        self.manager.save(step, params=s.trainable, opt_state=s.opt_state, rng=s.rng,
                          data_state=data_state or self.sched.iterator.state(),
                          metrics=({"loss": s.history.loss[-1]} if s.history.loss else {}),
                          extra={"history": s.history.to_dict(), "total_steps": self.sched.total_steps},
                          force=force)

    def _evaluate(self, step: int) -> None:
        """Evaluate the current weights on ``eval_data`` and record it (history, metrics file, progress)."""
        if self.objective is not None:
            self._evaluate_objective(step)
            return
        self.lm.params = self.state.params()
        ev = evaluate(self.lm, self.eval_data, self.batch_size, self.seq, format=self.format,
                      chunk_size=self.chunk_size)
        rec = {"step": step, "val_loss": ev["loss"], "val_perplexity": ev["perplexity"],
               "val_accuracy": ev["accuracy"], "val_tokens": ev["tokens"]}
        self.state.history.evals.append(rec)
        self.metrics_file.write(rec)
        self.bar.write(f"step {step}: val_loss {ev['loss']:.4f} - val_perplexity {ev['perplexity']:.2f} - "
                       f"val_accuracy {ev['accuracy']:.4f}")

    def _evaluate_objective(self, step: int) -> None:
        """The objective's loss and metrics on the held-out set, as ``val_loss`` and ``val_<metric>``."""
        s = self.state
        ev = evaluate_objective(self.lm, self.objective, self.eval_set, s.trainable, s.step_frozen,
                                batch_size=self.batch_size, precision=self.precision, chunk_size=self.chunk_size)
        rec = {"step": step, "val_loss": ev.pop("loss"), **{f"val_{k}": v for k, v in ev.items()}}
        s.history.evals.append(rec)
        self.metrics_file.write(rec)
        shown = [k for k in ("rewards/accuracies", "rewards/margins", "reward") if k in ev]
        self.bar.write(f"step {step}: val_loss {rec['val_loss']:.4f}"
                       + "".join(f" - val_{k} {ev[k]:.4f}" for k in shown))


def fit(
    lm: Any,
    data: Any,
    *,
    # how long, on what batches
    epochs: int | None = None, steps: int | None = None, batch_size: int = 4, sequence_length: int = 128,
    # the optimizer and its schedule (make_optimizer's)
    learning_rate: float = 1e-4, weight_decay: float = 0.01, warmup_steps: int | None = None,
    schedule: str = "cosine", end_lr_ratio: float = 0.0, clip_norm: float | None = 1.0,
    # how a step computes
    grad_accum: int = 1, precision: str = "float32", remat: str | None = None, chunk_size: int = 1024,
    # checkpoints and resuming; the run's seed (data order, random key)
    checkpoint_dir: str | os.PathLike | None = None, save_every: int | None = 100, keep: int | None = 3,
    resume: bool = True, seed: int = 0,
    # logging and evaluation
    log_every: int = 1, metrics_path: str | os.PathLike | None = None, progress: bool = True,
    eval_data: Any = None, eval_every: int | None = None,
    format: str = "auto",
    callbacks: Sequence[Callable[[int, dict[str, Any]], Any]] = (),
    peak_flops: float | None = None,
    objective: Any = None,
) -> History:
    """Train ``lm.params`` in place on ``data`` and return the per-step ``History``.

    ``data``: a path, a list of records/strings, or a ``gemmax.train.data.Dataset`` (see ``Dataset.from_source``;
    ``format`` picks text / prompt_completion / chat). Give ``steps`` (optimizer steps) or ``epochs``
    (default 1 epoch). ``batch_size`` rows of ``sequence_length`` tokens per optimizer step, split into
    ``grad_accum`` micro-batches whose gradients are combined as the mean over all their target tokens.

    When ``lm.params`` carry LoRA adapters only they are trained. ``precision``: "float32", "mixed_bfloat16"
    (float32 master weights, bfloat16 compute) or "bfloat16". ``remat``: None, "full" or "dots".
    ``warmup_steps`` defaults to 5% of the steps.

    ``checkpoint_dir``: save every ``save_every`` steps and at the end (atomic, ``keep`` newest); with
    ``resume`` an existing checkpoint there is restored first and training continues exactly where it
    stopped (same data order, optimizer state and schedule). ``metrics_path``: JSONL, one line per
    ``log_every`` steps plus evaluations. ``eval_data``: evaluated after each epoch (``epochs=``) or every
    ``eval_every`` steps, and at the end. ``callbacks``: ``fn(step, record)`` after every step; returning
    ``False`` stops training early (an exception propagates after the state is saved back to ``lm``).

    Raises ``NonFiniteLossError`` when a loss or gradient is NaN/inf: the failing update is not applied,
    ``lm.params`` keep the last good weights and (with ``checkpoint_dir``) the last good state is saved.

    ``objective``: a post-training objective (``gemmax.train.objectives``: DPO, SimPO, ORPO, distillation,
    GRPO) that reads ``data`` itself and brings its own loss; the loop, optimizer, checkpoints and resume are
    the same. None is next-token fine-tuning. With an objective, ``eval_data`` is read and prepared as
    ``data`` and scored with the objective's loss and metrics (``val_loss``, ``val_rewards/accuracies``...).
    """
    _check_options(steps, epochs, batch_size, grad_accum, log_every)
    if objective is not None:
        ds, seq = objective.load(lm, data, sequence_length, format)
    else:
        ds, seq = _load_data(lm, data, sequence_length, format)
    prec = Precision.named(precision)
    dist = _dist.distribution()
    _check_batch_axis(dist, batch_size, grad_accum)
    sched = _schedule(ds, batch_size, seed, epochs, steps, warmup_steps)
    trainable, frozen, is_lora = _split_params(lm, prec)
    live: dict[str, _RunState] = {}
    eval_set = None
    if objective is not None:
        # Before compiling (the objective may choose its loss's inputs) and before a resume replaces the
        # weights (a precomputed reference comes from the starting ones); the callable gives the policy's
        # current weights once training runs (GRPO samples with them). Held-out data is prepared alike.
        def params_fn() -> Any:
            return live["state"].params() if "state" in live else lm.params

        objective.prepare(lm, ds, params_fn, batch_size=batch_size, is_lora=is_lora, precision=prec)
        if eval_data is not None:
            eval_set = objective.eval_dataset(lm, eval_data, seq, format, params_fn, batch_size=batch_size,
                                              is_lora=is_lora, precision=prec)
    spec = _StepSpec(learning_rate, weight_decay, sched.warmup, sched.total_steps, schedule, end_lr_ratio,
                     clip_norm, precision, remat, grad_accum, chunk_size, is_lora, objective)
    compiled = _compiled_step(lm, spec, prec, dist, trainable, frozen)
    state = _initial_state(lm, compiled, trainable, frozen, seq=seq, batch_size=batch_size,
                           peak_flops=peak_flops, seed=seed, prec=prec)
    live["state"] = state
    manager = None
    if checkpoint_dir is not None:
        manager = CheckpointManager(checkpoint_dir, keep=keep, save_interval_steps=1)
        if resume:
            _resume(manager, state, sched.iterator)
    metrics_file = _MetricsFile(metrics_path, state.step)
    _announce(progress, state, sched, checkpoint_dir, is_lora=is_lora, ds=ds, batch_size=batch_size, seq=seq)
    bar = _Progress(progress, sched.total_steps, state.step)
    run = _Run(lm, state, sched, compiled, dist, manager, metrics_file, bar, batch_size=batch_size, seq=seq,
               progress=progress, log_every=log_every, save_every=save_every, eval_data=eval_data,
               eval_every=eval_every, format=format, chunk_size=chunk_size, callbacks=callbacks,
               objective=objective, eval_set=eval_set, precision=precision)
    return run.train()


# ---- loss-curve plot -------------------------------------------------------------------------------------


def _load_records(source: Any) -> list[dict[str, Any]]:
    if isinstance(source, History):
        return source.records()
    if isinstance(source, (str, os.PathLike)):
        out = []
        for line in Path(source).read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                if line.strip():
                    out.append(json.loads(line))
        return out
    return [dict(r) for r in source]


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw), default=10 * mag)
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 1)]


def plot_loss(history_or_jsonl: Any, png_path: str | os.PathLike, *, title: str = "Training loss",
              size: tuple[int, int] = (900, 540)) -> Path:
    """Draw the loss curve (per-step loss, a smoothed line, and evaluation losses as dots) to a PNG.

    Accepts a ``History``, a metrics JSONL path (as ``fit(metrics_path=...)`` writes) or a list of records.
    Pure Pillow, so plotting adds no dependency.
    """
    from PIL import Image, ImageDraw, ImageFont

    recs = _load_records(history_or_jsonl)
    train = [(r["step"], r["loss"]) for r in recs if "loss" in r and r["loss"] is not None
             and math.isfinite(r["loss"])]
    val = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r and math.isfinite(r["val_loss"])]
    if not train and not val:
        raise ValueError("no loss values to plot")
    w, h = size
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    try:
        font = ImageFont.load_default(size=14)
    except TypeError:  # pragma: no cover - Pillow < 10.1
        font = ImageFont.load_default()
    left, right, top, bottom = 80, 30, 45, 60
    pts = train + val
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1 = min(xs), max(xs)
    x1 = x1 if x1 > x0 else x0 + 1
    y_lo, y_hi = min(ys), max(ys)
    pad = 0.05 * (y_hi - y_lo or 1.0)
    y0, y1 = y_lo - pad, y_hi + pad

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (w - left - right),
                top + (1 - (y - y0) / (y1 - y0)) * (h - top - bottom))

    for t in _nice_ticks(y0, y1):
        _, yy = px(x0, t)
        d.line([(left, yy), (w - right, yy)], fill=(230, 230, 230))
        d.text((left - 8, yy), f"{t:.3g}", fill="black", font=font, anchor="rm")
    for t in _nice_ticks(x0, x1, 6):
        if t != int(t):
            continue
        xx, _ = px(t, y0)
        d.line([(xx, top), (xx, h - bottom)], fill=(240, 240, 240))
        d.text((xx, h - bottom + 8), str(int(t)), fill="black", font=font, anchor="mt")
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    if len(train) > 1:
        d.line([px(x, y) for x, y in train], fill=(160, 190, 230), width=1)
        ema, smooth = train[0][1], []
        alpha = 2 / (1 + max(2, min(50, len(train) // 10)))
        for x, y in train:
            ema = alpha * y + (1 - alpha) * ema
            smooth.append(px(x, ema))
        d.line(smooth, fill=(20, 80, 180), width=3)
    elif train:
        cx, cy = px(*train[0])
        d.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=(20, 80, 180))
    for x, y in val:
        cx, cy = px(x, y)
        d.ellipse([cx - 5, cy - 5, cx + 5, cy + 5], fill=(220, 90, 30))
    d.text((w / 2, 14), title, fill="black", font=font, anchor="mt")
    d.text((w / 2, h - 22), "step", fill="black", font=font, anchor="mt")
    d.text((10, top - 28), "loss", fill="black", font=font)
    legend = [("train (smoothed)", (20, 80, 180))] + ([("eval", (220, 90, 30))] if val else [])
    lx = w - right - 170
    for i, (name, col) in enumerate(legend):
        yy = top + 12 + 20 * i
        d.line([(lx, yy), (lx + 24, yy)], fill=col, width=3)
        d.text((lx + 30, yy), name, fill="black", font=font, anchor="lm")
    out = Path(png_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    return out
