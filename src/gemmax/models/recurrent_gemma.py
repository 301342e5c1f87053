"""RecurrentGemma (Griffin): residual blocks of RG-LRU recurrence and local multi-query attention.

Layout of the computation
-------------------------
Blocks follow a fixed period (``recurrent, recurrent, attention``). Weights are stacked *by kind*
(``recurrent_block/...`` [Lr, ...], ``attention_block/...`` [La, ...]) and the forward pass scans over whole
periods, so the compiled body holds one period (three blocks) whatever the depth; the leftover blocks of an
incomplete last period (26 = 8 * 3 + 2) run once after the scan.

Numerics (pinned to transformers' ``modeling_recurrent_gemma.py``)
------------------------------------------------------------------
* The embedding is multiplied by sqrt(width) *rounded to bfloat16* (the reference keeps its normalizer as a
  bfloat16 buffer), then cast to the activation dtype: sqrt(2560) = 50.596 becomes 50.5 even in float32.
* RMSNorm with ``(1 + scale)``; GeGLU MLP with biases (tanh GELU); final logits ``30 * tanh(x / 30)``.
* Attention: multi-query, window 2048 including the current token, RoPE on the first half of head_dim, query
  scale head_dim ** -0.5, bias on the output projection only.
* Recurrent block: ``linear_y`` -> GELU; ``linear_x`` -> causal depthwise Conv1D (width 4) -> RG-LRU; the two
  branches multiply, then ``linear_out``. RG-LRU: ``log a = -8 * sigmoid(W_a x) * softplus(Lambda)``,
  ``h_t = a_t h_{t-1} + sqrt(1 - a_t^2) (sigmoid(W_x x) * x)``, with ``a = 0`` and multiplier 1 where the
  position is 0 (document start). The recurrence runs in float32 whatever the activation dtype.

Training and prefill evaluate the recurrence with ``jax.lax.associative_scan`` (log-depth, parallel over
time); decoding carries an O(1) state per recurrent block (float32 ``h`` plus the last 3 Conv1D inputs)
and a ring buffer of at most ``attention_window`` keys/values per attention block, so generation memory does
not grow with the generated length (:func:`cache_bytes`).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from gemmax.io.hf import (
    CheckpointError,
    LazyWeight,
    open_safetensors_folder,
    raise_on_problems,
    write_safetensors,
)
from gemmax.models.gemma.model import ParamSpec, flatten, unflatten
from gemmax.nn.layers import (
    apply_rope,
    attention_mask,
    dot_attention,
    gelu_tanh,
    linear,
    rms_norm,
    rope_inv_freq,
    softcap,
)

Array = jax.Array
Params = dict[str, Any]

RECURRENT = "recurrent"
ATTENTION = "attention"
#: Where each block kind's stacked weights live in the parameter tree.
KIND_PREFIX = {RECURRENT: "recurrent_block", ATTENTION: "attention_block"}


# ---- configuration ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecurrentGemmaConfig:
    """Hyper-parameters of a Griffin model. ``mlp_width`` is the width of *each* GeGLU branch (HF's
    ``intermediate_size`` is twice that: the reference halves it)."""

    vocab_size: int = 256000
    width: int = 2560
    num_layers: int = 26
    num_heads: int = 10
    num_kv_heads: int = 1
    lru_width: int = 2560
    mlp_width: int = 7680
    attention_window: int = 2048
    conv_width: int = 4
    final_logit_softcap: float = 30.0
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.5
    block_types: tuple[str, ...] = (RECURRENT, RECURRENT, ATTENTION)
    bos_token_id: int = 2
    eos_token_id: int | tuple[int, ...] = 1
    pad_token_id: int = 0
    name: str = ""
    family: str = "recurrent_gemma"
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        bad = set(self.block_types) - {RECURRENT, ATTENTION}
        if bad:
            raise ValueError(f"block_types may hold only 'recurrent'/'attention', got {sorted(bad)}")
        if self.width % self.num_heads or self.lru_width % self.num_heads:
            raise ValueError("width and lru_width must be multiples of num_heads")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        p = self.block_types
        return tuple(p[i % len(p)] for i in range(self.num_layers))

    def count(self, kind: str) -> int:
        return sum(k == kind for k in self.layer_kinds)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    @property
    def embed_scale(self) -> float:
        """sqrt(width) rounded to bfloat16, as the reference's normalizer buffer holds it."""
        return float(np.asarray(math.sqrt(self.width), ml_dtypes.bfloat16))

    def replace(self, **kw: Any) -> RecurrentGemmaConfig:
        return replace(self, **kw)

    def param_count(self) -> dict[str, int]:
        total = sum(s.size for s in param_specs(self).values())
        embed = self.vocab_size * self.width
        return {"total": total, "embedding": embed, "non_embedding": total - embed}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["block_types"] = list(self.block_types)
        d["eos_token_id"] = list(self.eos_ids) if len(self.eos_ids) > 1 else self.eos_ids[0]
        d.pop("extra")
        return d


def _preset(name: str, width: int, layers: int, heads: int) -> RecurrentGemmaConfig:
    return RecurrentGemmaConfig(name=name, width=width, num_layers=layers, num_heads=heads, num_kv_heads=1,
                                lru_width=width, mlp_width=3 * width)


#: The published shapes: 2B (2.7B parameters) and 9B (8.6B), base and instruction-tuned.
PRESETS: dict[str, RecurrentGemmaConfig] = {
    c.name: c for c in [
        _preset("recurrent_gemma_2b_en", 2560, 26, 10),
        _preset("recurrent_gemma_instruct_2b_en", 2560, 26, 10),
        _preset("recurrent_gemma_9b_en", 4096, 38, 16),
        _preset("recurrent_gemma_instruct_9b_en", 4096, 38, 16),
    ]
}

PRESET_HF_REPOS: dict[str, str] = {
    "recurrent_gemma_2b_en": "google/recurrentgemma-2b",
    "recurrent_gemma_instruct_2b_en": "google/recurrentgemma-2b-it",
    "recurrent_gemma_9b_en": "google/recurrentgemma-9b",
    "recurrent_gemma_instruct_9b_en": "google/recurrentgemma-9b-it",
}


def tiny_config(**overrides: Any) -> RecurrentGemmaConfig:
    """A few-kilobyte Griffin for tests: 5 blocks (one full period plus a leftover pair), window 8."""
    base: dict[str, Any] = dict(vocab_size=256, width=48, num_layers=5, num_heads=4, num_kv_heads=1,
                                lru_width=48, mlp_width=96, attention_window=8, name="tiny_recurrent_gemma")
    base.update(overrides)
    return RecurrentGemmaConfig(**base)


def from_hf_config(hf: Mapping[str, Any]) -> RecurrentGemmaConfig:
    """RecurrentGemmaConfig from a transformers ``config.json`` (model_type ``recurrent_gemma``)."""
    if hf.get("model_type") != "recurrent_gemma":
        raise ValueError(f"not a RecurrentGemma config (model_type {hf.get('model_type')!r})")
    rope = hf.get("rope_parameters") or {}
    width = int(hf["hidden_size"])
    heads = int(hf["num_attention_heads"])
    eos = hf.get("eos_token_id", 1)
    return RecurrentGemmaConfig(
        vocab_size=int(hf["vocab_size"]), width=width, num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads, num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        lru_width=int(hf.get("lru_width") or width), mlp_width=int(hf["intermediate_size"]) // 2,
        attention_window=int(hf.get("attention_window_size", 2048)), conv_width=int(hf.get("conv1d_width", 4)),
        final_logit_softcap=float(hf.get("logits_soft_cap", 30.0)), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        partial_rotary_factor=float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5))),
        block_types=tuple(hf.get("block_types") or (RECURRENT, RECURRENT, ATTENTION)),
        bos_token_id=int(hf.get("bos_token_id", 2)),
        eos_token_id=tuple(eos) if isinstance(eos, list) and len(eos) > 1 else (eos[0] if isinstance(eos, list)
                                                                                else int(eos)),
        pad_token_id=int(hf.get("pad_token_id") or 0), name=hf.get("_name_or_path", "") or "",
    )


def to_hf_config(cfg: RecurrentGemmaConfig) -> dict[str, Any]:
    """The config.json transformers needs to rebuild the same model."""
    eos = list(cfg.eos_ids) if len(cfg.eos_ids) > 1 else cfg.eos_ids[0]
    return {
        "model_type": "recurrent_gemma", "architectures": ["RecurrentGemmaForCausalLM"],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.width, "intermediate_size": 2 * cfg.mlp_width,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "lru_width": cfg.lru_width,
        "attention_window_size": cfg.attention_window, "conv1d_width": cfg.conv_width,
        "logits_soft_cap": cfg.final_logit_softcap, "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta,
                            "partial_rotary_factor": cfg.partial_rotary_factor},
        "block_types": list(cfg.block_types), "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": True,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": eos, "pad_token_id": cfg.pad_token_id,
        "head_dim": cfg.head_dim, "torch_dtype": "float32",
    }


