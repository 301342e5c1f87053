"""ORPO against TRL's ``ORPOTrainer`` (its own batch code, fed our model's full logits), GRPO with several
optimisation passes per generated batch (``num_iterations``) against TRL's loss with the generation-time
old log-probs, and held-out evaluation with an objective (``fit(eval_data=...)``)."""

from __future__ import annotations

import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_post_training import CHAT_PAIRS, PAIRS, TOK, _Acc, _full_logprobs, _model, _trl_grpo, ascii_share

from gemmax.nn.lora import merge_trees, split_trainable, strip_lora
from gemmax.train import trainer as train
from gemmax.train.checkpoint import CheckpointManager
from gemmax.train.grpo import GRPO, _decode_rollout
from gemmax.train.post_training import make_objective
from gemmax.train.preference import ORPO, PreferenceDataset

torch = pytest.importorskip("torch")
pytest.importorskip("trl")


# ---- ORPO ------------------------------------------------------------------------------------------------


def _trl_orpo(lm, params, batch, beta: float) -> tuple[float, dict[str, float]]:
    """TRL's ``ORPOTrainer.get_batch_loss_metrics`` on our pairs (real pairs only), its model a stub that
    returns our model's float32 logits for the ids TRL assembles."""
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    real = batch.pair_mask > 0
    fam = lm.family

    def side(k: int) -> dict[str, torch.Tensor]:
        x, y = batch.tokens[real, k], batch.targets[real, k]
        w, seg = batch.loss_mask[real, k], batch.segment_ids[real, k]
        ids = np.zeros((x.shape[0], x.shape[1] + 1), np.int64)
        ids[:, 0], ids[:, 1:] = x[:, 0], np.where(seg > 0, y, 0)
        att = np.concatenate([np.ones((x.shape[0], 1)), seg > 0], axis=1).astype(np.int64)
        labels = np.full(ids.shape, -100, np.int64)
        labels[:, 1:] = np.where(w > 0, y, -100)
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(att),
                "labels": torch.from_numpy(labels)}

    inputs = {f"{name}_{k}": v for name, i in (("chosen", 0), ("rejected", 1)) for k, v in side(i).items()}

    def model(input_ids, attention_mask, use_cache=False, **kw):
        ids = jnp.asarray(input_ids.numpy(), jnp.int32)
        pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
        h = fam.forward_hidden(params, lm.config, ids, pos, jnp.asarray(attention_mask.numpy(), jnp.int32))
        return types.SimpleNamespace(logits=torch.from_numpy(np.asarray(fam.logits_from_hidden(params, lm.config, h),
                                                                        np.float32)))

    trainer = ORPOTrainer.__new__(ORPOTrainer)
    trainer.__dict__.update(is_encoder_decoder=False, padding_value=0, accelerator=_Acc(), aux_loss_enabled=False,
                            beta=beta)
    loss, metrics = trainer.get_batch_loss_metrics(model, inputs, train_eval="train")
    return float(loss), metrics


_ORPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                 "logps/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen")


def test_orpo_loss_and_metrics_equal_trl():
    lm = _model(noisy_adapters=True)
    ds = PreferenceDataset.from_source(PAIRS[:4] + CHAT_PAIRS[:2], TOK, 96)
    batch = ds.batch(list(range(6)), 7)  # a padding pair too: it must count for nothing
    obj = ORPO(beta=0.25)
    trainable, frozen = split_trainable(lm.params)
    fn = jax.jit(obj.loss_sums_fn(lm.family, lm.config, train.Precision.named("float32"), None, 64))
    s, aux = fn(trainable, {k: jnp.asarray(v) for k, v in batch.as_dict().items()}, frozen)
    m = jax.device_get(aux)
    got = float(s) / float(m["n_tokens"])
    want, metrics = _trl_orpo(lm, lm.params, batch, 0.25)
    assert float(m["n_tokens"]) == 6
    assert got == pytest.approx(want, rel=2e-5, abs=1e-6)
    ours = obj.step_metrics(m, batch, 1.0)
    for k in _ORPO_METRICS:
        assert ours[k] == pytest.approx(metrics[k], rel=1e-4, abs=1e-6), k
    # the odds-ratio term matters: without it the loss is the NLL alone, far from TRL's
    assert abs(ours["nll_loss"] - want) > 1e-2
    # and the NLL is over the whole chosen row (prompt included): the completion-only NLL is far from it
    rows_lp = _full_logprobs(lm, lm.params, {k: getattr(batch, k)[:6, 0] for k in ("tokens", "targets", "loss_mask",
                                                                                  "positions", "segment_ids")})
    completion_nll = -rows_lp.sum() / batch.loss_mask[:6, 0].sum()
    assert abs(completion_nll - ours["nll_loss"]) > 1e-2


