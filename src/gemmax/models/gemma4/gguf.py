"""GGUF files of Gemma 4 text (llama.cpp's ``gemma4`` architecture) in Hugging Face terms.

Tensor names are llama.cpp's own table (``gguf.get_tensor_name_map``), so a file llama.cpp's converter wrote
and one gemmax writes name every tensor alike. llama.cpp stores Gemma 4 weights as transformers does (its
norms are ``x * w``, no ``+1`` folded in; experts as ``[E, 2I, D]`` / ``[E, D, I]``), with these exceptions:

* the router's input scale and per-expert scale are ``ffn_gate_inp.scale`` and ``ffn_down_exps.scale``;
* each layer's output scalar is ``layer_output_scale.weight``;
* proportional RoPE on the global layers is a ``rope_freqs`` tensor: factor 1 on the rotated frequencies,
  1e30 (no rotation) on the rest, so the rotated fraction is read back from it;
* the config is metadata: per-layer arrays for the sliding-window pattern, the KV heads (local and global
  differ) and the MLP width (double-wide KV-sharing layers); ``key_length`` is the global head dim and
  ``key_length_swa`` the local one; a global layer without ``attn_v`` shares one projection for keys and
  values (``attention_k_eq_v``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from gemmax.io.gguf import HFSource, HFView, llama_cpp_name, name_map, open_hf_view, token_fields, write_file
from gemmax.models.gemma.gguf import add_tokenizer
from gemmax.models.gemma4.config import GLOBAL, LOCAL, Gemma4Config, from_hf_config
from gemmax.models.gemma4.hf import hf_table, hf_unused

ARCH = "gemma4"
#: rope_freqs entries of frequencies that do not rotate (llama.cpp's converter writes 1e30)
_NO_ROTATION = 1e29


def hf_to_gguf_name(name: str, tmap: Any) -> str | None:
    """llama.cpp's tensor name of a transformers Gemma 4 text tensor (``model.layers.{i}...``), or None."""
    layer = name.rpartition(".")[0] + "."
    if name.endswith(".router.scale"):
        g = tmap.get_name(layer + "proj")
        return None if g is None else f"{g}.scale"
    if name.endswith(".router.per_expert_scale"):
        g = tmap.get_name(layer.removesuffix("router.") + "experts.down_proj")
        return None if g is None else f"{g}.scale"
    return llama_cpp_name(tmap, name)


def _hf_names(cfg: Gemma4Config) -> Iterator[str]:
    for names, _, _ in hf_table(cfg).values():
        yield from ([names] if isinstance(names, str) else names)


# ---- reading ---------------------------------------------------------------------------------------------


def _per_layer(v: Any, n: int, what: str) -> list[int]:
    vals = [int(x) for x in (v if isinstance(v, (list, np.ndarray)) else [v] * n)]
    if len(vals) != n:
        raise ValueError(f"GGUF {what} has {len(vals)} entries for {n} layers")
    return vals


