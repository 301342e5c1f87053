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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gemmax import distribution as _dist
from gemmax.nn.lora import add_lora, count_trainable, merge_trees, split_trainable
from gemmax.train.checkpoint import CheckpointManager
from gemmax.train.data import DataError, Dataset
from gemmax.train.losses import lm_loss
from gemmax.train.optim import Precision, accumulate_gradients, make_optimizer, make_schedule

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
    flops_per_token: float = 0.0
    peak_flops: float | None = None
    tokens_per_step: int = 0
    trainable_params: int = 0
    stopped: str | None = None

    def append(self, rec: dict[str, Any]) -> None:
        for k in ("step", "epoch", "loss", "accuracy", "tokens_per_second", "learning_rate", "grad_norm",
                  "step_seconds", "target_tokens"):
            getattr(self, k).append(rec[k])

    def truncate(self, step: int) -> None:
        """Forget records after ``step`` (a resumed run replays them)."""
        keep = [i for i, s in enumerate(self.step) if s <= step]
        for k in ("step", "epoch", "loss", "accuracy", "tokens_per_second", "learning_rate", "grad_norm",
                  "step_seconds", "target_tokens"):
            setattr(self, k, [getattr(self, k)[i] for i in keep])
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
                        "target_tokens": self.target_tokens[i], "mfu": mfu[i]})
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


def _loss_sums_fn(family: Any, config: Any, precision: Precision, remat: str | None, chunk_size: int
                  ) -> Callable[..., tuple[jax.Array, dict[str, jax.Array]]]:
    """``(trainable, batch, frozen) -> (sum_loss, {"n_tokens", "n_correct"})``: sums, so that accumulation
    can divide once by all micro-batches' target tokens."""

    def loss_sums(trainable: Any, batch: dict[str, jax.Array], frozen: Any) -> tuple[jax.Array, dict]:
        params = merge_trees(trainable, frozen) if frozen else trainable
        params = precision.compute_params(params)  # the bf16 copy lives only inside the step
        inputs = {k: batch[k] for k in family.extra_inputs if k in batch}  # e.g. PaliGemma's pixel_values
        hidden = family.forward_hidden(params, config, batch["tokens"], batch["positions"], batch["segment_ids"],
                                       remat=remat, **inputs)
        s = lm_loss(params, config, hidden, batch["targets"], batch["loss_mask"], chunk_size=chunk_size)
        return s.sum_loss, {"n_tokens": s.n_tokens, "n_correct": s.n_correct}

    return loss_sums


def _make_train_step(family: Any, config: Any, optimizer: optax.GradientTransformation, precision: Precision,
                     remat: str | None, grad_accum: int, chunk_size: int) -> Callable[..., Any]:
    loss_sums = _loss_sums_fn(family, config, precision, remat, chunk_size)

    def step(trainable: Any, opt_state: Any, frozen: Any, batch: dict[str, jax.Array]) -> tuple[Any, Any, dict]:
        loss, grads, aux = accumulate_gradients(loss_sums, trainable, batch, grad_accum, frozen)
        gnorm = optax.tree.norm(grads)
        updates, new_opt = optimizer.update(grads, opt_state, trainable)
        new_params = optax.apply_updates(trainable, updates)
        ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)

        def keep(new: jax.Array, old: jax.Array) -> jax.Array:
            # A bad step must leave the state untouched: the inputs are donated, so this select is the only
            # place the last good weights still exist.
            return jnp.where(ok, new, old)

        new_params = jax.tree_util.tree_map(keep, new_params, trainable)
        new_opt = jax.tree_util.tree_map(keep, new_opt, opt_state)
        metrics = {"loss": loss, "n_tokens": aux["n_tokens"], "n_correct": aux["n_correct"],
                   "grad_norm": gnorm, "ok": ok}
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
    key = (_config_key(lm), precision, chunk_size)
    if key not in cache:
        while len(cache) >= _CACHE_SIZE:
            cache.pop(next(iter(cache)))
        prec = Precision.named(precision)
        loss_sums = _loss_sums_fn(lm.family, lm.config, prec, None, chunk_size)

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
    return Dataset.from_source(data, lm.tokenizer, sequence_length, format=format)


