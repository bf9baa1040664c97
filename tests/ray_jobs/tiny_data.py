"""Tiny labelled CT-like shard sets written with the real shard writer, for the Ray job tests.

Each patient has a few slices of a disk ("lesion") or a square ("region") drawn in soft-tissue HU on
air, with noise; the class is visible to a small CNN, so fine-tuning has something to learn.
"""

from __future__ import annotations

import numpy as np

from data_prep import shards


def _slice(rng: np.random.Generator, label: str, size: int) -> np.ndarray:
    img = np.full((size, size), -1000.0, np.float32)
    yy, xx = np.mgrid[:size, :size]
    c = size / 2 + rng.uniform(-size / 8, size / 8, 2)
    r = size * rng.uniform(0.18, 0.28)
    if label == "disk":
        mask = (yy - c[0]) ** 2 + (xx - c[1]) ** 2 < r ** 2
    else:
        mask = (np.abs(yy - c[0]) < r) & (np.abs(xx - c[1]) < r * 0.6)
    img[mask] = 40.0 + rng.normal(0, 20)
    img += rng.normal(0, 15, img.shape)
    return np.clip(img, -1024, 3071).astype(np.int16)


def write_tiny_dataset(url: str, *, patients: int = 8, slices: int = 6, size: int = 32, source: str = "tiny",
                       classes: tuple[str, ...] = ("disk", "square"), seed: int = 0,
                       shards_count: int = 2, labelled: bool = True) -> dict:
    """Write ``patients x slices`` rows to ``url`` and commit the manifest; returns the manifest.

    Labels alternate between patients so every class has whole patients (patient-level folds).
    """
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {k: [] for k in ("slice_id", "image", "patient_id", "study_id", "series_id",
                                            "slice_index", "z_mm", "spacing_mm", "source", "label", "dhash")}
    for p in range(patients):
        label = classes[p % len(classes)]
        for s in range(slices):
            rows["slice_id"].append(f"{source}-p{p:03d}-s{s:03d}")
            rows["image"].append(_slice(rng, label, size))
            rows["patient_id"].append(f"{source}-patient-{p:03d}")
            rows["study_id"].append(f"{source}-study-{p:03d}")
            rows["series_id"].append(f"{source}-series-{p:03d}")
            rows["slice_index"].append(s)
            rows["z_mm"].append(float(s) * 2.5)
            rows["spacing_mm"].append([0.8, 0.8])
            rows["source"].append(source)
            rows["label"].append(label if labelled else None)
            rows["dhash"].append(int(rng.integers(0, 2**63)))
    n = len(rows["slice_id"])
    bounds = np.linspace(0, n, shards_count + 1).astype(int)
    records = []
    for i in range(shards_count):
        part = {k: v[bounds[i]:bounds[i + 1]] for k, v in rows.items()}
        w = shards.ShardWriter()
        w.write(shards.rows_to_table(part))
        records.append(w.finish(url, f"part-{i:05d}.parquet").as_dict())
    shards.write_manifest(url, {
        "kind": "prep", "intensity": "hu", "shards": records,
        "counts": {"slices": n, "patients": patients, "by_source": {source: n}}, "rejects": [],
        "config": {"dataset": source},
    })
    return shards.read_manifest(url)
