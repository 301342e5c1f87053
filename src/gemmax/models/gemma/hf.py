"""Hugging Face names of the Gemma decoder's weights: the one name table loading and export use.

Each stacked weight maps to one transformers tensor per layer; kernels are transposed from torch's
``[out, in]`` and q/k/v/o are split into heads. The published Hub layout (``model.layers.{i}...``) is the
one written; the prefixes multimodal wrappers put in front of the decoder are read as aliases.
"""

from __future__ import annotations

from collections.abc import Callable

from gemmax.models.gemma.config import ModelConfig

#: Prefixes of other published layouts -> the table's: Gemma 3 / PaliGemma wrappers nest the decoder.
HF_ALIASES = (
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("language_model.", "model."),
)

#: Tensors a decoder checkpoint may carry that the text model does not use: rotary buffers, a tied
#: model's copy of the embedding as lm_head, and the towers of a multimodal checkpoint read text-only.
HF_IGNORABLE = ("rotary_emb.inv_freq", "vision_tower", "multi_modal_projector", "lm_head.weight")


def _layer_map(cfg: ModelConfig) -> dict[str, tuple[str, Callable, Callable]]:
    H, K, hd, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    ident = (lambda w: w, lambda w: w)

    def heads_in(n: int):  # [n*hd, D] -> [n, D, hd]
        return (lambda w: w.reshape(n, hd, D).transpose(0, 2, 1),
                lambda w: w.transpose(0, 2, 1).reshape(n * hd, D))

    out_proj = (lambda w: w.reshape(D, H, hd).transpose(1, 2, 0),
                lambda w: w.transpose(2, 0, 1).reshape(D, H * hd))
    tr = (lambda w: w.T, lambda w: w.T)
    p = "model.layers.{i}."
    m: dict[str, tuple[str, Callable, Callable]] = {
        "pre_attention_norm/scale": (p + "input_layernorm.weight", *ident),
        "attention/query/kernel": (p + "self_attn.q_proj.weight", *heads_in(H)),
        "attention/key/kernel": (p + "self_attn.k_proj.weight", *heads_in(K)),
        "attention/value/kernel": (p + "self_attn.v_proj.weight", *heads_in(K)),
        "attention/attention_output/kernel": (p + "self_attn.o_proj.weight", *out_proj),
        "ffw_gating/kernel": (p + "mlp.gate_proj.weight", *tr),
        "ffw_gating_2/kernel": (p + "mlp.up_proj.weight", *tr),
        "ffw_linear/kernel": (p + "mlp.down_proj.weight", *tr),
    }
    if cfg.use_qk_norm:
        m["attention/query_norm/scale"] = (p + "self_attn.q_norm.weight", *ident)
        m["attention/key_norm/scale"] = (p + "self_attn.k_norm.weight", *ident)
    if cfg.use_post_norms:
        # Gemma 2/3: "post_attention_layernorm" really is after attention; the MLP has its own pre-norm.
        m["post_attention_norm/scale"] = (p + "post_attention_layernorm.weight", *ident)
        m["pre_ffw_norm/scale"] = (p + "pre_feedforward_layernorm.weight", *ident)
        m["post_ffw_norm/scale"] = (p + "post_feedforward_layernorm.weight", *ident)
    else:
        # Gemma 1 / Llama: HF calls the pre-MLP norm "post_attention_layernorm".
        m["pre_ffw_norm/scale"] = (p + "post_attention_layernorm.weight", *ident)
    return m


def _top_map(cfg: ModelConfig) -> dict[str, tuple[str, Callable, Callable]]:
    ident = (lambda w: w, lambda w: w)
    m = {
        "token_embedding/embeddings": ("model.embed_tokens.weight", *ident),
        "final_normalization/scale": ("model.norm.weight", *ident),
    }
    if not cfg.tie_embeddings:
        m["lm_head/kernel"] = ("lm_head.weight", lambda w: w.T, lambda w: w.T)
    return m


def hf_table(cfg: ModelConfig) -> dict[str, tuple[str | list[str], Callable, Callable]]:
    """gemmax path -> (HF name, or one per layer; HF -> gemmax; gemmax -> HF)."""
    table: dict[str, tuple[str | list[str], Callable, Callable]] = dict(_top_map(cfg))
    for sub, (tmpl, fwd, inv) in _layer_map(cfg).items():
        table["decoder_block/" + sub] = ([tmpl.format(i=i) for i in range(cfg.num_layers)], fwd, inv)
    return table
