"""Gemma 4 with images as llama.cpp keeps it: the decoder in a ``gemma4`` text GGUF
(:mod:`gemmax.models.gemma4.gguf`), the vision tower and the projection into the decoder in a second file,
the "mmproj" (``general.architecture = "clip"``, ``clip.vision.projector_type = "gemma4v"``; llama.cpp's
``--mmproj``). Read together, the two files are one ``Gemma4ForConditionalGeneration`` checkpoint in the
published layout (``model.language_model.*``, ``model.vision_tower.*``, ``model.embed_vision.*``), which the
family's name table loads; written back, they are what llama.cpp's converter (``convert_hf_to_gguf.py``, its
Gemma 4 vision / audio mmproj class) writes:

* tensor names from gguf-py's mmproj table after the converter's renaming (``model.vision_tower.encoder.`` ->
  ``vision_model.model.``, ``.linear.weight`` -> ``.weight``): ``v.patch_embd.weight``,
  ``v.position_embd.weight``, ``v.blk.{i}.attn_q`` / ``attn_k`` / ``attn_v`` / ``attn_out`` / ``ffn_gate`` /
  ``ffn_up`` / ``ffn_down`` ``.weight``, the norms ``v.blk.{i}.ln1`` (input), ``attn_post_norm``, ``ln2``
  (pre-MLP), ``ffn_post_norm``, ``attn_q_norm`` / ``attn_k_norm``, ``v.std_bias`` / ``v.std_scale`` (no
  suffix; standardized towers only) and ``mm.input_projection.weight`` (``embed_vision.embedding_projection``);
* a clipped linear's four bounds as 1-element tensors beside its weight: ``v.blk.{i}.attn_q.input_min`` ...
  ``ffn_down.output_max`` (the converter turns every scalar into a 1-D tensor);
* every tensor in transformers' layout (linears ``[out, in]``, the projection ``[text width, tower width]``,
  the position tables ``[2, rows, width]``, norms as they are: Gemma 4 stores ``x * w``), except the patch
  embedding: transformers' ``[width, p * p * 3]`` (pixels row, column, channel) is stored as a conv kernel
  ``[width, 3, p, p]``;
* metadata: ``clip.has_vision_encoder``, ``clip.vision.projector_type``, ``clip.vision.*`` (patch size, width,
  MLP width, layers, heads, RMS-norm eps, image mean and std, ``projection_dim`` = the decoder's width) and an
  ``image_size`` of 224 that nothing reads (Gemma 4 takes images of any aspect ratio). The key / value heads,
  head width and position-table rows are read from the tensors' shapes, clipping and standardizing from the
  tensors' presence; llama.cpp fixes the rest (RoPE base 100, pooling window 3, which
  ``clip.vision.projector.scale_factor`` overrides: written only where it is not 3);
* types: 1-D tensors and the position table F32, the patch embedding F16 in an f16 file, the rest the file
  type's. gemmax's f32 file is all F32, so an f32 round trip is exact.

llama.cpp finds the image markers by their text (``<|image>``, ``<image|>``); gemmax fills soft-token
positions, so it takes the image ids from the text file's vocabulary by piece, else the published ids. Its
writer also records them, the RoPE base, the soft-token budget and a causal decoder (``bidirectional`` off;
llama.cpp always decodes images bidirectionally) as ``gemmax.*`` keys, which llama.cpp ignores. An mmproj
that also holds the on-device models' audio encoder (``a.*``, ``mm.a.*``) reads with the audio tensors left
out, as gemmax runs no audio.
"""

from __future__ import annotations

import os
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
    read_metadata,
)
from gemmax.models.gemma3_vision_gguf import (
    WithMmproj,
    check_projector,
    check_widths,
    close_writer,
    mmproj_sources,
    mmproj_writer,
)
from gemmax.models.gemma4 import gguf as text_gguf
from gemmax.models.gemma4 import vit

