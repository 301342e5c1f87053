"""Tokenizer: SentencePiece (from tokenizer.model or rebuilt from GGUF metadata), chat templates, streaming.

Gemma's tokenizer is a SentencePiece BPE model. We load it with ``sentencepiece`` (fast, no torch) and
reproduce the behaviour of transformers' tokenizer that the models were tuned with:

* control tokens written in the text (``<start_of_turn>``, ``<bos>``, ``<unusedN>``...) are encoded as
  single tokens, as transformers does for its "special" added tokens (SentencePiece alone would spell them
  out character by character);
* ``<bos>`` starts every sequence exactly once (a chat template that already wrote it gets no second one);
* decoding drops special tokens unless asked not to.

A GGUF file carries the vocabulary as ``tokenizer.ggml.{tokens,scores,token_type}``; :meth:`Tokenizer.from_gguf`
turns those back into a SentencePiece ``ModelProto`` so a GGUF alone is enough to run a model. Gemma 4's
vocabulary is a byte-fallback BPE ``tokenizer.json`` instead (the ``tokenizers`` backend); llama.cpp stores it
as ``tokenizer.ggml.model = "gemma4"`` with the BPE merges in ``tokenizer.ggml.merges``, and
:meth:`Tokenizer.gguf_vocab` / :meth:`Tokenizer.from_gguf` write and read that layout.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gemmax.io.gguf import read_metadata

__all__ = [
    "Tokenizer",
    "StreamDecoder",
    "apply_chat_template",
    "fim_prompt",
    "FIM_PREFIX",
    "FIM_SUFFIX",
    "FIM_MIDDLE",
    "FILE_SEPARATOR",
]

# SentencePiece piece types (same numbering as llama.cpp's tokenizer.ggml.token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE, FILE_SEPARATOR = "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", \
    "<|file_separator|>"

#: Special tokens worth naming, looked up in whatever vocabulary is loaded (ids differ between families).
KNOWN_SPECIALS = (
    "<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
    "<end_of_image>", FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE, FILE_SEPARATOR,
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<|eom_id|>",
)
#: Gemma 4 markers llama.cpp's converter stores as USER_DEFINED, though tokenizer.json calls them special, so
#: that llama.cpp writes them in its output where its chat parser reads thoughts and tool calls.
GEMMA4_VISIBLE = ("<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>",
                  "<tool_response|>", '<|"|>')
#: score of every token of a ``gemma4`` GGUF vocabulary: BPE ranks are the merges' order, and llama.cpp's
#: converter gives every token this one value
_BPE_SCORE = -1000.0
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
#: Tokens that end a generated turn, besides eos (``<turn|>``: Gemma 4's end of turn).
_STOP_PIECES = ("<end_of_turn>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", FILE_SEPARATOR, "<turn|>")


def _is_space_run(piece: str) -> bool:
    return len(piece) >= 1 and set(piece) == {" "}


class Tokenizer:
    """Text <-> token ids for Gemma (and Llama 3 through a ``tokenizer.json``).

    Build with :meth:`from_file`, :meth:`from_gguf` or :meth:`from_pretrained`. ``bos_id``, ``eos_id``,
    ``pad_id`` and ``unk_id`` are the special tokens' ids (-1 where the vocabulary has none).
    """

    def __init__(self, sp: Any = None, hf: Any = None, chat_template: str | None = None,
                 gguf_types: Sequence[int] | None = None):
        if (sp is None) == (hf is None):
            raise ValueError("Tokenizer needs exactly one backend: a SentencePieceProcessor or a tokenizers.Tokenizer")
        self._sp = sp
        self._hf = hf
        self.chat_template = chat_template
        if sp is not None:
            from sentencepiece import sentencepiece_model_pb2 as pb

            proto = pb.ModelProto()
            proto.ParseFromString(sp.serialized_model_proto())
            n = len(proto.pieces)
            self._pieces = [p.piece for p in proto.pieces]
            types = np.fromiter((p.type for p in proto.pieces), dtype=np.int32, count=n)
            self._types = types
            if gguf_types is not None:  # keep what the file said for user-defined pieces
                g = np.asarray(gguf_types, dtype=np.int32)
                self._types = np.where((g == USER_DEFINED) & (types == NORMAL), USER_DEFINED, types)
            special = np.flatnonzero((types == CONTROL) | (types == UNKNOWN)).tolist()
            self.bos_id, self.eos_id, self.pad_id, self.unk_id = sp.bos_id(), sp.eos_id(), sp.pad_id(), sp.unk_id()
        else:
            vocab = hf.get_vocab(with_added_tokens=True)
            n = max(vocab.values()) + 1 if vocab else 0
            self._pieces = [""] * n
            for piece, i in vocab.items():
                self._pieces[i] = piece
            self._types = np.full(n, NORMAL, dtype=np.int32)
            special = [i for i, t in hf.get_added_tokens_decoder().items() if t.special]
            self._types[special] = CONTROL
            look = lambda *names: next((vocab[p] for p in names if p in vocab), -1)  # noqa: E731
            self.bos_id = look("<bos>", "<|begin_of_text|>", "<s>")
            self.eos_id = look("<eos>", "<|end_of_text|>", "</s>")
            self.pad_id = look("<pad>", "<|finetune_right_pad_id|>")
            self.unk_id = look("<unk>")
        self._piece_to_id = {p: i for i, p in enumerate(self._pieces)}
        # A space-only piece may be spelled with spaces (GGUF) or with U+2581 (tokenizer.model): accept both.
        for i, p in enumerate(self._pieces):
            if p and set(p) == {"\u2581"} and len(p) > 1:
                self._piece_to_id.setdefault(" " * len(p), i)
        self._special_set = frozenset(special)
        texts = sorted({self._pieces[i] for i in special if self._pieces[i]}, key=len, reverse=True)
        self._special_re = re.compile("|".join(re.escape(t) for t in texts)) if texts else None

    # ---- construction ----------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | os.PathLike[str], chat_template: str | None = None) -> Tokenizer:
        """Load a SentencePiece ``tokenizer.model`` (or a ``tokenizer.json`` via the tokenizers package)."""
        path = Path(path)
        if path.suffix == ".json":
            from tokenizers import Tokenizer as HFTokenizer

            return cls(hf=HFTokenizer.from_file(str(path)), chat_template=chat_template)
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        sp.load(str(path))
        return cls(sp=sp, chat_template=chat_template)

    @classmethod
    def from_proto(cls, proto: Any, chat_template: str | None = None,
                   gguf_types: Sequence[int] | None = None) -> Tokenizer:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        sp.load_from_serialized_proto(proto.SerializeToString() if hasattr(proto, "SerializeToString") else proto)
        return cls(sp=sp, chat_template=chat_template, gguf_types=gguf_types)

    @classmethod
    def from_gguf(cls, source: Any) -> Tokenizer:
        """The tokenizer a GGUF's ``tokenizer.ggml.*`` metadata describes (``source``: a path, or a parsed file
        with ``arch`` and ``tokenizer_metadata``): a SentencePiece model for ``"llama"`` vocabularies, a
        ``tokenizers`` BPE for Gemma 4's ``"gemma4"`` ones (which needs the ``tokenizers`` package)."""
        if hasattr(source, "tokenizer_metadata"):  # an already parsed file
            arch, meta = source.arch, source.tokenizer_metadata
        else:
            arch, _, meta = read_metadata(source)
        model = meta.get("tokenizer.ggml.model")
        if model == "gemma4":
            return cls._from_gemma4_gguf(meta)
        if model not in ("llama", None):
            raise ValueError(
                f"GGUF tokenizer type {model!r} is neither SentencePiece ('llama') nor Gemma 4's BPE ('gemma4'); "
                "load that model's tokenizer.json with Tokenizer.from_pretrained instead"
            )
        proto = _proto_from_gguf(meta, arch)
        return cls.from_proto(proto, chat_template=meta.get("tokenizer.chat_template"),
                              gguf_types=meta.get("tokenizer.ggml.token_type"))

    @classmethod
    def _from_gemma4_gguf(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """A ``tokenizers`` BPE equal to the ``tokenizer.json`` a ``gemma4`` GGUF was written from: the file's
        tokens in id order with its merges, byte fallback, spaces as U+2581 before the merges and back after
        (Gemma's normalizer and decoder), CONTROL (and UNKNOWN) tokens as special added tokens and USER_DEFINED
        ones as plain added tokens, so both are matched whole in the text, as llama.cpp and transformers do."""
        try:
            from tokenizers import AddedToken, decoders, normalizers
            from tokenizers import Tokenizer as HFTokenizer
            from tokenizers.models import BPE
        except ImportError as e:
            raise ImportError("reading a Gemma 4 GGUF's vocabulary (tokenizer.ggml.model 'gemma4') needs the "
                              "tokenizers package: pip install tokenizers") from e
        tokens = meta.get("tokenizer.ggml.tokens")
        if not tokens:
            raise ValueError("GGUF has no tokenizer.ggml.tokens: it carries no tokenizer")
        n = len(tokens)
        types = np.asarray(meta.get("tokenizer.ggml.token_type", np.full(n, NORMAL)), dtype=np.int32)
        if len(types) != n:
            raise ValueError(f"GGUF has {n} tokens but {len(types)} tokenizer.ggml.token_type entries")
        vocab = {tok: i for i, tok in enumerate(tokens)}  # a repeated token keeps its last id, as transformers
        merges = _gguf_merges(meta.get("tokenizer.ggml.merges"), vocab)
        unk = int(meta.get("tokenizer.ggml.unknown_token_id", vocab.get("<unk>", -1)))
        bpe = BPE(vocab=vocab, merges=merges, unk_token=tokens[unk] if 0 <= unk < n else None, fuse_unk=True,
                  byte_fallback=True, dropout=None)
        hf = HFTokenizer(bpe)
        hf.normalizer = normalizers.Replace(" ", "\u2581")
        hf.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
        # the markers llama.cpp keeps USER_DEFINED (GEMMA4_VISIBLE) are special in tokenizer.json: so here
        is_special = [k in (CONTROL, UNKNOWN) or (k == USER_DEFINED and t in GEMMA4_VISIBLE)
                      for t, k in zip(tokens, types, strict=True)]
        special = [AddedToken(t, normalized=False, special=True)
                   for t, sp in zip(tokens, is_special, strict=True) if sp]
        plain = [AddedToken(t, normalized=False, special=False)
                 for t, k, sp in zip(tokens, types, is_special, strict=True) if k == USER_DEFINED and not sp]
        hf.add_special_tokens(special)
        hf.add_tokens(plain)
        tok = cls(hf=hf, chat_template=meta.get("tokenizer.chat_template"))
        for attr, key in (("bos_id", "bos_token_id"), ("eos_id", "eos_token_id"), ("pad_id", "padding_token_id"),
                          ("unk_id", "unknown_token_id")):
            i = meta.get(f"tokenizer.ggml.{key}")
            if i is not None and 0 <= int(i) < n:  # the file's own ids over the names guessed from the vocabulary
                setattr(tok, attr, int(i))
        return tok

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike[str]) -> Tokenizer:
        """Load from a Hugging Face model folder: tokenizer.model, else tokenizer.json; plus its chat template."""
        folder = Path(folder)
        template = _read_chat_template(folder)
        if (folder / "tokenizer.model").is_file():
            return cls.from_file(folder / "tokenizer.model", chat_template=template)
        if (folder / "tokenizer.json").is_file():
            return cls.from_file(folder / "tokenizer.json", chat_template=template)
        raise FileNotFoundError(f"{folder} has neither tokenizer.model nor tokenizer.json")

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``tokenizer.model`` (or ``tokenizer.json`` for a tokenizers backend) into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self._sp is not None:
            out = folder / "tokenizer.model"
            out.write_bytes(self._sp.serialized_model_proto())
        else:
            out = folder / "tokenizer.json"
            self._hf.save(str(out))
        if self.chat_template:
            (folder / "chat_template.jinja").write_text(self.chat_template)
        return out

    # ---- vocabulary ------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    def __len__(self) -> int:
        return self.vocab_size

    def id_to_piece(self, i: int) -> str:
        return self._pieces[int(i)]

    def piece_to_id(self, piece: str) -> int:
        """Id of a piece, or -1 if the vocabulary has no such piece."""
        return self._piece_to_id.get(piece, -1)

    def is_special(self, i: int) -> bool:
        return int(i) in self._special_set

    def find_special(self, text: str) -> str | None:
        """The first control token or known marker of this vocabulary written in ``text`` (e.g.
        ``<end_of_turn>``), or None. A chat template must not let message content spell turn markers:
        encoding would make them real ones (a SentencePiece user-defined piece is always one token)."""
        rx = getattr(self, "_marker_re", False)
        if rx is False:
            texts = {self._pieces[i] for i in self._special_set if self._pieces[i]}
            texts |= {p for p in KNOWN_SPECIALS if p in self._piece_to_id}
            rx = re.compile("|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True))) if texts else None
            self._marker_re = rx
        m = rx.search(text) if rx is not None else None
        return m.group(0) if m else None

    @property
    def special_ids(self) -> dict[str, int]:
        """Named special tokens present in this vocabulary, e.g. ``{"<start_of_turn>": 105, ...}``."""
        return {p: self._piece_to_id[p] for p in KNOWN_SPECIALS if p in self._piece_to_id}

    @property
    def start_of_turn_id(self) -> int:
        return self.piece_to_id("<start_of_turn>")

    @property
    def end_of_turn_id(self) -> int:
        return self.piece_to_id("<end_of_turn>")

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end generation: eos, end-of-turn (Gemma / Llama 3), CodeGemma's file separator."""
        ids = [self.eos_id] if self.eos_id >= 0 else []
        ids += [self._piece_to_id[p] for p in _STOP_PIECES if p in self._piece_to_id]
        return tuple(dict.fromkeys(ids))

    @property
    def fim_stop_ids(self) -> tuple[int, ...]:
        """Ids that end a CodeGemma fill-in-the-middle completion: ``<|file_separator|>`` and eos."""
        ids = [self._piece_to_id[p] for p in (FILE_SEPARATOR,) if p in self._piece_to_id]
        if self.eos_id >= 0:
            ids.append(self.eos_id)
        return tuple(dict.fromkeys(ids))

    # ---- encode / decode -------------------------------------------------------------------------------
    def _encode_plain(self, text: str) -> list[int]:
        if not text:
            return []
        if self._sp is not None:
            return list(self._sp.encode(text))
        return list(self._hf.encode(text, add_special_tokens=False).ids)

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        """Token ids of ``text``; special tokens written in the text become single ids.

        With ``add_bos`` the result starts with exactly one ``<bos>`` even if the text already began with one.
        """
        ids: list[int] = []
        if self._special_re is None or self._hf is not None:
            ids = self._encode_plain(text)
        else:
            pos = 0
            for m in self._special_re.finditer(text):
                ids += self._encode_plain(text[pos: m.start()])
                ids.append(self._piece_to_id[m.group(0)])
                pos = m.end()
            ids += self._encode_plain(text[pos:])
        if add_bos and self.bos_id >= 0 and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        if add_eos and self.eos_id >= 0:
            ids.append(self.eos_id)
        return ids

    def encode_batch(self, texts: Iterable[str], add_bos: bool = True, add_eos: bool = False) -> list[list[int]]:
        return [self.encode(t, add_bos=add_bos, add_eos=add_eos) for t in texts]

    def _decode_plain(self, ids: list[int]) -> str:
        if not ids:
            return ""
        if self._sp is not None:
            return self._sp.decode(ids)
        return self._hf.decode(ids, skip_special_tokens=False)

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of ``ids``; special tokens are dropped (``skip_special``) or written as their text."""
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=skip_special)
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self._special_set or not 0 <= i < len(self._pieces):
                out.append(self._decode_plain(run))
                run = []
                if not skip_special and 0 <= i < len(self._pieces):
                    out.append(self._pieces[i])
            else:
                run.append(i)
        out.append(self._decode_plain(run))
        return "".join(out)

    def decode_batch(self, batch: Iterable[Iterable[int]], skip_special: bool = True) -> list[str]:
        return [self.decode(ids, skip_special=skip_special) for ids in batch]

    def stream_decoder(self, skip_special: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special=skip_special)

    # ---- chat ------------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            family: str = "gemma", tools: Sequence[Mapping[str, Any]] | None = None) -> str:
        return apply_chat_template(messages, add_generation_prompt=add_generation_prompt, family=family,
                                   tools=tools)

    def fim_prompt(self, prefix: str, suffix: str) -> str:
        missing = [t for t in (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE) if t not in self._piece_to_id]
        if missing:
            raise ValueError(f"this vocabulary has no fill-in-the-middle tokens ({', '.join(missing)})")
        return fim_prompt(prefix, suffix)

    # ---- GGUF export -----------------------------------------------------------------------------------
    def gguf_vocab(self) -> tuple[list[str], np.ndarray, np.ndarray, dict[str, Any]]:
        """(tokens, scores, token types, flags) as llama.cpp's ``tokenizer.ggml.*`` fields want them.

        A SentencePiece vocabulary is llama.cpp's ``"llama"`` model. A ``tokenizer.json`` one must be Gemma 4's
        byte-fallback BPE, written as llama.cpp's converter writes it (``"gemma4"``): ``flags["merges"]`` holds
        the merges as ``"left right"`` strings; anything else raises a ValueError saying what differs."""
        if self._sp is None:
            return self._gemma4_gguf_vocab()
        from sentencepiece import sentencepiece_model_pb2 as pb

        proto = pb.ModelProto()
        proto.ParseFromString(self._sp.serialized_model_proto())
        tokens, scores, types = [], np.zeros(len(proto.pieces), np.float32), np.zeros(len(proto.pieces), np.int32)
        for i, p in enumerate(proto.pieces):
            piece = p.piece
            if p.type == USER_DEFINED and set(piece) == {"\u2581"} and len(piece) > 1:
                piece = " " * len(piece)  # llama.cpp spells whitespace runs with real spaces
            tokens.append(piece)
            scores[i] = p.score
            types[i] = p.type
        flags: dict[str, Any] = {
            "model": "llama",
            "pre": "default",
            "add_space_prefix": bool(proto.normalizer_spec.add_dummy_prefix),
            "unk_id": self.unk_id,
            "chat_template": self.chat_template,
        }
        if self.end_of_turn_id >= 0:
            flags["eot_id"] = self.end_of_turn_id
        return tokens, scores, types, flags

    def _gemma4_gguf_vocab(self) -> tuple[list[str], np.ndarray, np.ndarray, dict[str, Any]]:
        """The ``gemma4`` layout of a tokenizers backend. Only a vocabulary that the reader (ours, llama.cpp's,
        transformers') rebuilds to the same encoding is written: a byte-fallback BPE whose only normalization is
        spaces -> U+2581, with no real pre-tokenization and Gemma's decoder; the file cannot say anything else."""
        spec = json.loads(self._hf.to_str())
        problems = _gemma4_shape_problems(spec)
        if problems:
            raise ValueError("tokenizer.json cannot be written as a GGUF vocabulary: llama.cpp's 'gemma4' model is "
                             "Gemma 4's byte-fallback BPE, and this one " + "; ".join(problems))
        missing = [i for i, p in enumerate(self._pieces) if not p]
        if missing:
            raise ValueError(f"tokenizer.json has no token with id {missing[0]} (of {len(self._pieces)}): GGUF "
                             "lists the tokens by id, with no gaps")
        merges: list[str] = []
        for m in spec["model"].get("merges") or []:
            left, right = m if isinstance(m, list) else m.split(" ", 1)
            if " " in left or " " in right:
                raise ValueError(f"BPE merge {(left, right)!r} has a space inside a token: GGUF writes a merge as "
                                 "one 'left right' string")
            merges.append(f"{left} {right}")
        added = self._hf.get_added_tokens_decoder()
        n = len(self._pieces)
        types = np.full(n, NORMAL, np.int32)
        for i, piece in enumerate(self._pieces):
            if i in added:
                types[i] = CONTROL if added[i].special and piece not in GEMMA4_VISIBLE else USER_DEFINED
            elif _BYTE_PIECE.fullmatch(piece):
                types[i] = BYTE
        flags: dict[str, Any] = {
            "model": "gemma4",
            "pre": None,  # llama.cpp's converter writes none (llama.cpp picks Gemma 4's own)
            "add_space_prefix": False,
            "unk_id": self.unk_id,
            "chat_template": self.chat_template,
            "merges": merges,
        }
        if self.end_of_turn_id >= 0:
            flags["eot_id"] = self.end_of_turn_id
        return list(self._pieces), np.full(n, _BPE_SCORE, np.float32), types, flags


# ---- Gemma 4's BPE in GGUF ------------------------------------------------------------------------------


def _gemma4_shape_problems(spec: Mapping[str, Any]) -> list[str]:
    """What keeps a serialized ``tokenizers.Tokenizer`` from being Gemma 4's BPE (empty when it is)."""
    out: list[str] = []
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        out.append(f"is a {model.get('type')} model, not BPE")
        return out
    if not model.get("byte_fallback"):
        out.append("has no byte_fallback (a byte-level BPE such as Llama 3's)")
    for key in ("continuing_subword_prefix", "end_of_word_suffix", "dropout"):
        if model.get(key):
            out.append(f"sets {key}={model[key]!r}")
    if model.get("ignore_merges"):
        out.append("sets ignore_merges")
    norm = spec.get("normalizer")
    if norm and norm.get("type") == "Sequence" and len(norm.get("normalizers") or []) == 1:
        norm = norm["normalizers"][0]
    if not (norm and norm.get("type") == "Replace" and norm.get("pattern") == {"String": " "}
            and norm.get("content") == "\u2581"):
        out.append(f"normalizes with {_json_brief(norm)}, not Replace(' ', '\u2581')")
    pre = spec.get("pre_tokenizer")
    # a split on " " is a no-op after the normalizer replaced every space (transformers writes one)
    if pre is not None and not (pre.get("type") == "Split" and pre.get("pattern") == {"String": " "}):
        out.append(f"pre-tokenizes with {_json_brief(pre)}")
    dec = spec.get("decoder") or {}
    steps = dec.get("decoders") if dec.get("type") == "Sequence" else [dec]
    want = [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
            {"type": "Fuse"}]
    if steps != want:
        out.append(f"decodes with {_json_brief(dec)}, not Replace('\u2581', ' ') + ByteFallback + Fuse")
    return out


def _json_brief(obj: Any) -> str:
    text = json.dumps(obj, ensure_ascii=False)
    return text if len(text) <= 120 else text[:117] + "..."


def _gguf_merges(merges: Sequence[str] | None, vocab: Mapping[str, int]) -> list[tuple[str, str]]:
    """``tokenizer.ggml.merges`` as (left, right) pairs, each checked against the vocabulary so a bad file is
    named by its merge (tokenizers' own error names neither the file nor the entry). As llama.cpp, the pair splits
    at the first space after the first character: a left part may be a lone space, no part holds one inside."""
    if merges is None:
        raise ValueError("GGUF tokenizer 'gemma4' has no tokenizer.ggml.merges: a BPE vocabulary needs them")
    out: list[tuple[str, str]] = []
    for i, m in enumerate(merges):
        cut = m.find(" ", 1)
        left, right = (m[:cut], m[cut + 1:]) if cut > 0 else (m, "")
        if not left or not right:
            raise ValueError(f"GGUF merge {i} {m!r} is not two tokens separated by a space")
        for part in (left, right, left + right):
            if part not in vocab:
                raise ValueError(f"GGUF merge {i} {m!r} needs the token {part!r}, which is not in "
                                 "tokenizer.ggml.tokens")
        out.append((left, right))
    return out


# ---- GGUF -> SentencePiece ------------------------------------------------------------------------------


def _proto_from_gguf(meta: Mapping[str, Any], arch: str) -> Any:
    """A SentencePiece BPE ModelProto equivalent to llama.cpp's "llama" (SPM) vocabulary."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError("GGUF has no tokenizer.ggml.tokens: it carries no tokenizer")
    n = len(tokens)
    scores = np.asarray(meta.get("tokenizer.ggml.scores", np.zeros(n)), dtype=np.float32)
    types = np.asarray(meta.get("tokenizer.ggml.token_type", np.full(n, NORMAL)), dtype=np.int32)
    unk = int(meta.get("tokenizer.ggml.unknown_token_id", -1))
    if unk < 0:
        unk = next((i for i, t in enumerate(types) if t == UNKNOWN), tokens.index("<unk>") if "<unk>" in tokens
                   else -1)
    if unk < 0:
        raise ValueError("GGUF vocabulary has no unknown token; SentencePiece needs one")
    proto = pb.ModelProto()
    ts = proto.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE
    ts.vocab_size = n
    ts.byte_fallback = bool((types == BYTE).any())
    ts.unk_id = unk
    ts.bos_id = int(meta.get("tokenizer.ggml.bos_token_id", -1))
    ts.eos_id = int(meta.get("tokenizer.ggml.eos_token_id", -1))
    ts.pad_id = int(meta.get("tokenizer.ggml.padding_token_id", -1))
    ts.unk_piece, ts.allow_whitespace_only_pieces = tokens[unk], True
    if ts.bos_id >= 0:
        ts.bos_piece = tokens[ts.bos_id]
    if ts.eos_id >= 0:
        ts.eos_piece = tokens[ts.eos_id]
    if ts.pad_id >= 0:
        ts.pad_piece = tokens[ts.pad_id]
    ns = proto.normalizer_spec
    ns.name = "identity"
    default_prefix = arch not in ("gemma", "gemma2", "gemma3")
    ns.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", default_prefix))
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    seen: set[str] = set()
    for i, (tok, score, typ) in enumerate(zip(tokens, scores, types, strict=True)):
        piece = "\u2581" * len(tok) if typ == USER_DEFINED and _is_space_run(tok) else tok
        typ = int(typ)
        if i == unk:
            typ = UNKNOWN
        elif typ == UNKNOWN:
            typ = CONTROL  # SentencePiece allows one unknown piece
        if typ not in (NORMAL, CONTROL, USER_DEFINED, UNUSED, BYTE, UNKNOWN):
            typ = NORMAL
        if piece in seen:  # SentencePiece rejects duplicates; keep the id, make the text unreachable
            piece, typ = f"<gemmax_dup_{i}>", UNUSED
        seen.add(piece)
        sp_piece = proto.pieces.add()
        sp_piece.piece, sp_piece.score, sp_piece.type = piece, float(score), typ
    return proto


def _read_chat_template(folder: Path) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        t = json.loads(cfg.read_text()).get("chat_template")
        if isinstance(t, str):
            return t
        if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
            return next((x["template"] for x in t if x.get("name") == "default"), None)
    return None


# ---- streaming ------------------------------------------------------------------------------------------


class StreamDecoder:
    """Incremental detokenisation: push ids one at a time, get back only text that is complete.

    Decoding token by token breaks on SentencePiece byte fallback (an emoji is 4 ``<0x..>`` tokens, each
    undecodable alone) and on pieces whose leading space depends on context. We decode a short window of
    recent ids and emit the new suffix only once it no longer ends in an incomplete UTF-8 sequence (U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self.ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # ids[:_read] have been emitted

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special=self.skip_special)

    def push(self, token_id: int) -> str:
        """Add one id; return the newly completed text ("" while a character is still incomplete)."""
        self.ids.append(int(token_id))
        before = self._text(self.ids[self._prefix: self._read])
        after = self._text(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before):]
        return ""

    def extend(self, ids: Iterable[int]) -> str:
        return "".join(self.push(i) for i in ids)

    def flush(self) -> str:
        """Whatever is left (an incomplete character decodes as U+FFFD), and reset."""
        before = self._text(self.ids[self._prefix: self._read])
        after = self._text(self.ids[self._prefix:])
        self.ids, self._prefix, self._read = [], 0, 0
        return after[len(before):] if after.startswith(before) else after


# ---- chat templates -------------------------------------------------------------------------------------


def _content_text(content: Any, trim_parts: bool = False, image: str = "<start_of_image>") -> str:
    """Message content: a string, or a list of {"type": "text", "text": ...} parts and image parts
    (``"image"`` or OpenAI's ``"image_url"``), each written as the placeholder ``image`` (Gemma 3's
    ``<start_of_image>``, Gemma 4's ``<|image|>``) a multimodal family's ``encode_prompt`` expands.
    ``trim_parts``: each text part trimmed, as Gemma 3's and Gemma 4's templates do."""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        out = []
        for part in content:
            if part.get("type") == "text":
                out.append(_jinja_trim(part["text"]) if trim_parts else part["text"])
            elif part.get("type") in ("image", "image_url"):
                out.append(image)
        return "".join(out)
    raise ValueError(f"invalid message content {content!r}")


def _jinja_trim(s: str) -> str:
    # Jinja's `trim` strips Python whitespace, like str.strip()
    return s.strip()


def apply_chat_template(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                        family: str = "gemma", bos: bool = True, tools: Sequence[Mapping[str, Any]] | None = None,
                        date: str | None = None) -> str:
    """The prompt string the model's own chat template produces (Gemma 3's, Gemma 4's or Llama 3's).

    Gemma: roles alternate user/model ("assistant" is written "model"), a leading system message is folded
    into the first user turn, contents are trimmed. The string starts with ``<bos>``: encode it with
    ``add_bos`` on and the tokenizer will not add a second one.

    ``tools`` (OpenAI's ``[{"type": "function", "function": {name, description, parameters}}]``) are
    declared in the family's function-calling format, and assistant messages may carry ``tool_calls``
    (``{"function": {"name", "arguments"}}``, arguments a mapping or its JSON text) and ``role: "tool"``
    messages the results (docs/tools.md). ``date`` is the "Today Date" of Llama 3.1's tool prompt (default:
    today, as transformers renders it).
    """
    if family in ("gemma", "gemma2", "gemma3", "codegemma"):
        return _gemma_template(_gemma3_tool_turns(messages, tools), add_generation_prompt, bos)
    if family in ("llama3", "llama"):
        if tools or any(m.get("tool_calls") or m["role"] in ("tool", "ipython") for m in messages):
            return _llama31_tool_template(messages, add_generation_prompt, bos, tools or (), date)
        return _llama3_template(messages, add_generation_prompt, bos)
    if family == "paligemma":
        if tools:
            raise ValueError("PaliGemma takes no tools: its prompt is a task prefix, not a conversation")
        return _paligemma_prompt(messages)
    if family == "gemma4":
        return _gemma4_template(messages, add_generation_prompt, bos, tools)
    raise ValueError(f"no chat template for family {family!r}; use 'gemma', 'gemma4', 'llama3' or 'paligemma'")


def _gemma_template(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool, bos: bool) -> str:
    out = ["<bos>" if bos else ""]
    msgs = list(messages)
    prefix = ""
    if msgs and msgs[0]["role"] == "system":
        prefix = _content_text(msgs[0]["content"]) + "\n\n"
        msgs = msgs[1:]
    for i, m in enumerate(msgs):
        if (m["role"] == "user") != (i % 2 == 0):
            raise ValueError("Conversation roles must alternate user/assistant/user/assistant/...")
        role = "model" if m["role"] == "assistant" else m["role"]
        out.append(f"<start_of_turn>{role}\n" + (prefix if i == 0 else ""))
        out.append(_jinja_trim(_content_text(m["content"], trim_parts=True)))
        out.append("<end_of_turn>\n")
    if add_generation_prompt:
        out.append("<start_of_turn>model\n")
    return "".join(out)


# ---- tools: the published function-calling formats ------------------------------------------------------


def _tool_function(tool: Mapping[str, Any]) -> Mapping[str, Any]:
    """The ``function`` of an OpenAI tool (or the tool itself when given bare)."""
    return tool.get("function", tool)


def _call_arguments(call: Mapping[str, Any]) -> tuple[str, Any]:
    """(name, arguments as a mapping) of a ``tool_calls`` entry; OpenAI sends the arguments as JSON text."""
    fn = call.get("function", call)
    args = fn.get("arguments")
    if args is None or args == "":
        args = {}
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            raise ValueError(f"the arguments of the call to {fn.get('name')!r} are not valid JSON") from None
    return fn["name"], args


#: Gemma 3's function-calling instruction (the JSON variant of the format Google documents for Gemma 3; the
#: wording is gemmax's own): one call is a JSON object, several are a JSON list of them
GEMMA3_TOOL_INSTRUCTION = (
    "You can call the functions listed below. To call one, answer with nothing but a JSON object "
    '{"name": function name, "parameters": dictionary of argument names and values}; to call several, '
    "answer with a JSON list of such objects. A call holds no other text.\n"
)


def gemma3_call_text(calls: Sequence[Mapping[str, Any]]) -> str:
    """A Gemma 3 model turn's calls: one JSON object, or a JSON list of them for parallel calls."""
    objs = [{"name": n, "parameters": a} for n, a in map(_call_arguments, calls)]
    return json.dumps(objs[0] if len(objs) == 1 else objs, ensure_ascii=False)


def _gemma3_tool_turns(messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None
                       ) -> list[Mapping[str, Any]]:
    """Gemma 3's turns with tools (its template has no tool section; the format is Google's documented one):
    the declarations open the first user turn (after the system text), an assistant's calls are its JSON
    call text after any content, and tool results go back in a user turn, each in a ```` ```tool_output````
    block; consecutive user-side turns merge so roles still alternate."""
    if not tools and not any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        return list(messages)
    out: list[dict[str, Any]] = []
    head = ""
    if tools:
        decls = [{k: f[k] for k in ("name", "description", "parameters") if k in f} for f in map(_tool_function, tools)]
        head = GEMMA3_TOOL_INSTRUCTION + json.dumps(decls, indent=2, ensure_ascii=False) + "\n\n"
    for m in messages:
        role = m["role"]
        if role == "tool":
            text = f"```tool_output\n{_tool_content_text(m.get('content'))}\n```"
            role = "user"
        elif role == "assistant" and m.get("tool_calls"):
            content = _jinja_trim(_content_text(m.get("content") or ""))
            text = (content + "\n" if content else "") + gemma3_call_text(m["tool_calls"])
        else:
            text = m["content"]
        if role == "user" and head:
            text, head = head + _content_text(text).strip(), ""
        if out and role == "user" and out[-1]["role"] == "user":
            out[-1] = {"role": "user", "content": out[-1]["content"] + "\n" + _content_text(text)}
            continue
        out.append({"role": role, "content": text})
    if head:
        raise ValueError("tools are declared in the first user message, and this conversation has none")
    return out


def _tool_content_text(content: Any) -> str:
    """A tool result as text: a string as is, text parts joined, anything else as JSON."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, Mapping) and p.get("type") == "text" for p in content):
        return "".join(p["text"] for p in content)
    return json.dumps(content, ensure_ascii=False)


#: Llama 3.1's custom-tool prompt, as its published chat template writes it into the first user message
LLAMA31_TOOL_PROMPT = (
    "Given the following functions, please respond with a JSON for a function call with its proper arguments "
    "that best answers the given prompt.\n\n"
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
    "Do not use variables.\n\n"
)


def _llama31_tool_template(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool, bos: bool,
                           tools: Sequence[Mapping[str, Any]], date: str | None) -> str:
    """Llama 3.1's template with custom tools (its default, tools in the first user message): a system header
    naming the ipython environment and the dates, the tool JSON (indented 4) before the first user message,
    one JSON call per assistant message, results in ``ipython`` turns."""
    import datetime

    date = date or datetime.date.today().strftime("%d %b %Y")
    msgs = list(messages)
    system = ""
    if msgs and msgs[0]["role"] == "system":
        system, msgs = _jinja_trim(_content_text(msgs[0]["content"])), msgs[1:]
    out = ["<|begin_of_text|>" if bos else "", "<|start_header_id|>system<|end_header_id|>\n\n"]
    if tools:
        out.append("Environment: ipython\n")
    out.append(f"Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n{system}<|eot_id|>")
    if tools:
        if not msgs or msgs[0]["role"] != "user":
            raise ValueError("Llama 3.1 declares tools in the first user message, and this conversation has none")
        out.append("<|start_header_id|>user<|end_header_id|>\n\n" + LLAMA31_TOOL_PROMPT)
        out += [json.dumps(t, indent=4, ensure_ascii=False) + "\n\n" for t in tools]
        out.append(_jinja_trim(_content_text(msgs[0]["content"])) + "<|eot_id|>")
        msgs = msgs[1:]
    for m in msgs:
        if m.get("tool_calls"):
            if len(m["tool_calls"]) != 1:
                raise ValueError("Llama 3.1's format holds one tool call per assistant message")
            name, args = _call_arguments(m["tool_calls"][0])
            out.append("<|start_header_id|>assistant<|end_header_id|>\n\n"
                       f'{{"name": "{name}", "parameters": {json.dumps(args, ensure_ascii=False)}}}<|eot_id|>')
        elif m["role"] in ("tool", "ipython"):
            # the published template writes any iterable content as JSON: a text result too, quoted
            out.append("<|start_header_id|>ipython<|end_header_id|>\n\n"
                       f"{json.dumps(m.get('content'), ensure_ascii=False)}<|eot_id|>")
        else:
            out.append(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
                       f"{_jinja_trim(_content_text(m['content']))}<|eot_id|>")
    if add_generation_prompt:
        out.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(out)


#: Gemma 4's string delimiter inside tool declarations, calls and responses
_G4_QUOTE = '<|"|>'
#: keys of a property schema that Gemma 4's declaration format writes itself (never as nested properties)
_G4_STANDARD_KEYS = ("description", "type", "properties", "required", "nullable")


def _jinja_str(v: Any) -> str:
    """A scalar as Jinja prints it (Python's ``str``: None -> "None")."""
    return str(v)


def _gemma4_value(v: Any, escape_keys: bool = True) -> str:
    """A value in Gemma 4's notation: strings between ``<|"|>``, mappings as ``{key:value,...}`` (keys sorted,
    themselves quoted when ``escape_keys``), lists as ``[a,b]``, booleans lower-case, other scalars as Jinja
    prints them."""
    if isinstance(v, str):
        return _G4_QUOTE + v + _G4_QUOTE
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, Mapping):
        key = (lambda k: _G4_QUOTE + k + _G4_QUOTE) if escape_keys else (lambda k: k)
        return "{" + ",".join(f"{key(k)}:{_gemma4_value(v[k], escape_keys)}" for k in sorted(v)) + "}"
    if isinstance(v, Sequence):
        return "[" + ",".join(_gemma4_value(x, escape_keys) for x in v) + "]"
    return _jinja_str(v)


def _g4_upper(t: Any) -> str:
    return "" if t is None else str(t).upper()


def _g4_required(items: Sequence[Any]) -> str:
    return "required:[" + ",".join(_G4_QUOTE + str(x) + _G4_QUOTE for x in items) + "]"


def _gemma4_items(items: Mapping[str, Any]) -> str:
    parts = []
    for k in sorted(items):
        v = items[k]
        if v is None:
            continue
        if k == "properties":
            inner = _gemma4_properties(v) if isinstance(v, Mapping) else ""
            parts.append("properties:{" + inner + "}")
        elif k == "required":
            parts.append(_g4_required(v))
        elif k == "type":
            parts.append("type:" + _gemma4_value(_g4_upper(v) if isinstance(v, str) else [_g4_upper(x) for x in v]))
        else:
            parts.append(f"{k}:{_gemma4_value(v)}")
    return "items:{" + ",".join(parts) + "}"


def _gemma4_properties(props: Mapping[str, Any]) -> str:
    """Gemma 4's declaration of a schema's properties: ``name:{description:..,type:<|"|>STRING<|"|>}``, with
    enums, array items, nullability and nested objects as its published template writes them."""
    out = []
    for key in sorted(props):
        if key in _G4_STANDARD_KEYS:
            continue
        value = props[key]
        typ = _g4_upper(value.get("type"))
        parts = []
        if value.get("description"):
            parts.append(f"description:{_G4_QUOTE}{value['description']}{_G4_QUOTE}")
        if typ == "STRING" and value.get("enum"):
            parts.append("enum:" + _gemma4_value(value["enum"]))
        elif typ == "ARRAY" and isinstance(value.get("items"), Mapping) and value["items"]:
            parts.append(_gemma4_items(value["items"]))
        if value.get("nullable"):
            parts.append("nullable:true")
        if typ == "OBJECT":
            nested = value["properties"] if isinstance(value.get("properties"), Mapping) else value
            parts.append("properties:{" + _gemma4_properties(nested) + "}")
            if value.get("required"):
                parts.append(_g4_required(value["required"]))
        parts.append(f"type:{_G4_QUOTE}{typ}{_G4_QUOTE}")
        out.append(f"{key}:{{" + ",".join(parts) + "}")
    return ",".join(out)


def _gemma4_declaration(tool: Mapping[str, Any]) -> str:
    """``<|tool>declaration:name{description:..,parameters:{properties:{..},required:[..],type:..}}<tool|>``"""
    fn = _tool_function(tool)
    out = f"declaration:{fn['name']}{{description:{_G4_QUOTE}{fn.get('description') or ''}{_G4_QUOTE}"
    params = fn.get("parameters")
    if params:
        out += ",parameters:{"
        if params.get("properties"):
            out += "properties:{" + _gemma4_properties(params["properties"]) + "},"
        if params.get("required"):
            out += _g4_required(params["required"]) + ","
        if params.get("type"):
            out += f"type:{_G4_QUOTE}{_g4_upper(params['type'])}{_G4_QUOTE}}}"
    return "<|tool>" + (out + "}").strip() + "<tool|>"


def gemma4_call_text(name: str, args: Mapping[str, Any]) -> str:
    """One call in Gemma 4's format: ``<|tool_call>call:name{key:value,...}<tool_call|>``."""
    body = ",".join(f"{k}:{_gemma4_value(args[k], False)}" for k in sorted(args))
    return f"<|tool_call>call:{name}{{{body}}}<tool_call|>"


def _gemma4_response(name: str, content: Any) -> str:
    """A tool result: a mapping's items, or ``value:`` the text (a list of text parts joined)."""
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text")
    if isinstance(content, Mapping):
        body = ",".join(f"{k}:{_gemma4_value(content[k], False)}" for k in sorted(content))
    else:
        body = "value:" + _gemma4_value(content, False)
    return f"<|tool_response>response:{name}{{{body}}}<tool_response|>"


def _strip_thinking(text: str) -> str:
    """A model turn's text without its ``<|channel>...<channel|>`` thought, trimmed."""
    out = []
    for part in text.split("<channel|>"):
        out.append(part.split("<|channel>")[0] if "<|channel>" in part else part)
    return "".join(out).strip()


def _gemma4_template(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool, bos: bool,
                     tools: Sequence[Mapping[str, Any]] | None) -> str:
    """Gemma 4's turns, as its published template writes them: ``<|turn>role\n ... <turn|>\n`` with roles
    system / user / model; the system turn holds the system message and the tool declarations; a model
    turn's calls (``<|tool_call>call:name{args}<tool_call|>``) are followed, inside the same turn, by the
    results of the ``role: "tool"`` messages after it (``<|tool_response>response:name{...}<tool_response|>``,
    the name found through ``tool_call_id``), and the model goes on in that turn: no new ``<|turn>model``
    after results, and an assistant message after them continues the turn."""
    out = ["<bos>" if bos else ""]
    msgs = list(messages)
    if tools or (msgs and msgs[0]["role"] in ("system", "developer")):
        out.append("<|turn>system\n")
        if msgs and msgs[0]["role"] in ("system", "developer"):
            out.append(_jinja_trim(_content_text(msgs[0]["content"])))
            msgs = msgs[1:]
        out += [_gemma4_declaration(t) for t in tools or ()]
        out.append("<turn|>\n")
    prev_type = None
    prev_role = None
    for i, m in enumerate(msgs):
        if m["role"] == "tool":
            continue
        prev_type = None
        role = "model" if m["role"] == "assistant" else m["role"]
        if not (role == "model" and prev_role == "assistant"):
            out.append(f"<|turn>{role}\n")
        prev_role = m["role"]
        calls = m.get("tool_calls") or ()
        for call in calls:
            out.append(gemma4_call_text(*_call_arguments(call)))
            prev_type = "tool_call"
        responded = False
        if calls:
            names = {c.get("id"): _call_arguments(c)[0] for c in calls}
            for follow in msgs[i + 1:]:
                if follow["role"] != "tool":
                    break
                name = names.get(follow.get("tool_call_id")) or follow.get("name") or "unknown"
                out.append(_gemma4_response(name, follow.get("content")))
                responded, prev_type = True, "tool_response"
        content = m.get("content")
        if isinstance(content, str):
            out.append(_strip_thinking(content) if role == "model" else _jinja_trim(content))
        elif content:
            out.append(_jinja_trim(_content_text(content, trim_parts=True, image="<|image|>")))
        if prev_type == "tool_call" and not responded:
            out.append("<|tool_response>")
        elif not (responded and not content):
            out.append("<turn|>\n")
    if add_generation_prompt and prev_type not in ("tool_response", "tool_call"):
        out.append("<|turn>model\n")
    return "".join(out)


def _paligemma_prompt(messages: Sequence[Mapping[str, Any]]) -> str:
    """PaliGemma takes no chat turns: its prompt is the text of the last user message (a task prefix such as
    "caption en"); the family's ``encode_prompt`` puts the images and ``<bos>`` in front of it."""
    users = [m for m in messages if m["role"] == "user"]
    if not users:
        raise ValueError("PaliGemma needs a user message: its task prompt (e.g. 'caption en')")
    content = users[-1]["content"]
    if not isinstance(content, str):
        content = " ".join(p["text"] for p in content if p.get("type") == "text")
    return content.strip()


def _llama3_template(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool, bos: bool) -> str:
    out = ["<|begin_of_text|>" if bos else ""]
    for m in messages:
        out.append(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
                   f"{_jinja_trim(_content_text(m['content']))}<|eot_id|>")
    if add_generation_prompt:
        out.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(out)


def fim_prompt(prefix: str, suffix: str) -> str:
    """CodeGemma fill-in-the-middle prompt; generation stops at ``<|file_separator|>`` or eos."""
    return f"{FIM_PREFIX}{prefix}{FIM_SUFFIX}{suffix}{FIM_MIDDLE}"
