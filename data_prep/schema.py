"""The Parquet schema of a shard row, versioned so readers can refuse what they don't understand.

Version 2 changed only what the bytes of the ``image`` column mean (see ``data_prep.shards``: a
row-delta, zigzag, byte-plane layout that zstd compresses 1.3-1.5x better and writes faster); the
columns and their types are those of version 1, and readers read both.
"""

from __future__ import annotations

import pyarrow as pa

#: the version writers write
SCHEMA_VERSION = 2
#: the versions readers read: 1 = ``image`` holds raw int16 little-endian values; 2 = byte planes
READABLE_VERSIONS = (1, 2)
#: Parquet key-value metadata key that records the version in every shard file
VERSION_KEY = b"ctssl.schema_version"

_FIELDS = [
    pa.field("slice_id", pa.string(), nullable=False),  # keyed pseudonym, unique per slice
    # one slice, height x width int16 HU values, encoded as the schema version says (data_prep.shards)
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
]


def slice_schema(version: int = SCHEMA_VERSION) -> pa.Schema:
    """The row schema whose metadata records ``version`` (written into every shard file)."""
    if version not in READABLE_VERSIONS:
        raise ValueError(f"unknown shard schema version {version!r}")
    return pa.schema(_FIELDS, metadata={VERSION_KEY: str(version).encode()})


#: One row = one 2-D slice, as writers write it now.
SLICE_SCHEMA = slice_schema(SCHEMA_VERSION)

COLUMNS = tuple(SLICE_SCHEMA.names)