# ---- parameters ------------------------------------------------------------------------------------------


def _block_specs(cfg: RecurrentGemmaConfig, kind: str, n: int) -> dict[str, ParamSpec]:
    D, R, F, H, K, hd = cfg.width, cfg.lru_width, cfg.mlp_width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    bw = R // H
    s: dict[str, ParamSpec] = {"temporal_pre_norm/scale": ParamSpec((n, D), ("layers", "embed"), "zeros")}
    if kind == RECURRENT:
        s.update({
            "linear_x/kernel": ParamSpec((n, D, R), ("layers", "embed", "lru")),
            "linear_x/bias": ParamSpec((n, R), ("layers", "lru"), "zeros"),
            "linear_y/kernel": ParamSpec((n, D, R), ("layers", "embed", "lru")),
            "linear_y/bias": ParamSpec((n, R), ("layers", "lru"), "zeros"),
            "conv_1d/kernel": ParamSpec((n, cfg.conv_width, R), ("layers", "conv", "lru")),
            "conv_1d/bias": ParamSpec((n, R), ("layers", "lru"), "zeros"),
            "rg_lru/input_gate/kernel": ParamSpec((n, H, bw, bw), ("layers", "heads", "lru_block", "lru_block")),
            "rg_lru/input_gate/bias": ParamSpec((n, H, bw), ("layers", "heads", "lru_block"), "zeros"),
            "rg_lru/a_gate/kernel": ParamSpec((n, H, bw, bw), ("layers", "heads", "lru_block", "lru_block")),
            "rg_lru/a_gate/bias": ParamSpec((n, H, bw), ("layers", "heads", "lru_block"), "zeros"),
            "rg_lru/a_param": ParamSpec((n, R), ("layers", "lru"), "a_param"),
            "linear_out/kernel": ParamSpec((n, R, D), ("layers", "lru", "embed")),
            "linear_out/bias": ParamSpec((n, D), ("layers", "embed"), "zeros"),
        })
    else:
        s.update({
            "attention/query/kernel": ParamSpec((n, H, D, hd), ("layers", "heads", "embed", "head_dim")),
            "attention/key/kernel": ParamSpec((n, K, D, hd), ("layers", "kv_heads", "embed", "head_dim")),
            "attention/value/kernel": ParamSpec((n, K, D, hd), ("layers", "kv_heads", "embed", "head_dim")),
            "attention/attention_output/kernel": ParamSpec((n, H, hd, D), ("layers", "heads", "head_dim", "embed")),
            "attention/attention_output/bias": ParamSpec((n, D), ("layers", "embed"), "zeros"),
        })
    s.update({
        "channel_pre_norm/scale": ParamSpec((n, D), ("layers", "embed"), "zeros"),
        "ffw_gating/kernel": ParamSpec((n, D, F), ("layers", "embed", "mlp")),
        "ffw_gating/bias": ParamSpec((n, F), ("layers", "mlp"), "zeros"),
        "ffw_gating_2/kernel": ParamSpec((n, D, F), ("layers", "embed", "mlp")),
        "ffw_gating_2/bias": ParamSpec((n, F), ("layers", "mlp"), "zeros"),
        "ffw_linear/kernel": ParamSpec((n, F, D), ("layers", "mlp", "embed")),
        "ffw_linear/bias": ParamSpec((n, D), ("layers", "embed"), "zeros"),
    })
    return {f"{KIND_PREFIX[kind]}/{k}": v for k, v in s.items()}


def param_specs(cfg: RecurrentGemmaConfig) -> dict[str, ParamSpec]:
    """Every weight with its shape and logical axes, keyed by ``/``-joined path (stacked by block kind)."""
    specs = {"token_embedding/embeddings": ParamSpec((cfg.vocab_size, cfg.width), ("vocab", "embed"), "embedding")}
    for kind in (RECURRENT, ATTENTION):
        if cfg.count(kind):
            specs.update(_block_specs(cfg, kind, cfg.count(kind)))
    specs["final_normalization/scale"] = ParamSpec((cfg.width,), ("embed",), "zeros")
    return specs


#: Default sharding rules (regex over weight paths -> partition spec of the *stacked* weight, layer axis
#: first), in the spirit of ``gemmax.distribution.get_layout_map``: heads / LRU / MLP width on "model".
LAYOUT_RULES: dict[str, tuple[str | None, ...]] = {
    r"token_embedding/embeddings": ("model", None),
    r"attention_block/attention/query/kernel": (None, "model", None, None),
    r"attention_block/attention/(key|value)/kernel": (None, None, None, None),  # one KV head: replicate
    r"attention_block/attention/attention_output/kernel": (None, "model", None, None),
    r"recurrent_block/linear_(x|y)/kernel": (None, None, "model"),
    r"recurrent_block/linear_(x|y)/bias": (None, "model"),
    r"recurrent_block/conv_1d/kernel": (None, None, "model"),
    r"recurrent_block/conv_1d/bias": (None, "model"),
    r"recurrent_block/rg_lru/(input_gate|a_gate)/kernel": (None, "model", None, None),
    r"recurrent_block/rg_lru/(input_gate|a_gate)/bias": (None, "model", None),
    r"recurrent_block/rg_lru/a_param": (None, "model"),
    r"recurrent_block/linear_out/kernel": (None, "model", None),
    r".*_block/ffw_gating(_2)?/kernel": (None, None, "model"),
    r".*_block/ffw_gating(_2)?/bias": (None, "model"),
    r".*_block/ffw_linear/kernel": (None, "model", None),
}


def layout_spec(path: str) -> tuple[str | None, ...] | None:
    """The first LAYOUT_RULES spec whose regex matches ``path`` (None: replicate)."""
    for rx, spec in LAYOUT_RULES.items():
        if re.search(rx, path):
            return spec
    return None


def init_params(cfg: RecurrentGemmaConfig, key: Array, dtype: Any = jnp.float32) -> Params:
    """Random init: fan-in-scaled normals, zero biases and norms, and ``a_param`` such that a = sigmoid-free
    decay a^c lies in [0.9, 0.999] as Griffin initialises it (a slowly forgetting recurrence)."""
    specs = param_specs(cfg)
    keys = jax.random.split(key, len(specs))
    flat = {}
    for k, (path, s) in zip(keys, sorted(specs.items()), strict=True):
        if s.init == "zeros":
            flat[path] = jnp.zeros(s.shape, dtype)
        elif s.init == "a_param":
            a = jax.random.uniform(k, s.shape, jnp.float32, 0.9 ** 2, 0.999 ** 2)
            # softplus(a_param) = -0.5 log a  <=>  a_param = log(exp(-0.5 log a) - 1)
            flat[path] = jnp.log(jnp.expm1(-0.5 * jnp.log(a))).astype(dtype)
        else:
            fan_in = cfg.width if s.init == "embedding" else (
                s.shape[-2] if len(s.shape) >= 3 else s.shape[-1])
            if path.endswith("attention_output/kernel"):
                fan_in = cfg.num_heads * cfg.head_dim
            flat[path] = (jax.random.normal(k, s.shape, jnp.float32) / math.sqrt(fan_in)).astype(dtype)
    return unflatten(flat)


# ---- building blocks -------------------------------------------------------------------------------------

#: einsum equations (main, LoRA pair) of each dense layer of a block.
EQS: dict[str, tuple[str, tuple[str, str]]] = {
    "linear_x": ("btd,dr->btr", ("btd,dk->btk", "btk,kr->btr")),
    "linear_y": ("btd,dr->btr", ("btd,dk->btk", "btk,kr->btr")),
    "linear_out": ("btr,rd->btd", ("btr,rk->btk", "btk,kd->btd")),
    "ffw_gating": ("btd,df->btf", ("btd,dr->btr", "btr,rf->btf")),
    "ffw_gating_2": ("btd,df->btf", ("btd,dr->btr", "btr,rf->btf")),
    "ffw_linear": ("btf,fd->btd", ("btf,fr->btr", "btr,rd->btd")),
    "query": ("btd,ndh->btnh", ("btd,dr->btr", "btr,rnh->btnh")),
    "key": ("btd,ndh->btnh", ("btd,dr->btr", "btr,rnh->btnh")),
    "value": ("btd,ndh->btnh", ("btd,dr->btr", "btr,rnh->btnh")),
    "attention_output": ("btnh,nhd->btd", ("btnh,nhr->btr", "btr,rd->btd")),
}


