"""Parquet shards and the manifest that commits them.

Layout of an output folder ``DST`` (any fsspec URL)::

    DST/part-<tag>.parquet      shards (zstd), one row per slice, schema in data_prep.schema
    DST/_commits/<tag>.json     one commit record per finished unit of work (crash-resume)
    DST/_manifest.json          written last: the commit marker readers trust

A shard only counts once a commit record names it with its checksum, and a reader only trusts
``_manifest.json``. So a crash at any point leaves either a committed output or one that a rerun
completes: files without a commit record are orphans the rerun deletes, and work with a commit
record is never redone, hence no duplicates.

A *selection* (dataset reduction) is a manifest of ``kind: "selection"`` that names a base output and
stores the kept ``slice_id`` s; every reader here resolves it, so a selection is usable wherever a
prep output is.

Image bytes (the ``image`` column, one value per slice of ``height x width`` int16 HU):

* format 1 (``schema_version`` 1): the raw values, little-endian, row-major (``2 H W`` bytes);
* format 2 (written now): one tag byte ``2``, then the slice's *row-delta residuals* (each pixel
  minus its left neighbour; the first column minus the pixel above; modulo 2**16), zigzag-mapped
  (``0, -1, 1, -2 ... -> 0, 1, 2, 3 ...``) and stored as two byte planes, all low bytes then all high
  bytes (``1 + 2 H W`` bytes). Neighbouring CT pixels differ by little, so the high plane is almost
  all zeros and the low plane holds small numbers: zstd-3 stores a 256 px phantom in 0.6x and a
  real CT series in 0.76x of format 1's bytes, and writes it faster (docs/benchmarks.md).

The value's length (even: format 1, odd with tag 2: format 2) makes every value self-describing, so
a reader that sees only a batch of rows (Ray Data, a DataLoader) decodes both formats with
:func:`decode_images` and needs no manifest. One output never mixes formats.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ctssl_base import failpoints, storage
from ctssl_base.errors import ManifestError, UserError
from data_prep.compiled import optional_kernel
from data_prep.schema import READABLE_VERSIONS, SCHEMA_VERSION, SLICE_SCHEMA, VERSION_KEY, slice_schema

MANIFEST = "_manifest.json"
COMMITS_DIR = "_commits"
SELECTION_FILE = "selection.parquet"
ROW_GROUP_ROWS = 128  # small row groups keep streaming readers' memory low
ZSTD_LEVEL = 3


# ----------------------------------------------------------------------------------------- image codec
PLANES_TAG = 2  # first byte of a format-2 image value


def _codec_kernel(name: str):
    """The numba codec (``data_prep.shards_kernel``), or None when numba is unavailable."""
    return optional_kernel("data_prep.shards_kernel", name)


def value_size(height: int, width: int, version: int = SCHEMA_VERSION) -> int:
    """Bytes of one image value of a ``height x width`` slice in format ``version``."""
    return 2 * height * width + (1 if version == 2 else 0)


def encode_images(images: np.ndarray, version: int | None = None) -> tuple[np.ndarray, int]:
    """The ``image`` values of an (n, H, W) int16 stack, concatenated (flat uint8), and the bytes per
    value, in format ``version`` (default: the format writers write now)."""
    version = SCHEMA_VERSION if version is None else version
    arr = np.ascontiguousarray(images, dtype="<i2")
    if arr.ndim != 3:
        raise ValueError(f"encode_images: expected an (n, H, W) stack, got shape {arr.shape}")
    n, h, w = arr.shape
    if version == 1:
        return arr.reshape(-1).view(np.uint8), 2 * h * w
    if version != 2:
        raise ValueError(f"encode_images: unknown format {version!r}")
    out = np.empty((n, 1 + 2 * h * w), np.uint8)
    kernel = _codec_kernel("encode_planes") if arr.dtype.isnative and n else None
    if kernel is not None:
        kernel(arr, PLANES_TAG, out)
    else:
        _encode_planes_np(arr, out)
    return out.reshape(-1), 1 + 2 * h * w


def _encode_planes_np(arr: np.ndarray, out: np.ndarray) -> None:
    """numpy reference of ``shards_kernel.encode_planes`` (same bytes; used without numba)."""
    n, h, w = arr.shape
    x = arr.astype(np.int16)
    d = np.empty_like(x)  # int16 arithmetic wraps modulo 2**16, which is the format's definition
    d[:, :, 1:] = x[:, :, 1:] - x[:, :, :-1]
    d[:, 1:, 0] = x[:, 1:, 0] - x[:, :-1, 0]
    d[:, 0, 0] = x[:, 0, 0]
    z = (d.view(np.uint16) << np.uint16(1)) ^ (d >> 15).view(np.uint16)
    zb = z.astype("<u2").view(np.uint8).reshape(n, h * w, 2)
    out[:, 0] = PLANES_TAG
    out[:, 1:1 + h * w] = zb[:, :, 0]
    out[:, 1 + h * w:] = zb[:, :, 1]


def _decode_planes_np(data: np.ndarray, n: int, h: int, w: int) -> np.ndarray:
    """numpy reference of ``shards_kernel.decode_planes``."""
    p = data.reshape(n, 1 + 2 * h * w)
    z = p[:, 1:1 + h * w].astype(np.uint16) | (p[:, 1 + h * w:].astype(np.uint16) << np.uint16(8))
    d = ((z >> np.uint16(1)) ^ (np.uint16(0) - (z & np.uint16(1)))).view(np.int16).reshape(n, h, w)
    d[:, :, 0] = np.cumsum(d[:, :, 0], axis=1, dtype=np.int16)  # wraps modulo 2**16, as encoded
    return np.cumsum(d, axis=2, dtype=np.int16)


def decode_values(data: np.ndarray, n: int, h: int, w: int, out: np.ndarray | None = None) -> np.ndarray:
    """(n, H, W) int16 from ``n`` concatenated image values of either format (flat uint8 ``data``).

    The format follows from the value length: ``2 H W`` bytes is format 1 (returned as a read-only
    view of ``data`` unless ``out`` is given), ``1 + 2 H W`` bytes starting with the tag 2 is format 2.
    ``out``, when given, receives the slices and is returned.
    """
    if n == 0:
        return np.zeros((0, h, w), np.int16) if out is None else out
    size, rem = divmod(len(data), n)
    if rem == 0 and size == 2 * h * w:
        view = data.view("<i2").reshape(n, h, w)
        if out is None:
            return view
        out[...] = view
        return out
    if rem == 0 and size == 1 + 2 * h * w:
        if not np.all(data[::size] == PLANES_TAG):
            raise UserError(f"decode_images: image values of {size} bytes without the format-2 tag byte "
                            "(not a ctssl shard, or damaged)")
        kernel = _codec_kernel("decode_planes")
        if kernel is None:
            res = _decode_planes_np(data, n, h, w)
            if out is None:
                return res
            out[...] = res
            return out
        out = np.empty((n, h, w), np.int16) if out is None else out
        kernel(data, size, n, h, w, out)
        return out
    raise UserError(f"decode_images: {len(data)} bytes for {n} slices of {h}x{w} fit neither format 1 "
                    f"({2 * h * w} bytes per slice) nor format 2 ({1 + 2 * h * w})")


def _value_runs(images: Any) -> list[tuple[np.ndarray, int]]:
    """The values of a binary column as runs of equal-length values lying back to back: (flat uint8,
    number of values) each.

    Arrow arrays are read in place: each chunk's values already lie back to back in one buffer. A
    Python sequence of ``bytes`` (Ray Data's numpy batches) gives one run per value, so no copy is
    made to join them.
    """
    if isinstance(images, pa.ChunkedArray):
        return [r for c in images.chunks if len(c) for r in _value_runs(c)]
    if isinstance(images, pa.Array):
        n = len(images)
        if images.null_count or not (pa.types.is_binary(images.type) or pa.types.is_large_binary(images.type)):
            raise UserError(f"decode_images: the image column must be non-null binary, not {images.type}")
        if n == 0:
            return []
        bufs = images.buffers()
        otype = np.int64 if pa.types.is_large_binary(images.type) else np.int32
        offs = np.frombuffer(bufs[1], otype, count=n + 1, offset=images.offset * np.dtype(otype).itemsize)
        size = int(offs[1] - offs[0])
        if np.any(np.diff(offs) != size):
            raise UserError(_MIXED)
        return [(np.frombuffer(bufs[2], np.uint8, count=n * size, offset=int(offs[0])), n)]
    return [(np.frombuffer(v, np.uint8), 1) for v in images]


_MIXED = "decode_images: image values of different lengths in one batch (mixed formats?)"


# --------------------------------------------------------------------------------------------- writing
@dataclass
class ShardRecord:
    path: str  # relative to the output folder
    rows: int
    sha256: str
    bytes: int

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "rows": self.rows, "sha256": self.sha256, "bytes": self.bytes}


class ShardWriter:
    """Builds one shard in memory (bounded by the caller's rows per shard) and uploads it whole.

    Buffering the compressed file (tens of MB) instead of streaming it lets us checksum it and
    publish it with a single atomic write on every backend.
    """

    def __init__(self, version: int | None = None) -> None:
        self.version = SCHEMA_VERSION if version is None else version
        self._buf = io.BytesIO()
        # every image value is unique, so a dictionary never pays; not trying one saves hashing each
        # value (a fifth of the writer's time on format 2)
        self._writer = pq.ParquetWriter(self._buf, slice_schema(self.version), compression="zstd",
                                        compression_level=ZSTD_LEVEL, write_statistics=["slice_index"],
                                        use_dictionary=[c for c in SLICE_SCHEMA.names if c != "image"])
        self.rows = 0
        self.raw_bytes = 0

    def write(self, table: pa.Table) -> None:
        """Append rows; they must be encoded in this writer's format (one shard never mixes them)."""
        if table.num_rows == 0:
            return
        if table_version(table) != self.version:
            raise ValueError(f"ShardWriter: a table in format {table_version(table)} cannot go into a "
                             f"format-{self.version} shard")
        self._writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
        self.rows += table.num_rows
        self.raw_bytes += table.nbytes

    def to_bytes(self) -> bytes:
        """Close the Parquet file and return its bytes (the writer takes no more rows)."""
        self._writer.close()
        return self._buf.getvalue()

    def finish(self, url: str, name: str) -> ShardRecord:
        """Upload the shard as ``url/name`` (atomically) and return its record."""
        data = self.to_bytes()
        fs, root = storage.open_fs(url)
        failpoints.hit("shard.before_write")
        storage.write_bytes_atomic(fs, storage.join(root, name), data)
        failpoints.hit("shard.after_write")
        return ShardRecord(path=name, rows=self.rows, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))


def table_version(table: pa.Table | pa.Schema) -> int:
    """The format a table's (or a shard file's) ``image`` values are in, from its schema metadata.

    Schemas without the key are format 1, which wrote the key too; only tables built by hand lack it.
    """
    schema = table if isinstance(table, pa.Schema) else table.schema
    return int((schema.metadata or {}).get(VERSION_KEY, b"1"))


def rows_to_table(rows: dict[str, Sequence[Any]], *, version: int | None = None) -> pa.Table:
    """A table in the shard schema from column lists (``image`` as a list of 2-D int16 arrays, which
    may differ in size), its images encoded in format ``version`` (default: the current one)."""
    version = SCHEMA_VERSION if version is None else version
    cols = dict(rows)
    images = [np.asarray(im) for im in cols["image"]]
    cols["image"] = [encode_images(im[None], version)[0].tobytes() for im in images]
    cols.setdefault("height", [im.shape[0] for im in images])
    cols.setdefault("width", [im.shape[1] for im in images])
    schema = slice_schema(version)
    return pa.Table.from_pydict({k: cols[k] for k in schema.names}, schema=schema)


_MAX_BINARY_BYTES = 2**31 - 1  # int32 offsets of Arrow's binary type


def table_from_arrays(images: np.ndarray, *, version: int | None = None, **cols: Any) -> pa.Table:
    """A table in the shard schema from an (n, H, W) int16 stack and per-row column lists.

    The ``image`` column is built over the encoded stack's memory (offsets + one data buffer)
    instead of one ``bytes`` object per slice, which halves the copying on prep's hot path.
    """
    version = SCHEMA_VERSION if version is None else version
    schema = slice_schema(version)
    n, h, w = images.shape
    data, size = encode_images(images, version)
    per_chunk = max(1, _MAX_BINARY_BYTES // size)  # a huge series at native size: several chunks
    chunks = []
    for start in range(0, n, per_chunk):
        m = min(per_chunk, n - start)
        offsets = np.arange(0, (m + 1) * size, size, dtype=np.int32)
        buf = pa.py_buffer(data[start * size:(start + m) * size])
        chunks.append(pa.Array.from_buffers(pa.binary(), m, [None, pa.py_buffer(offsets), buf]))
    image = pa.chunked_array(chunks, type=pa.binary())
    arrays = {"image": image, "height": pa.array(np.full(n, h, np.int32)), "width": pa.array(np.full(n, w, np.int32))}
    for name in schema.names:
        if name not in arrays:
            arrays[name] = pa.array(cols[name], type=schema.field(name).type)
    return pa.Table.from_pydict(arrays, schema=schema)


def write_commit(url: str, tag: str, record: dict[str, Any]) -> None:
    fs, root = storage.open_fs(url)
    storage.write_json_atomic(fs, storage.join(root, COMMITS_DIR, f"{tag}.json"), record)


def read_commits(url: str) -> list[dict[str, Any]]:
    """Commit records whose shard exists with the recorded size; others are treated as not done."""
    fs, root = storage.open_fs(url)
    cdir = storage.join(root, COMMITS_DIR)
    if not fs.exists(cdir):
        return []
    out = []
    for p in sorted(fs.glob(storage.join(cdir, "*.json"))):
        try:
            rec = storage.read_json(fs, p)
        except (json.JSONDecodeError, OSError):
            continue  # a torn record cannot exist (atomic writes), but never trust a broken one
        ok = True
        for sh in rec.get("shards", []):
            sp = storage.join(root, sh["path"])
            if not fs.exists(sp) or fs.size(sp) != sh["bytes"]:
                ok = False
        if ok:
            out.append(rec)
    return out


def remove_orphans(url: str, keep: set[str], prefix: str = "part-", *, commit_prefix: str | None = None,
                   manifest_temps: bool = False) -> list[str]:
    """Delete shard files (named ``prefix*``) and temp files that no commit record names (left by a
    crash).

    A crash while a commit record or the manifest is written leaves ``NAME.tmp-*`` beside it; no
    reader looks at those, but left alone they pile up with every crash. ``commit_prefix`` names the
    commit records this process owns (``i003-`` for ``--shard-index 3``), so only its own temp
    records go: another index may be writing one at this moment. ``manifest_temps`` also removes
    ``_manifest.json.tmp-*``, for when no other process can be writing the manifest.
    """
    fs, root = storage.open_fs(url)
    if not fs.exists(root):
        return []
    removed = []
    for p in fs.ls(root, detail=False):
        name = p.rstrip("/").rsplit("/", 1)[-1]
        if ((name.startswith(prefix) and name not in keep) or (name.startswith(prefix) and ".tmp-" in name)
                or (manifest_temps and name.startswith(f"{MANIFEST}.tmp-"))):
            fs.rm(p)
            removed.append(name)
    cdir = storage.join(root, COMMITS_DIR)
    if commit_prefix is not None and fs.exists(cdir):
        for p in fs.ls(cdir, detail=False):
            name = p.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith(commit_prefix) and ".tmp-" in name:
                fs.rm(p)
                removed.append(f"{COMMITS_DIR}/{name}")
    return removed


def write_manifest(url: str, manifest: dict[str, Any]) -> None:
    """Commit the output: after this write, readers see exactly the listed shards."""
    fs, root = storage.open_fs(url)
    manifest = {"schema_version": SCHEMA_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                **manifest}
    storage.write_json_atomic(fs, storage.join(root, MANIFEST), manifest)


# --------------------------------------------------------------------------------------------- reading
def read_manifest(url: str) -> dict[str, Any]:
    fs, root = storage.open_fs(url)
    path = storage.join(root, MANIFEST)
    try:
        exists = fs.exists(path)
    except Exception as e:  # noqa: BLE001 - unreachable bucket, bad credentials...
        raise ManifestError(f"{url}: cannot read ({type(e).__name__}: {e})") from e
    if not exists:
        raise ManifestError(f"{url}: no committed output here (no {MANIFEST}); run `ctssl prep` "
                            "(or finish an interrupted run) first")
    try:
        m = storage.read_json(fs, path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{url}/{MANIFEST}: not valid JSON ({e})") from e
    if m.get("schema_version") not in READABLE_VERSIONS:
        raise ManifestError(f"{url}/{MANIFEST}: schema_version {m.get('schema_version')!r} is not one of "
                            f"{', '.join(map(str, READABLE_VERSIONS))}; this ctssl cannot read it")
    return m


def refuse_other_format(url: str, manifest: dict[str, Any]) -> None:
    """Refuse to add shards to a committed prep output written in another format.

    Called by prep before it resumes or extends ``url``: one output must hold one format, and a
    format-1 output (written by an earlier ctssl) stays readable as it is.
    """
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise UserError(f"{url}: holds shards in format {version} (written by an earlier ctssl); this ctssl "
                        f"writes format {SCHEMA_VERSION} and does not mix formats in one output. The output "
                        "stays readable as it is; to convert it, run prep into a new folder")


@dataclass
class Resolved:
    """What a URL means for readers: the base prep output's files and an optional slice filter."""

    base_url: str
    manifest: dict[str, Any]  # the manifest at the URL asked for
    base_manifest: dict[str, Any]
    files: list[dict[str, Any]] = field(default_factory=list)
    keep_ids: pa.Array | None = None  # slice_ids kept by a selection


def resolve(url: str) -> Resolved:
    m = read_manifest(url)
    if m.get("kind", "prep") == "selection":
        base_url = m["base"]
        base = read_manifest(base_url)
        if _manifest_digest(base) != m.get("base_manifest_sha256"):
            raise ManifestError(f"{url}: selection was made from a different version of {base_url} "
                                "(its manifest changed since); redo the reduction")
        fs, root = storage.open_fs(url)
        sel_path = storage.join(root, SELECTION_FILE)
        data = fs.cat_file(sel_path)
        if hashlib.sha256(data).hexdigest() != m["selection_sha256"]:
            raise ManifestError(f"{url}/{SELECTION_FILE}: checksum does not match the manifest (tampered?)")
        ids = pq.read_table(io.BytesIO(data)).column("slice_id").combine_chunks()
        return Resolved(base_url, m, base, list(base["shards"]), ids)
    return Resolved(url, m, m, list(m["shards"]), None)


def _manifest_digest(m: dict[str, Any]) -> str:
    """Digest of what a manifest commits (shards + checksums), independent of timestamps."""
    body = json.dumps([(s["path"], s["rows"], s["sha256"]) for s in m.get("shards", [])], sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def read_shard(url: str, shard: dict[str, Any], columns: list[str] | None, verify: bool = True) -> pa.Table:
    """One committed shard (an entry of the manifest at ``url``) as a table, checked against the
    manifest's size, row count and, with ``verify``, its checksum."""
    fs, root = storage.open_fs(url)
    path = storage.join(root, shard["path"])
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise ManifestError(f"{url}: shard {shard['path']} is listed in the manifest but missing") from None
    if len(data) != shard["bytes"] or (verify and hashlib.sha256(data).hexdigest() != shard["sha256"]):
        raise ManifestError(f"{url}: shard {shard['path']} does not match its manifest checksum (tampered "
                            "or partially overwritten)")
    t = pq.read_table(io.BytesIO(data), columns=columns)
    if t.num_rows != shard["rows"]:
        raise ManifestError(f"{url}: shard {shard['path']} has {t.num_rows} rows, manifest says {shard['rows']}")
    return t


def read_table(url: str, columns: list[str] | None = None, *, verify: bool = True) -> pa.Table:
    """Exactly the committed rows at ``url`` (a prep output or a selection), verified by checksum."""
    r = resolve(url)
    ids = ["slice_id"] if r.keep_ids is not None else []
    cols = None if columns is None else list(dict.fromkeys([*columns, *ids]))
    tables = [read_shard(r.base_url, s, cols, verify) for s in r.files]
    if not tables:
        t = SLICE_SCHEMA.empty_table()
        t = t.select(cols) if cols else t
    else:
        t = pa.concat_tables(tables)
    if r.keep_ids is not None:
        t = t.filter(pc.is_in(t["slice_id"], value_set=r.keep_ids))
        if columns is not None and "slice_id" not in columns:
            t = t.drop_columns(["slice_id"])
    return t


def decode_images(batch: pa.Table | pa.RecordBatch | dict[str, Any]) -> np.ndarray:
    """(n, H, W) int16 from the ``image``/``height``/``width`` columns (all slices the same size), in
    either shard format: the one function every reader of pixels goes through.

    ``batch`` is a pyarrow table or record batch, or a dict of columns (Ray Data's numpy batches:
    ``image`` an array of ``bytes``). Format-1 values of an Arrow batch are returned as a read-only
    view of its buffer, without a copy.
    """
    if isinstance(batch, dict):
        imgs, hs, ws = batch["image"], batch["height"], batch["width"]
    else:
        imgs, hs, ws = batch.column("image"), batch.column("height"), batch.column("width")
    hs, ws = np.asarray(hs), np.asarray(ws)
    n = len(imgs)
    if n == 0:
        return np.zeros((0, 0, 0), np.int16)
    h, w = int(hs[0]), int(ws[0])
    if not (np.all(hs == h) and np.all(ws == w)):
        raise UserError("decode_images: slices of different sizes in one batch")
    runs = _value_runs(imgs)
    if len({len(r) // c for r, c in runs}) > 1 or any(len(r) % c for r, c in runs):
        raise UserError(_MIXED)
    if len(runs) == 1:
        return decode_values(runs[0][0], n, h, w)
    out = np.empty((n, h, w), np.int16)
    pos = 0
    for r, c in runs:
        decode_values(r, c, h, w, out[pos:pos + c])
        pos += c
    return out


def iter_slices(url: str, batch_rows: int = 256, columns: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """Stream committed rows in batches: ``image`` decoded to (n, H, W) int16, other columns numpy.

    Memory holds one shard's compressed bytes and one batch, whatever the dataset size.
    """
    r = resolve(url)
    want = list(SLICE_SCHEMA.names) if columns is None else list(dict.fromkeys(["image", "height", "width", *columns]))
    if r.keep_ids is not None and "slice_id" not in want:
        want.append("slice_id")
    fs, root = storage.open_fs(r.base_url)
    for shard in r.files:
        path = storage.join(root, shard["path"])
        if not fs.exists(path) or fs.size(path) != shard["bytes"]:
            raise ManifestError(f"{r.base_url}: shard {shard['path']} is missing or does not match the manifest")
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            for rb in pf.iter_batches(batch_size=batch_rows, columns=want):
                if r.keep_ids is not None:
                    rb = rb.filter(pc.is_in(rb.column("slice_id"), value_set=r.keep_ids))
                    if rb.num_rows == 0:
                        continue
                out: dict[str, Any] = {"image": decode_images(rb)}
                for name in want:
                    if name in ("image",):
                        continue
                    col = rb.column(name)
                    out[name] = col.to_numpy(zero_copy_only=False) if name != "spacing_mm" else \
                        np.asarray(col.to_pylist(), dtype=np.float32)
                yield out


def committed_files(url: str) -> tuple[pafs.FileSystem, list[str]]:
    """The committed shard paths of ``url`` (or of a selection's base) and a pyarrow filesystem for
    them, for engines such as Ray Data's ``read_parquet``."""
    r = resolve(url)
    fs, root = storage.open_fs(r.base_url)
    if storage.is_local(r.base_url):
        return pafs.LocalFileSystem(), [storage.join(root, s["path"]) for s in r.files]
    ep = storage.s3_endpoint()
    kw: dict[str, Any] = {}
    if ep:
        scheme, host = ep.split("://", 1) if "://" in ep else ("https", ep)
        kw = {"endpoint_override": host, "scheme": scheme}
    return pafs.S3FileSystem(**kw), [storage.join(root, s["path"]) for s in r.files]


def selection_filter(url: str) -> pc.Expression | None:
    """A pyarrow filter on ``slice_id`` for a selection; None for a plain prep output."""
    r = resolve(url)
    return None if r.keep_ids is None else pc.field("slice_id").isin(r.keep_ids)


def write_selection(dst_url: str, base_url: str, slice_ids: Sequence[str] | pa.Array,
                    config: dict[str, Any], report: dict[str, Any] | None = None) -> dict[str, Any]:
    """Commit a selection of ``base_url``'s rows at ``dst_url`` (no pixel copies).

    ``base_url`` must be a prep output (a selection of a selection is flattened by the caller).
    """
    base = read_manifest(base_url)
    if storage.is_local(base_url):
        base_url = storage.open_fs(base_url)[1]  # absolute, so the selection resolves from anywhere
    if base.get("kind", "prep") != "prep":
        raise UserError(f"{base_url}: a selection must refer to a prep output, not to another selection")
    ids = pa.array(list(slice_ids) if not isinstance(slice_ids, pa.Array) else slice_ids, type=pa.string())
    buf = io.BytesIO()
    pq.write_table(pa.table({"slice_id": ids}), buf, compression="zstd")
    data = buf.getvalue()
    fs, root = storage.open_fs(dst_url)
    storage.ensure_dir(fs, root)
    storage.write_bytes_atomic(fs, storage.join(root, SELECTION_FILE), data)
    manifest = {
        "kind": "selection",
        "base": base_url,
        "base_manifest_sha256": _manifest_digest(base),
        "intensity": base.get("intensity", "hu"),
        "selection_sha256": hashlib.sha256(data).hexdigest(),
        "shards": [],
        "counts": {"base_rows": sum(s["rows"] for s in base["shards"]), "kept_rows": len(ids)},
        "config": config,
        "report": report or {},
    }
    write_manifest(dst_url, manifest)
    return read_manifest(dst_url)


def manifest_digest(url: str) -> str:
    """Public digest of a prep output's committed content (to tie selections/checkpoints to it)."""
    return _manifest_digest(read_manifest(url))
