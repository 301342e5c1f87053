"""Hugging Face checkpoints: streamed safetensors reading, name/layout conversion, export.

Reading is done over memory maps: a tensor is only read (and converted to the target dtype) when the
loader asks for it, one stacked weight at a time, so peak host memory stays near the model's size in the
target dtype. Every file is validated up front (header, offsets against the file size), and every expected
tensor is checked for presence and shape *before* any weight is materialised: a bad checkpoint fails
with a message naming the tensor, never with a half-loaded model.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from gemmax.models.gemma.config import ModelConfig, from_hf_config, to_hf_config

_ST_DTYPES: dict[str, Any] = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file or tensor and what is wrong."""


# ---- safetensors ---------------------------------------------------------------------------------


class SafetensorsFile:
    """Zero-copy view of one .safetensors file (memory-mapped, validated on open)."""

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
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path}: corrupt safetensors header: {e}") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self._base = 8 + hlen
        self._entries: dict[str, tuple[Any, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            try:
                dtype = _ST_DTYPES[e["dtype"]]
                shape = tuple(int(s) for s in e["shape"])
                start, end = (int(o) for o in e["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: bad header entry for tensor {name!r}: {e}") from None
            n = int(np.prod(shape)) * np.dtype(dtype).itemsize
            if end - start != n:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} has {end - start} bytes for shape {shape} {e['dtype']}")
            if self._base + end > size:
                raise CheckpointError(
                    f"{self.path}: truncated — tensor {name!r} ends at byte {self._base + end} but the file "
                    f"has {size}")
            self._entries[name] = (dtype, shape, start, end)
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
    out: dict[str, np.ndarray] = {}
    for p in sorted(folder.glob("*.bin")):
        sd = torch.load(p, map_location="cpu", weights_only=True)
        for k, v in sd.items():
            out[k] = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
    target = folder / "model.safetensors"
    write_safetensors(target, out)
    return target


# ---- HF names <-> gemmax paths ---------------------------------------------------------------------

# Each stacked gemmax weight: (HF name template for layer i, function HF array -> per-layer gemmax array,
# inverse). Kernels are transposed from torch's [out, in]; q/k/v/o are split into heads.


def _layer_map(cfg: ModelConfig) -> dict[str, tuple[str, Callable, Callable]]:
    H, K, hd, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    ident = (lambda w: w, lambda w: w)

    def heads_in(n: int):  # [n*hd, D] -> [n, D, hd]
        return (lambda w: w.reshape(n, hd, D).transpose(0, 2, 1),
                lambda w: w.transpose(0, 2, 1).reshape(n * hd, D))

    out_proj = (lambda w: w.reshape(D, H, hd).transpose(1, 2, 0),
                lambda w: w.transpose(2, 0, 1).reshape(D, H * hd))
    tr = (lambda w: w.T, lambda w: w.T)
    p = "model.layers.{i}."
    m: dict[str, tuple[str, Callable, Callable]] = {
        "pre_attention_norm/scale": (p + "input_layernorm.weight", *ident),
        "attention/query/kernel": (p + "self_attn.q_proj.weight", *heads_in(H)),
        "attention/key/kernel": (p + "self_attn.k_proj.weight", *heads_in(K)),
        "attention/value/kernel": (p + "self_attn.v_proj.weight", *heads_in(K)),
        "attention/attention_output/kernel": (p + "self_attn.o_proj.weight", *out_proj),
        "ffw_gating/kernel": (p + "mlp.gate_proj.weight", *tr),
        "ffw_gating_2/kernel": (p + "mlp.up_proj.weight", *tr),
        "ffw_linear/kernel": (p + "mlp.down_proj.weight", *tr),
    }
    if cfg.use_qk_norm:
        m["attention/query_norm/scale"] = (p + "self_attn.q_norm.weight", *ident)
        m["attention/key_norm/scale"] = (p + "self_attn.k_norm.weight", *ident)
    if cfg.use_post_norms:
        # Gemma 2/3: "post_attention_layernorm" really is after attention; the MLP has its own pre-norm.
        m["post_attention_norm/scale"] = (p + "post_attention_layernorm.weight", *ident)
        m["pre_ffw_norm/scale"] = (p + "pre_feedforward_layernorm.weight", *ident)
        m["post_ffw_norm/scale"] = (p + "post_feedforward_layernorm.weight", *ident)
    else:
        # Gemma 1 / Llama: HF calls the pre-MLP norm "post_attention_layernorm".
        m["pre_ffw_norm/scale"] = (p + "post_attention_layernorm.weight", *ident)
    return m


def _top_map(cfg: ModelConfig) -> dict[str, tuple[str, Callable, Callable]]:
    ident = (lambda w: w, lambda w: w)
    m = {
        "token_embedding/embeddings": ("model.embed_tokens.weight", *ident),
        "final_normalization/scale": ("model.norm.weight", *ident),
    }
    if not cfg.tie_embeddings:
        m["lm_head/kernel"] = ("lm_head.weight", lambda w: w.T, lambda w: w.T)
    return m


def _strip_prefix(names: list[str]) -> dict[str, str]:
    """Map canonical names ("model.layers...") to what the file uses (multimodal wrappers add
    "language_model." or "model.language_model.")."""
    out = {}
    for n in names:
        c = n
        for pre in ("model.language_model.", "language_model.model.", "language_model."):
            if n.startswith(pre):
                c = "model." + n[len(pre):] if not n.startswith("language_model.lm_head") else n[len(pre):]
                break
        out[c] = n
    return out


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


def lazy_params_from_hf(cfg: ModelConfig, source: Mapping[str, np.ndarray], dtype: Any,
                        shape_of: Callable[[str], tuple[int, ...]] | None = None) -> dict[str, LazyWeight]:
    """Check every tensor (presence, shape, nothing unexpected) and return lazy gemmax weights.

    ``source`` maps HF names to arrays (read on access); ``shape_of`` gives shapes without reading.
    """
    from gemmax.models.gemma.model import param_specs

    specs = param_specs(cfg)
    names = _strip_prefix(list(source.keys()))
    shape_of = shape_of or (lambda n: tuple(source[n].shape))
    used: set[str] = set()
    problems: list[str] = []
    release = getattr(source, "release", None)
    out: dict[str, LazyWeight] = {}
    layer_map = _layer_map(cfg)

    def check(hf_name: str, expect: tuple[int, ...]) -> str | None:
        real = names.get(hf_name)
        if real is None:
            problems.append(f"missing tensor {hf_name} (expected shape {expect})")
            return None
        got = shape_of(real)
        if tuple(got) != tuple(expect):
            problems.append(f"tensor {hf_name} has shape {tuple(got)}, expected {tuple(expect)}")
        used.add(real)
        return real

    for path, (hf_name, fwd, inv) in _top_map(cfg).items():
        spec = specs[path]
        expect = tuple(np.asarray(inv(np.empty(spec.shape, np.int8))).shape)
        real = check(hf_name, expect)
        if real is not None:
            out[path] = LazyWeight(spec.shape, _reader_single(source, real, fwd, dtype, spec.shape), release)
    for sub, (tmpl, fwd, inv) in layer_map.items():
        path = "decoder_block/" + sub
        spec = specs[path]
        expect = tuple(np.asarray(inv(np.empty(spec.shape[1:], np.int8))).shape)
        reals = [check(tmpl.format(i=i), expect) for i in range(cfg.num_layers)]
        if all(r is not None for r in reals):
            out[path] = LazyWeight(spec.shape, _reader_stacked(source, reals, fwd, dtype, spec.shape), release)
    # a tied model may still ship lm_head.weight (a copy of the embedding): ignored, like rotary buffers
    ignorable = ("rotary_emb.inv_freq", "vision_tower", "multi_modal_projector", "lm_head.weight")
    unexpected = [n for n in names.values() if n not in used and not any(s in n for s in ignorable)]
    raise_on_problems(problems, unexpected, f"{cfg.family} model")
    return out


def raise_on_problems(problems: list[str], unexpected: list[str], what: str) -> None:
    """One error listing everything wrong with a checkpoint (missing, mis-shaped, unexpected tensors), raised
    before any weight is read: every loader (decoder, RecurrentGemma, PaliGemma) reports the same way."""
    if unexpected:
        problems = problems + [f"unexpected tensors (not part of a {what}): {sorted(unexpected)[:8]}"
                               + (f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else "")]
    if problems:
        raise CheckpointError("checkpoint does not match its config:\n  " + "\n  ".join(problems))


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


def params_to_hf(params_flat: Mapping[str, np.ndarray], cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF name, array) for every weight, in transformers' layouts."""
    for path, (hf_name, _fwd, inv) in _top_map(cfg).items():
        yield hf_name, np.ascontiguousarray(inv(np.asarray(params_flat[path])))
    for sub, (tmpl, _fwd, inv) in _layer_map(cfg).items():
        stacked = np.asarray(params_flat["decoder_block/" + sub])
        for i in range(cfg.num_layers):
            yield tmpl.format(i=i), np.ascontiguousarray(inv(stacked[i]))


# ---- folders and handles -------------------------------------------------------------------------


def read_config(folder: Path) -> tuple[ModelConfig, dict[str, Any]]:
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{folder}: no config.json (is this a Hugging Face model folder?)")
    try:
        hf = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from None
    try:
        return from_hf_config(hf), hf
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{cfg_path}: config lacks a required field ({e})") from None


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


def export_hf_folder(path: str | os.PathLike, params_flat: Mapping[str, np.ndarray], cfg: ModelConfig,
                     dtype: Any = np.float32, max_shard_bytes: int = 4 << 30) -> Path:
    """Write config.json + safetensors (sharded with an index past ``max_shard_bytes``)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    hf_cfg = to_hf_config(cfg)
    hf_cfg["torch_dtype"] = np.dtype(dtype).name if dtype != ml_dtypes.bfloat16 else "bfloat16"
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in params_to_hf(params_flat, cfg):
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
    gen = {"bos_token_id": cfg.bos_token_id, "pad_token_id": cfg.pad_token_id,
           "eos_token_id": list(cfg.eos_ids) if len(cfg.eos_ids) > 1 else cfg.eos_ids[0]}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return out