def dense(node: Params, x: Array, name: str) -> Array:
    """``layers.linear`` (plain / quantized / LoRA) plus the bias the Griffin layers carry."""
    y = linear(node, x, *EQS[name])
    if "bias" in node:
        y = y + node["bias"].astype(y.dtype)
    return y


def mlp(p: Params, x: Array) -> Array:
    gate = gelu_tanh(dense(p["ffw_gating"], x, "ffw_gating"))
    return dense(p["ffw_linear"], gate * dense(p["ffw_gating_2"], x, "ffw_gating_2"), "ffw_linear")


def causal_conv1d(x: Array, kernel: Array, bias: Array, positions: Array,
                  state: Array | None = None) -> Array:
    """Depthwise causal convolution: ``y_t = b + sum_k w_k x_{t-(W-1)+k}``.

    ``state`` holds the W-1 inputs before ``x`` (decoding); taps that reach back past a document start
    (further back than ``positions`` allows) are dropped, so packed documents do not leak into each other.
    """
    w = kernel.shape[0]
    b, t, r = x.shape
    if state is None:
        state = jnp.zeros((b, w - 1, r), x.dtype)
    xp = jnp.concatenate([state.astype(x.dtype), x], axis=1)
    out = jnp.zeros((b, t, r), jnp.float32)
    for k in range(w):
        back = w - 1 - k
        tap = xp[:, k:k + t].astype(jnp.float32) * kernel[k].astype(jnp.float32)
        out = out + jnp.where((positions >= back)[..., None], tap, 0.0)
    return (out + bias.astype(jnp.float32)).astype(x.dtype)


def rg_lru_coefficients(p: Params, x: Array, positions: Array) -> tuple[Array, Array]:
    """(a_t, b_t) of the linear recurrence ``h_t = a_t h_{t-1} + b_t``, both float32 [B, T, R]."""
    b, t, r = x.shape
    h = p["input_gate"]["kernel"].shape[0]
    xf = x.astype(jnp.float32)
    xh = xf.reshape(b, t, h, r // h)

    def gate(node: Params) -> Array:
        y = jnp.einsum("bthi,hij->bthj", xh, node["kernel"].astype(jnp.float32)) + node["bias"].astype(jnp.float32)
        return jax.nn.sigmoid(y).reshape(b, t, r)

    gate_x, gate_a = gate(p["input_gate"]), gate(p["a_gate"])
    log_a = -8.0 * gate_a * jax.nn.softplus(p["a_param"].astype(jnp.float32))
    a = jnp.exp(log_a)
    reset = (positions == 0)[..., None]
    multiplier = jnp.where(reset, 1.0, jnp.sqrt(1.0 - jnp.exp(2.0 * log_a)))
    # The reference rounds the multiplier and the gated input to the activation dtype before the scan.
    bx = (xf * gate_x).astype(x.dtype) * multiplier.astype(x.dtype)
    return jnp.where(reset, 0.0, a), bx.astype(jnp.float32)


def linear_scan(a: Array, b: Array, h0: Array | None = None) -> Array:
    """All states of ``h_t = a_t h_{t-1} + b_t`` along axis 1 with ``jax.lax.associative_scan``.

    Composing two steps gives another step — (a1, b1) then (a2, b2) is (a1 a2, a2 b1 + b2) — which is
    what lets the scan run in log depth over the sequence instead of T sequential steps.
    """
    if h0 is not None:
        b = b.at[:, 0].add(a[:, 0] * h0)

    def combine(l: tuple[Array, Array], r: tuple[Array, Array]) -> tuple[Array, Array]:
        return l[0] * r[0], r[0] * l[1] + r[1]

    return jax.lax.associative_scan(combine, (a, b), axis=1)[1]


def sequential_scan(a: Array, b: Array, h0: Array | None = None) -> Array:
    """The same recurrence one step at a time (``lax.scan``): the reference the associative scan is tested
    against, and what decoding does."""
    h0 = jnp.zeros_like(b[:, 0]) if h0 is None else h0

    def step(h: Array, ab: tuple[Array, Array]) -> tuple[Array, Array]:
        h = ab[0] * h + ab[1]
        return h, h

    _, hs = jax.lax.scan(step, h0, (jnp.moveaxis(a, 1, 0), jnp.moveaxis(b, 1, 0)))
    return jnp.moveaxis(hs, 0, 1)


def _last(x: Array, lengths: Array) -> Array:
    """x[b, lengths[b] - 1] for every row."""
    return jnp.take_along_axis(x, (lengths - 1)[:, None, None].astype(jnp.int32), axis=1)[:, 0]


def recurrent_temporal(p: Params, h: Array, positions: Array, state: Params | None,
                       lengths: Array | None, scan: Callable = linear_scan) -> tuple[Array, Params]:
    """The recurrent temporal block over a chunk, starting from ``state`` (None: a fresh sequence).

    Returns the output and the state after ``lengths`` tokens of each row (right padding beyond it is
    ignored), so one function serves training, prefill and single-token decoding.
    """
    y = gelu_tanh(dense(p["linear_y"], h, "linear_y"))
    x = dense(p["linear_x"], h, "linear_x")
    conv_state = None if state is None else state["conv"]
    xc = causal_conv1d(x, p["conv_1d"]["kernel"], p["conv_1d"]["bias"], positions, conv_state)
    a, b = rg_lru_coefficients(p["rg_lru"], xc, positions)
    hs = scan(a, b, None if state is None else state["h"])
    out = dense(p["linear_out"], hs.astype(h.dtype) * y, "linear_out")
    if lengths is None:
        return out, {}
    w = p["conv_1d"]["kernel"].shape[0]
    prev = conv_state if conv_state is not None else jnp.zeros((x.shape[0], w - 1, x.shape[2]), x.dtype)
    xp = jnp.concatenate([prev.astype(x.dtype), x], axis=1)
    idx = lengths[:, None].astype(jnp.int32) + jnp.arange(w - 1, dtype=jnp.int32)[None]
    new_conv = jnp.take_along_axis(xp, idx[..., None], axis=1)
    return out, {"conv": new_conv, "h": _last(hs, lengths)}


def attention_qkv(p: Params, h: Array, cfg: RecurrentGemmaConfig, positions: Array) -> tuple[Array, Array, Array]:
    a = p["attention"]
    q = dense(a["query"], h, "query")
    k = dense(a["key"], h, "key")
    v = dense(a["value"], h, "value")
    inv = rope_inv_freq(cfg.head_dim, cfg.rope_theta, rotary_dim=cfg.rotary_dim)
    q = apply_rope(q, positions, inv) * jnp.asarray(cfg.head_dim ** -0.5, q.dtype)
    k = apply_rope(k, positions, inv)
    return q, k, v


def attention_out(p: Params, o: Array) -> Array:
    return dense(p["attention"]["attention_output"], o, "attention_output")


def residual_block(kind: str, p: Params, x: Array, cfg: RecurrentGemmaConfig,
                   temporal: Callable[[str, Params, Array], tuple[Array, Params]]) -> tuple[Array, Params]:
    """Griffin's residual block: ``x + temporal(norm(x))`` then ``+ mlp(norm(.))``."""
    h = rms_norm(x, p["temporal_pre_norm"]["scale"], cfg.norm_eps)
    t, cache = temporal(kind, p, h)
    x = x + t
    return x + mlp(p, rms_norm(x, p["channel_pre_norm"]["scale"], cfg.norm_eps)), cache


def _runs(kinds: tuple[str, ...]) -> list[tuple[str, int]]:
    """Consecutive same-kind blocks grouped: (recurrent, recurrent, attention) -> [(recurrent, 2),
    (attention, 1)]."""
    out: list[tuple[str, int]] = []
    for k in kinds:
        if out and out[-1][0] == k:
            out[-1] = (k, out[-1][1] + 1)
        else:
            out.append((k, 1))
    return out


def _apply_runs(kinds: tuple[str, ...], trees: dict[str, tuple[Params, Params]], x: Array,
                block: Callable[[str, Params, Array, Params], tuple[Array, Params]]
                ) -> tuple[Array, dict[str, Params]]:
    """Blocks ``kinds`` in order; ``trees[kind]`` holds (weights, caches) of that kind stacked in order.

    A run of several blocks of one kind is itself a ``lax.scan``, so the compiled program holds each block
    kind about once — the associative scan of a recurrent block is the bulk of compile time.
    """
    seen: dict[str, int] = {}
    outs: dict[str, list[Params]] = {}
    for kind, count in _runs(kinds):
        i = seen.get(kind, 0)
        seen[kind] = i + count
        part = jax.tree.map(lambda a, i=i, count=count: a[i:i + count], trees[kind])
        if count == 1:
            p, c = jax.tree.map(lambda a: a[0], part)
            x, c = block(kind, p, x, c)
            c = jax.tree.map(lambda a: a[None], c)
        else:
            def step(x: Array, pc: tuple[Params, Params], kind: str = kind) -> tuple[Array, Params]:
                return block(kind, pc[0], x, pc[1])

            x, c = jax.lax.scan(step, x, part)
        outs.setdefault(kind, []).append(c)
    return x, {k: jax.tree.map(lambda *a: jnp.concatenate(a), *v) for k, v in outs.items()}


def run_blocks(params: Params, cfg: RecurrentGemmaConfig, x: Array, caches: dict[str, Params],
               block: Callable[[str, Params, Array, Params], tuple[Array, Params]],
               remat: bool = False) -> tuple[Array, dict[str, Params]]:
    """Apply every block in order with a scan over whole periods of ``block_types``.

    Weights and caches are stacked per kind; the first ``n_periods * count_in_period`` entries of each are
    reshaped to [n_periods, count, ...] and scanned, the remainder (the incomplete last period) runs once
    after. Compile time is flat in depth. ``block(kind, p, x, cache) -> (x, new cache)``.
    """
    pattern = cfg.block_types
    P, L = len(pattern), cfg.num_layers
    n, r = L // P, L % P
    kinds = [k for k in (RECURRENT, ATTENTION) if cfg.count(k)]
    per = {k: pattern.count(k) for k in kinds}
    stacked = {k: (params[KIND_PREFIX[k]], caches.get(k, {})) for k in kinds}
    heads = {k: jax.tree.map(lambda a, k=k: a[:n * per[k]].reshape((n, per[k]) + a.shape[1:]), stacked[k])
             for k in kinds if per[k]}
    tails = {k: jax.tree.map(lambda a, k=k: a[n * per[k]:], stacked[k]) for k in kinds}

    def body(x: Array, xs: dict[str, tuple[Params, Params]]) -> tuple[Array, dict[str, Params]]:
        return _apply_runs(pattern, xs, x, block)

    if remat:
        body = jax.checkpoint(body)
    parts: dict[str, list[Params]] = {k: [] for k in kinds}
    if n:
        x, new_heads = jax.lax.scan(body, x, heads)
        for k, v in new_heads.items():
            parts[k].append(jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), v))
    if r:
        x, new_tail = _apply_runs(pattern[:r], tails, x, block)
        for k, v in new_tail.items():
            parts[k].append(v)
    return x, {k: jax.tree.map(lambda *a: jnp.concatenate(a), *v) if v else {} for k, v in parts.items()}


