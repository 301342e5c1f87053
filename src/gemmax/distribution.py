"""Sharding one model over many accelerators: the Keras distribution API, in JAX.

The Keras Gemma tutorials (``keras.distribution``) shard Gemma with three objects, and this module keeps their names
and meaning so their code translates line by line:

* :class:`DeviceMesh` — a logical grid of devices with named axes (wraps :class:`jax.sharding.Mesh`);
* :class:`LayoutMap` — regular expressions over weight paths -> partition specs;
* :class:`ModelParallel` / :class:`DataParallel` — a distribution set as the default with
  :func:`set_distribution` (or used as a context with ``with dist.scope():``).

What JAX adds, and why the module does more than map names:

* Weights are *stacked* on a leading layer axis (``decoder_block/...``), so a spec written for one layer gets
  ``None`` prepended: users keep writing the per-layer specs the papers and seeds give.
* A mesh axis that does not divide a dimension (Gemma 2B has one KV head; Gemma 3 270M has four query heads
  on an 8-way axis) is moved to another dimension that it divides, or dropped; every such decision is kept in
  ``distribution.plan`` instead of failing deep inside XLA.
* Optimizer states (AdamW's ``mu``/``nu`` mirror the params tree) get the sharding of the weight at the same
  path (:func:`shard_like`) — what Keras does by matching the regexes against optimizer variable names.
* :func:`describe` computes the per-device memory of weights and optimizer states from *abstract* shapes, so
  a 27B run can be planned on a laptop without allocating anything.
* :func:`initialize` starts multi-host JAX (one process per host) from arguments or ``GEMMAX_*`` variables.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from gemmax.models import base

__all__ = [
    "DataParallel",
    "Description",
    "DescriptionRow",
    "DeviceMesh",
    "Distribution",
    "LayoutMap",
    "ModelParallel",
    "describe",
    "describe_rows",
    "distribution",
    "get_layout_map",
    "layout_from_specs",
    "initialize",
    "list_devices",
    "named_leaves",
    "set_distribution",
    "shard_like",
    "use_distribution",
]

#: One entry of a partition spec: replicated (None), one mesh axis, or several mesh axes.
AxisEntry = str | tuple[str, ...] | None
Spec = tuple[AxisEntry, ...]

#: Weights stacked on a leading layer axis live under this prefix (see docs/architecture.md).
LAYER_PREFIX = "decoder_block/"

#: Leaf names derived from a sibling main weight ("kernel" or "embeddings"): LoRA factors and quantization
#: scales. They follow the sharding of their main weight so the matmuls they feed need no resharding.
_MAIN_WEIGHTS = ("kernel", "embeddings")
_DERIVED = ("lora_a", "lora_b", "scale", "kernel_scale", "lora_scale")
#: Group-quantized nodes (gemmax.nn.quant): ``qkernel`` is the kernel with its last input axis cut into
#: ``[n_groups, group_size]``; ``qscale`` has the same rank with a 1 for ``group_size``. Rules written for the
#: kernel match them with a rank one too small; they are adapted instead of rejected.
_GROUPED = ("qkernel", "qscale")


# ---- devices and meshes ------------------------------------------------------------------------------


def list_devices(device_type: str | None = None) -> list[jax.Device]:
    """All devices of every process (global list, as a mesh needs), optionally of one platform.

    ``device_type`` is "cpu", "gpu"/"cuda" or "tpu"; None picks JAX's default backend.
    """
    if device_type is None:
        return list(jax.devices())
    kind = device_type.lower()
    kind = {"cuda": "gpu", "rocm": "gpu"}.get(kind, kind)
    return list(jax.devices(kind))


class DeviceMesh:
    """A logical grid of devices with named axes, e.g. ``DeviceMesh((2, 8), ["batch", "model"], devices)``.

    ``devices=None`` takes all devices (all processes) and lets JAX order them for the physical topology
    (``mesh_utils.create_device_mesh``), so neighbouring chips share a model-axis row. Use
    :meth:`DeviceMesh.abstract` to plan for a mesh larger than the machine you are on.
    """

    def __init__(self, shape: Sequence[int], axis_names: Sequence[str],
                 devices: Sequence[jax.Device] | np.ndarray | None = None) -> None:
        shape = tuple(int(s) for s in shape)
        axis_names = tuple(str(a) for a in axis_names)
        if len(shape) != len(axis_names):
            raise ValueError(f"mesh shape {shape} and axis names {axis_names} differ in length")
        if len(set(axis_names)) != len(axis_names):
            raise ValueError(f"mesh axis names must be unique, got {axis_names}")
        self.shape = shape
        self.axis_names = axis_names
        n = math.prod(shape)
        if devices is None:
            avail = jax.devices()
            if len(avail) < n:
                raise ValueError(
                    f"mesh {shape} needs {n} devices but {len(avail)} are visible; on CPU set "
                    f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before importing jax, or use "
                    "DeviceMesh.abstract(...) to plan without devices")
            try:
                from jax.experimental import mesh_utils

                arr = mesh_utils.create_device_mesh(shape, avail[:n], allow_split_physical_axes=True)
            except Exception:  # topology-unaware fallback (e.g. odd shapes on CPU)
                arr = np.asarray(avail[:n], dtype=object).reshape(shape)
        else:
            arr = np.asarray(devices, dtype=object).reshape(-1)
            if arr.size != n:
                raise ValueError(f"mesh {shape} needs {n} devices, got {arr.size}")
            arr = arr.reshape(shape)
        self.devices: np.ndarray | None = arr
        self._mesh: Mesh | AbstractMesh = Mesh(arr, axis_names)

    @classmethod
    def abstract(cls, shape: Sequence[int], axis_names: Sequence[str]) -> DeviceMesh:
        """A mesh with no devices behind it: enough for :func:`describe` and layout planning."""
        self = cls.__new__(cls)
        self.shape = tuple(int(s) for s in shape)
        self.axis_names = tuple(axis_names)
        if len(self.shape) != len(self.axis_names):
            raise ValueError(f"mesh shape {self.shape} and axis names {self.axis_names} differ in length")
        self.devices = None
        self._mesh = AbstractMesh(self.shape, self.axis_names)
        return self

    @property
    def jax_mesh(self) -> Mesh | AbstractMesh:
        return self._mesh

    @property
    def is_abstract(self) -> bool:
        return self.devices is None

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def axis_size(self, name: str) -> int:
        return self.shape[self.axis_names.index(name)]

    def __repr__(self) -> str:
        axes = ", ".join(f"{a}={s}" for a, s in zip(self.axis_names, self.shape, strict=True))
        return f"DeviceMesh({axes}{', abstract' if self.is_abstract else ''})"


# ---- layout maps ---------------------------------------------------------------------------------------


def _normalize_spec(spec: Any) -> Spec:
    if isinstance(spec, PartitionSpec):
        spec = tuple(spec)
    if isinstance(spec, str) or spec is None:
        spec = (spec,)
    out: list[AxisEntry] = []
    for e in spec:
        if e is None or isinstance(e, str):
            out.append(e)
        elif isinstance(e, (tuple, list)) and all(isinstance(a, str) for a in e):
            out.append(tuple(e) if len(e) != 1 else e[0])
        else:
            raise TypeError(f"partition spec entries must be None, an axis name or a tuple of names, "
                            f"got {e!r}")
    return tuple(out)


def _axes_of(entry: AxisEntry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _entry(axes: Sequence[str]) -> AxisEntry:
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else tuple(axes)


@dataclass
class Resolution:
    """How one weight is laid out: the final spec, the rule that produced it, and any fallback notes."""

    path: str
    shape: tuple[int, ...]
    spec: Spec
    rule: str | None
    notes: list[str] = field(default_factory=list)

    @property
    def partition_spec(self) -> PartitionSpec:
        return PartitionSpec(*self.spec)


class LayoutMap(MutableMapping[str, Spec]):
    """Regular expressions over ``/``-joined weight paths -> partition specs.

    * Keys are matched with :func:`re.search`, so ``"decoder_block.*attention.*(query|key|value).kernel"``
      (the Keras tutorials' key) matches ``decoder_block/attention/query/kernel``. **The first key that matches, in
      insertion order, wins** (Keras raises on several matches; an ordered first-match lets a specific rule
      placed first override a general one).
    * A value is a tuple with one entry per weight dimension: a mesh axis name, a tuple of axis names, or
      ``None`` (replicated along that dimension). Weights no key matches are replicated.
    * A spec written for one layer applies to the layer-stacked weight (``decoder_block/...``, one more
      dimension) with ``None`` prepended for the layer axis.
    * Indexing with an existing key returns its spec (mapping semantics); :meth:`match` does the regex lookup.
    """

    def __init__(self, device_mesh: DeviceMesh | None = None) -> None:
        self.device_mesh = device_mesh
        self._rules: dict[str, Spec] = {}
        self._compiled: dict[str, re.Pattern[str]] = {}
        self._defaults: set[str] = set()

    def set_default(self, key: str, spec: Any) -> None:
        """A rule that every rule set later with ``[]`` takes precedence over (the derived default layout)."""
        self[key] = spec
        self._defaults.add(key)

    # MutableMapping
    def __getitem__(self, key: str) -> Spec:
        return self._rules[key]

    def __setitem__(self, key: str, spec: Any) -> None:
        norm = _normalize_spec(spec)
        seen: list[str] = []
        for e in norm:
            for a in _axes_of(e):
                if a in seen:
                    raise ValueError(f"layout rule {key!r}: mesh axis {a!r} used twice in {norm}")
                seen.append(a)
        if self.device_mesh is not None:
            unknown = [a for a in seen if a not in self.device_mesh.axis_names]
            if unknown:
                raise ValueError(f"layout rule {key!r} -> {norm} names mesh axes {unknown} that the mesh "
                                 f"{self.device_mesh.axis_names} does not have")
        self._defaults.discard(key)
        if self._defaults and key not in self._rules:  # a user rule goes before the derived defaults
            user = {k: v for k, v in self._rules.items() if k not in self._defaults}
            defaults = {k: v for k, v in self._rules.items() if k in self._defaults}
            self._rules = {**user, key: norm, **defaults}
            self._compiled = {k: self._compiled.get(k) or re.compile(k) for k in self._rules}
            self._compiled[key] = re.compile(key)
            return
        self._compiled[key] = re.compile(key)
        self._rules[key] = norm

    def __delitem__(self, key: str) -> None:
        del self._rules[key]
        del self._compiled[key]
        self._defaults.discard(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._rules)

    def __len__(self) -> int:
        return len(self._rules)

    def __repr__(self) -> str:
        body = ", ".join(f"{k!r}: {v}" for k, v in self._rules.items())
        return f"LayoutMap({self.device_mesh}, {{{body}}})"

    @property
    def mesh(self) -> DeviceMesh | None:
        return self.device_mesh

    def match(self, path: str) -> tuple[str, Spec] | None:
        """The first rule (insertion order) whose regex ``re.search``-matches ``path``, or None."""
        for key, pat in self._compiled.items():
            if pat.search(path):
                return key, self._rules[key]
        return None

    def resolve(self, path: str, shape: Sequence[int], mesh: DeviceMesh | None = None,
                fsdp_axis: str | None = None) -> Resolution:
        """The spec of one weight after the rank adaptation, divisibility fallbacks and FSDP.

        Raises ValueError when the matching rule's rank fits neither the weight nor its per-layer slice.
        """
        mesh = mesh or self.device_mesh
        shape = tuple(int(s) for s in shape)
        hit = self.match(path)
        if hit is None:
            res = Resolution(path, shape, (None,) * len(shape), None)
        else:
            key, spec = hit
            res = Resolution(path, shape, _fit_rank(path, shape, key, spec), key)
        if mesh is not None:
            _fix_divisibility(res, mesh, _is_stacked(path, shape))
            if fsdp_axis:
                _add_fsdp(res, mesh, fsdp_axis, _is_stacked(path, shape))
        return res


#: Prefixes of layer-stacked weights (leading layer axis): the decoder, RecurrentGemma's two block kinds,
#: PaliGemma's SigLIP encoder, Gemma 3n's key/value weights of its KV-computing layers.
STACKED_PREFIXES = (LAYER_PREFIX, "recurrent_block/", "attention_block/", "vision_encoder/encoder_block/",
                    "kv_block/")


def _is_stacked(path: str, shape: Sequence[int]) -> bool:
    return any(path.startswith(p) or f"/{p}" in path for p in STACKED_PREFIXES) and len(shape) >= 1


def _fit_rank(path: str, shape: tuple[int, ...], key: str, spec: Spec) -> Spec:
    if len(spec) == len(shape):
        return spec
    if len(spec) == len(shape) - 1 and _is_stacked(path, shape):
        return (None, *spec)
    stacked = f" (or its per-layer rank {len(shape) - 1})" if _is_stacked(path, shape) else ""
    raise ValueError(
        f"layout rule {key!r} -> {spec} has rank {len(spec)}, but the weight {path!r} it matches has shape "
        f"{shape} (rank {len(shape)}){stacked}; write one entry per dimension or make the regex more "
        "specific")


def _fix_divisibility(res: Resolution, mesh: DeviceMesh, stacked: bool) -> None:
    """Move mesh axes that do not divide their dimension to the largest free dimension they divide."""
    sizes = dict(zip(mesh.axis_names, mesh.shape, strict=True))
    entries = [list(_axes_of(e)) for e in res.spec]
    pending: list[tuple[str, int]] = []
    for i, axes in enumerate(entries):
        kept: list[str] = []
        for a in axes:
            if a not in sizes:
                res.notes.append(f"{res.path}: mesh axis {a!r} is not in mesh {mesh.axis_names}; "
                                 f"dim {i} left replicated over it")
                continue
            prod = math.prod(sizes[k] for k in kept) * sizes[a]
            if res.shape[i] % prod == 0:
                kept.append(a)
            else:
                pending.append((a, i))
        entries[i] = kept
    for a, src in pending:
        n = sizes[a]
        candidates = [j for j in range(len(res.shape))
                      if not entries[j] and not (stacked and j == 0) and res.shape[j] % n == 0]
        if candidates:
            j = max(candidates, key=lambda j: (res.shape[j], -j))
            entries[j] = [a]
            res.notes.append(f"{res.path} {res.shape}: mesh axis {a!r} (size {n}) does not divide dim {src} "
                             f"(size {res.shape[src]}); sharded dim {j} (size {res.shape[j]}) instead")
        else:
            res.notes.append(f"{res.path} {res.shape}: mesh axis {a!r} (size {n}) does not divide dim {src} "
                             f"(size {res.shape[src]}) nor any free dimension; replicated over {a!r}")
    res.spec = tuple(_entry(e) for e in entries)


def _add_fsdp(res: Resolution, mesh: DeviceMesh, axis: str, stacked: bool) -> None:
    """ZeRO-3: also shard the largest still-unsharded dimension that the data axis divides."""
    if axis not in mesh.axis_names or mesh.axis_size(axis) == 1:
        return
    if any(axis in _axes_of(e) for e in res.spec):
        return
    n = mesh.axis_size(axis)
    candidates = [j for j, e in enumerate(res.spec)
                  if e is None and not (stacked and j == 0) and res.shape[j] % n == 0]
    if not candidates:
        if math.prod(res.shape) >= 1 << 16:  # only worth a note for weights that matter
            res.notes.append(f"{res.path} {res.shape}: fsdp found no free dimension divisible by {axis!r} "
                             f"(size {n}); replicated over it")
        return
    j = max(candidates, key=lambda j: (res.shape[j], -j))
    spec = list(res.spec)
    spec[j] = axis
    res.spec = tuple(spec)


def _align(factor_shape: tuple[int, ...], factor_dims: list[int], main_shape: tuple[int, ...],
           main_spec: Spec, from_right: bool, stacked: bool) -> list[AxisEntry]:
    """Give each of ``factor_dims`` the axis of the main weight's dimension of the same size, matching in
    order (left to right for inputs, right to left for outputs); unmatched dims are replicated."""
    out: list[AxisEntry] = [None] * len(factor_shape)
    dims = list(factor_dims)
    if stacked and 0 in dims and main_shape:
        out[0] = main_spec[0]
        dims.remove(0)
    main_idx = list(range(1 if stacked else 0, len(main_shape)))
    if from_right:
        dims, main_idx = dims[::-1], main_idx[::-1]
    cursor = 0
    for d in dims:
        for k in range(cursor, len(main_idx)):
            if main_shape[main_idx[k]] == factor_shape[d]:
                out[d] = main_spec[main_idx[k]]
                cursor = k + 1
                break
    return out


def _derive(name: str, shape: tuple[int, ...], main_shape: tuple[int, ...], main_spec: Spec,
            stacked: bool) -> Spec:
    """Spec of a LoRA factor or quantization scale from its main weight's spec.

    ``lora_a`` is ``[..., in, r]``: its input dims follow the kernel's; the rank dim is replicated.
    ``lora_b`` is ``[..., r, out]`` (layer axis first when stacked): its output dims follow the kernel's.
    Scales are shaped like the kernel's trailing (output) dims.
    """
    m = len(shape)
    if m == 0:
        return ()
    if name == "lora_a":
        return tuple(_align(shape, list(range(m - 1)), main_shape, main_spec, False, stacked))
    if name == "lora_b":
        rank_dim = 1 if stacked and m >= 2 else 0
        dims = [d for d in range(m) if d != rank_dim]
        return tuple(_align(shape, dims, main_shape, main_spec, True, stacked))
    return tuple(_align(shape, list(range(m)), main_shape, main_spec, True, stacked))


# ---- tree helpers --------------------------------------------------------------------------------------


def _key_name(k: Any) -> tuple[str, bool]:
    """(name, is_index) of one pytree key."""
    if isinstance(k, jax.tree_util.DictKey):
        return str(k.key), False
    if isinstance(k, jax.tree_util.GetAttrKey):
        return str(k.name), False
    if isinstance(k, jax.tree_util.SequenceKey):
        return str(k.idx), True
    if isinstance(k, jax.tree_util.FlattenedIndexKey):
        return str(k.key), True
    return str(k), False


def _path_str(keypath: Sequence[Any], keep_indices: bool = True) -> str:
    parts = [n for n, idx in (_key_name(k) for k in keypath) if keep_indices or not idx]
    return "/".join(parts)


def named_leaves(tree: Any, prefix: str = "", keep_indices: bool = False) -> list[tuple[str, Any]]:
    """``[(path, leaf)]`` with ``/``-joined paths, e.g. ``adamw/mu/decoder_block/attention/query/kernel``
    for ``named_leaves(opt_state, "adamw")`` — the names the Keras tutorials' print loops show. Tuple indices (optax
    chains) are dropped unless ``keep_indices``."""
    out = []
    for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        p = _path_str(kp, keep_indices)
        out.append((f"{prefix}/{p}" if prefix and p else (prefix or p), leaf))
    return out


def _shape_of(x: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in np.shape(x)) if not hasattr(x, "shape") else tuple(int(s) for s in x.shape)


def _dtype_of(x: Any, default: Any = np.float32) -> np.dtype:
    dt = getattr(x, "dtype", None)
    return np.dtype(dt if dt is not None else default)


def _is_spec_leaf(x: Any) -> bool:
    """model.ParamSpec and ShapeDtypeStruct-like objects are leaves (they carry a shape, not children)."""
    return hasattr(x, "shape") and not isinstance(x, (dict, list, tuple))


# ---- distributions ---------------------------------------------------------------------------------------


class Distribution:
    """Where weights and batches live. Subclasses differ only in their layout rules."""

    def __init__(self, device_mesh: DeviceMesh, layout_map: LayoutMap | None = None,
                 batch_dim_name: str | None = "batch", fsdp: bool | str = False) -> None:
        self.device_mesh = device_mesh
        self.layout_map = layout_map if layout_map is not None else LayoutMap(device_mesh)
        self.batch_dim_name = batch_dim_name
        if fsdp is True:
            fsdp = batch_dim_name or ""
        self.fsdp_axis: str | None = fsdp or None
        if self.fsdp_axis and self.fsdp_axis not in device_mesh.axis_names:
            raise ValueError(f"fsdp axis {self.fsdp_axis!r} is not in mesh {device_mesh.axis_names}")
        #: One message per layout decision that differs from the rules (fallbacks, replications).
        self.plan: list[str] = []
        self._plan_seen: set[str] = set()

    # -- spec resolution --
    @property
    def mesh(self) -> Mesh | AbstractMesh:
        return self.device_mesh.jax_mesh

    def _note(self, notes: Iterable[str]) -> None:
        for n in notes:
            if n not in self._plan_seen:
                self._plan_seen.add(n)
                self.plan.append(n)

    def resolve(self, path: str, shape: Sequence[int],
                siblings: Mapping[str, tuple[int, ...]] | None = None) -> Resolution:
        """Full layout decision for one weight; ``siblings`` maps paths to shapes of the same tree so that
        LoRA factors and quantization scales can follow their kernel."""
        shape = tuple(int(s) for s in shape)
        parent, _, name = path.rpartition("/")
        main = None
        if name in _DERIVED:
            for m in _MAIN_WEIGHTS:
                p = f"{parent}/{m}" if parent else m
                if siblings is not None and p in siblings:
                    main = p
                    break
            if main is None and name in ("lora_a", "lora_b") and parent:
                main = f"{parent}/kernel"
        if main is not None:
            hit = self.layout_map.match(path)
            explicit = hit is not None and not self.layout_map._compiled[hit[0]].search(main)
            if not explicit:
                main_shape = siblings.get(main) if siblings is not None else None
                if main_shape is None:
                    res = Resolution(path, shape, (None,) * len(shape), None,
                                     [f"{path}: main weight {main} unknown; replicated"])
                else:
                    mres = self.layout_map.resolve(main, main_shape, self.device_mesh, None)
                    spec = _derive(name, shape, tuple(main_shape), mres.spec, _is_stacked(path, shape))
                    res = Resolution(path, shape, spec, f"(follows {main})")
                    _fix_divisibility(res, self.device_mesh, _is_stacked(path, shape))
                if self.fsdp_axis:
                    _add_fsdp(res, self.device_mesh, self.fsdp_axis, _is_stacked(path, shape))
                self._note(res.notes)
                return res
        if name in _GROUPED:  # both follow the rule of the kernel they replace
            hit = self.layout_map.match(path) if name == "qkernel" else None
            hit = hit or self.layout_map.match(f"{parent}/kernel")
            if hit is not None and len(hit[1]) not in (len(shape), len(shape) - 1 * _is_stacked(path, shape)):
                res = self._grouped(path, shape, hit, siblings)
                self._note(res.notes)
                return res
        res = self.layout_map.resolve(path, shape, self.device_mesh, self.fsdp_axis)
        self._note(res.notes)
        return res

    def _grouped(self, path: str, shape: tuple[int, ...], hit: tuple[str, Spec],
                 siblings: Mapping[str, tuple[int, ...]] | None) -> Resolution:
        """A kernel rule on a grouped-quantized leaf (one dim more): the group axis ``k`` is where the
        sibling ``qscale`` has its size-1 dim; dims before it keep the rule's axes, the group count takes the
        split dimension's axis, the group size is replicated, trailing dims keep theirs. Without that
        information the leaf is replicated (noted in the plan) — loading a quantized model never fails."""
        key, spec = hit
        stacked = _is_stacked(path, shape)
        full = (None, *spec) if stacked and len(spec) == len(shape) - 2 else spec
        parent, _, name = path.rpartition("/")
        qs = siblings.get(f"{parent}/qscale") if siblings is not None else None
        ones = [i for i, n in enumerate(qs or ()) if n == 1 and i > 0]
        if name in _GROUPED and len(full) == len(shape) - 1 and qs is not None and len(qs) == len(shape) \
                and ones:
            g = ones[-1] - 1  # the n_groups dim; g + 1 is group_size
            new = [*full[:g], full[g], None, *full[g + 1:]]
            res = Resolution(path, shape, tuple(new), key)
            _fix_divisibility(res, self.device_mesh, stacked)
        else:
            res = Resolution(path, shape, (None,) * len(shape), key,
                             [f"{path} {shape}: rule {key!r} -> {spec} does not fit this auxiliary leaf; "
                              "replicated"])
        if self.fsdp_axis:
            _add_fsdp(res, self.device_mesh, self.fsdp_axis, stacked)
        return res

    def spec_for(self, path: str, shape: Sequence[int]) -> PartitionSpec:
        return self.resolve(path, shape).partition_spec

    def sharding_for(self, path: str, shape: Sequence[int],
                     siblings: Mapping[str, tuple[int, ...]] | None = None) -> NamedSharding:
        """The :class:`NamedSharding` of the weight at ``path`` with ``shape``."""
        return NamedSharding(self.mesh, self.resolve(path, shape, siblings).partition_spec)

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def param_shardings(self, tree: Any) -> Any:
        """A tree like ``tree`` (arrays, ShapeDtypeStructs or model.ParamSpecs) holding NamedShardings."""
        flat = named_leaves(tree, keep_indices=True) if not _is_spec_leaf(tree) else [("", tree)]
        shapes = {p: _shape_of(x) for p, x in flat}
        leaves = [self.sharding_for(p, shapes[p], shapes) for p, _ in flat]
        treedef = jax.tree_util.tree_structure(tree, is_leaf=_is_spec_leaf)
        return jax.tree_util.tree_unflatten(treedef, leaves)

    def abstract_shardings(self, specs: Mapping[str, Any]) -> dict[str, NamedSharding]:
        """``{path: NamedSharding}`` from ``{path: ParamSpec | ShapeDtypeStruct}`` (e.g.
        ``model.param_specs(config)``); nothing is allocated."""
        shapes = {p: _shape_of(s) for p, s in specs.items()}
        return {p: self.sharding_for(p, s, shapes) for p, s in shapes.items()}

    def shard_params(self, params: Any) -> Any:
        """Put every leaf on its sharding (works with host arrays in multi-process runs too)."""
        shardings = self.param_shardings(params)
        return jax.tree_util.tree_map(_put, params, shardings)

    def init_params(self, init_fn: Callable[[], Any]) -> Any:
        """Run ``init_fn`` (e.g. ``lambda: model.init_params(cfg, key)``) compiled with sharded outputs, so
        each device only ever materializes its own shards — how a model larger than one device is built."""
        abstract = jax.eval_shape(init_fn)
        return jax.jit(init_fn, out_shardings=self.param_shardings(abstract))()

    def opt_state_shardings(self, opt_state: Any, params: Any) -> Any:
        """Shardings for an optax state: leaves mirroring a weight get its sharding, others replicate."""
        return shard_like(opt_state, self.param_shardings(params), params)

    def init_optimizer(self, optimizer: Any, params: Any) -> Any:
        """``optimizer.init(params)`` compiled so the states are born sharded like their weights."""
        abstract = jax.eval_shape(optimizer.init, params)
        return jax.jit(optimizer.init, out_shardings=self.opt_state_shardings(abstract, params))(params)

    # -- batches --
    def batch_sharding(self, ndim: int = 2) -> NamedSharding:
        """Batches and activations: the leading dimension split over ``batch_dim_name``."""
        if ndim == 0 or not self.batch_dim_name or self.batch_dim_name not in self.device_mesh.axis_names:
            return self.replicated()
        return NamedSharding(self.mesh, PartitionSpec(self.batch_dim_name, *([None] * (ndim - 1))))

    def shard_batch(self, batch: Any) -> Any:
        """Place a *global* batch (the same host data on every process) split along its first dimension."""
        return jax.tree_util.tree_map(lambda x: _put(x, self.batch_sharding(np.ndim(x))), batch)

    def replicate_batch(self, batch: Any) -> Any:
        """Place a global batch whole on every device (arrays whose leading dimension the batch axis does not
        divide, e.g. a GRPO batch's prompt groups)."""
        return jax.tree_util.tree_map(lambda x: _put(x, self.replicated()), batch)

    def shard_local_batch(self, batch: Any) -> Any:
        """Assemble a global batch from each process's own rows (multi-host data loading): process ``i``
        passes its slice; the global batch is the concatenation in process order."""
        return jax.tree_util.tree_map(
            lambda x: jax.make_array_from_process_local_data(self.batch_sharding(np.ndim(x)), np.asarray(x)),
            batch)

    # -- default distribution --
    def scope(self) -> contextlib.AbstractContextManager[Distribution]:
        """``with dist.scope():`` makes this the default distribution inside the block."""
        return use_distribution(self)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.device_mesh}, rules={len(self.layout_map)}, "
                f"batch_dim_name={self.batch_dim_name!r}, fsdp={self.fsdp_axis!r})")


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
    """device_put that also works when the sharding spans devices of other processes: every process holds
    the same full host value, and each fills its own shards."""
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


