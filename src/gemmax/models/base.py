"""The family interface: what every model family provides, and the registry that finds a family.

Everything above ``gemmax.models`` (``CausalLM``, the engine and sampler, the trainer, LoRA and quantization,
the server and the command line) talks to a model only through a :class:`Family`: one record of pure
functions over a config and a parameter pytree. A new family is one module that builds its ``Family`` and
calls :func:`register`; nothing else is edited.

The functions, by stage:

- **declaration**: ``param_specs(cfg)`` (shape, logical axes, init of every weight), ``linear_nodes(cfg)``
  (the linear layers LoRA and quantization may touch), ``hf_table(cfg)`` (Hugging Face tensor names of every
  weight and the transforms between layouts; the published Hub names are the ones written on export, and
  ``hf_aliases`` maps other published prefixes onto them), ``keras`` (a :class:`KerasSpec`: the keras-hub
  backbone classes it loads, their config arguments and the name table of their weights file).
- **model**: ``forward_hidden(params, cfg, tokens, positions=None, segment_ids=None, remat=None, **inputs)``
  -> final-normed hidden states ``[B, T, D]``; ``logits_from_hidden(params, cfg, hidden)`` -> float32
  logits. ``inputs`` carries what a family reads besides tokens (PaliGemma: ``pixel_values``,
  ``token_type_ids``); a family rejects inputs it does not know.
- **generation**: ``init_cache(cfg, batch, max_len, dtype)``; ``prefill(params, cfg, tokens, lengths,
  max_len, backend, **inputs)`` -> (last-token logits ``[b, V]``, per-row caches); ``insert(cache, rows,
  slots, backend)``; ``decode_step(params, cfg, cache, tokens, pos, backend)`` -> (logits ``[B, V]``, cache). Rows of
  the cache are independent slots, so one engine batches requests continuously for every family.
  ``backend`` is an explicit value (``"xla"`` or ``"cpu"``, the native CPU kernels) chosen by the engine.
- **blocks on a cache** (optional): ``extend(params, cfg, cache, tokens [B, K], pos [B], backend, last=None)``
  -> (logits ``[B, K, V]`` or ``[B, V]`` at block index ``last``, the block's keys/values) reads the cache
  without writing it; ``commit(cfg, cache, block, slots, pos, counts, backend)`` then writes the first ``counts`` of
  the block's entries. Prefix caching and speculative decoding need both; a family without them (a
  recurrent state cannot be rolled back to a rejected draft) decodes plainly.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, Self

from gemmax.nn.params import LinearNode, ParamSpec

#: Backends a family's prefill / decode step accept: XLA everywhere, gemmax's native CPU kernels, or (prefill
#: on an NVIDIA GPU, 16-bit activations) cuDNN's fused attention through ``jax.nn.dot_product_attention``.
XLA = "xla"
CPU = "cpu"
CUDNN = "cudnn"
BACKENDS = (XLA, CPU, CUDNN)

#: One Hugging Face name-table entry: HF name (or one name per stacked layer), then the transforms
#: HF layout -> gemmax layout and back, applied to one layer's array.
HFEntry = tuple[str | list[str], Callable[[Any], Any], Callable[[Any], Any]]

#: Layout transforms of one layer's array (HF -> gemmax, gemmax -> HF): unchanged, and a linear layer's
#: kernel (torch's ``[out, in]`` <-> gemmax's ``[in, out]``).
HF_SAME: tuple[Callable[[Any], Any], Callable[[Any], Any]] = (lambda w: w, lambda w: w)
HF_TRANSPOSED: tuple[Callable[[Any], Any], Callable[[Any], Any]] = (lambda w: w.T, lambda w: w.T)


def hf_heads_in(n: int, head_dim: int, width: int) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    """Layout transforms of a query, key or value projection of ``n`` heads: torch's ``[n * head_dim, width]``
    <-> gemmax's ``[n, width, head_dim]``."""
    return (lambda w: w.reshape(n, head_dim, width).transpose(0, 2, 1),
            lambda w: w.transpose(0, 2, 1).reshape(n * head_dim, width))


