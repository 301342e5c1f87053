"""Gemma 4 text (``gemma4_text`` / the text decoder of multimodal ``gemma4`` checkpoints) as a registered
family: dense 31B, 26B-A4B mixture of experts, E2B / E4B with per-layer embeddings and KV sharing, all one
config (see docs/gemma4.md)."""

from gemmax.models.base import XLA, family_from, register
from gemmax.models.gemma4 import decode, hf, model
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
    from_hf_config=from_hf_config,
    to_hf_config=to_hf_config,
    config_from_dict=Gemma4Config.from_dict,
    presets=PRESETS,
    preset_repos=PRESET_HF_REPOS,
    hf_aliases=hf.HF_ALIASES,
    hf_ignorable=hf.HF_IGNORABLE,
    hf_unused=hf.hf_unused,
    hf_architecture="Gemma4ForCausalLM",
    gguf_arch=lambda cfg: None,
    chat_format=lambda cfg: "gemma4",
    backends=(XLA,),
    tiny_config=tiny_config,
))

__all__ = ["FAMILY", "Gemma4Config", "PRESETS", "tiny_config"]
