"""keras-hub presets in and out: keras-hub itself (JAX backend, no TensorFlow) is the peer.

Tiny random backbones of each family are built and saved by keras-hub; gemmax loads the presets with equal
float32 logits, its exports load back in keras-hub with equal logits, a Keras-initialised (non-zero) LoRA
loads in gemmax with equal logits and gemmax's adapters load in Keras; damaged weight files get named errors.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import shutil
from pathlib import Path

import keras  # noqa: E402  (after KERAS_BACKEND is set)
import keras_hub  # noqa: E402
import numpy as np
import pytest
from spm_fixtures import train_tiny_sentencepiece

from gemmax import CausalLM
from gemmax.io.keras import (
    KerasPresetError,
    factors_to_keras_lora,
    keras_lora_to_factors,
    resolve_kaggle_handle,
)

if keras.backend.backend() != "jax":
    raise RuntimeError("tests/test_keras.py needs KERAS_BACKEND=jax (set before keras is imported)")

FAMILIES = ("gemma", "gemma2", "gemma3", "llama3")
SEQ = 12


def _backbone(kind: str, vocab: int):
    M = keras_hub.models
    common = dict(vocabulary_size=vocab, num_layers=2, num_query_heads=4, num_key_value_heads=2, hidden_dim=16,
                  intermediate_dim=32, head_dim=8, dtype="float32")
    if kind == "gemma":
        return M.GemmaBackbone(**common)
    if kind == "gemma2":  # soft-caps, sandwich norms, alternating windows shorter than the sequence
        return M.GemmaBackbone(**common, use_post_ffw_norm=True, use_post_attention_norm=True,
                               final_logit_soft_cap=30.0, attention_logit_soft_cap=50.0,
                               use_sliding_window_attention=True, sliding_window_size=4)
    if kind == "gemma3":  # 5 local + 1 global + 1 local, qk-norms, scaled global RoPE
        return M.Gemma3Backbone(image_size=28, **dict(common, num_layers=7), use_post_ffw_norm=True,
                                use_post_attention_norm=True, use_sliding_window_attention=True,
                                sliding_window_size=4, global_rope_scaling_factor=8.0)
    common.pop("head_dim")
    return M.Llama3Backbone(**common, rope_max_wavelength=500000, rope_frequency_adjustment_factor=8.0,
                            rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                            rope_pretraining_sequence_length=8)


def _randomize(model, seed: int) -> None:
    """Random non-zero values everywhere: Gemma's zero-initialised (1 + w) norms would hide an offset bug."""
    rng = np.random.default_rng(seed)
    for w in model.weights:
        w.assign(rng.normal(0, 0.3 if len(w.shape) == 1 else 0.1, w.shape).astype("float32"))


def keras_logits(backbone, ids: np.ndarray) -> np.ndarray:
    """What keras-hub's CausalLM computes: the backbone, then the (soft-capped) reversed embedding."""
    h = backbone({"token_ids": ids, "padding_mask": np.ones_like(ids)})
    return np.asarray(backbone.token_embedding(h, reverse=True))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("spm")
    train_tiny_sentencepiece(d, ["the cat sat on the mat", "a quick brown fox jumps over the dog"] * 20, 64,
                             symbols=("<start_of_turn>", "<end_of_turn>", "<image>", "<img>", "<start_of_image>",
                                      "<end_of_image>"))
    return d


def _llama3_tokenizer():
    """A byte-level BPE vocabulary: the 256 byte symbols, a few merges, Llama 3's control tokens."""
    from tokenizers import pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = ["Ġ t", "h e", "Ġt he", "a t", "c at", "Ġ cat", "Ġ s", "Ġs at"]
    for m in merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    for t in ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"):
        vocab[t] = len(vocab)
    return keras_hub.models.Llama3Tokenizer(vocabulary=vocab, merges=merges)


