"""Gemma 4 with images (family ``gemma4_vision``) beyond the shared matrix (tests/fixture_gemma4_vision.py):
two images of different aspect ratios per row, an image block longer than the sliding window, each feature
switched off, preprocessing, prompts and chat, configs.

The reference is a tiny random ``Gemma4ForConditionalGeneration`` saved by transformers (its key layout is the
published one): the text family's tiny decoder with every feature on (window 8) under a 2-layer tower with
clipped linears (bounds that clamp), standardized features and grouped heads, 4 px patches pooled 2 x 2, 16
soft tokens per image at most (64 patch slots); random non-zero norm scales; a tokenizer of the same size.
"""

from __future__ import annotations

import base64
import dataclasses
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from fixture_gemma4_vision import set_buffers
from hf_fixtures import CAPTION_LINES, picture

from gemmax.api import CausalLM
from gemmax.models import base
from gemmax.models.gemma4 import vision as v4
from gemmax.models.gemma4 import vit

TOL = 1e-4


_image = picture


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(transformers model, CausalLM loaded from its save, tokenizer)."""
    import transformers
    from spm_fixtures import train_tiny_sentencepiece

    folder = tmp_path_factory.mktemp("g4v")
    tok = train_tiny_sentencepiece(folder, CAPTION_LINES, 200)
    v = tok.vocab_size
    cfg = v4.tiny_config(text_vocab_size=v, image_token_id=v - 1, boi_token_id=v - 3, eoi_token_id=v - 2,
                         video_token_id=v - 4, audio_token_id=v - 5)
    hf = {k: x for k, x in v4.to_hf_config(cfg).items() if k not in ("model_type", "architectures", "torch_dtype")}
    m = transformers.Gemma4ForConditionalGeneration(transformers.Gemma4Config(**hf)).eval()
    m.config._attn_implementation = "eager"
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1 + 0.3 * r if "vision" in name else 0.5 * r)
            elif "embed_tokens" in name:
                p.copy_(0.5 * r)
            else:
                p.copy_(0.3 * r)
    set_buffers(m, g, clip=1.2)
    m.save_pretrained(folder / "hf")
    (folder / "tok.model").rename(folder / "hf" / "tokenizer.model")
    return m, CausalLM.from_preset(str(folder / "hf")), tok


def _grid_image(rng: np.random.RandomState, cfg: v4.Gemma4VisionConfig, w: int, h: int
                ) -> tuple[np.ndarray, np.ndarray, int]:
    """One processor-shaped image row: ``w`` x ``h`` real patches, the rest of the slots padding."""
    P, c = cfg.max_patches, cfg.vision.patch_pixels
    px = np.zeros((P, c), np.float32)
    pos = np.full((P, 2), -1, np.int64)
    px[:w * h] = rng.uniform(0, 1, (w * h, c))
    gx, gy = np.meshgrid(np.arange(w), np.arange(h), indexing="xy")
    pos[:w * h] = np.stack([gx, gy], -1).reshape(-1, 2)
    return px, pos, (w // 2) * (h // 2)


def _two_image_rows(cfg: v4.Gemma4VisionConfig, v: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two rows, each with two image blocks inside text: a 6 x 4-patch image (6 soft tokens, 40 padding
    patches) and an 8 x 8 one (16 soft tokens, longer than the window), in the other order on row 2."""
    rng = np.random.RandomState(0)
    imgs = [_grid_image(rng, cfg, 6, 4), _grid_image(rng, cfg, 8, 8), _grid_image(rng, cfg, 8, 8),
            _grid_image(rng, cfg, 6, 4)]

    def block(n: int) -> list[int]:
        return [cfg.boi_token_id] + [cfg.image_token_id] * n + [cfg.eoi_token_id]

    top = v - 5
    rows = [[2, *rng.randint(8, top, 5), *block(a[2]), *rng.randint(8, top, 7), *block(b[2]), *rng.randint(8, top, 6)]
            for a, b in (imgs[:2], imgs[2:])]
    return (np.array(rows, np.int32), np.stack([i[0] for i in imgs]), np.stack([i[1] for i in imgs]))


