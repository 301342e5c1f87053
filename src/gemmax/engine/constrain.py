"""Structured output: which tokens a constrained row may sample next, computed on the host by llguidance.

A :class:`Constraint` says what the output must be (a JSON schema, any JSON object, a regex or a Lark
grammar); it holds no tokenizer and no state, so one object can sit on many ``SamplingParams`` (tool
calling sets one to force a tool's argument schema). The engine turns it into a :class:`RowMatcher` per
request, bound to the model's vocabulary, which fills the row's allowed-token bitmask before each token
and follows the tokens sampled. The mask itself is applied on the device, in the sampler.

Why llguidance (docs/structured_output.md has the comparison with xgrammar and outlines-core): it
compiles a schema lazily in about a millisecond (outlines-core builds a regex index over the whole 262k
vocabulary, over a second per new schema), computes a mask in tens of microseconds, reads JSON schema,
regexes and Lark grammars natively, and refuses a keyword it cannot enforce instead of ignoring it.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import llguidance as llg
import numpy as np

#: how constrained JSON is laid out: the separators of ``json.dumps`` and no free whitespace, so a model
#: cannot fill its token budget with blank lines between two keys
JSON_OPTIONS: dict[str, Any] = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}

#: SentencePiece piece types (sentencepiece_model.proto): control and unknown pieces carry no text,
#: byte pieces (``<0xAB>``) one byte each
_UNKNOWN, _CONTROL, _BYTE = 2, 3, 6


class ConstraintError(ValueError):
    """A schema, regex or grammar that cannot be enforced; the message names the problem."""


@dataclass(frozen=True)
class Constraint:
    """What a row's output must match. Build one with :meth:`json_schema`, :meth:`json_object`,
    :meth:`regex` or :meth:`grammar`; each checks its input at once and raises :class:`ConstraintError`
    naming what is wrong."""

    kind: str
    """"json_schema", "json_object", "regex" or "grammar"."""
    source: str
    """The schema (as JSON text), the regex or the Lark grammar, as given."""
    grammar: str
    """llguidance's grammar for it (what a matcher is built from)."""

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any] | str) -> Constraint:
        """Output that is JSON valid against ``schema`` (a dict or its JSON text)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise ConstraintError(f"the schema is not valid JSON: {e}") from None
        if not isinstance(schema, Mapping):
            raise ConstraintError(f"a JSON schema must be an object, got {type(schema).__name__}")
        text = json.dumps(schema)
        return cls._checked("json_schema", text, llg.LLMatcher.grammar_from_json_schema(text, overrides=JSON_OPTIONS))

    @classmethod
    def json_object(cls) -> Constraint:
        """Output that is one JSON object (OpenAI's ``{"type": "json_object"}``)."""
        text = json.dumps({"type": "object"})
        return cls._checked("json_object", text, llg.LLMatcher.grammar_from_json_schema(text, overrides=JSON_OPTIONS))

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        """Output that matches ``pattern`` whole (Rust ``regex`` syntax, as llguidance reads it)."""
        if not isinstance(pattern, str) or not pattern:
            raise ConstraintError("a regex must be a non-empty string")
        return cls._checked("regex", pattern, llg.LLMatcher.grammar_from_regex(pattern))

    @classmethod
    def grammar(cls, lark: str) -> Constraint:
        """Output that the Lark grammar ``lark`` derives from its ``start`` rule (llguidance's Lark dialect,
        which also takes ``%json { schema }`` rules and ``/regex/`` lexemes)."""
        if not isinstance(lark, str) or not lark.strip():
            raise ConstraintError("a grammar must be a non-empty string")
        return cls._checked("grammar", lark, llg.LLMatcher.grammar_from_lark(lark))

    @classmethod
    def named_json(cls, alternatives: Mapping[str, Mapping[str, Any]]) -> Constraint:
        """One of the names (written as is) followed by JSON valid against that name's schema: what a call
        to one of several tools writes after ``call:`` in Gemma 4's format. The JSON is compact as for
        :meth:`json_schema` (free whitespace would let a model pad a call until its token limit)."""
        if not alternatives:
            raise ConstraintError("named_json needs at least one name")
        rules = [f"{json.dumps(n)} %json {json.dumps({**s, 'x-guidance': JSON_OPTIONS})}"
                 for n, s in alternatives.items()]
        lark = "start: " + " | ".join(rules)
        return cls._checked("grammar", lark, llg.LLMatcher.grammar_from_lark(lark))

    @classmethod
    def _checked(cls, kind: str, source: str, grammar: str) -> Constraint:
        """Validate without a tokenizer (no vocabulary needed to find a bad keyword or regex), so a request
        is refused before it is queued."""
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar)
        if is_error:
            raise ConstraintError(_clean(messages[0] if messages else "invalid grammar"))
        return cls(kind, source, grammar)

    def matcher(self, vocab: Vocabulary) -> RowMatcher:
        """A fresh matcher for one row over ``vocab``."""
        return RowMatcher(llg.LLMatcher(vocab.ll, self.grammar, log_level=0), vocab)