@pytest.fixture(scope="module")
def presets(tmp_path_factory, tok_dir) -> dict[str, tuple[Path, object]]:
    """kind -> (preset folder keras-hub wrote, its backbone), each with its tokenizer."""
    out = {}
    for i, kind in enumerate(FAMILIES):
        tok = keras_hub.models.GemmaTokenizer(proto=str(tok_dir / "tok.model")) if kind != "llama3" \
            else _llama3_tokenizer()
        bb = _backbone(kind, tok.vocabulary_size())
        _randomize(bb, i)
        d = tmp_path_factory.mktemp(f"keras_{kind}")
        bb.save_to_preset(d)
        tok.save_to_preset(d)
        out[kind] = (d, bb)
    return out


@pytest.fixture(scope="module")
def ids(presets) -> np.ndarray:
    return np.random.default_rng(7).integers(4, 60, (2, SEQ)).astype("int32")


@pytest.mark.parametrize("kind", FAMILIES)
def test_preset_loads_with_keras_logits(presets, ids, kind):
    folder, bb = presets[kind]
    lm = CausalLM.from_preset(folder)
    assert lm.config.family == {"gemma3": "gemma3", "llama3": "llama", "gemma2": "gemma2"}.get(kind, "gemma")
    np.testing.assert_allclose(lm.logits(ids), keras_logits(bb, ids), atol=2e-5, rtol=1e-5)


def test_tokenizer_from_preset(presets, tok_dir):
    folder, _ = presets["gemma"]
    lm = CausalLM.from_preset(folder)
    ktok = keras_hub.models.GemmaTokenizer.from_preset(str(folder))
    for text in ("the cat sat", "a quick brown dog"):
        assert lm.tokenizer.encode(text, add_bos=False) == np.asarray(ktok(text)).tolist()
    assert lm.config.bos_token_id == 2 and lm.config.pad_token_id == 0
    assert lm.tokenizer.end_of_turn_id in lm.config.eos_ids  # generation stops at <end_of_turn>, as keras-hub's
    prompt = lm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], family=lm.chat_format)
    assert prompt == "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"
    llama = CausalLM.from_preset(presets["llama3"][0])  # byte-level BPE from vocabulary.json + merges.txt
    ktok = keras_hub.models.Llama3Tokenizer.from_preset(str(presets["llama3"][0]))
    for text in ("the cat sat", "hello, the cat!\n"):
        assert llama.tokenizer.encode(text, add_bos=False) == np.asarray(ktok(text)).tolist()
    assert llama.config.bos_token_id == ktok.start_token_id
    assert set(llama.config.eos_ids) == {ktok.end_token_id, ktok.token_to_id("<|eot_id|>")}


@pytest.mark.parametrize("kind", ["gemma2", "gemma3", "llama3"])  # (Gemma 1 is gemma2's backbone class, less)
def test_export_loads_in_keras(presets, ids, tmp_path, kind):
    """A gemmax model with a merged non-zero LoRA, exported as a preset: keras-hub's CausalLM loads it."""
    lm = CausalLM.from_preset(presets[kind][0])
    lm.enable_lora(2, verbose=False)
    lm.params = _nonzero_lora(lm.params)
    want = lm.logits(ids)
    out = lm.export_keras(tmp_path / "exported")
    if kind in ("gemma", "gemma2"):  # keras-hub's Gemma 3 preprocessor needs TensorFlow: backbone + tokenizer
        task = keras_hub.models.CausalLM.from_preset(str(out))
        backbone, tokenizer = task.backbone, task.preprocessor.tokenizer
    else:
        backbone = keras_hub.models.Backbone.from_preset(str(out))
        tokenizer = (keras_hub.models.Gemma3Tokenizer if kind == "gemma3" else keras_hub.models.Llama3Tokenizer
                     ).from_preset(str(out))
    np.testing.assert_allclose(keras_logits(backbone, ids), want, atol=2e-5, rtol=1e-5)
    assert np.asarray(tokenizer("the cat")).tolist() == lm.tokenizer.encode("the cat", add_bos=False)


