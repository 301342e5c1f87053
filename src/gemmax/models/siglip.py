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
    """Side of the square input image in pixels: the published PaliGemma towers take 224, 448 or 896 px, Gemma
    3's 896 px."""
    patch_size: int = 14
    width: int = 1152
    """The residual stream (HF ``hidden_size``): the width of every patch's features, which the family's
    projector maps into the decoder."""
    depth: int = 27
    """Encoder layers (HF ``num_hidden_layers``)."""
    mlp_dim: int = 4304
    """The MLP's hidden width (HF ``intermediate_size``)."""
    num_heads: int = 16
    """Attention heads (HF ``num_attention_heads``), each ``width // num_heads`` wide."""
    channels: int = 3
    """Colour channels of the input (HF ``num_channels``)."""
    norm_eps: float = 1e-6
    """Epsilon of the layer norms (HF ``layer_norm_eps``)."""

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


#: A vision encoder layer's dense layer: (einsum, LoRA einsums, kernel input dims of one layer, LoRA target
#: name, transformers module under ``encoder.layers.{i}``).
Linear = tuple[str, tuple[str, str], tuple[int, ...], str, str]
#: The einsum, LoRA einsums and kernel input dims of the dense layers a ViT layer has, by what they map: the
#: width to heads (query, key, value), heads to the width (the attention output), the width to the MLP and back.
TO_HEADS = ("btd,dnh->btnh", ("btd,dr->btr", "btr,rnh->btnh"), (0,))
FROM_HEADS = ("btnh,nhd->btd", ("btnh,nhr->btr", "btr,rd->btd"), (0, 1))
TO_MLP = ("btd,df->btf", ("btd,dr->btr", "btr,rf->btf"), (0,))
FROM_MLP = ("btf,fd->btd", ("btf,fr->btr", "btr,rd->btd"), (0,))


def attention_linears(output_module: str) -> dict[str, Linear]:
    """The attention's dense layers under ``encoder_block/``, as SigLIP and Gemma 4's tower both name them
    (``vision_query``..., transformers' ``self_attn.q_proj``...); the output projection's transformers
    module is ``output_module``."""
    qkv = {f"attention/{n}": (*TO_HEADS, f"vision_{n}", f"self_attn.{n[0]}_proj") for n in ("query", "key", "value")}
    return {**qkv, "attention/attention_output": (*FROM_HEADS, "vision_attention_output", output_module)}


#: The encoder's dense layers: path under ``encoder_block/`` -> :data:`Linear`.
LINEARS: dict[str, Linear] = {**attention_linears("self_attn.out_proj"),
                              "mlp/fc1": (*TO_MLP, "vision_fc1", "mlp.fc1"),
                              "mlp/fc2": (*FROM_MLP, "vision_fc2", "mlp.fc2")}


def encoder_nodes(linears: dict[str, Linear], depth: int, layers: str,
                  module_suffix: str = "") -> dict[str, LinearNode]:
    """A vision encoder's dense layers (``linears``, stacked over ``depth`` layers) as LoRA / quantization
    nodes under their own target names; ``layers`` is the transformers prefix of the encoder's layer list,
    ``module_suffix`` what follows a module's name to reach its ``nn.Linear``."""
    ids = tuple(range(depth))
    return {t: LinearNode(path=("vision_encoder", "encoder_block", *sub.split("/")), eq=eq, lora_eqs=leq,
                          in_dims=ind, target=t, peft=hf.split(".")[-1], hf_module=hf + module_suffix,
                          layers=layers, layer_ids=ids)
            for sub, (eq, leq, ind, t, hf) in linears.items()}


def linear_nodes(cfg: SigLIPConfig, layers: str = "vision_model.encoder.layers") -> dict[str, LinearNode]:
    """The tower's dense layers as LoRA / quantization nodes, under target names of their own
    (``vision_query``...), so a decoder target such as ``"query"`` never reaches the tower. ``layers`` is the
    transformers prefix of the encoder's layer list."""
    return encoder_nodes(LINEARS, cfg.depth, layers)


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
    names = {"patch_embedding": prefix + "embeddings.patch_embedding",
             "position_embedding": prefix + "embeddings.position_embedding",
             "post_layernorm": prefix + "post_layernorm",
             "encoder_block/layer_norm1": "layer_norm1", "encoder_block/layer_norm2": "layer_norm2",
             **{"encoder_block/" + sub: hf for sub, (*_, hf) in LINEARS.items()}}
    layers = [f"{prefix}encoder.layers.{i}." for i in range(cfg.depth)]
    return _table(cfg, names, layers, (".weight", ".bias"), torch=True)


