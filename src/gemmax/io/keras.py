"""keras-hub presets: the folders ``save_to_preset`` writes and kagglehub caches, read and written without Keras.

A preset folder holds ``config.json`` (the backbone class and its arguments), ``metadata.json``,
``model.weights.h5`` (or ``model.weights.json`` + shards) and the tokenizer's assets under
``assets/tokenizer/``. The weights file is HDF5 as Keras' ``H5IOStore`` lays it out: one group per layer
object (``layers/gemma_decoder_block_1/attention/query_dense``) holding ``vars/0``, ``vars/1``... in the
order the layer created its variables. Which gemmax weight each dataset is, and how its layout differs, is
a per-family name table (``Family.keras``), the way ``hf_table`` is for safetensors, so the same lazy,
validated loader (:func:`gemmax.io.hf.lazy_from_table`) reads both.

The file is opened with h5py and every dataset is checked against the file's size before anything is
read: a truncated download or a file from another model fails up front with a :class:`KerasPresetError`
naming the file or dataset, never with a half-loaded model. Reading needs h5py only; Keras and keras-hub
are the test peers, not dependencies.

Keras' LoRA (``backbone.enable_lora(rank)``) factors each EinsumDense kernel along its last axis only:
``kernel + (alpha / rank) * lora_kernel_a @ lora_kernel_b`` with ``a`` shaped ``kernel.shape[:-1] + (r,)``
(one factor per head for the tutorials' query/value kernels) and ``b`` ``[r, head_dim]`` shared by the
heads. ``save_lora_weights`` writes them to ``*.lora.h5`` keyed by the layer's index among the backbone's
weighted layers; :func:`read_lora_file` / :func:`write_lora_file` speak that file, and
:func:`keras_lora_to_factors` / :func:`factors_to_keras_lora` convert exactly between it and gemmax's
(PEFT's) one-pair-per-linear factorisation.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from gemmax.io.hf import CheckpointError

CONFIG_FILE = "config.json"
METADATA_FILE = "metadata.json"
WEIGHTS_FILE = "model.weights.h5"
SHARDED_WEIGHTS_FILE = "model.weights.json"
TOKENIZER_FILE = "tokenizer.json"
PREPROCESSOR_FILE = "preprocessor.json"
TOKENIZER_ASSETS = Path("assets") / "tokenizer"
KAGGLE_SCHEME = "kaggle://"


class KerasPresetError(CheckpointError):
    """A keras-hub preset (folder, weights file, LoRA file or kaggle handle) that cannot be used; the message
    names the file or dataset and what is wrong."""


def _h5py() -> Any:
    try:
        import h5py
    except ImportError:  # pragma: no cover - h5py is a dependency; kept for a clear message in odd installs
        raise KerasPresetError("reading Keras presets needs h5py (pip install h5py)") from None
    return h5py


# ---- the weights file ----------------------------------------------------------------------------


def _open_h5(path: Path) -> Any:
    """An h5py File, or a named error for a missing, truncated or non-HDF5 file."""
    h5py = _h5py()
    if not path.is_file():
        raise KerasPresetError(f"{path}: weights file not found")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        what = "truncated" if "truncated" in str(e).lower() else "not a readable HDF5 file"
        raise KerasPresetError(f"{path}: {what} ({e}); the Keras weights file is damaged or incomplete — "
                               "download or save it again") from None


class H5Weights(Mapping[str, np.ndarray]):
    """Read-only mapping ``"layers/.../vars/0"`` -> array over a preset's weight file(s), read on access.

    Every dataset's byte range is checked against its file's size on open (Keras writes contiguous
    datasets), so truncation is reported by dataset name before a single weight is read.
    """

    def __init__(self, paths: Iterable[Path]):
        self._files = [_open_h5(Path(p)) for p in paths]
        self._where: dict[str, Any] = {}
        for f in self._files:
            size = Path(f.filename).stat().st_size
            f.visititems(lambda name, obj, f=f, size=size: self._add(f, name, obj, size))
        if not self._where:
            raise KerasPresetError(f"{', '.join(f.filename for f in self._files)}: no weights in the file")

    def _add(self, f: Any, name: str, obj: Any, size: int) -> None:
        if not isinstance(obj, _h5py().Dataset):
            return
        offset = obj.id.get_offset()
        nbytes = int(np.prod(obj.shape, dtype=np.int64)) * obj.dtype.itemsize
        contiguous = obj.chunks is None and obj.compression is None  # (chunked data is checked when read)
        if contiguous and nbytes and (offset is None or offset + nbytes > size):
            end = "is not stored" if offset is None else f"ends at byte {offset + nbytes}"
            raise KerasPresetError(f"{f.filename}: truncated — dataset {name!r} {end} but the file has {size} bytes")
        self._where[name] = obj

    def __getitem__(self, name: str) -> np.ndarray:
        ds = self._where[name]
        try:
            arr = ds[()]
        except OSError as e:
            raise KerasPresetError(f"{ds.file.filename}: cannot read dataset {name!r} ({e})") from None
        if ds.attrs.get("dtype") == "bfloat16":  # Keras stores bfloat16 as 2-byte opaque values with this tag
            arr = np.asarray(arr).view(ml_dtypes.bfloat16)
        return np.asarray(arr)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name].shape)

    def close(self) -> None:
        for f in self._files:
            f.close()


def write_h5(path: str | os.PathLike, tensors: Iterable[tuple[str, np.ndarray]]) -> Path:
    """Write ``(dataset path, array)`` pairs as Keras' weights file; bfloat16 gets Keras' ``dtype`` tag."""
    h5py = _h5py()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        for name, arr in tensors:
            arr = np.ascontiguousarray(arr)
            ds = f.create_dataset(name, data=arr)  # bfloat16: 2-byte opaque values, as Keras writes them
            if arr.dtype == ml_dtypes.bfloat16:
                ds.attrs["dtype"] = "bfloat16"
    os.replace(tmp, path)
    return path


# ---- preset folders --------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KerasPresetError(f"{path.parent}: no {path.name} (is this a keras-hub preset folder?)") from None
    except (ValueError, RecursionError) as e:
        raise KerasPresetError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise KerasPresetError(f"{path}: expected a JSON object, got a {type(data).__name__}")
    return data


def is_keras_preset(folder: Path) -> bool:
    """A folder keras-hub (or keras-nlp, its former name, which saved the first Gemma presets) wrote: its
    config.json names such a class (a Hugging Face config has a ``model_type`` instead)."""
    cfg = folder / CONFIG_FILE
    if not cfg.is_file():
        return False
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and str(data.get("registered_name", "")).startswith(("keras_hub>", "keras_nlp>"))


def read_backbone_config(folder: Path) -> tuple[str, dict[str, Any]]:
    """(backbone class name, its constructor arguments) from a preset's config.json."""
    data = _read_json(folder / CONFIG_FILE)
    name, cfg = data.get("class_name"), data.get("config")
    if not isinstance(name, str) or not isinstance(cfg, dict):
        raise KerasPresetError(f"{folder / CONFIG_FILE}: not a keras-hub backbone config (needs class_name and "
                               "config)")
    return name, cfg


