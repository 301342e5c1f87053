"""GGUF files of the Gemma decoder family (llama.cpp's gemma, gemma2, gemma3, llama) in Hugging Face terms.

Everything downstream of this module speaks Hugging Face: tensor names like
``model.layers.0.self_attn.q_proj.weight`` with torch ``Linear`` layouts ([out, in]) and zero-centred
Gemma norm scales, plus a transformers-style ``config.json`` dict. So the family's name table loads a GGUF
exactly like a safetensors folder. The llama.cpp conventions undone (and redone on write) are:

* Gemma (1, 2, 3) RMSNorm weights are stored with the ``+1`` folded in (``convert_hf_to_gguf.py`` adds
  1 to every ``*norm.weight``); transformers' GGUF loader subtracts it again, and so do we.
* Llama q/k projections are stored with the rows of each head permuted from rotate-half to interleaved
  order (llama.cpp's ``permute``); we invert it.
* A tied output head is not written (``output.weight`` absent means tied).
* What GGUF metadata does not record for Gemma (Gemma 3's local RoPE base 10000 and 5:1 local/global
  pattern, Gemma 2's alternation, query_pre_attn_scalar) is hard-coded in llama.cpp per architecture;
  we apply the same knowledge.

Tensors are dequantized lazily, one at a time, from a memory map: a 27B Q4 file never becomes a 100 GB
float32 dict in RAM.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from gemmax.io.gguf import HFSource, HFView, UnsupportedArchitecture, _gguf, open_hf_view, write_file
from gemmax.io.tokenizer import Tokenizer
from gemmax.models.gemma.config import GLOBAL, LOCAL, ModelConfig, from_hf_config, to_hf_config

__all__ = [
    "GGUFContents",
    "GGUFTensorInfo",
    "SUPPORTED_ARCHS",
    "read_gguf",
    "write_gguf",
    "gguf_to_hf_name",
    "hf_to_gguf_name",
    "add_tokenizer",
]

SUPPORTED_ARCHS = ("gemma", "gemma2", "gemma3", "llama")
_GEMMA_ARCHS = ("gemma", "gemma2", "gemma3")

# sentencepiece / llama.cpp token types (tokenizer.ggml.token_type)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


# ---- tensor names --------------------------------------------------------------------------------------

# GGUF per-block tensor -> HF per-layer module (the ffn_norm meaning depends on the family).
_BLOCK_COMMON = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
}
_BLOCK_SANDWICH = {  # Gemma 2 / 3: four norms per block
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_BLOCK_PLAIN = {"ffn_norm": "post_attention_layernorm"}  # Gemma 1 / Llama: the pre-MLP norm
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def _block_map(arch: str) -> dict[str, str]:
    return {**_BLOCK_COMMON, **(_BLOCK_SANDWICH if arch in ("gemma2", "gemma3") else _BLOCK_PLAIN)}


def gguf_to_hf_name(name: str, arch: str) -> str | None:
    """HF parameter name for a GGUF tensor name, or None for tensors HF has no parameter for."""
    stem, _, suffix = name.rpartition(".")
    if suffix not in ("weight", "bias"):
        return None
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        mod = _block_map(arch).get(parts[2])
        if mod is not None:
            return f"model.layers.{parts[1]}.{mod}.{suffix}"
    return None


def hf_to_gguf_name(name: str, arch: str) -> str | None:
    """GGUF tensor name for an HF parameter name (inverse of :func:`gguf_to_hf_name`)."""
    stem, _, suffix = name.rpartition(".")
    for g, h in _GLOBAL_NAMES.items():
        if stem == h:
            return f"{g}.{suffix}"
    parts = stem.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        for g, h in _block_map(arch).items():
            if parts[3] == h:
                return f"blk.{parts[2]}.{g}.{suffix}"
    return None


def _is_offset_norm(hf_name: str, arch: str) -> bool:
    return arch in _GEMMA_ARCHS and hf_name.endswith("norm.weight")


def _llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation: per head, rotate-half order -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---- reading -------------------------------------------------------------------------------------------


#: where one tensor lives in the file (``qtype``: its GGML type) and how it becomes the HF array
GGUFTensorInfo = HFSource


class GGUFContents(HFView):
    """A parsed GGUF file of the Gemma decoder family: metadata up front, tensors dequantized on demand.

    ``hf_config`` is a transformers config.json dict and ``config`` the gemmax one; ``tensors()`` yields
    ``(hf_name, float32 array)`` one at a time; ``tensor(name)`` fetches one. ``tokenizer_metadata`` holds
    every ``tokenizer.*`` field (token lists as Python lists, scores and types as numpy arrays).
    """

    @property
    def config(self) -> ModelConfig:
        return from_hf_config(self.hf_config)

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yield (hf_name, float32 array) in file order, one dequantized tensor alive at a time."""
        return self.items()


