"""Subprocess helpers for tests/test_distribution.py.

Fake CPU devices (``--xla_force_host_platform_device_count``) must be configured before jax is imported, and
``jax.distributed.initialize`` must run before any device is touched, so these checks run in fresh
processes. Each mode prints one JSON object on its last stdout line.

    python tests/dist_worker.py layouts              # 8 devices: specs on 1x8, 2x4, 8x1; the Keras tutorials' snippets
    python tests/dist_worker.py train                # 8 devices: sharded step/forward vs one device
    python tests/dist_worker.py generate             # 8 devices: sharded greedy generation vs one device
    python tests/dist_worker.py objectives           # 8 devices: DPO, ORPO and GRPO fits, sharded vs one device
    python tests/dist_worker.py multihost PORT PID   # 2 processes x 4 devices, one global 2x4 mesh
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

if __name__ == "__main__":
    mode = sys.argv[1]
    n_dev = 4 if mode == "multihost" else 8
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={n_dev}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from gemmax import distribution as gd  # noqa: E402
from gemmax.models.gemma import model  # noqa: E402
from gemmax.models.gemma.config import get_preset, tiny_config  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

CFG = tiny_config("gemma3")
BATCH, SEQ = 8, 17


def loss_fn(params: Any, tokens: jax.Array, cfg: Any = CFG) -> jax.Array:
    """Mean next-token cross-entropy of model.forward."""
    logits = model.forward(params, cfg, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def make_step(opt: optax.GradientTransformation, cfg: Any = CFG):
    def step(params: Any, opt_state: Any, tokens: jax.Array) -> tuple[Any, Any, jax.Array, Any]:
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, cfg)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads

    return step


def sharded_step(dist: gd.Distribution, opt: optax.GradientTransformation, params: Any, cfg: Any = CFG):
    """The training step compiled with the distribution's shardings (weights, AdamW states, batch)."""
    p_sh = dist.param_shardings(params)
    o_sh = dist.opt_state_shardings(jax.eval_shape(opt.init, params), params)
    return jax.jit(make_step(opt, cfg), in_shardings=(p_sh, o_sh, dist.batch_sharding(2)),
                   out_shardings=(p_sh, o_sh, dist.replicated(), p_sh))


def adamw() -> optax.GradientTransformation:
    """AdamW with eps=1e-4: Adam's first step is ~sign(g) (g / (|g| + eps)), so with the default eps=1e-8
    gradients that differ by 1e-7 (reduction order) move some weights by up to lr; a larger eps keeps the
    step a well-conditioned function of the gradients, so the comparison tests sharding, not rounding."""
    return optax.adamw(1e-3, eps=1e-4, weight_decay=0.1)


def data() -> tuple[Any, np.ndarray]:
    params = jax.device_get(jax.jit(lambda k: model.init_params(CFG, k))(jax.random.PRNGKey(0)))
    return params, global_tokens()


def global_tokens() -> np.ndarray:
    """The global batch, from numpy (no compile: multi-host workers should compile only what they test)."""
    return np.random.RandomState(1).randint(0, CFG.vocab_size, (BATCH, SEQ)).astype(np.int32)


def specs_of(tree: Any, prefix: str = "") -> dict[str, str]:
    return {p: str(tuple(x.sharding.spec)) for p, x in gd.named_leaves(tree, prefix)}


