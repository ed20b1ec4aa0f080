"""Benchmark suites (pytest-benchmark) and their report, ``python -m benchmarks.report``."""
