"""RecurrentGemma (Griffin) against transformers on a tiny random checkpoint.

The tiny model has 5 blocks (one full recurrent/recurrent/attention period plus a leftover pair, so both
the scanned and the tail path run), an attention window of 8 and sequences of 21+ tokens (the window masks
and the ring buffer wraps), and random non-zero norm scales (a lost ``1 +`` would show).
"""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from gemmax.io.hf import CheckpointError, SafetensorsFile, write_safetensors
from gemmax.models import recurrent_gemma as rg
from gemmax.models.gemma.model import flatten
from gemmax.nn.lora import merge_trees, split_trainable

SEQ = 21


def _hf_model(cfg: rg.RecurrentGemmaConfig, seed: int = 0):
    import transformers

    hf = rg.to_hf_config(cfg)
    for k in ("model_type", "architectures", "head_dim", "torch_dtype"):
        hf.pop(k)
    torch.manual_seed(seed)
    m = transformers.RecurrentGemmaForCausalLM(transformers.RecurrentGemmaConfig(**hf))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.5)
            elif "recurrent_param" not in name:  # keep Griffin's decay init: a in [0.9, 0.999]
                p.copy_(torch.randn_like(p) * 0.3)
    return m.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = rg.tiny_config()
    m = _hf_model(cfg)
    folder = tmp_path_factory.mktemp("rg")
    m.save_pretrained(folder, safe_serialization=True)
    return m, cfg, folder


@pytest.fixture(scope="module")
def lm(checkpoint):
    return rg.load_recurrent_gemma(checkpoint[2])


def _ids(cfg, b=2, t=SEQ, seed=0):
    return np.random.RandomState(seed).randint(3, cfg.vocab_size, (b, t))


def test_config_and_logits_match_transformers(checkpoint, lm):
    m, cfg, _ = checkpoint
    assert lm.config == cfg.replace(name=lm.config.name)
    ids = _ids(cfg)
    ref = m(torch.tensor(ids), use_cache=False).logits.detach().numpy()
    got = lm.logits(ids)
    assert got.shape == ref.shape and got.dtype == np.float32
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_greedy_generation_matches_transformers(checkpoint, lm):
    """Prompt (21) and generation (15) both run past the window (8): the ring buffer wraps."""
    m, cfg, _ = checkpoint
    ids = _ids(cfg, seed=1)
    ref = m.generate(torch.tensor(ids), max_new_tokens=15, do_sample=False).numpy()
    got = lm.generate(ids, max_new_tokens=15, sampler="greedy")
    assert isinstance(got, np.ndarray)
    np.testing.assert_array_equal(got[:, :ref.shape[1]], ref)
    # unequal prompt lengths in one batch == each prompt alone
    rows = [ids[0, :13], ids[1]]
    ragged = lm.generate(rows, max_new_tokens=15)
    alone = m.generate(torch.tensor(ids[:1, :13]), max_new_tokens=15, do_sample=False).numpy()[0]
    np.testing.assert_array_equal(ragged[0][:len(alone)], alone)
    np.testing.assert_array_equal(ragged[1], got[1])


def test_associative_scan_equals_step_by_step():
    rng = np.random.RandomState(0)
    a = jnp.asarray(rng.uniform(0.5, 1.0, (2, 37, 6)), jnp.float32)
    b = jnp.asarray(rng.randn(2, 37, 6), jnp.float32)
    h0 = jnp.asarray(rng.randn(2, 6), jnp.float32)
    for init in (None, h0):
        np.testing.assert_allclose(rg.linear_scan(a, b, init), rg.sequential_scan(a, b, init), atol=1e-5)
    # a plain Python loop as the ground truth
    h = np.asarray(h0)
    for t in range(37):
        h = np.asarray(a[:, t]) * h + np.asarray(b[:, t])
    np.testing.assert_allclose(rg.linear_scan(a, b, h0)[:, -1], h, atol=1e-5)


def test_whole_model_scan_paths_agree(lm):
    ids = _ids(lm.config, seed=2)
    fast = lm.logits(ids)
    slow = rg._forward_jit(lm.params, lm.config, ids, scan=rg.sequential_scan)
    np.testing.assert_allclose(fast, slow, atol=1e-4)