def compute_dtype(params: Params) -> Any:
    """Activation dtype: the embedding's, or — once it is int8 — the final norm's, which quantization never
    touches (so a bfloat16 model stays bfloat16 and its decoding cache never becomes int8)."""
    table = params["token_embedding"]["embeddings"]
    if jnp.issubdtype(table.dtype, jnp.floating):
        return table.dtype
    return params["final_normalization"]["scale"].dtype


def embed(params: Params, cfg: RecurrentGemmaConfig, tokens: Array) -> Array:
    node = params["token_embedding"]
    dtype = compute_dtype(params)
    x = jnp.take(node["embeddings"], tokens, axis=0).astype(dtype)
    if "scale" in node:  # int8 embedding: one scale per row (token)
        x = x * jnp.take(node["scale"], tokens, axis=0)[..., None].astype(dtype)
    return x * jnp.asarray(cfg.embed_scale, dtype)


def logits_from_hidden(params: Params, cfg: RecurrentGemmaConfig, hidden: Array) -> Array:
    """Final norm already applied; tied output head, then the 30 * tanh(x / 30) cap (float32). An int8
    embedding's per-row scales become per-vocabulary-column scales of the logits."""
    node = params["token_embedding"]
    w = node["embeddings"]
    logits = jnp.einsum("...d,vd->...v", hidden, w.astype(hidden.dtype), preferred_element_type=jnp.float32)
    if "scale" in node:
        logits = logits * node["scale"].astype(jnp.float32)
    return softcap(logits, cfg.final_logit_softcap)


# ---- whole-sequence forward (training, scoring) ----------------------------------------------------------


def forward_hidden(params: Params, cfg: RecurrentGemmaConfig, tokens: Array, positions: Array | None = None,
                   segment_ids: Array | None = None, remat: bool = False,
                   scan: Callable = linear_scan) -> Array:
    """Hidden states [B, T, D] after the final norm. ``positions`` restarting at 0 reset the recurrence
    (and the Conv1D taps) at document starts; ``segment_ids`` keep attention inside each document."""
    tokens = jnp.asarray(tokens)
    b, t = tokens.shape
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    positions = idx if positions is None else jnp.asarray(positions, jnp.int32)
    seg = None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    mask = attention_mask(idx, idx, cfg.attention_window, seg, seg)

    def temporal(kind: str, p: Params, h: Array) -> tuple[Array, Params]:
        if kind == RECURRENT:
            return recurrent_temporal(p, h, positions, None, None, scan)
        q, k, v = attention_qkv(p, h, cfg, positions)
        return attention_out(p, dot_attention(q, k, v, mask)), {}

    def block(kind: str, p: Params, x: Array, c: Params) -> tuple[Array, Params]:
        return residual_block(kind, p, x, cfg, temporal)

    x, _ = run_blocks(params, cfg, embed(params, cfg, tokens), {}, block, remat)
    return rms_norm(x, params["final_normalization"]["scale"], cfg.norm_eps)


def forward(params: Params, cfg: RecurrentGemmaConfig, tokens: Array, positions: Array | None = None,
            segment_ids: Array | None = None, scan: Callable = linear_scan) -> Array:
    """Float32 logits [B, T, V]."""
    return logits_from_hidden(params, cfg, forward_hidden(params, cfg, tokens, positions, segment_ids, scan=scan))


#: One compiled forward per (config, shapes), shared by every model object.
_forward_jit = jax.jit(forward, static_argnums=(1,), static_argnames=("scan",))


# ---- generation: O(1) recurrent state + ring-buffer attention cache --------------------------------------


def init_cache(cfg: RecurrentGemmaConfig, batch: int, cache_len: int, dtype: Any) -> Params:
    """Zeroed decoding state. ``cache_len`` (<= attention_window) is the ring size of the attention cache."""
    R, K, hd = cfg.lru_width, cfg.num_kv_heads, cfg.head_dim
    c: Params = {"pos": jnp.zeros((batch,), jnp.int32), "slot_pos": jnp.full((batch, cache_len), -1, jnp.int32)}
    if cfg.count(RECURRENT):
        n = cfg.count(RECURRENT)
        c[RECURRENT] = {"conv": jnp.zeros((n, batch, cfg.conv_width - 1, R), dtype),
                        "h": jnp.zeros((n, batch, R), jnp.float32)}
    if cfg.count(ATTENTION):
        n = cfg.count(ATTENTION)
        c[ATTENTION] = {"k": jnp.zeros((n, batch, cache_len, K, hd), dtype),
                        "v": jnp.zeros((n, batch, cache_len, K, hd), dtype)}
    return c


def cache_bytes(cfg: RecurrentGemmaConfig, batch: int = 1, length: int = 1, dtype: Any = jnp.bfloat16) -> int:
    """Bytes of decoding state for a sequence of ``length`` tokens (prompt + generated).

    It grows with the length only until the attention window is full (the ring holds min(length, window)
    keys/values) and is constant after that: the recurrent state is O(1).
    """
    shapes = jax.eval_shape(lambda: init_cache(cfg, batch, min(length, cfg.attention_window), dtype))
    return int(sum(np.prod(s.shape) * np.dtype(s.dtype).itemsize for s in jax.tree.leaves(shapes)))


def _ring_from_prompt(k: Array, lengths: Array, cache_len: int) -> tuple[Array, Array]:
    """Ring slots after a prompt: slot s holds the latest prompt position t < length with t % C == s.
    Returns (gathered [B, C, ...], slot positions [B, C] with -1 where empty)."""
    s = jnp.arange(cache_len, dtype=jnp.int32)[None]
    last = (lengths - 1)[:, None].astype(jnp.int32)
    t = last - jnp.mod(last - s, cache_len)
    gathered = jnp.take_along_axis(k, jnp.maximum(t, 0).reshape(t.shape + (1,) * (k.ndim - 2)), axis=1)
    return gathered, jnp.where(t >= 0, t, -1)


