"""Gemma 4 with images as llama.cpp's two GGUF files (a ``gemma4`` text file and a ``gemma4v`` mmproj): gemmax's
export reloads to the original's logits with an image and to transformers'; an mmproj written here by hand in
the layout of llama.cpp's converter (``convert_hf_to_gguf.py``, its Gemma 4 mmproj class: the renaming, the
patch kernel's permute, scalars as 1-D tensors, the metadata) loads to the same logits; a wrong projector type
or a missing tensor is an error naming it. The checkpoint is tests/test_gemma4_vision.py's tiny random
``Gemma4ForConditionalGeneration``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_gemma4_vision import (
    _far,
    _hf_logits,
    _two_image_rows,
    setup,  # noqa: F401  (the tiny checkpoint fixture)
)

from gemmax.api import CausalLM
from gemmax.models.gemma4 import mmproj as mm

TOL = 1e-4


def _inputs(lm: CausalLM, v: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    tokens, px, pos = _two_image_rows(lm.config, v)
    return tokens, px, pos, (tokens == lm.config.image_token_id).astype(np.int32)


def _logits(lm: CausalLM, tokens, px, pos, types) -> np.ndarray:
    return np.asarray(lm.logits(tokens, pixel_values=px, image_position_ids=pos, mm_token_type_ids=types))


@pytest.fixture(scope="module")
def exported(setup, tmp_path_factory):  # noqa: F811
    _, lm, _ = setup
    folder = tmp_path_factory.mktemp("g4mm")
    text = lm.export_gguf(folder / "text.gguf", dtype="f32", mmproj_path=folder / "mmproj.gguf")
    return text, folder / "mmproj.gguf"


def test_export_reloads_to_the_originals_and_transformers_logits(setup, exported):  # noqa: F811 (the imported fixture)
    m, lm, tok = setup
    text, mmproj = exported
    back = CausalLM.from_preset(str(text), mmproj=str(mmproj))
    assert back.family.name == "gemma4_vision"
    assert back.config.vision == lm.config.vision
    for f in ("image_token_id", "boi_token_id", "eoi_token_id", "bidirectional", "soft_tokens"):
        assert getattr(back.config, f) == getattr(lm.config, f), f
    tokens, px, pos, types = _inputs(lm, tok.vocab_size)
    want = _logits(lm, tokens, px, pos, types)
    got = _logits(back, tokens, px, pos, types)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert _far(got, _hf_logits(m, tokens, px, pos, types)) <= TOL


def test_export_is_laid_out_as_the_converters(setup, exported, tmp_path: Path):  # noqa: F811 (the imported fixture)
    from gemmax.io.gguf import _gguf

    gguf = _gguf()
    _, lm, tok = setup
    r = gguf.GGUFReader(str(exported[1]))
    names = {t.name: t for t in r.tensors}
    assert r.fields["clip.vision.projector_type"].contents() == "gemma4v"
    assert "v.blk.1.attn_q.input_max" in names and "v.std_bias" in names and "mm.input_projection.weight" in names
    p, w = lm.config.vision.patch_size, lm.config.vision.width
    assert tuple(reversed([int(x) for x in names["v.patch_embd.weight"].shape])) == (w, 3, p, p)
    # an f16 file: matrices and the patch kernel F16, norms, bounds and the position table F32
    f16 = lm.export_gguf(tmp_path / "t.gguf", dtype="f16", mmproj_path=tmp_path / "m.gguf")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert types["v.patch_embd.weight"] == types["v.blk.0.ffn_up.weight"] == "F16"
    assert types["v.position_embd.weight"] == types["v.blk.0.ln1.weight"] == types["v.std_scale"] == "F32"
    back = CausalLM.from_preset(str(f16), mmproj=str(tmp_path / "m.gguf"))
    tokens, px, pos, types_ = _inputs(lm, tok.vocab_size)
    assert _far(_logits(back, tokens, px, pos, types_), _logits(lm, tokens, px, pos, types_)) <= 3e-2


def _converter_tensors(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The vision tensors of a transformers state dict as llama.cpp's converter names and lays them out."""
    from gemmax.io.gguf import _gguf

    gguf = _gguf()
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, 2)
    out = {}
    for name, a in state.items():
        if name.startswith("model.language_model.") or name == "lm_head.weight":
            continue
        a = a.reshape(1) if a.ndim == 0 else a
        name = name.replace("model.vision_tower.encoder.", "vision_model.model.").replace(".linear.weight", ".weight")
        if name.endswith(("layer_scalar", "position_embedding_table")):
            name += ".weight"
        if name.endswith("patch_embedder.input_proj.weight"):
            n, k = a.shape
            p = int((k // 3) ** 0.5)
            a = a.reshape(n, p, p, 3).transpose(0, 3, 1, 2)
        g = tmap.get_name(name, try_suffixes=mm.SUFFIXES)
        assert g is not None, name
        out[g] = np.ascontiguousarray(a, np.float32)
    return out


def _write_by_hand(path: Path, tensors: dict[str, np.ndarray], lm: CausalLM, projector: str = "gemma4v",
                   drop: tuple[str, ...] = (), own_keys: bool = True) -> Path:
    """The converter's metadata (its base mmproj class, then its Gemma 4 class) and ``tensors``, F32.
    ``own_keys``: gemmax's keys for what the tiny model sets away from llama.cpp's defaults (its image ids,
    outside a tokenizer without Gemma 4's pieces, and 16 soft tokens) plus the pooling window llama.cpp reads
    from ``clip.vision.projector.scale_factor``."""
    from gemmax.io.gguf import _gguf

    gguf = _gguf()
    cfg, v = lm.config, lm.config.vision
    w = gguf.GGUFWriter(path, "clip")
    w.add_type(gguf.GGUFType.MMPROJ)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_clip_has_vision_encoder(True)
    w.add_vision_projection_dim(cfg.text.hidden_size)
    w.add_vision_image_size(224)
    w.add_vision_patch_size(v.patch_size)
    w.add_vision_embedding_length(v.width)
    w.add_vision_feed_forward_length(v.mlp_dim)
    w.add_vision_block_count(v.depth)
    w.add_vision_head_count(v.num_heads)
    w.add_vision_image_mean([0.0, 0.0, 0.0])
    w.add_vision_image_std([1.0, 1.0, 1.0])
    w.add_clip_vision_projector_type(projector)
    w.add_vision_attention_layernorm_eps(1e-6)
    if own_keys:
        w.add_vision_projector_scale_factor(v.pool)
        for key in ("image_token_id", "boi_token_id", "eoi_token_id"):
            w.add_uint32(f"gemmax.{key}", getattr(cfg, key))
        w.add_uint32("gemmax.vision.soft_tokens", cfg.soft_tokens)
    for g, a in tensors.items():
        if g not in drop:
            w.add_tensor(g, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_mmproj_written_by_hand_in_the_converters_layout(setup, exported, tmp_path: Path):  # noqa: F811 (the imported fixture)
    m, lm, tok = setup
    state = {k: t.detach().float().numpy() for k, t in m.state_dict().items()}
    hand = _write_by_hand(tmp_path / "hand.gguf", _converter_tensors(state), lm)
    back = CausalLM.from_preset(str(exported[0]), mmproj=str(hand))
    assert back.config.vision == lm.config.vision
    tokens, px, pos, types = _inputs(lm, tok.vocab_size)
    want = _hf_logits(m, tokens, px, pos, types)
    got = _logits(back, tokens, px, pos, types)
    assert _far(got, want) <= TOL
    assert np.abs(got - _logits(lm, tokens, px, pos, types)).max() <= 1e-5 * np.abs(want).max()


def test_bad_mmproj_files_are_named(setup, exported, tmp_path: Path):  # noqa: F811 (the imported fixture)
    m, lm, _ = setup
    state = {k: t.detach().float().numpy() for k, t in m.state_dict().items()}
    tensors = _converter_tensors(state)
    text = str(exported[0])
    with pytest.raises(ValueError, match="projector type 'gemma3'; this reader takes Gemma 4's"):
        mm.read_mmproj(_write_by_hand(tmp_path / "g3.gguf", tensors, lm, projector="gemma3"))
    with pytest.raises(Exception, match="unsupported mmproj projector type 'qwen2vl_merger'"):
        CausalLM.from_preset(text, mmproj=str(_write_by_hand(tmp_path / "q.gguf", tensors, lm, "qwen2vl_merger")))
    with pytest.raises(ValueError, match=r"lacks v\.blk\.1\.ffn_down\.weight"):
        CausalLM.from_preset(text, mmproj=str(_write_by_hand(tmp_path / "d.gguf", tensors, lm,
                                                             drop=("v.blk.1.ffn_down.weight",))))
    with pytest.raises(ValueError, match=r"lacks v\.blk\.0\.attn_q_norm\.weight"):
        mm.read_mmproj(_write_by_hand(tmp_path / "n.gguf", tensors, lm, drop=("v.blk.0.attn_q_norm.weight",)))
    extra = {**tensors, "v.blk.0.mystery.weight": np.zeros(4, np.float32)}
    with pytest.raises(ValueError, match=r"does not have: v\.blk\.0\.mystery\.weight"):
        mm.read_mmproj(_write_by_hand(tmp_path / "x.gguf", extra, lm))
    # the tiny vocabulary has none of Gemma 4's image pieces and the published ids lie outside it
    with pytest.raises(ValueError, match=r"has no <\|image\|> and Gemma 4's id for it, 258880"):
        CausalLM.from_preset(text, mmproj=str(_write_by_hand(tmp_path / "i.gguf", tensors, lm, own_keys=False)))
    # the text file given as the mmproj, and the mmproj with a text file of another architecture
    with pytest.raises(ValueError, match="is not an mmproj file"):
        CausalLM.from_preset(text, mmproj=text)


def test_cli_converts_and_generates_with_the_mmproj(setup, tmp_path: Path, capsys):  # noqa: F811 (the imported fixture)
    """``gemmax convert --to gguf --mmproj-out`` writes the pair from the checkpoint folder; ``--mmproj`` loads it
    in ``info`` and ``generate --image``, whose text is the reloaded model's."""
    from PIL import Image

    from gemmax.cli import main

    _, lm, _ = setup
    text, mm = tmp_path / "t.gguf", tmp_path / "mm.gguf"
    assert main(["convert", lm.source, str(text), "--to", "gguf", "--gguf-type", "f32", "--mmproj-out", str(mm)]) == 0
    assert main(["info", str(text), "--mmproj", str(mm)]) == 0
    assert '"family": "gemma4_vision"' in capsys.readouterr().out
    pic = (np.random.RandomState(0).rand(40, 56, 3) * 255).astype(np.uint8)
    Image.fromarray(pic).save(tmp_path / "p.png")
    assert main(["generate", "--model", str(text), "--mmproj", str(mm), "--image", str(tmp_path / "p.png"),
                 "describe", "--max-new-tokens", "3"]) == 0
    back = CausalLM.from_preset(str(text), mmproj=str(mm))
    assert capsys.readouterr().out.strip() == back.generate("describe", images=[pic], max_new_tokens=3).strip()
