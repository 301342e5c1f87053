"""Model-independent building blocks: parameters, layers, LoRA, quantization."""
