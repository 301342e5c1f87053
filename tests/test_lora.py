"""LoRA pytree transforms, checked against PEFT on tiny transformers models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_fixtures import hf_model, save_hf

from gemmax.api import CausalLM
from gemmax.models.gemma import model as gm
from gemmax.models.gemma.config import get_preset, tiny_config
from gemmax.nn import lora
from gemmax.nn.params import abstract_from_specs, get_node, set_node

ALL = tuple(gm.LINEAR_EQS)
PEFT_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


_FWD: dict[int, object] = {}


def _fwd(params, cfg, ids):
    """Jitted forward, one compiled function per config (configs hold dicts, so they are not static args)."""
    if id(cfg) not in _FWD:
        _FWD[id(cfg)] = (cfg, jax.jit(lambda p, x: gm.forward(p, cfg, x)))
    return _FWD[id(cfg)][1](params, jnp.asarray(ids))


def _ids(cfg, b=2, t=13, seed=0):
    return np.random.RandomState(seed).randint(0, cfg.vocab_size, (b, t))


def _np_params(cfg, seed=0):
    """Random params from numpy (init_params' per-leaf jax.random calls cost seconds of compiling)."""
    rng = np.random.default_rng(seed)
    return gm.unflatten({p: jnp.asarray(rng.normal(0, 0.3 if "norm" in p else 1 / np.sqrt(s.shape[-1] if
                                                  len(s.shape) > 1 else 1), s.shape).astype(np.float32))
                         for p, s in gm.param_specs(cfg).items()})


def _randomize(params, nodes, seed=1, std=0.05):
    """Non-zero B (and fresh A) so adapters change the output: an all-zero B would hide layout bugs."""
    rng = np.random.default_rng(seed)
    for t in lora.lora_targets(params, nodes):
        node = get_node(params, nodes[t].path)
        new = dict(node, lora_a=jnp.asarray(rng.normal(0, std, node["lora_a"].shape), node["lora_a"].dtype),
                   lora_b=jnp.asarray(rng.normal(0, std, node["lora_b"].shape), node["lora_b"].dtype))
        params = set_node(params, nodes[t].path, new)
    return params


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config("gemma3")
    return cfg, _np_params(cfg), gm.linear_nodes(cfg)


def test_shapes_init_and_identity(tiny):
    cfg, params, nodes = tiny
    L, D, H, K, hd, F, r = (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                            cfg.intermediate_size, 3)
    p = lora.add_lora(params, nodes, rank=r, alpha=6.0, targets=ALL, seed=1)
    att = p["decoder_block"]["attention"]
    assert att["query"]["lora_a"].shape == (L, D, r) and att["query"]["lora_b"].shape == (L, r, H, hd)
    assert att["key"]["lora_b"].shape == (L, r, K, hd)
    assert att["attention_output"]["lora_a"].shape == (L, H, hd, r)
    assert att["attention_output"]["lora_b"].shape == (L, r, D)
    assert p["decoder_block"]["ffw_linear"]["lora_a"].shape == (L, F, r)
    assert p["decoder_block"]["ffw_gating"]["lora_b"].shape == (L, r, F)
    np.testing.assert_allclose(att["query"]["lora_scale"], np.full(L, 2.0))
    assert not np.any(np.asarray(att["query"]["lora_b"]))
    a = np.asarray(att["attention_output"]["lora_a"])  # PEFT's kaiming-uniform(a=sqrt 5): U(±1/sqrt(fan_in))
    bound = 1 / np.sqrt(H * hd)
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound and a.std() > 0.5 * bound
    ids = _ids(cfg)
    np.testing.assert_array_equal(_fwd(p, cfg, ids), _fwd(params, cfg, ids))
    assert lora.lora_targets(p, nodes) == ALL
    # the input tree is not modified in place
    assert "lora_a" not in params["decoder_block"]["attention"]["query"]


def test_target_names(tiny):
    cfg, params, nodes = tiny
    a = lora.add_lora(params, nodes, targets=["q_proj", "v_proj"])
    b = lora.add_lora(params, nodes, targets=("query", "value"))
    assert lora.lora_targets(a, nodes) == lora.lora_targets(b, nodes) == ("query", "value")
    assert lora.resolve_targets(PEFT_ALL, nodes) == ALL
    with pytest.raises(ValueError, match="unknown LoRA target"):
        lora.add_lora(params, nodes, targets=["qkv"])
    with pytest.raises(TypeError, match="linear nodes"):  # the signature before families took the config
        lora.add_lora(params, cfg)
    with pytest.raises(ValueError, match="already has"):
        lora.add_lora(a, nodes, targets=["query"])


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], PEFT_ALL])
def test_count_matches_peft(targets):
    import peft

    m, cfg = hf_model("gemma3")
    pm = peft.get_peft_model(m, peft.LoraConfig(r=4, target_modules=targets))
    trainable, _ = pm.get_nb_trainable_parameters()
    nodes = gm.linear_nodes(cfg)
    params = lora.add_lora(_np_params(cfg), nodes, rank=4, targets=targets)
    assert lora.count_trainable(params) == trainable
    assert lora.count_lora_params(params, nodes, 4, targets) == trainable


