"""Data layer: fetch/verify (fetch), refer reader (refer), preprocessing to parquet (preprocess), torch
datasets (datasets, transforms) and the synthetic referring dataset (synth)."""
