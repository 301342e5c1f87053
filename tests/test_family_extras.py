"""RecurrentGemma and PaliGemma beyond plain inference: int8, LoRA fine-tuning, PaliGemma export to
transformers, text prompts through a real SentencePiece tokenizer and the CLI, shard plans.

Everything runs on tiny random models (RecurrentGemma: one recurrent/recurrent/attention period;
PaliGemma: 2+2 layers, 28 px images, 16 image tokens). The PaliGemma fixture is fine-tuned once (LoRA on
the decoder, suffix-only loss) to caption one fixed picture "a red square", which later tests reuse: the
export, the int8 model and the ``gemmax generate --image`` command must all still say it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
import torch

from gemmax.cli import main
from gemmax.io.tokenizer import Tokenizer
from gemmax.models import paligemma as pg
from gemmax.models.gemma.model import flatten
from gemmax.nn.lora import merge_trees, split_trainable

CAPTION = "a red square"


# ---- PaliGemma -------------------------------------------------------------------------------------------


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
def base(tokenizer):
    hf = {"model_type": "paligemma", "image_token_id": tokenizer.piece_to_id("<image>"),
          "vision_config": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=28, patch_size=7),
          "text_config": dict(model_type="gemma", vocab_size=96, hidden_size=48, intermediate_size=96,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=12)}
    m = pg.PaliGemma.from_config(pg.from_hf_config(hf), seed=0, tokenizer=tokenizer)
    assert m.config.newline_id == tokenizer.piece_to_id("\n")  # the separator comes from the tokenizer
    return m


@pytest.fixture(scope="module")
def tuned(base):
    """LoRA (decoder only) fine-tuned for 25 AdamW steps to caption the picture."""
    m = pg.PaliGemma(base.config, base.params, base.tokenizer).enable_lora(8, ("query", "value", "ffw_gating",
                                                                               "ffw_linear"))
    losses = m.finetune([_picture()], ["caption en"], [CAPTION], steps=25, learning_rate=3e-2)
    return m, losses


def test_paligemma_suffix_loss_grads_only_adapters(base, tuned):
    m, losses = tuned
    cfg = m.config
    batch = m.training_batch([_picture()], ["caption en"], [CAPTION])
    n_pre = cfg.num_image_tokens + 1 + len(m._encode_prompt("caption en")) + 1
    n_suf = len(m._encode_prompt(CAPTION)) + 1  # + <eos>
    assert batch["token_type_ids"][0, :n_pre].sum() == 0 and batch["token_type_ids"][0, n_pre:].all()
    assert batch["loss_mask"][0].sum() == n_suf and batch["loss_mask"][0, n_pre:n_pre + n_suf].all()
    trainable, frozen = split_trainable(m.params)
    paths = sorted(flatten(trainable))
    assert paths and all(p.startswith("decoder_block/") and p.endswith(("lora_a", "lora_b")) for p in paths)
    grad_fn = jax.jit(jax.value_and_grad(lambda t, b: pg.suffix_loss(merge_trees(t, frozen), cfg, **b)))
    loss, grads = grad_fn(trainable, {k: jnp.asarray(v) for k, v in batch.items()})
    assert set(flatten(grads)) == set(paths)  # nothing in the vision tower or base decoder is differentiated
    assert all(float(jnp.abs(v).max()) > 0 for p, v in flatten(grads).items() if p.endswith("lora_b"))
    # padding is masked out of attention and loss: garbage in the padded slots changes nothing
    noisy = dict(batch, tokens=batch["tokens"].copy())
    pad = n_pre + n_suf
    noisy["tokens"][0, pad:] = np.random.RandomState(0).randint(3, 90, noisy["tokens"].shape[1] - pad)
    loss2, _ = grad_fn(trainable, {k: jnp.asarray(v) for k, v in noisy.items()})
    assert float(loss2) == pytest.approx(float(loss), rel=1e-5)
    # the 25 AdamW steps of the fixture learned the caption; the vision tower did not move
    assert losses[-1] < 0.2 * losses[0] and float(loss) < 0.2 * losses[0]
    before = flatten(base.params)
    for p, a in flatten(m.params).items():
        if p.startswith(("vision_encoder", "multi_modal_projector")):
            np.testing.assert_array_equal(a, before[p])


@pytest.fixture(scope="module")
def merged(tuned):
    m = tuned[0]
    return pg.PaliGemma(m.config, m.params, m.tokenizer).merge_lora()


def _eval_batch(m: pg.PaliGemma) -> dict[str, np.ndarray]:
    return m.training_batch([_picture()], ["caption en"], ["a photo of a cat"])


def test_paligemma_export_hf_matches_transformers(tuned, merged, tmp_path):
    import transformers

    out = tuned[0].export_hf(tmp_path / "pg")  # adapters merged on the way out
    ref = transformers.PaliGemmaForConditionalGeneration.from_pretrained(out).eval()
    batch = _eval_batch(merged)
    got = merged.logits(batch["tokens"], batch["pixels"], batch["token_type_ids"])
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(batch["tokens"], dtype=torch.long),
                   pixel_values=torch.tensor(batch["pixels"].transpose(0, 3, 1, 2)),
                   token_type_ids=torch.tensor(batch["token_type_ids"], dtype=torch.long)).logits.numpy()
    n = int(batch["loss_mask"][0].nonzero()[0][-1]) + 1  # compare the real positions, not the padding
    assert np.abs(got[:, :n] - want[:, :n]).max() <= 1e-4 * np.abs(want).max()
    assert (out / "tokenizer.model").exists()


def test_paligemma_int8(merged):
    batch = _eval_batch(merged)
    args = (batch["tokens"], batch["pixels"], batch["token_type_ids"])
    ref = merged.logits(*args)
    q = pg.PaliGemma(merged.config, merged.params, merged.tokenizer).quantize("int8")
    flat = flatten(q.params)
    assert flat["decoder_block/ffw_linear/kernel"].dtype == jnp.int8
    assert flat["token_embedding/embeddings"].dtype == jnp.int8
    assert flat["vision_encoder/encoder_block/mlp/fc1/kernel"].dtype == jnp.int8
    assert np.abs(q.logits(*args) - ref).max() <= 0.05 * np.abs(ref).max()
    # greedy: the float and int8 models both caption the picture with the fine-tuned words
    px = merged.pixels([_picture()])
    prompt = [merged._encode_prompt("caption en")]
    float_ids = merged.generate(px, prompt, max_new_tokens=8)[0]
    q_ids = q.generate(px, prompt, max_new_tokens=8)[0]
    assert len(q_ids) == len(float_ids) and (q_ids == float_ids).mean() >= 0.75
    assert merged.tokenizer.decode(float_ids) == CAPTION
    assert q.generate([_picture()], ["caption en"], max_new_tokens=8) == [CAPTION]


def test_cli_generate_with_image_and_shard_plans(tuned, merged, tmp_path, capsys):
    from PIL import Image

    m = merged
    folder = m.export_hf(tmp_path / "pg")
    Image.fromarray(_picture()).save(tmp_path / "pic.png")
    assert main(["generate", "--model", str(folder), "--image", str(tmp_path / "pic.png"), "caption en",
                 "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip() == CAPTION
    assert main(["generate", "--model", str(folder), "--image", str(tmp_path / "pic.png"), "caption en",
                 "--max-new-tokens", "8", "--quantize", "int8"]) == 0
    assert capsys.readouterr().out.strip() == CAPTION

    assert main(["shard-plan", str(folder), "--mesh", "2x4"]) == 0
    out = capsys.readouterr().out
    for row in ("vision_encoder/encoder_block/mlp/fc1/kernel", "decoder_block/attention/query/kernel",
                "multi_modal_projector/kernel", "adamw/mu/vision_encoder/"):
        assert row in out, row
    assert "P(None, None, 'model')" in out and "per device" in out
    assert main(["shard-plan", "paligemma2_3b_pt_224", "--mesh", "1x8", "--fsdp", "--no-optimizer"]) == 0
    assert "vision_encoder/encoder_block/attention/query/kernel" in capsys.readouterr().out
    text = m.summary(print_fn=None)
    assert "vision_encoder/encoder_block/mlp/fc1/kernel" in text