@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
def test_export_folds_query_scale(presets, ids, tmp_path, kind):
    """keras-hub scales queries by head_dim only; a model whose query_pre_attn_scalar differs (Gemma 2/3 27B)
    is exported with the rest of the scale in its weights (the query kernel, or Gemma 3's query norm, which
    would undo a kernel factor), so keras-hub computes the same logits."""
    loaded = CausalLM.from_preset(presets[kind][0])
    lm = CausalLM(loaded.config.replace(query_pre_attn_scalar=24.0), loaded.params, loaded.tokenizer)
    want = lm.logits(ids)
    assert np.abs(want - loaded.logits(ids)).max() > 1e-3  # the scale matters
    back = keras_hub.models.Backbone.from_preset(str(lm.export_keras(tmp_path / "k")))
    np.testing.assert_allclose(keras_logits(back, ids), want, atol=2e-5, rtol=1e-5)


def _nonzero_lora(params):
    """B is zero after enable_lora; give it values so the adapters change the outputs."""
    import jax

    rng = np.random.default_rng(3)
    return jax.tree_util.tree_map_with_path(
        lambda kp, v: rng.normal(0, 0.2, v.shape).astype(np.float32) if str(kp[-1].key) == "lora_b" else v, params)


@pytest.mark.parametrize("kind", ["gemma3", "llama3"])
def test_keras_lora_loads_in_gemmax(presets, ids, tmp_path, kind):
    """A Keras LoRA (``enable_lora(rank=4)`` on query/value, random non-zero factors as training leaves them)
    saved with ``save_lora_weights`` gives gemmax the logits Keras computes."""
    folder, _ = presets[kind]
    bb = keras_hub.models.Backbone.from_preset(str(folder))
    bb.enable_lora(4)
    rng = np.random.default_rng(11)
    for w in bb.trainable_weights:
        if "lora" in w.path:  # (the ViT's trainable Dense biases are not part of a Keras LoRA file)
            w.assign(rng.normal(0, 0.2, w.shape).astype("float32"))
    bb.save_lora_weights(str(tmp_path / "tuned.lora.h5"))
    want = keras_logits(bb, ids)
    lm = CausalLM.from_preset(folder)
    base = lm.logits(ids)
    lm.load_keras_lora(tmp_path / "tuned.lora.h5")
    got = lm.logits(ids)
    assert np.abs(want - base).max() > 1e-2  # the adapters matter
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["llama3"])  # per-head q/v with Keras' [hidden, heads, head_dim], a Dense MLP
def test_gemmax_lora_kept_as_keras_lora(presets, ids, tmp_path, kind):
    lm = CausalLM.from_preset(presets[kind][0])
    lm.enable_lora(2, targets=("query", "value", "ffw_linear"), verbose=False)
    lm.params = _nonzero_lora(lm.params)
    want = lm.logits(ids)
    out = lm.export_keras(tmp_path / "kept", lora="keep")
    bb = keras_hub.models.Backbone.from_preset(str(out))
    base = keras_logits(bb, ids)
    names = ["query", "value", "ffw_linear" if kind == "gemma" else "feedforward_output_dense"]
    bb.enable_lora(_rank(out / "model.lora.h5"), target_layer_names=names)
    bb.load_lora_weights(str(out / "model.lora.h5"))
    assert np.abs(want - base).max() > 1e-2
    np.testing.assert_allclose(keras_logits(bb, ids), want, atol=2e-5, rtol=1e-5)


def _rank(path: Path) -> int:
    import h5py

    with h5py.File(path) as f:
        return int(f["lora/vars/rank"][()])