def _clean(msg: str) -> str:
    """llguidance's messages, without its internal location prefixes."""
    return " ".join(msg.split())[:500]


# ---- the vocabulary side ------------------------------------------------------------------------------


def _special(tokenizer: Any, i: int) -> bool:
    types = getattr(tokenizer, "_types", None)
    return tokenizer.is_special(i) or (types is not None and int(types[i]) in (_UNKNOWN, _CONTROL))


def token_text(tokenizer: Any, i: int) -> bytes:
    """The bytes token ``i`` stands for in a gemmax ``Tokenizer``: a SentencePiece piece with ``▁`` as a
    space, one byte for a ``<0xAB>`` byte piece, a special token's own text; a tokenizers
    (``tokenizer.json``) vocabulary through its decoder."""
    piece = tokenizer.id_to_piece(i)
    hf = getattr(tokenizer, "_hf", None)
    types = getattr(tokenizer, "_types", None)
    if _special(tokenizer, i):
        return piece.encode("utf-8")
    if hf is not None:
        return hf.decode([i], skip_special_tokens=False).encode("utf-8", "surrogatepass")
    if types is not None and types[i] == _BYTE and len(piece) == 6 and piece.startswith("<0x"):
        return bytes([int(piece[3:5], 16)])
    return piece.replace("\u2581", " ").encode("utf-8")


def token_bytes(tokenizer: Any) -> tuple[list[bytes], list[int]]:
    """Each token's bytes (:func:`token_text`; empty for special tokens, which stand for no text in an
    output) and the ids of the special tokens."""
    out: list[bytes] = []
    special: list[int] = []
    for i in range(tokenizer.vocab_size):
        if _special(tokenizer, i):
            out.append(b"")
            special.append(i)
        else:
            out.append(token_text(tokenizer, i))
    return out, special


class _Wrapped:
    """The tokenizer shape llguidance's ``TokenizerWrapper`` reads. llguidance tokenizes text the grammar
    forces (a literal, a separator) with it, and needs the tokens to spell exactly those bytes: a
    SentencePiece model that normalizes whitespace (drops a lone space) does not, so then the text is
    spelled greedily with the vocabulary's longest pieces instead."""

    def __init__(self, tokenizer: Any, tokens: list[bytes], special: list[int], eos: int):
        self.eos_token_id = eos
        self.bos_token_id = tokenizer.bos_id if tokenizer.bos_id >= 0 else None
        self.tokens = tokens
        self.special_token_ids = special
        self._tok = tokenizer
        skip = set(special)
        self._by_bytes: dict[bytes, int] = {}
        for i, b in enumerate(tokens):
            if b and i not in skip:
                self._by_bytes.setdefault(b, i)
        self._longest = max((len(b) for b in self._by_bytes), default=1)

    def __call__(self, s: str | bytes) -> list[int]:
        data = s if isinstance(s, bytes) else s.encode("utf-8")
        try:
            ids = self._tok.encode(data.decode("utf-8"), add_bos=False)
        except UnicodeDecodeError:
            ids = None
        if ids is not None and b"".join(self.tokens[i] for i in ids if i < len(self.tokens)) == data:
            return ids
        return self._greedy(data)

    def _greedy(self, data: bytes) -> list[int]:
        out, p = [], 0
        while p < len(data):
            for n in range(min(self._longest, len(data) - p), 0, -1):
                i = self._by_bytes.get(data[p: p + n])
                if i is not None:
                    out.append(i)
                    p += n
                    break
            else:
                raise ConstraintError(f"the vocabulary cannot spell the byte {data[p:p + 1]!r}")
        return out


