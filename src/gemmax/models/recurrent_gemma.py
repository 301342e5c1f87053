"""RecurrentGemma (Griffin): residual blocks of RG-LRU recurrence and local multi-query attention.

A registered :class:`~gemmax.models.base.Family` (``FAMILY`` at the bottom): ``CausalLM``, the engine,
the trainer, LoRA, quantization and the Hugging Face loader/exporter reach this model only through it.

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
time). The decoding cache has one independent row per engine slot: per recurrent block an O(1) state
(float32 ``h`` plus the last 3 Conv1D inputs), per attention block a ring of ``min(max_len,
attention_window)`` keys/values whose slot ``s`` holds the latest position ``p`` with ``p % ring == s``.
The ring's positions are implied by each row's position, so the cache holds arrays only and generation
memory does not grow with the generated length (:func:`cache_bytes`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from gemmax.models.base import (
    HF_SAME,
    HF_TRANSPOSED,
    ConfigBase,
    HFEntry,
    family_from,
    hf_config_tokens,
    hf_heads_in,
    hf_heads_out,
    hf_tokens_entry,
    preset_pairs,
    register,
)
from gemmax.models.gemma import model as gm
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
from gemmax.nn.layers import remat as remat_layer
from gemmax.nn.params import LinearNode, ParamSpec, flatten, init_from_specs, unflatten

Array = jax.Array
Params = dict[str, Any]

RECURRENT = "recurrent"
ATTENTION = "attention"
#: Where each block kind's stacked weights live in the parameter tree.
KIND_PREFIX = {RECURRENT: "recurrent_block", ATTENTION: "attention_block"}
#: transformers' prefix of the layer list.
HF_LAYERS = "model.layers"


# ---- configuration ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecurrentGemmaConfig(ConfigBase):
    """Hyper-parameters of a Griffin model. ``mlp_width`` is the width of *each* GeGLU branch (HF's
    ``intermediate_size`` is twice that: the reference halves it).

    ``max_position_embeddings`` is not a limit of the architecture (the recurrence has no context length and
    attention is local): it is the default per-request context of the engine, the 8192 tokens the published
    models were trained on."""

    vocab_size: int = 256000
    width: int = 2560
    """The residual stream (HF ``hidden_size``)."""
    num_layers: int = 26
    block_types: tuple[str, ...] = (RECURRENT, RECURRENT, ATTENTION)
    """The period of block kinds the layers repeat."""
    # attention blocks
    num_heads: int = 10
    num_kv_heads: int = 1
    """Key/value heads of the attention blocks (1, multi-query, in the published models)."""
    attention_window: int = 2048
    """Local attention's window (HF ``attention_window_size``): the ring cache never holds more."""
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.5
    # the MLP of every block
    mlp_width: int = 3 * 2560
    """Width of each GeGLU branch: three times ``width`` in the published models."""
    # recurrent blocks
    lru_width: int = 2560
    """Width of the RG-LRU recurrence."""
    conv_width: int = 4
    # norms, output head, context
    final_logit_softcap: float = 30.0
    norm_eps: float = 1e-6
    max_position_embeddings: int = 8192
    family: str = "recurrent_gemma"

    tuple_fields = ("block_types",)
    label = "RecurrentGemma"

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

    def layer_ids(self, kind: str) -> tuple[int, ...]:
        """transformers' layer index of each stacked entry of ``kind``."""
        return tuple(i for i, k in enumerate(self.layer_kinds) if k == kind)

    @property
    def embed_scale(self) -> float:
        """sqrt(width) rounded to bfloat16, as the reference's normalizer buffer holds it."""
        return float(np.asarray(math.sqrt(self.width), ml_dtypes.bfloat16))

    def param_count(self) -> dict[str, int]:
        total = sum(s.size for s in param_specs(self).values())
        embed = self.vocab_size * self.width
        return {"total": total, "embedding": embed, "non_embedding": total - embed}


def config_from_dict(d: Mapping[str, Any]) -> RecurrentGemmaConfig:
    return RecurrentGemmaConfig.from_dict(d)


def _preset(name: str, width: int, **shape: Any) -> RecurrentGemmaConfig:
    return RecurrentGemmaConfig(name=name, width=width, num_kv_heads=1, lru_width=width, mlp_width=3 * width,
                                **shape)


