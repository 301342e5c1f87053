"""Fine-tuning data: read, render, tokenize, pack and batch — deterministically and resumably.

The pipeline has three stages, each a plain function so they can be tested and reused alone:

1. **read** (``read_records``): plain text, JSONL / JSON, CSV, Parquet files (or a folder of them), a
   Hugging Face ``datasets`` object or a ``save_to_disk`` folder (offline), or in-memory lists. Every record
   keeps its origin ("file:line" or "file:row N") so bad data is reported where it is.
2. **render** (``render_example``): one record becomes text *pieces* each flagged trainable or not, in one of
   three formats — plain text (``{"text"}`` or a line: everything is a target), prompt/completion (loss on
   the completion only) or chat messages in Gemma's turn format (loss on the model turns' content and their
   ``<end_of_turn>`` only). Rendering knows nothing about tokens, so the rules are tokenizer independent.
3. **tokenize + pack** (``tokenize_example``, ``pack_rows``): pieces are encoded one by one with the
   injected tokenizer (anything with ``encode(text, add_bos=...)``, ``bos_id``, ``eos_id``), so the loss mask
   follows piece boundaries exactly. Documents are packed several to a row; ``segment_ids`` (1, 2, ... per
   document, 0 = padding) tell the model not to attend across them and ``positions`` restart at 0 for each.

**Images.** For a model that reads images (``Family.encode_prompt``), a prompt/completion record may carry
``"image"`` (one) or ``"images"`` (a list): a path (relative to the data file's folder), bytes, a
``{"bytes", "path"}`` dict as ``datasets``' Image feature stores it, a PIL image or an array. The family
turns the prompt and its images into token ids and inputs (``pixel_values``, token-aligned inputs such as
``token_type_ids``); the completion is a target as usual and its token-aligned inputs take the family's
value after a prompt. Documents with images are not packed (one per row; every record has as many images).

``Dataset`` holds the tokenized documents (fine-tuning sets fit in memory; tokenizing once makes every epoch
and every resume cheap). ``Dataset.iterator`` yields training ``Batch``es: each epoch's document order is a
permutation drawn from ``(seed, epoch)``, packed, and cut into batches; its state is ``{"epoch", "batch",
"seed"}`` — restoring it re-derives that epoch's order and continues at exactly the same batch, so the data
position can live in a checkpoint as a tiny JSON dict. ``Dataset.evaluation`` is one pass, in order.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Self

import numpy as np

__all__ = [
    "Batch",
    "BatchIterator",
    "DataError",
    "Dataset",
    "Document",
    "EpochCursor",
    "Example",
    "FORMATS",
    "PromptEncoder",
    "Record",
    "TokenizerLike",
    "pack_rows",
    "read_records",
    "record_images",
    "render_example",
    "tokenize_example",
    "tokenize_image_example",
]

#: Accepted values of ``format=``.
FORMATS = ("auto", "text", "prompt_completion", "chat")

START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"

_TEXT_EXT = {".txt", ".text", ".md"}
_JSON_EXT = {".jsonl", ".json", ".ndjson"}
_CSV_EXT = {".csv", ".tsv"}
_PARQUET_EXT = {".parquet", ".pq"}


class DataError(ValueError):
    """Bad training data; the message starts with where it is ("file:line: ...")."""


class TokenizerLike(Protocol):
    """What the pipeline needs from a tokenizer (gemmax.io.tokenizer.Tokenizer satisfies it)."""

    bos_id: int
    eos_id: int

    def encode(self, text: str, add_bos: bool = ...) -> list[int]: ...


@dataclass(frozen=True)
class Record:
    """One raw record and where it came from."""

    data: dict[str, Any]
    origin: str


@dataclass(frozen=True)
class Example:
    """A rendered record: text pieces, each a target (True) or context only (False)."""

    pieces: tuple[tuple[str, bool], ...]
    origin: str
    add_bos: bool = True
    add_eos: bool = True


@dataclass(frozen=True)
class Document:
    """A tokenized example: ``ids`` [n] and ``weights`` [n] (1 where ids[i] is a target); ``inputs`` are a
    model's extra inputs (``pixel_values`` [k, 3, H, W]; token-aligned ones [n])."""

    ids: np.ndarray
    weights: np.ndarray
    origin: str
    inputs: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class Batch:
    """One batch, numpy, ready for ``jax.device_put``. ``targets[b, t]`` is the token after ``tokens[b, t]``
    in the same document; ``loss_mask`` is 0 on prompts, user turns and padding."""

    tokens: np.ndarray  # [B, T] int32
    targets: np.ndarray  # [B, T] int32
    loss_mask: np.ndarray  # [B, T] float32
    positions: np.ndarray  # [B, T] int32
    segment_ids: np.ndarray  # [B, T] int32
    inputs: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. pixel_values [B * k, 3, H, W]

    def as_dict(self) -> dict[str, np.ndarray]:
        d = {k: getattr(self, k) for k in ("tokens", "targets", "loss_mask", "positions", "segment_ids")}
        return {**d, **self.inputs}

    @property
    def n_targets(self) -> int:
        return int(self.loss_mask.sum())


