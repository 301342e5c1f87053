"""The matrix fixture of Gemma 4 with images (``Gemma4ForConditionalGeneration`` with a vision tower, family
``gemma4_vision``).

The decoder is the text fixture's (tests/fixture_gemma4.py: every feature on, window 8) with
``use_bidirectional_attention="vision"``; the tower has 2 layers of width 32 (grouped heads), clipped linears
and standardized features, 4 px patches pooled 2 x 2. The image is a padded patch grid as
``Gemma4ImageProcessor`` writes it: 36 patch slots (9 soft-token slots), 6 x 4 real patches, so 6 soft tokens
and 12 padding patches. The image ids are the tiny vocabulary's: ``<image>`` is the soft token, the last four
ordinary pieces are ``<|image>`` / ``<image|>`` / video / audio (prompts draw their text below them). Each
prompt holds one image block inside text (begin, soft tokens, end, as ``Gemma4Processor`` writes it) and is
longer than the window; the logits rows hold the image once each, with different text. ``adjust`` sets the
buffers transformers keeps out of the random init: clip bounds that clamp, standardization, layer scalars.

Saved as transformers 5 writes it, which is the published layout of google/gemma-4-*: ``model.language_model.*``,
``model.vision_tower.*``, ``model.embed_vision.*``, no ``lm_head`` (tied), in shards.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from matrix_fixtures import BOS, EOS, PAD, FamilyFixture, Inputs, Vocab, register_fixture

GRID = (6, 4)  # real patch columns, rows
SLOTS = 36  # patch slots of the image row (the processor's budget of 9 soft tokens x 2 x 2)


def _ids(v: Vocab) -> dict[str, int]:
    return {"image_token_id": v.image, "boi_token_id": v.size - 4, "eoi_token_id": v.size - 3,
            "video_token_id": v.size - 2, "audio_token_id": v.size - 1}


def _config(v: Vocab) -> Any:
    import transformers as tf

    text = dict(
        vocab_size=v.size, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, global_head_dim=16, num_global_key_value_heads=1, attention_k_eq_v=True,
        sliding_window=8, layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
        final_logit_softcapping=30.0, hidden_size_per_layer_input=8, vocab_size_per_layer_input=v.size,
        num_kv_shared_layers=3, use_double_wide_mlp=True, enable_moe_block=True, num_experts=4, top_k_experts=2,
        moe_intermediate_size=16, max_position_embeddings=256, rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh", bos_token_id=BOS, eos_token_id=[EOS, v.eot], pad_token_id=PAD,
        tie_word_embeddings=True, use_bidirectional_attention="vision")
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, patch_size=4, pooling_kernel_size=2, position_embedding_size=16,
                  use_clipped_linears=True, standardize=True, rms_norm_eps=1e-6)
    return tf.Gemma4Config(text_config=text, vision_config=vision, audio_config=None, **_ids(v))


def _adjust(model: torch.nn.Module, g: torch.Generator) -> None:
    set_buffers(model, g, clip=1.5)


def set_buffers(model: torch.nn.Module, g: torch.Generator, clip: float) -> None:
    """Clip bounds in +-[clip, clip + 1] (transformers initialises them to infinity), standardization bias and
    scale, per-layer output scalars in [0.6, 1.4]."""
    with torch.no_grad():
        for name, b in model.named_buffers():
            r = torch.rand(b.shape, generator=g)
            if name.endswith(("input_min", "output_min")):
                b.copy_(-clip - r)
            elif name.endswith(("input_max", "output_max")):
                b.copy_(clip + r)
            elif name.endswith("std_bias"):
                b.copy_(r - 0.5)
            elif name.endswith("std_scale"):
                b.copy_(0.5 + r)
            elif name.endswith("layer_scalar"):
                b.copy_(0.6 + 0.8 * r)


def _published(key: str) -> str | None:
    return None if key == "lm_head.weight" else key


def _inputs(cfg: Any, v: Vocab, rng: np.random.RandomState) -> Inputs:
    """``<bos>`` 3 pieces, ``<|image>`` ``<image>`` * 6 ``<image|>``, 4 pieces (16 tokens, the prompt), then 5
    more pieces in the logits rows; the second row has other text around the same block."""
    ids = _ids(v)
    top = v.size - 4  # text stays below the image, video and audio ids
    w, h = GRID
    n_soft = (w // 2) * (h // 2)

    def prompt_of(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        block = [ids["boi_token_id"], *[v.image] * n_soft, ids["eoi_token_id"]]
        return np.concatenate([[BOS], a, block, b]).astype(np.int32)

    prompt = prompt_of(rng.randint(v.first, top, 3), rng.randint(v.first, top, 4))
    other = prompt_of(rng.randint(v.first, top, 3), rng.randint(v.first, top, 4))
    rows = np.concatenate([np.stack([prompt, other]), rng.randint(v.first, top, (2, 5))], 1).astype(np.int32)
    pixels = np.zeros((1, SLOTS, 48), np.float32)
    pixels[0, :w * h] = rng.uniform(0, 1, (w * h, 48))  # patches in [0, 1], as the processor gives them
    positions = np.full((1, SLOTS, 2), -1, np.int64)
    gx, gy = np.meshgrid(np.arange(w), np.arange(h), indexing="xy")
    positions[0, :w * h] = np.stack([gx, gy], -1).reshape(-1, 2)
    return Inputs(rows, prompt, pixels, (rows == v.image).astype(np.int32), (prompt == v.image).astype(np.int32),
                  image_inputs={"image_position_ids": positions})


register_fixture(FamilyFixture(
    name="gemma4_vision", hf_config=_config, tuning=(1.0, 0.3, 2),
    expected_keys=("model.language_model.embed_tokens.weight", "model.language_model.layers.0.self_attn.q_proj.weight",
                   "model.language_model.embed_tokens_per_layer.weight",
                   "model.vision_tower.patch_embedder.input_proj.weight",
                   "model.vision_tower.patch_embedder.position_embedding_table",
                   "model.vision_tower.encoder.layers.0.self_attn.q_proj.linear.weight",
                   "model.vision_tower.encoder.layers.1.mlp.down_proj.output_max",
                   "model.vision_tower.std_bias", "model.embed_vision.embedding_projection.weight"),
    hf_class="Gemma4ForConditionalGeneration", layout=_published, sharded=True, multimodal=True, inputs=_inputs,
    adjust=_adjust, types_name="mm_token_type_ids"))
