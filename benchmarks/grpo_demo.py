"""GRPO on the real Gemma 3 270M: two-digit sums with partial credit, reward before and after on held-out sums.

    python benchmarks/grpo_demo.py [--steps 20] [--generations 8] [--prompts-per-step 4] [--lr 1e-3]

The bundled Gemma 3 270M (the base model, dequantized to float32) continues a few-shot list of sums,
``"12 + 35 = 47\\n28 + 16 = 44\\n23 + 41 ="``. It answers with a number, but the wrong one most of
the time, so an exact-match reward alone is 0 for most sampled groups (and every advantage with it). The
reward gives partial credit instead, two functions combined with weights:

* ``closeness`` (weight 1): ``max(0, 1 − |answer − sum| / 10)`` for the completion's first line — 1 for the
  sum, 0.5 when 5 off, 0 from 10 off;
* ``number_line`` (weight 0.2): 1 when that line is a number of at most three digits and ends (a newline
  follows) — the format the list asks for; a run of digits that never ends earns nothing.

LoRA rank 8 on the attention projections. Before and after training, the held-out sums (never trained on)
are answered greedily and scored with the same reward; exact accuracy is printed alongside.
"""

from __future__ import annotations

import argparse
import json
import re
import time

import numpy as np

SHOTS = "12 + 35 = 47\n28 + 16 = 44\n"
MAX_NEW = 4  # " 58\n": Gemma's tokenizer splits digits, so a space, two digits and the newline


def question(a: int, b: int) -> str:
    return f"{SHOTS}{a} + {b} ="


def _first_line(completion: str) -> str:
    return completion.strip(" ").split("\n", 1)[0].strip()


def _answer_line(completion: str) -> bool:
    """The list's format: a number of at most three digits, and the line ends (a newline follows)."""
    return "\n" in completion and re.fullmatch(r"\d{1,3}", _first_line(completion)) is not None


def closeness(prompts, completions, answer, **kw):
    """1 for the right sum, falling linearly to 0 at 10 off; 0 when the first line is not a number."""
    out = []
    for c, a in zip(completions, answer, strict=True):
        m = re.fullmatch(r"-?\d+", _first_line(c))
        out.append(max(0.0, 1.0 - abs(int(m.group()) - int(a)) / 10.0) if m else 0.0)
    return out


def number_line(prompts, completions, **kw):
    """1 when the completion is one line holding a number of at most three digits (the list's format)."""
    return [1.0 if _answer_line(c) else 0.0 for c in completions]


WEIGHTS = (1.0, 0.2)


def greedy_scores(lm, pairs) -> dict[str, float]:
    """Held-out sums answered greedily: the weighted reward (as in training) and exact accuracy."""
    tok = lm.tokenizer
    ids = [tok.encode(question(a, b), add_bos=True) for a, b in pairs]
    outs = lm.generate(ids, max_new_tokens=MAX_NEW)
    texts = [tok.decode([t for t in o[len(p):] if t not in tok.stop_ids]) for p, o in zip(ids, outs, strict=True)]
    answers = [a + b for a, b in pairs]
    close = np.asarray(closeness(None, texts, answers))
    fmt = np.asarray(number_line(None, texts))
    exact = [_first_line(t) == str(s) for t, s in zip(texts, answers, strict=True)]
    return {"reward": float(np.mean(WEIGHTS[0] * close + WEIGHTS[1] * fmt)), "closeness": float(close.mean()),
            "accuracy": float(np.mean(exact)), "examples": [f"{a} + {b} = {_first_line(t)}" for (a, b), t in
                                                            zip(pairs[:6], texts, strict=False)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--num-iterations", type=int, default=1)
    ap.add_argument("--held-out", type=int, default=48)
    ap.add_argument("--json")
    args = ap.parse_args()

    from gemmax.api import CausalLM
    from gemmax.io.bundled import default_model_path

    rng = np.random.default_rng(0)
    sums = [(int(a), int(b)) for a, b in rng.integers(10, 50, (600, 2))]
    held = sums[:args.held_out]
    seen = set(held)
    train_pairs = [p for p in sums[args.held_out:] if p not in seen]
    lm = CausalLM.from_preset(default_model_path())
    lm.enable_lora(rank=8, alpha=16, targets=("query", "key", "value", "attention_output"))
    t0 = time.perf_counter()
    before = greedy_scores(lm, held)
    print(f"held-out before: reward {before['reward']:.3f}, closeness {before['closeness']:.3f}, exact "
          f"{before['accuracy']:.3f} ({time.perf_counter() - t0:.0f}s); e.g. {before['examples']}", flush=True)
    data = [{"prompt": question(a, b), "answer": a + b} for a, b in train_pairs]
    longest = max(len(lm.tokenizer.encode(d["prompt"], add_bos=True)) for d in data)
    seq = -(-(longest + MAX_NEW) // 8) * 8  # rows just long enough, to a multiple of 8
    t0 = time.perf_counter()
    h = lm.fit(data, objective="grpo", reward_funcs=[closeness, number_line], reward_weights=list(WEIGHTS),
               num_generations=args.generations, max_completion_length=MAX_NEW, temperature=1.0, loss_type="grpo",
               num_iterations=args.num_iterations, steps=args.steps,
               batch_size=args.generations * args.prompts_per_step, sequence_length=seq, learning_rate=args.lr,
               warmup_steps=2, schedule="constant", progress=True)
    train_s = time.perf_counter() - t0
    rewards = [e["reward"] for e in h.extra]
    after = greedy_scores(lm, held)
    res = {"before": before, "after": after, "train_seconds": train_s, "steps": args.steps,
           "reward_first5": float(np.mean(rewards[:5])), "reward_last5": float(np.mean(rewards[-5:])),
           "rewards": rewards, "settings": vars(args)}
    print(f"held-out after: reward {after['reward']:.3f}, closeness {after['closeness']:.3f}, exact "
          f"{after['accuracy']:.3f}; e.g. {after['examples']}", flush=True)
    print(f"training reward (sampled) {res['reward_first5']:.3f} -> {res['reward_last5']:.3f} (first / last 5 "
          f"steps); {args.steps} steps in {train_s:.0f}s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
