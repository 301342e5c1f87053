"""Gemma 4 with images (``Gemma4ForConditionalGeneration`` with a ``vision_config``, model_type ``gemma4``) as a
registered family, ``gemma4_vision``: the vision tower (:mod:`gemmax.models.gemma4.vit`), a weightless RMS norm
and a projection into the Gemma 4 text decoder (:mod:`gemmax.models.gemma4`), whose layers, cache and decode
step are used as they are. The audio tower of the on-device checkpoints is not run (its weights are skipped).

Inputs, as ``Gemma4Processor`` builds them (:func:`encode_prompt`): each image is ``<|image>`` (begin),
one ``<|image|>`` soft token per pooled patch neighbourhood (their number depends on the image's aspect
ratio: at most ``soft_tokens``, 280 by default), ``<image|>`` (end), where the text had the ``<|image|>``
placeholder (the chat template writes one per image part). The soft-token positions hold the projected
features *unscaled*; text positions the scaled token embeddings. The per-layer embeddings (E2B / E4B) of
a soft token are the pad token's, plus the projection of its image feature, as in transformers.

Attention: with ``bidirectional`` (transformers' ``use_bidirectional_attention="vision"``, the 26B-A4B and
31B configs) an image's soft tokens see each other in both directions on *local* layers only:
``AND(window, OR(causal, same image))``; global layers stay causal. Without it everything is causal.

Extra inputs, with transformers' meanings: ``pixel_values`` ``[n, P, 3 * p * p]`` (patches in [0, 1]) and
``image_position_ids`` ``[n, P, 2]`` (``(x, y)``, -1 on padding) from the processor (:func:`pixel_values`),
one row per image in order of appearance (the soft tokens are filled across the whole batch in reading
order), and ``mm_token_type_ids`` ``[B, T]`` (1 on image soft tokens, 2 on video ones). Without
``mm_token_type_ids`` the soft tokens are found by their id, which is what the processor writes; pass zeros
for an all-causal pass.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemmax.models import gemma3_vision as g3
from gemmax.models import paligemma as pg
from gemmax.models.base import XLA
from gemmax.models.gemma4 import decode as d4
from gemmax.models.gemma4 import hf as h4
from gemmax.models.gemma4 import model as m4
from gemmax.models.gemma4 import vit
from gemmax.models.gemma4.config import GLOBAL, LOCAL, PRESET_HF_REPOS, Gemma4Config
from gemmax.models.gemma4.config import PRESETS as TEXT_PRESETS
from gemmax.models.gemma4.config import from_hf_config as text_from_hf
from gemmax.models.gemma4.config import to_hf_config as text_to_hf
from gemmax.nn.layers import attention_mask, dot_attention, einsum
from gemmax.nn.params import LinearNode, ParamSpec

Array = jax.Array
Params = dict[str, Any]

#: The placeholder a prompt (or Gemma 4's chat template) writes where an image goes: the soft token itself.
IMAGE_PLACEHOLDER = "<|image|>"
#: The soft-token budgets the processor accepts (``max_soft_tokens``).
SOFT_TOKEN_BUDGETS = (70, 140, 280, 560, 1120)


@dataclass(frozen=True)
class Gemma4VisionConfig(pg.TextDelegate):
    """A Gemma 4 decoder config (``text``), a vision tower config (``vision``), the image ids, whether soft
    tokens attend within their image (``bidirectional``), the processor's soft-token budget per image and the
    ids of the other media."""

    text: Gemma4Config
    vision: vit.ViTConfig
    image_token_id: int = 258880
    """``<|image|>``: the positions that take an image's features."""
    boi_token_id: int = 255999
    """``<|image>``, before each image's soft tokens."""
    eoi_token_id: int = 258882
    """``<image|>``, after them."""
    bidirectional: bool = True
    """An image's soft tokens see each other in both directions on local layers (transformers'
    ``use_bidirectional_attention="vision"``, as the 26B-A4B and 31B configs have it); False: causal everywhere."""
    soft_tokens: int = 280
    """The processor's soft-token budget per image (``max_soft_tokens``, one of ``SOFT_TOKEN_BUDGETS``): an
    image is resized to at most ``soft_tokens * pool ** 2`` patches."""
    video_token_id: int = 258884
    audio_token_id: int = 258881
    name: str = ""
    family: str = "gemma4_vision"
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    #: The decoder config's fields the config answers for it (what the layers above read).
    text_fields = pg.TextDelegate.text_fields | {"eos_token_id", "scale_embeddings", "norm_offset", "num_layers",
                                                 "sliding_window"}

    def __post_init__(self) -> None:
        if self.soft_tokens < 1:
            raise ValueError(f"soft_tokens must be positive, got {self.soft_tokens}")

    @property
    def max_patches(self) -> int:
        """Patches per image row of ``pixel_values`` (the processor pads every image to this many)."""
        return self.soft_tokens * self.vision.pool ** 2

    def param_count(self) -> dict[str, int]:
        text = self.text.param_count()
        tower = sum(s.size for p, s in param_specs(self).items() if p.startswith((vit.PREFIX, PROJECTOR + "/")))
        return {**text, "total": text["total"] + tower, "non_embedding": text["non_embedding"] + tower,
                "active": text["active"] + tower, "vision": tower}

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "name": self.name, "image_token_id": self.image_token_id,
                "boi_token_id": self.boi_token_id, "eoi_token_id": self.eoi_token_id,
                "video_token_id": self.video_token_id, "audio_token_id": self.audio_token_id,
                "bidirectional": self.bidirectional, "soft_tokens": self.soft_tokens, "text": self.text.to_dict(),
                "vision": dataclasses.asdict(self.vision)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Gemma4VisionConfig:
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown Gemma 4 vision config fields: {sorted(unknown)}")
        d.pop("extra", None)
        d["text"] = Gemma4Config.from_dict(d["text"])
        d["vision"] = vit.ViTConfig(**d["vision"])
        return cls(**d)


