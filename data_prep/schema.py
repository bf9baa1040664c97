"""The Parquet schema of a shard row, versioned so readers can refuse what they don't understand."""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1

#: One row = one 2-D slice. ``image`` holds int16 little-endian HU values, row-major, height x width.
SLICE_SCHEMA = pa.schema(
    [
        pa.field("slice_id", pa.string(), nullable=False),  # keyed pseudonym, unique per slice
        pa.field("image", pa.binary(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("patient_id", pa.string(), nullable=False),  # keyed pseudonym
        pa.field("study_id", pa.string(), nullable=False),  # keyed pseudonym
        pa.field("series_id", pa.string(), nullable=False),  # keyed pseudonym
        pa.field("slice_index", pa.int32(), nullable=False),  # 0-based order along the slice normal
        pa.field("z_mm", pa.float32(), nullable=True),  # position along the normal; null if unknown
        pa.field("spacing_mm", pa.list_(pa.float32(), 2), nullable=False),  # (row, col) after resize
        pa.field("source", pa.string(), nullable=False),  # dataset name
        pa.field("label", pa.string(), nullable=True),
        pa.field("dhash", pa.uint64(), nullable=False),  # 64-bit difference hash (see data_prep.dhash)
    ],
    metadata={b"ctssl.schema_version": str(SCHEMA_VERSION).encode()},
)

COLUMNS = tuple(SLICE_SCHEMA.names)
