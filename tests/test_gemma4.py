"""Gemma 4 text beyond the acceptance matrix (tests/fixture_gemma4.py runs the 17 cells): every feature
switched off moves the logits far beyond the parity tolerance, the grouped (ragged_dot) experts equal all
experts run densely, the multimodal checkpoint layout loads its text decoder, the presets have the published
parameter counts, and ``gemmax info`` / ``shard-plan`` work from shapes alone."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemmax.models.gemma4 import PRESETS, decode, model, tiny_config
from gemmax.nn.params import flatten, unflatten

TOL = 1e-4  # the matrix's parity tolerance, relative to the logit scale
forward = jax.jit(model.forward, static_argnums=1)  # weight-only variants reuse one compilation


def _params(cfg, seed: int = 0) -> dict:
    """Random weights from the declared shapes (numpy: one jax.random call per shape would compile each),
    norms and per-layer scalars around one."""
    rng = np.random.RandomState(seed)
    p = {}
    for k, s in sorted(model.param_specs(cfg).items()):
        if k.endswith(("/scale", "layer_scalar", "expert_scale")):
            p[k] = 1.0 + 0.5 * rng.randn(*s.shape)
        else:
            fan_in = s.shape[s.fan_in_axis] if s.fan_in_axis is not None else s.shape[-1]
            p[k] = rng.randn(*s.shape) * (0.5 if s.init == "embedding" else 2.0 / np.sqrt(fan_in))
    return unflatten({k: jnp.asarray(v, jnp.float32) for k, v in p.items()})


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_config(vocab_size=128)
    params = _params(cfg)
    ids = jnp.asarray(np.random.RandomState(1).randint(3, 128, (2, 20)))  # longer than the window of 8
    return cfg, params, ids, np.asarray(forward(params, cfg, ids))


def _far(got, want) -> float:
    return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


@pytest.mark.parametrize("what", ["partial_rope", "window", "experts", "per_layer_embeddings", "layer_scalar",
                                  "softcap", "expert_scale"])
def test_feature_off_moves_logits(setup, what):
    cfg, params, ids, want = setup
    p = flatten(params)
    if what == "partial_rope":
        cfg = cfg.replace(global_partial_rotary=1.0)
    elif what == "window":
        cfg = cfg.replace(sliding_window=1 << 20)
    elif what == "experts":
        cfg = cfg.replace(num_experts=0, top_k=0, moe_intermediate_size=0)
    elif what == "per_layer_embeddings":
        cfg = cfg.replace(ple_dim=0)
    elif what == "softcap":
        cfg = cfg.replace(final_logit_softcap=None)
    else:
        p = {k: jnp.ones_like(v) if k.endswith(what) else v for k, v in p.items()}
    got = forward(unflatten(p), cfg, ids)
    assert _far(got, want) > 10 * TOL, what


def test_grouped_experts_equal_dense():
    rng = np.random.RandomState(0)
    n, d, e, k, inter = 37, 16, 8, 3, 12
    h = jnp.asarray(rng.randn(n, d), jnp.float32)
    gate_up = jnp.asarray(rng.randn(e, d, 2 * inter) * 0.3, jnp.float32)
    down = jnp.asarray(rng.randn(e, inter, d) * 0.3, jnp.float32)
    idx = jnp.asarray(np.stack([rng.choice(e, k, replace=False) for _ in range(n)]), jnp.int32)
    w = jnp.asarray(rng.rand(n, k), jnp.float32)
    want = model.experts_dense(h, idx, w, gate_up, down)
    g_want = jax.grad(lambda a, x: model.experts_dense(x, idx, w, a, down).sum(), (0, 1))(gate_up, h)
    for fn in (model.experts_grouped, model.experts_tiled):  # ragged_dot (GPU / TPU), tiles (XLA:CPU)
        np.testing.assert_allclose(np.asarray(fn(h, idx, w, gate_up, down)), np.asarray(want), rtol=1e-5,
                                   atol=1e-5)
        g = jax.grad(lambda a, x, fn=fn: fn(x, idx, w, a, down).sum(), (0, 1))(gate_up, h)
        for got, ref in zip(g, g_want, strict=True):
            np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-5)
    # one token (a decode step): only its k experts' tiles run
    one = model.experts_tiled(h[:1], idx[:1], w[:1], gate_up, down)
    np.testing.assert_allclose(np.asarray(one), np.asarray(want[:1]), rtol=1e-5, atol=1e-5)


def test_prefill_and_decode_equal_forward(setup):
    """KV sharing through the cache: prefill 13 tokens, decode 7 more across the window, against the forward."""
    cfg, params, ids, want = setup
    step = jax.jit(decode.decode_step, static_argnums=1)
    lg, rows = jax.jit(decode.prefill, static_argnums=(1, 4))(params, cfg, ids, jnp.asarray([20, 13]), 32)
    np.testing.assert_allclose(np.asarray(lg)[1], want[1, 12], atol=2e-4 * np.abs(want).max())
    cache = decode.insert(decode.init_cache(cfg, 2, 32, jnp.float32), rows, jnp.asarray([0, 1]))
    for t in range(13, 20):
        lg, cache = step(params, cfg, cache, ids[:, t], jnp.asarray([20 + t - 13, t]))
        np.testing.assert_allclose(np.asarray(lg)[1], want[1, t], atol=2e-4 * np.abs(want).max())
    # only the owners (layers 0, 1 local; 2 global) keep a cache; the three sharing layers keep nothing
    assert cache["k_local"].shape[0] == 2 and cache["k_global"].shape[0] == 1


def test_multimodal_layout_loads_text(tmp_path):
    """A ``Gemma4ForConditionalGeneration``-style folder without a ``vision_config`` (``model.language_model.*``,
    tower weights, the unused k/v weights of shared layers) loads as the text decoder with the same logits
    (with a ``vision_config`` it is the ``gemma4_vision`` family's: tests/test_gemma4_vision.py)."""
    torch = pytest.importorskip("torch")
    tf = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    from gemmax import CausalLM
    from gemmax.models.gemma4.config import to_hf_config

    cfg = tiny_config(vocab_size=96)
    hf_cfg = tf.Gemma4TextConfig(**{k: v for k, v in to_hf_config(cfg).items()
                                    if k not in ("model_type", "architectures", "torch_dtype")})
    ref = tf.Gemma4ForCausalLM(hf_cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, prm in ref.named_parameters():
            prm.copy_(torch.randn(prm.shape, generator=g) * 0.3)
    tensors = {k.replace("model.", "model.language_model.", 1): v.contiguous() for k, v in ref.state_dict().items()
               if k != "lm_head.weight"}
    tensors["model.vision_tower.encoder.layers.0.mlp.fc1.weight"] = torch.zeros(2, 2)
    tensors["model.language_model.layers.4.self_attn.k_proj.weight"] = torch.zeros(8, 32)  # a shared layer's
    save_file(tensors, str(tmp_path / "model.safetensors"))
    top = {"model_type": "gemma4", "architectures": ["Gemma4ForConditionalGeneration"],
           "text_config": {**to_hf_config(cfg), "use_bidirectional_attention": "vision"}, "vision_config": None}
    (tmp_path / "config.json").write_text(json.dumps(top))
    lm = CausalLM.from_preset(str(tmp_path))
    ids = np.random.RandomState(2).randint(3, 96, (1, 18))
    with torch.no_grad():
        want = ref(torch.tensor(ids)).logits.numpy()
    got = np.asarray(lm.logits(ids))
    assert _far(got, want) < TOL


#: Published sizes (Gemma 4 model card): 31B dense 30.7B; 26B-A4B 25.2B total and 3.8B active per token;
#: E2B 2.3B "effective" (without the per-layer embedding table). Text decoders only.
@pytest.mark.parametrize("name,key,published", [
    ("gemma4_31b", "total", 30.7e9), ("gemma4_26b_a4b", "total", 25.2e9), ("gemma4_26b_a4b", "active", 3.8e9),
    ("gemma4_e2b", "effective", 2.3e9)])
def test_preset_parameter_counts(name, key, published):
    pc = PRESETS[name].param_count()
    pc["effective"] = pc["total"] - pc["per_layer_embedding"]
    assert round(pc[key] / 1e8) == round(published / 1e8), (name, key, pc[key])
    assert PRESETS[name + "_it"].param_count() == PRESETS[name].param_count()


@pytest.mark.parametrize("name", ["gemma4_31b", "gemma4_26b_a4b"])
def test_shard_plan_from_shapes(name, capsys):
    from gemmax import cli

    assert cli.main(["shard-plan", name, "--mesh", "2x4", "--fsdp", "--no-optimizer"]) == 0
    out = capsys.readouterr().out
    assert "decoder_block/global/attention/query/kernel" in out and "total per device" in out
    if name == "gemma4_26b_a4b":
        line = next(x for x in out.splitlines() if x.startswith("decoder_block/local/experts/gate_up/kernel"))
        assert "P(None, 'model', 'batch', None)" in line  # experts over the model axis, FSDP over batch
    assert cli.main(["info", name]) == 0


def test_chat_template():
    from gemmax.io.tokenizer import apply_chat_template
    from gemmax.models import base

    cfg = tiny_config()
    assert base.for_config(cfg).chat_format(cfg) == "gemma4"
    msgs = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Weather in Paris?"}]
    assert apply_chat_template(msgs, family="gemma4") == (
        "<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\nHello<turn|>\n"
        "<|turn>user\nWeather in Paris?<turn|>\n<|turn>model\n")
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                               "parameters": {"type": "object"}}}]
    calls = msgs[1:2] + [{"role": "assistant", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "name": "get_weather", "content": {"temp": 20}}]
    assert apply_chat_template(calls, family="gemma4", tools=tools, add_generation_prompt=False) == (
        '<bos><|turn>system\n<|tool>declaration:get_weather{description:<|"|>Weather now<|"|>,'
        'parameters:{type:<|"|>OBJECT<|"|>}}<tool|><turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n'
        '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>'
        '<|tool_response>response:get_weather{temp:20}<tool_response|>')  # the model goes on in its turn