def test_orpo_fit_and_held_out_evaluation_equal_trl(tmp_path):
    data = [{"prompt": f"Q{i}: pick one.", "chosen": " good", "rejected": " bad"} for i in range(8)]
    held = [{"prompt": f"Held {i}: pick.", "chosen": " good", "rejected": " bad"} for i in range(3)]
    lm = _model()
    h = lm.fit(data, objective="orpo", beta=0.5, eval_data=held, eval_every=2, steps=4, batch_size=4,
               sequence_length=24, learning_rate=2e-2, progress=False, metrics_path=tmp_path / "m.jsonl")
    assert set(_ORPO_METRICS) <= set(h.extra[0])
    assert [e["step"] for e in h.evals] == [2, 4]
    assert h.evals[-1]["val_log_odds_chosen"] > h.evals[0]["val_log_odds_chosen"]
    # the held-out figures are TRL's loss and metrics on those pairs with the final weights
    batch = PreferenceDataset.from_source(held, TOK, 24).batch([0, 1, 2], 4)
    want, metrics = _trl_orpo(lm, lm.params, batch, 0.5)
    assert h.evals[-1]["val_loss"] == pytest.approx(want, rel=2e-5, abs=1e-6)
    for k in _ORPO_METRICS:
        assert h.evals[-1][f"val_{k}"] == pytest.approx(metrics[k], rel=1e-4, abs=1e-6), k
    assert "val_nll_loss" in (tmp_path / "m.jsonl").read_text()
    # the standalone evaluate scores the same way
    ev = train.evaluate(lm, held, batch_size=4, sequence_length=24, objective=ORPO(beta=0.5))
    assert ev["loss"] == pytest.approx(want, rel=2e-5, abs=1e-6)


def test_orpo_by_name_and_on_the_command_line():
    from gemmax.finetune import _objective, resolve_options

    assert isinstance(make_objective("orpo", beta=0.3), ORPO)
    obj = _objective(resolve_options({"method": "orpo", "beta": 0.2}))
    assert isinstance(obj, ORPO) and obj.beta == 0.2
    with pytest.raises(TypeError, match="no option"):
        make_objective("orpo", gamma=1.0)


def test_eval_data_with_a_teacher_file_is_refused(tmp_path):
    from gemmax.train.distill import Distill, save_teacher_topk

    student, teacher = _model(0, lora=False), _model(1, lora=False)
    texts = ["one two three", "four five six"]
    path = save_teacher_topk(teacher, texts, tmp_path / "t.npz", sequence_length=16, top_k=4)
    with pytest.raises(ValueError, match="eval_data needs a live teacher"):
        train.fit(student, texts, objective=Distill(teacher=str(path)), eval_data=texts, steps=1, batch_size=2,
                  sequence_length=16, progress=False)


# ---- GRPO, several passes per generation -----------------------------------------------------------------


def _grpo2(**kw) -> GRPO:
    return GRPO(reward_funcs=[ascii_share], num_generations=4, max_completion_length=8, beta=0.0, loss_type="grpo",
                num_iterations=2, **kw)


