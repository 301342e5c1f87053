"""Parameter trees and the declarations every family makes about its weights.

Params are nested dicts of arrays; a weight's *path* is its keys joined with ``/``. Layout-map regexes,
LoRA targets, checkpoints and the summary all speak these paths, so they are the one naming of a model.

Two declarations drive everything model-independent:

- :class:`ParamSpec` per weight: shape, logical axes (``"layers"``, ``"vocab"``, ``"embed"``, ``"heads"``,
  ``"kv_heads"``, ``"head_dim"``, ``"mlp"``, ...) and initialiser. Random init, abstract shapes, the default
  sharding (logical axes -> mesh axes) and the summary are computed from it.
- :class:`LinearNode` per linear layer: where the node sits, its einsum, which kernel axes are inputs, and its
  name in transformers / PEFT. LoRA and quantization walk these nodes, so neither knows any model.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Params = dict[str, Any]


@dataclass(frozen=True)
class ParamSpec:
    """One weight, declared once: shape, logical axes and how to initialise it.

    ``init``: ``"normal"`` (std 1/sqrt(fan_in), fan-in read at ``fan_in_axis``), ``"embedding"``
    (std ``std``), ``"zeros"`` or ``"ones"``. ``std`` overrides the normal's standard deviation.
    """

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    init: str = "normal"
    fan_in_axis: int | None = None
    std: float | None = None

    @property
    def size(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1


@dataclass(frozen=True)
class LinearNode:
    """A linear layer ``{"kernel": W, ...}`` as LoRA, quantization and the PEFT/HF exports see it.

    ``path``: keys from the root to the node. ``eq``: the einsum ``x, W -> y`` of one layer's kernel (no layer
    axis); ``lora_eqs``: ``(x, A -> h, h, B -> y)``. ``in_dims``: axes of one layer's kernel that are inputs
    (the rest are outputs). ``stacked``: the kernel carries a leading layer axis. ``target``: the LoRA target
    name users write (``"query"``); ``peft``: the transformers module name (``"q_proj"``); ``hf_module``: the
    module path under one layer in transformers (``"self_attn.q_proj"``), with ``layers`` the transformers
    prefix of the layer list and ``layer_ids`` which transformers layer each stacked entry is.
    """

    path: tuple[str, ...]
    eq: str
    lora_eqs: tuple[str, str]
    in_dims: tuple[int, ...]
    target: str
    peft: str
    hf_module: str
    layers: str = "model.layers"
    layer_ids: tuple[int, ...] = ()
    stacked: bool = True

    @property
    def key(self) -> str:
        return "/".join(self.path)


def flatten(tree: Params, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a/b/c": leaf}."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, path + "/"))
        else:
            out[path] = v
    return out


def unflatten(flat: dict[str, Any]) -> Params:
    """{"a/b/c": leaf} -> nested dict."""
    tree: Params = {}
    for path, v in flat.items():
        node = tree
        *parents, last = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = v
    return tree


def get_node(params: Params, path: tuple[str, ...]) -> Any:
    node: Any = params
    for k in path:
        node = node[k]
    return node


def has_node(params: Params, path: tuple[str, ...]) -> bool:
    node: Any = params
    for k in path:
        if not isinstance(node, dict) or k not in node:
            return False
        node = node[k]
    return True


def set_node(params: Params, path: tuple[str, ...], new: Any) -> Params:
    """Functional update: copies the dicts along the path, shares every other leaf."""

    def rec(tree: Params, depth: int) -> Params:
        out = dict(tree)
        out[path[depth]] = new if depth == len(path) - 1 else rec(tree[path[depth]], depth + 1)
        return out

    return rec(params, 0)


#: Arrays up to this many elements are drawn as the head of a flat draw at a power-of-two length (one compiled
#: sampler per length class, shared by every shape in it); larger ones directly, where the draw itself costs more
#: than its compilation.
_BUCKETED_MAX = 1 << 22


@functools.partial(jax.jit, static_argnums=1)
def _flat_normal(key: Array, n: int) -> Array:
    return jax.random.normal(key, (n,), jnp.float32)


def _normal(key: Array, shape: tuple[int, ...]) -> Any:
    """``jax.random.normal(key, shape, float32)``, bit for bit, compiled once per power-of-two length.

    With threefry's partitionable bits (JAX's default) element i of a draw depends only on the key and i, so a
    small array is the head of a flat draw of any greater length. An eager ``init_params`` of a tiny model
    otherwise compiled one sampler per weight shape (~0.2 s each, seconds per model). Under a trace
    (``CausalLM.from_config``'s jitted init, an init with sharded outputs), for large arrays or another PRNG,
    the direct draw."""
    n = math.prod(shape)
    if (isinstance(key, jax.core.Tracer) or n > _BUCKETED_MAX or not jax.config.jax_threefry_partitionable
            or str(jax.random.key_impl(key)) != "threefry2x32"):
        return jax.random.normal(key, shape, jnp.float32)
    return np.asarray(_flat_normal(key, 1 << max(n - 1, 0).bit_length()))[:n].reshape(shape)


def init_from_specs(specs: dict[str, ParamSpec], key: Array, dtype: Any = jnp.float32) -> Params:
    """Random weights for every declared spec: normals scaled by 1/sqrt(fan-in), norms at identity."""
    keys = jax.random.split(key, len(specs))
    dtype = jnp.dtype(dtype)
    flat = {}
    for k, (path, s) in zip(keys, sorted(specs.items()), strict=True):
        if s.init == "zeros":
            flat[path] = jnp.zeros(s.shape, dtype)
        elif s.init == "ones":
            flat[path] = jnp.ones(s.shape, dtype)
        else:
            if s.std is not None:
                std = s.std
            elif s.init == "embedding":
                std = 0.02
            else:
                ax = s.fan_in_axis if s.fan_in_axis is not None else (1 if len(s.shape) > 1 else 0)
                std = 1.0 / math.sqrt(s.shape[ax]) if s.shape else 1.0
            # float32 product, one rounding to ``dtype``: the same on the host (NumPy, ml_dtypes) as in XLA
            flat[path] = jnp.asarray((_normal(k, s.shape) * np.float32(std)).astype(dtype))
    return unflatten(flat)


def abstract_from_specs(specs: dict[str, ParamSpec], dtype: Any = jnp.float32) -> Params:
    """ShapeDtypeStructs of every declared weight: shard plans and sizes with no memory used."""
    return unflatten({p: jax.ShapeDtypeStruct(s.shape, dtype) for p, s in specs.items()})


def describe_size(n: int) -> str:
    """A parameter count as people say it: 268M, 2.6B."""
    for unit, k in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= k:
            return f"{n / k:.{1 if n / k < 100 else 0}f}{unit}"
    return str(n)
