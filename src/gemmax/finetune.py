"""``gemmax finetune``: fine-tune any family from the command line (options, config file, run, outputs).

The command loads a model through :class:`gemmax.api.CausalLM` and runs :func:`gemmax.train.trainer.fit`;
it lives above both so the trainer knows no loading code.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gemmax import distribution as _dist
from gemmax.api import CausalLM
from gemmax.io.bundled import default_model_path
from gemmax.kernels import host_memory
from gemmax.nn.lora import export_peft, save_adapter
from gemmax.train.trainer import DataError, NonFiniteLossError, enable_lora, fit, plot_loss

# ---- CLI ---------------------------------------------------------------------------------------------------

#: Short target names accepted by ``--targets`` (PEFT and gemmax names work too).
SHORT_TARGETS = {"q": "query", "k": "key", "v": "value", "o": "attention_output", "gate": "ffw_gating",
                 "up": "ffw_gating_2", "down": "ffw_linear"}

#: Defaults of the finetune command (also the keys a ``--config`` file may set).
CLI_DEFAULTS: dict[str, Any] = {
    "model": None, "data": None, "eval_data": None, "format": "auto", "lora_rank": None, "lora_alpha": None,
    "targets": "q,v", "mesh": None, "fsdp": False, "steps": None, "epochs": None, "batch_size": 4,
    "sequence_length": 128, "learning_rate": 1e-4, "weight_decay": 0.01, "warmup_steps": None,
    "schedule": "cosine", "clip_norm": 1.0, "grad_accum": 1, "precision": "float32", "remat": None,
    "dtype": "float32", "output": "finetune_output", "save_every": 100, "keep": 3, "resume": True, "seed": 0,
    "log_every": 1, "prompt": None, "max_length": 64, "progress": True, "export_peft": True,
    "method": "sft", "beta": None, "loss_type": None, "teacher": None, "reward": None, "num_generations": 8,
    "max_completion_length": 64,
}

#: ``--method`` values (the objectives of ``gemmax.train.objectives``, plus next-token "sft").
METHODS = ("sft", "dpo", "simpo", "orpo", "distill", "grpo")


def _add_arguments(p: argparse.ArgumentParser) -> None:
    s = argparse.SUPPRESS  # unset flags stay absent, so a --config file can fill them
    p.add_argument("--config", default=s, help="JSON or TOML file with any of these options (flags override)")
    p.add_argument("--model", default=s, help="model folder, .gguf, hf://... or preset (default: the bundled "
                                              "Gemma 3 270M)")
    p.add_argument("--data", default=s, help="training data: .jsonl/.json/.txt/.csv/.parquet file or folder")
    p.add_argument("--eval-data", default=s, help="evaluation data (evaluated after each epoch and at the end)")
    p.add_argument("--format", default=s, choices=["auto", "text", "prompt_completion", "chat"])
    p.add_argument("--lora-rank", type=int, default=s, help="train LoRA adapters of this rank (else all weights)")
    p.add_argument("--lora-alpha", type=float, default=s, help="LoRA alpha (default: the rank)")
    p.add_argument("--targets", default=s, help="LoRA targets, comma-separated: q,k,v,o,gate,up,down (or "
                                                "PEFT/gemmax names); default q,v")
    p.add_argument("--mesh", default=s, help="device mesh BATCHxMODEL, e.g. 2x4 (default: one device)")
    p.add_argument("--fsdp", action="store_true", default=s, help="also shard weights over the batch axis")
    p.add_argument("--steps", type=int, default=s)
    p.add_argument("--epochs", type=int, default=s)
    p.add_argument("--batch-size", type=int, default=s)
    p.add_argument("--sequence-length", type=int, default=s)
    p.add_argument("--learning-rate", type=float, default=s)
    p.add_argument("--weight-decay", type=float, default=s)
    p.add_argument("--warmup-steps", type=int, default=s)
    p.add_argument("--schedule", choices=["cosine", "linear", "constant"], default=s)
    p.add_argument("--clip-norm", type=float, default=s)
    p.add_argument("--grad-accum", type=int, default=s)
    p.add_argument("--precision", choices=["float32", "mixed_bfloat16", "bfloat16"], default=s)
    p.add_argument("--remat", choices=["full", "dots"], default=s)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=s, help="dtype the model is loaded in")
    p.add_argument("--output", default=s, help="output folder (checkpoints, metrics.jsonl, loss.png, adapter)")
    p.add_argument("--save-every", type=int, default=s)
    p.add_argument("--keep", type=int, default=s)
    p.add_argument("--no-resume", dest="resume", action="store_false", default=s,
                   help="start afresh even if OUTPUT/checkpoints holds a checkpoint")
    p.add_argument("--seed", type=int, default=s)
    p.add_argument("--log-every", type=int, default=s)
    p.add_argument("--prompt", default=s, help="greedy-generate from this prompt before and after training")
    p.add_argument("--max-length", type=int, default=s, help="max_length for --prompt generation")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=s)
    p.add_argument("--method", choices=METHODS, default=s,
                   help="sft (next-token, default), dpo / simpo / orpo (prompt/chosen/rejected data), distill (needs "
                        "--teacher), grpo (prompts; needs --reward)")
    p.add_argument("--beta", type=float, default=s, help="dpo/simpo/grpo beta, orpo lambda, distill JSD beta")
    p.add_argument("--loss-type", default=s, help="dpo: sigmoid|ipo|hinge; grpo: grpo|bnpo|dr_grpo; "
                                                 "distill: forward_kl|reverse_kl|jsd")
    p.add_argument("--teacher", default=s, help="distill: the teacher model (folder, hf://..., preset)")
    p.add_argument("--reward", default=s, help="grpo: reward functions as module:function, comma-separated")
    p.add_argument("--num-generations", type=int, default=s, help="grpo: completions per prompt")
    p.add_argument("--max-completion-length", type=int, default=s, help="grpo: tokens per completion")


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``finetune`` subcommand to a ``gemmax`` argparse ``subparsers`` (sets ``func``)."""
    p = subparsers.add_parser(
        "finetune", help="fine-tune a model (LoRA or full) on a dataset",
        description="Fine-tune with LoRA (--lora-rank) or all weights; writes checkpoints, metrics.jsonl, "
                    "loss.png and the adapter (or the full model) under --output.")
    _add_arguments(p)
    p.set_defaults(func=run_finetune)
    return p