def test_per_head_factors_roundtrip():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 16, 3)), rng.normal(size=(3, 8))
    big_a, big_b = keras_lora_to_factors(a, b, scale=0.5)
    delta = 0.5 * np.einsum("hdr,rk->hdk", a, b)
    np.testing.assert_allclose(np.einsum("dr,rhk->hdk", big_a, big_b), delta, atol=1e-5)
    ka, kb = factors_to_keras_lora(delta)
    assert kb.shape[0] == 3  # the smallest exact shared basis
    np.testing.assert_allclose(np.einsum("hdr,rk->hdk", ka, kb), delta, atol=1e-5)


def test_truncated_and_mismatched_h5(presets, tmp_path):
    src, _ = presets["gemma"]
    trunc = tmp_path / "trunc"
    shutil.copytree(src, trunc)
    w = trunc / "model.weights.h5"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(KerasPresetError, match="truncated"):
        CausalLM.from_preset(trunc)
    junk = tmp_path / "junk"
    shutil.copytree(src, junk)
    (junk / "model.weights.h5").write_bytes(b"not an hdf5 file" * 64)
    with pytest.raises(KerasPresetError, match="model.weights.h5"):
        CausalLM.from_preset(junk)
    other = tmp_path / "other"  # gemma2's weights under gemma's config: post-norms unexpected
    shutil.copytree(src, other)
    shutil.copy(presets["gemma2"][0] / "model.weights.h5", other / "model.weights.h5")
    with pytest.raises(KerasPresetError, match="post_ffw_norm"):
        CausalLM.from_preset(other)
    cfg = tmp_path / "cfg"
    shutil.copytree(src, cfg)
    text = (cfg / "config.json").read_text().replace('"num_layers": 2', '"num_layers": 3')
    (cfg / "config.json").write_text(text)
    with pytest.raises(KerasPresetError, match=r"missing tensor layers/gemma_decoder_block_2/"):
        CausalLM.from_preset(cfg)
    lm = CausalLM.from_preset(src)
    with pytest.raises(KerasPresetError, match="not dense layers"):
        lm.load_keras_lora(_fake_lora(tmp_path / "bad.lora.h5"))


def test_sharded_preset(presets, ids, tmp_path):
    """A preset saved in shards (``model.weights.json`` + ``model_0000N.weights.h5``) loads the same."""
    folder, bb = presets["gemma"]
    bb.save_to_preset(tmp_path / "sharded", max_shard_size=5e-6)
    assert (tmp_path / "sharded" / "model_00001.weights.h5").exists()
    np.testing.assert_allclose(CausalLM.from_preset(tmp_path / "sharded").logits(ids), keras_logits(bb, ids),
                               atol=2e-5, rtol=1e-5)


def _fake_lora(path: Path) -> Path:
    from gemmax.io.keras import write_lora_file

    return write_lora_file(path, 2, {999: (np.zeros((4, 16, 2)), np.zeros((2, 8)))})


def test_kaggle_handle_from_cache(presets, ids, tmp_path, monkeypatch):
    folder, bb = presets["gemma3"]
    cache = tmp_path / "kagglehub"
    for version in ("1", "3"):
        shutil.copytree(folder, cache / "models" / "keras" / "gemma3" / "keras" / "gemma3_tiny" / version)
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(cache))
    assert resolve_kaggle_handle("kaggle://keras/gemma3/keras/gemma3_tiny").name == "3"  # newest cached
    assert resolve_kaggle_handle("kaggle://keras/gemma3/keras/gemma3_tiny/1").name == "1"
    lm = CausalLM.from_preset("kaggle://keras/gemma3/keras/gemma3_tiny/1")
    np.testing.assert_allclose(lm.logits(ids), keras_logits(bb, ids), atol=2e-5, rtol=1e-5)
    with pytest.raises(KerasPresetError, match="framework"):
        resolve_kaggle_handle("kaggle://keras/gemma3/jax/gemma3_tiny")
    import kagglehub

    def offline(handle):
        raise ConnectionError("no network")

    monkeypatch.setattr(kagglehub, "model_download", offline)
    with pytest.raises(KerasPresetError, match="not in kagglehub's cache"):
        resolve_kaggle_handle("kaggle://keras/gemma3/keras/other_variant")


