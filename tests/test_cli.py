"""The gemmax command, in-process, on a tiny model folder with a real SentencePiece tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
from spm_fixtures import train_tiny_sentencepiece

import gemmax
from gemmax.api import CausalLM
from gemmax.cli import build_parser, main

LINES = ["The quick brown fox jumps over the lazy dog.", "Gemma is a family of lightweight open models.",
         "Hello world, hello tokenizer."] * 20


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    tok = train_tiny_sentencepiece(tmp_path_factory.mktemp("spm"), LINES, 120)
    lm = CausalLM.from_config(gemmax.tiny_config("gemma3", vocab_size=tok.vocab_size), seed=0, tokenizer=tok)
    return lm, lm.save(tmp_path_factory.mktemp("model") / "m")


def test_every_command_has_help(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"generate", "chat", "info", "convert", "shard-plan", "finetune", "serve"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        assert "usage: gemmax " + name in capsys.readouterr().out


def test_generate_streams_same_text_as_api(folder, capsys):
    lm, path = folder
    assert main(["generate", "--model", str(path), "Hello world", "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == lm.generate("Hello world", max_new_tokens=12).strip()


def test_info_and_shard_plan(folder, capsys):
    _, path = folder
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "decoder_block/attention/query/kernel" in out and "Total params" in out
    assert main(["shard-plan", "gemma3_270m", "--mesh", "2x4"]) == 0
    out = capsys.readouterr().out
    assert "decoder_block/attention/query/kernel" in out and "adamw/mu/" in out
    assert "per device" in out


def test_convert_to_hf_and_gguf(folder, tmp_path, capsys):
    lm, path = folder
    assert main(["convert", str(path), str(tmp_path / "hf"), "--to", "hf"]) == 0
    again = CausalLM.from_preset(str(tmp_path / "hf"))
    ids = np.array([[2, 5, 6, 7, 8]])
    np.testing.assert_allclose(again.logits(ids), lm.logits(ids), atol=1e-5)
    assert again.tokenizer is not None and again.tokenizer.encode("Hello") == lm.tokenizer.encode("Hello")
    assert main(["convert", str(path), str(tmp_path / "m.gguf"), "--to", "gguf", "--gguf-type", "f32"]) == 0
    g = CausalLM.from_preset(str(tmp_path / "m.gguf"))
    np.testing.assert_allclose(g.logits(ids), lm.logits(ids), atol=1e-4)


def test_bad_handle_is_a_clean_error(capsys):
    assert main(["info", "/no/such/model.gguf"]) == 2
    assert "not found" in capsys.readouterr().err
