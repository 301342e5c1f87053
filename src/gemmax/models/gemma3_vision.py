"""Gemma 3 with images (``Gemma3ForConditionalGeneration``, model_type ``gemma3``) as a registered
:class:`~gemmax.models.base.Family`: a SigLIP tower, 4x4 average pooling to 256 soft tokens per image, an
RMSNorm and a projection into the Gemma 3 decoder.

Inputs, as transformers' ``Gemma3Processor`` builds them (:func:`encode_prompt`): every image of a prompt is
``"\\n\\n" <start_of_image> <image_soft_token> * 256 <end_of_image> "\\n\\n"`` where the text had a
``<start_of_image>`` placeholder (the chat template writes one per image part). The soft-token positions
hold the pooled, normed and projected SigLIP features *unscaled*; text positions the token embeddings scaled
by sqrt(d), as in the text model. RoPE positions are 0-based, as in Gemma 3 text.

Attention is the Gemma 3 text model's (sliding windows on local layers, global layers in between) with one
change: the soft tokens of ONE image attend to each other in both directions (transformers' block mask over
``token_type_ids``: each run of 1s is a block; two images never see each other's later tokens). On local
layers the window still applies: ``AND(window, OR(causal, same block))``, so a token sees later tokens of its
own image block and earlier ones only within the window.

Extra inputs, with transformers' meanings: ``pixel_values`` ``[n_images, 3, S, S]`` already preprocessed
(:func:`preprocess_image`: bilinear resize to S, ``(x / 255 - 0.5) / 0.5``), one row per image in order of
appearance (the soft tokens are filled across the whole batch in reading order), and ``token_type_ids``
``[B, T]`` (1 on soft tokens). Without ``token_type_ids`` the soft tokens are found by their id, which is
what the processor writes; pass zeros for an all-causal pass.

The decoder is :func:`gemmax.models.gemma.model.decoder_layer` over the Gemma family's parameter paths, the
tower :mod:`gemmax.models.siglip` (PaliGemma's), so layout rules, LoRA and quantization nodes, the cache and
the decode step are the Gemma family's. Generation prefills the prompt with the image-block mask into the
Gemma family's cache and then decodes with its ``decode_step`` (after the prompt everything is causal text).

llama.cpp keeps this model as two files, a ``gemma3`` text GGUF and an "mmproj" with the tower and projector;
:mod:`gemmax.models.gemma3_vision_gguf` reads and writes the pair (the family's ``gguf``).
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

from gemmax.models import gemma3_vision_gguf as gguf
from gemmax.models import paligemma as pg
from gemmax.models import siglip as vision
from gemmax.models.base import XLA, GGUFSpec, KerasSpec
from gemmax.models.gemma import keras as gemma_keras
from gemmax.models.gemma import model as gm
from gemmax.models.gemma.config import ModelConfig
from gemmax.models.gemma.config import from_hf_config as text_from_hf
from gemmax.models.gemma.config import to_hf_config as text_to_hf
from gemmax.models.paligemma import (  # noqa: F401  (this family's functions too, found by family_from)
    decode_step,
    init_cache,
    insert,
    logits_from_hidden,
)
from gemmax.nn.layers import rms_norm
from gemmax.nn.params import LinearNode, ParamSpec

Array = jax.Array
Params = dict[str, Any]

#: The placeholder a prompt (or the chat template) writes where an image goes.
IMAGE_PLACEHOLDER = "<start_of_image>"


@dataclass(frozen=True)
class Gemma3VisionConfig(pg.TextDelegate):
    """A Gemma 3 decoder config (``text``), a SigLIP tower config (``vision``), the soft tokens per image and
    the three image ids. The fields every family's config exposes (vocabulary, special ids, context)
    delegate to the decoder."""

    text: ModelConfig
    vision: vision.SigLIPConfig
    tokens_per_image: int = 256
    image_token_id: int = 262144
    """``<image_soft_token>``: the positions that take an image's features (transformers' ``image_token_index``)."""
    boi_token_id: int = 255999
    """``<start_of_image>``, before each image's soft tokens."""
    eoi_token_id: int = 256000
    """``<end_of_image>``, after them."""
    name: str = ""
    family: str = "gemma3_vision"
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        side = math.isqrt(self.tokens_per_image)
        if side * side != self.tokens_per_image or side == 0 or self.vision.grid % side:
            raise ValueError(f"tokens_per_image ({self.tokens_per_image}) must be a square whose side divides "
                             f"the tower's {self.vision.grid}x{self.vision.grid} patch grid")

    @property
    def pool(self) -> int:
        """Side of the average-pooling window over the patch grid (4 for 896 px, patch 14, 256 tokens)."""
        return self.vision.grid // math.isqrt(self.tokens_per_image)

    @property
    def num_image_tokens(self) -> int:
        return self.tokens_per_image

    def param_count(self) -> dict[str, int]:
        return pg.tied_param_count(param_specs(self), self.text)

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "name": self.name, "tokens_per_image": self.tokens_per_image,
                "image_token_id": self.image_token_id, "boi_token_id": self.boi_token_id,
                "eoi_token_id": self.eoi_token_id, "text": self.text.to_dict(),
                "vision": dataclasses.asdict(self.vision)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Gemma3VisionConfig:
        d = dict(d)
        known = {"family", "name", "tokens_per_image", "image_token_id", "boi_token_id", "eoi_token_id", "text",
                 "vision", "extra"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown Gemma 3 vision config fields: {sorted(unknown)}")
        return cls(text=ModelConfig.from_dict(d["text"]), vision=vision.SigLIPConfig(**d["vision"]),
                   tokens_per_image=int(d.get("tokens_per_image", 256)),
                   image_token_id=int(d.get("image_token_id", 262144)),
                   boi_token_id=int(d.get("boi_token_id", 255999)), eoi_token_id=int(d.get("eoi_token_id", 256000)),
                   name=d.get("name", ""), family=d.get("family", "gemma3_vision"))


# ---- Hugging Face configs and presets ---------------------------------------------------------------------

#: transformers' ``Gemma3TextConfig`` defaults, for the keys the published configs leave out (their
#: ``text_config`` names only what differs: e.g. 4B gives hidden size, layers, MLP width, window, rope scaling).
TEXT_DEFAULTS: dict[str, Any] = dict(
    model_type="gemma3_text", vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh",
    max_position_embeddings=131072, rms_norm_eps=1e-6, query_pre_attn_scalar=256, sliding_window=4096,
    rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, bos_token_id=2, pad_token_id=0,
    tie_word_embeddings=True)
#: The published checkpoints' tower: SigLIP So400m/14 at 896 px (64 x 64 patches, pooled 4 x 4 to 256 tokens).
VISION_DEFAULTS: dict[str, Any] = dict(image_size=896, patch_size=14, hidden_size=1152, intermediate_size=4304,
                                       num_hidden_layers=27, num_attention_heads=16, layer_norm_eps=1e-6)


def from_hf_config(hf: Mapping[str, Any]) -> Gemma3VisionConfig:
    """From a ``gemma3`` config.json (``Gemma3ForConditionalGeneration``); keys it leaves out take
    transformers' defaults (text) and the published tower's (vision)."""
    if hf.get("model_type") != "gemma3":
        raise ValueError(f"not a Gemma 3 multimodal config (model_type {hf.get('model_type')!r})")
    tc = dict(TEXT_DEFAULTS, **(hf.get("text_config") or {}))
    tc["model_type"] = "gemma3_text"
    if "eos_token_id" not in (hf.get("text_config") or {}):
        tc["eos_token_id"] = hf.get("eos_token_id", 1)  # the published -it configs give it at the top
    if "rope_scaling" in tc and tc.get("rope_scaling") is None:
        tc.pop("rope_scaling")
    vc = dict(VISION_DEFAULTS, **(hf.get("vision_config") or {}))
    name = hf.get("_name_or_path", "") or ""
    return Gemma3VisionConfig(
        text=text_from_hf(tc).replace(name=name), vision=vision.from_hf_vision_config(vc),
        tokens_per_image=int(hf.get("mm_tokens_per_image", 256)),
        image_token_id=int(hf.get("image_token_index", hf.get("image_token_id", 262144))),
        boi_token_id=int(hf.get("boi_token_index", hf.get("boi_token_id", 255999))),
        eoi_token_id=int(hf.get("eoi_token_index", hf.get("eoi_token_id", 256000))), name=name)


def to_hf_config(cfg: Gemma3VisionConfig) -> dict[str, Any]:
    """The published checkpoints' ``config.json``: nested text and vision configs, the image ids at the top."""
    text = text_to_hf(cfg.text)
    text.pop("architectures", None)
    vc = vision.to_hf_vision_config(cfg.vision)
    eos = list(cfg.text.eos_ids)
    return {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"], "text_config": text,
            "vision_config": vc, "mm_tokens_per_image": cfg.tokens_per_image,
            "image_token_index": cfg.image_token_id, "boi_token_index": cfg.boi_token_id,
            "eoi_token_index": cfg.eoi_token_id, "bos_token_id": cfg.text.bos_token_id,
            "eos_token_id": eos if len(eos) > 1 else eos[0], "pad_token_id": cfg.text.pad_token_id,
            "tie_word_embeddings": True, "initializer_range": 0.02}


#: Published text shapes (the rest is ``TEXT_DEFAULTS``): Gemma 3 4B, 12B, 27B.
_TEXT_SHAPES = {size: pg.decoder_shape(f"gemma3_{size}") for size in ("4b", "12b", "27b")}


def _preset(name: str, shape: dict[str, Any]) -> Gemma3VisionConfig:
    hf = {"model_type": "gemma3", "eos_token_id": [1, 106],
          "text_config": dict(shape, sliding_window=1024, rope_scaling={"rope_type": "linear", "factor": 8.0})}
    c = from_hf_config(hf)
    return c.replace(name=name, text=c.text.replace(name=name))


PRESETS: dict[str, Gemma3VisionConfig] = {}
PRESET_REPOS: dict[str, str] = {}
for _size, _shape in _TEXT_SHAPES.items():
    for _kind, _prefix in (("pt", "gemma3_vision"), ("it", "gemma3_vision_instruct")):
        PRESETS[f"{_prefix}_{_size}"] = _preset(f"{_prefix}_{_size}", _shape)
        PRESET_REPOS[f"{_prefix}_{_size}"] = f"google/gemma-3-{_size}-{_kind}"


def tiny_config(**overrides: Any) -> Gemma3VisionConfig:
    """A tiny random Gemma 3 with images for tests and examples: 3 decoder layers (two local with window 8,
    one global), 28 px images of 4 x 4 patches pooled 2 x 2 to 4 soft tokens. ``overrides`` go to the config
    (``tokens_per_image``, ``image_token_id``, ``boi_token_id``, ``eoi_token_id``, ``name``) or, prefixed
    ``text_`` / ``vision_``, to the decoder's / the tower's config.json keys."""
    tc = dict(vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=12, query_pre_attn_scalar=12, sliding_window=8,
              layer_types=["sliding_attention", "sliding_attention", "full_attention"],
              rope_scaling={"rope_type": "linear", "factor": 8.0}, max_position_embeddings=512, eos_token_id=[1, 5])
    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
              patch_size=7)
    top: dict[str, Any] = {"mm_tokens_per_image": 4, "image_token_index": 299, "boi_token_index": 297,
                           "eoi_token_index": 298}
    rename = {"tokens_per_image": "mm_tokens_per_image", "image_token_id": "image_token_index",
              "boi_token_id": "boi_token_index", "eoi_token_id": "eoi_token_index"}
    text_over, vision_over, own = pg.split_overrides(overrides)
    tc.update(text_over)
    vc.update(vision_over)
    name = own.pop("name", "tiny_gemma3_vision")
    top.update({rename.get(k, k): v for k, v in own.items()})
    cfg = from_hf_config({"model_type": "gemma3", "text_config": tc, "vision_config": vc, **top})
    return cfg.replace(name=name, text=cfg.text.replace(name=name))


