"""keras-hub presets in and out of ``CausalLM``, and Keras' per-head LoRA to and from gemmax adapters.

The file format lives in ``gemmax.io.keras`` and each family's Keras names in its ``Family.keras``
(:class:`~gemmax.models.base.KerasSpec`); this module joins them to a model: which family a preset is, its
config, its weights placed like every other checkpoint's, its tokenizer, and the reverse for export.
"""

from __future__ import annotations

import datetime
import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemmax.io import keras as kio
from gemmax.io.hf import CheckpointError, lazy_from_table, table_to_hf
from gemmax.io.tokenizer import Tokenizer
from gemmax.models import base
from gemmax.models.base import Family, UnsupportedError
from gemmax.nn import lora
from gemmax.nn.params import LinearNode, get_node, has_node, set_node

#: keras-hub version whose preset layout gemmax writes (and tests against)
KERAS_HUB_FORMAT = "0.32.0"
#: keras-hub's default LoRA targets (``Backbone.default_lora_layer_names``), as gemmax node keys
KERAS_DEFAULT_LORA = ("query", "value")
#: the LoRA file ``export_keras(..., lora="keep")`` writes beside the preset
LORA_FILE = "model.lora.h5"


def keras_spec(fam: Family) -> base.KerasSpec:
    if fam.keras is None:
        raise UnsupportedError(f"keras-hub has no backbone for the {fam.name} family")
    return fam.keras


def read_preset(folder: Path) -> tuple[Family, Any]:
    """(family, gemmax config) of a preset folder; errors name config.json and the problem."""
    class_name, c = kio.read_backbone_config(folder)
    fam = base.for_keras_backbone(class_name, c)
    try:
        return fam, keras_spec(fam).from_config(class_name, c)
    except (KeyError, TypeError) as e:
        raise kio.KerasPresetError(f"{folder / kio.CONFIG_FILE}: {class_name} config lacks {e}") from None
    except ValueError as e:
        raise kio.KerasPresetError(f"{folder / kio.CONFIG_FILE}: not a usable {class_name} config ({e})") from None


def lazy_weights(folder: Path, fam: Family, cfg: Any, dtype: Any) -> dict[str, Any]:
    """Validated lazy weights of a preset: every missing, misshaped or unexpected dataset is reported
    together, naming the weights file, before any weight is read."""
    src = kio.open_weights(folder)
    try:
        return lazy_from_table(fam.param_specs(cfg), keras_spec(fam).table(cfg), src, np.dtype(jnp.dtype(dtype)),
                               shape_of=src.shape, ignorable=(), what=f"{fam.name} keras-hub preset")
    except CheckpointError as e:
        if isinstance(e, kio.KerasPresetError):
            raise
        raise kio.KerasPresetError(f"{folder / kio.WEIGHTS_FILE}: {e}") from None


#: Llama 3's pre-tokenizer split (its tokenizer.json's, tiktoken's ``pat_str``): contractions, letter runs with
#: one leading non-letter, digit triples, punctuation runs, newlines, spaces.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def load_tokenizer(folder: Path) -> Tokenizer | None:
    """The preset's tokenizer: Gemma's SentencePiece model (``assets/tokenizer/vocabulary.spm``), or Llama 3's
    byte-level BPE (``vocabulary.json`` + ``merges.txt``); None when the preset has neither."""
    proto = kio.tokenizer_proto(folder)
    if proto is not None:
        return Tokenizer.from_file(proto)
    assets = folder / kio.TOKENIZER_ASSETS
    vocab_path, merges_path = assets / "vocabulary.json", assets / "merges.txt"
    if not (vocab_path.is_file() and merges_path.is_file()):
        return None
    return Tokenizer(hf=_byte_level_bpe(json.loads(vocab_path.read_text(encoding="utf-8")),
                                        merges_path.read_text(encoding="utf-8").splitlines()))


