"""EmbeddingGemma: a bidirectional Gemma 3 backbone, pooling, dense projections and L2 normalization.

A sentence-transformers model is a pipeline of modules (``modules.json``); EmbeddingGemma's is
``Transformer`` (Gemma3TextModel with ``use_bidirectional_attention``) -> ``Pooling`` (mean over the attention
mask) -> ``Dense`` 768 -> 3072 -> ``Dense`` 3072 -> 768 (no bias, identity activation) -> ``Normalize``. Here
that pipeline is data (:class:`EncoderConfig`) and one pure function (:func:`embed`) over one parameter tree:
the backbone's weights under the Gemma decoder's own paths (``token_embedding/``, ``decoder_block/``,
``final_normalization/``), so its layout rules, quantization and the layer scan are the decoder's, plus
``dense_{i}/kernel`` ``[in, out]`` (and ``dense_{i}/bias``) for the projections.

This is not a causal-LM family (an encoder generates nothing): ``gemmax.TextEncoder`` holds it, and this
module only declares, reads and runs it. The folder reader follows sentence-transformers' module formats
(``1_Pooling/config.json``, ``2_Dense/{config.json, model.safetensors}`` with ``linear.weight [out, in]``,
``config_sentence_transformers.json`` for the prompts, ``sentence_bert_config.json`` for ``max_seq_length``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemmax.models.gemma import model as gm
from gemmax.models.gemma.config import ModelConfig, from_hf_config
from gemmax.nn.layers import einsum
from gemmax.nn.params import ParamSpec, init_from_specs

Array = jax.Array

#: Pooling modes sentence-transformers defines, in the order its legacy ``pooling_mode_*`` keys list them
#: (a multi-mode pooling concatenates in this order).
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
_LEGACY_POOLING = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                   "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                   "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}

#: torch activations a Dense module may name (its config's ``activation_function``) -> gemmax's function.
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "identity": lambda x: x,
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "sigmoid": jax.nn.sigmoid,
    "silu": jax.nn.silu,
}
_TORCH_ACTIVATIONS = {"Identity": "identity", "Tanh": "tanh", "ReLU": "relu", "GELU": "gelu", "Sigmoid": "sigmoid",
                      "SiLU": "silu"}


class EncoderFolderError(ValueError):
    """A sentence-transformers folder gemmax cannot run; the message names the file and the problem."""


@dataclass(frozen=True)
class DenseLayer:
    """One sentence-transformers ``Dense`` module: ``activation(x @ W + b)``."""

    in_features: int
    out_features: int
    bias: bool = False
    activation: str = "identity"

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown dense activation {self.activation!r}; gemmax runs {sorted(ACTIVATIONS)}")


@dataclass(frozen=True)
class EncoderConfig:
    """A text-embedding model: the backbone's config plus the sentence-transformers modules after it.

    ``pooling``: the modes concatenated (``POOLING_MODES``); ``include_prompt=False`` pools only the tokens
    after the prompt. ``dense``: the projections in order. ``normalize``: the pipeline ends with ``Normalize``.
    ``prompts`` / ``default_prompt_name``: ``config_sentence_transformers.json``'s. ``max_seq_length``: longer
    inputs are truncated (special tokens included), as sentence-transformers' tokenizer call does;
    ``add_bos`` / ``add_eos``: the special tokens the tokenizer puts around every text.
    """

    backbone: ModelConfig
    pooling: tuple[str, ...] = ("mean",)
    include_prompt: bool = True
    dense: tuple[DenseLayer, ...] = ()
    normalize: bool = True
    prompts: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    default_prompt_name: str | None = None
    max_seq_length: int | None = None
    add_bos: bool = True
    add_eos: bool = True
    similarity: str = "cosine"
    name: str = ""

    def __post_init__(self) -> None:
        bad = [m for m in self.pooling if m not in POOLING_MODES]
        if bad or not self.pooling:
            raise ValueError(f"unknown pooling mode(s) {bad or '(none)'}; sentence-transformers defines "
                             f"{POOLING_MODES}")
        width = self.backbone.hidden_size * len(self.pooling)
        for i, d in enumerate(self.dense):
            if d.in_features != width:
                raise ValueError(f"dense layer {i} takes {d.in_features} features but receives {width}")
            width = d.out_features
        if self.default_prompt_name is not None and self.default_prompt_name not in self.prompts:
            raise ValueError(f"default_prompt_name {self.default_prompt_name!r} is not one of the prompts "
                             f"{sorted(self.prompts)}")

    # ---- shapes ------------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Width of an embedding (before any ``truncate_dim``)."""
        return self.dense[-1].out_features if self.dense else self.backbone.hidden_size * len(self.pooling)

    @property
    def max_len(self) -> int:
        """The longest input, in tokens: ``max_seq_length`` capped by the backbone's positions."""
        ctx = self.backbone.max_position_embeddings
        return min(self.max_seq_length, ctx) if self.max_seq_length else ctx

    def replace(self, **kw: Any) -> EncoderConfig:
        return dataclasses.replace(self, **kw)

    def param_specs(self) -> dict[str, ParamSpec]:
        return param_specs(self)

    def param_count(self) -> dict[str, int]:
        """Counts from shapes alone: the backbone's (embedding / non-embedding) plus the dense layers."""
        counts = dict(self.backbone.param_count())
        dense = sum(d.in_features * d.out_features + (d.out_features if d.bias else 0) for d in self.dense)
        counts["dense"] = dense
        counts["non_embedding"] += dense
        counts["total"] += dense
        return counts

    # ---- serialisation ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["backbone"] = self.backbone.to_dict()
        d["pooling"] = list(self.pooling)
        d["dense"] = [dataclasses.asdict(x) for x in self.dense]
        d["prompts"] = dict(self.prompts)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EncoderConfig:
        d = dict(d)
        d["backbone"] = ModelConfig.from_dict(d["backbone"])
        d["pooling"] = tuple(d.get("pooling") or ("mean",))
        d["dense"] = tuple(DenseLayer(**x) for x in d.get("dense") or ())
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown encoder config fields: {sorted(unknown)}")
        return cls(**d)