def _hf_config(md: Mapping[str, Any], tok: Mapping[str, Any], raw: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """transformers' ``gemma4_text`` config.json from llama.cpp's metadata and tensor table."""

    def key(name: str, default: Any = None) -> Any:
        return md.get(f"{ARCH}.{name}", default)

    need = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count",
            "attention.sliding_window_pattern")
    missing = [k for k in need if key(k) is None]
    if missing:
        raise ValueError(f"{path.name}: GGUF metadata lacks {', '.join(f'{ARCH}.{k}' for k in missing)}")
    n = int(key("block_count"))
    swa = [bool(x) for x in key("attention.sliding_window_pattern")]
    if len(swa) != n:
        raise ValueError(f"{path.name}: sliding_window_pattern has {len(swa)} entries for {n} layers")
    types = [LOCAL if s else GLOBAL for s in swa]
    heads = max(_per_layer(key("attention.head_count"), n, "head_count"))
    kv = _per_layer(key("attention.head_count_kv", heads), n, "head_count_kv")
    shared = int(key("attention.shared_kv_layers", 0) or 0)
    owners = range(n - shared)
    ff = _per_layer(key("feed_forward_length"), n, "feed_forward_length")
    global_hd = int(key("attention.key_length"))
    local_hd = int(key("attention.key_length_swa", global_hd))
    if int(key("rope.dimension_count_swa", local_hd)) != local_hd:
        raise ValueError(f"{path.name}: partial RoPE on the sliding-window layers is not a Gemma 4 feature")
    k_eq_v = any(types[i] == GLOBAL and f"blk.{i}.attn_v.weight" not in raw for i in owners)
    local_kv = next((kv[i] for i in range(n) if types[i] == LOCAL), kv[0])
    global_kv = next((kv[i] for i in range(n) if types[i] == GLOBAL), local_kv)
    if "output.weight" in raw:
        raise ValueError(f"{path.name}: an untied output head (output.weight) is not a Gemma 4 layout")
    if "token_embd.weight" not in raw:
        raise ValueError(f"{path.name}: GGUF file lacks token_embd.weight")
    ple = int(key("embedding_length_per_layer_input", 0) or 0)
    experts = int(key("expert_count", 0) or 0)
    cap = key("final_logit_softcapping")
    return {
        "model_type": "gemma4_text",
        "vocab_size": int(raw["token_embd.weight"].ne[-1]),
        "hidden_size": int(key("embedding_length")),
        "intermediate_size": ff[0],
        "num_hidden_layers": n,
        "num_attention_heads": heads,
        "num_key_value_heads": local_kv,
        "head_dim": local_hd,
        "global_head_dim": global_hd,
        "num_global_key_value_heads": global_kv if k_eq_v else None,
        "attention_k_eq_v": k_eq_v,
        "max_position_embeddings": int(key("context_length", 131072)),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "sliding_window": int(key("attention.sliding_window", 512)),
        "layer_types": ["sliding_attention" if t == LOCAL else "full_attention" for t in types],
        "rope_parameters": {
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 1.0,
                               "rope_theta": float(key("rope.freq_base", 1_000_000.0))},
            "sliding_attention": {"rope_type": "default", "rope_theta": float(key("rope.freq_base_swa", 10_000.0))},
        },
        "final_logit_softcapping": float(cap) if cap else None,
        "hidden_size_per_layer_input": ple,
        "vocab_size_per_layer_input": int(raw["per_layer_token_embd.weight"].ne[-1]) if ple else None,
        "num_kv_shared_layers": shared,
        "use_double_wide_mlp": any(ff[i] == 2 * ff[0] for i in range(n - shared, n)) and ff[0] > 0,
        "enable_moe_block": bool(experts),
        "num_experts": experts or None,
        "top_k_experts": int(key("expert_used_count", 0) or 0) or None,
        "moe_intermediate_size": int(key("expert_feed_forward_length", 0) or 0) or None,
        **token_fields(md, tok, ("<turn|>", "<end_of_turn>")),
    }


def _candidates(cfg: Gemma4Config) -> list[str]:
    """Every transformers name a Gemma 4 file of this config may hold: the model's, plus the key / value
    weights published checkpoints carry for layers that read shared ones (skipped later, by name)."""
    extra = [f"model.{stem}weight" for stem in hf_unused(cfg)]
    return [*_hf_names(cfg), *extra]


def read(path: str | os.PathLike[str]) -> HFView:
    """A Gemma 4 GGUF file as a lazy transformers state dict plus its config (nothing dequantized yet but the
    small ``rope_freqs`` tensor). A tensor this reader cannot place is an error naming it."""
    path = Path(path)

    def build(md: dict[str, Any], tok: dict[str, Any], raw: dict[str, Any],
              load: Any) -> tuple[dict[str, Any], dict[str, HFSource]]:
        hf = _hf_config(md, tok, raw, path)
        if "rope_freqs.weight" in raw:
            freqs = load("rope_freqs.weight").reshape(-1)
            rotated = float(np.count_nonzero(freqs < _NO_ROTATION)) / len(freqs)
            hf["rope_parameters"]["full_attention"]["partial_rotary_factor"] = rotated
        cfg = from_hf_config(hf)
        tmap = name_map(ARCH, cfg.num_layers)
        sources: dict[str, HFSource] = {}
        for name in _candidates(cfg):
            g = hf_to_gguf_name(name, tmap)
            if g is not None and g in raw:
                sources[name] = HFSource(g, tuple(reversed(raw[g].ne)) or (1,))
        unread = sorted(set(raw) - {s.gguf_name for s in sources.values()} - {"rope_freqs.weight"})
        if unread:
            raise ValueError(f"{path.name}: tensors a Gemma 4 text model of this config has no place for: "
                             f"{', '.join(unread[:8])}{' ...' if len(unread) > 8 else ''}")
        return hf, sources

    return open_hf_view(path, (ARCH,), build)


