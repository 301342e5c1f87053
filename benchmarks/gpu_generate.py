"""Generation on one GPU: gemmax vs transformers (torch, CUDA), same weights, same prompts, one run.

No checkpoint travels to a GPU machine of ours (it reaches no network), so the model is a preset's shape
with random weights: ``CausalLM.from_config(preset)``, exported with ``export_hf`` and loaded by
transformers from that folder. Speed does not depend on the values; the parity line checks that both
engines compute the same function (last-position logits of one prompt, in float32 with full-precision
matmuls on both sides, so TF32 does not blur the comparison) before anything is timed.

Measured, interleaved (each round runs both engines once): batch-1 decode tokens/s of ``--new`` greedy
tokens and the achieved weight bandwidth (GB/s, gpt-fast's figure); one ``--prefill``-token prompt to its
last logits; ``--batch`` prompts x ``--new`` tokens end to end. transformers runs its eager ``generate``
with sdpa attention and its default dynamic cache; gemmax its ``Engine`` (scan over layers, static
cache, ``--chunk`` decode steps per dispatch).

    python benchmarks/gpu_generate.py --preset gemma3_1b --dtype bfloat16
    python benchmarks/gpu_generate.py --preset gemma3_270m --new 8 --prefill 64 --batch 2   # CPU smoke run
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Report, int_flags, parser  # noqa: E402
from generate import GemmaxRunner, HFRunner, prompt_ids  # noqa: E402


def parity(lm, hf_model, prompt: list[int]) -> str:
    """Float32 last-position logits of both engines with exact matmuls: max |diff| relative to max |logit|
    and whether the argmax agrees."""
    import jax
    import numpy as np
    import torch

    with jax.default_matmul_precision("highest"):
        ours = np.asarray(lm.logits(prompt), np.float32)[0, -1]
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.inference_mode():
            ids = torch.tensor([prompt], device=hf_model.device)
            theirs = hf_model(input_ids=ids).logits[0, -1].float().cpu().numpy()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    rel = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
    same = int(np.argmax(ours)) == int(np.argmax(theirs))
    return f"parity (float32, exact matmuls): max |diff| / max |logit| = {rel:.2e}, same argmax: {same}"


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--preset", default="gemma3_1b")
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    int_flags(ap, new=128, prompt_len=20, prefill=512, batch=16, repeats=3, chunk=16)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import jax
    import ml_dtypes
    import numpy as np
    import torch

    from gemmax.api import CausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    say = Report()

    say(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__} on {device}"
        + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else ""))
    t0 = time.perf_counter()
    f32 = CausalLM.from_config(args.preset, seed=0, dtype="float32")
    with tempfile.TemporaryDirectory() as tmp:
        f32.export_hf(tmp, dtype=np.float32)
        hf32 = HFRunner("hf-f32", tmp, "float32", device=device)
        cfg = f32.config
        say(f"model: {args.preset} with random weights ({cfg.param_count()['total'] / 1e9:.2f} B parameters),"
            f" built + exported + loaded in {time.perf_counter() - t0:.0f} s")
        say(parity(f32, hf32.model, prompt_ids(64, cfg.vocab_size, 3, cfg.bos_token_id)))
        if args.dtype == "float32":
            lm, hf = f32, hf32
        else:
            del f32, hf32
            lm = CausalLM.from_config(args.preset, seed=0, dtype=args.dtype)
            lm.export_hf(tmp, dtype=ml_dtypes.bfloat16)
            hf = HFRunner(f"hf-{args.dtype}", tmp, args.dtype, device=device)
    ours = GemmaxRunner(f"gemmax-{args.dtype}", "", args.dtype, None, args.chunk, lm=lm)
    runners = [ours, hf]

    prompt = prompt_ids(args.prompt_len, cfg.vocab_size, 0, cfg.bos_token_id)
    long = prompt_ids(args.prefill, cfg.vocab_size, 1, cfg.bos_token_id)
    batch = [prompt_ids(args.prompt_len, cfg.vocab_size, 10 + i, cfg.bos_token_id) for i in range(args.batch)]
    for r in runners:
        t0 = time.perf_counter()
        r.warm(prompt, args.new, long, batch)
        say(f"{r.name}: warm-up (compilation) {time.perf_counter() - t0:.1f} s, weights {r.bytes / 1e9:.2f} GB")

    times: dict[str, dict[str, list[float]]] = {r.name: {"decode": [], "prefill": [], "batch": []} for r in runners}
    for _ in range(args.repeats):
        for r in runners:
            times[r.name]["decode"].append(r.decode(prompt, args.new)[0])
            times[r.name]["prefill"].append(r.prefill(long))
            times[r.name]["batch"].append(r.batch(batch, args.new))

    med = {n: {k: statistics.median(v) for k, v in t.items()} for n, t in times.items()}
    say()
    say(f"medians of {args.repeats} interleaved rounds; decode batch 1, {args.new} new tokens after a "
        f"{args.prompt_len}-token prompt; prefill {args.prefill} tokens; batch {args.batch} x {args.new}")
    say(f"{'engine':<16}{'decode tok/s':>14}{'GB/s':>8}{'prefill tok/s':>15}{'batch tok/s':>13}")
    for r in runners:
        m = med[r.name]
        dec = (args.new - 1) / m["decode"]
        say(f"{r.name:<16}{dec:>14.1f}{r.bytes * dec / 1e9:>8.0f}{args.prefill / m['prefill']:>15.0f}"
            f"{args.batch * args.new / m['batch']:>13.0f}")
    a, b = med[ours.name], med[hf.name]
    say(f"gemmax / transformers: decode {b['decode'] / a['decode']:.2f}x, prefill {b['prefill'] / a['prefill']:.2f}x,"
        f" batch {b['batch'] / a['batch']:.2f}x")
    say.save(args.out)


if __name__ == "__main__":
    main()
