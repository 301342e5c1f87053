"""A prefill's products alone: gemmax's native float32 GEMM vs torch (what transformers' ``nn.Linear`` runs,
MKL) vs numpy's bundled OpenBLAS vs XLA's own dot, on every linear of a preset's decoder block (default
Gemma 3 270M) at ``--rows`` rows.

Why this exists: float32 prefill is GEMM-bound (~90% of a 512-token Gemma 3 270M prefill is these products
plus attention), so its ratio to transformers is bounded by how our GEMM compares with torch's on the same
machine. Each engine multiplies the same activations by ``--layers`` distinct weight matrices in turn
(cold weights, as a prefill streams its layers), in each library's own weight layout: gemmax's in-major
``[K, N]`` through the model's einsum equations, torch ``F.linear`` on ``[N, K]``, numpy ``x @ W`` on
``[K, N]``, XLA ``jnp.einsum`` inside a ``lax.scan`` over the stacked weights. OpenBLAS's threads spin
after each call and would steal the next engine's cores, so the script sets ``OPENBLAS_THREAD_TIMEOUT=4``
(they sleep almost at once) and ``OPENBLAS_NUM_THREADS`` to ``--threads`` before numpy loads. Rounds are
interleaved (each round times every engine once), so a shared machine slows all alike; medians and the
median of per-round ratios are printed.

    python benchmarks/gemm.py                      # Gemma 3 270M, 512 rows, 18 layers, 9 rounds
    python benchmarks/gemm.py --rows 128 --rounds 15 --out benchmarks/results/gemm.txt

The ``all (one block)`` line sums each engine's round r over the products (the products run one after
another, so those sums are paired only product by product). The scans keep only the last layer's product
(each replaces the carry), so no engine pays for stacking outputs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="gemma3_270m", help="gemmax preset whose block shapes are used")
    p.add_argument("--rows", type=int, default=512, help="rows of activations (prompt tokens)")
    p.add_argument("--layers", type=int, default=None, help="distinct weights per product (default: the "
                   "preset's layer count)")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=2, help="torch threads (XLA uses the machine's cores)")
    p.add_argument("--out", default=None, help="also write the table to this file")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    os.environ["OPENBLAS_NUM_THREADS"] = str(args.threads)  # read when numpy (via jax) first loads
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from gemmax.kernels import cpu as cpu_kernels
    from gemmax.models.gemma.config import get_preset
    from gemmax.models.gemma.model import LINEAR_EQS

    torch.set_num_threads(args.threads)
    cfg = get_preset(args.preset)
    d, h, kv, hd, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    layers = args.layers or cfg.num_layers
    # name -> (gemmax weight shape in the model's layout, input shape after the rows)
    shapes = {
        "query": ((h, d, hd), (d,)), "key": ((kv, d, hd), (d,)), "value": ((kv, d, hd), (d,)),
        "attention_output": ((h, hd, d), (h, hd)), "ffw_gating": ((d, f), (d,)),
        "ffw_gating_2": ((d, f), (d,)), "ffw_linear": ((f, d), (f,)),
    }
    if not cpu_kernels.available():
        raise SystemExit("gemmax's native CPU kernel is not available here (no C++ compiler or not a CPU)")
    rs = np.random.RandomState(0)
    lines: list[str] = []

    def say(s: str) -> None:  # the table goes to stdout and, with --out, to a file
        lines.append(s)
        print(s, flush=True)

    names = ("gemmax", "torch", "numpy", "xla")
    peers = names[1:]

    def report(label: str, shape: str, times: dict[str, list[float]], flops: float) -> None:
        rate = {e: flops / statistics.median(t) / 1e9 for e, t in times.items()}
        vs = {e: statistics.median(b / a for a, b in zip(times["gemmax"], times[e], strict=True)) for e in peers}
        say(f"{label:18s} {shape:>12s} " + "".join(f"{rate[e]:8.0f}" for e in names) + "   "
            + ", ".join(f"gemmax/{e} {vs[e]:.2f}x" for e in peers))

    say(f"# {args.preset}: {args.rows} rows, {layers} distinct weights per product, {args.rounds} interleaved "
          f"rounds; jax {jax.__version__}, torch {torch.__version__}, numpy {np.__version__} ({args.threads} "
          "threads); float32")
    say(f"{'product':18s} {'K x N':>12s} " + "".join(f"{e:>8s}" for e in names)
        + "   GFLOP/s medians; gemmax/peer: median per-round speed ratio")
    totals: dict[str, list[float]] = {e: [0.0] * args.rounds for e in names}
    flops_all = 0.0
    for name, (w_shape, x_tail) in shapes.items():
        eq = LINEAR_EQS[name][0].replace("bt", "b")  # one row axis
        k = int(np.prod(x_tail))
        n = int(np.prod(w_shape)) // k
        x = rs.randn(args.rows, *x_tail).astype(np.float32)
        w = (rs.randn(layers, *w_shape) * 0.05).astype(np.float32)
        xj, wj = jnp.asarray(x), jnp.asarray(w)

        def scan_of(product: Callable, xj=xj) -> Callable:
            # each layer's product replaces the carry (the scan returns the last one): no stacked [L, ...]
            # output to copy into, which torch's and numpy's lists of products do not pay either
            def run(ws):
                def body(c, i):
                    return product(xj, ws, i), None
                out = jax.eval_shape(product, xj, ws, 0)
                return jax.lax.scan(body, jnp.zeros(out.shape, out.dtype), jnp.arange(layers))[0]
            return jax.jit(run)

        def ours(x_, ws, i, eq=eq):  # layer i read in place, at any rows (the prefill GEMM)
            return cpu_kernels.gemv(eq, x_, cpu_kernels.NativeWeight(ws, i, gemm=True))

        def xla(x_, ws, i, eq=eq):
            return jnp.einsum(eq, x_, jax.lax.dynamic_index_in_dim(ws, i, keepdims=False))

        f_ours, f_xla = scan_of(ours), scan_of(xla)
        x_axes, w_axes = eq.split("->")[0].split(",")
        contracted = x_axes[1:]
        kept = "".join(a for a in w_axes if a not in contracted)
        # the same matrices as torch stores an nn.Linear's: [N, K], contracted axes last
        tw = torch.from_numpy(np.ascontiguousarray(
            np.einsum(f"l{w_axes}->l{kept}{contracted}", w).reshape(layers, n, k)))
        tx = torch.from_numpy(x.reshape(args.rows, k))
        ref = np.einsum(eq, x, w[-1])  # the last layer's product: what the scans return
        if not np.allclose((tx @ tw[-1].T).numpy(), ref.reshape(args.rows, n), rtol=1e-4, atol=1e-3):
            raise SystemExit(f"{name}: torch's matrix is not the same product")
        for engine, f in (("gemmax", f_ours), ("xla", f_xla)):
            got = np.asarray(f(wj))
            if not np.allclose(got, ref, rtol=1e-4, atol=1e-3):
                raise SystemExit(f"{name}: {engine}'s product differs from numpy's einsum (max |diff| "
                                 f"{float(np.abs(got - ref).max()):.3g})")

        # numpy: the same matrices as [K, N], contracted axes first
        nx = x.reshape(args.rows, k)
        nw = [np.ascontiguousarray(np.einsum(f"{w_axes}->{contracted}{kept}", w[li]).reshape(k, n))
              for li in range(layers)]
        if not np.allclose(nx @ nw[-1], ref.reshape(args.rows, n), rtol=1e-4, atol=1e-3):
            raise SystemExit(f"{name}: numpy's matrix is not the same product")

        def torch_run(tx=tx, tw=tw):
            with torch.inference_mode():
                return [torch.nn.functional.linear(tx, tw[i]) for i in range(layers)]

        engines = {"gemmax": lambda f_ours=f_ours, wj=wj: f_ours(wj).block_until_ready(),
                   "torch": torch_run, "numpy": lambda nx=nx, nw=nw: [nx @ m for m in nw],
                   "xla": lambda f_xla=f_xla, wj=wj: f_xla(wj).block_until_ready()}
        for fn in engines.values():  # compile and warm
            fn()
        times: dict[str, list[float]] = {e: [] for e in engines}
        for r in range(args.rounds):
            order = list(engines) if r % 2 == 0 else list(reversed(engines))
            for e in order:
                t0 = time.perf_counter()
                engines[e]()
                dt = time.perf_counter() - t0
                times[e].append(dt)
                totals[e][r] += dt
        flops = 2.0 * args.rows * k * n * layers
        flops_all += flops
        report(name, f"{k} x {n}", times, flops)
    report("all (one block)", "", totals, flops_all)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
