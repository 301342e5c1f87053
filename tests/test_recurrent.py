"""RecurrentGemma (Griffin) as a registered family, against transformers on a tiny random checkpoint.

The tiny model has 5 blocks (one full recurrent/recurrent/attention period plus a leftover pair, so both
the scanned and the tail path run), an attention window of 8 and sequences of 21+ tokens (the window masks
and the ring buffer wraps), and random non-zero norm scales (a lost ``1 +`` would show). Everything goes
through the one ``CausalLM`` / engine / LoRA / quantization of every family; the family's own functions
(prefill, insert, decode step) are tested against its full forward.
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

from gemmax import CausalLM
from gemmax.io.hf import CheckpointError, SafetensorsFile, write_safetensors
from gemmax.models import base
from gemmax.models import recurrent_gemma as rg
from gemmax.nn.lora import import_peft, merge_trees, split_trainable
from gemmax.nn.params import flatten, unflatten
from gemmax.train.losses import lm_loss

SEQ = 21


def _hf_model(cfg: rg.RecurrentGemmaConfig, seed: int = 0):
    import transformers

    hf = rg.to_hf_config(cfg)
    for k in ("model_type", "architectures", "head_dim", "torch_dtype", "max_position_embeddings"):
        hf.pop(k, None)
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
    # transformers' RecurrentGemma config has no context length; gemmax keeps the tiny config's
    c = json.loads((folder / "config.json").read_text())
    c["max_position_embeddings"] = cfg.max_position_embeddings
    (folder / "config.json").write_text(json.dumps(c))
    return m, cfg, folder


@pytest.fixture(scope="module")
def lm(checkpoint):
    return CausalLM.from_preset(str(checkpoint[2]))


def _ids(cfg, b=2, t=SEQ, seed=0):
    return np.random.RandomState(seed).randint(3, cfg.vocab_size, (b, t))


def test_registered_family(checkpoint, lm):
    _, cfg, _ = checkpoint
    fam = base.for_model_type("recurrent_gemma")
    assert fam is rg.FAMILY is base.get("recurrent_gemma") is base.for_config(cfg) is lm.family
    assert isinstance(lm, CausalLM) and type(lm) is CausalLM
    assert fam.config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert fam.from_hf_config(fam.to_hf_config(cfg)) == cfg.replace(name="")
    assert fam.gguf_arch(cfg) is None and fam.chat_format(cfg) == "gemma"
    assert fam.hf_architecture == "RecurrentGemmaForCausalLM"
    assert base.all_presets()["recurrent_gemma_9b_en"] == (fam, rg.PRESETS["recurrent_gemma_9b_en"])
    with pytest.raises(TypeError, match="pixel_values"):
        lm.logits(_ids(cfg), pixel_values=np.zeros((1, 4, 4, 3), np.float32))


def test_linear_nodes_name_transformers_modules(checkpoint):
    """Every dense kernel is a LinearNode whose hf_module/layer_ids are transformers' (PEFT names)."""
    m, cfg, _ = checkpoint
    nodes = rg.linear_nodes(cfg)
    table = rg.hf_table(cfg)
    modules = dict(m.named_modules())
    specs = rg.param_specs(cfg)
    assert len(nodes) == 13  # 6 recurrent-block + 7 attention-block linears
    for key, n in nodes.items():
        assert key == n.key and f"{key}/kernel" in specs
        names = table[f"{key}/kernel"][0]
        assert names == [f"model.layers.{i}.{n.hf_module}.weight" for i in n.layer_ids]
        assert all(f"model.layers.{i}.{n.hf_module}" in modules for i in n.layer_ids)
        assert n.peft == n.hf_module.rsplit(".", 1)[-1] and n.stacked
        ins = "".join(n.eq.split("->")[0].split(",")[0])
        assert all(n.eq.split(",")[1].split("->")[0][d] in ins for d in n.in_dims)
    assert nodes["attention_block/attention/query"].layer_ids == (2,)
    assert nodes["recurrent_block/linear_x"].layer_ids == (0, 1, 3, 4)
    assert {n.target for n in nodes.values()} == {"query", "key", "value", "attention_output", "ffw_gating",
                                                  "ffw_gating_2", "ffw_linear", "linear_x", "linear_y",
                                                  "linear_out"}


def test_config_and_logits_match_transformers(checkpoint, lm):
    m, cfg, _ = checkpoint
    assert lm.config == cfg.replace(name=lm.config.name)
    ids = _ids(cfg)
    ref = m(torch.tensor(ids), use_cache=False).logits.detach().numpy()
    got = lm.logits(ids)
    assert got.shape == ref.shape and got.dtype == np.float32
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def _padded(rows, width, pad):
    return np.stack([np.pad(r, (0, width - len(r)), constant_values=pad) for r in rows])