class ModelParallel(Distribution):
    """Weights split by a :class:`LayoutMap`; batches split over ``batch_dim_name``.

    ``ModelParallel(device_mesh, layout_map, batch_dim_name="batch")`` as in the Keras tutorials; ``device_mesh`` may be
    omitted when the layout map has one. With several devices on the batch axis this is data parallel too.
    ``fsdp=True`` additionally shards each weight's largest free dimension over the batch axis (ZeRO-3):
    weights and optimizer states then scale down with the data-parallel degree as well.
    """

    def __init__(self, device_mesh: DeviceMesh | None = None, layout_map: LayoutMap | None = None,
                 batch_dim_name: str = "batch", fsdp: bool | str = False) -> None:
        if device_mesh is None:
            if layout_map is None or layout_map.device_mesh is None:
                raise ValueError("ModelParallel needs a device_mesh, or a layout_map built with one")
            device_mesh = layout_map.device_mesh
        if layout_map is None:
            layout_map = LayoutMap(device_mesh)
        super().__init__(device_mesh, layout_map, batch_dim_name, fsdp)


class DataParallel(Distribution):
    """Every weight replicated, batches split over all devices (a 1-D mesh with axis "batch")."""

    def __init__(self, devices: Sequence[jax.Device] | None = None,
                 device_mesh: DeviceMesh | None = None) -> None:
        if device_mesh is None:
            devs = list(devices) if devices is not None else list_devices()
            device_mesh = DeviceMesh((len(devs),), ("batch",), devs)
        super().__init__(device_mesh, LayoutMap(device_mesh), device_mesh.axis_names[0])


