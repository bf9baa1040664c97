"""MedMNIST .npz source: labels per image, splits kept, grey 8-bit intensity, bad files rejected."""

from __future__ import annotations

import numpy as np
import pytest

from data_prep import shards
from data_prep.prep import PrepConfig, run_prep
from data_prep.sources import get_source
from data_prep.sources.base import PrepOptions, detect_source
from data_prep.sources.medmnist import read_rows
from tests.conftest import TEST_DEID_KEY


def _organ_like(path, n=(7, 3, 4), compressed=False, rgb=False):
    """An OrganSMNIST-shaped file: image i of a split is filled with value 10*i + split number."""
    arrays = {}
    for s, (split, count) in enumerate(zip(("train", "val", "test"), n, strict=True)):
        shape = (count, 28, 28, 3) if rgb else (count, 28, 28)
        imgs = np.zeros(shape, np.uint8)
        for i in range(count):
            imgs[i] = 10 * i + s
        arrays[f"{split}_images"] = imgs
        arrays[f"{split}_labels"] = (np.arange(count) % 11).reshape(-1, 1).astype(np.uint8)
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return arrays


def _prep(src, dst, **kw):
    return run_prep(PrepConfig(src=str(src), dst=str(dst), executor="local", progress=False, **kw),
                    TEST_DEID_KEY.encode())


def test_organsmnist_file_gives_one_labelled_row_per_image_with_the_split_as_study(tmp_path):
    _organ_like(tmp_path / "organsmnist.npz")
    assert detect_source(str(tmp_path / "organsmnist.npz")).name == "medmnist"
    s = _prep(tmp_path / "organsmnist.npz", tmp_path / "out", size=None, dataset="organsmnist")
    assert s.committed and s.slices_written == 14 and s.rejected == 0
    assert shards.read_manifest(str(tmp_path / "out"))["intensity"] == "gray8"
    t = shards.read_table(str(tmp_path / "out"))
    images = shards.decode_images(t)
    assert images.shape == (14, 28, 28) and images.dtype == np.int16
    # every image is its own patient and series; the split is the study (3 splits -> 3 studies)
    assert len(set(t["patient_id"].to_pylist())) == 14 and len(set(t["series_id"].to_pylist())) == 14
    studies = t["study_id"].to_pylist()
    assert len(set(studies)) == 3
    by_value = {int(img[0, 0]): (lab, st) for img, lab, st in zip(images, t["label"].to_pylist(), studies,
                                                                   strict=True)}
    assert by_value[60] == ("6", by_value[0][1])  # train image 6: label 6 % 11, same study as train image 0
    assert by_value[21][0] == "2" and by_value[21][1] != by_value[0][1]  # val image 2
    assert by_value[32][0] == "3"  # test image 3
    assert set(t["source"].to_pylist()) == {"organsmnist"}


def test_images_are_resized_to_the_prep_size_and_rgb_becomes_grey(tmp_path):
    arrays = _organ_like(tmp_path / "path.npz", n=(2, 1, 1), rgb=True)
    arrays["train_images"][1, ..., 0] = 200  # red channel only
    np.savez(tmp_path / "path.npz", **arrays)
    src = get_source("medmnist")
    opts = PrepOptions(size=64)
    tasks, rejects = src.discover(str(tmp_path / "path.npz"), opts)
    assert rejects == [] and [src.count_slices(t) for t in tasks] == [2, 1, 1]
    train = src.load_many(tasks[0], opts)
    assert [d.split for d in train] == ["train", "train"]
    img = train[1].slices[0].hu
    assert img.shape == (64, 64) and img.dtype == np.int16
    assert int(np.median(img)) == round(0.299 * 200 + 0.587 * 10 + 0.114 * 10)


def test_rows_are_read_from_compressed_files_without_loading_the_whole_array(tmp_path):
    arrays = _organ_like(tmp_path / "c.npz", n=(9, 1, 1), compressed=True)
    part = read_rows(str(tmp_path / "c.npz"), "train_images", 3, 7)
    assert np.array_equal(part, arrays["train_images"][3:7])


def test_volumes_of_3d_medmnist_sets_become_series_of_slices(tmp_path):
    vols = np.stack([np.full((4, 28, 28), 5 * i, np.uint8) for i in range(3)])
    np.savez(tmp_path / "organmnist3d.npz", train_images=vols, train_labels=np.array([[0], [1], [2]]))
    src = get_source("medmnist")
    tasks, _ = src.discover(str(tmp_path), PrepOptions(size=None))
    series = src.load_many(tasks[0], PrepOptions(size=None))
    assert [len(d.slices) for d in series] == [4, 4, 4]
    assert [d.slices[0].label for d in series] == ["0", "1", "2"]
    assert [d.slices[3].slice_index for d in series] == [3, 3, 3]


@pytest.mark.parametrize("content, reason", [
    ({"x": np.zeros(3)}, "no train_images / val_images / test_images"),
    ({"train_images": np.zeros((3, 8, 8), np.uint8), "train_labels": np.zeros((2, 1))},
     "train_labels has 2 rows but train_images has 3"),
    ({"train_images": np.zeros((3, 8), np.uint8), "train_labels": np.zeros((3, 1))}, "has shape (3, 8)"),
])
def test_bad_npz_contents_are_rejected_with_the_file_and_reason(tmp_path, content, reason):
    np.savez(tmp_path / "bad.npz", **content)
    _organ_like(tmp_path / "good.npz", n=(2, 1, 1))
    s = _prep(tmp_path, tmp_path / "out", size=None)
    assert s.slices_written == 4 and s.rejected == 1
    assert s.rejects[0]["input"].startswith("bad.npz") and reason in s.rejects[0]["reason"]


def test_a_corrupt_npz_and_out_of_range_pixels_are_rejected_by_name(tmp_path):
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 this is not a zip archive")
    imgs = np.array([np.full((8, 8), 10.0), np.full((8, 8), 300.0)], dtype=np.float32)
    np.savez(tmp_path / "floaty.npz", train_images=imgs, train_labels=np.array([[1], [2]]))
    s = _prep(tmp_path, tmp_path / "out", size=None)
    reasons = {r["input"]: r["reason"] for r in s.rejects}
    assert "unreadable .npz" in reasons["broken.npz"]
    assert "outside 0..255" in reasons["floaty.npz:train:1"]
    assert s.slices_written == 1


def test_a_labels_csv_is_refused_because_the_npz_has_labels(tmp_path):
    from ctssl_base.errors import UserError

    _organ_like(tmp_path / "o.npz", n=(1, 1, 1))
    with pytest.raises(UserError, match="carry their own labels"):
        get_source("medmnist").discover(str(tmp_path), PrepOptions(labels_csv=str(tmp_path / "l.csv")))
