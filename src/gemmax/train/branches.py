"""One prompt, several continuations: the batch layout of preference pairs and GRPO groups.

A DPO pair is one prompt with two completions; a GRPO group one prompt with ``num_generations``. Laid out as
one row per continuation (``prompt + completion``) the prompt runs through the decoder once per continuation.
When the family's ``forward_hidden`` takes ``prefix_ids`` (``Family.shared_prefix``) a group is one row
instead: the prompt, then each continuation's inputs as its own segment whose positions go on from the
prompt's end and whose tokens also see the prompt. Every log-prob is the same as in separate rows (attention
reads the same keys, RoPE the same positions); the prompt is computed, and differentiated, once.

Either way the loss reads the same arrays: for continuation ``k`` of group ``g``, ``index[g, k, j]`` is the
position (in the group's rows flattened) whose hidden state predicts ``targets[g, k, j]``, ``mask`` marks the
real targets. Only those positions go through the output head — a 262k-token head is most of a small Gemma's
compute, and the prompt's positions carry no preference or policy loss.

Arrays of a batch of ``G`` groups (leading axis: the group, so gradient accumulation splits groups):

* ``tokens`` / ``positions`` / ``segment_ids`` ``[G, R, T]`` (``R`` = 1 shared, the continuations otherwise),
  ``prefix_ids`` ``[G, R, T]`` when shared;
* ``index`` / ``targets`` / ``mask`` ``[G, K, L]``;
* with ``prompt_targets=True``: ``prompt_index`` / ``prompt_targets`` / ``prompt_mask`` ``[G, P]``, the prompt's
  own next-token targets (ORPO's NLL reads them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemmax.models.base import XLA
from gemmax.train.objectives import token_log_probs

#: one group: the prompt's token ids, then each continuation's targets (its first is predicted by the prompt's
#: last token)
Group = tuple[Sequence[int], Sequence[Sequence[int]]]

ROW_KEYS = ("tokens", "positions", "segment_ids", "prefix_ids")
#: the arrays every ``branch_batch`` layout holds (a shared one adds ``prefix_ids``)
LAYOUT_KEYS = ("tokens", "positions", "segment_ids", "index", "targets", "mask")


def row_length(groups: Sequence[Group], shared: bool) -> int:
    """The shortest row ``T`` that holds every group's row(s)."""
    if shared:
        return max(len(p) + sum(max(len(c) - 1, 0) for c in cs) for p, cs in groups)
    return max(len(p) + len(c) - 1 for p, cs in groups for c in cs)


def branch_batch(groups: Sequence[Group], *, size: int, continuations: int, shared: bool, row: int, length: int,
                 pad_id: int = 0, prompt_targets: int = 0) -> dict[str, np.ndarray]:
    """The arrays of ``groups`` (see the module docstring), padded to ``size`` groups of ``continuations``
    continuations, rows of ``row`` tokens and ``length`` targets a continuation (``prompt_targets``: that many
    prompt target slots, 0 for none). Padding groups are all mask 0 (segment 0)."""
    r = 1 if shared else continuations
    tokens = np.full((size, r, row), pad_id, np.int32)
    positions = np.zeros((size, r, row), np.int32)
    seg = np.zeros((size, r, row), np.int32)
    prefix = np.zeros((size, r, row), np.int32)
    index = np.zeros((size, continuations, length), np.int32)
    targets = np.zeros((size, continuations, length), np.int32)
    mask = np.zeros((size, continuations, length), np.float32)
    p_index = np.zeros((size, prompt_targets), np.int32)
    p_targets = np.zeros((size, prompt_targets), np.int32)
    p_mask = np.zeros((size, prompt_targets), np.float32)
    if len(groups) > size:
        raise ValueError(f"{len(groups)} groups for a batch of {size}")
    for g, (prompt, conts) in enumerate(groups):
        p = len(prompt)
        if len(conts) != continuations:
            raise ValueError(f"group {g} has {len(conts)} continuations, the batch {continuations}")
        if prompt_targets:
            if p - 1 > prompt_targets:
                raise ValueError(f"group {g}: {p - 1} prompt targets for {prompt_targets} slots")
            p_index[g, :p - 1], p_targets[g, :p - 1], p_mask[g, :p - 1] = np.arange(p - 1), prompt[1:], 1.0
        start = p
        for k, c in enumerate(conts):
            m = len(c)
            if not 1 <= m <= length:
                raise ValueError(f"group {g}, continuation {k}: {m} targets for {length} slots")
            ri = 0 if shared else k
            inputs = list(c[:-1])
            if not shared or k == 0:  # the prompt opens each row
                tokens[g, ri, :p], positions[g, ri, :p], seg[g, ri, :p] = prompt, np.arange(p), 1
                prefix[g, ri, :p] = 1
            at = start if shared else p
            end = at + len(inputs)
            if end > row:
                raise ValueError(f"group {g} needs rows of {end} tokens, the batch has {row}")
            tokens[g, ri, at:end] = inputs
            positions[g, ri, at:end] = np.arange(p, p + len(inputs))
            seg[g, ri, at:end] = k + 2 if shared else 1
            prefix[g, ri, at:end] = 1 if shared else 0
            base = ri * row
            index[g, k, 0] = base + p - 1
            index[g, k, 1:m] = base + np.arange(at, end)
            targets[g, k, :m], mask[g, k, :m] = c, 1.0
            start = end
    out = {"tokens": tokens, "positions": positions, "segment_ids": seg, "index": index, "targets": targets,
           "mask": mask}
    if shared:
        out["prefix_ids"] = prefix
    if prompt_targets:
        out.update(prompt_index=p_index, prompt_targets=p_targets, prompt_mask=p_mask)
    return out


def flat_rows(batch: dict[str, Any]) -> dict[str, Any]:
    """The row arrays of a batch as ``[G * R, T]``, with ``prefix_ids`` when shared: ``forward_hidden``'s
    input (``objectives.sequence_forward``)."""
    g, r, t = batch["tokens"].shape
    return {k: batch[k].reshape(g * r, t) for k in ROW_KEYS if k in batch}


def gather_log_probs(params: Any, config: Any, hidden: jax.Array, batch: dict[str, Any], index: jax.Array,
                     targets: jax.Array, chunk_size: int = 1024, kernel: str = XLA) -> jax.Array:
    """``log p(targets)`` read from the hidden states [G * R, T, D] at ``index`` ([G, ...] positions into each
    group's flattened rows); the head runs on those positions only. Shape of ``index``, float32."""
    g, r, t = batch["tokens"].shape
    h = hidden.reshape(g, r * t, hidden.shape[-1])
    flat = index.reshape(g, -1)
    picked = jnp.take_along_axis(h, flat[..., None], axis=1)
    lp = token_log_probs(params, config, picked, targets.reshape(g, -1), chunk_size=chunk_size, kernel=kernel)
    return lp.reshape(index.shape)


def continuation_log_probs(params: Any, config: Any, hidden: jax.Array, batch: dict[str, Any],
                           chunk_size: int = 1024, kernel: str = XLA) -> jax.Array:
    """[G, K, L] log-probs of every continuation's targets (0 where ``mask`` is 0)."""
    lp = gather_log_probs(params, config, hidden, batch, batch["index"], batch["targets"], chunk_size, kernel)
    return lp * batch["mask"]