_CURRENT: Distribution | None = None


def set_distribution(dist: Distribution | None) -> None:
    """Make ``dist`` the process-wide default (None clears it); code that builds or trains models asks
    :func:`distribution` where to put things."""
    global _CURRENT
    _CURRENT = dist


def distribution() -> Distribution | None:
    """The current default distribution, or None (single device)."""
    return _CURRENT


@contextlib.contextmanager
def use_distribution(dist: Distribution | None) -> Iterator[Distribution | None]:
    """Temporarily set the default distribution (restored on exit, even on error)."""
    global _CURRENT
    prev = _CURRENT
    _CURRENT = dist
    try:
        yield dist
    finally:
        _CURRENT = prev


# ---- the Gemma layout ------------------------------------------------------------------------------------


#: Logical axes (as families declare them on every weight) -> the mesh axis role that splits them by default:
#: "model" (tensor parallel: vocabulary, heads, MLP and recurrence widths; a mixture's experts, each whole on
#: its device) or "data" (the second dimension of the Keras tutorials' 2-D maps, and FSDP). Any other logical
#: axis (layers, head_dim, norms...) stays whole.
LOGICAL_AXIS_RULES: dict[str, str] = {
    "vocab": "model", "heads": "model", "kv_heads": "model", "mlp": "model", "lru": "model",
    "experts": "model", "embed": "data",
}


