"""GGUF for Gemma 4 text and Gemma 3n text: llama.cpp's ``gemma4`` and ``gemma3n`` architectures.

* Gemma 4 dense (per-layer embeddings, KV sharing with double-wide MLPs, k = v globals, proportional RoPE):
  the file gemmax writes is read by transformers' own GGUF loader (tensor names from gguf-py's table, the
  config keys it reads from the metadata) to the reference logits, and by gemmax to the same logits.
* Gemma 4 with every feature (experts, router scales, per-layer output scalars, which transformers' GGUF
  loader drops) and Gemma 3n (AltUp stacks, LAuReL, padded per-layer table, sparsity as normal quantiles):
  gemmax's file reads back to transformers' logits of the original checkpoint; every tensor name is one
  llama.cpp defines for the architecture; the metadata is what llama.cpp's converter writes.
* Bad files: an unknown architecture, a tensor the model has no place for, missing metadata: errors naming it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from gemmax import CausalLM  # noqa: E402
from gemmax.models.base import UnsupportedModelType  # noqa: E402
from gemmax.models.gemma4.config import tiny_config, to_hf_config  # noqa: E402

TOL = 1e-4  # of the logit scale, as the family matrix
IDS = np.random.RandomState(2).randint(3, 96, (2, 18)).astype(np.int32)


def _far(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def _logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(IDS, dtype=torch.long)).logits.float().numpy()


def _randomize(model, seed: int, scalars: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "norm" in name else 0.2))
        for name, b in model.named_buffers():
            if scalars and name.endswith("layer_scalar"):
                b.copy_(0.6 + 0.8 * torch.rand(b.shape, generator=g))


def _gemma4(tmp_path: Path, moe: bool) -> tuple[dict, object, CausalLM]:
    """A tiny Gemma 4 text checkpoint saved by transformers, its reference model and gemmax's load of it."""
    over = {} if moe else dict(num_experts=0, top_k=0, moe_intermediate_size=0)
    hf = {k: v for k, v in to_hf_config(tiny_config(vocab_size=96, **over)).items()
          if k not in ("model_type", "architectures", "torch_dtype")}
    ref = tf.Gemma4ForCausalLM(tf.Gemma4TextConfig(**hf)).eval()
    _randomize(ref, 0, scalars=moe)
    ref.save_pretrained(tmp_path / "hf")
    return hf, ref, CausalLM.from_preset(str(tmp_path / "hf"))


def _names_llama_cpp_defines(arch, n_layers: int) -> set[str]:
    """llama.cpp's tensor names of an architecture, with their ``.weight`` suffix."""
    c = gguf.constants
    out = set()
    for t in c.MODEL_TENSORS[arch]:
        tmpl = c.TENSOR_NAMES[t]
        out |= {tmpl.format(bid=i) for i in range(n_layers)} if "{bid}" in tmpl else {tmpl}
    return {f"{n}.weight" for n in out}


def _file_names(path: Path) -> dict[str, list[int]]:
    return {t.name: [int(x) for x in t.shape] for t in gguf.GGUFReader(path).tensors}


def _field(path: Path, key: str):
    f = gguf.GGUFReader(path).fields[key]
    if f.types[-1] == gguf.GGUFValueType.STRING:
        return f.contents()
    vals = [f.parts[i].tolist() for i in f.data]
    vals = [v[0] if isinstance(v, list) and len(v) == 1 else v for v in vals]
    return vals if len(vals) > 1 else vals[0]


# ---- Gemma 4 ----------------------------------------------------------------------------------------------


def test_gemma4_dense_file_reads_in_transformers_and_back(tmp_path: Path) -> None:
    hf, ref, lm = _gemma4(tmp_path, moe=False)
    want = _logits(ref)
    path = lm.export_gguf(tmp_path / "out" / "m.gguf", dtype="f32")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    read = load_gguf_checkpoint(str(path), return_tensors=False)["config"]  # the keys transformers reads
    assert read["model_type"] == "gemma4_text"
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "global_head_dim", "sliding_window",
              "max_position_embeddings", "rms_norm_eps"):
        assert read[k] == pytest.approx(hf[k]), k
    peer = tf.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                   config=tf.Gemma4TextConfig(**hf), dtype=torch.float32).eval()
    assert _far(_logits(peer), want) < 1e-6
    back = CausalLM.from_preset(str(path))
    assert back.config.replace(name="", eos_token_id=lm.config.eos_token_id) == lm.config
    assert _far(np.asarray(back.logits(IDS)), want) < TOL


