"""Weight-only quantization: exactness of the transforms, quality on random and trained tiny models, QLoRA."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gemmax.models.gemma import model as gm
from gemmax.models.gemma.config import get_preset, tiny_config
from gemmax.nn import lora, quant
from gemmax.nn.params import abstract_from_specs, get_node

T = 40


def _np_params(cfg, seed=0):
    """Random params from numpy (init_params' per-leaf jax.random calls cost seconds of compiling)."""
    rng = np.random.default_rng(seed)
    return gm.unflatten({p: jnp.asarray(rng.normal(0, 0.3 if "norm" in p else 1 / np.sqrt(s.shape[-1] if
                                                  len(s.shape) > 1 else 1), s.shape).astype(np.float32))
                         for p, s in gm.param_specs(cfg).items()})


def _rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def _batch(rng, n, t=T):
    """A toy language: a rule token (100, 101 or 102 -> multiplier 1, 3, 5), a start, then
    x' = (a * x + 7) mod 64. Learnable in a few hundred steps, so the trained model is confident."""
    mult = np.array([1, 3, 5])
    rule = rng.integers(0, 3, n)
    x = np.empty((n, t), np.int64)
    x[:, 0] = 100 + rule
    x[:, 1] = rng.integers(0, 64, n)
    for i in range(2, t):
        x[:, i] = (mult[rule] * x[:, i - 1] + 7) % 64
    return x


@pytest.fixture(scope="module")
def random_model():
    cfg = tiny_config("gemma3")
    params = _np_params(cfg)
    return cfg, params, jax.jit(lambda p, x: gm.forward(p, cfg, x)), gm.linear_nodes(cfg)


@pytest.fixture(scope="module")
def trained_model():
    """The tiny Gemma 3 trained for 150 Adam steps on the toy language (a few seconds on 2 cores)."""
    cfg = tiny_config("gemma3", num_layers=4)
    params = _np_params(cfg, seed=1)
    opt = optax.adam(3e-3)
    state = opt.init(params)

    def loss_fn(p, x):
        logits = gm.forward(p, cfg, x[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:]).mean()

    @jax.jit
    def step(p, s, x):
        loss, g = jax.value_and_grad(loss_fn)(p, x)
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), s, loss

    rng = np.random.default_rng(0)
    for _ in range(150):
        params, state, loss = step(params, state, jnp.asarray(_batch(rng, 16)))
    assert float(loss) < 1.0, float(loss)  # it learned something (uniform over 512 tokens is 6.2)
    return cfg, params, jax.jit(lambda p, x: gm.forward(p, cfg, x)), loss_fn, gm.linear_nodes(cfg)


def _greedy(fwd, params, prompt, n):
    """Greedy continuation with one compiled shape (a causal model never sees the zero padding)."""
    buf = np.zeros((1, len(prompt) + n), np.int32)
    buf[0, : len(prompt)] = prompt
    for t in range(len(prompt), buf.shape[1]):
        buf[0, t] = int(np.asarray(fwd(params, jnp.asarray(buf)))[0, t - 1].argmax())
    return buf


def _perplexity(fwd, params, seq, start):
    logp = jax.nn.log_softmax(fwd(params, jnp.asarray(seq)), axis=-1)[0]
    nll = -np.asarray(logp)[np.arange(start - 1, seq.shape[1] - 1), seq[0, start:]]
    return float(np.exp(nll.mean()))


# ---- the transforms themselves ---------------------------------------------------------------------


def test_int8_layout_and_rounding(random_model):
    cfg, params, _, nodes = random_model
    q = quant.quantize_params(params, nodes)
    L, D, H, hd, V = cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.vocab_size
    att = q["decoder_block"]["attention"]
    assert att["query"]["kernel"].dtype == jnp.int8 and att["query"]["scale"].shape == (L, H, hd)
    assert att["attention_output"]["scale"].shape == (L, D)
    assert q["decoder_block"]["ffw_linear"]["scale"].shape == (L, D)
    assert q["decoder_block"]["ffw_gating"]["scale"].shape == (L, cfg.intermediate_size)
    assert q["token_embedding"]["embeddings"].dtype == jnp.int8 and q["token_embedding"]["scale"].shape == (V,)
    assert q["decoder_block"]["pre_ffw_norm"]["scale"].dtype == jnp.float32  # norms untouched
    for n in nodes.values():  # round-to-nearest: error at most half a step, per output channel
        node = get_node(q, n.path)
        w = get_node(params, n.path)["kernel"]
        ax = quant.kernel_in_axes(n)
        step = quant._expand(node["scale"], ax, w.ndim)
        assert np.all(np.abs(quant.dequantize_node(node, n) - w) <= step / 2 + 1e-7)
        assert quant.infer_in_axes(node) == ax
        assert int(np.abs(np.asarray(node["kernel"], np.int32)).max()) == 127
    emb = quant.dequantize_node(q["token_embedding"])
    assert np.abs(emb - params["token_embedding"]["embeddings"]).max() <= float(q["token_embedding"]["scale"].max())
    with pytest.raises(ValueError, match="already quantized"):
        quant.quantize_params(q, nodes)
    # dequantize_params gives a plain float tree again, with or without the declarations
    back = quant.dequantize_params(q, nodes)
    assert gm.flatten(back).keys() == gm.flatten(params).keys()
    for k, v in gm.flatten(quant.dequantize_params(q)).items():
        np.testing.assert_array_equal(v, gm.flatten(back)[k])
    only = quant.quantize_params(params, nodes, targets=["q_proj", "value"], embedding=None)
    assert {k for k, v in gm.flatten(only).items() if v.dtype == jnp.int8} == {
        "decoder_block/attention/query/kernel", "decoder_block/attention/value/kernel"}
    with pytest.raises(ValueError, match="unknown quantization target"):
        quant.quantize_params(params, nodes, targets=["qkv"])