def layout_from_specs(specs: Mapping[str, Any], mesh: DeviceMesh, model_axis: str = "model",
                      data_axis: str | None = None, rules: Mapping[str, str] | None = None) -> LayoutMap:
    """A layout map from declared logical axes: each weight's axes mapped through ``rules`` (logical axis ->
    "model" / "data"). Only weights with a model-parallel axis are split (norm scales and biases stay
    replicated, as in the Gemma papers' layout); the divisibility fallback of :meth:`LayoutMap.resolve`
    replicates a dimension the mesh axis does not divide. The rules are defaults: a rule the user adds
    afterwards is matched before them."""
    rules = LOGICAL_AXIS_RULES if rules is None else rules
    roles = {"model": model_axis, "data": data_axis}
    lm = LayoutMap(mesh)
    for path, spec in specs.items():
        axes = spec.axes[1:] if spec.axes[:1] == ("layers",) else spec.axes  # rules are written per layer
        kinds = [rules.get(a) if a else None for a in axes]
        if "model" not in kinds:
            continue
        # a kernel's rule also matches its grouped-quantized form (qkernel), adapted by LayoutMap.resolve
        key = "^" + (re.escape(path[:-6]) + "q?kernel" if path.endswith("/kernel") else re.escape(path)) + "$"
        lm.set_default(key, tuple(roles[k] if k else None for k in kinds))
    return lm


