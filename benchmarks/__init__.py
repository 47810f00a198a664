"""Benchmarks of the image pipeline against in-process baselines (`make bench`, see README.md)."""
