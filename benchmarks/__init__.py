"""Benchmarks: one script per question; each prints a table and writes benchmarks/results/<name>.json."""