#: The projector type this module reads and writes, and the text architecture its files go with.
PROJECTOR_TYPE = "gemma4v"
TEXT_ARCH = text_gguf.ARCH
#: Published prefixes of the decoder and the tower, and the projection's name.
TEXT = "model.language_model."
TOWER = "model.vision_tower."
PROJ_WEIGHT = "model.embed_vision.embedding_projection.weight"
PATCH_WEIGHT = TOWER + "patch_embedder.input_proj.weight"
#: What llama.cpp assumes for a ``gemma4v`` file: the pooling window (overridden by
#: ``clip.vision.projector.scale_factor``), the tower's RoPE base and the largest soft-token count per image.
DEFAULT_POOL = 3
DEFAULT_ROPE_THETA = 100.0
DEFAULT_SOFT_TOKENS = 280
#: The converter's placeholder image size (llama.cpp resizes Gemma 4 images by patch count, not to a square).
IMAGE_SIZE = 224
#: Gemma 4's processor feeds pixels in [0, 1] unnormalised (the tower maps them to [-1, 1] itself).
IMAGE_MEAN, IMAGE_STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
#: The converter's suffixes after a gguf-py base name.
SUFFIXES = (".weight", ".bias", ".input_max", ".input_min", ".output_max", ".output_min")
#: The media ids: transformers' config key -> (the piece in Gemma 4's vocabulary, its published id, the
#: ``gemmax.*`` key gemmax's writer records it under).
MEDIA_IDS = {"image_token_id": ("<|image|>", 258880, "gemmax.image_token_id"),
             "boi_token_id": ("<|image>", 255999, "gemmax.boi_token_id"),
             "eoi_token_id": ("<image|>", 258882, "gemmax.eoi_token_id"),
             "video_token_id": ("<|video|>", 258884, "gemmax.video_token_id"),
             "audio_token_id": ("<|audio|>", 258881, "gemmax.audio_token_id")}
ROPE_KEY, SOFT_KEY, BIDI_KEY = "gemmax.vision.rope_theta", "gemmax.vision.soft_tokens", "gemmax.vision.bidirectional"
#: Tensor-name prefixes of an mmproj's audio encoder and its projection (left unread).
AUDIO = ("a.", "mm.a.")


# ---- names ---------------------------------------------------------------------------------------------


def hf_names(vision: vit.ViTConfig) -> list[str]:
    """Every tensor an mmproj holds, by its published transformers name: the tower's and the projection."""
    names: list[str] = []
    for entry, _f, _g in vit.hf_table(vision, TOWER).values():
        names += [entry] if isinstance(entry, str) else list(entry)
    return [*names, PROJ_WEIGHT]


def _name_map(depth: int) -> Any:
    gguf = _gguf()
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, depth)


def gguf_name(tmap: Any, hf_name: str) -> str:
    """llama.cpp's name of a tower or projection tensor: the converter's renaming, then gguf-py's mmproj table."""
    name = hf_name.replace(TOWER + "encoder.", "vision_model.model.").replace(".linear.weight", ".weight")
    if name.endswith(("layer_scalar", "position_embedding_table")):
        name += ".weight"
    g = tmap.get_name(name, try_suffixes=SUFFIXES)
    if g is None:
        raise ValueError(f"gguf-py's mmproj table has no name for {hf_name!r}")
    return g


