"""PaliGemma 1 (Gemma decoder) and 2 (Gemma 2 decoder) as a registered family, through the one ``CausalLM``.

Against transformers on tiny random checkpoints with fixed synthetic images: logits (prefix-LM masking,
several images per prompt), greedy generation through the engine, loading every checkpoint layout (the
published Hub one, transformers 5's save and module names), export. The family's own functions are checked
directly too (prefill + decode against the full forward, declarations). Then a tiny model with a real
SentencePiece tokenizer is LoRA-fine-tuned (decoder only, suffix-only loss) to caption one fixed picture
"a red square", which the export, the int8 model and ``gemmax generate --image`` must all still say.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
import torch
from safetensors.numpy import load_file, save_file

from gemmax.api import CausalLM
from gemmax.io.hf import CheckpointError
from gemmax.io.tokenizer import Tokenizer
from gemmax.models import base
from gemmax.models import paligemma as pg
from gemmax.nn import lora
from gemmax.nn.params import flatten
from gemmax.train.losses import lm_loss

IMG_TOKEN = 299
FAMILY = pg.FAMILY


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
    m.save_pretrained(folder, safe_serialization=True)  # transformers 5: language_model.model.*, vision_tower.*
    return m, CausalLM.from_preset(str(folder)), folder


def _prefix_suffix_batch(cfg):
    px = pg.pixel_values(cfg, [_image(0), _image(1)])
    prompt = np.random.RandomState(0).randint(3, 250, (2, 6))
    ids = np.array([pg.build_input_ids(cfg, list(p)) for p in prompt])
    suffix = np.random.RandomState(1).randint(3, 250, (2, 5))
    ids = np.concatenate([ids, suffix], 1)  # 16 image + bos + 6 + \n + 5 = 29 > window 8
    types = np.concatenate([np.zeros((2, 24), int), np.ones((2, 5), int)], 1)
    return ids, px, types


def _torch_logits(m, ids, px, types) -> np.ndarray:
    with torch.no_grad():
        return m(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px),
                 token_type_ids=torch.tensor(types)).logits.numpy()


def test_logits_match_transformers(checkpoint):
    m, lm, _ = checkpoint
    cfg = lm.config
    assert isinstance(lm, CausalLM) and lm.family is FAMILY
    assert cfg.num_image_tokens == 16 and cfg.image_token_id == IMG_TOKEN
    ids, px, types = _prefix_suffix_batch(cfg)
    assert px.shape == (2, 3, 28, 28)  # transformers' pixel_values layout
    ref = _torch_logits(m, ids, px, types)
    got = lm.logits(ids, pixel_values=px, token_type_ids=types)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    # the prefix really is bidirectional: changing the last prompt token changes the first image token's logits
    ids2 = ids.copy()
    ids2[:, 22] = 7
    assert np.abs(lm.logits(ids2, pixel_values=px, token_type_ids=types)[:, 0] - got[:, 0]).max() > 1e-4
    # ...and the suffix causal: changing the last token leaves earlier suffix positions alone
    ids3 = ids.copy()
    ids3[:, -1] = 9
    np.testing.assert_allclose(lm.logits(ids3, pixel_values=px, token_type_ids=types)[:, :-1], got[:, :-1],
                               atol=1e-5)
    # two images in one prompt: one pixel_values row per image, in order of appearance
    two = np.array([pg.build_input_ids(cfg, [5, 6, 7], num_images=2)])
    t2 = np.zeros_like(two)
    ref2 = _torch_logits(m, two, px, t2)
    got2 = lm.logits(two, pixel_values=px, token_type_ids=t2)
    assert np.abs(got2 - ref2).max() <= 1e-4 * np.abs(ref2).max()
    assert np.abs(got2 - lm.logits(two, pixel_values=px[::-1].copy(), token_type_ids=t2)).max() > 1e-3
    # text only (no inputs): a plain causal LM (what lm.fit trains; transformers 5's PaliGemma forward without
    # token types attends bidirectionally when its mask is skipped, its generate causally)
    text = ids[:, 16:]
    plain = lm.logits(text)
    np.testing.assert_allclose(plain, lm.logits(text, token_type_ids=np.ones_like(text)), atol=1e-6)
    text2 = text.copy()
    text2[:, -1] = 9
    np.testing.assert_allclose(lm.logits(text2)[:, :-1], plain[:, :-1], atol=1e-5)


def test_every_checkpoint_layout_loads(checkpoint, tmp_path):
    """The published Hub layout (vision_tower.vision_model.*), transformers 5's save (vision_tower.*) and its
    module names (model.language_model.* ..., lm_head.weight) all load to the same model."""
    import transformers

    m, lm, folder = checkpoint
    ids, px, types = _prefix_suffix_batch(lm.config)
    want = lm.logits(ids, pixel_values=px, token_type_ids=types)
    sd = load_file(str(folder / "model.safetensors"))
    assert "vision_tower.embeddings.patch_embedding.weight" in sd  # what transformers 5 writes

    def renamed(name: str, fn) -> str:
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text((folder / "config.json").read_text())
        out = {}
        for k, v in sd.items():
            out.update(fn(k, v))
        save_file(out, str(d / "model.safetensors"), metadata={"format": "pt"})
        return str(d)

    published = renamed("published", lambda k, v: {
        "vision_tower.vision_model." + k[len("vision_tower."):] if k.startswith("vision_tower.") else k: v})
    def to_modules(k: str, v: np.ndarray) -> dict[str, np.ndarray]:
        if k.startswith("language_model.model."):
            out = {"model.language_model." + k[len("language_model.model."):]: v}
            return {**out, "lm_head.weight": v} if k.endswith("embed_tokens.weight") else out
        return {"model." + k: v}

    modules = renamed("modules", to_modules)
    assert "model.vision_tower.embeddings.patch_embedding.weight" in load_file(modules + "/model.safetensors")
    for handle in (published, modules):
        got = CausalLM.from_preset(handle).logits(ids, pixel_values=px, token_type_ids=types)
        np.testing.assert_array_equal(got, want)
    # the published layout is what transformers reads too
    ref = transformers.PaliGemmaForConditionalGeneration.from_pretrained(published).eval()
    assert np.abs(_torch_logits(ref, ids, px, types) - want).max() <= 1e-4 * np.abs(want).max()


def test_greedy_generation_matches_transformers(checkpoint):
    m, lm, _ = checkpoint
    cfg = lm.config
    px = pg.pixel_values(cfg, [_image(2), _image(3)])
    prompts = [list(r) for r in np.random.RandomState(2).randint(3, 250, (2, 5))]
    ids = np.array([pg.build_input_ids(cfg, p) for p in prompts])
    ref = m.generate(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px),
                     token_type_ids=torch.zeros(ids.shape, dtype=torch.long), max_new_tokens=12,
                     do_sample=False).numpy()[:, ids.shape[1]:]
    for i in range(2):
        got = np.asarray(lm.generate(ids[i], max_new_tokens=12, pixel_values=px[i:i + 1],
                                     token_type_ids=np.zeros(ids.shape[1], np.int32)))
        assert list(got[:ids.shape[1]]) == list(ids[i])
        r = list(ref[i])
        r = r[:r.index(1) + 1] if 1 in r else r  # gemmax stops at the end token (kept, as transformers)
        assert list(got[ids.shape[1]:]) == r


def test_prefill_and_decode_match_forward(checkpoint):
    """The family's generation functions directly (compiled, as the engine runs them): a right-padded prompt
    with a suffix already in it (unpadded token_type_ids), then decode steps in another slot of a bigger cache,
    against the forward."""
    _, lm, _ = checkpoint
    cfg, params = lm.config, lm.params
    fwd = jax.jit(lambda p, t, **kw: FAMILY.logits_from_hidden(p, cfg, FAMILY.forward_hidden(p, cfg, t, **kw)))
    pre = jax.jit(FAMILY.prefill, static_argnums=(1, 4, 5))
    step_fn = jax.jit(FAMILY.decode_step, static_argnums=(1, 5))
    ids, px, types = _prefix_suffix_batch(cfg)
    full = np.asarray(fwd(params, jnp.asarray(ids[:1]), pixel_values=px[:1], token_type_ids=types[:1]))[0]
    scale = np.abs(full).max()
    n = 26  # the prefix and two suffix tokens in the prompt, padded to 32
    tokens = jnp.asarray(np.pad(ids[:1, :n], ((0, 0), (0, 32 - n))))
    for backend in FAMILY.backends:
        logits, rows = pre(params, cfg, tokens, jnp.asarray([n]), 64, backend, pixel_values=px[:1],
                           token_type_ids=types[0, :n])
        assert logits.shape == (1, cfg.vocab_size) and logits.dtype == jnp.float32
        assert np.abs(np.asarray(logits)[0] - full[n - 1]).max() <= 1e-5 * scale
        cache = FAMILY.insert(FAMILY.init_cache(cfg, 3, 64, jnp.float32), rows, jnp.asarray([2]))
        for p in range(n, ids.shape[1]):
            step, cache = step_fn(params, cfg, cache, jnp.asarray([3, 4, ids[0, p]]), jnp.asarray([0, 0, p]),
                                  backend)
            assert np.abs(np.asarray(step)[2] - full[p]).max() <= 1e-4 * scale, (backend, p)
    # text only, no inputs: the whole prompt is the prefix (bidirectional), as the engine's image prompts
    text = jnp.asarray(np.random.RandomState(5).randint(3, 250, (1, 20)))
    want = np.asarray(fwd(params, text, token_type_ids=np.zeros((1, 20), np.int32)))[0, -1]
    got, _ = pre(params, cfg, text, jnp.asarray([13]), 64, "xla")
    got_all, _ = pre(params, cfg, text, jnp.asarray([20]), 64, "xla")
    assert np.abs(np.asarray(got_all)[0] - want).max() <= 1e-5 * np.abs(want).max()
    assert np.abs(np.asarray(got)[0] - np.asarray(got_all)[0]).max() > 1e-4  # the length is respected
    with pytest.raises(TypeError):
        FAMILY.forward_hidden(params, cfg, jnp.asarray(ids), images=px)  # unknown inputs are rejected


def test_family_declarations():
    cfg = pg.tiny_config("gemma2")
    assert base.for_model_type("paligemma") is FAMILY and base.for_config(cfg) is FAMILY
    assert FAMILY.extra_inputs == ("pixel_values", "token_type_ids") and FAMILY.gguf_arch(cfg) is None
    assert FAMILY.hf_architecture == "PaliGemmaForConditionalGeneration"
    specs = FAMILY.param_specs(cfg)
    params = FAMILY.init_params(cfg, jax.random.key(0))
    flat = flatten(params)
    assert set(flat) == set(specs) and all(flat[p].shape == s.shape for p, s in specs.items())
    for p, s in specs.items():  # logical axes on every weight, the tower included
        assert len(s.axes) == len(s.shape) and all(a is not None for a in s.axes), p
    qk = specs["vision_encoder/encoder_block/attention/query/kernel"]
    assert qk.axes == ("layers", "vision_embed", "heads", "head_dim")
    assert specs["vision_encoder/encoder_block/mlp/fc1/kernel"].axes[-1] == "mlp"
    assert specs["token_embedding/embeddings"].axes == ("vocab", "embed")
    nodes = FAMILY.linear_nodes(cfg)
    assert nodes["query"].path == ("decoder_block", "attention", "query")  # LoRA's defaults: the decoder
    assert nodes["vision_query"].path[0] == "vision_encoder" and nodes["vision_fc1"].hf_module == "mlp.fc1"
    assert nodes["value"].layers == "model.language_model.layers"
    for t, node in nodes.items():
        kernel = flatten(params)["/".join(node.path) + "/kernel"]
        assert node.target == t and kernel.shape[0] == len(node.layer_ids)
    # every table entry round-trips and names the published layout
    table = FAMILY.hf_table(cfg)
    assert set(table) == set(specs)
    names = [n for v in table.values() for n in ([v[0]] if isinstance(v[0], str) else v[0])]
    assert all(n.startswith(("language_model.model.", "vision_tower.vision_model.", "multi_modal_projector."))
               for n in names)
    for p, (n, fwd, inv) in table.items():
        a = np.asarray(flat[p] if isinstance(n, str) else flat[p][0])
        np.testing.assert_array_equal(fwd(inv(a)), a)
    # config: the fields every family exposes, delegated to the decoder, and a dict round trip
    assert (cfg.vocab_size, cfg.bos_token_id, cfg.pad_token_id, cfg.eos_ids) == (300, 2, 0, (1,))
    assert cfg.max_position_embeddings == cfg.text.max_position_embeddings
    assert FAMILY.config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.param_count()["total"] == sum(s.size for s in specs.values())


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
    assert x.shape == (3, 28, 28) and x.dtype == np.float32 and -1.0 <= x.min() and x.max() <= 1.0
    flat = pg.preprocess_image(np.full((10, 10, 3), 255, np.uint8), 224)
    np.testing.assert_allclose(flat, 1.0)
    sizes = {n: c.param_count()["total"] for n, c in pg.PRESETS.items()}
    assert 2.9e9 < sizes["paligemma_3b_pt_224"] < 2.95e9
    assert 3.0e9 < sizes["paligemma2_3b_pt_224"] < 3.05e9
    assert pg.PRESETS["paligemma_3b_pt_448"].num_image_tokens == 1024
    assert pg.PRESETS["paligemma2_10b_pt_896"].num_image_tokens == 4096
    assert pg.PRESETS["paligemma2_3b_pt_224"].text.final_logit_softcap == 30.0
    assert FAMILY.preset_repos["paligemma2_3b_pt_224"] == "google/paligemma2-3b-pt-224"


def test_summary_and_missing_tensor(checkpoint, tmp_path):
    m, lm, _ = checkpoint
    text = lm.summary(print_fn=None)
    assert "vision_encoder/encoder_block/attention/query/kernel" in text
    assert "decoder_block/attention/query/kernel" in text
    sd = {k: v for k, v in m.state_dict().items() if "encoder.layers.1.mlp.fc2.weight" not in k}
    m.save_pretrained(tmp_path / "bad", state_dict=sd, safe_serialization=True)
    with pytest.raises(CheckpointError,
                       match=r"missing tensor vision_tower\.vision_model\.encoder\.layers\.1\.mlp\.fc2\.weight"):
        CausalLM.from_preset(str(tmp_path / "bad"))


# ---- fine-tuning, export, int8 and the command line on a model with a real tokenizer ----------------------

CAPTION = "a red square"


def _picture() -> np.ndarray:
    """A fixed 40x52 RGB picture: a red square on a blue background."""
    img = np.zeros((40, 52, 3), np.uint8)
    img[..., 2] = 200
    img[8:30, 12:40] = (220, 30, 30)
    return img


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("pgtok")
    lines = ["caption en", "a photo of a cat", "a red square on a blue sky", "answer en what is this", "detect cat"]
    (d / "corpus.txt").write_text("\n".join(lines * 30))
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "tok"), vocab_size=90, model_type="bpe",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", hard_vocab_limit=False, num_threads=1, minloglevel=2,
        user_defined_symbols=["\n", "<image>"] + [f"<loc{i:04d}>" for i in range(4)])
    return Tokenizer.from_file(d / "tok.model")


@pytest.fixture(scope="module")
def base_lm(tokenizer):
    cfg = pg.tiny_config("gemma", text_vocab_size=96, image_token_id=tokenizer.piece_to_id("<image>"))
    lm = CausalLM.from_config(cfg, seed=0, tokenizer=tokenizer)
    assert pg.newline_id(cfg, tokenizer) == tokenizer.piece_to_id("\n") != cfg.newline_id  # from the tokenizer
    return lm


def _batch(lm: CausalLM, suffix: str) -> dict[str, np.ndarray]:
    cfg, tok = lm.config, lm.tokenizer
    return pg.training_batch(cfg, [pg.encode_text(cfg, tok, "caption en")], [pg.encode_text(cfg, tok, suffix)],
                             images=[_picture()], newline=pg.newline_id(cfg, tok))


def _suffix_loss(params, cfg, batch):
    """Mean cross-entropy of the suffix tokens through the family's forward and the trainer's loss."""
    hidden = FAMILY.forward_hidden(params, cfg, batch["tokens"][:, :-1], pixel_values=batch["pixel_values"],
                                   token_type_ids=batch["token_type_ids"][:, :-1])
    s = lm_loss(params, cfg, hidden, batch["tokens"][:, 1:], batch["loss_mask"][:, 1:])
    return s.sum_loss / jnp.maximum(s.n_tokens, 1)


@pytest.fixture(scope="module")
def image_data(tmp_path_factory) -> Path:
    """A JSONL of image + caption records (the picture as a PNG next to it), for ``lm.fit``."""
    from PIL import Image

    d = tmp_path_factory.mktemp("pgdata")
    Image.fromarray(_picture()).save(d / "square.png")
    (d / "train.jsonl").write_text(json.dumps({"image": "square.png", "prompt": "caption en",
                                               "completion": CAPTION}) + "\n")
    return d / "train.jsonl"


@pytest.fixture(scope="module")
def tuned(base_lm, image_data):
    """LoRA (decoder only) fine-tuned by ``lm.fit`` for 25 AdamW steps on one image + caption record: the
    data pipeline encodes the prompt with its image, the loss is on the caption only."""
    lm = CausalLM(base_lm.config, base_lm.params, base_lm.tokenizer)
    lm.enable_lora(8, targets=("query", "value", "ffw_gating", "ffw_linear"), verbose=False)
    hist = lm.fit(str(image_data), steps=25, batch_size=1, sequence_length=32, learning_rate=3e-2,
                  weight_decay=0.0, warmup_steps=0, schedule="constant", clip_norm=None, progress=False,
                  save_every=None)
    return lm, list(hist.loss)


def test_image_records_batch_like_training_batch(base_lm, image_data):
    """The pipeline's batch of an image record is PaliGemma's prefix-LM layout (``training_batch``) shifted
    by one: prefix type 0 without loss, caption + EOS type 1 with loss, padding type 1 without loss."""
    from gemmax.train.data import Dataset

    lm = base_lm
    ds = Dataset.from_source(str(image_data), lm.tokenizer, 32, token_inputs=FAMILY.token_inputs,
                             encode_prompt=lambda t, im: FAMILY.encode_prompt(lm.config, lm.tokenizer, t, im))
    assert not ds.pack
    got = next(iter(ds.iterator(2, shuffle=False))).as_dict()
    want = _batch(lm, CAPTION)
    n = want["loss_mask"].sum().astype(int) + int((want["token_type_ids"][0] == 0).sum())
    np.testing.assert_array_equal(got["tokens"][0, :n - 1], want["tokens"][0, :n - 1])
    np.testing.assert_array_equal(got["targets"][0, :n - 1], want["tokens"][0, 1:n])
    np.testing.assert_array_equal(got["loss_mask"][0, :31], want["loss_mask"][0, 1:32])
    np.testing.assert_array_equal(got["token_type_ids"][0], want["token_type_ids"][0, :32])
    assert got["loss_mask"][0].sum() == want["loss_mask"][0].sum()
    np.testing.assert_allclose(got["pixel_values"][:1], want["pixel_values"], atol=1e-6)
    assert got["pixel_values"].shape == (2, 3, 28, 28) and not got["pixel_values"][1].any()  # an empty row
    assert got["token_type_ids"][1].all() and not got["loss_mask"][1].any()


def test_image_record_errors(base_lm, tmp_path):
    from gemmax.train.data import DataError

    lm = CausalLM(base_lm.config, base_lm.params, base_lm.tokenizer)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "missing.png", "prompt": "caption en", "completion": "x"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: image 'missing.png' not found"):
        lm.fit(str(bad), steps=1, batch_size=1, sequence_length=32, progress=False, save_every=None)
    bad.write_text(json.dumps({"image": "missing.png", "text": "a caption"}) + "\n")
    with pytest.raises(DataError, match="prompt/completion format"):
        lm.fit(str(bad), steps=1, batch_size=1, sequence_length=32, progress=False, save_every=None)
    with pytest.raises(DataError, match="an image must be a path, bytes, a PIL image or an array, got list"):
        lm.fit([{"image": [[0]], "prompt": "caption en", "completion": "x"}], steps=1, batch_size=1,
               sequence_length=32, progress=False, save_every=None)
    with pytest.raises(DataError, match=r"<list>:item 0: .* leaves no room for the completion in sequence_length=16"):
        lm.fit([{"image": _picture(), "prompt": "caption en", "completion": "x"}], steps=1, batch_size=1,
               sequence_length=16, progress=False, save_every=None)
    with pytest.raises(DataError, match=r"item 1: 2 images, but <list>:item 0 has 1"):
        lm.fit([{"image": _picture(), "prompt": "caption en", "completion": "x"},
                {"images": [_picture()] * 2, "prompt": "caption en", "completion": "x"}], steps=1,
               batch_size=1, sequence_length=32, progress=False, save_every=None)


def test_lora_trains_only_decoder_adapters(base_lm, tuned):
    lm, losses = tuned
    cfg = lm.config
    batch = _batch(lm, CAPTION)
    n_pre = cfg.num_image_tokens + 1 + len(pg.encode_text(cfg, lm.tokenizer, "caption en")) + 1
    n_suf = len(pg.encode_text(cfg, lm.tokenizer, CAPTION)) + 1  # + <eos>
    assert batch["token_type_ids"][0, :n_pre].sum() == 0 and batch["token_type_ids"][0, n_pre:].all()
    assert batch["loss_mask"][0].sum() == n_suf and batch["loss_mask"][0, n_pre:n_pre + n_suf].all()
    assert batch["pixel_values"].shape == (1, 3, 28, 28)
    trainable, frozen = lora.split_trainable(lm.params)
    paths = sorted(flatten(trainable))
    assert paths and all(p.startswith("decoder_block/") and p.endswith(("lora_a", "lora_b")) for p in paths)
    assert all(float(jnp.abs(v).max()) > 0 for p, v in flatten(trainable).items() if p.endswith("lora_b"))
    # padding is masked out of attention and loss: garbage in the padded slots changes nothing
    loss_fn = jax.jit(lambda p, b: _suffix_loss(p, cfg, b))
    loss = float(loss_fn(lm.params, {k: jnp.asarray(v) for k, v in batch.items()}))
    noisy = dict(batch, tokens=batch["tokens"].copy())
    pad = n_pre + n_suf
    noisy["tokens"][0, pad:] = np.random.RandomState(0).randint(3, 90, noisy["tokens"].shape[1] - pad)
    assert float(loss_fn(lm.params, {k: jnp.asarray(v) for k, v in noisy.items()})) == pytest.approx(loss, rel=1e-5)
    # the 25 AdamW steps learned the caption; the vision tower did not move
    assert losses[-1] < 0.2 * losses[0] and loss < 0.2 * losses[0]
    before = flatten(base_lm.params)
    for p, a in flatten(lm.params).items():
        if p.startswith(("vision_encoder", "multi_modal_projector")):
            np.testing.assert_array_equal(a, before[p])
    # tower nodes are LoRA targets only by their own names
    tower = lora.add_lora(base_lm.params, base_lm.linear_nodes, 2, targets=("vision_query",))
    assert [p for p in flatten(tower) if p.endswith("lora_a")] == [
        "vision_encoder/encoder_block/attention/query/lora_a"]


def test_text_only_fit(base_lm):
    """The one trainer on text records: adapters on the decoder train, the tower stays as it was."""
    lm = CausalLM(base_lm.config, base_lm.params, base_lm.tokenizer)
    lm.enable_lora(4, verbose=False)
    hist = lm.fit(["a red square on a blue sky", "a photo of a cat"] * 4, steps=6, batch_size=2,
                  sequence_length=16, learning_rate=3e-2, progress=False, save_every=None)
    losses = hist.loss
    assert len(losses) == 6 and hist.trainable_params > 0
    assert losses[-1] < losses[0]
    before = flatten(base_lm.params)
    for p, a in flatten(lm.params).items():
        if p.startswith(("vision_encoder", "multi_modal_projector")):
            np.testing.assert_array_equal(a, before[p])


@pytest.fixture(scope="module")
def merged(tuned):
    lm = tuned[0]
    return CausalLM(lm.config, lm.params, lm.tokenizer).merge_lora()


def _caption(lm: CausalLM, max_new: int = 8) -> list[int]:
    ids, inputs = pg.encode_prompt(lm.config, lm.tokenizer, "caption en", [_picture()])
    out = [int(t) for t in np.asarray(lm.generate(ids, max_new_tokens=max_new, **inputs))[len(ids):]]
    return [t for t in out if t not in lm.config.eos_ids]


def test_export_hf_matches_transformers(base_lm, tuned, merged, tmp_path):
    import peft
    import transformers

    out = tuned[0].export_hf(tmp_path / "pg")  # adapters merged on the way out
    names = set(load_file(str(out / "model.safetensors")))
    assert "vision_tower.vision_model.embeddings.patch_embedding.weight" in names  # the published layout
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in names
    assert json.loads((out / "config.json").read_text())["architectures"] == ["PaliGemmaForConditionalGeneration"]
    ref = transformers.PaliGemmaForConditionalGeneration.from_pretrained(out).eval()
    batch = _batch(merged, "a photo of a cat")
    got = merged.logits(batch["tokens"], pixel_values=batch["pixel_values"], token_type_ids=batch["token_type_ids"])
    want = _torch_logits(ref, batch["tokens"].astype(np.int64), batch["pixel_values"],
                         batch["token_type_ids"].astype(np.int64))
    n = int(batch["loss_mask"][0].nonzero()[0][-1]) + 1  # compare the real positions, not the padding
    assert np.abs(got[:, :n] - want[:, :n]).max() <= 1e-4 * np.abs(want).max()
    assert (out / "tokenizer.model").exists()
    back = CausalLM.from_preset(str(out))  # and gemmax reads its own export, and its own format
    np.testing.assert_array_equal(CausalLM.from_preset(str(merged.save(tmp_path / "gx"))).logits(
        batch["tokens"], pixel_values=batch["pixel_values"], token_type_ids=batch["token_type_ids"]), got)
    np.testing.assert_allclose(back.logits(batch["tokens"], pixel_values=batch["pixel_values"],
                                           token_type_ids=batch["token_type_ids"]), got, atol=1e-5)
    # the adapters alone, as PEFT files, on the exported base model: peft names them on the language model
    adapter = tuned[0].export_peft(tmp_path / "adapter")
    keys = list(load_file(str(adapter / "adapter_model.safetensors")))
    assert keys and all(k.startswith("base_model.model.model.language_model.layers.") for k in keys)
    plain = transformers.PaliGemmaForConditionalGeneration.from_pretrained(base_lm.export_hf(tmp_path / "b")).eval()
    with_adapter = peft.PeftModel.from_pretrained(plain, adapter).eval()
    want2 = _torch_logits(with_adapter, batch["tokens"].astype(np.int64), batch["pixel_values"],
                          batch["token_type_ids"].astype(np.int64))
    assert np.abs(got[:, :n] - want2[:, :n]).max() <= 1e-4 * np.abs(want2).max()


def test_peft_adapter_targets_only_the_language_model(tuned, tmp_path):
    import peft
    import transformers

    adapter = tuned[0].export_peft(tmp_path / "adapter")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    hf = transformers.PaliGemmaConfig(**{k: v for k, v in pg.to_hf_config(tuned[0].config).items()
                                         if k not in ("architectures", "model_type")})
    model = peft.get_peft_model(transformers.PaliGemmaForConditionalGeneration(hf),
                                peft.LoraConfig(r=cfg["r"], target_modules=cfg["target_modules"]))
    wrapped = [n for n, _ in model.named_modules() if n.endswith(".lora_A")]
    assert wrapped and all(".language_model." in n for n in wrapped), wrapped[:4]


def test_int8(merged):
    batch = _batch(merged, "a photo of a cat")
    inputs = {"pixel_values": batch["pixel_values"], "token_type_ids": batch["token_type_ids"]}
    ref = merged.logits(batch["tokens"], **inputs)
    q = CausalLM(merged.config, merged.params, merged.tokenizer).quantize("int8")
    flat = flatten(q.params)
    assert flat["decoder_block/ffw_linear/kernel"].dtype == jnp.int8
    assert flat["token_embedding/embeddings"].dtype == jnp.int8
    assert flat["vision_encoder/encoder_block/mlp/fc1/kernel"].dtype == jnp.int8
    assert flat["vision_encoder/encoder_block/attention/query/kernel"].dtype == jnp.int8
    assert np.abs(q.logits(batch["tokens"], **inputs) - ref).max() <= 0.05 * np.abs(ref).max()
    # greedy: the float and int8 models both caption the picture with the fine-tuned words
    float_ids, q_ids = _caption(merged), _caption(q)
    assert merged.tokenizer.decode(float_ids) == CAPTION
    assert len(q_ids) == len(float_ids) and (np.array(q_ids) == np.array(float_ids)).mean() >= 0.75
    assert q.generate("caption en", images=[_picture()], max_new_tokens=8).endswith(CAPTION)


def test_cli_generate_with_image_and_shard_plans(merged, tmp_path, capsys):
    from PIL import Image

    from gemmax.cli import main

    folder = merged.export_hf(tmp_path / "pg")
    Image.fromarray(_picture()).save(tmp_path / "pic.png")
    for extra in ([], ["--quantize", "int8"]):
        assert main(["generate", "--model", str(folder), "--image", str(tmp_path / "pic.png"), "caption en",
                     "--max-new-tokens", "8", *extra]) == 0
        out = capsys.readouterr().out.strip()
        assert out.removeprefix("caption en").strip() == CAPTION, out

    assert main(["shard-plan", str(folder), "--mesh", "2x4"]) == 0
    out = capsys.readouterr().out
    for row in ("vision_encoder/encoder_block/mlp/fc1/kernel", "decoder_block/attention/query/kernel",
                "multi_modal_projector/kernel", "adamw/mu/vision_encoder/"):
        assert row in out, row
    assert "'model'" in out and "per device" in out
    assert main(["shard-plan", "paligemma2_3b_pt_224", "--mesh", "1x8", "--fsdp", "--no-optimizer"]) == 0
    assert "vision_encoder/encoder_block/attention/query/kernel" in capsys.readouterr().out