# ---- 1. reading ---------------------------------------------------------------------------------


def _files_in(path: Path) -> list[Path]:
    known = _TEXT_EXT | _JSON_EXT | _CSV_EXT | _PARQUET_EXT
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in known)
    if not files:
        raise DataError(f"{path}: folder holds no data files ({', '.join(sorted(known))})")
    return files


def _utf8(path: Path, raw: bytes, first_line: int = 1) -> str:
    """``raw`` decoded, or a DataError at the line and column of the first byte that is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + raw.count(b"\n", 0, e.start)
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x} at column {col})") from None


def _read_text(path: Path, text_split: str) -> Iterator[Record]:
    content = _utf8(path, path.read_bytes())
    if text_split == "file":
        if content.strip():
            yield Record({"text": content}, f"{path}:1")
        return
    if text_split == "paragraph":
        line_no, buf, start = 0, [], 1
        for line_no, line in enumerate(content.splitlines(), 1):
            if line.strip():
                if not buf:
                    start = line_no
                buf.append(line)
            elif buf:
                yield Record({"text": "\n".join(buf)}, f"{path}:{start}")
                buf = []
        if buf:
            yield Record({"text": "\n".join(buf)}, f"{path}:{start}")
        return
    if text_split != "line":
        raise DataError(f"{path}: unknown text_split {text_split!r} (use 'line', 'paragraph' or 'file')")
    for i, line in enumerate(content.splitlines(), 1):
        if line.strip():
            yield Record({"text": line}, f"{path}:{i}")


def _read_json(path: Path) -> Iterator[Record]:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
        f.seek(0)
        if path.suffix.lower() == ".json" and head.startswith(b"["):
            try:
                items = json.loads(_utf8(path, f.read()))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
            for i, item in enumerate(items):
                if not isinstance(item, dict):
                    raise DataError(f"{path}: item {i} is a {type(item).__name__}, expected an object")
                yield Record(item, f"{path}:item {i}")
            return
        for i, raw in enumerate(f, 1):
            line = _utf8(path, raw, i)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{i}: expected a JSON object, got {type(obj).__name__}")
            yield Record(obj, f"{path}:{i}")


def _read_csv(path: Path) -> Iterator[Record]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        line = 1 if reader.fieldnames is None else reader.line_num  # header end
        try:
            for row in reader:
                start, line = line + 1, reader.line_num
                if None in row:
                    raise DataError(f"{path}:{start}: row has more fields than the header")
                yield Record(dict(row), f"{path}:{start}")
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
        except UnicodeDecodeError:
            raise DataError(f"{path}: near line {reader.line_num + 1}: not UTF-8 text") from None


def _read_parquet(path: Path) -> Iterator[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow is a test dependency
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from e
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - any pyarrow failure means an unreadable file
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    row = 0
    for batch in pf.iter_batches():
        for rec in batch.to_pylist():
            yield Record(rec, f"{path}:row {row}")
            row += 1


def _read_hf(ds: Any, name: str, split: str | None) -> Iterator[Record]:
    if type(ds).__name__ in ("DatasetDict", "IterableDatasetDict"):
        splits = list(ds.keys())
        pick = split or ("train" if "train" in splits else splits[0])
        if pick not in splits:
            raise DataError(f"{name}: no split {pick!r} (has {', '.join(splits)})")
        ds, name = ds[pick], f"{name}[{pick}]"
    for i, rec in enumerate(ds):
        yield Record(dict(rec), f"{name}:row {i}")


def _is_hf_dataset(obj: Any) -> bool:
    return type(obj).__module__.startswith("datasets.")


def read_records(source: Any, *, text_split: str = "line", split: str | None = None) -> list[Record]:
    """All records of ``source``.

    ``source`` may be a path (file or folder; the extension picks the reader: .txt/.md, .jsonl/.json,
    .csv/.tsv, .parquet), a folder written by ``datasets.Dataset.save_to_disk``, ``"hf:<name or path>"``
    (``datasets.load_dataset``; offline with a local path or a cached dataset), a ``datasets`` object, a
    list of paths, or a list of dicts / strings (strings are texts unless every one is an existing path).
    Plain text files yield one record per non-empty line (``text_split="line"``),
    per blank-line separated paragraph, or one per file.
    """
    if _is_hf_dataset(source):
        return list(_read_hf(source, "dataset", split))
    if isinstance(source, (list, tuple)):
        is_paths = bool(source) and all(
            isinstance(s, os.PathLike) or (isinstance(s, str) and Path(s).exists()) for s in source)
        if is_paths:
            return [r for s in source for r in read_records(s, text_split=text_split, split=split)]
        out = []
        for i, item in enumerate(source):
            if isinstance(item, str):
                item = {"text": item}
            if not isinstance(item, dict):
                raise DataError(f"<list>:item {i}: expected a dict or str, got {type(item).__name__}")
            out.append(Record(item, f"<list>:item {i}"))
        if not out:
            raise DataError("<list>: no examples")
        return out
    if isinstance(source, str) and source.startswith("hf:"):
        name = source[3:].removeprefix("//")
        try:
            import datasets
        except ImportError as e:
            raise DataError(f"{source}: Hugging Face datasets need `pip install datasets`") from e
        try:
            ds = datasets.load_dataset(name, split=split)
        except Exception as e:  # noqa: BLE001 - report any loading failure with the name
            raise DataError(f"{source}: cannot load dataset ({type(e).__name__}: {e})") from None
        return list(_read_hf(ds, source, split))
    path = Path(source)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() \
                or (path / "state.json").exists():
            try:
                import datasets
            except ImportError as e:
                raise DataError(f"{path}: a `datasets` folder; reading it needs `pip install datasets`") from e
            return list(_read_hf(datasets.load_from_disk(str(path)), str(path), split))
        return [r for f in _files_in(path) for r in read_records(f, text_split=text_split)]
    ext = path.suffix.lower()
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file")
    if ext in _TEXT_EXT:
        records = list(_read_text(path, text_split))
    elif ext in _JSON_EXT:
        records = list(_read_json(path))
    elif ext in _CSV_EXT:
        records = list(_read_csv(path))
    elif ext in _PARQUET_EXT:
        records = list(_read_parquet(path))
    else:
        raise DataError(f"{path}: unknown file type {ext or '(none)'!r}; use .txt, .jsonl, .json, .csv, .tsv "
                        "or .parquet")
    if not records:
        raise DataError(f"{path}: no examples in file")
    return records


# ---- 2. rendering ---------------------------------------------------------------------------------


def detect_format(record: Record) -> str:
    d = record.data
    if "messages" in d:
        return "chat"
    if "prompt" in d and "completion" in d:
        return "prompt_completion"
    if "text" in d:
        return "text"
    raise DataError(
        f"{record.origin}: cannot tell the format: expected a 'text' field, 'prompt' and 'completion', or "
        f"'messages' (record has {', '.join(sorted(map(str, d))) or 'no fields'})"
    )


def _field(record: Record, name: str) -> str:
    if name not in record.data:
        raise DataError(f"{record.origin}: missing field {name!r} (record has "
                        f"{', '.join(sorted(map(str, record.data))) or 'no fields'})")
    v = record.data[name]
    if v is None or (isinstance(v, float) and math.isnan(v)):
        raise DataError(f"{record.origin}: field {name!r} is empty (null)")
    if not isinstance(v, str):
        raise DataError(f"{record.origin}: field {name!r} must be text, got {type(v).__name__}")
    return v


def _chat_pieces(record: Record) -> tuple[tuple[str, bool], ...]:
    msgs = record.data.get("messages")
    if isinstance(msgs, str):
        try:
            msgs = json.loads(msgs)  # CSV / Parquet columns often hold the list as a JSON string
        except json.JSONDecodeError:
            raise DataError(f"{record.origin}: 'messages' is a string that is not a JSON list") from None
    if hasattr(msgs, "tolist"):
        msgs = msgs.tolist()
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{record.origin}: 'messages' must be a non-empty list of {{role, content}}")
    pieces: list[tuple[str, bool]] = []
    system: str | None = None
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{record.origin}: message {j} must be an object with 'role' and 'content'")
        role, content = m["role"], m["content"]
        if not isinstance(content, str):
            raise DataError(f"{record.origin}: message {j} content must be text, got {type(content).__name__}")
        if role == "system":
            # Gemma has no system turn: its instructions go in front of the first user turn.
            if j != 0:
                raise DataError(f"{record.origin}: message {j}: a system message may only come first")
            system = content
            continue
        if role == "user":
            if system is not None:
                content, system = f"{system}\n\n{content}", None
            pieces.append((f"{START_OF_TURN}user\n{content}{END_OF_TURN}\n", False))
        elif role in ("model", "assistant"):
            pieces.append((f"{START_OF_TURN}model\n", False))
            pieces.append((f"{content}{END_OF_TURN}", True))
            pieces.append(("\n", False))
        else:
            raise DataError(f"{record.origin}: message {j}: unknown role {role!r} "
                            "(use system, user, model or assistant)")
    if not any(t for _, t in pieces):
        raise DataError(f"{record.origin}: conversation has no model/assistant turn to learn from")
    return tuple(pieces)


def render_example(record: Record, format: str = "auto", text_field: str = "text") -> Example:
    """Text pieces and target flags for one record (see module docstring for the three formats).

    Chat conversations get no EOS: Gemma ends a turn with ``<end_of_turn>``, which is a target.
    """
    if format not in FORMATS:
        raise DataError(f"{record.origin}: unknown format {format!r}; use one of {', '.join(FORMATS)}")
    fmt = format
    if fmt == "auto":
        fmt = "text" if text_field != "text" and text_field in record.data else detect_format(record)
    if fmt == "text":
        return Example(((_field(record, text_field), True),), record.origin)
    if fmt == "prompt_completion":
        prompt, completion = _field(record, "prompt"), _field(record, "completion")
        return Example(((prompt, False), (completion, True)), record.origin)
    if "messages" not in record.data:
        raise DataError(f"{record.origin}: missing field 'messages' for the chat format")
    return Example(_chat_pieces(record), record.origin, add_eos=False)


# ---- 3. tokenizing and packing ------------------------------------------------------------------


def tokenize_example(example: Example, tokenizer: TokenizerLike) -> Document:
    """Encode piece by piece; weights mark the target tokens (BOS never is, EOS is when the text is)."""
    ids: list[int] = [tokenizer.bos_id] if example.add_bos else []
    weights: list[int] = [0] * len(ids)
    for text, target in example.pieces:
        if not text:
            continue
        toks = list(tokenizer.encode(text, add_bos=False))
        ids.extend(toks)
        weights.extend([int(target)] * len(toks))
    if example.add_eos:
        ids.append(tokenizer.eos_id)
        weights.append(1 if example.pieces and example.pieces[-1][1] else 0)
    return Document(np.asarray(ids, np.int32), np.asarray(weights, np.float32), example.origin)


#: ``(prompt text, images) -> (prompt ids, inputs)``: a family's ``encode_prompt`` bound to its config and
#: tokenizer.
PromptEncoder = Callable[[str, list[Any]], tuple[list[int], dict[str, Any]]]


def record_images(record: Record) -> list[Any] | None:
    """The images of a record (``"image"`` or ``"images"``), or None when it has none."""
    d = record.data
    if d.get("image") is not None:
        if d.get("images") is not None:
            raise DataError(f"{record.origin}: give 'image' or 'images', not both")
        return [d["image"]]
    imgs = d.get("images")
    if imgs is None:
        return None
    if hasattr(imgs, "tolist") and not hasattr(imgs, "shape"):
        imgs = imgs.tolist()
    if not isinstance(imgs, (list, tuple)) or not imgs:
        raise DataError(f"{record.origin}: 'images' must be a non-empty list")
    return list(imgs)


def _load_image(value: Any, origin: str) -> Any:
    """A PIL image or array for a path (relative to the data file), bytes or a ``{"bytes", "path"}`` dict."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        import io

        from PIL import Image

        try:
            return Image.open(io.BytesIO(value)).convert("RGB")
        except Exception as e:  # noqa: BLE001 - PIL raises several types for bad bytes
            raise DataError(f"{origin}: image bytes are not a readable image ({e})") from None
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        if not path.is_absolute():
            source = Path(origin.rsplit(":", 1)[0])
            path = (source.parent if source.is_file() else Path.cwd()) / path
        if not path.is_file():
            raise DataError(f"{origin}: image {str(value)!r} not found (looked at {path})")
        from PIL import Image

        try:
            return Image.open(path).convert("RGB")
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{origin}: {path} is not a readable image ({e})") from None
    if hasattr(value, "convert") or hasattr(value, "shape"):
        return value
    raise DataError(f"{origin}: an image must be a path, bytes, a PIL image or an array, "
                    f"got {type(value).__name__}")


