"""Tiny randomly initialised transformers checkpoints of every decoder family, for parity tests.

Every RMSNorm weight gets random non-zero values: Gemma's zero-initialised ``(1 + w)`` norms would
otherwise hide a missing or doubled offset.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gemmax.models.gemma.config import tiny_config, to_hf_config


def hf_model(family: str, seed: int = 0, **overrides):
    """(transformers model in float32 eval mode, gemmax config) for a tiny config of ``family``."""
    import transformers

    cfg = tiny_config(family, **overrides)
    hf_cfg = to_hf_config(cfg)
    model_type = hf_cfg.pop("model_type")
    hf_cfg.pop("architectures")
    config_cls = transformers.AutoConfig.for_model(model_type, **hf_cfg)
    config_cls._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config_cls, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.5)
            else:
                p.copy_(torch.randn_like(p) * 0.08)
    model.eval()
    return model, cfg


def save_hf(model, folder: Path) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    return folder


#: the training text of the image families' tiny tokenizers (prompts and captions about a test picture)
CAPTION_LINES = ["describe the picture please", "a red square on a blue background", "what is in this image"] * 30


def picture(seed: int = 0, h: int = 40, w: int = 52) -> np.ndarray:
    """A deterministic RGB test picture [h, w, 3] uint8: gradients plus seeded noise, so each pixel matters."""
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 4, y * 5, (x + y) * 2], -1) + rng.randint(0, 40, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)
