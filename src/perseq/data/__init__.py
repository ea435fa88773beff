"""Data: readers, registry, preparation, splits, batching, synthetic generator."""
