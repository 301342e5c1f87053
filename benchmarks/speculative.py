"""Prefix caching and prompt-lookup speculation on the real Gemma 3 270M (the bundled Q4_K_M GGUF).

1. Time to first token for C clients that share a long system prompt (default 32 clients, ~500 tokens),
   all arriving at once, each with its own question: the engine without a prefix cache, with a cold one
   (the burst's first request computes the shared blocks, the rest reuse them) and with a warm one (the
   system prompt was seen before). p50 / p90 over the clients, medians over repeats.
2. Decode tokens/s of one greedy request that rewrites a given paragraph, plain vs prompt-lookup
   speculation (same tokens checked), interleaved repeats.

    python benchmarks/speculative.py [--clients 32] [--max-batch 32] [--repeats 3] [--new 128] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
from _common import save_lines

from gemmax import CausalLM
from gemmax.engine.generate import Engine, Request, SamplingParams, bucket
from gemmax.engine.prefix_cache import PrefixCache
from gemmax.engine.speculative import PromptLookup, Speculator
from gemmax.io.bundled import default_model_path

SYSTEM = ("You are a careful assistant for a public library. Answer questions about opening hours, membership, "
          "borrowing rules, fines, events, the catalogue and the reading rooms. Be brief and polite, say when "
          "you do not know, and never invent a rule. ")
QUESTIONS = ["How long can I keep a book?", "Do you open on Sundays?", "Can children get a card?",
             "Where is the quiet room?", "How do I renew a loan online?", "Is there a fee for printing?",
             "Can I return books at another branch?", "Do you lend e-readers?"]
PARAGRAPH = ("The committee have met on tuesday and they has decided that the new library will be open from "
             "nine in the morning until eight in the evening, except on sundays when it will be closed. "
             "Members will be able to borrow up to ten books at a time, and the books can be kept for three "
             "weeks, after which a small fine will be charged for each day that the book is late. The reading "
             "rooms will be quiet spaces, and phones should be switched off before entering them.")


def system_ids(tok, target: int) -> list[int]:
    """A system prompt of about ``target`` tokens (the instructions repeated with numbered rules)."""
    text, i = SYSTEM, 1
    while len(tok.encode(text)) < target:
        text += f"Rule {i}: {SYSTEM}"
        i += 1
    return tok.encode(text)[:target]


def ttft_run(lm: CausalLM, prompts: list[list[int]], max_batch: int, new: int, pc: PrefixCache | None) -> list[float]:
    """Every prompt arrives at t=0; slots are filled as they free up, as the server's scheduler does."""
    max_len = bucket(max(map(len, prompts)) + new + 1)
    eng = Engine(lm.params, lm.config, max_batch=max_batch, max_len=max_len, chunk=8, prefix_cache=pc)
    waiting = [Request(p, SamplingParams(max_new_tokens=new)) for p in prompts]
    reqs = list(waiting)
    t0 = time.perf_counter()
    while waiting or eng.has_work():
        free = eng.free_slots()
        if free and waiting:
            eng.add(waiting[: len(free)])
            waiting = waiting[len(free):]
        if eng.has_work():
            eng.step()
        for r in reqs:
            if r.done and r.slot >= 0 and eng.requests[r.slot] is r:
                eng.release(r)
    return [r.first_token_time - t0 for r in reqs]


def bench_prefix(lm: CausalLM, a: argparse.Namespace) -> list[str]:
    tok = lm.tokenizer
    sys_ids = system_ids(tok, a.system_tokens)
    rows: dict[str, list[tuple[float, float]]] = {"no prefix cache": [], "cold prefix cache": [],
                                                  "warm prefix cache": []}

    def prompts(rep: int) -> list[list[int]]:
        return [sys_ids + tok.encode(f"\nQuestion {rep}.{i}: {QUESTIONS[i % len(QUESTIONS)]}\nAnswer:",
                                     add_bos=False) for i in range(a.clients)]

    # compile every shape once, untimed
    ttft_run(lm, prompts(-1), a.max_batch, a.ttft_new, None)
    warm = PrefixCache()
    ttft_run(lm, prompts(-2), a.max_batch, a.ttft_new, warm)
    ttft_run(lm, prompts(-3), a.max_batch, a.ttft_new, warm)
    for rep in range(a.repeats):
        for name in rows:
            pc = None if name == "no prefix cache" else warm if name.startswith("warm") else PrefixCache()
            t = ttft_run(lm, prompts(rep), a.max_batch, a.ttft_new, pc)
            rows[name].append((float(np.percentile(t, 50)), float(np.percentile(t, 90))))
            print(f"  {name}: p50 {rows[name][-1][0]:.2f}s p90 {rows[name][-1][1]:.2f}s", file=sys.stderr)
    base = statistics.median(p for p, _ in rows["no prefix cache"])
    out = [f"## time to first token: {a.clients} clients, a {len(sys_ids)}-token shared system prompt, "
           f"{a.max_batch} slots, {a.ttft_new} new tokens each",
           "", "| | p50 s | p90 s | p50 vs no cache |", "|---|---|---|---|"]
    for name, v in rows.items():
        p50, p90 = statistics.median(p for p, _ in v), statistics.median(q for _, q in v)
        out.append(f"| {name} | {p50:.2f} | {p90:.2f} | {base / p50:.1f}x lower |")
    return out


