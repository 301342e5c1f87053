"""The GGUF container (llama.cpp's file format): parse its metadata and tensor table, dequantize tensors.

Model-independent: which tensors an architecture has and what its metadata means is the business of the
family that reads it (``gemmax.models.gemma.gguf`` for gemma, gemma2, gemma3 and llama,
``gemmax.models.gemma3n_gguf``, ``gemmax.models.gemma4.gguf``), each through :class:`HFView`. Tensors are
dequantized lazily, one at a time, from a memory map: a 27B Q4 file never becomes a 100 GB float32 dict.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["GGUF_MAGIC", "parse_gguf", "dequantize", "supported_qtypes", "read_metadata", "HFView", "HFSource",
           "UnsupportedArchitecture", "open_hf_view", "token_fields", "write_tensors", "write_file", "name_map",
           "llama_cpp_name", "MMPROJ_ARCH", "projector_of", "projector_type"]

GGUF_MAGIC = b"GGUF"


def _gguf():  # imported lazily: `gguf` pulls in a fair amount and most users never touch GGUF
    import gguf

    return gguf


def _supported_qtypes() -> set[str]:
    gguf = _gguf()
    traits = getattr(gguf.quants, "_type_traits", None)
    names = {"F32", "F16"} | ({t.name for t in traits} if traits else {
        "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"})
    return names


@dataclass(frozen=True)
class _RawTensor:
    """A tensor-table entry: ``ne`` in GGML order (fastest dimension first), byte offset in the file."""

    name: str
    ne: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    offset: int
    n_bytes: int


class _Buf:
    """Bounds-checked little-endian cursor over the file's bytes (a short read means truncation).

    Works on an ``mmap`` with ``struct`` so the 262k-string vocabulary of Gemma 3 parses in well under a
    second (numpy slicing costs microseconds per call).
    """

    def __init__(self, data: Any, path: Path):
        self.data, self.pos, self.path, self.size = data, 0, path, len(data)

    def _need(self, n: int) -> None:
        if self.pos + n > self.size:
            raise ValueError(f"{self.path} is truncated: its GGUF header ends early (at byte {self.size})")

    def take(self, n: int) -> bytes:
        self._need(n)
        out = self.data[self.pos: self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str) -> Any:
        n = struct.calcsize(fmt)
        self._need(n)
        (v,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += n
        return v

    def string(self) -> str:
        n = self.scalar("<Q")
        return self.take(n).decode("utf-8", errors="replace")

    def array(self, dt: np.dtype, count: int) -> np.ndarray:
        self._need(dt.itemsize * count)
        out = np.frombuffer(self.data, dtype=dt, count=count, offset=self.pos).copy()
        self.pos += dt.itemsize * count
        return out


_SCALAR_DT = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8",
              11: "<i8", 12: "<f8"}
_STRUCT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY, _BOOL, _F32 = 8, 9, 7, 6


def _read_value(buf: _Buf, vtype: int) -> Any:
    if vtype == _STRING:
        return buf.string()
    if vtype == _ARRAY:
        etype = buf.scalar("<I")
        count = buf.scalar("<Q")
        if etype == _STRING:
            return [buf.string() for _ in range(count)]
        if etype == _ARRAY:
            return [_read_value(buf, _ARRAY) for _ in range(count)]
        if etype not in _SCALAR_DT:
            raise ValueError(f"{buf.path}: unknown GGUF array element type {etype}")
        arr = buf.array(np.dtype(_SCALAR_DT[etype]), count)
        return arr.astype(bool) if etype == _BOOL else arr
    if vtype not in _SCALAR_DT:
        raise ValueError(f"{buf.path}: unknown GGUF value type {vtype}")
    v = buf.scalar(_STRUCT[vtype])
    if vtype == _BOOL:
        return bool(v)
    if vtype == _F32:
        return float(str(np.float32(v)))  # shortest repr: 1e-06, not 9.999999974752427e-07
    if vtype == 12:
        return float(v)
    return int(v)


def _parse_gguf(path: Path) -> tuple[dict[str, Any], list[_RawTensor], np.ndarray]:
    """Metadata and tensor table of a GGUF v2/v3 file, read straight from a memory map.

    gguf's GGUFReader builds a Python object per array element (seconds for a 262k-token vocabulary);
    this reads numeric arrays with one numpy view and only decodes what we keep.
    """
    gguf = _gguf()
    if not path.is_file():
        raise FileNotFoundError(f"no such GGUF file: {path}")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    if size < 24:
        raise ValueError(f"{path} is truncated: {size} bytes is shorter than a GGUF header")
    with open(path, "rb") as fh:
        raw_map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    buf = _Buf(raw_map, path)
    buf.take(4)
    version = buf.scalar("<I")
    if version not in (2, 3):
        if version & 0xFFFF == 0:
            raise ValueError(f"{path}: big-endian GGUF files are not supported")
        raise ValueError(f"{path}: unsupported GGUF version {version}")
    n_tensors = buf.scalar("<Q")
    n_kv = buf.scalar("<Q")
    if n_tensors > size or n_kv > size:
        raise ValueError(f"{path} is corrupt: header claims {n_tensors} tensors and {n_kv} metadata fields")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = buf.string()
        metadata[key] = _read_value(buf, buf.scalar("<I"))
    raw: list[tuple[str, tuple[int, ...], int, int]] = []
    for _ in range(n_tensors):
        name = buf.string()
        nd = buf.scalar("<I")
        if nd > 8:
            raise ValueError(f"{path} is corrupt: tensor {name!r} claims {nd} dimensions")
        ne = tuple(buf.scalar("<Q") for _ in range(nd))
        raw.append((name, ne, buf.scalar("<I"), buf.scalar("<Q")))
    align = int(metadata.get("general.alignment", 32))
    start = -(-buf.pos // align) * align
    tensors = []
    for name, ne, t, off in raw:
        try:
            qtype = gguf.GGMLQuantizationType(t)
        except ValueError:
            raise ValueError(f"{path.name}: tensor {name} has unknown GGML type id {t}") from None
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        n_el = int(np.prod(ne, dtype=np.int64)) if ne else 1
        if ne and ne[0] % block:
            raise ValueError(f"{path.name}: tensor {name} row of {ne[0]} is not a multiple of {block}")
        n_bytes = n_el // block * type_size
        if start + off + n_bytes > size:
            raise ValueError(f"{path} is truncated: tensor {name} needs bytes up to "
                             f"{start + off + n_bytes} but the file has {size}")
        tensors.append(_RawTensor(name, ne, qtype, start + off, n_bytes))
    raw_map.close()
    return metadata, tensors, np.memmap(path, dtype=np.uint8, mode="r")


def _dequantize(t: _RawTensor, mm: np.ndarray, path: Path) -> np.ndarray:
    """float32 array in numpy order (reversed GGML ``ne``), i.e. torch ``Linear`` [out, in] for matrices."""
    gguf = _gguf()
    block, type_size = gguf.GGML_QUANT_SIZES[t.qtype]
    shape = tuple(reversed(t.ne)) or (1,)
    data = mm[t.offset: t.offset + t.n_bytes]
    q = gguf.GGMLQuantizationType
    if t.qtype == q.F32:
        return np.array(data.view(np.float32).reshape(shape))
    if t.qtype == q.F16:
        return data.view(np.float16).reshape(shape).astype(np.float32)
    if t.qtype == q.F64:
        return data.view(np.float64).reshape(shape).astype(np.float32)
    byte_shape = (*shape[:-1], shape[-1] // block * type_size)
    try:
        w = gguf.quants.dequantize(np.asarray(data).reshape(byte_shape), t.qtype)
    except NotImplementedError as e:  # checked at open time too; this is the backstop
        raise ValueError(f"{path.name}: tensor {t.name} has unsupported type {t.qtype.name}") from e
    return np.asarray(w, dtype=np.float32).reshape(shape)


def read_metadata(path: str | Path) -> tuple[str | None, dict[str, Any], dict[str, Any]]:
    """(architecture, metadata without ``tokenizer.*``, the ``tokenizer.*`` fields) of a GGUF file."""
    metadata, _, _ = _parse_gguf(Path(path))
    tok_meta = {k: metadata.pop(k) for k in list(metadata) if k.startswith("tokenizer.")}
    return metadata.get("general.architecture"), metadata, tok_meta


#: ``general.architecture`` of llama.cpp's "mmproj" files: a multimodal model's encoders and projectors, which
#: llama.cpp keeps in a second file beside the text model's (its ``--mmproj`` option)
MMPROJ_ARCH = "clip"


def projector_of(md: dict[str, Any]) -> str | None:
    """The vision projector type an mmproj's metadata names: ``clip.vision.projector_type``, or the
    ``clip.projector_type`` that single-encoder files such as Gemma 3's carry."""
    found = md.get("clip.vision.projector_type") or md.get("clip.projector_type")
    return None if found is None else str(found)


