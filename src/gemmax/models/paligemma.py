"""PaliGemma 1 and 2 as a registered :class:`~gemmax.models.base.Family`: SigLIP image tokens + a Gemma
(1 or 2) decoder with prefix-LM attention.

The input is ``[image tokens] <bos> prompt \\n [suffix]``, as transformers' ``PaliGemmaProcessor`` builds it
(:func:`build_input_ids`). Image positions hold the projected SigLIP features *unscaled*, text positions the
token embeddings scaled by sqrt(d) (the reference scales inside the embedding lookup). Attention is full over
the prefix (image + prompt: ``token_type_ids`` 0) and causal over the suffix and everything generated (type
1); RoPE positions start at 1, as in transformers (``position_ids + 1``).

Extra inputs, as transformers takes them: ``pixel_values`` ``[n_images, 3, H, W]`` already preprocessed
(:func:`preprocess_image`), one row per image in order of appearance (image tokens are filled across the
whole batch in reading order), and ``token_type_ids`` ``[B, T]``.

The decoder is :func:`gemmax.models.gemma.model.decoder_layer` over the same parameter paths as the Gemma
family (``token_embedding/``, ``decoder_block/``, ``final_normalization/``), so Gemma layout rules, LoRA and
quantization nodes apply unchanged; only the attention mask and the input embeddings differ. Generation
prefills with the prefix mask into the Gemma family's cache layout and then decodes with the Gemma family's
``decode_step`` (RoPE is relative, so its 0-based positions give the same attention as transformers'
1-based ones). PaliGemma 2 is the same code with a Gemma 2 decoder (soft-caps, sandwich norms, alternating
sliding windows).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import jax
import jax.numpy as jnp
import numpy as np

from gemmax.models import siglip as vision
from gemmax.models.base import CPU, XLA, Family, KerasSpec, family_from, register
from gemmax.models.gemma import decode as gdecode
from gemmax.models.gemma import extend as gextend
from gemmax.models.gemma import hf as gemma_hf
from gemmax.models.gemma import keras as gemma_keras
from gemmax.models.gemma import model as gm
from gemmax.models.gemma.config import LOCAL, ModelConfig
from gemmax.models.gemma.config import PRESETS as TEXT_PRESETS
from gemmax.models.gemma.config import from_hf_config as text_from_hf
from gemmax.models.gemma.config import to_hf_config as text_to_hf
from gemmax.nn.layers import dot_attention, rms_norm
from gemmax.nn.layers import remat as remat_layer
from gemmax.nn.params import LinearNode, ParamSpec, flatten, init_from_specs, unflatten

Array = jax.Array
Params = dict[str, Any]

#: Gemma's "\n" token: the separator between prompt and answer.
NEWLINE_ID = 108
#: Sizes PaliGemma checkpoints come in, and their image-token counts (patch 14).
RESOLUTIONS = {224: 256, 448: 1024, 896: 4096}


class TextDelegate:
    """The part of an image family's config (PaliGemma, Gemma 3 and Gemma 4 with images) that is its decoder's:
    the fields every family's config exposes (vocabulary, hidden size, context, special ids, and the tied head
    and final soft-cap the trainer's chunked loss reads) answer from the decoder config ``text``, as do the
    FLOPs per token (the tower runs once per image, not per token)."""

    text: Any
    #: The decoder config's fields the config answers for it.
    text_fields: ClassVar[frozenset[str]] = frozenset({
        "vocab_size", "hidden_size", "max_position_embeddings", "bos_token_id", "pad_token_id", "eos_ids",
        "tie_embeddings", "final_logit_softcap"})

    def __getattr__(self, name: str) -> Any:
        if name in self.text_fields:
            return getattr(self.text, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def replace(self, **kw: Any) -> Self:
        return dataclasses.replace(self, **kw)

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> float:
        """The decoder's FLOPs per token (the tower runs once per image, not per token)."""
        return self.text.flops_per_token(seq_len, training)


def tied_param_count(specs: Mapping[str, ParamSpec], text: ModelConfig) -> dict[str, int]:
    """Parameter counts of a tower in front of a Gemma decoder whose head is its token embedding."""
    total = sum(s.size for s in specs.values())
    embed = text.vocab_size * text.hidden_size
    return {"total": total, "embedding": embed, "non_embedding": total - embed}


@dataclass(frozen=True)
class PaliGemmaConfig(TextDelegate):
    """A Gemma decoder config (``text``), a SigLIP tower config (``vision``) and the image token. The fields
    every family's config exposes (vocabulary, special ids, context) delegate to the decoder."""

    text: ModelConfig
    vision: vision.SigLIPConfig
    image_token_id: int = 257152
    newline_id: int = NEWLINE_ID
    name: str = ""
    family: str = "paligemma"
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_patches

    def param_count(self) -> dict[str, int]:
        return tied_param_count(param_specs(self), self.text)

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "name": self.name, "image_token_id": self.image_token_id,
                "newline_id": self.newline_id, "text": self.text.to_dict(),
                "vision": dataclasses.asdict(self.vision)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PaliGemmaConfig:
        d = dict(d)
        unknown = set(d) - {"family", "name", "image_token_id", "newline_id", "text", "vision", "extra"}
        if unknown:
            raise ValueError(f"unknown PaliGemma config fields: {sorted(unknown)}")
        return cls(text=ModelConfig.from_dict(d["text"]), vision=vision.SigLIPConfig(**d["vision"]),
                   image_token_id=int(d.get("image_token_id", 257152)),
                   newline_id=int(d.get("newline_id", NEWLINE_ID)), name=d.get("name", ""),
                   family=d.get("family", "paligemma"))


