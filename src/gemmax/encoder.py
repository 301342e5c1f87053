"""``TextEncoder``: sentence embeddings (EmbeddingGemma) with the numbers ``SentenceTransformer.encode`` gives.

It owns an :class:`~gemmax.models.embedding_gemma.EncoderConfig`, one parameter tree (the Gemma backbone's
weights under the decoder's paths plus ``dense_{i}/``) and the tokenizer. ``encode`` tokenizes (prompt
prepended to the text, ``<bos>``/``<eos>`` as the folder's tokenizer adds them, truncated to
``max_seq_length``), sorts the inputs by length, and runs batches right-padded to a length bucket (four
per doubling) and a batch bucket (powers of two), so a handful of compiled shapes serve every request;
padding is masked out of attention and pooling.

Sharding: under an active ``gemmax.distribution`` (``with dist.scope():``) the weights are placed by its
layout map as they are read (``dist.get_layout_map(encoder.config, mesh)`` derives one from the declared
logical axes, as for ``CausalLM``) and each batch is split over the batch axis when it divides.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemmax import distribution as _dist
from gemmax.api import _dtype, load_tokenizer, place_params
from gemmax.engine.generate import bucket
from gemmax.io.hf import (
    CheckpointError,
    lazy_from_table,
    open_safetensors_folder,
    resolve_hf_handle,
    table_to_hf,
    write_safetensors,
)
from gemmax.models import embedding_gemma as eg
from gemmax.models.embedding_gemma import EncoderConfig
from gemmax.models.gemma import hf as gemma_hf
from gemmax.nn.params import describe_size, flatten, unflatten

__all__ = ["TextEncoder", "EncoderConfig", "is_encoder_handle", "presets"]

#: What ``encode`` takes: one text, texts, one list of token ids, or lists of them.
Inputs = str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]] | np.ndarray


class TextEncoder:
    """A text-embedding model (EmbeddingGemma) and its tokenizer.

    ``encode`` returns what ``SentenceTransformer(folder).encode`` returns for the same folder (float32
    ``[N, dim]``; one input gives ``[dim]``). Load with :meth:`from_preset` (a sentence-transformers folder,
    ``hf://google/embeddinggemma-300m`` from the local Hugging Face cache, or the preset name
    ``embeddinggemma_300m``) or build a random one with :meth:`from_config`.
    """

    def __init__(self, config: EncoderConfig, params: dict, tokenizer: Any = None, source: str = ""):
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.source = source

    # ---- construction ------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: EncoderConfig | str, seed: int = 0, dtype: Any = "float32",
                    tokenizer: Any = None) -> TextEncoder:
        """Random weights for a config or a preset name (shapes, tests, benchmarks)."""
        cfg = _preset(config) if isinstance(config, str) else config
        dtype = _dtype(dtype)
        init = jax.jit(functools.partial(eg.init_params, cfg, dtype=dtype))
        key = jax.random.key(seed, impl="rbg")
        dist = _dist.distribution()
        if dist is not None:
            shardings = dist.param_shardings(jax.eval_shape(init, key))
            params = jax.jit(init, out_shardings=shardings)(key)
        else:
            params = init(key)
        return cls(cfg, params, tokenizer, source=f"random:{cfg.name}")

    @classmethod
    def from_preset(cls, handle: str | os.PathLike, dtype: Any = "float32") -> TextEncoder:
        """Load a sentence-transformers folder (EmbeddingGemma's published layout), ``hf://org/name`` (the
        local Hugging Face cache first), or a preset name whose weights are in that cache."""
        dtype = _dtype(dtype)
        handle = os.fspath(handle)
        path = Path(os.path.expanduser(handle))
        if handle.startswith("hf://"):
            return cls._from_folder(resolve_hf_handle(handle), dtype, handle)
        if path.is_dir():
            return cls._from_folder(path, dtype, str(path))
        if handle in eg.PRESETS:
            return cls._from_folder(resolve_hf_handle("hf://" + eg.PRESET_REPOS[handle]), dtype, handle)
        raise CheckpointError(f"cannot load {handle!r} as a text encoder: not a folder, an hf:// handle or a "
                              f"preset ({', '.join(sorted(eg.PRESETS))})")

    @classmethod
    def _from_folder(cls, folder: Path, dtype: Any, source: str) -> TextEncoder:
        try:
            cfg, backbone_dir, dense_dirs = eg.read_folder(folder)
        except eg.EncoderFolderError as e:
            raise CheckpointError(str(e)) from None
        specs = eg.param_specs(cfg)
        np_dtype = np.dtype(jnp.dtype(dtype))
        src = open_safetensors_folder(backbone_dir)
        backbone_specs = {p: s for p, s in specs.items() if not p.startswith("dense_")}
        lazy = lazy_from_table(backbone_specs, gemma_hf.hf_table(cfg.backbone), src, np_dtype, shape_of=src.shape,
                               aliases=eg.BACKBONE_ALIASES + gemma_hf.HF_ALIASES,
                               ignorable=("rotary_emb.inv_freq", "lm_head.weight"), what="Gemma 3 backbone")
        for i, table in eg.dense_table(cfg).items():
            st = open_safetensors_folder(dense_dirs[i])
            lazy.update(lazy_from_table(specs, table, st, np_dtype, shape_of=st.shape, what=f"Dense module {i}"))
        params = unflatten(place_params(lazy, dtype, _dist.distribution()))
        tok = load_tokenizer(backbone_dir)
        return cls(cfg, params, tok, source=source)

    # ---- running -----------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.config.dim

    @property
    def prompts(self) -> dict[str, str]:
        return dict(self.config.prompts)

    @functools.cached_property
    def _embed_fn(self) -> Any:
        cfg = self.config
        return jax.jit(lambda params, tokens, valid, pool_mask: eg.embed(params, cfg, tokens, valid, pool_mask))

    def resolve_prompt(self, prompt_name: str | None = None, prompt: str | None = None) -> str | None:
        """The prompt text: ``prompt`` as given, else the named one, else the config's default (if any)."""
        if prompt is not None:
            return prompt
        if prompt_name is not None:
            if prompt_name not in self.config.prompts:
                raise ValueError(f"unknown prompt_name {prompt_name!r}; this model's prompts: "
                                 f"{', '.join(self.config.prompts) or '(none)'}")
            return self.config.prompts[prompt_name]
        if self.config.default_prompt_name is not None:
            return self.config.prompts[self.config.default_prompt_name]
        return None

    def tokenize(self, inputs: Inputs, prompt: str | None = None) -> list[list[int]]:
        """Token ids of each input as the model sees them: texts get the prompt, ``<bos>``/``<eos>`` and the
        ``max_seq_length`` truncation; token-id inputs are taken as they are (too long: an error)."""
        items = _as_list(inputs)
        out = []
        limit = self.config.max_len
        for x in items:
            if isinstance(x, str):
                out.append(self._text_ids(prompt + x if prompt else x))
            else:
                ids = [int(i) for i in x]
                if not ids:
                    raise ValueError("an empty list of token ids has no embedding")
                if len(ids) > limit:
                    raise ValueError(f"an input of {len(ids)} token ids is longer than the model's {limit}")
                bad = [i for i in ids if not 0 <= i < self.config.backbone.vocab_size]
                if bad:
                    raise ValueError(f"token ids {bad[:5]} are outside the vocabulary "
                                     f"(0..{self.config.backbone.vocab_size - 1})")
                out.append(ids)
        return out

    def _text_ids(self, text: str) -> list[int]:
        tok = self._need_tokenizer()
        cfg = self.config
        body = tok.encode(text, add_bos=False)
        room = cfg.max_len - int(cfg.add_bos) - int(cfg.add_eos)
        body = body[:room]
        return ([tok.bos_id] if cfg.add_bos else []) + body + ([tok.eos_id] if cfg.add_eos else [])

    def _need_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise ValueError("this encoder has no tokenizer: pass token ids, or load a folder with one")
        return self.tokenizer

    def _prompt_length(self, prompt: str | None) -> int:
        """Tokens of the prompt at the start of every text (its trailing ``<eos>`` not counted), which
        pooling skips when the model's ``include_prompt`` is off."""
        if not prompt or self.config.include_prompt:
            return 0
        n = len(self._text_ids(prompt))
        return n - 1 if self.config.add_eos else n

    def encode(self, inputs: Inputs, prompt_name: str | None = None, prompt: str | None = None,
               batch_size: int = 32, truncate_dim: int | None = None, normalize: bool = False) -> np.ndarray:
        """Embeddings of texts (or token-id lists) as float32 ``[N, dim]`` (one input: ``[dim]``).

        ``prompt_name`` picks one of the model's prompts (EmbeddingGemma: ``"query"``, ``"document"``,
        ``"Retrieval-query"``, ``"STS"``...); ``prompt`` gives the text itself; neither means the model's
        default prompt, if it names one. Prompts apply to texts only. ``truncate_dim`` keeps the first
        dimensions (EmbeddingGemma is trained for 512, 256 and 128); like sentence-transformers, the kept
        part is not re-normalized unless ``normalize=True``, which L2-normalizes the final vectors.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if truncate_dim is not None and not 0 < truncate_dim <= self.dim:
            raise ValueError(f"truncate_dim must be between 1 and {self.dim}, got {truncate_dim}")
        single = _is_single(inputs)
        text_prompt = self.resolve_prompt(prompt_name, prompt)
        ids = self.tokenize(inputs, text_prompt)
        skip = self._prompt_length(text_prompt)
        is_text = [isinstance(x, str) for x in _as_list(inputs)]
        out = self.encode_ids(ids, batch_size, [skip if t else 0 for t in is_text])
        if truncate_dim is not None:
            out = out[:, :truncate_dim]
        if normalize:
            out = out / np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
        return out[0] if single else out

    def encode_query(self, inputs: Inputs, **kw: Any) -> np.ndarray:
        """``encode`` with the model's ``"query"`` prompt (EmbeddingGemma's retrieval queries)."""
        kw.setdefault("prompt_name", "query" if "query" in self.config.prompts else None)
        return self.encode(inputs, **kw)

    def encode_document(self, inputs: Inputs, **kw: Any) -> np.ndarray:
        """``encode`` with the model's ``"document"`` prompt."""
        kw.setdefault("prompt_name", "document" if "document" in self.config.prompts else None)
        return self.encode(inputs, **kw)

    def encode_ids(self, ids: Sequence[Sequence[int]], batch_size: int = 32,
                   skip: Sequence[int] | None = None) -> np.ndarray:
        """Token-id lists (taken as they are) -> float32 ``[N, dim]``. ``skip``: leading tokens of each row
        left out of pooling (the prompt, when ``include_prompt`` is off)."""
        n = len(ids)
        if n == 0:
            return np.zeros((0, self.dim), np.float32)
        skip = list(skip) if skip is not None else [0] * n
        order = sorted(range(n), key=lambda i: -len(ids[i]))  # long first: batches of like lengths
        out = np.empty((n, self.dim), np.float32)
        dist = _dist.distribution()
        for start in range(0, n, batch_size):
            rows = order[start:start + batch_size]
            t = length_bucket(max(len(ids[i]) for i in rows))
            b = min(bucket(len(rows), minimum=1), bucket(batch_size, minimum=1))
            tokens = np.zeros((b, t), np.int32)
            valid = np.zeros((b, t), bool)
            for r, i in enumerate(rows):
                tokens[r, :len(ids[i])] = ids[i]
                valid[r, :len(ids[i])] = True
            pool_mask = valid.copy()
            for r, i in enumerate(rows):
                pool_mask[r, :skip[i]] = False
            batch = (tokens, valid, pool_mask)
            if dist is not None:
                batch = _place_batch(dist, batch)
            emb = np.asarray(self._embed_fn(self.params, *batch))
            out[rows] = emb[:len(rows)]
        return out

    def similarity(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Pairwise similarity ``[len(a), len(b)]`` by the model's function (cosine for EmbeddingGemma)."""
        a, b = np.atleast_2d(a), np.atleast_2d(b)
        if self.config.similarity == "dot":
            return a @ b.T
        if self.config.similarity != "cosine":
            raise ValueError(f"similarity {self.config.similarity!r} is not implemented (cosine, dot)")
        na = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
        nb = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
        return na @ nb.T

    # ---- saving ------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write a sentence-transformers folder in EmbeddingGemma's published layout (backbone at the root
        with Gemma3TextModel's keys, ``1_Pooling``, the ``Dense`` modules, ``Normalize``) and the tokenizer;
        ``SentenceTransformer(path)`` and :meth:`from_preset` both read it."""
        folder = Path(path)
        cfg = self.config
        eg.write_folder_config(cfg, folder)
        flat = {p: np.asarray(jax.device_get(v), np.float32) for p, v in flatten(self.params).items()}
        table = gemma_hf.hf_table(cfg.backbone)
        backbone = {name.removeprefix("model."): arr for name, arr in table_to_hf(flat, table)}
        write_safetensors(folder / "model.safetensors", backbone, metadata={"format": "pt"})
        modules = json.loads((folder / "modules.json").read_text())
        dense_dirs = [folder / m["path"] for m in modules if m["type"].endswith("Dense")]
        for i, tensors in eg.dense_arrays_to_hf(flat, cfg).items():
            write_safetensors(dense_dirs[i] / "model.safetensors", tensors, metadata={"format": "pt"})
        if self.tokenizer is not None:
            self.tokenizer.save(folder)
            (folder / "tokenizer_config.json").write_text(json.dumps(
                {"tokenizer_class": "GemmaTokenizer", "add_bos_token": cfg.add_bos, "add_eos_token": cfg.add_eos,
                 "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
                 "padding_side": "right"}, indent=2))
        return folder

    def summary(self) -> str:
        counts = self.config.param_count()
        text = (f"TextEncoder {self.config.name or self.source}: {describe_size(counts['total'])} parameters "
                f"({counts['total']:,}; dense {counts['dense']:,}), dim {self.dim}, pooling "
                f"{'+'.join(self.config.pooling)}, {'normalized' if self.config.normalize else 'not normalized'}, "
                f"max {self.config.max_len} tokens, prompts: {', '.join(self.config.prompts) or '(none)'}")
        print(text)
        return text


# ---- helpers -------------------------------------------------------------------------------------------------


def length_bucket(n: int) -> int:
    """The padded length of a batch whose longest input has ``n`` tokens: multiples of 16 up to 64, then
    four steps per doubling (80, 96, 112, 128, 160, ...). At most ~4 compiled lengths per octave, and a batch
    carries under a quarter of padding past 64 tokens (powers of two alone waste up to half)."""
    if n <= 64:
        return max(16, -(-n // 16) * 16)
    step = 1 << (max(n - 1, 1).bit_length() - 3)
    return -(-n // step) * step


def is_encoder_handle(handle: str | os.PathLike) -> bool:
    """Whether a handle names a text encoder: a sentence-transformers folder (``modules.json``), a backbone
    with bidirectional attention, an encoder preset, or an ``hf://`` handle resolving to one of those."""
    handle = os.fspath(handle)
    if handle in eg.PRESETS:
        return True
    if handle.startswith("hf://"):
        try:
            path = resolve_hf_handle(handle)
        except CheckpointError:
            return False
    else:
        path = Path(os.path.expanduser(handle))
    if not path.is_dir():
        return False
    if eg.is_sentence_transformers_folder(path):
        return True
    try:
        return bool(json.loads((path / "config.json").read_text()).get("use_bidirectional_attention"))
    except (OSError, ValueError):
        return False


def _preset(name: str) -> EncoderConfig:
    if name not in eg.PRESETS:
        raise ValueError(f"unknown encoder preset {name!r}; presets: {', '.join(sorted(eg.PRESETS))}")
    return eg.PRESETS[name]


def presets() -> dict[str, str]:
    """Encoder preset name -> parameter count, e.g. ``{"embeddinggemma_300m": "308M"}``."""
    return {n: describe_size(c.param_count()["total"]) for n, c in eg.PRESETS.items()}


def _is_single(inputs: Any) -> bool:
    """A string, or a flat sequence of token ids, is one input; a list of them is a batch."""
    if isinstance(inputs, str):
        return True
    if isinstance(inputs, np.ndarray):
        return inputs.ndim == 1 and inputs.dtype.kind in "iu"
    if isinstance(inputs, (list, tuple)) and inputs:
        return isinstance(inputs[0], (int, np.integer))
    return False


def _as_list(inputs: Any) -> list[Any]:
    if _is_single(inputs):
        return [inputs]
    if isinstance(inputs, np.ndarray):
        return [row for row in inputs] if inputs.dtype.kind in "iu" else [str(x) for x in inputs]
    items = list(inputs)
    for x in items:
        if not isinstance(x, (str, list, tuple, np.ndarray)):
            raise TypeError(f"encode takes texts or lists of token ids, got {type(x).__name__}")
    return items


def _place_batch(dist: Any, batch: tuple[np.ndarray, ...]) -> tuple[Any, ...]:
    """Split the batch over the distribution's batch axis when its rows divide evenly, else replicate."""
    mesh = dist.device_mesh
    axis = dist.batch_dim_name
    n = mesh.axis_size(axis) if axis and axis in mesh.axis_names else 1
    if n > 1 and batch[0].shape[0] % n == 0:
        return tuple(dist.shard_batch(x) for x in batch)
    return tuple(jax.device_put(x, dist.replicated()) for x in batch)
