"""Gemma 3n's text decoder: per-layer embeddings, AltUp streams, LAuReL, KV sharing and sparse activations.

A registered :class:`~gemmax.models.base.Family` (``FAMILY`` at the bottom) for ``gemma3n_text`` configs
(``Gemma3nForCausalLM``) and the language model of ``gemma3n`` checkpoints (``Gemma3nForConditionalGeneration``,
google/gemma-3n-E2B / E4B and their ``-it``): the vision and audio towers and their embedders are skipped by
name and never read. ``CausalLM``, the engine, the trainer, LoRA, quantization and the server reach the model
only through the family's functions.

What a layer does (numerics pinned to transformers' ``modeling_gemma3n.py``)
---------------------------------------------------------------------------
* The residual stream is ``altup_num_inputs`` parallel streams ``[N, B, T, D]``: stream 0 is the scaled token
  embedding, streams 1.. its projections (``altup_projections``) rescaled to stream 0's RMS. After the last
  layer streams 1.. go through ``altup_unembed_projections`` (rescaled the same way) and the final hidden
  state is the mean of the N streams, then the final norm.
* **AltUp** around every layer: *predict* mixes the streams with coefficients read off the active stream
  (``tanh(router(router_norm(x) / D))`` -> ``prediction_coefs``), the layer runs on the active prediction, and
  *correct* adds its innovation (output minus prediction) to every stream, weighted by ``1 +
  correction_coefs(router(output))``. The corrected active stream, times ``correct_output_scale``, gates the
  layer's **per-layer input** (``gelu(per_layer_input_gate(.)) * per_layer_input``), whose projection is
  normed and added to streams 1.. only.
* **Per-layer inputs**: a second embedding table (``embed_tokens_per_layer``, ``L * P`` wide, scaled by
  sqrt(P), ids past ``vocab_size_per_layer_input`` read row 0) plus ``per_layer_model_projection`` of the
  token embedding (scaled by D^-1/2, RMS-normed over P), summed and scaled by 2^-1/2: one ``[P]`` vector per
  token and layer.
* **LAuReL**: ``h + norm(right(left(h)))`` on the normed input; attention's residual and LAuReL are averaged
  (``(x + attn + laurel) / sqrt(2)``).
* Attention: q/k RMSNorm with weights, v RMSNorm *without* weights, RoPE (10k local / 1M global bases), query
  scale 1 (no 1/sqrt(head_dim)), sliding windows on local layers. The last ``num_kv_shared_layers`` layers
  compute no keys or values: each attends to those of the last non-shared layer of its own type.
* MLP: GeGLU; on layers with ``activation_sparsity > 0`` the gate keeps only what lies above
  ``mean + std * Phi^-1(sparsity)`` of its row (``relu(gate - cutoff)``) before the GELU.
* Every RMSNorm multiplies by its weight as stored (``x * w``, not Gemma 3's ``1 + w``); final logits are
  soft-capped at 30; the output head is the token embedding.

Layers are stacked and scanned: one scan over the layers that compute keys and values (which also returns
them), one over the KV-shared layers, so compile time is flat in depth. Per-layer differences (window, RoPE
base, sparsity cutoff, the shared layers' source) are scan data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemmax.models import gemma3n_gguf
from gemmax.models.base import (
    HF_SAME,
    HF_TRANSPOSED,
    ConfigBase,
    GGUFSpec,
    HFEntry,
    family_from,
    hf_config_tokens,
    hf_tokens_entry,
    preset_pairs,
    register,
)
from gemmax.models.gemma import decode as gd
from gemmax.models.gemma import model as gm
from gemmax.models.gemma.config import hf_layer_types, hf_rope_parameters, hf_shape, layer_types_from_hf
from gemmax.models.gemma.hf import kv_entries, layer_entries, norm_entries
from gemmax.nn.layers import (
    activation_fn,
    apply_rope,
    attention_mask,
    dot_attention,
    einsum,
    linear,
    rope_inv_freq,
    rope_sin_cos,
    softcap,
)
from gemmax.nn.layers import remat as remat_layer
from gemmax.nn.params import LinearNode, ParamSpec, init_from_specs

Array = jax.Array
Params = dict[str, Any]

LOCAL = "local"
GLOBAL = "global"
#: Window of global layers when they share a scan with local ones: wider than any context.
NO_WINDOW = 1 << 30
MODEL_TYPES = ("gemma3n_text", "gemma3n")


# ---- configuration ---------------------------------------------------------------------------------------


def _default_types(n: int) -> tuple[str, ...]:
    """Four sliding layers then one full one, repeated (transformers' default for Gemma 3n)."""
    return tuple(GLOBAL if (i + 1) % 5 == 0 else LOCAL for i in range(n))


def _default_sparsity(n: int) -> tuple[float, ...]:
    """The first 10 layers keep the top 5% of their gate activations (when there are more than 10)."""
    k = 10 if n > 10 else 0
    return (0.95,) * k + (0.0,) * (n - k)


@dataclass(frozen=True)
class Gemma3nConfig(ConfigBase):
    """Hyper-parameters of a Gemma 3n text decoder (transformers' ``Gemma3nTextConfig``).

    ``layer_types`` holds ``"local"`` (sliding window) or ``"global"`` per layer; ``activation_sparsity`` one
    target sparsity per layer (0: a dense GeGLU). ``intermediate_size`` is one width for every layer (the
    published checkpoints' lists are uniform; stacked layers need one shape)."""

    vocab_size: int = 262400
    hidden_size: int = 2048
    # the layers: their types and how many at the end share keys and values
    num_layers: int = 35
    layer_types: tuple[str, ...] = ()
    num_kv_shared_layers: int = 15
    # attention
    num_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int = 256
    sliding_window: int = 512
    rope_scaling: dict[str, Any] | None = None  # global layers only
    rope_theta: float = 1_000_000.0  # global layers
    rope_local_theta: float = 10_000.0  # local layers
    # MLP
    intermediate_size: int = 16384
    activation_sparsity: tuple[float, ...] = ()
    # context, norms, output head
    max_position_embeddings: int = 32768
    norm_eps: float = 1e-6
    final_logit_softcap: float | None = 30.0
    # per-layer embeddings, AltUp, LAuReL
    vocab_size_per_layer_input: int = 262144
    hidden_size_per_layer_input: int = 256
    altup_num_inputs: int = 4
    altup_active_idx: int = 0
    altup_coef_clip: float | None = 120.0
    altup_correct_scale: bool = True
    laurel_rank: int = 64
    family: str = "gemma3n"

    tuple_fields = ("layer_types", "activation_sparsity")
    label = "Gemma 3n"

    def __post_init__(self) -> None:
        if not self.layer_types:
            object.__setattr__(self, "layer_types", _default_types(self.num_layers))
        if not self.activation_sparsity:
            object.__setattr__(self, "activation_sparsity", _default_sparsity(self.num_layers))
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "activation_sparsity", tuple(float(s) for s in self.activation_sparsity))
        n = self.num_layers
        if len(self.layer_types) != n:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries but num_layers is {n}")
        bad = set(self.layer_types) - {LOCAL, GLOBAL}
        if bad:
            raise ValueError(f"layer_types may hold only 'local'/'global', got {sorted(bad)}")
        if len(self.activation_sparsity) != n:
            raise ValueError(f"activation_sparsity has {len(self.activation_sparsity)} entries but num_layers is {n}")
        if any(not 0.0 <= s < 1.0 for s in self.activation_sparsity):
            raise ValueError(f"activation_sparsity values must lie in [0, 1), got {self.activation_sparsity}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if not 0 <= self.num_kv_shared_layers < n:
            raise ValueError(f"num_kv_shared_layers ({self.num_kv_shared_layers}) must lie in [0, {n})")
        if self.altup_num_inputs < 1 or not 0 <= self.altup_active_idx < self.altup_num_inputs:
            raise ValueError(f"altup_active_idx ({self.altup_active_idx}) must index one of "
                             f"altup_num_inputs ({self.altup_num_inputs}) streams")
        if self.num_kv_shared_layers:
            own = set(self.layer_types[:self.num_unshared])
            missing = set(self.layer_types[self.num_unshared:]) - own
            if missing:
                raise ValueError(f"KV-shared layers of type {sorted(missing)} have no earlier layer of that type "
                                 "to take keys and values from")

    # ---- derived ---------------------------------------------------------------------------------------
    @property
    def num_unshared(self) -> int:
        """Layers that compute their own keys and values (the first ``num_layers - num_kv_shared_layers``)."""
        return self.num_layers - self.num_kv_shared_layers

    def kv_source(self, layer: int) -> int:
        """The layer whose keys and values ``layer`` attends to: itself, or for a KV-shared layer the last
        non-shared layer of the same type."""
        if layer < self.num_unshared:
            return layer
        t = self.layer_types[layer]
        return max(i for i in range(self.num_unshared) if self.layer_types[i] == t)

    @property
    def tie_embeddings(self) -> bool:
        return True

    @property
    def attn_logit_softcap(self) -> None:
        return None

    def param_count(self) -> dict[str, int]:
        """Counts from the declared shapes: ``embedding`` is the token embedding, ``per_layer_embedding`` the
        per-layer table (PLE; ``total`` includes both)."""
        specs = param_specs(self)
        total = sum(s.size for s in specs.values())
        embed = specs["token_embedding/embeddings"].size
        ple = specs["per_layer_embedding/embeddings"].size
        return {"total": total, "embedding": embed, "per_layer_embedding": ple,
                "non_embedding": total - embed - ple}


def config_from_dict(d: Mapping[str, Any]) -> Gemma3nConfig:
    return Gemma3nConfig.from_dict(d)


def tiny_config(**overrides: Any) -> Gemma3nConfig:
    """A few-kilobyte Gemma 3n with every feature on: 5 layers (2 KV-shared), 3 AltUp streams, LAuReL rank 4,
    sparse gates on the first two layers, a window of 8."""
    base: dict[str, Any] = dict(
        vocab_size=256, hidden_size=32, num_layers=5, num_heads=4, num_kv_heads=2, head_dim=8,
        intermediate_size=64, max_position_embeddings=256, sliding_window=8,
        layer_types=(LOCAL, GLOBAL, LOCAL, LOCAL, GLOBAL), vocab_size_per_layer_input=256,
        hidden_size_per_layer_input=8, altup_num_inputs=3, num_kv_shared_layers=2, laurel_rank=4,
        activation_sparsity=(0.95, 0.9, 0.0, 0.0, 0.0), name="tiny_gemma3n")
    if "num_layers" in overrides:  # the pattern and sparsities follow the new depth unless given too
        base["layer_types"] = _default_types(overrides["num_layers"])
        base["activation_sparsity"] = _default_sparsity(overrides["num_layers"])
    base.update(overrides)
    return Gemma3nConfig(**base)


def _preset(name: str, **shape: Any) -> Gemma3nConfig:
    return Gemma3nConfig(name=name, eos_token_id=(1, 106), **shape)


#: The published text decoders: E2B (30 layers, MLP 8192, the last 10 KV-shared) and E4B (35 layers, MLP
#: 16384, the last 15 KV-shared); both 2048 wide, 8 heads of 256 over 2 KV heads, windows of 512.
PRESETS, PRESET_HF_REPOS = preset_pairs(_preset, {
    ("gemma3n_e2b", "gemma3n_instruct_e2b", "google/gemma-3n-E2B"):
        dict(num_layers=30, intermediate_size=8192, num_kv_shared_layers=10),
    ("gemma3n_e4b", "gemma3n_instruct_e4b", "google/gemma-3n-E4B"):
        dict(num_layers=35, intermediate_size=16384, num_kv_shared_layers=15),
})


def from_hf_config(hf: Mapping[str, Any]) -> Gemma3nConfig:
    """A config from transformers' ``config.json``: ``gemma3n_text``, or the ``text_config`` of a multimodal
    ``gemma3n`` (whose towers gemmax does not run)."""
    mt = hf.get("model_type")
    if mt == "gemma3n":
        if "text_config" not in hf:
            raise ValueError("a gemma3n config without text_config")
        top = hf
        hf = dict(hf["text_config"], model_type="gemma3n_text")
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if hf.get(k) is None and top.get(k) is not None:
                hf[k] = top[k]
        hf.setdefault("_name_or_path", top.get("_name_or_path", ""))
    elif mt != "gemma3n_text":
        raise ValueError(f"not a Gemma 3n config (model_type {mt!r})")
    n = int(hf["num_hidden_layers"])
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new"):
        raise ValueError(f"Gemma 3n with activation {act!r}: gemmax implements the tanh GELU of the published "
                         "checkpoints")
    if hf.get("attention_bias"):
        raise ValueError("Gemma 3n with attention_bias: the published checkpoints have none and gemmax "
                         "does not implement them")
    inter = hf.get("intermediate_size", 16384)
    if isinstance(inter, list | tuple):
        if len(set(inter)) != 1:
            raise ValueError(f"per-layer intermediate sizes {sorted(set(inter))}: gemmax stacks the layers and "
                             "needs one MLP width for all of them")
        inter = inter[0]
    types = hf.get("layer_types")
    layer_types = layer_types_from_hf(types) if types else _default_types(n)
    sparsity = hf.get("activation_sparsity_pattern")
    if sparsity is None:
        sparsity = _default_sparsity(n)
    elif isinstance(sparsity, int | float):
        sparsity = (float(sparsity),) * n
    rope = hf.get("rope_parameters") or {}
    full = dict(rope.get("full_attention") or {})
    slide = dict(rope.get("sliding_attention") or {})
    theta = float(full.get("rope_theta", hf.get("rope_theta", 1_000_000.0)))
    local = float(slide.get("rope_theta", hf.get("rope_local_base_freq", 10_000.0)))
    scaling = {k: v for k, v in full.items() if k != "rope_theta"}
    if scaling.get("rope_type", "default") == "default":
        scaling = hf.get("rope_scaling") or None
        if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
            scaling = None
    if slide.get("rope_type", "default") != "default":
        raise ValueError(f"RoPE scaling on sliding layers ({slide['rope_type']!r}) is not supported")
    return Gemma3nConfig(
        vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]), num_layers=n,
        num_heads=int(hf["num_attention_heads"]),
        num_kv_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
        head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // int(hf["num_attention_heads"])),
        intermediate_size=int(inter), max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), sliding_window=int(hf.get("sliding_window") or 512),
        layer_types=layer_types, rope_theta=theta, rope_local_theta=local, rope_scaling=scaling,
        final_logit_softcap=hf.get("final_logit_softcapping", 30.0),
        vocab_size_per_layer_input=int(hf.get("vocab_size_per_layer_input", hf["vocab_size"])),
        hidden_size_per_layer_input=int(hf.get("hidden_size_per_layer_input", 256)),
        altup_num_inputs=int(hf.get("altup_num_inputs", 4)), altup_active_idx=int(hf.get("altup_active_idx", 0)),
        altup_coef_clip=hf.get("altup_coef_clip", 120.0), altup_correct_scale=bool(hf.get("altup_correct_scale", True)),
        num_kv_shared_layers=int(hf.get("num_kv_shared_layers", 0)), laurel_rank=int(hf.get("laurel_rank", 64)),
        activation_sparsity=tuple(float(s) for s in sparsity),
        **hf_config_tokens(hf),
    )