def keras_table(cfg: SigLIPConfig, prefix: str, block: str) -> dict[str, tuple[Any, Callable, Callable]]:
    """gemmax path -> (H5 dataset or one per layer, Keras -> gemmax, gemmax -> Keras) for keras-hub's ViT under
    ``prefix`` (``layers/pali_gemma_vit/layers/pali_gemma_vit_encoder/``), its encoder layers named after
    ``block``. Keras keeps ``Dense`` kernels ``[in, out]`` with q/k/v heads flattened, and the patch conv
    ``[p, p, channels, width]`` as gemmax does."""
    emb = prefix + "vision_embeddings/"
    names = {"patch_embedding": emb + "patch_embedding", "position_embedding": emb + "position_embedding",
             "post_layernorm": prefix + "encoder_layer_norm", "encoder_block/layer_norm1": "layer_norm_1",
             "encoder_block/layer_norm2": "layer_norm_2", "encoder_block/mlp/fc1": "mlp_dense_1",
             "encoder_block/mlp/fc2": "mlp_dense_2", "encoder_block/attention/attention_output": "attn/out_proj",
             **{f"encoder_block/attention/{n}": f"attn/{n}_proj" for n in ("query", "key", "value")}}
    layers = [f"{prefix}resblocks/{block}" + (f"_{i}" if i else "") + "/" for i in range(cfg.depth)]
    return _table(cfg, names, layers, ("/vars/0", "/vars/1"), torch=False)


def _table(cfg: SigLIPConfig, names: dict[str, str], layers: list[str], suffixes: tuple[str, str],
           torch: bool) -> dict[str, tuple[Any, Callable, Callable]]:
    """gemmax path -> (name, or one per layer; to gemmax; from gemmax) for a checkpoint that names each module
    by ``names`` (the encoder layers' modules, under ``encoder_block/``, within a layer whose names start with
    one of ``layers``) and a module's tensors (its kernel, scale or embeddings, then its bias) by ``suffixes``.
    Its q/k/v heads are flattened; ``torch`` layouts are PyTorch's (transformers': linear kernels ``[out, in]``,
    the patch conv ``[out, in, kh, kw]``), the others gemmax's (keras-hub's)."""
    H, hd, W = cfg.num_heads, cfg.head_dim, cfg.width
    t = (lambda w: w.T) if torch else (lambda w: w)
    ident = (lambda w: w, lambda w: w)
    conv = (lambda w: w.transpose(2, 3, 1, 0), lambda w: w.transpose(3, 2, 0, 1)) if torch else ident
    heads_in = (lambda w: t(w).reshape(W, H, hd), lambda w: t(w.reshape(W, H * hd)))
    heads_out = (lambda w: t(w).reshape(H, hd, W), lambda w: t(w.reshape(H * hd, W)))
    heads_bias = (lambda w: w.reshape(H, hd), lambda w: w.reshape(H * hd))
    # module -> (its first tensor, that tensor's layouts, the bias's; None: no bias)
    layouts = {"patch_embedding": ("kernel", conv, ident), "position_embedding": ("embeddings", ident, None),
               "post_layernorm": ("scale", ident, ident),
               "encoder_block/layer_norm1": ("scale", ident, ident),
               "encoder_block/layer_norm2": ("scale", ident, ident),
               "encoder_block/mlp/fc1": ("kernel", (t, t), ident), "encoder_block/mlp/fc2": ("kernel", (t, t), ident),
               "encoder_block/attention/attention_output": ("kernel", heads_out, ident),
               **{f"encoder_block/attention/{n}": ("kernel", heads_in, heads_bias) for n in ("query", "key", "value")}}
    out: dict[str, tuple[Any, Callable, Callable]] = {}
    for module, (first, first_layout, bias_layout) in layouts.items():
        for tensor, suffix, layout in ((first, suffixes[0], first_layout), ("bias", suffixes[1], bias_layout)):
            if layout is not None:
                name = names[module] + suffix
                per_layer = module.startswith("encoder_block/")
                out[f"{PREFIX}{module}/{tensor}"] = ([p + name for p in layers] if per_layer else name, *layout)
    return out


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