#: The published shapes: 2B (2.7B parameters) and 9B (8.6B), base and instruction-tuned.
PRESETS, PRESET_HF_REPOS = preset_pairs(_preset, {
    ("recurrent_gemma_2b_en", "recurrent_gemma_instruct_2b_en", "google/recurrentgemma-2b"):
        dict(width=2560, num_layers=26, num_heads=10),
    ("recurrent_gemma_9b_en", "recurrent_gemma_instruct_9b_en", "google/recurrentgemma-9b"):
        dict(width=4096, num_layers=38, num_heads=16),
})


def tiny_config(**overrides: Any) -> RecurrentGemmaConfig:
    """A few-kilobyte Griffin for tests: 5 blocks (one full period plus a leftover pair), window 8."""
    base: dict[str, Any] = dict(vocab_size=256, width=48, num_layers=5, num_heads=4, num_kv_heads=1,
                                lru_width=48, mlp_width=96, attention_window=8, max_position_embeddings=256,
                                name="tiny_recurrent_gemma")
    base.update(overrides)
    return RecurrentGemmaConfig(**base)


def from_hf_config(hf: Mapping[str, Any]) -> RecurrentGemmaConfig:
    """RecurrentGemmaConfig from a transformers ``config.json`` (model_type ``recurrent_gemma``)."""
    if hf.get("model_type") != "recurrent_gemma":
        raise ValueError(f"not a RecurrentGemma config (model_type {hf.get('model_type')!r})")
    rope = hf.get("rope_parameters") or {}
    width = int(hf["hidden_size"])
    heads = int(hf["num_attention_heads"])
    return RecurrentGemmaConfig(
        vocab_size=int(hf["vocab_size"]), width=width, num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads, num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        lru_width=int(hf.get("lru_width") or width), mlp_width=int(hf["intermediate_size"]) // 2,
        attention_window=int(hf.get("attention_window_size", 2048)), conv_width=int(hf.get("conv1d_width", 4)),
        final_logit_softcap=float(hf.get("logits_soft_cap", 30.0)), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        partial_rotary_factor=float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5))),
        block_types=tuple(hf.get("block_types") or (RECURRENT, RECURRENT, ATTENTION)),
        max_position_embeddings=int(hf.get("max_position_embeddings") or 8192), **hf_config_tokens(hf),
    )


def to_hf_config(cfg: RecurrentGemmaConfig) -> dict[str, Any]:
    """The config.json transformers needs to rebuild the same model (``max_position_embeddings`` only when
    it is not the default: transformers' RecurrentGemma has no such field)."""
    out = {
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
        **hf_tokens_entry(cfg), "head_dim": cfg.head_dim, "torch_dtype": "float32",
    }
    if cfg.max_position_embeddings != RecurrentGemmaConfig.max_position_embeddings:
        out["max_position_embeddings"] = cfg.max_position_embeddings
    return out


# ---- parameters ------------------------------------------------------------------------------------------


