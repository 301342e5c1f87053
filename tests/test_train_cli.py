"""``gemmax finetune`` end to end on a tiny model folder with a tiny SentencePiece tokenizer: options from a
config file with flags overriding, checkpoints, metrics JSONL, loss-curve PNG, gemmax + PEFT adapters,
resume of a finished run, and the full fine-tune path."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

import gemmax
from gemmax import finetune as train
from gemmax.api import CausalLM

LINES = [f"I loved movie number {i}! Ten out of ten, would watch again!" for i in range(30)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spm = importlib.import_module("sentencepiece")
    from gemmax.io.tokenizer import Tokenizer

    d = tmp_path_factory.mktemp("tiny_model")
    (d / "corpus.txt").write_text("\n".join(LINES * 3))
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "tok"), vocab_size=400, model_type="bpe",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", control_symbols=["<start_of_turn>", "<end_of_turn>"], byte_fallback=True,
        add_dummy_prefix=False, normalization_rule_name="identity", num_threads=1, minloglevel=2,
    )
    tok = Tokenizer.from_file(d / "tok.model")
    cfg = gemmax.tiny_config("gemma3", vocab_size=tok.vocab_size, eos_token_id=(1,))
    lm = CausalLM.from_config(cfg, tokenizer=tok)
    return lm.save(d / "model")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("data") / "reviews.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in LINES))
    return p


def test_resolve_options_precedence(tmp_path):
    cfg = tmp_path / "opts.toml"
    cfg.write_text('[finetune]\nlearning-rate = 0.005\nsteps = 7\nlora_rank = 2\ntargets = ["q", "v"]\n')
    o = train.resolve_options({"config": str(cfg), "steps": 3, "data": "x.jsonl"})
    assert o["learning_rate"] == 0.005 and o["steps"] == 3 and o["lora_rank"] == 2 and o["targets"] == "q,v"
    assert o["batch_size"] == train.CLI_DEFAULTS["batch_size"]
    bad = tmp_path / "bad.json"
    bad.write_text('{"learning_rat": 1}')
    with pytest.raises(SystemExit, match="unknown option 'learning_rat'"):
        train.resolve_options({"config": str(bad)})
    assert train._targets("q, v,down,gate_proj") == ("query", "value", "ffw_linear", "gate_proj")


def test_finetune_lora_end_to_end(model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = tmp_path / "ft.json"
    cfg.write_text(json.dumps({"learning_rate": 5e-3, "steps": 99, "batch_size": 2, "sequence_length": 32,
                               "targets": "q,v,o", "save_every": 2, "keep": 2, "lora_alpha": 8}))
    argv = ["finetune", "--model", str(model_dir), "--data", str(data_file), "--config", str(cfg), "--steps", "5",
            "--lora-rank", "4", "--output", str(out), "--no-progress", "--prompt", "I loved", "--max-length", "12"]
    assert train.main(argv) == 0
    err = capsys.readouterr().err
    assert "before fine-tuning" in err and "after fine-tuning" in err and "trained 5 steps" in err
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5]
    assert lines[-1]["loss"] < lines[0]["loss"] and lines[0]["learning_rate"] > 0
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    adapter = json.loads((out / "adapter" / "adapter.json").read_text())
    assert set(adapter["targets"]) == {"query", "value", "attention_output"}
    assert set(adapter["ranks"].values()) == {4} and adapter["alphas"]["query"] == pytest.approx(8.0)
    peft_cfg = json.loads((out / "adapter_peft" / "adapter_config.json").read_text())
    assert peft_cfg["r"] == 4 and set(peft_cfg["target_modules"]) == {"q_proj", "v_proj", "o_proj"}
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [4, 5]  # keep=2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 5 and summary["trainable_params"] > 0
    samples = json.loads((out / "samples.json").read_text())
    assert samples["before"].startswith("I loved") and samples["after"].startswith("I loved")

    # the adapter loads back onto the base and reproduces the fine-tuned model's output
    from gemmax.nn.lora import load_adapter

    lm = CausalLM.from_preset(str(model_dir))
    lm.params = load_adapter(out / "adapter", lm.params, lm.linear_nodes)
    assert lm.generate("I loved", max_length=12) == samples["after"]

    # running the same command again finds the finished checkpoint: nothing more is trained
    assert train.main(argv[:-4]) == 0
    assert "Resumed" in capsys.readouterr().err
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 5


def test_finetune_full_model(model_dir, data_file, tmp_path):
    out = tmp_path / "full"
    argv = ["finetune", "--model", str(model_dir), "--data", str(data_file), "--steps", "2", "--batch-size", "2",
            "--sequence-length", "32", "--learning-rate", "1e-3", "--output", str(out), "--no-progress"]
    assert train.main(argv) == 0
    assert (out / "model" / "gemmax.json").exists() and (out / "loss.png").exists()
    lm = CausalLM.from_preset(str(out / "model"))
    assert lm.tokenizer is not None


def test_finetune_reports_bad_data(model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "oops"}\n')
    argv = ["finetune", "--model", str(model_dir), "--data", str(bad), "--steps", "1", "--output",
            str(tmp_path / "o"), "--no-progress"]
    assert train.main(argv) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
