"""Gemma 4 text (``gemma4_text``, and ``gemma4`` checkpoints without a vision tower) as a registered family:
dense 31B, 26B-A4B mixture of experts, E2B / E4B with per-layer embeddings and KV sharing, all one config;
and Gemma 4 with images (``gemma4`` checkpoints with a ``vision_config``) as the family ``gemma4_vision``
(see docs/gemma4.md)."""

from gemmax.models.base import XLA, GGUFSpec, family_from, register
from gemmax.models.gemma4 import decode, gguf, hf, mmproj, model, vision
from gemmax.models.gemma4.config import (
    HF_MODEL_TYPES,
    PRESET_HF_REPOS,
    PRESETS,
    Gemma4Config,
    from_hf_config,
    tiny_config,
    to_hf_config,
)

FAMILY = register(family_from(
    {**vars(model), **vars(decode), **vars(hf)}, "gemma4",
    model_types=HF_MODEL_TYPES,
    config_type=Gemma4Config,
    from_hf_config=from_hf_config, to_hf_config=to_hf_config, config_from_dict=Gemma4Config.from_dict,
    presets=PRESETS, preset_repos=PRESET_HF_REPOS, tiny_config=tiny_config,
    hf_aliases=hf.HF_ALIASES, hf_ignorable=hf.HF_IGNORABLE, hf_unused=hf.hf_unused,
    hf_architecture="Gemma4ForCausalLM",
    gguf_arch=lambda cfg: gguf.ARCH,
    gguf=GGUFSpec(archs=(gguf.ARCH,), read=gguf.read, write=gguf.write),
    chat_format=lambda cfg: "gemma4",
    backends=(XLA,),
    hf_accepts=lambda c: not vision.accepts_hf(c),
))

VISION_FAMILY = register(family_from(
    vars(vision), "gemma4_vision",
    model_types=("gemma4",),
    config_type=vision.Gemma4VisionConfig,
    config_from_dict=vision.Gemma4VisionConfig.from_dict, tiny_config=vision.tiny_config,
    presets=vision.PRESETS, preset_repos=vision.PRESET_REPOS,
    hf_ignorable=vision.HF_IGNORABLE, hf_unused=vision.hf_unused, hf_accepts=vision.accepts_hf,
    hf_architecture="Gemma4ForConditionalGeneration",
    gguf_arch=lambda cfg: mmproj.TEXT_ARCH,
    gguf=GGUFSpec(archs=(), read=mmproj.read, write=mmproj.write, projectors=(mmproj.PROJECTOR_TYPE,)),
    chat_format=lambda cfg: "gemma4",
    extra_inputs=("pixel_values", "image_position_ids", "mm_token_type_ids"),
    token_inputs={"mm_token_type_ids": 0},  # text after the prompt: no image block
    backends=(XLA,),
    encode_prompt=vision.encode_prompt,
    check_inputs=vision.check_inputs,
))

__all__ = ["FAMILY", "VISION_FAMILY", "Gemma4Config", "PRESETS", "tiny_config"]
