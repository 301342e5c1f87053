"""SigLIP vision encoder (the image tower of PaliGemma): patchify, learned positions, pre-LN ViT, final LN.

Weights live under ``vision_encoder/`` with the transformer layers stacked on a leading axis
(``vision_encoder/encoder_block/...``) and run under ``lax.scan``, like the text decoder, so compile time does
not grow with the 27 layers of So400m. Layer norms, attention logits and softmax run in float32.

Images come in transformers' layout, ``pixel_values`` ``[N, C, H, W]`` already normalised to [-1, 1]. Every
dense layer is a ``gemmax.nn.layers.linear`` node declared in :func:`linear_nodes`, so the generic LoRA and
quantization walks reach the tower without knowing it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from gemmax.nn.layers import dot_attention, gelu_tanh, linear
from gemmax.nn.params import LinearNode, ParamSpec, init_from_specs

Array = jax.Array
Params = dict[str, Any]

PREFIX = "vision_encoder/"


@dataclass(frozen=True)
class SigLIPConfig:
    """ViT shapes. The defaults are SigLIP So400m/14 at 224 px (256 patches), PaliGemma's tower."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1152
    """The residual stream (HF ``hidden_size``)."""
    depth: int = 27
    """Encoder layers (HF ``num_hidden_layers``)."""
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
    """Every weight of the tower with its logical axes: ``vision_embed`` (the tower's width), ``heads`` /
    ``head_dim`` / ``mlp`` as in the decoder (so heads and MLP shard on the model axis by default),
    ``patch`` / ``channels`` (the patch kernel's pixels) and ``patches`` (positions)."""
    L, W, F, H, hd, p = cfg.depth, cfg.width, cfg.mlp_dim, cfg.num_heads, cfg.head_dim, cfg.patch_size
    b = PREFIX + "encoder_block/"
    s = {
        PREFIX + "patch_embedding/kernel": ParamSpec((p, p, cfg.channels, W), ("patch", "patch", "channels",
                                                                                 "vision_embed"),
                                                     std=1.0 / math.sqrt(p * p * cfg.channels)),
        PREFIX + "patch_embedding/bias": ParamSpec((W,), ("vision_embed",), "zeros"),
        PREFIX + "position_embedding/embeddings": ParamSpec((cfg.num_patches, W), ("patches", "vision_embed"),
                                                            "embedding", std=1.0 / math.sqrt(W)),
        b + "layer_norm1/scale": ParamSpec((L, W), ("layers", "vision_embed"), "ones"),
        b + "layer_norm1/bias": ParamSpec((L, W), ("layers", "vision_embed"), "zeros"),
        b + "layer_norm2/scale": ParamSpec((L, W), ("layers", "vision_embed"), "ones"),
        b + "layer_norm2/bias": ParamSpec((L, W), ("layers", "vision_embed"), "zeros"),
        b + "mlp/fc1/kernel": ParamSpec((L, W, F), ("layers", "vision_embed", "mlp"), fan_in_axis=1),
        b + "mlp/fc1/bias": ParamSpec((L, F), ("layers", "mlp"), "zeros"),
        b + "mlp/fc2/kernel": ParamSpec((L, F, W), ("layers", "mlp", "vision_embed"), fan_in_axis=1),
        b + "mlp/fc2/bias": ParamSpec((L, W), ("layers", "vision_embed"), "zeros"),
        b + "attention/attention_output/kernel": ParamSpec(
            (L, H, hd, W), ("layers", "heads", "head_dim", "vision_embed"), std=1.0 / math.sqrt(H * hd)),
        b + "attention/attention_output/bias": ParamSpec((L, W), ("layers", "vision_embed"), "zeros"),
        PREFIX + "post_layernorm/scale": ParamSpec((W,), ("vision_embed",), "ones"),
        PREFIX + "post_layernorm/bias": ParamSpec((W,), ("vision_embed",), "zeros"),
    }
    for n in ("query", "key", "value"):
        s[b + f"attention/{n}/kernel"] = ParamSpec((L, W, H, hd), ("layers", "vision_embed", "heads", "head_dim"),
                                                   fan_in_axis=1)
        s[b + f"attention/{n}/bias"] = ParamSpec((L, H, hd), ("layers", "heads", "head_dim"), "zeros")
    return s


def init_params(cfg: SigLIPConfig, key: Array, dtype: Any = jnp.float32) -> Params:
    """Fan-in-scaled normals, layer norms at identity (nested, under ``vision_encoder/``)."""
    return init_from_specs(param_specs(cfg), key, dtype)


def layer_norm(x: Array, scale: Array, bias: Array, eps: float) -> Array:
    xf = x.astype(jnp.float32)
    mu = jnp.mean(xf, -1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mu), -1, keepdims=True)
    y = (xf - mu) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


