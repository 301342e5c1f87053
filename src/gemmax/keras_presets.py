"""keras-hub presets in and out of ``CausalLM``, and Keras' per-head LoRA to and from gemmax adapters.

The file format lives in ``gemmax.io.keras`` and each family's Keras names in its ``Family.keras``
(:class:`~gemmax.models.base.KerasSpec`); this module joins them to a model: which family a preset is, its
config, its weights placed like every other checkpoint's, its tokenizer, and the reverse for export.
"""

from __future__ import annotations

import datetime
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


def load_tokenizer(folder: Path) -> Tokenizer | None:
    """The preset's SentencePiece tokenizer (``assets/tokenizer/vocabulary.spm``), or None."""
    proto = kio.tokenizer_proto(folder)
    return Tokenizer.from_file(proto) if proto is not None else None


def with_special_ids(cfg: Any, tok: Tokenizer | None) -> Any:
    """The config's bos/eos/pad from the preset's tokenizer: a keras-hub config carries no token ids, and
    the ids of a Gemma vocabulary (or a custom one) live in its SentencePiece model. ``<end_of_turn>`` /
    ``<eot_id>`` also stop generation, as keras-hub's ``generate`` does."""
    if tok is None or not hasattr(cfg, "replace") or not hasattr(cfg, "bos_token_id"):
        return cfg
    eos = [t for t in (tok.eos_id, *(tok.piece_to_id(p) for p in ("<end_of_turn>", "<|eot_id|>")
                                     if tok.find_special(p) == p)) if 0 <= t < cfg.vocab_size]
    kw: dict[str, Any] = {}
    if 0 <= tok.bos_id < cfg.vocab_size:
        kw["bos_token_id"] = tok.bos_id
    if eos:
        kw["eos_token_id"] = tuple(dict.fromkeys(eos)) if len(set(eos)) > 1 else eos[0]
    if 0 <= tok.pad_id < cfg.vocab_size:
        kw["pad_token_id"] = tok.pad_id
    return cfg.replace(**kw)


# ---- export ---------------------------------------------------------------------------------------


def export_preset(path: str | os.PathLike, fam: Family, cfg: Any, flat: dict[str, np.ndarray],
                  tokenizer: Tokenizer | None, dtype: Any = np.float32) -> Path:
    """A preset folder keras-hub's ``from_preset`` loads: config.json, metadata.json, model.weights.h5 and,
    with a SentencePiece tokenizer, tokenizer.json + assets/tokenizer/vocabulary.spm."""
    spec = keras_spec(fam)
    class_name, args, module, task, (tok_module, tok_class) = spec.to_config(cfg)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    dtype_name = "bfloat16" if np.dtype(dtype).name == "bfloat16" else np.dtype(dtype).name
    backbone = kio.keras_object(module, class_name, {"name": _snake(class_name), "trainable": True,
                                                     "dtype": kio.dtype_policy(dtype_name), **args})
    tok_json = None
    if tokenizer is not None and getattr(tokenizer, "_sp", None) is not None:
        assets = out / kio.TOKENIZER_ASSETS
        assets.mkdir(parents=True, exist_ok=True)
        (assets / "vocabulary.spm").write_bytes(tokenizer._sp.serialized_model_proto())
        tok_json = kio.keras_object(tok_module, tok_class, {
            "name": _snake(tok_class), "trainable": True, "dtype": kio.dtype_policy("int32"),
            "config_file": kio.TOKENIZER_FILE, "proto": None, "sequence_length": None, "add_bos": False,
            "add_eos": False})
        if tok_class == "Gemma3Tokenizer":  # its vision tokens are required only when the vocabulary has them
            tok_json["config"]["has_vision_tokens"] = tokenizer.find_special("<img>") == "<img>"
    n_params = sum(int(np.prod(a.shape)) for a in flat.values())
    if tok_json is not None:  # what CausalLM.from_preset builds its preprocessor from
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


def _snake(name: str) -> str:
    """Keras' default object name of a class: ``GemmaBackbone`` -> ``gemma_backbone``."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


# ---- LoRA ------------------------------------------------------------------------------------------


def _per_head(node: LinearNode, ndim: int) -> bool:
    """Keras factors a kernel along its last axis only; when the gemmax node's inputs are not all the other
    axes (query/key/value: ``[heads, hidden, head_dim]`` with hidden the only input), Keras keeps one
    factor per head."""
    return tuple(node.in_dims) != tuple(range(ndim - 1))


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
        fwd = table["/".join(node.path) + "/kernel"][1]
        a_g = np.asarray(fwd(a))  # the table's layout change only permutes axes before the last
        pair = kio.keras_lora_to_factors(a_g, b) if _per_head(node, a_g.ndim) else (a_g, b)
        kshape = get_node(params, node.path)
        kshape = lora.kernel_shape(kshape, node)
        want_a, want_b = lora.lora_shapes(node, kshape, pair[0].shape[-1])
        if pair[0].shape != want_a[1:] or pair[1].shape != want_b[1:]:
            raise kio.KerasPresetError(f"{path}: lora/{idx} ({key}, layer {layer}) has factors {a.shape} / "
                                       f"{b.shape}, which do not fit kernel {kshape[1:]}")
        per_node.setdefault(key, {})[layer] = pair
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
        if _per_head(node, len(kshape)):
            delta = np.asarray(jax.device_get(lora.lora_delta(tree, node)[layer]), np.float32)
            ka, kb = kio.factors_to_keras_lora(delta)
            entries[idx] = (np.asarray(inv(ka)), kb)
        else:
            entries[idx] = (np.asarray(inv(a)), scale * b)
    rank = max(a.shape[-1] for a, _ in entries.values())
    padded = {i: (np.concatenate([a, np.zeros((*a.shape[:-1], rank - a.shape[-1]), np.float32)], -1),
                  np.concatenate([b, np.zeros((rank - b.shape[0], b.shape[1]), np.float32)], 0))
              for i, (a, b) in entries.items()}
    return kio.write_lora_file(path, rank, padded)


def _keras_shape(inv: Any, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(np.asarray(inv(np.empty(shape, np.int8))).shape)


