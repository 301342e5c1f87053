"""Model configuration and presets for the decoder family (Gemma 1, CodeGemma, Gemma 2, Gemma 3, Llama 3).

One frozen dataclass describes every decoder we run; the differences between families are *data* here
(layer pattern, soft-caps, norm offset, activation...), so one forward function serves them all and
compiled code does not branch on family names. Numbers follow the published checkpoints; see
docs/numerics.md for why each matters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gemmax.models.base import ConfigBase, hf_config_tokens, hf_tokens_entry
from gemmax.nn.params import describe_size  # noqa: F401  (re-exported: sizes in presets' docs)

LOCAL = "local"
GLOBAL = "global"

#: model_type values of Hugging Face config.json that the decoder understands.
HF_DECODER_TYPES = ("gemma", "gemma2", "gemma3_text", "gemma3", "llama")


@dataclass(frozen=True)
class DecoderShape(ConfigBase):
    """The shape every Gemma text decoder's config gives, with no defaults (:func:`hf_shape` writes it)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # width of each of the gate / up branches


@dataclass(frozen=True)
class ModelConfig(DecoderShape):
    """Hyper-parameters of one decoder-only model.

    ``layer_types`` holds ``"local"`` (sliding window) or ``"global"`` per layer: Gemma 2 alternates starting
    with local, Gemma 3 repeats five local then one global, Gemma 1 and Llama are all global.
    """

    family: str  # "gemma" | "gemma2" | "gemma3" | "llama"
    max_position_embeddings: int = 8192
    norm_eps: float = 1e-6
    # Gemma norms multiply by (1 + scale) with zero-centred scales; Llama by scale.
    norm_offset: float = 1.0
    activation: str = "gelu_tanh"  # "gelu_tanh" (GeGLU) | "silu" (SwiGLU)
    query_pre_attn_scalar: float | None = None  # q is multiplied by this ** -0.5; None -> head_dim
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    rope_theta: float = 10000.0  # global layers
    rope_local_theta: float | None = None  # local layers (Gemma 3: 10k); None -> rope_theta
    rope_scaling: dict[str, Any] | None = None  # global layers only: {"rope_type": "linear"|"llama3", ...}
    use_qk_norm: bool = False
    use_post_norms: bool = False  # "sandwich" norms after attention and MLP (Gemma 2 and 3)
    tie_embeddings: bool = True
    scale_embeddings: bool = True  # multiply embeddings by sqrt(hidden_size) (Gemma)
    attention_bias: bool = False
    # Every token attends to every other (EmbeddingGemma, HF ``use_bidirectional_attention``); local layers
    # then see a symmetric window, |q - k| <= sliding_window // 2, as transformers builds it. An encoder:
    # full forwards only, no generation.
    bidirectional: bool = False

    tuple_fields = ("layer_types",)
    label = "decoder"

    def __post_init__(self) -> None:
        if not self.layer_types:
            object.__setattr__(self, "layer_types", (GLOBAL,) * self.num_layers)
        if len(self.layer_types) != self.num_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries but num_layers is {self.num_layers}"
            )
        bad = set(self.layer_types) - {LOCAL, GLOBAL}
        if bad:
            raise ValueError(f"layer_types may hold only 'local'/'global', got {sorted(bad)}")
        if LOCAL in self.layer_types and not self.sliding_window:
            raise ValueError("local layers need a sliding_window")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.activation not in ("gelu_tanh", "silu"):
            raise ValueError(f"unknown activation {self.activation!r}")
        if self.bidirectional and self.family != "gemma3":
            raise ValueError("bidirectional attention is a Gemma 3 option (EmbeddingGemma); "
                             f"family {self.family!r} is causal")

    # ---- derived quantities -------------------------------------------------------------------
    @property
    def query_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def local_theta(self) -> float:
        return self.rope_local_theta if self.rope_local_theta is not None else self.rope_theta

    def param_count(self) -> dict[str, int]:
        """Parameter counts from shapes alone (no weights), as the summary prints them."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        per_layer = d * hd * (self.num_heads * 2 + self.num_kv_heads * 2) + 3 * d * f + 2 * d
        if self.use_post_norms:
            per_layer += 2 * d
        if self.use_qk_norm:
            per_layer += 2 * hd
        embed = self.vocab_size * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        non_embed = per_layer * self.num_layers + d + head
        return {"total": embed + non_embed, "embedding": embed, "non_embedding": non_embed}

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> float:
        """Model FLOPs per token (6N + attention for training, 2N + attention for inference).

        Used by the trainer to report MFU; attention cost uses the average visible context.
        """
        n = self.param_count()["non_embedding"] + (self.vocab_size * self.hidden_size)  # logits matmul
        t = seq_len or self.max_position_embeddings
        att = 0.0
        for kind in self.layer_types:
            ctx = min(t, self.sliding_window) if kind == LOCAL and self.sliding_window else t
            att += 2 * 2 * self.num_heads * self.head_dim * (ctx / 2 if ctx == t else ctx)
        mult = 3 if training else 1
        return mult * (2 * n + att)


# ---- presets -------------------------------------------------------------------------------------


def _gemma2_types(n: int) -> tuple[str, ...]:
    # layer 0 is local, then alternate (HF: sliding when (i + 1) % 2).
    return tuple(LOCAL if (i + 1) % 2 else GLOBAL for i in range(n))


def _gemma3_types(n: int, period: int = 6) -> tuple[str, ...]:
    # five local then one global; leftover layers at the end are local.
    return tuple(LOCAL if (i + 1) % period else GLOBAL for i in range(n))


def _gemma1(name: str, d: int, layers: int, heads: int, kv: int, f: int) -> ModelConfig:
    return ModelConfig(
        family="gemma", name=name, vocab_size=256000, hidden_size=d, num_layers=layers, num_heads=heads,
        num_kv_heads=kv, head_dim=256, intermediate_size=f, max_position_embeddings=8192,
    )


def _gemma2(name: str, d: int, layers: int, heads: int, kv: int, hd: int, f: int, qpas: float) -> ModelConfig:
    return ModelConfig(
        family="gemma2", name=name, vocab_size=256000, hidden_size=d, num_layers=layers, num_heads=heads,
        num_kv_heads=kv, head_dim=hd, intermediate_size=f, max_position_embeddings=8192,
        query_pre_attn_scalar=qpas, attn_logit_softcap=50.0, final_logit_softcap=30.0, sliding_window=4096,
        layer_types=_gemma2_types(layers), use_post_norms=True, eos_token_id=(1, 107),
    )


def _gemma3(name: str, d: int, layers: int, heads: int, kv: int, hd: int, f: int, qpas: float, window: int,
            scaling: float | None, max_pos: int) -> ModelConfig:
    return ModelConfig(
        family="gemma3", name=name, vocab_size=262144, hidden_size=d, num_layers=layers, num_heads=heads,
        num_kv_heads=kv, head_dim=hd, intermediate_size=f, max_position_embeddings=max_pos,
        query_pre_attn_scalar=qpas, sliding_window=window, layer_types=_gemma3_types(layers),
        rope_theta=1_000_000.0, rope_local_theta=10_000.0,
        rope_scaling={"rope_type": "linear", "factor": scaling} if scaling else None,
        use_qk_norm=True, use_post_norms=True, eos_token_id=(1, 106),
    )


def _llama3(name: str, d: int, layers: int, heads: int, kv: int, f: int, scaling: dict | None,
            max_pos: int) -> ModelConfig:
    return ModelConfig(
        family="llama", name=name, vocab_size=128256, hidden_size=d, num_layers=layers, num_heads=heads,
        num_kv_heads=kv, head_dim=d // heads, intermediate_size=f, max_position_embeddings=max_pos,
        norm_eps=1e-5, norm_offset=0.0, activation="silu", rope_theta=500000.0, rope_scaling=scaling,
        tie_embeddings=False, scale_embeddings=False, bos_token_id=128000, eos_token_id=(128001, 128009),
        pad_token_id=128001,
    )


_LLAMA31_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}

PRESETS: dict[str, ModelConfig] = {
    c.name: c
    for c in [
        _gemma1("gemma_2b_en", 2048, 18, 8, 1, 16384),
        _gemma1("gemma_instruct_2b_en", 2048, 18, 8, 1, 16384),
        _gemma1("gemma_7b_en", 3072, 28, 16, 16, 24576),
        _gemma1("gemma_instruct_7b_en", 3072, 28, 16, 16, 24576),
        _gemma1("code_gemma_2b_en", 2048, 18, 8, 1, 16384),
        _gemma1("code_gemma_7b_en", 3072, 28, 16, 16, 24576),
        _gemma1("code_gemma_instruct_7b_en", 3072, 28, 16, 16, 24576),
        _gemma2("gemma2_2b_en", 2304, 26, 8, 4, 256, 9216, 256),
        _gemma2("gemma2_instruct_2b_en", 2304, 26, 8, 4, 256, 9216, 256),
        _gemma2("gemma2_9b_en", 3584, 42, 16, 8, 256, 14336, 256),
        _gemma2("gemma2_instruct_9b_en", 3584, 42, 16, 8, 256, 14336, 256),
        _gemma2("gemma2_27b_en", 4608, 46, 32, 16, 128, 36864, 144),
        _gemma2("gemma2_instruct_27b_en", 4608, 46, 32, 16, 128, 36864, 144),
        _gemma3("gemma3_270m", 640, 18, 4, 1, 256, 2048, 256, 512, None, 32768),
        _gemma3("gemma3_instruct_270m", 640, 18, 4, 1, 256, 2048, 256, 512, None, 32768),
        _gemma3("gemma3_1b", 1152, 26, 4, 1, 256, 6912, 256, 512, None, 32768),
        _gemma3("gemma3_instruct_1b", 1152, 26, 4, 1, 256, 6912, 256, 512, None, 32768),
        _gemma3("gemma3_4b", 2560, 34, 8, 4, 256, 10240, 256, 1024, 8.0, 131072),
        _gemma3("gemma3_instruct_4b", 2560, 34, 8, 4, 256, 10240, 256, 1024, 8.0, 131072),
        _gemma3("gemma3_12b", 3840, 48, 16, 8, 256, 15360, 256, 1024, 8.0, 131072),
        _gemma3("gemma3_instruct_12b", 3840, 48, 16, 8, 256, 15360, 256, 1024, 8.0, 131072),
        _gemma3("gemma3_27b", 5376, 62, 32, 16, 128, 21504, 168, 1024, 8.0, 131072),
        _gemma3("gemma3_instruct_27b", 5376, 62, 32, 16, 128, 21504, 168, 1024, 8.0, 131072),
        _llama3("llama3_8b_en", 4096, 32, 32, 8, 14336, None, 8192),
        _llama3("llama3_instruct_8b_en", 4096, 32, 32, 8, 14336, None, 8192),
        _llama3("llama3_70b_en", 8192, 80, 64, 8, 28672, None, 8192),
        _llama3("llama3.1_8b_en", 4096, 32, 32, 8, 14336, _LLAMA31_SCALING, 131072),
    ]
}

#: Where each preset's weights live on the Hugging Face Hub (loaded through the local cache).
PRESET_HF_REPOS: dict[str, str] = {
    "gemma_2b_en": "google/gemma-2b",
    "gemma_instruct_2b_en": "google/gemma-2b-it",
    "gemma_7b_en": "google/gemma-7b",
    "gemma_instruct_7b_en": "google/gemma-7b-it",
    "code_gemma_2b_en": "google/codegemma-2b",
    "code_gemma_7b_en": "google/codegemma-7b",
    "code_gemma_instruct_7b_en": "google/codegemma-7b-it",
    "gemma2_2b_en": "google/gemma-2-2b",
    "gemma2_instruct_2b_en": "google/gemma-2-2b-it",
    "gemma2_9b_en": "google/gemma-2-9b",
    "gemma2_instruct_9b_en": "google/gemma-2-9b-it",
    "gemma2_27b_en": "google/gemma-2-27b",
    "gemma2_instruct_27b_en": "google/gemma-2-27b-it",
    "gemma3_270m": "google/gemma-3-270m",
    "gemma3_instruct_270m": "google/gemma-3-270m-it",
    "gemma3_1b": "google/gemma-3-1b-pt",
    "gemma3_instruct_1b": "google/gemma-3-1b-it",
    "gemma3_4b": "google/gemma-3-4b-pt",
    "gemma3_instruct_4b": "google/gemma-3-4b-it",
    "gemma3_12b": "google/gemma-3-12b-pt",
    "gemma3_instruct_12b": "google/gemma-3-12b-it",
    "gemma3_27b": "google/gemma-3-27b-pt",
    "gemma3_instruct_27b": "google/gemma-3-27b-it",
    "llama3_8b_en": "meta-llama/Meta-Llama-3-8B",
    "llama3_instruct_8b_en": "meta-llama/Meta-Llama-3-8B-Instruct",
    "llama3_70b_en": "meta-llama/Meta-Llama-3-70B",
    "llama3.1_8b_en": "meta-llama/Llama-3.1-8B",
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        close = [p for p in PRESETS if name.split("_")[0] in p]
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(close or PRESETS)}") from None


def tiny_config(family: str = "gemma3", **overrides: Any) -> ModelConfig:
    """A few-kilobyte model of the given family for tests and demos: every feature on, shapes tiny.

    Heads and KV heads differ (GQA), the window is small so short test sequences cross it.
    """
    base: dict[str, Any] = dict(
        vocab_size=512, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16,
        intermediate_size=128, max_position_embeddings=512, name=f"tiny_{family}",
    )
    if family == "gemma":
        cfg = dict(base, family="gemma")
    elif family == "gemma2":
        cfg = dict(base, family="gemma2", query_pre_attn_scalar=24, attn_logit_softcap=50.0,
                   final_logit_softcap=30.0, sliding_window=8, layer_types=_gemma2_types(4),
                   use_post_norms=True, eos_token_id=(1, 107))
    elif family == "gemma3":
        cfg = dict(base, family="gemma3", num_layers=7, sliding_window=8, layer_types=_gemma3_types(7),
                   rope_theta=1_000_000.0, rope_local_theta=10_000.0,
                   rope_scaling={"rope_type": "linear", "factor": 8.0}, use_qk_norm=True,
                   use_post_norms=True, eos_token_id=(1, 106))
    elif family == "llama":
        cfg = dict(base, family="llama", norm_eps=1e-5, norm_offset=0.0, activation="silu",
                   rope_theta=500000.0, rope_scaling=dict(_LLAMA31_SCALING, original_max_position_embeddings=64),
                   tie_embeddings=False, scale_embeddings=False, bos_token_id=1, eos_token_id=2)
    else:
        raise ValueError(f"no tiny config for family {family!r}")
    cfg.update(overrides)
    if "num_layers" in overrides and "layer_types" not in overrides:
        n = overrides["num_layers"]
        cfg["layer_types"] = {"gemma2": _gemma2_types, "gemma3": _gemma3_types}.get(
            family, lambda n: (GLOBAL,) * n)(n)
    return ModelConfig(**cfg)


# ---- Hugging Face config.json <-> ModelConfig -------------------------------------------------------


def _hf_rope(hf: dict[str, Any]) -> tuple[float, float | None, dict | None]:
    """(global theta, local theta, global scaling) from either transformers 4.x or 5.x config layouts."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and ("full_attention" in params or "sliding_attention" in params):
        full = params.get("full_attention") or {}
        slide = params.get("sliding_attention") or {}
        theta = float(full.get("rope_theta", hf.get("rope_theta", 10000.0)))
        local = float(slide["rope_theta"]) if "rope_theta" in slide else None
        scaling = full if full.get("rope_type", "default") != "default" else None
    elif isinstance(params, dict):
        theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
        local = None
        scaling = params if params.get("rope_type", "default") != "default" else None
    else:
        theta = float(hf.get("rope_theta", 10000.0))
        local = None
        scaling = hf.get("rope_scaling")
        if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
            scaling = None
    if local is None and hf.get("rope_local_base_freq") is not None:
        local = float(hf["rope_local_base_freq"])
    if scaling:
        scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
        if "type" in scaling and "rope_type" not in scaling:
            scaling["rope_type"] = scaling.pop("type")
    return theta, local, scaling


