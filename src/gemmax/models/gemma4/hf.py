"""Hugging Face names of Gemma 4's text weights: the one name table loading and export use.

The published ``Gemma4ForCausalLM`` layout is ``model.layers.{i}...`` (+ ``model.embed_tokens``,
``model.embed_tokens_per_layer``, ``model.per_layer_model_projection``...); multimodal checkpoints nest it
under ``model.language_model.`` (an alias). Each group's stacked weight maps to one tensor per layer of the
group. Kernels are transposed from torch's ``[out, in]`` and q/k/v/o split into heads; the experts' fused
``gate_up_proj`` ``[E, 2I, D]`` becomes ``[E, D, 2I]`` and ``down_proj`` ``[E, D, I]`` becomes ``[E, I, D]``.
"""

from __future__ import annotations

from collections.abc import Callable

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


def _group_map(cfg: Gemma4Config, group: str) -> dict[str, tuple[str, Callable, Callable]]:
    D, H = cfg.hidden_size, cfg.num_heads
    _, shared, hd, K = group_dims(cfg, group)
    ident = (lambda w: w, lambda w: w)
    tr = (lambda w: w.T, lambda w: w.T)

    def heads_in(n: int):  # [n*hd, D] -> [n, D, hd]
        return (lambda w: w.reshape(n, hd, D).transpose(0, 2, 1),
                lambda w: w.transpose(0, 2, 1).reshape(n * hd, D))

    out_proj = (lambda w: w.reshape(D, H, hd).transpose(1, 2, 0),
                lambda w: w.transpose(2, 0, 1).reshape(D, H * hd))
    scalar = (lambda w: w.reshape(()), lambda w: w.reshape(1))
    swap = (lambda w: w.transpose(0, 2, 1), lambda w: w.transpose(0, 2, 1))
    p = "model.layers.{i}."
    m: dict[str, tuple[str, Callable, Callable]] = {
        "pre_attention_norm/scale": (p + "input_layernorm.weight", *ident),
        "attention/query/kernel": (p + "self_attn.q_proj.weight", *heads_in(H)),
        "attention/query_norm/scale": (p + "self_attn.q_norm.weight", *ident),
        "attention/attention_output/kernel": (p + "self_attn.o_proj.weight", *out_proj),
        "post_attention_norm/scale": (p + "post_attention_layernorm.weight", *ident),
        "pre_ffw_norm/scale": (p + "pre_feedforward_layernorm.weight", *ident),
        "post_ffw_norm/scale": (p + "post_feedforward_layernorm.weight", *ident),
        "ffw_gating/kernel": (p + "mlp.gate_proj.weight", *tr),
        "ffw_gating_2/kernel": (p + "mlp.up_proj.weight", *tr),
        "ffw_linear/kernel": (p + "mlp.down_proj.weight", *tr),
        "layer_scalar": (p + "layer_scalar", *scalar),
    }
    if not shared:
        m["attention/key/kernel"] = (p + "self_attn.k_proj.weight", *heads_in(K))
        m["attention/key_norm/scale"] = (p + "self_attn.k_norm.weight", *ident)
        if has_value_proj(cfg, group):
            m["attention/value/kernel"] = (p + "self_attn.v_proj.weight", *heads_in(K))
    if cfg.num_experts:
        m.update({
            "router/kernel": (p + "router.proj.weight", *tr),
            "router/scale": (p + "router.scale", *ident),
            "router/expert_scale": (p + "router.per_expert_scale", *ident),
            "experts/gate_up/kernel": (p + "experts.gate_up_proj", *swap),
            "experts/down/kernel": (p + "experts.down_proj", *swap),
            "post_ffw_norm_1/scale": (p + "post_feedforward_layernorm_1.weight", *ident),
            "pre_ffw_norm_2/scale": (p + "pre_feedforward_layernorm_2.weight", *ident),
            "post_ffw_norm_2/scale": (p + "post_feedforward_layernorm_2.weight", *ident),
        })
    if cfg.ple_dim:
        m.update({
            "ple_gate/kernel": (p + "per_layer_input_gate.weight", *tr),
            "ple_projection/kernel": (p + "per_layer_projection.weight", *tr),
            "post_ple_norm/scale": (p + "post_per_layer_input_norm.weight", *ident),
        })
    return m


def hf_table(cfg: Gemma4Config) -> dict[str, Entry]:
    """gemmax path -> (HF name, or one per stacked layer; HF -> gemmax; gemmax -> HF)."""
    ident = (lambda w: w, lambda w: w)
    table: dict[str, Entry] = {
        "token_embedding/embeddings": ("model.embed_tokens.weight", *ident),
        "final_normalization/scale": ("model.norm.weight", *ident),
    }
    if cfg.ple_dim:
        table["per_layer_embedding/embeddings"] = ("model.embed_tokens_per_layer.weight", *ident)
        table["per_layer_projection/kernel"] = ("model.per_layer_model_projection.weight",
                                                lambda w: w.T, lambda w: w.T)
        table["per_layer_projection_norm/scale"] = ("model.per_layer_projection_norm.weight", *ident)
    for g, ids in cfg.group_layers().items():
        for sub, (tmpl, fwd, inv) in _group_map(cfg, g).items():
            table[f"decoder_block/{g}/{sub}"] = ([tmpl.format(i=i) for i in ids], fwd, inv)
    return table
