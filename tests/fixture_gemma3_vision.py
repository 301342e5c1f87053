"""The matrix fixture of Gemma 3 with images (``Gemma3ForConditionalGeneration``, family ``gemma3_vision``).

A tiny SigLIP (28 px images of 4 x 4 patches of 7 px, pooled 2 x 2 to 4 soft tokens per image) and a tiny
Gemma 3 decoder (two local layers with a window of 8, one global; linear rope scaling on the global one).
The image ids are the tiny vocabulary's: ``<image>`` is the soft token, the last two ordinary pieces are
``<start_of_image>`` / ``<end_of_image>`` (prompts draw their text below them). Each prompt holds one image
block inside text, laid out as ``Gemma3Processor`` writes it (newlines, begin, soft tokens, end, newlines),
and is longer than the window; the logits rows hold two images (one each, different text).

Saved in the published layout of google/gemma-3-*: ``language_model.model.*``, ``vision_tower.vision_model.*``,
``multi_modal_projector.mm_input_projection_weight`` / ``mm_soft_emb_norm.weight``, no ``lm_head`` (tied),
in shards.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matrix_fixtures import BOS, EOS, PAD, FamilyFixture, Inputs, Vocab, register_fixture

TOKENS_PER_IMAGE = 4


def _ids(v: Vocab) -> tuple[int, int, int]:
    """(soft token, begin of image, end of image)."""
    return v.image, v.size - 2, v.size - 1


def _config(v: Vocab) -> Any:
    import transformers as tf

    image, boi, eoi = _ids(v)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
                  patch_size=7, vision_use_head=False)
    text = dict(vocab_size=v.size, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=256, rms_norm_eps=1e-6,
                hidden_activation="gelu_pytorch_tanh", sliding_window=8, query_pre_attn_scalar=8,
                layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                                 "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
                bos_token_id=BOS, eos_token_id=[EOS, v.eot], pad_token_id=PAD, tie_word_embeddings=True)
    return tf.Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=TOKENS_PER_IMAGE,
                           image_token_index=image, boi_token_index=boi, eoi_token_index=eoi)


def _published(key: str) -> str | None:
    """transformers 5 save key -> google/gemma-3-* key (None: drop it)."""
    if key in ("lm_head.weight", "language_model.lm_head.weight"):
        return None  # tied to the embedding; the published repos have no head
    for new, old in (("model.language_model.", "language_model.model."),
                     ("model.vision_tower.", "vision_tower.vision_model."),
                     ("model.multi_modal_projector.", "multi_modal_projector.")):
        if key.startswith(new):
            return old + key[len(new):]
    if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
        return "vision_tower.vision_model." + key[len("vision_tower."):]
    return key


def _inputs(cfg: Any, v: Vocab, rng: np.random.RandomState) -> Inputs:
    """``<bos>`` 3 pieces, ``\\n\\n <boi> <image>*4 <eoi> \\n\\n``, 4 pieces (18 tokens, the prompt), then 5
    more pieces in the logits rows; the second row has other text around the same block."""
    image, boi, eoi = _ids(v)
    top = v.size - 2  # text stays below the two image ids

    def prompt_of(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        block = [v.newline, v.newline, boi, *[image] * TOKENS_PER_IMAGE, eoi, v.newline, v.newline]
        return np.concatenate([[BOS], a, block, b]).astype(np.int32)

    prompt = prompt_of(rng.randint(v.first, top, 3), rng.randint(v.first, top, 4))
    other = prompt_of(rng.randint(v.first, top, 3), rng.randint(v.first, top, 4))
    ids = np.concatenate([np.stack([prompt, other]), rng.randint(v.first, top, (2, 5))], 1).astype(np.int32)
    size = cfg.vision_config.image_size
    pixels = rng.uniform(-1, 1, (1, 3, size, size)).astype(np.float32)  # already normalized as SigLIP's
    return Inputs(ids, prompt, pixels, (ids == image).astype(np.int32), (prompt == image).astype(np.int32))


register_fixture(FamilyFixture(
    name="gemma3_vision", hf_config=_config, tuning=(0.06, 0.15, 9),
    expected_keys=("language_model.model.layers.0.self_attn.q_norm.weight",
                   "language_model.model.embed_tokens.weight", "language_model.model.norm.weight",
                   "vision_tower.vision_model.embeddings.patch_embedding.weight",
                   "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight",
                   "vision_tower.vision_model.post_layernorm.weight",
                   "multi_modal_projector.mm_input_projection_weight",
                   "multi_modal_projector.mm_soft_emb_norm.weight"),
    hf_class="Gemma3ForConditionalGeneration", layout=_published, sharded=True, multimodal=True,
    inputs=_inputs))