def layer_types_from_hf(types: Sequence[str]) -> tuple[str, ...]:
    """transformers' ``layer_types`` (``sliding_attention`` / ``full_attention``) as local / global."""
    return tuple(LOCAL if t == "sliding_attention" else GLOBAL for t in types)


def hf_layer_types(layer_types: Sequence[str]) -> list[str]:
    """Local / global layers as transformers' ``layer_types``."""
    return ["sliding_attention" if t == LOCAL else "full_attention" for t in layer_types]


def hf_rope_parameters(full: dict[str, Any], local_theta: float) -> dict[str, Any]:
    """transformers' ``rope_parameters`` of a model with local and global layers: ``full``, the global
    layers' (with their ``rope_theta``), and unscaled RoPE at ``local_theta`` on the local ones."""
    return {"full_attention": full, "sliding_attention": {"rope_type": "default", "rope_theta": local_theta}}


def hf_shape(cfg: Any) -> dict[str, Any]:
    """The ``config.json`` keys of a Gemma text decoder's shape, from any config with these field names."""
    return {"vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
            "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.norm_eps}


def from_hf_config(hf: dict[str, Any]) -> ModelConfig:
    """Build a ModelConfig from a transformers config.json dict (text decoders only)."""
    mt = hf.get("model_type")
    if mt == "gemma3" and "text_config" in hf:
        # Multimodal Gemma 3 wrapper: the language model is what we run.
        hf = dict(hf["text_config"], model_type="gemma3_text")
        mt = "gemma3_text"
    if mt not in HF_DECODER_TYPES:
        raise ValueError(
            f"unsupported model_type {mt!r}: gemmax's decoder loads {', '.join(HF_DECODER_TYPES)} "
            "(RecurrentGemma and PaliGemma have their own loaders)"
        )
    family = {"gemma3_text": "gemma3", "gemma3": "gemma3"}.get(mt, mt)
    n = int(hf["num_hidden_layers"])
    heads = int(hf["num_attention_heads"])
    d = int(hf["hidden_size"])
    theta, local_theta, scaling = _hf_rope(hf)
    types = hf.get("layer_types")
    if types:
        layer_types = layer_types_from_hf(types)
    elif family == "gemma2":
        layer_types = _gemma2_types(n)
    elif family == "gemma3":
        layer_types = _gemma3_types(n, int(hf.get("sliding_window_pattern", 6)))
    else:
        layer_types = (GLOBAL,) * n
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act in ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new", "gelu"):
        # Gemma 1 configs say "gelu" but the reference always used the tanh approximation.
        activation = "gelu_tanh"
    elif act == "silu":
        activation = "silu"
    else:
        raise ValueError(f"unsupported activation {act!r}")
    is_gemma = family != "llama"
    window = hf.get("sliding_window") if LOCAL in layer_types else None
    return ModelConfig(
        family=family,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=d,
        num_layers=n,
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or d // heads),
        intermediate_size=int(hf["intermediate_size"]),
        max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        norm_offset=1.0 if is_gemma else 0.0,
        activation=activation,
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar"),
        attn_logit_softcap=hf.get("attn_logit_softcapping"),
        final_logit_softcap=hf.get("final_logit_softcapping"),
        sliding_window=int(window) if window else None,
        layer_types=layer_types,
        rope_theta=theta,
        rope_local_theta=local_theta,
        rope_scaling=scaling,
        use_qk_norm=family == "gemma3",
        use_post_norms=family in ("gemma2", "gemma3"),
        tie_embeddings=bool(hf.get("tie_word_embeddings", is_gemma)),
        scale_embeddings=is_gemma,
        attention_bias=bool(hf.get("attention_bias", False)),
        bidirectional=bool(hf.get("use_bidirectional_attention") or False),
        **hf_config_tokens(hf),
    )


def to_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json transformers needs to rebuild the same model (used by export_hf)."""
    arch = {
        "gemma": ("gemma", "GemmaForCausalLM"),
        "gemma2": ("gemma2", "Gemma2ForCausalLM"),
        "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
        "llama": ("llama", "LlamaForCausalLM"),
    }[cfg.family]
    hf: dict[str, Any] = {
        "model_type": arch[0],
        "architectures": [arch[1]],
        **hf_shape(cfg),
        "rope_theta": cfg.rope_theta,
        "attention_bias": cfg.attention_bias,
        "attention_dropout": 0.0,
        **hf_tokens_entry(cfg),
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": "float32",
    }
    if cfg.family == "llama":
        hf["hidden_act"] = "silu"
        hf["mlp_bias"] = False
        if cfg.rope_scaling:
            hf["rope_scaling"] = dict(cfg.rope_scaling)
    else:
        hf["hidden_activation"] = "gelu_pytorch_tanh"
        hf["hidden_act"] = "gelu_pytorch_tanh"
    if cfg.family in ("gemma2", "gemma3"):
        hf["query_pre_attn_scalar"] = cfg.query_pre_attn_scalar or cfg.head_dim
        hf["sliding_window"] = cfg.sliding_window
        hf["layer_types"] = hf_layer_types(cfg.layer_types)
        hf["final_logit_softcapping"] = cfg.final_logit_softcap
        hf["attn_logit_softcapping"] = cfg.attn_logit_softcap
    if cfg.family == "gemma3":
        hf["rope_local_base_freq"] = cfg.local_theta
        hf["rope_scaling"] = dict(cfg.rope_scaling) if cfg.rope_scaling else None
        hf["rope_parameters"] = hf_rope_parameters(
            dict(cfg.rope_scaling or {"rope_type": "default"}, rope_theta=cfg.rope_theta), cfg.local_theta)
        hf["use_bidirectional_attention"] = cfg.bidirectional
    return hf