# ---- Hugging Face configs ------------------------------------------------------------------------------------


def accepts_hf(hf: Mapping[str, Any]) -> bool:
    """A multimodal ``gemma4`` config.json with a vision tower (one without loads as the text family)."""
    return hf.get("model_type") == "gemma4" and bool(hf.get("vision_config"))


def from_hf_config(hf: Mapping[str, Any]) -> Gemma4VisionConfig:
    """From a ``gemma4`` config.json (``Gemma4ForConditionalGeneration``) with a ``vision_config``."""
    if not accepts_hf(hf):
        raise ValueError(f"not a Gemma 4 config with a vision tower (model_type {hf.get('model_type')!r}, "
                         f"vision_config {'present' if hf.get('vision_config') else 'absent'})")
    text = text_from_hf(hf)
    tc = hf.get("text_config") or {}
    return Gemma4VisionConfig(
        text=text, vision=vit.from_hf_vision_config(dict(hf["vision_config"])),
        image_token_id=int(hf.get("image_token_id", 258880)), boi_token_id=int(hf.get("boi_token_id", 255999)),
        eoi_token_id=int(hf.get("eoi_token_id", 258882)), video_token_id=int(hf.get("video_token_id", 258884)),
        audio_token_id=int(hf.get("audio_token_id", 258881)),
        bidirectional=tc.get("use_bidirectional_attention") == "vision",
        soft_tokens=int(hf.get("vision_soft_tokens_per_image", 280)), name=text.name)


def to_hf_config(cfg: Gemma4VisionConfig) -> dict[str, Any]:
    """A ``gemma4`` config.json: nested text and vision configs (no audio tower), the image ids at the top."""
    text = text_to_hf(cfg.text)
    text.pop("architectures", None)
    text.pop("torch_dtype", None)
    text["use_bidirectional_attention"] = "vision" if cfg.bidirectional else None
    eos = list(cfg.text.eos_ids)
    return {"model_type": "gemma4", "architectures": ["Gemma4ForConditionalGeneration"], "text_config": text,
            "vision_config": vit.to_hf_vision_config(cfg.vision), "audio_config": None,
            "image_token_id": cfg.image_token_id, "boi_token_id": cfg.boi_token_id, "eoi_token_id": cfg.eoi_token_id,
            "video_token_id": cfg.video_token_id, "audio_token_id": cfg.audio_token_id,
            "vision_soft_tokens_per_image": cfg.soft_tokens, "bos_token_id": cfg.text.bos_token_id,
            "eos_token_id": eos if len(eos) > 1 else eos[0], "pad_token_id": cfg.text.pad_token_id,
            "tie_word_embeddings": True, "torch_dtype": "float32"}


