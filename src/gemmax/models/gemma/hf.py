"""Hugging Face names of the Gemma decoder's weights: the one name table loading and export use.

Each stacked weight maps to one transformers tensor per layer; kernels are transposed from torch's
``[out, in]`` and q/k/v/o are split into heads. The published Hub layout (``model.layers.{i}...``) is the
one written; the prefixes multimodal wrappers put in front of the decoder are read as aliases.
"""

from __future__ import annotations

from collections.abc import Callable

from gemmax.models.base import HF_SAME, HF_TRANSPOSED, hf_heads_in, hf_heads_out
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


#: One layer's weight: HF name after ``model.layers.{i}.``, then the layout transforms.
LayerEntry = tuple[str, Callable, Callable]


def norm_entries(names: dict[str, str]) -> dict[str, LayerEntry]:
    """RMSNorm weights, gemmax norm -> HF module (``<norm>/scale`` <-> ``<module>.weight``, as stored)."""
    return {f"{norm}/scale": (f"{module}.weight", *HF_SAME) for norm, module in names.items()}


def layer_entries(num_heads: int, head_dim: int, width: int, *, qk_norm: bool = True,
                  post_norms: bool = True) -> dict[str, LayerEntry]:
    """The weights every Gemma text decoder layer has: the query and output projections, the norms and the
    gated MLP (keys and values: :func:`kv_entries`, which some layers lack).

    ``post_norms``: Gemma 2 and later's norms after attention and after the MLP; without them (Gemma 1,
    Llama) transformers calls the pre-MLP norm ``post_attention_layernorm``."""
    H, hd, D = num_heads, head_dim, width
    if post_norms:
        norms = {"pre_attention_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
                 "pre_ffw_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
    else:
        norms = {"pre_attention_norm": "input_layernorm", "pre_ffw_norm": "post_attention_layernorm"}
    if qk_norm:
        norms["attention/query_norm"] = "self_attn.q_norm"
    m = norm_entries(norms)
    m["attention/query/kernel"] = ("self_attn.q_proj.weight", *hf_heads_in(H, hd, D))
    m["attention/attention_output/kernel"] = ("self_attn.o_proj.weight", *hf_heads_out(H, hd, D))
    for gemmax_name, proj in (("ffw_gating", "gate"), ("ffw_gating_2", "up"), ("ffw_linear", "down")):
        m[f"{gemmax_name}/kernel"] = (f"mlp.{proj}_proj.weight", *HF_TRANSPOSED)
    return m


def kv_entries(num_kv_heads: int, head_dim: int, width: int, *, qk_norm: bool = True,
               values: bool = True) -> dict[str, LayerEntry]:
    """The key projection (and its norm) and, with ``values``, the value projection of a decoder layer."""
    m = {"attention/key/kernel": ("self_attn.k_proj.weight", *hf_heads_in(num_kv_heads, head_dim, width))}
    if qk_norm:
        m["attention/key_norm/scale"] = ("self_attn.k_norm.weight", *HF_SAME)
    if values:
        m["attention/value/kernel"] = ("self_attn.v_proj.weight", *hf_heads_in(num_kv_heads, head_dim, width))
    return m


def _top_map(cfg: ModelConfig) -> dict[str, tuple[str, Callable, Callable]]:
    m = {
        "token_embedding/embeddings": ("model.embed_tokens.weight", *HF_SAME),
        "final_normalization/scale": ("model.norm.weight", *HF_SAME),
    }
    if not cfg.tie_embeddings:
        m["lm_head/kernel"] = ("lm_head.weight", *HF_TRANSPOSED)
    return m


def hf_table(cfg: ModelConfig) -> dict[str, tuple[str | list[str], Callable, Callable]]:
    """gemmax path -> (HF name, or one per layer; HF -> gemmax; gemmax -> HF)."""
    table: dict[str, tuple[str | list[str], Callable, Callable]] = dict(_top_map(cfg))
    layer = {**layer_entries(cfg.num_heads, cfg.head_dim, cfg.hidden_size, qk_norm=cfg.use_qk_norm,
                             post_norms=cfg.use_post_norms),
             **kv_entries(cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size, qk_norm=cfg.use_qk_norm)}
    for sub, (name, fwd, inv) in layer.items():
        table["decoder_block/" + sub] = ([f"model.layers.{i}.{name}" for i in range(cfg.num_layers)], fwd, inv)
    return table