GRPO2_FIT = dict(steps=3, batch_size=8, sequence_length=16, learning_rate=3e-2, warmup_steps=1, progress=False,
                 schedule="constant")


def _sequences(arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Each completion of a rollout as its own plain ``prompt + completion`` row (read back from the batch's
    layout: ``index`` points at the positions whose hidden state predicts each target), and the row index of
    each completion's first target."""
    g, r, t = arrays["tokens"].shape
    k, length = arrays["index"].shape[1:]
    toks = arrays["tokens"].reshape(g, r * t)
    seqs, tails = [], []
    for gi in range(g):
        for ki in range(k):
            m = int(arrays["mask"][gi, ki].sum())
            idx = arrays["index"][gi, ki, :m]
            base = idx[0] // t * t
            prompt = list(toks[gi, base:idx[0] + 1])
            seqs.append(prompt + list(toks[gi, idx[1:]]))
            tails.append(list(arrays["targets"][gi, ki, :m]))
    n = max(len(s) for s in seqs)
    out = {name: np.zeros((len(seqs), n), np.float32 if name == "loss_mask" else np.int32)
           for name in ("tokens", "targets", "loss_mask", "positions", "segment_ids")}
    starts = np.zeros(len(seqs), np.int64)
    for i, (s, tail) in enumerate(zip(seqs, tails, strict=True)):
        p = len(s) - len(tail) + 1
        out["tokens"][i, :len(s)], out["positions"][i, :len(s)], out["segment_ids"][i, :len(s)] = s, range(len(s)), 1
        out["targets"][i, :len(s)] = s[1:] + tail[-1:]
        out["targets"][i, p - 1:len(s)] = tail
        out["loss_mask"][i, p - 1:len(s)] = 1.0
        starts[i] = p - 1
    return out, starts


def test_grpo_num_iterations_reuses_the_batch_with_generation_time_old_logps(tmp_path):
    prompts = [{"prompt": f"p{i}"} for i in range(8)]
    held = [{"prompt": f"q{i}"} for i in range(2)]
    lm = _model()
    h = train.fit(lm, prompts, objective=_grpo2(), checkpoint_dir=tmp_path / "full", save_every=1, keep=None,
                  eval_data=held, **GRPO2_FIT)
    # steps 1-2 share one generated batch, step 3 starts the next
    assert h.extra[1]["reward"] == h.extra[0]["reward"] and h.extra[1]["generation_seconds"] == 0.0
    assert h.extra[2]["generation_seconds"] > 0.0

    # step 2 is TRL's loss with π at the weights after step 1 and π_old at the weights that sampled the batch
    m = CheckpointManager(tmp_path / "full")
    ck1 = m.restore(1)
    m.close()
    rollout = _decode_rollout(ck1["data_state"]["rollout"])
    assert ck1["data_state"]["iteration"] == 1
    rows, starts = _sequences(rollout.arrays)
    assert "prefix_ids" in rollout.arrays  # the Gemma family reads a group as one row
    mask = rows["loss_mask"]
    w0 = _model().params
    w1 = merge_trees(ck1["params"], split_trainable(w0)[1])
    old = _full_logprobs(lm, w0, rows)
    # stored for the completion positions only: [groups, completions, max_completion_length]
    stored = rollout.arrays["old_logps"].reshape(-1, 8)
    kept = rollout.arrays["mask"].reshape(-1, 8)
    idx = np.minimum(starts[:, None] + np.arange(8)[None], mask.shape[1] - 1)
    np.testing.assert_allclose(stored * kept, np.take_along_axis(old, idx, axis=1) * kept, rtol=1e-4, atol=1e-5)
    assert kept.sum() == mask.sum()  # every completion token is among the kept positions
    now = _full_logprobs(lm, w1, rows)
    zeros = np.zeros_like(now)
    adv = rollout.arrays["advantages"].reshape(-1)
    want, _ = _trl_grpo(now, old, zeros, adv, mask, "grpo", 0.0, 0.2, 0.2, 8)
    assert h.loss[1] == pytest.approx(want, rel=1e-4, abs=2e-6)
    # the ratio is not 1 on the second pass: with π_old = π the loss is far from it
    ratio_one, _ = _trl_grpo(now, now, zeros, adv, mask, "grpo", 0.0, 0.2, 0.2, 8)
    assert abs(ratio_one - want) > 1e-4
    assert h.extra[0]["clip_ratio/region_mean"] == 0.0  # first pass: ρ = 1

    # resuming inside a block (the checkpoint of step 1 holds the batch) ends on the same weights
    (tmp_path / "ck").mkdir()
    shutil.copytree(tmp_path / "full" / "1", tmp_path / "ck" / "1")
    b = _model()
    h2 = train.fit(b, prompts, objective=_grpo2(), checkpoint_dir=tmp_path / "ck", **GRPO2_FIT)
    assert h2.loss[1:] == h.loss[1:]
    for x, y in zip(jax.tree_util.tree_leaves(split_trainable(lm.params)[0]),
                    jax.tree_util.tree_leaves(split_trainable(b.params)[0]), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    # held-out reward at the end, and the standalone evaluate draws and scores the same completions
    ev = h.evals[-1]
    assert ev["step"] == 3 and 0.0 <= ev["val_reward"] <= 1.0 and "val_rewards/ascii_share/mean" in ev
    again = train.evaluate(lm, held, batch_size=8, sequence_length=16, objective=_grpo2())
    assert again["reward"] == ev["val_reward"] and again["loss"] == pytest.approx(ev["val_loss"], abs=1e-6)
    assert strip_lora  # the reference of a LoRA run is the base (covered in test_post_training)


def test_grpo_resume_refuses_a_block_batch_in_another_layout():
    """A checkpoint's stored GRPO batch (inside a num_iterations block) is decoded and checked before anything
    is restored: this layout round-trips; a batch of one flat row per completion (no ``index``, old
    log-probs [completions, length]) is refused with an error naming the layout, the iterator unchanged."""
    from gemmax.train.grpo import RepeatIterator, Rollout, _encode_rollout

    class Inner:
        pos = 0

        def state(self):
            return {"pos": self.pos}

        def restore(self, st):
            self.pos = st["pos"]

    g, n, t, length = 2, 3, 20, 5
    good = {k: np.zeros((g, 1, t), np.int32) for k in ("tokens", "positions", "segment_ids")}
    good.update(index=np.zeros((g, n, length), np.int32), targets=np.zeros((g, n, length), np.int32),
                mask=np.ones((g, n, length), np.float32), advantages=np.ones((g, n), np.float32),
                old_logps=np.full((g, n, length), -1.5, np.float32))
    rollout = Rollout(good, np.zeros(g * n), {"f": np.zeros(g * n)}, np.full(g * n, length), 0.5, ["x"] * (g * n))
    it = RepeatIterator(Inner(), 2)
    it.restore({"pos": 4, "iteration": 1, "rollout": _encode_rollout(rollout)})
    assert it.inner.pos == 4 and it.done == 1
    np.testing.assert_array_equal(it.current.arrays["old_logps"], good["old_logps"])

    flat = {"tokens": np.zeros((g * n, t), np.int32), "completion_mask": np.ones((g * n, length), np.float32),
            "advantages": np.ones(g * n, np.float32), "old_logps": np.zeros((g * n, length), np.float32)}
    old = Rollout(flat, np.zeros(g * n), {"f": np.zeros(g * n)}, np.full(g * n, length), 0.5, ["x"] * (g * n))
    fresh = RepeatIterator(Inner(), 2)
    with pytest.raises(ValueError, match="layout this version does not read.*block boundary"):
        fresh.restore({"pos": 4, "iteration": 1, "rollout": _encode_rollout(old)})
    assert fresh.inner.pos == 0 and fresh.current is None
