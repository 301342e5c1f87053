"""Low-rank adapters (LoRA) as pytree transforms, interchangeable with Hugging Face PEFT.

Every function walks the :class:`~gemmax.nn.params.LinearNode` declarations a family makes
(``family.linear_nodes(cfg)``), so nothing here knows any model. A targeted linear node ``{"kernel": W}``
gains ``lora_a`` ``[L, in..., r]``, ``lora_b`` ``[L, r, out...]`` and ``lora_scale`` ``[L]`` (stacked over
layers like the kernel, so the layer scan slices them with it; a node with ``stacked=False`` gets
``[in..., r]``, ``[r, out...]`` and a scalar scale). ``gemmax.nn.layers.linear`` already applies them, so
no model code changes, and the same functions work on a quantized base (QLoRA: ``{"kernel": int8,
"scale": ...}`` plus adapters).

The factorisation is PEFT's: one ``A [in, r]`` / ``B [r, out]`` pair per torch ``nn.Linear`` (the heads of
q/k/v/o are flattened into the in/out features), not Keras' per-head factorisation of EinsumDense kernels.
That is what makes adapters exchangeable with PEFT (``export_peft`` / ``import_peft``) and what makes the
trainable-parameter count equal PEFT's ``get_nb_trainable_parameters()``; ``count_lora_params`` also gives
the Keras figure for comparison (docs/lora_quant.md).

Targets are the names users write: a node's ``target`` (``"query"``) or its PEFT name (``"q_proj"``); one
name selects every node that carries it (e.g. ``"query"`` in several block kinds). Functions that report
adapters (``lora_targets``, adapter files) name nodes by their key in the ``nodes`` mapping.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemmax.io.hf import SafetensorsFile, write_safetensors
from gemmax.nn import quant
from gemmax.nn.params import LinearNode, flatten, get_node, has_node, set_node, unflatten
from gemmax.nn.quant import check_nodes, kernel_in_axes, resolve_targets

Array = jax.Array
Params = dict[str, Any]
Nodes = Mapping[str, LinearNode]

#: Keys a LoRA-carrying linear node adds; ``lora_a``/``lora_b`` are the trainable ones.
LORA_KEYS = ("lora_a", "lora_b", "lora_scale")
TRAINABLE_KEYS = ("lora_a", "lora_b")
#: Keys that hold the base weight (float, per-channel quantized or grouped); merging replaces them.
_BASE_KEYS = ("kernel", "scale", "qkernel", "qscale")

#: PEFT adds this in front of the transformers module path of every adapter tensor.
PEFT_MODEL_PREFIX = "base_model.model"

ADAPTER_JSON = "adapter.json"
ADAPTER_WEIGHTS = "adapter.safetensors"


# ---- names and shapes ------------------------------------------------------------------------------


def split_kernel_dims(in_dims: tuple[int, ...], layer_shape: tuple[int, ...]
                      ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(input dims, output dims) of one layer's kernel, in the order the LoRA equations use them."""
    return (tuple(layer_shape[i] for i in in_dims),
            tuple(layer_shape[i] for i in range(len(layer_shape)) if i not in in_dims))


