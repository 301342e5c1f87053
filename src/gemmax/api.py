"""``CausalLM``: the object users hold — load, run, inspect, save.

It owns a config, a parameter pytree and (when the checkpoint has one) a tokenizer; every capability is a
pure function elsewhere in the package (model, generate, lora, train...) applied to those.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemmax import distribution as _dist
from gemmax import keras_presets
from gemmax.engine.constrain import Constraint
from gemmax.engine.generate import Engine, Request, SamplingParams, bucket, generate_ids
from gemmax.engine.prefix_cache import PrefixCache
from gemmax.engine.speculative import speculator_for
from gemmax.io.gguf import projector_type
from gemmax.io.gguf import read_metadata as read_gguf_metadata
from gemmax.io.hf import (
    CheckpointError,
    LazyWeight,
    SafetensorsFile,
    export_hf_folder,
    lazy_from_table,
    open_safetensors_folder,
    read_json_config,
    resolve_hf_handle,
    table_to_hf,
    write_safetensors,
)
from gemmax.io.images import message_images
from gemmax.io.keras import KAGGLE_SCHEME, is_keras_preset, resolve_kaggle_handle
from gemmax.io.tokenizer import Tokenizer
from gemmax.models import base, embedding_gemma
from gemmax.models.base import Family, UnsupportedError
from gemmax.nn import lora, quant
from gemmax.nn.params import LinearNode, describe_size, flatten, unflatten
from gemmax.train import trainer as train
from gemmax.train.checkpoint import PARAMS_MARKER, load_params

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _commit_like_base(params: Any) -> Any:
    """New leaves (fresh adapters) committed to the device of a model held on one device, as the trainer's
    outputs are: jit compiles once per committedness, so ``evaluate`` or ``logits`` before ``fit`` and after
    it would otherwise compile twice. Sharded or abstract trees are returned as they are."""
    leaves = [x for x in jax.tree_util.tree_leaves(params) if isinstance(x, jax.Array)]
    committed = [x for x in leaves if x.committed]
    if not committed or len(committed) == len(leaves) or len(committed[0].devices()) != 1:
        return params
    return jax.device_put(params, next(iter(committed[0].devices())))


def _dtype(d: Any) -> Any:
    if isinstance(d, str):
        try:
            return DTYPES[d]
        except KeyError:
            raise ValueError(f"unknown dtype {d!r}; use one of {sorted(DTYPES)}") from None
    return d


def current_distribution() -> Any:
    return _dist.distribution()


def place_params(lazy: dict[str, LazyWeight | np.ndarray], dtype: Any, dist: Any = None) -> dict[str, Any]:
    """Materialise weights one at a time, each straight into its sharding.

    With a distribution active every device reads only its shard (``make_array_from_callback``); without
    one the weight goes to the default device. The host copy of one weight is freed before the next is
    read, which keeps peak host memory near the model's size.
    """
    out = {}
    np_dtype = np.dtype(jnp.dtype(dtype))
    for path, w in lazy.items():
        shape = tuple(w.shape)
        if dist is not None:
            sharding = dist.sharding_for(path, shape)
        else:
            sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])

        def cb(index, w=w):
            return np.asarray(w[index], dtype=np_dtype)

        out[path] = jax.make_array_from_callback(shape, sharding, cb)
        jax.block_until_ready(out[path])
        if hasattr(w, "release"):
            w.release()  # drop the source pages this weight was read from before reading the next
    return out


class CausalLM:
    """A language model of any registered family (Gemma 1/2/3, CodeGemma, Llama 3, RecurrentGemma,
    PaliGemma...) with its tokenizer: one object, the same methods for every family.

    It holds a config, a parameter pytree and (when the checkpoint has one) a tokenizer; every capability is
    a pure function elsewhere applied to those through the family's :class:`~gemmax.models.base.Family`.
    """

    def __init__(self, config: Any, params: dict, tokenizer: Any = None, source: str = "",
                 family: Family | None = None):
        self.family = family or base.for_config(config)
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.source = source
        self._engine = None

    @property
    def linear_nodes(self) -> dict[str, LinearNode]:
        """The linear layers LoRA and quantization address, as the family declares them."""
        return self.family.linear_nodes(self.config)

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Any, seed: int = 0, dtype: Any = "float32", tokenizer: Any = None) -> CausalLM:
        """A randomly initialised model (a preset name of any family, or a config object)."""
        if isinstance(config, str):
            presets = base.all_presets()
            if config not in presets:
                raise ValueError(f"unknown preset {config!r}; presets: {', '.join(sorted(presets))}")
            fam, cfg = presets[config]
        else:
            cfg = config
            fam = base.for_config(cfg)
        dist = current_distribution()
        init = _init_fn(fam, cfg, _dtype(dtype))
        # rbg keys: a tree of many weights compiles far faster than with threefry
        key = jax.random.key(seed, impl="rbg")
        if dist is not None:
            abstract = jax.eval_shape(init, key)
            shardings = jax.tree_util.tree_map_with_path(
                lambda kp, leaf: dist.sharding_for(_keypath(kp), leaf.shape), abstract)
            params = jax.jit(init, out_shardings=shardings)(key)
        else:
            params = init(key)
        return cls(cfg, params, tokenizer, source=f"random:{getattr(cfg, 'name', '') or fam.name}", family=fam)

    @classmethod
    def from_preset(cls, handle: str, dtype: Any = "float32", quantize: str | None = None,
                    mmproj: str | os.PathLike | None = None, **kw: Any) -> CausalLM:
        """Load from a Hugging Face folder, ``hf://org/name``, a keras-hub preset folder,
        ``kaggle://OWNER/MODEL/keras/VARIANT[/VERSION]`` (kagglehub's cache), a GGUF file, a gemmax folder, or
        a preset name whose weights are in the local Hugging Face cache. Weights convert on the fly.
        ``quantize="int8"`` (or "int4"/"nf4") quantizes the weights after loading.

        ``mmproj``: llama.cpp's second file of a multimodal GGUF model (its vision tower and projector, what
        llama.cpp's ``--mmproj`` takes), read with the text GGUF ``handle`` as one model that takes images
        (Gemma 3's: the ``gemma3_vision`` family; Gemma 4's: ``gemma4_vision``). A GGUF without it loads as its
        text model."""
        lm = cls._load(handle, dtype, mmproj=mmproj, **kw)
        if quantize:
            lm.quantize(quantize)
        return lm

    @classmethod
    def _load(cls, handle: str, dtype: Any = "float32", mmproj: str | os.PathLike | None = None,
              **kw: Any) -> CausalLM:
        dtype = _dtype(dtype)
        handle = os.fspath(handle)
        path = Path(os.path.expanduser(handle))
        if mmproj is not None:  # only llama.cpp's files come in two; elsewhere the tower is in the checkpoint
            if path.suffix != ".gguf":
                raise CheckpointError(f"mmproj is the image file of a GGUF model; {handle!r} is not a .gguf file")
            if not path.is_file():
                raise FileNotFoundError(f"GGUF file not found: {handle}")
            return cls._from_gguf(path, dtype, mmproj=Path(os.path.expanduser(os.fspath(mmproj))), **kw)
        if handle.startswith("hf://"):
            return cls._from_hf_folder(resolve_hf_handle(handle), dtype, source=handle)
        if handle.startswith(KAGGLE_SCHEME):
            return cls._from_keras_preset(resolve_kaggle_handle(handle), dtype, source=handle)
        if path.suffix == ".gguf" and path.is_file():
            return cls._from_gguf(path, dtype, **kw)
        if path.is_dir():
            if (path / "gemmax.json").exists():
                return cls._from_gemmax_folder(path, dtype)
            if (path / PARAMS_MARKER).exists():  # a sharded Orbax folder (gemmax.train.checkpoint.save_params)
                params, cfg = load_params(path, dtype=dtype)
                return cls(cfg, params, load_tokenizer(path), source=str(path))
            if is_keras_preset(path):
                return cls._from_keras_preset(path, dtype, source=str(path))
            return cls._from_hf_folder(path, dtype, source=str(path))
        presets = base.all_presets()
        if handle in presets:
            repo = presets[handle][0].preset_repos.get(handle)
            if repo is None:
                raise CheckpointError(f"preset {handle!r} has no published checkpoint to load")
            return cls._from_hf_folder(resolve_hf_handle("hf://" + repo), dtype, source=handle)
        if path.suffix == ".gguf":
            raise FileNotFoundError(f"GGUF file not found: {handle}")
        if handle in embedding_gemma.PRESETS:
            raise CheckpointError(f"{handle!r} is a text-embedding model, not a causal LM: load it with "
                                  f"gemmax.TextEncoder.from_preset({handle!r})")
        raise CheckpointError(
            f"cannot load {handle!r}: not a folder, a .gguf file, an hf:// handle or a preset name "
            f"(presets: {', '.join(sorted(presets))})")

    @classmethod
    def _from_hf_folder(cls, folder: Path, dtype: Any, source: str) -> CausalLM:
        if (folder / "modules.json").is_file():  # a sentence-transformers folder: config.json is its backbone's
            raise CheckpointError(f"{folder} is a sentence-transformers embedding model, not a causal LM: load it "
                                  f"with gemmax.TextEncoder.from_preset({source!r})")
        hf = read_json_config(folder)
        if hf.get("use_bidirectional_attention"):
            raise CheckpointError(f"{folder} has bidirectional attention (an encoder such as EmbeddingGemma), not a "
                                  f"causal LM: load it with gemmax.TextEncoder.from_preset({source!r})")
        fam, cfg = _family_config(hf, folder / "config.json")
        src = open_safetensors_folder(folder)
        lazy = lazy_from_table(fam.param_specs(cfg), fam.hf_table(cfg), src, np.dtype(jnp.dtype(dtype)),
                               shape_of=src.shape, aliases=fam.hf_aliases,
                               ignorable=(*fam.hf_ignorable, *fam.hf_unused(cfg)),
                               what=f"{getattr(cfg, 'family', fam.name)} model")
        params = unflatten(place_params(lazy, dtype, current_distribution()))
        return cls(cfg, params, load_tokenizer(folder), source=source, family=fam)

    @classmethod
    def _from_keras_preset(cls, folder: Path, dtype: Any, source: str) -> CausalLM:
        """A keras-hub preset folder: config.json names the backbone, model.weights.h5 is read lazily through
        the family's Keras name table and placed like any checkpoint, the tokenizer comes from its assets."""
        fam, cfg = keras_presets.read_preset(folder)
        lazy = keras_presets.lazy_weights(folder, fam, cfg, dtype)
        params = unflatten(place_params(lazy, dtype, current_distribution()))
        tok = keras_presets.load_tokenizer(folder)
        return cls(keras_presets.with_special_ids(cfg, tok), params, tok, source=source, family=fam)

    @classmethod
    def _from_gguf(cls, path: Path, dtype: Any, mmproj: Path | None = None, **kw: Any) -> CausalLM:
        if mmproj is None:
            arch, _, _ = read_gguf_metadata(path)
            contents = base.for_gguf_arch(arch).gguf.read(path)
        else:  # the family that reads this projector type reads the pair
            contents = base.for_gguf_projector(projector_type(mmproj)).gguf.read(path, mmproj=mmproj)
        fam, cfg = _family_config(contents.hf_config, path)
        lazy = lazy_from_table(fam.param_specs(cfg), fam.hf_table(cfg), contents, np.dtype(jnp.dtype(dtype)),
                               shape_of=lambda n: contents.tensor_info[n].shape, aliases=fam.hf_aliases,
                               ignorable=(*fam.hf_ignorable, *fam.hf_unused(cfg)),
                               what=f"{getattr(cfg, 'family', fam.name)} model")
        params = unflatten(place_params(lazy, dtype, current_distribution()))
        tok = None
        if contents.tokenizer_metadata.get("tokenizer.ggml.tokens"):
            try:
                tok = Tokenizer.from_gguf(contents)
            except Exception as e:  # a GGUF without a usable vocabulary still runs on token ids: say why
                warnings.warn(f"{path.name}: its vocabulary was not loaded, the model runs on token ids only "
                              f"({type(e).__name__}: {e})", stacklevel=4)
        return cls(cfg, params, tok, source=str(path), family=fam)

    @classmethod
    def _from_gemmax_folder(cls, folder: Path, dtype: Any) -> CausalLM:
        meta = json.loads((folder / "gemmax.json").read_text())
        fam = base.get(meta.get("family", "gemma"))
        cfg = fam.config_from_dict(meta["config"])
        f = SafetensorsFile(folder / "params.safetensors")
        specs = fam.param_specs(cfg)
        missing = sorted(set(specs) - set(f.keys()))
        if missing:
            raise CheckpointError(f"{folder}: gemmax checkpoint lacks {missing[:5]}")
        for p, s in specs.items():
            if tuple(f.shape(p)) != s.shape:
                raise CheckpointError(f"{folder}: {p} has shape {f.shape(p)}, config says {s.shape}")
        np_dtype = np.dtype(jnp.dtype(dtype))
        lazy = {p: LazyWeight(specs[p].shape, lambda idx, p=p: f.get(p)[idx].astype(np_dtype))
                for p in f.keys() if p in specs}
        params = unflatten(place_params(lazy, dtype, current_distribution()))
        return cls(cfg, params, load_tokenizer(folder), source=str(folder), family=fam)

    # ---- running ---------------------------------------------------------------------------------
    @functools.cached_property
    def _logits_fn(self):
        fam, cfg = self.family, self.config

        def fn(params, tokens, **inputs):
            return fam.logits_from_hidden(params, cfg, fam.forward_hidden(params, cfg, tokens, **inputs))

        return jax.jit(fn)

    def _check_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        inputs = {k: v for k, v in inputs.items() if v is not None}
        unknown = set(inputs) - set(self.family.extra_inputs)
        if unknown:
            takes = ", ".join(self.family.extra_inputs) or "token ids only"
            raise TypeError(f"{self.family.name} models take no {', '.join(sorted(unknown))} (they take {takes})")
        return inputs

    def _check_family_inputs(self, ids: np.ndarray, inputs: dict[str, Any]) -> None:
        """The family's own check of its inputs against the ids (``Family.check_inputs``), before tracing."""
        if inputs and self.family.check_inputs is not None:
            self.family.check_inputs(self.config, ids, inputs)

    def logits(self, token_ids: Any, **inputs: Any) -> np.ndarray:
        """Full forward: float32 logits [batch, seq, vocab]. Lengths are bucketed (padded at the end, which a
        causal model never sees) so nearby lengths share one compilation. ``inputs``: what the family reads
        besides tokens, with transformers' meanings (PaliGemma: ``pixel_values``, ``token_type_ids``)."""
        inputs = self._check_inputs(inputs)
        ids = np.asarray(token_ids, dtype=np.int32)
        if ids.ndim == 1:
            ids = ids[None]
        b, t = ids.shape
        ctx = self.config.max_position_embeddings
        if t > ctx:
            raise ValueError(f"sequence of {t} tokens exceeds the model's context of {ctx}")
        self._check_family_inputs(ids, inputs)
        if inputs:  # inputs aligned with the tokens are the family's to pad: no bucketing here
            return np.asarray(self._logits_fn(self.params, jnp.asarray(ids), **inputs))
        tb = min(bucket(t), max(t, ctx))
        padded = np.zeros((b, tb), np.int32)
        padded[:, :t] = ids
        return np.asarray(self._logits_fn(self.params, jnp.asarray(padded)))[:, :t]

    @property
    def dtype(self) -> Any:
        return self.params["token_embedding"]["embeddings"].dtype

    # ---- generation ------------------------------------------------------------------------------
    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass token ids (a list or array of ints) instead of text")
        return self.tokenizer

    def _sampling(self, n_prompt: int, max_length: int | None, max_new_tokens: int | None, sampler: str | None,
                  temperature: float | None, top_k: int | None, top_p: float | None, min_p: float | None,
                  seed: int, stop_ids: tuple[int, ...]):
        if max_new_tokens is None:
            max_new_tokens = (max_length - n_prompt) if max_length is not None else 64
            if max_length is not None and max_new_tokens < 1:
                raise ValueError(f"max_length={max_length} leaves no room after a {n_prompt}-token prompt")
        sampler = sampler or ("random" if (temperature or 0) > 0 else "greedy")
        if sampler == "greedy":
            temp, k, p, mp = 0.0, 0, 1.0, 0.0
        elif sampler in ("random", "sample", "top_k", "top_p", "min_p"):
            temp = 1.0 if temperature is None else float(temperature)
            k = int(top_k or (50 if sampler == "top_k" else 0))
            p = float(top_p if top_p is not None else (0.9 if sampler == "top_p" else 1.0))
            mp = float(min_p if min_p is not None else (0.05 if sampler == "min_p" else 0.0))
        else:
            raise ValueError(f"unknown sampler {sampler!r}: use greedy, random, top_k, top_p or min_p")
        return SamplingParams(temperature=temp, top_k=k, top_p=p, min_p=mp, seed=seed,
                              max_new_tokens=int(max_new_tokens), stop_ids=stop_ids)

    def _fit_context(self, ids: list[int], max_new: int, truncate: str | None) -> list[int]:
        ctx = self.config.max_position_embeddings
        if len(ids) + max_new <= ctx:
            return ids
        if truncate != "left":
            raise ValueError(
                f"prompt of {len(ids)} tokens plus {max_new} new tokens exceeds the model's context of {ctx} "
                "tokens; shorten the prompt, ask for fewer tokens, or pass truncate='left' to drop the oldest "
                "prompt tokens")
        keep = ctx - max_new
        if keep < 2:
            raise ValueError(f"max_new_tokens={max_new} leaves no room for a prompt in a {ctx}-token context")
        head = ids[:1] if ids and ids[0] == self.config.bos_token_id else []
        return head + ids[len(ids) - (keep - len(head)):]

    def generate(self, prompts: Any = None, max_length: int | None = None, max_new_tokens: int | None = None,
                 sampler: str | None = None, temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None, min_p: float | None = None, seed: int = 0,
                 stop: list[str] | None = None, truncate: str | None = None, chunk: int = 16,
                 prefix: str | None = None, suffix: str | None = None, add_bos: bool = True,
                 stop_token_ids: Any = None, images: Any = None, json_schema: Any = None,
                 regex: str | None = None, grammar: str | None = None, constraint: Constraint | None = None,
                 draft: Any = None, prompt_lookup: bool = False, speculate_tokens: int | None = None,
                 prefix_cache: bool = True, **inputs: Any) -> Any:
        """Generate for one prompt or a batch of prompts of different lengths.

        Text in -> text out (prompt included, as Keras does); token ids in -> token ids out (prompt included,
        as transformers does). ``max_length`` counts the prompt, ``max_new_tokens`` does not. Each row stops
        at its own ``<eos>``/``<end_of_turn>``, ``stop_token_ids`` or stop string. ``prefix``/``suffix`` build
        a CodeGemma fill-in-the-middle prompt and return only the middle. ``inputs`` (one prompt only): what
        the family reads besides tokens, e.g. PaliGemma's ``pixel_values`` and ``token_type_ids``.
        ``images`` (PIL images or arrays) go with a text prompt of a family that reads images; the family
        builds the prompt (image tokens) and preprocesses them. Text out is the prompt plus the new text. For a
        list of prompts, ``images`` is a list with one entry per prompt (an image or a list of images); the
        rows decode as one batch.

        Structured output: ``json_schema`` (a dict or its JSON text), ``regex`` or ``grammar`` (Lark, as
        llguidance reads it), or a ready ``constraint`` (:class:`gemmax.engine.constrain.Constraint`) makes
        every row's output match it (the logits are masked token by token); text out is then the new text
        alone, so that it parses as it is. A row cut by ``max_new_tokens`` may end unfinished.

        ``draft`` (a smaller ``CausalLM`` of the same tokenizer) or ``prompt_lookup=True`` decode
        speculatively, ``speculate_tokens`` drafts a step (docs/speculative.md): the same greedy tokens, the
        same sampling distribution. ``prefix_cache``: reuse the keys/values of prompt prefixes this model
        has seen (kept across calls, bounded; ``lm.prefix_cache``).
        """
        constraint = _constraint(json_schema, regex, grammar, constraint)
        if constraint is not None and images is not None:
            raise ValueError("structured output with images is not supported by generate(); use the server")
        speculator = speculator_for(draft, prompt_lookup, speculate_tokens)
        inputs = self._check_inputs(inputs)
        if images is not None:
            if self.family.encode_prompt is None:
                raise UnsupportedError(f"{self.family.name} models read no images")
            if not isinstance(prompts, str):
                return self._generate_with_images(prompts, images, max_length, max_new_tokens, sampler,
                                                  temperature, top_k, top_p, min_p, seed, chunk, add_bos,
                                                  stop_token_ids, inputs)
            ids, inputs = self.family.encode_prompt(self.config, self._require_tokenizer(), prompts, images,
                                                     add_bos)
            out = self.generate(ids, max_length, max_new_tokens, sampler, temperature, top_k, top_p, min_p, seed,
                                chunk=chunk, stop_token_ids=self.tokenizer.stop_ids if stop_token_ids is None
                                else stop_token_ids, draft=draft, prompt_lookup=prompt_lookup,
                                speculate_tokens=speculate_tokens, **inputs)
            text = self.tokenizer.decode([int(t) for t in out[len(ids):] if t not in self.tokenizer.stop_ids])
            return prompts + text

        fim = prefix is not None or suffix is not None
        if fim:
            tok = self._require_tokenizer()
            prompts = tok.fim_prompt(prefix or "", suffix or "")
        single = _is_single_prompt(prompts)
        batch = [prompts] if single else list(prompts)
        if not batch:
            raise ValueError("no prompts given")
        as_text = isinstance(batch[0], str)
        if as_text:
            tok = self._require_tokenizer()
            ids = [tok.encode(p, add_bos=add_bos) for p in batch]
            stop_ids = tuple(tok.fim_stop_ids if fim else tok.stop_ids)
        else:
            ids = [[int(t) for t in np.asarray(p).reshape(-1)] for p in batch]
            stop_ids = tuple(self.config.eos_ids)
        if stop_token_ids is not None:
            stop_ids = tuple(int(t) for t in np.asarray(stop_token_ids).reshape(-1))
        if inputs and len(batch) != 1:
            raise ValueError(f"{', '.join(sorted(inputs))} go with one prompt; generate a batch prompt by prompt")
        vocab = self.config.vocab_size
        for row in ids:
            if not row:
                raise ValueError("empty prompt")
            bad = [t for t in row if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"token ids out of range for a vocabulary of {vocab}: {bad[:5]}")
        sps = [self._sampling(len(r), max_length, max_new_tokens, sampler, temperature, top_k, top_p, min_p,
                              seed + i, stop_ids) for i, r in enumerate(ids)]
        if constraint is not None:
            self._require_tokenizer()  # the grammar engine reads the vocabulary
            for sp in sps:
                sp.constraint = constraint
        ids = [self._fit_context(r, sp.max_new_tokens, truncate) for r, sp in zip(ids, sps, strict=True)]
        self._check_family_inputs(np.asarray(ids[:1], np.int32), inputs)
        stop_check = None
        if stop:
            tok = self._require_tokenizer()

            def stop_check(r):
                return any(s in tok.decode(r.new_ids) for s in stop)

        reqs = generate_ids(self.params, self.config, ids, sps, chunk=chunk, stop_check=stop_check,
                            inputs=[inputs or None] * len(ids), family=self.family, tokenizer=self.tokenizer,
                            prefix_cache=self._prefix_cache() if prefix_cache else None, speculator=speculator)
        outs: list[Any] = []
        for prompt_ids, r, src in zip(ids, reqs, batch, strict=True):
            new = r.new_ids
            if as_text:
                # the stop token that ended a row is not part of its text (as ``stream`` and the server
                # answer); constrained text must parse as it is
                text = self.tokenizer.decode(new[:-1] if new and new[-1] in stop_ids else new)
                if stop:
                    cut = [text.index(s) for s in stop if s in text]
                    text = text[: min(cut)] if cut else text
                outs.append(text if fim or constraint is not None else src + text)
            else:
                outs.append(np.asarray(prompt_ids + new, np.int32))
        return outs[0] if single else outs

    def _generate_with_images(self, prompts: Any, images: Any, max_length: int | None,
                              max_new_tokens: int | None, sampler: str | None, temperature: float | None,
                              top_k: int | None, top_p: float | None, min_p: float | None, seed: int, chunk: int,
                              add_bos: bool, stop_token_ids: Any, inputs: dict[str, Any]) -> list[str]:
        """``generate`` for a batch of text prompts with images: ``images[i]`` (an image or a list of images)
        goes with ``prompts[i]``. Each prompt is laid out and preprocessed by the family as a single one is;
        the engine prefills them one by one (their image counts may differ) and decodes them as one batch."""
        if not isinstance(prompts, list | tuple) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("images go with a text prompt or a non-empty list of text prompts")
        if inputs:
            raise ValueError(f"{', '.join(sorted(inputs))} cannot be combined with images (give one or the other)")
        if not isinstance(images, list | tuple) or len(images) != len(prompts):
            raise ValueError(f"a batch of {len(prompts)} prompts takes images as a list of {len(prompts)} "
                             "entries, one per prompt (an image or a list of images)")
        tok = self._require_tokenizer()
        stop_ids = tuple(tok.stop_ids if stop_token_ids is None
                         else (int(t) for t in np.asarray(stop_token_ids).reshape(-1)))
        ids, rows = [], []
        for i, (p, im) in enumerate(zip(prompts, images, strict=True)):
            try:
                row_ids, row_inputs = self.family.encode_prompt(self.config, tok, p, im, add_bos)
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
            ids.append(row_ids)
            rows.append(row_inputs)
        sps = [self._sampling(len(r), max_length, max_new_tokens, sampler, temperature, top_k, top_p, min_p,
                              seed + i, stop_ids) for i, r in enumerate(ids)]
        for r, sp, x in zip(ids, sps, rows, strict=True):
            self._fit_context(r, sp.max_new_tokens, None)
            self._check_family_inputs(np.asarray([r], np.int32), x)
        reqs = generate_ids(self.params, self.config, ids, sps, chunk=chunk, inputs=rows, family=self.family,
                            tokenizer=self.tokenizer)
        return [p + tok.decode([t for t in r.new_ids if t not in stop_ids])
                for p, r in zip(prompts, reqs, strict=True)]

    def stream(self, prompt: str, max_new_tokens: int = 64, sampler: str | None = None,
               temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
               min_p: float | None = None, seed: int = 0, stop: list[str] | None = None, chunk: int = 4,
               truncate: str | None = None, add_bos: bool = True, draft: Any = None, prompt_lookup: bool = False,
               speculate_tokens: int | None = None):
        """Yield text as it is produced (complete characters only, byte-fallback safe); speculation as
        ``generate``."""
        speculator = speculator_for(draft, prompt_lookup, speculate_tokens)
        tok = self._require_tokenizer()
        ids = tok.encode(prompt, add_bos=add_bos)
        sp = self._sampling(len(ids), None, max_new_tokens, sampler, temperature, top_k, top_p, min_p, seed,
                            tuple(tok.stop_ids))
        ids = self._fit_context(ids, sp.max_new_tokens, truncate)
        eng = Engine(self.params, self.config, max_batch=1,
                     max_len=min(bucket(len(ids) + sp.max_new_tokens + 1), self.config.max_position_embeddings),
                     chunk=chunk, family=self.family, prefix_cache=self._prefix_cache(), speculator=speculator)
        req = Request(ids, sp)
        dec = tok.stream_decoder()
        text = ""
        eng.add([req])
        sent = 0
        while True:
            new = req.new_ids[sent:]
            sent = len(req.new_ids)
            piece = dec.extend([t for t in new if t not in sp.stop_ids])
            if piece:
                if stop:
                    hit = [(text + piece).find(s) for s in stop if s in text + piece]
                    if hit:
                        yield (text + piece)[len(text): min(hit)]
                        eng.finish(req, "stop")
                        return
                text += piece
                yield piece
            if req.done:
                break
            eng.step()
        rest = dec.flush()
        if rest:
            yield rest

    def _prefix_cache(self) -> PrefixCache:
        """This model's prefix cache (made on first use): ``generate`` builds an engine per call, so the
        cache lives here to carry prompt prefixes from one call to the next."""
        if getattr(self, "prefix_cache", None) is None:
            self.prefix_cache = PrefixCache()
        return self.prefix_cache

    def chat(self, messages: list[dict[str, Any]], max_new_tokens: int = 256,
             tools: list[dict[str, Any]] | None = None, tool_choice: Any = "auto", **kw: Any) -> Any:
        """One assistant reply for a list of {"role", "content"} messages, in the model's chat format. A content
        may be a list of parts: text and, for a family that reads images, images (``{"type": "image", "image":
        PIL image / array / path}`` or OpenAI's ``{"type": "image_url", "image_url": {"url": "data:..."}}``),
        placed where the parts are (``gemmax.io.images``).

        With ``tools`` (OpenAI's tool objects, declared in the family's function-calling format, docs/tools.md)
        the reply is an assistant message, ``{"role": "assistant", "content": str | None, "tool_calls":
        [{"id", "type": "function", "function": {"name", "arguments": JSON text}}]}``, ready to append to
        ``messages`` (with ``{"role": "tool", "tool_call_id", "content"}`` results after it). ``tool_choice``:
        "auto", "none", "required" or a function's name (or OpenAI's ``{"type": "function", "function":
        {"name"}}``); a forced call opens the answer, and one whose arguments do not match the tool's schema
        raises ValueError. Under "auto" text that is no valid call is the reply's content.

        Without tools, ``json_schema``, ``regex`` and ``grammar`` (see :meth:`generate`) constrain the reply,
        returned as it is (not stripped)."""
        if not tools and any(kw.get(k) is not None for k in ("json_schema", "regex", "grammar", "constraint")):
            tok = self._require_tokenizer()
            prompt = tok.apply_chat_template(messages, add_generation_prompt=True, family=self.chat_format)
            if message_images(messages):
                raise ValueError("structured output with images is not supported by chat(); use the server")
            return self.generate(prompt, max_new_tokens=max_new_tokens, **kw)
        tok = self._require_tokenizer()
        if tools:
            return self._chat_tools(messages, max_new_tokens, tools, tool_choice, **kw)
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, family=self.chat_format)
        images = message_images(messages)
        if images:
            kw["images"] = images
        out = self.generate(prompt, max_new_tokens=max_new_tokens, **kw)
        return out[len(prompt):].strip() if out.startswith(prompt) else out

    def _chat_tools(self, messages: list[dict[str, Any]], max_new_tokens: int, tools: list[dict[str, Any]],
                    tool_choice: Any, **kw: Any) -> dict[str, Any]:
        """``chat`` with tools: render them, prime a forced call's opener, read the calls out of the answer
        (control tokens kept: Gemma 4's call markers are special tokens) and check them against the schemas."""
        import uuid

        from gemmax.io import tool_calls as tc

        tok = self._require_tokenizer()
        fam = self.chat_format
        tools = [{"type": "function", "function": t.get("function", t)} for t in tools]
        schemas = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in tools}
        if isinstance(tool_choice, dict):
            tool_choice = (tool_choice.get("function") or {}).get("name")
        if tool_choice not in ("auto", "none", "required") and tool_choice not in schemas:
            raise ValueError(f"tool_choice {tool_choice!r} names no tool ({', '.join(schemas)})")
        call = None if tool_choice in ("auto", "none") else tc.forced_call(tools, tool_choice, fam)
        forced = call.name if call is not None else None
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, family=fam,
                                         tools=None if tool_choice == "none" else tools)
        opener = call.opener if call is not None else ""
        ids = tok.encode(prompt + opener, add_bos=True)
        stops = tuple(tok.stop_ids) + tuple(i for i in [tok.piece_to_id("<|tool_response>")] if i >= 0)
        if call is not None and not any(kw.get(k) is not None for k in ("json_schema", "regex", "grammar",
                                                                          "constraint")):
            # what follows the opener can only be a conforming call (JSON arguments, or a name and them)
            kw["constraint"] = (Constraint.json_schema(call.schema) if call.schema is not None
                                else Constraint.named_json(call.alternatives))
        out = self.generate(ids, max_new_tokens=max_new_tokens, stop_token_ids=stops, **kw)
        text = opener + tok.decode([int(t) for t in out[len(ids):] if int(t) not in stops], skip_special=False)
        if tool_choice == "none":
            return {"role": "assistant", "content": text.strip()}
        parsed = tc.parse_calls(text, fam)
        if not parsed.calls and call is not None and call.closer:
            parsed = tc.parse_calls(text + call.closer, fam)
        errors = [e for e in (tc.call_error(c, schemas, forced) for c in parsed.calls) if e]
        if parsed.calls and not errors:
            calls = [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": c.name, "arguments": tc.arguments_json(c.arguments)}}
                     for c in parsed.calls]
            return {"role": "assistant", "content": parsed.content or None, "tool_calls": calls}
        if tool_choice != "auto":
            raise ValueError("the model's answer to a forced tool call is not a valid call: "
                             + (errors[0] if errors else parsed.error or "no call in the answer"))
        return {"role": "assistant", "content": text.strip()}

    # ---- adapters, quantization, training -------------------------------------------------------------
    @property
    def chat_format(self) -> str:
        """The chat turn format of this model: "gemma", "llama3" or "paligemma" (no turns: the last user text)."""
        return self.family.chat_format(self.config)

    def enable_lora(self, rank: int = 4, alpha: float | None = None, targets: Any = ("query", "value"),
                    seed: int = 0, dtype: Any = "float32", verbose: bool = True) -> CausalLM:
        """Freeze the base and add low-rank adapters (PEFT's factorisation) on every layer of ``targets``
        (the family's linear names, e.g. "query", or PEFT's, e.g. "q_proj"); ``alpha`` defaults to rank."""
        nodes = self.linear_nodes
        self.params = _commit_like_base(lora.add_lora(self.params, nodes, rank=rank, alpha=alpha,
                                                      targets=targets, seed=seed, dtype=_dtype(dtype)))
        if verbose:
            total = sum(int(np.prod(a.shape)) for _, a in self.weights())
            print(f"LoRA rank {rank} on {', '.join(lora.lora_targets(self.params, nodes))}: "
                  f"{lora.count_trainable(self.params):,} trainable of {total:,} parameters")
        return self

    @property
    def trainable_paths(self) -> set[str] | None:
        """Paths the trainer updates: the adapters when LoRA is on, else every weight (None)."""
        flat = flatten(self.params)
        lora_paths = {p for p in flat if p.endswith(("lora_a", "lora_b"))}
        return lora_paths or None

    def merge_lora(self) -> CausalLM:
        """Fold the adapters into the base weights (for export or faster inference)."""
        self.params = lora.merge_lora(self.params, self.linear_nodes)
        return self

    def save_adapter(self, path: str | os.PathLike, **kw: Any) -> Any:
        return lora.save_adapter(path, self.params, self.linear_nodes, **kw)

    def load_adapter(self, path: str | os.PathLike) -> CausalLM:
        self.params = lora.load_adapter(path, self.params, self.linear_nodes)
        return self

    def export_peft(self, path: str | os.PathLike, **kw: Any) -> Any:
        """The adapters in PEFT's format (adapter_config.json + adapter_model.safetensors)."""
        return lora.export_peft(path, self.params, self.linear_nodes, **kw)

    def load_keras_lora(self, path: str | os.PathLike) -> CausalLM:
        """Add the adapters of a keras-hub ``*.lora.h5`` file (``backbone.save_lora_weights``: a LoRA trained
        in Keras, per head) as gemmax adapters with the same outputs; serve, train on or merge them."""
        self.params = keras_presets.import_lora(self.params, self.family, self.config, path)
        self.__dict__.pop("_logits_fn", None)
        return self

    def export_keras_lora(self, path: str | os.PathLike) -> Path:
        """The adapters as a keras-hub ``*.lora.h5`` file that ``backbone.load_lora_weights`` reads."""
        return keras_presets.export_lora(self.params, self.family, self.config, path)

    def export_keras(self, path: str | os.PathLike, lora: str = "merge", dtype: Any = np.float32) -> Path:
        """A keras-hub preset folder (config.json, metadata.json, model.weights.h5, tokenizer) that
        ``keras_hub.models.CausalLM.from_preset`` loads. ``lora="merge"`` folds adapters into the weights;
        ``"keep"`` writes the base weights and the adapters beside them as ``model.lora.h5`` (for
        ``backbone.load_lora_weights``). Quantized weights are written dequantized."""
        if lora not in ("merge", "keep"):
            raise ValueError(f"lora must be 'merge' or 'keep', got {lora!r}")
        keep = lora == "keep" and any(p.endswith("lora_a") for p in flatten(self.params))
        out = keras_presets.export_preset(path, self.family, self.config, self._host_flat(merge=not keep),
                                          self.tokenizer, dtype=dtype)
        if keep:
            self.export_keras_lora(out / keras_presets.LORA_FILE)
        return out

    def export_gguf(self, path: str | os.PathLike, dtype: str = "f16",
                    mmproj_path: str | os.PathLike | None = None) -> Path:
        """A GGUF file (f32, f16 or q8_0) that llama.cpp loads; adapters are merged first. Returns its path.

        A model that reads images through llama.cpp's second file (``gemma3_vision``, ``gemma4_vision``) writes its
        decoder at ``path`` and, given ``mmproj_path``, its vision tower and projector there as llama.cpp's
        mmproj (f32 for ``dtype="f32"``, else f16); without ``mmproj_path`` only the text model is written."""
        arch = self.family.gguf_arch(self.config)
        if arch is None:
            raise UnsupportedError(f"cannot export {self.family.name} as GGUF: llama.cpp defines no "
                                   f"architecture for it (export_hf or save work for every family)")
        spec = self.family.gguf
        if mmproj_path is not None and not spec.projectors:
            raise UnsupportedError(f"{self.family.name} models have no llama.cpp mmproj file to write: "
                                   f"mmproj_path is for Gemma 3 and Gemma 4 with images")
        flat = self._host_flat(merge=True)
        tensors = dict(table_to_hf(flat, self.family.hf_table(self.config)))
        extra = {} if mmproj_path is None else {"mmproj_path": mmproj_path}
        return spec.write(path, self.family.to_hf_config(self.config), tensors, tokenizer=self.tokenizer,
                          dtype=dtype, **extra)

    def quantize(self, mode: str = "int8", **kw: Any) -> CausalLM:
        """Weight-only quantization in place (int8 per channel; int4/nf4 grouped)."""
        self.params = quant.quantize_params(self.params, self.linear_nodes, mode=mode, **kw)
        if kw.get("embedding", True) and kw.get("targets") is None:  # the family's other row tables
            for path in self.family.extra_embeddings:
                self.params = quant.quantize_params(self.params, {}, embedding=path, head=None,
                                                    embedding_mode=kw.get("embedding_mode", "int8"))
        self.__dict__.pop("_logits_fn", None)
        return self

    def fit(self, data: Any, objective: Any = "sft", **kw: Any) -> Any:
        """Fine-tune (LoRA when enabled, else full); see ``gemmax.train.trainer.fit`` for the options.

        ``objective``: "sft" (next-token), "dpo", "simpo", "orpo", "distill", "grpo" or an objective object
        (``gemmax.train.objectives``); the objective's own settings (``beta``, ``reward_funcs``, ``teacher``...)
        are passed here as keywords along with the trainer's."""
        if isinstance(objective, str):
            if objective == "sft":
                objective = None
            else:
                from gemmax.train.post_training import make_objective, objective_options

                own = set(objective_options(objective)) - set(inspect.signature(train.fit).parameters)
                objective = make_objective(objective, **{k: kw.pop(k) for k in list(kw) if k in own})
        return train.fit(self, data, objective=objective, **kw)

    def evaluate(self, data: Any, **kw: Any) -> dict[str, float]:
        return train.evaluate(self, data, **kw)

    # ---- inspection ------------------------------------------------------------------------------
    def weights(self, prefix: str = "") -> list[tuple[str, Any]]:
        """(path, array) for every weight whose path starts with ``prefix``: what the Keras tutorials' snippets
        iterate over to print shapes and shardings."""
        return [(p, a) for p, a in flatten(self.params).items() if p.startswith(prefix)]

    def summary(self, print_fn: Any = print) -> str:
        """A Keras-like table: weight path, shape, dtype, parameter count; totals at the end."""
        rows = self.weights()
        trainable = getattr(self, "trainable_paths", None)
        w = max(len(p) for p, _ in rows) + 2
        kind = getattr(self.config, "family", self.family.name)
        lines = [f'Model: "{self.config.name or kind}" ({kind})',
                 f"{'Weight path':<{w}}{'Shape':<24}{'Dtype':<10}{'Params':>14}", "-" * (w + 48)]
        total = embed = 0
        n_train = 0
        for p, a in rows:
            n = int(np.prod(a.shape))
            total += n
            if p.startswith("token_embedding") and "lora" not in p:
                embed += n
            if trainable is None or p in trainable:
                n_train += n
            lines.append(f"{p:<{w}}{str(tuple(a.shape)):<24}{str(a.dtype):<10}{n:>14,}")
        lines += ["-" * (w + 48),
                  f"Total params: {total:,} ({describe_size(total)})",
                  f"Embedding params: {embed:,} ({describe_size(embed)})",
                  f"Non-embedding params: {total - embed:,} ({describe_size(total - embed)})",
                  f"Trainable params: {n_train:,} ({describe_size(n_train)})"]
        text = "\n".join(lines)
        if print_fn:
            print_fn(text)
        return text

    # ---- saving ----------------------------------------------------------------------------------
    def _host_flat(self, merge: bool = True) -> dict[str, np.ndarray]:
        """Host copies of the plain weights; adapters are merged in and quantized kernels dequantized, so
        exports are always ordinary float checkpoints."""
        params = self.params
        flat = flatten(params)
        if any(p.endswith(("lora_a", "qkernel")) or p.endswith("/scale") and "norm" not in p for p in flat):
            nodes = self.linear_nodes
            params = quant.dequantize_params(lora.merge_lora(params, nodes) if merge else lora.strip_lora(params),
                                             nodes)
            for path in self.family.extra_embeddings:
                params = quant.dequantize_params(params, {}, embedding=path, head=None)
            flat = flatten(params)
        return {p: np.asarray(jax.device_get(a)) for p, a in flat.items()}

    def save(self, path: str | os.PathLike) -> Path:
        """gemmax's own format: ``gemmax.json`` (config) + ``params.safetensors`` keyed by weight path,
        memory-mappable for fast streamed loading; the tokenizer is saved beside it."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        write_safetensors(out / "params.safetensors", self._host_flat(), {"format": "gemmax"})
        meta = {"format": 1, "family": self.family.name, "config": self.config.to_dict()}
        (out / "gemmax.json").write_text(json.dumps(meta, indent=2))
        if self.tokenizer is not None and hasattr(self.tokenizer, "save"):
            self.tokenizer.save(out)
        return out

    def export_hf(self, path: str | os.PathLike, dtype: Any = np.float32) -> Path:
        """A Hugging Face folder (config.json + safetensors) that transformers' from_pretrained loads."""
        cfg = self.config
        eos = list(cfg.eos_ids)
        gen = {"bos_token_id": cfg.bos_token_id, "pad_token_id": cfg.pad_token_id,
               "eos_token_id": eos if len(eos) > 1 else eos[0]}
        tensors = table_to_hf(self._host_flat(), self.family.hf_table(cfg))
        out = export_hf_folder(path, tensors, self.family.to_hf_config(cfg), gen, dtype=dtype)
        if self.tokenizer is not None and hasattr(self.tokenizer, "save"):
            self.tokenizer.save(out)
        return out