class Vocabulary:
    """A model's vocabulary as llguidance sees it: built once per (tokenizer, logits width, stop ids),
    about a second for Gemma's 262k pieces, then shared by every matcher over it."""

    def __init__(self, tokenizer: Any, n_vocab: int, stop_ids: Sequence[int]):
        tokens, special = token_bytes(tokenizer)
        tokens = (tokens + [b""] * n_vocab)[:n_vocab]  # logits past the tokenizer's pieces: never text
        special = [i for i in special if i < n_vocab] + list(range(tokenizer.vocab_size, n_vocab))
        stops = [t for t in stop_ids if 0 <= t < n_vocab] or [tokenizer.eos_id]
        self.ll = llg.LLTokenizer(llg.TokenizerWrapper(_Wrapped(tokenizer, tokens, special, stops[0])),
                                  n_vocab=n_vocab, eos_token=stops)
        self.n_vocab = n_vocab
        self.words = (n_vocab + 31) // 32
        self.stop_ids = tuple(stops)


_VOCABS: weakref.WeakKeyDictionary[Any, dict[tuple, Vocabulary]] = weakref.WeakKeyDictionary()
_VOCAB_LOCK = threading.Lock()


def vocabulary(tokenizer: Any, n_vocab: int, stop_ids: Sequence[int]) -> Vocabulary:
    """The cached :class:`Vocabulary` of ``tokenizer`` for a model with ``n_vocab`` logits."""
    key = (n_vocab, tuple(stop_ids))
    with _VOCAB_LOCK:
        per = _VOCABS.setdefault(tokenizer, {})
        if key not in per:
            per[key] = Vocabulary(tokenizer, n_vocab, stop_ids)
        return per[key]


class RowMatcher:
    """One constrained row: fills its bitmask before each token and follows the tokens sampled."""

    def __init__(self, m: llg.LLMatcher, vocab: Vocabulary):
        self._m = m
        self.vocab = vocab
        if m.is_error():
            raise ConstraintError(_clean(m.get_error()))

    def fill(self, out: np.ndarray) -> None:
        """Write the allowed-token bitmask (int32 words, bit ``t % 32`` of word ``t // 32``) into ``out``.
        A finished grammar allows only the stop tokens, so the row ends at once."""
        if out.dtype != np.int32 or out.shape != (self.vocab.words,) or not out.flags["C_CONTIGUOUS"]:
            raise ValueError(f"mask row must be C-contiguous int32 of shape ({self.vocab.words},)")
        self._m.unsafe_compute_mask_ptr(out.ctypes.data, out.nbytes)

    def consume(self, token: int) -> bool:
        """Follow a sampled token; False if the grammar does not allow it (then the row is in error)."""
        return bool(self._m.consume_token(int(token)))

    @property
    def error(self) -> str | None:
        return _clean(self._m.get_error()) if self._m.is_error() else None

    @property
    def finished(self) -> bool:
        """The grammar has ended (nothing more may follow)."""
        return bool(self._m.is_stopped())

    def check_writable(self, kind: str) -> None:
        """Raise :class:`ConstraintError` when no token of the vocabulary can begin an answer the grammar
        allows (e.g. JSON with a vocabulary that has no ``{``): decoding would otherwise end at once with an
        empty answer reported as finished. Call before the first token."""
        if self.finished:
            return
        mask = np.zeros(self.vocab.words, np.int32)
        self.fill(mask)
        bits = np.unpackbits(mask.view(np.uint8), bitorder="little")[: self.vocab.n_vocab].astype(bool)
        bits[list(self.vocab.stop_ids)] = False
        if not bits.any():
            raise ConstraintError(f"the model's vocabulary has no token that can begin an answer the {kind} "
                                  "allows (its first characters cannot be written with this tokenizer)")