# ---- declarations ------------------------------------------------------------------------------------------


def _dense_axis(cfg: EncoderConfig, width: int) -> str:
    # the model's own width is "embed" (data axis of 2-D maps); any other width is an MLP-like one, split on
    # the model axis like the decoder's feed-forward
    return "embed" if width == cfg.backbone.hidden_size else "mlp"


def param_specs(cfg: EncoderConfig) -> dict[str, ParamSpec]:
    """The backbone's declared weights (the decoder's paths) and every dense layer's, with logical axes."""
    specs = dict(gm.param_specs(cfg.backbone))
    for i, d in enumerate(cfg.dense):
        axes = (_dense_axis(cfg, d.in_features), _dense_axis(cfg, d.out_features))
        specs[f"dense_{i}/kernel"] = ParamSpec((d.in_features, d.out_features), axes, fan_in_axis=0)
        if d.bias:
            specs[f"dense_{i}/bias"] = ParamSpec((d.out_features,), axes[1:], "zeros")
    return specs


def init_params(cfg: EncoderConfig, key: Array, dtype: Any = jnp.float32) -> dict[str, Any]:
    """Random weights from the declarations (tests, benchmarks, shapes)."""
    return init_from_specs(param_specs(cfg), key, dtype)


#: Published key prefixes of the backbone: ``Gemma3TextModel.save_pretrained`` (what a sentence-transformers
#: folder holds) writes no ``model.`` level; a ``Gemma3ForCausalLM``-style folder is read as well.
BACKBONE_ALIASES = (("embed_tokens.", "model.embed_tokens."), ("layers.", "model.layers."), ("norm.", "model.norm."))


