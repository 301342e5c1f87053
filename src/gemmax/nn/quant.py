"""Weight-only quantization as a pytree transform.

Two representations:

* **Per-output-channel** (``int8``, and ``int4`` without groups): the node becomes
  ``{"kernel": int8|int4 [..], "scale": float [L, out...]}``. The scale has the shape of the linear's output
  trailing dims, so ``gemmax.nn.layers.linear`` computes ``einsum(x, kernel) * scale`` with no change, the
  embedding gets a per-row scale ``[V]`` (``model.embed`` / ``logits_from_hidden`` apply it), and the forward
  never holds a dequantized copy of a weight. Symmetric: ``scale = max|w| / 127`` (``/ 7`` for int4) over
  the kernel's input dims.
* **Grouped** (``int4``/``nf4`` with ``group_size``, QLoRA-style): the last input axis is cut into groups
  of ``group_size`` with one absmax scale each: ``{"qkernel": int4|uint4 [.., n_groups, group_size, ..],
  "qscale": float [.., n_groups, 1, ..]}``. Finer scales are what make 4 bits usable, but ``layers.linear``
  cannot apply a scale that varies along the contracted axis, so these nodes go through
  ``dequantize_params(..., grouped_only=True)`` before the forward (see docs/lora_quant.md for the small
  ``layers.linear`` hook that would dequantize one layer at a time inside the scan instead).

NF4 codes (``uint4``) index the NormalFloat-4 table: the 16 levels are quantiles of a standard normal
(so a normally distributed group is coded with equal-probability bins), scaled by the group's absmax.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemmax.models.gemma.config import ModelConfig
from gemmax.models.gemma.model import KERNEL_IN_DIMS, LINEAR_EQS, LINEAR_NODE_PATHS

Array = jax.Array
Params = dict[str, Any]

MODES = ("int8", "int4", "nf4")
LORA_KEYS = ("lora_a", "lora_b", "lora_scale")

#: Path of each linear node in the parameter tree (one table, in gemmax.models.gemma.model).
LINEAR_PATHS = LINEAR_NODE_PATHS


def _nf4_table() -> np.ndarray:
    """The NormalFloat-4 levels, derived rather than hard-coded: 8 positive and 7 negative standard-normal
    quantiles at evenly spaced probabilities (outer probability 0.9677, i.e. (1 - 1/(2*15) + 1 - 1/(2*16))/2),
    plus an exact zero, normalised to [-1, 1]. Asymmetric so that zero is representable."""
    from scipy.special import ndtri

    offset = 0.9677083
    pos = ndtri(np.linspace(offset, 0.5, 9)[:-1])
    neg = -ndtri(np.linspace(offset, 0.5, 8)[:-1])
    v = np.sort(np.concatenate([pos, [0.0], neg]))
    return (v / np.abs(v).max()).astype(np.float32)


NF4_TABLE = _nf4_table()


def in_axes_from_eq(eq: str) -> tuple[int, ...]:
    """Input axes of a linear's kernel from its einsum (the kernel letters the activation also has).

    ``"btd,ndh->btnh"`` -> ``(1,)``. Lets ``layers.linear`` dequantize a grouped node without knowing its name.
    """
    lhs = eq.split("->")[0]
    x_sub, k_sub = lhs.split(",")
    return tuple(i for i, c in enumerate(k_sub) if c in x_sub)


def stacked_in_axes(name: str) -> tuple[int, ...]:
    """Input axes of a stacked decoder kernel (layer axis first), or of the embedding / LM head."""
    if name == "embedding":
        return (1,)  # [V, D]: one scale per row (token)
    if name == "lm_head":
        return (0,)  # [D, V]: one scale per vocabulary column
    return tuple(1 + i for i in KERNEL_IN_DIMS[name])


# ---- quantize / dequantize one kernel ----------------------------------------------------------------


def _expand(scale: Array, in_axes: tuple[int, ...], ndim: int) -> Array:
    """Per-output-channel scale -> broadcastable against the kernel (singleton input axes re-inserted)."""
    shape = list(scale.shape)
    for ax in sorted(in_axes):
        shape.insert(ax, 1)
    assert len(shape) == ndim
    return scale.reshape(shape)


def quantize_kernel(w: Array, in_axes: tuple[int, ...], mode: str = "int8", group_size: int | None = None,
                    scale_dtype: Any = jnp.float32) -> Params:
    """Quantize one kernel; ``in_axes`` are its contracted axes. Returns the node's quantized keys."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; use one of {MODES}")
    w = jnp.asarray(w, jnp.float32)
    if mode == "nf4" and group_size is None:
        group_size = 64
    if group_size is None:
        qmax = 127.0 if mode == "int8" else 7.0
        amax = jnp.max(jnp.abs(w), axis=in_axes)
        scale = jnp.where(amax > 0, amax / qmax, 1.0)
        q = jnp.clip(jnp.round(w / _expand(scale, in_axes, w.ndim)), -qmax, qmax)
        return {"kernel": q.astype(jnp.int8 if mode == "int8" else jnp.int4), "scale": scale.astype(scale_dtype)}
    ax = max(in_axes)  # group along the last input axis
    n = w.shape[ax]
    # An axis shorter than a group (a small head_dim under attention_output) is one group.
    group_size = min(group_size, n)
    if n % group_size:
        raise ValueError(f"group_size {group_size} does not divide the input axis of length {n} "
                         f"(kernel shape {tuple(w.shape)})")
    wg = w.reshape(*w.shape[:ax], n // group_size, group_size, *w.shape[ax + 1:])
    amax = jnp.max(jnp.abs(wg), axis=ax + 1, keepdims=True)
    if mode == "nf4":
        scale = jnp.where(amax > 0, amax, 1.0)
        table = jnp.asarray(NF4_TABLE)
        mid = (table[1:] + table[:-1]) / 2
        q = jnp.searchsorted(mid, wg / scale).astype(jnp.uint4)
    else:
        qmax = 127.0 if mode == "int8" else 7.0
        scale = jnp.where(amax > 0, amax / qmax, 1.0)
        q = jnp.clip(jnp.round(wg / scale), -qmax, qmax).astype(jnp.int8 if mode == "int8" else jnp.int4)
    return {"qkernel": q, "qscale": scale.astype(scale_dtype)}


def dequantize_kernel(node: Params, in_axes: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
    """Float kernel of a quantized node (either representation); a float node's kernel is returned cast."""
    if "qkernel" in node:
        q, s = node["qkernel"], node["qscale"].astype(jnp.float32)
        vals = jnp.asarray(NF4_TABLE)[q.astype(jnp.int32)] if q.dtype == jnp.uint4 else q.astype(jnp.float32)
        wg = vals * s
        ax = max(in_axes)
        shape = (*wg.shape[:ax], wg.shape[ax] * wg.shape[ax + 1], *wg.shape[ax + 2:])
        return wg.reshape(shape).astype(dtype)
    w = node.get("kernel", node.get("embeddings"))
    if "scale" not in node:
        return jnp.asarray(w).astype(dtype)
    s = node["scale"].astype(jnp.float32)
    return (w.astype(jnp.float32) * _expand(s, in_axes, w.ndim)).astype(dtype)


def dequantize_node(node: Params, name: str, dtype: Any = jnp.float32) -> Array:
    """Float kernel of the named stacked node (a decoder linear name, "embedding" or "lm_head")."""
    return dequantize_kernel(node, stacked_in_axes(name), dtype)


def is_quantized(node: Any) -> bool:
    """Whether a weight node holds a quantized kernel/embedding (norm nodes, whose "scale" is a weight, never)."""
    if not isinstance(node, dict):
        return False
    if "qkernel" in node:
        return True
    w = node.get("kernel", node.get("embeddings"))
    return w is not None and "scale" in node and not jnp.issubdtype(w.dtype, jnp.floating)


# ---- whole trees -------------------------------------------------------------------------------------


def _get(params: Params, path: tuple[str, ...]) -> Params:
    node: Any = params
    for k in path:
        node = node[k]
    return node


def _set(params: Params, path: tuple[str, ...], new: Params) -> Params:
    if not path:
        return new
    out = dict(params)
    out[path[0]] = _set(params[path[0]], path[1:], new)
    return out


def quantize_params(params: Params, config: ModelConfig, mode: str = "int8", group_size: int | None = None,
                    targets: Iterable[str] | None = None, embedding: bool = True, embedding_mode: str = "int8",
                    scale_dtype: Any = jnp.float32) -> Params:
    """Quantize every decoder kernel (or ``targets``) and, with ``embedding``, the token embedding
    (per-row, ``embedding_mode`` "int8" or "int4") and an untied LM head (per vocab column, int8).

    ``mode``: "int8" (per-output-channel, default), "int4" (per-channel, or grouped with ``group_size``),
    "nf4" (grouped, ``group_size`` default 64). Norm scales stay floating point (tiny, and sensitive).
    Adapters already on a node are kept, so ``quantize_params(add_lora(p))`` and
    ``add_lora(quantize_params(p))`` both give a QLoRA tree.
    """
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; use one of {MODES}")
    if mode == "nf4" and group_size is None:
        group_size = 64
    names = tuple(LINEAR_EQS) if targets is None else tuple(targets)
    for name in names:
        if name not in LINEAR_PATHS:
            raise ValueError(f"unknown quantization target {name!r}; known: {', '.join(LINEAR_PATHS)}")
        node = _get(params, LINEAR_PATHS[name])
        if is_quantized(node):
            raise ValueError(f"{'/'.join(LINEAR_PATHS[name])} is already quantized")
        q = quantize_kernel(node["kernel"], stacked_in_axes(name), mode, group_size, scale_dtype)
        extra = {k: v for k, v in node.items() if k in LORA_KEYS}
        params = _set(params, LINEAR_PATHS[name], {**q, **extra})
    if embedding:
        if embedding_mode not in ("int8", "int4"):
            raise ValueError("embedding_mode must be 'int8' or 'int4' (model.embed applies per-row scales only)")
        node = params["token_embedding"]
        if not is_quantized(node):
            q = quantize_kernel(node["embeddings"], stacked_in_axes("embedding"), embedding_mode, None, scale_dtype)
            params = _set(params, ("token_embedding",), {"embeddings": q["kernel"], "scale": q["scale"]})
        if not config.tie_embeddings and "lm_head" in params and not is_quantized(params["lm_head"]):
            q = quantize_kernel(params["lm_head"]["kernel"], stacked_in_axes("lm_head"), "int8", None, scale_dtype)
            params = _set(params, ("lm_head",), q)
    return params


def dequantize_params(params: Params, dtype: Any = jnp.float32, grouped_only: bool = False) -> Params:
    """Float params back from a quantized tree (adapters kept).

    ``grouped_only=True`` expands only grouped nodes (which ``layers.linear`` cannot apply) and leaves
    per-channel int8/int4 nodes as they are: the pre-step to run a grouped int4/NF4 tree through
    ``model.forward``. Call it inside the jitted function so the float copy is a transient of the step.
    """
    for name, path in LINEAR_PATHS.items():
        node = _get(params, path)
        if not is_quantized(node) or (grouped_only and "qkernel" not in node):
            continue
        extra = {k: v for k, v in node.items() if k in LORA_KEYS}
        params = _set(params, path, {"kernel": dequantize_node(node, name, dtype), **extra})
    if not grouped_only:
        node = params["token_embedding"]
        if is_quantized(node):
            params = _set(params, ("token_embedding",), {"embeddings": dequantize_node(node, "embedding", dtype)})
        if "lm_head" in params and is_quantized(params["lm_head"]):
            params = _set(params, ("lm_head",), {"kernel": dequantize_node(params["lm_head"], "lm_head", dtype)})
    return params


# ---- memory accounting -----------------------------------------------------------------------------


def _nbytes(leaf: Any) -> float:
    dt = jnp.dtype(leaf.dtype)
    bits = 4 if dt in (jnp.dtype(jnp.int4), jnp.dtype(jnp.uint4)) else dt.itemsize * 8
    return int(np.prod(leaf.shape)) * bits / 8


def quantized_bytes(params: Params, baseline_dtype: Any = jnp.bfloat16) -> dict[str, float]:
    """Storage of the tree vs the same tree with every quantized weight held in ``baseline_dtype``.

    4-bit arrays count half a byte per element (their packed size; XLA on CPU may hold them unpacked).
    Everything not quantized (norms, adapters) counts at its real size in both figures, so ``saved`` is
    what quantization alone buys. Works on ``jax.ShapeDtypeStruct`` trees too (``estimate_bytes``).
    """
    base_item = jnp.dtype(baseline_dtype).itemsize
    actual = baseline = 0.0

    def walk(node: Any) -> None:
        nonlocal actual, baseline
        if not isinstance(node, dict):
            actual += _nbytes(node)
            baseline += _nbytes(node)
            return
        if is_quantized(node):
            for k, v in node.items():
                actual += _nbytes(v)
                if k in ("kernel", "embeddings", "qkernel"):
                    baseline += int(np.prod(v.shape)) * base_item
                elif k in LORA_KEYS:
                    baseline += _nbytes(v)
            return
        for v in node.values():
            walk(v)

    walk(params)
    return {"bytes": actual, "baseline_bytes": baseline, "saved_bytes": baseline - actual,
            "saved_fraction": (baseline - actual) / baseline if baseline else 0.0}


def estimate_bytes(config: ModelConfig, mode: str | None = "int8", group_size: int | None = None,
                   dtype: Any = jnp.bfloat16, lora_rank: int | None = None,
                   lora_targets: Iterable[str] = ("query", "value"), lora_dtype: Any = jnp.bfloat16,
                   embedding: bool = True) -> dict[str, float]:
    """``quantized_bytes`` of a preset computed from shapes only (``jax.eval_shape``: no weights made).

    ``mode=None`` gives the unquantized tree in ``dtype``; ``lora_rank`` adds adapters (QLoRA when a mode
    is set). Used for the figures in docs/lora_quant.md.
    """
    from gemmax.models.gemma.model import init_params
    from gemmax.nn.lora import add_lora

    def build(key: Array) -> Params:
        p = init_params(config, key, dtype)
        if mode is not None:
            p = quantize_params(p, config, mode, group_size, embedding=embedding)
        if lora_rank:
            p = add_lora(p, config, lora_rank, targets=lora_targets, dtype=lora_dtype)
        return p

    abstract = jax.eval_shape(build, jax.random.key(0))
    return quantized_bytes(abstract, dtype)


__all__ = [
    "NF4_TABLE", "dequantize_kernel", "dequantize_node", "dequantize_params", "estimate_bytes",
    "in_axes_from_eq", "is_quantized", "quantize_kernel", "quantize_params", "quantized_bytes",
]
