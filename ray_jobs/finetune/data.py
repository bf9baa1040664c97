"""The labelled data of a study, held in memory once and shared with every trial via the object store.

Labelled sets are small (hundreds to a few thousand slices), so every trial indexing one shared int16
array beats re-reading shards per trial; the rows are read with the checksum-verified shard reader.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ctssl_base.errors import ManifestError, UserError
from data_prep import intensity, shards

log = logging.getLogger(__name__)


@dataclass
class LabelledData:
    images: np.ndarray  # (N, H, W) int16
    labels: np.ndarray  # (N,) int64 class index
    classes: list[str]
    patients: np.ndarray  # (N,) str
    intensity: str
    dataset: str
    intensity_stats: dict[str, float] | None = None  # 8-bit data: grey mean / std (data_prep.intensity)

    @property
    def label_names(self) -> np.ndarray:
        return np.asarray(self.classes)[self.labels]


def load_labelled(url: str) -> LabelledData:
    try:
        manifest = shards.read_manifest(url)
        table = shards.read_table(url, columns=["image", "height", "width", "patient_id", "label", "source"])
    except ManifestError as e:
        raise UserError(f"--data {e}") from None
    labels = table.column("label").to_pylist()
    keep = np.array([lab is not None and lab != "" for lab in labels])
    if not keep.any():
        raise UserError(f"--data {url}: no slice has a label; fine-tuning needs a labelled prep output "
                        "(prep with a labels CSV or a labelled source)")
    if not keep.all():
        log.info("%s: %d of %d slices have no label and are left out", url, int((~keep).sum()), len(keep))
        table = table.filter(keep)
        labels = [lab for lab, k in zip(labels, keep, strict=True) if k]
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise UserError(f"--data {url}: only one class ({classes[0]!r}); fine-tuning needs at least two")
    images = shards.decode_images(table)
    y = np.array([classes.index(lab) for lab in labels], dtype=np.int64)
    sources = sorted(set(table.column("source").to_pylist()))
    return LabelledData(images=np.ascontiguousarray(images), labels=y, classes=classes,
                        patients=np.asarray(table.column("patient_id").to_pylist()).astype(str),
                        intensity=str(manifest.get("intensity", "hu")), dataset=",".join(sources),
                        intensity_stats=intensity.dataset_stats(url))