def tokenize_image_example(record: Record, example: Example, images: list[Any], tokenizer: TokenizerLike,
                           encode_prompt: PromptEncoder, token_inputs: Mapping[str, int]) -> Document:
    """A prompt/completion record with images: the family encodes the prompt with its images, the completion
    (+ EOS) is the target; token-aligned inputs take their after-prompt value on it."""
    if len(example.pieces) != 2 or example.pieces[0][1] or not example.pieces[1][1]:
        raise DataError(f"{record.origin}: a record with images must be in the prompt/completion format "
                        "('prompt' and 'completion' fields)")
    prompt, completion = example.pieces[0][0], example.pieces[1][0]
    try:
        ids, inputs = encode_prompt(prompt, [_load_image(im, record.origin) for im in images])
    except DataError:
        raise
    except (ValueError, TypeError) as e:
        raise DataError(f"{record.origin}: {e}") from None
    tail = list(tokenizer.encode(completion, add_bos=False)) + [tokenizer.eos_id]
    n = len(ids)
    out: dict[str, np.ndarray] = {}
    for name, value in inputs.items():
        a = np.asarray(value)
        if name in token_inputs:
            a = np.concatenate([a.reshape(-1)[:n], np.full(len(tail), token_inputs[name], a.dtype)])
        out[name] = a
    weights = np.concatenate([np.zeros(n, np.float32), np.ones(len(tail), np.float32)])
    return Document(np.asarray(list(ids) + tail, np.int32), weights, record.origin, out)


