"""Gemma 4 26B-A4B's expert block at its real expert count (128 experts, top 8) with a small hidden size:
tokens per second of gemmax's grouped computations against running every expert on every token
(``experts_dense``: one einsum over all experts, unchosen ones weighted zero), and the FLOPs each asks for
against the FLOPs the routing needs. Grouped: ``experts_grouped`` (sort the (token, choice) pairs by expert,
``lax.ragged_dot`` per expert group, unsort, weighted sum; what GPUs and TPUs run) and ``experts_tiled``
(each expert's sorted rows padded to tiles of 16, a scan over the tiles; what XLA:CPU runs).

Both run the same routing (``route``: softmax, top 8, renormalised, per-expert scales) on the same random
weights, jitted, timed interleaved (one grouped run, one dense run, repeated); medians are reported, with
the largest difference between the two outputs.

    python benchmarks/moe.py                          # hidden 256, expert width 704, 1024 tokens
    python benchmarks/moe.py --hidden 512 --tokens 4096 --repeats 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256, help="hidden size (26B-A4B: 2816)")
    ap.add_argument("--expert-width", type=int, default=704, help="moe_intermediate_size (26B-A4B: 704)")
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    return ap.parse_args()


def main() -> None:
    a = parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from gemmax.models.gemma4 import model as m4
    from gemmax.models.gemma4.config import Gemma4Config

    cfg = Gemma4Config(vocab_size=8, hidden_size=a.hidden, num_layers=1, num_heads=1, num_kv_heads=1, head_dim=8,
                       intermediate_size=8, layer_types=("global",), num_experts=a.experts, top_k=a.top_k,
                       moe_intermediate_size=a.expert_width)
    dt = jnp.dtype(a.dtype)
    rng = np.random.RandomState(0)
    d, e, i = a.hidden, a.experts, a.expert_width
    p = {"router": {"kernel": jnp.asarray(rng.randn(d, e) / np.sqrt(d), dt), "scale": jnp.ones((d,), dt),
                    "expert_scale": jnp.asarray(1 + 0.1 * rng.randn(e), dt)}}
    gate_up = jnp.asarray(rng.randn(e, d, 2 * i) / np.sqrt(d), dt)
    down = jnp.asarray(rng.randn(e, i, d) / np.sqrt(i), dt)
    x = jnp.asarray(rng.randn(a.tokens, d), dt)

    def block(fn):
        def run(x, gate_up, down):
            w, idx = m4.route(p, cfg, x)
            return fn(x, idx, w, gate_up, down)
        return jax.jit(run)

    fns = {"ragged_dot": block(m4.experts_grouped), "tiled": block(m4.experts_tiled), "dense": block(m4.experts_dense)}
    ys = {name: jax.block_until_ready(f(x, gate_up, down)).astype(jnp.float32) for name, f in fns.items()}
    diff = max(float(jnp.abs(ys[n] - ys["dense"]).max()) for n in ("ragged_dot", "tiled"))
    scale = float(jnp.abs(ys["dense"]).max())

    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(a.repeats):
        for name, f in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(f(x, gate_up, down))
            times[name].append(time.perf_counter() - t)

    per_pair = 2 * d * 2 * i + 2 * i * d  # gate/up and down products of one token through one expert
    needed = a.tokens * a.top_k * per_pair
    tile = m4.TILE
    tiles = -(-a.tokens * a.top_k // tile) + e  # the scan's bound; real tiles are at most this
    done = {"ragged_dot": needed, "tiled": min(tiles * tile, a.tokens * a.top_k + e * (tile - 1)) * per_pair,
            "dense": a.tokens * e * per_pair}
    print(f"gemma4 expert block: {e} experts, top {a.top_k}, hidden {d}, expert width {i}, {a.tokens} tokens, "
          f"{a.dtype}, {jax.devices()[0].device_kind} ({platform.processor() or platform.machine()})")
    print(f"outputs: max |grouped - dense| = {diff:.3g} (output scale {scale:.3g}); 'GFLOP done' is what each form "
          "asks for (XLA:CPU's ragged_dot itself multiplies every group by every expert)")
    print(f"{'':10s} {'median s':>10s} {'tokens/s':>12s} {'GFLOP done':>11s} {'done/needed':>12s}")
    med = {}
    for name in fns:
        med[name] = statistics.median(times[name])
        print(f"{name:10s} {med[name]:10.4f} {a.tokens / med[name]:12.0f} {done[name] / 1e9:11.2f} "
              f"{done[name] / needed:12.1f}")
    for name in ("ragged_dot", "tiled"):
        print(f"{name} / dense tokens per second: {med['dense'] / med[name]:.2f}x")


if __name__ == "__main__":
    main()