def test_cli_convert_to_keras(presets, ids, tmp_path):
    from gemmax.cli import main

    folder, bb = presets["gemma2"]
    hf = tmp_path / "hf"
    assert main(["convert", str(folder), str(hf), "--to", "hf"]) == 0
    assert main(["convert", str(hf), str(tmp_path / "k"), "--to", "keras"]) == 0
    back = keras_hub.models.Backbone.from_preset(str(tmp_path / "k"))
    np.testing.assert_allclose(keras_logits(back, ids), keras_logits(bb, ids), atol=2e-5, rtol=1e-5)


def test_bfloat16_export(presets, tmp_path):
    """bfloat16 weights are stored as Keras stores them (2-byte opaque values tagged ``dtype=bfloat16``):
    keras-hub reads gemmax's values exactly, and gemmax reads them back."""
    import ml_dtypes

    lm = CausalLM.from_preset(presets["gemma"][0])
    out = lm.export_keras(tmp_path / "bf16", dtype=ml_dtypes.bfloat16)
    back = keras_hub.models.Backbone.from_preset(str(out))
    want = np.asarray(lm.params["token_embedding"]["embeddings"]).astype(ml_dtypes.bfloat16)
    got = np.asarray(back.token_embedding.embeddings, np.float32)  # (keras-hub may cast to its own dtype)
    np.testing.assert_array_equal(got, want.astype(np.float32))
    again = CausalLM.from_preset(out)
    np.testing.assert_array_equal(np.asarray(again.params["token_embedding"]["embeddings"]), want.astype(np.float32))


# ---- models with images --------------------------------------------------------------------------------

VISION = ("paligemma", "paligemma2", "gemma3_vision")


def _vision_backbone(kind: str, vocab: int):
    M = keras_hub.models
    text = dict(vocabulary_size=vocab, num_layers=2, num_query_heads=4, num_key_value_heads=2, hidden_dim=16,
                intermediate_dim=32, head_dim=8, dtype="float32")
    if kind == "gemma3_vision":
        ve = M.Gemma3VisionEncoder(image_size=28, patch_size=7, num_heads=2, hidden_dim=8, num_layers=2,
                                   intermediate_dim=12, output_dim=16, pool_size=2, dtype="float32")
        return M.Gemma3Backbone(image_size=28, vision_encoder=ve, **text, use_post_ffw_norm=True,
                                use_post_attention_norm=True, use_sliding_window_attention=True, sliding_window_size=4)
    # PaliGemma 2's window is left wider than the sequence: inside a prefix keras-hub applies the window as
    # a symmetric band while transformers (and gemmax) let the prefix block override it (docs/keras.md)
    gemma2 = dict(use_post_ffw_norm=True, use_post_attention_norm=True, final_logit_soft_cap=30.0,
                  attention_logit_soft_cap=50.0, use_sliding_window_attention=True, sliding_window_size=64)
    return M.PaliGemmaBackbone(image_size=28, vit_patch_size=7, vit_num_heads=2, vit_hidden_dim=8, vit_num_layers=2,
                               vit_intermediate_dim=12, **text, **(gemma2 if kind == "paligemma2" else {}))


@pytest.fixture(scope="module")
def vision_presets(tmp_path_factory, tok_dir) -> dict[str, tuple[Path, object]]:
    out = {}
    for i, kind in enumerate(VISION):
        tok = keras_hub.models.GemmaTokenizer(proto=str(tok_dir / "tok.model"))
        bb = _vision_backbone(kind, tok.vocabulary_size())
        _randomize(bb, 20 + i)
        d = tmp_path_factory.mktemp(f"keras_{kind}")
        bb.save_to_preset(d)
        tok.save_to_preset(d)
        out[kind] = (d, bb)
    return out