def _read_config_file(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise SystemExit(f"gemmax finetune: config file {p} not found")
    try:
        if p.suffix.lower() == ".toml":
            import tomllib

            raw = tomllib.loads(p.read_text())
        else:
            raw = json.loads(p.read_text())
    except Exception as e:  # noqa: BLE001 - any parse error is reported with the file name
        raise SystemExit(f"gemmax finetune: cannot parse {p}: {e}") from None
    if not isinstance(raw, dict):
        raise SystemExit(f"gemmax finetune: {p} must hold a table/object of options")
    raw = raw.get("finetune", raw)
    out = {}
    for k, v in raw.items():
        key = k.replace("-", "_")
        if key not in CLI_DEFAULTS:
            raise SystemExit(f"gemmax finetune: {p}: unknown option {k!r} (known: {', '.join(sorted(CLI_DEFAULTS))})")
        out[key] = v
    return out


def resolve_options(args: argparse.Namespace | dict[str, Any]) -> dict[str, Any]:
    """Defaults <- config file <- command-line flags."""
    given = dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args)
    given.pop("func", None)
    opts = dict(CLI_DEFAULTS)
    cfg_file = given.pop("config", None)
    if cfg_file:
        opts.update(_read_config_file(cfg_file))
    opts.update({k: v for k, v in given.items() if k in CLI_DEFAULTS})
    if isinstance(opts["targets"], (list, tuple)):
        opts["targets"] = ",".join(opts["targets"])
    return opts


def _targets(spec: str) -> tuple[str, ...]:
    return tuple(SHORT_TARGETS.get(t.strip(), t.strip()) for t in spec.split(",") if t.strip())


def _set_mesh(spec: str, fsdp: bool) -> Any:
    try:
        dims = tuple(int(x) for x in spec.lower().split("x"))
    except ValueError:
        raise SystemExit(f"gemmax finetune: bad --mesh {spec!r}; use BATCHxMODEL like 2x4") from None
    if len(dims) == 1:
        dims = (dims[0], 1)
    if len(dims) != 2:
        raise SystemExit(f"gemmax finetune: bad --mesh {spec!r}; use BATCHxMODEL like 2x4")
    mesh = _dist.DeviceMesh(dims, ("batch", "model"))
    layout = _dist.get_layout_map(None, mesh, fsdp=fsdp)
    dist = _dist.ModelParallel(mesh, layout, batch_dim_name="batch", fsdp=fsdp)
    _dist.set_distribution(dist)
    return dist


def _load_model(handle: str | None, dtype: str) -> Any:
    return CausalLM.from_preset(handle or default_model_path(), dtype=dtype)


def _reward_function(spec: str) -> Any:
    import importlib

    mod, _, name = spec.partition(":")
    if not name:
        raise SystemExit(f"gemmax finetune: --reward {spec!r}: use module:function")
    try:
        return getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"gemmax finetune: --reward {spec!r}: {e}") from None