def prefill(params: Params, cfg: RecurrentGemmaConfig, tokens: Array, lengths: Array,
            cache_len: int) -> tuple[Array, Params]:
    """Run right-padded prompts (real lengths ``lengths``) and return (float32 logits of each row's last
    real token [B, V], decoding state)."""
    b, t = tokens.shape
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    mask = attention_mask(idx, idx, cfg.attention_window)
    cache = init_cache(cfg, b, cache_len, compute_dtype(params))

    def temporal(kind: str, p: Params, h: Array, c: Params) -> tuple[Array, Params]:
        if kind == RECURRENT:
            return recurrent_temporal(p, h, idx, None, lengths)
        q, k, v = attention_qkv(p, h, cfg, idx)
        out = attention_out(p, dot_attention(q, k, v, mask))
        return out, {"k": _ring_from_prompt(k, lengths, cache_len)[0].astype(c["k"].dtype),
                     "v": _ring_from_prompt(v, lengths, cache_len)[0].astype(c["v"].dtype)}

    def block(kind: str, p: Params, x: Array, c: Params) -> tuple[Array, Params]:
        return residual_block(kind, p, x, cfg, lambda kd, pp, h: temporal(kd, pp, h, c))

    caches = {k: cache[k] for k in (RECURRENT, ATTENTION) if k in cache}
    x, new = run_blocks(params, cfg, embed(params, cfg, tokens), caches, block)
    h = rms_norm(_last(x, lengths), params["final_normalization"]["scale"], cfg.norm_eps)
    cache.update(new)
    cache["pos"] = lengths.astype(jnp.int32)
    cache["slot_pos"] = _ring_from_prompt(idx[..., None], lengths, cache_len)[1]
    return logits_from_hidden(params, cfg, h), cache


def decode_step(params: Params, cfg: RecurrentGemmaConfig, cache: Params, token: Array) -> tuple[Array, Params]:
    """One token per row at position ``cache["pos"]`` -> (float32 logits [B, V], new state)."""
    b = token.shape[0]
    pos = cache["pos"]
    positions = pos[:, None]
    cache_len = cache["slot_pos"].shape[1]
    slot_hit = jnp.arange(cache_len, dtype=jnp.int32)[None] == (pos % cache_len)[:, None]  # [B, C]
    slot_pos = jnp.where(slot_hit, pos[:, None], cache["slot_pos"])
    valid = (slot_pos >= 0) & (slot_pos <= positions) & (positions - slot_pos < cfg.attention_window)
    ones = jnp.ones((b,), jnp.int32)

    def temporal(kind: str, p: Params, h: Array, c: Params) -> tuple[Array, Params]:
        if kind == RECURRENT:
            return recurrent_temporal(p, h, positions, c, ones)
        q, k, v = attention_qkv(p, h, cfg, positions)
        kc = jnp.where(slot_hit[:, :, None, None], k.astype(c["k"].dtype), c["k"])
        vc = jnp.where(slot_hit[:, :, None, None], v.astype(c["v"].dtype), c["v"])
        o = dot_attention(q, kc.astype(q.dtype), vc.astype(q.dtype), valid[:, None, :])
        return attention_out(p, o), {"k": kc, "v": vc}

    def block(kind: str, p: Params, x: Array, c: Params) -> tuple[Array, Params]:
        return residual_block(kind, p, x, cfg, lambda kd, pp, h: temporal(kd, pp, h, c))

    caches = {k: cache[k] for k in (RECURRENT, ATTENTION) if k in cache}
    x, new = run_blocks(params, cfg, embed(params, cfg, token[:, None]), caches, block)
    h = rms_norm(x[:, 0], params["final_normalization"]["scale"], cfg.norm_eps)
    out = dict(cache, **new)
    out["pos"] = pos + 1
    out["slot_pos"] = slot_pos
    return logits_from_hidden(params, cfg, h), out


def sample_token(logits: Array, key: Array, sampler: str, temperature: float, top_k: int | None) -> Array:
    """Greedy argmax, or a draw from softmax(logits / temperature) restricted to the top k."""
    if sampler == "greedy":
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if sampler != "random":
        raise ValueError(f"unknown sampler {sampler!r} (use 'greedy' or 'random')")
    logits = logits / max(temperature, 1e-6)
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(1, 4, 5, 6, 7, 8))
def _generate(params: Params, cfg: RecurrentGemmaConfig, tokens: Array, lengths: Array, max_new: int,
              cache_len: int, sampler: str, temperature: float, top_k: int | None, key: Array,
              stop_ids: Array, limit: Array) -> tuple[Array, Array]:
    """Prefill then a ``while_loop`` of decode steps; ``max_new`` (static) sizes the output buffer and the
    dynamic ``limit`` ends the loop, so nearby lengths share one compilation."""
    logits, cache = prefill(params, cfg, tokens, lengths, cache_len)
    b = tokens.shape[0]
    out = jnp.full((b, max_new), cfg.pad_token_id, jnp.int32)

    def cond(s: tuple) -> Array:
        i, _, _, _, done, _ = s
        return (i < jnp.minimum(limit, max_new)) & ~jnp.all(done)

    def body(s: tuple) -> tuple:
        i, logits, cache, out, done, key = s
        key, sub = jax.random.split(key)
        tok = sample_token(logits, sub, sampler, temperature, top_k)
        tok = jnp.where(done, cfg.pad_token_id, tok)
        out = out.at[:, i].set(tok)
        done = done | jnp.isin(tok, stop_ids)
        logits, cache = decode_step(params, cfg, cache, tok)
        return i + 1, logits, cache, out, done, key

    n, _, _, out, _, _ = jax.lax.while_loop(
        cond, body, (jnp.int32(0), logits, cache, out, jnp.zeros((b,), bool), key))
    return out, n


# ---- weight transforms: quantization and LoRA on the dense layers ---------------------------------------

#: The dense (``layers.linear``) nodes of each block kind: path under the kind's prefix -> EQS name. The
#: RG-LRU gates (block-diagonal einsums in float32), the Conv1D and the norms are not in it: they are small
#: (a few percent of the weights) and numerically sensitive, so they stay floating point and frozen.
DENSE_NODES: dict[str, dict[str, str]] = {
    RECURRENT: {"linear_x": "linear_x", "linear_y": "linear_y", "linear_out": "linear_out"},
    ATTENTION: {"attention/query": "query", "attention/key": "key", "attention/value": "value",
                "attention/attention_output": "attention_output"},
}
for _kind in DENSE_NODES:
    DENSE_NODES[_kind].update({"ffw_gating": "ffw_gating", "ffw_gating_2": "ffw_gating_2", "ffw_linear": "ffw_linear"})

#: LoRA target names (EQS names) accepted by :func:`add_lora`, with transformers' module names as aliases.
LORA_ALIASES = {"q_proj": "query", "k_proj": "key", "v_proj": "value", "o_proj": "attention_output",
                "gate_proj": "ffw_gating", "up_proj": "ffw_gating_2", "down_proj": "ffw_linear"}
_LORA_KEYS = ("lora_a", "lora_b", "lora_scale")


def dense_paths(cfg: RecurrentGemmaConfig) -> dict[tuple[str, ...], str]:
    """Tree path (tuple of keys) -> EQS name for every dense node of the block kinds this model has."""
    out: dict[tuple[str, ...], str] = {}
    for kind, nodes in DENSE_NODES.items():
        if cfg.count(kind):
            for sub, name in nodes.items():
                out[(KIND_PREFIX[kind], *sub.split("/"))] = name
    return out


def stacked_in_axes(name: str) -> tuple[int, ...]:
    """Contracted axes of a stacked kernel (layer axis first), read off its einsum so the table above is
    the single source of truth for shapes."""
    from gemmax.nn.quant import in_axes_from_eq

    return tuple(1 + a for a in in_axes_from_eq(EQS[name][0]))


def _get(tree: Params, path: tuple[str, ...]) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def _set(tree: Params, path: tuple[str, ...], value: Any) -> Params:
    """Functional update: copies the dicts along ``path``, shares every other leaf."""
    out = dict(tree)
    out[path[0]] = value if len(path) == 1 else _set(tree[path[0]], path[1:], value)
    return out


