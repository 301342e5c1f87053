"""Post-training step cost: gemmax vs TRL, DPO (LoRA and full) and GRPO, on the same shapes.

    python benchmarks/post_train.py [--preset gemma3_270m] [--batch 2] [--prompt 32] [--completion 32]
                                    [--steps 4] [--warmup 2] [--rank 8] [--generations 4]
                                    [--precision float32|mixed_bfloat16] [--only gemmax-dpo-lora,...]

Each configuration runs in its own subprocess (peak RSS — ``ru_maxrss`` — is that configuration's alone), on
random weights of the preset's shapes (float32) and a character-level tokenizer built here (no download):

* ``gemmax-dpo-{lora,full}``: ``fit(objective=DPO(beta=0.1))`` — with LoRA the reference is the base with
  adapters off (a second forward per step), full precomputes it once; ``trl-dpo-{lora,full}``: TRL's
  ``DPOTrainer`` on ``Gemma3ForCausalLM`` built from ``to_hf_config`` of the same preset (PEFT LoRA on
  q,v for the LoRA case: TRL's reference is the adapter disabled), ``precompute_ref_log_probs`` for full;
* ``gemmax-grpo`` / ``trl-grpo``: one GRPO step = sampling ``--generations`` completions of
  ``--completion`` tokens for each of ``--batch`` prompts + the update; gemmax samples with its engine, TRL
  with its default (``transformers`` ``generate``). LoRA rank ``--rank`` on q,v, ``beta=0``.

DPO rows are ``prompt + completion`` tokens, twice per pair; tokens/s counts both rows. The first
``--warmup`` steps (compilation for JAX) are not timed; the figure is the median over ``--steps`` steps.

``--precision mixed_bfloat16``: gemmax's ``fit(precision="mixed_bfloat16")`` (float32 weights and optimizer,
bfloat16 products) against TRL with ``bf16=True``, which runs the forward and backward under
``torch.autocast("cpu", torch.bfloat16)``: each side's own mixed precision.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

from _common import child_environ, dump_json, host_malloc_flag, int_flags, parser, result_line, run_children

CONFIGS = ("gemmax-dpo-lora", "trl-dpo-lora", "gemmax-dpo-full", "trl-dpo-full", "gemmax-grpo", "trl-grpo")
CHARS = "abcdefghijklmnopqrstuvwxyz ,.!?0123456789"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _text(rng, n: int) -> str:
    return "".join(rng.choice(list(CHARS), n))


def _pairs(args: argparse.Namespace, n: int) -> list[dict]:
    import numpy as np

    rng = np.random.default_rng(0)
    # one character = one token with both tokenizers below; the EOS makes the completion args.completion long
    return [{"prompt": _text(rng, args.prompt - 1), "chosen": _text(rng, args.completion - 1),
             "rejected": _text(rng, args.completion - 1)} for _ in range(n)]


def _prompts(args: argparse.Namespace, n: int) -> list[dict]:
    import numpy as np

    rng = np.random.default_rng(1)
    return [{"prompt": _text(rng, args.prompt - 1)} for _ in range(n)]


def vowel_share(prompts, completions, **kw):
    """The benchmark's reward: the share of vowels in a completion (cheap; only the step cost matters)."""
    return [sum(c in "aeiou" for c in s) / max(len(s), 1) for s in completions]


class CharTokenizer:
    """gemmax's tokenizer interface over the same character vocabulary as ``_hf_tokenizer``."""

    pad_id, eos_id, bos_id = 0, 1, 2
    stop_ids = (1,)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        return ([2] if add_bos else []) + [CHARS.index(c) + 3 for c in text if c in CHARS]

    def decode(self, ids) -> str:
        return "".join(CHARS[i - 3] for i in ids if 3 <= i < 3 + len(CHARS))


def _hf_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def run_gemmax(args: argparse.Namespace, method: str, lora: bool) -> dict:
    from gemmax import get_preset
    from gemmax.api import CausalLM
    from gemmax.train import trainer as train
    from gemmax.train.grpo import GRPO
    from gemmax.train.preference import DPO

    lm = CausalLM.from_config(get_preset(args.preset), tokenizer=CharTokenizer())
    if lora:
        train.enable_lora(lm, rank=args.rank, alpha=2 * args.rank, targets=("query", "value"))
    steps = args.warmup + args.steps
    if method == "dpo":
        h = train.fit(lm, _pairs(args, args.batch * steps), objective=DPO(beta=0.1), steps=steps,
                      batch_size=args.batch, sequence_length=args.prompt + args.completion, learning_rate=1e-5,
                      warmup_steps=0, progress=False, precision=args.precision)
        secs = h.step_seconds[args.warmup:]
        tokens = 2 * args.batch * (args.prompt + args.completion)
    else:
        obj = GRPO(reward_funcs=vowel_share, num_generations=args.generations, max_completion_length=args.completion,
                   loss_type="grpo")
        h = train.fit(lm, _prompts(args, args.batch * steps), objective=obj, steps=steps,
                      batch_size=args.batch * args.generations, sequence_length=args.prompt + args.completion,
                      learning_rate=1e-5, warmup_steps=0, progress=False, precision=args.precision)
        secs = [s + e["generation_seconds"] for s, e in zip(h.step_seconds, h.extra, strict=True)][args.warmup:]
        tokens = args.batch * args.generations * args.completion
    return {"step_seconds": secs, "tokens_per_step": tokens, "loss": h.loss, "trainable": h.trainable_params}


