"""GGUF files of the Gemma 3n text decoder (llama.cpp's ``gemma3n`` architecture) in Hugging Face terms.

Tensor names are llama.cpp's own table (``gguf.get_tensor_name_map``). llama.cpp stores the weights as
transformers does (Gemma 3n norms are ``x * w``: no ``+1`` folded in), except:

* the AltUp projections and un-embedding projections (``model.altup_projections.{j}`` and
  ``model.altup_unembed_projections.{j}``, j < altup_num_inputs - 1) are stacked into one ``altup_proj`` /
  ``altup_unembd_proj`` tensor each;
* the per-layer embedding table is padded with zero rows to the whole vocabulary (the image and audio token
  ids), so llama.cpp reads zeros where transformers reads row 0; gemmax records the table's real height in
  ``gemmax.vocab_size_per_layer_input`` and cuts the padding off on reading; a file without that key is read
  with llama.cpp's meaning;
* each layer's target activation sparsity is stored as the standard-normal quantile the gaussian top-k uses
  (``activation_sparsity_scale``), read back through the normal CDF;
* LAuReL's rank comes from its tensors' shape; ``altup_coef_clip`` is not recorded (llama.cpp does not clip):
  transformers' default 120 is read.

This module works on transformers config dicts, so the family module (``gemmax.models.gemma3n``) can use it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

from gemmax.io.gguf import HFSource, HFView, _gguf, llama_cpp_name, name_map, open_hf_view, token_fields, write_file
from gemmax.models.gemma.gguf import add_tokenizer

ARCH = "gemma3n"
_PLE_ROWS_KEY = "gemmax.vocab_size_per_layer_input"

#: Every weight of one decoder layer, by its transformers name under ``model.layers.{i}.``
LAYER_TENSORS = (
    "input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.q_norm.weight", "self_attn.k_proj.weight",
    "self_attn.k_norm.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
    "post_attention_layernorm.weight", "pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight", "laurel.linear_left.weight",
    "laurel.linear_right.weight", "laurel.post_laurel_norm.weight", "altup.correct_output_scale",
    "altup.correction_coefs.weight", "altup.prediction_coefs.weight", "altup.modality_router.weight",
    "altup.router_norm.weight", "per_layer_input_gate.weight", "per_layer_projection.weight",
    "post_per_layer_input_norm.weight",
)
GLOBAL_TENSORS = ("model.embed_tokens.weight", "model.embed_tokens_per_layer.weight",
                  "model.per_layer_model_projection.weight", "model.per_layer_projection_norm.weight",
                  "model.norm.weight")
#: stacked in the file: transformers' per-index tensors -> llama.cpp's one tensor
STACKED = {"model.altup_projections": "altup_proj.weight",
           "model.altup_unembed_projections": "altup_unembd_proj.weight"}


# ---- metadata <-> config ---------------------------------------------------------------------------------


def _sparsity_scale(s: float) -> float:
    """The standard-normal quantile of a target sparsity (what llama.cpp's converter stores)."""
    return -math.inf if s <= 0.0 else NormalDist().inv_cdf(s)


def _sparsity(scale: float) -> float:
    return 0.0 if scale == -math.inf else round(NormalDist().cdf(float(scale)), 6)


def _hf_config(md: Mapping[str, Any], tok: Mapping[str, Any], raw: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """transformers' ``gemma3n_text`` config.json from llama.cpp's metadata and tensor table."""

    def key(name: str, default: Any = None) -> Any:
        return md.get(f"{ARCH}.{name}", default)

    need = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count",
            "attention.sliding_window_pattern", "embedding_length_per_layer_input")
    missing = [k for k in need if key(k) is None]
    missing += [t for t in ("token_embd.weight", "per_layer_token_embd.weight", "blk.0.laurel_l.weight")
                if t not in raw]
    if missing:
        raise ValueError(f"{path.name}: a gemma3n GGUF file needs {', '.join(missing)}")
    n = int(key("block_count"))
    swa = [bool(x) for x in key("attention.sliding_window_pattern")]
    ff = key("feed_forward_length")
    ff = [int(x) for x in (ff if isinstance(ff, (list, np.ndarray)) else [ff] * n)]
    heads = int(key("attention.head_count"))
    scales = key("activation_sparsity_scale")
    full: dict[str, Any] = {"rope_type": "default", "rope_theta": float(key("rope.freq_base", 1_000_000.0))}
    if key("rope.scaling.type") == "linear" and float(key("rope.scaling.factor", 1.0)) != 1.0:
        full.update(rope_type="linear", factor=float(key("rope.scaling.factor")))
    cap = key("final_logit_softcapping")
    ple_rows = int(md.get(_PLE_ROWS_KEY) or raw["per_layer_token_embd.weight"].ne[-1])
    return {
        "model_type": "gemma3n_text",
        "vocab_size": int(raw["token_embd.weight"].ne[-1]),
        "hidden_size": int(key("embedding_length")),
        "intermediate_size": ff,
        "num_hidden_layers": n,
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": int(key("attention.key_length", int(key("embedding_length")) // heads)),
        "max_position_embeddings": int(key("context_length", 32768)),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "sliding_window": int(key("attention.sliding_window", 512)),
        "layer_types": ["sliding_attention" if s else "full_attention" for s in swa],
        "rope_parameters": {"full_attention": full, "sliding_attention": {
            "rope_type": "default", "rope_theta": float(key("rope.freq_base_swa", 10_000.0))}},
        "final_logit_softcapping": float(cap) if cap else None,
        "vocab_size_per_layer_input": ple_rows,
        "hidden_size_per_layer_input": int(key("embedding_length_per_layer_input")),
        "altup_num_inputs": int(key("altup.num_inputs", 4)),
        "altup_active_idx": int(key("altup.active_idx", 0)),
        "altup_correct_scale": "blk.0.altup_correct_scale.weight" in raw,
        "num_kv_shared_layers": int(key("attention.shared_kv_layers", 0) or 0),
        "laurel_rank": int(raw["blk.0.laurel_l.weight"].ne[-1]),
        "activation_sparsity_pattern": ([_sparsity(s) for s in scales] if scales is not None else [0.0] * n),
        **token_fields(md, tok, ("<end_of_turn>",)),
    }


# ---- reading ---------------------------------------------------------------------------------------------


def read(path: str | os.PathLike[str]) -> HFView:
    """A Gemma 3n GGUF file as a lazy transformers state dict plus its config. A tensor this reader cannot
    place is an error naming it."""
    path = Path(path)

    def build(md: dict[str, Any], tok: dict[str, Any], raw: dict[str, Any],
              load: Any) -> tuple[dict[str, Any], dict[str, HFSource]]:
        hf = _hf_config(md, tok, raw, path)
        n, d = hf["num_hidden_layers"], hf["hidden_size"]
        tmap = name_map(ARCH, n)
        sources: dict[str, HFSource] = {}
        names = [*GLOBAL_TENSORS, *(f"model.layers.{i}.{t}" for i in range(n) for t in LAYER_TENSORS)]
        for name in names:
            g = llama_cpp_name(tmap, name)
            if g is not None and g in raw:
                sources[name] = HFSource(g, tuple(reversed(raw[g].ne)) or (1,))
        ple = sources["model.embed_tokens_per_layer.weight"]
        rows = hf["vocab_size_per_layer_input"]
        if rows != ple.shape[0]:
            sources["model.embed_tokens_per_layer.weight"] = HFSource(
                ple.gguf_name, (rows, *ple.shape[1:]), lambda a, r=rows: a[:r])
        for prefix, g in STACKED.items():
            if g in raw:
                for j in range(int(raw[g].ne[-1])):
                    sources[f"{prefix}.{j}.weight"] = HFSource(g, (d, d), lambda a, j=j: a[j])
        unread = sorted(set(raw) - {s.gguf_name for s in sources.values()})
        if unread:
            raise ValueError(f"{path.name}: tensors a Gemma 3n text model has no place for: "
                             f"{', '.join(unread[:8])}{' ...' if len(unread) > 8 else ''}")
        return hf, sources

    return open_hf_view(path, (ARCH,), build)


# ---- writing ---------------------------------------------------------------------------------------------


class _Ids:
    """The special ids and vocabulary size the tokenizer fields need, read from a config dict."""

    def __init__(self, hf: Mapping[str, Any]):
        eos = hf.get("eos_token_id", 1)
        self.family = ARCH
        self.vocab_size = int(hf["vocab_size"])
        self.bos_token_id = int(hf.get("bos_token_id", 2))
        self.pad_token_id = int(hf.get("pad_token_id") or 0)
        self.eos_ids = tuple(eos) if isinstance(eos, list | tuple) else (int(eos),)


def write(path: str | os.PathLike[str], hf_config: Mapping[str, Any], tensors: Mapping[str, np.ndarray],
          tokenizer: Any = None, dtype: str = "f16", chat_template: str | None = None,
          name: str | None = None) -> Path:
    """Write transformers-named Gemma 3n text tensors and their ``gemma3n_text`` config as a ``gemma3n``
    GGUF file, with the metadata and layout llama.cpp's converter writes (see the module docstring)."""
    hf = dict(hf_config)
    n, vocab = int(hf["num_hidden_layers"]), int(hf["vocab_size"])
    inter = hf["intermediate_size"]
    rope = hf.get("rope_parameters") or {}
    full, slide = rope.get("full_attention") or {}, rope.get("sliding_attention") or {}
    if full.get("rope_type", "default") not in ("default", "linear"):
        raise ValueError(f"GGUF cannot record {full.get('rope_type')!r} RoPE scaling")
    linear = full.get("rope_type") == "linear"
    metadata = {
        "name": name or hf.get("_name_or_path") or "gemmax-gemma3n",
        "context_length": int(hf.get("max_position_embeddings", 32768)),
        "embedding_length": int(hf["hidden_size"]),
        "block_count": n,
        "feed_forward_length": [int(x) for x in inter] if isinstance(inter, list | tuple) else int(inter),
        "head_count": int(hf["num_attention_heads"]),
        "head_count_kv": int(hf["num_key_value_heads"]),
        "layer_norm_rms_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "key_length": int(hf["head_dim"]),
        "value_length": int(hf["head_dim"]),
        "rope_freq_base": float(full.get("rope_theta", 1_000_000.0)),
        "rope_freq_base_swa": float(slide.get("rope_theta", 10_000.0)),
        "rope_scaling_type": _gguf().RopeScalingType.LINEAR if linear else None,
        "rope_scaling_factor": float(full["factor"]) if linear else None,
        "final_logit_softcapping": float(hf["final_logit_softcapping"]) if hf.get("final_logit_softcapping") else None,
        "sliding_window": int(hf.get("sliding_window", 512)),
        "sliding_window_pattern": [t == "sliding_attention" for t in hf["layer_types"]],
        "altup_active_idx": int(hf.get("altup_active_idx", 0)),
        "altup_num_inputs": int(hf.get("altup_num_inputs", 4)),
        "embedding_length_per_layer_input": int(hf["hidden_size_per_layer_input"]),
        "shared_kv_layers": int(hf.get("num_kv_shared_layers", 0)),
        "activation_sparsity_scale": [_sparsity_scale(float(s)) for s in hf["activation_sparsity_pattern"]],
        _PLE_ROWS_KEY: int(hf.get("vocab_size_per_layer_input") or vocab),
    }
    tmap = name_map(ARCH, n)

    def named() -> Iterator[tuple[str, np.ndarray]]:
        stacks: dict[str, dict[int, np.ndarray]] = {g: {} for g in STACKED.values()}
        for hf_name, arr in tensors.items():
            a = np.asarray(arr, dtype=np.float32)
            prefix, _, rest = hf_name.rpartition(".")[0].rpartition(".")
            if prefix in STACKED and rest.isdigit():
                stacks[STACKED[prefix]][int(rest)] = a
                continue
            if hf_name == "lm_head.weight":
                continue  # tied: llama.cpp reuses token_embd
            g = llama_cpp_name(tmap, hf_name)
            if g is None:
                raise ValueError(f"no GGUF name for tensor {hf_name!r} (arch {ARCH})")
            if hf_name == "model.embed_tokens_per_layer.weight" and a.shape[0] < vocab:
                a = np.concatenate([a, np.zeros((vocab - a.shape[0], a.shape[1]), np.float32)])
            yield g, a.reshape(a.shape or (1,))
        for g, parts in stacks.items():
            if parts:
                yield g, np.stack([parts[j] for j in sorted(parts)])

    return write_file(path, ARCH, metadata, named(), dtype,
                      lambda w: add_tokenizer(w, _Ids(hf), tokenizer, chat_template))


__all__ = ["ARCH", "read", "write", "LAYER_TENSORS", "GLOBAL_TENSORS"]