def _hf_logits(m, tokens, px, pos, types) -> np.ndarray:
    kw = {} if types is None else {"mm_token_type_ids": torch.tensor(types, dtype=torch.long)}
    with torch.no_grad():
        return m(input_ids=torch.tensor(tokens, dtype=torch.long), pixel_values=torch.tensor(px),
                 image_position_ids=torch.tensor(pos), **kw).logits.numpy()


def _far(got, want) -> float:
    return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


def test_two_images_per_row_match_transformers(setup):
    m, lm, tok = setup
    cfg = lm.config
    tokens, px, pos = _two_image_rows(cfg, tok.vocab_size)
    types = (tokens == cfg.image_token_id).astype(np.int32)
    want = _hf_logits(m, tokens, px, pos, types)
    assert _far(lm.logits(tokens, pixel_values=px, image_position_ids=pos, mm_token_type_ids=types), want) <= TOL
    # without mm_token_type_ids the soft tokens are found by their id, as the processor marks them
    assert (np.asarray(v4._types(cfg, jnp.asarray(tokens), None, *tokens.shape)) == types).all()
    # zeros: all causal, as transformers without mm_token_type_ids
    causal = _hf_logits(m, tokens, px, pos, None)
    assert _far(lm.logits(tokens, pixel_values=px, image_position_ids=pos, mm_token_type_ids=0 * types), causal) \
        <= TOL
    with pytest.raises(ValueError, match="44 image soft tokens .* fill 22"):
        lm.logits(tokens, pixel_values=px[:2], image_position_ids=pos[:2])
    with pytest.raises(ValueError, match="go together"):
        lm.logits(tokens, pixel_values=px)
    with pytest.raises(ValueError, match=r"\[images, patches, 48\]"):
        lm.logits(tokens, pixel_values=px[..., :47], image_position_ids=pos)


def test_image_features_match_transformers_and_each_tower_feature_matters(setup, monkeypatch):
    """The tower + projection's soft tokens equal transformers' ``get_image_features``; every tower feature,
    done otherwise, moves them by more than 100 times the tolerance."""
    m, lm, tok = setup
    cfg, params = lm.config, lm.params
    _, px, pos = _two_image_rows(cfg, tok.vocab_size)
    with torch.no_grad():
        out = m.model.get_image_features(torch.tensor(px), torch.tensor(pos)).pooler_output
    want = torch.cat(list(out)).numpy()
    scale = np.abs(want).max()

    def soft_tokens(params=params, cfg=cfg, **patches) -> np.ndarray:
        with monkeypatch.context() as mp:
            for name, fn in patches.items():  # the tower's functions, or the family's image_features
                mp.setattr(v4 if name == "image_features" else vit, name, fn)
            with jax.disable_jit():
                feats, real = v4.image_features(params, cfg, px, pos, jnp.float32)
        return np.asarray(feats)[np.asarray(real)]

    assert np.abs(soft_tokens() - want).max() <= TOL * scale
    norm, pool, tables, attend = vit.rms_norm, vit.pool_by_position, vit.rope_tables, vit.dot_attention
    flat = {k: x for k, x in lm.weights()}

    def edit(fn) -> dict:
        tree = jax.tree.map(lambda x: x, params)
        fn(tree["vision_encoder"])
        return tree

    variants = {
        "norms 1 + w": soft_tokens(rms_norm=lambda x, s, e: norm(x, None if s is None else 1 + s, e)),
        "pool column-major": soft_tokens(pool_by_position=lambda h, p, k, n: pool(h, p[..., ::-1], k, n)),
        "no sqrt(width)": soft_tokens(pool_by_position=lambda h, p, k, n: (
            lambda o: (o[0] / np.sqrt(cfg.vision.width), o[1]))(pool(h, p, k, n))),
        "rope halves swapped": soft_tokens(rope_tables=lambda c, p: tables(c, p)[::-1]),
        "rope by columns only": soft_tokens(rope_tables=lambda c, p: (tables(c, p)[0],) * 2),
        "padding attended": soft_tokens(dot_attention=lambda q, k, v, mask: attend(q, k, v, jnp.ones_like(mask))),
        "no clipping": soft_tokens(params=edit(lambda t: t["encoder_block"].pop("clip"))),
        "no standardize": soft_tokens(cfg=cfg.replace(vision=dataclasses.replace(cfg.vision, standardize=False))),
        "position tables swapped": soft_tokens(params=edit(lambda t: t["position_embedding"].__setitem__(
            "embeddings", flat["vision_encoder/position_embedding/embeddings"][::-1]))),
        "no projection norm": soft_tokens(image_features=lambda p, c, x, q, d: (
            lambda f: (f[0] @ p[v4.PROJECTOR]["input_projection"]["kernel"], f[1]))(vit.encode(p, c.vision, x, q, d))),
    }
    for what, got in variants.items():
        assert got.shape == want.shape and np.abs(got - want).max() > 100 * TOL * scale, what


