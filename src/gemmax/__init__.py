"""gemmax: the Gemma family (and Llama 3) in JAX — load, run, shard, fine-tune, serve."""

from gemmax.config import PRESETS, ModelConfig, get_preset, tiny_config

__version__ = "0.1.0"

__all__ = ["ModelConfig", "PRESETS", "get_preset", "tiny_config", "__version__"]