# ---- presets and HF configs -------------------------------------------------------------------------------

_PG1_TEXT = dict(model_type="gemma", hidden_size=2048, num_hidden_layers=18, intermediate_size=16384,
                 num_attention_heads=8, num_key_value_heads=1, head_dim=256, vocab_size=257216)


def decoder_shape(preset: str) -> dict[str, Any]:
    """The decoder shape of a Gemma text preset as ``config.json`` keys: the published image models' decoders
    are the text models'."""
    c = TEXT_PRESETS[preset]
    return dict(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
                num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim,
                query_pre_attn_scalar=c.query_pre_attn_scalar)


#: PaliGemma 2's decoders: Gemma 2 2B, 9B and 27B.
_PG2_TEXT = {size: decoder_shape(f"gemma2_{size}_en") for size in ("2b", "9b", "27b")}
#: transformers' defaults for keys that published text configs leave out.
_TEXT_DEFAULTS = {
    "gemma": dict(_PG1_TEXT),
    "gemma2": dict(model_type="gemma2", vocab_size=257216, num_attention_heads=8, head_dim=256,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=4096,
                   query_pre_attn_scalar=256, hidden_activation="gelu_pytorch_tanh"),
}


def from_hf_config(hf: Mapping[str, Any]) -> PaliGemmaConfig:
    """From a ``paligemma`` config.json; missing text/vision keys take the published defaults."""
    if hf.get("model_type") != "paligemma":
        raise ValueError(f"not a PaliGemma config (model_type {hf.get('model_type')!r})")
    tc = dict(hf.get("text_config") or {})
    mt = tc.get("model_type", "gemma")
    if mt not in _TEXT_DEFAULTS:
        raise ValueError(f"unsupported PaliGemma decoder {mt!r} (gemma or gemma2)")
    text = dict(_TEXT_DEFAULTS[mt], **tc)
    # transformers marks the decoder bidirectional for PaliGemma's prefix; the prefix-LM mask is this
    # family's own (token_type_ids), so the decoder config stays causal.
    text.pop("use_bidirectional_attention", None)
    vc = dict(hf.get("vision_config") or {})
    img = int(hf.get("image_token_id", hf.get("image_token_index", 257152)))
    name = hf.get("_name_or_path", "") or ""
    return PaliGemmaConfig(text=text_from_hf(text).replace(name=name), vision=vision.from_hf_vision_config(vc),
                           image_token_id=img, name=name)


def to_hf_config(cfg: PaliGemmaConfig) -> dict[str, Any]:
    """The published checkpoints' ``config.json`` (``image_token_index``, nested text and vision configs)."""
    text = text_to_hf(cfg.text)
    text.pop("architectures", None)
    vc = vision.to_hf_vision_config(cfg.vision)
    vc["projection_dim"] = cfg.text.hidden_size
    return {"model_type": "paligemma", "architectures": ["PaliGemmaForConditionalGeneration"],
            "text_config": text, "vision_config": vc, "image_token_index": cfg.image_token_id,
            "projection_dim": cfg.text.hidden_size, "hidden_size": cfg.text.hidden_size,
            "vocab_size": cfg.text.vocab_size, "bos_token_id": cfg.text.bos_token_id,
            "eos_token_id": cfg.text.eos_ids[0], "pad_token_id": cfg.text.pad_token_id,
            "tie_word_embeddings": True}


def _preset(name: str, text: dict[str, Any], size: int) -> PaliGemmaConfig:
    mt = text.get("model_type", "gemma")
    hf = {"model_type": "paligemma", "text_config": dict(_TEXT_DEFAULTS[mt], **text),
          "vision_config": {"image_size": size}}
    c = from_hf_config(hf)
    return PaliGemmaConfig(text=c.text.replace(name=name), vision=c.vision, name=name)


PRESETS: dict[str, PaliGemmaConfig] = {}
PRESET_REPOS: dict[str, str] = {}
for _s in (224, 448, 896):
    PRESETS[f"paligemma_3b_pt_{_s}"] = _preset(f"paligemma_3b_pt_{_s}", {}, _s)
    PRESET_REPOS[f"paligemma_3b_pt_{_s}"] = f"google/paligemma-3b-pt-{_s}"
    for _k, _t in _PG2_TEXT.items():
        _n = {"2b": "3b", "9b": "10b", "27b": "28b"}[_k]
        PRESETS[f"paligemma2_{_n}_pt_{_s}"] = _preset(f"paligemma2_{_n}_pt_{_s}", dict(_t, model_type="gemma2"), _s)
        PRESET_REPOS[f"paligemma2_{_n}_pt_{_s}"] = f"google/paligemma2-{_n}-pt-{_s}"
PRESETS["paligemma_3b_mix_224"] = _preset("paligemma_3b_mix_224", {}, 224)
PRESET_REPOS["paligemma_3b_mix_224"] = "google/paligemma-3b-mix-224"


