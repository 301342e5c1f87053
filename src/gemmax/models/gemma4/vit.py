"""Gemma 4's vision tower (transformers' ``Gemma4VisionModel``): a patch encoder for images of any aspect ratio.

Unlike Gemma 3's SigLIP, an image is a *variable* grid of patches, padded to a fixed budget: ``pixel_values``
``[n, P, 3 * p * p]`` (each patch's pixels in ``(row, column, channel)`` order, in [0, 1]) and
``image_position_ids`` ``[n, P, 2]`` (each patch's ``(x, y)`` in the grid, ``(-1, -1)`` on padding), as
``Gemma4ImageProcessor`` writes them. The tower:

- embeds each patch linearly (pixels mapped to [-1, 1] first, no bias) and adds two learned position
  embeddings, one looked up by the patch's column and one by its row (zero on padding);
- runs ``depth`` pre-norm layers shaped like the Gemma 4 text decoder's: RMS norms that multiply by their
  weight as stored, attention with query / key RMS norms (weights), weightless value norm, scale 1 and
  *2-D* RoPE (the first half of each head rotated by the column, the second half by the row, each half as
  rotate-half RoPE at ``rope_theta``), over every real patch in both directions; norms after attention and
  after the gated GELU-tanh MLP. With ``clipped`` (the on-device checkpoints), every linear clamps its input
  and its output to four stored scalars;
- averages ``pool`` x ``pool`` neighbourhoods of patches by their positions (one soft token per
  neighbourhood, row-major over the pooled grid; ``P / pool^2`` slots, of which an image fills
  ``(W / pool) * (H / pool)``), times ``sqrt(width)`` in float32 and, with ``standardize`` (the large
  checkpoints), ``(h - std_bias) * std_scale``.

:func:`encode` returns the pooled features of every slot and which slots are real; the family
(:mod:`gemmax.models.gemma4.vision`) projects the real ones into the decoder.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemmax.models import siglip
from gemmax.nn.layers import activation_fn, apply_rope, dot_attention, linear, rope_sin_cos
from gemmax.nn.params import LinearNode, ParamSpec

Array = jax.Array
Params = dict[str, Any]

PREFIX = "vision_encoder/"
gelu = activation_fn("gelu_tanh")


@dataclass(frozen=True)
class ViTConfig:
    """Shapes of the tower (transformers' ``Gemma4VisionConfig`` defaults: the on-device models' 768-wide
    tower)."""

    width: int = 768
    depth: int = 16
    mlp_dim: int = 3072
    num_heads: int = 12
    num_kv_heads: int = 12
    """Key / value heads (HF ``num_key_value_heads``): ``num_heads`` is a multiple of it, each group of query heads
    sharing one."""
    head_dim: int = 64
    patch_size: int = 16
    pool: int = 3
    """Side of the pooled neighbourhood (HF ``pooling_kernel_size``)."""
    position_table: int = 10240
    """Rows of each of the two position tables (HF ``position_embedding_size``): the largest column / row."""
    rope_theta: float = 100.0
    """Base of the 2-D RoPE (HF ``rope_parameters["rope_theta"]``): each half of a head rotates at it, the first by
    the patch's column, the second by its row."""
    norm_eps: float = 1e-6
    clipped: bool = False
    """Linears clamp their inputs and outputs (HF ``use_clipped_linears``)."""
    standardize: bool = False
    """Pooled features are standardized by a stored bias and scale (HF ``standardize``)."""

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"vision num_heads ({self.num_heads}) must be a multiple of num_key_value_heads "
                             f"({self.num_kv_heads})")
        if self.head_dim % 4:
            raise ValueError(f"vision head_dim ({self.head_dim}) must be a multiple of 4 (2-D RoPE rotates two "
                             "halves)")

    @property
    def patch_pixels(self) -> int:
        return 3 * self.patch_size * self.patch_size