def mode_layouts() -> dict[str, Any]:
    out: dict[str, Any] = {"n_devices": len(jax.devices())}
    params, _ = data()
    opt = optax.adamw(1e-3)
    for shape in [(1, 8), (2, 4), (8, 1)]:
        mesh = gd.DeviceMesh(shape, ["batch", "model"], gd.list_devices())
        for fsdp in (False, True):
            dist = gd.ModelParallel(mesh, gd.get_layout_map(CFG, mesh), batch_dim_name="batch", fsdp=fsdp)
            sharded = dist.shard_params(params)
            opt_state = dist.init_optimizer(opt, sharded)
            expected = {p: str(tuple(dist.spec_for(p, np.shape(x)))) for p, x in gd.named_leaves(params)}
            out[f"{shape[0]}x{shape[1]}{'_fsdp' if fsdp else ''}"] = {
                "params": specs_of(sharded), "expected": expected, "opt": specs_of(opt_state, "adamw"),
                "plan": dist.plan,
                "shard_shape": list(sharded["decoder_block"]["attention"]["query"]["kernel"]
                                    .addressable_shards[0].data.shape)}

    # The the Keras tutorials' snippets, translated (003: 2-axis mesh, get_layout_map, ModelParallel, set_distribution;
    # then the two print loops over a decoder block's weights and the optimizer variables).
    devices = gd.list_devices()
    device_mesh = gd.DeviceMesh((2, 4), ["batch", "model"], devices)
    layout_map = gd.get_layout_map(CFG, device_mesh, data_axis="batch")
    model_parallel = gd.ModelParallel(device_mesh, layout_map, batch_dim_name="batch")
    gd.set_distribution(model_parallel)
    params_sharded = gd.distribution().init_params(lambda: model.init_params(CFG, jax.random.PRNGKey(0)))
    lines = []
    for path, variable in gd.named_leaves(params_sharded["decoder_block"], "decoder_block"):
        lines.append(f"{path:<58}  {str(variable.shape):<16}  {variable.sharding.spec}")
    opt_state = gd.distribution().init_optimizer(optax.adamw(1e-3), params_sharded)
    for path, variable in gd.named_leaves(opt_state, "adamw"):
        lines.append(f"{path:<73}  {str(variable.shape):<16}  {variable.sharding.spec}")
    print("\n".join(lines))
    out["seed003"] = lines

    # 001: a hand-written LayoutMap on a 1x8 mesh, ModelParallel(layout_map=..., batch_dim_name="batch").
    device_mesh = gd.DeviceMesh((1, 8), ["batch", "model"], gd.list_devices())
    model_dim = "model"
    layout_map = gd.LayoutMap(device_mesh)
    layout_map["token_embedding/embeddings"] = (model_dim, None)
    layout_map["decoder_block.*attention.*(query|key|value).*kernel"] = (model_dim, None, None)
    layout_map["decoder_block.*attention_output.*kernel"] = (model_dim, None, None)
    layout_map["decoder_block.*ffw_gating.*kernel"] = (None, model_dim)
    layout_map["decoder_block.*ffw_linear.*kernel"] = (model_dim, None)
    model_parallel = gd.ModelParallel(layout_map=layout_map, batch_dim_name="batch")
    with model_parallel.scope():
        p = gd.distribution().shard_params(params)
        out["seed001"] = specs_of(p)
        out["seed001_plan"] = list(model_parallel.plan)
    out["default_after_scope_is_003"] = gd.distribution() is not model_parallel

    # Planning a 27B run on 8 (fake) devices: abstract shapes only.
    mesh = gd.DeviceMesh((2, 4), ["batch", "model"])
    cfg27 = get_preset("gemma3_27b")
    d27 = gd.ModelParallel(mesh, gd.get_layout_map(cfg27, mesh, data_axis="batch"))
    desc = gd.describe_rows(model.param_specs(cfg27), d27, optimizer=optax.adamw(1e-4))
    out["describe27b"] = {r.name: [list(r.shape), str(tuple(r.spec)), r.bytes_per_device] for r in desc.rows}
    out["describe27b_total"] = desc.total_bytes_per_device
    return out


def max_diff(a: Any, b: Any) -> float:
    return max(float(jnp.max(jnp.abs(jnp.asarray(x) - jnp.asarray(y))))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True))