def to_hf_config(cfg: Gemma3nConfig) -> dict[str, Any]:
    """The ``config.json`` of a ``Gemma3nForCausalLM`` (``gemma3n_text``) holding the same model."""
    full = dict(cfg.rope_scaling or {"rope_type": "default"}, rope_theta=cfg.rope_theta)
    return {
        "model_type": "gemma3n_text", "architectures": ["Gemma3nForCausalLM"],
        **hf_shape(cfg), "intermediate_size": [cfg.intermediate_size] * cfg.num_layers,
        "hidden_activation": "gelu_pytorch_tanh", "sliding_window": cfg.sliding_window,
        "layer_types": hf_layer_types(cfg.layer_types),
        "rope_parameters": hf_rope_parameters(full, cfg.rope_local_theta),
        "final_logit_softcapping": cfg.final_logit_softcap,
        "vocab_size_per_layer_input": cfg.vocab_size_per_layer_input,
        "hidden_size_per_layer_input": cfg.hidden_size_per_layer_input,
        "altup_num_inputs": cfg.altup_num_inputs, "altup_active_idx": cfg.altup_active_idx,
        "altup_coef_clip": cfg.altup_coef_clip, "altup_correct_scale": cfg.altup_correct_scale,
        "num_kv_shared_layers": cfg.num_kv_shared_layers, "laurel_rank": cfg.laurel_rank,
        "activation_sparsity_pattern": [float(s) for s in cfg.activation_sparsity],
        "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": True,
        **hf_tokens_entry(cfg), "torch_dtype": "float32",
    }


