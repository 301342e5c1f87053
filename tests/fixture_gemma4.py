"""The matrix fixture of Gemma 4 text (``Gemma4ForCausalLM``, family ``gemma4``): one tiny config with every
feature on.

Six layers (local, local, global) x 2 with a window of 8 under 20-token rows: local layers head dim 8 with 2
KV heads, global layers head dim 16 with 1 KV head whose values are the key projection (``attention_k_eq_v``)
and proportional RoPE on a quarter of the head; 4 experts (top 2) beside the dense MLP in every layer;
per-layer embeddings of width 8; the last three layers read the keys and values of layers 1 (local) and 2
(global), with double-wide MLPs; final soft-cap 30. ``adjust`` gives every layer its own output scalar
(transformers initialises them to one, which would hide a lost one).

Saved as transformers writes ``Gemma4ForCausalLM`` (``model.layers.*``, ``model.embed_tokens_per_layer``...)
without the tied ``lm_head``.
"""

from __future__ import annotations

from typing import Any

import torch
from matrix_fixtures import BOS, EOS, PAD, FamilyFixture, Vocab, register_fixture


def _config(v: Vocab) -> Any:
    import transformers as tf

    return tf.Gemma4TextConfig(
        vocab_size=v.size, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, global_head_dim=16, num_global_key_value_heads=1, attention_k_eq_v=True,
        sliding_window=8, layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
        final_logit_softcapping=30.0, hidden_size_per_layer_input=8, vocab_size_per_layer_input=v.size,
        num_kv_shared_layers=3, use_double_wide_mlp=True, enable_moe_block=True, num_experts=4, top_k_experts=2,
        moe_intermediate_size=16, max_position_embeddings=256, rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh", bos_token_id=BOS, eos_token_id=[EOS, v.eot], pad_token_id=PAD,
        tie_word_embeddings=True)


def _adjust(model: torch.nn.Module, g: torch.Generator) -> None:
    """Per-layer output scalars in [0.6, 1.4] (buffers, so ``_randomize`` leaves them at one)."""
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(0.6 + 0.8 * torch.rand(b.shape, generator=g))


register_fixture(FamilyFixture(
    name="gemma4",
    hf_config=_config,
    tuning=(1.0, 0.3, 1),
    expected_keys=("model.embed_tokens.weight", "model.embed_tokens_per_layer.weight",
                   "model.per_layer_model_projection.weight", "model.layers.0.self_attn.v_proj.weight",
                   "model.layers.2.self_attn.k_proj.weight", "model.layers.2.layer_scalar",
                   "model.layers.0.experts.gate_up_proj", "model.layers.0.router.per_expert_scale",
                   "model.layers.3.per_layer_input_gate.weight", "model.layers.5.mlp.down_proj.weight"),
    layout=lambda key: None if key == "lm_head.weight" else key,
    adjust=_adjust,
))
