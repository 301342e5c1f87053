"""Gemma 4's BPE vocabulary in GGUF files: llama.cpp's ``tokenizer.ggml.model = "gemma4"``, written and read.

A Gemma 4 tokenizer is a byte-fallback BPE ``tokenizer.json``. The fixture is a tiny one in that shape, trained
here: ``<pad> <eos> <bos> <unk> <mask>``, the turn / channel / tool markers (special), the 256 byte pieces,
merges learned from a few lines (whitespace runs such as ``▁▁`` and ``▁▁▁▁`` among them) and one added token
that is not special (``<note>``).

* gemmax writes it (``Tokenizer.gguf_vocab`` + ``add_tokenizer``); transformers' GGUF tokenizer (the independent
  reader), gemmax's reading of the file and the original ``tokenizer.json`` encode every text to the same ids,
  and decoding gives the text back.
* A file written with gguf's own ``GGUFWriter`` in llama.cpp's converter layout (built here from the
  tokenizer.json, not by gemmax) loads in ``CausalLM.from_preset`` with a tokenizer equal to transformers'.
* The comparison can fail: with the merges cut down to one, or the special tokens typed NORMAL, the ids differ.
* Bad input is named: a merge of a token the vocabulary lacks (a model file with it loads without a tokenizer and
  warns why), no merges, another tokenizer model, no ``tokenizers`` package, a tokenizer.json of another shape.
* End to end: a tiny Gemma 4 model exported with its tokenizer.json reloads from the GGUF and generates from text
  the tokens the tokenizer.json model generates.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

tf = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")

from test_gguf_next import _copy  # noqa: E402

from gemmax import CausalLM  # noqa: E402
from gemmax.io.tokenizer import Tokenizer  # noqa: E402
from gemmax.models.gemma.gguf import add_tokenizer  # noqa: E402
from gemmax.models.gemma4.config import tiny_config  # noqa: E402

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<|turn>", "<turn|>", "<|channel>", "<channel|>",
            "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>']
#: what llama.cpp's converter stores USER_DEFINED although tokenizer.json calls them special (written out here,
#: not taken from gemmax, so that the hand-made file is the converter's and not gemmax's reading of it)
VISIBLE = {"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>",
           '<|"|>'}
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, hello there: the world is wide",
    "def add(a, b):\n    return a + b\n",
    "for x in range(10):\n        print(x)\n\n",
    "    indented  text   with    runs of     spaces",
    "Tokenizers merge the most frequent pairs; then they merge again.",
] * 3
TEXTS = [
    "",
    " ",
    "hello world",
    "the  quick   brown    fox",
    "  leading and trailing spaces   ",
    "    indented\n\tcode\n\n\nend",
    "def add(a, b):\n    return a + b\n",
    "héllo wörld 中文 🙂 ñ\u00a0nbsp\r\ncrlf",
    "<|turn>user\nHi there<turn|>\n<|turn>model\n",
    "<bos>a<eos> <pad><mask>",
    'call <|tool_call>call:f{x:<|"|>y<|"|>}<tool_call|><|tool_response>',
    "<|channel>thought<channel|>answer",
    "a <note> b<note>c",
    "<unk> stays one token",
]
TEMPLATE = "{{ bos_token }}{% for m in messages %}<|turn>{{ m['role'] }}\n{{ m['content'] }}<turn|>\n{% endfor %}"


# ---- fixtures -------------------------------------------------------------------------------------------------


def _train_tokenizer_json(folder: Path) -> Path:
    """A Gemma 4 shaped tokenizer.json: merges learned over ``CORPUS`` (no pre-tokenization, spaces as ▁, as
    Gemma), then the specials first, the byte pieces, the learned tokens, and ``<note>`` added last."""
    from tokenizers import AddedToken, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    learner = HFTokenizer(BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    learner.normalizer = normalizers.Replace(" ", "\u2581")
    learner.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200, show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    vocab: dict[str, int] = {}
    for piece in [*SPECIALS, *(f"<0x{b:02X}>" for b in range(256)), *sorted(learned["vocab"],
                                                                           key=learned["vocab"].get)]:
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    tok = HFTokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")  # as transformers' GemmaTokenizer
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in SPECIALS])
    tok.add_tokens([AddedToken("<note>", normalized=False, special=False)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "chat_template.jinja").write_text(TEMPLATE)
    return folder / "tokenizer.json"


@pytest.fixture(scope="module")
def tok_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = _train_tokenizer_json(tmp_path_factory.mktemp("g4tok"))
    vocab = json.loads(path.read_text())["model"]["vocab"]
    assert {"\u2581\u2581", "\u2581\u2581\u2581\u2581", "<0x0A>", "\n"} <= set(vocab)  # the fixture's shape
    return path


@pytest.fixture(scope="module")
def original(tok_json: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(tok_json.parent)


@pytest.fixture(scope="module")
def model(original: Tokenizer) -> CausalLM:
    """A tiny Gemma 4 (dense) over the fixture's vocabulary, holding the tokenizer.json tokenizer."""
    cfg = tiny_config(vocab_size=len(original), num_experts=0, top_k=0, moe_intermediate_size=0,
                      eos_token_id=(original.eos_id, original.piece_to_id("<turn|>")))
    return CausalLM.from_config(cfg, seed=1, tokenizer=original)


