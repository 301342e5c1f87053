"""Sentence embeddings per second: ``gemmax.TextEncoder.encode`` vs ``SentenceTransformer.encode`` on the same
EmbeddingGemma-shaped model and weights.

gemmax builds a random model from the ``embeddinggemma_300m`` preset (``--layers`` makes it shallower for a
quick run; ``--tiny`` uses the few-kilobyte test shapes), with Gemma's real 262k-piece tokenizer (from the
bundled Gemma 3 270M GGUF), and writes it with ``TextEncoder.save`` in the published sentence-transformers
layout; sentence-transformers loads that folder, so both run the same weights and tokenizer. Both encode the
same texts (varied lengths, 8 to ~120 tokens) with ``batch_size=32``, float32, on the CPU with the same
thread count, timed interleaved (one gemmax run, one sentence-transformers run, repeated); medians are
reported, with the largest difference between the two sides' embeddings.

    python benchmarks/embed.py                   # 300M shapes, 256 texts, 3 timed runs each
    python benchmarks/embed.py --layers 6 --texts 128 --repeats 2
    python benchmarks/embed.py --tiny            # seconds: a smoke run
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

WORDS = ("the model reads every token of a sentence and returns one vector for the whole of it so that "
         "similar meanings land close together search results documents queries retrieval clustering "
         "classification of short and long texts with prompts for each task on a small machine").split()


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the preset's 24)")
    ap.add_argument("--tiny", action="store_true", help="the tiny test shapes (a smoke run)")
    ap.add_argument("--texts", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--prompt-name", default="document")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="also write the report to this file")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    from gemmax import TextEncoder
    from gemmax.io.bundled import default_model_path
    from gemmax.io.tokenizer import Tokenizer
    from gemmax.models import embedding_gemma as eg

    torch.set_num_threads(args.threads)
    lines: list[str] = []

    def say(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    tok = Tokenizer.from_gguf(default_model_path())
    if args.tiny:
        cfg = eg.tiny_config(vocab_size=tok.vocab_size)
    else:
        cfg = eg.PRESETS["embeddinggemma_300m"]
        if args.layers:
            b = cfg.backbone
            types = tuple("global" if (i + 1) % 6 == 0 else "local" for i in range(args.layers))
            cfg = cfg.replace(backbone=b.replace(num_layers=args.layers, layer_types=types))
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, int(rng.integers(6, 100)))) for _ in range(args.texts)]

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        enc = TextEncoder.from_config(cfg, seed=0, tokenizer=tok)
        folder = enc.save(os.path.join(tmp, "embeddinggemma"))
        st = SentenceTransformer(str(folder), device="cpu")
        build = time.perf_counter() - t0
        n_tokens = sum(len(x) for x in enc.tokenize(texts, enc.resolve_prompt(args.prompt_name)))
        counts = cfg.param_count()
        say(f"# embed.py — {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"torch threads {args.threads}, python {sys.version.split()[0]}")
        say(f"model: {cfg.name} shapes, {cfg.backbone.num_layers} layers, {counts['total']:,} parameters, "
            f"float32, random weights (built and saved in {build:.0f}s)")
        say(f"{len(texts)} texts, {n_tokens} tokens with the {args.prompt_name!r} prompt "
            f"({n_tokens / len(texts):.0f} a text), batch_size {args.batch_size}")

        def run_gemmax() -> np.ndarray:
            return enc.encode(texts, prompt_name=args.prompt_name, batch_size=args.batch_size)

        def run_st() -> np.ndarray:
            return st.encode(texts, prompt_name=args.prompt_name, batch_size=args.batch_size)

        t0 = time.perf_counter()
        first_g = run_gemmax()
        say(f"gemmax first call (compiles each bucketed batch shape): {time.perf_counter() - t0:.1f}s")
        first_s = run_st()
        say(f"max |gemmax - sentence-transformers| over the embeddings: {np.abs(first_g - first_s).max():.2e}")
        times: dict[str, list[float]] = {"gemmax": [], "sentence-transformers": []}
        for _ in range(args.repeats):
            for name, fn in (("gemmax", run_gemmax), ("sentence-transformers", run_st)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        say()
        say("| | median s | sentences/s | tokens/s |")
        say("|---|---|---|---|")
        rate = {}
        for name, ts in times.items():
            med = statistics.median(ts)
            rate[name] = len(texts) / med
            say(f"| {name} | {med:.2f} | {rate[name]:.1f} | {n_tokens / med:.0f} |")
        per_round = [s / g for g, s in zip(times["gemmax"], times["sentence-transformers"], strict=True)]
        say()
        say(f"gemmax / sentence-transformers: {rate['gemmax'] / rate['sentence-transformers']:.2f}x sentences/s "
            f"(per round: {', '.join(f'{r:.2f}' for r in per_round)})")
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
