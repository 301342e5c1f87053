"""GRPO on the real Gemma 3 270M with partial-credit rewards: reward before and after on held-out prompts.

    python benchmarks/grpo_demo.py [--task capitals|sums] [--steps 20] [--generations 8]
                                   [--prompts-per-step 4] [--lr 1e-3] [--num-iterations 1]

The bundled Gemma 3 270M (the base model, dequantized to float32), LoRA rank 8 on the attention
projections. Two tasks with an answer Python can check, each scored by two reward functions combined with
weights, so a sampled group rarely scores all alike (an exact-match reward alone is 0 for most groups, and
every advantage with it):

* ``capitals`` (default) — a formatting rule. ``"Answer in one word, lower case.\\nQ: What is the capital of
  Italy?\\nA: rome\\n...Q: What is the capital of Japan?\\nA:"``: the base model knows most capitals but answers
  ``Tokyo``, breaking the rule the instruction and the examples both show. ``capital`` (weight 1): the first
  line is the capital, in any case; ``capital_by_the_rule`` (weight 1): it is the capital as the rule asks,
  one lower-case word on its line. ``Tokyo`` earns 1, ``tokyo`` 2, a wrong city 0.
* ``sums`` — two-digit sums continuing ``"12 + 35 = 47\\n28 + 16 = 44\\n23 + 41 ="``. ``closeness`` (weight 1):
  ``max(0, 1 − |answer − sum| / 20)``; ``number_line`` (weight 0.2): a number of at most three digits whose
  line ends.

Before and after training the held-out prompts (never trained on) are answered greedily and scored with the
same reward; the rule-exact rate (``tokyo``, or the exact sum) is printed alongside.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

# ---- capitals: a formatting rule ------------------------------------------------------------------------

# countries whose capital is one plain ASCII word
CAPITALS = {
    "France": "paris", "Japan": "tokyo", "Kenya": "nairobi", "Peru": "lima", "Norway": "oslo", "Egypt": "cairo",
    "Canada": "ottawa", "Greece": "athens", "Germany": "berlin", "Austria": "vienna", "Ireland": "dublin",
    "Portugal": "lisbon", "Poland": "warsaw", "Hungary": "budapest", "Finland": "helsinki",
    "Sweden": "stockholm", "Denmark": "copenhagen", "Russia": "moscow", "Turkey": "ankara", "Iran": "tehran",
    "Iraq": "baghdad", "Afghanistan": "kabul", "Pakistan": "islamabad", "China": "beijing",
    "South Korea": "seoul", "Thailand": "bangkok", "Vietnam": "hanoi", "Philippines": "manila",
    "Indonesia": "jakarta", "Australia": "canberra", "New Zealand": "wellington", "Chile": "santiago",
    "Venezuela": "caracas", "Ecuador": "quito", "Cuba": "havana", "Jamaica": "kingston", "Senegal": "dakar",
    "Ghana": "accra", "Nigeria": "abuja", "Sudan": "khartoum", "Uganda": "kampala", "Rwanda": "kigali",
    "Zambia": "lusaka", "Zimbabwe": "harare", "Mozambique": "maputo", "Angola": "luanda", "Tunisia": "tunis",
    "Algeria": "algiers", "Morocco": "rabat", "Libya": "tripoli", "Syria": "damascus", "Lebanon": "beirut",
    "Jordan": "amman", "Qatar": "doha", "Oman": "muscat", "Uzbekistan": "tashkent", "Nepal": "kathmandu",
    "Bangladesh": "dhaka", "Belgium": "brussels", "Netherlands": "amsterdam", "Switzerland": "bern",
    "Iceland": "reykjavik", "Estonia": "tallinn", "Latvia": "riga", "Lithuania": "vilnius",
    "Belarus": "minsk", "Romania": "bucharest", "Bulgaria": "sofia", "Serbia": "belgrade",
    "Croatia": "zagreb", "Slovenia": "ljubljana", "Slovakia": "bratislava", "Albania": "tirana",
    "Georgia": "tbilisi", "Armenia": "yerevan", "Azerbaijan": "baku", "Uruguay": "montevideo",
    "Somalia": "mogadishu", "Tanzania": "dodoma", "Malawi": "lilongwe", "Botswana": "gaborone",
    "Namibia": "windhoek", "Mali": "bamako", "Niger": "niamey", "Liberia": "monrovia", "Togo": "lome",
    "Gabon": "libreville", "Mongolia": "ulaanbaatar", "Italy": "rome", "Spain": "madrid",
}
CAPITAL_SHOTS = ("Answer in one word, lower case.\nQ: What is the capital of Italy?\nA: rome\n"
                 "Q: What is the capital of Spain?\nA: madrid\n")


def _first_line(completion: str) -> str:
    return completion.strip(" ").split("\n", 1)[0].strip()


def capital(prompts, completions, answer, **kw):
    """1 when the completion's first line is the capital, in any case."""
    return [1.0 if _first_line(c).lower() == a else 0.0 for c, a in zip(completions, answer, strict=True)]


def capital_by_the_rule(prompts, completions, answer, **kw):
    """1 when the first line is the capital as the rule asks: one lower-case word, and the line ends.

    Credit for the format alone (any lower-case word) is a reward a constant answer can collect — the
    policy learnt to say ``kabul`` to every question — so the rule counts only on the right capital.
    """
    return [1.0 if "\n" in c and _first_line(c) == a else 0.0 for c, a in zip(completions, answer, strict=True)]


# ---- sums: partial credit for closeness -----------------------------------------------------------------

SUM_SHOTS = "12 + 35 = 47\n28 + 16 = 44\n"


