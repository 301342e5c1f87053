"""Gemma 3 with images as llama.cpp's two files: a ``gemma3`` text GGUF and its "mmproj" (the SigLIP tower and
the projector, ``clip.projector_type = "gemma3"``).

The reference is a tiny random ``Gemma3ForConditionalGeneration`` saved by transformers, built as
``tests/test_gemma3_vision.py`` builds its own (56 px images of 8 x 8 patches pooled 2 x 2 to 16 soft tokens,
so the file records llama.cpp's ``projector.scale_factor``), with two changes llama.cpp needs: six decoder
layers in its hard-coded 5 local : 1 global pattern, and a vocabulary holding Gemma 3's image pieces
(``<image_soft_token>``, ``<start_of_image>``, ``<end_of_image>``), where a reader finds their ids. The decoder
is wider (48) than the tower (32), so a transposed projection cannot pass for the right one.

Checked: gemmax's export reloads to the original's logits and transformers' (to float32 noise) and to the same
greedy tokens; an mmproj written here by hand with gguf's ``GGUFWriter``, in the layout llama.cpp's converter
writes (names from gguf-py's ``TENSOR_NAMES``, the soft-embedding norm's ``+1``, the projection untransposed),
loads to the same logits, which is what ties the layout to llama.cpp's rather than to gemmax's writer; a file
with the norm's offset not folded in or the patch kernel's axes swapped gives far-off logits; bad pairs are
refused naming what is wrong.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_fixtures import CAPTION_LINES, picture
from test_gemma3_vision import _hf_logits, random_checkpoint

from gemmax.api import CausalLM
from gemmax.io.gguf import parse_gguf, read_metadata
from gemmax.io.hf import CheckpointError
from gemmax.models import base
from gemmax.models import gemma3_vision as g3
from gemmax.models.base import UnsupportedError

TOKENS = 16  # soft tokens per image: the 8 x 8 patch grid pooled 2 x 2
TOL = 1e-4  # gemmax vs transformers, relative to the largest logit (as tests/test_gemma3_vision.py)
SAME = 1e-5  # gemmax vs gemmax on the same float32 weights
IMAGE_PIECES = ("<image_soft_token>", "<start_of_image>", "<end_of_image>")
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=56,
              patch_size=7, vision_use_head=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The transformers model and its save, the tokenizer, the image ids, gemmax's model of the save, and
    its f32 export (text GGUF + mmproj) reloaded."""
    import transformers
    from spm_fixtures import train_tiny_sentencepiece

    folder = tmp_path_factory.mktemp("mmproj")
    tok = train_tiny_sentencepiece(folder, CAPTION_LINES, 200,
                                   symbols=("<start_of_turn>", "<end_of_turn>", *IMAGE_PIECES))
    v = tok.vocab_size
    image, boi, eoi = (tok.piece_to_id(p) for p in IMAGE_PIECES)
    text = dict(vocab_size=v, hidden_size=48, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, sliding_window=8, query_pre_attn_scalar=8,
                layer_types=["sliding_attention"] * 5 + ["full_attention"], eos_token_id=[1, 5],
                rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                 "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    cfg = transformers.Gemma3Config(vision_config=VISION, text_config=text, mm_tokens_per_image=TOKENS,
                                    image_token_index=image, boi_token_index=boi, eoi_token_index=eoi)
    m = random_checkpoint(cfg, folder)
    lm = CausalLM.from_preset(str(folder / "hf"))
    text_gguf, mmproj = folder / "text.gguf", folder / "mmproj.gguf"
    assert lm.export_gguf(text_gguf, dtype="f32", mmproj_path=mmproj) == text_gguf
    back = CausalLM.from_preset(str(text_gguf), mmproj=str(mmproj))
    return SimpleNamespace(m=m, folder=folder, tok=tok, ids=(image, boi, eoi), lm=lm, back=back,
                           text_gguf=text_gguf, mmproj=mmproj)


