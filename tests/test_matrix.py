"""The acceptance matrix of "One model interface for every family": the same public calls on every family.

Families: Gemma 1 MQA and MHA, Gemma 2, Gemma 3 (text), Llama 3, RecurrentGemma, PaliGemma, and every family
with a ``tests/fixture_<name>.py``; each a tiny random checkpoint written by transformers in the family's
published Hub key layout (tests/matrix_fixtures.py) with a tiny SentencePiece ``tokenizer.model``.
Cells, each for every family:

 1. ``CausalLM.from_preset(folder)`` is a ``CausalLM`` whose logits equal transformers' float32 logits
    (PaliGemma: ``lm.logits(ids, pixel_values=..., token_type_ids=...)``, the ids holding the image tokens and
    ``pixel_values`` preprocessed [n, 3, H, W], as ``PaliGemmaForConditionalGeneration`` takes them)
 2. greedy ``generate`` of token ids equals transformers' ``generate(do_sample=False)`` (PaliGemma:
    ``lm.generate(ids, pixel_values=...)``, the prompt being the bidirectional prefix, against transformers with
    ``token_type_ids`` 0 over the prompt); every sampler (random, top_k, top_p, min_p) gives the right length,
    ids in range and the same output for the same seed; ``stop_token_ids=[t]`` ends the output at (and
    including) t
 3. ``stream`` yields the text ``generate`` adds (PaliGemma: a text-only prompt, no image)
 4. LoRA (``enable_lora``) + ``fit`` lowers the loss
 5. ``save`` and ``from_preset`` of the saved folder: the same logits (adapters merged)
 6. ``export_hf`` loads in transformers with the same logits
 7. ``export_peft`` loads in peft over the transformers base with the LoRA model's logits
 8. ``quantize("int8")``: logits close to float, greedy generation runs
 9. the same greedy tokens on 8 fake CPU devices (mesh 2x4) as on one (tests/matrix_worker.py, one subprocess
    for all families, started in the background when the checkpoints are built)
10. one ``/v1/completions`` request through the server
11. ``gemmax generate`` and ``gemmax finetune`` on the command line

Nothing is skipped: a cell that cannot apply to a family must raise a clear error, asserted here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from matrix_fixtures import Checkpoint, build_checkpoint, families, train_tokenizer, write_jsonl

import gemmax
from gemmax import CausalLM

WORKER = Path(__file__).with_name("matrix_worker.py")
FAMILIES = families()  # computed here, after any fixture module a test file imported first has finished
TIMEOUT = int(os.environ.get("GEMMAX_DIST_TEST_TIMEOUT", "600"))
NEW = 8  # new tokens of the generation cells
STREAM_PROMPT = "The quick brown fox"
SAMPLERS = {"random": {}, "top_k": {"top_k": 5}, "top_p": {"top_p": 0.9}, "min_p": {"min_p": 0.1}}


def assert_close(got: Any, want: np.ndarray, rel: float = 1e-4, what: str = "logits") -> None:
    got = np.asarray(got, np.float32)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    scale = float(np.abs(want).max())
    diff = float(np.abs(got - want).max())
    assert diff <= rel * scale, f"{what}: max abs diff {diff:.3g} > {rel} * {scale:.3g}"


def new_tokens(out: Any, prompt: np.ndarray) -> list[int]:
    out = np.asarray(out).reshape(-1).tolist()
    assert out[:len(prompt)] == prompt.tolist(), "generate must return the prompt followed by the new tokens"
    return out[len(prompt):]


# ---- fixtures ------------------------------------------------------------------------------------------


def _selected_families(session: pytest.Session) -> list[str]:
    """The families of the collected matrix cells (so ``-k gemma2`` builds and shards only Gemma 2)."""
    here = Path(__file__)
    chosen = set()
    for item in session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if Path(str(item.path)) == here and "family" in params:
            chosen.add(params["family"])
    return [f for f in FAMILIES if f in chosen] or list(FAMILIES)


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    # the worker sets its own device count; other flags (the suite's compile settings) carry over
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
    env["JAX_PLATFORMS"] = "cpu"
    src = str(Path(gemmax.__file__).parents[1])  # the worker imports the gemmax this process tests
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, str(Path(__file__).parent), env.get("PYTHONPATH")]))
    return env


class Matrix:
    """Every selected family's checkpoint, built once, and the background multi-device worker over them."""

    def __init__(self, root: Path, families: list[str]):
        self.root = root
        (root / "tok").mkdir()
        self.tokenizer = train_tokenizer(root / "tok")
        self.checkpoints = {f: build_checkpoint(f, root / f, root / "tok" / "tok.model", self.tokenizer)
                            for f in families}
        self.train_file = write_jsonl(root / "train.jsonl")
        spec = [{"family": f, "folder": str(ck.folder), "prompts": [p.tolist() for p in self.dist_prompts(ck)],
                 "images": None if ck.pixel_values is None else {k: v.tolist() for k, v in ck.images(2).items()}}
                for f, ck in self.checkpoints.items()]
        (root / "dist_spec.json").write_text(json.dumps(spec))
        self.dist_out = root / "dist_result.json"
        self.dist_log = open(root / "dist_worker.log", "w")  # noqa: SIM115 - closed in dist_result() or close()
        self.dist_proc = subprocess.Popen(
            [sys.executable, str(WORKER), str(root / "dist_spec.json"), str(self.dist_out)],
            env=_worker_env(), stdout=self.dist_log, stderr=subprocess.STDOUT)
        self.dist_started = time.monotonic()

    @staticmethod
    def dist_prompts(ck: Checkpoint) -> list[np.ndarray]:
        """Two prompts: the generation prompt and a second one (PaliGemma: the same image, other text)."""
        other = ck.logits_ids[1, :len(ck.prompt)] if ck.multimodal else ck.logits_ids[1, :5]
        return [ck.prompt, other]

    def dist_result(self, family: str) -> dict[str, Any]:
        if self.dist_proc.returncode is None:
            try:
                self.dist_proc.wait(timeout=max(1.0, TIMEOUT - (time.monotonic() - self.dist_started)))
            except subprocess.TimeoutExpired:
                self.dist_proc.kill()
                self.dist_proc.wait()
        self.dist_log.close()
        results = json.loads(self.dist_out.read_text()) if self.dist_out.exists() else {}
        if family not in results:
            log = (self.root / "dist_worker.log").read_text()[-4000:]
            pytest.fail(f"the multi-device worker gave no result for {family} (exit {self.dist_proc.returncode}):\n"
                        f"{log}")
        return results[family]

    def close(self) -> None:
        if self.dist_proc.poll() is None:
            self.dist_proc.kill()
            self.dist_proc.wait()
        self.dist_log.close()


