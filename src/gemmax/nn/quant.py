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

import itertools
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemmax.nn.params import LinearNode, get_node, has_node, set_node

Array = jax.Array
Params = dict[str, Any]
Nodes = Mapping[str, LinearNode]

MODES = ("int8", "int4", "nf4")
LORA_KEYS = ("lora_a", "lora_b", "lora_scale")
#: Keys that hold a linear's weight in one of the representations; every other key of a node is kept.
WEIGHT_KEYS = ("kernel", "scale", "qkernel", "qscale")


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


def check_nodes(nodes: Any) -> Nodes:
    """``nodes`` as the walks need it: ``{name: LinearNode}`` (``family.linear_nodes(cfg)``). A config passed
    where the nodes go (the signature before families) fails here with a message, not deep inside."""
    if not isinstance(nodes, Mapping) or not all(isinstance(n, LinearNode) for n in nodes.values()):
        raise TypeError(f"expected the model's linear nodes ({{name: LinearNode}}, family.linear_nodes(cfg)), "
                        f"got {type(nodes).__name__}")
    return nodes


def kernel_in_axes(node: LinearNode) -> tuple[int, ...]:
    """Input axes of a linear node's whole kernel (after the layer axis when it is stacked)."""
    return tuple(i + int(node.stacked) for i in node.in_dims)


#: Input axes of the embedding ``[V, D]`` (one scale per row, i.e. per token) and of an untied LM head
#: ``[D, V]`` (one scale per vocabulary column).
EMBEDDING_IN_AXES = (1,)
HEAD_IN_AXES = (0,)


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


def infer_in_axes(node: Params, where: str = "") -> tuple[int, ...]:
    """Input axes of a quantized node read off its shapes, for callers with no declaration at hand: a
    per-channel scale has the kernel's shape less its input axes; a grouped ``qscale`` is 1 on the group axis
    (only the last input axis is returned then, which is all ``dequantize_kernel`` needs). An embedding
    (``"embeddings"``) is per row. Ambiguous shapes are refused."""
    if "qkernel" in node:
        q, s = tuple(node["qkernel"].shape), tuple(node["qscale"].shape)
        found = [(i - 1,) for i in range(1, len(q))
                 if s[i] == 1 and s[:i] + s[i + 1:] == q[:i] + q[i + 1:] and q[i] != 1]
    elif "embeddings" in node:
        return EMBEDDING_IN_AXES
    else:
        k, s = tuple(node["kernel"].shape), tuple(node["scale"].shape)
        found = [c for n in range(1, len(k)) for c in itertools.combinations(range(len(k)), n)
                 if tuple(d for i, d in enumerate(k) if i not in c) == s]
    if len(found) != 1:
        raise ValueError(f"{where or 'node'}: cannot tell the input axes of a quantized kernel from its shapes; "
                         "pass the model's linear nodes")
    return found[0]


def dequantize_node(node: Params, linear: LinearNode | None = None, dtype: Any = jnp.float32) -> Array:
    """Float kernel of a linear node (``linear`` gives its input axes; without it they are read off the
    shapes, see ``infer_in_axes``) or of the embedding."""
    return dequantize_kernel(node, kernel_in_axes(linear) if linear is not None else infer_in_axes(node), dtype)


def is_quantized(node: Any) -> bool:
    """Whether a weight node holds a quantized kernel/embedding (norm nodes, whose "scale" is a weight, never)."""
    if not isinstance(node, dict):
        return False
    if "qkernel" in node:
        return True
    w = node.get("kernel", node.get("embeddings"))
    return w is not None and "scale" in node and not jnp.issubdtype(w.dtype, jnp.floating)


# ---- whole trees -------------------------------------------------------------------------------------


def _path(name: str | bool | None, default: str) -> tuple[str, ...] | None:
    """A ``"a/b"`` path argument (``True`` = the default, ``False``/``None`` = none)."""
    if name is True:
        name = default
    return tuple(name.split("/")) if name else None


def resolve_targets(targets: str | Iterable[str], nodes: Nodes, kind: str = "LoRA") -> tuple[str, ...]:
    """Keys of the nodes the target names select: a name matches every node whose ``target`` or ``peft``
    equals it (the node's key is accepted too). In the order the names are given (a name's nodes in the order
    of ``nodes``), duplicates dropped."""
    check_nodes(nodes)
    names = (targets,) if isinstance(targets, str) else tuple(targets)
    if not names:
        raise ValueError(f"no {kind} targets given")
    out: dict[str, None] = {}
    for t in names:
        keys = [k for k, n in nodes.items() if t in (n.target, n.peft, k)]
        if not keys:
            known = sorted({n.target for n in nodes.values()} | {n.peft for n in nodes.values()})
            raise ValueError(f"unknown {kind} target {t!r}; known: {', '.join(known)}")
        out.update(dict.fromkeys(keys))
    return tuple(out)


