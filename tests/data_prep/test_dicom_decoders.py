"""Every transfer syntax that data_prep/sources/dicom_pixels.py claims to decode goes through `ctssl prep`
and gives the HU of the uncompressed original: exactly for lossless syntaxes, within the NEAR the
JPEG-LS stream declares for near-lossless, within a stated error for lossy JPEG. A file whose plugin is
missing, a 12-bit JPEG extended file, an unknown syntax and a cut stream each give one reject line that
names the syntax and the plugin (before any decoder text, which is cut at 160 characters).

Files: tests/data/dicom_codecs/ (three slices of the real CT series re-encoded, see its README) and
pydicom's bundled test files (MR ones written again with Modality CT and their own UIDs, so that each
is a series of its own and none is taken for a copy of another).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import JPEGLSLossless, generate_uid

from data_prep import shards
from data_prep.sources import dicom_pixels
from tests.conftest import REPO, TEST_DEID_KEY
from tests.data.dicom_codecs import make_codecs
from tests.data_prep.test_dicom_series_identity import _enhanced_from

CODECS = REPO / "tests" / "data" / "dicom_codecs"
HU_MIN, HU_MAX = -1024, 3071

#: folder of tests/data/dicom_codecs -> how its HU may differ from the original: "exact", "near" (the
#: stream's NEAR, times the slope), or a lossy bound (max, mean) in stored values
CODEC_CASES = {"jpeg_lossless_sv1": "exact", "jpeg_lossless": "exact", "jpeg_ls_lossless": "exact",
               "jpeg_ls_near_lossless": "near", "jpeg_baseline_8bit": (8, 1.0), "jpeg_extended_8bit": (8, 1.0)}
#: folder -> pydicom test file, written again as CT; the reference is MR_small.dcm's raw pixel bytes
PYDICOM_CASES = {"pydicom_explicit": "MR_small.dcm", "pydicom_implicit": "MR_small_implicit.dcm",
                 "pydicom_big_endian": "MR_small_bigendian.dcm", "pydicom_rle": "MR_small_RLE.dcm",
                 "pydicom_jpeg_ls": "MR_small_jpeg_ls_lossless.dcm", "pydicom_j2k": "MR_small_jp2klossless.dcm",
                 "pydicom_deflate": "image_dfl.dcm", "pydicom_j2k_lossy": "693_J2KI.dcm"}
#: the real series' JPEG 2000 lossless files are tests/data/real_ct (test_prep_dicom.py checks their HU)
REJECT_CASES = {"jpeg_extended_12bit": "1.2.840.10008.1.2.4.51", "pydicom_jpeg_extended_12bit": "JPGExtended.dcm"}


def _bundled(name: str) -> Path:
    """A test file shipped inside the installed pydicom (never downloaded)."""
    path = get_testdata_file(name, download=False)
    assert path, f"{name} is not shipped with pydicom {pydicom.__version__}"
    return Path(path)


def _as_ct(src: Path, dst: Path) -> None:
    ds = pydicom.dcmread(src)
    ds.Modality = "CT"
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[src.name])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[src.name, "series"])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst)
    written = pydicom.dcmread(dst, stop_before_pixels=True).file_meta.TransferSyntaxUID
    assert written == ds.file_meta.TransferSyntaxUID, f"{src.name} written again as {written}"


def _hu(stored: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    return np.clip(np.rint(stored.astype(np.float64) * slope + intercept), HU_MIN, HU_MAX)


def _raw(ds: pydicom.Dataset) -> np.ndarray:
    """Stored values straight from the bytes of an uncompressed little-endian dataset (no pydicom decoder)."""
    dtype = {8: "u1", 16: "<i2" if ds.PixelRepresentation else "<u2"}[ds.BitsAllocated]
    return np.frombuffer(ds.PixelData, dtype=dtype, count=ds.Rows * ds.Columns).reshape(ds.Rows, ds.Columns)


def _jls_near(path: Path) -> int:
    """The NEAR parameter of a JPEG-LS stream (its start-of-scan segment), as the file declares it."""
    ds = pydicom.dcmread(path)
    frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
    sos = frame.index(b"\xff\xda")
    components = frame[sos + 4]
    return frame[sos + 5 + 2 * components]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[tuple[float, np.ndarray]]]]:
    """The input folder (one subfolder per case, a labels CSV naming each file's folder) and, per
    folder, the (z, expected HU) of its slices."""
    src = tmp_path_factory.mktemp("codecs") / "src"
    expected: dict[str, list] = {}
    originals = [pydicom.dcmread(f) for f in make_codecs.source_files()]
    for folder in [*CODEC_CASES, "jpeg_extended_12bit"]:
        shutil.copytree(CODECS / folder, src / folder)
        for f in sorted((src / folder).iterdir()):
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            n = int(f.stem[2:])
            ref = make_codecs.reference_stored(originals[n], ds.BitsAllocated if ds.BitsAllocated == 8 else 16)
            expected.setdefault(folder, []).append((float(ds.ImagePositionPatient[2]), _hu(ref, ds)))
    reference = _raw(pydicom.dcmread(_bundled("MR_small.dcm")))
    for folder, name in PYDICOM_CASES.items():
        _as_ct(_bundled(name), src / folder / name)
        ds = pydicom.dcmread(src / folder / name)
        if name == "image_dfl.dcm":  # no uncompressed twin: its inflated bytes, read without a decoder
            ref = _raw(ds)
        elif name == "693_J2KI.dcm":  # lossy: GDCM's decode of the same stream (prep uses pylibjpeg)
            ref = pydicom.pixels.pixel_array(ds, decoding_plugin="gdcm")
        else:
            ref = reference
        z = float(ds.ImagePositionPatient[2]) if "ImagePositionPatient" in ds else None  # z_mm null
        expected[folder] = [(z, _hu(ref, ds))]
    _as_ct(_bundled(REJECT_CASES["pydicom_jpeg_extended_12bit"]), src / "pydicom_jpeg_extended_12bit" / "x.dcm")
    with open(src / "labels.csv", "w") as fh:
        fh.write("file,label\n")
        for f in sorted(src.rglob("*.dcm")):
            fh.write(f"{f.relative_to(src).as_posix()},{f.parent.name}\n")
    return src, expected


@pytest.fixture(scope="module")
def prepped(tree, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """`ctssl prep` of the whole tree at native size, as a user runs it (summary as JSON)."""
    src, _ = tree
    out = tmp_path_factory.mktemp("codecs-out") / "out"
    env = {**os.environ, "CTSSL_DEID_KEY": TEST_DEID_KEY}
    r = subprocess.run([sys.executable, "-m", "ray_jobs.cli", "prep", str(src), str(out), "--size", "0",
                        "--labels", str(src / "labels.csv"), "--no-progress", "--json"],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    return out, json.loads(r.stdout)


def test_the_table_covers_every_case_and_names_plugins_pydicom_has(tree) -> None:
    src, expected = tree
    claimed = {s.uid for s in dicom_pixels.SYNTAXES if s.tested}
    covered = set()
    for folder in expected:
        f = next((src / folder).iterdir())
        covered.add(str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID))
    covered.add("1.2.840.10008.1.2.4.90")  # the real series in tests/data/real_ct and MR_small_jp2klossless
    assert claimed == covered, f"claimed, untested: {claimed - covered}; tested, not claimed: {covered - claimed}"
    for s in dicom_pixels.SYNTAXES:
        decoder = pydicom.pixels.get_decoder(s.uid)
        known = set(decoder.available_plugins) | {m.split(" - ")[0] for m in decoder.missing_dependencies}
        assert set(s.plugins) <= known, (s.uid, s.plugins, known)
    # the environment that make setup and the image build has the first plugin of every row
    assert dicom_pixels.missing_plugins() == []


@pytest.mark.parametrize("folder", [*CODEC_CASES, *PYDICOM_CASES])
def test_each_syntax_gives_the_hu_of_the_original(folder, tree, prepped) -> None:
    src, expected = tree
    out, summary = prepped
    t = shards.read_table(str(out))
    t = t.filter(pc.equal(t["label"], folder))  # one folder's slices share a size (the tree's do not)
    rows = sorted(zip(t["z_mm"].to_pylist(), shards.decode_images(t), strict=True), key=lambda r: r[0] or 0)
    want = sorted(expected[folder], key=lambda x: x[0] or 0)
    assert [r[0] for r in rows] == pytest.approx([w[0] for w in want]), folder
    kind = CODEC_CASES.get(folder, "exact")
    for (_, got), (_, ref) in zip(rows, want, strict=True):
        assert got.shape == ref.shape
        diff = np.abs(got.astype(np.float64) - ref)
        if kind == "exact":
            assert np.array_equal(got, ref), f"{folder}: HU differ by up to {diff.max()}"
        elif kind == "near":
            near = _jls_near(next((src / folder).iterdir()))
            assert near == make_codecs.JLS_NEAR
            assert 0 < diff.max() <= near, f"{folder}: HU differ by {diff.max()} (NEAR {near})"
        else:
            worst, mean = kind
            slope = make_codecs.EIGHT_BIT_SLOPE
            assert diff.max() <= worst * slope and diff.mean() <= mean * slope, (folder, diff.max(), diff.mean())


def test_a_12_bit_jpeg_extended_file_is_one_reject_naming_syntax_and_plugin(prepped) -> None:
    _, summary = prepped
    reasons = {r["input"]: r["reason"] for r in summary["rejects"]}
    assert set(reasons) == {"jpeg_extended_12bit/CT00.dcm", "pydicom_jpeg_extended_12bit/x.dcm"}, reasons
    for reason in reasons.values():
        assert reason.startswith("pixel data could not be decoded: transfer syntax 1.2.840.10008.1.2.4.51 "
                                 "(JPEG Extended, 8/12-bit) with 12-bit samples needs the pylibjpeg plugin "
                                 "with pylibjpeg-libjpeg (GPL-3.0)"), reason


def _prep_main(src: Path, out: Path, capsys: pytest.CaptureFixture) -> list[str]:
    """`ctssl prep` in this process (so a monkeypatched table applies); the printed reject lines."""
    from ray_jobs.cli import main

    assert main(["prep", str(src), str(out), "--size", "0", "--no-progress"]) == 0
    return [ln.strip() for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("rejected ")]


def test_a_missing_plugin_is_one_reject_line_naming_the_syntax_and_the_plugin(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CTSSL_DEID_KEY", TEST_DEID_KEY)
    shutil.copy(CODECS / "jpeg_lossless_sv1" / "CT00.dcm", tmp_path / "a.dcm")
    have = dicom_pixels.available_plugins
    monkeypatch.setattr(dicom_pixels, "available_plugins", lambda uid: tuple(p for p in have(uid) if p != "gdcm"))
    lines = _prep_main(tmp_path / "a.dcm", tmp_path / "out", capsys)
    assert lines == ["rejected a.dcm: pixel data could not be decoded: transfer syntax 1.2.840.10008.1.2.4.70 "
                     "(JPEG Lossless SV1, first-order prediction) needs the gdcm plugin (pip install "
                     "python-gdcm), which is not installed"]


def test_an_unknown_transfer_syntax_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CTSSL_DEID_KEY", TEST_DEID_KEY)
    ds = pydicom.dcmread(_bundled("MR_small.dcm"))
    ds.Modality = "CT"
    ds.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.9999.1"
    ds.save_as(tmp_path / "odd.dcm")
    lines = _prep_main(tmp_path / "odd.dcm", tmp_path / "out", capsys)
    assert lines == ["rejected odd.dcm: pixel data could not be decoded: transfer syntax "
                     "1.2.826.0.1.3680043.9999.1 is an unknown transfer syntax (supported: see docs/data-format.md)"]


def test_enhanced_ct_frames_decode_through_the_table_and_a_missing_plugin_is_named(tmp_path, monkeypatch, capsys):
    """A multi-frame JPEG-LS Enhanced CT: frame by frame through pyjpegls, HU exact; without the plugins
    of its syntax, one reject naming both."""
    monkeypatch.setenv("CTSSL_DEID_KEY", TEST_DEID_KEY)
    files = sorted((CODECS / "jpeg_lossless_sv1").iterdir())
    path = _enhanced_from(files, tmp_path / "enh" / "series.dcm")
    ds = pydicom.dcmread(path)
    ds.compress(JPEGLSLossless, encoding_plugin="pyjpegls")
    ds.save_as(path)
    _prep_main(tmp_path / "enh", tmp_path / "out", capsys)
    got = shards.decode_images(shards.read_table(str(tmp_path / "out")))
    originals = [pydicom.dcmread(f) for f in make_codecs.source_files()]
    want = np.stack([_hu(make_codecs.reference_stored(o), o) for o in originals])[::-1]  # z ascending
    assert np.array_equal(got, want)

    monkeypatch.setattr(dicom_pixels, "available_plugins", lambda uid: ())
    lines = _prep_main(tmp_path / "enh", tmp_path / "out2", capsys)
    assert lines == ["rejected series.dcm: frame 1: pixel data could not be decoded: transfer syntax "
                     "1.2.840.10008.1.2.4.80 (JPEG-LS Lossless) needs the pyjpegls plugin (pip install pyjpegls), "
                     "which is not installed"]


def test_the_docs_table_lists_every_syntax_with_its_first_plugin() -> None:
    text = (REPO / "docs" / "data-format.md").read_text()
    section = text.split("## Supported transfer syntaxes and SOP classes", 1)[1].split("\n## ", 1)[0]
    documented: dict[str, list[str]] = {}
    for line in section.splitlines():
        if not line.startswith("| ") or line.startswith(("| transfer syntax", "|---")):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        uids = cells[1].split(", ")
        stem = uids[0].rsplit(".", 1)[0]
        for uid in [uids[0], *(stem + u for u in uids[1:])]:  # "1.2.840.10008.1.2.4.201, .202, .203"
            documented.setdefault(uid, []).append(cells[2])
    assert set(documented) == set(dicom_pixels.BY_UID)
    for uid, decoders in documented.items():
        row = dicom_pixels.BY_UID[uid]
        first = row.plugins[0] if row.plugins else "pydicom"
        assert any(d.startswith(first) for d in decoders), (uid, first, decoders)


def test_a_corrupt_stream_names_syntax_and_plugin_before_the_decoder_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CTSSL_DEID_KEY", TEST_DEID_KEY)
    ds = pydicom.dcmread(CODECS / "jpeg_ls_lossless" / "CT00.dcm")
    frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = pydicom.encaps.encapsulate([frame[: len(frame) // 3]])  # cut inside the scan
    ds.save_as(tmp_path / "cut.dcm")
    lines = _prep_main(tmp_path / "cut.dcm", tmp_path / "out", capsys)
    assert len(lines) == 1
    assert lines[0].startswith("rejected cut.dcm: pixel data could not be decoded: transfer syntax "
                               "1.2.840.10008.1.2.4.80 (JPEG-LS Lossless) with the pyjpegls plugin: "), lines[0]


def test_a_12_bit_jpeg_extended_file_uses_pylibjpeg_libjpeg_when_the_user_installed_it(monkeypatch):
    uid = "1.2.840.10008.1.2.4.51"
    monkeypatch.setattr(dicom_pixels, "available_plugins", lambda u: ("pillow", "gdcm"))
    with pytest.raises(dicom_pixels.PixelDecodeError, match="pylibjpeg-libjpeg"):
        dicom_pixels.plugin_for(uid, bits_stored=12)
    assert dicom_pixels.plugin_for(uid, bits_stored=8) == "pillow"
    monkeypatch.setattr(dicom_pixels, "available_plugins", lambda u: ("pylibjpeg", "pillow", "gdcm"))
    assert dicom_pixels.plugin_for(uid, bits_stored=12) == "pylibjpeg"
