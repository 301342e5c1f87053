"""Gemma 3 with images (family ``gemma3_vision``) beyond the shared matrix: two images per row, image blocks
longer than the sliding window, each feature switched off, presets, preprocessing, prompts and chat.

The reference is a tiny random ``Gemma3ForConditionalGeneration`` saved by transformers (its own 5.x key
layout; the matrix covers the published one): 56 px images of 8 x 8 patches pooled 2 x 2 to 16 soft tokens,
so one image's block (16) is longer than the local layers' window (8), and a tokenizer of the same size.
"""

from __future__ import annotations

import base64
import dataclasses
import io
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_fixtures import CAPTION_LINES, picture

from gemmax.api import CausalLM
from gemmax.models import base
from gemmax.models import gemma3_vision as g3

TOKENS = 16
TOL = 1e-4


_image = picture


def random_checkpoint(cfg: Any, folder: Path) -> Any:
    """A ``Gemma3ForConditionalGeneration`` of ``cfg`` with every weight random (norm scales non-zero: the
    tower's LayerNorms around 1, the decoder's RMSNorm offsets around 0), saved to ``folder / "hf"`` with the
    SentencePiece model ``folder / "tok.model"`` beside it."""
    import transformers

    m = transformers.Gemma3ForConditionalGeneration(cfg)
    m.config._attn_implementation = "eager"
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in m.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "vision" in name and ("layer_norm" in name or "layernorm" in name):
                p.copy_(1 + r * 0.3 if name.endswith("weight") else r * 0.08)
            elif "norm" in name:
                p.copy_(r * 0.5)
            else:
                p.copy_(r * (0.06 if "embed_tokens" in name else 0.15))
    m.eval()
    m.save_pretrained(folder / "hf")
    (folder / "tok.model").rename(folder / "hf" / "tokenizer.model")
    return m


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(transformers model, CausalLM loaded from its save, tokenizer, (image, boi, eoi) ids)."""
    import transformers
    from spm_fixtures import train_tiny_sentencepiece

    folder = tmp_path_factory.mktemp("g3v")
    tok = train_tiny_sentencepiece(folder, CAPTION_LINES, 200)
    v = tok.vocab_size
    ids = (v - 1, v - 3, v - 2)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=56,
                  patch_size=7, vision_use_head=False)
    text = dict(vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, sliding_window=8, query_pre_attn_scalar=8,
                layer_types=["sliding_attention", "sliding_attention", "full_attention"], eos_token_id=[1, 5],
                rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                 "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    cfg = transformers.Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=TOKENS,
                                    image_token_index=ids[0], boi_token_index=ids[1], eoi_token_index=ids[2])
    m = random_checkpoint(cfg, folder)
    return m, CausalLM.from_preset(str(folder / "hf")), tok, ids


def _two_image_rows(ids: tuple[int, int, int], v: int) -> tuple[np.ndarray, np.ndarray]:
    """Two rows, each with two image blocks inside text (33 + 2 * 18 tokens), and their four images."""
    image, boi, eoi = ids
    rng = np.random.RandomState(0)

    def row() -> list[int]:
        block = [boi] + [image] * TOKENS + [eoi]
        return [2, *rng.randint(8, v - 3, 5), *block, *rng.randint(8, v - 3, 7), *block, *rng.randint(8, v - 3, 6)]

    tokens = np.array([row(), row()], np.int32)
    px = rng.uniform(-1, 1, (4, 3, 56, 56)).astype(np.float32)
    return tokens, px


def _hf_logits(m, tokens, px, types) -> np.ndarray:
    kw = {} if types is None else {"token_type_ids": torch.tensor(types, dtype=torch.long)}
    with torch.no_grad():
        return m(input_ids=torch.tensor(tokens, dtype=torch.long), pixel_values=torch.tensor(px), **kw).logits.numpy()


def test_two_images_per_row_match_transformers(setup):
    m, lm, tok, ids = setup
    tokens, px = _two_image_rows(ids, tok.vocab_size)
    types = (tokens == ids[0]).astype(np.int32)
    want = _hf_logits(m, tokens, px, types)
    scale = np.abs(want).max()
    assert np.abs(lm.logits(tokens, pixel_values=px, token_type_ids=types) - want).max() <= TOL * scale
    # without token_type_ids the soft tokens are found by their id, as the processor marks them
    assert np.abs(lm.logits(tokens, pixel_values=px) - want).max() <= TOL * scale
    with pytest.raises(ValueError, match="32 image soft tokens .* 3 image"):
        lm.logits(tokens[:1], pixel_values=px[:3])
    with pytest.raises(ValueError, match="32 image soft tokens .* 1 image"):
        lm.generate(tokens[0], pixel_values=px[:1], max_new_tokens=2)
    # zeros: all causal, as transformers without token_type_ids
    causal = _hf_logits(m, tokens, px, None)
    assert np.abs(lm.logits(tokens, pixel_values=px, token_type_ids=np.zeros_like(types)) - causal).max() \
        <= TOL * np.abs(causal).max()


def _variant_logits(lm, tokens, px, types, monkeypatch, **patches) -> np.ndarray:
    with monkeypatch.context() as mp:
        for name, fn in patches.items():
            mp.setattr(g3, name, fn)
        with jax.disable_jit():  # op by op: tiny shapes run faster than six compilations
            return np.asarray(g3.forward(lm.params, lm.config, jnp.asarray(tokens), px, types))


def test_each_feature_switched_off_moves_logits_far(setup, monkeypatch):
    """So the parity test can fail: every Gemma 3 image feature, done otherwise, moves the logits by more than
    100 times the tolerance."""
    m, lm, tok, ids = setup
    tokens, px = _two_image_rows(ids, tok.vocab_size)
    types = (tokens == ids[0]).astype(np.int32)
    want = _hf_logits(m, tokens, px, types)
    far = 100 * TOL * np.abs(want).max()
    assert np.abs(_variant_logits(lm, tokens, px, types, monkeypatch) - want).max() <= TOL * np.abs(want).max()

    mask, feats = g3.image_block_mask, g3.image_features

    def one_block(types):  # every image token in one block: images would see each other's later tokens
        return jnp.where(types == 1, 0, -1)

    def unwindowed(q_idx, k_idx, q_block, k_block, window, *a, **kw):  # the window spares a block's pairs
        inside = mask(q_idx, k_idx, q_block, k_block, window, *a, **kw)
        same = (q_block[:, :, None] == k_block[:, None, :]) & (q_block[:, :, None] >= 0)
        return inside | same

    def no_norm(params, cfg, pixel_values, dtype):
        with monkeypatch.context() as mp:
            mp.setattr(g3, "rms_norm", lambda x, *a, **k: x)
            return feats(params, cfg, pixel_values, dtype)

    def scaled(params, cfg, pixel_values, dtype):  # features scaled by sqrt(d) like text embeddings
        return feats(params, cfg, pixel_values, dtype) * jnp.sqrt(jnp.asarray(cfg.text.hidden_size, dtype))

    def transposed_pool(params, cfg, pixel_values, dtype):  # pooled windows in column-major order
        out = feats(params, cfg, pixel_values, dtype)
        t = int(np.sqrt(out.shape[1]))
        return out.reshape(out.shape[0], t, t, -1).transpose(0, 2, 1, 3).reshape(out.shape)

    variants = {"causal": _variant_logits(lm, tokens, px, np.zeros_like(types), monkeypatch),
                "one block": _variant_logits(lm, tokens, px, types, monkeypatch, image_blocks=one_block),
                "no window in blocks": _variant_logits(lm, tokens, px, types, monkeypatch,
                                                       image_block_mask=unwindowed),
                "no soft-emb norm": _variant_logits(lm, tokens, px, types, monkeypatch, image_features=no_norm),
                "scaled features": _variant_logits(lm, tokens, px, types, monkeypatch, image_features=scaled),
                "pool order": _variant_logits(lm, tokens, px, types, monkeypatch, image_features=transposed_pool)}
    for what, got in variants.items():
        assert np.abs(got - want).max() > far, what


def test_generate_with_two_images_matches_transformers(setup):
    """The engine's prefill (image blocks, ring caches of the window) + decode steps equal transformers'
    generate over a prompt with two images."""
    m, lm, tok, ids = setup
    tokens, px = _two_image_rows(ids, tok.vocab_size)
    prompt = tokens[0]
    types = (prompt == ids[0]).astype(np.int64)[None]
    with torch.no_grad():
        want = m.generate(torch.tensor(prompt[None], dtype=torch.long), pixel_values=torch.tensor(px[:2]),
                          token_type_ids=torch.tensor(types), attention_mask=torch.ones_like(torch.tensor(types)),
                          max_new_tokens=6, do_sample=False, pad_token_id=0)[0].numpy()
    got = lm.generate(prompt, pixel_values=px[:2], max_new_tokens=6, stop_token_ids=[])
    assert got.tolist() == want.tolist()


def test_prompts_images_and_chat(setup):
    """Text + images -> the processor's layout; generate and chat (image parts, data: URIs) through the engine."""
    from PIL import Image

    m, lm, tok, ids = setup
    image, boi, eoi = ids
    cfg = lm.config
    nl2 = tok.encode("\n\n", add_bos=False)
    got, inputs = g3.encode_prompt(cfg, tok, "describe", [_image(0)])
    block = [boi] + [image] * TOKENS + [eoi]
    assert got == [2, *nl2, *block, *tok.encode("\n\ndescribe", add_bos=False)]
    assert inputs["pixel_values"].shape == (1, 3, 56, 56)
    assert inputs["token_type_ids"].tolist() == [int(t == image) for t in got]
    two, two_inputs = g3.encode_prompt(cfg, tok, "a <start_of_image> b <start_of_image>", [_image(0), _image(1)])
    assert two.count(boi) == 2 and two_inputs["pixel_values"].shape[0] == 2
    with pytest.raises(ValueError, match="placeholders"):
        g3.encode_prompt(cfg, tok, "<start_of_image>", [_image(0), _image(1)])

    text = lm.generate("describe", images=[_image(0)], max_new_tokens=4)
    assert isinstance(text, str) and text.startswith("describe")
    ids_out = lm.generate(got, max_new_tokens=4, **inputs)
    assert text == "describe" + tok.decode([t for t in ids_out[len(got):] if t not in tok.stop_ids])

    buf = io.BytesIO()
    Image.fromarray(_image(0)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    for part in ({"type": "image_url", "image_url": {"url": url}}, {"type": "image", "image": _image(0)}):
        msgs = [{"role": "user", "content": [part, {"type": "text", "text": " describe "}]}]
        reply = lm.chat(msgs, max_new_tokens=4)
        prompt = tok.apply_chat_template(msgs, family="gemma")
        assert "<start_of_image>describe<end_of_turn>" in prompt
        full = lm.generate(prompt, images=[_image(0)], max_new_tokens=4)
        assert reply == full[len(prompt):].strip()
    bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]
    with pytest.raises(ValueError, match="data: URI"):
        lm.chat(bad)