def test_greedy_generation_matches_transformers(checkpoint, lm):
    """Prompt (21) and generation (15) both run past the window (8): the ring buffer wraps."""
    m, cfg, _ = checkpoint
    ids = _ids(cfg, seed=1)
    ref = m.generate(torch.tensor(ids), max_new_tokens=15, do_sample=False).numpy()
    got = lm.generate(ids, max_new_tokens=15, sampler="greedy")
    assert len(got) == 2 and all(len(g) <= SEQ + 15 for g in got)
    # a row ends at <eos>; transformers pads it until every row has ended
    np.testing.assert_array_equal(_padded(got, ref.shape[1], cfg.pad_token_id), ref)
    # unequal prompt lengths in one batch == each prompt alone
    ragged = lm.generate([ids[0, :13], ids[1]], max_new_tokens=15)
    alone = m.generate(torch.tensor(ids[:1, :13]), max_new_tokens=15, do_sample=False).numpy()[0]
    np.testing.assert_array_equal(_padded(ragged[:1], len(alone), cfg.pad_token_id)[0], alone)
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
    cfg, params, fam = lm.config, lm.params, lm.family
    ids = _ids(cfg, b=1, t=30, seed=3)
    full = lm.logits(ids)[0]
    max_len = 64  # > window: the ring holds the window
    prefill = jax.jit(fam.prefill, static_argnames=("cfg", "max_len", "backend"))
    logits, cache = prefill(params, cfg=cfg, tokens=jnp.asarray(ids[:, :5]), lengths=jnp.asarray([5]),
                            max_len=max_len, backend="xla")
    size0 = sum(x.nbytes for x in jax.tree.leaves(cache))
    assert size0 == rg.cache_bytes(cfg, 1, 10_000, jnp.float32)
    assert jax.tree.structure(cache) == jax.tree.structure(fam.init_cache(cfg, 3, max_len, jnp.float32))
    step = jax.jit(lambda c, t, p: fam.decode_step(params, cfg, c, t, p, "xla"))
    np.testing.assert_allclose(logits[0], full[4], atol=1e-4)
    for t in range(5, 30):
        logits, cache = step(cache, jnp.asarray(ids[:, t]), jnp.asarray([t]))
        np.testing.assert_allclose(logits[0], full[t], atol=1e-4)
        assert sum(x.nbytes for x in jax.tree.leaves(cache)) == size0
    # bytes vs length: grows only until the window is full
    c2b = rg.PRESETS["recurrent_gemma_2b_en"]
    sizes = [rg.cache_bytes(c2b, 1, n) for n in (2048, 8192, 1 << 20)]
    assert sizes[0] == sizes[1] == sizes[2] < 20 << 20
    assert rg.cache_bytes(c2b, 1, 512) < sizes[0]


@pytest.mark.parametrize("max_len", [7, 40])
def test_slots_prefill_insert_decode_equal_full_forward(lm, max_len):
    """Continuous batching through the family's functions: request A (5 tokens) goes into slot 2; after 3
    decode steps request B (3 or 11 tokens) is prefilled into slot 0 while A keeps decoding; slot 1 stays
    free (garbage). Every step of both rows equals the full forward. ``max_len`` 7 is shorter than the
    window (8): the ring is the whole context; 40 is longer: the ring wraps."""
    cfg, params, fam = lm.config, lm.params, lm.family
    n = max_len - 1  # tokens a row may hold
    ids = _ids(cfg, b=2, t=n, seed=7)
    full = lm.logits(ids)
    len_a, len_b = 5, (3 if max_len < 10 else 11)
    prefill = jax.jit(fam.prefill, static_argnames=("cfg", "max_len", "backend"))
    insert = jax.jit(fam.insert)
    step = jax.jit(lambda c, t, p: fam.decode_step(params, cfg, c, t, p, "xla"))
    cache = fam.init_cache(cfg, 3, max_len, jnp.float32)

    def add(row, length, slot):
        t = min(16, max_len)
        toks = np.zeros((2, t), np.int32)  # a second, padding row goes to slot 3: dropped
        toks[0, :length] = ids[row, :length]
        logits, rows = prefill(params, cfg=cfg, tokens=jnp.asarray(toks), lengths=jnp.asarray([length, 1]),
                               max_len=max_len, backend="xla")
        np.testing.assert_allclose(logits[0], full[row, length - 1], atol=1e-4)
        return insert(cache, rows, jnp.asarray([slot, 3]))

    cache = add(0, len_a, 2)
    pos = np.array([0, 0, len_a])
    checked = {0: 0, 2: 0}
    for i in range(n):
        if i == 3:
            cache = add(1, len_b, 0)
            pos[0] = len_b
        toks = np.array([ids[1, min(pos[0], n - 1)], 7, ids[0, min(pos[2], n - 1)]], np.int32)
        logits, cache = step(cache, jnp.asarray(toks), jnp.asarray(pos, np.int32))
        for slot, row, live in ((2, 0, True), (0, 1, i >= 3)):
            if live and pos[slot] < n:
                np.testing.assert_allclose(logits[slot], full[row, pos[slot]], atol=1e-4,
                                           err_msg=f"slot {slot} position {pos[slot]}")
                checked[slot] += 1
        pos += 1
    assert checked[2] == n - len_a and checked[0] == n - len_b


