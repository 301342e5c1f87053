"""SigLIP vision encoder (the image tower of PaliGemma): patchify, learned positions, pre-LN ViT, final LN.

Weights live under ``vision_encoder/`` with the transformer layers stacked on a leading axis
(``vision_encoder/encoder_block/...``) and run under ``lax.scan``, like the text decoder, so compile time does
not grow with the 27 layers of So400m. Layer norms, attention logits and softmax run in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemmax.models.gemma.model import ParamSpec
from gemmax.nn.layers import dot_attention, gelu_tanh, linear

Array = jax.Array
Params = dict[str, Any]

PREFIX = "vision_encoder/"


@dataclass(frozen=True)
class SigLIPConfig:
    """ViT shapes. The defaults are SigLIP So400m/14 at 224 px (256 patches), PaliGemma's tower."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1152
    depth: int = 27
    mlp_dim: int = 4304
    num_heads: int = 16
    channels: int = 3
    norm_eps: float = 1e-6

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


def from_hf_vision_config(hf: dict[str, Any]) -> SigLIPConfig:
    """From a ``siglip_vision_model`` config dict; absent keys take PaliGemma's So400m values."""
    return SigLIPConfig(
        image_size=int(hf.get("image_size", 224)), patch_size=int(hf.get("patch_size", 14)),
        width=int(hf.get("hidden_size", 1152)), depth=int(hf.get("num_hidden_layers", 27)),
        mlp_dim=int(hf.get("intermediate_size", 4304)), num_heads=int(hf.get("num_attention_heads", 16)),
        channels=int(hf.get("num_channels", 3)), norm_eps=float(hf.get("layer_norm_eps", 1e-6)))


def to_hf_vision_config(cfg: SigLIPConfig) -> dict[str, Any]:
    return {"model_type": "siglip_vision_model", "image_size": cfg.image_size, "patch_size": cfg.patch_size,
            "hidden_size": cfg.width, "num_hidden_layers": cfg.depth, "intermediate_size": cfg.mlp_dim,
            "num_attention_heads": cfg.num_heads, "num_channels": cfg.channels, "layer_norm_eps": cfg.norm_eps,
            "hidden_act": "gelu_pytorch_tanh", "vision_use_head": False}


def param_specs(cfg: SigLIPConfig) -> dict[str, ParamSpec]:
    L, W, F, H, hd, p = cfg.depth, cfg.width, cfg.mlp_dim, cfg.num_heads, cfg.head_dim, cfg.patch_size
    b = PREFIX + "encoder_block/"
    s = {
        PREFIX + "patch_embedding/kernel": ParamSpec((p, p, cfg.channels, W), (None, None, None, "embed")),
        PREFIX + "patch_embedding/bias": ParamSpec((W,), ("embed",), "zeros"),
        PREFIX + "position_embedding/embeddings": ParamSpec((cfg.num_patches, W), (None, "embed"), "embedding"),
        b + "layer_norm1/scale": ParamSpec((L, W), ("layers", "embed"), "ones"),
        b + "layer_norm1/bias": ParamSpec((L, W), ("layers", "embed"), "zeros"),
        b + "layer_norm2/scale": ParamSpec((L, W), ("layers", "embed"), "ones"),
        b + "layer_norm2/bias": ParamSpec((L, W), ("layers", "embed"), "zeros"),
        b + "mlp/fc1/kernel": ParamSpec((L, W, F), ("layers", "embed", "mlp")),
        b + "mlp/fc1/bias": ParamSpec((L, F), ("layers", "mlp"), "zeros"),
        b + "mlp/fc2/kernel": ParamSpec((L, F, W), ("layers", "mlp", "embed")),
        b + "mlp/fc2/bias": ParamSpec((L, W), ("layers", "embed"), "zeros"),
        b + "attention/attention_output/kernel": ParamSpec((L, H, hd, W), ("layers", "heads", "head_dim", "embed")),
        b + "attention/attention_output/bias": ParamSpec((L, W), ("layers", "embed"), "zeros"),
        PREFIX + "post_layernorm/scale": ParamSpec((W,), ("embed",), "ones"),
        PREFIX + "post_layernorm/bias": ParamSpec((W,), ("embed",), "zeros"),
    }
    for n in ("query", "key", "value"):
        s[b + f"attention/{n}/kernel"] = ParamSpec((L, W, H, hd), ("layers", "embed", "heads", "head_dim"))
        s[b + f"attention/{n}/bias"] = ParamSpec((L, H, hd), ("layers", "heads", "head_dim"), "zeros")
    return s