def dense_table(cfg: EncoderConfig) -> dict[str, tuple[str, Callable, Callable]]:
    """gemmax path -> (name in the module's ``model.safetensors``, torch -> gemmax, back), one table per
    dense module: sentence-transformers stores ``linear.weight`` as ``[out, in]``."""
    tables = {}
    for i, d in enumerate(cfg.dense):
        t = {f"dense_{i}/kernel": ("linear.weight", lambda w: w.T, lambda w: w.T)}
        if d.bias:
            t[f"dense_{i}/bias"] = ("linear.bias", lambda w: w, lambda w: w)
        tables[i] = t
    return tables


# ---- the model ----------------------------------------------------------------------------------------------


def pool(cfg: EncoderConfig, hidden: Array, mask: Array) -> Array:
    """Token states [B, T, D] -> [B, D * len(modes)] over the tokens ``mask`` [B, T] keeps (right padding),
    as sentence-transformers' ``Pooling`` computes each mode, in float32."""
    h = hidden.astype(jnp.float32)
    m = mask.astype(jnp.float32)[..., None]
    t = h.shape[1]
    count = jnp.maximum(m.sum(1), 1e-9)
    outs = []
    for mode in cfg.pooling:
        if mode == "mean":
            outs.append((h * m).sum(1) / count)
        elif mode == "mean_sqrt_len_tokens":
            outs.append((h * m).sum(1) / jnp.sqrt(count))
        elif mode == "max":
            outs.append(jnp.where(m > 0, h, -jnp.inf).max(1))
        elif mode == "cls":  # the first kept token
            first = jnp.argmax(mask, axis=1)
            outs.append(jnp.take_along_axis(h, first[:, None, None], axis=1)[:, 0])
        elif mode == "lasttoken":  # the last kept token
            last = t - 1 - jnp.argmax(mask[:, ::-1], axis=1)
            outs.append(jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0])
        elif mode == "weightedmean":  # position i (from 1) weighs i
            w = m * jnp.arange(1, t + 1, dtype=jnp.float32)[None, :, None]
            outs.append((h * w).sum(1) / jnp.maximum(w.sum(1), 1e-9))
    return jnp.concatenate(outs, axis=-1)


def project(params: Mapping[str, Any], cfg: EncoderConfig, x: Array) -> Array:
    """The dense modules in order, then the L2 normalization (``torch.nn.functional.normalize``'s
    ``x / max(|x|, 1e-12)``) when the pipeline ends with ``Normalize``."""
    for i, d in enumerate(cfg.dense):
        node = params[f"dense_{i}"]
        x = einsum("bi,io->bo", x, node["kernel"], jnp.float32)
        if d.bias:
            x = x + node["bias"].astype(jnp.float32)
        x = ACTIVATIONS[d.activation](x)
    return l2_normalize(x) if cfg.normalize else x


def l2_normalize(x: Array) -> Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def embed(params: Mapping[str, Any], cfg: EncoderConfig, tokens: Array, valid: Array, pool_mask: Array) -> Array:
    """Right-padded token ids [B, T] -> float32 embeddings [B, dim].

    ``valid`` [B, T] marks real tokens (padding neither attends nor is attended to); ``pool_mask`` the ones
    pooled (``valid`` minus the prompt when ``include_prompt`` is off). Positions count from 0 at each row's
    first token, as transformers numbers them."""
    seg = valid.astype(jnp.int32)
    hidden = gm.forward_hidden(params, cfg.backbone, tokens, segment_ids=seg)
    return project(params, cfg, pool(cfg, hidden, pool_mask))


# ---- presets --------------------------------------------------------------------------------------------------