# ---- parameters ------------------------------------------------------------------------------------------

#: Weights of the KV-computing layers only (stacked over the first ``num_unshared`` layers).
KV_BLOCK = "kv_block"


def param_specs(cfg: Gemma3nConfig) -> dict[str, ParamSpec]:
    """Every weight with its shape and logical axes, keyed by path.

    ``decoder_block/...`` is stacked over all layers; ``kv_block/...`` (key and value projections, key norm)
    over the layers that compute keys and values, since the KV-shared layers have none. Norm weights are used
    as stored (``x * w``) and initialised to ones."""
    L, D, H, K, hd, F = (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                         cfg.intermediate_size)
    P, N, R, Lk = cfg.hidden_size_per_layer_input, cfg.altup_num_inputs, cfg.laurel_rank, cfg.num_unshared
    b = "decoder_block/"

    def norm(*shape: int, axes: tuple[str | None, ...]) -> ParamSpec:
        return ParamSpec(shape, axes, "ones")

    specs: dict[str, ParamSpec] = {
        "token_embedding/embeddings": ParamSpec((cfg.vocab_size, D), ("vocab", "embed"), "embedding",
                                                std=1.0 / math.sqrt(D)),
        "per_layer_embedding/embeddings": ParamSpec((cfg.vocab_size_per_layer_input, L * P), ("vocab", None),
                                                    "embedding", std=1.0 / math.sqrt(P)),
        "per_layer_model_projection/kernel": ParamSpec((D, L, P), ("embed", None, "per_layer"), fan_in_axis=0),
        "per_layer_projection_norm/scale": norm(P, axes=("per_layer",)),
        "altup_projections/kernel": ParamSpec((N - 1, D, D), ("altup", "embed", None), fan_in_axis=1),
        "altup_unembed_projections/kernel": ParamSpec((N - 1, D, D), ("altup", "embed", None), fan_in_axis=1),
        "final_normalization/scale": norm(D, axes=("embed",)),
        b + "pre_attention_norm/scale": norm(L, D, axes=("layers", "embed")),
        b + "attention/query/kernel": ParamSpec((L, H, D, hd), ("layers", "heads", "embed", "head_dim"),
                                                fan_in_axis=2),
        b + "attention/query_norm/scale": norm(L, hd, axes=("layers", "head_dim")),
        b + "attention/attention_output/kernel": ParamSpec((L, H, hd, D), ("layers", "heads", "head_dim", "embed"),
                                                           std=1.0 / math.sqrt(H * hd)),
        b + "post_attention_norm/scale": norm(L, D, axes=("layers", "embed")),
        b + "pre_ffw_norm/scale": norm(L, D, axes=("layers", "embed")),
        b + "post_ffw_norm/scale": norm(L, D, axes=("layers", "embed")),
        b + "ffw_gating/kernel": ParamSpec((L, D, F), ("layers", "embed", "mlp"), fan_in_axis=1),
        b + "ffw_gating_2/kernel": ParamSpec((L, D, F), ("layers", "embed", "mlp"), fan_in_axis=1),
        b + "ffw_linear/kernel": ParamSpec((L, F, D), ("layers", "mlp", "embed"), fan_in_axis=1),
        b + "laurel/linear_left/kernel": ParamSpec((L, D, R), ("layers", "embed", "laurel"), fan_in_axis=1),
        b + "laurel/linear_right/kernel": ParamSpec((L, R, D), ("layers", "laurel", "embed"), fan_in_axis=1),
        b + "laurel/post_norm/scale": norm(L, D, axes=("layers", "embed")),
        b + "altup/correct_output_scale": ParamSpec((L, D), ("layers", "embed"), "zeros"),
        b + "altup/correction_coefs/kernel": ParamSpec((L, N, N), ("layers", "altup", "altup_out"), "zeros"),
        b + "altup/prediction_coefs/kernel": ParamSpec((L, N, N * N), ("layers", "altup", "altup_out"), "zeros"),
        b + "altup/modality_router/kernel": ParamSpec((L, D, N), ("layers", "embed", "altup"), fan_in_axis=1),
        b + "altup/router_norm/scale": norm(L, D, axes=("layers", "embed")),
        b + "per_layer_input_gate/kernel": ParamSpec((L, D, P), ("layers", "embed", "per_layer"), fan_in_axis=1),
        b + "per_layer_projection/kernel": ParamSpec((L, P, D), ("layers", "per_layer", "embed"), fan_in_axis=1),
        b + "post_per_layer_input_norm/scale": norm(L, D, axes=("layers", "embed")),
        KV_BLOCK + "/attention/key/kernel": ParamSpec((Lk, K, D, hd), ("layers", "kv_heads", "embed", "head_dim"),
                                                      fan_in_axis=2),
        KV_BLOCK + "/attention/value/kernel": ParamSpec((Lk, K, D, hd), ("layers", "kv_heads", "embed", "head_dim"),
                                                        fan_in_axis=2),
        KV_BLOCK + "/attention/key_norm/scale": norm(Lk, hd, axes=("layers", "head_dim")),
    }
    if N == 1:
        del specs["altup_projections/kernel"], specs["altup_unembed_projections/kernel"]
    return specs