def projector_type(path: str | Path) -> str | None:
    """The vision projector type of an mmproj file (:func:`projector_of`): what says which model's tower the
    file holds. A file of another architecture is a ValueError naming it, so a text GGUF given as the mmproj
    is caught."""
    arch, md, _ = read_metadata(path)
    if arch != MMPROJ_ARCH:
        raise ValueError(f"{Path(path).name} is not an mmproj file: its general.architecture is {arch!r}, not "
                         f"{MMPROJ_ARCH!r}")
    return projector_of(md)


parse_gguf = _parse_gguf
dequantize = _dequantize
supported_qtypes = _supported_qtypes


# ---- a GGUF file under Hugging Face names ---------------------------------------------------------------


@dataclass(frozen=True)
class HFSource:
    """Where one Hugging Face tensor comes from: a GGUF tensor, the function that turns its float32 array (numpy
    order) into the HF array (an offset undone, one slice of a stacked tensor), and the HF shape."""

    gguf_name: str
    shape: tuple[int, ...]
    fix: Callable[[np.ndarray], np.ndarray] | None = None
    qtype: str = ""


@dataclass
class HFView:
    """A parsed GGUF file read as a lazy Hugging Face state dict: ``hf_config`` is a transformers config.json
    dict, ``view[name]`` dequantizes one tensor, ``tensor_info`` says where each lives. What the names and the
    metadata mean is the reading family's business (it fills ``hf_config`` and ``sources``)."""

    path: Path
    arch: str
    metadata: dict[str, Any]
    tokenizer_metadata: dict[str, Any]
    hf_config: dict[str, Any]
    sources: dict[str, HFSource]
    _mm: Any = field(repr=False, default=None)
    _raw: dict[str, _RawTensor] = field(repr=False, default_factory=dict)

    @property
    def tensor_info(self) -> dict[str, HFSource]:
        return self.sources

    def keys(self) -> list[str]:
        return list(self.sources)

    def __contains__(self, name: object) -> bool:
        return name in self.sources

    def __len__(self) -> int:
        return len(self.sources)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.sources[name].shape

    def raw_tensor(self, gguf_name: str) -> np.ndarray:
        """A tensor by its GGUF name, dequantized, in numpy order, nothing undone."""
        return _dequantize(self._raw[gguf_name], self._mm, self.path)

    def tensor(self, name: str) -> np.ndarray:
        try:
            src = self.sources[name]
        except KeyError:
            raise KeyError(f"{name!r} is not in {self.path.name}") from None
        w = self.raw_tensor(src.gguf_name)
        if src.fix is not None:
            w = src.fix(w)
        return np.ascontiguousarray(w.reshape(src.shape), dtype=np.float32)

    __getitem__ = tensor

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        """(name, float32 array) in table order, one dequantized tensor alive at a time."""
        for name in self.sources:
            yield name, self.tensor(name)


