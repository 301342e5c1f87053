"""Post-training on tiny models: DPO / SimPO / distillation / GRPO losses against TRL's own loss code (fed the
same log-probs, computed here from the model's full logits in torch), learning on toy tasks, exact resume,
and bad data or rewards stopping with an error that names the record or the function."""

from __future__ import annotations

import math
import types
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemmax
from gemmax.api import CausalLM
from gemmax.nn.lora import split_trainable, strip_lora
from gemmax.train import trainer as train
from gemmax.train.data import DataError, Dataset
from gemmax.train.distill import Distill
from gemmax.train.grpo import GRPO, RewardError, group_advantages, grpo_per_token_loss, reduce_grpo_loss
from gemmax.train.optim import Precision
from gemmax.train.post_training import make_objective
from gemmax.train.preference import DPO, PreferenceDataset, SimPO

torch = pytest.importorskip("torch")
pytest.importorskip("trl")


class ByteTokenizer:
    """Byte-level stand-in: id = byte + 3; 0 pad, 1 eos, 2 bos (ids past 258 decode to nothing)."""

    pad_id, eos_id, bos_id = 0, 1, 2
    stop_ids = (1,)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        return ([self.bos_id] if add_bos else []) + [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(int(i) - 3 for i in ids if 3 <= int(i) < 259).decode("utf-8", errors="replace")


TOK = ByteTokenizer()
# a sliding window (8) shorter than the rows, so the local layers' masking is exercised too
CFG = gemmax.tiny_config("gemma3", vocab_size=262, eos_token_id=(1,))
_INIT: dict[int, dict] = {}


def _model(seed: int = 0, lora: bool = True, noisy_adapters: bool = False) -> CausalLM:
    if seed not in _INIT:
        _INIT[seed] = jax.device_get(CausalLM.from_config(CFG, seed=seed).params)
    lm = CausalLM(CFG, jax.tree_util.tree_map(jnp.asarray, _INIT[seed]), TOK)
    if lora:
        lm.enable_lora(rank=4)
        if noisy_adapters:  # lora_b starts at zero; make the policy differ from the reference
            key = [jax.random.key(7)]

            def noise(path, x):
                if path[-1].key == "lora_b":
                    key[0], k = jax.random.split(key[0])
                    return 0.3 * jax.random.normal(k, x.shape, x.dtype)
                return x

            lm.params = jax.tree_util.tree_map_with_path(noise, lm.params)
    return lm


PAIRS = [{"prompt": f"Question {i}: is the sky blue?", "chosen": " yes" + "!" * (i % 3),
          "rejected": " no, it is green" if i % 2 else " no"} for i in range(8)]
CHAT_PAIRS = [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Say hi {i}"}],
               "chosen": [{"role": "assistant", "content": "hi"}],
               "rejected": [{"role": "assistant", "content": "no thanks " * (1 + i % 2)}]} for i in range(4)]


# ---- TRL as the peer: its own loss code, stubbed trainer state ------------------------------------------


class _Acc:
    device = "cpu"

    @staticmethod
    def gather_for_metrics(x):
        return x

    gather = gather_for_metrics

    @staticmethod
    def reduce(x, reduction="sum"):
        return x


def _full_logprobs(lm: CausalLM, params, rows: dict[str, np.ndarray]) -> np.ndarray:
    """Per-position log p(target) from the model's full float32 logits, log-softmax in torch."""
    fam = lm.family
    h = fam.forward_hidden(params, lm.config, jnp.asarray(rows["tokens"]), jnp.asarray(rows["positions"]),
                           jnp.asarray(rows["segment_ids"]))
    logits = torch.from_numpy(np.asarray(fam.logits_from_hidden(params, lm.config, h), np.float32))
    lp = torch.log_softmax(logits, -1).gather(-1, torch.from_numpy(rows["targets"]).long()[..., None])[..., 0]
    return lp.numpy() * rows["loss_mask"]


def _pair_rows(batch) -> dict[str, np.ndarray]:
    """The pairs as plain ``prompt + completion`` rows (the step itself reads ``batch.layout``)."""
    b, _, t = batch.tokens.shape
    return {k: getattr(batch, k).reshape(2 * b, t) for k in ("tokens", "targets", "loss_mask", "positions",
                                                             "segment_ids")}


