"""Gemma 3n's text decoder beyond the acceptance matrix (tests/fixture_gemma3n.py runs the shared cells).

* A published-layout multimodal ``gemma3n`` folder (decoder under ``model.language_model.*``, the vision and
  audio towers and embedders present, the KV-shared layers' unused k/v tensors present) loads its text part,
  with transformers' logits; a tensor that really does not belong is still refused.
* Each feature switched off moves the logits far beyond the matrix's tolerance (1e-4 of the logit scale), so
  the parity cells would catch its loss: per-layer inputs, AltUp predict / correct / output scale / stream
  projections, LAuReL, KV sharing's source, gaussian top-k sparsity, the value norm, ``x * w`` norms, query
  scale 1, the final soft-cap, the sliding window, the local RoPE base.
* Prefill + slot insert + decode steps of two rows of different lengths equal the full forward past the window.
* Presets: published shapes and parameter counts; ``gemmax info`` / ``shard-plan`` from abstract shapes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemmax import CausalLM
from gemmax.io.hf import CheckpointError
from gemmax.models import gemma3n as g3n
from gemmax.nn.params import flatten, unflatten

TOL = 1e-4  # the matrix's tolerance, relative to the logit scale
IDS = np.concatenate([[[2]] * 2, np.random.RandomState(0).randint(8, 96, (2, 19))], 1).astype(np.int32)


# ---- a multimodal checkpoint's text part -------------------------------------------------------------------


def _torch_text_model():
    import torch
    import transformers as tf

    c = tf.Gemma3nTextConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention",
                     "full_attention"],
        vocab_size_per_layer_input=80, hidden_size_per_layer_input=8, altup_num_inputs=3, laurel_rank=4,
        num_kv_shared_layers=2, activation_sparsity_pattern=[0.95, 0.9, 0.0, 0.0, 0.0])
    model = tf.AutoModelForCausalLM.from_config(c, attn_implementation="eager").eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=gen)
            p.copy_(r * 0.5 if "norm" in name else r * 0.06 if "embed_tokens" in name else r * 0.15)
    return c, model


def _write_multimodal(folder: Path, text_cfg, model) -> None:
    """The layout of google/gemma-3n-E2B: ``model.language_model.*`` + towers + the shared layers' k/v."""
    from safetensors.numpy import save_file

    rng = np.random.RandomState(0)
    tensors = {"model.language_model." + k[len("model."):]: v.detach().numpy().copy()
               for k, v in model.state_dict().items() if k.startswith("model.")}
    for i in range(3, 5):  # KV-shared layers: the published files carry k/v they never use
        p = f"model.language_model.layers.{i}.self_attn."
        tensors[p + "k_proj.weight"] = rng.randn(16, 32).astype(np.float32)
        tensors[p + "v_proj.weight"] = rng.randn(16, 32).astype(np.float32)
        tensors[p + "k_norm.weight"] = rng.randn(8).astype(np.float32)
    for k, shape in (("model.vision_tower.timm_model.conv_stem.conv.weight", (4, 3, 3, 3)),
                     ("model.audio_tower.subsample_conv_projection.input_proj_linear.weight", (8, 8)),
                     ("model.embed_vision.embedding.weight", (4, 8)),
                     ("model.embed_audio.embedding_projection.weight", (32, 8))):
        tensors[k] = rng.randn(*shape).astype(np.float32)
    save_file(tensors, str(folder / "model.safetensors"))
    cfg = {"model_type": "gemma3n", "architectures": ["Gemma3nForConditionalGeneration"],
           "text_config": text_cfg.to_dict(), "vision_config": {"model_type": "gemma3n_vision"},
           "audio_config": {"model_type": "gemma3n_audio"}, "eos_token_id": [1, 106]}
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def multimodal(tmp_path_factory: pytest.TempPathFactory):
    import torch

    c, model = _torch_text_model()
    folder = tmp_path_factory.mktemp("gemma3n_mm")
    _write_multimodal(folder, c, model)
    with torch.no_grad():
        want = model(torch.tensor(IDS, dtype=torch.long)).logits.numpy()
    return folder, want