# ---- parameters ---------------------------------------------------------------------------------------------

PROJECTOR = "multi_modal_projector"


def param_specs(cfg: Gemma3VisionConfig) -> dict[str, ParamSpec]:
    """The tower's weights (SigLIP), the projector (soft-embedding RMSNorm, zero-centred as Gemma's, and the
    input projection) and the decoder's (Gemma family), with logical axes."""
    s = vision.param_specs(cfg.vision)
    w, d = cfg.vision.width, cfg.text.hidden_size
    s[PROJECTOR + "/soft_embedding_norm/scale"] = ParamSpec((w,), ("vision_embed",), "zeros")
    s[PROJECTOR + "/input_projection/kernel"] = ParamSpec((w, d), ("vision_embed", "embed"), fan_in_axis=0)
    s.update(gm.param_specs(cfg.text))
    return s


def init_params(cfg: Gemma3VisionConfig, key: Array, dtype: Any = jnp.float32) -> Params:
    """The decoder as the Gemma family initialises it; the tower and projector from their specs."""
    return pg.init_with_decoder(cfg, param_specs(cfg), gm.init_params, key, dtype)


#: transformers (5) module prefixes of the two layer lists, as PEFT names adapters on
#: ``Gemma3ForConditionalGeneration`` (``base_model.model.model.language_model.layers.{i}.self_attn.q_proj``).
TEXT_LAYERS = "model.language_model.layers"
VISION_LAYERS = "model.vision_tower.vision_model.encoder.layers"