def _fit(doc: Document, sequence_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """(inputs, targets, mask) of one document, truncated to ``sequence_length`` input positions."""
    n = len(doc.ids) - 1
    truncated = n > sequence_length
    n = min(n, sequence_length)
    return doc.ids[:n], doc.ids[1:n + 1], doc.weights[1:n + 1], truncated


def pack_rows(
    docs: Sequence[Document], sequence_length: int, *, pack: bool = True, max_open_rows: int = 8
) -> list[list[int]]:
    """Assign documents (by index) to rows of ``sequence_length`` positions.

    First fit over a small window of open rows: a document goes into the first open row with room; when
    none has room and the window is full, the oldest row is closed. Deterministic for a given order, near
    the packing density of first-fit, and it streams (no global sort, which would undo the shuffle by
    grouping documents of similar length). Documents must already fit (``_fit`` truncates them).
    """
    rows: list[list[int]] = []
    if not pack:
        return [[i] for i, d in enumerate(docs) if len(d.ids) > 1]
    open_rows: list[tuple[list[int], int]] = []  # (doc indices, used length)
    for i, d in enumerate(docs):
        n = min(len(d.ids) - 1, sequence_length)
        if n <= 0:
            continue
        for j, (idx, used) in enumerate(open_rows):
            if used + n <= sequence_length:
                idx.append(i)
                open_rows[j] = (idx, used + n)
                break
        else:
            if len(open_rows) >= max_open_rows:
                rows.append(open_rows.pop(0)[0])
            open_rows.append(([i], n))
    rows.extend(idx for idx, _ in open_rows)
    return rows


def _assemble_inputs(docs: Sequence[Document], rows: Sequence[Sequence[int]], batch_size: int,
                     sequence_length: int, token_inputs: Mapping[str, int]) -> dict[str, np.ndarray]:
    """The documents' extra inputs for one batch (rows hold one document each): token-aligned ones [B, T]
    (after-prompt value on padding), the others concatenated over rows (zeros for empty rows), so the shapes
    never change."""
    first = docs[0].inputs
    out: dict[str, np.ndarray] = {}
    for name, like in first.items():
        if name in token_inputs:
            a = np.full((batch_size, sequence_length), token_inputs[name], like.dtype)
            for r, row in enumerate(rows):
                doc = docs[row[0]]
                n = min(len(doc.ids) - 1, sequence_length)  # aligned with the row's input tokens
                a[r, :n] = doc.inputs[name][:n]
        else:
            a = np.zeros((batch_size,) + like.shape, like.dtype)
            for r, row in enumerate(rows):
                a[r] = docs[row[0]].inputs[name]
            a = a.reshape((batch_size * like.shape[0],) + like.shape[1:])
        out[name] = a
    return out


def _assemble(docs: Sequence[Document], rows: Sequence[Sequence[int]], batch_size: int,
              sequence_length: int, pad_id: int, token_inputs: Mapping[str, int] | None = None) -> Batch:
    shape = (batch_size, sequence_length)
    tokens = np.full(shape, pad_id, np.int32)
    targets = np.full(shape, pad_id, np.int32)
    mask = np.zeros(shape, np.float32)
    positions = np.zeros(shape, np.int32)
    segments = np.zeros(shape, np.int32)
    for r, row in enumerate(rows):
        at = 0
        for s, i in enumerate(row, 1):
            x, y, w, _ = _fit(docs[i], sequence_length)
            n = len(x)
            tokens[r, at:at + n] = x
            targets[r, at:at + n] = y
            mask[r, at:at + n] = w
            positions[r, at:at + n] = np.arange(n)
            segments[r, at:at + n] = s
            at += n
    inputs = _assemble_inputs(docs, rows, batch_size, sequence_length, token_inputs or {}) \
        if docs and docs[0].inputs else {}
    return Batch(tokens, targets, mask, positions, segments, inputs)


# ---- the dataset and its iterators ---------------------------------------------------------------


@dataclass
class Dataset:
    """Tokenized documents plus the settings that turn them into fixed-shape batches.

    Build with ``Dataset.from_source``. ``stats`` reports documents, tokens (after truncation), target
    tokens, truncated documents, documents dropped for having no target, and — for the unshuffled packing
    — packed rows and the padding fraction.
    """

    documents: list[Document]
    sequence_length: int
    pack: bool = True
    pad_id: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    token_inputs: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def from_source(
        cls,
        source: Any,
        tokenizer: TokenizerLike,
        sequence_length: int,
        *,
        format: str = "auto",
        text_field: str = "text",
        text_split: str = "line",
        split: str | None = None,
        pack: bool = True,
        pad_id: int | None = None,
        encode_prompt: PromptEncoder | None = None,
        token_inputs: Mapping[str, int] | None = None,
    ) -> Dataset:
        """Read, render and tokenize ``source`` (see ``read_records`` for what it may be).

        ``encode_prompt`` and ``token_inputs`` come from a model that reads images (see the module docstring);
        without them a record with images is an error."""
        if sequence_length < 1:
            raise ValueError(f"sequence_length must be positive, got {sequence_length}")
        if format not in FORMATS:
            raise DataError(f"{source}: unknown format {format!r}; use one of {', '.join(FORMATS)}")
        records = read_records(source, text_split=text_split, split=split)
        docs, dropped = [], 0
        n_images: tuple[int, str] | None = None
        for rec in records:
            example = render_example(rec, format, text_field)
            images = record_images(rec)
            if images is None:
                if n_images is not None:
                    raise DataError(f"{rec.origin}: a record without images among records with images "
                                    f"({n_images[1]} has {n_images[0]})")
                doc = tokenize_example(example, tokenizer)
            else:
                if encode_prompt is None:
                    raise DataError(f"{rec.origin}: the record has images but this model reads text only")
                if docs and n_images is None:
                    raise DataError(f"{rec.origin}: a record with images among records without")
                if n_images is not None and len(images) != n_images[0]:
                    raise DataError(f"{rec.origin}: {len(images)} images, but {n_images[1]} has {n_images[0]}; "
                                    "every record of a batch must have as many")
                n_images = n_images or (len(images), rec.origin)
                doc = tokenize_image_example(rec, example, images, tokenizer, encode_prompt, token_inputs or {})
                prompt_len = int((doc.weights == 0).sum())
                if prompt_len >= sequence_length:
                    raise DataError(f"{rec.origin}: the prompt with its images is {prompt_len} tokens, which "
                                    f"leaves no room for the completion in sequence_length={sequence_length}")
            if len(doc.ids) < 2 or not doc.weights[1:].any():
                dropped += 1  # nothing to predict (e.g. an empty completion that still had no EOS)
                continue
            docs.append(doc)
        if not docs:
            raise DataError(f"{source}: no example has any target token")
        if pad_id is None:
            pad_id = int(getattr(tokenizer, "pad_id", 0) or 0)
            pad_id = max(pad_id, 0)  # -1 means "no pad token"; any id works under a zero mask
        ds = cls(docs, int(sequence_length), pack and n_images is None, pad_id,
                 token_inputs=dict(token_inputs or {}))
        ds.stats = ds._stats(dropped)
        return ds

    def _stats(self, dropped: int) -> dict[str, Any]:
        truncated = tokens = targets = 0
        for d in self.documents:
            x, _, w, t = _fit(d, self.sequence_length)
            truncated += t
            tokens += len(x)
            targets += int(w.sum())
        rows = len(pack_rows(self.documents, self.sequence_length, pack=self.pack))
        return {
            "documents": len(self.documents),
            "tokens": tokens,
            "target_tokens": targets,
            "truncated": truncated,
            "dropped": dropped,
            "packed_rows": rows,
            "padding_fraction": 1.0 - tokens / (rows * self.sequence_length),
        }

    def __len__(self) -> int:
        return len(self.documents)

    def report(self) -> str:
        s = self.stats
        return (f"{s['documents']} documents, {s['tokens']} tokens ({s['target_tokens']} targets), "
                f"{s['packed_rows']} rows of {self.sequence_length}, {s['padding_fraction']:.1%} padding, "
                f"{s['truncated']} truncated, {s['dropped']} dropped")

    def iterator(self, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 num_epochs: int | None = None, drop_remainder: bool = False) -> BatchIterator:
        """Training batches, epoch after epoch (forever when ``num_epochs`` is None)."""
        return BatchIterator(self, batch_size, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                             drop_remainder=drop_remainder)

    def evaluation(self, batch_size: int) -> Iterator[Batch]:
        """One pass over every document in file order; the last batch is padded with empty rows."""
        it = BatchIterator(self, batch_size, shuffle=False, num_epochs=1)
        yield from it


class EpochCursor:
    """The position of an epoch-based iterator (``BatchIterator``, ``preference.IndexIterator``): ``batch``
    within ``epoch``, with the ``batch_size``, ``seed``, ``num_epochs`` and ``drop_remainder`` its subclass
    sets. An epoch's items are a pure function of (seed, epoch), so ``state()`` is the whole position."""

    batch_size: int
    seed: int
    num_epochs: int | None
    drop_remainder: bool
    epoch: int
    batch: int

    def batches_in_epoch(self, epoch: int | None = None) -> int:
        raise NotImplementedError

    def _batches_of(self, n: int) -> int:
        """Batches that ``n`` items make: a partial last one counts unless ``drop_remainder``."""
        q, r = divmod(n, self.batch_size)
        return q if self.drop_remainder or r == 0 else q + 1

    def _next_window(self) -> slice:
        """The next batch's slice of the current epoch's items, moving on to the next epoch when this one is
        done (``StopIteration`` after ``num_epochs``); the position then steps past it."""
        while True:
            if self.num_epochs is not None and self.epoch >= self.num_epochs:
                raise StopIteration
            if self.batch < self.batches_in_epoch():
                break
            self.epoch, self.batch = self.epoch + 1, 0
        start = self.batch * self.batch_size
        self.batch += 1
        return slice(start, start + self.batch_size)

    def __iter__(self) -> Self:
        return self

    def state(self) -> dict[str, int]:
        """Where the next batch comes from; save it with the checkpoint."""
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed}


