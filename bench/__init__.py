"""Benchmarks: `python -m bench.serving` (serving metrics against llama.cpp and HF transformers)."""