_INIT_FNS: dict[tuple[str, str, str], Any] = {}


def _init_fn(fam: Family, cfg: Any, dtype: Any) -> Any:
    """One jitted initialiser per (family, config, dtype): building models of the same shape compiles once."""
    key = (fam.name, json.dumps(cfg.to_dict(), sort_keys=True, default=str), str(jnp.dtype(dtype)))
    if key not in _INIT_FNS:
        _INIT_FNS[key] = jax.jit(functools.partial(fam.init_params, cfg, dtype=dtype))
    return _INIT_FNS[key]


def _family_config(hf: dict[str, Any], where: Any) -> tuple[Family, Any]:
    """(family, config) of a Hugging Face config dict; errors name the file and the problem."""
    fam = base.for_hf_config(hf)
    try:
        return fam, fam.from_hf_config(hf)
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{where}: config lacks a required field ({e})") from None
    except ValueError as e:
        raise CheckpointError(f"{where}: not a usable {fam.name} config ({e})") from None


def _constraint(json_schema: Any, regex: str | None, grammar: str | None,
                constraint: Constraint | None) -> Constraint | None:
    """The one constraint ``generate`` was given, built from whichever argument names it."""
    given = {k: v for k, v in (("json_schema", json_schema), ("regex", regex), ("grammar", grammar),
                               ("constraint", constraint)) if v is not None}
    if len(given) > 1:
        raise ValueError(f"pass one of json_schema, regex, grammar, constraint; got {', '.join(given)}")
    if json_schema is not None:
        return Constraint.json_schema(json_schema)
    if regex is not None:
        return Constraint.regex(regex)
    if grammar is not None:
        return Constraint.grammar(grammar)
    return constraint


def _is_single_prompt(prompts: Any) -> bool:
    """A string, or a flat sequence of token ids, is one prompt; anything else is a batch."""
    if isinstance(prompts, str):
        return True
    if isinstance(prompts, np.ndarray):
        return prompts.ndim == 1
    if isinstance(prompts, (list, tuple)) and prompts:
        return isinstance(prompts[0], (int, np.integer))
    return False


def _keypath(kp) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in kp)


def load_tokenizer(folder: Path) -> Any:
    if not ((folder / "tokenizer.model").exists() or (folder / "tokenizer.json").exists()):
        return None
    try:
        return Tokenizer.from_pretrained(folder)
    except ImportError:
        return None


def presets() -> dict[str, str]:
    """Preset name of every family -> parameter count, e.g. {"gemma3_270m": "268M", ...}."""
    return {n: describe_size(c.param_count()["total"]) for n, (_, c) in base.all_presets().items()}
