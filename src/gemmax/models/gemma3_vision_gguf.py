"""Gemma 3 with images as llama.cpp keeps it: the decoder in a ``gemma3`` text GGUF, the SigLIP tower and the
projector in a second file, the "mmproj" (``general.architecture = "clip"``, ``clip.projector_type =
"gemma3"``; llama.cpp's ``--mmproj``). Read together, the two files are one ``Gemma3ForConditionalGeneration``
checkpoint in the published layout (``language_model.model.*``, ``vision_tower.vision_model.*``,
``multi_modal_projector.*``), which the family's name table loads like a safetensors folder; written back, they
are what llama.cpp's converter (``convert_hf_to_gguf.py``, its Gemma 3 vision class) writes:

* tensor names from gguf-py's mmproj table: ``v.patch_embd``, ``v.position_embd``, ``v.blk.{i}.attn_q`` /
  ``attn_k`` / ``attn_v`` / ``attn_out`` / ``ln1`` / ``ln2`` / ``ffn_up`` (``mlp.fc1``) / ``ffn_down``
  (``mlp.fc2``), ``v.post_ln``, ``mm.input_projection`` (transformers' ``mm_input_projection_weight``) and
  ``mm.soft_emb_norm``, each ``.weight`` / ``.bias``;
* every tensor in transformers' layout: linear weights ``[out, in]``, the patch conv ``[width, 3, p, p]``,
  the position table ``[patches, width]`` and the input projection as transformers' ``[vision width, text
  width]`` parameter, untransposed (llama.cpp transposes it when it runs);
* the soft-embedding RMSNorm weight with Gemma's ``+1`` folded in (the one norm the converter shifts; the
  tower's LayerNorms are stored as they are);
* metadata: ``clip.has_vision_encoder``, ``clip.projector_type``, ``clip.use_gelu``, ``clip.vision.*`` (image
  and patch size, width, MLP width, layers, heads, LayerNorm eps, the image mean and std, ``projection_dim``
  = the decoder's width) and ``clip.vision.projector.scale_factor`` (the pooling window's side) only where it
  is not llama.cpp's default of 4;
* types: 1-D tensors and the patch and position embeddings F32, the input projection F16 (the converter
  forces both), the rest the file type's. gemmax's f32 file keeps the projection F32 too (the converter
  writes it F16 whatever the file type), so an f32 round trip is exact.

llama.cpp finds the image markers by their text (``<start_of_image>``, ``<end_of_image>``) and needs no id for
the soft token; gemmax fills soft-token positions, so it takes the three ids from the text file's vocabulary
by piece (``<image_soft_token>`` ...), else from the published ids (262144, 255999, 256000). Its own writer
also records them as ``gemmax.*`` keys of the mmproj (llama.cpp ignores them), so a model whose vocabulary
lacks those pieces reads back with its ids.

This module works on transformers config dicts and HF-named tensors, so the family module can use it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gemmax.io.gguf import (
    MMPROJ_ARCH,
    HFSource,
    HFView,
    UnsupportedArchitecture,
    _gguf,
    open_hf_view,
    projector_of,
)
from gemmax.io.tokenizer import Tokenizer
from gemmax.models import siglip
from gemmax.models.gemma import gguf as text_gguf

#: The projector type this module reads and writes, and the text architecture its files go with.
PROJECTOR_TYPE = "gemma3"
TEXT_ARCH = "gemma3"
#: Published prefixes of the decoder, the tower and the projector.
TEXT = "language_model."
TOWER = "vision_tower.vision_model."
PROJ_WEIGHT = "multi_modal_projector.mm_input_projection_weight"
NORM_WEIGHT = "multi_modal_projector.mm_soft_emb_norm.weight"
#: llama.cpp's pooling window side when the file does not say (every published Gemma 3: 64 x 64 -> 16 x 16).
DEFAULT_POOL = 4
#: Gemma 3's preprocessing normalises each channel with mean 0.5 and std 0.5 (``preprocess_image``).
IMAGE_MEAN = IMAGE_STD = (0.5, 0.5, 0.5)
#: The three image ids: transformers' config key -> (the piece in Gemma 3's vocabulary, its published id, the
#: ``gemmax.*`` key gemmax's writer records it under).
IMAGE_IDS = {"image_token_index": ("<image_soft_token>", 262144, "gemmax.image_token_id"),
             "boi_token_index": ("<start_of_image>", 255999, "gemmax.boi_token_id"),
             "eoi_token_index": ("<end_of_image>", 256000, "gemmax.eoi_token_id")}


# ---- names ---------------------------------------------------------------------------------------------


def hf_names(vision: siglip.SigLIPConfig) -> list[str]:
    """Every tensor an mmproj holds, by its published transformers name: the tower's (as the family's name
    table spells them) and the projector's two."""
    names: list[str] = []
    for entry, _fwd, _inv in siglip.hf_table(vision, TOWER).values():
        names += [entry] if isinstance(entry, str) else list(entry)
    return [*names, PROJ_WEIGHT, NORM_WEIGHT]