#: The encoder's dense layers: path under ``encoder_block/`` -> (einsum, LoRA einsums, kernel input dims of
#: one layer, LoRA target name, transformers module under ``encoder.layers.{i}``).
LINEARS: dict[str, tuple[str, tuple[str, str], tuple[int, ...], str, str]] = {
    "attention/query": ("btd,dnh->btnh", ("btd,dr->btr", "btr,rnh->btnh"), (0,), "vision_query",
                        "self_attn.q_proj"),
    "attention/key": ("btd,dnh->btnh", ("btd,dr->btr", "btr,rnh->btnh"), (0,), "vision_key", "self_attn.k_proj"),
    "attention/value": ("btd,dnh->btnh", ("btd,dr->btr", "btr,rnh->btnh"), (0,), "vision_value",
                        "self_attn.v_proj"),
    "attention/attention_output": ("btnh,nhd->btd", ("btnh,nhr->btr", "btr,rd->btd"), (0, 1),
                                   "vision_attention_output", "self_attn.out_proj"),
    "mlp/fc1": ("btd,df->btf", ("btd,dr->btr", "btr,rf->btf"), (0,), "vision_fc1", "mlp.fc1"),
    "mlp/fc2": ("btf,fd->btd", ("btf,fr->btr", "btr,rd->btd"), (0,), "vision_fc2", "mlp.fc2"),
}


def linear_nodes(cfg: SigLIPConfig, layers: str = "vision_model.encoder.layers") -> dict[str, LinearNode]:
    """The tower's dense layers as LoRA / quantization nodes, under target names of their own
    (``vision_query``...), so a decoder target such as ``"query"`` never reaches the tower. ``layers`` is the
    transformers prefix of the encoder's layer list."""
    ids = tuple(range(cfg.depth))
    return {t: LinearNode(path=("vision_encoder", "encoder_block", *sub.split("/")), eq=eq, lora_eqs=leq,
                          in_dims=ind, target=t, peft=hf.split(".")[-1], hf_module=hf, layers=layers, layer_ids=ids)
            for sub, (eq, leq, ind, t, hf) in LINEARS.items()}


def _lin(node: Params, x: Array, sub: str) -> Array:
    # Through layers.linear so an int8 node ({"kernel": int8, "scale"}) or one with adapters runs as is.
    eq, leq = LINEARS[sub][:2]
    return linear(node, x, eq, leq) + node["bias"].astype(x.dtype)


def encoder_layer(p: Params, x: Array, cfg: SigLIPConfig) -> Array:
    """Pre-LN transformer layer, bidirectional attention over all patches."""
    h = layer_norm(x, p["layer_norm1"]["scale"], p["layer_norm1"]["bias"], cfg.norm_eps)
    a = p["attention"]
    q = _lin(a["query"], h, "attention/query") * jnp.asarray(cfg.head_dim ** -0.5, h.dtype)
    k = _lin(a["key"], h, "attention/key")
    v = _lin(a["value"], h, "attention/value")
    b, t = x.shape[:2]
    o = dot_attention(q, k, v, jnp.ones((b, t, t), bool))
    x = x + _lin(a["attention_output"], o, "attention/attention_output")
    h = layer_norm(x, p["layer_norm2"]["scale"], p["layer_norm2"]["bias"], cfg.norm_eps)
    h = gelu_tanh(_lin(p["mlp"]["fc1"], h, "mlp/fc1"))
    return x + _lin(p["mlp"]["fc2"], h, "mlp/fc2")


def encode(params: Params, cfg: SigLIPConfig, pixel_values: Array, dtype: Any | None = None) -> Array:
    """Images ``[N, C, H, W]`` (transformers' ``pixel_values``, normalised to [-1, 1]) -> patch features
    ``[N, patches, width]`` after the final LN.

    Patches are flattened (row, column, channel), the order of a ``[p, p, C, width]`` (HWIO) conv kernel, so
    the patch embedding is one matmul.
    """
    v = params["vision_encoder"]
    dtype = dtype or v["patch_embedding"]["kernel"].dtype
    pixel_values = jnp.asarray(pixel_values, dtype)
    n, c = pixel_values.shape[:2]
    g, p = cfg.grid, cfg.patch_size
    if c != cfg.channels or pixel_values.shape[2:] != (cfg.image_size, cfg.image_size):
        raise ValueError(f"pixel_values must be [N, {cfg.channels}, {cfg.image_size}, {cfg.image_size}] "
                         f"(channels first, as transformers), got {tuple(pixel_values.shape)}")
    x = pixel_values.reshape(n, c, g, p, g, p).transpose(0, 2, 4, 3, 5, 1)  # [N, gy, gx, py, px, C]
    x = x.reshape(n, g * g, p * p * c)
    kern = v["patch_embedding"]["kernel"].reshape(p * p * c, cfg.width).astype(dtype)
    x = x @ kern + v["patch_embedding"]["bias"].astype(dtype)
    x = x + v["position_embedding"]["embeddings"].astype(dtype)[None]

    def body(x: Array, lp: Params) -> tuple[Array, None]:
        return encoder_layer(lp, x, cfg), None

    x, _ = jax.lax.scan(body, x, v["encoder_block"])
    return layer_norm(x, v["post_layernorm"]["scale"], v["post_layernorm"]["bias"], cfg.norm_eps)