def _to_file(hf_name: str, a: np.ndarray) -> np.ndarray:
    """A published tensor in the converter's layout: the patch embedding as a conv kernel, scalars 1-D."""
    if hf_name == PATCH_WEIGHT:
        w = a.shape[0]
        p = int(round((a.shape[1] // 3) ** 0.5))
        return a.reshape(w, p, p, 3).transpose(0, 3, 1, 2)
    return a.reshape(a.shape or (1,))


# ---- reading -------------------------------------------------------------------------------------------


def _shape(raw: dict[str, Any], name: str) -> tuple[int, ...]:
    return tuple(int(x) for x in reversed(raw[name].ne))


def _vision_config(md: dict[str, Any], raw: dict[str, Any], path: Path) -> dict[str, Any]:
    """transformers' ``vision_config`` from the mmproj's ``clip.vision.*`` keys and its tensors' shapes."""

    def key(name: str, default: Any = None) -> Any:
        return md.get(f"clip.vision.{name}", default)

    need = ("patch_size", "embedding_length", "feed_forward_length", "block_count", "attention.head_count")
    missing = [f"clip.vision.{k}" for k in need if key(k) is None]
    probes = ("v.blk.0.attn_q_norm.weight", "v.blk.0.attn_k.weight", "v.position_embd.weight")
    missing += [g for g in probes if g not in raw]
    if missing:
        raise ValueError(f"{path.name}: the mmproj lacks {', '.join(missing)}")
    hd = _shape(raw, probes[0])[-1]
    kv_rows = _shape(raw, probes[1])[0]
    if kv_rows % hd:
        raise ValueError(f"{path.name}: v.blk.0.attn_k.weight has {kv_rows} rows, not a multiple of the "
                         f"{hd}-wide heads of v.blk.0.attn_q_norm.weight")
    return {"model_type": "gemma4_vision", "hidden_size": int(key("embedding_length")),
            "num_hidden_layers": int(key("block_count")), "intermediate_size": int(key("feed_forward_length")),
            "num_attention_heads": int(key("attention.head_count")), "num_key_value_heads": kv_rows // hd,
            "head_dim": hd, "patch_size": int(key("patch_size")),
            "pooling_kernel_size": int(key("projector.scale_factor", DEFAULT_POOL)),
            "position_embedding_size": _shape(raw, probes[2])[1],
            "rope_parameters": {"rope_type": "axial", "rope_theta": float(md.get(ROPE_KEY, DEFAULT_ROPE_THETA))},
            "rms_norm_eps": float(key("attention.layer_norm_epsilon", 1e-6)),
            "use_clipped_linears": any(n.startswith("v.blk.") and n.endswith(".input_max") for n in raw),
            "standardize": "v.std_bias" in raw, "hidden_activation": "gelu_pytorch_tanh", "attention_bias": False}


def read_mmproj(path: str | os.PathLike[str]) -> HFView:
    """A Gemma 4 mmproj file as a lazy transformers state dict of the tower and the projection (published
    names); ``hf_config`` holds ``vision_config``, ``projection_dim`` (when the file records it) and what the
    file's ``gemmax.*`` keys say. Another projector type, a missing tensor or one this reader cannot place is
    a ValueError naming it."""
    path = Path(path)

    def build(md: dict[str, Any], tok: dict[str, Any], raw: dict[str, Any],
              load: Any) -> tuple[dict[str, Any], dict[str, HFSource]]:
        check_projector(md, path, PROJECTOR_TYPE, "Gemma 4")
        vc = _vision_config(md, raw, path)
        vision = vit.from_hf_vision_config(vc)
        tmap = _name_map(vision.depth)

        def place(name: str, g: str) -> tuple[tuple[int, ...], Any]:
            shape = _shape(raw, g) or (1,)
            if name == PATCH_WEIGHT:
                w, c, p, _ = shape
                return (w, p * p * c), (lambda a: a.transpose(0, 2, 3, 1).reshape(w, -1))
            if name.endswith(vit.CLIP_BOUNDS):  # transformers' scalar buffers, 1-D in the file
                return (), (lambda a: a.reshape(()))
            return shape, None

        sources = mmproj_sources([(n, gguf_name(tmap, n)) for n in hf_names(vision)], raw, path, place)
        unread = sorted(set(raw) - {s.gguf_name for s in sources.values()} - {n for n in raw if n.startswith(AUDIO)})
        if unread:
            raise ValueError(f"{path.name}: tensors a Gemma 4 mmproj of this config does not have: "
                             f"{', '.join(unread[:8])}{' ...' if len(unread) > 8 else ''}")
        dim = md.get("clip.vision.projection_dim")
        return {"vision_config": vc, "projection_dim": None if dim is None else int(dim)}, sources

    try:
        return open_hf_view(path, (MMPROJ_ARCH,), build)
    except UnsupportedArchitecture as e:
        raise ValueError(f"{path.name} is not an mmproj file: its general.architecture is {e.arch!r}, not "
                         f"{MMPROJ_ARCH!r}") from None


def _media_ids(mm_md: dict[str, Any], tokens: list[str], vocab: int, text: Path) -> dict[str, int]:
    """The media ids: the mmproj's ``gemmax.*`` keys, else the pieces' ids in the text file's vocabulary, else
    the published ids; the image ids must lie inside the decoder's vocabulary."""
    index = {p: tokens.index(p) for p, _, _ in MEDIA_IDS.values() if p in tokens} if tokens else {}
    out = {}
    for hf_key, (piece, published, own) in MEDIA_IDS.items():
        found = mm_md.get(own)
        i = int(found) if found is not None else index.get(piece, published)
        if hf_key.startswith(("image", "boi", "eoi")) and not 0 <= i < vocab:
            raise ValueError(f"{text.name}: the vocabulary has no {piece} and Gemma 4's id for it, {i}, is outside "
                             f"its {vocab} tokens")
        out[hf_key] = i
    return out


def read(path: str | os.PathLike[str], mmproj: str | os.PathLike[str]) -> WithMmproj:
    """A Gemma 4 text GGUF and its mmproj as one ``Gemma4ForConditionalGeneration`` checkpoint: ``hf_config``
    is its config.json (text config from the text file, vision config from the mmproj, media ids as
    :func:`_media_ids` finds them). A text file of another architecture, or an mmproj whose projection does
    not map to the decoder's width, is a ValueError naming both."""
    path, mmproj = Path(path), Path(mmproj)
    arch, _, _ = read_metadata(path)
    if arch != TEXT_ARCH:
        raise ValueError(f"{path.name} is a {arch!r} GGUF; a Gemma 4 mmproj goes with a Gemma 4 text GGUF "
                         f"({TEXT_ARCH!r})")
    text = text_gguf.read(path)
    vis = read_mmproj(mmproj)
    d = int(text.hf_config["hidden_size"])
    proj_out, v_width = vis.shape(PROJ_WEIGHT)
    check_widths(path, mmproj, vis, d, proj_out, v_width)
    md = vis.metadata
    tc = dict(text.hf_config)
    tc["use_bidirectional_attention"] = "vision" if md.get(BIDI_KEY, True) else None
    ids = _media_ids(md, text.tokenizer_metadata.get("tokenizer.ggml.tokens") or [], int(tc["vocab_size"]), path)
    hf = {"model_type": "gemma4", "architectures": ["Gemma4ForConditionalGeneration"], "text_config": tc,
          "vision_config": vis.hf_config["vision_config"], "audio_config": None, **ids,
          "vision_soft_tokens_per_image": int(md.get(SOFT_KEY, DEFAULT_SOFT_TOKENS)),
          "bos_token_id": tc.get("bos_token_id"), "eos_token_id": tc.get("eos_token_id"),
          "pad_token_id": tc.get("pad_token_id"), "_name_or_path": tc.get("_name_or_path", "")}
    parts = {TEXT + n[len("model."):]: (text, n) for n in text.keys() if n.startswith("model.")}
    parts |= {n: (vis, n) for n in vis.keys()}
    sources = {TEXT + n[len("model."):]: s for n, s in text.sources.items() if n.startswith("model.")}
    sources |= dict(vis.sources)
    return WithMmproj(path, text.arch, text.metadata, text.tokenizer_metadata, hf, sources, parts=parts)


# ---- writing -------------------------------------------------------------------------------------------


def write_mmproj(path: str | os.PathLike[str], hf_config: dict[str, Any], tensors: dict[str, np.ndarray],
                 dtype: str = "f16", name: str | None = None) -> Path:
    """Write the tower and projection of a ``gemma4`` config.json (``hf_config``) from their published
    transformers names (``tensors``; decoder tensors may be among them and are left out) as llama.cpp's
    converter writes a Gemma 4 mmproj (see the module docstring); ``dtype`` "f32" writes every tensor F32,
    "f16" / "q8_0" the converter's f16 file."""
    gguf = _gguf()
    q = gguf.GGMLQuantizationType
    f32 = dtype == "f32"
    vc = dict(hf_config["vision_config"])
    vision = vit.from_hf_vision_config(vc)
    tc = hf_config["text_config"]
    d = int(tc["hidden_size"])
    tmap = _name_map(vision.depth)
    names = hf_names(vision)
    path = Path(path)
    w = mmproj_writer(path, name or hf_config.get("_name_or_path"), dtype, names, tensors, projection_dim=d,
                      image_size=IMAGE_SIZE, patch_size=vision.patch_size, width=vision.width,
                      mlp_dim=vision.mlp_dim, depth=vision.depth, heads=vision.num_heads, mean=IMAGE_MEAN,
                      std=IMAGE_STD)
    w.add_clip_vision_projector_type(PROJECTOR_TYPE)
    w.add_vision_attention_layernorm_eps(vision.norm_eps)
    if vision.pool != DEFAULT_POOL:  # llama.cpp's default otherwise
        w.add_vision_projector_scale_factor(vision.pool)
    for hf_key, (_, published, own) in MEDIA_IDS.items():
        w.add_uint32(own, int(hf_config.get(hf_key, published)))
    w.add_float32(ROPE_KEY, float(vision.rope_theta))
    w.add_uint32(SOFT_KEY, int(hf_config.get("vision_soft_tokens_per_image", DEFAULT_SOFT_TOKENS)))
    w.add_bool(BIDI_KEY, tc.get("use_bidirectional_attention") == "vision")
    for hf_name in names:
        g = gguf_name(tmap, hf_name)
        a = _to_file(hf_name, np.ascontiguousarray(tensors[hf_name], dtype=np.float32))
        if f32 or a.ndim < 2 or g.startswith("v.position_embd."):
            w.add_tensor(g, a)
        else:  # the patch embedding, the blocks' matrices and the projection
            w.add_tensor(g, gguf.quants.quantize(a, q.F16))
    close_writer(w)
    return path


def write(path: str | os.PathLike[str], hf_config: dict[str, Any], tensors: dict[str, np.ndarray],
          tokenizer: Any = None, dtype: str = "f16", chat_template: str | None = None, name: str | None = None,
          mmproj_path: str | os.PathLike[str] | None = None) -> Path:
    """The decoder of a ``gemma4`` config.json and its published tensors as a Gemma 4 text GGUF at ``path``
    (:func:`gemmax.models.gemma4.gguf.write`) and, given ``mmproj_path``, the tower and projection as its
    mmproj there (:func:`write_mmproj`). Returns the text file's path."""
    text = {"model." + n[len(TEXT):]: a for n, a in tensors.items() if n.startswith(TEXT)}
    out = text_gguf.write(path, dict(hf_config["text_config"]), text, tokenizer=tokenizer, dtype=dtype,
                          chat_template=chat_template, name=name)
    if mmproj_path is not None:
        write_mmproj(mmproj_path, hf_config, tensors, dtype=dtype, name=name)
    return out


__all__ = ["PROJECTOR_TYPE", "TEXT_ARCH", "read", "read_mmproj", "write", "write_mmproj"]
