"""Per-dataset intensity statistics of 8-bit sources, for standardising network inputs.

HU slices have a physical scale and are windowed into [0, 1]; 8-bit grey images (PNG folders,
MedMNIST) do not, so their grey / 255 inputs sit wherever a dataset's brightness puts them. Prep
stores the mean and standard deviation of the stored values in the manifest (``intensity_stats``);
pre-training and fine-tuning standardise with them. Outputs prepped before the statistics existed
get them computed on read, from the committed shards.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from ctssl_base import storage
from data_prep import shards

#: the manifest key
KEY = "intensity_stats"


def stats_of_shards(url: str, shard_list: Iterable[dict[str, Any]]) -> dict[str, float]:
    """Mean and population std of every stored pixel value of ``shard_list`` under ``url``, streamed
    one row group at a time (float64 sums, so a million slices lose no digits)."""
    fs, root = storage.open_fs(url)
    total = total_sq = 0.0
    n_px = n_slices = 0
    for shard in shard_list:
        with fs.open(storage.join(root, shard["path"]), "rb") as f:
            data = f.read()
        pf = pq.ParquetFile(io.BytesIO(data))
        for rb in pf.iter_batches(batch_size=256, columns=["image", "height", "width"]):
            if rb.num_rows == 0:
                continue
            px = shards.decode_images(rb).astype(np.float64)
            total += float(px.sum())
            total_sq += float(np.square(px).sum())
            n_px += px.size
            n_slices += rb.num_rows
    if n_px == 0:
        return {"mean": math.nan, "std": math.nan, "slices": 0}
    mean = total / n_px
    var = max(total_sq / n_px - mean * mean, 0.0)
    return {"mean": mean, "std": math.sqrt(var), "slices": n_slices}


def dataset_stats(url: str) -> dict[str, float] | None:
    """The intensity statistics of a prep output or selection (its base's): from the manifest, or
    computed now for an output prepped before they were stored. None for HU data (windowed instead)."""
    r = shards.resolve(url)
    if r.base_manifest.get("intensity", "hu") == "hu":
        return None
    stored = r.base_manifest.get(KEY)
    if stored:
        return dict(stored)
    return stats_of_shards(r.base_url, r.files)