def split_overrides(overrides: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """An image family's ``tiny_config`` overrides by their prefix: ``text_*`` (the decoder's), ``vision_*`` (the
    tower's), each without its prefix, and the rest (the config's own)."""
    text = {k[5:]: v for k, v in overrides.items() if k.startswith("text_")}
    vision = {k[7:]: v for k, v in overrides.items() if k.startswith("vision_")}
    return text, vision, {k: v for k, v in overrides.items() if not k.startswith(("text_", "vision_"))}


def tiny_config(text: str = "gemma", **overrides: Any) -> PaliGemmaConfig:
    """A tiny random PaliGemma for tests and examples: 2+2 layers, 28 px images of 16 patches of 7 px,
    ``text`` "gemma" (PaliGemma 1) or "gemma2" (PaliGemma 2: window 8, soft-caps). ``overrides`` go to
    the config (``image_token_id``, ``newline_id``, ``name``) or, prefixed ``text_`` / ``vision_``, to
    the decoder's config.json keys / the tower's."""
    tc = dict(model_type=text, vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=12)
    if text == "gemma2":
        tc.update(sliding_window=8, query_pre_attn_scalar=12, attn_logit_softcapping=50.0,
                  final_logit_softcapping=30.0)
    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
              patch_size=7)
    text_over, vision_over, own = split_overrides(overrides)
    tc.update(text_over)
    vc.update(vision_over)
    top: dict[str, Any] = {"image_token_id": 299, **own}
    name = top.pop("name", f"tiny_paligemma_{text}")
    cfg = from_hf_config({"model_type": "paligemma", "text_config": tc, "vision_config": vc, **top})
    return cfg.replace(name=name, text=cfg.text.replace(name=name), **{k: v for k, v in top.items()
                                                                       if k == "newline_id"})


# ---- parameters ---------------------------------------------------------------------------------------------

PROJECTOR = "multi_modal_projector"


def param_specs(cfg: PaliGemmaConfig) -> dict[str, ParamSpec]:
    """The decoder's weights (Gemma family), the SigLIP tower's and the projector, with logical axes."""
    s = vision.param_specs(cfg.vision)
    s[PROJECTOR + "/kernel"] = ParamSpec((cfg.vision.width, cfg.text.hidden_size), ("vision_embed", "embed"),
                                         fan_in_axis=0)
    s[PROJECTOR + "/bias"] = ParamSpec((cfg.text.hidden_size,), ("embed",), "zeros")
    s.update(gm.param_specs(cfg.text))
    return s


def init_params(cfg: PaliGemmaConfig, key: Array, dtype: Any = jnp.float32) -> Params:
    """The decoder as the Gemma family initialises it; the tower and projector from their specs."""
    return init_with_decoder(cfg, param_specs(cfg), gm.init_params, key, dtype)


def init_with_decoder(cfg: Any, specs: Mapping[str, ParamSpec], decoder_init: Callable[[Any, Array, Any], Params],
                      key: Array, dtype: Any, tower: Callable[[Params], Params] = lambda flat: flat) -> Params:
    """An image family's weights: the decoder ``cfg.text`` as its own family initialises it (``decoder_init``),
    the tower (under ``vision_encoder/``) and the projector from their ``specs``, their flat weights passed
    through ``tower`` (Gemma 4 opens its clip bounds there)."""
    k1, k2 = jax.random.split(key)
    flat = flatten(decoder_init(cfg.text, k1, dtype))
    own = {p: s for p, s in specs.items() if p.startswith((vision.PREFIX, PROJECTOR + "/"))}
    flat.update(tower(flatten(init_from_specs(own, k2, dtype))))
    return unflatten(flat)


#: transformers (5) module prefixes of the two layer lists, as PEFT names adapters on
#: ``PaliGemmaForConditionalGeneration`` (``base_model.model.model.language_model.layers.{i}.self_attn.q_proj``).
TEXT_LAYERS = "model.language_model.layers"
VISION_LAYERS = "model.vision_tower.encoder.layers"


def linear_nodes(cfg: PaliGemmaConfig) -> dict[str, LinearNode]:
    """The decoder's linears under their Gemma names (``query``, ``ffw_linear``...: LoRA's default targets
    reach the language model only) and the tower's under names of their own (``vision_query``...,
    ``vision_fc1``): quantizable, and trainable only when named. The projector is left out (small, float)."""
    nodes = dict(gm.linear_nodes(cfg.text, layers=TEXT_LAYERS))
    nodes.update(vision.linear_nodes(cfg.vision, layers=VISION_LAYERS))
    return nodes


# ---- Hugging Face names ----------------------------------------------------------------------------------

