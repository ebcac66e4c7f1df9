"""Runtimes: the interface chat, bench and serve use (``base``), its llama.cpp and
transformers implementations, the engine process that holds one, and what this machine can run."""
