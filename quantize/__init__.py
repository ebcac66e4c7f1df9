"""Converters: Hugging Face checkpoints → GGUF (gguf-py and llama.cpp's quantizer)."""