#: The retrieval prompts EmbeddingGemma publishes (config_sentence_transformers.json).
EMBEDDINGGEMMA_PROMPTS: dict[str, str] = {
    "query": "task: search result | query: ",
    "document": "title: none | text: ",
    "BitextMining": "task: search result | query: ",
    "Clustering": "task: clustering | query: ",
    "Classification": "task: classification | query: ",
    "InstructionRetrieval": "task: code retrieval | query: ",
    "MultilabelClassification": "task: classification | query: ",
    "PairClassification": "task: sentence similarity | query: ",
    "Reranking": "task: search result | query: ",
    "Retrieval": "task: search result | query: ",
    "Retrieval-query": "task: search result | query: ",
    "Retrieval-document": "title: none | text: ",
    "STS": "task: sentence similarity | query: ",
    "Summarization": "task: summarization | query: ",
}


def _embeddinggemma(name: str) -> EncoderConfig:
    layers = 24
    backbone = ModelConfig(
        family="gemma3", name=name, vocab_size=262144, hidden_size=768, num_layers=layers, num_heads=3,
        num_kv_heads=1, head_dim=256, intermediate_size=1152, max_position_embeddings=2048,
        query_pre_attn_scalar=256, sliding_window=512,
        layer_types=tuple("global" if (i + 1) % 6 == 0 else "local" for i in range(layers)),
        rope_theta=1_000_000.0, rope_local_theta=10_000.0, use_qk_norm=True, use_post_norms=True,
        bidirectional=True, eos_token_id=1)
    return EncoderConfig(backbone, pooling=("mean",), dense=(DenseLayer(768, 3072), DenseLayer(3072, 768)),
                         normalize=True, prompts=dict(EMBEDDINGGEMMA_PROMPTS), max_seq_length=2048, name=name)


PRESETS: dict[str, EncoderConfig] = {c.name: c for c in [_embeddinggemma("embeddinggemma_300m")]}
PRESET_REPOS: dict[str, str] = {"embeddinggemma_300m": "google/embeddinggemma-300m"}


def tiny_config(**backbone_overrides: Any) -> EncoderConfig:
    """A few-kilobyte EmbeddingGemma (every feature on: bidirectional, window 8, two dense layers)."""
    from gemmax.models.gemma.config import tiny_config as tiny_backbone

    b = tiny_backbone("gemma3", bidirectional=True, rope_scaling=None, eos_token_id=1, **backbone_overrides)
    return EncoderConfig(b, dense=(DenseLayer(b.hidden_size, 4 * b.hidden_size),
                                   DenseLayer(4 * b.hidden_size, b.hidden_size)),
                         prompts={"query": "task: search result | query: ", "document": "title: none | text: "},
                         max_seq_length=256, name="tiny_embeddinggemma")


# ---- sentence-transformers folders --------------------------------------------------------------------------


def _json(path: Path, required: bool = True) -> dict[str, Any]:
    if not path.exists():
        if required:
            raise EncoderFolderError(f"{path}: missing")
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EncoderFolderError(f"{path}: invalid JSON ({e})") from None


def is_sentence_transformers_folder(folder: Path) -> bool:
    return (folder / "modules.json").is_file()


def _module_kind(type_name: str) -> str:
    # "sentence_transformers.models.Pooling", "sentence_transformers.sentence_transformer.modules.pooling.Pooling"
    return type_name.rsplit(".", 1)[-1]


def _activation(name: str | None, where: Path) -> str:
    if not name:
        return "tanh"  # sentence-transformers' Dense default
    short = name.rsplit(".", 1)[-1]
    if short not in _TORCH_ACTIVATIONS:
        raise EncoderFolderError(f"{where}: activation {name!r} is not one gemmax runs "
                                 f"({', '.join(sorted(_TORCH_ACTIVATIONS))})")
    return _TORCH_ACTIVATIONS[short]


def _pooling(conf: Mapping[str, Any], where: Path) -> tuple[tuple[str, ...], bool]:
    mode = conf.get("pooling_mode")
    if mode is None:
        modes = tuple(m for k, m in _LEGACY_POOLING.items() if conf.get(k)) or ("mean",)
    else:
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    bad = [m for m in modes if m not in POOLING_MODES]
    if bad:
        raise EncoderFolderError(f"{where}: pooling mode(s) {bad} unknown; sentence-transformers defines "
                                 f"{POOLING_MODES}")
    return modes, bool(conf.get("include_prompt", True))


