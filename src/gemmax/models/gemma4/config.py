"""Gemma 4 text configuration and declarations (every weight's shape and logical axes): one frozen dataclass
for the dense 31B, the 26B-A4B mixture of experts and the E2B / E4B on-device models, whose differences are
switches of one config (see docs/gemma4.md).

A layer is *local* (sliding window, ``head_dim``, full RoPE at ``rope_local_theta``) or *global* (whole
context, ``global_head_dim``, proportional partial RoPE at ``rope_theta``, optionally one projection shared by
keys and values, ``attention_k_eq_v``). The last ``num_kv_shared_layers`` layers own no keys or values: each
reads those of the last earlier layer of its own type (and, with ``double_wide_mlp``, has an MLP twice as
wide). Layers fall into at most four *groups* by (type, shares keys and values); each group's weights are
stacked on their own leading axis, because their shapes differ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from gemmax.models.base import hf_config_tokens, hf_tokens_entry, preset_pairs
from gemmax.models.gemma.config import DecoderShape, hf_layer_types, hf_rope_parameters, hf_shape, layer_types_from_hf
from gemmax.nn.params import ParamSpec

LOCAL = "local"
GLOBAL = "global"

#: model_type values of a Hugging Face config.json this family reads (the multimodal wrapper: its text).
HF_MODEL_TYPES = ("gemma4_text", "gemma4")

#: The layer groups in a fixed order: (name, layer type, shares another layer's keys and values).
GROUPS = (("local", LOCAL, False), ("global", GLOBAL, False), ("local_shared", LOCAL, True),
          ("global_shared", GLOBAL, True))


@dataclass(frozen=True)
class Gemma4Config(DecoderShape):
    """Hyper-parameters of one Gemma 4 text decoder (field meanings in the module docstring and
    docs/gemma4.md). ``ple_dim`` 0 turns per-layer embeddings off, ``num_experts`` 0 the expert block."""

    layer_types: tuple[str, ...] = ()
    global_head_dim: int | None = None  # None: head_dim
    num_global_kv_heads: int | None = None  # None: num_kv_heads
    attention_k_eq_v: bool = False  # global layers: values are the key projection's output
    sliding_window: int = 512
    rope_theta: float = 1_000_000.0  # global layers
    rope_local_theta: float = 10_000.0
    global_partial_rotary: float = 0.25  # fraction of the global head dim that rotates (proportional RoPE)
    global_rope_factor: float = 1.0
    final_logit_softcap: float | None = 30.0
    norm_eps: float = 1e-6
    max_position_embeddings: int = 131072
    # per-layer embeddings (E2B / E4B)
    ple_dim: int = 0
    ple_vocab_size: int = 0  # 0: vocab_size
    # KV sharing (E2B / E4B)
    num_kv_shared_layers: int = 0
    double_wide_mlp: bool = False  # KV-sharing layers' MLP is 2 * intermediate_size wide
    # mixture of experts beside the dense MLP (26B-A4B)
    num_experts: int = 0
    top_k: int = 0
    moe_intermediate_size: int = 0
    family: str = "gemma4"

    tuple_fields = ("layer_types",)
    label = "Gemma 4"

    def __post_init__(self) -> None:
        if not self.layer_types:
            object.__setattr__(self, "layer_types",
                               tuple(GLOBAL if (i + 1) % 6 == 0 else LOCAL for i in range(self.num_layers)))
        if len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries but num_layers is {self.num_layers}")
        bad = set(self.layer_types) - {LOCAL, GLOBAL}
        if bad:
            raise ValueError(f"layer_types may hold only 'local'/'global', got {sorted(bad)}")
        if self.num_heads % self.num_kv_heads or self.num_heads % self.global_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of the KV heads "
                             f"({self.num_kv_heads} local, {self.global_kv_heads} global)")
        if not 0 <= self.num_kv_shared_layers <= self.num_layers:
            raise ValueError(f"num_kv_shared_layers ({self.num_kv_shared_layers}) must be in [0, num_layers]")
        if self.num_kv_shared_layers:
            owners = set(self.layer_types[:self.num_layers - self.num_kv_shared_layers])
            if set(self.layer_types) - owners:
                raise ValueError("every layer type that reads shared keys and values needs an earlier layer of "
                                 "its type that computes them (num_kv_shared_layers too large)")
        if self.num_experts and not 0 < self.top_k <= self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be in [1, num_experts={self.num_experts}]")
        if self.num_experts and not self.moe_intermediate_size:
            raise ValueError("an expert block needs moe_intermediate_size")

    # ---- derived quantities -------------------------------------------------------------------
    @property
    def global_hd(self) -> int:
        return self.global_head_dim or self.head_dim

    @property
    def global_kv_heads(self) -> int:
        return self.num_global_kv_heads or self.num_kv_heads

    @property
    def ple_vocab(self) -> int:
        return self.ple_vocab_size or self.vocab_size

    # what the layers above read from every family's config (the trainer's chunked loss, the embedding)
    tie_embeddings = True
    scale_embeddings = True
    norm_offset = 0.0

    @property
    def first_shared(self) -> int:
        """Index of the first layer that reads another layer's keys and values (num_layers: none)."""
        return self.num_layers - self.num_kv_shared_layers

    def group_of(self, i: int) -> str:
        """The group (``GROUPS`` name) of layer ``i``."""
        t = self.layer_types[i]
        return ("local" if t == LOCAL else "global") + ("_shared" if i >= self.first_shared else "")

    def group_layers(self) -> dict[str, tuple[int, ...]]:
        """Layer indices of every non-empty group, in ``GROUPS`` order."""
        out = {g: tuple(i for i in range(self.num_layers) if self.group_of(i) == g) for g, _, _ in GROUPS}
        return {g: ids for g, ids in out.items() if ids}

    def producer(self, layer_type: str) -> int:
        """The layer whose keys and values the shared layers of ``layer_type`` read: the last layer of that
        type before ``first_shared``."""
        return max(i for i in range(self.first_shared) if self.layer_types[i] == layer_type)

    def mlp_width(self, shared: bool) -> int:
        return self.intermediate_size * (2 if self.double_wide_mlp and shared else 1)

    def param_count(self) -> dict[str, int]:
        """Parameter counts from the declared shapes; ``active`` counts top_k experts of each layer, and
        the per-layer embedding table (a lookup, like the token embedding) is counted apart."""
        specs = param_specs(self)
        total = sum(s.size for s in specs.values())
        embed = self.vocab_size * self.hidden_size
        ple = self.ple_vocab * self.num_layers * self.ple_dim
        experts = sum(s.size for p, s in specs.items() if "/experts/" in p)
        active = total - experts + (experts * self.top_k // self.num_experts if self.num_experts else 0)
        return {"total": total, "embedding": embed, "per_layer_embedding": ple,
                "non_embedding": total - embed - ple, "active": active}

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> float:
        """Model FLOPs per token: 6 (training) or 2 x the active non-embedding parameters and the head,
        plus attention over the average visible context."""
        n = self.param_count()
        matmul = n["active"] - n["embedding"] - n["per_layer_embedding"] + self.vocab_size * self.hidden_size
        t = seq_len or self.max_position_embeddings
        att = 0.0
        for lt in self.layer_types:
            ctx = min(t, self.sliding_window) if lt == LOCAL else t
            hd = self.head_dim if lt == LOCAL else self.global_hd
            att += 2 * 2 * self.num_heads * hd * ctx / 2
        return (6.0 if training else 2.0) * matmul + (3.0 if training else 1.0) * att


# ---- declarations: every weight's shape and logical axes ---------------------------------------------

#: stacked axis of each kernel's fan-in (initialisation)
_FAN_IN = {"query": 2, "key": 2, "value": 2, "attention_output": 2, "ffw_gating": 1, "ffw_gating_2": 1,
           "ffw_linear": 1, "ple_gate": 1, "ple_projection": 1}

def group_dims(cfg: Gemma4Config, group: str) -> tuple[str, bool, int, int]:
    """(layer type, shares keys and values, head dim, KV heads) of a group."""
    _, ltype, shared = next(g for g in GROUPS if g[0] == group)
    if ltype == LOCAL:
        return ltype, shared, cfg.head_dim, cfg.num_kv_heads
    return ltype, shared, cfg.global_hd, cfg.global_kv_heads


def has_value_proj(cfg: Gemma4Config, group: str) -> bool:
    ltype, shared, _, _ = group_dims(cfg, group)
    return not shared and not (ltype == GLOBAL and cfg.attention_k_eq_v)


def _group_specs(cfg: Gemma4Config, group: str, n: int) -> dict[str, ParamSpec]:
    D, H = cfg.hidden_size, cfg.num_heads
    ltype, shared, hd, K = group_dims(cfg, group)
    F = cfg.mlp_width(shared)
    ones = "ones"
    s: dict[str, ParamSpec] = {
        "pre_attention_norm/scale": ParamSpec((n, D), ("layers", "embed"), ones),
        "attention/query/kernel": ParamSpec((n, H, D, hd), ("layers", "heads", "embed", "head_dim")),
        "attention/query_norm/scale": ParamSpec((n, hd), ("layers", "head_dim"), ones),
        "attention/attention_output/kernel": ParamSpec((n, H, hd, D), ("layers", "heads", "head_dim", "embed")),
        "post_attention_norm/scale": ParamSpec((n, D), ("layers", "embed"), ones),
        "pre_ffw_norm/scale": ParamSpec((n, D), ("layers", "embed"), ones),
        "post_ffw_norm/scale": ParamSpec((n, D), ("layers", "embed"), ones),
        "ffw_gating/kernel": ParamSpec((n, D, F), ("layers", "embed", "mlp")),
        "ffw_gating_2/kernel": ParamSpec((n, D, F), ("layers", "embed", "mlp")),
        "ffw_linear/kernel": ParamSpec((n, F, D), ("layers", "mlp", "embed")),
        "layer_scalar": ParamSpec((n,), ("layers",), ones),
    }
    if not shared:
        s["attention/key/kernel"] = ParamSpec((n, K, D, hd), ("layers", "kv_heads", "embed", "head_dim"))
        s["attention/key_norm/scale"] = ParamSpec((n, hd), ("layers", "head_dim"), ones)
        if has_value_proj(cfg, group):
            s["attention/value/kernel"] = ParamSpec((n, K, D, hd), ("layers", "kv_heads", "embed", "head_dim"))
    if cfg.num_experts:
        E, I = cfg.num_experts, cfg.moe_intermediate_size
        s.update({
            "router/kernel": ParamSpec((n, D, E), ("layers", "embed", None), fan_in_axis=1),
            "router/scale": ParamSpec((n, D), ("layers", "embed"), ones),
            "router/expert_scale": ParamSpec((n, E), ("layers", None), ones),
            # the expert axis goes on the mesh; the expert's own width stays whole ("expert_mlp": no rule)
            "experts/gate_up/kernel": ParamSpec((n, E, D, 2 * I), ("layers", "experts", "embed", "expert_mlp"),
                                                fan_in_axis=2),
            "experts/down/kernel": ParamSpec((n, E, I, D), ("layers", "experts", "expert_mlp", "embed"),
                                             fan_in_axis=2),
            "post_ffw_norm_1/scale": ParamSpec((n, D), ("layers", "embed"), ones),
            "pre_ffw_norm_2/scale": ParamSpec((n, D), ("layers", "embed"), ones),
            "post_ffw_norm_2/scale": ParamSpec((n, D), ("layers", "embed"), ones),
        })
    if cfg.ple_dim:
        P = cfg.ple_dim
        s.update({
            "ple_gate/kernel": ParamSpec((n, D, P), ("layers", "embed", None)),
            "ple_projection/kernel": ParamSpec((n, P, D), ("layers", None, "embed")),
            "post_ple_norm/scale": ParamSpec((n, D), ("layers", "embed"), ones),
        })
    for path, spec in s.items():
        name = path.split("/")[-2] if path.endswith("/kernel") else ""
        if name in _FAN_IN:
            s[path] = ParamSpec(spec.shape, spec.axes, spec.init, fan_in_axis=_FAN_IN[name])
    return s


def param_specs(cfg: Gemma4Config) -> dict[str, ParamSpec]:
    """Every weight with its shape and logical axes, keyed by path (groups under ``decoder_block/``)."""
    D = cfg.hidden_size
    specs: dict[str, ParamSpec] = {
        "token_embedding/embeddings": ParamSpec((cfg.vocab_size, D), ("vocab", "embed"), "embedding",
                                                std=1.0 / math.sqrt(D)),
    }
    for g, ids in cfg.group_layers().items():
        for path, s in _group_specs(cfg, g, len(ids)).items():
            specs[f"decoder_block/{g}/{path}"] = s
    if cfg.ple_dim:
        LP = cfg.num_layers * cfg.ple_dim
        specs["per_layer_embedding/embeddings"] = ParamSpec((cfg.ple_vocab, LP), ("vocab", None), "embedding",
                                                            std=1.0 / math.sqrt(cfg.ple_dim))
        specs["per_layer_projection/kernel"] = ParamSpec((D, LP), ("embed", None), fan_in_axis=0)
        specs["per_layer_projection_norm/scale"] = ParamSpec((cfg.ple_dim,), (None,), "ones")
    specs["final_normalization/scale"] = ParamSpec((D,), ("embed",), "ones")
    return specs


# ---- Hugging Face config.json <-> Gemma4Config ----------------------------------------------------------


def from_hf_config(hf: dict[str, Any]) -> Gemma4Config:
    """A ``gemma4_text`` config.json (or the ``text_config`` of a multimodal ``gemma4`` one) -> Gemma4Config.

    Reads the published keys (``global_head_dim``, ``num_global_key_value_heads``) and transformers 5's own
    serialisation of them (``per_layer_config``: per-layer overrides of the global layers)."""
    hf = dict(hf)
    mt = hf.get("model_type")
    if mt == "gemma4":
        top = hf
        hf = dict(hf.get("text_config") or {})
        for k in ("bos_token_id", "eos_token_id", "pad_token_id", "_name_or_path"):
            if hf.get(k) is None and top.get(k) is not None:
                hf[k] = top[k]
        mt = "gemma4_text"
    if mt not in HF_MODEL_TYPES:
        raise ValueError(f"not a Gemma 4 config (model_type {mt!r}); the gemma4 family loads {HF_MODEL_TYPES}")
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new"):
        raise ValueError(f"unsupported Gemma 4 activation {act!r} (gelu_pytorch_tanh)")
    bidir = hf.get("use_bidirectional_attention")
    if bidir not in (None, "vision"):  # "vision": image tokens see their own image, text stays causal
        raise ValueError(f"bidirectional Gemma 4 configs (use_bidirectional_attention={bidir!r}) are not causal "
                         "LMs")
    if hf.get("attention_bias"):
        raise ValueError("Gemma 4 with attention_bias is not supported (no published checkpoint has it)")
    n = int(hf.get("num_hidden_layers", 30))
    types = hf.get("layer_types") or [
        "full_attention" if (i + 1) % int(hf.get("sliding_window_pattern", 6)) == 0 else "sliding_attention"
        for i in range(n)]
    layer_types = layer_types_from_hf(types)
    hd = int(hf.get("head_dim", 256))
    kv = int(hf.get("num_key_value_heads", 4))
    ghd, gkv = hf.get("global_head_dim"), hf.get("num_global_key_value_heads")
    for over in (hf.get("per_layer_config") or {}).values():  # transformers 5's save of the same keys
        if isinstance(over, dict):
            ghd = over.get("head_dim", ghd)
            gkv = over.get("num_key_value_heads", gkv)
    k_eq_v = bool(hf.get("attention_k_eq_v", False))
    rope = hf.get("rope_parameters") or {}
    full = rope.get("full_attention") or {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                          "rope_theta": 1_000_000.0}
    slide = rope.get("sliding_attention") or {"rope_type": "default", "rope_theta": 10_000.0}
    if full.get("rope_type", "default") not in ("proportional", "default"):
        raise ValueError(f"unsupported global RoPE {full.get('rope_type')!r} (proportional)")
    if slide.get("rope_type", "default") != "default":
        raise ValueError(f"unsupported local RoPE {slide.get('rope_type')!r} (default)")
    moe = bool(hf.get("enable_moe_block", False))
    ple = int(hf.get("hidden_size_per_layer_input") or 0)
    return Gemma4Config(
        vocab_size=int(hf.get("vocab_size", 262144)),
        hidden_size=int(hf.get("hidden_size", 2304)),
        num_layers=n,
        num_heads=int(hf.get("num_attention_heads", 8)),
        num_kv_heads=kv,
        head_dim=hd,
        intermediate_size=int(hf.get("intermediate_size", 9216)),
        layer_types=layer_types,
        global_head_dim=int(ghd) if ghd is not None else 512,
        num_global_kv_heads=int(gkv) if (gkv is not None and k_eq_v) else None,
        attention_k_eq_v=k_eq_v,
        sliding_window=int(hf.get("sliding_window", 512)),
        rope_theta=float(full.get("rope_theta", 1_000_000.0)),
        rope_local_theta=float(slide.get("rope_theta", 10_000.0)),
        global_partial_rotary=float(full.get("partial_rotary_factor", 1.0)
                                    if full.get("rope_type") == "proportional" else 1.0),
        global_rope_factor=float(full.get("factor", 1.0)),
        final_logit_softcap=hf.get("final_logit_softcapping"),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 131072)),
        ple_dim=ple,
        ple_vocab_size=int(hf.get("vocab_size_per_layer_input") or 0) if ple else 0,
        num_kv_shared_layers=int(hf.get("num_kv_shared_layers") or 0),
        double_wide_mlp=bool(hf.get("use_double_wide_mlp", False)),
        num_experts=int(hf.get("num_experts") or 0) if moe else 0,
        top_k=int(hf.get("top_k_experts") or 0) if moe else 0,
        moe_intermediate_size=int(hf.get("moe_intermediate_size") or 0) if moe else 0,
        **hf_config_tokens(hf),
    )