def linear_nodes(cfg: Gemma3VisionConfig) -> dict[str, LinearNode]:
    """The decoder's linears under their Gemma names (LoRA's default targets reach the language model only)
    and the tower's under names of their own (``vision_query``..., quantizable, trained only when named).
    The projector stays float (one small matrix, read once per image)."""
    nodes = dict(gm.linear_nodes(cfg.text, layers=TEXT_LAYERS))
    nodes.update(vision.linear_nodes(cfg.vision, layers=VISION_LAYERS))
    return nodes


# ---- Hugging Face names ----------------------------------------------------------------------------------

#: The published repos (google/gemma-3-*-pt/-it) nest the decoder under ``language_model.model.``, the tower
#: under ``vision_tower.vision_model.`` and have no ``lm_head`` (tied); transformers 5 saves
#: ``vision_tower.`` without ``vision_model.`` and names its modules ``model.language_model.`` etc.: the same
#: aliases as PaliGemma's, whose checkpoints are laid out alike.
HF_ALIASES = pg.HF_ALIASES
HF_IGNORABLE = pg.HF_IGNORABLE


def hf_table(cfg: Gemma3VisionConfig) -> dict[str, tuple[str | list[str], Any, Any]]:
    """gemmax path -> (published HF name, or one per layer; HF -> gemmax; gemmax -> HF) for every weight."""
    t = pg.decoder_and_tower_hf_table(cfg)
    ident = (lambda w: w, lambda w: w)
    # transformers keeps the projection as a [vision width, text width] parameter used as x @ W: no transpose
    t[PROJECTOR + "/input_projection/kernel"] = ("multi_modal_projector.mm_input_projection_weight", *ident)
    t[PROJECTOR + "/soft_embedding_norm/scale"] = ("multi_modal_projector.mm_soft_emb_norm.weight", *ident)
    return t


