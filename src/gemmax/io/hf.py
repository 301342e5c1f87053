"""Hugging Face checkpoints: streamed safetensors reading, name/layout conversion, export.

Reading is done over memory maps: a tensor is only read (and converted to the target dtype) when the
loader asks for it, one stacked weight at a time, so peak host memory stays near the model's size in the
target dtype. Every file is validated up front (header, offsets against the file size), and every expected
tensor is checked for presence and shape *before* any weight is materialised: a bad checkpoint fails
with a message naming the tensor, never with a half-loaded model.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

_log = logging.getLogger(__name__)

_ST_DTYPES: dict[str, Any] = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file or tensor and what is wrong."""


# ---- safetensors ---------------------------------------------------------------------------------


class SafetensorsFile:
    """Zero-copy view of one .safetensors file (memory-mapped, validated on open).

    Read here rather than through the ``safetensors`` package so that weights stay memory-mapped views in
    their own dtype (bfloat16 as ``ml_dtypes``) that a loader slices per device; the header is validated as
    strictly as that package does it: every tensor's byte range non-negative, exactly its dtype x shape,
    and the ranges tiling the data section (no gap, no overlap, nothing past it).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        size = self.path.stat().st_size
        if size < 8:
            raise CheckpointError(f"{self.path}: truncated safetensors file ({size} bytes)")
        with open(self.path, "rb") as f:
            (hlen,) = struct.unpack("<Q", f.read(8))
            if hlen > size - 8 or hlen > 100 << 20:
                raise CheckpointError(f"{self.path}: corrupt safetensors header (length {hlen}, file {size} B)")
            raw = f.read(hlen)
        try:
            header = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise CheckpointError(f"{self.path}: corrupt safetensors header: {e}") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", {}) or {}
        self._base = 8 + hlen
        self._entries: dict[str, tuple[Any, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            try:
                dtype = _ST_DTYPES[e["dtype"]]
                shape = tuple(_count(s) for s in e["shape"])
                start, end = (_count(o) for o in e["data_offsets"])
                if len(e["data_offsets"]) != 2:
                    raise ValueError
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: bad header entry for tensor {name!r}: {e}") from None
            n = int(np.prod(shape, dtype=object)) * np.dtype(dtype).itemsize
            if end - start != n:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} has {end - start} bytes for shape {shape} {e['dtype']}")
            if self._base + end > size:
                raise CheckpointError(
                    f"{self.path}: truncated — tensor {name!r} ends at byte {self._base + end} but the file "
                    f"has {size}")
            self._entries[name] = (dtype, shape, start, end)
        at = 0  # the ranges, in file order, must tile [0, data size) exactly
        for name, (_, _, start, end) in sorted(self._entries.items(), key=lambda kv: kv[1][2:]):
            if start != at:
                what = "overlaps the tensor before it" if start < at else f"leaves a gap of {start - at} bytes"
                raise CheckpointError(f"{self.path}: tensor {name!r} (bytes {start}..{end}) {what}")
            at = end
        if self._base + at != size:
            raise CheckpointError(f"{self.path}: {size - self._base - at} bytes after the last tensor's data "
                                  "(the tensors must cover the data section exactly)")
        self._mm: mmap.mmap | None = None

    def keys(self) -> list[str]:
        return list(self._entries)

    def release(self) -> None:
        """Drop this file's pages from memory (they are clean and re-read on demand). Pages read through a
        memory map otherwise stay resident and count against the process until the map is closed."""
        if self._mm is not None and hasattr(self._mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            self._mm.madvise(mmap.MADV_DONTNEED)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only numpy view onto the mapped file (no copy)."""
        if self._mm is None:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        dtype, shape, start, end = self._entries[name]
        return np.frombuffer(self._mm, dtype=dtype, count=int(np.prod(shape)), offset=self._base + start
                             ).reshape(shape)