def mode_train() -> dict[str, Any]:
    params, tokens = data()
    opt = adamw()
    dev0 = jax.devices()[0]
    ref_params = jax.device_put(params, dev0)
    ref_logits = jax.jit(lambda p, t: model.forward(p, CFG, t))(ref_params, jax.device_put(tokens, dev0))
    new_ref, _, ref_loss, ref_grads = jax.jit(make_step(opt))(ref_params, opt.init(ref_params),
                                                              jax.device_put(tokens, dev0))
    out: dict[str, Any] = {"ref_loss": float(ref_loss),
                           "ref_norm": sum(float(jnp.sum(jnp.abs(x))) for x in jax.tree_util.tree_leaves(new_ref))}
    runs: list[tuple[str, gd.Distribution]] = []
    for name, shape, fsdp in [("2x4", (2, 4), False), ("2x4_fsdp", (2, 4), True), ("1x8", (1, 8), False)]:
        mesh = gd.DeviceMesh(shape, ["batch", "model"])
        runs.append((name, gd.ModelParallel(mesh, gd.get_layout_map(CFG, mesh), fsdp=fsdp)))
    for name, dist in runs:
        sp = dist.shard_params(params)
        batch = dist.shard_batch(tokens)
        if name == "2x4":
            logits = jax.jit(lambda p, t: model.forward(p, CFG, t))(sp, batch)
            out["forward_max_diff"] = float(jnp.max(jnp.abs(jax.device_get(logits) - ref_logits)))
        new_p, new_o, loss, grads = sharded_step(dist, opt, sp)(sp, dist.init_optimizer(opt, sp), batch)
        out[name] = {"loss": float(loss), "param_max_diff": max_diff(jax.device_get(new_p), new_ref),
                     "norm": float(abs_sum(new_p, dist)),
                     "grad_max_diff": max_diff(jax.device_get(grads), ref_grads),
                     "spec_query_after": str(tuple(new_p["decoder_block"]["attention"]["query"]["kernel"]
                                                   .sharding.spec)),
                     "spec_mu_query_after": str(tuple(new_o[0].mu["decoder_block"]["attention"]["query"]
                                                      ["kernel"].sharding.spec))}
    dp = gd.DataParallel()
    logits = jax.jit(lambda p, t: model.forward(p, CFG, t))(dp.shard_params(params), dp.shard_batch(tokens))
    out["data_parallel_forward_max_diff"] = float(jnp.max(jnp.abs(jax.device_get(logits) - ref_logits)))
    out["data_parallel_logits_spec"] = str(tuple(logits.sharding.spec))
    return out