def get_layout_map(config: Any = None, mesh: DeviceMesh | None = None, model_axis: str = "model",
                   data_axis: str | None = None, fsdp: bool = False) -> LayoutMap:
    """The recommended layout of a model (``backbone.get_layout_map`` in the Keras tutorials), derived from
    the logical axes its family declares on every weight (:func:`layout_from_specs`).

    ``config``: the model's config (any family, or an ``EncoderConfig``); None means the Gemma decoder's weights. With
    ``data_axis=None`` weights are split on the model axis only (embedding ``("model", None)``); naming a
    data axis (e.g. "batch") also splits their embedding dimension over it (embedding ``("model", "data")``).
    ``fsdp=True`` with no ``data_axis`` uses "batch" when the mesh has it. LoRA factors and quantization
    scales follow their kernel automatically (no rule needed).
    """
    if mesh is None:
        raise ValueError("get_layout_map needs the DeviceMesh the layout is for")
    if model_axis not in mesh.axis_names:
        raise ValueError(f"model axis {model_axis!r} is not in mesh {mesh.axis_names}")
    if fsdp and data_axis is None:
        data_axis = "batch" if "batch" in mesh.axis_names else None
        if data_axis is None:
            raise ValueError("fsdp=True needs a data_axis (the mesh has no 'batch' axis)")
    if config is None:  # the decoder's weights, untied head included (a rule that matches nothing is harmless)
        fam = base.get("gemma")
        specs = dict(fam.param_specs(fam.tiny_config("llama")))
        specs.update(fam.param_specs(fam.tiny_config("gemma3")))
    elif callable(getattr(config, "param_specs", None)):  # a model that declares its own weights (TextEncoder's)
        specs = config.param_specs()
    else:
        specs = base.for_config(config).param_specs(config)
    return layout_from_specs(specs, mesh, model_axis, data_axis)