def _count(v: Any) -> int:
    """A non-negative integer from a header (a shape dimension or an offset); ValueError otherwise."""
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(v)
    return v


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
    """Write a .safetensors file atomically (temp file + rename), streaming tensors one by one."""
    rev = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    arrays = []
    for name, a in tensors.items():
        a = np.asarray(a)
        nbytes = a.size * a.dtype.itemsize
        header[name] = {"dtype": rev[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        arrays.append(a)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for a in arrays:
            f.write(np.ascontiguousarray(a).tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class TensorSource(Mapping[str, np.ndarray]):
    """A read-only mapping name -> tensor over the safetensors files of a checkpoint folder."""

    def __init__(self, files: list[SafetensorsFile]):
        self._where: dict[str, SafetensorsFile] = {}
        for f in files:
            for k in f.keys():
                self._where[k] = f

    def __getitem__(self, name: str) -> np.ndarray:
        return self._where[name].get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def release(self) -> None:
        for f in set(self._where.values()):
            f.release()


def open_safetensors_folder(folder: Path) -> TensorSource:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: unreadable shard index ({e})") from None
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).exists()]
        if missing:
            raise CheckpointError(f"{folder}: shard files named in the index are missing: {missing}")
        files = [SafetensorsFile(folder / n) for n in names]
    else:
        paths = sorted(folder.glob("*.safetensors"))
        if not paths:
            pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
            if pickles:
                raise CheckpointError(
                    f"{folder} holds only PyTorch pickles ({', '.join(pickles)}). gemmax never unpickles "
                    "files (a pickle can run arbitrary code). Convert once with torch's weights-only loader: "
                    "`gemmax.io.hf.convert_pickle_checkpoint(folder)` (needs torch), or use the safetensors "
                    "revision of the model.")
            raise CheckpointError(f"{folder}: no *.safetensors weights found")
        files = [SafetensorsFile(p) for p in paths]
    return TensorSource(files)


def convert_pickle_checkpoint(folder: str | os.PathLike) -> Path:
    """Turn pytorch_model*.bin into model.safetensors with ``torch.load(weights_only=True)``, which
    refuses anything but tensors, so no code in the pickle runs."""
    import torch

    folder = Path(folder)
    pickles = sorted(folder.glob("*.bin"))
    if not pickles:
        raise CheckpointError(f"{folder}: no *.bin PyTorch checkpoint to convert"
                              + (" (not a folder)" if not folder.is_dir() else ""))
    out: dict[str, np.ndarray] = {}
    for p in pickles:
        sd = torch.load(p, map_location="cpu", weights_only=True)
        for k, v in sd.items():
            out[k] = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
    target = folder / "model.safetensors"
    write_safetensors(target, out)
    return target


# ---- lazy weights and name tables ---------------------------------------------------------------


class LazyWeight:
    """A gemmax weight not yet read: its shape, and a function that reads any slice of it.

    Loading places each weight with ``jax.make_array_from_callback`` so that under a mesh every device
    reads only its own shard from the memory maps — no full copy of the model is ever made on one device.
    """

    def __init__(self, shape: tuple[int, ...], read: Callable[[tuple[slice, ...]], np.ndarray],
                 release: Callable[[], None] | None = None):
        self.shape = shape
        self._read = read
        self.release = release or (lambda: None)

    def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
        return self._read(index)


def _full(index: tuple, shape: tuple[int, ...]) -> tuple[slice, ...]:
    index = index if isinstance(index, tuple) else (index,)
    return tuple(index) + (slice(None),) * (len(shape) - len(index))


def raise_on_problems(problems: list[str], unexpected: list[str], what: str) -> None:
    """One error listing everything wrong with a checkpoint (missing, mis-shaped, unexpected tensors), raised
    before any weight is read: every loader (decoder, RecurrentGemma, PaliGemma) reports the same way."""
    if unexpected:
        problems = problems + [f"unexpected tensors (not part of a {what}): {sorted(unexpected)[:8]}"
                               + (f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else "")]
    if problems:
        raise CheckpointError("checkpoint does not match its config:\n  " + "\n  ".join(problems))


def canonical_names(names: Iterable[str], aliases: Sequence[tuple[str, str]] = ()) -> dict[str, str]:
    """Map each tensor name to the name a family's table uses: the first alias prefix that matches is
    replaced (``("language_model.model.", "model.")`` reads a multimodal wrapper's decoder). Returns
    canonical -> name in the file."""
    out: dict[str, str] = {}
    for n in names:
        c = n
        for pre, to in aliases:
            if n.startswith(pre):
                c = to + n[len(pre):]
                break
        out.setdefault(c, n)
    return out


def lazy_from_table(specs: Mapping[str, Any], table: Mapping[str, tuple[list[str] | str, Callable, Callable]],
                    source: Mapping[str, np.ndarray], dtype: Any,
                    shape_of: Callable[[str], tuple[int, ...]] | None = None,
                    aliases: Sequence[tuple[str, str]] = (), ignorable: Sequence[str] = ("rotary_emb.inv_freq",),
                    what: str = "model") -> dict[str, LazyWeight]:
    """Validate a checkpoint against a family's name table and return lazy weights.

    ``table``: gemmax path -> (HF name, or one HF name per stacked layer; HF array -> gemmax array; inverse).
    Every missing or misshaped tensor is reported together (by its HF name and expected shape), plus any
    tensor the model would silently ignore (unless ``ignorable`` names it), before a single weight is read.
    """
    real = canonical_names(source.keys(), aliases)
    shape_of = shape_of or (lambda n: tuple(source[n].shape))
    release = getattr(source, "release", None)
    used: set[str] = set()
    problems: list[str] = []
    out: dict[str, LazyWeight] = {}

    def check(name: str, expect: tuple[int, ...]) -> str | None:
        r = real.get(name)
        if r is None:
            problems.append(f"missing tensor {name} (expected shape {expect})")
            return None
        used.add(r)
        got = tuple(shape_of(r))
        if got != tuple(expect):
            problems.append(f"tensor {name} has shape {got}, expected {tuple(expect)}")
            return None
        return r

    for path, (names, fwd, inv) in table.items():
        shape = tuple(specs[path].shape)
        if isinstance(names, str):
            r = check(names, tuple(np.asarray(inv(np.empty(shape, np.int8))).shape))
            if r is not None:
                out[path] = LazyWeight(shape, _reader_single(source, r, fwd, dtype, shape), release)
        else:
            expect = tuple(np.asarray(inv(np.empty(shape[1:], np.int8))).shape)
            rs = [check(n, expect) for n in names]
            if all(r is not None for r in rs):
                out[path] = LazyWeight(shape, _reader_stacked(source, rs, fwd, dtype, shape), release)
    unused = [n for n in source.keys() if n not in used]
    unexpected = [n for n in unused if not any(s in n for s in ignorable)]
    if len(unused) > len(unexpected):
        _log.debug("%s: skipped %d tensors the model does not use: %s", what, len(unused) - len(unexpected),
                   sorted(set(unused) - set(unexpected)))
    raise_on_problems(problems, unexpected, what)
    return out


def table_to_hf(params_flat: Mapping[str, np.ndarray],
                table: Mapping[str, tuple[list[str] | str, Callable, Callable]]) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF name, array) for every weight of a name table, in transformers' layouts (0-d scalars stay
    0-d: ``np.ascontiguousarray`` would make them [1])."""
    for path, (names, _fwd, inv) in table.items():
        arr = np.asarray(params_flat[path])
        if isinstance(names, str):
            yield names, np.asarray(inv(arr), order="C")
        else:
            for i, n in enumerate(names):
                yield n, np.asarray(inv(arr[i]), order="C")


def _reader_single(source, name, fwd, dtype, shape):
    def read(index):
        # copy=False: an untransposed float32 tensor is handed over as a view of the map, no host copy
        return np.asarray(fwd(source[name]))[_full(index, shape)].astype(dtype, copy=False)
    return read


def _reader_stacked(source, names, fwd, dtype, shape):
    def read(index):
        index = _full(index, shape)
        layers = range(shape[0])[index[0]]
        first = np.asarray(fwd(source[names[layers[0]]]))[index[1:]] if len(layers) else None
        out = np.empty((len(layers),) + (first.shape if first is not None else shape[1:]), dtype)
        for j, i in enumerate(layers):  # each layer converted straight into its slot: one host copy
            out[j] = np.asarray(fwd(source[names[i]]))[index[1:]]
        return out
    return read


# ---- folders and handles -------------------------------------------------------------------------


def read_json_config(folder: Path) -> dict[str, Any]:
    """config.json of a Hugging Face folder as a dict; a clear error when it is missing or invalid."""
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{folder}: no config.json (is this a Hugging Face model folder?)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8
        raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object (a model config), got a {type(cfg).__name__}")
    return cfg


def resolve_hf_handle(handle: str) -> Path:
    """``hf://org/name[@revision]`` -> a local snapshot folder (downloaded once, then served from the
    huggingface_hub cache; with HF_HUB_OFFLINE=1 or no network the cache alone is used)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo = handle[len("hf://"):] if handle.startswith("hf://") else handle
    revision = None
    if "@" in repo:
        repo, revision = repo.split("@", 1)
    patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.txt"]
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except Exception as e:  # network errors come in many types
        raise CheckpointError(
            f"could not fetch {handle!r}: {e}. It is not in the local Hugging Face cache "
            f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}) and the Hub could not be reached.") from None


def export_hf_folder(path: str | os.PathLike, tensors: Iterable[tuple[str, np.ndarray]], hf_config: dict[str, Any],
                     generation_config: dict[str, Any] | None = None, dtype: Any = np.float32,
                     max_shard_bytes: int = 4 << 30) -> Path:
    """Write config.json + safetensors (sharded with an index past ``max_shard_bytes``) from (HF name,
    array) pairs, e.g. :func:`table_to_hf` of a family's name table."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    hf_cfg = dict(hf_config)
    hf_cfg["torch_dtype"] = np.dtype(dtype).name if dtype != ml_dtypes.bfloat16 else "bfloat16"
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in tensors:
        arr = arr.astype(dtype)
        if size and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    if len(shards) == 1:
        write_safetensors(out / "model.safetensors", shards[0])
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(out / fname, shard)
            weight_map.update({k: fname for k in shard})
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if generation_config:
        (out / "generation_config.json").write_text(json.dumps(generation_config, indent=2))
    return out