def _special_tokens(folder: Path) -> tuple[bool, bool]:
    """Whether the tokenizer puts ``<bos>`` / ``<eos>`` around a text: tokenizer_config.json's
    ``add_bos_token`` / ``add_eos_token`` when it says, else tokenizer.json's post-processor template."""
    conf = _json(folder / "tokenizer_config.json", required=False)
    bos, eos = conf.get("add_bos_token"), conf.get("add_eos_token")
    if bos is None or eos is None:
        post = (_json(folder / "tokenizer.json", required=False).get("post_processor") or {})
        single = post.get("single") if post.get("type") == "TemplateProcessing" else None
        if single:
            pieces = [("A" if "Sequence" in s else s.get("SpecialToken", {}).get("id")) for s in single]
            seq = pieces.index("A") if "A" in pieces else len(pieces)
            bos = "<bos>" in pieces[:seq] if bos is None else bos
            eos = "<eos>" in pieces[seq:] if eos is None else eos
    return (True if bos is None else bool(bos)), bool(eos)


def read_folder(folder: Path) -> tuple[EncoderConfig, Path, list[Path]]:
    """(config, backbone folder, one folder per dense layer) of a sentence-transformers folder; a folder
    without ``modules.json`` is a bare backbone, pooled by mean as sentence-transformers does then."""
    folder = Path(folder)
    modules = _json(folder / "modules.json", required=False) if is_sentence_transformers_folder(folder) else [
        {"path": "", "type": "Transformer"}, {"path": "1_Pooling", "type": "Pooling"}]
    st = _json(folder / "config_sentence_transformers.json", required=False)
    backbone_dir: Path | None = None
    pooling, include_prompt, normalize = None, True, False
    dense: list[DenseLayer] = []
    dense_dirs: list[Path] = []
    for i, mod in enumerate(modules):
        kind = _module_kind(str(mod.get("type", "")))
        sub = folder / mod.get("path", "")
        if (i == 0) != (kind == "Transformer"):
            raise EncoderFolderError(f"{folder / 'modules.json'}: the Transformer module must come first")
        if normalize:
            raise EncoderFolderError(f"{folder / 'modules.json'}: gemmax runs Normalize only as the last module")
        if kind == "Transformer":
            backbone_dir = sub
        elif kind == "Pooling":
            if pooling is not None or dense:
                raise EncoderFolderError(f"{folder / 'modules.json'}: one Pooling, before the Dense modules")
            pooling, include_prompt = _pooling(_json(sub / "config.json", required=False), sub)
        elif kind == "Dense":
            if pooling is None:
                raise EncoderFolderError(f"{folder / 'modules.json'}: a Dense module before Pooling")
            conf = _json(sub / "config.json")
            if conf.get("use_residual") or conf.get("module_input_name", "sentence_embedding") != "sentence_embedding":
                raise EncoderFolderError(f"{sub / 'config.json'}: residual / renamed Dense modules are not supported")
            dense.append(DenseLayer(int(conf["in_features"]), int(conf["out_features"]), bool(conf.get("bias", True)),
                                    _activation(conf.get("activation_function"), sub / "config.json")))
            dense_dirs.append(sub)
        elif kind == "Normalize":
            normalize = True
        else:
            raise EncoderFolderError(f"{folder / 'modules.json'}: module {mod.get('type')!r} is not one gemmax runs "
                                     "(Transformer, Pooling, Dense, Normalize)")
    if backbone_dir is None or pooling is None:
        raise EncoderFolderError(f"{folder}: a text encoder needs a Transformer and a Pooling module")
    hf = _json(backbone_dir / "config.json")
    try:
        backbone = from_hf_config(hf)
    except (KeyError, TypeError, ValueError) as e:
        raise EncoderFolderError(f"{backbone_dir / 'config.json'}: not a usable Gemma backbone ({e})") from None
    sbert = _json(backbone_dir / "sentence_bert_config.json", required=False)
    if sbert.get("do_lower_case"):
        raise EncoderFolderError(f"{backbone_dir / 'sentence_bert_config.json'}: do_lower_case is not supported")
    bos, eos = _special_tokens(backbone_dir)
    prompts = dict(st.get("prompts") or {})
    try:
        cfg = EncoderConfig(backbone, pooling=pooling, include_prompt=include_prompt, dense=tuple(dense),
                            normalize=normalize, prompts=prompts,
                            default_prompt_name=st.get("default_prompt_name") or None,
                            max_seq_length=sbert.get("max_seq_length"), add_bos=bos, add_eos=eos,
                            similarity=st.get("similarity_fn_name") or "cosine", name=backbone.name or folder.name)
    except ValueError as e:
        raise EncoderFolderError(f"{folder}: {e}") from None
    return cfg, backbone_dir, dense_dirs


