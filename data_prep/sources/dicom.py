"""DICOM trees of any layout -> CT series.

Discovery only lists files, so listing LIDC-IDRI's ~244k files costs a directory walk, not a header
parse of every file twice (once to group, once to decode). One task is one top-level folder of the
input (a patient folder in LIDC-style trees; single-child chains are descended first), so everything
that can name a patient - headers of any of its series, its folder name - is seen by the same worker,
which can then redact reject paths even for files that do not parse. A worker reads each file once
and groups files into series by SeriesInstanceUID. Anonymised data often has that UID emptied (see
tests/data/real_ct), so the fallback is folder + geometry (orientation, pixel spacing).

Slices are ordered by position along the slice normal (ImagePositionPatient . (row x col)),
never by file name or InstanceNumber, which scanners and anonymisers reorder freely.
"""

from __future__ import annotations

import math
import os
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from ctssl_base.errors import UserError
from data_prep.hu import hu_resized
from data_prep.labels import label_for, labels_for_input
from data_prep.records import Reject, SeriesData, SeriesTask, SliceData
from data_prep.sources.base import SOURCES, PrepOptions, Source

#: Files next to DICOMs that are not images: listed as "ignored", not rejected.
NON_IMAGE_SUFFIXES = (".csv", ".json", ".txt", ".md", ".xml", ".pdf", ".html", ".yaml", ".yml", ".py", ".key")

#: Header values that identify a person or an exam; collected to redact messages, never written.
PHI_TAGS = ("PatientName", "PatientID", "OtherPatientIDs", "PatientBirthDate", "AccessionNumber",
            "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "InstitutionName",
            "InstitutionAddress", "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName",
            "StudyID", "FrameOfReferenceUID")

_RAW_LE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


def header_text(ds: pydicom.Dataset, keyword: str) -> str:
    """A text element's value as stored, multiple values joined by a backslash ("" when absent).

    Reads the element's raw bytes when they are ASCII, as nearly every CT header is: pydicom's
    conversion to typed values (person names, decimal strings, UIDs) costs more per slice than
    resizing the image. Non-ASCII values take pydicom's conversion, which honours the character set.
    """
    el = ds.get_item(keyword)
    if el is None:
        return ""
    if isinstance(el, RawDataElement) and isinstance(el.value, bytes) and el.value.isascii():
        return el.value.decode("ascii").strip(" \x00")
    v = ds.get(keyword)
    if v is None:
        return ""
    if isinstance(v, pydicom.multival.MultiValue):
        return "\\".join(str(x) for x in v)
    return str(v).strip()


def header_int(ds: pydicom.Dataset, keyword: str, default: int) -> int:
    """An unsigned/signed short (Rows, BitsAllocated, ...) decoded from its two raw bytes when the
    element is explicit-VR little endian, else through pydicom."""
    el = ds.get_item(keyword)
    if el is None:
        return default
    if (isinstance(el, RawDataElement) and el.VR in ("US", "SS") and el.is_little_endian
            and isinstance(el.value, bytes) and len(el.value) == 2):
        return int.from_bytes(el.value, "little", signed=el.VR == "SS")
    v = ds.get(keyword)
    return default if v is None or v == "" else int(v)


def header_floats(ds: pydicom.Dataset, keyword: str) -> list[float]:
    """Numbers of a decimal/integer string element ([] when absent); a clear error when malformed."""
    text = header_text(ds, keyword)
    try:
        return [float(x) for x in text.split("\\") if x.strip()]
    except ValueError:
        raise ValueError(f"{keyword} holds {text[:40]!r}, not numbers") from None


def phi_values(ds: pydicom.Dataset) -> list[str]:
    """Identifying strings in a header (and the parts of a person name), for redaction."""
    out: list[str] = []
    for tag in PHI_TAGS:
        text = header_text(ds, tag)
        if not text:
            continue
        for x in text.split("\\"):
            s = x.strip()
            if len(s) >= 3:
                out.append(s)
                out.extend(p for p in s.replace("^", " ").split() if len(p) >= 3)
    return out


def _walk(root: str) -> list[str]:
    if os.path.isfile(root):
        return [root]
    files = []
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        files.extend(os.path.join(d, n) for n in sorted(names) if not n.startswith("."))
    return files