def closeness(prompts, completions, answer, **kw):
    """1 for the right sum, falling linearly to 0 at 20 off; 0 when the first line is not a number."""
    out = []
    for c, a in zip(completions, answer, strict=True):
        m = re.fullmatch(r"-?\d+", _first_line(c))
        out.append(max(0.0, 1.0 - abs(int(m.group()) - int(a)) / 20.0) if m else 0.0)
    return out


def number_line(prompts, completions, **kw):
    """1 when the completion is one line holding a number of at most three digits (the list's format)."""
    return [1.0 if "\n" in c and re.fullmatch(r"\d{1,3}", _first_line(c)) else 0.0 for c in completions]


# ---- the two tasks --------------------------------------------------------------------------------------


@dataclass
class Task:
    """Records (``prompt``, ``answer``), held out first; reward functions and weights; the rule-exact test."""

    held: list[dict[str, Any]]
    train: list[dict[str, Any]]
    funcs: tuple[Any, ...]
    weights: tuple[float, ...]
    max_new: int

    def exact(self, completion: str, answer: Any) -> bool:
        return _first_line(completion) == str(answer) and "\n" in completion


def make_task(name: str, held_out: int) -> Task:
    rng = np.random.default_rng(0)
    if name == "capitals":
        names = [c for c in CAPITALS if c not in ("Italy", "Spain")]  # the two examples are not asked
        order = rng.permutation(len(names))
        recs = [{"prompt": f"{CAPITAL_SHOTS}Q: What is the capital of {names[i]}?\nA:", "answer": CAPITALS[names[i]]}
                for i in order]
        # the answer is one word: a few tokens for the word, one for the newline
        return Task(recs[:held_out], recs[held_out:], (capital, capital_by_the_rule), (1.0, 1.0), 5)
    if name == "sums":
        pairs = list(dict.fromkeys((int(a), int(b)) for a, b in rng.integers(10, 50, (600, 2))))
        recs = [{"prompt": f"{SUM_SHOTS}{a} + {b} =", "answer": a + b} for a, b in pairs]
        # " 58\n": Gemma's tokenizer splits digits, so a space, two digits and the newline
        return Task(recs[:held_out], recs[held_out:], (closeness, number_line), (1.0, 0.2), 4)
    raise SystemExit(f"unknown task {name!r}: capitals or sums")


def greedy_scores(lm: Any, task: Task) -> dict[str, Any]:
    """The held-out prompts answered greedily: the weighted reward (as in training), each function's mean and
    the rule-exact rate."""
    tok = lm.tokenizer
    ids = [tok.encode(r["prompt"], add_bos=True) for r in task.held]
    outs = lm.generate(ids, max_new_tokens=task.max_new)
    texts = [tok.decode([t for t in o[len(p):] if t not in tok.stop_ids]) for p, o in zip(ids, outs, strict=True)]
    answers = [r["answer"] for r in task.held]
    per = {f.__name__: np.asarray(f(None, texts, answer=answers)) for f in task.funcs}
    total = sum(w * per[f.__name__] for f, w in zip(task.funcs, task.weights, strict=True))
    return {"reward": float(np.mean(total)), **{k: float(v.mean()) for k, v in per.items()},
            "exact": float(np.mean([task.exact(t, a) for t, a in zip(texts, answers, strict=True)])),
            "examples": [_first_line(t) for t in texts[:8]]}


def _line(tag: str, s: dict[str, Any]) -> str:
    parts = ", ".join(f"{k} {v:.3f}" for k, v in s.items() if k != "examples")
    return f"held-out {tag}: {parts}; e.g. {s['examples']}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="capitals", choices=["capitals", "sums"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--num-iterations", type=int, default=1)
    ap.add_argument("--held-out", type=int, default=None, help="held-out prompts (capitals 24, sums 64)")
    ap.add_argument("--json")
    args = ap.parse_args()

    from gemmax.api import CausalLM
    from gemmax.io.bundled import default_model_path

    task = make_task(args.task, args.held_out or (24 if args.task == "capitals" else 64))
    lm = CausalLM.from_preset(default_model_path())
    lm.enable_lora(rank=8, alpha=16, targets=("query", "key", "value", "attention_output"))
    t0 = time.perf_counter()
    before = greedy_scores(lm, task)
    print(_line("before", before) + f" ({time.perf_counter() - t0:.0f}s)", flush=True)
    longest = max(len(lm.tokenizer.encode(r["prompt"], add_bos=True)) for r in task.train)
    seq = -(-(longest + task.max_new) // 8) * 8  # rows just long enough, to a multiple of 8
    t0 = time.perf_counter()
    h = lm.fit(task.train, objective="grpo", reward_funcs=list(task.funcs), reward_weights=list(task.weights),
               num_generations=args.generations, max_completion_length=task.max_new, temperature=1.0,
               loss_type="grpo", num_iterations=args.num_iterations, steps=args.steps,
               batch_size=args.generations * args.prompts_per_step, sequence_length=seq, learning_rate=args.lr,
               warmup_steps=2, schedule="constant", progress=True)
    train_s = time.perf_counter() - t0
    rewards = [e["reward"] for e in h.extra]
    after = greedy_scores(lm, task)
    res = {"task": args.task, "before": before, "after": after, "train_seconds": train_s, "steps": args.steps,
           "reward_first5": float(np.mean(rewards[:5])), "reward_last5": float(np.mean(rewards[-5:])),
           "rewards": rewards, "generation_seconds": [e["generation_seconds"] for e in h.extra],
           "step_seconds": h.step_seconds, "settings": vars(args)}
    print(_line("after", after), flush=True)
    print(f"training reward (sampled) {res['reward_first5']:.3f} -> {res['reward_last5']:.3f} (first / last 5 "
          f"steps); {args.steps} steps in {train_s:.0f}s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
