"""The decoder against transformers (torch CPU) on tiny random checkpoints of every family."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from hf_fixtures import hf_model, save_hf

import gemmax
from gemmax.api import CausalLM
from gemmax.io.hf import CheckpointError
from gemmax.models.gemma import model as gm
from gemmax.models.gemma.config import from_hf_config, to_hf_config

FAMILIES = ["gemma", "gemma2", "gemma3", "llama"]
# 21 tokens: longer than the tiny sliding window (8), so local layers really mask.
SEQ = 21


def _ids(cfg, b=2, t=SEQ, seed=0):
    return np.random.RandomState(seed).randint(0, cfg.vocab_size, (b, t))


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    m, cfg = hf_model(request.param)
    folder = save_hf(m, tmp_path_factory.mktemp(request.param))
    return m, cfg, folder


def _same_arch(a, b):
    skip = {"name", "query_pre_attn_scalar", "extra"}
    for f in dataclasses.fields(a):
        if f.name not in skip:
            assert getattr(a, f.name) == getattr(b, f.name), f.name
    assert a.query_scale == pytest.approx(b.query_scale)


def test_logits_match_transformers(checkpoint):
    m, cfg, folder = checkpoint
    lm = CausalLM.from_preset(str(folder))
    _same_arch(lm.config, cfg)
    ids = _ids(cfg)
    ref = m(torch.tensor(ids)).logits.detach().numpy()
    got = lm.logits(ids)
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("family,kw", [("gemma", {"num_kv_heads": 1}), ("gemma3", {"num_kv_heads": 1}),
                                       ("gemma2", {"num_kv_heads": 4}), ("gemma3", {"rope_scaling": None})])
def test_mqa_mha_and_rope_variants(tmp_path, family, kw):
    m, cfg = hf_model(family, seed=1, **kw)
    lm = CausalLM.from_preset(str(save_hf(m, tmp_path)))
    ids = _ids(cfg, seed=1)
    ref = m(torch.tensor(ids)).logits.detach().numpy()
    assert np.abs(lm.logits(ids) - ref).max() <= 1e-4 * np.abs(ref).max()


def test_bfloat16_path(checkpoint):
    m, cfg, folder = checkpoint
    lm = CausalLM.from_preset(str(folder), dtype="bfloat16")
    assert str(lm.dtype) == "bfloat16"
    ids = _ids(cfg)
    ref = m(torch.tensor(ids)).logits.detach().numpy()
    got = lm.logits(ids)
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err < 0.08, err
    # bf16 must still rank the same top token in most positions
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.8


def test_export_hf_round_trip(tmp_path):
    import transformers

    for family in FAMILIES:
        cfg = gemmax.tiny_config(family)
        lm = CausalLM.from_config(cfg, seed=3)
        # random non-zero norm scales so a lost offset would show
        flat = gm.flatten(lm.params)
        rng = np.random.RandomState(0)
        for p in flat:
            if p.endswith("/scale"):
                flat[p] = flat[p] + rng.randn(*flat[p].shape).astype(np.float32) * 0.5
        lm.params = gm.unflatten(flat)
        out = lm.export_hf(tmp_path / family)
        hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
        ids = _ids(cfg, seed=2)
        ref = hf(torch.tensor(ids)).logits.detach().numpy()
        got = lm.logits(ids)
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max(), family
        # and back again through gemmax
        again = CausalLM.from_preset(str(out))
        np.testing.assert_allclose(again.logits(ids), got, atol=1e-5)


def test_hf_config_round_trip():
    for name in ["gemma_7b_en", "gemma2_27b_en", "gemma3_4b", "gemma3_270m", "llama3.1_8b_en"]:
        cfg = gemmax.get_preset(name)
        _same_arch(from_hf_config(json.loads(json.dumps(to_hf_config(cfg)))), cfg)


def test_presets_are_published_sizes():
    sizes = {n: gemmax.get_preset(n).param_count()["total"] for n in gemmax.PRESETS}
    assert 2.4e9 < sizes["gemma_2b_en"] < 2.6e9
    assert 8.4e9 < sizes["gemma_7b_en"] < 8.6e9
    assert 9.1e9 < sizes["gemma2_9b_en"] < 9.3e9
    assert 27.1e9 < sizes["gemma2_27b_en"] < 27.3e9
    assert 2.6e8 < sizes["gemma3_270m"] < 2.7e8
    assert 0.99e9 < sizes["gemma3_1b"] < 1.01e9
    assert 7.9e9 < sizes["llama3_8b_en"] < 8.1e9
    assert gemmax.get_preset("gemma3_27b").query_pre_attn_scalar == 168
    assert gemmax.get_preset("gemma2_27b_en").query_pre_attn_scalar == 144
    assert gemmax.get_preset("gemma3_1b").layer_types[-2:] == ("local", "local")  # 26 = 4*6 + 2 leftover


def test_packed_segments_equal_separate_documents():
    cfg = gemmax.tiny_config("gemma3")
    lm = CausalLM.from_config(cfg, seed=0)
    a, b = _ids(cfg, 1, 11, seed=4)[0], _ids(cfg, 1, 13, seed=5)[0]
    tokens = np.concatenate([a, b])[None]
    seg = np.array([[1] * 11 + [2] * 13])
    pos = np.array([list(range(11)) + list(range(13))])
    packed = np.asarray(gm.forward(lm.params, cfg, tokens, pos, seg))
    np.testing.assert_allclose(packed[0, :11], lm.logits(a)[0], atol=1e-4)
    np.testing.assert_allclose(packed[0, 11:], lm.logits(b)[0], atol=1e-4)


def test_summary_counts(checkpoint):
    _, cfg, folder = checkpoint
    lm = CausalLM.from_preset(str(folder))
    text = lm.summary(print_fn=None)
    counts = cfg.param_count()
    assert f"Total params: {counts['total']:,}" in text
    assert f"Embedding params: {counts['embedding']:,}" in text
    assert "decoder_block/attention/query/kernel" in text


def test_save_and_load_gemmax_format(tmp_path):
    lm = CausalLM.from_config(gemmax.tiny_config("gemma2"), seed=5)
    lm.save(tmp_path / "m")
    again = CausalLM.from_preset(str(tmp_path / "m"))
    assert again.config == lm.config
    ids = _ids(lm.config)
    np.testing.assert_array_equal(again.logits(ids), lm.logits(ids))


def test_hf_handle_from_local_cache(tmp_path, monkeypatch, checkpoint):
    """hf://org/name resolves through the huggingface_hub cache with the network off."""
    m, cfg, folder = checkpoint
    cache = tmp_path / "hub"
    snap = cache / "models--acme--tiny" / "snapshots" / ("a" * 40)
    shutil.copytree(folder, snap)
    (cache / "models--acme--tiny" / "refs").mkdir()
    (cache / "models--acme--tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    lm = CausalLM.from_preset("hf://acme/tiny")
    ids = _ids(cfg)
    ref = m(torch.tensor(ids)).logits.detach().numpy()
    assert np.abs(lm.logits(ids) - ref).max() <= 1e-4 * np.abs(ref).max()
    with pytest.raises(CheckpointError, match="acme/missing"):
        CausalLM.from_preset("hf://acme/missing")


# ---- bad input ----------------------------------------------------------------------------------


def _copy(folder, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(folder, dst)
    return dst


def _rewrite(dst, fn):
    from gemmax.io.hf import SafetensorsFile, write_safetensors

    f = SafetensorsFile(dst / "model.safetensors")
    tensors = {k: np.array(f.get(k)) for k in f.keys()}
    del f
    write_safetensors(dst / "model.safetensors", fn(tensors))


def test_missing_tensor_named(tmp_path):
    m, cfg = hf_model("gemma3")
    dst = save_hf(m, tmp_path / "a")
    _rewrite(dst, lambda t: {k: v for k, v in t.items() if "layers.2.mlp.up_proj" not in k})
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.2\.mlp\.up_proj\.weight"):
        CausalLM.from_preset(str(dst))


def test_misshaped_and_unexpected_tensor_named(tmp_path):
    m, cfg = hf_model("gemma")
    dst = save_hf(m, tmp_path / "a")

    def bad(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:8]
        t["model.layers.0.extra.weight"] = np.zeros(3, np.float32)
        return t

    _rewrite(dst, bad)
    with pytest.raises(CheckpointError) as e:
        CausalLM.from_preset(str(dst))
    msg = str(e.value)
    assert "k_proj.weight has shape (8, 64), expected (32, 64)" in msg
    assert "model.layers.0.extra.weight" in msg


def test_config_contradicting_weights(tmp_path):
    m, cfg = hf_model("gemma2")
    dst = save_hf(m, tmp_path / "a")
    c = json.loads((dst / "config.json").read_text())
    c["intermediate_size"] = 96
    (dst / "config.json").write_text(json.dumps(c))
    with pytest.raises(CheckpointError, match="gate_proj.weight has shape"):
        CausalLM.from_preset(str(dst))


def test_unsupported_model_type(tmp_path):
    m, cfg = hf_model("gemma")
    dst = save_hf(m, tmp_path / "a")
    c = json.loads((dst / "config.json").read_text())
    c["model_type"] = "mistral"
    (dst / "config.json").write_text(json.dumps(c))
    with pytest.raises(ValueError, match="unsupported model_type 'mistral'"):
        CausalLM.from_preset(str(dst))


def test_truncated_and_corrupt_safetensors(tmp_path):
    m, cfg = hf_model("gemma")
    dst = save_hf(m, tmp_path / "a")
    data = (dst / "model.safetensors").read_bytes()
    (dst / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        CausalLM.from_preset(str(dst))
    (dst / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        CausalLM.from_preset(str(dst))


def test_refuses_pickles(tmp_path):
    m, cfg = hf_model("gemma")
    m.save_pretrained(tmp_path / "p", safe_serialization=False)
    for f in (tmp_path / "p").glob("*.safetensors"):
        f.unlink()
    if not list((tmp_path / "p").glob("*.bin")):
        torch.save(m.state_dict(), tmp_path / "p" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="never unpickles"):
        CausalLM.from_preset(str(tmp_path / "p"))
    from gemmax.io.hf import convert_pickle_checkpoint

    convert_pickle_checkpoint(tmp_path / "p")
    lm = CausalLM.from_preset(str(tmp_path / "p"))
    ids = _ids(cfg)
    ref = m(torch.tensor(ids)).logits.detach().numpy()
    assert np.abs(lm.logits(ids) - ref).max() <= 1e-4 * np.abs(ref).max()


def test_unknown_handle():
    with pytest.raises(CheckpointError, match="cannot load 'no_such_thing'"):
        CausalLM.from_preset("no_such_thing")


def test_init_draws_equal_direct_normals(monkeypatch):
    """init_from_specs draws small weights as the head of a power-of-two flat draw (fewer compiles): the values
    must be, bit for bit, ``jax.random.normal(key, shape) * std`` cast to the dtype, as drawn directly (the
    path of large arrays, exercised here by lowering the threshold, and of a traced init)."""
    import jax
    import jax.numpy as jnp

    from gemmax.nn import params as P

    specs = {"a": P.ParamSpec((), ()), "b": P.ParamSpec((3,), (None,), std=0.5),
             "c": P.ParamSpec((5, 7), (None, None)), "d": P.ParamSpec((2, 9, 4), (None, None, None), fan_in_axis=2),
             "e": P.ParamSpec((33, 8), (None, None), init="embedding", std=0.02),
             "f": P.ParamSpec((4,), (None,), init="ones"), "g": P.ParamSpec((6, 2), (None, None), init="zeros")}

    stds = {"a": 1.0, "b": 0.5, "c": 1 / np.sqrt(7), "d": 1 / np.sqrt(4), "e": 0.02}  # (fan-in: axis 1, or as declared)

    def direct(dtype):
        keys = jax.random.split(jax.random.key(5), len(specs))
        out = {}
        for k, (path, s) in zip(keys, sorted(specs.items()), strict=True):
            if s.init in ("zeros", "ones"):
                out[path] = np.full(s.shape, s.init == "ones", np.float32)
            else:
                draw = jax.random.normal(k, s.shape, jnp.float32) * stds[path]
                out[path] = np.asarray(draw.astype(dtype), np.float32)
        return out

    for dtype in (jnp.float32, jnp.bfloat16):
        want = direct(dtype)
        for limit in (P._BUCKETED_MAX, 8):  # bucketed, then only the smallest
            monkeypatch.setattr(P, "_BUCKETED_MAX", limit)
            got = P.init_from_specs(specs, jax.random.key(5), dtype)
            assert set(got) == set(want)
            for path, w in want.items():
                assert got[path].dtype == dtype and got[path].shape == w.shape, path
                np.testing.assert_array_equal(np.asarray(got[path], np.float32), w, err_msg=f"{path} {limit}")
