"""One prompt, several continuations in one row (``prefix_ids``): the same log-probs and gradients as one row
per sequence, and as a plain forward pass over each sequence on its own."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemmax
from gemmax.api import CausalLM
from gemmax.models import base
from gemmax.train.branches import branch_batch, continuation_log_probs, flat_rows, gather_log_probs, row_length
from gemmax.train.objectives import sequence_forward
from gemmax.train.optim import Precision

# a sliding window (8) shorter than the rows and random non-zero norm scales: every masking rule is exercised
CFG = gemmax.tiny_config("gemma3", vocab_size=97)
RNG = np.random.default_rng(0)
# prompts of different lengths, continuations of different lengths (one of a single target)
GROUPS = [
    (list(RNG.integers(3, 97, 9)), [list(RNG.integers(3, 97, n)) for n in (6, 1, 11)]),
    (list(RNG.integers(3, 97, 4)), [list(RNG.integers(3, 97, n)) for n in (12, 3, 7)]),
]


def _model() -> CausalLM:
    lm = CausalLM.from_config(CFG, seed=3)
    key = [jax.random.key(5)]

    def noisy_norms(path, x):
        if path[-1].key == "scale":
            key[0], k = jax.random.split(key[0])
            return x + 0.5 * jax.random.normal(k, x.shape, x.dtype)
        return x

    lm.params = jax.tree_util.tree_map_with_path(noisy_norms, lm.params)
    return lm


def _layout(shared: bool, size: int = 3) -> dict[str, jax.Array]:
    d = branch_batch(GROUPS, size=size, continuations=3, shared=shared, row=row_length(GROUPS, shared) + 2,
                     length=12, prompt_targets=8)
    return {k: jnp.asarray(v) for k, v in d.items()}


def _plain(lm: CausalLM, params) -> list[list[np.ndarray]]:
    """Each continuation's target log-probs from a plain causal forward pass over ``prompt + continuation``,
    one sequence a row (right-padded: a causal row's earlier positions do not see the padding)."""
    seqs = [(prompt, c) for prompt, conts in GROUPS for c in conts]
    width = max(len(p) + len(c) - 1 for p, c in seqs)
    ids = np.zeros((len(seqs), width), np.int32)
    for i, (p, c) in enumerate(seqs):
        ids[i, :len(p) + len(c) - 1] = p + c[:-1]
    logits = lm.family.logits_from_hidden(params, CFG, lm.family.forward_hidden(params, CFG, jnp.asarray(ids)))
    lp = np.asarray(jax.nn.log_softmax(logits, -1))
    flat = [lp[i, np.arange(len(p) - 1, len(p) - 1 + len(c)), c] for i, (p, c) in enumerate(seqs)]
    return [flat[3 * g:3 * g + 3] for g in range(len(GROUPS))]


def _logps(lm: CausalLM, params, batch, chunk: int = 16) -> jax.Array:
    fwd = sequence_forward(lm.family, CFG, Precision.named("float32"), None)
    p, hidden = fwd(params, flat_rows(batch))
    return continuation_log_probs(p, CFG, hidden, batch, chunk)


def test_a_shared_prompt_row_gives_each_sequences_own_log_probs():
    lm = _model()
    want = _plain(lm, lm.params)
    shared, flat = _layout(True), _layout(False)
    assert shared["tokens"].shape[1] == 1 and flat["tokens"].shape[1] == 3
    assert shared["tokens"].size < flat["tokens"].size  # the prompt is in the row once
    for batch in (shared, flat):
        got = np.asarray(_logps(lm, lm.params, batch))
        for g, row in enumerate(want):
            for k, w in enumerate(row):
                np.testing.assert_allclose(got[g, k, :len(w)], w, rtol=1e-5, atol=2e-5)
                assert not got[g, k, len(w):].any()  # past the continuation: masked
        assert not got[2].any()  # the padding group counts for nothing
    # the prompt's own targets (ORPO's NLL) read the same positions either way
    fwd = sequence_forward(lm.family, CFG, Precision.named("float32"), None)
    reads = []
    for batch in (shared, flat):
        p, hidden = fwd(lm.params, flat_rows(batch))
        reads.append(gather_log_probs(p, CFG, hidden, batch, batch["prompt_index"], batch["prompt_targets"], 16)
                     * batch["prompt_mask"])
    np.testing.assert_allclose(reads[0], reads[1], rtol=1e-5, atol=2e-5)
    assert float(jnp.abs(reads[0]).sum()) > 1.0


def test_without_the_prefix_a_continuation_loses_its_prompt():
    lm = _model()
    shared = _layout(True)
    blind = {k: v for k, v in shared.items() if k != "prefix_ids"}  # each continuation sees only itself
    a, b = np.asarray(_logps(lm, lm.params, shared)), np.asarray(_logps(lm, lm.params, blind))
    assert np.abs(a - b).max() > 0.1


def test_a_shared_prompt_row_has_each_sequences_gradient():
    lm = _model()
    loss = {}
    for shared in (True, False):
        batch = _layout(shared)
        weights = jnp.arange(1, 37, dtype=jnp.float32).reshape(3, 3, 4).repeat(3, axis=-1)  # every target its own
        loss[shared] = jax.grad(lambda p, b=batch, w=weights: (_logps(lm, p, b) * w).sum())(lm.params)
    flat_a, flat_b = jax.tree_util.tree_leaves(loss[True]), jax.tree_util.tree_leaves(loss[False])
    for x, y in zip(flat_a, flat_b, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-4)  # float32 sums in another order
    assert max(float(jnp.abs(x).max()) for x in flat_a) > 1e-2


def test_the_layout_checks_its_inputs():
    with pytest.raises(ValueError, match="needs rows of"):
        branch_batch(GROUPS, size=2, continuations=3, shared=True, row=20, length=12)
    with pytest.raises(ValueError, match="13 targets for 12 slots"):
        branch_batch([([5, 6], [[7] * 13])], size=1, continuations=1, shared=True, row=40, length=12)
    with pytest.raises(ValueError, match="0 targets"):
        branch_batch([([5, 6], [[]])], size=1, continuations=1, shared=False, row=40, length=12)
    # a family that does not take prefix_ids: the objectives keep one row per sequence
    fam = base.get("recurrent_gemma")
    assert not fam.shared_prefix and base.get("gemma").shared_prefix
    with pytest.raises(TypeError, match="prefix_ids"):
        fam.forward_hidden({}, None, jnp.zeros((1, 2), jnp.int32), prefix_ids=jnp.zeros((1, 2), jnp.int32))
