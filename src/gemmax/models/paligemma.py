"""PaliGemma 1 and 2: SigLIP image tokens + a Gemma (1 or 2) decoder with prefix-LM attention.

The input is ``[image tokens] <bos> prompt \\n [suffix]``, as transformers' ``PaliGemmaProcessor`` builds it.
Image positions hold the projected SigLIP features *unscaled*, text positions the token embeddings scaled
by sqrt(d) (the reference scales inside the embedding lookup). Attention is full over the prefix (image +
prompt: "token type" 0) and causal over the suffix and everything generated (type 1); RoPE positions start
at 1, as in transformers (``position_ids + 1``).

The decoder is :func:`gemmax.models.gemma.model.decoder_layer` over the same parameter paths as ``CausalLM``
(``token_embedding/``, ``decoder_block/``, ``final_normalization/``), so Gemma layout maps, LoRA and
quantization transforms apply unchanged; only the attention mask (``attend``) differs. PaliGemma 2 is the
same code with a Gemma 2 decoder (soft-caps, sandwich norms, alternating sliding windows).
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemmax.io.hf import CheckpointError, lazy_params_from_hf, open_safetensors_folder
from gemmax.models import siglip as vision
from gemmax.models.gemma import model as gm
from gemmax.models.gemma.config import ModelConfig
from gemmax.models.gemma.config import from_hf_config as text_from_hf
from gemmax.models.gemma.config import to_hf_config as text_to_hf
from gemmax.models.gemma.model import ParamSpec, flatten, unflatten
from gemmax.models.recurrent_gemma import lazy_from_table, summary_table
from gemmax.nn.layers import dot_attention

Array = jax.Array
Params = dict[str, Any]

#: Gemma's "\n" token: the separator between prompt and answer.
NEWLINE_ID = 108
#: Sizes PaliGemma checkpoints come in, and their image-token counts (patch 14).
RESOLUTIONS = {224: 256, 448: 1024, 896: 4096}


@dataclass(frozen=True)
class PaliGemmaConfig:
    text: ModelConfig
    vision: vision.SigLIPConfig
    image_token_id: int = 257152
    newline_id: int = NEWLINE_ID
    name: str = ""
    family: str = "paligemma"
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_patches

    def param_count(self) -> dict[str, int]:
        total = sum(s.size for s in param_specs(self).values())
        embed = self.text.vocab_size * self.text.hidden_size
        return {"total": total, "embedding": embed, "non_embedding": total - embed}


# ---- presets and HF configs -------------------------------------------------------------------------------

_PG1_TEXT = dict(model_type="gemma", hidden_size=2048, num_hidden_layers=18, intermediate_size=16384,
                 num_attention_heads=8, num_key_value_heads=1, head_dim=256, vocab_size=257216)
_PG2_TEXT = {
    "2b": dict(hidden_size=2304, num_hidden_layers=26, intermediate_size=9216, num_attention_heads=8,
               num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256),
    "9b": dict(hidden_size=3584, num_hidden_layers=42, intermediate_size=14336, num_attention_heads=16,
               num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256),
    "27b": dict(hidden_size=4608, num_hidden_layers=46, intermediate_size=36864, num_attention_heads=32,
                num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=144),
}
#: transformers' defaults for keys that published text configs leave out.
_TEXT_DEFAULTS = {
    "gemma": dict(_PG1_TEXT),
    "gemma2": dict(model_type="gemma2", vocab_size=257216, num_attention_heads=8, head_dim=256,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=4096,
                   query_pre_attn_scalar=256, hidden_activation="gelu_pytorch_tanh"),
}


def from_hf_config(hf: Mapping[str, Any]) -> PaliGemmaConfig:
    """From a ``paligemma`` config.json; missing text/vision keys take the published defaults."""
    if hf.get("model_type") != "paligemma":
        raise ValueError(f"not a PaliGemma config (model_type {hf.get('model_type')!r})")
    tc = dict(hf.get("text_config") or {})
    mt = tc.get("model_type", "gemma")
    if mt not in _TEXT_DEFAULTS:
        raise ValueError(f"unsupported PaliGemma decoder {mt!r} (gemma or gemma2)")
    text = dict(_TEXT_DEFAULTS[mt], **tc)
    vc = dict(hf.get("vision_config") or {})
    img = int(hf.get("image_token_id", hf.get("image_token_index", 257152)))
    return PaliGemmaConfig(text=text_from_hf(text), vision=vision.from_hf_vision_config(vc),
                           image_token_id=img, name=hf.get("_name_or_path", "") or "")


def to_hf_config(cfg: PaliGemmaConfig) -> dict[str, Any]:
    text = text_to_hf(cfg.text)
    text.pop("architectures", None)
    vc = vision.to_hf_vision_config(cfg.vision)
    vc["projection_dim"] = cfg.text.hidden_size
    return {"model_type": "paligemma", "architectures": ["PaliGemmaForConditionalGeneration"],
            "text_config": text, "vision_config": vc, "image_token_id": cfg.image_token_id,
            "projection_dim": cfg.text.hidden_size, "hidden_size": cfg.text.hidden_size,
            "vocab_size": cfg.text.vocab_size, "tie_word_embeddings": True}


def _preset(name: str, text: dict[str, Any], size: int) -> PaliGemmaConfig:
    mt = text.get("model_type", "gemma")
    hf = {"model_type": "paligemma", "text_config": dict(_TEXT_DEFAULTS[mt], **text),
          "vision_config": {"image_size": size}}
    c = from_hf_config(hf)
    return PaliGemmaConfig(text=c.text.replace(name=name), vision=c.vision, name=name)


PRESETS: dict[str, PaliGemmaConfig] = {}
for _s in (224, 448, 896):
    PRESETS[f"paligemma_3b_pt_{_s}"] = _preset(f"paligemma_3b_pt_{_s}", {}, _s)
    for _k, _t in _PG2_TEXT.items():
        _n = {"2b": "3b", "9b": "10b", "27b": "28b"}[_k]
        PRESETS[f"paligemma2_{_n}_pt_{_s}"] = _preset(f"paligemma2_{_n}_pt_{_s}", dict(_t, model_type="gemma2"), _s)
PRESETS["paligemma_3b_mix_224"] = _preset("paligemma_3b_mix_224", {}, 224)


# ---- parameters ---------------------------------------------------------------------------------------------


def param_specs(cfg: PaliGemmaConfig) -> dict[str, ParamSpec]:
    s = vision.param_specs(cfg.vision)
    s["multi_modal_projector/kernel"] = ParamSpec((cfg.vision.width, cfg.text.hidden_size), (None, "embed"))
    s["multi_modal_projector/bias"] = ParamSpec((cfg.text.hidden_size,), ("embed",), "zeros")
    s.update(gm.param_specs(cfg.text))
    return s


#: Default sharding rules (regex -> spec; stacked weights carry their layer axis): the Gemma decoder's
#: recommended layout plus the SigLIP tower's (heads / MLP on "model").
LAYOUT_RULES: dict[str, tuple[str | None, ...]] = {
    r"token_embedding/embeddings": ("model", None),
    r"decoder_block.*attention.*(query|key|value).kernel": (None, "model", None, None),
    r"decoder_block.*attention_output.kernel": (None, "model", None, None),
    r"decoder_block.*ffw_gating.*kernel": (None, None, "model"),
    r"decoder_block.*ffw_linear.kernel": (None, "model", None),
    r"multi_modal_projector/kernel": (None, "model"),
    **vision.LAYOUT_RULES,
}


def init_params(cfg: PaliGemmaConfig, key: Array, dtype: Any = jnp.float32) -> Params:
    k1, k2, k3 = jax.random.split(key, 3)
    flat = flatten(gm.init_params(cfg.text, k1, dtype))
    flat.update(vision.init_params(cfg.vision, k2, dtype))
    flat["multi_modal_projector/kernel"] = (jax.random.normal(k3, (cfg.vision.width, cfg.text.hidden_size))
                                            / np.sqrt(cfg.vision.width)).astype(dtype)
    flat["multi_modal_projector/bias"] = jnp.zeros((cfg.text.hidden_size,), dtype)
    return unflatten(flat)


# ---- the model ----------------------------------------------------------------------------------------------


def prefix_lm_mask(q_idx: Array, k_idx: Array, q_type: Array, k_type: Array, window: Array | int | None,
                   k_valid: Array | None = None) -> Array:
    """[B, T, S]: causal (within ``window``) OR both tokens in the prefix (type 0), over valid keys.

    The prefix block overrides the window, as in transformers (``or`` of the sliding-causal and block
    masks).
    """
    q, k = q_idx[:, :, None], k_idx[:, None, :]
    m = k <= q
    if window is not None:
        m = m & (q - k < window)
    m = m | ((q_type == 0)[:, :, None] & (k_type == 0)[:, None, :])
    if k_valid is not None:
        m = m & k_valid[:, None, :]
    return m


def embed_inputs(params: Params, cfg: PaliGemmaConfig, tokens: Array, pixels: Array | None) -> Array:
    """Token embeddings (scaled by sqrt(d)) with image-token positions replaced by projected SigLIP
    features (not scaled). Each row's image tokens take that row's image patches in order."""
    tokens = jnp.asarray(tokens, jnp.int32)
    is_img = tokens == cfg.image_token_id
    safe = jnp.where(is_img & (cfg.image_token_id >= cfg.text.vocab_size), 0, tokens)
    x = gm.embed(params, cfg.text, safe)
    if pixels is None:
        return x
    feats = vision.encode(params, cfg.vision, pixels, x.dtype)
    proj = params["multi_modal_projector"]
    feats = (feats @ proj["kernel"].astype(x.dtype) + proj["bias"].astype(x.dtype)).astype(x.dtype)
    idx = jnp.clip(jnp.cumsum(is_img, axis=1) - 1, 0, feats.shape[1] - 1)
    placed = jnp.take_along_axis(feats, idx[..., None], axis=1)
    return jnp.where(is_img[..., None], placed, x)


def _layer_data(cfg: PaliGemmaConfig) -> tuple[Array, Array]:
    return jnp.asarray(gm.layer_windows(cfg.text)), gm.layer_inv_freqs(cfg.text)


def forward(params: Params, cfg: PaliGemmaConfig, tokens: Array, pixels: Array | None = None,
            token_type_ids: Array | None = None, positions: Array | None = None) -> Array:
    """Float32 logits [B, T, V]. ``token_type_ids`` 0 = prefix (bidirectional), 1 = suffix (causal);
    None means all causal (as transformers without token types). Positions default to 1..T."""
    x = embed_inputs(params, cfg, tokens, pixels)
    b, t = x.shape[:2]
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    positions = idx + 1 if positions is None else jnp.asarray(positions, jnp.int32)
    types = jnp.ones((b, t), jnp.int32) if token_type_ids is None else jnp.asarray(token_type_ids, jnp.int32)
    has_local = any(k == "local" for k in cfg.text.layer_types)

    def body(x: Array, xs: tuple) -> tuple[Array, None]:
        p, window, inv = xs

        def attend(q: Array, k: Array, v: Array) -> Array:
            mask = prefix_lm_mask(idx, idx, types, types, window if has_local else None)
            return dot_attention(q, k, v, mask, cfg.text.attn_logit_softcap)

        return gm.decoder_layer(p, x, cfg.text, positions, inv, attend), None

    x, _ = jax.lax.scan(body, x, (params["decoder_block"], *_layer_data(cfg)))
    h = gm.rms_norm(x, params["final_normalization"]["scale"], cfg.text.norm_eps, cfg.text.norm_offset)
    return gm.logits_from_hidden(params, cfg.text, h)


_forward_jit = jax.jit(forward, static_argnums=(1,))


# ---- generation with a KV cache ------------------------------------------------------------------------------


def _run_cached(params: Params, cfg: PaliGemmaConfig, x: Array, positions: Array,
                attend_fn: Callable[[Array, Array, Array, Array, Array, Array], tuple[Array, Array, Array]],
                kc: Array, vc: Array) -> tuple[Array, Array, Array]:
    """Scan the decoder layers with per-layer caches ``kc``/``vc`` [L, B, S, K, hd]; ``attend_fn(q, k, v,
    window, k_cache, v_cache) -> (out, new k_cache, new v_cache)``."""

    def body(x: Array, xs: tuple) -> tuple[Array, tuple[Array, Array]]:
        p, window, inv, kl, vl = xs
        new: list[Array] = []

        def attend(q: Array, k: Array, v: Array) -> Array:
            o, k2, v2 = attend_fn(q, k, v, window, kl, vl)
            new.extend([k2, v2])
            return o

        x = gm.decoder_layer(p, x, cfg.text, positions, inv, attend)
        return x, (new[0], new[1])

    x, (kc, vc) = jax.lax.scan(body, x, (params["decoder_block"], *_layer_data(cfg), kc, vc))
    h = gm.rms_norm(x, params["final_normalization"]["scale"], cfg.text.norm_eps, cfg.text.norm_offset)
    return h, kc, vc


@functools.partial(jax.jit, static_argnums=(1, 5, 6))
def _generate(params: Params, cfg: PaliGemmaConfig, tokens: Array, lengths: Array, pixels: Array,
              max_new: int, cache_len: int, stop_ids: Array, limit: Array) -> tuple[Array, Array]:
    """Greedy: prefill the right-padded prompts (all prefix), then decode one token per step."""
    tc = cfg.text
    b, t = tokens.shape
    L, K, hd = tc.num_layers, tc.num_kv_heads, tc.head_dim
    x = embed_inputs(params, cfg, tokens, pixels)
    dtype = x.dtype
    kc = jnp.zeros((L, b, cache_len, K, hd), dtype)
    vc = jnp.zeros((L, b, cache_len, K, hd), dtype)
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    valid = idx < lengths[:, None]
    types = jnp.where(valid, 0, 1)  # padding is "suffix": causal, so no real token ever sees it

    def prefill_attend(q, k, v, window, kl, vl):
        o = dot_attention(q, k, v, prefix_lm_mask(idx, idx, types, types, window, valid), tc.attn_logit_softcap)
        return o, kl.at[:, :t].set(k.astype(dtype)), vl.at[:, :t].set(v.astype(dtype))

    h, kc, vc = _run_cached(params, cfg, x, idx + 1, prefill_attend, kc, vc)
    last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)
    logits = gm.logits_from_hidden(params, tc, last)[:, 0]
    slots = jnp.arange(cache_len, dtype=jnp.int32)[None]
    out = jnp.full((b, max_new), tc.pad_token_id, jnp.int32)

    def cond(s):
        return (s[0] < jnp.minimum(limit, max_new)) & ~jnp.all(s[5])

    def body(s):
        i, logits, kc, vc, out, done = s
        tok = jnp.where(done, tc.pad_token_id, jnp.argmax(logits, -1).astype(jnp.int32))
        out = out.at[:, i].set(tok)
        done = done | jnp.isin(tok, stop_ids)
        cur = lengths + i  # cache slot of this token
        hit = slots == cur[:, None]

        def step_attend(q, k, v, window, kl, vl):
            kl = jnp.where(hit[:, :, None, None], k.astype(dtype), kl)
            vl = jnp.where(hit[:, :, None, None], v.astype(dtype), vl)
            m = (slots <= cur[:, None]) & (cur[:, None] - slots < window)
            return dot_attention(q, kl, vl, m[:, None, :], tc.attn_logit_softcap), kl, vl

        xt = gm.embed(params, tc, tok[:, None])
        h, kc, vc = _run_cached(params, cfg, xt, (cur + 1)[:, None], step_attend, kc, vc)
        return i + 1, gm.logits_from_hidden(params, tc, h)[:, 0], kc, vc, out, done

    n, _, _, _, out, _ = jax.lax.while_loop(
        cond, body, (jnp.int32(0), logits, kc, vc, out, jnp.zeros((b,), bool)))
    return out, n


# ---- images, prompts, detections -----------------------------------------------------------------------------


def preprocess_image(image: Any, size: int = 224) -> np.ndarray:
    """PIL image / array -> float32 [size, size, 3] in [-1, 1]: RGB, bicubic resize to a square, then
    ``(x / 255 - 0.5) / 0.5`` — SigLIP's normalisation (mean 0.5, std 0.5)."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        arr = np.asarray(image)
        if arr.dtype != np.uint8:
            arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        image = Image.fromarray(arr)
    image = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    x = np.asarray(image, np.float32) / 255.0
    return (x - 0.5) / 0.5


