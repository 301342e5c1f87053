"""Reading and writing checkpoints and tokenizers: safetensors, Hugging Face, GGUF, SentencePiece."""
