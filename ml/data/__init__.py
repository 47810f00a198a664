"""Data: sources, layouts, safe extraction, manifest, quality suite, splits, image cache."""
