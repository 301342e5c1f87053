"""Low-rank adapters (LoRA) as pytree transforms, interchangeable with Hugging Face PEFT.

A targeted linear node ``{"kernel": W}`` gains ``lora_a`` ``[L, in..., r]``, ``lora_b`` ``[L, r, out...]``
and ``lora_scale`` ``[L]`` (stacked over layers like every decoder weight, so the layer scan slices them
with the kernel). ``gemmax.nn.layers.linear`` already applies them, so no model code changes, and the same
functions work on a quantized base (QLoRA: ``{"kernel": int8, "scale": ...}`` plus adapters).

The factorisation is PEFT's: one ``A [in, r]`` / ``B [r, out]`` pair per torch ``nn.Linear`` (the heads of
q/k/v/o are flattened into the in/out features), not Keras' per-head factorisation of EinsumDense kernels.
That is what makes adapters exchangeable with PEFT (``export_peft`` / ``import_peft``) and what makes the
trainable-parameter count equal PEFT's ``get_nb_trainable_parameters()``; ``count_lora_params`` also gives
the Keras figure for comparison (docs/lora_quant.md).
"""

from __future__ import annotations

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

from gemmax.models.gemma.config import ModelConfig
from gemmax.models.gemma.model import KERNEL_IN_DIMS, LINEAR_EQS, LINEAR_NODE_PATHS, flatten, param_specs, unflatten

Array = jax.Array
Params = dict[str, Any]

#: Keys a LoRA-carrying linear node adds; ``lora_a``/``lora_b`` are the trainable ones.
LORA_KEYS = ("lora_a", "lora_b", "lora_scale")
TRAINABLE_KEYS = ("lora_a", "lora_b")

#: PEFT / transformers module names -> gemmax linear names.
PEFT_TO_GEMMAX: dict[str, str] = {
    "q_proj": "query", "k_proj": "key", "v_proj": "value", "o_proj": "attention_output",
    "gate_proj": "ffw_gating", "up_proj": "ffw_gating_2", "down_proj": "ffw_linear",
}
GEMMAX_TO_PEFT = {v: k for k, v in PEFT_TO_GEMMAX.items()}

#: Where each linear sits in the transformers module tree, under ``model.layers.{i}``.
HF_MODULES: dict[str, str] = {
    "query": "self_attn.q_proj", "key": "self_attn.k_proj", "value": "self_attn.v_proj",
    "attention_output": "self_attn.o_proj", "ffw_gating": "mlp.gate_proj", "ffw_gating_2": "mlp.up_proj",
    "ffw_linear": "mlp.down_proj",
}

#: Path of each linear node in the parameter tree (one table, in gemmax.models.gemma.model).
NODE_PATHS = LINEAR_NODE_PATHS

#: Module prefix PEFT uses in adapter_model.safetensors for a ``*ForCausalLM`` text model.
PEFT_PREFIX = "base_model.model.model.layers"

ADAPTER_JSON = "adapter.json"
ADAPTER_WEIGHTS = "adapter.safetensors"


# ---- names and shapes ------------------------------------------------------------------------------


def resolve_targets(targets: str | Iterable[str]) -> tuple[str, ...]:
    """Normalise target names (gemmax or PEFT spelling) to gemmax names, order kept, duplicates dropped."""
    if isinstance(targets, str):
        targets = (targets,)
    out: list[str] = []
    for t in targets:
        name = PEFT_TO_GEMMAX.get(t, t)
        if name not in LINEAR_EQS:
            known = sorted(LINEAR_EQS) + sorted(PEFT_TO_GEMMAX)
            raise ValueError(f"unknown LoRA target {t!r}; known: {', '.join(known)}")
        if name not in out:
            out.append(name)
    if not out:
        raise ValueError("no LoRA targets given")
    return tuple(out)