def test_peft_adapters_load_in_transformers(tmp_path, checkpoint, lm):
    """Adapters on nodes of both block kinds export under transformers' module names: PEFT applies them
    to RecurrentGemmaForCausalLM with the same logits, and import_peft reads them back."""
    import copy

    import peft

    m, cfg, folder = checkpoint
    tuned = CausalLM(lm.config, lm.params).enable_lora(2, alpha=4.0, targets=("q_proj", "linear_x", "ffw_linear"),
                                                       verbose=False)
    rng = np.random.RandomState(0)
    flat = {p: (jnp.asarray(rng.randn(*a.shape) * 0.2, a.dtype) if p.endswith("lora_b") else a)
            for p, a in flatten(tuned.params).items()}
    tuned.params = unflatten(flat)
    ids = _ids(cfg, seed=8)
    want = tuned.logits(ids)
    assert np.abs(want - lm.logits(ids)).max() > 1e-2  # the adapters matter
    out = tuned.export_peft(tmp_path / "peft")
    names = SafetensorsFile(out / "adapter_model.safetensors").keys()
    assert "base_model.model.model.layers.2.temporal_block.q_proj.lora_A.weight" in names
    assert "base_model.model.model.layers.4.temporal_block.linear_x.lora_B.weight" in names
    assert "base_model.model.model.layers.3.mlp_block.down_proj.lora_A.weight" in names
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(m), str(out)).eval()
    with torch.no_grad():
        got = ref(torch.tensor(ids), use_cache=False).logits.numpy()
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    back = CausalLM.from_preset(str(folder))
    back.params = import_peft(out, back.params, back.linear_nodes)
    np.testing.assert_allclose(back.logits(ids), want, atol=1e-5)


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
    np.testing.assert_allclose(CausalLM.from_preset(str(out)).logits(ids), lm.logits(ids), atol=1e-6)
    # gemmax's own format: config through to_dict / config_from_dict
    native = CausalLM.from_preset(str(lm.save(tmp_path / "native")))
    assert native.config == lm.config and native.family is rg.FAMILY
    np.testing.assert_array_equal(native.logits(ids), lm.logits(ids))


def test_presets_summary_and_logical_axes(lm):
    sizes = {n: c.param_count()["total"] for n, c in rg.PRESETS.items()}
    assert 2.6e9 < sizes["recurrent_gemma_2b_en"] < 2.75e9
    assert 8.5e9 < sizes["recurrent_gemma_9b_en"] < 8.7e9
    text = lm.summary(print_fn=None)
    assert f"Total params: {lm.config.param_count()['total']:,}" in text
    assert "recurrent_block/rg_lru/a_gate/kernel" in text
    specs = rg.param_specs(lm.config)
    weights = dict(lm.weights())
    assert set(weights) == set(specs)
    for path, s in specs.items():
        assert len(s.axes) == len(s.shape) == weights[path].ndim and tuple(weights[path].shape) == s.shape, path
        assert path.startswith(("token_embedding", "final_")) or s.axes[0] == "layers", path
    assert specs["attention_block/attention/query/kernel"].axes == ("layers", "heads", "embed", "head_dim")
    assert specs["recurrent_block/linear_x/kernel"].axes == ("layers", "embed", "lru")
    assert specs["recurrent_block/rg_lru/a_param"].axes == ("layers", "lru")
    assert specs["recurrent_block/conv_1d/kernel"].axes == ("layers", "conv", "lru")
    assert specs["recurrent_block/ffw_linear/kernel"].axes == ("layers", "mlp", "embed")
    assert specs["token_embedding/embeddings"].axes == ("vocab", "embed")


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
        CausalLM.from_preset(str(dst))
    msg = str(e.value)
    assert "missing tensor model.layers.3.temporal_block.rg_lru.recurrent_param" in msg
    assert "model.layers.2.temporal_block.k_proj.weight has shape (4, 48), expected (12, 48)" in msg
    assert "model.layers.0.surprise.weight" in msg
    c = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({k: v for k, v in c.items() if k != "hidden_size"}))
    with pytest.raises(CheckpointError, match="config.json.*hidden_size"):
        CausalLM.from_preset(str(dst))
    (dst / "config.json").write_text(json.dumps(dict(c, block_types=["recurrent", "mamba"])))
    with pytest.raises(CheckpointError, match="not a usable recurrent_gemma config.*mamba"):
        CausalLM.from_preset(str(dst))
    (dst / "config.json").write_text(json.dumps(dict(c, model_type="griffin")))
    with pytest.raises(base.UnsupportedModelType, match="model_type 'griffin'.*recurrent_gemma"):
        CausalLM.from_preset(str(dst))