def lora_shapes(node: LinearNode, kernel_shape: tuple[int, ...], rank: int
                ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of ``lora_a`` and ``lora_b`` for the node's kernel (``[L, ...]`` when stacked)."""
    lead = tuple(kernel_shape[:1]) if node.stacked else ()
    ins, outs = split_kernel_dims(node.in_dims, tuple(kernel_shape[len(lead):]))
    return (*lead, *ins, rank), (*lead, rank, *outs)


def kernel_shape(tree_node: Params, node: LinearNode) -> tuple[int, ...]:
    """Kernel shape of a float, per-channel quantized or grouped-quantized node (from ``qkernel``, whose
    last input axis is split into ``(n_groups, group_size)``)."""
    if "kernel" in tree_node:
        return tuple(tree_node["kernel"].shape)
    q = tuple(tree_node["qkernel"].shape)
    ax = max(kernel_in_axes(node))
    return (*q[:ax], q[ax] * q[ax + 1], *q[ax + 2:])


def _tree_node(params: Params, node: LinearNode) -> Params:
    if not has_node(params, node.path):
        raise ValueError(f"the params have no linear {node.key!r}")
    return get_node(params, node.path)


def lora_targets(params: Params, nodes: Nodes) -> tuple[str, ...]:
    """Keys of the nodes that currently carry adapters."""
    return tuple(k for k, n in check_nodes(nodes).items()
                 if has_node(params, n.path) and "lora_a" in get_node(params, n.path))


def _adapter_nodes(params: Params) -> dict[str, Params]:
    """Every node of the tree that carries adapters, by path (no declarations needed)."""
    out: dict[str, Params] = {}

    def walk(tree: Params, prefix: tuple[str, ...]) -> None:
        if "lora_a" in tree:
            out["/".join(prefix)] = tree
            return
        for k, v in tree.items():
            if isinstance(v, dict):
                walk(v, (*prefix, k))

    walk(params, ())
    return out


def _infer_node(path: str, tree_node: Params) -> LinearNode:
    """The LinearNode of an adapter-carrying node read off its shapes (``merge_lora`` without ``nodes``):
    the factors give the input and output dims, the kernel their order. Refuses ambiguous layouts."""
    stacked = jnp.ndim(tree_node.get("lora_scale", 0.0)) == 1
    lead = int(stacked)
    a, b = tuple(tree_node["lora_a"].shape), tuple(tree_node["lora_b"].shape)
    ins, outs = a[lead:-1], b[lead + 1:]
    if "kernel" in tree_node:
        shape = tuple(tree_node["kernel"].shape)
    else:  # grouped: the input axis split into (n_groups, group_size)
        q, ax = tuple(tree_node["qkernel"].shape), max(quant.infer_in_axes(tree_node, path))
        shape = (*q[:ax], q[ax] * q[ax + 1], *q[ax + 2:])
    layer = shape[lead:]
    found = {p for p in itertools.combinations(range(len(layer)), len(ins))
             if split_kernel_dims(p, layer) == (ins, outs)}
    if len(found) != 1:
        raise ValueError(f"{path}: cannot tell the input axes of kernel {shape} from its LoRA factors "
                         f"{a}/{b}; pass the model's linear nodes")
    return LinearNode(path=tuple(path.split("/")), eq="", lora_eqs=("", ""), in_dims=found.pop(), target="",
                      peft="", hf_module="", stacked=stacked)


# ---- adding, counting, splitting -------------------------------------------------------------------


def add_lora(params: Params, nodes: Nodes, rank: int = 4, alpha: float | None = None,
             targets: str | Iterable[str] = ("query", "value"), seed: int = 0, dtype: Any = jnp.float32,
             use_rslora: bool = False) -> Params:
    """Return params with fresh adapters on every layer of each targeted linear.

    ``lora_scale = alpha / rank`` as in PEFT (``alpha / sqrt(rank)`` with ``use_rslora``); ``alpha``
    defaults to ``rank`` (scale 1.0; note PEFT's ``LoraConfig`` defaults to ``lora_alpha=8``).
    ``lora_b`` starts at zero and ``lora_a`` is uniform in ``±1/sqrt(fan_in)`` (what PEFT's
    ``kaiming_uniform_(a=sqrt(5))`` gives), so the model's outputs are unchanged until training moves B.
    Works on float and quantized bases alike, and on abstract (``jax.eval_shape``) trees.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    alpha = float(rank if alpha is None else alpha)
    scale = alpha / (math.sqrt(rank) if use_rslora else rank)
    # Host RNG: adapters are small, and a jax.random call per shape would compile a kernel for each.
    rng = np.random.default_rng(seed)
    for k in resolve_targets(targets, nodes):
        n = nodes[k]
        node = _tree_node(params, n)
        if "lora_a" in node:
            raise ValueError(f"{n.key} already has LoRA factors (merge_lora or strip first)")
        shape = kernel_shape(node, n)
        n_kernel_axes = len(n.eq.split("->")[0].split(",")[1]) if n.eq else len(shape) - int(n.stacked)
        if len(shape) != n_kernel_axes + int(n.stacked):
            raise ValueError(f"{n.key}: kernel has shape {shape}, its einsum {n.eq!r} needs {n_kernel_axes} axes"
                             + (" after the layer axis" if n.stacked else ""))
        a_shape, b_shape = lora_shapes(n, shape, rank)
        fan_in = int(np.prod(a_shape[int(n.stacked):-1]))
        bound = 1.0 / math.sqrt(fan_in)
        a = jnp.asarray(rng.uniform(-bound, bound, a_shape).astype(np.float32), dtype)
        s = jnp.full((shape[0],), scale, jnp.float32) if n.stacked else jnp.asarray(scale, jnp.float32)
        params = set_node(params, n.path, dict(node, lora_a=a, lora_b=jnp.zeros(b_shape, dtype), lora_scale=s))
    return params


def _is_trainable_path(path: str) -> bool:
    return path.rsplit("/", 1)[-1] in TRAINABLE_KEYS


def trainable_mask(params: Params) -> Params:
    """Same-structure tree of bools: True on adapter factors (for ``optax.masked`` and friends)."""
    return unflatten({p: _is_trainable_path(p) for p in flatten(params)})


def split_trainable(params: Params) -> tuple[Params, Params]:
    """(trainable, frozen): two disjoint nested dicts whose ``merge_trees`` is ``params``.

    The trainer differentiates only the first argument, so the frozen base (possibly int8, which JAX
    could not differentiate anyway) never gets gradients or optimizer state.
    """
    flat = flatten(params)
    return (unflatten({p: v for p, v in flat.items() if _is_trainable_path(p)}),
            unflatten({p: v for p, v in flat.items() if not _is_trainable_path(p)}))


def merge_trees(a: Params, b: Params) -> Params:
    """Deep union of two nested dicts (inverse of ``split_trainable``); ``b`` wins on conflicts."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge_trees(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def count_trainable(params: Params) -> int:
    """Number of adapter parameters (``lora_a`` + ``lora_b``) in the tree."""
    return sum(int(np.prod(v.shape)) for p, v in flatten(params).items() if _is_trainable_path(p))


def count_lora_params(params: Params, nodes: Nodes, rank: int = 4,
                      targets: str | Iterable[str] = ("query", "value"), factorisation: str = "standard") -> int:
    """Adapter parameter count from the kernels' shapes alone (``params`` may be an abstract tree of
    ``jax.ShapeDtypeStruct``, e.g. ``nn.params.abstract_from_specs(family.param_specs(cfg))``).

    ``"standard"`` is gemmax/PEFT (one A/B per linear: ``r * (in + out)`` per layer); ``"keras"`` is
    Keras' EinsumDense LoRA, which factors only the last kernel axis (``A = kernel.shape[:-1] + (r,)``,
    ``B = (r, kernel.shape[-1])``): for a query kernel ``[H, D, hd]`` that is ``H*D*r + r*hd``, i.e. a
    separate A per head, hence roughly ``H`` times more parameters on attention.
    """
    if factorisation not in ("standard", "keras"):
        raise ValueError(f"unknown factorisation {factorisation!r} (use 'standard' or 'keras')")
    total = 0
    for k in resolve_targets(targets, nodes):
        n = nodes[k]
        shape = kernel_shape(_tree_node(params, n), n)
        n_layers, layer_shape = (shape[0], shape[1:]) if n.stacked else (1, shape)
        if factorisation == "standard":
            ins, outs = split_kernel_dims(n.in_dims, tuple(layer_shape))
            per = rank * (int(np.prod(ins)) + int(np.prod(outs)))
        else:
            per = int(np.prod(layer_shape[:-1])) * rank + rank * layer_shape[-1]
        total += n_layers * per
    return total


# ---- merging ---------------------------------------------------------------------------------------


def lora_delta(tree_node: Params, node: LinearNode) -> Array:
    """``scale * A @ B`` laid out like the node's kernel (stacked or not), in float32."""
    a = jnp.asarray(tree_node["lora_a"], jnp.float32)
    b = jnp.asarray(tree_node["lora_b"], jnp.float32)
    scale = jnp.asarray(tree_node.get("lora_scale", 1.0), jnp.float32)
    if not node.stacked:  # one layer: give it the layer axis the stacked case has, then drop it
        a, b, scale = a[None], b[None], scale.reshape(1)
    n_layers, rank = a.shape[0], a.shape[-1]
    ins, outs = a.shape[1:-1], b.shape[2:]
    delta = jnp.einsum("lir,lro->lio", a.reshape(n_layers, -1, rank), b.reshape(n_layers, rank, -1))
    delta = (delta * jnp.broadcast_to(scale, (n_layers,)).reshape(n_layers, 1, 1)).reshape(n_layers, *ins, *outs)
    n = len(ins) + len(outs)
    order = list(node.in_dims) + [j for j in range(n) if j not in node.in_dims]  # kernel axis of each delta axis
    delta = jnp.transpose(delta, [0] + [1 + order.index(j) for j in range(n)])
    return delta if node.stacked else delta[0]


def merge_lora(params: Params, nodes: Nodes | None = None, dtype: Any = None) -> Params:
    """Fold every adapter into its kernel (``W + scale * A @ B``) and drop the factors.

    A quantized base is dequantized first and the merged kernel stays floating point (``dtype``, default
    the adapters' dtype): re-quantize with ``gemmax.nn.quant.quantize_params`` if wanted. Without ``nodes``
    every adapter-carrying node of the tree is merged, its layout read off the shapes (refused when
    ambiguous). Other keys of a node (a bias) are kept.
    """
    if nodes is None:
        found = {p: _infer_node(p, t) for p, t in _adapter_nodes(params).items()}
    else:
        found = {k: nodes[k] for k in lora_targets(params, nodes)}  # (checks nodes)
    for n in found.values():
        node = get_node(params, n.path)
        if quant.is_quantized(node):
            out_dtype = dtype or node["lora_a"].dtype
            w = quant.dequantize_kernel(node, kernel_in_axes(n), jnp.float32)
        else:
            out_dtype = dtype or node["kernel"].dtype
            w = jnp.asarray(node["kernel"], jnp.float32)
        merged = (w + lora_delta(node, n)).astype(out_dtype)
        rest = {k: v for k, v in node.items() if k not in _BASE_KEYS + LORA_KEYS}
        params = set_node(params, n.path, {"kernel": merged, **rest})
    return params


def strip_lora(params: Params) -> Params:
    """The base params without adapters (what the model was before ``add_lora``)."""
    for path, node in _adapter_nodes(params).items():
        params = set_node(params, tuple(path.split("/")), {k: v for k, v in node.items() if k not in LORA_KEYS})
    return params


# ---- gemmax adapter files --------------------------------------------------------------------------


def lora_state(params: Params) -> dict[str, Array]:
    """Flat ``{path: array}`` of every adapter array (factors and scales)."""
    return {p: v for p, v in flatten(params).items() if p.rsplit("/", 1)[-1] in LORA_KEYS}


def _adapter_meta(params: Params, nodes: Nodes) -> dict[str, Any]:
    targets = lora_targets(params, nodes)
    if not targets:
        raise ValueError("params carry no LoRA adapters")
    ranks = {t: int(get_node(params, nodes[t].path)["lora_a"].shape[-1]) for t in targets}
    alphas = {}
    for t in targets:
        s = np.atleast_1d(np.asarray(jax.device_get(get_node(params, nodes[t].path)["lora_scale"]), np.float64))
        if not np.allclose(s, s[0]):
            raise ValueError(f"{t}: lora_scale differs between layers; cannot describe it with one alpha")
        alphas[t] = float(s[0]) * ranks[t]
    return {"targets": list(targets), "ranks": ranks, "alphas": alphas}


def _to_numpy(a: Any) -> np.ndarray:
    return np.asarray(jax.device_get(a))


def save_adapter(path: str | os.PathLike, params: Params, nodes: Nodes, targets: Iterable[str] | None = None,
                 rank: int | None = None, alpha: float | None = None,
                 model_info: Mapping[str, Any] | None = None) -> Path:
    """Write ``adapter.json`` + ``adapter.safetensors`` (keyed by parameter path) into folder ``path``.

    Only the adapters are saved (megabytes, not the base); ``targets``/``rank``/``alpha`` default to what
    the params carry and, when given, are checked against them. ``model_info`` (e.g. ``{"model": cfg.name,
    "family": ..., "num_layers": ...}``) is recorded in ``adapter.json`` for the reader; loading ignores it.
    """
    meta = _adapter_meta(params, nodes)
    if targets is not None and set(resolve_targets(targets, nodes)) != set(meta["targets"]):
        raise ValueError(f"targets {list(targets)} differ from the adapters present {meta['targets']}")
    if rank is not None and any(r != rank for r in meta["ranks"].values()):
        raise ValueError(f"rank {rank} differs from the adapters' ranks {meta['ranks']}")
    if alpha is not None and any(not math.isclose(a, alpha, rel_tol=1e-6) for a in meta["alphas"].values()):
        raise ValueError(f"alpha {alpha} differs from the adapters' alphas {meta['alphas']}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / ADAPTER_WEIGHTS, {p: _to_numpy(v) for p, v in lora_state(params).items()},
                      {"format": "gemmax-lora"})
    doc = {"format": "gemmax-lora", "version": 1, **dict(model_info or {}), **meta}
    (out / ADAPTER_JSON).write_text(json.dumps(doc, indent=2))
    return out


def load_adapter(path: str | os.PathLike, params: Params, nodes: Nodes, dtype: Any = None) -> Params:
    """Put adapters saved by ``save_adapter`` onto ``params`` (replacing any present), shape-checked."""
    folder = Path(path)
    meta = json.loads((folder / ADAPTER_JSON).read_text())
    if meta.get("format") != "gemmax-lora":
        raise ValueError(f"{folder}: not a gemmax adapter (format {meta.get('format')!r})")
    f = SafetensorsFile(folder / ADAPTER_WEIGHTS)
    names = set(f.keys())
    params = strip_lora(params)
    for k, n in check_nodes(nodes).items():
        if f"{n.key}/lora_a" not in names:
            continue
        node = _tree_node(params, n)
        lacking = [f"{n.key}/{key}" for key in LORA_KEYS if f"{n.key}/{key}" not in names]
        if lacking:
            raise ValueError(f"{folder}: adapter for {k} is incomplete: {ADAPTER_WEIGHTS} lacks {lacking}")
        arrays = {key: f.get(f"{n.key}/{key}") for key in LORA_KEYS}
        names -= {f"{n.key}/{key}" for key in LORA_KEYS}
        a_shape, b_shape = lora_shapes(n, kernel_shape(node, n), arrays["lora_a"].shape[-1])
        if arrays["lora_a"].shape != a_shape or arrays["lora_b"].shape != b_shape:
            raise ValueError(f"{folder}: adapter for {k} has shapes {arrays['lora_a'].shape}/"
                             f"{arrays['lora_b'].shape}, the model needs {a_shape}/{b_shape}")
        new = dict(node)
        for key, v in arrays.items():
            new[key] = jnp.asarray(v, jnp.float32 if key == "lora_scale" else (dtype or v.dtype))
        params = set_node(params, n.path, new)
    if names:
        raise ValueError(f"{folder}: adapter tensors for linears this model does not declare: {sorted(names)}")
    return params


# ---- PEFT interchange ------------------------------------------------------------------------------


def hf_module_names(node: LinearNode, n_entries: int) -> list[str]:
    """transformers module path of each entry of the node's kernel (each stacked layer, or the one kernel):
    ``{layers}.{layer_id}.{hf_module}`` (``layer_ids`` default to ``0..L-1``)."""
    ids = node.layer_ids or tuple(range(n_entries))
    if len(ids) != n_entries:
        raise ValueError(f"{node.key}: {n_entries} stacked layers but {len(ids)} layer_ids")
    return [".".join(p for p in (node.layers, str(i), node.hf_module) if p) for i in ids]


def _module_names(node: LinearNode, shape: tuple[int, ...]) -> list[str]:
    """``hf_module_names`` of a node with this kernel shape (a lone kernel with no layer id: one name)."""
    if not node.stacked and not node.layer_ids:
        return [".".join(p for p in (node.layers, node.hf_module) if p)]
    return hf_module_names(node, shape[0] if node.stacked else 1)


def peft_tensors(params: Params, nodes: Nodes, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """Adapters as PEFT names them: ``base_model.model.{layers}.{i}.{hf_module}.lora_A.weight`` ``[r, in]``
    and ``...lora_B.weight`` ``[out, r]``, heads flattened in transformers' (head, head_dim) order."""
    out: dict[str, np.ndarray] = {}
    for k in lora_targets(params, nodes):
        n = nodes[k]
        node = get_node(params, n.path)
        a = _to_numpy(node["lora_a"]).astype(np.float32)
        b = _to_numpy(node["lora_b"]).astype(np.float32)
        if not n.stacked:
            a, b = a[None], b[None]
        rank = a.shape[-1]
        for i, module in enumerate(_module_names(n, kernel_shape(node, n))):
            name = f"{PEFT_MODEL_PREFIX}.{module}"
            out[f"{name}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, rank).T).astype(dtype)
            out[f"{name}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(rank, -1).T).astype(dtype)
    return out


def _by_peft_name(values: Mapping[str, Any], nodes: Nodes, what: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in values.items():
        name = nodes[k].peft
        if name in out and out[name] != v:
            raise ValueError(f"nodes named {name!r} in PEFT carry different {what}s ({out[name]} and {v})")
        out[name] = v
    return out


def export_peft(path: str | os.PathLike, params: Params, nodes: Nodes, base_model_name_or_path: str | None = None,
                dtype: Any = np.float32) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` that
    ``peft.PeftModel.from_pretrained(transformers_model, path)`` loads.

    One alpha per target is exported as ``lora_alpha`` (+ ``alpha_pattern``/``rank_pattern`` when targets
    differ). Module names come from the nodes (``layers``, ``layer_ids``, ``hf_module``, ``peft``): a
    multimodal wrapper declares its decoder's nodes under its own ``layers`` prefix.
    """
    meta = _adapter_meta(params, nodes)
    targets = meta["targets"]
    rank = meta["ranks"][targets[0]]
    alpha = meta["alphas"][targets[0]]
    ranks = _by_peft_name(meta["ranks"], nodes, "rank")
    alphas = _by_peft_name(meta["alphas"], nodes, "alpha")
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": rank, "lora_alpha": alpha, "target_modules": _peft_target_modules(targets, nodes, list(ranks)),
        "rank_pattern": {m: r for m, r in ranks.items() if r != rank},
        "alpha_pattern": {m: a for m, a in alphas.items() if not math.isclose(a, alpha)},
        "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "inference_mode": True, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "revision": None,
    }
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = peft_tensors(params, nodes, dtype)
    write_safetensors(out / "adapter_model.safetensors", tensors, {"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return out


def _peft_target_modules(targets: list[str], nodes: Nodes, short: list[str]) -> list[str] | str:
    """PEFT's ``target_modules``: the short names (``q_proj``) when they select exactly the adapted modules,
    else one regex over the adapted modules' full paths. PEFT wraps every module whose name ends with a short
    name, so on a model with a vision tower ``q_proj`` would also wrap the tower's projections."""
    chosen = set(targets)
    if not any(n.peft in short for k, n in nodes.items() if k not in chosen):
        return short
    alts = sorted({rf"{re.escape(nodes[k].layers)}\.\d+\.{re.escape(nodes[k].hf_module)}" for k in targets})
    return "^(" + "|".join(alts) + ")$"


_PEFT_NAME = re.compile(r"^(.+)\.lora_([AB])(?:\.[A-Za-z0-9_\-]+)?\.weight$")


def _pattern_value(pattern: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name suffix (as a regex)."""
    for key, v in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return v
    return default


def _module_table(params: Params, nodes: Nodes) -> tuple[dict[str, tuple[str, int]], dict[str, list]]:
    """transformers module path -> (node key, entry) for every declared linear present in ``params``, and
    the same by the path from the layer list's last name on (``layers.3.self_attn.q_proj``), which
    accepts an adapter saved under another wrapper prefix (a multimodal model's text decoder)."""
    check_nodes(nodes)
    exact: dict[str, tuple[str, int]] = {}
    tails: dict[str, list[tuple[str, int]]] = {}
    for k, n in nodes.items():
        if not has_node(params, n.path):
            continue
        names = _module_names(n, kernel_shape(get_node(params, n.path), n))
        cut = len(n.layers.rsplit(".", 1)[0]) + 1 if "." in n.layers else 0
        for i, m in enumerate(names):
            exact[m] = (k, i)
            tails.setdefault(m[cut:], []).append((k, i))
    return exact, tails


def _find_module(module: str, exact: dict, tails: dict) -> tuple[str, int] | None:
    if module in exact:
        return exact[module]
    parts = module.split(".")
    for j in range(len(parts)):
        hits = tails.get(".".join(parts[j:]))
        if hits:
            return hits[0] if len(hits) == 1 else None
    return None


def import_peft(path: str | os.PathLike, params: Params, nodes: Nodes, dtype: Any = jnp.float32) -> Params:
    """Load a PEFT LoRA adapter folder onto params (replacing any adapters present).

    Layers the adapter does not cover (``layers_to_transform``) get zero factors, which contribute nothing.
    DoRA, LoRA biases and adapters on modules the nodes do not declare (embeddings, the LM head) are
    refused with a message: gemmax's linear does not implement them.
    """
    folder = Path(path)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{folder}: peft_type {cfg.get('peft_type')!r} is not LORA")
    if cfg.get("use_dora"):
        raise ValueError(f"{folder}: DoRA adapters are not supported")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        raise ValueError(f"{folder}: adapters with trained biases are not supported")
    weights = folder / "adapter_model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"{folder}: no adapter_model.safetensors (pickled adapter_model.bin is not read)")
    f = SafetensorsFile(weights)
    exact, tails = _module_table(params, nodes)
    found: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for name in f.keys():
        m = _PEFT_NAME.match(name)
        hit = None if m is None else _find_module(m.group(1).removeprefix(PEFT_MODEL_PREFIX + "."), exact, tails)
        if hit is None:
            known = sorted({n.peft for n in nodes.values()})
            raise ValueError(f"{folder}: tensor {name!r} is not a LoRA factor of a linear this model declares "
                             f"(modules: {', '.join(known)})")
        k, i = hit
        found.setdefault((k, m.group(2)), {})[i] = f.get(name)
    for k, part in found:  # each adapted layer needs both factors: one alone is a truncated file
        other = "B" if part == "A" else "A"
        lone = sorted(set(found[(k, part)]) - set(found.get((k, other), {})))
        if lone:
            raise ValueError(f"{folder}: {k} has lora_{part} but no lora_{other} for layer(s) {lone}")
    params = strip_lora(params)
    r0, alpha0 = int(cfg["r"]), float(cfg.get("lora_alpha", 8))
    for k in [k for k in nodes if (k, "A") in found]:
        n = nodes[k]
        node = get_node(params, n.path)
        shape = kernel_shape(node, n)
        module = next(m for m, v in exact.items() if v == (k, 0))
        rank = int(_pattern_value(cfg.get("rank_pattern") or {}, module, r0))
        alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, module, alpha0))
        a_shape, b_shape = lora_shapes(n, shape, rank)
        if not n.stacked:
            a_shape, b_shape = (1, *a_shape), (1, *b_shape)
        a = np.zeros(a_shape, np.float32)
        b = np.zeros(b_shape, np.float32)
        n_in, n_out = int(np.prod(a_shape[1:-1])), int(np.prod(b_shape[2:]))
        for i, w in found[(k, "A")].items():
            if w.shape != (rank, n_in):
                raise ValueError(f"{folder}: layer {i} {k} lora_A has shape {w.shape}, expected {(rank, n_in)}")
            a[i] = np.asarray(w, np.float32).T.reshape(a_shape[1:])
        for i, w in found.get((k, "B"), {}).items():
            if w.shape != (n_out, rank):
                raise ValueError(f"{folder}: layer {i} {k} lora_B has shape {w.shape}, expected {(n_out, rank)}")
            b[i] = np.asarray(w, np.float32).T.reshape(b_shape[1:])
        scale = alpha / (math.sqrt(rank) if cfg.get("use_rslora") else rank)
        if n.stacked:
            s = jnp.full((shape[0],), scale, jnp.float32)
        else:
            a, b, s = a[0], b[0], jnp.asarray(scale, jnp.float32)
        params = set_node(params, n.path, dict(node, lora_a=jnp.asarray(a, dtype), lora_b=jnp.asarray(b, dtype),
                                               lora_scale=s))
    return params


def estimate_bytes(params: Params, nodes: Nodes, mode: str | None = "int8", group_size: int | None = None,
                   dtype: Any = jnp.bfloat16, lora_rank: int | None = None,
                   lora_targets: Iterable[str] = ("query", "value"), lora_dtype: Any = jnp.bfloat16,
                   embedding: str | None = "token_embedding") -> dict[str, float]:
    """``quantized_bytes`` of a model computed from shapes only (``jax.eval_shape``: no weights made).

    ``params`` may be abstract (``nn.params.abstract_from_specs(family.param_specs(cfg))``); every leaf is
    taken in ``dtype``. ``mode=None`` gives the unquantized tree; ``lora_rank`` adds adapters (QLoRA when a
    mode is set). Used for the figures in docs/lora_quant.md.
    """
    tree = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype), params)

    def build(p: Params) -> Params:
        if mode is not None:
            p = quant.quantize_params(p, nodes, mode, group_size, embedding=embedding)
        if lora_rank:
            p = add_lora(p, nodes, lora_rank, targets=lora_targets, dtype=lora_dtype)
        return p

    return quant.quantized_bytes(jax.eval_shape(build, tree), dtype)


__all__ = [
    "add_lora", "count_lora_params", "count_trainable", "estimate_bytes", "export_peft", "hf_module_names",
    "import_peft",
    "kernel_in_axes", "kernel_shape", "load_adapter", "lora_delta", "lora_shapes", "lora_state", "lora_targets",
    "merge_lora", "merge_trees", "peft_tensors", "resolve_targets", "save_adapter", "split_trainable",
    "strip_lora", "trainable_mask",
]