class BatchIterator(EpochCursor):
    """Iterator of ``Batch``es with a small, JSON-able, restorable state.

    Batches of epoch ``e`` are a pure function of (documents, seed, e, settings), so ``state()`` only needs
    ``{"epoch", "batch", "seed"}``. The last batch of an epoch is padded with empty rows (mask 0, segment 0)
    unless ``drop_remainder``; the shape never changes, so a jitted step never recompiles.
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 num_epochs: int | None = None, drop_remainder: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.num_epochs = num_epochs
        self.drop_remainder = drop_remainder
        self.epoch = 0
        self.batch = 0
        self._rows_epoch: int | None = None
        self._rows: list[list[int]] = []
        self._order: np.ndarray = np.arange(0)

    # -- per-epoch plan
    def _plan(self, epoch: int) -> None:
        if self._rows_epoch == epoch:
            return
        n = len(self.dataset.documents)
        if self.shuffle:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(n)
        else:
            self._order = np.arange(n)
        docs = [self.dataset.documents[i] for i in self._order]
        self._rows = [[int(self._order[i]) for i in row]
                      for row in pack_rows(docs, self.dataset.sequence_length, pack=self.dataset.pack)]
        self._rows_epoch = epoch

    def batches_in_epoch(self, epoch: int | None = None) -> int:
        """Number of batches of an epoch (it can differ slightly between epochs: packing follows the order)."""
        self._plan(self.epoch if epoch is None else epoch)
        return self._batches_of(len(self._rows))

    # -- iteration
    def __next__(self) -> Batch:
        window = self._next_window()  # first: it plans the epoch, which replaces self._rows
        rows = self._rows[window]
        ds = self.dataset
        return _assemble(ds.documents, rows, self.batch_size, ds.sequence_length, ds.pad_id, ds.token_inputs)

    # -- state
    def restore(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` was taken (the seed must be the same one)."""
        try:
            epoch, batch = int(state["epoch"]), int(state["batch"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"bad data-iterator state {state!r}: need 'epoch' and 'batch'") from None
        if "seed" in state and int(state["seed"]) != self.seed:
            raise ValueError(f"data state was saved with seed {state['seed']}, this iterator uses {self.seed}")
        self.epoch, self.batch = epoch, batch