#: Other layouts' prefixes -> the published one's (what ``hf_table`` names), first match wins per tensor:
#: published repos (kept as they are), transformers 4.5x saves (``model.vision_tower.vision_model.``),
#: transformers 5's module names (``model.language_model.``, ``model.vision_tower.``) and its
#: ``save_pretrained`` (``vision_tower.`` without ``vision_model.``).
HF_ALIASES: tuple[tuple[str, str], ...] = (
    ("vision_tower.vision_model.", "vision_tower.vision_model."),
    ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("vision_tower.", "vision_tower.vision_model."),
    ("model.language_model.", "language_model.model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)
#: Tensors a checkpoint may carry and the model does not use: rotary buffers, the tied head's copy of the
#: embedding (``lm_head.weight`` / ``language_model.lm_head.weight``), SigLIP's pooling head.
HF_IGNORABLE = ("rotary_emb.inv_freq", "lm_head.weight", "vision_model.head.")


def _text_name(name: str) -> str:
    """A Gemma decoder tensor name (``model.layers.0...``) as the published PaliGemma repos nest it."""
    return "language_model." + name


def decoder_and_tower_hf_table(cfg: Any) -> dict[str, tuple[str | list[str], Any, Any]]:
    """The published names of the Gemma decoder (under ``language_model.``) and of the SigLIP tower (under
    ``vision_tower.vision_model.``): every weight but the projector's, for PaliGemma and Gemma 3 alike."""
    t: dict[str, tuple[str | list[str], Any, Any]] = {}
    for path, (names, f, g) in gemma_hf.hf_table(cfg.text).items():
        t[path] = (_text_name(names) if isinstance(names, str) else [_text_name(n) for n in names], f, g)
    t.update(vision.hf_table(cfg.vision, "vision_tower.vision_model."))
    return t


def hf_table(cfg: PaliGemmaConfig) -> dict[str, tuple[str | list[str], Any, Any]]:
    """gemmax path -> (published HF name, or one per layer; HF -> gemmax; gemmax -> HF) for every weight."""
    t = decoder_and_tower_hf_table(cfg)
    t[PROJECTOR + "/kernel"] = ("multi_modal_projector.linear.weight", lambda w: w.T, lambda w: w.T)
    t[PROJECTOR + "/bias"] = ("multi_modal_projector.linear.bias", lambda w: w, lambda w: w)
    return t


# ---- the model ----------------------------------------------------------------------------------------------


def prefix_lm_mask(q_idx: Array, k_idx: Array, q_type: Array, k_type: Array, window: Array | int | None,
                   q_seg: Array | None = None, k_seg: Array | None = None, k_valid: Array | None = None) -> Array:
    """[B, T, S]: causal (within ``window``) OR both tokens in the prefix (type 0); inside the same packed
    segment and over valid keys.

    The prefix block overrides the window, as in transformers (``or`` of the sliding-causal and block
    masks).
    """
    q, k = q_idx[:, :, None], k_idx[:, None, :]
    m = k <= q
    if window is not None:
        m = m & (q - k < window)
    m = m | ((q_type == 0)[:, :, None] & (k_type == 0)[:, None, :])
    if q_seg is not None and k_seg is not None:
        m = m & (q_seg[:, :, None] == k_seg[:, None, :])
    if k_valid is not None:
        m = m & k_valid[:, None, :]
    return m


def image_features(params: Params, cfg: PaliGemmaConfig, pixel_values: Array, dtype: Any) -> Array:
    """``pixel_values`` [n, 3, H, W] -> projected SigLIP features [n, patches, D] (not scaled)."""
    feats = vision.encode(params, cfg.vision, pixel_values, dtype)
    proj = params[PROJECTOR]
    return (feats @ proj["kernel"].astype(dtype) + proj["bias"].astype(dtype)).astype(dtype)


def embed_inputs(params: Params, cfg: PaliGemmaConfig, tokens: Array, pixel_values: Array | None) -> Array:
    """Token embeddings (scaled by sqrt(d)) with image-token positions replaced by projected SigLIP
    features (not scaled), as :func:`embed_with_features`."""
    return embed_with_features(params, cfg, tokens, pixel_values, image_features)


def embed_with_features(params: Params, cfg: Any, tokens: Array, pixel_values: Array | None,
                        features: Callable[[Params, Any, Array, Any], Array]) -> Array:
    """The Gemma decoder's token embeddings (scaled by sqrt(d)) with the image-token positions replaced by
    ``features(params, cfg, pixel_values, dtype)`` [n, tokens per image, D] (not scaled). Image tokens take the
    images' rows in reading order over the whole batch (transformers' ``masked_scatter``): with one image per
    row, row i's tokens hold image i."""
    tokens = jnp.asarray(tokens, jnp.int32)
    is_img = tokens == cfg.image_token_id
    safe = jnp.where(is_img & (cfg.image_token_id >= cfg.text.vocab_size), 0, tokens)
    x = gm.embed(params, cfg.text, safe)
    if pixel_values is None:
        return x
    feats = features(params, cfg, pixel_values, x.dtype)
    flat = feats.reshape(-1, feats.shape[-1])
    idx = jnp.clip(jnp.cumsum(is_img.reshape(-1)) - 1, 0, flat.shape[0] - 1).reshape(tokens.shape)
    return jnp.where(is_img[..., None], jnp.take(flat, idx, axis=0), x)


def forward_hidden(params: Params, cfg: PaliGemmaConfig, tokens: Array, positions: Array | None = None,
                   segment_ids: Array | None = None, remat: str | None = None, pixel_values: Array | None = None,
                   token_type_ids: Array | None = None) -> Array:
    """Final-normed hidden states [B, T, D], as ``PaliGemmaForConditionalGeneration``.

    ``token_type_ids`` 0 = prefix (bidirectional), 1 = suffix (causal); None means all causal (as
    transformers without token types: text-only training is plain causal LM). ``positions`` default to
    1..T (transformers' ``position_ids + 1``). ``segment_ids`` keep packed documents apart.
    """
    tc = cfg.text
    x = embed_inputs(params, cfg, tokens, pixel_values)
    b, t = x.shape[:2]
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    positions = idx + 1 if positions is None else jnp.asarray(positions, jnp.int32)
    types = (jnp.ones((b, t), jnp.int32) if token_type_ids is None
             else jnp.broadcast_to(jnp.asarray(token_type_ids, jnp.int32).reshape(-1, t), (b, t)))
    seg = None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    return decoder_hidden(params, tc, x, positions,
                          lambda window: prefix_lm_mask(idx, idx, types, types, window, seg, seg), remat)


def decoder_hidden(params: Params, tc: ModelConfig, x: Array, positions: Array,
                   mask_of: Callable[[Array | None], Array], remat: str | None = None) -> Array:
    """The Gemma decoder over embedded inputs ``x`` [B, T, D] with a family's attention mask, final-normed.
    ``mask_of(window)`` builds the mask for a layer's window (None on global layers), so the image families
    differ only in their mask."""
    has_local = LOCAL in tc.layer_types
    sin, cos, rope_row = gm.rope_tables(tc, positions)

    def body(x: Array, xs: tuple) -> tuple[Array, None]:
        p, window, row = xs

        def attend(q: Array, k: Array, v: Array) -> Array:
            return dot_attention(q, k, v, mask_of(window if has_local else None), tc.attn_logit_softcap)

        return gm.decoder_layer(p, x, tc, positions, (sin[row], cos[row]), attend), None

    xs = (params["decoder_block"], jnp.asarray(gm.layer_windows(tc)), rope_row)
    x, _ = jax.lax.scan(remat_layer(body, remat), x, xs)
    return rms_norm(x, params["final_normalization"]["scale"], tc.norm_eps, tc.norm_offset)


def logits_from_hidden(params: Params, cfg: PaliGemmaConfig, hidden: Array) -> Array:
    """Float32 logits through the tied embedding (Gemma's head and final soft-cap)."""
    return gm.logits_from_hidden(params, cfg.text, hidden)


def forward(params: Params, cfg: PaliGemmaConfig, tokens: Array, pixel_values: Array | None = None,
            token_type_ids: Array | None = None, positions: Array | None = None) -> Array:
    """Float32 logits [B, T, V] (see :func:`forward_hidden`)."""
    h = forward_hidden(params, cfg, tokens, positions, pixel_values=pixel_values, token_type_ids=token_type_ids)
    return logits_from_hidden(params, cfg, h)


# ---- generation: prefix-LM prefill into the Gemma family's cache, Gemma's decode step -------------------------
# The head and these three read only ``cfg.text``, so Gemma 3 with images (gemma3_vision) uses them too.


def init_cache(cfg: PaliGemmaConfig, batch: int, max_len: int, dtype: Any) -> dict[str, Array]:
    return gdecode.init_cache(cfg.text, batch, max_len, dtype)


def insert(cache: dict, rows: dict, slots: Array, backend: str = XLA) -> dict:
    return gdecode.insert(cache, rows, slots, backend)


def decode_step(params: Params, cfg: PaliGemmaConfig, cache: dict, tokens: Array, pos: Array,
                backend: str = XLA) -> tuple[Array, dict]:
    """After the prompt everything is causal text: the Gemma family's step over the decoder."""
    return gdecode.decode_step(params, cfg.text, cache, tokens, pos, backend)


def extend_text(params: Params, cfg: PaliGemmaConfig, cache: dict, tokens: Array, pos: Array, backend: str = XLA,
                last: Array | None = None) -> tuple[Array, dict]:
    """A block of text after the prompt (causal, like decoding): the Gemma family's ``extend``. A prompt
    itself is not extended this way (its prefix attends both ways), so these models speculate but do not
    take the prefix cache (the engine keeps that to families without image inputs)."""
    return gextend.extend(params, cfg.text, cache, tokens, pos, backend, last)


def commit_text(cfg: PaliGemmaConfig, cache: dict, block: dict, slots: Array, pos: Array, counts: Array,
                backend: str = XLA) -> dict:
    return gextend.commit(cfg.text, cache, block, slots, pos, counts, backend)


def pad_type_ids(type_ids: Any, b: int, t: int, fill: int, name: str = "token_type_ids") -> Array:
    """A request's type ids ``name`` ([T'] or [b, T'], unpadded) as int [b, t], ``fill`` past their end."""
    tt = jnp.asarray(type_ids, jnp.int32)
    tt = tt.reshape(1, -1) if tt.ndim == 1 else tt
    if tt.shape[1] > t:
        raise ValueError(f"{name} has {tt.shape[1]} entries, the prompt {t} tokens")
    tt = jnp.pad(tt, ((0, 0), (0, t - tt.shape[1])), constant_values=fill)
    return jnp.broadcast_to(tt, (b, t))


def prompt_rows(tokens: Any, lengths: Any) -> tuple[Array, Array, Array, Array]:
    """Right-padded prompts [b, T] and their true lengths [b] as int32, with every position's index [b, T] and
    whether it lies inside its row's prompt."""
    tokens = jnp.asarray(tokens, jnp.int32)
    lengths = jnp.asarray(lengths, jnp.int32)
    b, t = tokens.shape
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return tokens, lengths, idx, idx < lengths[:, None]


def prefill(params: Params, cfg: PaliGemmaConfig, tokens: Array, lengths: Array, max_len: int,
            backend: str = XLA, pixel_values: Array | None = None,
            token_type_ids: Array | None = None) -> tuple[Array, dict]:
    """Prompts [b, T] (right-padded, true lengths [b]) -> (float32 logits [b, V] at each row's last real token,
    per-row caches in the Gemma family's layout for ``insert``).

    The prompt attends as a prefix-LM: tokens of type 0 bidirectionally among themselves, type 1 causally.
    Without ``token_type_ids`` the whole prompt is the prefix (image + ``<bos> prompt \\n``, what
    ``PaliGemmaProcessor`` marks 0). Runs XLA for either ``backend`` (the decode step takes the native CPU
    kernels). Positions are 0-based, as the Gemma decode step continues them (RoPE is relative: transformers'
    1-based positions give the same attention).
    """
    del backend
    tokens, lengths, idx, valid = prompt_rows(tokens, lengths)
    b, t = tokens.shape
    types = jnp.zeros((b, t), jnp.int32) if token_type_ids is None else pad_type_ids(token_type_ids, b, t, 1)
    types = jnp.where(valid, types, 1)  # padding is "suffix" (causal) and masked as a key: nothing sees it
    x = embed_inputs(params, cfg, tokens, pixel_values)
    return decoder_prefill(params, cfg.text, x, lengths, max_len,
                           lambda window: prefix_lm_mask(idx, idx, types, types, window, k_valid=valid))


def decoder_prefill(params: Params, tc: ModelConfig, x: Array, lengths: Array, max_len: int,
                    mask_of: Callable[[Array | None], Array]) -> tuple[Array, dict]:
    """The Gemma decoder's prefill over embedded prompts ``x`` [b, T, D] (true lengths [b]) with a family's
    mask (``mask_of`` as in :func:`decoder_hidden`): float32 logits [b, V] at each row's last real token and
    per-row caches in the Gemma family's layout."""
    b, t = x.shape[:2]
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    has_local = LOCAL in tc.layer_types
    sin, cos, rope_row = gm.rope_tables(tc, idx)

    def body(x: Array, xs: tuple) -> tuple[Array, tuple[Array, Array]]:
        p, window, row = xs
        kv: dict[str, Array] = {}

        def attend(q: Array, k: Array, v: Array) -> Array:
            kv["k"], kv["v"] = k, v
            return dot_attention(q, k, v, mask_of(window if has_local else None), tc.attn_logit_softcap)

        x = gm.decoder_layer(p, x, tc, idx, (sin[row], cos[row]), attend)
        return x, (kv["k"], kv["v"])

    xs = (params["decoder_block"], jnp.asarray(gm.layer_windows(tc)), rope_row)
    x, (ks, vs) = jax.lax.scan(body, x, xs)  # ks: [L, b, T, K, hd]
    last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)
    last = rms_norm(last, params["final_normalization"]["scale"], tc.norm_eps, tc.norm_offset)
    logits = gm.logits_from_hidden(params, tc, last)[:, 0]
    window = gdecode.CacheLayout.for_config(tc, max_len).window
    return logits, gdecode.prompt_caches(tc, ks, vs, lengths, window)


# ---- images, prompts, detections -----------------------------------------------------------------------------


def preprocess_image(image: Any, size: int = 224) -> np.ndarray:
    """PIL image / array -> float32 ``[3, size, size]`` in [-1, 1] (one row of transformers'
    ``pixel_values``): RGB, bicubic resize to a square, then ``(x / 255 - 0.5) / 0.5`` — SigLIP's
    normalisation (mean 0.5, std 0.5)."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        arr = np.asarray(image)
        if arr.dtype != np.uint8:
            arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        image = Image.fromarray(arr)
    image = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    x = np.asarray(image, np.float32) / 255.0
    return ((x - 0.5) / 0.5).transpose(2, 0, 1)


def pixel_values(cfg: PaliGemmaConfig, images: Any) -> np.ndarray:
    """One image or a list (PIL / arrays) -> float32 ``pixel_values`` [n, 3, S, S] at the config's size; an
    array already shaped [n, 3, S, S] is returned as is."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return images.astype(np.float32, copy=False)
    if not isinstance(images, list | tuple):
        images = [images]
    return np.stack([preprocess_image(im, cfg.vision.image_size) for im in images])


def task_prompt(task: str, arg: str = "", lang: str = "en") -> str:
    """PaliGemma's task prefixes: caption, answer (VQA), detect, segment, ocr."""
    if task == "caption":
        return f"caption {lang}"
    if task == "answer":
        return f"answer {lang} {arg}".rstrip()
    if task in ("detect", "segment"):
        return f"{task} {arg}".rstrip()
    if task == "ocr":
        return "ocr"
    raise ValueError(f"unknown task {task!r} (caption, answer, detect, segment, ocr)")


def newline_id(cfg: PaliGemmaConfig, tokenizer: Any = None) -> int:
    """The prompt separator: the tokenizer's "\\n" (108 in Gemma's vocabulary, elsewhere in others)."""
    if tokenizer is not None and hasattr(tokenizer, "piece_to_id"):
        nl = tokenizer.piece_to_id("\n")
        if 0 <= nl < cfg.text.vocab_size:
            return int(nl)
    return cfg.newline_id


def build_input_ids(cfg: PaliGemmaConfig, prompt_ids: Sequence[int], newline: int | None = None,
                    num_images: int = 1) -> list[int]:
    """``[image] * N + <bos> + prompt + "\\n"`` as PaliGemmaProcessor lays it out."""
    nl = cfg.newline_id if newline is None else newline
    return ([cfg.image_token_id] * (cfg.num_image_tokens * num_images)
            + [cfg.text.bos_token_id, *[int(t) for t in prompt_ids], nl])


def encode_text(cfg: PaliGemmaConfig, tokenizer: Any, text: str | Sequence[int]) -> list[int]:
    """A prompt or answer as ids without ``<bos>`` (ids pass through)."""
    if not isinstance(text, str):
        return [int(t) for t in text]
    if tokenizer is None:
        raise ValueError("text prompts need a tokenizer; pass token ids instead")
    try:
        ids = list(tokenizer.encode(text, add_bos=False))
    except TypeError:
        ids = list(tokenizer.encode(text))
    return ids[1:] if ids and ids[0] == cfg.text.bos_token_id else ids


def encode_prompt(cfg: PaliGemmaConfig, tokenizer: Any, prompt: str | Sequence[int], images: Any,
                  add_bos: bool = True) -> tuple[list[int], dict[str, np.ndarray]]:
    """One request as the engine takes it (``Family.encode_prompt``): (ids ``[image]*N <bos> prompt \\n``,
    ``{"pixel_values", "token_type_ids"}``), the whole prompt the prefix. ``add_bos=False`` leaves out
    ``<bos>`` (PaliGemmaProcessor always writes it)."""
    px = pixel_values(cfg, images)
    ids = build_input_ids(cfg, encode_text(cfg, tokenizer, prompt), newline_id(cfg, tokenizer), len(px))
    if not add_bos:
        del ids[cfg.num_image_tokens * len(px)]
    return ids, {"pixel_values": px, "token_type_ids": np.zeros((len(ids),), np.int32)}


_LOC = re.compile(r"((?:<loc\d{4}>){4})\s*([^;<]*)")


def parse_detections(text: str, width: int, height: int) -> list[dict[str, Any]]:
    """``<locY0><locX0><locY1><locX1> label ; ...`` -> [{"label", "box": (x0, y0, x1, y1)}] in pixels.

    Each location token is a coordinate quantised to 1024 bins over the image side (y first), so pixel =
    value / 1024 * side.
    """
    out = []
    for locs, label in _LOC.findall(text):
        y0, x0, y1, x1 = (int(v) / 1024.0 for v in re.findall(r"<loc(\d{4})>", locs))
        out.append({"label": label.strip(), "box": (x0 * width, y0 * height, x1 * width, y1 * height)})
    return out


# ---- fine-tuning batches --------------------------------------------------------------------------------------


def _bucket(n: int, minimum: int = 16) -> int:
    b = minimum
    while b < n:
        b *= 2
    return b


def training_batch(cfg: PaliGemmaConfig, prompts: Sequence[Sequence[int]], suffixes: Sequence[Sequence[int]],
                   length: int | None = None, add_eos: bool = True, images: Any = None,
                   newline: int | None = None) -> dict[str, np.ndarray]:
    """Right-padded ``tokens`` / ``token_type_ids`` / ``loss_mask`` [B, length] for prefix-LM training, plus
    ``pixel_values`` [B, 3, S, S] when ``images`` (one per example, or one for all) are given.

    A row is ``[image] * N <bos> prompt \\n`` (type 0: attends bidirectionally, no loss) then ``suffix <eos>``
    (type 1: causal, loss on every token) then padding (type 1 too — causal, so no real token can see it —
    and masked out of the loss), the layout PaliGemma was trained with. ``loss_mask[t]`` marks the tokens
    to predict (position t-1 predicts token t).
    """
    if len(prompts) != len(suffixes):
        raise ValueError(f"{len(prompts)} prompts but {len(suffixes)} suffixes")
    rows = []
    for pr, sf in zip(prompts, suffixes, strict=True):
        prefix = build_input_ids(cfg, [int(t) for t in pr], newline)
        suffix = [int(t) for t in sf] + ([cfg.text.eos_ids[0]] if add_eos else [])
        rows.append((prefix, suffix))
    need = max(len(a) + len(b) for a, b in rows)
    length = _bucket(need) if length is None else length
    if need > length:
        raise ValueError(f"an example has {need} tokens, more than length={length}")
    tokens = np.full((len(rows), length), cfg.text.pad_token_id, np.int32)
    types = np.ones((len(rows), length), np.int32)
    mask = np.zeros((len(rows), length), np.float32)
    for i, (a, b) in enumerate(rows):
        tokens[i, :len(a) + len(b)] = a + b
        types[i, :len(a)] = 0
        mask[i, len(a):len(a) + len(b)] = 1.0
    batch = {"tokens": tokens, "token_type_ids": types, "loss_mask": mask}
    if images is not None:
        px = pixel_values(cfg, images)
        if len(px) == 1 and len(rows) > 1:
            px = np.repeat(px, len(rows), axis=0)
        if len(px) != len(rows):
            raise ValueError(f"{len(px)} images for {len(rows)} examples")
        batch["pixel_values"] = px
    return batch


# ---- keras-hub presets ---------------------------------------------------------------------------------------

#: where keras-hub's ``PaliGemmaBackbone`` keeps its ViT (``vit_name`` unset) and the ViT's encoder
KERAS_VIT = "layers/pali_gemma_vit/layers/"
KERAS_ENCODER = KERAS_VIT + "pali_gemma_vit_encoder/"


def keras_config(class_name: str, c: Mapping[str, Any]) -> PaliGemmaConfig:
    """From a ``PaliGemmaBackbone`` config: the decoder as a ``GemmaBackbone``'s, the ViT from ``vit_*``. The
    image token id comes from the preset's tokenizer (``<image>``) when the model is loaded."""
    if c.get("vit_pooling") or c.get("vit_classifier_activation"):
        raise ValueError("a pooled ViT or a projector activation is not PaliGemma's layout")
    text = gemma_keras.gemma_text_config("GemmaBackbone", c)
    vc = vision.SigLIPConfig(image_size=int(c["image_size"]), patch_size=int(c["vit_patch_size"]),
                             width=int(c["vit_hidden_dim"]), depth=int(c["vit_num_layers"]),
                             mlp_dim=int(c.get("vit_intermediate_dim") or 4304), num_heads=int(c["vit_num_heads"]))
    image_id = 257152 if text.vocab_size > 257152 else text.vocab_size - 1
    return PaliGemmaConfig(text=text, vision=vc, image_token_id=image_id, name=text.name)


def to_keras_config(cfg: PaliGemmaConfig) -> tuple[str, dict[str, Any], str, str, tuple[str, str]]:
    v = cfg.vision
    if v.norm_eps != 1e-6 or v.channels != 3:
        raise ValueError("keras-hub's PaliGemma ViT has layer-norm epsilon 1e-6 and RGB input")
    args = dict(gemma_keras.gemma_keras_args(cfg.text), intermediate_dim=2 * cfg.text.intermediate_size,
                image_size=v.image_size, vit_patch_size=v.patch_size, vit_num_heads=v.num_heads,
                vit_hidden_dim=v.width, vit_num_layers=v.depth, vit_intermediate_dim=v.mlp_dim, vit_pooling=None,
                vit_classifier_activation=None, vit_name=None)
    return ("PaliGemmaBackbone", args, "keras_hub.src.models.pali_gemma.pali_gemma_backbone", "PaliGemmaCausalLM",
            ("keras_hub.src.models.pali_gemma.pali_gemma_tokenizer", "PaliGemmaTokenizer"))


def keras_table(cfg: PaliGemmaConfig) -> dict[str, tuple[str | list[str], Any, Any]]:
    """gemmax path -> (H5 dataset, or one per layer; Keras -> gemmax; gemmax -> Keras) for every weight."""
    return keras_image_table(cfg, {PROJECTOR + "/kernel": KERAS_VIT + "dense/vars/0",
                                   PROJECTOR + "/bias": KERAS_VIT + "dense/vars/1"},
                             "pali_gemma_decoder_block", KERAS_ENCODER, "pali_gemma_vit_encoder_block")


def keras_image_table(cfg: Any, projector: Mapping[str, str], decoder_block: str, encoder: str,
                      encoder_block: str) -> dict[str, tuple[str | list[str], Any, Any]]:
    """The keras-hub name table of a Gemma decoder (its layers named after ``decoder_block``) behind a SigLIP
    ViT (under ``encoder``, its layers named after ``encoder_block``): the embedding, the final norm, the
    ``projector``'s weights (gemmax path -> H5 dataset, kept as gemmax keeps them), the decoder's and the
    ViT's."""
    ident = (lambda w: w, lambda w: w)
    t: dict[str, tuple[str | list[str], Any, Any]] = {
        "token_embedding/embeddings": ("layers/reversible_embedding/vars/0", *ident),
        "final_normalization/scale": ("layers/rms_normalization/vars/0", *ident),
        **{path: (name, *ident) for path, name in projector.items()},
    }
    t.update(gemma_keras.decoder_table(cfg.text, decoder_block))
    t.update(vision.keras_table(cfg.vision, encoder, encoder_block))
    return t


def keras_lora_layers(cfg: PaliGemmaConfig) -> dict[int, tuple[str, int]]:
    """Weighted-layer indices: embedding, ViT, projector, ViT encoder, its layers (from 4), patch and position
    embeddings, final ViT norm, then the decoder blocks (from 8 past the ViT's layers)."""
    return keras_image_lora_layers(cfg, 4, 8)


def keras_image_lora_layers(cfg: Any, vit_first: int, decoder_first: int) -> dict[int, tuple[str, int]]:
    """Weighted-layer indices of a keras-hub backbone's SigLIP ViT layers, the first at ``vit_first``, and of
    its Gemma decoder blocks, the first at ``decoder_first`` past the ViT's layers."""
    out = vision.keras_lora_layers(cfg.vision, vit_first)
    first = decoder_first + len(vision.KERAS_BLOCK_ORDER) * cfg.vision.depth
    out.update(gemma_keras.decoder_lora_layers(cfg.text, first))
    return out


KERAS = KerasSpec(classes=("PaliGemmaBackbone",), accepts=lambda name, c: True, from_config=keras_config,
                  to_config=to_keras_config, table=keras_table, lora_layers=keras_lora_layers)


# ---- the family ----------------------------------------------------------------------------------------------


def image_family(namespace: Mapping[str, Any], name: str, config_type: Any, **fields: Any) -> Family:
    """Register an image family over the Gemma decoder from its module's ``globals()``: the functions as
    :func:`~gemmax.models.base.family_from` finds them, the config's ``from_dict``, the module's ``PRESETS``,
    ``PRESET_REPOS``, ``HF_ALIASES``, ``HF_IGNORABLE``, ``tiny_config``, ``encode_prompt`` and ``KERAS``, images
    as ``pixel_values`` with ``token_type_ids``, both backends, and text blocks on the cache by the Gemma
    family's ``extend`` / ``commit``; ``fields`` give the rest."""
    return register(family_from(
        namespace, name, config_type=config_type, config_from_dict=config_type.from_dict,
        presets=namespace["PRESETS"], preset_repos=namespace["PRESET_REPOS"], hf_aliases=namespace["HF_ALIASES"],
        hf_ignorable=namespace["HF_IGNORABLE"], extra_inputs=("pixel_values", "token_type_ids"),
        backends=(XLA, CPU), extend=extend_text, commit=commit_text, tiny_config=namespace["tiny_config"],
        encode_prompt=namespace["encode_prompt"], keras=namespace["KERAS"], **fields))


FAMILY = image_family(
    globals(), "paligemma", PaliGemmaConfig,
    model_types=("paligemma",),
    hf_architecture="PaliGemmaForConditionalGeneration",
    chat_format=lambda cfg: "paligemma",  # no chat turns: the last user message's text is the task prompt
    token_inputs={"token_type_ids": 1},  # after the prefix: causal
)
