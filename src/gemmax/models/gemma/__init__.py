"""The Gemma decoder family: Gemma 1, CodeGemma, Gemma 2, Gemma 3 (text) and Llama 3.

One config type describes all of them (their differences are data: layer pattern, soft-caps, norm offset,
activation...), so one scanned forward serves them all. This module registers the family.
"""

from gemmax.models.base import CPU, CUDNN, XLA, GGUFSpec, KerasSpec, family_from, register
from gemmax.models.gemma import decode, extend, gguf, hf, keras, model
from gemmax.models.gemma.config import (
    HF_DECODER_TYPES,
    PRESET_HF_REPOS,
    PRESETS,
    ModelConfig,
    from_hf_config,
    tiny_config,
    to_hf_config,
)

#: llama.cpp's architecture name of each decoder variant
GGUF_ARCHS = {"gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3", "llama": "llama"}

FAMILY = register(family_from(
    {**vars(model), **vars(decode), **vars(hf)}, "gemma",
    # "gemma3" (Gemma3ForConditionalGeneration, with its SigLIP tower) loads as the gemma3_vision family;
    # from_hf_config still reads such a config's text part when asked directly
    model_types=tuple(t for t in HF_DECODER_TYPES if t != "gemma3"),
    config_type=ModelConfig,
    from_hf_config=from_hf_config, to_hf_config=to_hf_config, config_from_dict=ModelConfig.from_dict,
    presets=PRESETS, preset_repos=PRESET_HF_REPOS, tiny_config=tiny_config,
    hf_aliases=hf.HF_ALIASES, hf_ignorable=hf.HF_IGNORABLE,
    gguf_arch=lambda cfg: GGUF_ARCHS.get(cfg.family),
    gguf=GGUFSpec(archs=gguf.SUPPORTED_ARCHS, read=gguf.read_gguf, write=gguf.write_gguf),
    chat_format=lambda cfg: "llama3" if cfg.family == "llama" else "gemma",
    backends=(XLA, CPU, CUDNN),
    shared_prefix=True,
    extend=extend.extend,
    commit=extend.commit,
    keras=KerasSpec(classes=("GemmaBackbone", "Gemma3Backbone", "Llama3Backbone"), accepts=keras.accepts,
                    from_config=keras.gemma_text_config, to_config=keras.to_keras_config, table=keras.keras_table,
                    lora_layers=keras.decoder_lora_layers),
))

__all__ = ["FAMILY", "ModelConfig", "PRESETS", "tiny_config"]