def test_grouped_layouts_and_nf4_table(random_model):
    cfg, params, _, _ = random_model
    t = quant.NF4_TABLE
    assert t.shape == (16,) and t[0] == -1 and t[-1] == 1 and 0.0 in t and np.all(np.diff(t) > 0)
    # the published NF4 levels (QLoRA paper), which the table derives from normal quantiles
    np.testing.assert_allclose(t[[1, 8, 14]], [-0.6961928, 0.0795803, 0.7229568], atol=1e-5)
    w = params["decoder_block"]["ffw_linear"]["kernel"]  # [L, F, D], groups along F
    for mode in ("int4", "nf4", "int8"):
        node = quant.quantize_kernel(w, (1,), mode, group_size=32)
        assert node["qkernel"].shape == (w.shape[0], w.shape[1] // 32, 32, w.shape[2])
        assert node["qscale"].shape == (w.shape[0], w.shape[1] // 32, 1, w.shape[2])
        err = float(np.abs(quant.dequantize_kernel(node, (1,)) - w).max())
        assert quant.infer_in_axes(node) == (1,)
        assert err <= {"int8": 0.01, "int4": 0.15, "nf4": 0.25}[mode] * float(np.abs(w).max())
    assert quant.quantize_kernel(w, (1,), "nf4", 32)["qkernel"].dtype == jnp.uint4
    assert quant.in_axes_from_eq(gm.LINEAR_EQS["attention_output"][0]) == (0, 1)
    assert quant.in_axes_from_eq(gm.LINEAR_EQS["query"][0]) == (1,)


def test_llama_untied_head_and_memory():
    cfg = tiny_config("llama")
    params = _np_params(cfg, seed=3)
    nodes = gm.linear_nodes(cfg)
    q = quant.quantize_params(params, nodes)
    assert q["lm_head"]["kernel"].dtype == jnp.int8 and q["lm_head"]["scale"].shape == (cfg.vocab_size,)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16))
    assert _rel(gm.forward(q, cfg, ids), gm.forward(params, cfg, ids)) < 0.05
    m = quant.quantized_bytes(q)  # vs the same tree in bfloat16
    assert 0.45 < m["saved_fraction"] < 0.5
    m4 = quant.quantized_bytes(quant.quantize_params(params, nodes, "int4", embedding_mode="int4"))
    assert m4["saved_fraction"] > 0.65  # float32 per-channel scales weigh a lot on a 64-wide model


def test_preset_memory_figures():
    """Shapes-only figures used in docs/lora_quant.md (bfloat16 baseline, int8 embedding)."""
    g7 = get_preset("gemma_7b_en")
    shapes, nodes = abstract_from_specs(gm.param_specs(g7)), gm.linear_nodes(g7)
    bf16 = lora.estimate_bytes(shapes, nodes, None)
    int8 = lora.estimate_bytes(shapes, nodes, "int8")
    assert bf16["bytes"] == 2 * g7.param_count()["total"]
    assert 0.499 < int8["saved_fraction"] < 0.5
    qlora = lora.estimate_bytes(shapes, nodes, "int8", lora_rank=4)
    # bf16 adapters plus a float32 lora_scale per layer and target
    assert qlora["bytes"] - int8["bytes"] == 2 * lora.count_lora_params(shapes, nodes, 4) + 2 * 4 * g7.num_layers


# ---- quality ---------------------------------------------------------------------------------------


def test_int8_close_on_random_model(random_model):
    cfg, params, fwd, nodes = random_model
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (4, 32))
    ref = np.asarray(fwd(params, jnp.asarray(ids)))
    got = np.asarray(fwd(quant.quantize_params(params, nodes), jnp.asarray(ids)))
    assert _rel(got, ref) < 0.1
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.9