# ---- the model ----------------------------------------------------------------------------------------------


def image_features(params: Params, cfg: Gemma3VisionConfig, pixel_values: Array, dtype: Any) -> Array:
    """``pixel_values`` [n, 3, S, S] -> soft tokens [n, tokens_per_image, D] (not scaled): SigLIP features of
    the patch grid, averaged over ``pool`` x ``pool`` windows (row-major, as ``AvgPool2d`` over the grid),
    RMSNorm (1 + w, the tower's eps) and the input projection."""
    feats = vision.encode(params, cfg.vision, pixel_values, dtype)  # [n, g*g, W]
    n, _, w = feats.shape
    g, k = cfg.vision.grid, cfg.pool
    t = g // k
    pooled = feats.astype(jnp.float32).reshape(n, t, k, t, k, w).mean(axis=(2, 4)).reshape(n, t * t, w)
    proj = params[PROJECTOR]
    normed = rms_norm(pooled.astype(dtype), proj["soft_embedding_norm"]["scale"], cfg.vision.norm_eps, 1.0)
    return (normed @ proj["input_projection"]["kernel"].astype(dtype)).astype(dtype)


def embed_inputs(params: Params, cfg: Gemma3VisionConfig, tokens: Array, pixel_values: Array | None) -> Array:
    """Token embeddings (scaled by sqrt(d)) with the soft-token positions replaced by the images' features
    (not scaled), as :func:`gemmax.models.paligemma.embed_with_features`."""
    return pg.embed_with_features(params, cfg, tokens, pixel_values, image_features)