def _block_specs(cfg: RecurrentGemmaConfig, kind: str, n: int) -> dict[str, ParamSpec]:
    D, R, F, H, K, hd = cfg.width, cfg.lru_width, cfg.mlp_width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    bw = R // H
    s: dict[str, ParamSpec] = {"temporal_pre_norm/scale": ParamSpec((n, D), ("layers", "embed"), "zeros")}
    if kind == RECURRENT:
        s.update({
            "linear_x/kernel": ParamSpec((n, D, R), ("layers", "embed", "lru"), fan_in_axis=1),
            "linear_x/bias": ParamSpec((n, R), ("layers", "lru"), "zeros"),
            "linear_y/kernel": ParamSpec((n, D, R), ("layers", "embed", "lru"), fan_in_axis=1),
            "linear_y/bias": ParamSpec((n, R), ("layers", "lru"), "zeros"),
            "conv_1d/kernel": ParamSpec((n, cfg.conv_width, R), ("layers", "conv", "lru"), fan_in_axis=1),
            "conv_1d/bias": ParamSpec((n, R), ("layers", "lru"), "zeros"),
            # block-diagonal gates: one [bw, bw] block per head of the LRU width ("heads" shards like "lru")
            "rg_lru/input_gate/kernel": ParamSpec((n, H, bw, bw), ("layers", "heads", "lru_in", "lru_out"),
                                                  fan_in_axis=2),
            "rg_lru/input_gate/bias": ParamSpec((n, H, bw), ("layers", "heads", "lru_out"), "zeros"),
            "rg_lru/a_gate/kernel": ParamSpec((n, H, bw, bw), ("layers", "heads", "lru_in", "lru_out"),
                                              fan_in_axis=2),
            "rg_lru/a_gate/bias": ParamSpec((n, H, bw), ("layers", "heads", "lru_out"), "zeros"),
            "rg_lru/a_param": ParamSpec((n, R), ("layers", "lru"), "a_param"),
            "linear_out/kernel": ParamSpec((n, R, D), ("layers", "lru", "embed"), fan_in_axis=1),
            "linear_out/bias": ParamSpec((n, D), ("layers", "embed"), "zeros"),
        })
    else:
        s.update({
            "attention/query/kernel": ParamSpec((n, H, D, hd), ("layers", "heads", "embed", "head_dim"),
                                                fan_in_axis=2),
            "attention/key/kernel": ParamSpec((n, K, D, hd), ("layers", "kv_heads", "embed", "head_dim"),
                                              fan_in_axis=2),
            "attention/value/kernel": ParamSpec((n, K, D, hd), ("layers", "kv_heads", "embed", "head_dim"),
                                                fan_in_axis=2),
            "attention/attention_output/kernel": ParamSpec((n, H, hd, D), ("layers", "heads", "head_dim", "embed"),
                                                           std=1.0 / math.sqrt(H * hd)),
            "attention/attention_output/bias": ParamSpec((n, D), ("layers", "embed"), "zeros"),
        })
    s.update({
        "channel_pre_norm/scale": ParamSpec((n, D), ("layers", "embed"), "zeros"),
        "ffw_gating/kernel": ParamSpec((n, D, F), ("layers", "embed", "mlp"), fan_in_axis=1),
        "ffw_gating/bias": ParamSpec((n, F), ("layers", "mlp"), "zeros"),
        "ffw_gating_2/kernel": ParamSpec((n, D, F), ("layers", "embed", "mlp"), fan_in_axis=1),
        "ffw_gating_2/bias": ParamSpec((n, F), ("layers", "mlp"), "zeros"),
        "ffw_linear/kernel": ParamSpec((n, F, D), ("layers", "mlp", "embed"), fan_in_axis=1),
        "ffw_linear/bias": ParamSpec((n, D), ("layers", "embed"), "zeros"),
    })
    return {f"{KIND_PREFIX[kind]}/{k}": v for k, v in s.items()}


def param_specs(cfg: RecurrentGemmaConfig) -> dict[str, ParamSpec]:
    """Every weight with its shape and logical axes, keyed by ``/``-joined path (stacked by block kind).

    Logical axes drive the default sharding: ``vocab``, ``heads``, ``kv_heads``, ``mlp`` and ``lru`` (the
    recurrent width, and with it the RG-LRU gates' ``heads`` blocks) go on the model axis."""
    specs = {"token_embedding/embeddings": ParamSpec((cfg.vocab_size, cfg.width), ("vocab", "embed"),
                                                     "embedding", std=1.0 / math.sqrt(cfg.width))}
    for kind in (RECURRENT, ATTENTION):
        if cfg.count(kind):
            specs.update(_block_specs(cfg, kind, cfg.count(kind)))
    specs["final_normalization/scale"] = ParamSpec((cfg.width,), ("embed",), "zeros")
    return specs


def init_params(cfg: RecurrentGemmaConfig, key: Array, dtype: Any = jnp.float32) -> Params:
    """Random init: fan-in-scaled normals, zero biases and norms (RMSNorm is ``1 + scale``), and ``a_param``
    such that the decay a lies in [0.9, 0.999] as Griffin initialises it (a slowly forgetting recurrence)."""
    specs = param_specs(cfg)
    params = init_from_specs(specs, key, dtype)
    flat = flatten(params)
    for i, (path, s) in enumerate(sorted(specs.items())):
        if s.init == "a_param":
            k = jax.random.fold_in(key, i)
            a = jax.random.uniform(k, s.shape, jnp.float32, 0.9 ** 2, 0.999 ** 2)
            # softplus(a_param) = -0.5 log a  <=>  a_param = log(exp(-0.5 log a) - 1)
            flat[path] = jnp.log(jnp.expm1(-0.5 * jnp.log(a))).astype(dtype)
    return unflatten(flat)


# ---- the linear layers (LoRA, quantization, PEFT export) -------------------------------------------------