def run_trl(args: argparse.Namespace, method: str, lora: bool) -> dict:
    import datasets
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, TrainerCallback

    from gemmax import get_preset
    from gemmax.models.gemma.config import to_hf_config

    torch.manual_seed(0)
    hf = to_hf_config(get_preset(args.preset))
    hf = hf.get("text_config", hf)
    conf = Gemma3TextConfig(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type")})
    model = Gemma3ForCausalLM(conf).float()
    tok = _hf_tokenizer()
    peft_config = None
    if lora or method == "grpo":
        from peft import LoraConfig

        peft_config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                 target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    steps = args.warmup + args.steps
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    common = dict(output_dir=os.path.join(args.tmp, "trl"), max_steps=steps, learning_rate=1e-5, report_to=[],
                  logging_steps=1000, save_strategy="no", use_cpu=True, dataloader_num_workers=0,
                  warmup_steps=0, bf16=args.precision == "mixed_bfloat16")
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        cfg = DPOConfig(per_device_train_batch_size=args.batch, max_length=args.prompt + args.completion + 1,
                        beta=0.1, precompute_ref_log_probs=not lora, **common)
        trainer = DPOTrainer(model=model, args=cfg, processing_class=tok, peft_config=peft_config,
                             train_dataset=datasets.Dataset.from_list(_pairs(args, args.batch * steps)),
                             callbacks=[Timer()])
        tokens = 2 * args.batch * (args.prompt + args.completion)
    else:
        from trl import GRPOConfig, GRPOTrainer

        cfg = GRPOConfig(per_device_train_batch_size=args.batch * args.generations,
                         num_generations=args.generations, max_completion_length=args.completion, beta=0.0,
                         loss_type="grpo", **common)
        trainer = GRPOTrainer(model=model, reward_funcs=vowel_share, args=cfg, processing_class=tok,
                              peft_config=peft_config,
                              train_dataset=datasets.Dataset.from_list(_prompts(args, args.batch * steps)),
                              callbacks=[Timer()])
        tokens = args.batch * args.generations * args.completion
    trainer.train()
    return {"step_seconds": times[args.warmup:], "tokens_per_step": tokens,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "torch_threads": torch.get_num_threads()}


def child(args: argparse.Namespace) -> None:
    kind, method, *mode = args.child.split("-")
    lora = (mode[0] == "lora") if mode else True
    res = (run_gemmax if kind == "gemmax" else run_trl)(args, method, lora)
    res["peak_rss_mb"] = _peak_rss_mb()
    print("RESULT" + json.dumps(res))


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--preset", default="gemma3_270m")
    ap.add_argument("--batch", type=int, default=2, help="DPO pairs / GRPO prompts per step")
    int_flags(ap, prompt=32, completion=32, generations=4, steps=4, warmup=2, rank=8)
    ap.add_argument("--precision", default="float32", choices=("float32", "mixed_bfloat16"))
    ap.add_argument("--only", default=",".join(CONFIGS))
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--tmp", default="/tmp/gemmax_post_train_bench", help=argparse.SUPPRESS)
    host_malloc_flag(ap)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    env, env_line = child_environ(args.host_malloc)
    print(f"{args.preset}, DPO {args.batch} pairs x ({args.prompt}+{args.completion}) tokens, GRPO {args.batch} "
          f"prompts x {args.generations} x {args.completion} tokens, {args.precision}, {args.warmup} warm-up + "
          f"{args.steps} timed steps, {os.cpu_count()} CPUs; {env_line}", flush=True)
    results: dict[str, dict] = {}
    flags = {k: getattr(args, k) for k in ("preset", "batch", "prompt", "completion", "generations", "steps",
                                           "warmup", "rank", "precision", "tmp")}
    for name, r in run_children(__file__, args.only.split(","), flags, stderr_tail=3000, env=env):
        r["tokens_per_s"] = r["tokens_per_step"] / r["median_step_s"]
        results[name] = r
        print(result_line(name, r, 16), flush=True)
    for mode in ("dpo-lora", "dpo-full", "grpo"):
        g, t = results.get(f"gemmax-{mode}"), results.get(f"trl-{mode}")
        if g and t:
            print(f"{mode}: gemmax/TRL throughput {g['tokens_per_s'] / t['tokens_per_s']:.2f}x "
                  f"(step {g['median_step_s']:.2f}s vs {t['median_step_s']:.2f}s), peak memory "
                  f"{g['peak_rss_mb'] / t['peak_rss_mb']:.2f}x of TRL's")
    dump_json(args.json, results)


if __name__ == "__main__":
    main()
