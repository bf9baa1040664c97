"""Image folder + labels CSV source: grey/RGB/16-bit images of any size, patients, bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from data_prep import shards
from data_prep.prep import PrepConfig, run_prep
from data_prep.sources import get_source
from data_prep.sources.base import PrepOptions, detect_source
from data_prep.sources.imagefolder import read_gray8
from tests.conftest import TEST_DEID_KEY


def _folder(root):
    """covid/p1_a.png (grey 40x20), covid/p1_b.jpg (RGB), normal/p2.png (16-bit grey), normal/extra.png
    (not in the CSV), broken.png (not an image); the CSV also names gone.png, which does not exist."""
    (root / "covid").mkdir(parents=True)
    (root / "normal").mkdir()
    grey = np.zeros((20, 40), np.uint8)
    grey[:, 20:] = 200
    Image.fromarray(grey).save(root / "covid" / "p1_a.png")
    Image.fromarray(np.full((30, 30, 3), (120, 120, 120), np.uint8)).save(root / "covid" / "p1_b.jpg", quality=95)
    Image.fromarray(np.full((16, 16), 65535, np.uint16)).save(root / "normal" / "p2.png")
    Image.fromarray(np.full((8, 8), 77, np.uint8)).save(root / "normal" / "extra.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"truncated")
    (root / "labels.csv").write_text(
        "file,label,patient\n"
        "covid/p1_a.png,covid,P1\n"
        "covid/p1_b.jpg,covid,P1\n"
        "normal/p2.png,normal,P2\n"
        "broken.png,normal,P3\n"
        "gone.png,covid,P4\n"
    )


def test_folder_with_labels_csv_writes_labelled_grey_rows_and_rejects_bad_inputs_by_name(tmp_path):
    src = tmp_path / "covid_ct"
    _folder(src)
    assert detect_source(str(src)).name == "imagefolder"
    s = run_prep(PrepConfig(src=str(src), dst=str(tmp_path / "out"), size=32, executor="local", progress=False),
                 TEST_DEID_KEY.encode())
    assert s.slices_written == 4 and s.rejected == 2
    reasons = {r["input"]: r["reason"] for r in s.rejects}
    assert "unreadable image" in reasons["broken.png"]
    gone = next(k for k in reasons if "gone.png" in k)
    assert "no such file" in reasons[gone]
    assert shards.read_manifest(str(tmp_path / "out"))["intensity"] == "gray8"

    t = shards.read_table(str(tmp_path / "out"))
    images = shards.decode_images(t)
    assert images.shape == (4, 32, 32) and images.min() >= 0 and images.max() <= 255
    rows = {lab: [] for lab in ("covid", "normal", None)}
    for img, lab, pat in zip(images, t["label"].to_pylist(), t["patient_id"].to_pylist(), strict=True):
        rows[lab].append((img, pat))
    assert len(rows["covid"]) == 2 and len(rows["normal"]) == 1 and len(rows[None]) == 1
    # the two images of patient P1 share a patient id; the unlabelled extra image is its own patient
    assert rows["covid"][0][1] == rows["covid"][1][1] != rows["normal"][0][1]
    assert int(rows["normal"][0][0].max()) == 255  # 16-bit white -> 255
    assert int(rows[None][0][0][16, 16]) == 77


def test_wide_image_is_fitted_into_the_square_with_black_padding(tmp_path):
    src = tmp_path / "imgs"
    _folder(src)
    source = get_source("imagefolder")
    tasks, _ = source.discover(str(src), PrepOptions(size=40))
    series = {d.series: d for t in tasks for d in source.load_many(t, PrepOptions(size=40)) if d.slices}
    img = series["covid/p1_a.png"].slices[0].hu
    assert img.shape == (40, 40)
    assert np.all(img[:10] == 0) and np.all(img[30:] == 0)  # 40x20 -> 40 wide, 20 tall, centred
    assert np.all(img[10:30, :19] == 0) and np.all(img[10:30, 21:] == 200)
    assert series["covid/p1_a.png"].slices[0].label == "covid"


def test_rgb_and_grey_decode_to_the_same_grey_values(tmp_path):
    Image.fromarray(np.full((4, 4, 3), (255, 0, 0), np.uint8)).save(tmp_path / "red.png")
    Image.fromarray(np.full((4, 4), 76, np.uint8)).save(tmp_path / "g.png")
    assert int(read_gray8(str(tmp_path / "red.png"))[0, 0]) == 76 == int(read_gray8(str(tmp_path / "g.png"))[0, 0])


def test_folder_without_csv_is_written_unlabelled_one_patient_per_image(tmp_path):
    for i in range(3):
        Image.fromarray(np.full((10, 12), 40 * i, np.uint8)).save(tmp_path / f"s{i}.png")
    source = get_source("imagefolder")
    tasks, rejects = source.discover(str(tmp_path), PrepOptions(size=None))
    assert rejects == []
    series = [d for t in tasks for d in source.load_many(t, PrepOptions(size=None))]
    assert sorted(d.patient for d in series) == ["s0.png", "s1.png", "s2.png"]
    assert all(d.slices[0].label is None and d.slices[0].hu.shape == (10, 12) for d in series)


def test_8bit_prep_stores_the_datasets_grey_value_statistics_in_the_manifest(tmp_path):
    from data_prep import intensity

    src = tmp_path / "imgs"
    (src / "a").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(20, 220, (24, 24), dtype=np.uint8)).save(src / "a" / f"x{i}.png")
    (src / "labels.csv").write_text("file,label\n" + "".join(f"a/x{i}.png,{'ab'[i % 2]}\n" for i in range(5)))
    out = str(tmp_path / "out")
    run_prep(PrepConfig(src=str(src), dst=out, size=24, executor="local", progress=False), TEST_DEID_KEY.encode())
    stored = shards.read_manifest(out)[intensity.KEY]
    px = shards.decode_images(shards.read_table(out)).astype(np.float64)
    assert stored["slices"] == 5
    assert stored["mean"] == pytest.approx(px.mean()) and stored["std"] == pytest.approx(px.std())
    assert intensity.dataset_stats(out) == stored
    # an output prepped before the statistics were stored gets them computed on read
    m = shards.read_manifest(out)
    del m[intensity.KEY]
    shards.write_manifest(out, m)
    again = intensity.dataset_stats(out)
    assert again["mean"] == pytest.approx(px.mean()) and again["std"] == pytest.approx(px.std())