#: The published towers: the on-device models' (E2B, E4B) is transformers' default, 768 wide, with clipped
#: linears; the large models' (26B-A4B, 31B) is 1152 wide and 27 deep like SigLIP So400m, with standardized
#: features. The model card gives about 150M and 550M parameters.
ON_DEVICE_TOWER = vit.ViTConfig(clipped=True)
LARGE_TOWER = vit.ViTConfig(width=1152, depth=27, mlp_dim=4304, num_heads=16, num_kv_heads=16, head_dim=72,
                            standardize=True)


def _preset(text_name: str) -> tuple[str, Gemma4VisionConfig]:
    """``gemma4_vision_<size>[_it]`` over the text preset ``gemma4_<size>[_it]``: the same decoder, the size's
    tower; the large models' image tokens attend within their image (``use_bidirectional_attention="vision"``),
    the on-device models' configs leave it unset (causal)."""
    name = "gemma4_vision_" + text_name.removeprefix("gemma4_")
    text = TEXT_PRESETS[text_name]
    on_device = text.ple_dim > 0
    return name, Gemma4VisionConfig(text=text.replace(name=name), vision=ON_DEVICE_TOWER if on_device else LARGE_TOWER,
                                    bidirectional=not on_device, name=name)


#: Every text preset with its tower, loading the same published (multimodal) checkpoint.
PRESETS: dict[str, Gemma4VisionConfig] = dict(_preset(n) for n in TEXT_PRESETS)
PRESET_REPOS: dict[str, str] = {name: PRESET_HF_REPOS["gemma4_" + name.removeprefix("gemma4_vision_")]
                                for name in PRESETS}


def tiny_config(**overrides: Any) -> Gemma4VisionConfig:
    """A tiny random Gemma 4 with images for tests and examples: the text family's tiny decoder (every
    feature on) under a 2-layer, 32-wide tower with clipped linears and standardized features, 4 px patches
    pooled 2 x 2, 16 soft tokens per image at most. ``overrides`` go to the config (``image_token_id``,
    ``bidirectional``, ``soft_tokens``...) or, prefixed ``text_`` / ``vision_``, to the decoder's / the tower's
    config fields."""
    from gemmax.models.gemma4.config import tiny_config as text_tiny

    text_over, vision_over, own = pg.split_overrides(overrides)
    top: dict[str, Any] = dict(image_token_id=511, boi_token_id=509, eoi_token_id=510, video_token_id=508,
                               audio_token_id=507, soft_tokens=16, name="tiny_gemma4_vision")
    top.update(own)
    tx: dict[str, Any] = {"name": "tiny_gemma4_vision", **text_over}
    vx: dict[str, Any] = dict(width=32, depth=2, mlp_dim=64, num_heads=4, num_kv_heads=2, head_dim=8, patch_size=4,
                              pool=2, position_table=32, clipped=True, standardize=True)
    vx.update(vision_over)
    return Gemma4VisionConfig(text=text_tiny(**tx), vision=vit.ViTConfig(**vx), **top)


# ---- parameters ---------------------------------------------------------------------------------------------

PROJECTOR = "multi_modal_projector"
#: transformers module prefixes of the two layer lists (PEFT's names on ``Gemma4ForConditionalGeneration``).
TEXT_LAYERS = "model.language_model.layers"
VISION_LAYERS = "model.vision_tower.encoder.layers"


def param_specs(cfg: Gemma4VisionConfig) -> dict[str, ParamSpec]:
    """The tower's weights, the projection into the decoder (its norm has no weight) and the decoder's."""
    s = vit.param_specs(cfg.vision)
    s[PROJECTOR + "/input_projection/kernel"] = ParamSpec((cfg.vision.width, cfg.text.hidden_size),
                                                          ("vision_embed", "embed"), fan_in_axis=0)
    s.update(m4.param_specs(cfg.text))
    return s


def init_params(cfg: Gemma4VisionConfig, key: Array, dtype: Any = jnp.float32) -> Params:
    """The decoder as the text family initialises it; the tower and projection from their specs (clip bounds
    open)."""
    return pg.init_with_decoder(cfg, param_specs(cfg), m4.init_params, key, dtype, vit.open_clip_bounds)