def task_prompt(task: str, arg: str = "", lang: str = "en") -> str:
    """PaliGemma's task prefixes: caption, answer (VQA), detect, segment, ocr."""
    if task == "caption":
        return f"caption {lang}"
    if task == "answer":
        return f"answer {lang} {arg}".rstrip()
    if task in ("detect", "segment"):
        return f"{task} {arg}".rstrip()
    if task == "ocr":
        return "ocr"
    raise ValueError(f"unknown task {task!r} (caption, answer, detect, segment, ocr)")


def build_input_ids(cfg: PaliGemmaConfig, prompt_ids: Sequence[int]) -> list[int]:
    """``[image] * N + <bos> + prompt + "\\n"`` as PaliGemmaProcessor lays it out."""
    return [cfg.image_token_id] * cfg.num_image_tokens + [cfg.text.bos_token_id, *prompt_ids, cfg.newline_id]


_LOC = re.compile(r"((?:<loc\d{4}>){4})\s*([^;<]*)")


def parse_detections(text: str, width: int, height: int) -> list[dict[str, Any]]:
    """``<locY0><locX0><locY1><locX1> label ; ...`` -> [{"label", "box": (x0, y0, x1, y1)}] in pixels.

    Each location token is a coordinate quantised to 1024 bins over the image side (y first), so pixel =
    value / 1024 * side.
    """
    out = []
    for locs, label in _LOC.findall(text):
        y0, x0, y1, x1 = (int(v) / 1024.0 for v in re.findall(r"<loc(\d{4})>", locs))
        out.append({"label": label.strip(), "box": (x0 * width, y0 * height, x1 * width, y1 * height)})
    return out


