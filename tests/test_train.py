"""The trainer on tiny models: learning, LoRA, packing, accumulation, precision, exact resume, NaN handling,
metrics/plots and a sharded run on fake CPU devices (subprocess)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemmax
from gemmax.api import CausalLM
from gemmax.models.gemma.model import flatten
from gemmax.nn.lora import split_trainable
from gemmax.train import trainer as train
from gemmax.train.checkpoint import CheckpointManager
from gemmax.train.data import Dataset


class ByteTokenizer:
    """Byte-level stand-in: id = byte + 3; 0 pad, 1 eos, 2 bos."""

    pad_id, eos_id, bos_id = 0, 1, 2

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        return ([self.bos_id] if add_bos else []) + [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(int(i) - 3 for i in ids if int(i) >= 3).decode("utf-8", errors="replace")


TOK = ByteTokenizer()
TEXTS = [f"the quick brown fox number {i} jumps over the lazy dog" for i in range(24)]


CFG = gemmax.tiny_config("gemma3", vocab_size=262, eos_token_id=(1,))
_INIT: dict[int, dict] = {}


def _model(seed: int = 0) -> CausalLM:
    """A fresh tiny model; weights are initialised once per seed and copied (fit donates its inputs)."""
    if seed not in _INIT:
        _INIT[seed] = jax.device_get(CausalLM.from_config(CFG, seed=seed).params)
    return CausalLM(CFG, jax.tree_util.tree_map(jnp.asarray, _INIT[seed]), TOK)


def _host(tree):
    return {p: np.asarray(v) for p, v in flatten(jax.device_get(tree)).items()}


# ---- learning -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_fit_compiles_its_step_once(lora, caplog):
    """The first step's inputs (fresh adapters, the optimizer's initial state) are placed as every later step's
    outputs are, so the step compiles once per fit, not again at step 2 (jit compiles per committedness)."""
    lm = _model()
    lm.params = jax.device_put(lm.params, jax.devices()[0])  # placed, as a loaded checkpoint's weights are
    if lora:
        lm.enable_lora(rank=2, verbose=False)
    train._STEP_CACHE.clear()
    with jax.log_compiles(), caplog.at_level(logging.WARNING, logger="jax"):
        train.fit(lm, TEXTS[:8], steps=3, batch_size=2, sequence_length=32, progress=False)
    # an executable built, or read back from a persistent compilation cache, is logged either way
    steps = [r.getMessage() for r in caplog.records if "jit(step)" in r.getMessage()
             and ("compilation" in r.getMessage().lower() or "cache" in r.getMessage().lower())]
    assert len(steps) == 1, steps
    if lora:  # and the adapters enable_lora made are placed as fit leaves them: evaluate compiles once
        lm2 = _model()
        lm2.params = jax.device_put(lm2.params, jax.devices()[0])
        lm2.enable_lora(rank=2, verbose=False)
        lm2.evaluate(TEXTS[:4], batch_size=2, sequence_length=32)
        lm2.fit(TEXTS[:8], steps=1, batch_size=2, sequence_length=32, progress=False)
        caplog.clear()
        with jax.log_compiles(), caplog.at_level(logging.WARNING, logger="jax"):
            lm2.evaluate(TEXTS[:4], batch_size=2, sequence_length=32)
        again = [r.getMessage() for r in caplog.records if "compilation of" in r.getMessage()]
        assert not again, again


def test_loss_falls_and_history(tmp_path):
    lm = _model()
    ds = Dataset.from_source(TEXTS, TOK, 64)
    metrics = tmp_path / "m.jsonl"
    h = train.fit(lm, ds, epochs=3, batch_size=4, learning_rate=3e-3, progress=False, metrics_path=metrics,
                  eval_data=TEXTS[:8])
    it = ds.iterator(4)
    n = sum(it.batches_in_epoch(e) for e in range(3))
    assert len(h.loss) == n and h.step == list(range(1, n + 1)) and sorted(set(h.epoch)) == [0, 1, 2]
    assert np.mean(h.loss[-3:]) < 0.5 * h.loss[0]
    assert all(np.isfinite(h.loss)) and all(0 <= a <= 1 for a in h.accuracy)
    assert h.flops_per_token == lm.config.flops_per_token(64) and h.tokens_per_step == 4 * 64
    assert h.median_tokens_per_second() > 0 and all(m is None or m > 0 for m in h.mfu)
    assert h.learning_rate[0] > 0 and h.learning_rate[-1] < max(h.learning_rate)  # warm-up then cosine decay
    ends = np.cumsum([it.batches_in_epoch(e) for e in range(3)]).tolist()
    assert [e["step"] for e in h.evals] == ends and len(h.history["val_loss"]) == 3  # after every epoch
    assert h.history["val_loss"][-1] < h.history["val_loss"][0]
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == h.step
    assert sum("val_loss" in r for r in lines) == 3
    ev = train.evaluate(lm, TEXTS[:8], batch_size=4, sequence_length=64)
    assert set(ev) == {"loss", "perplexity", "accuracy", "tokens"}
    assert ev["perplexity"] == pytest.approx(np.exp(ev["loss"]), rel=1e-6)
    assert ev["loss"] == pytest.approx(h.evals[-1]["val_loss"], rel=1e-5)
    png = train.plot_loss(metrics, tmp_path / "loss.png")
    from PIL import Image

    with Image.open(png) as im:
        assert im.size == (900, 540) and im.format == "PNG"
    train.plot_loss(h, tmp_path / "loss2.png")


def test_lora_memorises_and_trains_only_adapters():
    lm = _model(seed=1)
    docs = ["alpha beta gamma delta", "one two three four five", "red green blue yellow"]
    n = train.enable_lora(lm, rank=8, alpha=16, targets=("query", "key", "value", "attention_output",
                                                         "ffw_gating", "ffw_gating_2", "ffw_linear"))
    assert n > 0
    base_before = _host(split_trainable(lm.params)[1])
    lora_before = _host(split_trainable(lm.params)[0])
    h = train.fit(lm, docs, steps=50, batch_size=3, sequence_length=32, learning_rate=1e-2, warmup_steps=3,
                  weight_decay=0.0, schedule="constant", progress=False)
    assert h.trainable_params == n and h.loss[-1] < 0.06 * h.loss[0]
    base_after = _host(split_trainable(lm.params)[1])
    assert base_after.keys() == base_before.keys()
    for p in base_before:  # the frozen base (and lora_scale) is bit-for-bit unchanged
        np.testing.assert_array_equal(base_after[p], base_before[p], err_msg=p)
    lora_after = _host(split_trainable(lm.params)[0])
    assert all(not np.array_equal(lora_after[p], lora_before[p]) for p in lora_before if p.endswith("lora_b"))
    # greedy generation reproduces each memorised sequence from its first five characters (one batch)
    ids = [TOK.encode(d, add_bos=True) for d in docs]
    outs = lm.generate([i[:6] for i in ids], max_new_tokens=max(len(i) for i in ids) - 5)
    for d, i, out in zip(docs, ids, outs, strict=True):
        assert TOK.decode(out[6:len(i)]) == d[5:], (d, TOK.decode(out))


# ---- packing, accumulation, precision --------------------------------------------------------------------


def test_packing_masks_end_to_end():
    """Packed rows give exactly the loss of the documents run one per row: no attention or loss leaks across
    document boundaries, positions restart, and prompts are not targets."""
    lm = _model(seed=2)
    recs = [{"prompt": f"question {i}: " + "x" * (i % 5), "completion": f" answer {i * 7}"} for i in range(10)]
    packed = Dataset.from_source(recs, TOK, 64, pack=True)
    single = Dataset.from_source(recs, TOK, 64, pack=False)
    assert packed.stats["packed_rows"] < single.stats["packed_rows"]
    a = train.evaluate(lm, packed, batch_size=2)
    b = train.evaluate(lm, single, batch_size=2)
    assert a["tokens"] == b["tokens"] == sum(len(TOK.encode(r["completion"])) + 1 for r in recs)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert a["accuracy"] == pytest.approx(b["accuracy"])
    # training sees the same: one step over all documents, packed or one per row, moves the weights alike
    lm1, lm2 = _model(seed=2), _model(seed=2)
    h1 = train.fit(lm1, packed, steps=1, batch_size=10, learning_rate=1e-3, progress=False)
    h2 = train.fit(lm2, single, steps=1, batch_size=10, learning_rate=1e-3, progress=False)
    assert h1.target_tokens == h2.target_tokens == [a["tokens"]]
    assert h1.loss[0] == pytest.approx(a["loss"], rel=1e-5) and h2.loss[0] == pytest.approx(a["loss"], rel=1e-5)
    # atol 1% of one Adam step (lr 1e-3): Adam divides by sqrt(v), so a weight whose gradient is near zero
    # moves by a step-sized amount that the two summation orders can change in its last digits (seen on
    # Zen 4: 5.3e-6 on one of 57344 elements); a leak across documents would move weights by whole steps.
    p1, p2 = _host(lm1.params), _host(lm2.params)
    for p in p1:
        np.testing.assert_allclose(p1[p], p2[p], rtol=1e-4, atol=1e-5, err_msg=p)


def test_grad_accumulation_equals_big_batch():
    recs = [{"prompt": "p" * (1 + 7 * (i % 3)), "completion": "c" * (1 + 11 * (i % 4))} for i in range(8)]
    ds = Dataset.from_source(recs, TOK, 32, pack=False)
    results = []
    for k in (1, 4):
        lm = _model(seed=3)
        h = train.fit(lm, ds, steps=2, batch_size=8, grad_accum=k, learning_rate=1e-3, progress=False)
        results.append((h.loss, _host(lm.params)))
    for loss, params in results[1:]:
        np.testing.assert_allclose(loss, results[0][0], rtol=1e-5)
        # Adam moves a weight by up to lr per step whatever its gradient's size, so where a gradient is
        # near zero the two summation orders (1 x 8 rows vs 4 x 2) can move it differently by a fraction of
        # lr: the bound is 2.5% of the two steps' maximum move (seen: 2.2e-5 on an AVX2 CPU, 1 of 57344)
        for p, v in params.items():
            np.testing.assert_allclose(v, results[0][1][p], rtol=2e-4, atol=0.025 * 2 * 1e-3, err_msg=p)


@pytest.mark.parametrize("precision,remat", [("mixed_bfloat16", "dots"), ("bfloat16", "full")])
def test_precisions_and_remat(precision, remat):
    lm = _model()
    h = train.fit(lm, TEXTS, steps=4, batch_size=4, sequence_length=32, learning_rate=3e-3, precision=precision,
                  remat=remat, progress=False)
    assert all(np.isfinite(h.loss)) and h.loss[-1] < h.loss[0]
    want = jnp.float32 if precision == "mixed_bfloat16" else jnp.bfloat16
    assert all(x.dtype == want for x in jax.tree_util.tree_leaves(lm.params))


def test_mixed_precision_lora_keeps_the_float32_base():
    """Under LoRA with mixed_bfloat16 the step reads a bfloat16 copy of the frozen base made once; the base
    handed back is the float32 one, bit for bit, and the adapters train."""
    lm = _model()
    train.enable_lora(lm, rank=4, alpha=8, targets=("query", "value"))
    _, frozen = split_trainable(lm.params)
    before = {k: np.asarray(v) for k, v in flatten(frozen).items()}
    h = train.fit(lm, TEXTS, steps=4, batch_size=4, sequence_length=32, learning_rate=3e-3,
                  precision="mixed_bfloat16", progress=False)
    assert h.loss[-1] < h.loss[0]
    trained, after = split_trainable(lm.params)
    after = flatten(after)
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert after[k].dtype == v.dtype and (v.dtype != np.float32 or after[k].dtype == jnp.float32), k
        np.testing.assert_array_equal(np.asarray(after[k]), v, err_msg=k)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(trained))


# ---- checkpoints: exact resume, NaN ----------------------------------------------------------------------


class Crash(RuntimeError):
    pass


def test_exact_resume(tmp_path):
    kw = dict(steps=8, batch_size=4, sequence_length=32, learning_rate=3e-3, grad_accum=2, save_every=3,
              progress=False, seed=5)
    lm_a = _model(seed=4)
    h_a = train.fit(lm_a, TEXTS, checkpoint_dir=tmp_path / "a", **kw)

    def crash_at_5(step, rec):
        if step == 5:
            raise Crash("simulated crash")

    lm_b = _model(seed=4)
    with pytest.raises(Crash):
        train.fit(lm_b, TEXTS, checkpoint_dir=tmp_path / "b", metrics_path=tmp_path / "b.jsonl",
                  callbacks=[crash_at_5], **kw)
    assert CheckpointManager(tmp_path / "b").latest_step() == 3  # steps 4 and 5 are lost with the "crash"
    lm_c = _model(seed=4)  # a fresh process: same base weights, state comes from the checkpoint
    h_c = train.fit(lm_c, TEXTS, checkpoint_dir=tmp_path / "b", metrics_path=tmp_path / "b.jsonl", **kw)
    assert h_c.step == list(range(1, 9))
    np.testing.assert_array_equal(h_c.loss, h_a.loss)
    np.testing.assert_array_equal(h_c.grad_norm, h_a.grad_norm)
    pa, pc = _host(lm_a.params), _host(lm_c.params)
    for p in pa:
        np.testing.assert_array_equal(pa[p], pc[p], err_msg=p)
    steps = [json.loads(x)["step"] for x in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # replayed steps are not duplicated
    # a finished run resumes to "nothing left"
    h_d = train.fit(_model(seed=4), TEXTS, checkpoint_dir=tmp_path / "b", **kw)
    assert h_d.loss == h_c.loss


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    poison = TOK.encode("~")[0]
    real = train.lm_loss

    def poisoned_loss(params, config, hidden, targets, mask, **kw):
        s = real(params, config, hidden, targets, mask, **kw)
        bad = jnp.any((targets == poison) & (mask > 0))
        return s._replace(sum_loss=jnp.where(bad, jnp.nan, s.sum_loss))

    monkeypatch.setattr(train, "lm_loss", poisoned_loss)
    texts = TEXTS[:12] + ["a poisoned ~ record"]
    ds = Dataset.from_source(texts, TOK, 64, pack=False)
    it = ds.iterator(2, seed=0)
    bad_step = next(i for i in range(1, 100) if (next(it).targets == poison).any())
    assert bad_step >= 3, "choose another seed: the poisoned record should not be in the first batches"
    lm = _model()
    train.enable_lora(lm, rank=4)
    with pytest.raises(train.NonFiniteLossError, match=f"step {bad_step}.*loss is nan.*last good checkpoint"
                       ) as ei:
        train.fit(lm, ds, steps=50, batch_size=2, learning_rate=1e-3, checkpoint_dir=tmp_path / "ck",
                  save_every=100, progress=False)
    e = ei.value
    assert e.step == bad_step and e.last_good_step == bad_step - 1
    assert len(e.history.loss) == bad_step - 1 and "non-finite" in e.history.stopped
    mgr = CheckpointManager(tmp_path / "ck")
    assert mgr.latest_step() == bad_step - 1 and e.checkpoint.endswith(str(bad_step - 1))
    saved = _host(mgr.restore()["params"])
    now = _host(split_trainable(lm.params)[0])
    assert all(np.isfinite(v).all() for v in now.values())
    for p, v in saved.items():
        np.testing.assert_array_equal(v, now[p])


# ---- under a distribution (fake devices, subprocess) -------------------------------------------------------

_DIST_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    import gemmax
    from gemmax import distribution as D
    from gemmax.train import trainer as train
    from gemmax.api import CausalLM
    sys.path.insert(0, sys.argv[1])
    from test_train import TEXTS, TOK

    def run(dist, lora, ck=None, steps=3):
        with D.use_distribution(dist):
            cfg = gemmax.tiny_config("gemma3", vocab_size=262, eos_token_id=(1,))
            lm = CausalLM.from_config(cfg, seed=0, tokenizer=TOK)
            if lora:
                train.enable_lora(lm, rank=4, targets=("query", "value", "ffw_linear"))
            h = train.fit(lm, TEXTS, steps=steps, batch_size=4, sequence_length=32, learning_rate=3e-3,
                          grad_accum=2, progress=False, checkpoint_dir=ck, save_every=2)
            specs = {p: str(getattr(a.sharding, "spec", None)) for p, a in lm.weights()}
            return h.loss, specs

    mesh = D.DeviceMesh((2, 2), ("batch", "model"))
    out = {}
    for lora in (False, True):
        base, _ = run(None, lora)
        mp = D.ModelParallel(mesh, D.get_layout_map(None, mesh, fsdp=True), fsdp=True)
        sharded, specs = run(mp, lora, ck=sys.argv[2] + f"/ck{int(lora)}")
        out[str(lora)] = {"base": base, "sharded": sharded, "specs": specs}
    print("RESULT" + json.dumps(out))
""")


def test_fit_under_model_parallel_fsdp(tmp_path):
    script = tmp_path / "dist_fit.py"
    script.write_text(_DIST_SCRIPT)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    res = subprocess.run([sys.executable, str(script), str(Path(__file__).parent), str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.split("RESULT", 1)[1])
    for lora in ("False", "True"):
        np.testing.assert_allclose(out[lora]["sharded"], out[lora]["base"], rtol=2e-4)
        specs = out[lora]["specs"]
        assert "model" in specs["decoder_block/attention/query/kernel"]
        assert "batch" in specs["decoder_block/attention/query/kernel"]  # FSDP
    lora_specs = out["True"]["specs"]
    assert "model" in lora_specs["decoder_block/ffw_linear/lora_a"] + lora_specs["decoder_block/ffw_linear/lora_b"]