def _fix(hf_name: str, arch: str, hf_config: Mapping[str, Any]) -> Any:
    """The llama.cpp convention to undo on one tensor: a folded ``+1`` on Gemma norms, Llama's q/k rows."""
    if _is_offset_norm(hf_name, arch):
        return lambda w: w - np.float32(1.0)
    if arch == "llama" and hf_name.endswith("self_attn.q_proj.weight"):
        return lambda w: _llama_unpermute(w, int(hf_config["num_attention_heads"]))
    if arch == "llama" and hf_name.endswith("self_attn.k_proj.weight"):
        return lambda w: _llama_unpermute(w, int(hf_config["num_key_value_heads"]))
    return None


def read_gguf(path: str | os.PathLike[str]) -> GGUFContents:
    """Parse a GGUF file's metadata and tensor table (no tensor data is read until asked for).

    Raises ValueError for a non-GGUF or truncated file, an architecture outside
    gemma/gemma2/gemma3/llama, or a tensor type we cannot dequantize.
    """
    path = Path(path)

    def build(md: dict[str, Any], tok: dict[str, Any], raw: dict[str, Any], load: Any) -> tuple[dict, dict]:
        arch = md["general.architecture"]
        hf_config = _hf_config_from_metadata(arch, md, tok, raw, load, path)
        info = {}
        for t in raw.values():
            hf_name = gguf_to_hf_name(t.name, arch)
            if hf_name is not None:  # e.g. rope_freqs.weight: folded into the config instead
                info[hf_name] = HFSource(t.name, tuple(reversed(t.ne)), _fix(hf_name, arch, hf_config),
                                         t.qtype.name)
        return hf_config, info

    try:
        return open_hf_view(path, SUPPORTED_ARCHS, build, view=GGUFContents)
    except UnsupportedArchitecture as e:
        raise ValueError(f"{path.name}: unsupported GGUF architecture {e.arch!r}; gemmax reads "
                         f"{', '.join(SUPPORTED_ARCHS)}") from None


def _first(v: Any) -> Any:
    """Per-layer arrays (some GGUFs store head counts per layer): the model-wide value."""
    if isinstance(v, (list, np.ndarray)):
        vals = [int(x) for x in v]
        return max(vals) if vals else None
    return v


def _token_id(tokens: list[str] | None, piece: str) -> int | None:
    if not tokens:
        return None
    try:
        return tokens.index(piece)
    except ValueError:
        return None


def _infer_llama3_scaling(freqs: np.ndarray, theta: float, head_dim: int, orig: float = 8192.0) -> dict[str, Any]:
    """Recover Llama 3 rope scaling parameters from llama.cpp's ``rope_freqs`` tensor.

    llama.cpp bakes the scaling into per-frequency divisors. Only the factor and the affine map of
    the smooth region are identifiable; we take ``original_max_position_embeddings`` from
    ``rope.scaling.original_context_length`` when the writer recorded it, else 8192 (every Llama 3.x
    uses it), and solve for the low/high frequency factors from the transition band.
    """
    freqs = np.asarray(freqs, dtype=np.float64).reshape(-1)
    factor = float(freqs.max())
    out = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": int(orig)}
    if factor <= 1.0:
        return out
    inv = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv[: len(freqs)]
    band = (freqs > 1.0 + 1e-4) & (freqs < factor - 1e-4)
    if band.sum() >= 2:
        # freqs = 1 / ((1 - s) / factor + s)  =>  s = (1 / freqs - 1 / factor) / (1 - 1 / factor)
        s = (1.0 / freqs[band] - 1.0 / factor) / (1.0 - 1.0 / factor)
        # s = orig / (wavelen * (high - low)) - low / (high - low): linear in 1 / wavelen
        a, b = np.polyfit(1.0 / wavelen[band], s, 1)
        width = orig / a
        low = -b * width
        out.update(low_freq_factor=float(round(low, 4)), high_freq_factor=float(round(low + width, 4)))
    return out


