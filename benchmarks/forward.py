"""Forward (prefill) throughput: gemmax vs transformers on the same Gemma-3-270M-shaped model and weights.

gemmax builds a random model from the ``gemma3_270m`` preset, exports it as a Hugging Face folder, and
transformers loads that folder (``Gemma3ForCausalLM``), so both run the same weights. Both run batch 1,
float32, on the CPU with the same thread count. The two are timed interleaved (one gemmax run, one
transformers run, repeated) so a shared, noisy machine slows both alike; medians are reported.

    python benchmarks/forward.py                 # 512 tokens, 10 timed runs each
    python benchmarks/forward.py --quick         # 3 timed runs
    python benchmarks/forward.py --seq 256 --repeats 20 --out benchmarks/results/forward.txt
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

from _common import Report, int_flags, parser


def parse_args() -> argparse.Namespace:
    ap = parser(__doc__)
    ap.add_argument("--preset", default="gemma3_270m")
    int_flags(ap, seq=512, repeats=10, warmup=2, threads=2)
    ap.add_argument("--attn", default="auto", choices=["auto", "sdpa", "eager"],
                    help="transformers attention; auto times both and keeps the faster")
    ap.add_argument("--quick", action="store_true", help="3 timed runs, 1 warm-up")
    ap.add_argument("--out", default=None, help="also write the report to this file")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    if args.quick:
        args.repeats, args.warmup = 3, 1
    # XLA:CPU sizes its thread pool to the machine's cores; torch is pinned to --threads (default 2,
    # this machine's core count) so both use the same number.
    import jax
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    import gemmax
    from gemmax.api import CausalLM
    from gemmax.models.gemma import model as gmodel
    from gemmax.models.gemma.config import to_hf_config

    torch.set_num_threads(args.threads)
    say = Report()

    cfg = gemmax.get_preset(args.preset)
    lm = CausalLM.from_config(cfg, seed=0, dtype="float32")
    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.vocab_size, size=(1, args.seq), dtype=np.int64)
    ids[0, 0] = cfg.bos_token_id

    # gemmax: jit of the full causal forward over [1, seq] (seq a power of two: no padding)
    fwd = jax.jit(lambda p, t: gmodel.forward(p, cfg, t))
    tok_j = jax.numpy.asarray(ids.astype(np.int32))
    t0 = time.perf_counter()
    compiled = fwd.lower(lm.params, tok_j).compile()
    compile_s = time.perf_counter() - t0

    def run_gemmax() -> np.ndarray:
        return np.asarray(compiled(lm.params, tok_j))

    with tempfile.TemporaryDirectory() as tmp:
        lm.export_hf(tmp)
        hf_type = to_hf_config(cfg)["architectures"][0]
        models = {}
        attns = ["sdpa", "eager"] if args.attn == "auto" else [args.attn]
        t0 = time.perf_counter()
        for a in attns:
            models[a] = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation=a).eval()
        hf_load_s = (time.perf_counter() - t0) / len(attns)
    tok_t = torch.from_numpy(ids)

    def run_hf(m) -> np.ndarray:
        with torch.inference_mode():
            return m(input_ids=tok_t, use_cache=False).logits.float().numpy()

    # first calls (gemmax: first execution after compile; transformers: first call, lazy init)
    t0 = time.perf_counter()
    ref = run_gemmax()
    g_first = time.perf_counter() - t0
    hf_first = {}
    hf_out = {}
    for a, m in models.items():
        t0 = time.perf_counter()
        hf_out[a] = run_hf(m)
        hf_first[a] = time.perf_counter() - t0
    diffs = {a: float(np.max(np.abs(ref - o))) for a, o in hf_out.items()}
    for _ in range(args.warmup - 1):
        run_gemmax()
        for m in models.values():
            run_hf(m)

    times: dict[str, list[float]] = {"gemmax": [], **{f"transformers[{a}]": [] for a in models}}
    for _ in range(args.repeats):  # interleaved
        t0 = time.perf_counter()
        run_gemmax()
        times["gemmax"].append(time.perf_counter() - t0)
        for a, m in models.items():
            t0 = time.perf_counter()
            run_hf(m)
            times[f"transformers[{a}]"].append(time.perf_counter() - t0)

    med = {k: statistics.median(v) for k, v in times.items()}
    best_hf = min((k for k in med if k.startswith("transformers")), key=med.get)
    say(f"# forward (prefill) benchmark: {args.preset} ({hf_type}), batch 1, {args.seq} tokens, float32")
    say(f"# {platform.machine()} {os.cpu_count()} cores, threads={args.threads}, jax {jax.__version__} "
        f"({jax.devices()[0].platform}), torch {torch.__version__}, python {sys.version.split()[0]}")
    say(f"# {args.repeats} timed runs each after {args.warmup} warm-up, interleaved; machine may be shared")
    say()
    say(f"{'engine':<22}{'median ms':>11}{'min ms':>9}{'max ms':>9}{'tokens/s':>11}{'first call s':>14}")
    for k, v in times.items():
        first = g_first if k == "gemmax" else hf_first[k[len('transformers['):-1]]
        say(f"{k:<22}{med[k] * 1e3:>11.1f}{min(v) * 1e3:>9.1f}{max(v) * 1e3:>9.1f}"
            f"{args.seq / med[k]:>11.0f}{first:>14.2f}")
    say()
    say(f"gemmax compile (excluded above): {compile_s:.2f} s; transformers from_pretrained: {hf_load_s:.2f} s")
    for a, d in diffs.items():
        say(f"max |logits gemmax - transformers[{a}]| = {d:.2e}  (logit scale: max |logit| = "
            f"{float(np.max(np.abs(ref))):.1f})")
    ratio = med[best_hf] / med["gemmax"]
    per_run = [h / g for g, h in zip(times["gemmax"], times[best_hf], strict=True)]
    say(f"speed-up gemmax / {best_hf}: {ratio:.2f}x (median of per-pair ratios {statistics.median(per_run):.2f}x)")
    say.save(args.out)


if __name__ == "__main__":
    main()
