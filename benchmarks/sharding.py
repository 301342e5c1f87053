"""Step time of a sharded training step on 8 fake CPU devices vs one device.

    python benchmarks/sharding.py [--steps 10] [--mesh 2x4] [--fsdp] [--family gemma3] [--batch 8] [--seq 64]

Fake CPU devices share the same cores, so this measures the *overhead* of SPMD partitioning (collectives,
smaller matmuls, resharding) rather than a speed-up; on real accelerators the 8-device step runs on 8 chips.
A ratio near 1 says the layout adds little communication; a large ratio points at resharding in the plan.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

if "jax" not in sys.modules:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from gemmax import distribution as gd  # noqa: E402
from gemmax.models.gemma import model  # noqa: E402
from gemmax.models.gemma.config import tiny_config  # noqa: E402


def loss_fn(params, cfg, tokens):
    logits = model.forward(params, cfg, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def make_step(cfg, opt):
    def step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, cfg, tokens)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def time_steps(step, params, opt_state, batch, n: int) -> list[float]:
    params, opt_state, loss = step(params, opt_state, batch)  # compile + warm-up
    jax.block_until_ready(loss)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        params, opt_state, loss = step(params, opt_state, batch)
        jax.block_until_ready((params, loss))
        times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--mesh", default="2x4", help="batch x model, e.g. 2x4, 1x8, 8x1")
    ap.add_argument("--fsdp", action="store_true")
    ap.add_argument("--family", default="gemma3")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    args = ap.parse_args(argv)

    cfg = tiny_config(args.family, hidden_size=256, intermediate_size=1024, num_heads=8, num_kv_heads=4,
                      head_dim=32, vocab_size=4096)
    opt = optax.adamw(1e-3)
    params = jax.jit(lambda k: model.init_params(cfg, k))(jax.random.PRNGKey(0))
    params = jax.device_get(params)
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (args.batch, args.seq + 1)).astype(np.int32)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))

    # one device
    dev = jax.devices()[0]
    p1 = jax.device_put(params, dev)
    t1 = time_steps(jax.jit(make_step(cfg, opt)), p1, opt.init(p1), jax.device_put(tokens, dev), args.steps)

    # sharded
    shape = tuple(int(s) for s in args.mesh.split("x"))
    mesh = gd.DeviceMesh(shape, ["batch", "model"])
    dist = gd.ModelParallel(mesh, gd.get_layout_map(cfg, mesh), fsdp=args.fsdp)
    sp = dist.shard_params(params)
    p_sh = dist.param_shardings(sp)
    o_sh = dist.opt_state_shardings(jax.eval_shape(opt.init, sp), sp)
    step = jax.jit(make_step(cfg, opt), in_shardings=(p_sh, o_sh, dist.batch_sharding(2)),
                   out_shardings=(p_sh, o_sh, dist.replicated()))
    t8 = time_steps(step, sp, dist.init_optimizer(opt, sp), dist.shard_batch(tokens), args.steps)

    m1, m8 = statistics.median(t1), statistics.median(t8)
    print(f"model: {cfg.family} {n_params / 1e6:.2f}M params, batch {args.batch} x {args.seq} tokens, "
          f"{args.steps} steps (median), {os.cpu_count()} CPU cores")
    print(f"1 device:               {m1 * 1e3:8.1f} ms/step")
    print(f"{mesh.size} devices ({args.mesh}{' fsdp' if args.fsdp else ''}):  {m8 * 1e3:8.1f} ms/step")
    print(f"ratio sharded / single: {m8 / m1:8.2f}")
    if dist.plan:
        print("layout decisions:")
        for p in dist.plan:
            print("  -", p)


if __name__ == "__main__":
    main()