#: Stacked-weight sharding rules (layer axis first): heads and MLP width on "model".
LAYOUT_RULES: dict[str, tuple[str | None, ...]] = {
    r"vision_encoder/encoder_block/attention/(query|key|value)/kernel": (None, None, "model", None),
    r"vision_encoder/encoder_block/attention/attention_output/kernel": (None, "model", None, None),
    r"vision_encoder/encoder_block/mlp/fc1/kernel": (None, None, "model"),
    r"vision_encoder/encoder_block/mlp/fc2/kernel": (None, "model", None),
}


def layer_norm(x: Array, scale: Array, bias: Array, eps: float) -> Array:
    xf = x.astype(jnp.float32)
    mu = jnp.mean(xf, -1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mu), -1, keepdims=True)
    y = (xf - mu) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def _lin(node: Params, x: Array, eq: str) -> Array:
    # Through layers.linear so an int8 node ({"kernel": int8, "scale"}) runs without a dequantized copy.
    return linear(node, x, eq) + node["bias"].astype(x.dtype)


#: The encoder's dense layers (path under ``encoder_block/``) and their einsums: what int8 quantizes.
LINEARS: dict[str, str] = {
    "attention/query": "btd,dnh->btnh", "attention/key": "btd,dnh->btnh", "attention/value": "btd,dnh->btnh",
    "attention/attention_output": "btnh,nhd->btd", "mlp/fc1": "btd,df->btf", "mlp/fc2": "btf,fd->btd",
}


def _stacked_in_axes(eq: str) -> tuple[int, ...]:
    from gemmax.nn.quant import in_axes_from_eq

    return tuple(1 + a for a in in_axes_from_eq(eq))


def quantize_params(params: Params, mode: str = "int8", group_size: int | None = None) -> Params:
    """Per-output-channel (or grouped) weight-only quantization of the encoder's dense kernels, in
    ``gemmax.nn.quant``'s node layout; patch/position embeddings and layer norms stay float (they are small and
    feed every patch)."""
    from gemmax.nn.quant import quantize_kernel

    blocks = dict(params["vision_encoder"]["encoder_block"])
    for sub, eq in LINEARS.items():
        a, b = sub.split("/")
        node = blocks[a][b]
        if "kernel" not in node or not jnp.issubdtype(node["kernel"].dtype, jnp.floating):
            raise ValueError(f"vision_encoder/encoder_block/{sub} is already quantized")
        q = quantize_kernel(node["kernel"], _stacked_in_axes(eq), mode, group_size)
        blocks[a] = dict(blocks[a], **{b: {**q, "bias": node["bias"]}})
    return dict(params, vision_encoder=dict(params["vision_encoder"], encoder_block=blocks))


def dequantize_params(params: Params, dtype: Any = jnp.float32) -> Params:
    """Float encoder kernels back from :func:`quantize_params` (a float tree is returned unchanged)."""
    from gemmax.nn.quant import dequantize_kernel, is_quantized

    blocks = dict(params["vision_encoder"]["encoder_block"])
    for sub, eq in LINEARS.items():
        a, b = sub.split("/")
        node = blocks[a][b]
        if is_quantized(node):
            w = dequantize_kernel(node, _stacked_in_axes(eq), dtype)
            blocks[a] = dict(blocks[a], **{b: {"kernel": w, "bias": node["bias"]}})
    return dict(params, vision_encoder=dict(params["vision_encoder"], encoder_block=blocks))


def encoder_layer(p: Params, x: Array, cfg: SigLIPConfig) -> Array:
    """Pre-LN transformer layer, bidirectional attention over all patches."""
    h = layer_norm(x, p["layer_norm1"]["scale"], p["layer_norm1"]["bias"], cfg.norm_eps)
    a = p["attention"]
    q = _lin(a["query"], h, "btd,dnh->btnh") * jnp.asarray(cfg.head_dim ** -0.5, h.dtype)
    k = _lin(a["key"], h, "btd,dnh->btnh")
    v = _lin(a["value"], h, "btd,dnh->btnh")
    b, t = x.shape[:2]
    o = dot_attention(q, k, v, jnp.ones((b, t, t), bool))
    x = x + _lin(a["attention_output"], o, "btnh,nhd->btd")
    h = layer_norm(x, p["layer_norm2"]["scale"], p["layer_norm2"]["bias"], cfg.norm_eps)
    h = gelu_tanh(_lin(p["mlp"]["fc1"], h, "btd,df->btf"))
    return x + _lin(p["mlp"]["fc2"], h, "btf,fd->btd")


