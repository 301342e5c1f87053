"""A tiny SentencePiece model with Gemma's special-token ids, trained in a temp folder for fast tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm

from gemmax.io.tokenizer import Tokenizer


def train_tiny_sentencepiece(folder: Path, lines: Sequence[str], vocab_size: int,
                             symbols: Sequence[str] = ("<start_of_turn>", "<end_of_turn>"),
                             **options) -> Tokenizer:
    """BPE over ``lines`` with pad=0, eos=1, bos=2, unk=3 (as Gemma) and ``symbols`` as single tokens."""
    (folder / "corpus.txt").write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"), model_prefix=str(folder / "tok"), vocab_size=vocab_size,
        model_type="bpe", pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
        bos_piece="<bos>", unk_piece="<unk>", user_defined_symbols=list(symbols), hard_vocab_limit=False,
        num_threads=1, minloglevel=2, **options)
    return Tokenizer.from_file(folder / "tok.model")
