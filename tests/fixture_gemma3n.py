"""The acceptance matrix's Gemma 3n fixture: a tiny ``Gemma3nForCausalLM`` with every feature on, written in the
published checkpoints' layout (google/gemma-3n-E2B: the decoder under ``model.language_model.*``, no head).

Five layers (sliding, full, sliding, sliding, full) of which the last two share the keys and values of layers 3
(sliding) and 1 (full); three AltUp streams; LAuReL rank 4; sparse gates (0.95, 0.9) on the first two layers;
per-layer inputs of width 8 over the whole vocabulary; a window of 8 under sequences of 20.
"""

from __future__ import annotations

from typing import Any

from matrix_fixtures import BOS, EOS, PAD, FamilyFixture, Vocab, register_fixture


def _config(v: Vocab) -> Any:
    import transformers as tf

    return tf.Gemma3nTextConfig(
        vocab_size=v.size, hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention",
                     "full_attention"],
        vocab_size_per_layer_input=v.size, hidden_size_per_layer_input=8, altup_num_inputs=3, laurel_rank=4,
        num_kv_shared_layers=2, activation_sparsity_pattern=[0.95, 0.9, 0.0, 0.0, 0.0],
        final_logit_softcapping=30.0, bos_token_id=BOS, eos_token_id=[EOS, v.eot], pad_token_id=PAD)


def published(key: str) -> str | None:
    """transformers 5's ``Gemma3nForCausalLM`` key -> the multimodal checkpoints' key (None: the tied head)."""
    if key == "lm_head.weight":
        return None
    return "model.language_model." + key[len("model."):] if key.startswith("model.") else key


register_fixture(FamilyFixture(
    name="gemma3n", hf_config=_config, tuning=(0.06, 0.08, 0),
    expected_keys=("model.language_model.embed_tokens.weight", "model.language_model.embed_tokens_per_layer.weight",
                   "model.language_model.altup_projections.0.weight",
                   "model.language_model.layers.0.altup.prediction_coefs.weight",
                   "model.language_model.layers.4.laurel.linear_left.weight",
                   "model.language_model.layers.2.self_attn.v_proj.weight"),
    layout=published))
