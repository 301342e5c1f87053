"""GRPO on the real Gemma 3 270M: two-digit addition, a verifiable answer the base model often gets wrong.

    python benchmarks/grpo_demo.py [--steps 30] [--generations 8] [--prompts-per-step 4] [--lr 2e-3]

Prompts are ``"Q: 23 + 41 = ?\\nA: "`` (few-shot prefix of two solved examples); the reward is 1 when the
first number of the completion is the sum, else 0. LoRA rank 8 on q,v of the bundled model (dequantized to
float32). Accuracy is measured greedily on 48 held-out sums before and after training.
"""

from __future__ import annotations

import argparse
import json
import re
import time

import numpy as np

SHOTS = "Q: 12 + 35 = ?\nA: 47\nQ: 28 + 16 = ?\nA: 44\n"


def question(a: int, b: int) -> str:
    return f"{SHOTS}Q: {a} + {b} = ?\nA: "


def correct_sum(prompts, completions, answer, **kw):
    """1 when the completion's first number is the answer."""
    out = []
    for c, a in zip(completions, answer, strict=True):
        m = re.search(r"-?\d+", c)
        out.append(1.0 if m and int(m.group()) == int(a) else 0.0)
    return out


def accuracy(lm, pairs) -> float:
    outs = lm.generate([question(a, b) for a, b in pairs], max_new_tokens=4)
    texts = outs if isinstance(outs, list) else [outs]
    answers = [t.rsplit("\nA: ", 1)[-1] for t in texts]  # the text after the question's "A: "
    return float(np.mean(correct_sum(None, answers, [a + b for a, b in pairs])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--json")
    args = ap.parse_args()

    from gemmax.api import CausalLM
    from gemmax.io.bundled import default_model_path

    rng = np.random.default_rng(0)
    sums = [(int(a), int(b)) for a, b in rng.integers(10, 50, (400, 2))]
    held, train_pairs = sums[:48], sums[48:]
    lm = CausalLM.from_preset(default_model_path())
    lm.enable_lora(rank=8, alpha=16, targets=("query", "value"))
    t0 = time.perf_counter()
    before = accuracy(lm, held)
    print(f"held-out accuracy before: {before:.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    data = [{"prompt": question(a, b), "answer": a + b} for a, b in train_pairs]
    t0 = time.perf_counter()
    h = lm.fit(data, objective="grpo", reward_funcs=[correct_sum], num_generations=args.generations,
               max_completion_length=4, temperature=1.0, loss_type="grpo", steps=args.steps,
               batch_size=args.generations * args.prompts_per_step, sequence_length=64, learning_rate=args.lr,
               warmup_steps=2, schedule="constant", progress=True)
    train_s = time.perf_counter() - t0
    rewards = [e["reward"] for e in h.extra]
    after = accuracy(lm, held)
    res = {"before": before, "after": after, "train_seconds": train_s, "steps": args.steps,
           "reward_first5": float(np.mean(rewards[:5])), "reward_last5": float(np.mean(rewards[-5:])),
           "rewards": rewards}
    print(f"held-out accuracy after: {after:.3f}; training reward {res['reward_first5']:.3f} -> "
          f"{res['reward_last5']:.3f} (first/last 5 steps); {args.steps} steps in {train_s:.0f}s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
