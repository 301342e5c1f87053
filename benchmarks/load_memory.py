"""Peak host memory while loading a checkpoint with ``CausalLM.from_preset(folder)``.

A synthetic Gemma-shaped checkpoint (default: the gemma3_270m shapes, random float32 weights, ~1.07 GB)
is written to a temporary Hugging Face folder by a separate process. Then, for each dtype, a fresh
subprocess imports jax and gemmax, records its RSS high-water mark (``ru_maxrss``) as the baseline, loads
the folder, and reports the new high-water mark. The increase is compared with the model's size in that
dtype. A sampling thread also records the peak of anonymous memory
(RssAnon: real allocations) and of file-backed memory (RssFile: pages of the memory-mapped safetensors the
kernel counts in RSS while they are mapped and resident), which tells where any excess comes from.

    python benchmarks/load_memory.py
    python benchmarks/load_memory.py --layers 30 --dtypes float32 bfloat16 --out benchmarks/results/load_memory.txt
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

from _common import Report, parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = parser(__doc__)
    ap.add_argument("--preset", default="gemma3_270m")
    ap.add_argument("--layers", type=int, default=None, help="override the layer count (bigger checkpoint)")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=1, help="fresh-process loads per dtype (median)")
    ap.add_argument("--quick", action="store_true", help="kept for symmetry; the default run is already short")
    ap.add_argument("--out", default=None)
    ap.add_argument("--make", default=None, help=argparse.SUPPRESS)  # internal: write checkpoint here
    ap.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # internal: folder to load
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def _config(args: argparse.Namespace):
    import dataclasses

    import gemmax

    cfg = gemmax.get_preset(args.preset)
    if args.layers:
        types = tuple(cfg.layer_types[i % len(cfg.layer_types)] for i in range(args.layers))
        cfg = dataclasses.replace(cfg, num_layers=args.layers, layer_types=types)
    return cfg


def make_checkpoint(args: argparse.Namespace) -> None:
    """Write random float32 weights of the config's shapes as a Hugging Face folder (no jax arrays)."""
    import numpy as np

    from gemmax.io.hf import export_hf_folder
    from gemmax.models.gemma import model as gm

    cfg = _config(args)
    rng = np.random.default_rng(0)
    flat = {p: (rng.standard_normal(s.shape, dtype=np.float32) * 0.02) for p, s in gm.param_specs(cfg).items()}
    export_hf_folder(args.make, flat, cfg, dtype=np.float32)
    print(json.dumps({"bytes": sum(a.nbytes for a in flat.values())}))


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) * 1024
    return out


def measure(args: argparse.Namespace) -> None:
    """In a fresh process: baseline after imports, then the high-water mark of loading."""
    import resource

    import jax
    import jax.numpy as jnp  # noqa: F401

    import gemmax  # noqa: F401
    from gemmax.api import CausalLM

    jax.devices()  # initialise the backend before the baseline
    base_hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    base = _status()
    peak = {"RssAnon": 0, "RssFile": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            s = _status()
            for k in peak:
                peak[k] = max(peak[k], s[k])
            time.sleep(0.002)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    lm = CausalLM.from_preset(args.measure, dtype=args.dtype)
    jax.block_until_ready(lm.params)
    load_s = time.perf_counter() - t0
    stop.set()
    th.join()
    after = _status()
    hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model = sum(int(a.size) * a.dtype.itemsize for a in jax.tree_util.tree_leaves(lm.params))
    print("MEM_JSON " + json.dumps({
        "model": model, "base_hwm": base_hwm, "hwm": hwm, "load_s": load_s,
        "anon_base": base["RssAnon"], "anon_peak": peak["RssAnon"], "file_base": base["RssFile"],
        "file_peak": peak["RssFile"], "rss_after": after["VmRSS"], "rss_base": base["VmRSS"],
        "anon_after": after["RssAnon"]}), flush=True)


def main() -> None:
    args = parse_args()
    if args.make or args.measure:  # internal: one fresh process's single job
        (make_checkpoint if args.make else measure)(args)
        return
    import statistics

    say = Report()

    me = os.path.abspath(__file__)
    common = ["--preset", args.preset] + (["--layers", str(args.layers)] if args.layers else [])
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "ckpt")
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, me, "--make", folder, *common], capture_output=True, text=True,
                           check=True)
        ck_bytes = json.loads(p.stdout.strip().splitlines()[-1])["bytes"]
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
        say(f"# load memory: synthetic {args.preset}{f' ({args.layers} layers)' if args.layers else ''} "
            f"checkpoint, float32 safetensors, {size / 1e9:.2f} GB on disk (written in "
            f"{time.perf_counter() - t0:.0f} s by a separate process)")
        say("# each load in a fresh subprocess; baseline = ru_maxrss after `import jax, gemmax`; "
            f"{args.repeats} load(s) per dtype; machine shared")
        say()
        say(f"{'dtype':<10}{'model MB':>9}{'peak-base MB':>13}{'ratio':>7}"
            f"{'anon peak MB':>13}{'anon ratio':>11}{'file peak MB':>13}{'RSS after MB':>13}{'load s':>8}")
        for dtype in args.dtypes:
            runs = []
            for _ in range(args.repeats):
                p = subprocess.run([sys.executable, me, "--measure", folder, "--dtype", dtype],
                                   capture_output=True, text=True)
                line = [x for x in p.stdout.splitlines() if x.startswith("MEM_JSON ")]
                if p.returncode or not line:
                    raise RuntimeError(f"measurement failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
                runs.append(json.loads(line[0][len("MEM_JSON "):]))
            r = {k: statistics.median(x[k] for x in runs) for k in runs[0]}
            inc = r["hwm"] - r["base_hwm"]
            anon = r["anon_peak"] - r["anon_base"]
            ratio = inc / r["model"]
            say(f"{dtype:<10}{r['model'] / 1e6:>9.0f}{inc / 1e6:>13.0f}{ratio:>7.2f}"
                f"{anon / 1e6:>13.0f}{anon / r['model']:>11.2f}"
                f"{(r['file_peak'] - r['file_base']) / 1e6:>13.0f}{(r['rss_after'] - r['rss_base']) / 1e6:>13.0f}"
                f"{r['load_s']:>8.1f}")
        say()
        say("ratio = (ru_maxrss after load - ru_maxrss after imports) / model bytes in that dtype.")
        say("anon = RssAnon (heap/device buffers), file = RssFile (mapped checkpoint pages), both sampled "
            "every 2 ms, increase over the baseline.")
        del ck_bytes
    say.save(args.out)


if __name__ == "__main__":
    main()
