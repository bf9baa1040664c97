"""Enhanced (multi-frame) CT: one DICOM file holds a whole series, one row per frame.

An Enhanced CT Image Storage object (SOP class 1.2.840.10008.5.1.4.1.1.2.1) keeps the geometry that a
classic series has in every file's header in *functional groups*: per frame in
PerFrameFunctionalGroupsSequence, or once for all frames in SharedFunctionalGroupsSequence. A frame's
value is the per-frame one when present, else the shared one:

- PlanePositionSequence > ImagePositionPatient (required per frame: it orders the slices),
- PlaneOrientationSequence > ImageOrientationPatient (one orientation for the whole object),
- PixelMeasuresSequence > PixelSpacing,
- PixelValueTransformationSequence > RescaleSlope / RescaleIntercept (HU).

Frames are then treated exactly as classic slices: ordered by position along the slice normal, with the
same HU conversion, resizing and de-identification. Only this geometry lookup is written here: pydicom 3
parses the sequences and decodes frames one at a time (:func:`data_prep.sources.dicom_pixels.iter_frames`:
pydicom's ``iter_pixels`` with the plugin of the file's transfer syntax, so memory is one frame, not the
whole object), and ``highdicom`` would add a dependency (and its own validation of
every module) for four sequence look-ups. Geometry is checked for every frame before any pixel is
decoded, so a file with frames of mixed orientation or without positions is one clear reject.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pydicom

from data_prep.sources import dicom_pixels

#: SOP class of Enhanced CT Image Storage (other multi-frame CT objects are read the same way)
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"

#: direction cosines that differ by more than this are another orientation
ORIENTATION_TOL = 1e-4


class FrameError(ValueError):
    """A multi-frame object that cannot be turned into ordered slices (the message is the reject reason)."""


@dataclass
class Frame:
    number: int  # 1-based, as DICOM numbers frames
    stored: np.ndarray  # (rows, cols) stored values
    slope: float
    intercept: float
    padding: float | None
    spacing: tuple[float, float]
    position: tuple[float, float, float]
    orientation: tuple[float, ...]
    z: float  # position along the slice normal (mm)
    order: float  # sort key (= z)


@dataclass
class _Geometry:
    position: tuple[float, float, float]
    orientation: tuple[float, ...]
    spacing: tuple[float, float]
    slope: float
    intercept: float


def _item(groups: pydicom.Dataset | None, sequence: str) -> pydicom.Dataset | None:
    """The first item of a functional group macro in one frame's (or the shared) groups."""
    if groups is None:
        return None
    seq = groups.get(sequence)
    return seq[0] if seq else None


def _floats(item: pydicom.Dataset | None, keyword: str) -> list[float] | None:
    if item is None or keyword not in item or item.get(keyword) in (None, ""):
        return None
    v = item.get(keyword)
    vals = list(v) if isinstance(v, pydicom.multival.MultiValue | list | tuple) else [v]
    try:
        return [float(x) for x in vals]
    except (TypeError, ValueError):
        raise FrameError(f"multi-frame object: {keyword} holds {str(v)[:40]!r}, not numbers") from None


def _lookup(per: pydicom.Dataset | None, shared: pydicom.Dataset | None, sequence: str,
            keyword: str) -> list[float] | None:
    got = _floats(_item(per, sequence), keyword)
    return got if got is not None else _floats(_item(shared, sequence), keyword)


