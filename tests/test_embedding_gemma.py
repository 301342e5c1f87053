"""EmbeddingGemma and ``gemmax.TextEncoder`` against sentence-transformers, on a tiny random model written in
the published folder layout of google/embeddinggemma-300m:

- the root is the ``Transformer`` module: ``Gemma3TextModel.save_pretrained`` (config.json with
  ``use_bidirectional_attention``, model.safetensors keyed ``embed_tokens.weight``, ``layers.{i}...``,
  ``norm.weight`` with no ``model.`` prefix), ``sentence_bert_config.json``, the tokenizer (``tokenizer.model``
  + ``tokenizer_config.json`` adding ``<bos>`` and ``<eos>``);
- ``1_Pooling/config.json`` (legacy ``pooling_mode_*`` keys, mean), ``2_Dense`` and ``3_Dense``
  (config.json + model.safetensors ``linear.weight [out, in]``, no bias, Identity), ``4_Normalize``;
- ``modules.json`` and ``config_sentence_transformers.json`` (the prompts).

Norm weights are random and non-zero, the sliding window is 8 and the texts run past 30 tokens, so a wrong
window (causal, or not symmetric) or a lost norm offset shows. Each feature is also switched off to show that
the comparison would catch its loss.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from spm_fixtures import train_tiny_sentencepiece

from gemmax import TextEncoder
from gemmax.io.hf import CheckpointError

TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Search results about cats and dogs.",
    "A document about retrieval with embeddings, longer than the sliding window of eight tokens.",
    "Short one.",
    "Embeddings of sentences are compared by cosine similarity in the retrieval step.",
]
PROMPTS = {"query": "task: search result | query: ", "document": "title: none | text: ",
           "STS": "task: sentence similarity | query: "}
HIDDEN = 32


def _tokenizer(folder: Path) -> None:
    """A tiny SentencePiece model with Gemma's options (no dummy prefix, spaces kept as written, byte fallback), like
    EmbeddingGemma's: tokenizer.model and a tokenizer_config.json that adds <bos> and <eos>."""
    lines = TEXTS * 10 + list(PROMPTS.values()) * 10
    work = folder / "_spm"
    work.mkdir()
    train_tiny_sentencepiece(work, lines, 300, add_dummy_prefix=False, byte_fallback=True,
                             remove_extra_whitespaces=False, normalization_rule_name="identity")
    (folder / "tokenizer.model").write_bytes((work / "tok.model").read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": True, "bos_token": "<bos>",
         "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>", "padding_side": "right"}))


def _randomize(module: torch.nn.Module, gen: torch.Generator, scale: float) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def write_embeddinggemma(folder: Path, seed: int = 0, dense_bias: bool = False, activation: str = "Identity",
                         pooling: str = "mean", include_prompt: bool = True) -> Path:
    """A tiny EmbeddingGemma in the published sentence-transformers layout (see the module docstring)."""
    import transformers as tf
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    _tokenizer(folder)
    vocab = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).get_piece_size()
    cfg = tf.Gemma3TextConfig(
        vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=7, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=16, sliding_window=8, max_position_embeddings=512,
        use_bidirectional_attention=True, rms_norm_eps=1e-6, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    gen = torch.Generator().manual_seed(seed)
    model = tf.Gemma3TextModel(cfg).eval()
    _randomize(model, gen, 0.25)
    model.save_pretrained(folder)
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 48, "do_lower_case": False}))
    modes = {"cls": "cls_token", "max": "max_tokens", "mean": "mean_tokens", "weightedmean": "weightedmean_tokens",
             "mean_sqrt_len_tokens": "mean_sqrt_len_tokens", "lasttoken": "lasttoken"}
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": HIDDEN, **{f"pooling_mode_{key}": mode == pooling for mode, key in modes.items()},
         "include_prompt": include_prompt}))
    act = {"Identity": "torch.nn.modules.linear.Identity", "Tanh": "torch.nn.modules.activation.Tanh"}[activation]
    for i, (n_in, n_out) in enumerate([(HIDDEN, 4 * HIDDEN), (4 * HIDDEN, HIDDEN)]):
        sub = folder / f"{i + 2}_Dense"
        sub.mkdir()
        (sub / "config.json").write_text(json.dumps(
            {"in_features": n_in, "out_features": n_out, "bias": dense_bias, "activation_function": act}))
        tensors = {"linear.weight": torch.randn((n_out, n_in), generator=gen) / n_in ** 0.5}
        if dense_bias:
            tensors["linear.bias"] = torch.randn((n_out,), generator=gen) * 0.1
        save_file(tensors, str(sub / "model.safetensors"))
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
               {"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"},
               {"idx": 4, "name": "4", "path": "4_Normalize", "type": "sentence_transformers.models.Normalize"}]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "config_sentence_transformers.json").write_text(json.dumps(
        {"model_type": "SentenceTransformer", "prompts": PROMPTS, "default_prompt_name": None,
         "similarity_fn_name": "cosine"}))
    shutil.rmtree(folder / "_spm")
    return folder