def hf_table(cfg: SigLIPConfig,
             prefix: str = "vision_tower.vision_model.") -> dict[str, tuple[Any, Callable, Callable]]:
    """gemmax path -> (HF name or per-layer names, HF -> gemmax, gemmax -> HF) for a SiglipVisionModel under
    ``prefix`` (the published PaliGemma checkpoints' ``vision_tower.vision_model.``)."""
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


def keras_table(cfg: SigLIPConfig, prefix: str, block: str) -> dict[str, tuple[Any, Callable, Callable]]:
    """gemmax path -> (H5 dataset or one per layer, Keras -> gemmax, gemmax -> Keras) for keras-hub's ViT under
    ``prefix`` (``layers/pali_gemma_vit/layers/pali_gemma_vit_encoder/``), its encoder layers named after
    ``block``. Keras keeps ``Dense`` kernels ``[in, out]`` with q/k/v heads flattened, and the patch conv
    ``[p, p, channels, width]`` as gemmax does."""
    H, hd, W = cfg.num_heads, cfg.head_dim, cfg.width
    ident = (lambda w: w, lambda w: w)
    qkv = (lambda w: w.reshape(W, H, hd), lambda w: w.reshape(W, H * hd))
    qkv_b = (lambda w: w.reshape(H, hd), lambda w: w.reshape(H * hd))
    out = (lambda w: w.reshape(H, hd, W), lambda w: w.reshape(H * hd, W))
    emb = prefix + "vision_embeddings/"
    t: dict[str, tuple[Any, Callable, Callable]] = {
        PREFIX + "patch_embedding/kernel": (emb + "patch_embedding/vars/0", *ident),
        PREFIX + "patch_embedding/bias": (emb + "patch_embedding/vars/1", *ident),
        PREFIX + "position_embedding/embeddings": (emb + "position_embedding/vars/0", *ident),
        PREFIX + "post_layernorm/scale": (prefix + "encoder_layer_norm/vars/0", *ident),
        PREFIX + "post_layernorm/bias": (prefix + "encoder_layer_norm/vars/1", *ident),
    }
    per: dict[str, tuple[str, Callable, Callable]] = {
        "layer_norm1/scale": ("layer_norm_1/vars/0", *ident), "layer_norm1/bias": ("layer_norm_1/vars/1", *ident),
        "layer_norm2/scale": ("layer_norm_2/vars/0", *ident), "layer_norm2/bias": ("layer_norm_2/vars/1", *ident),
        "mlp/fc1/kernel": ("mlp_dense_1/vars/0", *ident), "mlp/fc1/bias": ("mlp_dense_1/vars/1", *ident),
        "mlp/fc2/kernel": ("mlp_dense_2/vars/0", *ident), "mlp/fc2/bias": ("mlp_dense_2/vars/1", *ident),
        "attention/attention_output/kernel": ("attn/out_proj/vars/0", *out),
        "attention/attention_output/bias": ("attn/out_proj/vars/1", *ident),
    }
    for n in ("query", "key", "value"):
        per[f"attention/{n}/kernel"] = (f"attn/{n}_proj/vars/0", *qkv)
        per[f"attention/{n}/bias"] = (f"attn/{n}_proj/vars/1", *qkv_b)
    blocks = [f"{prefix}resblocks/{block}" + (f"_{i}" if i else "") for i in range(cfg.depth)]
    for sub, (name, f, g) in per.items():
        t[PREFIX + "encoder_block/" + sub] = ([f"{b}/{name}" for b in blocks], f, g)
    return t


#: keras-hub's ViT encoder layer's weighted sub-layers in ``_flatten_layers`` order, and the gemmax linear node
#: of each dense one (``save_lora_weights`` keys adapters by this order).
KERAS_BLOCK_ORDER = ("block", "layer_norm_2", "mlp_dense_2", "mlp_dense_1", "layer_norm_1", "multi_head_attention",
                     "out_proj", "value_proj", "key_proj", "query_proj")
KERAS_LINEARS = {"query_proj": "vision_query", "key_proj": "vision_key", "value_proj": "vision_value",
                 "out_proj": "vision_attention_output", "mlp_dense_1": "vision_fc1", "mlp_dense_2": "vision_fc2"}


def keras_lora_layers(cfg: SigLIPConfig, first: int) -> dict[int, tuple[str, int]]:
    """``{weighted-layer index: (node key, layer)}`` of the encoder layers, the first at ``first``: Keras visits
    them last-created first."""
    out = {}
    for j in range(cfg.depth):
        for k, name in enumerate(KERAS_BLOCK_ORDER):
            if name in KERAS_LINEARS:
                out[first + j * len(KERAS_BLOCK_ORDER) + k] = (KERAS_LINEARS[name], cfg.depth - 1 - j)
    return out
