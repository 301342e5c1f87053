"""Structured output's cost: decode tokens/s with a JSON schema vs without, on the real Gemma 3 270M.

The engine as ``gemmax serve`` runs it (float32, greedy): B requests decode together, ``--chunk`` tokens per
dispatch when no row is constrained; a constrained row needs its mask (computed by llguidance on the host)
before every token, so while one is live the chunk is one token. Four configurations, interleaved and
repeated, medians reported:

- ``free``: B unconstrained rows, chunks of ``--chunk`` tokens (the baseline);
- ``free, chunk 1``: the same rows one token per dispatch (what a constrained neighbour costs them);
- ``schema``: B rows constrained by a JSON schema;
- ``free, schema's lengths``: B free rows, each as long as the matching ``schema`` row of the same repeat.
  Constrained answers end when their JSON does, at different lengths, so the batch empties towards the end
  of a ``schema`` run; these rows empty it the same way, and ``schema`` against them is the constraint's
  own cost (masks, one-token chunks) on the same work;
- ``mixed``: one constrained row and B - 1 free rows.

    python benchmarks/structured.py                  # batch 1 and 8, up to 96 new tokens
    python benchmarks/structured.py --batch 8 --repeats 2

Tokens/s counts every generated token over the wall time of the decode loop (prefill excluded); the mask
time is the host's share (llguidance's ``compute_mask`` plus the copy), measured inside the same loop.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import numpy as np
from _common import save_lines

from gemmax.api import CausalLM
from gemmax.engine.constrain import Constraint
from gemmax.engine.generate import Engine, Request, SamplingParams, bucket
from gemmax.io.bundled import default_model_path

SCHEMA = {"type": "object", "properties": {  # bounded (strings, arrays), so every answer ends within the budget
    "title": {"type": "string", "maxLength": 24},
    "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
    "genres": {"type": "array", "maxItems": 2, "items": {"enum": ["comedy", "drama", "action", "horror",
                                                                  "romance", "documentary"]}},
    "cast": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                         "role": {"type": "string", "maxLength": 16}},
        "required": ["name", "role"], "additionalProperties": False}}},
    "required": ["title", "year", "genres", "cast"], "additionalProperties": False}
PROMPTS = ["A comedy movie, as JSON:\n", "Describe a film in JSON:\n", "Movie record (JSON):\n",
           "A classic drama, as a JSON object:\n"]


def run(eng: Engine, tok: Any, batch: int, new: int, chunk: int, constrained: int,
        lengths: list[int] | None = None) -> dict[str, Any]:
    """One decode of ``batch`` requests (the first ``constrained`` under the schema); tokens/s, mask time and
    each row's length. ``lengths`` gives free rows their own token budgets instead of ``new``."""
    cons = Constraint.json_schema(SCHEMA)
    reqs = [Request(tok.encode(PROMPTS[i % len(PROMPTS)]),
                    SamplingParams(max_new_tokens=lengths[i] if lengths else new,
                                   stop_ids=tuple(tok.stop_ids) if i < constrained else (),
                                   constraint=cons if i < constrained else None))
            for i in range(batch)]
    eng.add(reqs)
    mask_s = 0.0
    fill = eng._masks

    def timed(rows: Any) -> np.ndarray:
        nonlocal mask_s
        t = time.perf_counter()
        out = fill(rows)
        mask_s += time.perf_counter() - t
        return out

    eng._masks = timed
    t0 = time.perf_counter()
    while eng.has_work():
        eng.step(chunk)
    wall = time.perf_counter() - t0
    eng._masks = fill
    n = sum(len(r.new_ids) - 1 for r in reqs)  # the first token of each came from the prefill
    valid = 0
    for r in reqs[:constrained]:
        try:
            json.loads(tok.decode([t for t in r.new_ids if t not in tok.stop_ids]))
            valid += 1
        except ValueError:
            pass
    for r in reqs:
        eng.release(r)
    return {"tok_s": n / wall, "tokens": n, "mask_ms_per_step": 1000 * mask_s / max(1, n // batch),
            "valid": valid, "lengths": [len(r.new_ids) for r in reqs]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model handle (default: the bundled Gemma 3 270M)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new", type=int, default=96, help="new tokens of a free row; the most for a constrained one")
    ap.add_argument("--chunk", type=int, default=8, help="tokens per dispatch of free rows (serve's default: 8)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    lm = CausalLM.from_preset(args.model or default_model_path())
    tok = lm.tokenizer
    lines = [f"model {args.model or 'Gemma 3 270M (bundled GGUF)'}, float32, greedy, {args.new} new tokens, "
             f"chunk {args.chunk}, {args.repeats} interleaved repeats (medians)", "",
             "| batch | config | tok/s | vs free | vs free rows of the same lengths | mask ms/step | valid JSON |",
             "|---|---|---|---|---|---|---|"]
    for b in args.batch:
        eng = Engine(lm.params, lm.config, max_batch=b, max_len=bucket(args.new + 32), chunk=args.chunk,
                     tokenizer=tok)
        same = "free, schema's lengths"
        configs = {"free": (args.chunk, 0), "free, chunk 1": (1, 0), "schema": (args.chunk, b),
                   same: (args.chunk, 0), "mixed (1 constrained)": (args.chunk, 1)}
        for chunk, c in configs.values():  # compile every variant first
            run(eng, tok, b, 4, chunk, c)
        res: dict[str, list[dict[str, Any]]] = {k: [] for k in configs}
        for _ in range(args.repeats):
            for k, (chunk, c) in configs.items():
                lengths = res["schema"][-1]["lengths"] if k == same else None
                res[k].append(run(eng, tok, b, args.new, chunk, c, lengths))
        med = {k: statistics.median(r["tok_s"] for r in res[k]) for k in configs}
        for k, (_, c) in configs.items():
            mask = statistics.median(r["mask_ms_per_step"] for r in res[k])
            valid = f"{sum(r['valid'] for r in res[k])}/{c * args.repeats}" if c else ""
            vs_same = f"{med[k] / med[same]:.2f}x" if k == "schema" else ""
            lines.append(f"| {b} | {k} | {med[k]:.1f} | {med[k] / med['free']:.2f}x | {vs_same} | {mask:.2f} "
                         f"| {valid} |")
        print("\n".join(lines[-len(configs):]), flush=True)
    print("\n" + "\n".join(lines))
    save_lines(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