def test_gemma4_every_feature_round_trips(tmp_path: Path, capsys) -> None:
    hf, ref, lm = _gemma4(tmp_path, moe=True)
    want = _logits(ref)
    path = lm.export_gguf(tmp_path / "m.gguf", dtype="f32")
    names = _file_names(path)
    assert set(names) <= _names_llama_cpp_defines(gguf.MODEL_ARCH.GEMMA4, 6) | {
        f"blk.{i}.{t}.scale" for i in range(6) for t in ("ffn_gate_inp", "ffn_down_exps")}
    assert names["blk.0.ffn_gate_up_exps.weight"] == [32, 32, 4]  # ne: D, 2I, E (transformers' [E, 2I, D])
    assert "blk.2.attn_v.weight" not in names and "blk.3.attn_k.weight" not in names  # k = v global; shared
    freqs = gguf.GGUFReader(path).get_tensor(0)
    assert freqs.name == "rope_freqs.weight" or "rope_freqs.weight" in names
    assert _field(path, "gemma4.attention.key_length") == 16 and _field(path, "gemma4.attention.key_length_swa") == 8
    assert _field(path, "gemma4.feed_forward_length") == [64, 64, 64, 128, 128, 128]  # double-wide shared
    assert _field(path, "gemma4.attention.head_count_kv") == [2, 2, 1, 2, 2, 1]
    assert _field(path, "gemma4.attention.shared_kv_layers") == 3
    back = CausalLM.from_preset(str(path))
    assert back.config.replace(name="", eos_token_id=lm.config.eos_token_id) == lm.config
    assert back.config.global_partial_rotary == 0.25  # from rope_freqs
    assert _far(np.asarray(back.logits(IDS)), want) < TOL
    # the scalars and router scales the file carries matter: transformers' loader, which drops them, is far off
    peer = tf.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                   config=tf.Gemma4TextConfig(**hf), dtype=torch.float32).eval()
    assert _far(_logits(peer), want) > 100 * TOL
    from gemmax.cli import main

    main(["info", str(path)])  # the command line reads the config from the metadata alone
    assert "decoder_block/global/experts/gate_up/kernel" in capsys.readouterr().out


def test_gemma4_q8_0_file_equals_transformers_reading_it(tmp_path: Path) -> None:
    """Q8_0 matrices: gemmax and transformers dequantize the same file to the same model."""
    hf, ref, lm = _gemma4(tmp_path, moe=False)
    path = lm.export_gguf(tmp_path / "out" / "m.gguf", dtype="q8_0")
    assert "Q8_0" in {t.tensor_type.name for t in gguf.GGUFReader(path).tensors}  # F16 where rows are short
    peer = tf.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                   config=tf.Gemma4TextConfig(**hf), dtype=torch.float32).eval()
    got = np.asarray(CausalLM.from_preset(str(path)).logits(IDS))
    assert _far(got, _logits(peer)) < TOL
    assert TOL < _far(got, _logits(ref)) < 0.05  # quantized: near the float model, not equal to it


# ---- Gemma 3n ---------------------------------------------------------------------------------------------


def _gemma3n(tmp_path: Path):
    """test_gemma3n's tiny random text model (3 AltUp streams, sparsity on two layers, a per-layer table of 80
    rows under a vocabulary of 96) saved by transformers, and gemmax's load of it."""
    from test_gemma3n import _torch_text_model

    _, model = _torch_text_model()
    model.save_pretrained(tmp_path / "hf")
    return model, CausalLM.from_preset(str(tmp_path / "hf"))