def init_params(cfg: Gemma3nConfig, key: Array, dtype: Any = jnp.float32) -> Params:
    """Random weights from the declarations: fan-in-scaled normals, norms at one, AltUp's coefficient maps and
    output scale at zero (each layer then starts as a plain residual block on the active stream)."""
    return init_from_specs(param_specs(cfg), key, dtype)


# ---- linear nodes (LoRA, quantization, PEFT) -----------------------------------------------------------------

#: target -> (path, einsum, LoRA einsums, input axes of one layer's kernel, transformers module in a layer)
LINEARS: dict[str, tuple[tuple[str, ...], str, tuple[str, str], tuple[int, ...], str]] = {
    # the Gemma decoder's, keys and values under the KV-computing layers' block
    **{name: ((KV_BLOCK, *path[1:]) if name in ("key", "value") else path, *gm.LINEAR_EQS[name],
              gm.KERNEL_IN_DIMS[name], gm.HF_MODULES[name]) for name, path in gm.LINEAR_NODE_PATHS.items()},
    "per_layer_input_gate": (("decoder_block", "per_layer_input_gate"), "btd,dp->btp",
                             ("btd,dr->btr", "btr,rp->btp"), (0,), "per_layer_input_gate"),
    "per_layer_projection": (("decoder_block", "per_layer_projection"), "btp,pd->btd",
                             ("btp,pr->btr", "btr,rd->btd"), (0,), "per_layer_projection"),
    "laurel_left": (("decoder_block", "laurel", "linear_left"), "btd,dr->btr", ("btd,dk->btk", "btk,kr->btr"),
                    (0,), "laurel.linear_left"),
    "laurel_right": (("decoder_block", "laurel", "linear_right"), "btr,rd->btd", ("btr,rk->btk", "btk,kd->btd"),
                     (0,), "laurel.linear_right"),
}


def linear_nodes(cfg: Gemma3nConfig) -> dict[str, LinearNode]:
    """The dense layers of a block, with transformers' module names (``model.layers.{i}.self_attn.q_proj``...).
    ``key`` and ``value`` exist on the KV-computing layers only. AltUp's router and coefficient maps (a few
    thousand weights that set how the streams mix) are not nodes: they stay float and frozen."""
    out: dict[str, LinearNode] = {}
    for name, (path, eq, lora_eqs, in_dims, hf_module) in LINEARS.items():
        n = cfg.num_unshared if path[0] == KV_BLOCK else cfg.num_layers
        out[name] = LinearNode(path=path, eq=eq, lora_eqs=lora_eqs, in_dims=in_dims, target=name,
                               peft=hf_module.rsplit(".", 1)[-1], hf_module=hf_module, layers="model.layers",
                               layer_ids=tuple(range(n)))
    return out


def _lin(node: Params, x: Array, name: str) -> Array:
    _, eq, lora_eqs, _, _ = LINEARS[name]
    return linear(node, x, eq, lora_eqs)


# ---- building blocks ---------------------------------------------------------------------------------------


def rms_norm(x: Array, w: Array | None, eps: float) -> Array:
    """Gemma 3n's RMSNorm: ``x * (mean(x^2) + eps)^-1/2 * w`` in float32, cast back once; ``w=None`` is the
    value norm, which has no weight."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if w is not None:
        y = y * w.astype(jnp.float32)
    return y.astype(x.dtype)


def compute_dtype(params: Params) -> Any:
    """Activation dtype: the embedding's, or, once it is int8, the final norm's (never quantized)."""
    table = params["token_embedding"]["embeddings"]
    if jnp.issubdtype(table.dtype, jnp.floating):
        return table.dtype
    return params["final_normalization"]["scale"].dtype


def embed(params: Params, cfg: Gemma3nConfig, tokens: Array) -> Array:
    """Token embedding times sqrt(D), the multiplier cast to the compute dtype first (as the reference's
    buffer is); an int8 table's per-row scales applied."""
    node = params["token_embedding"]
    dtype = compute_dtype(params)
    x = jnp.take(node["embeddings"], tokens, axis=0).astype(dtype)
    if "scale" in node:
        x = x * jnp.take(node["scale"], tokens, axis=0)[..., None].astype(dtype)
    return x * jnp.asarray(math.sqrt(cfg.hidden_size), dtype)


def per_layer_inputs(params: Params, cfg: Gemma3nConfig, tokens: Array, x0: Array) -> Array:
    """One ``[P]`` input per token and layer -> [B, T, L, P]: the per-layer table's row (times sqrt(P); ids
    outside it read row 0) plus the normed projection of the token embedding, scaled by 2^-1/2."""
    L, P, dtype = cfg.num_layers, cfg.hidden_size_per_layer_input, x0.dtype
    ids = jnp.where((tokens >= 0) & (tokens < cfg.vocab_size_per_layer_input), tokens, 0)
    node = params["per_layer_embedding"]
    raw = jnp.take(node["embeddings"], ids, axis=0).astype(dtype)
    if "scale" in node:  # int8 table (``quantize``): one scale per row
        raw = raw * jnp.take(node["scale"], ids, axis=0)[..., None].astype(dtype)
    raw = raw * jnp.asarray(math.sqrt(P), dtype)
    raw = raw.reshape(*tokens.shape, L, P)
    proj = einsum("btd,dlp->btlp", x0, params["per_layer_model_projection"]["kernel"])
    proj = proj * jnp.asarray(cfg.hidden_size ** -0.5, dtype)
    proj = rms_norm(proj, params["per_layer_projection_norm"]["scale"], cfg.norm_eps)
    return (proj + raw) * jnp.asarray(1.0 / math.sqrt(2.0), dtype)