def to_hf_config(cfg: Gemma4Config) -> dict[str, Any]:
    """The ``gemma4_text`` config.json of ``Gemma4ForCausalLM`` in the published key layout."""
    full: dict[str, Any] = {"rope_type": "proportional", "partial_rotary_factor": cfg.global_partial_rotary,
                            "rope_theta": cfg.rope_theta}
    if cfg.global_rope_factor != 1.0:
        full["factor"] = cfg.global_rope_factor
    return {
        "model_type": "gemma4_text",
        "architectures": ["Gemma4ForCausalLM"],
        **hf_shape(cfg),
        "global_head_dim": cfg.global_hd,
        "num_global_key_value_heads": cfg.num_global_kv_heads if cfg.attention_k_eq_v else None,
        "attention_k_eq_v": cfg.attention_k_eq_v,
        "hidden_activation": "gelu_pytorch_tanh",
        "sliding_window": cfg.sliding_window,
        "layer_types": hf_layer_types(cfg.layer_types),
        "rope_parameters": hf_rope_parameters(full, cfg.rope_local_theta),
        "final_logit_softcapping": cfg.final_logit_softcap,
        "hidden_size_per_layer_input": cfg.ple_dim,
        "vocab_size_per_layer_input": cfg.ple_vocab,
        "num_kv_shared_layers": cfg.num_kv_shared_layers,
        "use_double_wide_mlp": cfg.double_wide_mlp,
        "enable_moe_block": bool(cfg.num_experts),
        "num_experts": cfg.num_experts or None,
        "top_k_experts": cfg.top_k or None,
        "moe_intermediate_size": cfg.moe_intermediate_size or None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        **hf_tokens_entry(cfg),
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }


# ---- presets ------------------------------------------------------------------------------------------------


def _pattern(n: int, period: int) -> tuple[str, ...]:
    return tuple(GLOBAL if (i + 1) % period == 0 else LOCAL for i in range(n))


def _preset(name: str, **kw: Any) -> Gemma4Config:
    base: dict[str, Any] = dict(vocab_size=262144, num_heads=8, head_dim=256, global_head_dim=512,
                                final_logit_softcap=30.0, eos_token_id=(1, 106), name=name)
    base.update(kw)
    return Gemma4Config(**base)


#: The published shapes, base and instruction-tuned (multimodal checkpoints: loading one reads its vision tower
#: too, as the ``gemma4_vision`` family; the presets' shapes and counts are the text decoder's).
PRESETS, PRESET_HF_REPOS = preset_pairs(_preset, {
    # dense: k = v global layers with 4 KV heads, 1024-token windows
    ("gemma4_31b", "gemma4_31b_it", "google/gemma-4-31B"):
        dict(hidden_size=5376, num_layers=60, num_heads=32, num_kv_heads=16, num_global_kv_heads=4,
             attention_k_eq_v=True, intermediate_size=21504, sliding_window=1024, layer_types=_pattern(60, 6),
             max_position_embeddings=262144),
    # 128 experts top 8 beside a dense MLP in every layer
    ("gemma4_26b_a4b", "gemma4_26b_a4b_it", "google/gemma-4-26B-A4B"):
        dict(hidden_size=2816, num_layers=30, num_heads=16, num_kv_heads=8, num_global_kv_heads=2,
             attention_k_eq_v=True, intermediate_size=2112, sliding_window=1024, layer_types=_pattern(30, 6),
             max_position_embeddings=262144, num_experts=128, top_k=8, moe_intermediate_size=704),
    # per-layer embeddings, the last 20 layers reading shared keys and values with double-wide MLPs
    ("gemma4_e2b", "gemma4_e2b_it", "google/gemma-4-E2B"):
        dict(hidden_size=1536, num_layers=35, num_kv_heads=1, intermediate_size=6144, sliding_window=512,
             layer_types=_pattern(35, 5), ple_dim=256, ple_vocab_size=262144, num_kv_shared_layers=20,
             double_wide_mlp=True),
    ("gemma4_e4b", "gemma4_e4b_it", "google/gemma-4-E4B"):
        dict(hidden_size=2560, num_layers=42, num_kv_heads=2, intermediate_size=10240, sliding_window=512,
             layer_types=_pattern(42, 6), ple_dim=256, ple_vocab_size=262144, num_kv_shared_layers=18),
})


def tiny_config(**overrides: Any) -> Gemma4Config:
    """A few-kilobyte Gemma 4 with every feature on for tests and examples: local and global layers with
    different head dims and KV heads, k = v globals, proportional RoPE, experts, per-layer embeddings, the
    last three layers reading shared keys and values with double-wide MLPs, window 8."""
    base: dict[str, Any] = dict(
        vocab_size=512, hidden_size=32, num_layers=6, num_heads=4, num_kv_heads=2, head_dim=8, global_head_dim=16,
        num_global_kv_heads=1, attention_k_eq_v=True, intermediate_size=64, sliding_window=8,
        layer_types=(LOCAL, LOCAL, GLOBAL) * 2, max_position_embeddings=512, ple_dim=8, num_kv_shared_layers=3,
        double_wide_mlp=True, num_experts=4, top_k=2, moe_intermediate_size=16, eos_token_id=(1, 106),
        name="tiny_gemma4")
    base.update(overrides)
    if "num_layers" in overrides and "layer_types" not in overrides:
        base["layer_types"] = _pattern(base["num_layers"], 3)
    return Gemma4Config(**base)