def stored_pixels(ds: pydicom.Dataset) -> np.ndarray:
    """The stored values of a single-frame grayscale image.

    Uncompressed little-endian data is viewed straight from the PixelData bytes (what pydicom's
    ``pixel_array`` does too, minus its generic handler overhead, which costs more than the copy);
    compressed transfer syntaxes (JPEG 2000, JPEG lossless, RLE) go through pydicom's decoders.
    """
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    bits, spp = header_int(ds, "BitsAllocated", 0), header_int(ds, "SamplesPerPixel", 1) or 1
    if ts in _RAW_LE and bits == 16 and spp == 1 and int((header_floats(ds, "NumberOfFrames") or [1])[0]) <= 1:
        rows, cols = header_int(ds, "Rows", 0), header_int(ds, "Columns", 0)
        signed = header_int(ds, "PixelRepresentation", 0) == 1
        el = ds.get_item("PixelData")
        buf = el.value if isinstance(el, RawDataElement) and isinstance(el.value, bytes) else ds.PixelData
        if len(buf) < rows * cols * 2:
            raise ValueError(f"pixel data has {len(buf)} bytes, {rows}x{cols}x2 expected (truncated file?)")
        arr = np.frombuffer(buf, dtype="<i2" if signed else "<u2", count=rows * cols).reshape(rows, cols)
        stored_bits = header_int(ds, "BitsStored", 16) or 16
        if signed and stored_bits < 16:  # sign-extend from BitsStored, as the standard defines
            shift = 16 - stored_bits
            arr = (arr.astype(np.int16) << shift) >> shift
        return arr
    return ds.pixel_array


@dataclass
class _Slice:
    rel: str
    series_key: str
    size: tuple[int, int]
    order: float
    z: float
    hu: np.ndarray
    spacing: tuple[float, float]
    patient: str
    study: str


