"""keras-hub names of the decoder's weights: ``GemmaBackbone`` (Gemma 1, CodeGemma, Gemma 2),
``Gemma3Backbone`` without a vision encoder (Gemma 3 text) and ``Llama3Backbone``.

Keras' Gemma layouts are gemmax's (per-head ``[heads, hidden, head_dim]`` query/key/value, ``[heads,
head_dim, hidden]`` output, ``[in, out]`` dense kernels, zero-centred norms), so most entries are identities;
Llama 3's query/key/value are ``[hidden, heads, head_dim]``. The configs differ more: ``GemmaBackbone``'s
``intermediate_dim`` is twice the width of each gating branch (Gemma 3's is the width itself), queries are
always scaled by ``head_dim`` (see :func:`_query_scalar`), and Gemma 3 fixes RoPE's wavelengths (10k local,
1M global) with a scaling factor for each.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from gemmax.models.gemma.config import (
    GLOBAL,
    LOCAL,
    ModelConfig,
    _gemma2_types,
    _gemma3_types,
)

Entry = tuple[str | list[str], Callable[[Any], Any], Callable[[Any], Any]]

#: Keras' class of the decoder block of each backbone: its snake-cased name is the block's H5 group.
BLOCK_GROUPS = {"gemma": "gemma_decoder_block", "gemma2": "gemma_decoder_block",
                "gemma3": "gemma3_decoder_block", "llama": "llama_transformer_decoder"}

_IDENT = (lambda w: w, lambda w: w)
_SWAP01 = (lambda w: w.transpose(1, 0, 2), lambda w: w.transpose(1, 0, 2))

_MODULES = {
    "GemmaBackbone": ("keras_hub.src.models.gemma.gemma_backbone", "GemmaCausalLM",
                      ("keras_hub.src.models.gemma.gemma_tokenizer", "GemmaTokenizer")),
    "Gemma3Backbone": ("keras_hub.src.models.gemma3.gemma3_backbone", "Gemma3CausalLM",
                       ("keras_hub.src.models.gemma3.gemma3_tokenizer", "Gemma3Tokenizer")),
    "Llama3Backbone": ("keras_hub.src.models.llama3.llama3_backbone", "Llama3CausalLM",
                       ("keras_hub.src.models.llama3.llama3_tokenizer", "Llama3Tokenizer")),
}


def block_names(group: str, n: int, prefix: str = "layers/") -> list[str]:
    """H5 groups of ``n`` layers of one class, as Keras names them: ``x``, ``x_1``, ``x_2``..."""
    return [f"{prefix}{group}" + (f"_{i}" if i else "") for i in range(n)]


# ---- config --------------------------------------------------------------------------------------


def _query_scalar(c: Mapping[str, Any]) -> float:
    """keras-hub 0.32's decoder blocks (Gemma, Gemma 3, PaliGemma) build their attention with
    ``query_head_dim_normalize=True`` whatever the backbone's config says, so a preset's queries are scaled by
    ``head_dim ** -0.5``: that is what its weights are run with, and what gemmax reads them as."""
    return float(c["head_dim"])


def query_fold(cfg: ModelConfig) -> float:
    """The factor a query must carry for Keras' ``head_dim ** -0.5`` scaling to give this config's
    ``query_pre_attn_scalar ** -0.5`` (1 for every config read from a preset; Gemma 2/3 27B's otherwise)."""
    return math.sqrt(cfg.head_dim / (cfg.query_pre_attn_scalar or cfg.head_dim))


def gemma_text_config(class_name: str, c: Mapping[str, Any]) -> ModelConfig:
    """The gemmax config of a ``GemmaBackbone`` / ``Gemma3Backbone`` (its text part) / ``Llama3Backbone``."""
    if class_name == "Llama3Backbone":
        return _llama3_config(c)
    n, d = int(c["num_layers"]), int(c["hidden_dim"])
    post_attn, post_ffw = bool(c.get("use_post_attention_norm")), bool(c.get("use_post_ffw_norm"))
    if post_attn != post_ffw:
        raise ValueError("use_post_attention_norm and use_post_ffw_norm differ; gemmax has both or neither")
    window = int(c.get("sliding_window_size") or 0) if c.get("use_sliding_window_attention") else 0
    common = dict(
        vocab_size=int(c["vocabulary_size"]), hidden_size=d, num_layers=n, num_heads=int(c["num_query_heads"]),
        num_kv_heads=int(c["num_key_value_heads"]), head_dim=int(c["head_dim"]),
        norm_eps=float(c.get("layer_norm_epsilon", 1e-6)), query_pre_attn_scalar=_query_scalar(c),
        attn_logit_softcap=c.get("attention_logit_soft_cap"), final_logit_softcap=c.get("final_logit_soft_cap"),
        use_post_norms=post_attn, name=str(c.get("name", "")),
    )
    if class_name == "GemmaBackbone":
        gemma2 = post_attn or window or c.get("final_logit_soft_cap") or c.get("attention_logit_soft_cap")
        return ModelConfig(
            family="gemma2" if gemma2 else "gemma", intermediate_size=int(c["intermediate_dim"]) // 2,
            sliding_window=window or None, layer_types=_gemma2_types(n) if window else (GLOBAL,) * n,
            eos_token_id=(1, 107) if gemma2 else 1, **common)
    if c.get("use_bidirectional_attention") or c.get("is_embedding_model"):
        raise ValueError("an embedding model (bidirectional attention / pooled output): load it with "
                         "gemmax.TextEncoder")
    if float(c.get("local_rope_scaling_factor", 1.0)) != 1.0:
        raise ValueError("local_rope_scaling_factor != 1: gemmax scales RoPE on global layers only")
    scale = float(c.get("global_rope_scaling_factor", 1.0))
    return ModelConfig(
        family="gemma3", intermediate_size=int(c["intermediate_dim"]), sliding_window=window or None,
        layer_types=_gemma3_types(n) if window else (GLOBAL,) * n, rope_theta=1_000_000.0,
        rope_local_theta=10_000.0, rope_scaling={"rope_type": "linear", "factor": scale} if scale != 1.0 else None,
        use_qk_norm=bool(c.get("use_query_key_norm", True)), max_position_embeddings=131072,
        eos_token_id=(1, 106), **common)


def _llama3_config(c: Mapping[str, Any]) -> ModelConfig:
    d, heads = int(c["hidden_dim"]), int(c["num_query_heads"])
    scaling = None
    if c.get("rope_frequency_adjustment_factor"):
        scaling = {"rope_type": "llama3", "factor": float(c["rope_frequency_adjustment_factor"]),
                   "low_freq_factor": float(c["rope_low_freq_factor"]),
                   "high_freq_factor": float(c["rope_high_freq_factor"]),
                   "original_max_position_embeddings": int(c["rope_pretraining_sequence_length"])}
    elif float(c.get("rope_position_scaling_factor", 1.0)) != 1.0:
        scaling = {"rope_type": "linear", "factor": float(c["rope_position_scaling_factor"])}
    return ModelConfig(
        family="llama", vocab_size=int(c["vocabulary_size"]), hidden_size=d, num_layers=int(c["num_layers"]),
        num_heads=heads, num_kv_heads=int(c["num_key_value_heads"]), head_dim=d // heads,
        intermediate_size=int(c["intermediate_dim"]), norm_eps=float(c.get("layer_norm_epsilon", 1e-6)),
        norm_offset=0.0, activation="silu", rope_theta=float(c.get("rope_max_wavelength", 10000)),
        rope_scaling=scaling, tie_embeddings=bool(c.get("tie_word_embeddings", False)), scale_embeddings=False,
        max_position_embeddings=131072 if scaling else 8192, bos_token_id=128000, eos_token_id=(128001, 128009),
        pad_token_id=128001, name=str(c.get("name", "")))


def _refuse(cfg: ModelConfig, what: str) -> None:
    raise ValueError(f"{cfg.family} config with {what} has no keras-hub backbone")


def gemma_keras_args(cfg: ModelConfig) -> dict[str, Any]:
    """The shared arguments of ``GemmaBackbone`` / ``Gemma3Backbone`` / ``PaliGemmaBackbone`` for a decoder."""
    if cfg.attention_bias:
        _refuse(cfg, "attention biases")
    pattern = {"gemma": _gemma2_types, "gemma2": _gemma2_types, "gemma3": _gemma3_types}[cfg.family]
    windowed = LOCAL in cfg.layer_types
    if windowed and tuple(cfg.layer_types) != pattern(cfg.num_layers):
        _refuse(cfg, f"layer pattern {cfg.layer_types}")
    return {
        "vocabulary_size": cfg.vocab_size, "num_layers": cfg.num_layers, "num_query_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "hidden_dim": cfg.hidden_size, "head_dim": cfg.head_dim,
        "query_head_dim_normalize": True, "use_post_ffw_norm": cfg.use_post_norms,
        "use_post_attention_norm": cfg.use_post_norms, "attention_logit_soft_cap": cfg.attn_logit_softcap,
        "final_logit_soft_cap": cfg.final_logit_softcap, "use_sliding_window_attention": windowed,
        "sliding_window_size": cfg.sliding_window or 4096, "layer_norm_epsilon": cfg.norm_eps, "dropout": 0,
    }


def gemma3_keras_args(cfg: ModelConfig) -> dict[str, Any]:
    """``Gemma3Backbone``'s arguments for a Gemma 3 decoder (text part)."""
    if cfg.rope_theta != 1_000_000.0 or cfg.local_theta != 10_000.0:
        _refuse(cfg, f"RoPE bases {cfg.rope_theta}/{cfg.local_theta} (Keras fixes 1M global, 10k local)")
    scaling = cfg.rope_scaling or {}
    if scaling and scaling.get("rope_type") != "linear":
        _refuse(cfg, f"rope_scaling {scaling}")
    return dict(gemma_keras_args(cfg), intermediate_dim=cfg.intermediate_size,
                use_query_key_norm=cfg.use_qk_norm, local_rope_scaling_factor=1.0,
                global_rope_scaling_factor=float(scaling.get("factor", 1.0)), use_bidirectional_attention=False,
                is_embedding_model=False, pooling_intermediate_dim=None, embedding_dim=None)


def to_keras_config(cfg: ModelConfig) -> tuple[str, dict[str, Any], str, str, tuple[str, str]]:
    """(backbone class, its arguments, module, task class, (tokenizer module, class)) for a decoder config."""
    if cfg.bidirectional:
        _refuse(cfg, "bidirectional attention")
    if cfg.family == "llama":
        name, args = "Llama3Backbone", _llama3_args(cfg)
    elif cfg.family == "gemma3":
        name, args = "Gemma3Backbone", dict(gemma3_keras_args(cfg), image_size=896, vision_encoder=None)
    else:
        if cfg.rope_theta != 10_000.0 or cfg.rope_scaling:
            _refuse(cfg, "RoPE other than base 10k unscaled")
        name, args = "GemmaBackbone", dict(gemma_keras_args(cfg), intermediate_dim=2 * cfg.intermediate_size)
    module, task, tok = _MODULES[name]
    return name, args, module, task, tok


def _llama3_args(cfg: ModelConfig) -> dict[str, Any]:
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size:
        _refuse(cfg, "head_dim * heads != hidden size")
    s = cfg.rope_scaling or {}
    llama3 = s.get("rope_type") == "llama3"
    if s and not llama3 and s.get("rope_type") != "linear":
        _refuse(cfg, f"rope_scaling {s}")
    return {
        "vocabulary_size": cfg.vocab_size, "num_layers": cfg.num_layers, "num_query_heads": cfg.num_heads,
        "hidden_dim": cfg.hidden_size, "intermediate_dim": cfg.intermediate_size,
        "num_key_value_heads": cfg.num_kv_heads, "rope_max_wavelength": cfg.rope_theta,
        "rope_position_scaling_factor": float(s.get("factor", 1.0)) if s and not llama3 else 1.0,
        "rope_frequency_adjustment_factor": s.get("factor") if llama3 else None,
        "rope_low_freq_factor": s.get("low_freq_factor") if llama3 else None,
        "rope_high_freq_factor": s.get("high_freq_factor") if llama3 else None,
        "rope_pretraining_sequence_length": s.get("original_max_position_embeddings") if llama3 else None,
        "layer_norm_epsilon": cfg.norm_eps, "dropout": 0, "tie_word_embeddings": cfg.tie_embeddings,
    }


# ---- weights -------------------------------------------------------------------------------------


def decoder_table(cfg: ModelConfig, group: str, prefix: str = "layers/") -> dict[str, Entry]:
    """gemmax ``decoder_block/...`` path -> one H5 dataset per layer, for Gemma-style decoder blocks under
    ``prefix + group`` (``gemma_decoder_block``, ``gemma3_decoder_block``, ``pali_gemma_decoder_block``)."""
    blocks = block_names(group, cfg.num_layers, prefix)
    subs = {"pre_attention_norm/scale": "pre_attention_norm",
            "attention/query/kernel": "attention/query_dense", "attention/key/kernel": "attention/key_dense",
            "attention/value/kernel": "attention/value_dense",
            "attention/attention_output/kernel": "attention/output_dense",
            "pre_ffw_norm/scale": "pre_ffw_norm", "ffw_gating/kernel": "gating_ffw",
            "ffw_gating_2/kernel": "gating_ffw_2", "ffw_linear/kernel": "ffw_linear"}
    if cfg.use_qk_norm:
        subs["attention/query_norm/scale"] = "attention/query_norm"
        subs["attention/key_norm/scale"] = "attention/key_norm"
    if cfg.use_post_norms:
        subs["post_attention_norm/scale"] = "post_attention_norm"
        subs["post_ffw_norm/scale"] = "post_ffw_norm"
    t: dict[str, Entry] = {"decoder_block/" + p: ([f"{b}/{k}/vars/0" for b in blocks], *_IDENT)
                           for p, k in subs.items()}
    c = query_fold(cfg)
    if c != 1.0:  # Keras scales queries by head_dim: the rest of this config's scale rides on the weights
        if cfg.use_qk_norm:  # after the kernel a norm undoes any factor: its (1 + scale) carries it
            path, fns = "decoder_block/attention/query_norm/scale", (lambda w: (1 + w) / c - 1,
                                                                     lambda w: c * (1 + w) - 1)
        else:
            path, fns = "decoder_block/attention/query/kernel", (lambda w: w / c, lambda w: w * c)
        t[path] = (t[path][0], *fns)
    return t


def _llama_table(cfg: ModelConfig) -> dict[str, Entry]:
    blocks = block_names(BLOCK_GROUPS["llama"], cfg.num_layers)
    att = "_self_attention_layer/"
    subs: dict[str, tuple[str, tuple]] = {
        "pre_attention_norm/scale": ("_self_attention_layernorm", _IDENT),
        "attention/query/kernel": (att + "_query_dense", _SWAP01),
        "attention/key/kernel": (att + "_key_dense", _SWAP01),
        "attention/value/kernel": (att + "_value_dense", _SWAP01),
        "attention/attention_output/kernel": (att + "_output_dense", _IDENT),
        "pre_ffw_norm/scale": ("_feedforward_layernorm", _IDENT),
        "ffw_gating/kernel": ("_feedforward_gate_dense", _IDENT),
        "ffw_gating_2/kernel": ("_feedforward_intermediate_dense", _IDENT),
        "ffw_linear/kernel": ("_feedforward_output_dense", _IDENT),
    }
    t: dict[str, Entry] = {"token_embedding/embeddings": ("layers/reversible_embedding/vars/0", *_IDENT),
                           "final_normalization/scale": ("layers/llama_layer_norm/vars/0", *_IDENT)}
    if not cfg.tie_embeddings:
        t["lm_head/kernel"] = ("layers/reversible_embedding/vars/1", *_IDENT)
    for p, (k, fns) in subs.items():
        t["decoder_block/" + p] = ([f"{b}/{k}/vars/0" for b in blocks], *fns)
    return t


def keras_table(cfg: ModelConfig) -> dict[str, Entry]:
    """gemmax path -> (H5 dataset, or one per layer; Keras -> gemmax; gemmax -> Keras) for every weight."""
    if cfg.family == "llama":
        return _llama_table(cfg)
    if not cfg.tie_embeddings:
        _refuse(cfg, "an untied head")
    t: dict[str, Entry] = {"token_embedding/embeddings": ("layers/reversible_embedding/vars/0", *_IDENT),
                           "final_normalization/scale": ("layers/rms_normalization/vars/0", *_IDENT)}
    t.update(decoder_table(cfg, BLOCK_GROUPS[cfg.family]))
    return t


# ---- LoRA file indices ---------------------------------------------------------------------------

#: Keras layer name -> gemmax linear node, for the dense layers of a decoder block.
KERAS_LINEARS = {"query": "query", "key": "key", "value": "value", "attention_output": "attention_output",
                 "ffw_gating": "ffw_gating", "ffw_gating_2": "ffw_gating_2", "ffw_linear": "ffw_linear",
                 "feedforward_gate_dense": "ffw_gating", "feedforward_intermediate_dense": "ffw_gating_2",
                 "feedforward_output_dense": "ffw_linear"}


def block_weighted_layers(cfg: ModelConfig) -> list[str]:
    """A decoder block and its weighted sub-layers in the order Keras' ``_flatten_layers`` visits them
    (depth first, each layer's children last-created first): the order ``save_lora_weights`` indexes."""
    if cfg.family == "llama":
        return ["block", "feedforward_layernorm", "feedforward_output_dense", "feedforward_gate_dense",
                "feedforward_intermediate_dense", "self_attention_layernorm", "self_attention",
                "attention_output", "value", "key", "query"]
    post = cfg.use_post_norms
    return (["block", "ffw_linear", "ffw_gating_2", "ffw_gating"] + ["post_ffw_norm"] * post
            + ["pre_ffw_norm", "attention", "attention_output"] + ["key_norm", "query_norm"] * cfg.use_qk_norm
            + ["value", "key", "query"] + ["post_attention_norm"] * post + ["pre_attention_norm"])


def decoder_lora_layers(cfg: ModelConfig, first: int = 1) -> dict[int, tuple[str, int]]:
    """``{weighted-layer index: (node key, layer)}`` for decoder blocks starting at index ``first`` (1: right
    after the token embedding, for text backbones)."""
    order = block_weighted_layers(cfg)
    out = {}
    for i in range(cfg.num_layers):
        for j, name in enumerate(order):
            if name in KERAS_LINEARS:
                out[first + i * len(order) + j] = (KERAS_LINEARS[name], i)
    return out


def accepts(class_name: str, c: Mapping[str, Any]) -> bool:
    """Text backbones only: a ``Gemma3Backbone`` with a vision encoder is the gemma3_vision family's."""
    return not (class_name == "Gemma3Backbone" and c.get("vision_encoder"))