def linear_nodes(cfg: Gemma4VisionConfig) -> dict[str, LinearNode]:
    """The decoder's linears under the text family's keys (LoRA's default targets reach the language model
    only) and the tower's under names of their own (``vision_query``...). The projection stays float."""
    nodes = dict(m4.linear_nodes(cfg.text, layers=TEXT_LAYERS))
    nodes.update(vit.linear_nodes(cfg.vision, layers=VISION_LAYERS))
    return nodes


# ---- Hugging Face names ----------------------------------------------------------------------------------

#: Tensors a published checkpoint carries that this family does not run: rotary buffers, the tied head and
#: the on-device models' audio tower and its projection.
HF_IGNORABLE = ("rotary_emb.inv_freq", "lm_head.weight", "audio_tower", "embed_audio")


def hf_unused(cfg: Gemma4VisionConfig) -> tuple[str, ...]:
    """The decoder's skipped tensors (k/v of layers that read shared ones...), under the language model."""
    return tuple("language_model." + n for n in h4.hf_unused(cfg.text))


def hf_table(cfg: Gemma4VisionConfig) -> dict[str, tuple[str | list[str], Any, Any]]:
    """gemmax path -> (published HF name, or one per layer; HF -> gemmax; gemmax -> HF) for every weight:
    ``model.language_model.*``, ``model.vision_tower.*``, ``model.embed_vision.*``."""

    def nest(name: str) -> str:
        return "model.language_model." + name[len("model."):]

    t: dict[str, tuple[str | list[str], Any, Any]] = {}
    for path, (names, f, g) in h4.hf_table(cfg.text).items():
        t[path] = (nest(names) if isinstance(names, str) else [nest(n) for n in names], f, g)
    t.update(vit.hf_table(cfg.vision, "model.vision_tower."))
    t[PROJECTOR + "/input_projection/kernel"] = ("model.embed_vision.embedding_projection.weight",
                                                 lambda w: w.T, lambda w: w.T)
    return t


# ---- the model ----------------------------------------------------------------------------------------------


def image_features(params: Params, cfg: Gemma4VisionConfig, pixel_values: Array, positions: Array,
                   dtype: Any) -> tuple[Array, Array]:
    """Images -> (soft tokens of every pooled slot [n, slots, D] (not scaled), which slots are real [n, slots]):
    the tower's pooled features, a weightless RMS norm and the projection."""
    feats, real = vit.encode(params, cfg.vision, pixel_values, positions, dtype)
    normed = vit.rms_norm(feats, None, cfg.vision.norm_eps)
    proj = einsum("nsw,wd->nsd", normed, params[PROJECTOR]["input_projection"]["kernel"])
    return proj.astype(dtype), real


def _media(cfg: Gemma4VisionConfig, tokens: Array) -> Array:
    return (tokens == cfg.image_token_id) | (tokens == cfg.video_token_id) | (tokens == cfg.audio_token_id)


def embed_inputs(params: Params, cfg: Gemma4VisionConfig, tokens: Array, pixel_values: Array | None,
                 image_position_ids: Array | None) -> tuple[Array, Array | None]:
    """(input embeddings [B, T, D], per-layer inputs or None): media tokens embed as the pad token (as
    transformers looks them up), then the image soft-token positions take the real pooled features in reading
    order over the whole batch; the per-layer inputs see the pad token's row and these embeddings."""
    tokens = jnp.asarray(tokens, jnp.int32)
    text_ids = jnp.where(_media(cfg, tokens), cfg.text.pad_token_id, tokens)
    x = m4.embed(params, cfg.text, text_ids)
    if pixel_values is not None:
        if image_position_ids is None:
            raise ValueError("pixel_values need their image_position_ids (the processor gives both)")
        feats, real = image_features(params, cfg, pixel_values, image_position_ids, x.dtype)
        flat, ok = feats.reshape(-1, feats.shape[-1]), real.reshape(-1)
        # the r-th real slot's row: scatter each real slot's index to its rank
        rank = jnp.cumsum(ok) - 1
        order = jnp.zeros(flat.shape[0], jnp.int32).at[jnp.where(ok, rank, flat.shape[0])].set(
            jnp.arange(flat.shape[0], dtype=jnp.int32), mode="drop")
        is_img = tokens == cfg.image_token_id
        nth = jnp.clip(jnp.cumsum(is_img.reshape(-1)) - 1, 0, flat.shape[0] - 1).reshape(tokens.shape)
        x = jnp.where(is_img[..., None], jnp.take(flat, jnp.take(order, nth), axis=0), x)
    return x, m4.per_layer_inputs(params, cfg.text, text_ids, x)