def _byte_level_bpe(vocab: dict[str, int], merge_lines: list[str]) -> Any:
    """Llama 3's tokenizer as the ``tokenizers`` package runs it: Llama 3's regex split, byte-level BPE, and
    the ``<|...|>`` control tokens as special tokens."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    merges = [tuple(m.split(" ")) for m in merge_lines if m.strip() and not m.lstrip().startswith("#version")]
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    specials = [t for t in vocab if re.fullmatch(r"<\|[A-Za-z0-9_]+\|>", t)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def with_special_ids(cfg: Any, tok: Tokenizer | None) -> Any:
    """The config's bos/eos/pad from the preset's tokenizer: a keras-hub config carries no token ids, and
    the ids of a Gemma vocabulary (or a custom one) live in its SentencePiece model. ``<end_of_turn>`` /
    ``<eot_id>`` also stop generation, as keras-hub's ``generate`` does."""
    if tok is None or not hasattr(cfg, "replace"):
        return cfg
    if hasattr(cfg, "text"):  # a model with images: the decoder's ids, and the image token's
        kw = {"text": with_special_ids(cfg.text, tok)}
        pieces = (("image_token_id", "<img>" if hasattr(cfg, "boi_token_id") else "<image>"),
                  ("boi_token_id", "<start_of_image>"), ("eoi_token_id", "<end_of_image>"), ("newline_id", "\n"))
        for field, piece in pieces:
            i = tok.piece_to_id(piece) if hasattr(cfg, field) else -1
            if 0 <= i < cfg.text.vocab_size and tok.id_to_piece(i) == piece:
                kw[field] = i
        return cfg.replace(**kw)
    eos = [t for t in (tok.eos_id, *(tok.piece_to_id(p) for p in ("<end_of_turn>", "<|eot_id|>")
                                     if tok.find_special(p) == p)) if 0 <= t < cfg.vocab_size]
    kw: dict[str, Any] = {}
    if 0 <= tok.bos_id < cfg.vocab_size:
        kw["bos_token_id"] = tok.bos_id
    if eos:
        kw["eos_token_id"] = tuple(dict.fromkeys(eos)) if len(set(eos)) > 1 else eos[0]
    if 0 <= tok.pad_id < cfg.vocab_size:
        kw["pad_token_id"] = tok.pad_id
    elif not 0 <= cfg.pad_token_id < cfg.vocab_size and eos:  # (Llama 3 pads with an end token)
        kw["pad_token_id"] = eos[0]
    return cfg.replace(**kw)


# ---- export ---------------------------------------------------------------------------------------


def export_preset(path: str | os.PathLike, fam: Family, cfg: Any, flat: dict[str, np.ndarray],
                  tokenizer: Tokenizer | None, dtype: Any = np.float32) -> Path:
    """A preset folder keras-hub's ``from_preset`` loads: config.json, metadata.json, model.weights.h5 and, with
    a tokenizer, tokenizer.json + its assets (and preprocessor.json for the text Gemma backbones)."""
    spec = keras_spec(fam)
    class_name, args, module, task, (tok_module, tok_class) = spec.to_config(cfg)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    dtype_name = "bfloat16" if np.dtype(dtype).name == "bfloat16" else np.dtype(dtype).name
    backbone = kio.keras_object(module, class_name, {"name": _snake(class_name), "trainable": True,
                                                     "dtype": kio.dtype_policy(dtype_name), **args})
    tok_json = _write_tokenizer(out, tokenizer, tok_module, tok_class)
    n_params = sum(int(np.prod(a.shape)) for a in flat.values())
    text_only = class_name == "GemmaBackbone" or (class_name == "Gemma3Backbone" and not args.get("vision_encoder"))
    if tok_json is not None and text_only:  # what CausalLM.from_preset builds its preprocessor from
        extra = {"image_converter": None, "num_vision_tokens_per_image": 0, "max_images_per_prompt": 0} \
            if class_name == "Gemma3Backbone" else {}
        kio.write_json(out / kio.PREPROCESSOR_FILE, kio.keras_object(
            module.replace("_backbone", "_causal_lm_preprocessor"), task + "Preprocessor", {
                "name": _snake(task + "Preprocessor"), "trainable": True, "dtype": kio.dtype_policy("float32"),
                "tokenizer": tok_json, "config_file": kio.PREPROCESSOR_FILE, "sequence_length": 1024,
                "add_start_token": True, "add_end_token": True, **extra}))
    kio.write_preset_files(out, backbone, tok_json, {
        "keras_hub_version": KERAS_HUB_FORMAT, "parameter_count": n_params,
        "date_saved": datetime.datetime.now().strftime("%Y-%m-%d@%H:%M:%S"), "tasks": ["CausalLM"],
        "written_by": "gemmax"})
    kio.write_h5(out / kio.WEIGHTS_FILE, ((n, a.astype(dtype)) for n, a in table_to_hf(flat, spec.table(cfg))))
    return out