# ---- fine-tuning: prefix-LM batches and the suffix-only loss ------------------------------------------------


def training_batch(cfg: PaliGemmaConfig, prompts: Sequence[Sequence[int]], suffixes: Sequence[Sequence[int]],
                   length: int | None = None, add_eos: bool = True) -> dict[str, np.ndarray]:
    """Right-padded ``tokens`` / ``token_type_ids`` / ``loss_mask`` [B, length] for prefix-LM training.

    A row is ``[image] * N <bos> prompt \\n`` (type 0: attends bidirectionally, no loss) then ``suffix <eos>``
    (type 1: causal, loss on every token) then padding (type 1 too — causal, so no real token can see it —
    and masked out of the loss), the layout PaliGemma was trained with.
    """
    if len(prompts) != len(suffixes):
        raise ValueError(f"{len(prompts)} prompts but {len(suffixes)} suffixes")
    rows = []
    for pr, sf in zip(prompts, suffixes, strict=True):
        prefix = build_input_ids(cfg, [int(t) for t in pr])
        suffix = [int(t) for t in sf] + ([cfg.text.eos_ids[0]] if add_eos else [])
        rows.append((prefix, suffix))
    need = max(len(a) + len(b) for a, b in rows)
    if length is None:
        from gemmax.models.recurrent_gemma import _bucket

        length = _bucket(need)
    if need > length:
        raise ValueError(f"an example has {need} tokens, more than length={length}")
    tokens = np.full((len(rows), length), cfg.text.pad_token_id, np.int32)
    types = np.ones((len(rows), length), np.int32)
    mask = np.zeros((len(rows), length), np.float32)
    for i, (a, b) in enumerate(rows):
        tokens[i, :len(a) + len(b)] = a + b
        types[i, :len(a)] = 0
        mask[i, len(a):len(a) + len(b)] = 1.0
    return {"tokens": tokens, "token_type_ids": types, "loss_mask": mask}