def image_blocks(cfg: Gemma4VisionConfig, types: Array) -> Array:
    """Block id of every position [B, T] from ``mm_token_type_ids`` (1 image, 2 video: each run is one block),
    -1 elsewhere; all -1 when the model attends causally everywhere."""
    if not cfg.bidirectional:
        return jnp.full(types.shape, -1, jnp.int32)
    return g3.image_blocks(jnp.where((types == 1) | (types == 2), 1, 0))


def block_mask(cfg: Gemma4VisionConfig, ltype: str, idx: Array, blocks: Array, seg: Array | None = None,
               k_valid: Array | None = None) -> Array:
    """[B, T, T] of one layer type: global layers causal, local ones ``AND(window, OR(causal, same block))``."""
    if ltype == GLOBAL:
        m = attention_mask(idx, idx, None, seg, seg)
        return m if k_valid is None else m & k_valid[:, None, :]
    return g3.image_block_mask(idx, idx, blocks, blocks, cfg.text.sliding_window, seg, seg, k_valid)


def _types(cfg: Gemma4VisionConfig, tokens: Array, mm_token_type_ids: Any, b: int, t: int) -> Array:
    """``mm_token_type_ids`` as int [b, t]: the given ones (padded with 0 past their end) or, without them, 1
    wherever the token is the image soft token (what ``Gemma4Processor`` writes)."""
    return g3.soft_token_types(tokens, cfg.image_token_id, mm_token_type_ids, b, t, "mm_token_type_ids")


def forward_hidden(params: Params, cfg: Gemma4VisionConfig, tokens: Array, positions: Array | None = None,
                   segment_ids: Array | None = None, remat: str | None = None, pixel_values: Array | None = None,
                   image_position_ids: Array | None = None, mm_token_type_ids: Array | None = None) -> Array:
    """Final-normed hidden states [B, T, D], as ``Gemma4ForConditionalGeneration``'s language model (see the
    module docstring for the inputs); ``segment_ids`` keep packed documents apart."""
    tokens = jnp.asarray(tokens, jnp.int32)
    x, ple = embed_inputs(params, cfg, tokens, pixel_values, image_position_ids)
    b, t = tokens.shape
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    positions = idx if positions is None else jnp.asarray(positions, jnp.int32)
    seg = None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    blocks = image_blocks(cfg, _types(cfg, tokens, mm_token_type_ids, b, t))
    masks = {lt: block_mask(cfg, lt, idx, blocks, seg) for lt in (LOCAL, GLOBAL)}

    def make_attend(ltype: str) -> m4.AttendFn:
        return lambda q, k, v: dot_attention(q, k, v, masks[ltype])

    x, _, _ = m4.run_layers(params, cfg.text, x, positions, ple, make_attend, remat)
    return m4.norm(x, params["final_normalization"]["scale"], cfg.text.norm_eps)


def logits_from_hidden(params: Params, cfg: Gemma4VisionConfig, hidden: Array) -> Array:
    return m4.logits_from_hidden(params, cfg.text, hidden)


def forward(params: Params, cfg: Gemma4VisionConfig, tokens: Array, pixel_values: Array | None = None,
            image_position_ids: Array | None = None, mm_token_type_ids: Array | None = None) -> Array:
    """Float32 logits [B, T, V] (see :func:`forward_hidden`)."""
    h = forward_hidden(params, cfg, tokens, pixel_values=pixel_values, image_position_ids=image_position_ids,
                       mm_token_type_ids=mm_token_type_ids)
    return logits_from_hidden(params, cfg, h)


# ---- generation: the prompt with its image blocks into the text family's cache, its decode step -------------


def init_cache(cfg: Gemma4VisionConfig, batch: int, max_len: int, dtype: Any) -> dict[str, Array]:
    return d4.init_cache(cfg.text, batch, max_len, dtype)


#: Prompt caches go into the engine's cache rows as the text family's (the cache is its).
insert = d4.insert