def decode_run(lm: CausalLM, ids: list[int], new: int, spec: Speculator | None) -> tuple[list[int], float]:
    """Greedy decode of ``new`` tokens (no stop tokens, so both runs decode the same count) -> (tokens, decode
    seconds from the first token to the last)."""
    eng = Engine(lm.params, lm.config, max_batch=1, max_len=bucket(len(ids) + new + 1), chunk=16, speculator=spec)
    r = Request(ids, SamplingParams(max_new_tokens=new))
    eng.add([r])
    t0 = time.perf_counter()
    while not r.done:
        eng.step()
    return r.new_ids, time.perf_counter() - t0


def bench_lookup(lm: CausalLM, a: argparse.Namespace) -> list[str]:
    tok = lm.tokenizer
    prompt = (f"Rewrite the paragraph below, correcting its grammar and keeping everything else.\n\n"
              f"Paragraph:\n{PARAGRAPH}\n\nCorrected paragraph:\n")
    ids = tok.encode(prompt)
    plain_t, spec_t, same, acc = [], [], [], []
    decode_run(lm, ids, a.new, None)  # compile
    decode_run(lm, ids, a.new, Speculator(PromptLookup(), a.speculate_tokens))
    for _ in range(a.repeats):
        p, tp = decode_run(lm, ids, a.new, None)
        spec = Speculator(PromptLookup(), a.speculate_tokens)
        s, ts = decode_run(lm, ids, a.new, spec)
        plain_t.append((len(p) - 1) / tp)
        spec_t.append((len(s) - 1) / ts)
        same.append(p == s)
        acc.append(spec.stats["emitted"] / max(spec.stats["steps"], 1))
        print(f"  plain {plain_t[-1]:.1f} tok/s, prompt lookup {spec_t[-1]:.1f} tok/s, "
              f"{acc[-1]:.2f} tokens a step, same tokens: {same[-1]}", file=sys.stderr)
    tp, ts = statistics.median(plain_t), statistics.median(spec_t)
    return [f"## prompt-lookup speculation: rewrite a paragraph ({len(ids)}-token prompt), greedy, "
            f"{a.new} new tokens, batch 1, {a.speculate_tokens} draft tokens a step",
            "", "| | decode tok/s | vs plain |", "|---|---|---|",
            f"| plain | {tp:.1f} | 1.00x |",
            f"| prompt lookup | {ts:.1f} | {ts / tp:.2f}x |",
            "", f"Tokens a step {statistics.median(acc):.2f}; same tokens as plain decoding in "
            f"{sum(same)} of {len(same)} runs. Continuation: {tok.decode(p)[:300]!r}"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint (default: the bundled Gemma 3 270M)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--system-tokens", type=int, default=500)
    ap.add_argument("--ttft-new", type=int, default=8, help="tokens each client generates in the TTFT run")
    ap.add_argument("--new", type=int, default=128, help="tokens decoded in the rewrite run")
    ap.add_argument("--speculate-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip", default="", help="comma list of: prefix, lookup")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    lm = CausalLM.from_preset(a.model or default_model_path())
    load = os.getloadavg()
    out = [f"# benchmarks/speculative.py ({lm.config.name or 'model'}, float32, load at start "
           f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f})", ""]
    skip = set(a.skip.split(","))
    if "prefix" not in skip:
        out += bench_prefix(lm, a) + [""]
    if "lookup" not in skip:
        out += bench_lookup(lm, a)
    out.append(f"\nload at end {os.getloadavg()[0]:.1f}")
    print("\n".join(out))
    save_lines(a.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