def test_multimodal_checkpoint_text_part(multimodal, caplog: pytest.LogCaptureFixture) -> None:
    folder, want = multimodal
    with caplog.at_level(logging.DEBUG, logger="gemmax.io.hf"):
        lm = CausalLM.from_preset(str(folder))
    assert lm.family.name == "gemma3n" and lm.config.num_kv_shared_layers == 2
    assert lm.config.eos_ids == (1,)  # the text config's own ids win over the wrapper's
    got = np.asarray(lm.logits(IDS))
    assert np.abs(got - want).max() <= TOL * np.abs(want).max()
    skipped = " ".join(r.getMessage() for r in caplog.records)
    assert "layers.3.self_attn.k_proj" in skipped and "vision_tower" in skipped  # debug log only


def test_unexpected_tensor_still_refused(multimodal, tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    folder, _ = multimodal
    t = load_file(str(folder / "model.safetensors"))
    t["model.language_model.layers.1.self_attn.k_proj.bias"] = np.zeros(16, np.float32)  # a layer with own k
    save_file(t, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CheckpointError, match="k_proj.bias"):
        CausalLM.from_preset(str(tmp_path))


# ---- every feature matters ---------------------------------------------------------------------------------


CFG = g3n.tiny_config(vocab_size=96, vocab_size_per_layer_input=80)


def _random_params(cfg: g3n.Gemma3nConfig, seed: int = 0) -> dict:
    """Every weight random (norms and AltUp's coefficient maps included: their zero init would hide them)."""
    rng = np.random.RandomState(seed)
    flat = {}
    for path, s in g3n.param_specs(cfg).items():
        r = rng.randn(*s.shape).astype(np.float32)
        scale = 0.5 if path.endswith("scale") else 0.06 if "embedding" in path else 0.15
        if "modality_router" in path:  # the router reads norm(x) / D: trained routers are that much larger
            scale *= cfg.hidden_size
        flat[path] = jnp.asarray(r * scale)
    return unflatten(flat)


PARAMS = _random_params(CFG)
_fwd = jax.jit(g3n.forward, static_argnums=1)


def _logits(params: dict = PARAMS, cfg: g3n.Gemma3nConfig = CFG) -> np.ndarray:
    return np.asarray(_fwd(params, cfg, jnp.asarray(IDS)))


@pytest.fixture(scope="module")
def base_logits() -> np.ndarray:
    return _logits()


def _far(a: np.ndarray, b: np.ndarray) -> bool:
    return float(np.abs(a - b).max()) > 100 * TOL * float(np.abs(b).max())


def _set(params: dict, path: str, fn) -> dict:
    flat = flatten(params)
    flat[path] = fn(flat[path])
    return unflatten(flat)


PARAM_SWITCHES = {
    "per_layer_embedding": ("per_layer_embedding/embeddings", jnp.zeros_like),
    "per_layer_model_projection": ("per_layer_model_projection/kernel", jnp.zeros_like),
    "altup_predict": ("decoder_block/altup/prediction_coefs/kernel", jnp.zeros_like),
    "altup_correct": ("decoder_block/altup/correction_coefs/kernel", jnp.zeros_like),
    "altup_stream_projections": ("altup_projections/kernel",
                                 lambda w: jnp.broadcast_to(jnp.eye(w.shape[-1]), w.shape)),
    "laurel": ("decoder_block/laurel/linear_left/kernel", jnp.zeros_like),
    "norms_x_times_w": ("decoder_block/pre_ffw_norm/scale", lambda w: 1.0 + w),  # Gemma 3's (1 + w)
    "query_scale_1": ("decoder_block/attention/query_norm/scale", lambda w: w * CFG.head_dim ** -0.5),
}


@pytest.mark.parametrize("feature", list(PARAM_SWITCHES))
def test_feature_off_by_weights(feature: str, base_logits: np.ndarray) -> None:
    path, fn = PARAM_SWITCHES[feature]
    assert _far(_logits(_set(PARAMS, path, fn)), base_logits), feature


@dataclasses.dataclass(frozen=True)
class _FirstSource(g3n.Gemma3nConfig):
    """KV sharing from the *first* layer of the type instead of the last non-shared one."""

    def kv_source(self, layer: int) -> int:
        if layer < self.num_unshared:
            return layer
        return self.layer_types.index(self.layer_types[layer])


CONFIG_SWITCHES = {
    "correct_output_scale": lambda c: c.replace(altup_correct_scale=False),
    "activation_sparsity": lambda c: c.replace(activation_sparsity=(0.0,) * c.num_layers),
    "final_softcap": lambda c: c.replace(final_logit_softcap=None),
    "sliding_window": lambda c: c.replace(sliding_window=1000),
    "local_rope_base": lambda c: c.replace(rope_local_theta=c.rope_theta),
    "kv_share_source": lambda c: _FirstSource(**{f.name: getattr(c, f.name) for f in dataclasses.fields(c)}),
}


@pytest.mark.parametrize("feature", list(CONFIG_SWITCHES))
def test_feature_off_by_config(feature: str, base_logits: np.ndarray) -> None:
    cfg = CONFIG_SWITCHES[feature](CFG)
    if feature == "final_softcap":  # applied after the decoder; it bends logits of the published models' size
        hidden = jnp.asarray(np.random.RandomState(2).randn(2, 3, CFG.hidden_size).astype(np.float32)) * 40
        want = np.asarray(g3n.logits_from_hidden(PARAMS, CFG, hidden))
        assert _far(np.asarray(g3n.logits_from_hidden(PARAMS, cfg, hidden)), want)
        return
    assert _far(_logits(PARAMS, cfg), base_logits), feature


def test_value_norm_matters(base_logits: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_value_norm(pk, h, cfg, rope):
        a = pk["attention"]
        k = g3n.apply_rope(g3n.rms_norm(g3n._lin(a["key"], h, "key"), a["key_norm"]["scale"], cfg.norm_eps),
                           None, rope)
        return k, g3n._lin(a["value"], h, "value")

    monkeypatch.setattr(g3n, "compute_kv", no_value_norm)
    fwd = jax.jit(lambda p, ids: g3n.forward(p, CFG, ids))  # a new function: traced with the patch, compiled once
    assert _far(np.asarray(fwd(PARAMS, jnp.asarray(IDS))), base_logits)


def test_sparsity_cutoff_is_the_gaussian_quantile() -> None:
    x = jnp.asarray(np.random.RandomState(1).randn(4, 4096).astype(np.float32))
    kept = np.asarray(g3n.gaussian_topk(x, jnp.asarray(g3n.sparsity_multipliers(CFG)[0])))
    assert abs((kept > 0).mean() - 0.05) < 0.01  # 95% sparsity on a normal row keeps ~5%


# ---- generation equals the full forward ------------------------------------------------------------------


def test_prefill_insert_decode_equal_forward(base_logits: np.ndarray) -> None:
    full = base_logits
    lengths = np.array([12, 7])
    toks = IDS[:, :12].copy()
    toks[1, 7:] = 0
    logits, rows = g3n.prefill(PARAMS, CFG, jnp.asarray(toks), jnp.asarray(lengths), 64)
    scale = np.abs(full).max()
    assert np.abs(np.asarray(logits) - full[[0, 1], lengths - 1]).max() <= TOL * scale
    cache = g3n.insert(g3n.init_cache(CFG, 3, 64, jnp.float32), rows, jnp.asarray([2, 0]))  # slots 2 and 0
    step = jax.jit(g3n.decode_step, static_argnums=1)
    pos = lengths.copy()
    for _ in range(6):  # row 0 runs past the window of 8
        tokens = np.array([IDS[1, pos[1]], 0, IDS[0, pos[0]]])
        out, cache = step(PARAMS, CFG, cache, jnp.asarray(tokens), jnp.asarray([pos[1], 0, pos[0]]))
        out = np.asarray(out)
        assert np.abs(out[2] - full[0, pos[0]]).max() <= TOL * scale
        assert np.abs(out[0] - full[1, pos[1]]).max() <= TOL * scale
        pos = pos + 1
    assert set(cache) == {"k_local", "v_local", "k_global", "v_global"}
    assert cache["k_local"].shape[0] + cache["k_global"].shape[0] == CFG.num_unshared  # shared layers: none


# ---- presets, abstract shapes, errors -------------------------------------------------------------------


def test_presets_published_shapes_and_counts() -> None:
    e2b, e4b = g3n.PRESETS["gemma3n_e2b"], g3n.PRESETS["gemma3n_instruct_e4b"]
    assert (e2b.num_layers, e2b.intermediate_size, e2b.num_kv_shared_layers) == (30, 8192, 10)
    assert (e4b.num_layers, e4b.intermediate_size, e4b.num_kv_shared_layers) == (35, 16384, 15)
    # the text decoder's weights (embeddings and per-layer embeddings included; docs/gemma3n.md)
    assert e2b.param_count()["total"] == 4_435_182_688
    assert e4b.param_count()["total"] == 6_835_235_568
    assert e2b.param_count()["per_layer_embedding"] == 262_144 * 30 * 256
    # + the KV-shared layers' unused k/v in the published files + audio tower 681.3M + embedders 7.8M +
    # MobileNet-V5 ~0.3B = the published 5.44B / 7.85B
    for cfg, published in ((e2b, 5.44e9), (e4b, 7.85e9)):
        unused = cfg.num_kv_shared_layers * (2 * cfg.num_kv_heads * cfg.head_dim * cfg.hidden_size + cfg.head_dim)
        towers = published - cfg.param_count()["total"] - unused - 681_348_640 - 4_460_544 - 3_345_408
        assert 0.28e9 < towers < 0.31e9, towers


def test_info_and_shard_plan_from_shapes(capsys: pytest.CaptureFixture) -> None:
    from gemmax.cli import main

    assert main(["info", "gemma3n_e2b"]) == 0
    out = capsys.readouterr().out
    assert "4,435,182,688" in out and '"num_kv_shared_layers": 10' in out
    assert main(["shard-plan", "gemma3n_e4b", "--mesh", "2x4"]) == 0
    plan = capsys.readouterr().out
    assert "kv_block/attention/key/kernel" in plan and "decoder_block/attention/query/kernel" in plan


def test_config_round_trip_and_errors() -> None:
    hf = g3n.to_hf_config(CFG)
    assert g3n.from_hf_config(hf) == CFG.replace(name="")  # the name comes from the folder
    assert g3n.Gemma3nConfig.from_dict(CFG.to_dict()) == CFG
    with pytest.raises(ValueError, match="one MLP width"):
        g3n.from_hf_config(dict(hf, intermediate_size=[64, 64, 64, 64, 32]))
    with pytest.raises(ValueError, match="num_kv_shared_layers"):
        CFG.replace(num_kv_shared_layers=5)
    with pytest.raises(ValueError, match="no earlier layer"):
        CFG.replace(layer_types=("local",) * 3 + ("global",) * 2, num_kv_shared_layers=2)
    with pytest.raises(TypeError, match="token ids only"):
        g3n.forward_hidden(PARAMS, CFG, jnp.asarray(IDS), pixel_values=np.zeros(1))
    assert math.isclose(g3n.sparsity_multipliers(CFG)[0], 1.6448536, rel_tol=1e-6)


def test_int8_quantizes_the_per_layer_table(tmp_path: Path, base_logits: np.ndarray) -> None:
    # PARAMS: every path live (the init's zero correct_output_scale switches the per-layer inputs off)
    lm = CausalLM(CFG, PARAMS)
    lm.quantize("int8")
    ple = lm.params["per_layer_embedding"]
    assert ple["embeddings"].dtype == jnp.int8 and ple["scale"].shape == (CFG.vocab_size_per_layer_input,)
    got = np.asarray(lm.logits(IDS))
    # closeness to float is the matrix's int8 cell; this all-random model (large routers, 64-wide sparse gates
    # whose few survivors sit just above the cutoff) amplifies rounding too much to bound it tightly here
    assert np.abs(got - base_logits).max() > 1e-4
    back = CausalLM.from_preset(str(lm.export_hf(tmp_path / "hf")))  # exports dequantize every table
    assert back.params["per_layer_embedding"]["embeddings"].dtype == jnp.float32
    assert back.config.replace(name="") == CFG.replace(name="")  # (the name comes from the folder)
    # the int8 model computes exactly what its dequantized weights do: every per-row scale is applied
    # (the float forward the other tests compiled, on the exported weights: as NumPy arrays, which, unlike the
    # loader's device-committed ones, take the compiled program as it is)
    assert np.abs(_logits(jax.tree.map(np.asarray, back.params)) - got).max() <= 1e-5 * np.abs(got).max()