def frame_geometry(ds: pydicom.Dataset) -> list[_Geometry]:
    """Position, orientation, spacing and rescale of every frame, checked before any pixel is decoded."""
    try:
        n = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        raise FrameError(f"multi-frame object: NumberOfFrames holds {str(ds.get('NumberOfFrames'))[:40]!r}") from None
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    per_seq = ds.get("PerFrameFunctionalGroupsSequence") or []
    if per_seq and len(per_seq) != n:
        raise FrameError(f"multi-frame object: {len(per_seq)} per-frame functional groups for {n} frames")
    top_slope = _floats(ds, "RescaleSlope")
    top_intercept = _floats(ds, "RescaleIntercept")
    top_spacing = _floats(ds, "PixelSpacing")
    out: list[_Geometry] = []
    for i in range(n):
        per = per_seq[i] if per_seq else None
        ipp = _lookup(per, shared, "PlanePositionSequence", "ImagePositionPatient")
        if ipp is None or len(ipp) != 3:
            raise FrameError(f"multi-frame object ({n} frames): frame {i + 1} has no position "
                             "(PlanePositionSequence > ImagePositionPatient); its frames cannot be ordered")
        iop = _lookup(per, shared, "PlaneOrientationSequence", "ImageOrientationPatient")
        if iop is None or len(iop) != 6:
            raise FrameError(f"multi-frame object ({n} frames): frame {i + 1} has no orientation "
                             "(PlaneOrientationSequence > ImageOrientationPatient)")
        if out and max(abs(a - b) for a, b in zip(iop, out[0].orientation, strict=True)) > ORIENTATION_TOL:
            raise FrameError(f"multi-frame object ({n} frames): frames have different orientations (frame 1 "
                             f"{_fmt(out[0].orientation)}, frame {i + 1} {_fmt(iop)}); one series needs one")
        ps = _lookup(per, shared, "PixelMeasuresSequence", "PixelSpacing") or top_spacing
        slope = _lookup(per, shared, "PixelValueTransformationSequence", "RescaleSlope") or top_slope or [1.0]
        intercept = _lookup(per, shared, "PixelValueTransformationSequence", "RescaleIntercept") \
            or top_intercept or [0.0]
        out.append(_Geometry(tuple(ipp), tuple(iop), (ps[0], ps[1]) if ps and len(ps) >= 2 else (1.0, 1.0),
                             slope[0] or 1.0, intercept[0]))
    return out


def iter_frames(ds: pydicom.Dataset, path: str) -> Iterator[Frame]:
    """The frames of the multi-frame file at ``path`` (``ds``: its header, pixel data not needed), in
    file order, decoded one at a time. Raises :class:`FrameError` (a reject reason) before decoding
    when the geometry is unusable, and when a frame does not decode."""
    geo = frame_geometry(ds)
    pad = ds.get("PixelPaddingValue")
    padding = None if pad is None else float(pad)
    frames = dicom_pixels.iter_frames(ds, path)
    try:
        for i, g in enumerate(geo):
            try:
                stored = next(frames)
            except StopIteration:
                raise FrameError(f"multi-frame object: pixel data ends after {i} of {len(geo)} frames") from None
            except dicom_pixels.PixelDecodeError as e:  # names the transfer syntax and its plugin, in full
                raise FrameError(f"frame {i + 1}: {e}") from None
            except Exception as e:  # noqa: BLE001 - decoder errors come in many types
                raise FrameError(f"pixel data of frame {i + 1} could not be decoded ({type(e).__name__}: "
                                 f"{str(e)[:120]})") from None
            if stored.ndim != 2:
                raise FrameError(f"unexpected frame shape {stored.shape} (colour?)")
            z = _along_normal(g.position, g.orientation)
            yield Frame(i + 1, stored, g.slope, g.intercept, padding, g.spacing, g.position, g.orientation, z, z)
    finally:
        frames.close()  # closes the file at once, also when a frame is rejected


def _along_normal(ipp: tuple[float, ...], iop: tuple[float, ...]) -> float:
    r0, r1, r2, c0, c1, c2 = iop
    n = (r1 * c2 - r2 * c1, r2 * c0 - r0 * c2, r0 * c1 - r1 * c0)
    z = ipp[0] * n[0] + ipp[1] * n[1] + ipp[2] * n[2]
    if not math.isfinite(z):
        raise FrameError("multi-frame object: a frame position is not a finite number")
    return z


def _fmt(v: tuple[float, ...] | list[float]) -> str:
    return "(" + ", ".join(f"{x:g}" for x in v) + ")"