def test_batch_of_image_prompts_decodes_as_each_alone(setup):
    """A list of prompts with one images entry each (one image, or a list of two) gives, row by row, what
    each prompt gives alone (greedy); a mismatched batch is refused naming the mismatch."""
    _, lm, _, _ = setup
    prompts = ["describe", "compare <start_of_image> with <start_of_image>", "again"]
    images = [_image(0), [_image(1), _image(2)], [_image(3)]]
    got = lm.generate(prompts, images=images, max_new_tokens=4)
    want = [lm.generate(p, images=im if isinstance(im, list) else [im], max_new_tokens=4)
            for p, im in zip(prompts, images, strict=True)]
    assert got == want
    assert len(set(got)) == 3  # different images, different answers: the rows did not mix
    with pytest.raises(ValueError, match="one per prompt"):
        lm.generate(prompts, images=images[:2], max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt 0: .*placeholders"):
        lm.generate(["<start_of_image> <start_of_image>"], images=[[_image(0)]], max_new_tokens=2)


def test_preprocessing_matches_transformers():
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    proc = Gemma3ImageProcessorPil(size={"height": 56, "width": 56}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    img = _image(2, 40, 52)
    want = proc(images=[img], return_tensors="np")["pixel_values"]
    assert np.abs(g3.preprocess_image(img, 56) - want[0]).max() < 1e-5
    # pan and scan: a wide picture becomes the picture plus crops, in the processor's order
    cfg = g3.tiny_config(vision_image_size=56, tokens_per_image=16)
    wide = _image(3, 300, 900)
    want = proc(images=[wide], do_pan_and_scan=True, pan_and_scan_min_crop_size=256, pan_and_scan_max_num_crops=4,
                pan_and_scan_min_ratio_to_activate=1.2, return_tensors="np")
    got, crops = g3.pixel_values(cfg, [wide], pan_and_scan_crops=True)
    assert crops == [int(want["num_crops"][0])] == [3]
    assert got.shape == want["pixel_values"].shape and np.abs(got - want["pixel_values"]).max() < 1e-5
    assert g3.pan_and_scan(_image(0, 300, 330)) == []  # ratio under 1.2


def test_pan_and_scan_prompt_text():
    cfg = g3.tiny_config(vision_image_size=56, tokens_per_image=16)

    class Chars:  # a "tokenizer" that keeps the text visible: one id per character
        def encode(self, text, add_bos=False):
            return [1000 + ord(c) for c in text]

    ids, inputs = g3.encode_prompt(cfg, Chars(), "x", [_image(3, 300, 900)], pan_and_scan_crops=True)
    text = "".join(chr(i - 1000) if i >= 1000 else {cfg.boi_token_id: "[", cfg.eoi_token_id: "]"}.get(i, "")
                   for i in ids[1:])
    seq = "\n\n[]\n\n"
    assert text == f"Here is the original image {seq} and here are some crops to help you see better " \
        + " ".join([seq] * 3) + "x"
    assert inputs["pixel_values"].shape[0] == 4 and ids.count(cfg.image_token_id) == 4 * 16


def test_presets_match_published_parameter_counts():
    published = {"4b": 4_300_079_472, "12b": 12_187_325_040, "27b": 27_432_406_640}
    for size, total in published.items():
        for name in (f"gemma3_vision_{size}", f"gemma3_vision_instruct_{size}"):
            fam, cfg = base.all_presets()[name]
            assert fam.name == "gemma3_vision" and cfg.param_count()["total"] == total, name
            assert cfg.pool == 4 and cfg.vision.image_size == 896 and cfg.tokens_per_image == 256
    assert g3.PRESET_REPOS["gemma3_vision_instruct_27b"] == "google/gemma-3-27b-it"


def test_configs_and_routing():
    import transformers

    # the published 4B config.json gives only what differs from transformers' defaults
    published = {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
                 "boi_token_index": 255999, "eoi_token_index": 256000, "eos_token_id": [1, 106],
                 "image_token_index": 262144, "mm_tokens_per_image": 256, "initializer_range": 0.02,
                 "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                                 "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                                 "sliding_window": 1024},
                 "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                                   "model_type": "siglip_vision_model", "num_attention_heads": 16,
                                   "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": False}}
    cfg = g3.from_hf_config(published)
    preset = g3.PRESETS["gemma3_vision_instruct_4b"]
    assert dataclasses.replace(cfg, name=preset.name, text=cfg.text.replace(name=preset.name)) == preset
    assert g3.from_hf_config(g3.to_hf_config(cfg)) == cfg
    tf = transformers.Gemma3Config(**{k: v for k, v in g3.to_hf_config(cfg).items() if k != "architectures"})
    assert tf.mm_tokens_per_image == 256 and tf.text_config.sliding_window == 1024
    assert g3.Gemma3VisionConfig.from_dict(cfg.to_dict()) == cfg
    assert base.for_model_type("gemma3") is g3.FAMILY and base.for_model_type("gemma3_text").name == "gemma"
    with pytest.raises(ValueError, match="tokens_per_image"):
        g3.tiny_config(tokens_per_image=9)