def _rescale(h: Array, target: Array) -> Array:
    """``h`` rescaled to the RMS ``target`` (its own RMS floored at sqrt(1e-5)), as AltUp's stream projections."""
    hf = h.astype(jnp.float32)
    mag = jnp.sqrt(jnp.maximum(jnp.mean(hf * hf, axis=-1, keepdims=True), 1e-5))
    return (hf * target / mag).astype(h.dtype)


def _rms(x: Array) -> Array:
    xf = x.astype(jnp.float32)
    return jnp.sqrt(jnp.mean(xf * xf, axis=-1, keepdims=True))


def altup_streams(params: Params, cfg: Gemma3nConfig, x0: Array) -> Array:
    """[B, T, D] -> the N AltUp streams [N, B, T, D]: x0, then its projections at x0's RMS."""
    if cfg.altup_num_inputs == 1:
        return x0[None]
    w = params["altup_projections"]["kernel"]
    target = _rms(x0)
    hs = einsum("btd,nde->nbte", x0, w)
    return jnp.concatenate([x0[None], _rescale(hs, target[None])], axis=0)


def altup_merge(params: Params, cfg: Gemma3nConfig, streams: Array) -> Array:
    """The N streams -> [B, T, D]: streams 1.. projected back (at stream 0's RMS), then the mean of all N."""
    if cfg.altup_num_inputs == 1:
        return streams[0]
    w = params["altup_unembed_projections"]["kernel"]
    target = _rms(streams[0])
    hs = einsum("nbtd,nde->nbte", streams[1:], w)
    all_ = jnp.concatenate([streams[:1], _rescale(hs, target[None])], axis=0)
    return jnp.mean(all_.astype(jnp.float32), axis=0).astype(streams.dtype)


def _router(p: Params, x: Array, cfg: Gemma3nConfig) -> Array:
    """AltUp's modality weights [B, T, N]: tanh(router(router_norm(x) / D))."""
    h = rms_norm(x, p["router_norm"]["scale"], cfg.norm_eps) * jnp.asarray(1.0 / cfg.hidden_size, x.dtype)
    r = einsum("btd,dn->btn", h, p["modality_router"]["kernel"])
    return jnp.tanh(r.astype(jnp.float32)).astype(x.dtype)


def altup_predict(p: Params, streams: Array, cfg: Gemma3nConfig) -> Array:
    """Each stream plus a mix of all of them: ``pred_i = x_i + sum_j c_ij x_j``, ``c`` read off the active
    stream through the router and ``prediction_coefs``."""
    N = cfg.altup_num_inputs
    m = _router(p, streams[cfg.altup_active_idx], cfg)
    c = einsum("btn,nk->btk", m, p["prediction_coefs"]["kernel"]).reshape(*m.shape[:-1], N, N)  # [B,T,i,j]
    mix = einsum("jbtd,btij->ibtd", streams, c)
    return (mix + streams).astype(streams.dtype)


def altup_correct(p: Params, pred: Array, out: Array, cfg: Gemma3nConfig) -> Array:
    """Every stream's prediction plus the layer's innovation (output minus the active prediction), weighted
    per stream by ``1 + correction_coefs(router(output))``."""
    m = _router(p, out, cfg)
    w = einsum("btn,nk->btk", m, p["correction_coefs"]["kernel"]) + jnp.asarray(1.0, m.dtype)  # [B, T, N]
    innovation = out - pred[cfg.altup_active_idx]
    return (pred + jnp.moveaxis(w, -1, 0)[..., None] * innovation[None]).astype(pred.dtype)


def gaussian_topk(g: Array, mult: Array) -> Array:
    """Keep what lies above ``mean + std * mult`` of each row (``mult = Phi^-1(sparsity)``): relu(g - cutoff).
    Mean and (population) std in float32."""
    gf = g.astype(jnp.float32)
    mean = jnp.mean(gf, axis=-1, keepdims=True)
    std = jnp.sqrt(jnp.mean(jnp.square(gf - mean), axis=-1, keepdims=True))
    cutoff = (mean + std * mult.astype(g.dtype).astype(jnp.float32)).astype(g.dtype)
    return jax.nn.relu(g - cutoff)


def sparsity_multipliers(cfg: Gemma3nConfig) -> np.ndarray:
    """Phi^-1(sparsity) per layer (float32; 0 where the layer is dense, which the scan's flag skips). The
    sparsity is rounded to float32 first, as the reference holds it; the quantile then agrees with its float32
    ``icdf`` to within an ulp."""
    return np.array([NormalDist().inv_cdf(float(np.float32(s))) if s > 0 else 0.0 for s in cfg.activation_sparsity],
                    np.float32)


def layer_windows(cfg: Gemma3nConfig) -> np.ndarray:
    return np.array([cfg.sliding_window if t == LOCAL else NO_WINDOW for t in cfg.layer_types], np.int32)


