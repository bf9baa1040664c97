"""Each reject reason ctssl's sources write has a named kind; the summary line counts them."""

from __future__ import annotations

import pytest

from data_prep import reject_kinds

#: reasons as the sources write them (the texts of data_prep/sources/*.py and volume_qc.py)
REASONS = {
    "duplicate of a/IM0001 (same SOPInstanceUID)": "duplicate",
    "pixel data could not be decoded: transfer syntax 1.2.840.10008.1.2.4.70 (JPEG Lossless) needs the gdcm "
    "plugin (pip install python-gdcm), which is not installed": "pixel data not decoded",
    "pixel data of frame 3 could not be decoded (ValueError: x)": "pixel data not decoded",
    "series not written (--volume-check skip): not a volume: all 4 slices at one position":
        "left out by the volume checks",
    "modality MR, not CT": "not CT",
    "DICOM object without pixel data": "no pixel data",
    "not a DICOM file (no DICM preamble and no parsable header)": "not a DICOM file",
    "unreadable DICOM file (OSError: x)": "unreadable file",
    "unreadable NIfTI file (ImageFileError: x)": "unreadable file",
    "malformed header: invalid value for Rows": "malformed header",
    "multi-frame object (4 frames): frame 2 has no position": "unusable multi-frame object",
    "slice size 16x16 differs from the rest of the series (32x32)": "size differs from its series",
    "unexpected pixel array shape (3, 8, 8) (colour or multi-frame)": "not a scalar image or volume",
    "RGB colour voxels (R, G, B); expected one value per voxel (a CT volume in HU)": "not a scalar image or volume",
    "complex voxels (complex64); expected one real value per voxel": "not a scalar image or volume",
    "a 4-D image of shape (8, 8, 4, 3) (3 volumes); expected one 3-D CT volume": "not a scalar image or volume",
    "12 of 512 voxels are NaN or infinite; the volume is not usable": "NaN or infinite values",
    "values -3..300 outside 0..255 (not an 8-bit image)": "values out of range",
}


@pytest.mark.parametrize(("reason", "kind"), REASONS.items())
def test_each_reason_has_its_kind(reason, kind):
    assert reject_kinds.kind_of(reason) == kind


def test_the_volume_check_reason_and_an_unknown_reason():
    from data_prep import volume_qc

    flag = volume_qc.VolumeFlag("not_a_volume", "all 4 slices at one position (z 5.00 mm)")
    assert reject_kinds.kind_of(volume_qc.skip_reason([flag])) == "left out by the volume checks"
    assert reject_kinds.kind_of("something new went wrong") == "other"


def test_the_summary_line_counts_most_frequent_first():
    rejects = [{"input": f"f{i}", "reason": r} for i, r in enumerate(
        ["duplicate of a (same SOPInstanceUID)"] * 3 + ["modality MR, not CT", "something new"])]
    assert reject_kinds.summary_line(rejects) == "rejects by kind: 3 duplicate, 1 not CT, 1 other"
    assert reject_kinds.summary_line([]) == ""