def test_quality_on_trained_model(trained_model):
    cfg, params, fwd, _, nodes = trained_model
    ids = _batch(np.random.default_rng(7), 8)
    ref = np.asarray(fwd(params, jnp.asarray(ids)))
    q8 = quant.quantize_params(params, nodes)
    got = np.asarray(fwd(q8, jnp.asarray(ids)))
    assert _rel(got, ref) < 0.05
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.97
    # perplexity of the float model's own greedy continuation, float32 vs int8
    prompt = [101, 5]
    text = _greedy(fwd, params, prompt, 30)
    p32 = _perplexity(fwd, params, text, len(prompt))
    p8 = _perplexity(fwd, q8, text, len(prompt))
    assert abs(p8 / p32 - 1) < 0.02, (p32, p8)
    assert (_greedy(fwd, q8, prompt, 30) == text).mean() > 0.9
    # 4-bit: per-channel int4 works through layers.linear unchanged; grouped NF4 / int4 via the pre-step
    for mode, g, agree in [("int4", None, 0.6), ("int4", 16, 0.7), ("nf4", 16, 0.7)]:
        q4 = quant.dequantize_params(quant.quantize_params(params, nodes, mode, g), nodes, grouped_only=True)
        assert (np.asarray(fwd(q4, jnp.asarray(ids))).argmax(-1) == ref.argmax(-1)).mean() > agree, (mode, g)


# ---- QLoRA -----------------------------------------------------------------------------------------


def test_qlora_grads_only_to_adapters(trained_model):
    cfg, params, fwd, loss_fn, nodes = trained_model
    q8 = quant.quantize_params(params, nodes)
    p = lora.add_lora(q8, nodes, rank=4, targets=["q_proj", "v_proj", "down_proj"], dtype=jnp.bfloat16)
    node = p["decoder_block"]["attention"]["query"]
    assert node["kernel"].dtype == jnp.int8 and node["lora_a"].dtype == jnp.bfloat16
    x = jnp.asarray(_batch(np.random.default_rng(3), 8))
    np.testing.assert_array_equal(fwd(p, x), fwd(q8, x))  # B = 0: unchanged at start
    trainable, frozen = lora.split_trainable(p)

    @jax.jit
    def step(tr):
        loss, g = jax.value_and_grad(lambda t: loss_fn(lora.merge_trees(t, frozen), x))(tr)
        return loss, g, jax.tree.map(lambda a, b: (a - 0.5 * b).astype(a.dtype), tr, g)

    loss0, g, tr = step(trainable)
    flat = gm.flatten(g)
    assert flat.keys() == gm.flatten(trainable).keys()
    assert all(k.endswith(("lora_a", "lora_b")) for k in flat)
    assert all(v.dtype == jnp.bfloat16 for v in flat.values())
    assert all(bool(jnp.isfinite(v.astype(jnp.float32)).all()) for v in flat.values())
    assert any(float(jnp.abs(v.astype(jnp.float32)).max()) > 0 for k, v in flat.items() if k.endswith("lora_b"))
    for _ in range(3):
        loss, _, tr = step(tr)
    assert float(loss) < float(loss0)
    # the int8 base did not move, and the QLoRA tree is ~half a bf16 LoRA tree
    qp = lora.merge_trees(tr, frozen)
    np.testing.assert_array_equal(qp["decoder_block"]["attention"]["query"]["kernel"], node["kernel"])
    mem = quant.quantized_bytes(qp)
    assert mem["saved_fraction"] > 0.4  # adapters are a large share of a tiny model; ~0.5 on real ones
    # merging adapters into the dequantized base gives the same function
    merged = lora.merge_lora(qp, nodes, dtype=jnp.float32)
    assert _rel(fwd(merged, x), fwd(qp, x)) < 2e-2  # bf16 adapters vs their float32 merge


def test_qlora_on_grouped_nf4(trained_model):
    cfg, params, fwd, loss_fn, nodes = trained_model
    q4 = quant.quantize_params(params, nodes, "nf4", group_size=16)
    p = lora.add_lora(q4, nodes, rank=2, targets=["q_proj", "o_proj"])
    trainable, frozen = lora.split_trainable(p)
    x = jnp.asarray(_batch(np.random.default_rng(4), 4))

    def loss(t):
        return loss_fn(quant.dequantize_params(lora.merge_trees(t, frozen), nodes, grouped_only=True), x)

    g = gm.flatten(jax.jit(jax.grad(loss))(trainable))
    assert set(g) == {f"decoder_block/attention/{n}/lora_{ab}" for n in ("query", "attention_output")
                      for ab in "ab"}
    assert float(jnp.abs(g["decoder_block/attention/query/lora_b"]).max()) > 0