def test_each_decoder_feature_switched_off_moves_logits_far(setup, monkeypatch):
    """So the parity test can fail: the attention over image blocks, the soft tokens' scale and their
    per-layer inputs, each done otherwise, move the logits by more than 100 times the tolerance. One
    compilation serves every variant: the masks, the features' scale and whether soft tokens keep their id in
    the per-layer inputs are arguments of the traced model (patched in while tracing)."""
    m, lm, tok = setup
    cfg = lm.config
    tokens, px, pos = _two_image_rows(cfg, tok.vocab_size)
    types = (tokens == cfg.image_token_id).astype(np.int32)
    want = _hf_logits(m, tokens, px, pos, types)
    feats, media = v4.image_features, v4._media

    @jax.jit
    def logits(masks, feat_scale, keep_image_ids):
        with monkeypatch.context() as mp:
            mp.setattr(v4, "block_mask", lambda c, ltype, *a, **kw: masks[ltype])
            mp.setattr(v4, "image_features", lambda *a: (lambda f: (f[0] * feat_scale, f[1]))(feats(*a)))
            mp.setattr(v4, "_media", lambda c, t: media(c, t) & ~(keep_image_ids & (t == c.image_token_id)))
            return v4.forward(lm.params, cfg, jnp.asarray(tokens), px, pos)

    idx = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)

    def masks(blocks, local=None, glob=None) -> dict:
        return {"local": v4.block_mask(cfg, "local", idx, blocks) if local is None else local,
                "global": v4.block_mask(cfg, "global", idx, blocks) if glob is None else glob}

    blocks = v4.image_blocks(cfg, jnp.asarray(types))
    same = (blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0)
    true = masks(blocks)
    assert _far(logits(true, 1.0, False), want) <= TOL
    variants = {
        "causal": (masks(blocks * 0 - 1), 1.0, False),
        "one block": (masks(jnp.where(types == 1, 0, -1)), 1.0, False),
        "global layers bidirectional": (masks(blocks, glob=true["global"] | same), 1.0, False),
        "no window in blocks": (masks(blocks, local=true["local"] | same), 1.0, False),
        "scaled features": (true, float(np.sqrt(cfg.text.hidden_size)), False),
        "image ids in the per-layer inputs": (true, 1.0, True),
    }
    for what, args in variants.items():
        assert _far(logits(*args), want) > 100 * TOL, what


def test_generate_with_two_images_matches_transformers(setup):
    """The engine's prefill (image blocks, ring caches of the window, KV-sharing layers at the last position)
    + decode steps equal transformers' greedy generate over a prompt with two images."""
    m, lm, tok = setup
    cfg = lm.config
    tokens, px, pos = _two_image_rows(cfg, tok.vocab_size)
    prompt = tokens[0]
    types = (prompt == cfg.image_token_id).astype(np.int64)[None]
    with torch.no_grad():
        want = m.generate(torch.tensor(prompt[None], dtype=torch.long), pixel_values=torch.tensor(px[:2]),
                          image_position_ids=torch.tensor(pos[:2]), mm_token_type_ids=torch.tensor(types),
                          attention_mask=torch.ones_like(torch.tensor(types)), max_new_tokens=6, do_sample=False,
                          pad_token_id=0)[0].numpy()
    got = lm.generate(prompt, pixel_values=px[:2], image_position_ids=pos[:2], max_new_tokens=6, stop_token_ids=[])
    assert got.tolist() == want.tolist()