def weight_files(folder: Path) -> list[Path]:
    """The preset's weight file, or its shards as ``model.weights.json`` lists them."""
    if (folder / WEIGHTS_FILE).exists():
        return [folder / WEIGHTS_FILE]
    if (folder / SHARDED_WEIGHTS_FILE).exists():
        index = _read_json(folder / SHARDED_WEIGHTS_FILE)
        names: set[str] = set()
        for v in (index.get("weight_map") or {}).values():
            names.update([v] if isinstance(v, str) else v)
        if not names:
            raise KerasPresetError(f"{folder / SHARDED_WEIGHTS_FILE}: no shard files in its weight_map")
        return [folder / n for n in sorted(names)]
    raise KerasPresetError(f"{folder}: no {WEIGHTS_FILE} (nor a sharded {SHARDED_WEIGHTS_FILE})")


def open_weights(folder: Path) -> H5Weights:
    return H5Weights(weight_files(folder))


def tokenizer_proto(folder: Path) -> Path | None:
    """The SentencePiece model a Gemma preset's tokenizer uses (``assets/tokenizer/vocabulary.spm``)."""
    p = folder / TOKENIZER_ASSETS / "vocabulary.spm"
    return p if p.is_file() else None


def write_preset_files(folder: Path, backbone: dict[str, Any], tokenizer: dict[str, Any] | None,
                       metadata: dict[str, Any]) -> None:
    """config.json, tokenizer.json and metadata.json as ``save_to_preset`` writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(backbone, indent=4))
    if tokenizer is not None:
        (folder / TOKENIZER_FILE).write_text(json.dumps(tokenizer, indent=4))
    (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=4))


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=4))


def keras_object(module: str, class_name: str, config: dict[str, Any]) -> dict[str, Any]:
    """A serialized keras-hub object (what ``keras.saving.serialize_keras_object`` writes)."""
    return {"module": module, "class_name": class_name, "config": config,
            "registered_name": f"keras_hub>{class_name}"}


def dtype_policy(name: str) -> dict[str, Any]:
    return {"module": "keras", "class_name": "DTypePolicy", "config": {"name": name}, "registered_name": None}


# ---- kaggle:// handles -------------------------------------------------------------------------------

_KAGGLE = re.compile(r"^(?P<owner>[^/]+)/(?P<model>[^/]+)/(?P<framework>[^/]+)/(?P<variation>[^/]+)"
                     r"(?:/(?P<version>\d+))?/?$")


def kaggle_cache_dir() -> Path:
    """kagglehub's cache folder: ``$KAGGLEHUB_CACHE``, else ``~/.cache/kagglehub``."""
    return Path(os.environ.get("KAGGLEHUB_CACHE") or Path.home() / ".cache" / "kagglehub")


