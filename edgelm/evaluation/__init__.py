"""Evaluation: llama.cpp's accuracy metrics, the cached reference, `check`, `compare` and the report."""