def test_decode_steps_equal_full_forward_and_memory_is_constant(lm):
    """Prefill + token-by-token decoding gives the full forward's logits, and the state never grows."""
    cfg, params = lm.config, lm.params
    ids = _ids(cfg, b=1, t=30, seed=3)
    full = lm.logits(ids)[0]
    cache_len = cfg.attention_window
    prefill = jax.jit(rg.prefill, static_argnums=(1, 4))
    logits, cache = prefill(params, cfg, jnp.asarray(ids[:, :5]), jnp.asarray([5]), cache_len)
    size0 = sum(x.nbytes for x in jax.tree.leaves(cache))
    assert size0 == rg.cache_bytes(cfg, 1, 10_000, jnp.float32)
    step = jax.jit(lambda c, t: rg.decode_step(params, cfg, c, t))
    np.testing.assert_allclose(logits[0], full[4], atol=1e-4)
    for t in range(5, 30):
        logits, cache = step(cache, jnp.asarray(ids[:, t]))
        np.testing.assert_allclose(logits[0], full[t], atol=1e-4)
        assert sum(x.nbytes for x in jax.tree.leaves(cache)) == size0
    # bytes vs length: grows only until the window is full
    c2b = rg.PRESETS["recurrent_gemma_2b_en"]
    sizes = [rg.cache_bytes(c2b, 1, n) for n in (2048, 8192, 1 << 20)]
    assert sizes[0] == sizes[1] == sizes[2] < 20 << 20


def test_packed_documents_are_independent(lm):
    cfg = lm.config
    a, b = _ids(cfg, 1, 11, seed=4)[0], _ids(cfg, 1, 13, seed=5)[0]
    tokens = np.concatenate([a, b])[None]
    seg = np.array([[1] * 11 + [2] * 13])
    pos = np.array([list(range(11)) + list(range(13))])
    packed = np.asarray(rg._forward_jit(lm.params, cfg, tokens, pos, seg))
    alone = lm.logits(np.stack([np.pad(a, (0, 2)), b]))
    np.testing.assert_allclose(packed[0, :11], alone[0, :11], atol=1e-4)
    np.testing.assert_allclose(packed[0, 11:], alone[1], atol=1e-4)


def test_export_round_trip(tmp_path, checkpoint, lm):
    import transformers

    m, cfg, _ = checkpoint
    out = lm.export_hf(tmp_path / "x")
    again = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = _ids(cfg, seed=6)
    ref = m(torch.tensor(ids), use_cache=False).logits.detach().numpy()
    np.testing.assert_allclose(again(torch.tensor(ids), use_cache=False).logits.detach().numpy(), ref, atol=1e-5)
    np.testing.assert_allclose(rg.load_recurrent_gemma(out).logits(ids), lm.logits(ids), atol=1e-6)


def test_presets_summary_and_layout(lm):
    sizes = {n: c.param_count()["total"] for n, c in rg.PRESETS.items()}
    assert 2.6e9 < sizes["recurrent_gemma_2b_en"] < 2.75e9
    assert 8.5e9 < sizes["recurrent_gemma_9b_en"] < 8.7e9
    text = lm.summary(print_fn=None)
    assert f"Total params: {lm.config.param_count()['total']:,}" in text
    assert "recurrent_block/rg_lru/a_gate/kernel" in text
    for path, a in lm.weights():
        spec = rg.layout_spec(path)
        assert spec is None or len(spec) == a.ndim, path
    assert rg.layout_spec("attention_block/attention/query/kernel") == (None, "model", None, None)


def _rewrite(folder, tmp_path, fn):
    dst = tmp_path / "ckpt"
    shutil.copytree(folder, dst)
    f = SafetensorsFile(dst / "model.safetensors")
    tensors = {k: np.array(f.get(k)) for k in f.keys()}
    del f
    write_safetensors(dst / "model.safetensors", fn(tensors))
    return dst


def test_bad_checkpoints_named(tmp_path, checkpoint):
    _, _, folder = checkpoint

    def bad(t):
        del t["model.layers.3.temporal_block.rg_lru.recurrent_param"]
        t["model.layers.2.temporal_block.k_proj.weight"] = t["model.layers.2.temporal_block.k_proj.weight"][:4]
        t["model.layers.0.surprise.weight"] = np.zeros(3, np.float32)
        return t

    dst = _rewrite(folder, tmp_path, bad)
    with pytest.raises(CheckpointError) as e:
        rg.load_recurrent_gemma(dst)
    msg = str(e.value)
    assert "missing tensor model.layers.3.temporal_block.rg_lru.recurrent_param" in msg
    assert "model.layers.2.temporal_block.k_proj.weight has shape (4, 48), expected (12, 48)" in msg
    assert "model.layers.0.surprise.weight" in msg
    c = json.loads((dst / "config.json").read_text())
    c["model_type"] = "gemma"
    (dst / "config.json").write_text(json.dumps(c))
    with pytest.raises(CheckpointError, match="RecurrentGemma"):
        rg.load_recurrent_gemma(dst)