def quantize_params(params: Params, cfg: RecurrentGemmaConfig, mode: str = "int8", group_size: int | None = None,
                    embedding: bool = True) -> Params:
    """Weight-only quantization of every dense kernel (and, with ``embedding``, the tied embedding per row).

    Uses :func:`gemmax.nn.quant.quantize_kernel`, so the nodes have exactly ``gemmax.nn.quant``'s layout
    (``{"kernel": int8, "scale"}`` or grouped ``qkernel``/``qscale``) and ``layers.linear`` — which every
    Griffin dense layer goes through — applies them; biases and adapters on a node are kept.
    """
    from gemmax.nn.quant import is_quantized, quantize_kernel

    for path, name in dense_paths(cfg).items():
        node = _get(params, path)
        if is_quantized(node):
            raise ValueError(f"{'/'.join(path)} is already quantized")
        q = quantize_kernel(node["kernel"], stacked_in_axes(name), mode, group_size)
        params = _set(params, path, {**q, **{k: v for k, v in node.items() if k != "kernel"}})
    node = params["token_embedding"]
    if embedding and not is_quantized(node):
        q = quantize_kernel(node["embeddings"], (1,), "int8")
        params = _set(params, ("token_embedding",), {"embeddings": q["kernel"], "scale": q["scale"]})
    return params


def dequantize_params(params: Params, cfg: RecurrentGemmaConfig, dtype: Any = jnp.float32) -> Params:
    """Float weights back from :func:`quantize_params` (adapters and biases kept)."""
    from gemmax.nn.quant import dequantize_kernel, is_quantized

    for path, name in dense_paths(cfg).items():
        node = _get(params, path)
        if is_quantized(node):
            rest = {k: v for k, v in node.items() if k not in ("kernel", "scale", "qkernel", "qscale")}
            params = _set(params, path, {"kernel": dequantize_kernel(node, stacked_in_axes(name), dtype), **rest})
    node = params["token_embedding"]
    if is_quantized(node):
        params = _set(params, ("token_embedding",), {"embeddings": dequantize_kernel(node, (1,), dtype)})
    return params


def resolve_lora_targets(targets: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    names = (targets,) if isinstance(targets, str) else tuple(targets)
    out = tuple(dict.fromkeys(LORA_ALIASES.get(t, t) for t in names))
    bad = [t for t in out if t not in EQS]
    if bad or not out:
        raise ValueError(f"unknown LoRA target(s) {bad}; known: {', '.join(EQS)} (or {', '.join(LORA_ALIASES)})")
    return out


def add_lora(params: Params, cfg: RecurrentGemmaConfig, rank: int = 4, alpha: float | None = None,
             targets: str | tuple[str, ...] | list[str] = ("query", "value"), seed: int = 0,
             dtype: Any = jnp.float32) -> Params:
    """Adapters on every block of each targeted dense layer (attention ``query``/``key``/``value``/
    ``attention_output``, the MLP's ``ffw_*`` in both block kinds, the recurrent block's ``linear_*``).

    Same convention as :func:`gemmax.nn.lora.add_lora` (``lora_a`` [L, in..., r] uniform in ±1/sqrt(fan_in),
    ``lora_b`` [L, r, out...] zero, ``lora_scale`` [L] = alpha / rank), so the model is unchanged until
    training moves B, and ``gemmax.nn.lora.split_trainable`` picks the factors out of the tree.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    names = resolve_lora_targets(targets)
    scale = float(rank if alpha is None else alpha) / rank
    rng = np.random.default_rng(seed)
    hit = False
    for path, name in dense_paths(cfg).items():
        if name not in names:
            continue
        node = _get(params, path)
        if "lora_a" in node:
            raise ValueError(f"{'/'.join(path)} already has LoRA factors")
        shape = _kernel_shape(node, name)
        ins = stacked_in_axes(name)
        in_dims = tuple(shape[i] for i in ins)
        out_dims = tuple(shape[i] for i in range(1, len(shape)) if i not in ins)
        bound = 1.0 / math.sqrt(int(np.prod(in_dims)))
        a = rng.uniform(-bound, bound, (shape[0], *in_dims, rank)).astype(np.float32)
        params = _set(params, path, dict(node, lora_a=jnp.asarray(a, dtype),
                                         lora_b=jnp.zeros((shape[0], rank, *out_dims), dtype),
                                         lora_scale=jnp.full((shape[0],), scale, jnp.float32)))
        hit = True
    if not hit:
        raise ValueError(f"no dense layer of this model matches the LoRA targets {names}")
    return params


def _kernel_shape(node: Params, name: str) -> tuple[int, ...]:
    if "kernel" in node:
        return tuple(node["kernel"].shape)
    q = tuple(node["qkernel"].shape)  # grouped: the last input axis is split into (n_groups, group_size)
    ax = max(stacked_in_axes(name))
    return (*q[:ax], q[ax] * q[ax + 1], *q[ax + 2:])


def lora_delta(node: Params, name: str) -> Array:
    """``scale * A @ B`` laid out like the node's stacked kernel (float32)."""
    a = jnp.asarray(node["lora_a"], jnp.float32)
    b = jnp.asarray(node["lora_b"], jnp.float32)
    n, r = a.shape[0], a.shape[-1]
    delta = jnp.einsum("lir,lro->lio", a.reshape(n, -1, r), b.reshape(n, r, -1))
    delta = delta * jnp.asarray(node["lora_scale"], jnp.float32).reshape(n, 1, 1)
    delta = delta.reshape(n, *a.shape[1:-1], *b.shape[2:])
    ins = stacked_in_axes(name)
    nd = delta.ndim
    order = [0, *ins, *[i for i in range(1, nd) if i not in ins]]  # kernel axis held by each delta axis
    return jnp.transpose(delta, [order.index(i) for i in range(nd)])


def merge_lora(params: Params, cfg: RecurrentGemmaConfig) -> Params:
    """Fold adapters into their kernels (``W + scale * A @ B``; a quantized kernel is dequantized first and
    the result is float — re-quantize if wanted) and drop the factors."""
    from gemmax.nn.quant import dequantize_kernel

    for path, name in dense_paths(cfg).items():
        node = _get(params, path)
        if "lora_a" not in node:
            continue
        dt = node["lora_a"].dtype if ("scale" in node or "qkernel" in node) else node["kernel"].dtype
        w = dequantize_kernel(node, stacked_in_axes(name), jnp.float32)
        rest = {k: v for k, v in node.items() if k not in ("kernel", "scale", "qkernel", "qscale", *_LORA_KEYS)}
        params = _set(params, path, {"kernel": (w + lora_delta(node, name)).astype(dt), **rest})
    return params


def lm_loss(params: Params, cfg: RecurrentGemmaConfig, tokens: Array, weights: Array | None = None) -> Array:
    """Mean next-token cross-entropy (``weights`` [B, T] on the *target* tokens, e.g. 0 on padding)."""
    logits = forward(params, cfg, tokens)[:, :-1]
    tgt = jnp.asarray(tokens)[:, 1:]
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tgt[..., None], -1)[..., 0]
    w = jnp.ones_like(nll) if weights is None else jnp.asarray(weights, jnp.float32)[:, 1:]
    return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)


def layout_map(mesh: Any) -> Any:
    """``LAYOUT_RULES`` as a :class:`gemmax.distribution.LayoutMap` for ``mesh`` (LoRA factors and int8
    scales follow their kernel there)."""
    from gemmax.distribution import LayoutMap

    lm = LayoutMap(mesh)
    for rx, spec in LAYOUT_RULES.items():
        lm[rx] = spec
    return lm


def abstract_params(cfg: RecurrentGemmaConfig, dtype: Any = jnp.float32, lora_rank: int = 0,
                    lora_targets: tuple[str, ...] = ("query", "value")) -> Params:
    """ShapeDtypeStruct tree of the weights (plus adapters): what ``gemmax shard-plan`` describes without
    allocating anything."""
    tree = unflatten({p: jax.ShapeDtypeStruct(s.shape, dtype) for p, s in param_specs(cfg).items()})
    if lora_rank:
        tree = jax.eval_shape(lambda t: add_lora(t, cfg, lora_rank, targets=lora_targets, dtype=dtype), tree)
    return tree


# ---- Hugging Face checkpoints ----------------------------------------------------------------------------