def image_blocks(types: Array) -> Array:
    """Block id of every position [B, T] from ``token_type_ids`` (1 = image soft token): each run of 1s is one
    block (0, 1, ... in order), text is -1. Two images next to each other without a token between them would
    merge, as in transformers; the processor always puts ``<end_of_image>`` and text between them."""
    is_img = types == 1
    prev = jnp.pad(is_img, ((0, 0), (1, 0)))[:, :-1]
    ids = jnp.cumsum(is_img & ~prev, axis=1) - 1
    return jnp.where(is_img, ids, -1)


def image_block_mask(q_idx: Array, k_idx: Array, q_block: Array, k_block: Array, window: Array | int | None,
                     q_seg: Array | None = None, k_seg: Array | None = None, k_valid: Array | None = None) -> Array:
    """[B, T, S]: (causal OR both in the same image block) AND inside the sliding window, inside the same
    packed segment and over valid keys. The window bounds only how far back a key may be (``k > q - W``), as
    transformers' sliding overlay, so a soft token sees its block's later tokens on local layers too."""
    q, k = q_idx[:, :, None], k_idx[:, None, :]
    same = (q_block[:, :, None] == k_block[:, None, :]) & (q_block[:, :, None] >= 0)
    m = (k <= q) | same
    if window is not None:
        m = m & (k > q - window)
    if q_seg is not None and k_seg is not None:
        m = m & (q_seg[:, :, None] == k_seg[:, None, :])
    if k_valid is not None:
        m = m & k_valid[:, None, :]
    return m


def soft_token_types(tokens: Array, image_token_id: int, type_ids: Any, b: int, t: int,
                     name: str = "token_type_ids") -> Array:
    """Type ids ``name`` as int [b, t]: the given ones (padded with 0 past their end) or, without them, 1
    wherever the token is the image soft token (what the processors of Gemma 3 and Gemma 4 write)."""
    if type_ids is None:
        return (tokens == image_token_id).astype(jnp.int32)
    return pg.pad_type_ids(type_ids, b, t, 0, name)


def forward_hidden(params: Params, cfg: Gemma3VisionConfig, tokens: Array, positions: Array | None = None,
                   segment_ids: Array | None = None, remat: str | None = None, pixel_values: Array | None = None,
                   token_type_ids: Array | None = None) -> Array:
    """Final-normed hidden states [B, T, D], as ``Gemma3ForConditionalGeneration``'s language model.

    ``positions`` default to 0..T-1; ``segment_ids`` keep packed documents apart; ``remat`` as the Gemma
    family's. See the module docstring for ``pixel_values`` / ``token_type_ids``.
    """
    tc = cfg.text
    tokens = jnp.asarray(tokens, jnp.int32)
    x = embed_inputs(params, cfg, tokens, pixel_values)
    b, t = x.shape[:2]
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    positions = idx if positions is None else jnp.asarray(positions, jnp.int32)
    blocks = image_blocks(soft_token_types(tokens, cfg.image_token_id, token_type_ids, b, t))
    seg = None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    return pg.decoder_hidden(params, tc, x, positions,
                             lambda window: image_block_mask(idx, idx, blocks, blocks, window, seg, seg), remat)


def forward(params: Params, cfg: Gemma3VisionConfig, tokens: Array, pixel_values: Array | None = None,
            token_type_ids: Array | None = None, positions: Array | None = None) -> Array:
    """Float32 logits [B, T, V] (see :func:`forward_hidden`)."""
    h = forward_hidden(params, cfg, tokens, positions, pixel_values=pixel_values, token_type_ids=token_type_ids)
    return logits_from_hidden(params, cfg, h)


# ---- generation: image-block prefill into the Gemma family's cache, Gemma's decode step ---------------------
# The head, cache, insert and decode step are PaliGemma's (imported above): both families put the Gemma
# decoder (``cfg.text``) behind a SigLIP tower, and after the prompt everything is causal text.


def prefill(params: Params, cfg: Gemma3VisionConfig, tokens: Array, lengths: Array, max_len: int,
            backend: str = XLA, pixel_values: Array | None = None,
            token_type_ids: Array | None = None) -> tuple[Array, dict]:
    """Prompts [b, T] (right-padded, true lengths [b]) -> (float32 logits [b, V] at each row's last real token,
    per-row caches in the Gemma family's layout for ``insert``).

    Each image's soft tokens attend to their whole block (:func:`image_block_mask`); positions past a row's
    length are no block and masked as keys. Runs XLA for either ``backend`` (the decode step takes the
    native CPU kernels).
    """
    del backend
    tokens, lengths, idx, valid = pg.prompt_rows(tokens, lengths)
    types = jnp.where(valid, soft_token_types(tokens, cfg.image_token_id, token_type_ids, *tokens.shape), 0)
    blocks = image_blocks(types)
    x = embed_inputs(params, cfg, tokens, pixel_values)
    return pg.decoder_prefill(params, cfg.text, x, lengths, max_len,
                              lambda window: image_block_mask(idx, idx, blocks, blocks, window, k_valid=valid))


