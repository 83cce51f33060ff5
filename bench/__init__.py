"""Benchmarks: each script measures the project's path against a baseline in the same run,
prints a table and writes JSON to bench/results/. See BENCHMARKS.md."""