def from_hf_vision_config(hf: dict[str, Any]) -> ViTConfig:
    """From a ``gemma4_vision`` config dict; absent keys take transformers' defaults."""
    if hf.get("attention_bias"):
        raise ValueError("a Gemma 4 vision tower with attention_bias is not supported (no published one has it)")
    act = hf.get("hidden_activation", "gelu_pytorch_tanh")
    if act not in ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new"):
        raise ValueError(f"unsupported Gemma 4 vision activation {act!r} (gelu_pytorch_tanh)")
    rope = hf.get("rope_parameters") or {}
    # The published config.json files write "default"; transformers reads that as the tower's own axial RoPE.
    if rope.get("rope_type", "axial") not in ("axial", "default"):
        raise ValueError(f"unsupported Gemma 4 vision RoPE {rope.get('rope_type')!r} (axial, or default as the "
                         "published configs write it)")
    heads = int(hf.get("num_attention_heads", 12))
    return ViTConfig(
        width=int(hf.get("hidden_size", 768)), depth=int(hf.get("num_hidden_layers", 16)),
        mlp_dim=int(hf.get("intermediate_size", 3072)), num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads", heads)), head_dim=int(hf.get("head_dim", 64)),
        patch_size=int(hf.get("patch_size", 16)), pool=int(hf.get("pooling_kernel_size", 3)),
        position_table=int(hf.get("position_embedding_size", 10240)),
        rope_theta=float(rope.get("rope_theta", 100.0)), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        clipped=bool(hf.get("use_clipped_linears", False)), standardize=bool(hf.get("standardize", False)))


def to_hf_vision_config(cfg: ViTConfig) -> dict[str, Any]:
    return {"model_type": "gemma4_vision", "hidden_size": cfg.width, "num_hidden_layers": cfg.depth,
            "intermediate_size": cfg.mlp_dim, "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "patch_size": cfg.patch_size,
            "pooling_kernel_size": cfg.pool, "position_embedding_size": cfg.position_table,
            "rope_parameters": {"rope_type": "axial", "rope_theta": cfg.rope_theta}, "rms_norm_eps": cfg.norm_eps,
            "use_clipped_linears": cfg.clipped, "standardize": cfg.standardize,
            "hidden_activation": "gelu_pytorch_tanh", "attention_bias": False}


#: The dense layers under ``encoder_block/``: path -> :data:`gemmax.models.siglip.Linear` (einsum, LoRA
#: einsums, kernel input dims, LoRA target, transformers module under ``encoder.layers.{i}``); the attention's
#: are named as SigLIP's.
LINEARS: dict[str, siglip.Linear] = {**siglip.attention_linears("self_attn.o_proj"),
                                     "mlp/gate": (*siglip.TO_MLP, "vision_gate", "mlp.gate_proj"),
                                     "mlp/up": (*siglip.TO_MLP, "vision_up", "mlp.up_proj"),
                                     "mlp/down": (*siglip.FROM_MLP, "vision_down", "mlp.down_proj")}
#: A clipped linear's four bounds, in transformers' buffer names.
CLIP_BOUNDS = ("input_min", "input_max", "output_min", "output_max")


def param_specs(cfg: ViTConfig) -> dict[str, ParamSpec]:
    """Every weight of the tower with its logical axes (heads / kv_heads / mlp shard like the decoder's)."""
    L, W, F, H, K, hd = cfg.depth, cfg.width, cfg.mlp_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    b = PREFIX + "encoder_block/"
    s: dict[str, ParamSpec] = {
        PREFIX + "patch_embedding/kernel": ParamSpec((cfg.patch_pixels, W), ("patch", "vision_embed"),
                                                     fan_in_axis=0),
        PREFIX + "position_embedding/embeddings": ParamSpec((2, cfg.position_table, W),
                                                            (None, "patches", "vision_embed"), "embedding",
                                                            std=1.0 / math.sqrt(W)),
        b + "attention/query/kernel": ParamSpec((L, W, H, hd), ("layers", "vision_embed", "heads", "head_dim"),
                                                fan_in_axis=1),
        b + "attention/key/kernel": ParamSpec((L, W, K, hd), ("layers", "vision_embed", "kv_heads", "head_dim"),
                                              fan_in_axis=1),
        b + "attention/value/kernel": ParamSpec((L, W, K, hd), ("layers", "vision_embed", "kv_heads", "head_dim"),
                                                fan_in_axis=1),
        b + "attention/attention_output/kernel": ParamSpec((L, H, hd, W), ("layers", "heads", "head_dim",
                                                                           "vision_embed"),
                                                           std=1.0 / math.sqrt(H * hd)),
        b + "attention/query_norm/scale": ParamSpec((L, hd), ("layers", "head_dim"), "ones"),
        b + "attention/key_norm/scale": ParamSpec((L, hd), ("layers", "head_dim"), "ones"),
        b + "mlp/gate/kernel": ParamSpec((L, W, F), ("layers", "vision_embed", "mlp"), fan_in_axis=1),
        b + "mlp/up/kernel": ParamSpec((L, W, F), ("layers", "vision_embed", "mlp"), fan_in_axis=1),
        b + "mlp/down/kernel": ParamSpec((L, F, W), ("layers", "mlp", "vision_embed"), fan_in_axis=1),
    }
    for n in ("pre_attention_norm", "post_attention_norm", "pre_ffw_norm", "post_ffw_norm"):
        s[b + f"{n}/scale"] = ParamSpec((L, W), ("layers", "vision_embed"), "ones")
    if cfg.clipped:  # initialised to +-inf by init_params (no clamping) until a checkpoint sets them
        for sub in LINEARS:
            for bound in CLIP_BOUNDS:
                s[b + f"clip/{sub.split('/')[1]}/{bound}"] = ParamSpec((L,), ("layers",), "zeros")
    if cfg.standardize:
        s[PREFIX + "standardize/bias"] = ParamSpec((W,), ("vision_embed",), "zeros")
        s[PREFIX + "standardize/scale"] = ParamSpec((W,), ("vision_embed",), "ones")
    return s