def decode_step(params: Params, cfg: Gemma4VisionConfig, cache: dict, tokens: Array, pos: Array,
                backend: str = XLA) -> tuple[Array, dict]:
    """After the prompt everything is causal text: the text family's step."""
    return d4.decode_step(params, cfg.text, cache, tokens, pos, backend)


def prefill(params: Params, cfg: Gemma4VisionConfig, tokens: Array, lengths: Array, max_len: int,
            backend: str = XLA, pixel_values: Array | None = None, image_position_ids: Array | None = None,
            mm_token_type_ids: Array | None = None) -> tuple[Array, dict]:
    """Prompts [b, T] (right-padded, true lengths [b]) -> (float32 logits [b, V] at each row's last token,
    per-row caches in the text family's layout). Soft tokens attend within their image on local layers;
    positions past a row's length are no block and masked as keys."""
    del backend
    tokens = jnp.asarray(tokens, jnp.int32)
    lengths = jnp.asarray(lengths, jnp.int32)
    b, t = tokens.shape
    valid = jnp.arange(t)[None] < lengths[:, None]
    types = jnp.where(valid, _types(cfg, tokens, mm_token_type_ids, b, t), 0)
    blocks = image_blocks(cfg, types)
    x, ple = embed_inputs(params, cfg, tokens, pixel_values, image_position_ids)

    def prompt_mask(ltype: str, idx: Array, valid: Array) -> Array:
        seg = valid.astype(jnp.int32)
        return block_mask(cfg, ltype, idx, blocks, seg, valid)

    return d4.prefill_embedded(params, cfg.text, x, ple, lengths, max_len, prompt_mask)


# ---- images and prompts --------------------------------------------------------------------------------------


def resized_size(height: int, width: int, patch: int, max_patches: int, pool: int) -> tuple[int, int]:
    """The processor's aspect-preserving target size: the largest multiple of ``pool * patch`` on each side
    that keeps the area within ``max_patches`` patches (a side that rounds to zero takes one unit and the
    other side follows the aspect ratio, capped at the budget)."""
    unit = pool * patch
    factor = math.sqrt(max_patches * patch * patch / (height * width))
    th, tw = int(math.floor(factor * height / unit)) * unit, int(math.floor(factor * width / unit)) * unit
    if th == 0 and tw == 0:
        raise ValueError(f"a {height}x{width} image cannot be resized to whole {unit}-pixel units")
    longest = (max_patches // pool ** 2) * unit
    if th == 0:
        th, tw = unit, min(int(math.floor(width / height)) * unit, longest)
    elif tw == 0:
        tw, th = unit, min(int(math.floor(height / width)) * unit, longest)
    return th, tw


def preprocess_image(image: Any, cfg: Gemma4VisionConfig, soft_tokens: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray, int]:
    """PIL image / array -> (patches [max_patches, 3 p^2] float32 in [0, 1], their positions [max_patches, 2]
    (-1 on padding), soft tokens), as ``Gemma4ImageProcessor``: RGB, bicubic aspect-preserving resize to whole
    ``pool * patch`` units within the budget, ``x / 255``, patches in (row, column, channel) order."""
    from PIL import Image

    budget = soft_tokens or cfg.soft_tokens
    p, k = cfg.vision.patch_size, cfg.vision.pool
    max_patches = budget * k * k
    img = g3._as_pil(image)
    th, tw = resized_size(img.height, img.width, p, max_patches, k)
    if (th, tw) != (img.height, img.width):
        img = img.resize((tw, th), Image.Resampling.BICUBIC, reducing_gap=None)
    x = np.asarray(img, np.float32) / 255.0  # [H, W, 3]
    gh, gw = th // p, tw // p
    patches = x.reshape(gh, p, gw, p, 3).transpose(0, 2, 1, 3, 4).reshape(gh * gw, 3 * p * p)
    gx, gy = np.meshgrid(np.arange(gw), np.arange(gh), indexing="xy")
    pos = np.stack([gx, gy], -1).reshape(-1, 2)
    out = np.zeros((max_patches, 3 * p * p), np.float32)
    out_pos = np.full((max_patches, 2), -1, np.int64)
    out[:len(patches)], out_pos[:len(pos)] = patches, pos
    return out, out_pos, len(patches) // (k * k)


def pixel_values(cfg: Gemma4VisionConfig, images: Any, soft_tokens: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """One image or a list (PIL / arrays) -> (``pixel_values`` [n, P, 3 p^2], ``image_position_ids`` [n, P, 2],
    soft tokens of each image)."""
    if not isinstance(images, list | tuple):
        images = [images]
    rows = [preprocess_image(im, cfg, soft_tokens) for im in images]
    return (np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]), [r[2] for r in rows])


