"""Data preparation: CT sources -> HU slices -> Parquet shards on any fsspec URL.

This package never imports training code (torch models, Ray Train); it is safe to run in a small
prep container.
"""
