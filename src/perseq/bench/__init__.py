"""Benchmarks: they measure and write files; tests check correctness elsewhere."""