def _vision_inputs(kind: str, cfg) -> tuple[dict, np.ndarray, dict]:
    """(keras-hub inputs, gemmax ids, gemmax inputs) for one 28 px image and a few text tokens."""
    rng = np.random.default_rng(5)
    if kind == "gemma3_vision":
        img = rng.uniform(-1, 1, (1, 1, 28, 28, 3)).astype("float32")
        ids = np.array([[2, 10, 11, cfg.boi_token_id] + [cfg.image_token_id] * cfg.tokens_per_image
                        + [cfg.eoi_token_id, 12, 13, 14]], "int32")
        mask = ids == cfg.image_token_id
        k_in = {"images": img, "token_ids": ids, "padding_mask": np.ones_like(ids), "vision_mask": mask,
                "vision_indices": np.flatnonzero(mask[0])[None].astype("int32")}
        return k_in, ids, {"pixel_values": img[0].transpose(0, 3, 1, 2)}
    img = rng.uniform(-1, 1, (1, 28, 28, 3)).astype("float32")
    text = np.array([[2, 10, 11, 12, 13, 14]], "int32")
    response = np.array([[0, 0, 0, 1, 1, 1]], "int32")  # prefix (bidirectional) then suffix (causal)
    n = cfg.num_image_tokens
    ids = np.concatenate([np.full((1, n), cfg.image_token_id), text], 1)
    types = np.concatenate([np.zeros((1, n), "int32"), response], 1)
    k_in = {"images": img, "token_ids": text, "padding_mask": np.ones_like(text), "response_mask": response}
    return k_in, ids, {"pixel_values": img.transpose(0, 3, 1, 2), "token_type_ids": types}


def _keras_vision_logits(bb, k_in) -> np.ndarray:
    return np.asarray(bb.token_embedding(bb(k_in), reverse=True))


@pytest.mark.parametrize("kind", VISION)
def test_vision_preset_in_and_out(vision_presets, tmp_path, kind):
    """PaliGemma 1/2 and Gemma 3 with images: the preset loads with keras-hub's logits at every position
    (image tokens included), and the export loads back in keras-hub with the same logits."""
    folder, bb = vision_presets[kind]
    lm = CausalLM.from_preset(folder)
    assert lm.family.name == ("gemma3_vision" if kind == "gemma3_vision" else "paligemma")
    k_in, ids, g_in = _vision_inputs(kind, lm.config)
    want = _keras_vision_logits(bb, k_in)
    np.testing.assert_allclose(lm.logits(ids, **g_in), want, atol=2e-5, rtol=1e-5)
    back = keras_hub.models.Backbone.from_preset(str(lm.export_keras(tmp_path / "out")))
    np.testing.assert_allclose(_keras_vision_logits(back, k_in), want, atol=2e-5, rtol=1e-5)


def test_keras_lora_paligemma(vision_presets, tmp_path):
    """keras-hub's PaliGemma LoRA also adapts the ViT's query/value Dense layers: both parts load."""
    folder, _ = vision_presets["paligemma"]
    bb = keras_hub.models.Backbone.from_preset(str(folder))
    bb.enable_lora(2)
    rng = np.random.default_rng(13)
    for w in bb.trainable_weights:
        if "lora" in w.path:  # (the ViT's trainable Dense biases are not part of a Keras LoRA file)
            w.assign(rng.normal(0, 0.2, w.shape).astype("float32"))
    bb.save_lora_weights(str(tmp_path / "pali.lora.h5"))
    lm = CausalLM.from_preset(folder).load_keras_lora(tmp_path / "pali.lora.h5")
    from gemmax.nn.lora import lora_targets

    assert set(lora_targets(lm.params, lm.linear_nodes)) == {"vision_query", "vision_value", "query", "value"}
    k_in, ids, g_in = _vision_inputs("paligemma", lm.config)
    np.testing.assert_allclose(lm.logits(ids, **g_in), _keras_vision_logits(bb, k_in), atol=2e-5, rtol=1e-5)