# ---- optimizer states ---------------------------------------------------------------------------------


def shard_like(opt_state: Any, params_shardings: Any, params: Any = None) -> Any:
    """Shardings for ``opt_state`` (any optax state): a leaf whose path ends with a weight's path (AdamW's
    ``mu``/``nu`` mirror the params tree) and has that weight's shape gets the weight's sharding; everything
    else (step counts, empty states) is replicated.

    ``params_shardings`` is a tree like the params (or a flat ``{path: sharding}``); ``params`` (optional,
    arrays or abstract) lets shapes be checked, which keeps e.g. a factored second moment from inheriting a
    sharding of the wrong rank.
    """
    flat_sh = dict(named_leaves(params_shardings, keep_indices=True)) if not isinstance(
        params_shardings, NamedSharding) else {"": params_shardings}
    if not flat_sh:
        raise ValueError("shard_like needs at least one parameter sharding")
    shapes = ({p: _shape_of(x) for p, x in named_leaves(params, keep_indices=True)}
              if params is not None else {})
    any_sharding = next(iter(flat_sh.values()))
    replicated = NamedSharding(any_sharding.mesh, PartitionSpec())
    by_len = sorted(flat_sh, key=len, reverse=True)

    def pick(kp: Sequence[Any], leaf: Any) -> NamedSharding:
        path = _path_str(kp)
        shape = _shape_of(leaf)
        if not shape:
            return replicated
        for p in by_len:
            if path == p or path.endswith("/" + p):
                sh = flat_sh[p]
                if p in shapes and shapes[p] != shape:
                    continue
                if len(sh.spec) > len(shape):
                    continue
                return sh
        return replicated

    return jax.tree_util.tree_map_with_path(pick, opt_state)