def hf_heads_out(n: int, head_dim: int, width: int) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    """Layout transforms of the attention output projection of ``n`` heads: torch's ``[width, n * head_dim]``
    <-> gemmax's ``[n, head_dim, width]``."""
    return (lambda w: w.reshape(width, n, head_dim).transpose(1, 2, 0),
            lambda w: w.transpose(2, 0, 1).reshape(width, n * head_dim))


class FamilyConfig(Protocol):
    """What the layers above a family read from any family's config."""

    name: str
    vocab_size: int
    max_position_embeddings: int
    bos_token_id: int
    pad_token_id: int

    @property
    def eos_ids(self) -> tuple[int, ...]: ...

    # read by the trainer's chunked loss (the head and its soft-cap without building all logits):
    # ``tie_embeddings`` (head = token_embedding^T, else lm_head/kernel) and ``final_logit_softcap``

    def to_dict(self) -> dict[str, Any]: ...

    def param_count(self) -> dict[str, int]: ...


@dataclass(frozen=True, kw_only=True)
class ConfigBase:
    """Fields and methods the text families' frozen config dataclasses share: the special token ids, the
    preset or checkpoint name, free-form ``extra`` metadata (neither compared nor hashed, not serialised),
    and the JSON round trip of :meth:`to_dict` / :meth:`from_dict`.

    The fields are keyword-only, so a subclass's own fields keep their positions and may go without
    defaults."""

    #: fields held as tuples, written to JSON as lists and read back as tuples
    tuple_fields: ClassVar[tuple[str, ...]] = ()
    #: how error messages name the family's config
    label: ClassVar[str] = ""

    bos_token_id: int = 2
    eos_token_id: int | tuple[int, ...] = 1
    pad_token_id: int = 0
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    def replace(self, **kw: Any) -> Self:
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (tuples as lists, ``extra`` left out); :meth:`from_dict` inverts it."""
        d = dataclasses.asdict(self)
        d.pop("extra")
        for k in (*self.tuple_fields, "eos_token_id"):
            if isinstance(d[k], tuple):
                d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown {cls.label} config field(s) {unknown}")
        kw = dict(d)
        for k in (*cls.tuple_fields, "eos_token_id"):
            if isinstance(kw.get(k), list):
                kw[k] = tuple(kw[k])
        return cls(**kw)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _token_ids(v: Any) -> Any:
    """A ``config.json`` token id entry: a list of several ids as a tuple, a list of one as that id."""
    if isinstance(v, list | tuple):
        return tuple(v) if len(v) > 1 else v[0]
    return v


def hf_config_tokens(hf: Mapping[str, Any]) -> dict[str, Any]:
    """The :class:`ConfigBase` fields of a transformers ``config.json``: special token ids (transformers'
    defaults where absent or null) and the checkpoint name."""
    pad = hf.get("pad_token_id")
    return {"bos_token_id": _token_ids(hf.get("bos_token_id", 2)),
            "eos_token_id": _token_ids(hf.get("eos_token_id", 1)),
            "pad_token_id": _token_ids(pad) if pad is not None else 0,
            "name": hf.get("_name_or_path", "") or ""}


def hf_tokens_entry(cfg: ConfigBase) -> dict[str, Any]:
    """The special token ids of ``cfg`` as a transformers ``config.json`` writes them."""
    eos = list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
    return {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos, "pad_token_id": cfg.pad_token_id}


def preset_pairs(make: Callable[..., Any], shapes: Mapping[tuple[str, str, str], Mapping[str, Any]],
                 ) -> tuple[dict[str, Any], dict[str, str]]:
    """Presets published in pairs, a base checkpoint and its instruction-tuned twin of the same shape.

    ``shapes`` maps ``(base preset, instruct preset, Hub repo of the base)`` to keyword arguments; returns
    the presets, ``make(name, **kwargs)`` for both names in that order, and their Hub repos (the twin's is
    the base's with ``-it``)."""
    presets: dict[str, Any] = {}
    repos: dict[str, str] = {}
    for (base, instruct, repo), kw in shapes.items():
        presets[base], presets[instruct] = make(base, **kw), make(instruct, **kw)
        repos[base], repos[instruct] = repo, repo + "-it"
    return presets, repos


@dataclass(frozen=True)
class KerasSpec:
    """How a family reads and writes keras-hub presets (``gemmax.io.keras``): one more name table.

    ``accepts(class_name, config)``: whether a preset's backbone is this family's (Gemma 3 with and without
    a vision encoder share ``Gemma3Backbone``); ``from_config(class_name, config)`` -> gemmax config;
    ``to_config(cfg)`` -> (backbone class, config arguments, module, task class, tokenizer class);
    ``table(cfg)``: gemmax path -> (H5 dataset path, or one per stacked layer; Keras -> gemmax; gemmax ->
    Keras), as ``hf_table``; ``lora_layers(cfg)``: ``{weighted-layer index: (linear node key, layer)}`` for
    the layers keras-hub's ``save_lora_weights`` may key (its index over the backbone's weighted layers).
    """

    classes: tuple[str, ...]
    accepts: Callable[[str, Mapping[str, Any]], bool]
    from_config: Callable[[str, Mapping[str, Any]], Any]
    to_config: Callable[[Any], tuple[str, dict[str, Any], str, str, str]]
    table: Callable[[Any], dict[str, HFEntry]]
    lora_layers: Callable[[Any], dict[int, tuple[str, int]]]


@dataclass(frozen=True)
class GGUFSpec:
    """How a family reads and writes llama.cpp's GGUF files.

    ``archs``: the ``general.architecture`` values it reads; ``read(path)`` -> a parsed file that reads like a
    lazy transformers state dict (``keys``, ``[name]``, ``shape(name)``) with ``hf_config`` (a transformers
    config.json dict), ``arch`` and ``tokenizer_metadata``; ``write(path, hf_config, tensors, tokenizer=,
    dtype=)`` writes transformers-named tensors back as a GGUF llama.cpp loads. Which configs it can write is
    the family's ``gguf_arch``.

    ``projectors``: the ``clip.projector_type`` values of llama.cpp's "mmproj" files (a multimodal model's
    vision tower and projector, kept beside its text GGUF) that the family reads. llama.cpp runs such a model
    from the two files, so a family listing any reads the pair (``read(path, mmproj=PATH)``) and writes it
    (``write(..., mmproj_path=PATH)``).
    """

    archs: tuple[str, ...]
    read: Callable[..., Any]
    write: Callable[..., Any]
    projectors: tuple[str, ...] = ()


class UnsupportedModelType(KeyError, ValueError):
    """A checkpoint whose ``model_type`` no registered family loads."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class UnsupportedError(NotImplementedError):
    """A public method that cannot apply to this family; the message says why."""


@dataclass(frozen=True)
class Family:
    """One model family: its config type, declarations and pure functions (see the module docstring)."""

    name: str
    model_types: tuple[str, ...]
    config_type: type
    from_hf_config: Callable[[Mapping[str, Any]], Any]
    to_hf_config: Callable[[Any], dict[str, Any]]
    config_from_dict: Callable[[Mapping[str, Any]], Any]
    param_specs: Callable[[Any], dict[str, ParamSpec]]
    init_params: Callable[..., Any]
    linear_nodes: Callable[[Any], dict[str, LinearNode]]
    hf_table: Callable[[Any], dict[str, HFEntry]]
    forward_hidden: Callable[..., Any]
    logits_from_hidden: Callable[..., Any]
    init_cache: Callable[..., Any]
    prefill: Callable[..., Any]
    insert: Callable[..., Any]
    decode_step: Callable[..., Any]
    presets: Mapping[str, Any] = field(default_factory=dict)
    preset_repos: Mapping[str, str] = field(default_factory=dict)
    #: published prefixes of other Hub layouts -> the prefix ``hf_table`` uses, tried in order
    hf_aliases: tuple[tuple[str, str], ...] = ()
    #: HF tensor names (substrings) that a checkpoint may carry and the family does not use
    hf_ignorable: tuple[str, ...] = ("rotary_emb.inv_freq",)
    #: more such names that depend on the config (Gemma 3n: the unused key/value tensors its published
    #: checkpoints carry for the KV-shared layers); skipped like ``hf_ignorable``, listed in the debug log
    hf_unused: Callable[[Any], tuple[str, ...]] = lambda cfg: ()
    #: row-read tables besides ``token_embedding`` (``{"embeddings": [rows, ...]}`` nodes the family reads
    #: with their per-row ``scale`` when quantized): ``quantize`` quantizes them per row like the token
    #: embedding and exports dequantize them (Gemma 3n: ``per_layer_embedding``)
    extra_embeddings: tuple[str, ...] = ()
    #: transformers' ``architectures`` entry written on export
    hf_architecture: str = ""
    #: GGUF architecture of a config, or None with the reason llama.cpp cannot run it
    gguf_arch: Callable[[Any], str | None] = lambda cfg: None
    #: GGUF reading and writing; None: llama.cpp defines no architecture for the family
    gguf: GGUFSpec | None = None
    #: "gemma" or "llama3": the chat turn format
    chat_format: Callable[[Any], str] = lambda cfg: "gemma"
    #: inputs besides tokens that forward / prefill accept (e.g. pixel_values)
    extra_inputs: tuple[str, ...] = ()
    #: those of them aligned with the tokens (last axis = position), each with its value on text after the
    #: prompt (a completion, generated tokens, padding). The engine pads a prompt's to its length bucket with
    #: it, so one compilation serves nearby prompt lengths; the data pipeline gives it to completions.
    token_inputs: Mapping[str, int] = field(default_factory=dict)
    #: whether ``forward_hidden`` takes ``prefix_ids`` (several continuations of one prompt in one row, the
    #: prompt computed once; see the Gemma family's ``forward_hidden``): the post-training objectives lay a
    #: preference pair or a GRPO group out that way when it does, one row per continuation otherwise
    shared_prefix: bool = False
    #: backends whose prefill / decode step this family implements
    backends: tuple[str, ...] = (XLA,)
    #: text + images -> (prompt token ids, inputs) for families that read images:
    #: ``encode_prompt(cfg, tokenizer, text, images, add_bos)``; None for text-only families
    encode_prompt: Callable[..., tuple[list[int], dict[str, Any]]] | None = None
    #: ``check_inputs(cfg, ids [B, T], inputs)`` raises ValueError naming what does not match (e.g. the images
    #: for the ids' image tokens), on concrete inputs before they are traced; None: nothing to check
    check_inputs: Callable[..., None] | None = None
    #: a block of tokens on an existing cache, logits for each (see the module docstring), or None
    extend: Callable[..., Any] | None = None
    #: writes the first ``counts`` entries of an ``extend`` block into cache slots, or None
    commit: Callable[..., Any] | None = None
    #: whether this family loads a config.json of one of its ``model_types`` (two families may share a type:
    #: a multimodal ``gemma4`` checkpoint loads with its vision tower, one without ``vision_config`` as text)
    hf_accepts: Callable[[Mapping[str, Any]], bool] = lambda hf: True
    #: a tiny random config for tests and examples: ``tiny_config(**overrides)``
    tiny_config: Callable[..., Any] | None = None
    #: keras-hub presets this family reads and writes; None: none
    keras: KerasSpec | None = None


#: The functions every family defines under these names (see the module docstring).
FUNCTIONS = ("from_hf_config", "to_hf_config", "config_from_dict", "param_specs", "init_params", "linear_nodes",
             "hf_table", "forward_hidden", "logits_from_hidden", "init_cache", "prefill", "insert", "decode_step")


def family_from(namespace: Mapping[str, Any], name: str, **fields: Any) -> Family:
    """A :class:`Family` whose functions are the ones ``namespace`` (a family module's ``globals()``, or any
    mapping) defines under the interface's names, plus ``fields``. A missing function is named in the error,
    so a new family learns at import what it still lacks."""
    missing = [f for f in FUNCTIONS if f not in fields and f not in namespace]
    if missing:
        raise TypeError(f"family {name!r} does not define {', '.join(missing)}")
    funcs = {f: fields.pop(f, None) or namespace[f] for f in FUNCTIONS}
    return Family(name=name, **funcs, **fields)


_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Make a family known by its name and by every ``model_type`` it loads."""
    _REGISTRY[family.name] = family
    return family


def families() -> dict[str, Family]:
    """Every registered family by name (importing ``gemmax.models`` registers the built-in ones)."""
    return dict(_REGISTRY)


def get(name: str) -> Family:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model family {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def for_model_type(model_type: str | None) -> Family:
    """The family that loads a Hugging Face ``config.json`` with this ``model_type``."""
    for fam in _REGISTRY.values():
        if model_type in fam.model_types:
            return fam
    known = sorted(t for f in _REGISTRY.values() for t in f.model_types)
    raise UnsupportedModelType(f"unsupported model_type {model_type!r}; gemmax loads {', '.join(known)}")


def for_hf_config(hf: Mapping[str, Any]) -> Family:
    """The family that loads this Hugging Face ``config.json``: by ``model_type``, then the family's
    ``hf_accepts`` where two families share the type."""
    model_type = hf.get("model_type")
    fams = [f for f in _REGISTRY.values() if model_type in f.model_types]
    for fam in fams:
        if fam.hf_accepts(hf):
            return fam
    return for_model_type(model_type) if not fams else fams[0]


def for_config(cfg: Any) -> Family:
    """The family of a config object (by its type)."""
    for fam in _REGISTRY.values():
        if isinstance(cfg, fam.config_type):
            return fam
    raise TypeError(f"{type(cfg).__name__} is not the config of a registered model family")


def for_gguf_arch(arch: str | None) -> Family:
    """The family that reads a GGUF file of llama.cpp architecture ``arch``."""
    for fam in _REGISTRY.values():
        if fam.gguf is not None and arch in fam.gguf.archs:
            return fam
    known = sorted(a for f in _REGISTRY.values() if f.gguf is not None for a in f.gguf.archs)
    raise UnsupportedModelType(f"unsupported GGUF architecture {arch!r}; gemmax reads {', '.join(known)}")


def for_gguf_projector(projector_type: str | None) -> Family:
    """The family that reads a llama.cpp mmproj file whose ``clip.projector_type`` is ``projector_type``."""
    for fam in _REGISTRY.values():
        if fam.gguf is not None and projector_type in fam.gguf.projectors:
            return fam
    known = sorted(f"{p!r} (family {f.name})" for f in _REGISTRY.values() if f.gguf is not None
                   for p in f.gguf.projectors)
    raise UnsupportedModelType(f"unsupported mmproj projector type {projector_type!r}; gemmax reads mmproj files "
                               f"of projector type {', '.join(known)}")


def for_keras_backbone(class_name: str, config: Mapping[str, Any]) -> Family:
    """The family that loads a keras-hub preset whose backbone is ``class_name`` with ``config``."""
    for fam in _REGISTRY.values():
        if fam.keras is not None and class_name in fam.keras.classes and fam.keras.accepts(class_name, config):
            return fam
    known = sorted({c for f in _REGISTRY.values() if f.keras is not None for c in f.keras.classes})
    raise UnsupportedModelType(f"unsupported keras-hub backbone {class_name!r}; gemmax loads {', '.join(known)}")


def all_presets() -> dict[str, tuple[Family, Any]]:
    """Every preset name of every family -> (family, config)."""
    return {n: (f, c) for f in _REGISTRY.values() for n, c in f.presets.items()}
