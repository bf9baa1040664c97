"""Shard format 2 (row-delta, zigzag, byte-plane image values) and reading format-1 outputs.

The codec must be lossless for every int16 image, both implementations (numba, numpy) must write the
same bytes, every reader must decode both formats, and one output must never hold both.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from ctssl_base.errors import ManifestError, UserError
from data_prep import prep as prep_module
from data_prep import shards
from data_prep.prep import PrepConfig, run_prep
from data_prep.schema import SCHEMA_VERSION, VERSION_KEY
from ray_jobs.cli import main
from tests.conftest import TEST_DEID_KEY
from tests.data_prep.dicom_factory import write_series

KEY = TEST_DEID_KEY.encode()
I16 = np.iinfo(np.int16)


def prep(src, dst, **kw):
    kw.setdefault("executor", "local")
    kw.setdefault("progress", False)
    return run_prep(PrepConfig(src=str(src), dst=str(dst), **kw), KEY)


def hard_images(rng: np.random.Generator) -> list[np.ndarray]:
    """Stacks that stress the modulo-2**16 arithmetic: full-range noise, alternating extremes (the
    largest possible differences), constant extremes, odd shapes, single pixels and rows."""
    full = rng.integers(I16.min, I16.max + 1, size=(5, 17, 23), dtype=np.int16)
    checker = np.where(np.indices((16, 16)).sum(0) % 2 == 0, I16.min, I16.max).astype(np.int16)[None]
    ramp = np.arange(-32768, 32768, 64, dtype=np.int32).astype(np.int16).reshape(1, 32, 32)
    ct = np.clip(rng.normal(-300, 500, size=(3, 64, 64)), -1024, 3071).astype(np.int16)
    return [full, checker, ramp, ct,
            np.full((2, 8, 8), I16.min, np.int16), np.full((2, 8, 8), I16.max, np.int16),
            np.array([[[I16.min]], [[I16.max]], [[0]], [[-1]]], np.int16),
            rng.integers(I16.min, I16.max + 1, size=(2, 1, 40), dtype=np.int16),
            rng.integers(I16.min, I16.max + 1, size=(2, 40, 1), dtype=np.int16)]


@pytest.mark.parametrize("version", [1, 2])
def test_codec_round_trip_is_lossless_for_any_int16_including_the_extremes(version):
    rng = np.random.default_rng(0)
    for images in hard_images(rng):
        data, size = shards.encode_images(images, version)
        n, h, w = images.shape
        assert size == shards.value_size(h, w, version) and data.dtype == np.uint8 and len(data) == n * size
        back = shards.decode_values(data, n, h, w)
        assert back.dtype == np.int16 and np.array_equal(back, images)


def test_compiled_and_numpy_codecs_write_and_read_the_same_bytes():
    if shards._codec_kernel("encode_planes") is None:
        pytest.skip("numba is not installed")
    rng = np.random.default_rng(1)
    for images in hard_images(rng):
        n, h, w = images.shape
        fast, size = shards.encode_images(images, 2)
        ref = np.empty((n, size), np.uint8)
        shards._encode_planes_np(np.ascontiguousarray(images), ref)
        assert np.array_equal(fast, ref.reshape(-1))
        assert np.array_equal(shards._decode_planes_np(fast, n, h, w), images)


def test_format2_value_layout_is_tag_then_low_plane_then_high_plane_of_zigzag_row_deltas():
    img = np.array([[[1, 3], [0, -300]]], np.int16)
    # residuals: 1 - 0, 3 - 1 | 0 - 1 (first column: the pixel above), -300 - 0
    # zigzag:    2, 4 | 1, 599 (= 0x0257)
    data, size = shards.encode_images(img, 2)
    assert size == 9
    assert data.tolist() == [2, 2, 4, 1, 0x57, 0, 0, 0, 0x02]


def test_decode_images_reads_tables_record_batches_chunks_slices_and_numpy_batches_of_both_formats():
    rng = np.random.default_rng(2)
    images = np.clip(rng.normal(0, 400, size=(7, 12, 10)), -1024, 3071).astype(np.int16)
    cols = _cols(7)
    for version in (1, 2):
        t = shards.table_from_arrays(images, version=version, **cols)
        assert shards.table_version(t) == version
        two_chunks = pa.concat_tables([t.slice(0, 3), t.slice(3)])
        assert two_chunks["image"].num_chunks == 2
        rb = t.combine_chunks().to_batches()[0]
        ray_numpy_batch = {"image": np.array(t["image"].to_pylist(), dtype=object),
                           "height": t["height"].to_numpy(), "width": t["width"].to_numpy()}
        large = {"image": t["image"].cast(pa.large_binary()), "height": t["height"], "width": t["width"]}
        for batch in (t, two_chunks, rb, ray_numpy_batch, large):
            assert np.array_equal(shards.decode_images(batch), images)
        assert np.array_equal(shards.decode_images(rb.slice(2, 4)), images[2:6])  # a non-zero offset
        assert shards.decode_images(t.slice(0, 0)).shape == (0, 0, 0)
    by_rows = shards.rows_to_table({"image": list(images), **cols})
    assert shards.table_version(by_rows) == SCHEMA_VERSION
    assert np.array_equal(shards.decode_images(by_rows), images)


def test_decode_images_refuses_mixed_formats_and_foreign_bytes_with_one_line():
    images = np.zeros((2, 4, 4), np.int16)
    v1 = shards.table_from_arrays(images, version=1, **_cols(2))
    v2 = shards.table_from_arrays(images, version=2, **_cols(2))
    mixed = {"image": np.array(v1["image"].to_pylist()[:1] + v2["image"].to_pylist()[1:], dtype=object),
             "height": np.array([4, 4]), "width": np.array([4, 4])}
    with pytest.raises(UserError, match="different lengths") as e:
        shards.decode_images(mixed)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="tag byte"):
        shards.decode_images({"image": [b"\x07" + bytes(32)], "height": [4], "width": [4]})
    with pytest.raises(UserError, match="fit neither format"):
        shards.decode_images({"image": [bytes(30)], "height": [4], "width": [4]})


def test_a_stack_beyond_the_binary_offset_range_is_split_into_chunks(monkeypatch):
    monkeypatch.setattr(shards, "_MAX_BINARY_BYTES", 3 * shards.value_size(8, 8))  # as if 2 GiB
    images = np.arange(10 * 8 * 8, dtype=np.int16).reshape(10, 8, 8)
    t = shards.table_from_arrays(images, **_cols(10))
    assert t["image"].num_chunks == 4
    w = shards.ShardWriter()
    w.write(t)
    back = pq.read_table(pa.BufferReader(w.to_bytes()))
    assert np.array_equal(shards.decode_images(t), images) and np.array_equal(shards.decode_images(back), images)


def test_a_shard_writer_refuses_rows_of_another_format():
    images = np.zeros((2, 4, 4), np.int16)
    w = shards.ShardWriter()
    with pytest.raises(ValueError, match="format 1 cannot go into a format-2 shard"):
        w.write(shards.table_from_arrays(images, version=1, **_cols(2)))


def test_prep_writes_format2_files_and_manifest_with_checksums_verified_as_before(tmp_path):
    write_series(tmp_path / "src" / "a", 6, seed=3)
    prep(tmp_path / "src", tmp_path / "out", size=None)
    m = shards.read_manifest(str(tmp_path / "out"))
    assert m["schema_version"] == 2
    for s in m["shards"]:
        path = tmp_path / "out" / s["path"]
        assert pq.read_schema(path).metadata[VERSION_KEY] == b"2"
        assert pq.read_table(path)["image"][0].as_py()[0] == shards.PLANES_TAG
        assert hashlib.sha256(path.read_bytes()).hexdigest() == s["sha256"]
    t = shards.read_table(str(tmp_path / "out"))
    assert t["image"].type == pa.binary() and len(t["image"][0].as_py()) == 1 + 2 * 32 * 32
    path = tmp_path / "out" / m["shards"][0]["path"]
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, one byte changed
    path.write_bytes(bytes(raw))
    with pytest.raises(ManifestError, match="does not match its manifest checksum"):
        shards.read_table(str(tmp_path / "out"))


def test_format1_output_is_read_like_format2_and_a_selection_over_it_works(tmp_path, monkeypatch):
    for p in range(2):
        write_series(tmp_path / "src" / f"p{p}", 8, seed=p)
    with monkeypatch.context() as mp:
        mp.setattr(shards, "SCHEMA_VERSION", 1)
        mp.setattr(prep_module, "SCHEMA_VERSION", 1)
        prep(tmp_path / "src", tmp_path / "v1", size=None, rows_per_shard=4)
    prep(tmp_path / "src", tmp_path / "v2", size=None, rows_per_shard=4)
    v1, v2 = str(tmp_path / "v1"), str(tmp_path / "v2")
    m1 = shards.read_manifest(v1)
    assert m1["schema_version"] == 1
    for s in m1["shards"]:
        assert pq.read_schema(tmp_path / "v1" / s["path"]).metadata[VERSION_KEY] == b"1"
        assert len(pq.read_table(tmp_path / "v1" / s["path"])["image"][0].as_py()) == 2 * 32 * 32
    t1, t2 = shards.read_table(v1).sort_by("slice_id"), shards.read_table(v2).sort_by("slice_id")
    assert t1.drop_columns(["image"]).equals(t2.drop_columns(["image"]))
    assert np.array_equal(shards.decode_images(t1), shards.decode_images(t2))
    streamed = {v: np.concatenate([b["image"] for b in shards.iter_slices(v, batch_rows=3)]) for v in (v1, v2)}
    assert np.array_equal(streamed[v1], streamed[v2])
    # a reduction that reads pixels, over each output: the same selection; the format-1 one read back
    sels = {}
    for v in (v1, v2):
        sels[v] = str(tmp_path / f"sel-{v[-2:]}")
        assert main(["reduce", v, sels[v], "--strategy", "ssim", "--threshold", "0.5", "--size", "32",
                     "--no-progress"]) == 0
    kept = {v: sorted(shards.read_table(s, columns=["slice_id"])["slice_id"].to_pylist()) for v, s in sels.items()}
    assert kept[v1] == kept[v2] and 0 < len(kept[v1]) < 16
    picked = shards.read_table(sels[v1], columns=["slice_id", "image", "height", "width"]).sort_by("slice_id")
    ref = t1.filter(pc.is_in(t1["slice_id"], value_set=picked["slice_id"]))
    assert np.array_equal(shards.decode_images(picked), shards.decode_images(ref))
    assert sum(len(b["image"]) for b in shards.iter_slices(sels[v1], batch_rows=5)) == len(kept[v1])


def test_rerun_into_a_committed_format1_output_is_refused_with_one_clear_line(tmp_path, monkeypatch):
    write_series(tmp_path / "src" / "a", 3)
    with monkeypatch.context() as mp:
        mp.setattr(shards, "SCHEMA_VERSION", 1)
        mp.setattr(prep_module, "SCHEMA_VERSION", 1)
        prep(tmp_path / "src", tmp_path / "out", size=None)
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    write_series(tmp_path / "src" / "b", 3, seed=5)  # new series: a rerun would add shards
    with pytest.raises(UserError, match="holds shards in format 1") as e:
        prep(tmp_path / "src", tmp_path / "out", size=None)
    msg = str(e.value)
    assert "\n" not in msg and "new folder" in msg and "readable" in msg
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before  # nothing touched
    assert shards.read_manifest(str(tmp_path / "out"))["schema_version"] == 1


def test_an_interrupted_format1_run_is_redone_in_format2_without_mixing(tmp_path, monkeypatch):
    for p in range(3):
        write_series(tmp_path / "src" / f"p{p}", 4, seed=p)
    with monkeypatch.context() as mp:
        mp.setattr(shards, "SCHEMA_VERSION", 1)
        mp.setattr(prep_module, "SCHEMA_VERSION", 1)
        prep(tmp_path / "src", tmp_path / "out", size=None, rows_per_shard=4)
    (tmp_path / "out" / shards.MANIFEST).unlink()  # committed chunks, no manifest: a crashed run
    s = prep(tmp_path / "src", tmp_path / "out", size=None, rows_per_shard=4)
    assert s.committed and s.slices_written == 12 and s.resumed_series == 0
    m = shards.read_manifest(str(tmp_path / "out"))
    assert m["schema_version"] == 2
    files = sorted((tmp_path / "out").glob("part-*.parquet"))
    assert sorted(f.name for f in files) == sorted(x["path"] for x in m["shards"])  # format-1 shards gone
    assert all(pq.read_schema(f).metadata[VERSION_KEY] == b"2" for f in files)
    assert shards.read_table(str(tmp_path / "out")).num_rows == 12


def test_manifests_of_unknown_versions_are_refused(tmp_path):
    shards.write_manifest(str(tmp_path), {"schema_version": 3, "kind": "prep", "shards": []})
    with pytest.raises(ManifestError, match="schema_version 3 is not one of 1, 2"):
        shards.read_manifest(str(tmp_path))


def _cols(n: int) -> dict[str, list]:
    return {"slice_id": [f"s{i}" for i in range(n)], "patient_id": ["p"] * n, "study_id": ["st"] * n,
            "series_id": ["se"] * n, "slice_index": list(range(n)), "z_mm": [float(i) for i in range(n)],
            "spacing_mm": [[1.0, 1.0]] * n, "source": ["t"] * n, "label": [None] * n, "dhash": [0] * n}