def _rows(ids: tuple[int, int, int], v: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two rows, each with two image blocks inside text, their four images and token types. Text ids stay
    clear of the special and image pieces (ids under 9)."""
    image, boi, eoi = ids
    rng = np.random.RandomState(0)

    def row() -> list[int]:
        block = [boi] + [image] * TOKENS + [eoi]
        return [2, *rng.randint(9, v, 5), *block, *rng.randint(9, v, 7), *block, *rng.randint(9, v, 6)]

    tokens = np.array([row(), row()], np.int32)
    px = rng.uniform(-1, 1, (4, 3, 56, 56)).astype(np.float32)
    return tokens, px, (tokens == image).astype(np.int32)


def _forward(lm: CausalLM, tokens: np.ndarray, px: np.ndarray, types: np.ndarray) -> np.ndarray:
    with jax.disable_jit():  # op by op: tiny shapes run faster than one compilation per variant
        return np.asarray(g3.forward(lm.params, lm.config, jnp.asarray(tokens), px, types))


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


# ---- an mmproj written by hand, as llama.cpp's converter writes Gemma 3's ------------------------------------


def _checkpoint(folder: Path) -> dict[str, np.ndarray]:
    """The transformers save's tensors, every one of them, float32."""
    from safetensors import safe_open

    out = {}
    for f in sorted((folder / "hf").glob("*.safetensors")):
        with safe_open(f, "np") as s:
            out.update({k: s.get_tensor(k).astype(np.float32) for k in s.keys()})
    return out


def _converter_tensors(ckpt: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The tower and projector under llama.cpp's names: gguf-py's ``TENSOR_NAMES`` for the tensors the
    converter maps (SigLIP's ``fc1`` is ``ffn_up``, ``fc2`` ``ffn_down``, ``layer_norm1`` ``ln1``), each kept in
    transformers' layout; the projector's ``mm_input_projection_weight`` becomes a ``.weight``, untransposed,
    and ``mm_soft_emb_norm.weight`` gets ``+ 1`` (the converter's one norm correction: Gemma's RMSNorm)."""
    import gguf

    t = gguf.MODEL_TENSOR
    layer = {"self_attn.q_proj": t.V_ENC_ATTN_Q, "self_attn.k_proj": t.V_ENC_ATTN_K,
             "self_attn.v_proj": t.V_ENC_ATTN_V, "self_attn.out_proj": t.V_ENC_ATTN_O,
             "layer_norm1": t.V_ENC_INPUT_NORM, "layer_norm2": t.V_ENC_POST_ATTN_NORM, "mlp.fc1": t.V_ENC_FFN_UP,
             "mlp.fc2": t.V_ENC_FFN_DOWN}
    top = {"embeddings.patch_embedding": t.V_ENC_EMBD_PATCH, "embeddings.position_embedding": t.V_ENC_EMBD_POS,
           "post_layernorm": t.V_POST_NORM}
    out = {}
    for name, w in ckpt.items():
        if "vision_tower." in name:
            sub = name.split("vision_tower.", 1)[1].removeprefix("vision_model.")
            module, _, suffix = sub.rpartition(".")
            if module.startswith("encoder.layers."):
                i, inner = module[len("encoder.layers."):].split(".", 1)
                g = gguf.TENSOR_NAMES[layer[inner]].format(bid=int(i))
            else:
                g = gguf.TENSOR_NAMES[top[module]]
            out[f"{g}.{suffix}"] = w
        elif name.endswith("multi_modal_projector.mm_input_projection_weight"):
            out[gguf.TENSOR_NAMES[t.V_MM_INP_PROJ] + ".weight"] = w
        elif name.endswith("multi_modal_projector.mm_soft_emb_norm.weight"):
            out[gguf.TENSOR_NAMES[t.V_MM_SOFT_EMB_NORM] + ".weight"] = w + 1.0
    return out


def _write_by_hand(path: Path, tensors: dict[str, np.ndarray], text_width: int = 48,
                   projector_type: str = "gemma3", mean: float = 0.5) -> Path:
    """The metadata the converter writes for Gemma 3 (``MmprojModel`` and its Gemma 3 vision class, in their
    order), then ``tensors`` as F32 (the converter forces F16 on the input projection; F32 keeps the comparison
    at float32 noise)."""
    import gguf

    w = gguf.GGUFWriter(path, "clip")
    w.add_type("mmproj")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_clip_has_vision_encoder(True)
    w.add_vision_projection_dim(text_width)
    w.add_vision_image_size(VISION["image_size"])
    w.add_vision_patch_size(VISION["patch_size"])
    w.add_vision_embedding_length(VISION["hidden_size"])
    w.add_vision_feed_forward_length(VISION["intermediate_size"])
    w.add_vision_block_count(VISION["num_hidden_layers"])
    w.add_vision_head_count(VISION["num_attention_heads"])
    w.add_vision_image_mean([mean] * 3)
    w.add_vision_image_std([0.5] * 3)
    w.add_clip_projector_type(projector_type)
    w.add_vision_attention_layernorm_eps(1e-6)
    w.add_vision_use_gelu(True)
    w.add_vision_projector_scale_factor(2)  # (56 // 7) // sqrt(16): written because it is not 4
    for name, a in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(a, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---- tests ---------------------------------------------------------------------------------------------------


def test_export_reloads_to_the_originals_logits_and_tokens(setup):
    """gemmax's text GGUF + mmproj, read back as one model, give the logits of the checkpoint they came from
    (float32 noise) and transformers' (within TOL), and the same greedy tokens with images."""
    s = setup
    lm, back = s.lm, s.back
    assert back.family.name == "gemma3_vision" and back.source == str(s.text_gguf)
    cfg, got = lm.config, back.config
    assert got.vision == cfg.vision and got.tokens_per_image == cfg.tokens_per_image == TOKENS
    assert (got.image_token_id, got.boi_token_id, got.eoi_token_id) == s.ids
    assert got.text.replace(name=cfg.text.name) == cfg.text  # layer pattern, window, rope, eos (1, <end_of_turn>)

    tokens, px, types = _rows(s.ids, s.tok.vocab_size)
    want = _hf_logits(s.m, tokens, px, types)
    original = lm.logits(tokens, pixel_values=px, token_type_ids=types)
    reloaded = back.logits(tokens, pixel_values=px, token_type_ids=types)
    assert _rel(reloaded, original) <= SAME
    assert _rel(reloaded, want) <= TOL and _rel(original, want) <= TOL

    prompt = tokens[0]
    with torch.no_grad():
        ref = s.m.generate(torch.tensor(prompt[None], dtype=torch.long), pixel_values=torch.tensor(px[:2]),
                           token_type_ids=torch.tensor(types[:1], dtype=torch.long),
                           attention_mask=torch.ones((1, len(prompt)), dtype=torch.long), max_new_tokens=6,
                           do_sample=False, pad_token_id=0)[0].numpy()
    assert back.generate(prompt, pixel_values=px[:2], max_new_tokens=6).tolist() == ref.tolist()
    # text + images through the file's own vocabulary (the image ids were found by their pieces): the
    # original model continues the same ids the same way. (The ids may differ from the original tokenizer's:
    # the tiny SentencePiece normalizes newlines away, which a GGUF vocabulary does not record.)
    tok = back.tokenizer
    ids, inputs = g3.encode_prompt(back.config, tok, "describe", [picture(0)])
    assert ids.count(s.ids[0]) == TOKENS and ids.count(s.ids[1]) == ids.count(s.ids[2]) == 1
    cont = lm.generate(ids, max_new_tokens=4, **inputs)[len(ids):]
    assert back.generate("describe", images=[picture(0)], max_new_tokens=4) == \
        "describe" + tok.decode([t for t in cont if t not in tok.stop_ids])

    alone = CausalLM.from_preset(str(s.text_gguf))  # without its mmproj a GGUF is the text model, as before
    assert alone.family.name == "gemma" and alone.config.replace(name=cfg.text.name) == cfg.text


def test_f16_export_is_laid_out_as_the_converters(setup, tmp_path: Path):
    """The metadata and tensor types of an f16 mmproj are the converter's, and it reads back to f16 noise."""
    s = setup
    text, mm = tmp_path / "t.gguf", tmp_path / "mm.gguf"
    s.lm.export_gguf(text, dtype="f16", mmproj_path=mm)
    arch, md, _ = read_metadata(mm)
    assert arch == "clip" and md["general.type"] == "mmproj" and md["clip.projector_type"] == "gemma3"
    assert md["clip.has_vision_encoder"] is True and md["clip.use_gelu"] is True
    expect = {"clip.vision.image_size": 56, "clip.vision.patch_size": 7, "clip.vision.embedding_length": 32,
              "clip.vision.feed_forward_length": 64, "clip.vision.block_count": 2,
              "clip.vision.attention.head_count": 4, "clip.vision.projection_dim": 48,
              "clip.vision.projector.scale_factor": 2, "clip.vision.attention.layer_norm_epsilon": 1e-6}
    assert {k: md[k] for k in expect} == expect
    assert list(md["clip.vision.image_mean"]) == list(md["clip.vision.image_std"]) == [0.5] * 3
    _, raw, _ = parse_gguf(mm)
    types = {t.name: t.qtype.name for t in raw}
    assert len(types) == 3 + 16 * 2 + 2 + 2  # patch conv and bias, positions; 16 per layer; post LN; projector
    for name in ("v.patch_embd.weight", "v.patch_embd.bias", "v.position_embd.weight", "v.blk.0.ln1.weight",
                 "v.blk.1.attn_q.bias", "v.post_ln.bias", "mm.soft_emb_norm.weight"):
        assert types[name] == "F32", name
    for name in ("v.blk.0.attn_q.weight", "v.blk.1.attn_out.weight", "v.blk.1.ffn_down.weight",
                 "mm.input_projection.weight"):
        assert types[name] == "F16", name
    shapes = {t.name: tuple(reversed(t.ne)) for t in raw}  # numpy order: torch's layouts
    assert shapes["v.patch_embd.weight"] == (32, 3, 7, 7) and shapes["mm.input_projection.weight"] == (32, 48)

    tokens, px, types_ = _rows(s.ids, s.tok.vocab_size)
    f16 = CausalLM.from_preset(str(text), mmproj=str(mm))
    assert _rel(_forward(f16, tokens, px, types_), _forward(s.lm, tokens, px, types_)) <= 5e-3


def test_mmproj_written_by_hand_in_the_converters_layout(setup, tmp_path: Path):
    """An mmproj built from the transformers checkpoint's tensors as llama.cpp's converter builds one loads to
    transformers' logits; with the soft-embedding norm's ``+1`` left out, or the patch kernel's two spatial
    axes swapped, the logits are far off: the check sees each convention."""
    s = setup
    tensors = _converter_tensors(_checkpoint(s.folder))
    assert len(tensors) == 3 + 16 * 2 + 2 + 2
    tokens, px, types = _rows(s.ids, s.tok.vocab_size)
    want = _hf_logits(s.m, tokens, px, types)

    def logits(name: str, **changes: Any) -> np.ndarray:
        path = _write_by_hand(tmp_path / f"{name}.gguf", {**tensors, **changes})
        return _forward(CausalLM.from_preset(str(s.text_gguf), mmproj=str(path)), tokens, px, types)

    assert _rel(logits("as_converter"), want) <= TOL
    norm = tensors["mm.soft_emb_norm.weight"]
    patch = tensors["v.patch_embd.weight"]
    far = {"no +1": logits("no_offset", **{"mm.soft_emb_norm.weight": norm - 1.0}),
           "kh <-> kw": logits("patch_swapped", **{"v.patch_embd.weight": patch.transpose(0, 1, 3, 2)})}
    for what, got in far.items():
        assert _rel(got, want) > 100 * TOL, what


@pytest.mark.filterwarnings("ignore:GGUF cannot record")  # the tiny Gemma 2's query scale: beside the point
def test_bad_pairs_are_named(setup, tmp_path: Path):
    """Each wrong pair is refused naming what is wrong: another projector type (Gemma 4's), a missing tensor,
    widths that differ (both named), another image normalisation, a text file given as the mmproj, a text
    file of another architecture, an mmproj beside a non-GGUF checkpoint, and an mmproj export of a model
    that has none."""
    s = setup
    tensors = _converter_tensors(_checkpoint(s.folder))
    text = str(s.text_gguf)

    def load(name: str, drop: tuple[str, ...] = (), **kw: Any) -> CausalLM:
        path = _write_by_hand(tmp_path / f"{name}.gguf", {k: v for k, v in tensors.items() if k not in drop}, **kw)
        return CausalLM.from_preset(text, mmproj=str(path))

    with pytest.raises(ValueError, match="a 'gemma3' GGUF; a Gemma 4 mmproj goes with a Gemma 4"):
        load("gemma4", projector_type="gemma4v")  # read by gemma4_vision, whose text file is a gemma4 GGUF
    with pytest.raises(ValueError, match="lacks v.blk.1.ffn_down.weight"):
        load("no_ffn", drop=("v.blk.1.ffn_down.weight",))
    with pytest.raises(ValueError, match="lacks mm.soft_emb_norm.weight"):
        load("no_norm", drop=("mm.soft_emb_norm.weight",))
    wide = np.zeros((32, 64), np.float32)
    with pytest.raises(ValueError, match="width 64.* 48 wide"):
        _write_by_hand(tmp_path / "wide.gguf", {**tensors, "mm.input_projection.weight": wide}, text_width=64)
        CausalLM.from_preset(text, mmproj=str(tmp_path / "wide.gguf"))
    with pytest.raises(ValueError, match="image_mean is .*0.48"):
        load("mean", mean=0.48)
    with pytest.raises(ValueError, match="not an mmproj file: its general.architecture is 'gemma3'"):
        CausalLM.from_preset(text, mmproj=text)
    with pytest.raises(ValueError, match="a 'gemma2' GGUF; a Gemma 3 mmproj goes with a Gemma 3"):
        gemma2 = CausalLM.from_config(base.get("gemma").tiny_config("gemma2", vocab_size=s.tok.vocab_size))
        gemma2.export_gguf(tmp_path / "g2.gguf", dtype="f32")
        CausalLM.from_preset(str(tmp_path / "g2.gguf"), mmproj=str(s.mmproj))
    with pytest.raises(CheckpointError, match="not a .gguf file"):
        CausalLM.from_preset(str(s.folder / "hf"), mmproj=str(s.mmproj))
    text_only = CausalLM.from_config(base.get("gemma").tiny_config("gemma3", vocab_size=s.tok.vocab_size))
    with pytest.raises(UnsupportedError, match="no llama.cpp mmproj"):
        text_only.export_gguf(tmp_path / "t.gguf", mmproj_path=tmp_path / "m.gguf")


def test_cli_converts_and_generates_with_the_mmproj(setup, tmp_path: Path, capsys):
    """``gemmax convert --to gguf --mmproj-out`` writes the pair; ``--mmproj`` loads it where a model is taken."""
    from PIL import Image

    from gemmax.cli import main

    s = setup
    text, mm = tmp_path / "t.gguf", tmp_path / "mm.gguf"
    assert main(["convert", str(s.folder / "hf"), str(text), "--to", "gguf", "--gguf-type", "f32",
                 "--mmproj-out", str(mm)]) == 0
    Image.fromarray(picture(1)).save(tmp_path / "1.png")
    assert main(["generate", "--model", str(text), "--mmproj", str(mm), "--image", str(tmp_path / "1.png"),
                 "describe", "--max-new-tokens", "3"]) == 0
    pic = np.asarray(Image.open(tmp_path / "1.png"))
    assert capsys.readouterr().out.strip() == s.back.generate("describe", images=[pic], max_new_tokens=3).strip()
    assert main(["info", str(text), "--mmproj", str(mm)]) == 0
    assert '"family": "gemma3_vision"' in capsys.readouterr().out
    assert main(["convert", str(text), str(tmp_path / "x"), "--to", "hf", "--mmproj-out", str(mm)]) == 2
    # `gemmax serve --mmproj`: the parsed flag reaches the loader, which serves the pair as the image family
    import argparse

    from gemmax.serve.server import load, register_cli

    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers())
    args = parser.parse_args(["serve", "--model", str(text), "--mmproj", str(mm)])
    assert args.mmproj == str(mm)
    served = load(args.model, args.dtype, args.quantize, args.mmproj)
    assert served.family.name == "gemma3_vision"
    assert load(str(text)).family.name != "gemma3_vision"  # the text GGUF alone: the text model