# ---- images and prompts --------------------------------------------------------------------------------------


def _as_pil(image: Any) -> Any:
    """A PIL image, or an [H, W(, C)] array (uint8, or floats in [0, 1]), as an RGB PIL image."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).round().astype(np.uint8)
    return Image.fromarray(arr).convert("RGB")


def preprocess_image(image: Any, size: int = 896) -> np.ndarray:
    """PIL image / array -> float32 ``[3, size, size]`` (one row of ``pixel_values``), as
    ``Gemma3ImageProcessor``: RGB, bilinear resize to a square, ``(x / 255 - 0.5) / 0.5``."""
    from PIL import Image

    img = _as_pil(image).resize((size, size), Image.Resampling.BILINEAR)
    x = np.asarray(img, np.float32) / 255.0
    return ((x - 0.5) / 0.5).transpose(2, 0, 1)


def pan_and_scan(image: Any, min_crop_size: int = 256, max_crops: int = 4, min_ratio: float = 1.2) -> list[Any]:
    """The crops ``Gemma3ImageProcessor``'s pan-and-scan adds for an elongated image (none for one whose
    aspect ratio is under ``min_ratio``): 2 to ``max_crops`` equal tiles along the long side, about as many as
    the ratio, each at least ``min_crop_size`` pixels."""
    img = _as_pil(image)
    w, h = img.size
    long, short = (w, h) if w >= h else (h, w)
    if long / short < min_ratio:
        return []
    n = min(int(math.floor(long / short + 0.5)), int(math.floor(long / min_crop_size)))
    n = min(max_crops, max(2, n))
    nw, nh = (n, 1) if w >= h else (1, n)
    cw, ch = int(math.ceil(w / nw)), int(math.ceil(h / nh))
    if min(cw, ch) < min_crop_size:
        return []
    return [img.crop((x, y, min(x + cw, w), min(y + ch, h)))
            for y in range(0, ch * nh, ch) for x in range(0, cw * nw, cw)]


def pixel_values(cfg: Gemma3VisionConfig, images: Any, pan_and_scan_crops: bool = False,
                 **pas: Any) -> tuple[np.ndarray, list[int]]:
    """One image or a list (PIL / arrays) -> (float32 ``pixel_values`` [n, 3, S, S] at the tower's size, the
    number of pan-and-scan crops after each image). With ``pan_and_scan_crops`` each image is followed by its
    crops (:func:`pan_and_scan`, options ``pas``), as the processor orders them. An array already shaped
    [n, 3, S, S] is taken as preprocessed."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return images.astype(np.float32, copy=False), [0] * len(images)
    if not isinstance(images, list | tuple):
        images = [images]
    rows, crops = [], []
    for im in images:
        extra = pan_and_scan(im, **pas) if pan_and_scan_crops else []
        rows += [preprocess_image(x, cfg.vision.image_size) for x in [im, *extra]]
        crops.append(len(extra))
    return np.stack(rows), crops


def _text_ids(tokenizer: Any, text: str) -> list[int]:
    if not text:
        return []
    if tokenizer is None:
        raise ValueError("text prompts need a tokenizer; pass token ids instead")
    try:
        return [int(t) for t in tokenizer.encode(text, add_bos=False)]
    except TypeError:
        return [int(t) for t in tokenizer.encode(text)]