def test_preprocessing_matches_transformers():
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    cfg = v4.tiny_config()
    proc = Gemma4ImageProcessorPil(patch_size=4, max_soft_tokens=70, pooling_kernel_size=2)
    for h, w in ((40, 52), (30, 90), (64, 64), (7, 200)):
        img = _image(2, h, w)
        want = proc(images=[img], return_tensors="np")
        px, p, n = v4.preprocess_image(img, cfg, soft_tokens=70)
        assert px.shape == want["pixel_values"][0].shape and np.abs(px - want["pixel_values"][0]).max() < 1e-5
        assert (p == want["image_position_ids"][0]).all() and n == int(want["num_soft_tokens_per_image"][0])
        assert vit.soft_token_counts(cfg.vision, p[None]) == [n]


def test_prompts_images_and_chat(setup):
    """Text + images -> the processor's layout; generate and chat (image parts, data: URIs) through the engine."""
    from PIL import Image

    m, lm, tok = setup
    cfg = lm.config
    got, inputs = v4.encode_prompt(cfg, tok, "describe", [_image(0)])
    # a 40 x 52 image within 16 soft tokens of 8 px squares: resized to 24 x 32, 3 x 4 soft tokens
    assert got == [2, cfg.boi_token_id, *[cfg.image_token_id] * 12, cfg.eoi_token_id, *tok.encode("describe",
                                                                                                  add_bos=False)]
    assert inputs["pixel_values"].shape == (1, 64, 48) and inputs["image_position_ids"].shape == (1, 64, 2)
    assert inputs["mm_token_type_ids"].tolist() == [int(t == cfg.image_token_id) for t in got]
    two, two_inputs = v4.encode_prompt(cfg, tok, "a <|image|> b <|image|>", [_image(0), _image(1, 60, 20)])
    assert two.count(cfg.boi_token_id) == 2 and two_inputs["pixel_values"].shape[0] == 2
    with pytest.raises(ValueError, match="placeholders"):
        v4.encode_prompt(cfg, tok, "<|image|>", [_image(0), _image(1)])

    buf = io.BytesIO()
    Image.fromarray(_image(0)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    for part in ({"type": "image", "image": _image(0)}, {"type": "image_url", "image_url": {"url": url}}):
        msgs = [{"role": "user", "content": [part, {"type": "text", "text": " describe "}]}]
        reply = lm.chat(msgs, max_new_tokens=4)
        prompt = tok.apply_chat_template(msgs, family="gemma4")
        assert prompt == "<bos><|turn>user\n<|image|>describe<turn|>\n<|turn>model\n"
        full = lm.generate(prompt, images=[_image(0)], max_new_tokens=4)
        assert full.startswith(prompt) and reply == full[len(prompt):].strip()
    ids, inputs = v4.encode_prompt(cfg, tok, prompt, [_image(0)])
    ids_out = lm.generate(ids, max_new_tokens=4, **inputs)
    assert full == prompt + tok.decode([t for t in ids_out[len(ids):] if t not in tok.stop_ids])


def test_configs_and_routing(tmp_path):
    import transformers

    cfg = v4.tiny_config()
    hf = v4.to_hf_config(cfg)
    back = v4.from_hf_config(hf)
    assert v4.from_hf_config(v4.to_hf_config(back)) == back
    assert back.vision == cfg.vision and back.soft_tokens == 16 and back.bidirectional
    assert (back.image_token_id, back.boi_token_id, back.eoi_token_id) == (511, 509, 510)
    assert v4.Gemma4VisionConfig.from_dict(cfg.to_dict()) == cfg
    tf = transformers.Gemma4Config(**{k: x for k, x in hf.items() if k not in ("model_type", "architectures",
                                                                                "torch_dtype")})
    assert tf.vision_config.pooling_kernel_size == 2 and tf.text_config.use_bidirectional_attention == "vision"
    assert base.for_hf_config(hf).name == "gemma4_vision"
    assert base.for_hf_config({**hf, "vision_config": None}).name == "gemma4"  # the text decoder alone
    assert base.for_hf_config(hf["text_config"] | {"model_type": "gemma4_text"}).name == "gemma4"
    with pytest.raises(ValueError, match="not causal"):
        v4.from_hf_config({**hf, "text_config": {**hf["text_config"], "use_bidirectional_attention": "all"}})
    with pytest.raises(ValueError, match="axial"):
        v4.from_hf_config({**hf, "vision_config": {**hf["vision_config"], "rope_parameters": {"rope_type": "x"}}})
    counts = cfg.param_count()
    assert counts["total"] == sum(s.size for s in v4.param_specs(cfg).values()) and counts["vision"] > 0


def test_family_declares_every_weight_and_exports(setup, tmp_path):
    m, lm, tok = setup
    cfg = lm.config
    specs = v4.param_specs(cfg)
    assert set(specs) == set(v4.hf_table(cfg)) == {p for p, _ in lm.weights()}
    nodes = v4.linear_nodes(cfg)
    assert "local/query" in nodes and "vision_query" in nodes and nodes["local/query"].layers == v4.TEXT_LAYERS
    import transformers

    out = lm.export_hf(tmp_path / "out")
    back = transformers.Gemma4ForConditionalGeneration.from_pretrained(out, attn_implementation="eager",
                                                                       dtype=torch.float32).eval()
    tokens, px, pos = _two_image_rows(cfg, tok.vocab_size)
    assert _far(_hf_logits(back, tokens, px, pos, None), _hf_logits(m, tokens, px, pos, None)) < 1e-6


def test_image_text_lora_fit_trains_the_decoder_only(setup, tmp_path):
    """``lm.fit`` on image + text records (the prompt encoded as ``generate(..., images=)`` does): LoRA on the
    decoder lowers the completion's loss, and the tower and projection stay as they were."""
    import json

    from PIL import Image

    from gemmax.nn.params import flatten

    _, base_lm, _ = setup
    Image.fromarray(_image(3)).save(tmp_path / "p.png")
    rec = {"image": "p.png", "prompt": "describe the picture please", "completion": "a red square on a blue background"}
    (tmp_path / "d.jsonl").write_text(json.dumps(rec) + "\n")
    lm = CausalLM(base_lm.config, base_lm.params, base_lm.tokenizer)
    lm.enable_lora(4, verbose=False)
    hist = lm.fit(str(tmp_path / "d.jsonl"), steps=12, batch_size=1, sequence_length=64, learning_rate=3e-2,
                  weight_decay=0.0, warmup_steps=0, schedule="constant", clip_norm=None, progress=False,
                  save_every=None)
    loss = list(hist.loss)
    assert loss[-1] < 0.8 * loss[0] and all(b < a for a, b in zip(loss, loss[1:], strict=False)), loss
    # the records' pictures reach the model (fit and evaluate share the data pipeline): another picture under
    # the same text scores differently
    Image.fromarray(_image(7, h=52, w=40)).save(tmp_path / "q.png")
    (tmp_path / "e.jsonl").write_text(json.dumps({**rec, "image": "q.png"}) + "\n")
    kw = dict(batch_size=1, sequence_length=64)
    seen, other = lm.evaluate(str(tmp_path / "d.jsonl"), **kw), lm.evaluate(str(tmp_path / "e.jsonl"), **kw)
    assert abs(other["loss"] - seen["loss"]) > 1e-2, (seen, other)
    before, after = flatten(base_lm.params), flatten(lm.params)
    adapters = [p for p in after if p.endswith(("lora_a", "lora_b"))]
    assert adapters and not any(p.startswith(("vision", "embed_vision")) for p in adapters), adapters[:4]
    for p, w in before.items():  # every base weight, the tower's included, is where it was
        np.testing.assert_array_equal(np.asarray(after[p]), np.asarray(w))


#: The ``vision_config`` of the published config.json files: the on-device models' (E2B, E4B) and the large
#: models' (26B-A4B, 31B). Their RoPE is written ``"default"``, which transformers reads as the tower's axial one.
PUBLISHED_TOWERS = {
    "on_device": {"model_type": "gemma4_vision", "hidden_size": 768, "intermediate_size": 3072,
                  "num_hidden_layers": 16, "num_attention_heads": 12, "num_key_value_heads": 12, "head_dim": 64,
                  "patch_size": 16, "pooling_kernel_size": 3, "position_embedding_size": 10240,
                  "use_clipped_linears": True, "standardize": False},
    "large": {"model_type": "gemma4_vision", "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
              "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 72,
              "hidden_activation": "gelu_pytorch_tanh", "patch_size": 16, "pooling_kernel_size": 3,
              "position_embedding_size": 10240, "rms_norm_eps": 1e-6, "default_output_length": 280,
              "rope_parameters": {"rope_theta": 100.0, "rope_type": "default"}, "standardize": True,
              "use_clipped_linears": False},
}


@pytest.mark.parametrize("size", ["e2b", "26b_a4b"])
def test_presets_equal_published_configs(size):
    from test_gemma4 import _published_config

    text = _published_config("gemma4_" + size)
    on_device = size.startswith("e")
    if not on_device:
        text["use_bidirectional_attention"] = "vision"
    hf = {"model_type": "gemma4", "architectures": ["Gemma4ForConditionalGeneration"], "text_config": text,
          "vision_config": PUBLISHED_TOWERS["on_device" if on_device else "large"], "eos_token_id": [1, 106],
          "image_token_id": 258880, "boi_token_id": 255999, "eoi_token_id": 258882,
          "vision_soft_tokens_per_image": 280}
    got = v4.from_hf_config(hf)
    for name in (f"gemma4_vision_{size}", f"gemma4_vision_{size}_it"):
        preset = v4.PRESETS[name]
        assert dataclasses.replace(got, name=name, text=got.text.replace(name=name)) == preset, name
        assert base.all_presets()[name][0].name == "gemma4_vision"
    assert v4.PRESET_REPOS[f"gemma4_vision_{size}_it"].lower() == f"google/gemma-4-{size.replace('_', '-')}-it"
    assert got.bidirectional is not on_device and got.vision.clipped is on_device


#: Stored scalars transformers keeps as buffers (clip bounds, standardization, per-layer output scale): gemmax
#: counts them as weights.
_COUNTED_BUFFERS = ("input_min", "input_max", "output_min", "output_max", "std_bias", "std_scale", "layer_scalar")


@pytest.mark.parametrize("name", ["gemma4_vision_e2b", "gemma4_vision_31b"])
def test_preset_counts_equal_transformers_model(name):
    """Each tower's preset, built by transformers from gemmax's config.json (on the meta device: shapes only),
    has the parameter count gemmax declares, tower and whole model; the towers are the model card's ~150M
    (on-device) and ~550M (large) plus their position tables and projection."""
    import transformers

    cfg = v4.PRESETS[name]
    hf = v4.to_hf_config(cfg)
    tc = transformers.Gemma4Config(**{k: x for k, x in hf.items() if k not in ("model_type", "architectures",
                                                                                "torch_dtype")})
    with torch.device("meta"):
        model = transformers.Gemma4ForConditionalGeneration(tc)
    sizes = {n: t.numel() for n, t in model.named_parameters()}
    sizes.update({n: t.numel() for n, t in model.named_buffers() if n.endswith(_COUNTED_BUFFERS)})
    counts = cfg.param_count()
    assert counts["total"] == sum(sizes.values())
    assert counts["vision"] == sum(s for n, s in sizes.items() if "vision" in n)
    tower = counts["vision"] - 2 * cfg.vision.position_table * cfg.vision.width \
        - cfg.vision.width * cfg.text.hidden_size
    assert round(tower / 5e7) == (3 if cfg.vision.clipped else 11), tower  # ~150M / ~550M


def test_cli_info_and_shard_plan_of_a_vision_preset(capsys):
    from gemmax.cli import main

    assert main(["info", "gemma4_vision_31b"]) == 0
    assert f"{v4.PRESETS['gemma4_vision_31b'].param_count()['total']:,}" in capsys.readouterr().out
    assert main(["shard-plan", "gemma4_vision_26b_a4b", "--mesh", "2x4", "--fsdp", "--no-optimizer"]) == 0
    out = capsys.readouterr().out
    for row in ("vision_encoder/encoder_block/mlp/gate/kernel", "multi_modal_projector/input_projection/kernel",
                "decoder_block/local/experts/gate_up/kernel"):
        assert row in out, row