def test_preset_counts():
    """The figures quoted in docs/lora_quant.md (rank 4 on query + value)."""
    g7, g9 = ((abstract_from_specs(gm.param_specs(c)), gm.linear_nodes(c))
              for c in (get_preset("gemma_7b_en"), get_preset("gemma2_9b_en")))
    assert lora.count_lora_params(*g7, 4) == 1_605_632
    assert lora.count_lora_params(*g9, 4) == 2_236_416
    # Keras' per-head factorisation, as the Keras tutorials' summaries print (11M and 14.5M)
    assert lora.count_lora_params(*g7, 4, factorisation="keras") == 11_067_392
    assert lora.count_lora_params(*g9, 4, factorisation="keras") == 14_536_704


def test_split_merge_and_grad(tiny):
    cfg, params, nodes = tiny
    p = _randomize(lora.add_lora(params, nodes, targets=["query", "attention_output", "ffw_linear"]), nodes)
    trainable, frozen = lora.split_trainable(p)
    assert all(k.rsplit("/", 1)[-1] in ("lora_a", "lora_b") for k in gm.flatten(trainable))
    assert not any(k.endswith(("lora_a", "lora_b")) for k in gm.flatten(frozen))
    assert gm.flatten(lora.merge_trees(trainable, frozen)).keys() == gm.flatten(p).keys()
    mask = gm.flatten(lora.trainable_mask(p))
    assert sum(mask.values()) == 6 and mask["decoder_block/attention/query/lora_a"]
    assert not mask["decoder_block/attention/query/kernel"]
    ids = _ids(cfg)

    def loss(tr):
        return jnp.mean(_fwd(lora.merge_trees(tr, frozen), cfg, ids) ** 2)

    grads = jax.jit(jax.grad(loss))(trainable)
    flat = gm.flatten(grads)
    assert flat.keys() == gm.flatten(trainable).keys()
    assert all(float(jnp.abs(g).max()) > 0 for g in flat.values())
    assert lora.count_trainable(p) == sum(int(np.prod(v.shape)) for v in flat.values())


def test_merge_lora_and_strip(tiny):
    cfg, params, nodes = tiny
    p = _randomize(lora.add_lora(params, nodes, rank=2, alpha=5.0, targets=ALL), nodes)
    ids = _ids(cfg)
    want = np.asarray(_fwd(p, cfg, ids))
    merged = lora.merge_lora(p, nodes)
    assert not lora.lora_targets(merged, nodes)
    assert gm.flatten(merged).keys() == gm.flatten(params).keys()
    got = np.asarray(_fwd(merged, cfg, ids))
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    # without the declarations the layouts are read off the shapes: the same merge
    for k, v in gm.flatten(lora.merge_lora(p)).items():
        np.testing.assert_array_equal(v, gm.flatten(merged)[k])
    assert np.abs(want - np.asarray(_fwd(params, cfg, ids))).max() > 1e-2  # adapters did something
    np.testing.assert_array_equal(_fwd(lora.strip_lora(p), cfg, ids), _fwd(params, cfg, ids))


def test_save_load_adapter(tiny, tmp_path):
    cfg, params, nodes = tiny
    p = _randomize(lora.add_lora(params, nodes, rank=4, alpha=8.0, targets=["q_proj", "v_proj", "down_proj"],
                                 dtype=jnp.bfloat16), nodes)
    lora.save_adapter(tmp_path, p, nodes, targets=["query", "value", "ffw_linear"], rank=4, alpha=8.0)
    state = lora.lora_state(p)
    assert len(state) == 9
    back = lora.load_adapter(tmp_path, params, nodes)
    for k, v in state.items():
        got = gm.flatten(back)[k]
        assert got.dtype == v.dtype
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(v, np.float32))
    ids = _ids(cfg)
    np.testing.assert_array_equal(_fwd(back, cfg, ids), _fwd(p, cfg, ids))
    with pytest.raises(ValueError, match="rank"):
        lora.save_adapter(tmp_path / "x", p, nodes, rank=8)


