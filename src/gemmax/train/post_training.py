"""The post-training objectives by name: what ``lm.fit(data, objective="dpo", ...)`` and ``gemmax finetune
--method`` resolve ("sft", next-token fine-tuning, is the trainer's default and needs no objective)."""

from __future__ import annotations

import dataclasses
from typing import Any

from gemmax.train.distill import Distill
from gemmax.train.grpo import GRPO
from gemmax.train.objectives import Objective
from gemmax.train.preference import DPO, ORPO, SimPO

__all__ = ["OBJECTIVES", "make_objective", "objective_options"]

#: name -> objective class
OBJECTIVES: dict[str, type[Objective]] = {"dpo": DPO, "simpo": SimPO, "orpo": ORPO, "distill": Distill,
                                           "grpo": GRPO}


def objective_options(name: str) -> tuple[str, ...]:
    """The settings (keyword arguments) objective ``name`` accepts."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; use one of sft, {', '.join(sorted(OBJECTIVES))}")
    return tuple(f.name for f in dataclasses.fields(OBJECTIVES[name]) if not f.name.startswith("_"))


def make_objective(name: str, **settings: Any) -> Objective:
    """The objective ``name`` ("dpo", "simpo", "orpo", "distill", "grpo") with ``settings``; unknown settings are
    an error naming them."""
    known = objective_options(name)
    bad = sorted(set(settings) - set(known))
    if bad:
        raise TypeError(f"objective {name!r} has no option(s) {', '.join(bad)} (it takes {', '.join(known)})")
    return OBJECTIVES[name](**settings)