def gguf_name(tmap: Any, hf_name: str) -> str:
    """llama.cpp's name of a tower or projector tensor, from gguf-py's mmproj table (after the converter's
    renaming of transformers' ``mm_input_projection_weight`` parameter to a ``.weight``)."""
    stem, _, suffix = hf_name.replace("_projection_weight", "_projection.weight").rpartition(".")
    g = tmap.get_name(stem)
    if g is None:
        raise ValueError(f"gguf-py's mmproj table has no name for {hf_name!r}")
    return f"{g}.{suffix}"


def _name_map(depth: int) -> Any:
    gguf = _gguf()
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, depth)


# ---- metadata <-> config -------------------------------------------------------------------------------


def _vision_config(md: dict[str, Any], path: Path) -> tuple[dict[str, Any], int]:
    """(transformers' ``vision_config``, soft tokens per image) from an mmproj's ``clip.vision.*`` keys."""

    def key(name: str, default: Any = None) -> Any:
        return md.get(f"clip.vision.{name}", default)

    need = ("image_size", "patch_size", "embedding_length", "feed_forward_length", "block_count",
            "attention.head_count")
    missing = [f"clip.vision.{k}" for k in need if key(k) is None]
    if missing:
        raise ValueError(f"{path.name}: the mmproj's metadata lacks {', '.join(missing)}")
    for what, want in (("image_mean", IMAGE_MEAN), ("image_std", IMAGE_STD)):
        got = key(what)
        if got is not None and not np.allclose(np.asarray(got, np.float64), want, atol=1e-6):
            raise ValueError(f"{path.name}: clip.vision.{what} is {[round(float(x), 6) for x in got]}, not Gemma 3's "
                             f"{list(want)}")
    vc = {"model_type": "siglip_vision_model", "image_size": int(key("image_size")),
          "patch_size": int(key("patch_size")), "hidden_size": int(key("embedding_length")),
          "intermediate_size": int(key("feed_forward_length")), "num_hidden_layers": int(key("block_count")),
          "num_attention_heads": int(key("attention.head_count")),
          "layer_norm_eps": float(key("attention.layer_norm_epsilon", 1e-6)), "vision_use_head": False}
    grid = vc["image_size"] // vc["patch_size"]
    pool = int(key("projector.scale_factor", DEFAULT_POOL))
    if pool <= 0 or grid % pool:
        raise ValueError(f"{path.name}: a pooling window of {pool} (clip.vision.projector.scale_factor) does not "
                         f"tile the {grid} x {grid} patch grid")
    return vc, (grid // pool) ** 2


def _image_ids(mm_md: dict[str, Any], tokens: list[str], vocab: int, text: Path) -> dict[str, int]:
    """The three image ids: the mmproj's ``gemmax.*`` keys, else the pieces' ids in the text file's vocabulary,
    else the published ids; each must lie inside the decoder's vocabulary."""
    index = {p: tokens.index(p) for p, _, _ in IMAGE_IDS.values() if p in tokens} if tokens else {}
    out = {}
    for hf_key, (piece, published, own) in IMAGE_IDS.items():
        found = mm_md.get(own)
        i = int(found) if found is not None else index.get(piece, published)
        if not 0 <= i < vocab:
            raise ValueError(f"{text.name}: the vocabulary has no {piece} and Gemma 3's id for it, {i}, is outside "
                             f"its {vocab} tokens")
        out[hf_key] = i
    return out


# ---- reading -------------------------------------------------------------------------------------------


def check_projector(md: dict[str, Any], path: Path, expected: str, model: str) -> None:
    """An mmproj's projector type (:func:`gemmax.io.gguf.projector_of`) must be ``expected`` and the file must
    hold a vision encoder: a ValueError naming what it holds otherwise."""
    found = projector_of(md)
    if found != expected:
        raise ValueError(f"{path.name}: mmproj projector type {found!r}; this reader takes {model}'s "
                         f"({expected!r}) mmproj files")
    if md.get("clip.has_vision_encoder") is False:
        raise ValueError(f"{path.name}: the mmproj has no vision encoder (clip.has_vision_encoder is false)")


def mmproj_sources(names: list[tuple[str, str]], raw: dict[str, Any], path: Path,
                   place: Any) -> dict[str, HFSource]:
    """The ``HFSource`` of every (transformers name, GGUF name) pair of an mmproj, ``place(name, gguf_name)``
    giving the tensor's transformers shape and fix; every missing tensor named in one ValueError."""
    missing = [g for _, g in names if g not in raw]
    if missing:
        raise ValueError(f"{path.name}: the mmproj lacks {', '.join(missing)}")
    return {name: HFSource(g, *place(name, g), raw[g].qtype.name) for name, g in names}


def read_mmproj(path: str | os.PathLike[str]) -> HFView:
    """A Gemma 3 mmproj file as a lazy transformers state dict of the tower and projector (published names);
    ``hf_config`` holds ``vision_config``, ``mm_tokens_per_image`` and ``projection_dim`` (the width the
    projector maps to, when the file records it). Another projector type, a missing tensor or one this
    reader cannot place is a ValueError naming it."""
    path = Path(path)

    def build(md: dict[str, Any], tok: dict[str, Any], raw: dict[str, Any],
              load: Any) -> tuple[dict[str, Any], dict[str, HFSource]]:
        check_projector(md, path, PROJECTOR_TYPE, "Gemma 3")
        vc, tokens = _vision_config(md, path)
        vision = siglip.from_hf_vision_config(vc)
        tmap = _name_map(vision.depth)

        def place(name: str, g: str) -> tuple[tuple[int, ...], Any]:
            # the converter folds Gemma's zero-centred RMSNorm offset into the soft-embedding norm: undo it
            fix = (lambda w: w - np.float32(1.0)) if name == NORM_WEIGHT else None
            return tuple(reversed(raw[g].ne)) or (1,), fix

        sources = mmproj_sources([(n, gguf_name(tmap, n)) for n in hf_names(vision)], raw, path, place)
        unread = sorted(set(raw) - {s.gguf_name for s in sources.values()})
        if unread:
            raise ValueError(f"{path.name}: tensors a Gemma 3 mmproj does not have: {', '.join(unread)}")
        dim = md.get("clip.vision.projection_dim")
        return {"vision_config": vc, "mm_tokens_per_image": tokens,
                "projection_dim": None if dim is None else int(dim)}, sources

    try:
        return open_hf_view(path, (MMPROJ_ARCH,), build)
    except UnsupportedArchitecture as e:
        raise ValueError(f"{path.name} is not an mmproj file: its general.architecture is {e.arch!r}, not "
                         f"{MMPROJ_ARCH!r}") from None


@dataclass
class WithMmproj(HFView):
    """A text GGUF and its mmproj as one lazy transformers state dict in the published layout. ``parts``: each
    published name -> (the file's view, the name there). Metadata, tokenizer and path are the text file's."""

    parts: dict[str, tuple[HFView, str]] = field(default_factory=dict, repr=False)

    def tensor(self, name: str) -> np.ndarray:
        try:
            view, inner = self.parts[name]
        except KeyError:
            raise KeyError(f"{name!r} is in neither {self.path.name} nor its mmproj") from None
        return view.tensor(inner)

    __getitem__ = tensor


def check_widths(path: Path, mmproj: Path, vis: Any, d: int, proj_out: int, v_width: int) -> None:
    """An mmproj's projection must map its tower's width (``v_width``) to the text model's (``d``; ``proj_out``
    the projection's output width, as its tensor says): a ValueError naming both files otherwise."""
    recorded = vis.hf_config["projection_dim"]
    if proj_out != d or (recorded is not None and recorded != d):
        said = "" if recorded in (None, proj_out) else f" (clip.vision.projection_dim says {recorded})"
        raise ValueError(f"{mmproj.name} projects image features to width {proj_out}{said}, but the text model "
                         f"{path.name} is {d} wide: they are not parts of one model")
    if v_width != vis.hf_config["vision_config"]["hidden_size"]:
        raise ValueError(f"{mmproj.name}: mm.input_projection.weight takes width {v_width}, the tower is "
                         f"{vis.hf_config['vision_config']['hidden_size']} wide")


def read(path: str | os.PathLike[str], mmproj: str | os.PathLike[str]) -> WithMmproj:
    """A Gemma 3 text GGUF and its mmproj as one ``Gemma3ForConditionalGeneration`` checkpoint: ``hf_config`` is
    its config.json (text config from the text file, vision config and tokens per image from the mmproj,
    the image ids as :func:`_image_ids` finds them). A text file of another architecture, or an mmproj whose
    projection does not map to the decoder's width, is a ValueError naming both."""
    path, mmproj = Path(path), Path(mmproj)
    text = text_gguf.read_gguf(path)
    if text.arch != TEXT_ARCH:
        raise ValueError(f"{path.name} is a {text.arch!r} GGUF; a Gemma 3 mmproj goes with a Gemma 3 text GGUF "
                         f"({TEXT_ARCH!r})")
    vis = read_mmproj(mmproj)
    d = int(text.hf_config["hidden_size"])
    v_width, proj_out = vis.shape(PROJ_WEIGHT)
    check_widths(path, mmproj, vis, d, proj_out, v_width)
    tc = dict(text.hf_config)
    ids = _image_ids(vis.metadata, text.tokenizer_metadata.get("tokenizer.ggml.tokens") or [],
                     int(tc["vocab_size"]), path)
    hf = {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"], "text_config": tc,
          "vision_config": vis.hf_config["vision_config"], "mm_tokens_per_image": vis.hf_config["mm_tokens_per_image"],
          **ids, "bos_token_id": tc.get("bos_token_id"), "eos_token_id": tc.get("eos_token_id"),
          "pad_token_id": tc.get("pad_token_id"), "_name_or_path": tc.get("_name_or_path", "")}
    parts = {TEXT + n: (text, n) for n in text.keys()} | {n: (vis, n) for n in vis.keys()}
    sources = {TEXT + n: s for n, s in text.sources.items()} | dict(vis.sources)
    return WithMmproj(path, text.arch, text.metadata, text.tokenizer_metadata, hf, sources, parts=parts)


# ---- writing -------------------------------------------------------------------------------------------


def _file_dtype(dtype: str) -> str:
    """The mmproj's type for the text file's ``dtype``: f32 stays f32, f16 and q8_0 give f16 (the converter's
    default for mmproj files; llama.cpp runs the tower in f16 or f32)."""
    return "f32" if dtype == "f32" else "f16"


def mmproj_writer(path: Path, name: str | None, dtype: str, names: list[str], tensors: dict[str, np.ndarray], *,
                  projection_dim: int, image_size: int, patch_size: int, width: int, mlp_dim: int, depth: int,
                  heads: int, mean: Any, std: Any) -> Any:
    """A ``GGUFWriter`` for an mmproj at ``path`` holding the keys every llama.cpp vision tower has (the file's
    type and name, ``clip.has_vision_encoder`` and the ``clip.vision.*`` shapes); the caller adds its
    projector's own keys and the tensors ``names`` (each must be in ``tensors``), then :func:`close_writer`.
    ``dtype`` is the text file's: "f32" gives an F32 file, "f16" / "q8_0" the converter's f16 one."""
    if dtype not in ("f32", "f16", "q8_0"):
        raise ValueError(f"unsupported GGUF dtype {dtype!r}: choose 'f32', 'f16' or 'q8_0'")
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ValueError(f"the model lacks {', '.join(missing[:5])}: cannot write its mmproj")
    f32 = _file_dtype(dtype) == "f32"
    gguf = _gguf()
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(path, MMPROJ_ARCH)
    w.add_type(gguf.GGUFType.MMPROJ)
    if name:
        w.add_name(name)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if f32 else gguf.LlamaFileType.MOSTLY_F16)
    w.add_clip_has_vision_encoder(True)
    w.add_vision_projection_dim(projection_dim)
    w.add_vision_image_size(image_size)
    w.add_vision_patch_size(patch_size)
    w.add_vision_embedding_length(width)
    w.add_vision_feed_forward_length(mlp_dim)
    w.add_vision_block_count(depth)
    w.add_vision_head_count(heads)
    w.add_vision_image_mean(list(mean))
    w.add_vision_image_std(list(std))
    return w