def _hf_table(cfg: RecurrentGemmaConfig) -> dict[str, tuple[list[str] | str, Callable, Callable]]:
    """gemmax path -> (HF name, or per-layer names for stacked weights; HF -> gemmax; gemmax -> HF)."""
    H, K, hd, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.width
    ident = (lambda w: w, lambda w: w)
    tr = (lambda w: w.T, lambda w: w.T)

    def heads_in(n: int) -> tuple[Callable, Callable]:  # [n*hd, D] <-> [n, D, hd]
        return (lambda w: w.reshape(n, hd, D).transpose(0, 2, 1),
                lambda w: w.transpose(0, 2, 1).reshape(n * hd, D))

    out_proj = (lambda w: w.reshape(D, H, hd).transpose(1, 2, 0), lambda w: w.transpose(2, 0, 1).reshape(D, H * hd))
    conv = (lambda w: w[:, 0, :].T, lambda w: w.T[:, None, :])
    common = {
        "temporal_pre_norm/scale": ("temporal_pre_norm.weight", *ident),
        "channel_pre_norm/scale": ("channel_pre_norm.weight", *ident),
        "ffw_gating/kernel": ("mlp_block.gate_proj.weight", *tr),
        "ffw_gating/bias": ("mlp_block.gate_proj.bias", *ident),
        "ffw_gating_2/kernel": ("mlp_block.up_proj.weight", *tr),
        "ffw_gating_2/bias": ("mlp_block.up_proj.bias", *ident),
        "ffw_linear/kernel": ("mlp_block.down_proj.weight", *tr),
        "ffw_linear/bias": ("mlp_block.down_proj.bias", *ident),
    }
    per_kind = {
        RECURRENT: {
            "linear_x/kernel": ("temporal_block.linear_x.weight", *tr),
            "linear_x/bias": ("temporal_block.linear_x.bias", *ident),
            "linear_y/kernel": ("temporal_block.linear_y.weight", *tr),
            "linear_y/bias": ("temporal_block.linear_y.bias", *ident),
            "conv_1d/kernel": ("temporal_block.conv_1d.weight", *conv),
            "conv_1d/bias": ("temporal_block.conv_1d.bias", *ident),
            "rg_lru/input_gate/kernel": ("temporal_block.rg_lru.input_gate_weight", *ident),
            "rg_lru/input_gate/bias": ("temporal_block.rg_lru.input_gate_bias", *ident),
            "rg_lru/a_gate/kernel": ("temporal_block.rg_lru.recurrent_gate_weight", *ident),
            "rg_lru/a_gate/bias": ("temporal_block.rg_lru.recurrent_gate_bias", *ident),
            "rg_lru/a_param": ("temporal_block.rg_lru.recurrent_param", *ident),
            "linear_out/kernel": ("temporal_block.linear_out.weight", *tr),
            "linear_out/bias": ("temporal_block.linear_out.bias", *ident),
        },
        ATTENTION: {
            "attention/query/kernel": ("temporal_block.q_proj.weight", *heads_in(H)),
            "attention/key/kernel": ("temporal_block.k_proj.weight", *heads_in(K)),
            "attention/value/kernel": ("temporal_block.v_proj.weight", *heads_in(K)),
            "attention/attention_output/kernel": ("temporal_block.o_proj.weight", *out_proj),
            "attention/attention_output/bias": ("temporal_block.o_proj.bias", *ident),
        },
    }
    table: dict[str, tuple[list[str] | str, Callable, Callable]] = {
        "token_embedding/embeddings": ("model.embed_tokens.weight", *ident),
        "final_normalization/scale": ("model.final_norm.weight", *ident),
    }
    for kind, sub in per_kind.items():
        layers = [i for i, k in enumerate(cfg.layer_kinds) if k == kind]
        if not layers:
            continue
        for name, (hf, f, g) in {**sub, **common}.items():
            table[f"{KIND_PREFIX[kind]}/{name}"] = ([f"model.layers.{i}.{hf}" for i in layers], f, g)
    return table


def lazy_from_table(specs: Mapping[str, ParamSpec], table: Mapping[str, tuple[list[str] | str, Callable, Callable]],
                    source: Mapping[str, np.ndarray], shape_of: Callable[[str], tuple[int, ...]], dtype: Any,
                    ignorable: tuple[str, ...] = ("rotary_emb.inv_freq", "lm_head.weight"),
                    what: str = "model", check_unexpected: bool = True) -> dict[str, LazyWeight]:
    """Validate a checkpoint against a name table and return lazy weights.

    Every missing or misshaped tensor is reported together (by its HF name and expected shape), plus any
    tensor the model would silently ignore, before a single weight is read.
    """
    used: set[str] = set()
    problems: list[str] = []
    out: dict[str, LazyWeight] = {}
    keys = set(source.keys())

    def check(name: str, expect: tuple[int, ...]) -> bool:
        if name not in keys:
            problems.append(f"missing tensor {name} (expected shape {expect})")
            return False
        used.add(name)
        got = tuple(shape_of(name))
        if got != tuple(expect):
            problems.append(f"tensor {name} has shape {got}, expected {tuple(expect)}")
            return False
        return True

    for path, (names, fwd, inv) in table.items():
        spec = specs[path]
        if isinstance(names, str):
            expect = tuple(np.asarray(inv(np.empty(spec.shape, np.int8))).shape)
            if check(names, expect):
                out[path] = LazyWeight(spec.shape, _reader(source, [names], fwd, dtype, spec.shape, False))
        else:
            expect = tuple(np.asarray(inv(np.empty(spec.shape[1:], np.int8))).shape)
            oks = [check(n, expect) for n in names]
            if all(oks):
                out[path] = LazyWeight(spec.shape, _reader(source, names, fwd, dtype, spec.shape, True))
    unexpected = [n for n in keys - used if not any(s in n for s in ignorable)] if check_unexpected else []
    raise_on_problems(problems, unexpected, what)
    return out


def _reader(source: Mapping[str, np.ndarray], names: list[str], fwd: Callable, dtype: Any,
            shape: tuple[int, ...], stacked: bool) -> Callable:
    def read(index: Any) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        if not stacked:
            return np.asarray(fwd(source[names[0]]))[index].astype(dtype)
        parts = [np.asarray(fwd(source[names[i]]))[index[1:]].astype(dtype) for i in range(shape[0])[index[0]]]
        return np.stack(parts) if parts else np.empty((0,) + tuple(shape[1:]), dtype)
    return read


def params_to_hf(flat: Mapping[str, np.ndarray], cfg: RecurrentGemmaConfig) -> dict[str, np.ndarray]:
    """HF name -> array in transformers' layout, for every weight."""
    out: dict[str, np.ndarray] = {}
    for path, (names, _, inv) in _hf_table(cfg).items():
        a = np.asarray(flat[path])
        if isinstance(names, str):
            out[names] = np.ascontiguousarray(inv(a))
        else:
            for i, n in enumerate(names):
                out[n] = np.ascontiguousarray(inv(a[i]))
    return out


def _read_hf_config(folder: Path) -> RecurrentGemmaConfig:
    p = folder / "config.json"
    if not p.exists():
        raise CheckpointError(f"{folder}: no config.json (is this a Hugging Face model folder?)")
    try:
        return from_hf_config(json.loads(p.read_text()))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{p}: not a usable RecurrentGemma config ({e})") from None


def load_params(folder: str | os.PathLike, dtype: Any = jnp.float32) -> tuple[RecurrentGemmaConfig, Params]:
    """(config, params) from a ``RecurrentGemmaForCausalLM`` safetensors folder, validated first and then
    read weight by weight straight into device memory (with the active distribution, if any)."""
    from gemmax.api import current_distribution, place_params

    folder = Path(folder)
    cfg = _read_hf_config(folder)
    src = open_safetensors_folder(folder)
    lazy = lazy_from_table(param_specs(cfg), _hf_table(cfg), src, src.shape, np.dtype(jnp.dtype(dtype)),
                           what="RecurrentGemma model")
    return cfg, unflatten(place_params(lazy, dtype, current_distribution()))


# ---- the user-facing object ------------------------------------------------------------------------------


def _bucket(n: int, minimum: int = 16) -> int:
    b = minimum
    while b < n:
        b *= 2
    return b


def summary_table(name: str, family: str, flat: Mapping[str, Any], embed_prefixes: tuple[str, ...] = (
        "token_embedding",), print_fn: Any = print) -> str:
    """A Keras-like table of weights (path, shape, dtype, count) with totals; shared by the model classes
    of this module and :mod:`gemmax.models.paligemma`."""
    w = max(len(p) for p in flat) + 2
    lines = [f'Model: "{name or family}" ({family})', f"{'Weight path':<{w}}{'Shape':<24}{'Dtype':<10}{'Params':>14}",
             "-" * (w + 48)]
    total = emb = 0
    for p, a in flat.items():
        n = int(np.prod(a.shape))
        total += n
        if p.startswith(embed_prefixes):
            emb += n
        lines.append(f"{p:<{w}}{str(tuple(a.shape)):<24}{str(a.dtype):<10}{n:>14,}")
    from gemmax.models.gemma.config import describe_size

    lines += ["-" * (w + 48), f"Total params: {total:,} ({describe_size(total)})",
              f"Embedding params: {emb:,} ({describe_size(emb)})",
              f"Non-embedding params: {total - emb:,} ({describe_size(total - emb)})"]
    text = "\n".join(lines)
    if print_fn:
        print_fn(text)
    return text