def test_int8_experts(setup):
    """The experts are quantization targets (per output channel, dequantized per layer); LoRA on them is
    refused with the reason."""
    from gemmax.models.base import UnsupportedError
    from gemmax.nn import lora, quant

    cfg, params, ids, want = setup
    nodes = model.linear_nodes(cfg)
    q = quant.quantize_params(params, nodes, "int8", targets=("experts_gate_up", "experts_down"), embedding=None)
    assert q["decoder_block"]["local"]["experts"]["gate_up"]["kernel"].dtype == jnp.int8
    got = np.asarray(forward(q, cfg, ids))
    assert 0 < np.abs(got - want).mean() / np.abs(want).mean() < 0.05  # int8 rounding, through strong layers
    # exactly the float model with the rounded weights
    flat = flatten(q)
    for k in [k for k in flat if "/experts/" in k and k.endswith("/kernel")]:
        node = k[:-len("/kernel")]
        flat[k] = quant.dequantize_kernel({"kernel": flat[k], "scale": flat.pop(node + "/scale")}, (2,))
    np.testing.assert_allclose(np.asarray(forward(unflatten(flat), cfg, ids)), got, atol=1e-4)
    with pytest.raises(UnsupportedError, match="LoRA on the experts"):
        forward(lora.add_lora(params, nodes, 2, targets=("experts_down",)), cfg, ids)