def mode_multihost(port: int, pid: int) -> dict[str, Any]:
    import faulthandler

    faulthandler.dump_traceback_later(float(os.environ.get("DIST_WORKER_DUMP_AFTER", "150")), exit=False)
    if pid == 0:  # process 0 from arguments, process 1 from GEMMAX_* variables: both paths exercised
        gd.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=0)
    else:
        gd.initialize()
    opt = adamw()
    mesh = gd.DeviceMesh((2, 4), ["batch", "model"])
    dist = gd.ModelParallel(mesh, gd.get_layout_map(CFG, mesh))
    sp = dist.init_params(lambda: model.init_params(CFG, jax.random.PRNGKey(0)))
    local = global_tokens()[pid * BATCH // 2:(pid + 1) * BATCH // 2]  # each host loads only its half
    batch = dist.shard_local_batch(local)
    new_p, _, loss, _ = sharded_step(dist, opt, sp)(sp, dist.init_optimizer(opt, sp), batch)
    norm = abs_sum(new_p, dist)
    return {"process_index": jax.process_index(), "process_count": jax.process_count(),
            "global_devices": len(jax.devices()), "local_devices": len(jax.local_devices()),
            "query_spec": str(tuple(sp["decoder_block"]["attention"]["query"]["kernel"].sharding.spec)),
            "loss": float(loss.addressable_data(0)), "norm": float(norm.addressable_data(0))}


def abs_sum(tree: Any, dist: gd.Distribution) -> jax.Array:
    """Sum of |w| over all weights, replicated: one number that two runs' updated params must share."""
    return jax.jit(lambda t: sum(jnp.sum(jnp.abs(x)) for x in jax.tree_util.tree_leaves(t)),
                   out_shardings=dist.replicated())(tree)


def mode_generate() -> dict[str, Any]:
    """Greedy and sampled generation (the Engine: prefill, ring caches, chunked decode, the sampler's top-k
    candidates) on one device vs under ModelParallel on 1x8 / 2x4 meshes and FSDP: the same tokens."""
    from gemmax.api import CausalLM

    lm = CausalLM.from_config(CFG, seed=3)
    prompts = [np.array([5, 6, 7, 8, 9]), np.array([11, 12, 13])]
    sampled = dict(max_new_tokens=14, temperature=1.0, top_k=40, top_p=0.95, seed=7)
    ref = [a.tolist() for a in lm.generate(prompts, max_new_tokens=14)]
    ref_sampled = [a.tolist() for a in lm.generate(prompts, **sampled)]
    base = jax.device_get(lm.params)
    out: dict[str, Any] = {"reference": ref, "reference_sampled": ref_sampled}
    for name, shape, fsdp in (("1x8", (1, 8), False), ("2x4", (2, 4), False), ("2x4-fsdp", (2, 4), True)):
        mesh = gd.DeviceMesh(shape, ["batch", "model"], gd.list_devices())
        layout = gd.get_layout_map(CFG, mesh, data_axis="batch" if fsdp else None)
        dist = gd.ModelParallel(mesh, layout, batch_dim_name="batch", fsdp=fsdp)
        with gd.use_distribution(dist):
            sharded = CausalLM(CFG, dist.shard_params(base))
            specs = {str(leaf.sharding.spec) for leaf in jax.tree_util.tree_leaves(sharded.params)}
            got = [a.tolist() for a in sharded.generate(prompts, max_new_tokens=14)]
            got_sampled = [a.tolist() for a in sharded.generate(prompts, **sampled)]
        out[name] = {"tokens": got, "sampled": got_sampled, "specs": sorted(specs)}
    return out


class _Bytes:
    """A byte-level tokenizer (id = byte + 3; 0 pad, 1 eos, 2 bos) for text records on the tiny model."""

    pad_id, eos_id, bos_id, stop_ids = 0, 1, 2, (1,)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        return ([self.bos_id] if add_bos else []) + [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids: Any) -> str:
        return bytes(int(i) - 3 for i in ids if 3 <= int(i) < 259).decode("utf-8", errors="replace")


def mode_objectives() -> dict[str, Any]:
    """Three LoRA steps of DPO and of ORPO, two of GRPO (the post-training objectives' one trainer) on one
    device, then under ModelParallel on a 2x4 mesh with FSDP: each step's loss and the objective's metrics."""
    from gemmax.api import CausalLM

    cfg = tiny_config("gemma3", vocab_size=262, eos_token_id=(1,))
    pairs = [{"prompt": f"Question {i}: is the sky blue?", "chosen": " yes" + "!" * (i % 3),
              "rejected": " no, it is green" if i % 2 else " no"} for i in range(8)]
    base = jax.device_get(CausalLM.from_config(cfg, seed=0).params)
    kw = dict(steps=3, batch_size=4, sequence_length=48, learning_rate=1e-2, progress=False, save_every=None)
    mesh = gd.DeviceMesh((2, 4), ["batch", "model"], gd.list_devices())
    dist = gd.ModelParallel(mesh, gd.get_layout_map(cfg, mesh, data_axis="batch"), batch_dim_name="batch",
                            fsdp=True)
    out: dict[str, Any] = {}
    for objective in ("dpo", "orpo"):
        for where in ("one", "2x4-fsdp"):
            if where == "one":
                lm = CausalLM(cfg, jax.tree_util.tree_map(jnp.asarray, base), _Bytes())
                lm.enable_lora(rank=4)
                hist = lm.fit(pairs, objective=objective, **kw)
                specs: list[str] = []
            else:
                with gd.use_distribution(dist):
                    lm = CausalLM(cfg, dist.shard_params(base), _Bytes())
                    lm.enable_lora(rank=4)
                    hist = lm.fit(pairs, objective=objective, **kw)
                    specs = sorted({str(x.sharding.spec) for x in jax.tree_util.tree_leaves(lm.params)})
            out[f"{objective}/{where}"] = {"loss": list(hist.loss), "extra": hist.extra, "specs": specs}
    # GRPO: the rollouts sample through the engine under the mesh too (same seeds: the same completions)
    prompts = [{"prompt": f"Say something {i}:"} for i in range(4)]

    def variety(prompts: list[str], completions: list[str], **kw: Any) -> list[float]:
        return [float(len(set(c))) for c in completions]

    grpo = dict(kw, steps=2, reward_funcs=[variety], num_generations=4, max_completion_length=8, beta=0.1)
    for where in ("one", "2x4-fsdp"):
        if where == "one":
            lm = CausalLM(cfg, jax.tree_util.tree_map(jnp.asarray, base), _Bytes())
            lm.enable_lora(rank=4)
            hist = lm.fit(prompts, objective="grpo", **grpo)
        else:
            with gd.use_distribution(dist):
                lm = CausalLM(cfg, dist.shard_params(base), _Bytes())
                lm.enable_lora(rank=4)
                hist = lm.fit(prompts, objective="grpo", **grpo)
        out[f"grpo/{where}"] = {"loss": list(hist.loss), "extra": hist.extra}
    return out


if __name__ == "__main__":
    if mode == "objectives":
        result = mode_objectives()
    elif mode == "generate":
        result = mode_generate()
    elif mode == "layouts":
        result = mode_layouts()
    elif mode == "train":
        result = mode_train()
    elif mode == "multihost":
        result = mode_multihost(int(sys.argv[2]), int(sys.argv[3]))
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(json.dumps(result))
    sys.stdout.flush()
