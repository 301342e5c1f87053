"""AdamW masks (decay and frozen), schedule values, clipping, token-weighted accumulation, precision."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gemmax.train.optim import (
    Precision,
    accumulate_gradients,
    cast_floating,
    decay_mask,
    make_optimizer,
    make_schedule,
    trainable_mask,
)


def _params():
    return {
        "token_embedding": {"embeddings": jnp.ones((4, 3))},
        "decoder_block": {
            "pre_attention_norm": {"scale": jnp.ones((2, 3))},
            "attention": {"query": {"kernel": jnp.ones((2, 3, 3)), "bias": jnp.ones((2, 3)),
                                    "lora_a": jnp.ones((2, 3, 1)), "lora_b": jnp.ones((2, 1, 3))}},
        },
        "final_normalization": {"scale": jnp.ones((3,))},
    }


def test_decay_mask_excludes_scale_bias_and_frozen():
    m = decay_mask(_params())
    assert m["token_embedding"]["embeddings"] is True
    assert m["decoder_block"]["pre_attention_norm"]["scale"] is False
    assert m["final_normalization"]["scale"] is False
    assert m["decoder_block"]["attention"]["query"]["bias"] is False
    assert m["decoder_block"]["attention"]["query"]["kernel"] is True
    m = decay_mask(_params(), frozen=r"kernel$")
    assert m["decoder_block"]["attention"]["query"]["kernel"] is False
    assert m["decoder_block"]["attention"]["query"]["lora_a"] is True
    t = trainable_mask(_params(), frozen=lambda p: not p.endswith(("lora_a", "lora_b")))
    assert t["decoder_block"]["attention"]["query"]["lora_b"] is True
    assert t["token_embedding"]["embeddings"] is False


def test_weight_decay_applies_only_where_masked_in():
    params = _params()
    lr, wd = 0.1, 0.5
    tx = make_optimizer(lr, weight_decay=wd, schedule="constant", clip_norm=None)
    state = tx.init(params)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, state, params)
    # zero gradient: the only update is decoupled decay -lr * wd * w, where decay applies
    np.testing.assert_allclose(updates["token_embedding"]["embeddings"], -lr * wd, rtol=1e-6)
    np.testing.assert_allclose(updates["decoder_block"]["attention"]["query"]["kernel"], -lr * wd, rtol=1e-6)
    assert not np.any(updates["final_normalization"]["scale"])
    assert not np.any(updates["decoder_block"]["pre_attention_norm"]["scale"])
    assert not np.any(updates["decoder_block"]["attention"]["query"]["bias"])


def test_frozen_params_get_no_update_and_no_moments():
    params = _params()
    tx = make_optimizer(0.1, weight_decay=0.1, schedule="constant", frozen=r"(kernel|embeddings)$")
    state = tx.init(params)
    n_state = sum(x.size for x in jax.tree_util.tree_leaves(state))
    n_train = sum(x.size for p, x in jax.tree_util.tree_leaves_with_path(params)
                  if not str(p[-1]).strip("[]'\"").endswith(("kernel", "embeddings")))
    # mu and nu for trainable leaves only, plus a few step counters
    assert 2 * n_train <= n_state <= 2 * n_train + 4
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    updates, state = tx.update(grads, state, params)
    assert not np.any(updates["decoder_block"]["attention"]["query"]["kernel"])
    assert not np.any(updates["token_embedding"]["embeddings"])
    assert np.all(np.asarray(updates["decoder_block"]["attention"]["query"]["lora_a"]) < 0)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedule_values(kind):
    f = make_schedule(1.0, warmup_steps=4, total_steps=14, schedule=kind, end_lr_ratio=0.1)
    np.testing.assert_allclose([f(s) for s in range(4)], [0.25, 0.5, 0.75, 1.0], rtol=1e-6)
    assert float(f(4)) == pytest.approx(1.0)
    if kind == "cosine":
        assert float(f(9)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
        assert float(f(14)) == pytest.approx(0.1)
    elif kind == "linear":
        assert float(f(9)) == pytest.approx(0.55)
        assert float(f(14)) == pytest.approx(0.1)
    else:
        assert float(f(9)) == pytest.approx(1.0)
    assert float(f(1000)) == pytest.approx({"constant": 1.0}.get(kind, 0.1))
    with pytest.raises(ValueError):
        make_schedule(1.0, schedule="exp")


def test_optimizer_uses_schedule():
    params = {"w": jnp.zeros((2,))}
    tx = make_optimizer(1.0, weight_decay=0.0, warmup_steps=2, total_steps=4, schedule="linear",
                        clip_norm=None)
    state = tx.init(params)
    seen = []
    for _ in range(5):
        u, state = tx.update({"w": jnp.ones((2,))}, state, params)
        seen.append(-float(u["w"][0]))  # Adam's normalised step is ~1, so the update is ~lr
    np.testing.assert_allclose(seen, [0.5, 1.0, 1.0, 0.5, 0.0], atol=1e-4)


def test_clipping_by_global_norm():
    params = {"a": jnp.zeros((3,)), "b": {"scale": jnp.zeros((4,))}}
    grads = {"a": jnp.full((3,), 10.0), "b": {"scale": jnp.full((4,), -10.0)}}
    norm = float(optax.tree.norm(grads))
    for clip, factor in ((1.0, 1.0 / norm), (None, 1.0), (1e6, 1.0)):
        tx = make_optimizer(0.1, b1=0.9, schedule="constant", clip_norm=clip)
        _, state = tx.update(grads, tx.init(params), params)
        mu = optax.tree.get(state, "mu")  # (1 - b1) * the (clipped) gradient after one step
        np.testing.assert_allclose(mu["a"], 0.1 * 10.0 * factor, rtol=1e-5)
        np.testing.assert_allclose(mu["b"]["scale"], -0.1 * 10.0 * factor, rtol=1e-5)


def _loss_sums(params, batch):
    pred = batch["x"] @ params["w"]
    err = (pred - batch["y"]) ** 2 * batch["m"]
    return err.sum(), {"n_tokens": batch["m"].sum(), "n_correct": (batch["m"] * (err < 1)).sum()}


def test_accumulation_is_token_weighted_mean():
    rng = np.random.default_rng(0)
    batch = {"x": jnp.asarray(rng.normal(size=(4, 5, 3)), jnp.float32),
             "y": jnp.asarray(rng.normal(size=(4, 5)), jnp.float32),
             # very different token counts per micro-batch
             "m": jnp.asarray([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], jnp.float32)}
    params = {"w": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}

    def full_mean(p):
        s, aux = _loss_sums(p, batch)
        return s / aux["n_tokens"]

    want_loss, want_grad = jax.value_and_grad(full_mean)(params)
    loss, grads, aux = jax.jit(accumulate_gradients, static_argnums=(0, 3))(_loss_sums, params, batch, 4)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(grads["w"], want_grad["w"], rtol=1e-5)
    assert float(aux["n_tokens"]) == 10.0
    # and differs from a mean of per-micro-batch means
    mb_means = [float(_loss_sums(params, jax.tree_util.tree_map(lambda x, i=i: x[i:i + 1], batch))[0]
                      / max(1.0, float(batch["m"][i].sum()))) for i in range(4)]
    assert abs(np.mean(mb_means) - float(loss)) > 1e-3
    with pytest.raises(ValueError):
        accumulate_gradients(_loss_sums, params, batch, 3)


def test_precision_helpers():
    params = {"w": jnp.ones((2,), jnp.float32), "q": jnp.ones((2,), jnp.int8)}
    mixed = Precision.named("mixed_bfloat16")
    c = mixed.compute_params(params)
    assert c["w"].dtype == jnp.bfloat16 and c["q"].dtype == jnp.int8
    assert mixed.master_params(params)["w"].dtype == jnp.float32
    assert mixed.mu_dtype is None
    g = jax.grad(lambda p: (mixed.compute_params(p)["w"] * 3).sum())({"w": params["w"]})
    assert g["w"].dtype == jnp.float32  # gradients arrive in master dtype
    pure = Precision.named("bfloat16")
    assert pure.master_params(params)["w"].dtype == jnp.bfloat16
    assert jnp.dtype(pure.mu_dtype) == jnp.bfloat16
    tx = make_optimizer(0.1, schedule="constant", mu_dtype=pure.mu_dtype)
    bf = pure.master_params({"w": params["w"]})
    u, _ = tx.update(bf, tx.init(bf), bf)
    assert u["w"].dtype == jnp.bfloat16
    assert cast_floating({"a": 1}, jnp.bfloat16) == {"a": 1}
    with pytest.raises(ValueError):
        Precision.named("fp8")


def test_clip_matches_optax_clip_both_ways():
    """gemmax's clipping (one multiplication by a scalar, which XLA can fuse into Adam's loops) gives optax's
    clipped updates and the same empty state, over and under the threshold."""
    from gemmax.train.optim import clip_by_global_norm

    rng = np.random.default_rng(3)
    grads = {"a": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
             "b": {"scale": jnp.asarray(rng.normal(size=(7,)) * 4, jnp.float32)}}
    norm = float(optax.tree.norm(grads))
    for max_norm in (norm / 3, norm * 2):
        ours, theirs = clip_by_global_norm(max_norm), optax.clip_by_global_norm(max_norm)
        got, s1 = ours.update(grads, ours.init(grads))
        want, s2 = theirs.update(grads, theirs.init(grads))
        assert s1 == s2
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-6)
        clipped = float(optax.tree.norm(got))
        assert abs(clipped - min(norm, max_norm)) < 1e-4 * norm