def quantize_params(params: Params, nodes: Nodes, mode: str = "int8", group_size: int | None = None,
                    targets: Iterable[str] | None = None, embedding: str | bool | None = "token_embedding",
                    embedding_mode: str = "int8", head: str | None = "lm_head",
                    scale_dtype: Any = jnp.float32) -> Params:
    """Quantize every declared linear (or those ``targets`` select, by ``target``/``peft`` name) and, with
    ``embedding`` (its path; ``None`` for none), the token embedding per row (``embedding_mode`` "int8" or
    "int4") and an untied LM head at ``head`` per vocab column (int8), each when present.

    ``mode``: "int8" (per-output-channel, default), "int4" (per-channel, or grouped with ``group_size``),
    "nf4" (grouped, ``group_size`` default 64). Norm scales stay floating point (tiny, and sensitive).
    Adapters (and any other key, e.g. a bias) already on a node are kept, so
    ``quantize_params(add_lora(p))`` and ``add_lora(quantize_params(p))`` both give a QLoRA tree.
    """
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; use one of {MODES}")
    if mode == "nf4" and group_size is None:
        group_size = 64
    check_nodes(nodes)
    if targets is None:
        keys = tuple(nodes)
    else:

        keys = resolve_targets(targets, nodes, "quantization")
    for k in keys:
        n = nodes[k]
        if not has_node(params, n.path):
            raise ValueError(f"the params have no linear {n.key!r}")
        node = get_node(params, n.path)
        if is_quantized(node):
            raise ValueError(f"{n.key} is already quantized")
        q = quantize_kernel(node["kernel"], kernel_in_axes(n), mode, group_size, scale_dtype)
        params = set_node(params, n.path, {**q, **{x: v for x, v in node.items() if x != "kernel"}})
    emb = _path(embedding, "token_embedding")
    if emb is not None:
        if embedding_mode not in ("int8", "int4"):
            raise ValueError("embedding_mode must be 'int8' or 'int4' (model.embed applies per-row scales only)")
        if has_node(params, emb) and not is_quantized(node := get_node(params, emb)):
            q = quantize_kernel(node["embeddings"], EMBEDDING_IN_AXES, embedding_mode, None, scale_dtype)
            params = set_node(params, emb, {"embeddings": q["kernel"], "scale": q["scale"]})
        hp = _path(head, "lm_head")
        if hp is not None and has_node(params, hp) and not is_quantized(node := get_node(params, hp)):
            q = quantize_kernel(node["kernel"], HEAD_IN_AXES, "int8", None, scale_dtype)
            params = set_node(params, hp, {**q, **{x: v for x, v in node.items() if x != "kernel"}})
    return params


def _quantized_nodes(params: Params, skip: set[tuple[str, ...]]) -> dict[tuple[str, ...], Params]:
    out: dict[tuple[str, ...], Params] = {}

    def walk(tree: Params, prefix: tuple[str, ...]) -> None:
        for k, v in tree.items():
            if not isinstance(v, dict) or (*prefix, k) in skip:
                continue
            if is_quantized(v):
                out[(*prefix, k)] = v
            else:
                walk(v, (*prefix, k))

    walk(params, ())
    return out


def dequantize_params(params: Params, nodes: Nodes | None = None, dtype: Any = jnp.float32,
                      grouped_only: bool = False, embedding: str | None = "token_embedding",
                      head: str | None = "lm_head") -> Params:
    """Float params back from a quantized tree (adapters and other keys kept).

    Without ``nodes`` every quantized node of the tree is expanded, its input axes read off the shapes
    (``infer_in_axes``; ambiguous ones are refused). ``grouped_only=True`` expands only grouped nodes (which
    ``layers.linear`` would otherwise dequantize per call) and leaves per-channel int8/int4 nodes, the
    embedding and the head as they are. Call it inside the jitted function so the float copy is a transient
    of the step.
    """
    emb, hp = _path(embedding, "token_embedding"), _path(head, "lm_head")
    if nodes is None:
        found: dict[tuple[str, ...], tuple[int, ...] | None] = dict.fromkeys(
            _quantized_nodes(params, {p for p in (emb, hp) if p}))
    else:
        found = {n.path: kernel_in_axes(n) for n in check_nodes(nodes).values()
                 if has_node(params, n.path) and is_quantized(get_node(params, n.path))}
    for path, axes in found.items():
        node = get_node(params, path)
        if grouped_only and "qkernel" not in node:
            continue
        axes = axes if axes is not None else infer_in_axes(node, "/".join(path))
        rest = {k: v for k, v in node.items() if k not in WEIGHT_KEYS}
        params = set_node(params, path, {"kernel": dequantize_kernel(node, axes, dtype), **rest})
    if not grouped_only:
        if emb is not None and has_node(params, emb) and is_quantized(node := get_node(params, emb)):
            rest = {k: v for k, v in node.items() if k not in ("embeddings", "scale")}
            params = set_node(params, emb, {"embeddings": dequantize_kernel(node, EMBEDDING_IN_AXES, dtype), **rest})
        if hp is not None and has_node(params, hp) and is_quantized(node := get_node(params, hp)):
            rest = {k: v for k, v in node.items() if k not in WEIGHT_KEYS}
            params = set_node(params, hp, {"kernel": dequantize_kernel(node, HEAD_IN_AXES, dtype), **rest})
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


__all__ = [
    "NF4_TABLE", "check_nodes", "dequantize_kernel", "dequantize_node", "dequantize_params", "resolve_targets",
    "in_axes_from_eq", "infer_in_axes", "is_quantized", "kernel_in_axes", "quantize_kernel", "quantize_params",
    "quantized_bytes",
]
