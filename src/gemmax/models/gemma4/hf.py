"""Hugging Face names of Gemma 4's text weights: the one name table loading and export use.

The published ``Gemma4ForCausalLM`` layout is ``model.layers.{i}...`` (+ ``model.embed_tokens``,
``model.embed_tokens_per_layer``, ``model.per_layer_model_projection``...); multimodal checkpoints nest it
under ``model.language_model.`` (an alias). Each group's stacked weight maps to one tensor per layer of the
group. Kernels are transposed from torch's ``[out, in]`` and q/k/v/o split into heads; the experts' fused
``gate_up_proj`` ``[E, 2I, D]`` becomes ``[E, D, 2I]`` and ``down_proj`` ``[E, D, I]`` becomes ``[E, I, D]``.
"""

from __future__ import annotations

from collections.abc import Callable

from gemmax.models.base import HF_SAME, HF_TRANSPOSED
from gemmax.models.gemma.hf import LayerEntry, kv_entries, layer_entries, norm_entries
from gemmax.models.gemma4.config import Gemma4Config
from gemmax.models.gemma4.model import group_dims, has_value_proj

#: Prefixes of other published layouts -> the table's: multimodal Gemma 4 nests the text decoder.
HF_ALIASES = (("model.language_model.", "model."),)

#: Tensors a checkpoint may carry that the text model does not use: rotary buffers, the tied head, the vision
#: and audio towers of a multimodal checkpoint.
HF_IGNORABLE = ("rotary_emb.inv_freq", "lm_head.weight", "vision_tower", "audio_tower", "embed_vision",
                "embed_audio")


def hf_unused(cfg: Gemma4Config) -> tuple[str, ...]:
    """The key / value weights a published checkpoint may carry for layers that read shared keys and values
    (transformers skips them too), and a value projection beside k = v: skipped by name, in either layout."""
    out = [f"layers.{i}.self_attn.{m}." for i in range(cfg.first_shared, cfg.num_layers)
           for m in ("k_proj", "v_proj", "k_norm", "v_norm")]
    if cfg.attention_k_eq_v:
        out += [f"layers.{i}.self_attn.v_proj." for i in range(cfg.first_shared) if cfg.layer_types[i] == "global"]
    return tuple(out)

Entry = tuple[str | list[str], Callable, Callable]


def _group_map(cfg: Gemma4Config, group: str) -> dict[str, LayerEntry]:
    _, shared, hd, K = group_dims(cfg, group)
    m = layer_entries(cfg.num_heads, hd, cfg.hidden_size)
    m["layer_scalar"] = ("layer_scalar", lambda w: w.reshape(()), lambda w: w.reshape(1))
    if not shared:
        m.update(kv_entries(K, hd, cfg.hidden_size, values=has_value_proj(cfg, group)))
    if cfg.num_experts:
        swap = (lambda w: w.transpose(0, 2, 1), lambda w: w.transpose(0, 2, 1))
        m["router/kernel"] = ("router.proj.weight", *HF_TRANSPOSED)
        m["router/scale"] = ("router.scale", *HF_SAME)
        m["router/expert_scale"] = ("router.per_expert_scale", *HF_SAME)
        m["experts/gate_up/kernel"] = ("experts.gate_up_proj", *swap)
        m["experts/down/kernel"] = ("experts.down_proj", *swap)
        m.update(norm_entries({"post_ffw_norm_1": "post_feedforward_layernorm_1",
                               "pre_ffw_norm_2": "pre_feedforward_layernorm_2",
                               "post_ffw_norm_2": "post_feedforward_layernorm_2"}))
    if cfg.ple_dim:
        m["ple_gate/kernel"] = ("per_layer_input_gate.weight", *HF_TRANSPOSED)
        m["ple_projection/kernel"] = ("per_layer_projection.weight", *HF_TRANSPOSED)
        m.update(norm_entries({"post_ple_norm": "post_per_layer_input_norm"}))
    return m


def hf_table(cfg: Gemma4Config) -> dict[str, Entry]:
    """gemmax path -> (HF name, or one per stacked layer; HF -> gemmax; gemmax -> HF)."""
    table: dict[str, Entry] = {
        "token_embedding/embeddings": ("model.embed_tokens.weight", *HF_SAME),
        "final_normalization/scale": ("model.norm.weight", *HF_SAME),
    }
    if cfg.ple_dim:
        table["per_layer_embedding/embeddings"] = ("model.embed_tokens_per_layer.weight", *HF_SAME)
        table["per_layer_projection/kernel"] = ("model.per_layer_model_projection.weight", *HF_TRANSPOSED)
        table["per_layer_projection_norm/scale"] = ("model.per_layer_projection_norm.weight", *HF_SAME)
    for g, ids in cfg.group_layers().items():
        for sub, (name, fwd, inv) in _group_map(cfg, g).items():
            table[f"decoder_block/{g}/{sub}"] = ([f"model.layers.{i}.{name}" for i in ids], fwd, inv)
    return table