def suffix_loss(params: Params, cfg: PaliGemmaConfig, tokens: Array, pixels: Array, token_type_ids: Array,
                loss_mask: Array) -> Array:
    """Mean cross-entropy of the suffix tokens only: position t-1 predicts token t wherever ``loss_mask[t]``
    (the first suffix token is predicted from the ``\\n`` that ends the prefix)."""
    logits = forward(params, cfg, tokens, pixels, token_type_ids)[:, :-1]
    tgt = jnp.asarray(tokens, jnp.int32)[:, 1:]
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tgt[..., None], -1)[..., 0]
    w = jnp.asarray(loss_mask, jnp.float32)[:, 1:]
    return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)


def make_train_step(cfg: PaliGemmaConfig, optimizer: Any) -> Callable:
    """Jitted ``step(trainable, frozen, opt_state, batch) -> (trainable, opt_state, loss)``.

    Only ``trainable`` (the adapters, from ``gemmax.nn.lora.split_trainable``) is differentiated, so the vision
    tower, projector and base decoder are frozen by construction and carry no optimizer state. ``batch``
    holds ``pixels`` plus :func:`training_batch`'s arrays.
    """
    import optax

    from gemmax.nn.lora import merge_trees

    @jax.jit
    def step(trainable: Params, frozen: Params, opt_state: Any, batch: dict[str, Array]) -> tuple:
        def loss_fn(t: Params) -> Array:
            return suffix_loss(merge_trees(t, frozen), cfg, batch["tokens"], batch["pixels"],
                               batch["token_type_ids"], batch["loss_mask"])

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return step


