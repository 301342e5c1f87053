"""A checkpoint's own sampling defaults and whether it is instruction-tuned, read from its files.

Chat front ends (``gemmax chat``, the server's chat endpoint) sample the way the model's publisher says it
should be sampled unless told otherwise: Hugging Face checkpoints carry ``generation_config.json``, GGUF files
may carry ``general.sampling.*`` metadata. Gemma checkpoints that carry neither get Gemma's published values
(top-k 64, top-p 0.95, temperature 1), the ones in every Gemma 3 ``generation_config.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from gemmax.io.gguf import read_metadata

GEMMA_SAMPLING = {"temperature": 1.0, "top_k": 64, "top_p": 0.95}
"""Google's published sampling settings for Gemma 3 (its checkpoints' generation_config.json)."""

_GGUF_KEYS = {"general.sampling.temp": "temperature", "general.sampling.top_k": "top_k",
              "general.sampling.top_p": "top_p", "general.sampling.min_p": "min_p"}
_HF_KEYS = ("temperature", "top_k", "top_p", "min_p")
_TUNED_MARKERS = ("-it", "_it", " it", "instruct", "chat", "-sft", "-rlhf", "-dpo", "assistant")


def _local(source: str | os.PathLike | None) -> Path | None:
    if not source:
        return None
    p = Path(os.path.expanduser(os.fspath(source)))
    return p if p.exists() else None


def _gguf_meta(path: Path) -> dict[str, Any]:
    try:
        return read_metadata(path)[1]
    except (OSError, ValueError):
        return {}


def sampling_defaults(source: str | os.PathLike | None, family: str = "") -> dict[str, Any]:
    """The checkpoint's sampling settings among temperature, top_k, top_p and min_p: from a folder's
    ``generation_config.json`` (``do_sample: false`` means greedy: temperature 0) or a GGUF file's
    ``general.sampling.*`` fields; failing both, Gemma's published values for a Gemma family; else ``{}``."""
    path = _local(source)
    found: dict[str, Any] = {}
    if path is not None and path.is_dir() and (path / "generation_config.json").is_file():
        cfg = json.loads((path / "generation_config.json").read_text())
        found = {k: cfg[k] for k in _HF_KEYS if cfg.get(k) is not None}
        if cfg.get("do_sample") is False:
            found = {"temperature": 0.0}
    elif path is not None and path.suffix == ".gguf":
        meta = _gguf_meta(path)
        found = {name: meta[key] for key, name in _GGUF_KEYS.items() if key in meta}
    if not found and family.startswith(("gemma", "paligemma", "recurrent")):
        found = dict(GEMMA_SAMPLING)
    for k in ("top_k",):
        if k in found:
            found[k] = int(found[k])
    for k in ("temperature", "top_p", "min_p"):
        if k in found:
            found[k] = float(found[k])
    return found


def instruction_tuned(source: str | os.PathLike | None, name: str = "") -> bool:
    """Whether the checkpoint looks instruction-tuned: its names (file or folder, config name, GGUF
    ``general.name`` / ``general.finetune``, HF ``_name_or_path``) carry a marker such as ``-it`` or
    ``instruct``. Gemma's base (pretrained) checkpoints carry none ("gemma-3-270m" vs "gemma-3-270m-it")."""
    names = [name, os.fspath(source or "")]
    path = _local(source)
    if path is not None and path.suffix == ".gguf":
        meta = _gguf_meta(path)
        names += [str(meta.get("general.name", "")), str(meta.get("general.finetune", ""))]
    elif path is not None and path.is_dir() and (path / "config.json").is_file():
        names.append(str(json.loads((path / "config.json").read_text()).get("_name_or_path", "")))
    text = " ".join(Path(n).name if os.sep in n else n for n in names).lower()
    return any(m in text for m in _TUNED_MARKERS)


BASE_MODEL_HINT = ("{name} looks like a base (pretrained) model: it continues text rather than following "
                   "instructions, so chat answers may ramble or repeat. For a chat model pass an "
                   "instruction-tuned checkpoint, e.g. --model hf://google/gemma-3-270m-it or a local "
                   "gemma-3-270m-it folder or .gguf file.")