def _peft_logits(pm, ids):
    with torch.no_grad():
        return pm(torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize("family", ["gemma3", "llama"])
def test_export_peft_matches_transformers(family, tmp_path):
    import peft

    m, cfg = hf_model(family)
    lm = CausalLM.from_preset(str(save_hf(m, tmp_path / "base")))
    nodes = gm.linear_nodes(lm.config)
    p = lora.add_lora(lm.params, nodes, rank=4, alpha=8.0, targets=["q_proj", "v_proj", "o_proj", "up_proj",
                                                                  "down_proj"], seed=3)
    p = _randomize(p, nodes, seed=4, std=0.2)
    # a different alpha on one target exercises alpha_pattern
    down = nodes["ffw_linear"].path
    p = set_node(p, down, dict(get_node(p, down), lora_scale=jnp.full((cfg.num_layers,), 0.5)))
    out = lora.export_peft(tmp_path / "adapter", p, nodes)
    ids = _ids(cfg)
    want = np.asarray(_fwd(p, lm.config, ids))
    pm = peft.PeftModel.from_pretrained(hf_model(family)[0], str(out))
    pm.eval()
    ref = _peft_logits(pm, ids)
    base = np.asarray(_fwd(lm.params, lm.config, ids))
    assert np.abs(base - ref).max() > 1e-2 * np.abs(ref).max()  # the adapters really change the logits
    assert np.abs(want - ref).max() <= 1e-4 * np.abs(ref).max()
    # and back: import_peft reproduces the same adapters
    back = lora.import_peft(out, lm.params, nodes)
    for k, v in lora.lora_state(p).items():
        np.testing.assert_allclose(np.asarray(gm.flatten(back)[k]), np.asarray(v), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("rslora", [False, True])
def test_import_peft_trained_adapter(rslora, tmp_path):
    """An adapter made by PEFT (random B, partial layers, rsLoRA) gives PEFT's logits in gemmax."""
    import peft

    m, cfg = hf_model("gemma3", seed=2)
    lm = CausalLM.from_preset(str(save_hf(m, tmp_path / "base")))
    conf = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["k_proj", "o_proj", "gate_proj"],
                           init_lora_weights=False, use_rslora=rslora, layers_to_transform=[0, 2, 5])
    pm = peft.get_peft_model(hf_model("gemma3", seed=2)[0], conf)
    pm.eval()
    pm.save_pretrained(tmp_path / "adapter")
    ids = _ids(cfg, seed=5)
    ref = _peft_logits(pm, ids)
    nodes = gm.linear_nodes(lm.config)
    p = lora.import_peft(tmp_path / "adapter", lm.params, nodes)
    assert lora.lora_targets(p, nodes) == ("key", "attention_output", "ffw_gating")
    assert not np.any(np.asarray(p["decoder_block"]["ffw_gating"]["lora_b"][1]))  # untouched layer: zeros
    got = np.asarray(_fwd(p, lm.config, ids))
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


# ---- the walks on declarations alone (no Gemma): several nodes per target, a lone unstacked linear --------


def _toy():
    """Two block kinds (layers 0, 2 and 1, 3 of the transformers list) that both have a "query", and one
    unstacked projector with a bias: what RecurrentGemma / PaliGemma declare, in miniature."""
    from gemmax.nn.params import LinearNode

    q = dict(eq="btd,ndh->btnh", lora_eqs=("btd,dr->btr", "btr,rnh->btnh"), in_dims=(1,), target="query",
             peft="q_proj", hf_module="self_attn.q_proj")
    nodes = {
        "a/query": LinearNode(path=("a_block", "query"), layer_ids=(0, 2), **q),
        "b/query": LinearNode(path=("b_block", "query"), layer_ids=(1, 3), **q),
        "b/out": LinearNode(path=("b_block", "out"), eq="btnh,nhd->btd", lora_eqs=("btnh,nhr->btr", "btr,rd->btd"),
                            in_dims=(0, 1), target="attention_output", peft="o_proj", hf_module="self_attn.o_proj",
                            layer_ids=(1, 3)),
        "proj": LinearNode(path=("projector",), eq="btd,de->bte", lora_eqs=("btd,dr->btr", "btr,re->bte"),
                           in_dims=(0,), target="projector", peft="proj", hf_module="multi_modal_projector.linear",
                           layers="", stacked=False),
    }
    rng = np.random.default_rng(0)

    def w(*s):
        return jnp.asarray(rng.normal(0, 0.3, s).astype(np.float32))

    params = {"a_block": {"query": {"kernel": w(2, 3, 8, 4)}}, "b_block": {"query": {"kernel": w(2, 3, 8, 4)},
                                                                          "out": {"kernel": w(2, 3, 4, 8)}},
              "projector": {"kernel": w(8, 16), "bias": w(16)}, "token_embedding": {"embeddings": w(11, 8)}}
    return nodes, params


def test_generic_targets_and_unstacked_nodes(tmp_path):
    from gemmax.nn import layers, quant
    from gemmax.nn.params import flatten

    nodes, params = _toy()
    assert lora.resolve_targets("query", nodes) == ("a/query", "b/query")
    assert lora.resolve_targets(["proj", "q_proj", "query"], nodes) == ("proj", "a/query", "b/query")
    with pytest.raises(ValueError, match="known: attention_output, o_proj, proj, projector, q_proj, query"):
        lora.resolve_targets("value", nodes)
    p = _randomize(lora.add_lora(params, nodes, rank=2, alpha=3.0, targets=["query", "o_proj", "proj"]), nodes)
    assert lora.lora_targets(p, nodes) == tuple(nodes)
    pj = p["projector"]
    assert pj["lora_a"].shape == (8, 2) and pj["lora_b"].shape == (2, 16) and pj["lora_scale"].shape == ()
    assert p["b_block"]["out"]["lora_a"].shape == (2, 3, 4, 2) and p["b_block"]["out"]["lora_b"].shape == (2, 2, 8)
    assert lora.count_trainable(p) == lora.count_lora_params(params, nodes, 2, ["query", "o_proj", "proj"])

    # merging gives the function the adapters computed, per layer and for the unstacked node (bias kept)
    merged = lora.merge_lora(p, nodes)
    assert set(merged["projector"]) == {"kernel", "bias"}
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, 8)).astype(np.float32))
    for k, n in nodes.items():
        node, m = get_node(p, n.path), get_node(merged, n.path)
        xin = x if n.in_dims == (1,) or not n.stacked else jnp.ones((2, 5, 3, 4))
        for i in range(2 if n.stacked else 1):
            sl = (lambda t, i=i: {key: v[i] for key, v in t.items()}) if n.stacked else (lambda t: t)
            np.testing.assert_allclose(layers.linear(sl(m), xin, n.eq), layers.linear(sl(node), xin, n.eq, n.lora_eqs),
                                       rtol=1e-5, atol=1e-5, err_msg=k)
    for key, v in flatten(lora.merge_lora(p)).items():  # read off the shapes: the same merge
        np.testing.assert_array_equal(v, flatten(merged)[key])

    # PEFT names from layers / layer_ids / hf_module; the import puts every factor back
    out = lora.export_peft(tmp_path / "peft", p, nodes)
    import json

    from gemmax.io.hf import SafetensorsFile

    names = set(SafetensorsFile(out / "adapter_model.safetensors").keys())
    assert "base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight" in names
    assert "base_model.model.model.layers.3.self_attn.o_proj.lora_B.weight" in names
    assert "base_model.model.multi_modal_projector.linear.lora_A.weight" in names and len(names) == 14
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == ["q_proj", "o_proj", "proj"]
    back = lora.import_peft(out, params, nodes)
    for key, v in lora.lora_state(p).items():
        np.testing.assert_allclose(np.asarray(flatten(back)[key]), np.asarray(v), rtol=1e-6, err_msg=key)
    # a truncated adapter (one layer's lora_B gone, its lora_A left) is refused, naming the node and its stacked layer
    from safetensors.numpy import load_file, save_file

    tensors = load_file(out / "adapter_model.safetensors")
    del tensors["base_model.model.model.layers.3.self_attn.o_proj.lora_B.weight"]
    save_file(tensors, out / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"b/out has lora_A but no lora_B for layer\(s\) \[1\]"):
        lora.import_peft(out, params, nodes)
    lora.save_adapter(tmp_path / "ad", p, nodes, model_info={"model": "toy"})
    assert json.loads((tmp_path / "ad" / "adapter.json").read_text())["model"] == "toy"
    again = lora.load_adapter(tmp_path / "ad", params, nodes)
    assert flatten(again).keys() == flatten(p).keys()
    assert lora.strip_lora(p).keys() == params.keys() and "lora_a" not in lora.strip_lora(p)["projector"]

    # quantization walks the same declarations: adapters and the bias stay, grouped and per-channel
    for mode, g in (("int8", None), ("nf4", 4)):
        q = quant.quantize_params(p, nodes, mode, g)
        assert quant.is_quantized(q["projector"]) and "bias" in q["projector"] and "lora_a" in q["projector"]
        assert q["token_embedding"]["scale"].shape == (11,)
        assert lora.kernel_shape(q["b_block"]["out"], nodes["b/out"]) == (2, 3, 4, 8)
        d, d0 = flatten(quant.dequantize_params(q, nodes)), flatten(quant.dequantize_params(q))
        assert d.keys() == flatten(p).keys()
        for key, v in d.items():
            np.testing.assert_array_equal(v, d0[key])
        assert float(np.abs(d["projector/kernel"] - p["projector"]["kernel"]).max()) < 0.1
