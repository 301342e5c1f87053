"""The Gemma decoder family: Gemma 1, CodeGemma, Gemma 2, Gemma 3 (text) and Llama 3."""