def _published_config(name: str) -> dict:
    """The text part of the published config.json of google/gemma-4-26B-A4B and google/gemma-4-E2B."""
    rope = {"full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0, "rope_type": "proportional"},
            "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"}}
    common = dict(model_type="gemma4_text", head_dim=256, global_head_dim=512, vocab_size=262144, rms_norm_eps=1e-6,
                  final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh", rope_parameters=rope,
                  tie_word_embeddings=True, bos_token_id=2, pad_token_id=0)
    if name == "gemma4_26b_a4b":
        return dict(common, hidden_size=2816, num_hidden_layers=30, intermediate_size=2112, num_attention_heads=16,
                    num_key_value_heads=8, num_global_key_value_heads=2, sliding_window=1024,
                    max_position_embeddings=262144, attention_k_eq_v=True, enable_moe_block=True, num_experts=128,
                    top_k_experts=8, moe_intermediate_size=704, num_kv_shared_layers=0,
                    hidden_size_per_layer_input=0, use_double_wide_mlp=False,
                    layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 5)
    return dict(common, hidden_size=1536, num_hidden_layers=35, intermediate_size=6144, num_attention_heads=8,
                num_key_value_heads=1, num_global_key_value_heads=None, sliding_window=512,
                max_position_embeddings=131072, attention_k_eq_v=False, hidden_size_per_layer_input=256,
                vocab_size_per_layer_input=262144, num_kv_shared_layers=20, use_double_wide_mlp=True,
                layer_types=(["sliding_attention"] * 4 + ["full_attention"]) * 7)


@pytest.mark.parametrize("name", ["gemma4_26b_a4b", "gemma4_e2b"])
def test_presets_equal_published_configs(name):
    from gemmax.models.gemma4.config import from_hf_config

    text = _published_config(name)
    got = from_hf_config({"model_type": "gemma4", "text_config": text, "eos_token_id": [1, 106]})
    assert got.replace(name=name) == PRESETS[name]