def open_clip_bounds(flat: dict[str, Any]) -> dict[str, Any]:
    """Freshly initialised clip bounds (zeros) set to -inf / +inf: a random tower clamps nothing."""
    out = dict(flat)
    for path, v in flat.items():
        if "/clip/" in path:
            out[path] = jnp.full_like(v, -jnp.inf if path.endswith("_min") else jnp.inf)
    return out


def linear_nodes(cfg: ViTConfig, layers: str = "model.vision_tower.encoder.layers") -> dict[str, LinearNode]:
    """The tower's dense layers as LoRA / quantization nodes under target names of their own (``vision_query``
    ...), so a decoder target such as ``"query"`` never reaches the tower. transformers wraps each in a
    clippable module: the ``nn.Linear`` is ``<module>.linear``. Their PEFT names (``q_proj``...) are the
    decoder's, so a PEFT export names the adapted modules by full path, never the tower's by accident."""
    return siglip.encoder_nodes(LINEARS, cfg.depth, layers, ".linear")


# ---- the forward pass ---------------------------------------------------------------------------------------


def rms_norm(x: Array, scale: Array | None, eps: float) -> Array:
    """transformers' ``Gemma4RMSNorm``: float32, times the weight as stored (none: no weight), cast once."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if scale is not None:
        y = y * scale.astype(jnp.float32)
    return y.astype(x.dtype)


def _lin(p: Params, x: Array, sub: str) -> Array:
    """One linear of a layer, through ``layers.linear`` (int8 or adapters run as they are), clamped on both
    sides when the layer carries clip bounds."""
    name = sub.split("/")[1]
    node = p["attention"][name] if sub.startswith("attention/") else p["mlp"][name]
    bounds = p.get("clip", {}).get(name)
    if bounds is not None:
        x = jnp.clip(x, bounds["input_min"].astype(x.dtype), bounds["input_max"].astype(x.dtype))
    y = linear(node, x, *LINEARS[sub][:2])
    if bounds is not None:
        y = jnp.clip(y, bounds["output_min"].astype(y.dtype), bounds["output_max"].astype(y.dtype))
    return y


def rope_tables(cfg: ViTConfig, positions: Array) -> tuple[tuple[Array, Array], tuple[Array, Array]]:
    """(sin, cos) of the columns and of the rows [n, P, hd/4]: one frequency set over a quarter of the head,
    used by each half of it."""
    half = cfg.head_dim // 2
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, half, 2, dtype=jnp.float32) / half))
    return rope_sin_cos(positions[..., 0], inv), rope_sin_cos(positions[..., 1], inv)


def rope_2d(x: Array, tables: tuple[tuple[Array, Array], tuple[Array, Array]]) -> Array:
    """x [n, P, heads, hd]: the first half of each head rotated by the column, the second by the row."""
    half = x.shape[-1] // 2
    return jnp.concatenate([apply_rope(x[..., :half], None, tables[0]), apply_rope(x[..., half:], None, tables[1])],
                           axis=-1)


def encoder_layer(p: Params, x: Array, cfg: ViTConfig, tables: Any, mask: Array) -> Array:
    """One pre-norm layer over every patch; ``mask`` [n, P, P] lets each patch see the real ones."""
    eps = cfg.norm_eps
    a = p["attention"]
    h = rms_norm(x, p["pre_attention_norm"]["scale"], eps)
    q = rope_2d(rms_norm(_lin(p, h, "attention/query"), a["query_norm"]["scale"], eps), tables)
    k = rope_2d(rms_norm(_lin(p, h, "attention/key"), a["key_norm"]["scale"], eps), tables)
    v = rms_norm(_lin(p, h, "attention/value"), None, eps)
    o = _lin(p, dot_attention(q, k, v, mask), "attention/attention_output")
    x = x + rms_norm(o, p["post_attention_norm"]["scale"], eps)
    h = rms_norm(x, p["pre_ffw_norm"]["scale"], eps)
    m = _lin(p, gelu(_lin(p, h, "mlp/gate")) * _lin(p, h, "mlp/up"), "mlp/down")
    return x + rms_norm(m, p["post_ffw_norm"]["scale"], eps)


def pool_by_position(h: Array, positions: Array, k: int, slots: int) -> tuple[Array, Array]:
    """Average ``k`` x ``k`` neighbourhoods of patches [n, P, W] by their positions -> ([n, slots, W],
    real slots [n, slots]). A patch at (x, y) goes to slot ``x // k + (cols // k) * (y // k)`` where ``cols``
    is the image's patch columns: row-major over the pooled grid. Padding (zeroed) lands on slot 0, which a
    real patch always fills."""
    pos = jnp.maximum(positions, 0)
    cols = pos[..., 0].max(axis=-1, keepdims=True) + 1
    slot = pos[..., 0] // k + (cols // k) * (pos[..., 1] // k)
    onehot = jax.nn.one_hot(slot, slots, dtype=jnp.float32) / (k * k)  # [n, P, slots]
    pooled = jnp.einsum("nps,npw->nsw", onehot, h.astype(jnp.float32)).astype(h.dtype)  # as the reference
    return pooled, (onehot != 0).any(axis=1)


def encode(params: Params, cfg: ViTConfig, pixel_values: Array, positions: Array, dtype: Any) -> tuple[Array, Array]:
    """Patches [n, P, 3 p^2] in [0, 1] and their positions [n, P, 2] -> (pooled features [n, P / pool^2, W] in
    ``dtype``, which slots an image fills [n, P / pool^2])."""
    v = params["vision_encoder"]
    pixel_values = jnp.asarray(pixel_values)
    positions = jnp.asarray(positions, jnp.int32)
    n, P, _ = pixel_values.shape
    pad = (positions == -1).all(-1)
    x = (2.0 * (pixel_values.astype(jnp.float32) - 0.5)).astype(dtype)
    x = linear(v["patch_embedding"], x, "bpc,cd->bpd")
    table = v["position_embedding"]["embeddings"]
    pos = jnp.maximum(positions, 0)
    pe = jnp.take(table[0], pos[..., 0], axis=0) + jnp.take(table[1], pos[..., 1], axis=0)
    x = x + jnp.where(pad[..., None], 0, pe).astype(dtype)
    tables = rope_tables(cfg, positions)
    mask = jnp.broadcast_to(~pad[:, None, :], (n, P, P))

    def body(x: Array, lp: Params) -> tuple[Array, None]:
        return encoder_layer(lp, x, cfg, tables, mask), None

    x, _ = jax.lax.scan(body, x, v["encoder_block"])
    x = jnp.where(pad[..., None], 0, x)
    slots = P // (cfg.pool * cfg.pool)
    if slots == P:
        pooled, real = x, ~pad
    else:
        pooled, real = pool_by_position(x, positions, cfg.pool, slots)
    pooled = pooled.astype(jnp.float32) * math.sqrt(cfg.width)  # float32: the scale can pass float16's range
    if cfg.standardize:
        std = v["standardize"]
        pooled = (pooled - std["bias"].astype(jnp.float32)) * std["scale"].astype(jnp.float32)
    return pooled.astype(dtype), real


def soft_token_counts(cfg: ViTConfig, positions: np.ndarray) -> list[int]:
    """Soft tokens each image fills (host side, from ``image_position_ids`` [n, P, 2]): its distinct pooled
    slots, as :func:`pool_by_position` places them."""
    out = []
    k = cfg.pool
    for pos in np.asarray(positions):
        real = pos[(pos != -1).any(-1)]
        if len(real) == 0:
            out.append(0)
            continue
        slots = pos.shape[0] // (k * k)
        if slots == pos.shape[0]:
            out.append(len(real))
            continue
        cols = int(real[:, 0].max()) + 1
        out.append(len({int(x) // k + (cols // k) * (int(y) // k) for x, y in real}))
    return out


# ---- Hugging Face names ----------------------------------------------------------------------------------


def hf_table(cfg: ViTConfig, prefix: str = "model.vision_tower.") -> dict[str, tuple[Any, Callable, Callable]]:
    """gemmax path -> (HF name or per-layer names, HF -> gemmax, gemmax -> HF) for ``Gemma4VisionModel`` under
    ``prefix`` (the published checkpoints' ``model.vision_tower.``)."""
    W, H, K, hd = cfg.width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    ident = (lambda w: w, lambda w: w)
    tr = (lambda w: w.T, lambda w: w.T)

    def heads_out(n: int) -> tuple[Callable, Callable]:  # [n*hd, W] -> [W, n, hd]
        return (lambda w: w.T.reshape(W, n, hd), lambda w: w.reshape(W, n * hd).T)

    out = (lambda w: w.T.reshape(H, hd, W), lambda w: w.reshape(H * hd, W).T)
    scalar = (lambda w: w.reshape(()), lambda w: w.reshape(()))
    t: dict[str, tuple[Any, Callable, Callable]] = {
        PREFIX + "patch_embedding/kernel": (prefix + "patch_embedder.input_proj.weight", *tr),
        PREFIX + "position_embedding/embeddings": (prefix + "patch_embedder.position_embedding_table", *ident),
    }

    def norm(module: str) -> tuple[str, Callable, Callable]:
        return (f"{module}.weight", *ident)

    def dense(sub: str, layout: tuple[Callable, Callable] = tr) -> tuple[str, Callable, Callable]:
        # the kernel of a LINEARS layer: its transformers module wraps the nn.Linear as ``<module>.linear``
        return (f"{LINEARS[sub][4]}.linear.weight", *layout)

    per: dict[str, tuple[str, Callable, Callable]] = {
        "pre_attention_norm/scale": norm("input_layernorm"),
        "post_attention_norm/scale": norm("post_attention_layernorm"),
        "pre_ffw_norm/scale": norm("pre_feedforward_layernorm"),
        "post_ffw_norm/scale": norm("post_feedforward_layernorm"),
        "attention/query/kernel": dense("attention/query", heads_out(H)),
        "attention/key/kernel": dense("attention/key", heads_out(K)),
        "attention/value/kernel": dense("attention/value", heads_out(K)),
        "attention/attention_output/kernel": dense("attention/attention_output", out),
        "attention/query_norm/scale": norm("self_attn.q_norm"),
        "attention/key_norm/scale": norm("self_attn.k_norm"),
        "mlp/gate/kernel": dense("mlp/gate"),
        "mlp/up/kernel": dense("mlp/up"),
        "mlp/down/kernel": dense("mlp/down"),
    }
    if cfg.clipped:
        for sub, (*_, hf) in LINEARS.items():
            for bound in CLIP_BOUNDS:
                per[f"clip/{sub.split('/')[1]}/{bound}"] = (f"{hf}.{bound}", *scalar)
    for path, (name, f, g) in per.items():
        t[PREFIX + "encoder_block/" + path] = ([f"{prefix}encoder.layers.{i}.{name}" for i in range(cfg.depth)], f, g)
    if cfg.standardize:
        t[PREFIX + "standardize/bias"] = (prefix + "std_bias", *ident)
        t[PREFIX + "standardize/scale"] = (prefix + "std_scale", *ident)
    return t