def encode_prompt(cfg: Gemma4VisionConfig, tokenizer: Any, prompt: str, images: Any, add_bos: bool = True,
                  soft_tokens: int | None = None) -> tuple[list[int], dict[str, np.ndarray]]:
    """One request as the engine takes it (``Family.encode_prompt``): (ids, ``{"pixel_values",
    "image_position_ids", "mm_token_type_ids"}``) as ``Gemma4Processor`` builds them.

    Each ``<|image|>`` in ``prompt`` (one per image; the chat template writes them) becomes ``<|image>``,
    the image's soft tokens and ``<image|>``; a prompt without any gets its images in front of the text,
    separated by spaces. Text between images is tokenized piece by piece, ``<bos>`` first unless ``add_bos`` is
    False. ``soft_tokens``: the per-image budget (default the config's; the processor takes 70, 140, 280, 560
    or 1120)."""
    px, pos, counts = pixel_values(cfg, images, soft_tokens)
    pieces = prompt.split(IMAGE_PLACEHOLDER)
    if len(pieces) == 1:
        pieces = [""] + [" "] * (len(counts) - 1) + pieces  # no placeholder: the images go first
    if len(pieces) - 1 != len(counts):
        raise ValueError(f"the prompt has {len(pieces) - 1} {IMAGE_PLACEHOLDER} placeholders for {len(counts)} "
                         "images")
    ids: list[int] = g3._text_ids(tokenizer, pieces[0])
    for n, text in zip(counts, pieces[1:], strict=True):
        ids += [cfg.boi_token_id] + [cfg.image_token_id] * n + [cfg.eoi_token_id] + g3._text_ids(tokenizer, text)
    bos = cfg.text.bos_token_id
    if add_bos and (not ids or ids[0] != bos):
        ids.insert(0, bos)
    types = (np.asarray(ids) == cfg.image_token_id).astype(np.int32)
    return ids, {"pixel_values": px, "image_position_ids": pos, "mm_token_type_ids": types}


def check_inputs(cfg: Gemma4VisionConfig, ids: Any, inputs: Mapping[str, Any]) -> None:
    """``Family.check_inputs``: images need their positions, in the tower's shapes, and must fill the ids' soft
    tokens exactly (inside the compiled model a mismatch would silently reuse or drop features);
    ``mm_token_type_ids`` must not be longer than the ids."""
    ids = np.asarray(ids)
    px, pos = inputs.get("pixel_values"), inputs.get("image_position_ids")
    if (px is None) != (pos is None):
        raise ValueError("pixel_values and image_position_ids go together (the processor gives both)")
    if px is not None:
        n, P, c = np.shape(px)
        k2 = cfg.vision.pool ** 2
        if c != cfg.vision.patch_pixels or P % k2:
            raise ValueError(f"pixel_values must be [images, patches, {cfg.vision.patch_pixels}] (3 x "
                             f"{cfg.vision.patch_size}^2 pixels a patch) with patches a multiple of {k2}, got "
                             f"{tuple(np.shape(px))}")
        if np.shape(pos) != (n, P, 2):
            raise ValueError(f"image_position_ids must be [{n}, {P}, 2], got {tuple(np.shape(pos))}")
        fill = sum(vit.soft_token_counts(cfg.vision, np.asarray(pos)))
        soft = int((ids == cfg.image_token_id).sum())
        if soft != fill:
            raise ValueError(f"the ids hold {soft} image soft tokens (id {cfg.image_token_id}) but the {n} image(s) "
                             f"fill {fill}")
    tt = inputs.get("mm_token_type_ids")
    if tt is not None and np.shape(tt)[-1] > ids.shape[-1]:
        raise ValueError(f"mm_token_type_ids has {np.shape(tt)[-1]} entries, the ids {ids.shape[-1]}")