def layout_map(mesh: Any) -> Any:
    """``LAYOUT_RULES`` as a :class:`gemmax.distribution.LayoutMap` for ``mesh``."""
    from gemmax.distribution import LayoutMap

    lm = LayoutMap(mesh)
    for rx, spec in LAYOUT_RULES.items():
        lm[rx] = spec
    return lm


def abstract_params(cfg: PaliGemmaConfig, dtype: Any = jnp.float32, lora_rank: int = 0,
                    lora_targets: tuple[str, ...] = ("query", "value")) -> Params:
    """ShapeDtypeStruct tree of every weight (plus decoder adapters): ``gemmax shard-plan`` input."""
    from gemmax.nn import lora

    tree = unflatten({p: jax.ShapeDtypeStruct(s.shape, dtype) for p, s in param_specs(cfg).items()})
    if lora_rank:
        tree = jax.eval_shape(lambda t: lora.add_lora(t, cfg.text, lora_rank, targets=lora_targets, dtype=dtype),
                              tree)
    return tree


# ---- loading -------------------------------------------------------------------------------------------------


def load_params(folder: str | os.PathLike, dtype: Any = jnp.float32) -> tuple[PaliGemmaConfig, Params]:
    """(config, params) from a ``PaliGemmaForConditionalGeneration`` safetensors folder, every tensor
    checked (name, shape) before any is read."""
    from gemmax.api import current_distribution, place_params

    folder = Path(folder)
    p = folder / "config.json"
    if not p.exists():
        raise CheckpointError(f"{folder}: no config.json (is this a Hugging Face model folder?)")
    try:
        cfg = from_hf_config(json.loads(p.read_text()))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{p}: not a usable PaliGemma config ({e})") from None
    src = open_safetensors_folder(folder)
    np_dtype = np.dtype(jnp.dtype(dtype))
    lazy = dict(lazy_params_from_hf(cfg.text, src, np_dtype, shape_of=src.shape))
    pre = "model." if any(k.startswith("model.vision_tower.") for k in src) else ""
    table = vision.hf_table(cfg.vision, pre + "vision_tower.")
    ident = (lambda w: w, lambda w: w)
    table["multi_modal_projector/kernel"] = (pre + "multi_modal_projector.linear.weight", lambda w: w.T, lambda w: w.T)
    table["multi_modal_projector/bias"] = (pre + "multi_modal_projector.linear.bias", *ident)
    lazy.update(lazy_from_table(param_specs(cfg), table, src, src.shape, np_dtype,
                                ignorable=("language_model", "lm_head", "vision_tower.head", "rotary_emb"),
                                what="PaliGemma vision tower"))
    return cfg, unflatten(place_params(lazy, dtype, current_distribution()))


