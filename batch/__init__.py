"""Batch scoring: score a folder, archive, Parquet file or list of images with a model package, resumably.

`python -m batch` (also `visionserve-batch` and, for older scripts, `python -m service.batch`) runs `batch.cli`.
"""