def encode_prompt(cfg: Gemma3VisionConfig, tokenizer: Any, prompt: str, images: Any, add_bos: bool = True,
                  pan_and_scan_crops: bool = False) -> tuple[list[int], dict[str, np.ndarray]]:
    """One request as the engine takes it (``Family.encode_prompt``): (ids, ``{"pixel_values",
    "token_type_ids"}``) as ``Gemma3Processor`` builds them.

    Each ``<start_of_image>`` in ``prompt`` (one per image; the chat template writes them) becomes
    ``"\\n\\n" <start_of_image> <soft token> * N <end_of_image> "\\n\\n"``; a prompt without any gets its
    images in front of the text. With ``pan_and_scan_crops`` an elongated image becomes "Here is the
    original image [image] and here are some crops to help you see better [crop] [crop]...", as the
    processor writes it. Text between images is tokenized piece by piece (the image ids are special tokens
    there too), ``<bos>`` first unless ``add_bos`` is False.
    """
    px, crops = pixel_values(cfg, images, pan_and_scan_crops)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        n_images = len(px)
    else:
        n_images = len(images) if isinstance(images, list | tuple) else 1
    pieces = prompt.split(IMAGE_PLACEHOLDER)
    if len(pieces) == 1:
        pieces = [""] * n_images + pieces  # no placeholder: the images go first
    if len(pieces) - 1 != n_images:
        raise ValueError(f"the prompt has {len(pieces) - 1} {IMAGE_PLACEHOLDER} placeholders for {n_images} "
                         "images")
    seq = [cfg.boi_token_id] + [cfg.image_token_id] * cfg.tokens_per_image + [cfg.eoi_token_id]
    parts: list[str | list[int]] = [pieces[0]]
    for i, text in enumerate(pieces[1:]):
        if crops[i]:
            parts += ["Here is the original image \n\n", seq, "\n\n and here are some crops to help you see better "]
            for j in range(crops[i]):
                parts += (["\n\n"] if j == 0 else [" \n\n"]) + [seq, "\n\n"]
            parts.append(text)
        else:
            parts += ["\n\n", seq, "\n\n" + text]
    ids: list[int] = []
    text_run = ""
    for part in parts:
        if isinstance(part, str):
            text_run += part
            continue
        ids += _text_ids(tokenizer, text_run) + part
        text_run = ""
    ids += _text_ids(tokenizer, text_run)
    bos = cfg.text.bos_token_id
    if add_bos and (not ids or ids[0] != bos):
        ids.insert(0, bos)
    types = (np.asarray(ids) == cfg.image_token_id).astype(np.int32)
    return ids, {"pixel_values": px, "token_type_ids": types}


def check_inputs(cfg: Gemma3VisionConfig, ids: Any, inputs: Mapping[str, Any]) -> None:
    """``Family.check_inputs``: the images must fill the ids' soft tokens exactly (``tokens_per_image`` each;
    inside the compiled model a mismatch would silently reuse or drop features), ``token_type_ids`` must not
    be longer than the ids."""
    ids = np.asarray(ids)
    px = inputs.get("pixel_values")
    if px is not None:
        n = int(np.shape(px)[0])
        soft = int((ids == cfg.image_token_id).sum())
        if soft != n * cfg.tokens_per_image:
            raise ValueError(f"the ids hold {soft} image soft tokens (id {cfg.image_token_id}) but {n} image(s) "
                             f"fill {n * cfg.tokens_per_image} ({cfg.tokens_per_image} each)")
    tt = inputs.get("token_type_ids")
    if tt is not None and np.shape(tt)[-1] > ids.shape[-1]:
        raise ValueError(f"token_type_ids has {np.shape(tt)[-1]} entries, the ids {ids.shape[-1]}")


# ---- the family ----------------------------------------------------------------------------------------------

# ---- keras-hub presets ---------------------------------------------------------------------------------------

#: where keras-hub's ``Gemma3VisionEncoder`` keeps its ViT encoder and its output projection
KERAS_VISION = "layers/gemma3_vision_encoder/layers/"
KERAS_ENCODER = KERAS_VISION + "gemma3_vision_encoder_block/"
KERAS_OUTPUT = KERAS_VISION + "gemma3_vision_output/"