def test_cli_info_and_shard_plan(capsys):
    from gemmax.cli import main

    assert main(["info", "gemma3_vision_4b"]) == 0
    assert "4,300,079,472" in capsys.readouterr().out
    assert main(["shard-plan", "gemma3_vision_27b", "--mesh", "2x4", "--no-optimizer"]) == 0
    out = capsys.readouterr().out
    for row in ("vision_encoder/encoder_block/mlp/fc1/kernel", "multi_modal_projector/input_projection/kernel",
                "decoder_block/attention/query/kernel"):
        assert row in out, row


def test_family_functions_declare_every_weight(setup, tmp_path: Path):
    _, lm, _, _ = setup
    cfg = lm.config
    specs = g3.param_specs(cfg)
    table = g3.hf_table(cfg)
    assert set(specs) == set(table)
    assert {p for p, _ in lm.weights()} == set(specs)
    nodes = g3.linear_nodes(cfg)
    assert "query" in nodes and "vision_query" in nodes and nodes["query"].layers == g3.TEXT_LAYERS
    # export writes the published layout, which transformers reads back to the same logits
    out = lm.export_hf(tmp_path / "out")
    from safetensors import safe_open

    keys = set()
    for f in out.glob("*.safetensors"):
        with safe_open(f, "np") as s:
            keys |= set(s.keys())
    assert "multi_modal_projector.mm_input_projection_weight" in keys
    assert "vision_tower.vision_model.post_layernorm.weight" in keys
    assert "language_model.model.layers.0.self_attn.q_norm.weight" in keys and "lm_head.weight" not in keys