def _write(path: Path, fill: Any, arch: str = "gemma4") -> Path:
    """A vocabulary-only GGUF whose fields ``fill(writer)`` adds."""
    w = gguf.GGUFWriter(path, arch)
    fill(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _gemmax_fields(tok: Tokenizer) -> Any:
    """gemmax's writer of the vocabulary fields, as ``export_gguf`` calls it for a Gemma 4 model."""
    class Cfg:
        vocab_size, family, bos_token_id = len(tok), "gemma4", tok.bos_id
        eos_ids, pad_token_id = (tok.eos_id,), tok.pad_id

    return lambda w: add_tokenizer(w, Cfg, tok, None)


def _llama_cpp_fields(tok_json: Path, merges: list[str] | None = None, types: list[int] | None = None) -> Any:
    """The fields llama.cpp's converter writes for Gemma 4, made here from the tokenizer.json itself: every token
    in id order as spelled there, one score for all, CONTROL for special added tokens (but the markers it keeps
    visible), USER_DEFINED for the others, BYTE for ``<0xNN>``, the merges as "left right"; no pre-tokenizer."""
    spec = json.loads(tok_json.read_text())
    ids = dict(spec["model"]["vocab"]) | {a["content"]: a["id"] for a in spec["added_tokens"]}
    tokens = sorted(ids, key=ids.get)
    assert [ids[t] for t in tokens] == list(range(len(tokens)))
    added = {a["content"]: a for a in spec["added_tokens"]}

    def kind(t: str) -> int:
        if t in added:
            return 3 if added[t]["special"] and t not in VISIBLE else 4
        return 6 if re.fullmatch(r"<0x[0-9A-F]{2}>", t) else 1

    if merges is None:
        merges = [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]
    if types is None:
        types = [kind(t) for t in tokens]

    def fill(w: Any) -> None:
        w.add_tokenizer_model("gemma4")
        w.add_token_list(tokens)
        w.add_token_scores([-1000.0] * len(tokens))
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(ids["<bos>"])
        w.add_eos_token_id(ids["<eos>"])
        w.add_unk_token_id(ids["<unk>"])
        w.add_pad_token_id(ids["<pad>"])
        w.add_add_space_prefix(False)
        w.add_add_bos_token(True)
        w.add_chat_template(TEMPLATE)

    return fill


def _peer(path: Path, model_file: bool = False) -> Any:
    """transformers' own reading of the file's vocabulary. For a model file its tokenizer class is asked directly:
    ``AutoTokenizer`` first builds the model's config from the file, and transformers' GGUF config reader takes
    no per-layer ``feed_forward_length`` (Gemma 4's double-wide layers); the vocabulary is read by the same code."""
    if model_file:
        return tf.TokenizersBackend.from_pretrained(str(path.parent), gguf_file=path.name)
    return tf.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _field(path: Path, key: str) -> Any:
    f = gguf.GGUFReader(path).fields.get(key)
    return None if f is None else f.contents()


def _retokenized(src: Path, dst: Path, fill: Any) -> Path:
    """``src`` (a model file) rewritten by gguf's own writer with its ``tokenizer.*`` fields replaced by ``fill``."""
    return _copy(src, dst, drop=("tokenizer.",), fill=fill)


def _encodings(tok: Tokenizer) -> list[list[int]]:
    return [tok.encode(t, add_bos=False) for t in TEXTS]


def _peer_encodings(peer: Any) -> list[list[int]]:
    return [list(peer.encode(t, add_special_tokens=False)) for t in TEXTS]


# ---- written by gemmax ----------------------------------------------------------------------------------------


def test_gemmax_file_encodes_as_transformers_and_the_original(tok_json: Path, original: Tokenizer,
                                                               tmp_path: Path) -> None:
    path = _write(tmp_path / "v.gguf", _gemmax_fields(original))
    spec = json.loads(tok_json.read_text())
    assert _field(path, "tokenizer.ggml.model") == "gemma4"
    assert _field(path, "tokenizer.ggml.merges") == [" ".join(m) for m in spec["model"]["merges"]]
    assert _field(path, "tokenizer.ggml.pre") is None  # llama.cpp's converter writes none
    assert _field(path, "tokenizer.ggml.add_space_prefix") is False
    assert _field(path, "tokenizer.ggml.add_bos_token") is True
    assert _field(path, "tokenizer.ggml.unknown_token_id") == 3
    tokens = _field(path, "tokenizer.ggml.tokens")
    assert tokens[:5] == ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"] and "\u2581\u2581" in tokens
    kinds = dict(zip(tokens, _field(path, "tokenizer.ggml.token_type"), strict=True))
    assert [kinds[t] for t in ("<bos>", "<turn|>", "<|channel>", '<|"|>', "<note>", "<0x0A>", "\u2581\u2581")] == \
        [3, 3, 4, 4, 4, 6, 1]
    assert set(_field(path, "tokenizer.ggml.scores")) == {-1000.0}
    assert _field(path, "tokenizer.chat_template") == TEMPLATE

    back = Tokenizer.from_gguf(path)
    peer = _peer(path)
    want = _encodings(original)
    assert len({len(set(ids)) for ids in want}) > 3  # texts of many shapes
    assert _peer_encodings(peer) == want
    assert _encodings(back) == want
    for text, ids in zip(TEXTS, want, strict=True):
        assert back.decode(ids, skip_special=False) == text == peer.decode(ids)
        # without special tokens: as tokenizer.json (transformers' GGUF reading keeps the seven markers llama.cpp
        # stores as USER_DEFINED in the text; they are special in tokenizer.json, and here)
        assert back.decode(ids) == original.decode(ids)
    assert (back.bos_id, back.eos_id, back.pad_id, back.unk_id) == (2, 1, 0, 3)
    assert back.piece_to_id("<turn|>") in back.stop_ids and back.chat_template == TEMPLATE
    assert back.encode("hi") == [2, *original.encode("hi", add_bos=False)]  # <bos> once, as gemmax adds it


# ---- written in llama.cpp's layout ----------------------------------------------------------------------------


def test_llama_cpp_layout_file_loads_with_its_tokenizer(tok_json: Path, original: Tokenizer, model: CausalLM,
                                                        tmp_path: Path) -> None:
    plain = model.export_gguf(tmp_path / "plain.gguf", dtype="f32")
    path = _retokenized(plain, tmp_path / "llama_cpp.gguf", _llama_cpp_fields(tok_json))
    assert _field(path, "tokenizer.ggml.model") == "gemma4"
    lm = CausalLM.from_preset(str(path))
    assert lm.tokenizer is not None and lm.tokenizer.chat_template == TEMPLATE
    want = _peer_encodings(_peer(path, model_file=True))
    assert _encodings(lm.tokenizer) == want == _encodings(original)
    assert lm.tokenizer.is_special(original.piece_to_id("<turn|>"))
    # USER_DEFINED in this layout, special in tokenizer.json: special again when read
    assert lm.tokenizer.is_special(original.piece_to_id("<|channel>")) == original.is_special(
        original.piece_to_id("<|channel>")) is True
    assert lm.tokenizer.decode(lm.tokenizer.encode(TEXTS[7])) == TEXTS[7]
    call = next(t for t in TEXTS if "<|tool_call>" in t)
    assert lm.tokenizer.decode(lm.tokenizer.encode(call, add_bos=False), skip_special=False) == call
    assert lm.tokenizer.decode(lm.tokenizer.encode(call)) == original.decode(original.encode(call)) != call


def test_the_comparison_can_fail(tok_json: Path, original: Tokenizer, tmp_path: Path) -> None:
    """With the merges dropped (all but the first: gguf writes no empty list, and a file without merges is refused)
    the texts fall apart into characters and bytes; with the special tokens typed NORMAL they are spelled out by
    the merges: the readers then disagree with the tokenizer.json."""
    want = _encodings(original)
    first = " ".join(json.loads(tok_json.read_text())["model"]["merges"][0])
    path = _write(tmp_path / "nomerge.gguf", _llama_cpp_fields(tok_json, merges=[first]))
    assert _encodings(Tokenizer.from_gguf(path)) != want
    assert _peer_encodings(_peer(path)) != want
    tokens = _field(_write(tmp_path / "ok.gguf", _llama_cpp_fields(tok_json)), "tokenizer.ggml.tokens")
    normal = [6 if re.fullmatch(r"<0x[0-9A-F]{2}>", t) else 1 for t in tokens]
    path = _write(tmp_path / "normal.gguf", _llama_cpp_fields(tok_json, types=normal))
    special = TEXTS.index("<|turn>user\nHi there<turn|>\n<|turn>model\n")
    assert Tokenizer.from_gguf(path).encode(TEXTS[special], add_bos=False) != want[special]


# ---- bad input ------------------------------------------------------------------------------------------------


def test_bad_files_and_tokenizers_are_named(tok_json: Path, original: Tokenizer, model: CausalLM, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    spec = json.loads(tok_json.read_text())
    merges = [" ".join(m) for m in spec["model"]["merges"]]
    fill = _llama_cpp_fields(tok_json, merges=[*merges[:3], "x zq", *merges[3:]])
    with pytest.raises(ValueError, match=r"merge 3 'x zq' needs the token 'zq'"):
        Tokenizer.from_gguf(_write(tmp_path / "bad.gguf", fill))
    # a model file with that vocabulary still loads, runs on ids, and says why it has no tokenizer
    bad = _retokenized(model.export_gguf(tmp_path / "plain.gguf", dtype="f32"), tmp_path / "badmodel.gguf", fill)
    with pytest.warns(UserWarning, match=r"vocabulary was not loaded.*merge 3 'x zq'"):
        lm = CausalLM.from_preset(str(bad))
    assert lm.tokenizer is None

    def no_merges(w: Any) -> None:
        w.add_tokenizer_model("gemma4")
        w.add_token_list(["<unk>", "a"])

    with pytest.raises(ValueError, match="no tokenizer.ggml.merges"):
        Tokenizer.from_gguf(_write(tmp_path / "nomerges.gguf", no_merges))

    def gpt2(w: Any) -> None:
        w.add_tokenizer_model("gpt2")
        w.add_token_list(["a", "b"])

    with pytest.raises(ValueError, match="'gpt2' is neither SentencePiece"):
        Tokenizer.from_gguf(_write(tmp_path / "gpt2.gguf", gpt2))

    good = _write(tmp_path / "good.gguf", _llama_cpp_fields(tok_json))
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match="pip install tokenizers"):
        Tokenizer.from_gguf(good)
    monkeypatch.undo()

    # tokenizer.json vocabularies that llama.cpp's "gemma4" model cannot describe are refused, saying why
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, pre_tokenizers
    from tokenizers.models import BPE, WordLevel

    level = HFTokenizer(BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))  # byte-level, Llama 3's kind
    level.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    level.decoder = decoders.ByteLevel()
    with pytest.raises(ValueError, match="no byte_fallback.*normalizes with null.*pre-tokenizes with.*ByteLevel"):
        Tokenizer(hf=level).gguf_vocab()
    with pytest.raises(ValueError, match="is a WordLevel model, not BPE"):
        Tokenizer(hf=HFTokenizer(WordLevel(vocab={"<unk>": 0, "a": 1}, unk_token="<unk>"))).gguf_vocab()
    tokens, scores, types, flags = original.gguf_vocab()  # the fixture itself passes
    assert flags["model"] == "gemma4" and len(tokens) == len(types) == len(scores) == len(original)


