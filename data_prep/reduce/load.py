"""Read a prep output (or a selection of one) into a :class:`SliceSet` for the strategies.

Metadata and the stored dhash are read as columns only; pixels are streamed (``iter_slices``) when a
strategy asks for them, so the hash strategy never decodes an image.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ctssl_base.errors import UserError
from data_prep import shards
from data_prep.reduce.base import SliceSet

META_COLUMNS = ["slice_id", "series_id", "slice_index"]


def base_url_of(src: str) -> str:
    """The prep output a selection must refer to (a selection of a selection is flattened)."""
    m = shards.read_manifest(src)
    return m["base"] if m.get("kind", "prep") == "selection" else src


def load_slice_set(src: str, batch_rows: int = 256) -> SliceSet:
    manifest = shards.read_manifest(src)
    base = shards.read_manifest(base_url_of(src))
    names = _column_names(base)
    cols = META_COLUMNS + (["dhash"] if "dhash" in names else [])
    table = shards.read_table(src, columns=cols)
    dhash = None
    if "dhash" in table.column_names and table.column("dhash").null_count == 0:
        dhash = table.column("dhash").to_numpy().astype(np.uint64)
    data, _ = SliceSet.from_arrays(
        table.column("series_id").to_numpy(zero_copy_only=False),
        table.column("slice_index").to_numpy(zero_copy_only=False),
        np.asarray(table.column("slice_id").to_pylist(), dtype=object),
        **({"dhash": dhash} if dhash is not None else {}),
    )
    check_slice_ids(src, data)
    data.intensity = manifest.get("intensity", base.get("intensity", "hu"))
    position = {sid: i for i, sid in enumerate(data.slice_id.tolist())}

    def iter_pixels() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for batch in shards.iter_slices(src, batch_rows=batch_rows, columns=["slice_id"]):
            pos = np.fromiter((position[s] for s in batch["slice_id"]), np.int64, len(batch["slice_id"]))
            yield pos, batch["image"]

    def load_pixels(positions: np.ndarray) -> np.ndarray:
        """HU slices at ``positions`` (one streaming pass that stops once all are found)."""
        want = {int(p): None for p in positions}
        got: dict[int, np.ndarray] = {}
        for pos, hu in iter_pixels():
            for k, p in enumerate(pos.tolist()):
                if p in want:
                    got[p] = np.array(hu[k])
            if len(got) == len(want):
                break
        return np.stack([got[int(p)] for p in positions]) if len(positions) else np.zeros((0, 1, 1), np.int16)

    data.iter_pixels = iter_pixels
    data.load_pixels = load_pixels
    return data


def check_slice_ids(src: str, data: SliceSet) -> None:
    """Refuse a slice set whose slice ids or (series, slice_index) pairs repeat, with one line.

    Every strategy maps rows by slice id and walks a series in slice_index order, so a repeat would
    keep or drop the wrong slice. Gaps in slice_index (a selection of a selection, a hand-made output)
    are fine: strategies work on the rows' order within the series, not on the index values.
    """
    ids = data.slice_id
    if len(ids) and len(np.unique(ids.astype(str))) != len(ids):
        uniq, counts = np.unique(ids.astype(str), return_counts=True)
        raise UserError(f"{src}: slice_id {uniq[counts > 1][0]} occurs {int(counts.max())} times; the output "
                        "holds repeated slices (prep it again into a new folder)")
    same = (np.diff(data.series) == 0) & (np.diff(data.slice_index) == 0) if len(ids) > 1 else np.zeros(0, bool)
    if same.any():
        i = int(np.flatnonzero(same)[0])
        raise UserError(f"{src}: series {data.series_name[data.series[i]]} has slice_index {data.slice_index[i]} "
                        "twice; the output holds repeated slices (prep it again into a new folder)")


def _column_names(manifest: dict) -> list[str]:
    from data_prep.schema import SLICE_SCHEMA

    return list(manifest.get("columns") or SLICE_SCHEMA.names)