def _write_tokenizer(out: Path, tokenizer: Tokenizer | None, module: str, class_name: str) -> dict | None:
    """The tokenizer's assets and config (tokenizer.json) as keras-hub saves them: a SentencePiece model for
    Gemma's tokenizers, vocabulary.json + merges.txt for Llama 3's byte-level BPE; None when there is none."""
    if tokenizer is None:
        return None
    config: dict[str, Any] = {"name": _snake(class_name), "trainable": True, "dtype": kio.dtype_policy("int32"),
                              "config_file": kio.TOKENIZER_FILE, "sequence_length": None}
    assets = out / kio.TOKENIZER_ASSETS
    if getattr(tokenizer, "_sp", None) is not None and class_name != "Llama3Tokenizer":
        assets.mkdir(parents=True, exist_ok=True)
        (assets / "vocabulary.spm").write_bytes(tokenizer._sp.serialized_model_proto())
        config.update(proto=None, add_bos=False, add_eos=False)
        if class_name == "Gemma3Tokenizer":  # its vision tokens are required only when the vocabulary has them
            config["has_vision_tokens"] = tokenizer.find_special("<img>") == "<img>"
    elif getattr(tokenizer, "_hf", None) is not None and class_name == "Llama3Tokenizer":
        model = json.loads(tokenizer._hf.to_str())["model"]
        if model.get("type") != "BPE":
            raise ValueError(f"a Llama 3 preset needs a BPE tokenizer, not {model.get('type')}")
        vocab = tokenizer._hf.get_vocab(with_added_tokens=True)
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        assets.mkdir(parents=True, exist_ok=True)
        (assets / "vocabulary.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (assets / "merges.txt").write_text("\n".join(merges) + "\n", encoding="utf-8")
        specials = sorted(t for t in vocab if re.fullmatch(r"<\|[A-Za-z0-9_]+\|>", t))
        config.update(add_prefix_space=False, unsplittable_tokens=specials)
    else:
        return None  # a tokenizer keras-hub's class for this model does not read: the preset goes without
    return kio.keras_object(module, class_name, config)


def _snake(name: str) -> str:
    """Keras' default object name of a class: ``GemmaBackbone`` -> ``gemma_backbone``."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


# ---- LoRA ------------------------------------------------------------------------------------------


def _per_head(node: LinearNode, keras_a_ndim: int) -> bool:
    """Keras factors a kernel along its last axis only (``a`` is ``kernel.shape[:-1] + (r,)``); when that
    leaves more axes in ``a`` than the gemmax node has inputs (query/key/value ``[heads, hidden, head_dim]``,
    whose one input is hidden), Keras keeps one factor per head. Otherwise (attention output, MLP, the ViT's
    Dense layers) both factor the same inputs and the pair only changes shape."""
    return keras_a_ndim - 1 > len(node.in_dims)


def import_lora(params: dict, fam: Family, cfg: Any, path: str | os.PathLike, dtype: Any = jnp.float32) -> dict:
    """Params with the adapters of a keras-hub ``*.lora.h5`` file (``backbone.save_lora_weights``) as gemmax
    adapters, exactly: a per-head pair of rank r becomes one pair of rank heads*r (block-diagonal B), a plain
    dense pair stays as it is. Keras applies ``alpha / rank`` = 1 (keras-hub's ``enable_lora(rank)``)."""
    spec = keras_spec(fam)
    rank, factors = kio.read_lora_file(path)
    where = spec.lora_layers(cfg)
    nodes = fam.linear_nodes(cfg)
    table = spec.table(cfg)
    unknown = sorted(set(factors) - set(where))
    if unknown:
        raise kio.KerasPresetError(f"{path}: LoRA entries {unknown[:6]} are not dense layers of this "
                                   f"{fam.name} model's decoder (a LoRA file of another model?)")
    per_node: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
    for idx, (a, b) in factors.items():
        key, layer = where[idx]
        node = nodes[key]
        kshape = lora.kernel_shape(get_node(params, node.path), node)
        if _per_head(node, a.ndim):
            fwd = table["/".join(node.path) + "/kernel"][1]
            pair = kio.keras_lora_to_factors(np.asarray(fwd(a)), b)  # the layout change only permutes axes
        else:
            pair = (a, b)
        want_a, want_b = lora.lora_shapes(node, kshape, pair[0].shape[-1])
        if pair[0].size != np.prod(want_a[1:]) or pair[1].size != np.prod(want_b[1:]):
            raise kio.KerasPresetError(f"{path}: lora/{idx} ({key}, layer {layer}) has factors {a.shape} / "
                                       f"{b.shape}, which do not fit kernel {kshape[1:]}")
        per_node.setdefault(key, {})[layer] = (pair[0].reshape(want_a[1:]), pair[1].reshape(want_b[1:]))
    for key, layers in per_node.items():
        node = nodes[key]
        if not has_node(params, node.path) or "lora_a" in get_node(params, node.path):
            raise ValueError(f"{key} already carries LoRA factors (merge_lora first)")
        tree = get_node(params, node.path)
        shape = lora.kernel_shape(tree, node)
        r = max(p[0].shape[-1] for p in layers.values())
        a_shape, b_shape = lora.lora_shapes(node, shape, r)
        big_a, big_b = np.zeros(a_shape, np.float32), np.zeros(b_shape, np.float32)
        for i, (a, b) in layers.items():  # layers the file leaves out keep zero adapters
            big_a[i, ..., : a.shape[-1]] = a
            big_b[i, : b.shape[0]] = b
        params = set_node(params, node.path, dict(tree, lora_a=jnp.asarray(big_a, dtype),
                                                  lora_b=jnp.asarray(big_b, dtype),
                                                  lora_scale=jnp.ones((shape[0],), jnp.float32)))
    return params


def export_lora(params: dict, fam: Family, cfg: Any, path: str | os.PathLike) -> Path:
    """gemmax adapters as a keras-hub ``*.lora.h5`` file that ``backbone.load_lora_weights`` reads, exact:
    per-head kernels get the smallest shared ``b`` that reproduces every head's update (SVD), and every entry
    is padded to one rank. Entries are written for keras-hub's default targets (query, value; zero where
    gemmax has no adapter) plus every adapted layer; a Keras backbone reads the non-default ones after
    ``enable_lora(rank, target_layer_names=[...])`` names them."""
    spec = keras_spec(fam)
    nodes = fam.linear_nodes(cfg)
    adapted = set(lora.lora_targets(params, nodes))
    if not adapted:
        raise ValueError("the model carries no LoRA adapters to export")
    table = spec.table(cfg)
    entries: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    deltas: dict[str, np.ndarray] = {}  # every layer's update of a per-head node, computed once
    for idx, (key, layer) in spec.lora_layers(cfg).items():
        if key not in adapted and key not in KERAS_DEFAULT_LORA:
            continue
        node = nodes[key]
        tree = get_node(params, node.path)
        inv = table["/".join(node.path) + "/kernel"][2]
        kshape = lora.kernel_shape(tree, node)[1:]
        if key not in adapted:
            entries[idx] = (np.zeros((*_keras_shape(inv, kshape)[:-1], 1), np.float32),
                            np.zeros((1, _keras_shape(inv, kshape)[-1]), np.float32))
            continue
        a = np.asarray(jax.device_get(tree["lora_a"][layer]), np.float32)
        b = np.asarray(jax.device_get(tree["lora_b"][layer]), np.float32)
        scale = float(np.asarray(jax.device_get(tree["lora_scale"]))[layer])
        kk = _keras_shape(inv, kshape)
        if _per_head(node, len(kk)):
            if key not in deltas:
                deltas[key] = np.asarray(jax.device_get(lora.lora_delta(tree, node)), np.float32)
            ka, kb = kio.factors_to_keras_lora(deltas[key][layer])
            entries[idx] = (np.asarray(inv(ka)), kb)
        else:
            r = a.shape[-1]
            entries[idx] = (a.reshape(*kk[:-1], r), scale * b.reshape(r, kk[-1]))
    rank = max(a.shape[-1] for a, _ in entries.values())
    padded = {i: (np.concatenate([a, np.zeros((*a.shape[:-1], rank - a.shape[-1]), np.float32)], -1),
                  np.concatenate([b, np.zeros((rank - b.shape[0], b.shape[1]), np.float32)], 0))
              for i, (a, b) in entries.items()}
    return kio.write_lora_file(path, rank, padded)


def _keras_shape(inv: Any, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(np.asarray(inv(np.empty(shape, np.int8))).shape)