# ---- end to end -----------------------------------------------------------------------------------------------


def test_export_reload_generate_from_text(original: Tokenizer, model: CausalLM, tmp_path: Path) -> None:
    path = model.export_gguf(tmp_path / "m.gguf", dtype="f32")
    assert _field(path, "tokenizer.ggml.model") == "gemma4"
    lm = CausalLM.from_preset(str(path))
    assert lm.tokenizer is not None and lm.tokenizer.chat_template == TEMPLATE
    prompt = "hello  world, the quick fox"
    ids = original.encode(prompt)
    assert lm.tokenizer.encode(prompt) == ids and ids[0] == original.bos_id
    text = lm.generate(prompt, max_new_tokens=4, sampler="greedy")
    assert isinstance(text, str) and text.startswith(prompt)
    assert text == model.generate(prompt, max_new_tokens=4, sampler="greedy")
    got = np.asarray(lm.generate(np.asarray([ids], np.int32), max_new_tokens=4, sampler="greedy"))
    want = np.asarray(model.generate(np.asarray([ids], np.int32), max_new_tokens=4, sampler="greedy"))
    np.testing.assert_array_equal(got, want)
    assert got.shape[-1] > len(ids)
    assert text == original.decode(got[0])  # the new tokens, decoded by the tokenizer.json tokenizer
    again = lm.export_gguf(tmp_path / "again.gguf", dtype="f32")  # the vocabulary read back writes the same fields
    for key in ("tokens", "merges", "token_type", "scores", "bos_token_id", "eos_token_id", "unknown_token_id"):
        assert _field(again, f"tokenizer.ggml.{key}") == _field(path, f"tokenizer.ggml.{key}"), key