def resolve_kaggle_handle(handle: str) -> Path:
    """``kaggle://OWNER/MODEL/keras/VARIANT[/VERSION]`` -> the preset folder in kagglehub's cache
    (``models/OWNER/MODEL/keras/VARIANT/VERSION``; without a version, the newest one cached). A handle not in
    the cache is downloaded through kagglehub when it is installed (it needs network and Kaggle credentials);
    otherwise the error says where the cache was looked for."""
    body = handle[len(KAGGLE_SCHEME):] if handle.startswith(KAGGLE_SCHEME) else handle
    m = _KAGGLE.match(body)
    if not m:
        raise KerasPresetError(f"bad Kaggle handle {handle!r}: expected kaggle://OWNER/MODEL/keras/VARIANT[/VERSION]")
    if m["framework"].lower() != "keras":
        raise KerasPresetError(f"Kaggle handle {handle!r} names framework {m['framework']!r}; gemmax reads the "
                               "Keras presets (kaggle://OWNER/MODEL/keras/VARIANT)")
    base = kaggle_cache_dir() / "models" / m["owner"] / m["model"] / m["framework"] / m["variation"]
    if m["version"]:
        cached = base / m["version"]
    else:
        versions = sorted((int(p.name) for p in base.glob("*") if p.is_dir() and p.name.isdigit()), reverse=True)
        cached = base / str(versions[0]) if versions else None
    if cached is not None and (cached / CONFIG_FILE).is_file():
        return cached
    try:
        import kagglehub
    except ImportError:
        raise KerasPresetError(f"{handle!r} is not in kagglehub's cache ({base}) and kagglehub is not installed "
                               "to download it") from None
    try:
        return Path(kagglehub.model_download(body.rstrip("/")))
    except Exception as e:  # network and authentication errors come in many types
        raise KerasPresetError(f"could not fetch {handle!r}: {e}. It is not in kagglehub's cache ({base}) and "
                               "Kaggle could not be reached.") from None


# ---- Keras LoRA ----------------------------------------------------------------------------------------