class UnsupportedArchitecture(ValueError):
    """A GGUF file of an architecture the reader does not know (``arch``)."""

    def __init__(self, message: str, arch: Any):
        super().__init__(message)
        self.arch = arch


def token_fields(md: Mapping[str, Any], tok: Mapping[str, Any], turn_ends: tuple[str, ...]) -> dict[str, Any]:
    """A transformers config's special ids and name from a file's fields. ``eos_token_id`` lists the file's eos
    and the ids that end an instruction-tuned turn (the ``turn_ends`` pieces found in the vocabulary and
    llama.cpp's ``eot_token_id``), so generation stops at either."""
    tokens = tok.get("tokenizer.ggml.tokens") or []
    eos = [int(tok.get("tokenizer.ggml.eos_token_id", 1))]
    ends = [tokens.index(p) for p in turn_ends if p in tokens]
    if tok.get("tokenizer.ggml.eot_token_id") is not None:
        ends.append(int(tok["tokenizer.ggml.eot_token_id"]))
    eos += [i for i in dict.fromkeys(ends) if i not in eos]
    return {
        "bos_token_id": int(tok.get("tokenizer.ggml.bos_token_id", 2)),
        "eos_token_id": eos if len(eos) > 1 else eos[0],
        "pad_token_id": int(tok.get("tokenizer.ggml.padding_token_id", 0)),
        "_name_or_path": str(md.get("general.name", "") or ""),
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }


def open_hf_view(path: str | Path, archs: tuple[str, ...],
                 build: Callable[..., tuple[dict[str, Any], dict[str, HFSource]]],
                 view: type[HFView] = HFView) -> HFView:
    """Parse ``path`` and let ``build(metadata, tokenizer_metadata, raw, load)`` give the transformers config
    and the source of every HF tensor (``raw``: the tensor table by GGUF name; ``load(gguf_name)``: one tensor
    dequantized, for the few a config is read from). The architecture must be one of ``archs``, every tensor of
    a type this build can dequantize and every tensor named by the build, else a ValueError says what is
    wrong: nothing in the file is silently left unread."""
    path = Path(path)
    metadata, raw, mm = _parse_gguf(path)
    tok_meta = {k: metadata.pop(k) for k in list(metadata) if k.startswith("tokenizer.")}
    arch = metadata.get("general.architecture")
    if arch not in archs:
        raise UnsupportedArchitecture(f"{path.name}: GGUF architecture {arch!r} is not one of {', '.join(archs)}",
                                      arch)
    ok = _supported_qtypes()
    bad = sorted({t.qtype.name for t in raw if t.qtype.name not in ok})
    if bad:
        raise ValueError(f"{path.name}: unsupported tensor quantization type(s) {', '.join(bad)}")
    by_name = {t.name: t for t in raw}
    hf_config, sources = build(metadata, tok_meta, by_name, lambda name: _dequantize(by_name[name], mm, path))
    return view(path, arch, metadata, tok_meta, hf_config, sources, mm, by_name)


def write_tensors(writer: Any, named: Iterator[tuple[str, np.ndarray]], dtype: str) -> set[str]:
    """Add (GGUF name, float32 array) tensors to a ``gguf.GGUFWriter``: 1-D tensors stay F32 (as llama.cpp
    keeps norms), matrices become ``dtype`` ("f32", "f16" or "q8_0"; Q8_0 needs rows a multiple of 32, else
    F16). Returns the names written."""
    gguf = _gguf()
    q = gguf.GGMLQuantizationType
    if dtype not in ("f32", "f16", "q8_0"):
        raise ValueError(f"unsupported GGUF dtype {dtype!r}: choose 'f32', 'f16' or 'q8_0'")
    written = set()
    for name, arr in named:
        a = np.ascontiguousarray(arr, dtype=np.float32)
        if dtype == "f32" or a.ndim < 2:
            qt = q.F32
        elif dtype == "q8_0" and a.shape[-1] % 32 == 0:
            qt = q.Q8_0
        else:
            qt = q.F16
        data = gguf.quants.quantize(a, qt)
        if qt in (q.F32, q.F16):
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, data, raw_dtype=qt)
        written.add(name)
    return written


FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}


def name_map(arch: str, n_layers: int) -> Any:
    """gguf-py's table of llama.cpp tensor names for ``arch`` (e.g. "gemma4") with ``n_layers`` blocks."""
    gguf = _gguf()
    return gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch), n_layers)


def llama_cpp_name(tmap: Any, name: str) -> str | None:
    """llama.cpp's name of a transformers tensor through ``tmap`` (:func:`name_map`), or None. Parameters
    without a ``.weight`` / ``.bias`` suffix (layer scalars, fused experts) get ``.weight``, as llama.cpp's
    converter names them."""
    stem, _, suffix = name.rpartition(".")
    if suffix not in ("weight", "bias"):
        stem, suffix = name, "weight"
    g = tmap.get_name(stem)
    return None if g is None else f"{g}.{suffix}"


def write_file(path: str | Path, arch: str, metadata: Mapping[str, Any], tensors: Iterator[tuple[str, np.ndarray]],
               dtype: str, vocabulary: Callable[[Any], None]) -> Path:
    """Write one GGUF file: ``metadata`` as ``GGUFWriter.add_<key>(value)`` calls in order (None: left out; a
    key with a dot is a raw unsigned integer field of that name), the file type of ``dtype``,
    ``vocabulary(writer)`` for the ``tokenizer.*`` fields, then the (GGUF name, array) ``tensors``
    (:func:`write_tensors`). The token embedding must be among them."""
    gguf = _gguf()
    if dtype not in FILE_TYPES:
        raise ValueError(f"unsupported GGUF dtype {dtype!r}: choose 'f32', 'f16' or 'q8_0'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(path, arch)
    for key, value in metadata.items():
        if value is None:
            continue
        if "." in key:
            w.add_uint32(key, int(value))
        else:
            getattr(w, f"add_{key}")(value)
    w.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[dtype]))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocabulary(w)
    if "token_embd.weight" not in write_tensors(w, tensors, dtype):
        raise ValueError("tensors lack model.embed_tokens.weight")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