@pytest.fixture(scope="session")
def matrix(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    m = Matrix(tmp_path_factory.mktemp("matrix"), _selected_families(request.session))
    yield m
    m.close()


@pytest.fixture(scope="module", params=FAMILIES, ids=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def ck(matrix: Matrix, family: str) -> Checkpoint:
    return matrix.checkpoints[family]


@pytest.fixture(scope="module")
def lm(ck: Checkpoint) -> Any:
    """The family's model, shared by the cells that do not change it."""
    return CausalLM.from_preset(str(ck.folder))


@pytest.fixture(scope="module")
def greedy(ck: Checkpoint, lm: Any) -> list[int]:
    """gemmax's greedy new tokens for ``ck.prompt`` (must not end before the stop cell's third token)."""
    return new_tokens(lm.generate(ck.prompt, max_new_tokens=NEW, **ck.generate_kwargs), ck.prompt)


@pytest.fixture(scope="module")
def text_generation(lm: Any) -> str:
    """``lm.generate(STREAM_PROMPT, max_new_tokens=6)``: text in, prompt + new text out."""
    out = lm.generate(STREAM_PROMPT, max_new_tokens=6)
    assert isinstance(out, str) and out.startswith(STREAM_PROMPT), out
    return out


@pytest.fixture(scope="module")
def tuned(ck: Checkpoint, matrix: Matrix) -> SimpleNamespace:
    """A copy of the model with LoRA adapters fine-tuned on the JSONL; the loss before and after."""
    lm = CausalLM.from_preset(str(ck.folder))
    lm.enable_lora(rank=4, alpha=8.0, targets=("query", "value"))
    data = str(matrix.train_file)
    before = lm.evaluate(data, batch_size=2, sequence_length=32)["loss"]
    history = lm.fit(data, steps=8, batch_size=2, sequence_length=32, learning_rate=1e-2)
    after = lm.evaluate(data, batch_size=2, sequence_length=32)["loss"]
    return SimpleNamespace(lm=lm, before=before, after=after, history=history,
                           logits=np.asarray(lm.logits(ck.logits_ids, **ck.logits_kwargs)))


def _load_hf(ck: Checkpoint, folder: Path) -> Any:
    return ck.hf_model_class().from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()


# ---- 1. load ---------------------------------------------------------------------------------------------


def test_load_logits_match_transformers(ck: Checkpoint, lm: Any) -> None:
    assert isinstance(lm, CausalLM), f"from_preset gave a {type(lm).__name__}, not a CausalLM"
    assert_close(lm.logits(ck.logits_ids, **ck.logits_kwargs), ck.hf_logits())


# ---- 2. generate -----------------------------------------------------------------------------------------


def test_greedy_generate_matches_transformers(ck: Checkpoint, greedy: list[int]) -> None:
    want = new_tokens(ck.hf_greedy(NEW), ck.prompt)
    assert greedy == want
    assert len(want) >= 3 and not set(want[:3]) & set(ck.eos_ids), "fixture: greedy must not stop early"
    assert ck.greedy_margin > 1e-3, f"fixture: a greedy step is nearly a tie ({ck.greedy_margin:.2g})"


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_samplers(ck: Checkpoint, lm: Any, sampler: str) -> None:
    kw = dict(max_new_tokens=NEW, sampler=sampler, temperature=0.8, seed=1, **SAMPLERS[sampler],
              **ck.generate_kwargs)
    first = new_tokens(lm.generate(ck.prompt, **kw), ck.prompt)
    again = new_tokens(lm.generate(ck.prompt, **kw), ck.prompt)
    assert first == again, "the same seed must give the same tokens"
    assert len(first) == NEW or (0 < len(first) < NEW and first[-1] in ck.eos_ids), first
    assert all(0 <= t < ck.vocab for t in first), first


def test_stop_token_ids(ck: Checkpoint, lm: Any, greedy: list[int]) -> None:
    t = greedy[2]
    want = greedy[:greedy.index(t) + 1]
    out = lm.generate(ck.prompt, max_new_tokens=NEW, stop_token_ids=[t], **ck.generate_kwargs)
    assert new_tokens(out, ck.prompt) == want


# ---- 3. stream -------------------------------------------------------------------------------------------


def test_stream_equals_generate(lm: Any, text_generation: str) -> None:
    pieces = list(lm.stream(STREAM_PROMPT, max_new_tokens=6))
    assert all(isinstance(p, str) for p in pieces)
    assert "".join(pieces) == text_generation[len(STREAM_PROMPT):]


# ---- 4-7. LoRA, fit, save, export ------------------------------------------------------------------------


def test_lora_fit_lowers_loss(tuned: SimpleNamespace) -> None:
    losses = list(tuned.history.loss)
    assert len(losses) == 8 and all(np.isfinite(losses))
    # evaluate is deterministic: 0.01 nats is far above rounding. (8 steps of rank-4 q/v adapters move tiny
    # random models little: RecurrentGemma, whose only attention block is the one of three adapted, drops ~0.03.)
    assert tuned.after < tuned.before - 0.01, (tuned.before, tuned.after, losses)


def test_save_and_reload(ck: Checkpoint, tuned: SimpleNamespace, tmp_path: Path) -> None:
    out = tuned.lm.save(tmp_path / "saved")
    again = CausalLM.from_preset(str(out))
    assert isinstance(again, CausalLM)
    assert_close(again.logits(ck.logits_ids, **ck.logits_kwargs), tuned.logits)
    assert again.tokenizer is not None, "save must keep the tokenizer"


def test_export_hf_loads_in_transformers(ck: Checkpoint, tuned: SimpleNamespace, tmp_path: Path) -> None:
    out = tuned.lm.export_hf(tmp_path / "hf")
    assert_close(ck.hf_logits(_load_hf(ck, Path(out))), tuned.logits)


def test_export_peft_loads_in_peft(ck: Checkpoint, tuned: SimpleNamespace, tmp_path: Path) -> None:
    from peft import PeftModel

    out = tuned.lm.export_peft(tmp_path / "peft")
    model = PeftModel.from_pretrained(_load_hf(ck, ck.folder), str(out)).eval()
    assert_close(ck.hf_logits(model), tuned.logits)
    assert np.abs(tuned.logits - ck.hf_logits()).max() > 1e-3, "the fine-tuned adapters must change the logits"


# ---- 8. int8 ---------------------------------------------------------------------------------------------


def test_quantize_int8(ck: Checkpoint) -> None:
    q = CausalLM.from_preset(str(ck.folder))
    q.quantize("int8")
    ref = ck.hf_logits()
    got = np.asarray(q.logits(ck.logits_ids, **ck.logits_kwargs))
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 0.05 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
    new = new_tokens(q.generate(ck.prompt, max_new_tokens=NEW, **ck.generate_kwargs), ck.prompt)
    assert 0 < len(new) <= NEW and all(0 <= t < ck.vocab for t in new)


# ---- 9. distribution -------------------------------------------------------------------------------------


def test_sharded_greedy_equals_one_device(ck: Checkpoint, greedy: list[int], matrix: Matrix) -> None:
    r = matrix.dist_result(ck.family)
    assert "error" not in r, f"{r['error']}\n{r['traceback']}"
    assert r["devices"] == 8
    assert r["sharded"] == r["reference"]
    assert r["reference"][0] == ck.prompt.tolist() + greedy  # the worker's one-device run is this process's
    blocks = [s for s in r["specs"] if "'model'" in s and not s.startswith("token_embedding")]
    assert blocks, f"no layer weight is split over the model axis (the family's layout is not applied): {r['specs']}"


# ---- 10. server ------------------------------------------------------------------------------------------


def _create_app() -> Any:
    try:
        from gemmax.serve import create_app
    except ImportError:
        try:
            from gemmax.serve.server import create_app
        except ImportError:
            from gemmax.server import create_app
    return create_app


def test_server_completion(lm: Any, text_generation: str) -> None:
    from fastapi.testclient import TestClient

    app = _create_app()(lm)
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"prompt": STREAM_PROMPT, "max_tokens": 6, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
    choice = body["choices"][0]
    n = body["usage"]["completion_tokens"]
    assert n == 6 or (n < 6 and choice["finish_reason"] == "stop"), body
    assert choice["text"] == text_generation[len(STREAM_PROMPT):]


# ---- 11. command line ------------------------------------------------------------------------------------


def test_cli_generate(ck: Checkpoint, capsys: pytest.CaptureFixture) -> None:
    from gemmax.cli import main

    assert main(["generate", "--model", str(ck.folder), "hello", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("hello")


def test_cli_finetune(ck: Checkpoint, matrix: Matrix, tmp_path: Path) -> None:
    from gemmax.cli import main

    out = tmp_path / "ft"
    # the settings of the ``tuned`` fixture's fit, so the compiled step is reused (the cell tests the command)
    argv = ["finetune", "--model", str(ck.folder), "--data", str(matrix.train_file), "--steps", "8",
            "--learning-rate", "0.01", "--batch-size", "2", "--sequence-length", "32", "--lora-rank", "4",
            "--output", str(out), "--no-progress"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 8 and np.isfinite(summary["final_loss"])
    assert Path(summary["saved"]).exists()