class PaliGemma:
    """PaliGemma with the CausalLM-style interface: ``from_preset``, ``logits``, ``generate``, ``summary``,
    ``quantize``, ``enable_lora`` / ``finetune``, ``export_hf``."""

    def __init__(self, config: PaliGemmaConfig, params: Params, tokenizer: Any = None, source: str = ""):
        if tokenizer is not None and hasattr(tokenizer, "piece_to_id"):
            # The prompt separator is the tokenizer's "\n" (108 in Gemma's vocabulary, elsewhere in others).
            nl = tokenizer.piece_to_id("\n")
            if 0 <= nl < config.text.vocab_size and nl != config.newline_id:
                config = replace(config, newline_id=nl)
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.source = source

    @classmethod
    def from_preset(cls, folder: str | os.PathLike, dtype: Any = "float32", quantize: str | None = None) -> PaliGemma:
        """A ``PaliGemmaForConditionalGeneration`` folder (tokenizer optional); ``quantize="int8"`` quantizes
        after loading."""
        lm = cls._load(folder, dtype)
        return lm.quantize(quantize) if quantize else lm

    @classmethod
    def _load(cls, folder: str | os.PathLike, dtype: Any) -> PaliGemma:
        from gemmax.models.recurrent_gemma import _dtype

        cfg, params = load_params(Path(os.path.expanduser(str(folder))), _dtype(dtype))
        tok = None
        try:
            from gemmax.api import load_tokenizer

            tok = load_tokenizer(Path(folder))
        except Exception:  # optional: ids still work
            tok = None
        return cls(cfg, params, tok, source=str(folder))

    @classmethod
    def from_config(cls, config: PaliGemmaConfig | str, seed: int = 0, dtype: Any = jnp.float32,
                    tokenizer: Any = None) -> PaliGemma:
        cfg = PRESETS[config] if isinstance(config, str) else config
        # rbg key: compiles far faster than threefry for a tree of many weights (see RecurrentGemmaLM)
        key = jax.random.key(seed, impl="rbg")
        return cls(cfg, jax.jit(lambda k: init_params(cfg, k, dtype))(key), tokenizer,
                   source=f"random:{cfg.name}")

    def pixels(self, images: Any) -> np.ndarray:
        """One image or a list -> float32 [B, S, S, 3] at the checkpoint's resolution."""
        if not isinstance(images, list | tuple):
            images = [images]
        return np.stack([preprocess_image(im, self.config.vision.image_size) for im in images])

    def logits(self, token_ids: Any, images: Any = None, token_type_ids: Any = None) -> np.ndarray:
        ids = np.asarray(token_ids, np.int32)
        ids = ids[None] if ids.ndim == 1 else ids
        px = None if images is None else (images if isinstance(images, np.ndarray) and images.ndim == 4
                                          else self.pixels(images))
        tt = None if token_type_ids is None else jnp.asarray(np.asarray(token_type_ids).reshape(ids.shape))
        return np.asarray(_forward_jit(self.params, self.config, jnp.asarray(ids),
                                       None if px is None else jnp.asarray(px), tt))

    def _encode_prompt(self, prompt: str | Sequence[int]) -> list[int]:
        if not isinstance(prompt, str):
            return [int(t) for t in prompt]
        if self.tokenizer is None:
            raise ValueError("text prompts need a tokenizer; pass token ids instead")
        try:
            ids = list(self.tokenizer.encode(prompt, add_bos=False))
        except TypeError:
            ids = list(self.tokenizer.encode(prompt))
        return ids[1:] if ids and ids[0] == self.config.text.bos_token_id else ids

    def generate(self, images: Any, prompts: Any, max_new_tokens: int = 32,
                 sampler: str = "greedy") -> list[np.ndarray] | list[str]:
        """Greedy answers for image/prompt pairs. Prompts are strings (needs a tokenizer) or id lists; the
        result is the generated ids (without the prompt, up to and excluding the end token) per row, or
        decoded strings when the prompts were strings."""
        if sampler != "greedy":
            raise ValueError("PaliGemma.generate supports sampler='greedy'")
        # one prompt: a string or a flat id list (np.isscalar is also true of a str, hence the extra check)
        single = isinstance(prompts, str) or (isinstance(prompts, list | tuple) and prompts and
                                              np.isscalar(prompts[0]) and not isinstance(prompts[0], str))
        prompts = [prompts] if single else list(prompts)
        px = images if isinstance(images, np.ndarray) and images.ndim == 4 else self.pixels(images)
        if len(px) == 1 and len(prompts) > 1:
            px = np.repeat(px, len(prompts), axis=0)
        rows = [build_input_ids(self.config, self._encode_prompt(p)) for p in prompts]
        lengths = np.array([len(r) for r in rows], np.int32)
        from gemmax.models.recurrent_gemma import _bucket

        t = _bucket(int(lengths.max()))
        ids = np.full((len(rows), t), self.config.text.pad_token_id, np.int32)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r
        stops = jnp.asarray(self.config.text.eos_ids, jnp.int32)
        new, n = _generate(self.params, self.config, jnp.asarray(ids), jnp.asarray(lengths), jnp.asarray(px),
                           _bucket(max_new_tokens, 1), _bucket(t + max_new_tokens), stops, jnp.int32(max_new_tokens))
        new = np.asarray(new)[:, :min(int(n), max_new_tokens)]
        outs = []
        for r in new:
            stop = [i for i, tok in enumerate(r) if tok in self.config.text.eos_ids]
            outs.append(r[:stop[0]] if stop else r)
        if isinstance(prompts[0], str) and self.tokenizer is not None:
            return [self.tokenizer.decode(o.tolist()) for o in outs]
        return outs

    # ---- weight transforms ------------------------------------------------------------------------
    def quantize(self, mode: str = "int8", group_size: int | None = None) -> PaliGemma:
        """Weight-only quantization in place: the decoder through ``gemmax.nn.quant.quantize_params`` (same
        paths as ``CausalLM``; embedding per row) and the SigLIP encoder's dense kernels per output channel
        (``vision.quantize_params``). Norms, patch/position embeddings and the projector stay float."""
        self.params = _quantize_jit(self.params, self.config, mode, group_size)
        return self

    def enable_lora(self, rank: int = 4, targets: str | Sequence[str] = ("query", "value"),
                    alpha: float | None = None, seed: int = 0) -> PaliGemma:
        """Adapters on the *language* side only (``decoder_block/...``, via ``gemmax.nn.lora.add_lora``): the
        vision tower and projector have none, so ``gemmax.nn.lora.split_trainable`` leaves them frozen."""
        from gemmax.nn import lora

        self.params = lora.add_lora(self.params, self.config.text, rank, alpha, targets, seed)
        return self

    def merge_lora(self) -> PaliGemma:
        from gemmax.nn import lora

        self.params = lora.merge_lora(self.params)
        return self

    def training_batch(self, images: Any, prompts: Sequence[Any], suffixes: Sequence[Any],
                       length: int | None = None) -> dict[str, np.ndarray]:
        """:func:`training_batch` from strings (tokenized without ``<bos>``) or id lists, plus ``pixels``."""
        batch = training_batch(self.config, [self._encode_prompt(p) for p in prompts],
                               [self._encode_prompt(s) for s in suffixes], length)
        px = images if isinstance(images, np.ndarray) and images.ndim == 4 else self.pixels(images)
        if len(px) == 1 and len(prompts) > 1:
            px = np.repeat(px, len(prompts), axis=0)
        batch["pixels"] = px
        return batch

    def loss(self, batch: Mapping[str, Any]) -> float:
        """Suffix-only cross-entropy of a :meth:`training_batch`."""
        return float(_loss_jit(self.params, self.config, *(jnp.asarray(batch[k]) for k in (
            "tokens", "pixels", "token_type_ids", "loss_mask"))))

    def finetune(self, images: Any, prompts: Sequence[Any], suffixes: Sequence[Any], steps: int = 10,
                 learning_rate: float = 1e-3, weight_decay: float = 0.0) -> list[float]:
        """A few AdamW steps on the adapters (call :meth:`enable_lora` first) over one fixed batch; returns
        the loss before each step. Meant for small adaptations and tests, not a data pipeline."""
        import optax

        from gemmax.nn import lora

        trainable, frozen = lora.split_trainable(self.params)
        if not trainable:
            raise ValueError("no adapters to train: call enable_lora(rank, targets) first")
        batch = {k: jnp.asarray(v) for k, v in self.training_batch(images, prompts, suffixes).items()}
        opt = optax.adamw(learning_rate, weight_decay=weight_decay)
        state = opt.init(trainable)
        step = make_train_step(self.config, opt)
        losses = []
        for _ in range(steps):
            trainable, state, loss = step(trainable, frozen, state, batch)
            losses.append(float(loss))
        self.params = lora.merge_trees(trainable, frozen)
        return losses

    # ---- inspection and saving --------------------------------------------------------------------
    def weights(self, prefix: str = "") -> list[tuple[str, Any]]:
        return [(p, a) for p, a in flatten(self.params).items() if p.startswith(prefix)]

    def summary(self, print_fn: Any = print) -> str:
        return summary_table(self.config.name, self.config.family, flatten(self.params), print_fn=print_fn)

    def export_hf(self, path: str | os.PathLike, dtype: Any = np.float32) -> Path:
        """A folder transformers' ``PaliGemmaForConditionalGeneration.from_pretrained`` loads, in the
        published checkpoints' naming (``language_model.model.*``, ``vision_tower.*``,
        ``multi_modal_projector.linear.*``). Adapters are merged and int8 kernels dequantized first."""
        from gemmax.io.hf import params_to_hf, write_safetensors
        from gemmax.nn import lora, quant

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        params = vision.dequantize_params(quant.dequantize_params(lora.merge_lora(self.params)))
        flat = {p: np.asarray(jax.device_get(a), np.float32) for p, a in flatten(params).items()}
        tensors: dict[str, np.ndarray] = {}
        for name, arr in params_to_hf(flat, self.config.text):
            tensors["language_model." + name] = arr
        table = vision.hf_table(self.config.vision, "vision_tower.")
        table["multi_modal_projector/kernel"] = ("multi_modal_projector.linear.weight", None, lambda w: w.T)
        table["multi_modal_projector/bias"] = ("multi_modal_projector.linear.bias", None, lambda w: w)
        for path_, (names, _, inv) in table.items():
            a = flat[path_]
            if isinstance(names, str):
                tensors[names] = inv(a)
            else:
                for i, n in enumerate(names):
                    tensors[n] = inv(a[i])
        write_safetensors(out / "model.safetensors",
                          {k: np.ascontiguousarray(v).astype(dtype) for k, v in tensors.items()})
        hf = to_hf_config(self.config)
        hf["torch_dtype"] = np.dtype(dtype).name
        (out / "config.json").write_text(json.dumps(hf, indent=2))
        tc = self.config.text
        gen = {"bos_token_id": tc.bos_token_id, "pad_token_id": tc.pad_token_id, "eos_token_id": tc.eos_ids[0]}
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
        if self.tokenizer is not None and hasattr(self.tokenizer, "save"):
            self.tokenizer.save(out)
        return out


_loss_jit = jax.jit(suffix_loss, static_argnums=(1,))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _quantize_jit(params: Params, cfg: PaliGemmaConfig, mode: str, group_size: int | None) -> Params:
    """Decoder (``gemmax.nn.quant``) then vision tower, as one compiled program rather than many eager ops."""
    from gemmax.nn import quant

    params = quant.quantize_params(params, cfg.text, mode, group_size)
    return vision.quantize_params(params, mode, group_size)


def load_paligemma(folder: str | os.PathLike, dtype: Any = "float32") -> PaliGemma:
    """Entry point for ``CausalLM.from_preset`` dispatch on ``model_type == "paligemma"``."""
    return PaliGemma.from_preset(folder, dtype)
