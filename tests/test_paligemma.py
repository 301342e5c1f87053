"""PaliGemma 1 (Gemma decoder) and 2 (Gemma 2 decoder) against transformers on tiny random checkpoints with
a fixed synthetic image; prefix-LM masking, preprocessing and detection parsing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gemmax.io.hf import CheckpointError
from gemmax.models import paligemma as pg

IMG_TOKEN = 299


def _hf_model(text: str, seed: int = 0):
    import transformers

    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
              patch_size=7, vision_use_head=False)
    tc = dict(model_type=text, vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=12)
    if text == "gemma2":
        tc.update(sliding_window=8, query_pre_attn_scalar=12, attn_logit_softcapping=50.0,
                  final_logit_softcapping=30.0)
    c = transformers.PaliGemmaConfig(vision_config=vc, text_config=tc, image_token_id=IMG_TOKEN, projection_dim=48)
    torch.manual_seed(seed)
    m = transformers.PaliGemmaForConditionalGeneration(c)
    text_scale = 0.4 if text == "gemma" else 0.1
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "layernorm" in name.lower() and "vision" not in name or name.endswith("norm.weight"):
                p.copy_(torch.randn_like(p) * 0.5)
            elif "vision" in name and "layer_norm" in name and name.endswith("weight"):
                p.copy_(1 + torch.randn_like(p) * 0.3)
            else:  # large enough that greedy decoding does not collapse onto one token
                p.copy_(torch.randn_like(p) * (0.15 if "vision" in name else text_scale))
    return m.eval()


def _image(seed: int = 0) -> np.ndarray:
    """A fixed 40x52 RGB picture (gradient + noise): resized to 28 by the preprocessing."""
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:40, 0:52]
    img = np.stack([x * 4, y * 5, (x + y) * 2], -1) + rng.randint(0, 40, (40, 52, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module", params=["gemma", "gemma2"])
def checkpoint(request, tmp_path_factory):
    m = _hf_model(request.param)
    folder = tmp_path_factory.mktemp("pg_" + request.param)
    m.save_pretrained(folder, safe_serialization=True)
    return m, pg.PaliGemma.from_preset(folder)


def test_logits_match_transformers(checkpoint):
    m, lm = checkpoint
    cfg = lm.config
    assert cfg.num_image_tokens == 16 and cfg.image_token_id == IMG_TOKEN
    px = lm.pixels([_image(0), _image(1)])
    prompt = np.random.RandomState(0).randint(3, 250, (2, 6))
    ids = np.array([pg.build_input_ids(cfg, list(p)) for p in prompt])
    suffix = np.random.RandomState(1).randint(3, 250, (2, 5))
    ids = np.concatenate([ids, suffix], 1)  # 16 image + bos + 6 + \n + 5 = 29 > window 8
    types = np.concatenate([np.zeros((2, 24), int), np.ones((2, 5), int)], 1)
    pv = torch.tensor(px.transpose(0, 3, 1, 2))
    ref = m(input_ids=torch.tensor(ids), pixel_values=pv, token_type_ids=torch.tensor(types)).logits
    got = lm.logits(ids, px, types)
    ref = ref.detach().numpy()
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    # the prefix really is bidirectional: changing the last prompt token changes the first image token's logits
    ids2 = ids.copy()
    ids2[:, 22] = 7
    assert np.abs(lm.logits(ids2, px, types)[:, 0] - got[:, 0]).max() > 1e-4
    # ...and the suffix causal: changing the last token leaves earlier suffix positions alone
    ids3 = ids.copy()
    ids3[:, -1] = 9
    np.testing.assert_allclose(lm.logits(ids3, px, types)[:, :-1], got[:, :-1], atol=1e-5)


def test_greedy_generation_matches_transformers(checkpoint):
    m, lm = checkpoint
    cfg = lm.config
    px = lm.pixels([_image(2), _image(3)])
    prompts = [list(r) for r in np.random.RandomState(2).randint(3, 250, (2, 5))]
    ids = np.array([pg.build_input_ids(cfg, p) for p in prompts])
    ref = m.generate(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px.transpose(0, 3, 1, 2)),
                     token_type_ids=torch.zeros(ids.shape, dtype=torch.long), max_new_tokens=12,
                     do_sample=False).numpy()[:, ids.shape[1]:]
    got = lm.generate(px, prompts, max_new_tokens=12)
    for g, r in zip(got, ref, strict=True):
        r = list(r)
        r = r[:r.index(1)] if 1 in r else r  # gemmax returns the answer up to the end token
        assert list(g) == r


def test_detection_parsing_and_prompts():
    text = "<loc0256><loc0128><loc0768><loc0512> cat ; <loc0000><loc0000><loc1023><loc1023> big dog"
    dets = pg.parse_detections(text, width=640, height=480)
    assert [d["label"] for d in dets] == ["cat", "big dog"]
    assert dets[0]["box"] == pytest.approx((80.0, 120.0, 320.0, 360.0))
    assert dets[1]["box"] == pytest.approx((0.0, 0.0, 639.375, 479.53125))
    assert pg.parse_detections("no boxes here", 10, 10) == []
    assert pg.task_prompt("caption") == "caption en"
    assert pg.task_prompt("answer", "what is this?", "fr") == "answer fr what is this?"
    assert pg.task_prompt("detect", "cat ; dog") == "detect cat ; dog"


def test_preprocessing_and_presets():
    x = pg.preprocess_image(_image(), 28)
    assert x.shape == (28, 28, 3) and x.dtype == np.float32 and -1.0 <= x.min() and x.max() <= 1.0
    flat = pg.preprocess_image(np.full((10, 10, 3), 255, np.uint8), 224)
    np.testing.assert_allclose(flat, 1.0)
    sizes = {n: c.param_count()["total"] for n, c in pg.PRESETS.items()}
    assert 2.9e9 < sizes["paligemma_3b_pt_224"] < 2.95e9
    assert 3.0e9 < sizes["paligemma2_3b_pt_224"] < 3.05e9
    assert pg.PRESETS["paligemma_3b_pt_448"].num_image_tokens == 1024
    assert pg.PRESETS["paligemma2_10b_pt_896"].num_image_tokens == 4096
    assert pg.PRESETS["paligemma2_3b_pt_224"].text.final_logit_softcap == 30.0


def test_summary_and_missing_tensor(checkpoint, tmp_path):
    m, lm = checkpoint
    text = lm.summary(print_fn=None)
    assert "vision_encoder/encoder_block/attention/query/kernel" in text
    assert "decoder_block/attention/query/kernel" in text
    sd = {k: v for k, v in m.state_dict().items() if "encoder.layers.1.mlp.fc2.weight" not in k}
    m.save_pretrained(tmp_path / "bad", state_dict=sd, safe_serialization=True)
    with pytest.raises(CheckpointError, match=r"missing tensor .*vision_tower\.encoder\.layers\.1\.mlp\.fc2\.weight"):
        pg.PaliGemma.from_preset(tmp_path / "bad")