#: Every dense layer of a block: target name -> (path under the block, einsum, LoRA einsums, input axes of
#: one layer's kernel, transformers module under ``model.layers.{i}``). The RG-LRU gates (block-diagonal
#: float32 einsums), the Conv1D and the norms are not linear nodes: they are small (a few percent of the
#: weights) and numerically sensitive, so they stay floating point and frozen.
LINEARS: dict[str, tuple[tuple[str, ...], str, tuple[str, str], tuple[int, ...], str]] = {
    # attention as the Gemma decoder's
    **{name: (("attention", name), *gm.LINEAR_EQS[name], gm.KERNEL_IN_DIMS[name], "temporal_block." + module)
       for name, module in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"),
                            ("attention_output", "o_proj"))},
    "linear_x": (("linear_x",), "btd,dr->btr", ("btd,dk->btk", "btk,kr->btr"), (0,), "temporal_block.linear_x"),
    "linear_y": (("linear_y",), "btd,dr->btr", ("btd,dk->btk", "btk,kr->btr"), (0,), "temporal_block.linear_y"),
    "linear_out": (("linear_out",), "btr,rd->btd", ("btr,rk->btk", "btk,kd->btd"), (0,),
                   "temporal_block.linear_out"),
    **{name: ((name,), *gm.LINEAR_EQS[name], gm.KERNEL_IN_DIMS[name], "mlp_block." + module)
       for name, module in (("ffw_gating", "gate_proj"), ("ffw_gating_2", "up_proj"), ("ffw_linear", "down_proj"))},
}

#: The linear targets of each block kind (the MLP is in both).
KIND_LINEARS: dict[str, tuple[str, ...]] = {
    RECURRENT: ("linear_x", "linear_y", "linear_out", "ffw_gating", "ffw_gating_2", "ffw_linear"),
    ATTENTION: ("query", "key", "value", "attention_output", "ffw_gating", "ffw_gating_2", "ffw_linear"),
}


def linear_nodes(cfg: RecurrentGemmaConfig) -> dict[str, LinearNode]:
    """Every dense node, keyed by its path (``recurrent_block/ffw_gating``: the MLP targets name two nodes,
    one per block kind), with transformers' module names so PEFT adapters and merged exports line up."""
    out: dict[str, LinearNode] = {}
    for kind, names in KIND_LINEARS.items():
        ids = cfg.layer_ids(kind)
        if not ids:
            continue
        for name in names:
            sub, eq, lora_eqs, in_dims, hf_module = LINEARS[name]
            node = LinearNode(path=(KIND_PREFIX[kind], *sub), eq=eq, lora_eqs=lora_eqs, in_dims=in_dims,
                              target=name, peft=hf_module.rsplit(".", 1)[-1], hf_module=hf_module,
                              layers=HF_LAYERS, layer_ids=ids)
            out[node.key] = node
    return out


# ---- building blocks -------------------------------------------------------------------------------------