def _objective(o: dict[str, Any]) -> Any:
    """The ``--method``'s objective (None for sft) from the options."""
    from gemmax.train.post_training import make_objective

    method = o["method"]
    if method not in METHODS:
        raise SystemExit(f"gemmax finetune: unknown --method {method!r}; use one of {', '.join(METHODS)}")
    if method == "sft":
        return None
    kw: dict[str, Any] = {}
    if o["beta"] is not None:
        kw["beta"] = float(o["beta"])
    if o["loss_type"] is not None:
        kw["loss" if method == "distill" else "loss_type"] = o["loss_type"]
    if method == "distill":
        if not o["teacher"]:
            raise SystemExit("gemmax finetune: --method distill needs --teacher")
        kw["teacher"] = _load_model(o["teacher"], o["dtype"])
    if method == "grpo":
        if not o["reward"]:
            raise SystemExit("gemmax finetune: --method grpo needs --reward module:function[,...]")
        specs = o["reward"] if isinstance(o["reward"], list) else str(o["reward"]).split(",")
        kw["reward_funcs"] = [_reward_function(x.strip()) for x in specs if x.strip()]
        kw["num_generations"] = int(o["num_generations"])
        kw["max_completion_length"] = int(o["max_completion_length"])
    return make_objective(method, **kw)


def run_finetune(args: argparse.Namespace | dict[str, Any]) -> int:
    """The ``gemmax finetune`` command; returns the exit status."""
    o = resolve_options(args)
    if not o["data"]:
        print("gemmax finetune: --data is required (on the command line or in --config)", file=sys.stderr)
        return 2
    out = Path(o["output"])
    out.mkdir(parents=True, exist_ok=True)
    if o["mesh"]:
        dist = _set_mesh(o["mesh"], bool(o["fsdp"]))
        print(f"distribution: {dist}", file=sys.stderr)
    lm = _load_model(o["model"], o["dtype"])
    objective = _objective(o)
    if o["lora_rank"]:
        n = enable_lora(lm, rank=int(o["lora_rank"]), alpha=o["lora_alpha"], targets=_targets(o["targets"]),
                        seed=int(o["seed"]))
        print(f"LoRA rank {o['lora_rank']} on {', '.join(_targets(o['targets']))}: {n:,} trainable parameters",
              file=sys.stderr)
    before = None
    if o["prompt"]:
        before = lm.generate(o["prompt"], max_length=int(o["max_length"]))
        print(f"\n--- before fine-tuning ---\n{before}\n", file=sys.stderr)
    (out / "finetune_config.json").write_text(json.dumps({k: v for k, v in o.items()}, indent=2, default=str))
    metrics = out / "metrics.jsonl"
    t0 = time.perf_counter()
    status = 0
    try:
        history = fit(lm, o["data"], epochs=o["epochs"], steps=o["steps"], batch_size=int(o["batch_size"]),
                      sequence_length=int(o["sequence_length"]), learning_rate=float(o["learning_rate"]),
                      weight_decay=float(o["weight_decay"]), warmup_steps=o["warmup_steps"],
                      schedule=o["schedule"], clip_norm=o["clip_norm"], grad_accum=int(o["grad_accum"]),
                      precision=o["precision"], remat=o["remat"], checkpoint_dir=out / "checkpoints",
                      save_every=o["save_every"], keep=o["keep"], resume=bool(o["resume"]), seed=int(o["seed"]),
                      log_every=int(o["log_every"]), metrics_path=metrics, progress=bool(o["progress"]),
                      eval_data=o["eval_data"], format=o["format"], objective=objective)
    except NonFiniteLossError as e:
        print(f"gemmax finetune: {e}", file=sys.stderr)
        history, status = e.history, 1
    except (DataError, ValueError) as e:
        print(f"gemmax finetune: {e}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - t0
    if history.step or history.evals:
        plot_loss(metrics if metrics.exists() else history, out / "loss.png",
                  title=f"{lm.config.name or lm.family.name}: training loss")
    if status == 0:
        if o["lora_rank"]:
            c = lm.config
            save_adapter(out / "adapter", lm.params, lm.linear_nodes, model_info={
                "model": c.name, "family": getattr(c, "family", lm.family.name),
                "num_layers": getattr(c, "num_layers", None)})
            if o["export_peft"]:
                export_peft(out / "adapter_peft", lm.params, lm.linear_nodes, base_model_name_or_path=o["model"])
            saved = out / "adapter"
        else:
            saved = lm.save(out / "model")
        summary = {**history.summary(), "seconds": elapsed, "saved": str(saved)}
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        print(f"trained {len(history.step)} steps in {elapsed:.0f}s; final loss {history.loss[-1]:.4f}; "
              f"{history.median_tokens_per_second():.0f} tok/s; saved {saved}", file=sys.stderr)
    if o["prompt"] and status == 0:
        after = lm.generate(o["prompt"], max_length=int(o["max_length"]))
        print(f"\n--- after fine-tuning ---\n{after}\n", file=sys.stderr)
        (out / "samples.json").write_text(json.dumps({"prompt": o["prompt"], "before": before, "after": after},
                                                     indent=2))
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gemmax.finetune finetune ...`` (the same command as ``gemmax finetune``)."""
    parser = argparse.ArgumentParser(prog="gemmax")
    sub = parser.add_subparsers(dest="command", required=True)
    register_cli(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    if not {"-h", "--help"} & set(sys.argv[1:]):
        host_memory.restart_with_huge_pages()  # as `gemmax finetune` does (gemmax.cli.entry)
    raise SystemExit(main())