def encode(params: Params, cfg: SigLIPConfig, pixels: Array, dtype: Any | None = None) -> Array:
    """Images [B, H, W, C] (already normalised to [-1, 1]) -> patch features [B, N, width] after the final LN.

    Patches are flattened (row, column, channel), the order of a ``[p, p, C, width]`` (HWIO) conv kernel, so
    the patch embedding is one matmul.
    """
    v = params["vision_encoder"]
    dtype = dtype or v["patch_embedding"]["kernel"].dtype
    b = pixels.shape[0]
    g, p = cfg.grid, cfg.patch_size
    x = jnp.asarray(pixels, dtype).reshape(b, g, p, g, p, cfg.channels).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, g * g, p * p * cfg.channels)
    kern = v["patch_embedding"]["kernel"].reshape(p * p * cfg.channels, cfg.width).astype(dtype)
    x = x @ kern + v["patch_embedding"]["bias"].astype(dtype)
    x = x + v["position_embedding"]["embeddings"].astype(dtype)[None]

    def body(x: Array, lp: Params) -> tuple[Array, None]:
        return encoder_layer(lp, x, cfg), None

    x, _ = jax.lax.scan(body, x, v["encoder_block"])
    return layer_norm(x, v["post_layernorm"]["scale"], v["post_layernorm"]["bias"], cfg.norm_eps)


def hf_table(cfg: SigLIPConfig, prefix: str = "vision_tower.") -> dict[str, tuple[Any, Callable, Callable]]:
    """gemmax path -> (HF name or per-layer names, HF -> gemmax, gemmax -> HF) for a SiglipVisionModel."""
    H, hd, W = cfg.num_heads, cfg.head_dim, cfg.width
    ident = (lambda w: w, lambda w: w)
    tr = (lambda w: w.T, lambda w: w.T)
    qkv = (lambda w: w.T.reshape(W, H, hd), lambda w: w.reshape(W, H * hd).T)
    qkv_b = (lambda w: w.reshape(H, hd), lambda w: w.reshape(H * hd))
    out = (lambda w: w.T.reshape(H, hd, W), lambda w: w.reshape(H * hd, W).T)
    conv = (lambda w: w.transpose(2, 3, 1, 0), lambda w: w.transpose(3, 2, 0, 1))
    t: dict[str, tuple[Any, Callable, Callable]] = {
        PREFIX + "patch_embedding/kernel": (prefix + "embeddings.patch_embedding.weight", *conv),
        PREFIX + "patch_embedding/bias": (prefix + "embeddings.patch_embedding.bias", *ident),
        PREFIX + "position_embedding/embeddings": (prefix + "embeddings.position_embedding.weight", *ident),
        PREFIX + "post_layernorm/scale": (prefix + "post_layernorm.weight", *ident),
        PREFIX + "post_layernorm/bias": (prefix + "post_layernorm.bias", *ident),
    }
    per = {
        "layer_norm1/scale": ("layer_norm1.weight", *ident), "layer_norm1/bias": ("layer_norm1.bias", *ident),
        "layer_norm2/scale": ("layer_norm2.weight", *ident), "layer_norm2/bias": ("layer_norm2.bias", *ident),
        "mlp/fc1/kernel": ("mlp.fc1.weight", *tr), "mlp/fc1/bias": ("mlp.fc1.bias", *ident),
        "mlp/fc2/kernel": ("mlp.fc2.weight", *tr), "mlp/fc2/bias": ("mlp.fc2.bias", *ident),
        "attention/attention_output/kernel": ("self_attn.out_proj.weight", *out),
        "attention/attention_output/bias": ("self_attn.out_proj.bias", *ident),
    }
    for n, hf in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        per[f"attention/{n}/kernel"] = (f"self_attn.{hf}.weight", *qkv)
        per[f"attention/{n}/bias"] = (f"self_attn.{hf}.bias", *qkv_b)
    for path, (hf, f, g) in per.items():
        t[PREFIX + "encoder_block/" + path] = ([f"{prefix}encoder.layers.{i}.{hf}" for i in range(cfg.depth)], f, g)
    return t


def init_params(cfg: SigLIPConfig, key: Array, dtype: Any = jnp.float32) -> dict[str, Array]:
    """Flat {path: array}: fan-in-scaled normals, LN at identity."""
    specs = param_specs(cfg)
    out = {}
    for k, (path, s) in zip(jax.random.split(key, len(specs)), sorted(specs.items()), strict=True):
        if s.init in ("zeros", "ones"):
            out[path] = (jnp.zeros if s.init == "zeros" else jnp.ones)(s.shape, dtype)
        else:
            fan_in = {4: s.shape[1] if "attention_output" not in path else s.shape[1] * s.shape[2]}.get(
                len(s.shape), s.shape[-2] if len(s.shape) >= 2 else 1)
            if "patch_embedding" in path:
                fan_in = int(np.prod(s.shape[:3]))
            out[path] = (jax.random.normal(k, s.shape) / math.sqrt(max(fan_in, 1))).astype(dtype)
    return out