def dense(node: Params, x: Array, name: str) -> Array:
    """``layers.linear`` (plain / quantized / LoRA) plus the bias the Griffin layers carry."""
    _, eq, lora_eqs, _, _ = LINEARS[name]
    y = linear(node, x, eq, lora_eqs)
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
               remat: str | bool | None = None) -> tuple[Array, dict[str, Params]]:
    """Apply every block in order with a scan over whole periods of ``block_types``.

    Weights and caches are stacked per kind; the first ``n_periods * count_in_period`` entries of each are
    reshaped to [n_periods, count, ...] and scanned, the remainder (the incomplete last period) runs once
    after. Compile time is flat in depth. ``block(kind, p, x, cache) -> (x, new cache)``. ``remat``
    ("full" or True | "dots" | None) rematerialises each period in the backward pass (all of it, or all
    but the matmul outputs).
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

    body = remat_layer(body, remat)
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
                   segment_ids: Array | None = None, remat: str | None = None, *, scan: Callable = linear_scan,
                   **inputs: Any) -> Array:
    """Hidden states [B, T, D] after the final norm. ``positions`` restarting at 0 reset the recurrence
    (and the Conv1D taps) at document starts; ``segment_ids`` keep attention inside each document.
    ``scan``: :func:`linear_scan` (log-depth) or :func:`sequential_scan` (the step-by-step reference)."""
    _no_inputs(inputs)
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


#: One compiled forward per (config, shapes), shared by every caller.
_forward_jit = jax.jit(forward, static_argnums=(1,), static_argnames=("scan",))


def _no_inputs(inputs: Mapping[str, Any]) -> None:
    if inputs:
        raise TypeError(f"RecurrentGemma models take no {', '.join(sorted(inputs))} (text only)")


# ---- generation: rows of O(1) recurrent state + ring-buffer attention cache ------------------------------


def ring_len(cfg: RecurrentGemmaConfig, max_len: int) -> int:
    """Keys/values an attention block keeps per row: the window, or the whole context when shorter."""
    return max(1, min(int(max_len), cfg.attention_window))


def init_cache(cfg: RecurrentGemmaConfig, batch: int, max_len: int, dtype: Any = jnp.float32) -> Params:
    """Zeroed decoding state of ``batch`` independent rows for contexts of up to ``max_len`` tokens; every
    leaf has the row (slot) axis second, after the per-kind layer axis."""
    R, K, hd, C = cfg.lru_width, cfg.num_kv_heads, cfg.head_dim, ring_len(cfg, max_len)
    c: Params = {}
    if cfg.count(RECURRENT):
        n = cfg.count(RECURRENT)
        c[RECURRENT] = {"conv": jnp.zeros((n, batch, cfg.conv_width - 1, R), dtype),
                        "h": jnp.zeros((n, batch, R), jnp.float32)}
    if cfg.count(ATTENTION):
        n = cfg.count(ATTENTION)
        c[ATTENTION] = {"k": jnp.zeros((n, batch, C, K, hd), dtype), "v": jnp.zeros((n, batch, C, K, hd), dtype)}
    return c


def cache_bytes(cfg: RecurrentGemmaConfig, batch: int = 1, length: int = 1, dtype: Any = jnp.bfloat16) -> int:
    """Bytes of decoding state for a sequence of ``length`` tokens (prompt + generated).

    It grows with the length only until the attention window is full (the ring holds min(length, window)
    keys/values) and is constant after that: the recurrent state is O(1).
    """
    shapes = jax.eval_shape(lambda: init_cache(cfg, batch, length, dtype))
    return int(sum(np.prod(s.shape) * np.dtype(s.dtype).itemsize for s in jax.tree.leaves(shapes)))


def _ring_from_prompt(k: Array, lengths: Array, cache_len: int) -> tuple[Array, Array]:
    """Ring slots after a prompt: slot s holds the latest prompt position t < length with t % C == s.
    Returns (gathered [B, C, ...], slot positions [B, C] with -1 where empty)."""
    s = jnp.arange(cache_len, dtype=jnp.int32)[None]
    last = (lengths - 1)[:, None].astype(jnp.int32)
    t = last - jnp.mod(last - s, cache_len)
    gathered = jnp.take_along_axis(k, jnp.maximum(t, 0).reshape(t.shape + (1,) * (k.ndim - 2)), axis=1)
    return gathered, jnp.where(t >= 0, t, -1)


def prefill(params: Params, cfg: RecurrentGemmaConfig, tokens: Array, lengths: Array, max_len: int,
            backend: str = "xla", **inputs: Any) -> tuple[Array, Params]:
    """Run right-padded prompts (real lengths ``lengths``) -> (float32 logits of each row's last real token
    [b, V], cache rows for :func:`insert`). ``max_len`` (static) sizes the attention ring as
    :func:`init_cache` does; ``backend`` is accepted for the engine and XLA runs either way."""
    _no_inputs(inputs)
    tokens = jnp.asarray(tokens)
    lengths = jnp.asarray(lengths, jnp.int32)
    C = ring_len(cfg, max_len)
    b, t = tokens.shape
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    mask = attention_mask(idx, idx, cfg.attention_window)

    def temporal(kind: str, p: Params, h: Array) -> tuple[Array, Params]:
        if kind == RECURRENT:
            return recurrent_temporal(p, h, idx, None, lengths)
        q, k, v = attention_qkv(p, h, cfg, idx)
        out = attention_out(p, dot_attention(q, k, v, mask))
        return out, {"k": _ring_from_prompt(k, lengths, C)[0], "v": _ring_from_prompt(v, lengths, C)[0]}

    def block(kind: str, p: Params, x: Array, c: Params) -> tuple[Array, Params]:
        return residual_block(kind, p, x, cfg, temporal)

    x, rows = run_blocks(params, cfg, embed(params, cfg, tokens), {}, block)
    h = rms_norm(_last(x, lengths), params["final_normalization"]["scale"], cfg.norm_eps)
    return logits_from_hidden(params, cfg, h), rows


def insert(cache: Params, rows: Params, slots: Array, backend: str = "xla") -> Params:
    """Write prefilled ``rows`` (row i) into engine slots ``slots[i]``; an out-of-range slot drops its row.
    One backend (XLA's)."""
    del backend
    slots = jnp.asarray(slots, jnp.int32)
    return jax.tree.map(lambda c, r: c.at[:, slots].set(r.astype(c.dtype), mode="drop"), cache, rows)


def decode_step(params: Params, cfg: RecurrentGemmaConfig, cache: Params, tokens: Array, pos: Array,
                backend: str = "xla") -> tuple[Array, Params]:
    """One token per row at absolute position ``pos`` (the number of tokens before it) -> (float32 logits
    [B, V], new cache). Rows are independent; the ring slot of each cached key follows from ``pos``."""
    tokens = jnp.asarray(tokens, jnp.int32)
    pos = jnp.asarray(pos, jnp.int32)
    b = tokens.shape[0]
    positions = pos[:, None]
    ones = jnp.ones((b,), jnp.int32)
    if ATTENTION in cache:
        C = cache[ATTENTION]["k"].shape[2]
        s = jnp.arange(C, dtype=jnp.int32)[None]
        slot_hit = s == (pos % C)[:, None]  # [B, C]: where this token's key goes
        slot_pos = positions - jnp.mod(positions - s, C)  # latest position <= pos held by each slot
        valid = (slot_pos >= 0) & (positions - slot_pos < cfg.attention_window)

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

    x, new = run_blocks(params, cfg, embed(params, cfg, tokens[:, None]), cache, block)
    h = rms_norm(x[:, 0], params["final_normalization"]["scale"], cfg.norm_eps)
    # the state keeps the cache's dtypes (the engine may hold a narrower cache than the activations)
    new = jax.tree.map(lambda n, o: n.astype(o.dtype), new, cache)
    return logits_from_hidden(params, cfg, h), new


# ---- Hugging Face checkpoints ----------------------------------------------------------------------------


def hf_table(cfg: RecurrentGemmaConfig) -> dict[str, HFEntry]:
    """gemmax path -> (HF name, or per-layer names for stacked weights; HF -> gemmax; gemmax -> HF)."""
    H, K, hd, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.width
    ident, tr = HF_SAME, HF_TRANSPOSED
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
            "attention/query/kernel": ("temporal_block.q_proj.weight", *hf_heads_in(H, hd, D)),
            "attention/key/kernel": ("temporal_block.k_proj.weight", *hf_heads_in(K, hd, D)),
            "attention/value/kernel": ("temporal_block.v_proj.weight", *hf_heads_in(K, hd, D)),
            "attention/attention_output/kernel": ("temporal_block.o_proj.weight", *hf_heads_out(H, hd, D)),
            "attention/attention_output/bias": ("temporal_block.o_proj.bias", *ident),
        },
    }
    table: dict[str, HFEntry] = {
        "token_embedding/embeddings": ("model.embed_tokens.weight", *ident),
        "final_normalization/scale": ("model.final_norm.weight", *ident),
    }
    for kind, sub in per_kind.items():
        layers = cfg.layer_ids(kind)
        if not layers:
            continue
        for name, (hf, f, g) in {**sub, **common}.items():
            table[f"{KIND_PREFIX[kind]}/{name}"] = ([f"{HF_LAYERS}.{i}.{hf}" for i in layers], f, g)
    return table


# ---- the family ------------------------------------------------------------------------------------------

FAMILY = register(family_from(
    globals(), "recurrent_gemma",
    model_types=("recurrent_gemma",),
    config_type=RecurrentGemmaConfig,
    presets=PRESETS, preset_repos=PRESET_HF_REPOS, tiny_config=tiny_config,
    # the output head is tied to the embedding; a checkpoint that also stores it loses nothing
    hf_ignorable=("rotary_emb.inv_freq", "lm_head.weight"),
    hf_architecture="RecurrentGemmaForCausalLM",
    gguf_arch=lambda cfg: None,  # llama.cpp has no RecurrentGemma architecture
    chat_format=lambda cfg: "gemma",
))