# ---- RecurrentGemma ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rg_lm():
    return rg.RecurrentGemmaLM.from_config(rg.tiny_config(num_layers=3), seed=0)


def _vids(vocab: int, b: int = 2, t: int = 13, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(3, vocab, (b, t))


def test_recurrent_int8_close_to_float(rg_lm, tmp_path):
    from gemmax.api import CausalLM

    ids = _vids(rg_lm.config.vocab_size)
    ref = rg_lm.logits(ids)
    folder = rg_lm.export_hf(tmp_path / "rg")
    q = CausalLM.from_preset(str(folder), quantize="int8")  # dispatch + quantize-after-load
    assert isinstance(q, rg.RecurrentGemmaLM) and q.dtype == jnp.float32
    flat = flatten(q.params)
    assert flat["recurrent_block/linear_x/kernel"].dtype == jnp.int8
    assert flat["attention_block/attention/query/kernel"].dtype == jnp.int8
    assert flat["token_embedding/embeddings"].dtype == jnp.int8
    assert flat["recurrent_block/rg_lru/a_gate/kernel"].dtype == jnp.float32  # the LRU gates stay float
    got = q.logits(ids)
    assert np.abs(got - ref).max() <= 0.05 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
    # int8 decoding (its cache must stay float although the embedding is int8): each greedy token is mostly
    # the one the float model picks after the same prefix (13 + 3 new = one length bucket: no recompile)
    seq = q.generate(ids, max_new_tokens=3)
    assert seq.shape == (2, 16)
    float_pick = rg_lm.logits(seq)[:, ids.shape[1] - 1:-1].argmax(-1)
    assert (float_pick == seq[:, ids.shape[1]:]).mean() >= 0.75
    assert "int8" in q.summary(print_fn=None)


def test_recurrent_lora_trains_only_adapters_and_merges(rg_lm, tmp_path):
    cfg = rg_lm.config
    lm = rg.RecurrentGemmaLM(cfg, rg_lm.params).enable_lora(4, ("query", "value", "ffw_gating", "linear_x"))
    ids = jnp.asarray(_vids(cfg.vocab_size, seed=1))
    np.testing.assert_allclose(lm.logits(ids), rg_lm.logits(ids), atol=1e-6)  # B = 0: unchanged
    trainable, frozen = split_trainable(lm.params)
    paths = sorted(flatten(trainable))
    assert paths and all(p.endswith(("lora_a", "lora_b")) for p in paths)
    assert "recurrent_block/linear_x/lora_b" in paths and "attention_block/attention/query/lora_b" in paths

    opt = optax.adam(2e-2)

    @jax.jit
    def step(t, s):
        loss, g = jax.value_and_grad(lambda t: rg.lm_loss(merge_trees(t, frozen), cfg, ids))(t)
        u, s = opt.update(g, s, t)
        return optax.apply_updates(t, u), s, loss, g

    state = opt.init(trainable)
    losses = []
    for i in range(4):
        trainable, state, loss, grads = step(trainable, state)
        if i == 0:
            assert all(float(jnp.abs(v).max()) > 0 for p, v in flatten(grads).items() if p.endswith("lora_b"))
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    lm.params = merge_trees(trainable, frozen)
    tuned = lm.logits(ids)
    merged = rg.RecurrentGemmaLM(cfg, rg.merge_lora(lm.params, cfg))
    assert not any(p.endswith("lora_a") for p in flatten(merged.params))
    np.testing.assert_allclose(merged.logits(ids), tuned, atol=1e-4)
    # export merges the adapters: the reloaded plain model computes the tuned function
    np.testing.assert_allclose(rg.load_recurrent_gemma(lm.export_hf(tmp_path / "x")).logits(ids), tuned, atol=1e-4)


def test_cli_shard_plans_and_summary(rg_lm, tmp_path, capsys):
    from gemmax.cli import main

    rg_folder = rg_lm.export_hf(tmp_path / "rg")
    assert main(["shard-plan", str(rg_folder), "--mesh", "2x4", "--lora-rank", "2"]) == 0
    out = capsys.readouterr().out
    for row in ("recurrent_block/rg_lru/a_gate/kernel", "recurrent_block/linear_x/kernel",
                "attention_block/attention/query/kernel", "attention_block/attention/query/lora_a"):
        assert row in out, row
    assert main(["shard-plan", "recurrent_gemma_9b_en", "--mesh", "2x4", "--no-optimizer"]) == 0
    assert "recurrent_block/ffw_linear/kernel" in capsys.readouterr().out
    assert "recurrent_block/linear_x/kernel" in rg_lm.summary(print_fn=None)