class RecurrentGemmaLM:
    """RecurrentGemma with the ``CausalLM`` interface: ``from_preset``, ``logits``, ``generate``,
    ``summary``, ``export_hf``."""

    def __init__(self, config: RecurrentGemmaConfig, params: Params, tokenizer: Any = None, source: str = ""):
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.source = source

    @classmethod
    def from_config(cls, config: RecurrentGemmaConfig | str, seed: int = 0, dtype: Any = "float32") -> RecurrentGemmaLM:
        cfg = PRESETS[config] if isinstance(config, str) else config
        dt = _dtype(dtype)
        # An RngBitGenerator key: threefry's hash is unrolled per weight and dominates compile time
        # (about 4x here); random init needs no cross-backend bit-exactness.
        params = jax.jit(lambda k: init_params(cfg, k, dt))(jax.random.key(seed, impl="rbg"))
        return cls(cfg, params, source=f"random:{cfg.name}")

    @classmethod
    def from_preset(cls, handle: str, dtype: Any = "float32", quantize: str | None = None) -> RecurrentGemmaLM:
        """A HF folder, ``hf://org/name`` or a preset name whose weights are in the local HF cache;
        ``quantize="int8"`` quantizes after loading (:meth:`quantize`)."""
        lm = cls._load(handle, dtype)
        return lm.quantize(quantize) if quantize else lm

    @classmethod
    def _load(cls, handle: str, dtype: Any) -> RecurrentGemmaLM:
        from gemmax.io.hf import resolve_hf_handle

        path = Path(os.path.expanduser(handle))
        if handle.startswith("hf://"):
            path = resolve_hf_handle(handle)
        elif not path.is_dir() and handle in PRESET_HF_REPOS:
            path = resolve_hf_handle("hf://" + PRESET_HF_REPOS[handle])
        elif not path.is_dir():
            raise CheckpointError(f"cannot load {handle!r}: not a folder, an hf:// handle or a RecurrentGemma "
                                  f"preset ({', '.join(PRESETS)})")
        return load_recurrent_gemma(path, dtype, source=handle)

    # ---- running ----------------------------------------------------------------------------------
    def logits(self, token_ids: Any) -> np.ndarray:
        """Float32 logits [batch, seq, vocab]; lengths are bucketed (padding at the end, unseen by a causal
        model) so nearby lengths share one compilation."""
        ids = np.asarray(token_ids, np.int32)
        ids = ids[None] if ids.ndim == 1 else ids
        b, t = ids.shape
        padded = np.zeros((b, _bucket(t)), np.int32)
        padded[:, :t] = ids
        return np.asarray(_forward_jit(self.params, self.config, jnp.asarray(padded)))[:, :t]

    def generate(self, token_ids: Any, max_new_tokens: int = 32, sampler: str = "greedy",
                 temperature: float = 1.0, top_k: int | None = None, seed: int = 0,
                 stop_token_ids: tuple[int, ...] | None = None) -> np.ndarray | list[np.ndarray]:
        """Prompt + generated ids. Stops a row at an end token (later slots hold the pad id) and stops
        when every row has; a batch of equal-length prompts comes back as one [B, T + n] array, unequal
        ones as a list. Prompts are 1-D, a list of lists, or a 2-D array."""
        if isinstance(token_ids, np.ndarray | jax.Array) or (
                isinstance(token_ids, list | tuple) and token_ids and np.isscalar(token_ids[0])):
            arr = np.asarray(token_ids, np.int32)
            single = arr.ndim == 1
            rows = [arr] if single else list(arr)
        else:
            single = False
            rows = [np.asarray(r, np.int32) for r in token_ids]
        lengths = np.array([len(r) for r in rows], np.int32)
        if lengths.min() < 1:
            raise ValueError("every prompt needs at least one token")
        tb = _bucket(int(lengths.max()))
        padded = np.full((len(rows), tb), self.config.pad_token_id, np.int32)
        for i, r in enumerate(rows):
            padded[i, :len(r)] = r
        total = int(lengths.max()) + max_new_tokens
        cache_len = min(self.config.attention_window, _bucket(total))
        stops = jnp.asarray(stop_token_ids if stop_token_ids is not None else self.config.eos_ids, jnp.int32)
        new, n = _generate(self.params, self.config, jnp.asarray(padded), jnp.asarray(lengths),
                           _bucket(max_new_tokens, 1), cache_len, sampler, float(temperature), top_k,
                           jax.random.key(seed), stops, jnp.int32(max_new_tokens))
        new = np.asarray(new)[:, :min(int(n), max_new_tokens)]
        outs = [np.concatenate([r, new[i]]) for i, r in enumerate(rows)]
        if single:
            return outs[0]
        return np.stack(outs) if len(set(lengths.tolist())) == 1 else outs

    def cache_bytes(self, length: int, batch: int = 1) -> int:
        """Decoding-state bytes for ``length`` tokens in this model's dtype (see :func:`cache_bytes`)."""
        return cache_bytes(self.config, batch, length, self.dtype)

    @property
    def dtype(self) -> Any:
        return compute_dtype(self.params)

    # ---- weight transforms ------------------------------------------------------------------------
    def quantize(self, mode: str = "int8", group_size: int | None = None, embedding: bool = True) -> RecurrentGemmaLM:
        """Weight-only quantization in place: every dense kernel per output channel (int8 by default) and the
        tied embedding per row; the RG-LRU gates, Conv1D and norms stay float (:func:`quantize_params`)."""
        # one jitted program instead of a few dozen eagerly dispatched (and individually compiled) ops
        self.params = jax.jit(quantize_params, static_argnums=(1, 2, 3, 4))(
            self.params, self.config, mode, group_size, embedding)
        return self

    def enable_lora(self, rank: int = 4, targets: str | tuple[str, ...] | list[str] = ("query", "value"),
                    alpha: float | None = None, seed: int = 0) -> RecurrentGemmaLM:
        """Add adapters (:func:`add_lora`); train the ``gemmax.nn.lora.split_trainable`` half of ``params``."""
        self.params = add_lora(self.params, self.config, rank, alpha, targets, seed)
        return self

    def merge_lora(self) -> RecurrentGemmaLM:
        self.params = merge_lora(self.params, self.config)
        return self

    def loss(self, token_ids: Any, weights: Any = None) -> float:
        return float(jax.jit(lm_loss, static_argnums=(1,))(self.params, self.config, jnp.asarray(token_ids),
                                                           None if weights is None else jnp.asarray(weights)))

    # ---- inspection and saving --------------------------------------------------------------------
    def weights(self, prefix: str = "") -> list[tuple[str, Any]]:
        return [(p, a) for p, a in flatten(self.params).items() if p.startswith(prefix)]

    def summary(self, print_fn: Any = print) -> str:
        return summary_table(self.config.name, self.config.family, flatten(self.params), print_fn=print_fn)

    def export_hf(self, path: str | os.PathLike, dtype: Any = np.float32) -> Path:
        """A folder transformers' ``RecurrentGemmaForCausalLM.from_pretrained`` loads. Adapters are merged
        in and quantized kernels dequantized first (transformers has no int8 layout of its own to take)."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        params = dequantize_params(merge_lora(self.params, self.config), self.config)
        flat = {p: np.asarray(jax.device_get(a)) for p, a in flatten(params).items()}
        tensors = {k: v.astype(dtype) for k, v in params_to_hf(flat, self.config).items()}
        write_safetensors(out / "model.safetensors", tensors)
        hf = to_hf_config(self.config)
        hf["torch_dtype"] = np.dtype(dtype).name
        (out / "config.json").write_text(json.dumps(hf, indent=2))
        gen = {"bos_token_id": self.config.bos_token_id, "pad_token_id": self.config.pad_token_id,
               "eos_token_id": self.config.eos_ids[0] if len(self.config.eos_ids) == 1 else list(self.config.eos_ids)}
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
        if self.tokenizer is not None and hasattr(self.tokenizer, "save"):
            self.tokenizer.save(out)
        return out


def _dtype(d: Any) -> Any:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}.get(d, d) if isinstance(
        d, str) else d


def load_recurrent_gemma(folder: str | os.PathLike, dtype: Any = "float32", source: str = "") -> RecurrentGemmaLM:
    """Entry point for ``CausalLM.from_preset`` dispatch: a ``RecurrentGemmaForCausalLM`` folder -> model."""
    cfg, params = load_params(folder, _dtype(dtype))
    tok = None
    try:
        from gemmax.api import load_tokenizer

        tok = load_tokenizer(Path(folder))
    except Exception:  # the tokenizer is optional: the model still runs on ids
        tok = None
    return RecurrentGemmaLM(cfg, params, tok, source=source or str(folder))