def _data_uri(img: np.ndarray, fmt: str = "PNG") -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def test_server_chat_with_images(setup):
    """``/v1/chat/completions`` with OpenAI ``image_url`` parts (base64 data: URIs) answers as ``lm.chat`` does,
    for Gemma 3 and PaliGemma; another scheme, a broken image or a text-only model's images: 400."""
    from fastapi.testclient import TestClient

    from gemmax.models import paligemma as pg
    from gemmax.serve import protocol
    from gemmax.serve.errors import APIError
    from gemmax.serve.scheduler import ServedModel
    from gemmax.serve.server import create_app

    _, lm, tok, _ = setup
    v = tok.vocab_size
    pali = CausalLM.from_config(pg.tiny_config(text_vocab_size=v, image_token_id=v - 1, vision_image_size=28),
                                seed=1, tokenizer=tok)
    for model, prompt_text in ((lm, "describe"), (pali, "caption en")):
        content = [{"type": "image_url", "image_url": {"url": _data_uri(_image(0), "JPEG")}},
                   {"type": "text", "text": prompt_text}]
        msgs = [{"role": "user", "content": content}]
        with TestClient(create_app(model, max_batch=2, max_len=128)) as client:
            r = client.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 4, "temperature": 0})
            assert r.status_code == 200, r.text
            got = r.json()["choices"][0]["message"]["content"]
            for url in ("https://example.com/cat.png", "data:image/png;base64,AAAA", "data:text/plain;base64,QQ=="):
                bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]
                r = client.post("/v1/chat/completions", json={"messages": bad, "max_tokens": 2})
                assert r.status_code == 400 and "image_url" in r.json()["error"]["param"], r.text
        if model is lm:
            assert got == model.chat(msgs, max_new_tokens=4)
    text_only = base.get("gemma").tiny_config("gemma3", vocab_size=v)
    with pytest.raises(APIError, match="reads no images"):
        protocol.chat_prompt(ServedModel("t", {}, text_only, tok, 128), protocol.messages({"messages": msgs}))


def test_cli_generate_with_images(setup, tmp_path: Path, capsys):
    from PIL import Image

    from gemmax.cli import main

    _, lm, _, _ = setup
    for i in range(2):
        Image.fromarray(_image(i)).save(tmp_path / f"{i}.png")
    prompt = "a <start_of_image> b <start_of_image>"
    assert main(["generate", "--model", lm.source, "--image", str(tmp_path / "0.png"), "--image",
                 str(tmp_path / "1.png"), prompt, "--max-new-tokens", "3"]) == 0
    pics = [np.asarray(Image.open(tmp_path / f"{i}.png")) for i in range(2)]
    assert capsys.readouterr().out.strip() == lm.generate(prompt, images=pics, max_new_tokens=3).strip()
    assert main(["generate", "--model", lm.source, "--image", str(tmp_path / "0.png"), "describe", "--chat",
                 "--max-new-tokens", "3"]) == 0
    msgs = [{"role": "user", "content": [{"type": "image", "image": pics[0]}, {"type": "text", "text": "describe"}]}]
    assert capsys.readouterr().out.strip() == lm.chat(msgs, max_new_tokens=3)
