"""The pre-training input: committed Parquet shards -> a streaming Ray Dataset -> HU tensors per worker.

Only the three columns needed for pixels are read (plus ``slice_id`` when a selection filters rows),
so a worker's memory holds a few blocks of compressed bytes, never the dataset. Decoding int16 bytes
to float HU and resizing happen per batch inside the training worker, where they are cheap tensor ops
next to the step that consumes them; augmentation is the method's own (it needs the HU values).
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ctssl_base import storage
from ctssl_base.errors import ManifestError, UserError
from data_prep import shards

log = logging.getLogger(__name__)

PIXEL_COLUMNS = ["image", "height", "width"]


@dataclass(frozen=True)
class DataInfo:
    """What the driver learned about the input before any training starts."""

    read_url: str  # the URL whose rows are trained on (selection if given, else data)
    base_url: str
    dataset: str  # dataset name(s) from the manifest's ``source`` counts, for tags
    rows: int
    height: int
    width: int
    intensity: str  # "hu" | "gray8"
    selection: str | None


def _norm(url: str) -> str:
    if storage.is_local(url):
        return storage.open_fs(url)[1].rstrip("/")
    return url.split("://", 1)[1].rstrip("/")


def _dataset_name(manifest: dict[str, Any]) -> str:
    counts = manifest.get("counts") or {}
    by_source = counts.get("by_source") or counts.get("sources") or {}
    if isinstance(by_source, dict) and by_source:
        return ",".join(sorted(by_source))
    cfg = manifest.get("config") or {}
    return str(cfg.get("dataset") or cfg.get("source") or posixpath.basename(_norm(manifest.get("base", "")) or "data"))


def inspect_data(data: str, selection: str | None) -> DataInfo:
    """Check the inputs and size them: committed manifest, selection of *this* data, slice size."""
    try:
        base_manifest = shards.read_manifest(data)
    except ManifestError as e:
        raise UserError(f"--data {e}") from None
    if base_manifest.get("kind", "prep") == "selection":
        raise UserError(f"--data {data} is a selection; pass its base prep output as --data and it as --selection")
    read_url = data
    if selection:
        try:
            resolved = shards.resolve(selection)
        except ManifestError as e:
            raise UserError(f"--selection {e}") from None
        if resolved.manifest.get("kind") != "selection":
            raise UserError(f"--selection {selection} is not a selection (its manifest kind is "
                            f"{resolved.manifest.get('kind', 'prep')!r})")
        if _norm(resolved.base_url) != _norm(data):
            raise UserError(f"--selection {selection} was made from {resolved.base_url}, not from --data {data}")
        rows = len(resolved.keep_ids) if resolved.keep_ids is not None else 0
        read_url = selection
    else:
        rows = sum(int(s["rows"]) for s in base_manifest["shards"])
    if rows == 0:
        raise UserError(f"{read_url}: no slices to train on (0 committed rows)")
    height, width = _probe_size(data, base_manifest)
    name = _dataset_name(base_manifest)
    if name in ("", "data"):
        name = posixpath.basename(_norm(data))
    return DataInfo(read_url=read_url, base_url=data, dataset=name, rows=rows, height=height, width=width,
                    intensity=str(base_manifest.get("intensity", "hu")), selection=selection)


def _probe_size(url: str, manifest: dict[str, Any]) -> tuple[int, int]:
    """Slice size from the first shard's first row (prep writes one fixed resolution)."""

    fs, root = storage.open_fs(url)
    first = next((s for s in manifest["shards"] if int(s["rows"]) > 0), None)
    if first is None:
        raise UserError(f"{url}: the manifest lists no rows")
    with fs.open(storage.join(root, first["path"]), "rb") as f:
        pf = pq.ParquetFile(f)
        rb = next(pf.iter_batches(batch_size=1, columns=["height", "width"]))
    return int(rb.column("height")[0].as_py()), int(rb.column("width")[0].as_py())


class KeepSelected:
    """Row filter for a selection: the selected rows' pixel columns. Applied inside Ray Data's
    read/map tasks (ids shipped once) and by the in-process reader alike."""

    def __init__(self, keep_ids):
        self.keep_ids = keep_ids

    def __call__(self, table):
        t = table.filter(pc.is_in(table["slice_id"], value_set=self.keep_ids))
        return t.select(PIXEL_COLUMNS)


def build_dataset(info: DataInfo):
    """A lazy, streaming Ray Dataset of the pixel columns of exactly the committed (selected) rows."""
    import ray

    # the training loop logs its own rate and ETA; Ray Data's per-operator bars would flood job logs
    ray.data.DataContext.get_current().enable_progress_bars = False
    fs, files = shards.committed_files(info.read_url)
    resolved = shards.resolve(info.read_url)
    cols = PIXEL_COLUMNS + (["slice_id"] if resolved.keep_ids is not None else [])
    # select_columns is pushed down into the Parquet scan: only these columns are read
    ds = ray.data.read_parquet(files, filesystem=fs, file_extensions=None).select_columns(cols)
    if resolved.keep_ids is not None:
        ds = ds.map_batches(KeepSelected(resolved.keep_ids),
                            batch_format="pyarrow", batch_size=None, zero_copy_batch=True)
    return ds


def decode_batch(batch: dict[str, Any]) -> np.ndarray:
    """(n, H, W) float32 HU from a numpy batch of the pixel columns."""
    return shards.decode_images(batch).astype(np.float32)


def to_training_tensor(hu: np.ndarray, img_size: int | None, device):
    """(n, 1, S, S) float32 HU tensor on ``device``, resized with antialiasing when S differs."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(hu).unsqueeze(1).to(device, non_blocking=True)
    if img_size is not None and (x.shape[-2] != img_size or x.shape[-1] != img_size):
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", antialias=True, align_corners=False)
    return x