def close_writer(w: Any) -> None:
    """Write out and close a ``GGUFWriter`` whose keys and tensors are all added."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_mmproj(path: str | os.PathLike[str], hf_config: dict[str, Any], tensors: dict[str, np.ndarray],
                 dtype: str = "f16", name: str | None = None) -> Path:
    """Write the tower and projector of a ``gemma3`` config.json (``hf_config``) from their published
    transformers names (``tensors``; decoder tensors may be among them and are left out) as llama.cpp's
    converter writes a Gemma 3 mmproj (see the module docstring); ``dtype`` "f32" writes every tensor F32,
    "f16" / "q8_0" the converter's f16 file."""
    gguf = _gguf()
    q = gguf.GGMLQuantizationType
    mm_type = _file_dtype(dtype)
    vc = dict(hf_config["vision_config"])
    vision = siglip.from_hf_vision_config(vc)
    d = int(hf_config["text_config"]["hidden_size"])
    per_side = math.isqrt(int(hf_config.get("mm_tokens_per_image", 256)))
    pool = vision.grid // per_side
    tmap = _name_map(vision.depth)
    names = hf_names(vision)
    path = Path(path)
    w = mmproj_writer(path, name or hf_config.get("_name_or_path"), dtype, names, tensors, projection_dim=d,
                      image_size=vision.image_size, patch_size=vision.patch_size, width=vision.width,
                      mlp_dim=vision.mlp_dim, depth=vision.depth, heads=vision.num_heads, mean=IMAGE_MEAN,
                      std=IMAGE_STD)
    w.add_clip_projector_type(PROJECTOR_TYPE)
    w.add_vision_attention_layernorm_eps(vision.norm_eps)
    w.add_vision_use_gelu(True)
    if pool != DEFAULT_POOL:  # as the converter: written only where llama.cpp's default would be wrong
        w.add_vision_projector_scale_factor(pool)
    for hf_key, (_, published, own) in IMAGE_IDS.items():
        w.add_uint32(own, int(hf_config.get(hf_key, published)))
    for hf_name in names:
        g = gguf_name(tmap, hf_name)
        a = np.ascontiguousarray(tensors[hf_name], dtype=np.float32)
        if hf_name == NORM_WEIGHT:
            a = a + np.float32(1.0)
        if mm_type == "f32" or a.ndim < 2 or g.startswith(("v.patch_embd.", "v.position_embd.")):
            w.add_tensor(g, a)
        else:  # the blocks' matrices and the input projection
            w.add_tensor(g, gguf.quants.quantize(a, q.F16))
    close_writer(w)
    return path


def write(path: str | os.PathLike[str], hf_config: dict[str, Any], tensors: dict[str, np.ndarray],
          tokenizer: Tokenizer | str | os.PathLike[str] | None = None, dtype: str = "f16",
          chat_template: str | None = None, name: str | None = None,
          mmproj_path: str | os.PathLike[str] | None = None) -> Path:
    """The decoder of a ``gemma3`` config.json and its published tensors as a Gemma 3 text GGUF at ``path``
    (:func:`gemmax.models.gemma.gguf.write_gguf`) and, given ``mmproj_path``, the tower and projector as its
    mmproj there (:func:`write_mmproj`). Returns the text file's path."""
    text = {n[len(TEXT):]: a for n, a in tensors.items() if n.startswith(TEXT)}
    out = text_gguf.write_gguf(path, dict(hf_config["text_config"]), text, tokenizer=tokenizer, dtype=dtype,
                               chat_template=chat_template, name=name)
    if mmproj_path is not None:
        write_mmproj(mmproj_path, hf_config, tensors, dtype=dtype, name=name)
    return out
