"""Fine-tuning throughput and peak memory: gemmax vs transformers + PEFT, LoRA and full, on the same shapes.

    python benchmarks/train.py [--preset gemma3_270m] [--batch 4] [--seq 128] [--steps 5] [--warmup 2]
                               [--rank 8] [--precision float32|mixed_bfloat16] [--only gemmax-lora,...]

Each configuration runs in its own subprocess (so peak RSS — ``ru_maxrss`` — is that configuration's alone):

* ``gemmax-lora`` / ``gemmax-full``: ``gemmax.train.trainer.fit`` on a ``gemmax.get_preset(preset)`` model with random
  weights (LoRA rank ``--rank`` on q,v), chunked cross-entropy, ``fit(precision=--precision)``;
* ``torch-lora`` / ``torch-full``: ``Gemma3ForCausalLM`` built from ``to_hf_config`` of the same
  preset (random weights), PEFT ``LoraConfig(r, target_modules=[q_proj, v_proj])``, ``torch.optim.AdamW``,
  float32 weights, eager attention, ``labels=`` loss (transformers' standard path); with
  ``--precision mixed_bfloat16`` the forward and backward run under ``torch.autocast("cpu", torch.bfloat16)``,
  torch's own mixed precision (float32 weights and optimizer, bfloat16 products).

Every step sees ``batch x seq`` tokens of random ids; the first ``--warmup`` steps (compilation for JAX) are
not timed, the figure is the median over ``--steps`` steps. Both sides use every core torch/XLA pick by
default. On a shared machine, run it twice and compare medians.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

from _common import child_environ, dump_json, host_malloc_flag, int_flags, parser, result_line, run_children

CONFIGS = ("gemmax-lora", "torch-lora", "gemmax-full", "torch-full")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def run_gemmax(args: argparse.Namespace, lora: bool) -> dict:
    import numpy as np

    from gemmax import get_preset
    from gemmax.api import CausalLM
    from gemmax.train import trainer as train
    from gemmax.train.data import Dataset, Document

    cfg = get_preset(args.preset)
    lm = CausalLM.from_config(cfg)
    if lora:
        train.enable_lora(lm, rank=args.rank, alpha=2 * args.rank, targets=("query", "value"))
    rng = np.random.default_rng(0)
    n_docs = args.batch * (args.warmup + args.steps)
    docs = [Document(rng.integers(3, cfg.vocab_size, args.seq + 1).astype(np.int32),
                     np.ones(args.seq + 1, np.float32), f"random:{i}") for i in range(n_docs)]
    ds = Dataset(docs, args.seq)
    h = train.fit(lm, ds, steps=args.warmup + args.steps, batch_size=args.batch, learning_rate=1e-4,
                  warmup_steps=0, progress=False, precision=args.precision)
    secs = h.step_seconds[args.warmup:]
    return {"step_seconds": secs, "loss": h.loss, "trainable": h.trainable_params,
            "flops_per_token": h.flops_per_token}


def run_torch(args: argparse.Namespace, lora: bool) -> dict:
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from gemmax import get_preset
    from gemmax.models.gemma.config import to_hf_config

    torch.manual_seed(0)
    hf = to_hf_config(get_preset(args.preset))
    hf = hf.get("text_config", hf)
    conf = Gemma3TextConfig(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type")})
    conf._attn_implementation = "eager"
    model = Gemma3ForCausalLM(conf).float()
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                                 target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    mixed = args.precision == "mixed_bfloat16"
    secs, losses = [], []
    for i in range(args.warmup + args.steps):
        ids = torch.randint(3, conf.vocab_size, (args.batch, args.seq + 1), generator=g)
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed):
            out = model(input_ids=ids[:, :-1], labels=ids[:, :-1].clone())  # labels shift inside the model
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        losses.append(float(out.loss))
        if i >= args.warmup:
            secs.append(dt)
    return {"step_seconds": secs, "loss": losses, "trainable": sum(p.numel() for p in params),
            "torch_threads": torch.get_num_threads()}


def child(args: argparse.Namespace) -> None:
    kind, mode = args.child.split("-")
    res = (run_gemmax if kind == "gemmax" else run_torch)(args, mode == "lora")
    res["peak_rss_mb"] = _peak_rss_mb()
    print("RESULT" + json.dumps(res))


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--preset", default="gemma3_270m")
    int_flags(ap, batch=4, seq=128, steps=5, warmup=2, rank=8)
    ap.add_argument("--precision", default="float32", choices=("float32", "mixed_bfloat16"))
    ap.add_argument("--only", default=",".join(CONFIGS))
    ap.add_argument("--json", help="also write the results here")
    host_malloc_flag(ap)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    tokens = args.batch * args.seq
    env, env_line = child_environ(args.host_malloc)
    print(f"{args.preset}, batch {args.batch} x {args.seq} tokens, {args.precision}, {args.warmup} warm-up + "
          f"{args.steps} timed steps, {os.cpu_count()} CPUs; {env_line}", flush=True)
    results: dict[str, dict] = {}
    flags = {k: getattr(args, k) for k in ("preset", "batch", "seq", "steps", "warmup", "rank", "precision")}
    for name, r in run_children(__file__, args.only.split(","), flags, env=env):
        r["tokens_per_s"] = tokens / r["median_step_s"]
        results[name] = r
        print(result_line(name, r, 12), flush=True)
    for mode in ("lora", "full"):
        g, t = results.get(f"gemmax-{mode}"), results.get(f"torch-{mode}")
        if g and t:
            print(f"{mode}: gemmax/torch throughput {g['tokens_per_s'] / t['tokens_per_s']:.2f}x, "
                  f"peak memory {g['peak_rss_mb'] / t['peak_rss_mb']:.2f}x of torch's")
    dump_json(args.json, results)


if __name__ == "__main__":
    main()
