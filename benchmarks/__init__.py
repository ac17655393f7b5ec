"""Benchmarks: one script per question, ``python -m benchmarks.NAME``; JSON to ``results/``."""