def _trl_dpo(rows, lp, ref_lp, loss_type, beta):
    """TRL's ``DPOTrainer._compute_loss`` on given per-token log-probs (rows ordered as TRL's batch:
    the chosen half, then the rejected half)."""
    from trl.trainer.dpo_trainer import DPOTrainer

    b2, t = rows["tokens"].shape
    ids = np.zeros((b2, t + 1), np.int64)
    ids[:, :t], ids[:, 1:] = rows["tokens"], np.where(rows["loss_mask"] > 0, rows["targets"], rows["tokens"])
    cm = np.zeros((b2, t + 1), np.int64)
    cm[:, 1:] = rows["loss_mask"]
    ref = ref_lp.sum(-1)
    inputs = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.ones(b2, t + 1, dtype=torch.long),
              "completion_mask": torch.from_numpy(cm), "ref_chosen_logps": torch.from_numpy(ref[: b2 // 2]),
              "ref_rejected_logps": torch.from_numpy(ref[b2 // 2:])}
    out = types.SimpleNamespace(log_probs=torch.from_numpy(lp), entropy=torch.zeros(b2, t),
                                mean_logits=torch.zeros(b2, t), is_top1=torch.zeros(b2, t, dtype=torch.bool))
    stub = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), accelerator=_Acc(), aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, label_smoothing=0.0, use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    loss = DPOTrainer._compute_loss(stub, lambda **kw: out, inputs, False)
    return float(loss), {k: v[-1] for k, v in stub._metrics["train"].items()}


def _to_trl_order(a: np.ndarray) -> np.ndarray:
    """Our [B, 2, ...] pair rows flattened as [b0c, b0r, b1c, ...] -> TRL's [chosen..., rejected...]."""
    return np.concatenate([a[0::2], a[1::2]])


_LOSS_FNS: dict[int, object] = {}


def _our_objective_loss(obj, lm, batch, is_lora=True):
    trainable, frozen = split_trainable(lm.params) if is_lora else (lm.params, {})
    if id(obj) not in _LOSS_FNS:
        _LOSS_FNS.clear()
        _LOSS_FNS[id(obj)] = jax.jit(obj.loss_sums_fn(lm.family, lm.config, Precision.named("float32"), None, 64))
    s, aux = _LOSS_FNS[id(obj)](trainable, {k: jnp.asarray(v) for k, v in batch.as_dict().items()}, frozen)
    return float(s) / float(aux["n_tokens"]), {k: float(v) for k, v in aux.items()}


@pytest.mark.parametrize("loss_type,beta", [("sigmoid", 0.1), ("sigmoid", 0.5), ("ipo", 0.1), ("hinge", 0.3)])
def test_dpo_loss_equals_trl(loss_type, beta):
    lm = _model(noisy_adapters=True)
    ds = PreferenceDataset.from_source(PAIRS[:4] + CHAT_PAIRS[:2], TOK, 96)
    batch = ds.batch(list(range(6)), 6)
    rows = _pair_rows(batch)
    lp = _to_trl_order(_full_logprobs(lm, lm.params, rows))
    ref = _to_trl_order(_full_logprobs(lm, strip_lora(lm.params), rows))
    trl_rows = {k: _to_trl_order(v) for k, v in rows.items()}
    want, metrics = _trl_dpo(trl_rows, lp, ref, loss_type, beta)
    obj = DPO(beta=beta, loss_type=loss_type)
    obj._precomputed = False  # reference: the same weights with the adapters off
    got, aux = _our_objective_loss(obj, lm, batch)
    assert got == pytest.approx(want, rel=2e-5, abs=1e-6)
    n = aux["n_tokens"]
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert aux[k] / n == pytest.approx(metrics[k], rel=1e-4, abs=1e-5), k
    assert aux["n_correct"] / n == pytest.approx(metrics["rewards/accuracies"])
    # the reference matters: scoring against the policy itself (a zero log-ratio) moves the loss far away
    if loss_type == "sigmoid":
        batch.ref_logps[:] = (lp.sum(-1)[:6, None] * [1, 0] + lp.sum(-1)[6:, None] * [0, 1])
        obj2 = DPO(beta=beta, loss_type=loss_type)
        obj2._precomputed = True
        assert abs(_our_objective_loss(obj2, lm, batch)[0] - want) > 1e-3


def test_simpo_loss_equals_trl_cpo():
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    lm = _model(noisy_adapters=True)
    ds = PreferenceDataset.from_source(PAIRS[:4], TOK, 40)
    batch = ds.batch([0, 1, 2, 3], 4)
    rows = _pair_rows(batch)
    lp = _full_logprobs(lm, lm.params, rows)
    avg = lp.sum(-1) / rows["loss_mask"].sum(-1)
    stub = types.SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=0.8, beta=2.0, label_smoothing=0.1,
                                 accelerator=_Acc())
    losses, _, _ = CPOTrainer.cpo_loss(stub, torch.from_numpy(avg[0::2]), torch.from_numpy(avg[1::2]))
    got, _ = _our_objective_loss(SimPO(beta=2.0, gamma=0.8, label_smoothing=0.1), lm, batch)
    assert got == pytest.approx(float(losses.mean()), rel=2e-5)
    # gamma switched off moves it far
    assert abs(_our_objective_loss(SimPO(beta=2.0, gamma=0.0, label_smoothing=0.1), lm, batch)[0] - got) > 0.1


@pytest.mark.parametrize("loss,beta,temp", [("forward_kl", 0.0, 1.0), ("reverse_kl", 1.0, 1.0), ("jsd", 0.3, 2.0)])
def test_distillation_loss_equals_trl_gkd(loss, beta, temp):
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    student, teacher = _model(0, lora=False), _model(1, lora=False)
    obj = Distill(teacher=teacher, loss=loss, beta=beta, temperature=temp, top_k=None)
    ds, _ = obj.load(student, ["the quick brown fox jumps", "over the lazy dog again and again"], 24, "auto")
    batch = next(ds.iterator(2, shuffle=False))
    d = batch.as_dict()
    fam = student.family

    def logits(lm):
        h = fam.forward_hidden(lm.params, lm.config, jnp.asarray(d["tokens"]), jnp.asarray(d["positions"]),
                               jnp.asarray(d["segment_ids"]))
        return torch.from_numpy(np.asarray(fam.logits_from_hidden(lm.params, lm.config, h), np.float32))

    labels = torch.from_numpy(np.where(d["loss_mask"] > 0, d["targets"], -100)).long()
    want = GKDTrainer.generalized_jsd_loss(logits(student), logits(teacher), labels=labels, beta=beta,
                                           temperature=temp)
    got, _ = _our_objective_loss(obj, student, batch, is_lora=False)
    assert got == pytest.approx(float(want), rel=3e-5, abs=1e-6)
    # a top-k teacher is an approximation; with k = 4 it is visibly not the full-vocabulary loss
    obj_k = Distill(teacher=teacher, loss=loss, beta=beta, temperature=temp, top_k=4)
    bk = next(obj_k.load(student, ["the quick brown fox jumps", "over the lazy dog again and again"], 24,
                         "auto")[0].iterator(2, shuffle=False))
    assert abs(_our_objective_loss(obj_k, student, bk, is_lora=False)[0] - got) > 1e-3


# ---- GRPO ------------------------------------------------------------------------------------------------


def _trl_grpo(logps, old, ref, adv, mask, loss_type, beta, eps_low, eps_high, max_len):
    from trl.trainer.grpo_trainer import GRPOTrainer

    lp = torch.tensor(logps, requires_grad=True)
    b, t = lp.shape
    stub = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (lp, torch.zeros(b, t), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None), loss_type=loss_type,
        epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=False, model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=max_len, _entropy_bonus_enabled=False,
        aux_loss_enabled=False, accelerator=_Acc(), _metrics=defaultdict(lambda: defaultdict(list)))
    inputs = {"prompt_ids": torch.zeros(b, 1, dtype=torch.long), "prompt_mask": torch.ones(b, 1, dtype=torch.long),
              "completion_ids": torch.zeros(b, t, dtype=torch.long), "completion_mask": torch.from_numpy(mask),
              "advantages": torch.from_numpy(adv), "old_per_token_logps": torch.from_numpy(old),
              "ref_per_token_logps": torch.from_numpy(ref)}
    loss = GRPOTrainer._compute_loss(stub, None, inputs)
    loss.backward()
    return float(loss), lp.grad.numpy()


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_per_token_loss_equals_trl(loss_type, beta):
    rng = np.random.default_rng(0)
    b, t, max_len = 6, 7, 9
    logps = rng.normal(-2, 0.5, (b, t)).astype(np.float32)
    old = (logps + rng.normal(0, 0.3, (b, t))).astype(np.float32)  # ratios well outside 1 +- eps: clipping on
    ref = (logps + rng.normal(0, 0.2, (b, t))).astype(np.float32)
    mask = (np.arange(t)[None] < rng.integers(2, t + 1, b)[:, None]).astype(np.float32)
    adv = group_advantages(rng.normal(size=b), 3)
    want, want_grad = _trl_grpo(logps, old, ref, adv, mask, loss_type, beta, 0.2, 0.28, max_len)

    def ours(lp):
        per, _ = grpo_per_token_loss(lp, jnp.asarray(old), jnp.asarray(adv), epsilon_low=0.2, epsilon_high=0.28,
                                     beta=beta, ref_logps=jnp.asarray(ref))
        s, n = reduce_grpo_loss(per, jnp.asarray(mask), loss_type, max_len)
        return s / n

    got, grad = jax.value_and_grad(ours)(jnp.asarray(logps))
    assert float(got) == pytest.approx(want, rel=1e-5, abs=1e-7)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-5, atol=1e-7)
    # clipping switched off (huge epsilon) moves the loss far beyond the tolerance
    per, _ = grpo_per_token_loss(jnp.asarray(logps), jnp.asarray(old), jnp.asarray(adv), epsilon_low=0.99,
                                 epsilon_high=100.0, beta=beta, ref_logps=jnp.asarray(ref))
    s, n = reduce_grpo_loss(per, jnp.asarray(mask), loss_type, max_len)
    assert abs(float(s / n) - want) > 1e-3