def write_folder_config(cfg: EncoderConfig, folder: Path) -> None:
    """The sentence-transformers module files of ``cfg`` (everything but weights and tokenizer) in the
    published layout: the backbone at the root, ``1_Pooling``, ``{2,3...}_Dense``, ``N_Normalize``."""
    from gemmax.models.gemma.config import to_hf_config

    folder.mkdir(parents=True, exist_ok=True)
    hf = to_hf_config(cfg.backbone)
    hf["architectures"] = ["Gemma3TextModel"]
    (folder / "config.json").write_text(json.dumps(hf, indent=2))
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
    pool_dir = "1_Pooling"
    modules.append({"idx": 1, "name": "1", "path": pool_dir, "type": "sentence_transformers.models.Pooling"})
    (folder / pool_dir).mkdir(exist_ok=True)
    pool_conf = {"word_embedding_dimension": cfg.backbone.hidden_size,
                 **{k: m in cfg.pooling for k, m in _LEGACY_POOLING.items()}, "include_prompt": cfg.include_prompt}
    (folder / pool_dir / "config.json").write_text(json.dumps(pool_conf, indent=2))
    for d in cfg.dense:
        idx = len(modules)
        sub = f"{idx}_Dense"
        modules.append({"idx": idx, "name": str(idx), "path": sub, "type": "sentence_transformers.models.Dense"})
        (folder / sub).mkdir(exist_ok=True)
        torch_name = {v: k for k, v in _TORCH_ACTIVATIONS.items()}[d.activation]
        module = "linear" if torch_name == "Identity" else "activation"
        (folder / sub / "config.json").write_text(json.dumps(
            {"in_features": d.in_features, "out_features": d.out_features, "bias": d.bias,
             "activation_function": f"torch.nn.modules.{module}.{torch_name}"}, indent=2))
    if cfg.normalize:
        idx = len(modules)
        modules.append({"idx": idx, "name": str(idx), "path": f"{idx}_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "sentence_bert_config.json").write_text(json.dumps(
        {"max_seq_length": cfg.max_len, "do_lower_case": False}, indent=2))
    (folder / "config_sentence_transformers.json").write_text(json.dumps(
        {"model_type": "SentenceTransformer", "prompts": dict(cfg.prompts),
         "default_prompt_name": cfg.default_prompt_name, "similarity_fn_name": cfg.similarity}, indent=2))


def dense_arrays_to_hf(flat: Mapping[str, np.ndarray], cfg: EncoderConfig) -> dict[int, dict[str, np.ndarray]]:
    """Each dense module's tensors as its ``model.safetensors`` holds them."""
    out = {}
    for i, table in dense_table(cfg).items():
        out[i] = {name: np.ascontiguousarray(inv(np.asarray(flat[path]))) for path, (name, _f, inv) in table.items()}
    return out