def _hf_config_from_metadata(arch: str, md: dict[str, Any], tok: dict[str, Any], tensors: dict[str, Any],
                             load: Any, path: Path) -> dict[str, Any]:
    """transformers config.json dict from GGUF metadata plus llama.cpp's per-architecture constants."""

    def key(name: str, default: Any = None) -> Any:
        return md.get(f"{arch}.{name}", default)

    missing = [k for k in ("embedding_length", "block_count", "feed_forward_length", "attention.head_count")
               if key(k) is None]
    if missing:
        raise ValueError(f"{path.name}: GGUF metadata lacks {', '.join(f'{arch}.{k}' for k in missing)}")
    d = int(key("embedding_length"))
    n = int(key("block_count"))
    heads = int(_first(key("attention.head_count")))
    kv = int(_first(key("attention.head_count_kv")) or heads)
    ff = int(_first(key("feed_forward_length")))
    tokens = tok.get("tokenizer.ggml.tokens")
    if "token_embd.weight" in tensors:
        vocab = int(tensors["token_embd.weight"].ne[-1])
    elif key("vocab_size") is not None:
        vocab = int(key("vocab_size"))
    elif tokens:
        vocab = len(tokens)
    else:
        raise ValueError(f"{path.name}: cannot tell the vocabulary size (no token_embd.weight)")
    is_gemma = arch in _GEMMA_ARCHS
    if arch == "llama":
        head_dim = int(key("rope.dimension_count") or key("attention.key_length") or d // heads)
    else:
        head_dim = int(key("attention.key_length") or d // heads)
    eps = float(key("attention.layer_norm_rms_epsilon", 1e-6 if is_gemma else 1e-5))
    ctx = int(key("context_length", 8192))
    bos = tok.get("tokenizer.ggml.bos_token_id", 2 if is_gemma else 1)
    eos = tok.get("tokenizer.ggml.eos_token_id", 1 if is_gemma else 2)
    pad = tok.get("tokenizer.ggml.padding_token_id", 0 if is_gemma else None)
    eos_ids = [int(eos)]
    # Instruction-tuned turns end with <end_of_turn> (Gemma) / eot (Llama 3): generation must stop there.
    extra_eos = _token_id(tokens, "<end_of_turn>") if is_gemma else tok.get("tokenizer.ggml.eot_token_id")
    if arch in ("gemma2", "gemma3") and extra_eos is not None and int(extra_eos) not in eos_ids:
        eos_ids.append(int(extra_eos))
    if arch == "llama" and extra_eos is not None and int(extra_eos) not in eos_ids:
        eos_ids.append(int(extra_eos))
    tied = "output.weight" not in tensors

    common: dict[str, Any] = dict(
        vocab_size=vocab, hidden_size=d, num_layers=n, num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
        intermediate_size=ff, max_position_embeddings=ctx, norm_eps=eps, tie_embeddings=tied,
        bos_token_id=int(bos), eos_token_id=tuple(eos_ids) if len(eos_ids) > 1 else eos_ids[0],
        pad_token_id=int(pad) if pad is not None else 0, name=str(md.get("general.name", "") or ""),
        attention_bias="blk.0.attn_q.bias" in tensors,
    )
    if arch == "gemma":
        cfg = ModelConfig(family="gemma", rope_theta=float(key("rope.freq_base", 10000.0)), **common)
    elif arch == "gemma2":
        # llama.cpp: 27B scales queries by 1/sqrt(d_model / heads), the others by 1/sqrt(head_dim)
        qpas = d / heads if n == 46 else head_dim
        cfg = ModelConfig(
            family="gemma2", query_pre_attn_scalar=qpas,
            attn_logit_softcap=float(key("attn_logit_softcapping", 50.0)),
            final_logit_softcap=float(key("final_logit_softcapping", 30.0)),
            sliding_window=int(key("attention.sliding_window", 4096)),
            layer_types=tuple(LOCAL if (i + 1) % 2 else GLOBAL for i in range(n)),
            rope_theta=float(key("rope.freq_base", 10000.0)), use_post_norms=True, **common,
        )
    elif arch == "gemma3":
        qpas = d / heads if n == 62 else head_dim
        scaling = None
        stype = key("rope.scaling.type")
        if stype == "linear" and float(key("rope.scaling.factor", 1.0)) != 1.0:
            scaling = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
        cap = key("final_logit_softcapping")
        cfg = ModelConfig(
            family="gemma3", query_pre_attn_scalar=qpas,
            final_logit_softcap=float(cap) if cap else None,
            sliding_window=int(key("attention.sliding_window", 512 if n < 30 else 1024)),
            layer_types=tuple(LOCAL if (i + 1) % 6 else GLOBAL for i in range(n)),
            rope_theta=float(key("rope.freq_base", 1_000_000.0)), rope_local_theta=10_000.0,
            rope_scaling=scaling, use_qk_norm=True, use_post_norms=True, **common,
        )
    else:  # llama
        theta = float(key("rope.freq_base", 10000.0))
        scaling = None
        stype = key("rope.scaling.type")
        if "rope_freqs.weight" in tensors:
            freqs = load("rope_freqs.weight")
            orig = float(key("rope.scaling.original_context_length", 8192))
            scaling = _infer_llama3_scaling(freqs, theta, head_dim, orig)
        elif stype == "linear" and float(key("rope.scaling.factor", 1.0)) != 1.0:
            scaling = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
        cfg = ModelConfig(
            family="llama", norm_offset=0.0, activation="silu", rope_theta=theta, rope_scaling=scaling,
            scale_embeddings=False, **common,
        )
    hf = to_hf_config(cfg)
    hf["_name_or_path"] = cfg.name
    hf["torch_dtype"] = "float32"
    return hf


# ---- writing -------------------------------------------------------------------------------------------

_ARCH_OF_FAMILY = {"gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3", "llama": "llama"}


def _representable(cfg: ModelConfig) -> list[str]:
    """Config details llama.cpp hard-codes per architecture: a writer cannot express other values."""
    problems = []
    n, d = cfg.num_layers, cfg.hidden_size
    if cfg.family == "gemma2":
        if cfg.layer_types != tuple(LOCAL if (i + 1) % 2 else GLOBAL for i in range(n)):
            problems.append("Gemma 2 layer pattern other than local/global alternation")
        want = d / cfg.num_heads if n == 46 else cfg.head_dim
        if (cfg.query_pre_attn_scalar or cfg.head_dim) != want:
            problems.append(f"query_pre_attn_scalar {cfg.query_pre_attn_scalar} (llama.cpp assumes {want})")
    if cfg.family == "gemma3":
        if cfg.layer_types != tuple(LOCAL if (i + 1) % 6 else GLOBAL for i in range(n)):
            problems.append("Gemma 3 layer pattern other than 5 local : 1 global")
        if cfg.local_theta != 10_000.0:
            problems.append(f"local RoPE base {cfg.local_theta} (llama.cpp assumes 10000)")
        want = d / cfg.num_heads if n == 62 else cfg.head_dim
        if (cfg.query_pre_attn_scalar or cfg.head_dim) != want:
            problems.append(f"query_pre_attn_scalar {cfg.query_pre_attn_scalar} (llama.cpp assumes {want})")
    return problems


def _llama3_rope_freqs(scaling: dict[str, Any], theta: float, head_dim: int) -> np.ndarray:
    """llama.cpp's ``rope_freqs`` tensor: per-frequency divisors implementing Llama 3 rope scaling."""
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    orig = float(scaling.get("original_max_position_embeddings", 8192))
    inv = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv
    low_wl, high_wl = orig / low, orig / high
    out = np.empty_like(inv)
    for i, wl in enumerate(wavelen):
        if wl < high_wl:
            out[i] = 1.0
        elif wl > low_wl:
            out[i] = factor
        else:
            s = (orig / wl - low) / (high - low)
            out[i] = 1.0 / ((1 - s) / factor + s)
    return out.astype(np.float32)


def _placeholder_vocab(cfg: ModelConfig) -> tuple[list[str], np.ndarray, np.ndarray]:
    """A structurally valid vocabulary (specials, 256 byte tokens, fillers) for weight-only exports."""
    tokens = [f"<unused{i}>" for i in range(cfg.vocab_size)]
    types = np.full(cfg.vocab_size, TOKEN_UNUSED, dtype=np.int32)
    specials = {cfg.pad_token_id: "<pad>", cfg.bos_token_id: "<bos>", 3 if cfg.family != "llama" else 0: "<unk>"}
    for e in cfg.eos_ids[:1]:
        specials[e] = "<eos>"
    for i, s in specials.items():
        if 0 <= i < cfg.vocab_size:
            tokens[i] = s
            types[i] = TOKEN_UNKNOWN if s == "<unk>" else TOKEN_CONTROL
    start = max(specials) + 1
    if start + 256 <= cfg.vocab_size:  # all 256 or none: a byte-fallback vocabulary needs every byte
        for b in range(256):
            tokens[start + b] = f"<0x{b:02X}>"
            types[start + b] = TOKEN_BYTE
    return tokens, np.zeros(cfg.vocab_size, dtype=np.float32), types


def write_gguf(
    path: str | os.PathLike[str],
    hf_config: Mapping[str, Any],
    tensors: Mapping[str, np.ndarray],
    tokenizer: Tokenizer | str | os.PathLike[str] | None = None,
    dtype: str = "f16",
    chat_template: str | None = None,
    name: str | None = None,
) -> Path:
    """Write HF-named tensors and a transformers config as a GGUF file llama.cpp can load.

    ``tokenizer`` (a :class:`gemmax.io.tokenizer.Tokenizer` or a tokenizer.model path) is embedded as
    ``tokenizer.ggml.*``; without one a placeholder vocabulary is written so the file still loads.
    ``dtype`` picks the type of 2-D weights: "f32", "f16" or "q8_0" (norms stay F32).
    """
    gguf = _gguf()
    if dtype not in ("f32", "f16", "q8_0"):
        raise ValueError(f"unsupported GGUF dtype {dtype!r}: choose 'f32', 'f16' or 'q8_0'")
    cfg = from_hf_config(dict(hf_config))
    arch = _ARCH_OF_FAMILY[cfg.family]
    for p in _representable(cfg):
        warnings.warn(f"GGUF cannot record {p}; llama.cpp will use its own default", stacklevel=2)
    scaling = cfg.rope_scaling or {}
    if scaling and scaling.get("rope_type") not in ("linear", "llama3"):
        raise ValueError(f"GGUF export does not support rope scaling {scaling!r}")
    if not cfg.tie_embeddings and "lm_head.weight" not in tensors:
        raise ValueError("untied config but tensors lack lm_head.weight")
    llama, linear = arch == "llama", scaling.get("rope_type") == "linear"
    windowed = bool(cfg.sliding_window) and arch in ("gemma2", "gemma3")
    metadata = {
        "name": name or cfg.name or f"gemmax-{arch}",
        "context_length": cfg.max_position_embeddings,
        "embedding_length": cfg.hidden_size,
        "block_count": cfg.num_layers,
        "feed_forward_length": cfg.intermediate_size,
        "head_count": cfg.num_heads,
        "head_count_kv": cfg.num_kv_heads,
        "layer_norm_rms_eps": cfg.norm_eps,
        "rope_freq_base": cfg.rope_theta,
        "rope_dimension_count": cfg.head_dim if llama else None,
        "vocab_size": cfg.vocab_size if llama else None,
        "key_length": None if llama else cfg.head_dim,
        "value_length": None if llama else cfg.head_dim,
        "sliding_window": cfg.sliding_window if windowed else None,
        "attn_logit_softcapping": (cfg.attn_logit_softcap or 0.0) if arch == "gemma2" else None,
        "final_logit_softcapping": (cfg.final_logit_softcap or 0.0) if arch == "gemma2" else None,
        "rope_scaling_type": gguf.RopeScalingType.LINEAR if linear else None,
        "rope_scaling_factor": float(scaling["factor"]) if linear else None,
        # llama.cpp applies Llama 3 scaling through the rope_freqs tensor; the original length lets readers
        # recover it
        "rope_scaling_orig_ctx_len": (int(scaling.get("original_max_position_embeddings", 8192))
                                      if scaling.get("rope_type") == "llama3" else None),
    }

    def named() -> Any:
        """HF names -> GGUF names, llama.cpp conventions applied."""
        for hf_name, arr in tensors.items():
            if hf_name == "lm_head.weight" and cfg.tie_embeddings:
                continue  # tied head: llama.cpp reuses token_embd
            gname = hf_to_gguf_name(hf_name, arch)
            if gname is None:
                raise ValueError(f"no GGUF name for tensor {hf_name!r} (arch {arch})")
            a = np.asarray(arr, dtype=np.float32)
            if _is_offset_norm(hf_name, arch):
                a = a + np.float32(1.0)
            if llama and hf_name.endswith("self_attn.q_proj.weight"):
                a = _llama_permute(a, cfg.num_heads)
            elif llama and hf_name.endswith("self_attn.k_proj.weight"):
                a = _llama_permute(a, cfg.num_kv_heads)
            yield gname, a
        if llama and scaling.get("rope_type") == "llama3":
            yield "rope_freqs.weight", _llama3_rope_freqs(scaling, cfg.rope_theta, cfg.head_dim)

    return write_file(path, arch, metadata, named(), dtype,
                      lambda w: add_tokenizer(w, cfg, tokenizer, chat_template))


def add_tokenizer(w: Any, cfg: Any, tokenizer: Any, chat_template: str | None) -> None:
    """Embed the vocabulary as llama.cpp's ``tokenizer.ggml.*`` fields: a SentencePiece vocabulary as the
    "llama" model, Gemma 4's BPE ``tokenizer.json`` as the "gemma4" model with its merges (see
    ``Tokenizer.gguf_vocab``). ``cfg`` is any family's config with ``vocab_size``, ``family`` and the special ids
    (``bos_token_id``, ``eos_ids``, ``pad_token_id``): Gemma 3n and Gemma 4 files carry the same vocabulary
    fields."""
    if tokenizer is not None and not hasattr(tokenizer, "gguf_vocab"):
        tokenizer = Tokenizer.from_file(tokenizer)
    if tokenizer is not None:
        tokens, scores, types, flags = tokenizer.gguf_vocab()
        model = flags.get("model", "llama")
    else:
        tokens, scores, types = _placeholder_vocab(cfg)
        flags = {"add_space_prefix": False}
        model = "llama"
    if len(tokens) > cfg.vocab_size:
        raise ValueError(f"tokenizer has {len(tokens)} tokens but the model's vocabulary is {cfg.vocab_size}")
    if len(tokens) < cfg.vocab_size:  # padded embedding rows (e.g. Gemma 1 Kaggle's 256128)
        pad_n = cfg.vocab_size - len(tokens)
        tokens = list(tokens) + [f"<pad_{i}>" for i in range(pad_n)]
        scores = np.concatenate([np.asarray(scores, np.float32), np.zeros(pad_n, np.float32)])
        types = np.concatenate([np.asarray(types, np.int32), np.full(pad_n, TOKEN_UNUSED, np.int32)])
    w.add_tokenizer_model(model)
    pre = flags.get("pre", "default")
    if pre is not None:  # None: the layout llama.cpp's converter writes has no pre-tokenizer field
        w.add_tokenizer_pre(pre)
    w.add_token_list(list(tokens))
    w.add_token_scores(np.asarray(scores, dtype=np.float32).tolist())
    w.add_token_types(np.asarray(types, dtype=np.int32).tolist())
    if flags.get("merges") is not None:
        w.add_token_merges(list(flags["merges"]))
    w.add_bos_token_id(int(cfg.bos_token_id))
    w.add_eos_token_id(int(cfg.eos_ids[0]))
    unk = flags.get("unk_id")
    if unk is not None and unk >= 0:
        w.add_unk_token_id(int(unk))
    w.add_pad_token_id(int(cfg.pad_token_id))
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(bool(flags.get("add_space_prefix", False)))
    if cfg.family != "llama":
        eot = flags.get("eot_id")
        if eot is not None:
            w.add_eot_token_id(int(eot))
    template = chat_template or flags.get("chat_template")
    if template:
        w.add_chat_template(template)