# ---- int8, LoRA, shard plans: the generic transforms over the family's linear nodes ----------------------


@pytest.fixture(scope="module")
def rg_lm():
    return CausalLM.from_config(rg.tiny_config(num_layers=3), seed=0)


def _vids(vocab: int, b: int = 2, t: int = 13, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(3, vocab, (b, t))


def test_recurrent_int8_close_to_float(rg_lm, tmp_path):
    ids = _vids(rg_lm.config.vocab_size)
    ref = rg_lm.logits(ids)
    folder = rg_lm.export_hf(tmp_path / "rg")
    q = CausalLM.from_preset(str(folder), quantize="int8")  # dispatch + quantize-after-load
    assert type(q) is CausalLM and q.family is rg.FAMILY and rg.compute_dtype(q.params) == jnp.float32
    flat = flatten(q.params)
    assert flat["recurrent_block/linear_x/kernel"].dtype == jnp.int8
    assert flat["attention_block/attention/query/kernel"].dtype == jnp.int8
    assert flat["attention_block/ffw_linear/kernel"].dtype == jnp.int8
    assert flat["token_embedding/embeddings"].dtype == jnp.int8
    assert flat["recurrent_block/rg_lru/a_gate/kernel"].dtype == jnp.float32  # the LRU gates stay float
    assert flat["recurrent_block/conv_1d/kernel"].dtype == jnp.float32
    got = q.logits(ids)
    assert np.abs(got - ref).max() <= 0.05 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
    # int8 decoding (its cache must stay float although the embedding is int8): each greedy token is mostly
    # the one the float model picks after the same prefix
    seqs = q.generate(ids, max_new_tokens=3)
    assert len(seqs) == 2
    picks = []
    for row, seq in zip(ids, seqs, strict=True):
        assert len(row) < len(seq) <= len(row) + 3 and (seq[:len(row)] == row).all()
        picks += list(rg_lm.logits(seq)[0, len(row) - 1:-1].argmax(-1) == seq[len(row):])
    assert np.mean(picks) >= 0.75
    assert "int8" in q.summary(print_fn=None)


def test_recurrent_lora_trains_only_adapters_and_merges(rg_lm, tmp_path):
    cfg = rg_lm.config
    lm = CausalLM(cfg, rg_lm.params).enable_lora(4, targets=("query", "v_proj", "ffw_gating", "linear_x"),
                                                   verbose=False)
    ids = jnp.asarray(_vids(cfg.vocab_size, seed=1))
    np.testing.assert_allclose(lm.logits(ids), rg_lm.logits(ids), atol=1e-6)  # B = 0: unchanged
    trainable, frozen = split_trainable(lm.params)
    paths = sorted(flatten(trainable))
    assert paths and all(p.endswith(("lora_a", "lora_b")) for p in paths)
    assert "recurrent_block/linear_x/lora_b" in paths and "attention_block/attention/query/lora_b" in paths
    assert "attention_block/attention/value/lora_b" in paths  # by its PEFT name
    assert "recurrent_block/ffw_gating/lora_b" in paths and "attention_block/ffw_gating/lora_b" in paths
    assert not any("linear_y" in p or "rg_lru" in p for p in paths)

    fam = rg.FAMILY
    opt = optax.adam(2e-2)
    mask = jnp.ones(ids.shape, jnp.float32).at[:, -1].set(0.0)
    targets = jnp.roll(ids, -1, axis=1)

    def loss_fn(t):  # the trainer's loss: forward_hidden + the chunked head of gemmax.train.losses
        p = merge_trees(t, frozen)
        s = lm_loss(p, cfg, fam.forward_hidden(p, cfg, ids), targets, mask)
        return s.sum_loss / s.n_tokens

    @jax.jit
    def step(t, s):
        loss, g = jax.value_and_grad(loss_fn)(t)
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
    # export merges the adapters: the reloaded plain model computes the tuned function
    np.testing.assert_allclose(CausalLM.from_preset(str(lm.export_hf(tmp_path / "x"))).logits(ids), tuned,
                               atol=1e-4)
    lm.merge_lora()
    assert not any(p.endswith("lora_a") for p in flatten(lm.params))
    np.testing.assert_allclose(lm.logits(ids), tuned, atol=1e-4)


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