def split_kernel_dims(target: str, layer_shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(input dims, output dims) of one layer's kernel, in the order the LoRA equations use them."""
    ins = KERNEL_IN_DIMS[target]
    return (tuple(layer_shape[i] for i in ins),
            tuple(layer_shape[i] for i in range(len(layer_shape)) if i not in ins))


def lora_shapes(target: str, kernel_shape: tuple[int, ...], rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of ``lora_a`` and ``lora_b`` for a stacked kernel ``[L, ...]``."""
    n_layers, *layer_shape = kernel_shape
    ins, outs = split_kernel_dims(target, tuple(layer_shape))
    return (n_layers, *ins, rank), (n_layers, rank, *outs)


def _kernel_shape(node: Params, target: str) -> tuple[int, ...]:
    """Stacked kernel shape of a float, per-channel quantized or grouped-quantized node."""
    if "kernel" in node:
        return tuple(node["kernel"].shape)
    q = tuple(node["qkernel"].shape)  # the grouped input axis is split into (n_groups, group_size)
    ax = 1 + max(KERNEL_IN_DIMS[target])
    return (*q[:ax], q[ax] * q[ax + 1], *q[ax + 2:])


def _get_node(params: Params, target: str) -> Params:
    node: Any = params
    for k in NODE_PATHS[target]:
        node = node[k]
    return node


def _set_node(params: Params, target: str, new: Params) -> Params:
    """Functional update: copies the dicts along the path, shares every other leaf."""
    path = NODE_PATHS[target]

    def rec(tree: Params, depth: int) -> Params:
        out = dict(tree)
        out[path[depth]] = new if depth == len(path) - 1 else rec(tree[path[depth]], depth + 1)
        return out

    return rec(params, 0)


def lora_targets(params: Params) -> tuple[str, ...]:
    """Names of the linears that currently carry adapters."""
    return tuple(t for t in NODE_PATHS if _has_node(params, t) and "lora_a" in _get_node(params, t))


def _has_node(params: Params, target: str) -> bool:
    node: Any = params
    for k in NODE_PATHS[target]:
        if not isinstance(node, dict) or k not in node:
            return False
        node = node[k]
    return True


# ---- adding, counting, splitting -------------------------------------------------------------------


def add_lora(params: Params, config: ModelConfig, rank: int = 4, alpha: float | None = None,
             targets: str | Iterable[str] = ("query", "value"), seed: int = 0, dtype: Any = jnp.float32,
             use_rslora: bool = False) -> Params:
    """Return params with fresh adapters on every layer of each target linear.

    ``lora_scale = alpha / rank`` as in PEFT (``alpha / sqrt(rank)`` with ``use_rslora``); ``alpha``
    defaults to ``rank`` (scale 1.0; note PEFT's ``LoraConfig`` defaults to ``lora_alpha=8``).
    ``lora_b`` starts at zero and ``lora_a`` is uniform in ``±1/sqrt(fan_in)`` (what PEFT's
    ``kaiming_uniform_(a=sqrt(5))`` gives), so the model's outputs are unchanged until training moves B.
    Works on float and quantized bases alike.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    alpha = float(rank if alpha is None else alpha)
    scale = alpha / (math.sqrt(rank) if use_rslora else rank)
    specs = param_specs(config)
    # Host RNG: adapters are small, and a jax.random call per shape would compile a kernel for each.
    rng = np.random.default_rng(seed)
    for t in resolve_targets(targets):
        node = _get_node(params, t)
        if "lora_a" in node:
            raise ValueError(f"{'/'.join(NODE_PATHS[t])} already has LoRA factors (merge_lora or strip first)")
        shape = specs["/".join(NODE_PATHS[t]) + "/kernel"].shape
        if "kernel" in node and tuple(node["kernel"].shape) != shape:  # a grouped-quantized node has qkernel
            raise ValueError(f"{t} kernel has shape {tuple(node['kernel'].shape)}, config {config.name!r} "
                             f"says {shape}")
        a_shape, b_shape = lora_shapes(t, shape, rank)
        fan_in = int(np.prod(a_shape[1:-1]))
        bound = 1.0 / math.sqrt(fan_in)
        a = jnp.asarray(rng.uniform(-bound, bound, a_shape).astype(np.float32), dtype)
        new = dict(node, lora_a=a, lora_b=jnp.zeros(b_shape, dtype),
                   lora_scale=jnp.full((shape[0],), scale, jnp.float32))
        params = _set_node(params, t, new)
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


def count_lora_params(config: ModelConfig, rank: int = 4, targets: str | Iterable[str] = ("query", "value"),
                      factorisation: str = "standard") -> int:
    """Adapter parameter count from shapes alone.

    ``"standard"`` is gemmax/PEFT (one A/B per linear: ``r * (in + out)`` per layer); ``"keras"`` is
    Keras' EinsumDense LoRA, which factors only the last kernel axis (``A = kernel.shape[:-1] + (r,)``,
    ``B = (r, kernel.shape[-1])``): for a query kernel ``[H, D, hd]`` that is ``H*D*r + r*hd``, i.e. a
    separate A per head, hence roughly ``H`` times more parameters on attention.
    """
    specs = param_specs(config)
    total = 0
    for t in resolve_targets(targets):
        shape = specs["/".join(NODE_PATHS[t]) + "/kernel"].shape
        n_layers, *layer_shape = shape
        if factorisation == "standard":
            ins, outs = split_kernel_dims(t, tuple(layer_shape))
            per = rank * (int(np.prod(ins)) + int(np.prod(outs)))
        elif factorisation == "keras":
            per = int(np.prod(layer_shape[:-1])) * rank + rank * layer_shape[-1]
        else:
            raise ValueError(f"unknown factorisation {factorisation!r} (use 'standard' or 'keras')")
        total += n_layers * per
    return total


# ---- merging ---------------------------------------------------------------------------------------


def lora_delta(target: str, node: Params) -> Array:
    """``scale * A @ B`` laid out like the node's stacked kernel, in float32."""
    a = jnp.asarray(node["lora_a"], jnp.float32)
    b = jnp.asarray(node["lora_b"], jnp.float32)
    n_layers, rank = a.shape[0], a.shape[-1]
    ins, outs = a.shape[1:-1], b.shape[2:]
    delta = jnp.einsum("lir,lro->lio", a.reshape(n_layers, -1, rank), b.reshape(n_layers, rank, -1))
    scale = jnp.asarray(node.get("lora_scale", jnp.ones((n_layers,))), jnp.float32)
    delta = (delta * scale.reshape(n_layers, 1, 1)).reshape(n_layers, *ins, *outs)
    in_dims = KERNEL_IN_DIMS[target]
    n = len(ins) + len(outs)
    order = list(in_dims) + [j for j in range(n) if j not in in_dims]  # kernel axis held by each delta axis
    return jnp.transpose(delta, [0] + [1 + order.index(j) for j in range(n)])


def merge_lora(params: Params, dtype: Any = None) -> Params:
    """Fold every adapter into its kernel (``W + scale * A @ B``) and drop the factors.

    A quantized base is dequantized first and the merged kernel stays floating point (``dtype``, default
    the adapters' dtype): re-quantize with ``gemmax.nn.quant.quantize_params`` if wanted.
    """
    from gemmax.nn.quant import dequantize_node

    for t in lora_targets(params):
        node = _get_node(params, t)
        if "scale" in node or "qkernel" in node:
            out_dtype = dtype or node["lora_a"].dtype
            w = dequantize_node(node, t, jnp.float32)
        else:
            out_dtype = dtype or node["kernel"].dtype
            w = jnp.asarray(node["kernel"], jnp.float32)
        merged = (w + lora_delta(t, node)).astype(out_dtype)
        params = _set_node(params, t, {"kernel": merged})
    return params


def strip_lora(params: Params) -> Params:
    """The base params without adapters (what the model was before ``add_lora``)."""
    for t in lora_targets(params):
        node = _get_node(params, t)
        params = _set_node(params, t, {k: v for k, v in node.items() if k not in LORA_KEYS})
    return params


# ---- gemmax adapter files --------------------------------------------------------------------------


def lora_state(params: Params) -> dict[str, Array]:
    """Flat ``{path: array}`` of every adapter array (factors and scales)."""
    return {p: v for p, v in flatten(params).items() if p.rsplit("/", 1)[-1] in LORA_KEYS}


def _adapter_meta(params: Params) -> dict[str, Any]:
    targets = lora_targets(params)
    if not targets:
        raise ValueError("params carry no LoRA adapters")
    ranks = {t: int(_get_node(params, t)["lora_a"].shape[-1]) for t in targets}
    alphas = {}
    for t in targets:
        s = np.asarray(jax.device_get(_get_node(params, t)["lora_scale"]), np.float64)
        if not np.allclose(s, s[0]):
            raise ValueError(f"{t}: lora_scale differs between layers; cannot describe it with one alpha")
        alphas[t] = float(s[0]) * ranks[t]
    return {"targets": list(targets), "ranks": ranks, "alphas": alphas}


def _to_numpy(a: Any) -> np.ndarray:
    return np.asarray(jax.device_get(a))


def save_adapter(path: str | os.PathLike, params: Params, config: ModelConfig,
                 targets: Iterable[str] | None = None, rank: int | None = None,
                 alpha: float | None = None) -> Path:
    """Write ``adapter.json`` + ``adapter.safetensors`` (keyed by parameter path) into folder ``path``.

    Only the adapters are saved (megabytes, not the base); ``targets``/``rank``/``alpha`` default to what
    the params carry and, when given, are checked against them.
    """
    from gemmax.io.hf import write_safetensors

    meta = _adapter_meta(params)
    if targets is not None and set(resolve_targets(targets)) != set(meta["targets"]):
        raise ValueError(f"targets {list(targets)} differ from the adapters present {meta['targets']}")
    if rank is not None and any(r != rank for r in meta["ranks"].values()):
        raise ValueError(f"rank {rank} differs from the adapters' ranks {meta['ranks']}")
    if alpha is not None and any(not math.isclose(a, alpha, rel_tol=1e-6) for a in meta["alphas"].values()):
        raise ValueError(f"alpha {alpha} differs from the adapters' alphas {meta['alphas']}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / ADAPTER_WEIGHTS, {p: _to_numpy(v) for p, v in lora_state(params).items()},
                      {"format": "gemmax-lora"})
    doc = {"format": "gemmax-lora", "version": 1, "model": config.name, "family": config.family,
           "num_layers": config.num_layers, **meta}
    (out / ADAPTER_JSON).write_text(json.dumps(doc, indent=2))
    return out


def load_adapter(path: str | os.PathLike, params: Params, dtype: Any = None) -> Params:
    """Put adapters saved by ``save_adapter`` onto ``params`` (replacing any present), shape-checked."""
    from gemmax.io.hf import SafetensorsFile

    folder = Path(path)
    meta = json.loads((folder / ADAPTER_JSON).read_text())
    if meta.get("format") != "gemmax-lora":
        raise ValueError(f"{folder}: not a gemmax adapter (format {meta.get('format')!r})")
    f = SafetensorsFile(folder / ADAPTER_WEIGHTS)
    params = strip_lora(params)
    for t in resolve_targets(meta["targets"]):
        node = _get_node(params, t)
        base = "/".join(NODE_PATHS[t])
        arrays = {k: f.get(f"{base}/{k}") for k in LORA_KEYS}
        a_shape, b_shape = lora_shapes(t, _kernel_shape(node, t), arrays["lora_a"].shape[-1])
        if arrays["lora_a"].shape != a_shape or arrays["lora_b"].shape != b_shape:
            raise ValueError(f"{folder}: adapter for {t} has shapes {arrays['lora_a'].shape}/"
                             f"{arrays['lora_b'].shape}, the model needs {a_shape}/{b_shape}")
        new = dict(node)
        for k, v in arrays.items():
            new[k] = jnp.asarray(v, jnp.float32 if k == "lora_scale" else (dtype or v.dtype))
        params = _set_node(params, t, new)
    return params


# ---- PEFT interchange ------------------------------------------------------------------------------


def peft_tensors(params: Params, prefix: str = PEFT_PREFIX, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """Adapters as PEFT names them: ``{prefix}.{i}.self_attn.q_proj.lora_A.weight`` ``[r, in]`` and
    ``...lora_B.weight`` ``[out, r]``, heads flattened in transformers' (head, head_dim) order."""
    out: dict[str, np.ndarray] = {}
    for t in lora_targets(params):
        node = _get_node(params, t)
        a = _to_numpy(node["lora_a"]).astype(np.float32)
        b = _to_numpy(node["lora_b"]).astype(np.float32)
        n_layers, rank = a.shape[0], a.shape[-1]
        for i in range(n_layers):
            name = f"{prefix}.{i}.{HF_MODULES[t]}"
            out[f"{name}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, rank).T).astype(dtype)
            out[f"{name}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(rank, -1).T).astype(dtype)
    return out


def export_peft(path: str | os.PathLike, params: Params, config: ModelConfig,
                base_model_name_or_path: str | None = None, dtype: Any = np.float32,
                prefix: str = PEFT_PREFIX) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` that
    ``peft.PeftModel.from_pretrained(transformers_model, path)`` loads.

    One alpha per target is exported as ``lora_alpha`` (+ ``alpha_pattern``/``rank_pattern`` when targets
    differ). ``prefix`` is the module path of the decoder layers (``base_model.model.model.layers`` for
    ``*ForCausalLM``; a multimodal Gemma 3 wrapper uses ``base_model.model.model.language_model.layers``).
    """
    from gemmax.io.hf import write_safetensors

    meta = _adapter_meta(params)
    targets = meta["targets"]
    rank = meta["ranks"][targets[0]]
    alpha = meta["alphas"][targets[0]]
    rank_pattern = {GEMMAX_TO_PEFT[t]: r for t, r in meta["ranks"].items() if r != rank}
    alpha_pattern = {GEMMAX_TO_PEFT[t]: a for t, a in meta["alphas"].items() if not math.isclose(a, alpha)}
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": rank, "lora_alpha": alpha, "target_modules": [GEMMAX_TO_PEFT[t] for t in targets],
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "inference_mode": True, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "revision": None,
    }
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = peft_tensors(params, prefix, dtype)
    write_safetensors(out / "adapter_model.safetensors", tensors, {"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return out


_PEFT_NAME = re.compile(
    r"(?:^|\.)layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[A-Za-z0-9_\-]+)?\.weight$")


def _pattern_value(pattern: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name suffix (as a regex)."""
    for key, v in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return v
    return default


def import_peft(path: str | os.PathLike, params: Params, config: ModelConfig, dtype: Any = jnp.float32) -> Params:
    """Load a PEFT LoRA adapter folder onto gemmax params (replacing any adapters present).

    Layers the adapter does not cover (``layers_to_transform``) get zero factors, which contribute nothing.
    DoRA, LoRA biases and adapters on embeddings or the LM head are refused with a message: gemmax's
    linear does not implement them.
    """
    from gemmax.io.hf import SafetensorsFile

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
    found: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for name in f.keys():
        m = _PEFT_NAME.search(name)
        if m is None:
            raise ValueError(f"{folder}: tensor {name!r} is not a LoRA factor of a decoder linear gemmax knows")
        layer, _, module, ab = m.groups()
        if module not in PEFT_TO_GEMMAX:
            raise ValueError(f"{folder}: LoRA on module {module!r} is not supported")
        found.setdefault((PEFT_TO_GEMMAX[module], ab), {})[int(layer)] = f.get(name)
    params = strip_lora(params)
    r0, alpha0 = int(cfg["r"]), float(cfg.get("lora_alpha", 8))
    for t in [t for t in NODE_PATHS if (t, "A") in found]:
        node = _get_node(params, t)
        shape = _kernel_shape(node, t)
        n_layers = shape[0]
        module = f"model.layers.0.{HF_MODULES[t]}"
        rank = int(_pattern_value(cfg.get("rank_pattern") or {}, module, r0))
        alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, module, alpha0))
        a_shape, b_shape = lora_shapes(t, shape, rank)
        a = np.zeros(a_shape, np.float32)
        b = np.zeros(b_shape, np.float32)
        for i, w in found[(t, "A")].items():
            if i >= n_layers or w.shape != (rank, int(np.prod(a_shape[1:-1]))):
                raise ValueError(f"{folder}: layer {i} {t} lora_A has shape {w.shape}, expected "
                                 f"{(rank, int(np.prod(a_shape[1:-1])))} (model has {n_layers} layers)")
            a[i] = np.asarray(w, np.float32).T.reshape(a_shape[1:])
        for i, w in found.get((t, "B"), {}).items():
            if i >= n_layers or w.shape != (int(np.prod(b_shape[2:])), rank):
                raise ValueError(f"{folder}: layer {i} {t} lora_B has shape {w.shape}, expected "
                                 f"{(int(np.prod(b_shape[2:])), rank)}")
            b[i] = np.asarray(w, np.float32).T.reshape(b_shape[1:])
        scale = alpha / (math.sqrt(rank) if cfg.get("use_rslora") else rank)
        new = dict(node, lora_a=jnp.asarray(a, dtype), lora_b=jnp.asarray(b, dtype),
                   lora_scale=jnp.full((n_layers,), scale, jnp.float32))
        params = _set_node(params, t, new)
    return params


__all__ = [
    "add_lora", "count_lora_params", "count_trainable", "export_peft", "import_peft", "load_adapter",
    "lora_delta", "lora_shapes", "lora_state", "lora_targets", "merge_lora", "merge_trees", "peft_tensors",
    "resolve_targets", "save_adapter", "split_trainable", "strip_lora", "trainable_mask",
]