# ---- describe: the per-device memory table --------------------------------------------------------------


@dataclass
class DescriptionRow:
    name: str
    shape: tuple[int, ...]
    dtype: str
    spec: PartitionSpec
    bytes_per_device: int
    bytes_total: int
    kind: str  # "param" | "optimizer"


@dataclass
class Description:
    """Structured form of :func:`describe`: one row per weight / optimizer state, totals, plan notes."""

    rows: list[DescriptionRow]
    mesh: DeviceMesh
    plan: list[str]

    @property
    def params_bytes_per_device(self) -> int:
        return sum(r.bytes_per_device for r in self.rows if r.kind == "param")

    @property
    def optimizer_bytes_per_device(self) -> int:
        return sum(r.bytes_per_device for r in self.rows if r.kind == "optimizer")

    @property
    def total_bytes_per_device(self) -> int:
        return sum(r.bytes_per_device for r in self.rows)

    def row(self, name: str) -> DescriptionRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def table(self) -> str:
        w = max([58] + [len(r.name) for r in self.rows])
        lines = [f"# mesh: {self.mesh}",
                 f"{'name':<{w}}  {'shape':<22}  {'dtype':<8}  {'layout spec':<40}  {'bytes/device':>14}"]
        for r in self.rows:
            lines.append(f"{r.name:<{w}}  {str(r.shape):<22}  {r.dtype:<8}  {str(r.spec):<40}  "
                         f"{r.bytes_per_device:>14,}")
        lines.append(f"params per device:     {_human(self.params_bytes_per_device)}")
        if self.optimizer_bytes_per_device:
            lines.append(f"optimizer per device:  {_human(self.optimizer_bytes_per_device)}")
        lines.append(f"total per device:      {_human(self.total_bytes_per_device)} "
                     f"({self.total_bytes_per_device:,} bytes)")
        if self.plan:
            lines.append("layout decisions:")
            lines.extend(f"  - {p}" for p in self.plan)
        return "\n".join(lines)

    __str__ = table


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _shard_bytes(shape: tuple[int, ...], spec: PartitionSpec, mesh: DeviceMesh, itemsize: int) -> int:
    sizes = dict(zip(mesh.axis_names, mesh.shape, strict=True))
    n = 1
    for i, s in enumerate(shape):
        e = spec[i] if i < len(spec) else None
        div = math.prod(sizes[a] for a in _axes_of(e))
        n *= -(-s // div)
    return n * itemsize


def _abstract_tree(params_or_specs: Any, param_dtype: Any) -> Any:
    """Params / ParamSpecs / ShapeDtypeStructs / a ModelConfig -> a tree of ShapeDtypeStructs."""
    if hasattr(params_or_specs, "to_dict") and hasattr(params_or_specs, "vocab_size"):
        params_or_specs = base.for_config(params_or_specs).param_specs(params_or_specs)

    def to_sds(x: Any) -> jax.ShapeDtypeStruct:
        dt = np.dtype(param_dtype) if param_dtype is not None else _dtype_of(x)
        return jax.ShapeDtypeStruct(_shape_of(x), dt)

    return jax.tree_util.tree_map(to_sds, params_or_specs, is_leaf=_is_spec_leaf)


def _optimizer_name(opt_state: Any) -> str:
    """A readable prefix for optimizer rows: optax states carry no name, so recognise Adam(W) by its state
    (adamw = chain(scale_by_adam, add_decayed_weights, scale)); pass ``optimizer_name`` to override."""
    states = {type(x).__name__ for x in _walk_nodes(opt_state)}
    if "ScaleByAdamState" in states:
        return "adamw" if isinstance(opt_state, tuple) and len(opt_state) >= 3 else "adam"
    return "optimizer"


def _walk_nodes(tree: Any) -> Iterator[Any]:
    yield tree
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _walk_nodes(v)
    elif isinstance(tree, (tuple, list)):
        for v in tree:
            yield from _walk_nodes(v)


def describe_rows(params_or_specs: Any, distribution: Distribution, optimizer: Any = None,
                  optimizer_name: str | None = None, param_dtype: Any = None) -> Description:
    """Structured :func:`describe`. ``params_or_specs``: a params tree (arrays or ShapeDtypeStructs), the
    ``{path: ParamSpec}`` of ``model.param_specs`` or a ModelConfig; ``param_dtype`` overrides the weights'
    dtype (ParamSpecs carry none; float32 by default). ``optimizer`` is an optax GradientTransformation whose
    state is traced abstractly (``jax.eval_shape``): nothing is allocated."""
    abstract = _abstract_tree(params_or_specs, param_dtype)
    mesh = distribution.device_mesh
    shardings = distribution.param_shardings(abstract)
    rows = []
    sh_flat = dict(named_leaves(shardings, keep_indices=True))
    for path, x in named_leaves(abstract, keep_indices=True):
        spec = sh_flat[path].spec
        rows.append(DescriptionRow(path, x.shape, str(x.dtype), spec,
                                   _shard_bytes(x.shape, spec, mesh, x.dtype.itemsize),
                                   math.prod(x.shape) * x.dtype.itemsize, "param"))
    if optimizer is not None:
        state = jax.eval_shape(optimizer.init, abstract)
        name = optimizer_name or _optimizer_name(state)
        st_sh = shard_like(state, shardings, abstract)
        for (p, x), (_, sh) in zip(named_leaves(state, name), named_leaves(st_sh, name), strict=True):
            rows.append(DescriptionRow(p, tuple(x.shape), str(x.dtype), sh.spec,
                                       _shard_bytes(tuple(x.shape), sh.spec, mesh, x.dtype.itemsize),
                                       math.prod(x.shape) * x.dtype.itemsize, "optimizer"))
    return Description(rows, mesh, list(distribution.plan))


def describe(params_or_specs: Any, distribution: Distribution, optimizer: Any = None,
             optimizer_name: str | None = None, param_dtype: Any = None) -> str:
    """The table the Keras tutorials print — name, shape, PartitionSpec, bytes per device — for every weight and (with
    ``optimizer``) every optimizer state, then the per-device totals and the layout decisions."""
    return describe_rows(params_or_specs, distribution, optimizer, optimizer_name, param_dtype).table()


# ---- multi-host ------------------------------------------------------------------------------------------


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: int | Sequence[int] | None = None,
               **kwargs: Any) -> None:
    """Start multi-host JAX: call once per process, before anything touches a device.

    Arguments default to ``GEMMAX_COORDINATOR`` ("host:port" of process 0), ``GEMMAX_NUM_PROCESSES``,
    ``GEMMAX_PROCESS_ID``; with none of them given, JAX auto-detects the cluster (Cloud TPU slices, SLURM,
    Open MPI, Kubernetes...). Calling it again in an initialized process does nothing. Extra keyword arguments
    go to :func:`jax.distributed.initialize`.
    """
    if jax.distributed.is_initialized():
        return
    env = os.environ
    coordinator_address = coordinator_address or env.get("GEMMAX_COORDINATOR") or None
    if num_processes is None and env.get("GEMMAX_NUM_PROCESSES"):
        num_processes = int(env["GEMMAX_NUM_PROCESSES"])
    if process_id is None and env.get("GEMMAX_PROCESS_ID"):
        process_id = int(env["GEMMAX_PROCESS_ID"])
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids, **kwargs)