def read_lora_file(path: str | os.PathLike) -> tuple[int, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """(rank, {weighted-layer index: (lora_kernel_a, lora_kernel_b)}) of a ``*.lora.h5`` file written by a
    keras-hub backbone's ``save_lora_weights``."""
    path = Path(path)
    f = _open_h5(path)
    try:
        if "lora" not in f or "vars" not in f["lora"] or "rank" not in f["lora/vars"]:
            raise KerasPresetError(f"{path}: not a Keras LoRA file (no lora/vars/rank)")
        rank = int(np.asarray(f["lora/vars/rank"][()]))
        out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for key, group in f["lora"].items():
            if key == "vars":
                continue
            try:
                v = group["vars"]
                out[int(key)] = (np.asarray(v["lora_kernel_a"][()]), np.asarray(v["lora_kernel_b"][()]))
            except (KeyError, ValueError, OSError) as e:
                raise KerasPresetError(f"{path}: bad LoRA entry lora/{key} ({e})") from None
    finally:
        f.close()
    if not out:
        raise KerasPresetError(f"{path}: the LoRA file holds no adapters")
    for i, (a, b) in out.items():
        if a.shape[-1] != rank or b.shape[0] != rank:
            raise KerasPresetError(f"{path}: lora/{i} has factors {a.shape} / {b.shape}, not rank {rank}")
    return rank, out


def write_lora_file(path: str | os.PathLike, rank: int, factors: Mapping[int, tuple[np.ndarray, np.ndarray]]) -> Path:
    """A ``*.lora.h5`` file that a keras-hub backbone's ``load_lora_weights`` reads."""
    path = Path(path)
    if not path.name.endswith(".lora.h5"):
        raise ValueError(f"a Keras LoRA file name must end in .lora.h5 (keras-hub refuses others): {path}")
    h5py = _h5py()
    with h5py.File(path, "w") as f:
        f.create_group("lora/vars").create_dataset("rank", data=np.int64(rank))
        for i, (a, b) in sorted(factors.items()):
            g = f.create_group(f"lora/{i}/vars")
            g.create_dataset("lora_kernel_a", data=np.asarray(a, np.float32))
            g.create_dataset("lora_kernel_b", data=np.asarray(b, np.float32))
    return path


def keras_lora_to_factors(a: np.ndarray, b: np.ndarray, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Keras' per-head factors of one kernel ``[heads, in, hd]`` (``a [heads, in, r]``, ``b [r, hd]``) as one
    ``A [in, heads*r]`` / ``B [heads*r, heads, hd]`` pair with the same product, exactly: head h's block of A
    is its ``a[h]``, and B is block-diagonal over heads with ``scale * b`` on the diagonal. A kernel without
    heads (``a [in, r]``) is already one pair."""
    if a.ndim == 2:
        return a.astype(np.float32), (scale * b).astype(np.float32)
    if a.ndim != 3:
        raise ValueError(f"Keras LoRA factor of rank {a.ndim} ({a.shape}); expected [heads, in, r] or [in, r]")
    heads, d_in, r = a.shape
    big_a = a.transpose(1, 0, 2).reshape(d_in, heads * r)
    big_b = np.zeros((heads, r, heads, b.shape[-1]), np.float32)
    for h in range(heads):
        big_b[h, :, h, :] = scale * b
    return big_a.astype(np.float32), big_b.reshape(heads * r, heads, b.shape[-1])


def factors_to_keras_lora(delta: np.ndarray, rtol: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Keras' per-head factors (``a [heads, in, r]``, ``b [r, hd]``, alpha = rank) whose product is ``delta``
    ``[heads, in, hd]``, with the smallest rank that is exact: the row spaces of every head's update share one
    basis ``b`` (found by SVD), so r = rank of the heads' updates stacked, at most ``hd``."""
    heads, d_in, hd = delta.shape
    stacked = delta.reshape(heads * d_in, hd).astype(np.float64)
    _, s, vt = np.linalg.svd(stacked, full_matrices=False)
    r = max(1, int(np.sum(s > rtol * (s[0] if s.size and s[0] > 0 else 1.0))))
    basis = vt[:r]  # [r, hd], orthonormal rows
    a = np.einsum("hdk,rk->hdr", delta.astype(np.float64), basis)
    return a.astype(np.float32), basis.astype(np.float32)