def _st(folder: Path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu", model_kwargs={"attn_implementation": "eager"})


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_embeddinggemma(tmp_path_factory.mktemp("eg") / "embeddinggemma-tiny")


@pytest.fixture(scope="module")
def st_model(folder: Path):
    return _st(folder)


@pytest.fixture(scope="module")
def enc(folder: Path) -> TextEncoder:
    return TextEncoder.from_preset(folder)


def _far(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape != b.shape or float(np.abs(a - b).max()) > 1e-2


def test_layout_is_the_published_one(folder: Path) -> None:
    from safetensors import safe_open

    keys = set(safe_open(str(folder / "model.safetensors"), "np").keys())
    assert {"embed_tokens.weight", "layers.0.self_attn.q_norm.weight", "norm.weight"} <= keys
    assert not any(k.startswith("model.") for k in keys)
    assert json.loads((folder / "config.json").read_text())["sliding_window"] == 8
    assert set(safe_open(str(folder / "2_Dense" / "model.safetensors"), "np").keys()) == {"linear.weight"}


def test_embeddings_equal_sentence_transformers(enc: TextEncoder, st_model) -> None:
    assert enc.config.backbone.bidirectional and enc.config.dim == HIDDEN and enc.config.max_len == 48
    ids = enc.tokenize(TEXTS)
    assert max(len(x) for x in ids) > 16 and ids[0][0] == 2 and ids[0][-1] == 1  # <bos> ... <eos>, past the window
    assert ids == [st_model.tokenize([t])["input_ids"][0].tolist() for t in TEXTS]
    want = st_model.encode(TEXTS, batch_size=2)
    got = enc.encode(TEXTS, batch_size=2)
    assert got.shape == want.shape == (len(TEXTS), HIDDEN)
    assert np.abs(got - want).max() < 1e-5
    # one text gives one vector; token ids are taken as they are
    np.testing.assert_allclose(enc.encode(TEXTS[1]), want[1], atol=1e-5)
    np.testing.assert_allclose(enc.encode(ids[2]), want[2], atol=1e-5)


def test_prompts_and_truncate_dim(enc: TextEncoder, st_model) -> None:
    for name in ("query", "document"):
        want = st_model.encode(TEXTS, prompt_name=name)
        got = enc.encode(TEXTS, prompt_name=name)
        assert np.abs(got - want).max() < 1e-5
        assert _far(got, enc.encode(TEXTS))  # the prompt matters
    want = st_model.encode(TEXTS, prompt="task: clustering | query: ")
    assert np.abs(enc.encode(TEXTS, prompt="task: clustering | query: ") - want).max() < 1e-5
    np.testing.assert_allclose(enc.encode_query(TEXTS), st_model.encode_query(TEXTS), atol=1e-5)
    np.testing.assert_allclose(enc.encode_document(TEXTS), st_model.encode_document(TEXTS), atol=1e-5)
    # truncate_dim keeps the first dimensions without re-normalizing, as sentence-transformers does ...
    want = st_model.encode(TEXTS, truncate_dim=16, prompt_name="query")
    got = enc.encode(TEXTS, truncate_dim=16, prompt_name="query")
    assert got.shape == (len(TEXTS), 16) and np.abs(got - want).max() < 1e-5
    assert np.abs(np.linalg.norm(got, axis=-1) - 1).max() > 1e-3
    # ... unless asked to
    want = st_model.encode(TEXTS, truncate_dim=16, normalize_embeddings=True)
    got = enc.encode(TEXTS, truncate_dim=16, normalize=True)
    assert np.abs(got - want).max() < 1e-5
    with pytest.raises(ValueError, match="unknown prompt_name 'nope'"):
        enc.encode(TEXTS, prompt_name="nope")


def test_each_feature_matters(enc: TextEncoder, st_model) -> None:
    """Switching a feature off moves the embeddings far beyond the tolerance, so the parity tests can fail."""
    want = st_model.encode(TEXTS)
    cfg, b = enc.config, enc.config.backbone

    def variant(**kw) -> np.ndarray:
        backbone = {k[9:]: v for k, v in kw.items() if k.startswith("backbone_")}
        rest = {k: v for k, v in kw.items() if not k.startswith("backbone_")}
        c = cfg.replace(backbone=b.replace(**backbone), **rest)
        return TextEncoder(c, enc.params, enc.tokenizer).encode(TEXTS)

    assert _far(variant(backbone_bidirectional=False), want)  # causal attention
    assert _far(variant(backbone_sliding_window=16), want)  # a window the size the config says, not its half
    assert _far(variant(dense=()), want)
    assert _far(variant(normalize=False), want)
    assert _far(variant(add_eos=False), want)
    assert _far(variant(backbone_norm_offset=0.0), want)


def test_other_modules(tmp_path: Path) -> None:
    """Dense modules with a bias and Tanh, max pooling that leaves the prompt out, equal sentence-transformers'."""
    folder = write_embeddinggemma(tmp_path / "variant", seed=1, dense_bias=True, activation="Tanh", pooling="max",
                                  include_prompt=False)
    st_model, enc = _st(folder), TextEncoder.from_preset(folder)
    assert enc.config.pooling == ("max",) and not enc.config.include_prompt
    want = st_model.encode(TEXTS, prompt_name="query")
    got = enc.encode(TEXTS, prompt_name="query")
    assert np.abs(got - want).max() < 1e-5


def test_pooling_modes_equal_sentence_transformers() -> None:
    """Every pooling mode, and modes concatenated, on right-padded token states with a prompt left out, as
    sentence-transformers' Pooling computes them."""
    from sentence_transformers.sentence_transformer.modules import Pooling

    from gemmax.models import embedding_gemma as eg

    rng = np.random.default_rng(0)
    h = rng.normal(size=(3, 12, 8)).astype(np.float32)
    lengths, prompt = np.array([12, 7, 4]), 2
    valid = np.arange(12)[None] < lengths[:, None]
    keep = valid & (np.arange(12)[None] >= prompt)
    cfg = eg.tiny_config()
    for modes in [(m,) for m in eg.POOLING_MODES] + [("cls", "max", "mean")]:
        st_pool = Pooling(8, pooling_mode=modes if len(modes) > 1 else modes[0], include_prompt=False)
        feats = {"token_embeddings": torch.from_numpy(h), "attention_mask": torch.from_numpy(valid.astype(np.int64)),
                 "prompt_length": prompt}
        want = st_pool(feats)["sentence_embedding"].numpy()
        got = np.asarray(eg.pool(cfg.replace(pooling=modes, dense=()), h, keep))
        np.testing.assert_allclose(got, want, atol=1e-6, err_msg=str(modes))


def test_save_round_trip(enc: TextEncoder, st_model, tmp_path: Path) -> None:
    """``save`` writes the published layout: sentence-transformers and gemmax read the same model back."""
    out = enc.save(tmp_path / "saved")
    want = st_model.encode(TEXTS, prompt_name="query")
    np.testing.assert_allclose(_st(out).encode(TEXTS, prompt_name="query"), want, atol=1e-5)
    np.testing.assert_allclose(TextEncoder.from_preset(out).encode(TEXTS, prompt_name="query"), want, atol=1e-5)


SHARDED = """
import sys
import numpy as np
from gemmax import TextEncoder, distribution as dist
from gemmax.models.embedding_gemma import read_folder
folder, out = sys.argv[1], sys.argv[2]
mesh = dist.DeviceMesh((2, 4), ("batch", "model"))
layout = dist.get_layout_map(read_folder(folder)[0], mesh)
with dist.ModelParallel(mesh, layout, batch_dim_name="batch").scope():
    enc = TextEncoder.from_preset(folder)
    assert tuple(enc.params["dense_0"]["kernel"].sharding.spec) == (None, "model")
    np.save(out, enc.encode(sys.argv[3:], prompt_name="query", batch_size=4))
"""


def test_sharded_equals_one_device(enc: TextEncoder, folder: Path, tmp_path: Path) -> None:
    """On a 2x4 mesh of fake CPU devices (weights split by the default layout, batches over "batch") the
    embeddings equal one device's."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = tmp_path / "sharded.npy"
    r = subprocess.run([sys.executable, "-c", SHARDED, str(folder), str(out), *TEXTS], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    np.testing.assert_allclose(np.load(out), enc.encode(TEXTS, prompt_name="query", batch_size=4), atol=1e-5)


def test_errors(enc: TextEncoder, folder: Path, tmp_path: Path) -> None:
    from gemmax import CausalLM
    from gemmax.models.base import UnsupportedError

    with pytest.raises(CheckpointError, match="TextEncoder"):
        CausalLM.from_preset(folder)
    with pytest.raises(UnsupportedError, match="encoder"):  # no causal cache to generate from
        CausalLM(enc.config.backbone, enc.params).generate([2, 5, 6], max_new_tokens=2)
    with pytest.raises(CheckpointError, match="TextEncoder"):
        CausalLM.from_preset("embeddinggemma_300m")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_LSTM", "type": "sentence_transformers.models.LSTM"}]))
    with pytest.raises(CheckpointError, match="LSTM"):
        TextEncoder.from_preset(bad)


def test_preset_parameter_count() -> None:
    """embeddinggemma_300m has the published shapes: 307,581,696 parameters (302,863,104 in the backbone,
    4,718,592 in the two dense layers)."""
    from gemmax.encoder import presets
    from gemmax.models.embedding_gemma import PRESETS

    cfg = PRESETS["embeddinggemma_300m"]
    counts = cfg.param_count()
    assert counts["total"] == 307_581_696 and counts["dense"] == 4_718_592
    assert cfg.dim == 768 and cfg.backbone.bidirectional and cfg.backbone.layer_types.count("global") == 4
    assert presets()["embeddinggemma_300m"] == "308M"
    assert sum(int(np.prod(s.shape)) for s in cfg.param_specs().values()) == counts["total"]


def test_server(enc: TextEncoder, st_model) -> None:
    import openai
    from fastapi.testclient import TestClient

    from gemmax.serve.server import create_app

    client = TestClient(create_app({"eg": enc}, api_key="k"))
    h = {"Authorization": "Bearer k"}
    want = st_model.encode(TEXTS[:2], prompt_name="query")
    r = client.post("/v1/embeddings", headers=h, json={"input": TEXTS[:2], "model": "eg", "prompt_name": "query"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [d["index"] for d in body["data"]] == [0, 1] and body["model"] == "eg"
    assert np.abs(np.array([d["embedding"] for d in body["data"]]) - want).max() < 1e-5
    ids = enc.tokenize(TEXTS[:2], PROMPTS["query"])
    assert body["usage"] == {"prompt_tokens": sum(map(len, ids)), "total_tokens": sum(map(len, ids))}
    # token ids, base64, dimensions (re-normalized: the model normalizes its output)
    r = client.post("/v1/embeddings", headers=h, json={"input": ids, "encoding_format": "base64", "dimensions": 8})
    got = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in r.json()["data"]])
    short = want[:, :8] / np.linalg.norm(want[:, :8], axis=-1, keepdims=True)
    assert got.shape == (2, 8) and np.abs(got - short).max() < 1e-5
    r = client.post("/v1/embeddings", headers=h, json={"input": ids[0]})
    assert len(r.json()["data"]) == 1
    for body, param in [({"input": "x", "temperature": 1}, "temperature"), ({"input": []}, "input"),
                        ({"input": "x", "dimensions": 999}, "dimensions"), ({"input": ""}, "input"),
                        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
                        ({"input": "x", "prompt_name": "nope"}, "prompt_name")]:
        r = client.post("/v1/embeddings", headers=h, json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    assert client.post("/v1/embeddings", json={"input": "x"}).status_code == 401
    r = client.post("/v1/completions", headers=h, json={"prompt": "x"})
    assert r.status_code == 400 and "embedding model" in r.json()["error"]["message"]
    assert client.get("/v1/models", headers=h).json()["data"][0]["dimensions"] == HIDDEN
    # OpenAI's own client (which asks for base64 and decodes it)
    oa = openai.OpenAI(base_url="http://testserver/v1", api_key="k", http_client=client)
    r = oa.embeddings.create(model="eg", input=TEXTS[:2], extra_body={"prompt_name": "query"})
    assert np.abs(np.array([d.embedding for d in r.data]) - want).max() < 1e-5


def test_server_of_a_causal_lm_refuses_embeddings() -> None:
    from fastapi.testclient import TestClient

    import gemmax
    from gemmax import CausalLM
    from gemmax.serve.server import create_app

    lm = CausalLM.from_config(gemmax.tiny_config("gemma3", vocab_size=64))
    lm.tokenizer = type("T", (), {"stop_ids": (1,)})()
    client = TestClient(create_app(lm, model_name="lm"))
    r = client.post("/v1/embeddings", json={"input": "x"})
    assert r.status_code == 400 and "causal language model" in r.json()["error"]["message"]


def test_cli(folder: Path, st_model, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gemmax import cli

    assert cli.main(["embed", "--model", str(folder), "--prompt-name", "query", *TEXTS[:2]]) == 0
    got = np.array(json.loads(capsys.readouterr().out))
    assert np.abs(got - st_model.encode(TEXTS[:2], prompt_name="query")).max() < 1e-5
    lines = tmp_path / "texts.txt"
    lines.write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "e.npy"
    assert cli.main(["embed", "--model", str(folder), "--file", str(lines), "--dim", "16", "--output", str(out)]) == 0
    np.testing.assert_allclose(np.load(out), st_model.encode(TEXTS, truncate_dim=16), atol=1e-5)
    assert cli.main(["info", str(folder)]) == 0
    assert '"bidirectional": true' in capsys.readouterr().out
    assert cli.main(["info", "embeddinggemma_300m"]) == 0
    assert "307,581,696" in capsys.readouterr().out
    assert cli.main(["shard-plan", "embeddinggemma_300m", "--mesh", "1x2", "--no-optimizer"]) == 0
    assert "dense_0/kernel" in capsys.readouterr().out