def _place_batch(batch: Any, dist: Any) -> dict[str, jax.Array]:
    d = batch.as_dict()
    if dist is None:
        return {k: jnp.asarray(v) for k, v in d.items()}
    return dist.shard_batch(d)


def _check_batch_axis(dist: Any, batch_size: int, grad_accum: int) -> None:
    if dist is None or not dist.batch_dim_name or dist.batch_dim_name not in dist.device_mesh.axis_names:
        return
    n = dist.device_mesh.axis_size(dist.batch_dim_name)
    if batch_size % n or (batch_size // grad_accum) % n:
        raise ValueError(f"batch_size={batch_size} with grad_accum={grad_accum} gives micro-batches of "
                         f"{batch_size // grad_accum} rows, which the {n}-way '{dist.batch_dim_name}' mesh "
                         "axis does not divide; use a multiple")


# ---- evaluate ----------------------------------------------------------------------------------------


def evaluate(lm: Any, data: Any, batch_size: int = 4, sequence_length: int = 128, *, format: str = "auto",
             precision: str = "float32", chunk_size: int = 1024) -> dict[str, float]:
    """Mean loss, perplexity and token accuracy over every target token of ``data`` (one pass, in order).

    Sums are accumulated over all batches and divided once, so the figures are per *token*, not a mean of
    per-batch means (which would over-weight a short last batch).
    """
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


def fit(
    lm: Any,
    data: Any,
    *,
    epochs: int | None = None,
    steps: int | None = None,
    batch_size: int = 4,
    sequence_length: int = 128,
    learning_rate: float = 1e-4,
    weight_decay: float = 0.01,
    warmup_steps: int | None = None,
    schedule: str = "cosine",
    end_lr_ratio: float = 0.0,
    clip_norm: float | None = 1.0,
    grad_accum: int = 1,
    precision: str = "float32",
    remat: str | None = None,
    chunk_size: int = 1024,
    checkpoint_dir: str | os.PathLike | None = None,
    save_every: int | None = 100,
    keep: int | None = 3,
    resume: bool = True,
    seed: int = 0,
    log_every: int = 1,
    metrics_path: str | os.PathLike | None = None,
    progress: bool = True,
    eval_data: Any = None,
    eval_every: int | None = None,
    format: str = "auto",
    callbacks: Sequence[Callable[[int, dict[str, Any]], Any]] = (),
    peak_flops: float | None = None,
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
    """
    if steps is not None and epochs is not None:
        raise ValueError("give steps= or epochs=, not both")
    if grad_accum < 1 or batch_size % grad_accum:
        raise ValueError(f"batch_size={batch_size} is not divisible by grad_accum={grad_accum}")
    if log_every < 1:
        raise ValueError(f"log_every must be >= 1, got {log_every}")
    config = lm.config
    ds = _as_dataset(lm, data, sequence_length, format)
    seq = ds.sequence_length
    if seq > config.max_position_embeddings:
        raise ValueError(f"sequence_length={seq} exceeds the model's context of {config.max_position_embeddings}")
    prec = Precision.named(precision)
    dist = _dist.distribution()
    _check_batch_axis(dist, batch_size, grad_accum)

    # -- schedule: total steps from the data (epochs) or as given
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

    # -- what is trained
    trainable, frozen = split_trainable(lm.params)
    is_lora = bool(jax.tree_util.tree_leaves(trainable))
    if not is_lora:
        trainable, frozen = lm.params, {}
        ints = [p for p, x in jax.tree_util.tree_leaves_with_path(trainable) if not _is_float(x)]
        if ints:
            raise ValueError("the model has integer (quantized) weights, which a full fine-tune cannot update; "
                             "enable LoRA (enable_lora / --lora-rank) to train adapters on the quantized base")
    trainable = prec.master_params(trainable)

    # -- the compiled pieces. Identical settings reuse them (a notebook calling fit again, a resumed run,
    # tests); under a distribution the step also bakes in output shardings, so it is built afresh.
    key = (_config_key(lm), float(learning_rate), weight_decay, warm, total_steps, schedule, end_lr_ratio,
           clip_norm, precision, remat, grad_accum, chunk_size, is_lora)
    cached = _STEP_CACHE.get(key) if dist is None else None
    if cached is None:
        lr_fn = make_schedule(learning_rate, warmup_steps=warm, total_steps=total_steps,
                              schedule=schedule, end_lr_ratio=end_lr_ratio)
        optimizer = make_optimizer(lr_fn, weight_decay=weight_decay, clip_norm=clip_norm,
                                   mu_dtype=prec.mu_dtype)
        # The rate of every step, computed once: eager jnp calls in the loop would each dispatch (and at
        # first compile) tiny kernels.
        lr_table = np.asarray(jax.jit(jax.vmap(lr_fn))(jnp.arange(total_steps + 1)))
        step_fn = _make_train_step(lm.family, config, optimizer, prec, remat, grad_accum, chunk_size)
        if dist is not None:
            full_sh = dist.param_shardings(merge_trees(trainable, frozen) if frozen else trainable)
            tr_sh, fr_sh = split_trainable(full_sh) if is_lora else (full_sh, {})
            opt_sh = _dist.shard_like(jax.eval_shape(optimizer.init, trainable), tr_sh, trainable)
            init_fn = jax.jit(optimizer.init, out_shardings=opt_sh)
            train_step = jax.jit(step_fn, donate_argnums=(0, 1), out_shardings=(tr_sh, opt_sh, dist.replicated()))
        else:
            init_fn = jax.jit(optimizer.init)
            train_step = jax.jit(step_fn, donate_argnums=(0, 1))
            _STEP_CACHE[key] = (lr_table, init_fn, train_step)
            while len(_STEP_CACHE) > _CACHE_SIZE:
                _STEP_CACHE.pop(next(iter(_STEP_CACHE)))
    else:
        lr_table, init_fn, train_step = cached

    # -- where it lives
    if dist is not None:
        trainable = jax.tree_util.tree_map(_dist._put, trainable, tr_sh)
        frozen = jax.tree_util.tree_map(_dist._put, frozen, fr_sh)
    opt_state = init_fn(trainable)

    history = History(flops_per_token=_flops_per_token(config, seq),
                      peak_flops=peak_flops if peak_flops is not None else device_peak_flops(),
                      tokens_per_step=batch_size * seq,
                      trainable_params=sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(trainable)))
    rng = jax.random.key(seed)
    start_step = 0

    # -- resume
    manager = None
    if checkpoint_dir is not None:
        manager = CheckpointManager(checkpoint_dir, keep=keep, save_interval_steps=1)
        latest = manager.latest_step() if resume else None
        if latest is not None:
            state = manager.restore(latest, target={"params": trainable, "opt_state": opt_state})
            trainable, opt_state = state["params"], state["opt_state"]
            if state["rng"] is not None:
                rng = state["rng"]
            if state["data_state"]:
                iterator.restore(state["data_state"])
            extra = state.get("extra") or {}
            if extra.get("history"):
                history = History.from_dict({**extra["history"], "peak_flops": history.peak_flops})
                history.truncate(latest)
            start_step = latest

    metrics_file = _MetricsFile(metrics_path, start_step)
    bar = _Progress(False, total_steps, start_step)
    if progress and start_step == 0:
        bar.write(f"Training {'LoRA adapters' if is_lora else 'all weights'}: {history.trainable_params:,} "
                  f"params; data: {ds.report()}; {total_steps} steps of {batch_size}x{seq} tokens")
    elif start_step:
        bar.write(f"Resumed from {checkpoint_dir} at step {start_step}/{total_steps}")
    bar = _Progress(progress, total_steps, start_step)

    def save(step: int, force: bool = False, data_state: dict[str, int] | None = None) -> None:
        if manager is None:
            return
        manager.save(step, params=trainable, opt_state=opt_state, rng=rng,
                     data_state=data_state or iterator.state(),
                     metrics=({"loss": history.loss[-1]} if history.loss else {}),
                     extra={"history": history.to_dict(), "total_steps": total_steps}, force=force)

    def run_eval(step: int) -> None:
        lm.params = merge_trees(trainable, frozen) if frozen else trainable
        ev = evaluate(lm, eval_data, batch_size, seq, format=format, chunk_size=chunk_size)
        rec = {"step": step, "val_loss": ev["loss"], "val_perplexity": ev["perplexity"],
               "val_accuracy": ev["accuracy"], "val_tokens": ev["tokens"]}
        history.evals.append(rec)
        metrics_file.write(rec)
        bar.write(f"step {step}: val_loss {ev['loss']:.4f} - val_perplexity {ev['perplexity']:.2f} - "
                  f"val_accuracy {ev['accuracy']:.4f}")

    step = start_step
    last_saved = start_step if manager is not None and start_step else None
    try:
        while step < total_steps:
            data_before = iterator.state()
            try:
                batch = next(iterator)
            except StopIteration:  # pragma: no cover - total_steps is derived from the same iterator
                break
            epoch = iterator.epoch
            t0 = time.perf_counter()
            new_tr, new_opt, m = train_step(trainable, opt_state, frozen, _place_batch(batch, dist))
            m = jax.device_get(m)
            dt = time.perf_counter() - t0
            trainable, opt_state = new_tr, new_opt
            loss, gnorm = float(m["loss"]), float(m["grad_norm"])
            if not bool(m["ok"]):
                what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {gnorm}"
                history.stopped = f"non-finite at step {step + 1}: {what}"
                ckpt = None
                if manager is not None:
                    if last_saved != step and step > 0:
                        # the state before the bad step is good: keep it, positioned at the bad batch
                        save(step, force=True, data_state=data_before)
                    manager.wait_until_finished()
                    good = manager.latest_step()
                    ckpt = str(Path(manager.directory) / str(good)) if good is not None else None
                lr_now = float(lr_table[step])
                raise NonFiniteLossError(
                    f"training stopped at step {step + 1}/{total_steps}: {what} (learning rate {lr_now:.3g}). "
                    f"The update was not applied: the model keeps the weights after step {step}"
                    + (f"; last good checkpoint: {ckpt}" if ckpt else "")
                    + ". Lower the learning rate, enable clipping, or check the data around this step.",
                    step=step + 1, last_good_step=step, checkpoint=ckpt, history=history)
            rng = _next_key(rng, step)  # per-step key, kept in checkpoints for stochastic layers
            step += 1
            n_tok = float(m["n_tokens"])
            rec = {"step": step, "epoch": epoch, "loss": loss, "accuracy": float(m["n_correct"]) / max(n_tok, 1.0),
                   "tokens_per_second": batch_size * seq / dt, "learning_rate": float(lr_table[step - 1]),
                   "grad_norm": gnorm, "step_seconds": dt, "target_tokens": int(n_tok)}
            history.append(rec)
            bar.update(rec)
            if step % log_every == 0 or step == total_steps:
                metrics_file.write({**rec, "mfu": history.mfu[-1]})
            if epoch_ends and step in epoch_ends:
                e = epoch_ends.index(step)
                idx = [i for i, ep in enumerate(history.epoch) if ep == e]
                if progress and idx:
                    bar.write(f"Epoch {e + 1}/{len(epoch_ends)} - loss: {np.mean([history.loss[i] for i in idx]):.4f}"
                              f" - accuracy: {np.mean([history.accuracy[i] for i in idx]):.4f} - "
                              f"{np.median([history.tokens_per_second[i] for i in idx]):.0f} tok/s")
                if eval_data is not None and step != total_steps:
                    run_eval(step)
            elif eval_data is not None and eval_every and step % eval_every == 0 and step != total_steps:
                run_eval(step)
            if manager is not None and save_every and step % save_every == 0 and step != total_steps:
                save(step)
                last_saved = step
            stop = False
            for cb in callbacks:
                if cb(step, rec) is False:
                    stop = True
            if stop:
                history.stopped = f"stopped by a callback at step {step}"
                break
        if eval_data is not None and (not history.evals or history.evals[-1]["step"] != step):
            run_eval(step)
        if manager is not None and last_saved != step and step > 0:
            save(step, force=True)
            last_saved = step
    finally:
        bar.close()
        lm.params = merge_trees(trainable, frozen) if frozen else trainable
        if manager is not None:
            manager.close()
    return history


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