@SOURCES.register("dicom")
class DicomSource(Source):
    @classmethod
    def detect(cls, root: str) -> bool:
        for i, p in enumerate(_walk(root)):
            if i > 200:
                break
            if p.lower().endswith(NON_IMAGE_SUFFIXES):
                continue
            try:
                with open(p, "rb") as f:
                    head = f.read(132)
            except OSError:
                continue
            if head[128:132] == b"DICM" or p.lower().endswith(".dcm"):
                return True
        return False

    def discover(self, root: str, opts: PrepOptions) -> tuple[list[SeriesTask], list[Reject]]:
        if not os.path.exists(root):
            raise UserError(f"{root}: input folder does not exist")
        base = root if os.path.isdir(root) else os.path.dirname(root)
        rejects: list[Reject] = []
        self.ignored = []
        top = _effective_root(base) if os.path.isdir(root) else base
        by_dir: dict[str, list[str]] = defaultdict(list)
        for p in _walk(root):
            if p.lower().endswith(NON_IMAGE_SUFFIXES):
                self.ignored.append(os.path.relpath(p, base))
            else:
                rel = os.path.relpath(p, top)
                by_dir[os.path.join(top, rel.split(os.sep, 1)[0]) if os.sep in rel else top].append(p)
        labels = None
        if opts.labels_csv:
            present = {os.path.relpath(p, base) for ps in by_dir.values() for p in ps}
            labels = labels_for_input(opts.labels_csv, base, present, rejects)
        tasks = []
        for d in sorted(by_dir):
            files = by_dir[d]
            file_labels = {}
            if labels is not None:
                for p in files:
                    lab = label_for(labels, os.path.relpath(p, base))
                    if lab is not None:
                        file_labels[p] = lab
            tasks.append(SeriesTask(source=self.name, key=f"dir:{os.path.relpath(d, base)}", inputs=files,
                                    options={"base": base, "labels": file_labels}))
        return tasks, rejects

    def load(self, task: SeriesTask, opts: PrepOptions) -> SeriesData:
        series = self.load_many(task, opts)
        if len(series) != 1:
            raise UserError(f"{task.key}: holds {len(series)} series; use load_many")
        return series[0]

    def load_many(self, task: SeriesTask, opts: PrepOptions) -> list[SeriesData]:
        base = task.options["base"]
        labels: dict[str, str] = task.options.get("labels", {})
        rejects: list[Reject] = []
        phi: set[str] = set()
        slices: list[_Slice] = []
        label_of: dict[str, str | None] = {}
        for p in task.inputs:
            rel = os.path.relpath(p, base)
            folder = os.path.dirname(rel) or "."
            try:
                ds = pydicom.dcmread(p)
            except InvalidDicomError:
                rejects.append(Reject(rel, "not a DICOM file (no DICM preamble and no parsable header)"))
                continue
            except Exception as e:  # noqa: BLE001 - truncated/corrupt files raise many kinds of errors
                rejects.append(Reject(rel, f"unreadable DICOM file ({type(e).__name__}: {_short(e)})"))
                continue
            phi.update(phi_values(ds))
            modality = header_text(ds, "Modality")
            if modality and modality.upper() != "CT":
                rejects.append(Reject(rel, f"modality {modality}, not CT"))
                continue
            if "PixelData" not in ds:
                rejects.append(Reject(rel, "DICOM object without pixel data"))
                continue
            try:
                frames = int((header_floats(ds, "NumberOfFrames") or [1])[0])
            except ValueError as e:
                rejects.append(Reject(rel, f"malformed header: {e}"))
                continue
            if frames > 1:
                rejects.append(Reject(rel, f"multi-frame object ({frames} frames) is not supported yet"))
                continue
            try:
                stored = stored_pixels(ds)
            except Exception as e:  # noqa: BLE001 - decoder errors come in many types
                rejects.append(Reject(rel, f"pixel data could not be decoded ({type(e).__name__}: {_short(e)})"))
                continue
            if stored.ndim != 2:
                rejects.append(Reject(rel, f"unexpected pixel array shape {stored.shape} (colour or multi-frame)"))
                continue
            try:
                slope = (header_floats(ds, "RescaleSlope") or [1.0])[0] or 1.0
                intercept = (header_floats(ds, "RescaleIntercept") or [0.0])[0]
                iop = header_floats(ds, "ImageOrientationPatient")
                ipp = header_floats(ds, "ImagePositionPatient")
                ps = header_floats(ds, "PixelSpacing")
                instance = (header_floats(ds, "InstanceNumber") or [0.0])[0]
            except ValueError as e:
                rejects.append(Reject(rel, f"malformed header: {e}"))
                continue
            pad = ds.get("PixelPaddingValue")  # US/SS: a binary value, cheap to convert
            # resized at once (bounds memory): one compiled pass for integer factors such as 512 -> 256
            hu, factors = hu_resized(stored, slope, intercept, padding_value=None if pad is None else float(pad),
                                     size=opts.size, pad_value=opts.pad_hu)
            spacing = (ps[0], ps[1]) if len(ps) >= 2 else (1.0, 1.0)
            uid = header_text(ds, "SeriesInstanceUID")
            orient = tuple(round(float(x), 3) for x in iop) if iop else ()
            key = f"uid:{uid}" if uid else f"dir:{folder}|{orient}|{tuple(round(x, 4) for x in spacing)}"
            z, has_pos = _position_along_normal(ipp, iop)
            order = z if has_pos else instance
            spacing = (spacing[0] * factors[0], spacing[1] * factors[1])
            slices.append(_Slice(rel, key, stored.shape, order, z if has_pos else math.nan, hu, spacing,
                                 header_text(ds, "PatientID") or f"dir:{folder}",
                                 header_text(ds, "StudyInstanceUID") or f"dir:{folder}"))
            label_of[rel] = labels.get(p)

        groups: dict[str, list[_Slice]] = defaultdict(list)
        for s in slices:
            groups[s.series_key].append(s)
        out = []
        for key in sorted(groups):
            g = groups[key]
            size, _ = Counter(s.size for s in g).most_common(1)[0]
            keep = []
            for s in g:
                if s.size != size:
                    rejects.append(Reject(s.rel, f"slice size {s.size[0]}x{s.size[1]} differs from the rest of "
                                                 f"its series ({size[0]}x{size[1]}); a series must have one size"))
                else:
                    keep.append(s)
            keep.sort(key=lambda s: s.order)
            data = SeriesData(source=self.name, dataset=opts.dataset or self.name, patient=keep[0].patient,
                              study=keep[0].study, series=key)
            for i, s in enumerate(keep):
                data.slices.append(SliceData(hu=s.hu, slice_index=i, z_mm=s.z, spacing_mm=s.spacing,
                                             label=label_of.get(s.rel), input=s.rel))
            out.append(data)
        if not out:
            out.append(SeriesData(source=self.name, dataset=opts.dataset or self.name, patient="", study="",
                                  series=task.key))
        out[0].rejects.extend(rejects)
        for d in out:
            d.phi = sorted(phi)
        return out


def _effective_root(base: str) -> str:
    """Descend folders that hold nothing but one sub-folder (``/data`` -> ``/data/LIDC-IDRI``), so the
    task unit is the patient level, not the whole data set."""
    cur = base
    while True:
        try:
            entries = [e for e in os.scandir(cur) if not e.name.startswith(".")]
        except OSError:
            return cur
        if len(entries) == 1 and entries[0].is_dir():
            cur = entries[0].path
        else:
            return cur


def _position_along_normal(ipp: list[float], iop: list[float]) -> tuple[float, bool]:
    """ImagePositionPatient . (row direction x column direction); plain floats (np.cross per slice
    costs more than the rest of this function's callers' bookkeeping)."""
    if len(iop) != 6 or len(ipp) != 3:
        return math.nan, False
    r0, r1, r2, c0, c1, c2 = iop
    n = (r1 * c2 - r2 * c1, r2 * c0 - r0 * c2, r0 * c1 - r1 * c0)
    return ipp[0] * n[0] + ipp[1] * n[1] + ipp[2] * n[2], True


def _short(e: Exception, n: int = 160) -> str:
    s = str(e).replace("\n", " ")
    return s if len(s) <= n else s[: n - 3] + "..."
