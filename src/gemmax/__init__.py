"""gemmax: the Gemma family (and Llama 3) in JAX — load, run, shard, fine-tune, serve.

The public surface is small: ``CausalLM`` (load / generate / fine-tune / export), ``TextEncoder`` (sentence
embeddings: EmbeddingGemma), ``presets()``, the config
objects, and the ``distribution`` module. Everything else lives in modules named by concern.
"""

from gemmax.api import CausalLM, presets
from gemmax.encoder import TextEncoder
from gemmax.models.gemma.config import PRESETS, ModelConfig, get_preset, tiny_config

__version__ = "0.1.0"

__all__ = ["CausalLM", "TextEncoder", "ModelConfig", "PRESETS", "get_preset", "presets", "tiny_config", "__version__"]