def test_gemma3n_round_trips_in_llama_cpp_layout(tmp_path: Path) -> None:
    ref, lm = _gemma3n(tmp_path)
    want = _logits(ref)
    path = lm.export_gguf(tmp_path / "m.gguf", dtype="f32")
    names = _file_names(path)
    assert set(names) <= _names_llama_cpp_defines(gguf.MODEL_ARCH.GEMMA3N, 5)
    assert names["altup_proj.weight"] == [32, 32, 2] and names["altup_unembd_proj.weight"] == [32, 32, 2]
    assert names["per_layer_token_embd.weight"] == [40, 96]  # padded with zero rows to the vocabulary
    scales = _field(path, "gemma3n.activation_sparsity_scale")
    assert scales[0] == pytest.approx(1.6448536, rel=1e-6) and scales[2] == -math.inf
    back = CausalLM.from_preset(str(path))
    assert back.config.replace(name="", eos_token_id=lm.config.eos_token_id) == lm.config
    assert _far(np.asarray(back.logits(IDS)), want) < TOL


def _copy(src: Path, dst: Path, drop: tuple[str, ...] = (), extra: dict | None = None, fill: Any = None) -> Path:
    """``src`` rewritten by gguf's own writer without the metadata keys ``drop`` (a key ending in "." drops every
    key it begins), plus the fields ``fill(writer)`` adds and ``extra`` tensors."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, str(_field(src, "general.architecture")))
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture" or k in drop or any(
                k.startswith(d) for d in drop if d.endswith(".")):
            continue
        vals, vt = [f.parts[i] for i in f.data], f.types[0]
        if vt == gguf.GGUFValueType.ARRAY:
            sub = f.types[1]
            items = [bytes(v).decode() if sub == gguf.GGUFValueType.STRING else v.tolist()[0] for v in vals]
            w.add_key_value(k, items, vt, sub_type=sub)
        elif vt == gguf.GGUFValueType.STRING:
            w.add_key_value(k, bytes(vals[0]).decode(), vt)
        else:
            w.add_key_value(k, vals[0].tolist()[0], vt)
    if fill is not None:
        fill(w)
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data).reshape([int(x) for x in reversed(t.shape)]))
    for name, arr in (extra or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_gemma3n_file_without_gemmax_key_reads_llama_cpp_meaning(tmp_path: Path) -> None:
    """llama.cpp's converter does not record the per-layer table's height: the padded table is read whole."""
    _, lm = _gemma3n(tmp_path)
    path = lm.export_gguf(tmp_path / "m.gguf", dtype="f32")
    plain = CausalLM.from_preset(str(_copy(path, tmp_path / "plain.gguf",
                                           drop=("gemmax.vocab_size_per_layer_input",))))
    assert plain.config.vocab_size_per_layer_input == 96
    ids = np.array([[2, 5, 90, 7]], np.int32)  # 90: past the real table, zero rows here, row 0 in transformers
    near = np.array([[2, 5, 9, 7]], np.int32)
    assert _far(np.asarray(plain.logits(near)), np.asarray(lm.logits(near))) < TOL
    assert _far(np.asarray(plain.logits(ids)), np.asarray(lm.logits(ids))) > 100 * TOL


# ---- bad files --------------------------------------------------------------------------------------------


def test_bad_files_are_named(tmp_path: Path) -> None:
    w = gguf.GGUFWriter(tmp_path / "q.gguf", "qwen2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelType, match="'qwen2'.*gemma4"):
        CausalLM.from_preset(str(tmp_path / "q.gguf"))

    _, _, lm = _gemma4(tmp_path, moe=True)
    path = lm.export_gguf(tmp_path / "m.gguf", dtype="f32")
    extra = _copy(path, tmp_path / "extra.gguf", extra={"blk.0.mystery.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(ValueError, match=r"no place for: blk\.0\.mystery\.weight"):
        CausalLM.from_preset(str(extra))
    short = _copy(path, tmp_path / "short.gguf", drop=("gemma4.attention.sliding_window_pattern",))
    with pytest.raises(ValueError, match="lacks gemma4.attention.sliding_window_pattern"):
        CausalLM.from_preset(str(short))