# ---- writing ---------------------------------------------------------------------------------------------


def _rope_freqs(cfg: Gemma4Config) -> np.ndarray:
    half = cfg.global_hd // 2
    rot = int(cfg.global_hd * cfg.global_partial_rotary / 2)
    return np.array([1.0] * rot + [1e30] * (half - rot), dtype=np.float32)


def write(path: str | os.PathLike[str], hf_config: Mapping[str, Any], tensors: Mapping[str, np.ndarray],
          tokenizer: Any = None, dtype: str = "f16", chat_template: str | None = None,
          name: str | None = None) -> Path:
    """Write transformers-named Gemma 4 text tensors and config as a ``gemma4`` GGUF file, with the metadata
    llama.cpp's converter writes (see the module docstring)."""
    cfg = from_hf_config(dict(hf_config))
    if cfg.global_rope_factor != 1.0:
        raise ValueError("GGUF cannot record a scaled proportional RoPE (global_rope_factor != 1)")
    n, swa = cfg.num_layers, [t == LOCAL for t in cfg.layer_types]
    experts = cfg.num_experts or None
    metadata = {
        "name": name or cfg.name or "gemmax-gemma4",
        "context_length": cfg.max_position_embeddings,
        "embedding_length": cfg.hidden_size,
        "block_count": n,
        "feed_forward_length": [cfg.mlp_width(i >= cfg.first_shared) for i in range(n)],
        "head_count": cfg.num_heads,
        "head_count_kv": [cfg.num_kv_heads if s else cfg.global_kv_heads for s in swa],
        "layer_norm_rms_eps": cfg.norm_eps,
        "key_length": cfg.global_hd,
        "value_length": cfg.global_hd,
        "key_length_swa": cfg.head_dim,
        "value_length_swa": cfg.head_dim,
        "rope_dimension_count": cfg.global_hd,
        "rope_dimension_count_swa": cfg.head_dim,
        "rope_freq_base": cfg.rope_theta,
        "rope_freq_base_swa": cfg.rope_local_theta,
        "sliding_window": cfg.sliding_window,
        "sliding_window_pattern": swa,
        "shared_kv_layers": cfg.num_kv_shared_layers,
        "embedding_length_per_layer_input": cfg.ple_dim,
        "final_logit_softcapping": cfg.final_logit_softcap or None,
        "expert_count": experts,
        "expert_used_count": experts and cfg.top_k,
        "expert_feed_forward_length": experts and cfg.moe_intermediate_size,
    }
    tmap = name_map(ARCH, n)

    def named() -> Iterator[tuple[str, np.ndarray]]:
        for hf_name, arr in tensors.items():
            if hf_name == "lm_head.weight":
                continue  # tied: llama.cpp reuses token_embd
            g = hf_to_gguf_name(hf_name, tmap)
            if g is None:
                raise ValueError(f"no GGUF name for tensor {hf_name!r} (arch {ARCH})")
            yield g, np.asarray(arr, dtype=np.float32).reshape(np.shape(arr) or (1,))
        if cfg.global_partial_rotary != 1.0:
            yield "rope_freqs.weight", _rope_freqs(cfg)

    return write_file(path, ARCH, metadata, named(), dtype,
                      lambda w: add_tokenizer(w, cfg, tokenizer, chat_template))


__all__ = ["ARCH", "read", "write", "hf_to_gguf_name"]