def rope_tables(cfg: Gemma3nConfig, positions: Array) -> tuple[Array, Array, np.ndarray]:
    """(sin [2, B, T, hd/2], cos, per-layer row) with row 0 the global base (and its scaling), row 1 the local
    one: evaluated once per call instead of once per layer."""
    glob = rope_sin_cos(positions, rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
    loc = rope_sin_cos(positions, rope_inv_freq(cfg.head_dim, cfg.rope_local_theta, None))
    rows = np.array([int(t == LOCAL) for t in cfg.layer_types], np.int32)
    return jnp.stack([glob[0], loc[0]]), jnp.stack([glob[1], loc[1]]), rows


AttendFn = Callable[[Array, Array, Array], Array]


def compute_kv(pk: Params, h: Array, cfg: Gemma3nConfig, rope: tuple[Array, Array]) -> tuple[Array, Array]:
    """A KV-computing layer's keys (normed with weights, rotated) and values (normed without weights)."""
    a = pk["attention"]
    k = _lin(a["key"], h, "key")
    k = apply_rope(rms_norm(k, a["key_norm"]["scale"], cfg.norm_eps), None, rope)
    v = rms_norm(_lin(a["value"], h, "value"), None, cfg.norm_eps)
    return k, v


def decoder_layer(p: Params, streams: Array, cfg: Gemma3nConfig, rope: tuple[Array, Array], pli: Array,
                  sparse: Array, mult: Array, kv: Callable[[Array], tuple[Array, Array]],
                  attend: AttendFn) -> Array:
    """One layer over the AltUp streams [N, B, T, D] -> [N, B, T, D].

    ``kv(h)`` gives the keys and values the layer attends over (computed from its normed input, or a source
    layer's for a KV-shared one); ``attend(q, k, v)`` does the attention itself (full sequence or cached), so
    training, prefill and decode share every other line. ``pli`` [B, T, P] is the layer's per-layer input,
    ``sparse`` / ``mult`` its gate sparsity (scan data)."""
    eps = cfg.norm_eps
    pred = altup_predict(p["altup"], streams, cfg)
    active = pred[cfg.altup_active_idx]
    h = rms_norm(active, p["pre_attention_norm"]["scale"], eps)
    lr = p["laurel"]
    laurel = h + rms_norm(_lin(lr["linear_right"], _lin(lr["linear_left"], h, "laurel_left"), "laurel_right"),
                          lr["post_norm"]["scale"], eps)
    a = p["attention"]
    q = _lin(a["query"], h, "query")
    q = apply_rope(rms_norm(q, a["query_norm"]["scale"], eps), None, rope)  # query scale 1
    k, v = kv(h)
    o = _lin(a["attention_output"], attend(q, k, v), "attention_output")
    o = rms_norm(o, p["post_attention_norm"]["scale"], eps)
    x = ((active + o) + laurel) * jnp.asarray(1.0 / math.sqrt(2.0), active.dtype)
    m = rms_norm(x, p["pre_ffw_norm"]["scale"], eps)
    gate = _lin(p["ffw_gating"], m, "ffw_gating")
    gate = jnp.where(sparse, gaussian_topk(gate, mult), gate)
    act = activation_fn("gelu_tanh")(gate) * _lin(p["ffw_gating_2"], m, "ffw_gating_2")
    f = rms_norm(_lin(p["ffw_linear"], act, "ffw_linear"), p["post_ffw_norm"]["scale"], eps)
    out = x + f
    corrected = altup_correct(p["altup"], pred, out, cfg)
    first = corrected[cfg.altup_active_idx]
    if cfg.altup_correct_scale:
        first = (first.astype(jnp.float32) * p["altup"]["correct_output_scale"].astype(jnp.float32)).astype(
            first.dtype)
    g = activation_fn("gelu_tanh")(_lin(p["per_layer_input_gate"], first, "per_layer_input_gate")) * pli
    g = rms_norm(_lin(p["per_layer_projection"], g, "per_layer_projection"),
                 p["post_per_layer_input_norm"]["scale"], eps)
    return corrected.at[1:].add(g[None])


def _split_blocks(params: Params, cfg: Gemma3nConfig) -> tuple[Params, Params, Params]:
    """(KV-computing layers' decoder weights [:Lk], KV-shared layers' [Lk:], kv_block weights)."""
    lk = cfg.num_unshared
    blocks = params["decoder_block"]
    return (jax.tree.map(lambda a: a[:lk], blocks), jax.tree.map(lambda a: a[lk:], blocks), params[KV_BLOCK])


def _layer_data(cfg: Gemma3nConfig) -> dict[str, np.ndarray]:
    mult = sparsity_multipliers(cfg)
    return {"window": layer_windows(cfg), "sparse": np.array([s > 0 for s in cfg.activation_sparsity]),
            "mult": mult, "source": np.array([cfg.kv_source(i) for i in range(cfg.num_layers)], np.int32)}


def _run(params: Params, cfg: Gemma3nConfig, tokens: Array, positions: Array, seg: Array | None,
         remat: str | None = None) -> tuple[Array, Array, Array]:
    """The whole decoder over sequences -> (final-normed hidden [B, T, D], keys and values of the
    KV-computing layers [Lk, B, T, K, hd])."""
    b, t = tokens.shape
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    x0 = embed(params, cfg, tokens)
    pli = jnp.moveaxis(per_layer_inputs(params, cfg, tokens, x0), 2, 0)  # [L, B, T, P]
    streams = altup_streams(params, cfg, x0)
    sin, cos, rows = rope_tables(cfg, positions)
    data = _layer_data(cfg)
    own, shared, kvp = _split_blocks(params, cfg)
    lk = cfg.num_unshared

    def attend_with(window: Array) -> AttendFn:
        def attend(q: Array, k: Array, v: Array) -> Array:
            return dot_attention(q, k, v, attention_mask(idx, idx, window, seg, seg))
        return attend

    def wrap(body: Callable) -> Callable:
        return remat_layer(body, remat)

    def own_body(s: Array, xs: tuple) -> tuple[Array, tuple[Array, Array]]:
        p, pk, row, window, sparse, mult, pl = xs
        rope = (sin[row], cos[row])
        box: dict[str, Array] = {}

        def kv(h: Array) -> tuple[Array, Array]:
            box["k"], box["v"] = compute_kv(pk, h, cfg, rope)
            return box["k"], box["v"]

        s = decoder_layer(p, s, cfg, rope, pl, sparse, mult, kv, attend_with(window))
        return s, (box["k"], box["v"])

    xs = (own, kvp, jnp.asarray(rows[:lk]), jnp.asarray(data["window"][:lk]), jnp.asarray(data["sparse"][:lk]),
          jnp.asarray(data["mult"][:lk]), pli[:lk])
    streams, (ks, vs) = jax.lax.scan(wrap(own_body), streams, xs)
    if cfg.num_kv_shared_layers:
        src = data["source"][lk:]

        def shared_body(s: Array, xs: tuple) -> tuple[Array, None]:
            p, k, v, row, window, sparse, mult, pl = xs
            return decoder_layer(p, s, cfg, (sin[row], cos[row]), pl, sparse, mult, lambda h: (k, v),
                                 attend_with(window)), None

        xs2 = (shared, ks[src], vs[src], jnp.asarray(rows[lk:]), jnp.asarray(data["window"][lk:]),
               jnp.asarray(data["sparse"][lk:]), jnp.asarray(data["mult"][lk:]), pli[lk:])
        streams, _ = jax.lax.scan(wrap(shared_body), streams, xs2)
    x = altup_merge(params, cfg, streams)
    return rms_norm(x, params["final_normalization"]["scale"], cfg.norm_eps), ks, vs


def _no_inputs(inputs: Mapping[str, Any]) -> None:
    if inputs:
        raise TypeError(f"Gemma 3n (text) models take no {', '.join(sorted(inputs))}: token ids only")


def forward_hidden(params: Params, cfg: Gemma3nConfig, tokens: Array, positions: Array | None = None,
                   segment_ids: Array | None = None, remat: str | None = None, **inputs: Any) -> Array:
    """Causal forward -> final-normed hidden states [B, T, D]. ``segment_ids`` (0 = padding) keep packed
    documents apart, ``positions`` (default 0..T-1) feed RoPE; ``remat`` ("full" | "dots" | None) wraps each
    layer in ``jax.checkpoint``."""
    _no_inputs(inputs)
    tokens = jnp.asarray(tokens, jnp.int32)
    b, t = tokens.shape
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    positions = idx if positions is None else jnp.asarray(positions, jnp.int32)
    seg = None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    return _run(params, cfg, tokens, positions, seg, remat)[0]


def logits_from_hidden(params: Params, cfg: Gemma3nConfig, hidden: Array) -> Array:
    """Hidden [..., D] -> float32 logits through the tied embedding (an int8 table's per-row scales become
    per-vocabulary scales), soft-capped."""
    node = params["token_embedding"]
    logits = einsum("...d,vd->...v", hidden, node["embeddings"], jnp.float32)
    if "scale" in node:
        logits = logits * node["scale"].astype(jnp.float32)
    return softcap(logits, cfg.final_logit_softcap)


def forward(params: Params, cfg: Gemma3nConfig, tokens: Array, positions: Array | None = None,
            segment_ids: Array | None = None) -> Array:
    """Float32 logits [B, T, V]."""
    return logits_from_hidden(params, cfg, forward_hidden(params, cfg, tokens, positions, segment_ids))


# ---- generation: a KV cache for the KV-computing layers only ------------------------------------------------
#
# k/v_local [n_local, B, W, K, hd] (rings indexed by absolute position modulo W) and k/v_global
# [n_global, B, S, K, hd] for the first ``num_unshared`` layers; the KV-shared layers keep nothing and read
# their source layer's entry (and that layer's key/value of the current step).


def _own_types(cfg: Gemma3nConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every layer: whether its KV source is local, and the source's index among the local / global
    cache stacks."""
    own_local = np.array([t == LOCAL for t in cfg.layer_types[:cfg.num_unshared]])
    li = np.maximum(np.cumsum(own_local) - 1, 0)
    gi = np.maximum(np.cumsum(~own_local) - 1, 0)
    src = np.array([cfg.kv_source(i) for i in range(cfg.num_layers)])
    return own_local[src], li[src].astype(np.int32), gi[src].astype(np.int32)


def ring_width(cfg: Gemma3nConfig, max_len: int) -> int:
    return max(1, min(cfg.sliding_window, max_len))


def init_cache(cfg: Gemma3nConfig, batch: int, max_len: int, dtype: Any = jnp.float32) -> dict[str, Array]:
    """Zeroed keys/values of ``batch`` independent rows (engine slots) for contexts up to ``max_len``."""
    own = cfg.layer_types[:cfg.num_unshared]
    nl, ng = sum(t == LOCAL for t in own), sum(t != LOCAL for t in own)
    w = ring_width(cfg, max_len) if nl else 1
    s = max_len if ng else 1
    k, hd = cfg.num_kv_heads, cfg.head_dim
    return {"k_local": jnp.zeros((max(nl, 1), batch, w, k, hd), dtype),
            "v_local": jnp.zeros((max(nl, 1), batch, w, k, hd), dtype),
            "k_global": jnp.zeros((max(ng, 1), batch, s, k, hd), dtype),
            "v_global": jnp.zeros((max(ng, 1), batch, s, k, hd), dtype)}


def cache_bytes(cfg: Gemma3nConfig, batch: int = 1, length: int = 1, dtype: Any = jnp.bfloat16) -> int:
    """Bytes of the decoding cache for ``length`` tokens: KV-shared layers add nothing, local layers at most
    a window."""
    shapes = jax.eval_shape(lambda: init_cache(cfg, batch, length, dtype))
    return int(sum(np.prod(s.shape) * np.dtype(s.dtype).itemsize for s in jax.tree.leaves(shapes)))


def prefill(params: Params, cfg: Gemma3nConfig, tokens: Array, lengths: Array, max_len: int,
            backend: str = "xla", **inputs: Any) -> tuple[Array, dict[str, Array]]:
    """Right-padded prompts [b, T] (true lengths [b]) -> (logits of each row's last token [b, V], per-row
    caches in ``init_cache``'s layout: T slots for global layers, a ring as wide as an engine's of length
    ``max_len`` for local ones). ``backend`` is accepted for the engine; XLA runs either way."""
    _no_inputs(inputs)
    tokens = jnp.asarray(tokens, jnp.int32)
    lengths = jnp.asarray(lengths, jnp.int32)
    b, t = tokens.shape
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    seg = (idx < lengths[:, None]).astype(jnp.int32)  # padding is segment 0
    hidden, ks, vs = _run(params, cfg, tokens, idx, seg)
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
    caches = gd.ring_caches(cfg.layer_types[:cfg.num_unshared], ks, vs, lengths, ring_width(cfg, max_len))
    return logits_from_hidden(params, cfg, last), caches


#: Writes prefilled per-row caches into engine slots: the Gemma decoder's, whose cache layout this one keeps.
insert = gd.insert


def decode_step(params: Params, cfg: Gemma3nConfig, cache: dict[str, Array], tokens: Array, pos: Array,
                backend: str = "xla") -> tuple[Array, dict[str, Array]]:
    """One token per row at absolute positions ``pos`` [B] -> (float32 logits [B, V], updated cache). The
    KV-computing layers attend to their cache plus their own new key; each KV-shared layer to its source's."""
    tokens = jnp.asarray(tokens, jnp.int32)
    pos = jnp.asarray(pos, jnp.int32)
    b = tokens.shape[0]
    rows_ = jnp.arange(b)
    positions = pos[:, None]
    x0 = embed(params, cfg, tokens[:, None])
    pli = jnp.moveaxis(per_layer_inputs(params, cfg, tokens[:, None], x0), 2, 0)
    streams = altup_streams(params, cfg, x0)
    sin, cos, rows = rope_tables(cfg, positions)
    data = _layer_data(cfg)
    is_local, li, gi = _own_types(cfg)
    kl, vl, kg, vg = cache["k_local"], cache["v_local"], cache["k_global"], cache["v_global"]
    w, s = kl.shape[2], kg.shape[2]
    # absolute position held by ring slot j: the latest p < pos with p % w == j; valid inside the window
    pj = pos[:, None] - 1 - jnp.mod(pos[:, None] - 1 - jnp.arange(w)[None], w)
    local_valid = (pj >= 0) & (pj > pos[:, None] - cfg.sliding_window)
    global_valid = jnp.arange(s)[None] < pos[:, None]
    own, shared, kvp = _split_blocks(params, cfg)
    lk = cfg.num_unshared
    any_local, all_local = bool(is_local.any()), bool(is_local.all())

    def attend_for(loc: Array, l_i: Array, g_i: Array) -> AttendFn:
        def attend(q: Array, k: Array, v: Array) -> Array:
            def local(q, k, v):
                return gd._attend_cached(q, k, v, kl[l_i], vl[l_i], local_valid, None).astype(q.dtype)

            def glob(q, k, v):
                return gd._attend_cached(q, k, v, kg[g_i], vg[g_i], global_valid, None).astype(q.dtype)

            if all_local:
                return local(q, k, v)
            if not any_local:
                return glob(q, k, v)
            return jax.lax.cond(loc, local, glob, q, k, v)
        return attend

    def own_body(st: Array, xs: tuple) -> tuple[Array, tuple[Array, Array]]:
        p, pk, row, sparse, mult, pl, loc, l_i, g_i = xs
        rope = (sin[row], cos[row])
        box: dict[str, Array] = {}

        def kv(h: Array) -> tuple[Array, Array]:
            box["k"], box["v"] = compute_kv(pk, h, cfg, rope)
            return box["k"], box["v"]

        st = decoder_layer(p, st, cfg, rope, pl, sparse, mult, kv, attend_for(loc, l_i, g_i))
        return st, (box["k"], box["v"])

    def sl(a: np.ndarray, lo: int, hi: int | None = None) -> Array:
        return jnp.asarray(a[lo:hi])

    xs = (own, kvp, sl(rows, 0, lk), sl(data["sparse"], 0, lk), sl(data["mult"], 0, lk), pli[:lk],
          sl(is_local, 0, lk), sl(li, 0, lk), sl(gi, 0, lk))
    streams, (ks, vs) = jax.lax.scan(own_body, streams, xs)  # [Lk, B, 1, K, hd]
    if cfg.num_kv_shared_layers:
        src = data["source"][lk:]

        def shared_body(st: Array, xs: tuple) -> tuple[Array, None]:
            p, k, v, row, sparse, mult, pl, loc, l_i, g_i = xs
            return decoder_layer(p, st, cfg, (sin[row], cos[row]), pl, sparse, mult, lambda h: (k, v),
                                 attend_for(loc, l_i, g_i)), None

        xs2 = (shared, ks[src], vs[src], sl(rows, lk), sl(data["sparse"], lk), sl(data["mult"], lk), pli[lk:],
               sl(is_local, lk), sl(li, lk), sl(gi, lk))
        streams, _ = jax.lax.scan(shared_body, streams, xs2)
    own_local = is_local[:lk]
    loc_idx, glob_idx = np.nonzero(own_local)[0], np.nonzero(~own_local)[0]
    cache = dict(cache)
    if len(loc_idx):
        slot = pos % w
        cache["k_local"] = kl.at[:, rows_, slot].set(ks[loc_idx][:, :, 0].astype(kl.dtype))
        cache["v_local"] = vl.at[:, rows_, slot].set(vs[loc_idx][:, :, 0].astype(vl.dtype))
    if len(glob_idx):
        cache["k_global"] = kg.at[:, rows_, pos].set(ks[glob_idx][:, :, 0].astype(kg.dtype))
        cache["v_global"] = vg.at[:, rows_, pos].set(vs[glob_idx][:, :, 0].astype(vg.dtype))
    x = altup_merge(params, cfg, streams)
    x = rms_norm(x, params["final_normalization"]["scale"], cfg.norm_eps)
    return logits_from_hidden(params, cfg, x[:, 0]), cache


# ---- Hugging Face checkpoints ------------------------------------------------------------------------------

#: Other published prefixes -> the table's: the multimodal checkpoints nest the decoder.
HF_ALIASES = (("model.language_model.", "model."),)

#: Tensors of a multimodal checkpoint the text decoder never reads: the towers, their embedders, the tied
#: head's copy and rotary buffers.
HF_IGNORABLE = ("rotary_emb.inv_freq", "lm_head.weight", "vision_tower", "audio_tower", "embed_vision",
                "embed_audio")


def hf_unused(cfg: Gemma3nConfig) -> tuple[str, ...]:
    """Tensors a published checkpoint carries for the KV-shared layers, which never use them (their key and
    value projections and key norm): skipped by name, in either layout."""
    return tuple(f"layers.{i}.self_attn.{m}." for i in range(cfg.num_unshared, cfg.num_layers)
                 for m in ("k_proj", "v_proj", "k_norm", "v_norm"))


def hf_table(cfg: Gemma3nConfig) -> dict[str, HFEntry]:
    """gemmax path -> (HF name, or one per stacked layer; HF -> gemmax; gemmax -> HF), in the layout
    ``Gemma3nForCausalLM`` saves (``model.*``; the multimodal ``model.language_model.*`` is read as an alias)."""
    hd, D, L, P = cfg.head_dim, cfg.hidden_size, cfg.num_layers, cfg.hidden_size_per_layer_input
    ident, tr = HF_SAME, HF_TRANSPOSED
    ple_proj = (lambda w: w.T.reshape(D, L, P), lambda w: w.reshape(D, L * P).T)
    per_layer = layer_entries(cfg.num_heads, hd, D)
    # LAuReL, AltUp and the per-layer input: their linear layers' HF names are their paths, dotted
    for path in ("laurel/linear_left", "laurel/linear_right", "altup/correction_coefs", "altup/prediction_coefs",
                 "altup/modality_router", "per_layer_input_gate", "per_layer_projection"):
        per_layer[f"{path}/kernel"] = (path.replace("/", ".") + ".weight", *tr)
    per_layer.update(norm_entries({"laurel/post_norm": "laurel.post_laurel_norm", "altup/router_norm":
                                   "altup.router_norm", "post_per_layer_input_norm": "post_per_layer_input_norm"}))
    per_layer["altup/correct_output_scale"] = ("altup.correct_output_scale", *ident)
    kv = kv_entries(cfg.num_kv_heads, hd, D)
    n_alt = cfg.altup_num_inputs - 1
    table: dict[str, HFEntry] = {
        "token_embedding/embeddings": ("model.embed_tokens.weight", *ident),
        "per_layer_embedding/embeddings": ("model.embed_tokens_per_layer.weight", *ident),
        "per_layer_model_projection/kernel": ("model.per_layer_model_projection.weight", *ple_proj),
        "per_layer_projection_norm/scale": ("model.per_layer_projection_norm.weight", *ident),
        "final_normalization/scale": ("model.norm.weight", *ident),
    }
    if n_alt:
        table["altup_projections/kernel"] = ([f"model.altup_projections.{i}.weight" for i in range(n_alt)], *tr)
        table["altup_unembed_projections/kernel"] = (
            [f"model.altup_unembed_projections.{i}.weight" for i in range(n_alt)], *tr)
    for sub, (name, f, g) in per_layer.items():
        table["decoder_block/" + sub] = ([f"model.layers.{i}.{name}" for i in range(L)], f, g)
    for sub, (name, f, g) in kv.items():
        table[f"{KV_BLOCK}/{sub}"] = ([f"model.layers.{i}.{name}" for i in range(cfg.num_unshared)], f, g)
    return table


def gguf_arch(cfg: Gemma3nConfig) -> str | None:
    """llama.cpp's architecture of the text decoder (``gemmax.models.gemma3n_gguf`` reads and writes it)."""
    return gemma3n_gguf.ARCH


# ---- the family --------------------------------------------------------------------------------------------

FAMILY = register(family_from(
    globals(), "gemma3n",
    model_types=MODEL_TYPES,
    config_type=Gemma3nConfig,
    presets=PRESETS, preset_repos=PRESET_HF_REPOS, tiny_config=tiny_config,
    hf_aliases=HF_ALIASES, hf_ignorable=HF_IGNORABLE, hf_unused=hf_unused,
    extra_embeddings=("per_layer_embedding",),  # quantized per row with the token embedding
    hf_architecture="Gemma3nForCausalLM",
    gguf_arch=gguf_arch,
    gguf=GGUFSpec(archs=(gemma3n_gguf.ARCH,), read=gemma3n_gguf.read, write=gemma3n_gguf.write),
    chat_format=lambda cfg: "gemma",
))