def keras_config(class_name: str, c: Mapping[str, Any]) -> Gemma3VisionConfig:
    """From a ``Gemma3Backbone`` config with a ``vision_encoder``: the decoder as the text backbone's, the tower
    from the encoder's config. The image ids come from the preset's tokenizer (``<img>``,
    ``<start_of_image>``, ``<end_of_image>``) when the model is loaded."""
    text = gemma_keras.gemma_text_config(class_name, c)
    v = (c.get("vision_encoder") or {}).get("config") or {}
    if float(v.get("layer_norm_epsilon", 1e-6)) != 1e-6:
        raise ValueError("the vision encoder's layer_norm_epsilon is not 1e-6")
    vc = vision.SigLIPConfig(image_size=int(v["image_size"]), patch_size=int(v["patch_size"]),
                             width=int(v["hidden_dim"]), depth=int(v["num_layers"]), mlp_dim=int(v["intermediate_dim"]),
                             num_heads=int(v["num_heads"]))
    if int(v.get("output_dim", text.hidden_size)) != text.hidden_size:
        raise ValueError(f"vision output_dim {v.get('output_dim')} is not the decoder width {text.hidden_size}")
    per_side = vc.grid // int(v.get("pool_size", 4))
    top = text.vocab_size - 1
    return Gemma3VisionConfig(text=text, vision=vc, tokens_per_image=per_side * per_side,
                              image_token_id=262144 if text.vocab_size > 262144 else top,
                              boi_token_id=255999 if text.vocab_size > 262144 else top - 2,
                              eoi_token_id=256000 if text.vocab_size > 262144 else top - 1, name=text.name)


def to_keras_config(cfg: Gemma3VisionConfig) -> tuple[str, dict[str, Any], str, str, tuple[str, str]]:
    v = cfg.vision
    pool = math.isqrt(v.num_patches // cfg.tokens_per_image)
    encoder = {"module": "keras_hub.src.models.gemma3.gemma3_vision_encoder", "class_name": "Gemma3VisionEncoder",
               "config": {"name": "gemma3_vision_encoder", "trainable": True,
                          "dtype": {"module": "keras", "class_name": "DTypePolicy", "config": {"name": "float32"},
                                    "registered_name": None},
                          "num_heads": v.num_heads, "hidden_dim": v.width, "num_layers": v.depth,
                          "intermediate_dim": v.mlp_dim, "output_dim": cfg.text.hidden_size, "pool_size": pool,
                          "image_size": v.image_size, "patch_size": v.patch_size, "layer_norm_epsilon": v.norm_eps},
               "registered_name": "keras_hub>Gemma3VisionEncoder"}
    args = dict(gemma_keras.gemma3_keras_args(cfg.text), image_size=v.image_size, vision_encoder=encoder)
    return ("Gemma3Backbone", args, "keras_hub.src.models.gemma3.gemma3_backbone", "Gemma3CausalLM",
            ("keras_hub.src.models.gemma3.gemma3_tokenizer", "Gemma3Tokenizer"))


def keras_table(cfg: Gemma3VisionConfig) -> dict[str, tuple[str | list[str], Any, Any]]:
    """gemmax path -> (H5 dataset, or one per layer; Keras -> gemmax; gemmax -> Keras) for every weight."""
    projector = {PROJECTOR + "/soft_embedding_norm/scale": KERAS_OUTPUT + "vision_soft_embedding_norm/vars/0",
                 PROJECTOR + "/input_projection/kernel": KERAS_OUTPUT + "vision_input_projection/vars/0"}
    return pg.keras_image_table(cfg, projector, "gemma3_decoder_block", KERAS_ENCODER, "gemma3_vision_encoder_layer")


def keras_lora_layers(cfg: Gemma3VisionConfig) -> dict[int, tuple[str, int]]:
    """Weighted-layer indices: embedding, encoder, its output block (projection, norm), the ViT, its layers
    (from 6), patch and position embeddings, final ViT norm, then the decoder blocks (from 10 past the ViT's
    layers)."""
    return pg.keras_image_lora_layers(cfg, 6, 10)


KERAS = KerasSpec(classes=("Gemma3Backbone",), accepts=lambda name, c: bool(c.get("vision_encoder")),
                  from_config=keras_config, to_config=to_keras_config, table=keras_table,
                  lora_layers=keras_lora_layers)


FAMILY = pg.image_family(
    globals(), "gemma3_vision", Gemma3VisionConfig,
    model_types=("gemma3",),
    hf_architecture="Gemma3ForConditionalGeneration",
    token_inputs={"token_type_ids": 0},  # text after the prompt: no image block
    check_inputs=check_inputs,
    # llama.cpp: the decoder is a gemma3 text GGUF, the tower and projector its "gemma3" mmproj file
    gguf_arch=lambda cfg: gguf.TEXT_ARCH,
    gguf=GGUFSpec(archs=(), read=gguf.read, write=gguf.write, projectors=(gguf.PROJECTOR_TYPE,)),
)