def test_group_advantages_match_trl_formula():
    from trl.trainer.utils import nanstd

    r = np.array([1.0, 0.0, 0.5, 0.5, 2.0, 0.0, 1.0, 1.0], np.float32)
    rt = torch.from_numpy(r).view(-1, 4)
    want = (rt - rt.mean(1, keepdim=True)) / (nanstd(rt, dim=1).unsqueeze(1) + 1e-4)
    np.testing.assert_allclose(group_advantages(r, 4), want.reshape(-1).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(group_advantages(r, 4, "none"), (rt - rt.mean(1, keepdim=True)).reshape(-1).numpy())


def ascii_share(prompts, completions, **kw):
    """Toy verifiable reward: the share of a completion's characters that are ASCII letters."""
    return [sum(c.isascii() and c.isalpha() for c in s) / max(len(s), 1) for s in completions]


GRPO_FIT = dict(steps=24, batch_size=8, sequence_length=16, learning_rate=3e-2, warmup_steps=1, progress=False,
                schedule="constant")  # one compiled step and one compiled sampler for every GRPO run here


def _grpo(funcs=(ascii_share,), **kw) -> GRPO:
    return GRPO(reward_funcs=list(funcs), num_generations=4, max_completion_length=8, beta=0.02, loss_type="grpo",
                **kw)


def _trainable(tree):
    return jax.tree_util.tree_leaves(split_trainable(tree)[0])


def test_grpo_raises_a_toy_reward_and_resumes_exactly(tmp_path):
    from gemmax.train.checkpoint import CheckpointManager

    prompts = [{"prompt": f"p{i}"} for i in range(8)]
    lm = _model()
    h = train.fit(lm, prompts, objective=_grpo(), checkpoint_dir=tmp_path / "full", save_every=6, keep=None,
                  **GRPO_FIT)
    rewards = [e["reward"] for e in h.extra]
    assert np.mean(rewards[-6:]) > np.mean(rewards[:6]) + 0.1, rewards
    assert all(np.isfinite(h.loss)) and all(e["kl"] >= 0 for e in h.extra)
    assert {"rewards/ascii_share/mean", "completions/mean_length", "generation_seconds"} <= set(h.extra[0])
    # resume: stop after 3 steps, continue from the checkpoint to 6 == the uninterrupted run's step 6
    # (the same completions are drawn: sampling seeds follow the data position)
    train.fit(_model(), prompts, objective=_grpo(), checkpoint_dir=tmp_path / "ck", save_every=3,
              callbacks=[lambda step, rec: step < 3], **GRPO_FIT)
    b = _model()
    h2 = train.fit(b, prompts, objective=_grpo(), checkpoint_dir=tmp_path / "ck",
                   callbacks=[lambda step, rec: step < 6], **GRPO_FIT)
    assert h2.step == list(range(1, 7)) and h2.extra[5]["reward"] == rewards[5]
    m = CheckpointManager(tmp_path / "full")
    want = m.restore(6)["params"]
    m.close()
    for x, y in zip(jax.tree_util.tree_leaves(want), _trainable(b.params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_grpo_bad_rewards_name_the_function_and_keep_the_state(tmp_path):
    from gemmax.train.checkpoint import CheckpointManager

    prompts = [{"prompt": f"p{i}", "answer": str(i)} for i in range(4)]
    calls = {"n": 0}

    def flaky(prompts, completions, answer, **kw):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyError("boom")
        return [float(len(c) % 2) for c in completions]

    lm = _model()
    with pytest.raises(RewardError, match=r"'flaky' raised KeyError"):
        train.fit(lm, prompts, objective=_grpo((ascii_share, flaky), reward_weights=[1.0, 0.5]),
                  checkpoint_dir=tmp_path / "ck", **GRPO_FIT)
    m = CheckpointManager(tmp_path / "ck")
    assert m.latest_step() == 2  # the two good steps are kept
    # positioned before the batch whose rewards failed (2 prompts a batch: the epoch's 2 batches were used)
    assert m.restore(2)["data_state"] == {"epoch": 0, "batch": 2, "seed": 0}
    m.close()

    def nan_reward(prompts, completions, **kw):
        return [math.nan] * len(completions)

    with pytest.raises(RewardError, match=r"'nan_reward' returned nan for completion 0 of <list>:item"):
        train.fit(_model(), prompts, objective=_grpo((nan_reward,)), **GRPO_FIT)


# ---- DPO end to end ---------------------------------------------------------------------------------------


def test_dpo_raises_reward_accuracy_and_resumes_exactly(tmp_path):
    data = [{"prompt": f"Q{i}: pick one.", "chosen": " good", "rejected": " bad"} for i in range(12)]
    kw = dict(steps=10, batch_size=4, sequence_length=24, learning_rate=1e-2, progress=False,
              metrics_path=tmp_path / "m.jsonl")
    lm = _model()
    h = lm.fit(data, objective="dpo", beta=0.1, **kw)
    acc = [e["rewards/accuracies"] for e in h.extra]
    margins = [e["rewards/margins"] for e in h.extra]
    assert acc[0] == 0.0 and acc[-1] == 1.0 and margins[-1] > margins[1] > 0 and h.loss[-1] < h.loss[0] - 0.2
    assert h.accuracy == acc  # the progress bar's accuracy is TRL's rewards/accuracies
    import json

    lines = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"} <= set(lines[-1])
    train.plot_loss(tmp_path / "m.jsonl", tmp_path / "loss.png")

    # full fine-tune, reference precomputed once from the starting weights; resume is exact
    kw = dict(steps=4, batch_size=4, sequence_length=24, learning_rate=1e-3, progress=False)
    ref = _model(lora=False)
    train.fit(ref, data, objective=DPO(beta=0.1), **kw)
    a = _model(lora=False)
    train.fit(a, data, objective=DPO(beta=0.1), checkpoint_dir=tmp_path / "ck", save_every=2,
              callbacks=[lambda step, rec: step < 2], **kw)
    b = _model(lora=False)
    train.fit(b, data, objective=DPO(beta=0.1), checkpoint_dir=tmp_path / "ck", **kw)
    for x, y in zip(jax.tree_util.tree_leaves(ref.params), jax.tree_util.tree_leaves(b.params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_preference_data_errors_name_the_record(tmp_path):
    bad = [dict(PAIRS[0]), {"prompt": "x", "chosen": "y"}]
    with pytest.raises(DataError, match=r"<list>:item 1: missing field 'rejected'"):
        PreferenceDataset.from_source(bad, TOK, 32)
    with pytest.raises(DataError, match=r"<list>:item 0: field 'chosen' is an empty completion"):
        PreferenceDataset.from_source([{"prompt": "x", "chosen": " ", "rejected": "n"}], TOK, 32)
    with pytest.raises(DataError, match=r"leaves no completion token"):
        PreferenceDataset.from_source([{"prompt": "x" * 40, "chosen": "y", "rejected": "n"}], TOK, 16)
    p = tmp_path / "prefs.jsonl"
    import json

    p.write_text("\n".join(json.dumps(r) for r in [PAIRS[0], {"prompt": "a", "rejected": "b"}]) + "\n")
    with pytest.raises(DataError, match=rf"{p}:2: missing field 'chosen'"):
        PreferenceDataset.from_source(str(p), TOK, 32)
    # Parquet and a datasets object read the same records
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(PAIRS[:3]), tmp_path / "p.parquet")
    assert len(PreferenceDataset.from_source(str(tmp_path / "p.parquet"), TOK, 32)) == 3
    datasets = pytest.importorskip("datasets")
    ds = PreferenceDataset.from_source(datasets.Dataset.from_list(CHAT_PAIRS), TOK, 96)
    x, y, w = ds.rows[0][0]
    assert TOK.decode(y[w > 0]) == "hi<end_of_turn>" and len(ds) == 4


def test_objective_options_and_errors():
    assert "beta" in make_objective("dpo").__dict__ or make_objective("dpo").beta == 0.1
    with pytest.raises(TypeError, match="no option"):
        make_objective("dpo", gamma=1.0)
    with pytest.raises(ValueError, match="unknown objective"):
        make_objective("ppo")
    with pytest.raises(ValueError, match="reward_funcs"):
        GRPO()
    with pytest.raises(ValueError, match="loss_type"):
        DPO(loss_type="sigmoidal")
    with pytest.raises(ValueError, match="not a multiple of num_generations"):
        train.fit(_model(), [{"prompt": "a"}] * 4, objective=GRPO(reward_funcs=ascii_share, num_generations=3,
                                                                  max_completion_length=2),
                  steps=1, batch_size=4, sequence_length=8, progress=False)
    assert Dataset  # the SFT path is untouched (test_train covers it)


def test_finetune_method_option_builds_the_objective():
    from gemmax.finetune import _objective, resolve_options

    o = resolve_options({"method": "dpo", "beta": 0.2, "loss_type": "ipo"})
    obj = _objective(o)
    assert isinstance(obj, DPO) and obj.beta == 0.2 and obj.loss_type == "ipo"
    assert _objective(resolve_options({})) is None  # sft
    o = resolve_options({"method": "grpo", "reward": "test_post_training:ascii_share", "num_generations": 4})
    obj = _objective(o)
    assert obj.reward_funcs == [ascii_share] and obj.num_generations == 4
    with pytest.raises(SystemExit, match="needs --reward"):
        _objective(resolve_options({"method": "grpo"}))
    with pytest.raises(SystemExit, match="needs --teacher"):
        _objective(resolve_options({"method": "distill"}))


def test_distillation_from_a_precomputed_teacher_file(tmp_path):
    from gemmax.train.distill import save_teacher_topk

    student, teacher = _model(0, lora=False), _model(1, lora=False)
    texts = [f"doc {i}: " + "ab" * (i % 4 + 1) for i in range(10)]  # short: several documents a packed row
    path = save_teacher_topk(teacher, texts, tmp_path / "teacher.npz", sequence_length=32, top_k=6)
    live = Distill(teacher=teacher, loss="jsd", beta=0.5, temperature=1.5, top_k=6)
    disk = Distill(teacher=str(path), loss="jsd", beta=0.5, temperature=1.5)
    it_live = live.load(student, texts, 32, "auto")[0].iterator(3, seed=3)
    it_disk = disk.load(student, texts, 32, "auto")[0].iterator(3, seed=3)
    pairs = [(next(it_live), next(it_disk)) for _ in range(3)]
    # shuffled, packed batches: the file's tables land where the tokens go
    assert all((b.inner.segment_ids.max(axis=1) > 1).any() for b, _ in pairs)
    got = [_our_objective_loss(disk, student, b, is_lora=False)[0] for _, b in pairs]
    want = [_our_objective_loss(live, student, b, is_lora=False)[0] for b, _ in pairs]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    h = train.fit(student, texts, objective=disk, steps=1, batch_size=3, sequence_length=32, progress=False)
    assert all(np.isfinite(h.loss))
    with pytest.raises(ValueError, match="differs from the one the teacher table was written for"):
        Distill(teacher=str(path)).load(student, [t + "!" for t in texts], 32, "auto")
