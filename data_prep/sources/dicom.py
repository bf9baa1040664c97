"""DICOM trees of any layout -> CT series.

Series are grouped over the whole input, not per folder: a series whose files sit in several folders
(a split export, ``a/`` and ``b/``) is one series with one z order. Discovery therefore reads the
header of every file once (only the handful of elements named in :data:`HEADER_TAGS`, never the pixel
data; measured at a few per cent of prep time, see docs/benchmarks.md) and makes one task per series,
keyed by its SeriesInstanceUID. Anonymised data often has that UID emptied (see tests/data/real_ct),
so the fallback is folder + geometry (orientation, pixel spacing). The same pass finds duplicates: a
repeated SOPInstanceUID (the largest copy is kept, then the first in sorted path order) or, for files
without one, a byte-identical file (the first path is kept) is dropped and listed as a reject
"duplicate of <kept file>"; the choice depends only on the input, so reruns agree.

Redaction: a series task may span several patient-named folders, and a worker sees only its chunk's
headers; it names rejected files in its commit record by keyed digests (prep.py's docstring). The
process that discovers has read every header, so the identifying values of all of them (``phi``)
redact the manifest's rejects together with the digests of every commit record: a folder named after
a PatientName is redacted even where only another series' header holds that name. Files whose header
does not parse are rejects of discovery, named by their path, which is only ever written redacted.

Slices are ordered by position along the slice normal (ImagePositionPatient . (row x col)),
never by file name or InstanceNumber, which scanners and anonymisers reorder freely. Enhanced
(multi-frame) CT is read by :mod:`data_prep.sources.dicom_enhanced`, one row per frame.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.tag import Tag
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from ctssl_base.errors import UserError
from data_prep.hu import hu_resized
from data_prep.labels import label_for, labels_for_input
from data_prep.records import Reject, SeriesData, SeriesTask, SliceData
from data_prep.sources import dicom_enhanced, dicom_pixels
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
    every other transfer syntax goes through :func:`data_prep.sources.dicom_pixels.decode` (the plugin
    of each syntax; a :class:`~data_prep.sources.dicom_pixels.PixelDecodeError` names syntax and plugin).
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
    return dicom_pixels.decode(ds)


@dataclass
class _Slice:
    rel: str  # the file (or file#frame) the slice came from
    series_key: str
    size: tuple[int, int]
    order: float
    z: float
    hu: np.ndarray
    spacing: tuple[float, float]
    patient: str
    study: str
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None


#: what discovery reads of each header: enough to group files into series, to find duplicates, to count
#: an Enhanced file's frames and to know the identifying values (the pixel data is never read here)
HEADER_TAGS = ("SeriesInstanceUID", "SOPInstanceUID", "ImageOrientationPatient", "PixelSpacing",
               "ImagePositionPatient", "InstanceNumber", "NumberOfFrames", *PHI_TAGS)


_WANTED = {int(tag_for_keyword(k)): k for k in HEADER_TAGS}
_LAST_WANTED = max(_WANTED)
#: explicit-VR value representations with a 4-byte length (after two reserved bytes)
_LONG_VR = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"))
#: bytes read for the fast header pass: a CT header before PixelSpacing is a few kB
_HEAD_BYTES = 16384


class _FastHeader:
    """The wanted elements of a header as raw elements, read by :func:`fast_header` (the ``get_item``
    that :func:`header_text` and :func:`header_floats` use; every value is ASCII, so nothing else)."""

    def __init__(self, items: dict[str, RawDataElement]):
        self._items = items

    def get_item(self, keyword: str) -> RawDataElement | None:
        return self._items.get(keyword)

    def get(self, keyword: str, default: object = None) -> object:
        el = self._items.get(keyword)
        return default if el is None else el.value


def fast_header(path: str) -> _FastHeader | None:
    """The elements of :data:`HEADER_TAGS` of an explicit-VR little-endian data set, parsed from its first
    bytes with a plain loop; None for anything else (implicit VR, no preamble, an undefined-length
    sequence or a non-ASCII value before the last wanted element, a header longer than the bytes read),
    which pydicom then reads.

    Why not pydicom alone: discovery reads every header once more than loading does, and pydicom's
    generic parse (~0.5 ms a file) costs a fifth of the time of prepping an uncompressed slice; this
    loop costs a tenth of that. Elements are read as stored, as :func:`header_text` reads them anyway.
    """
    with open(path, "rb") as f:
        buf = f.read(_HEAD_BYTES)
    n = len(buf)
    if n < 144 or buf[128:132] != b"DICM":
        return None
    pos, ts = 132, None
    while pos + 8 <= n:  # file meta information: always explicit VR little endian
        group, elem = struct.unpack_from("<HH", buf, pos)
        if group != 2:
            break
        if buf[pos + 4:pos + 6] in _LONG_VR:
            length, vpos = struct.unpack_from("<I", buf, pos + 8)[0], pos + 12
        else:
            length, vpos = struct.unpack_from("<H", buf, pos + 6)[0], pos + 8
        if elem == 0x0010:
            ts = buf[vpos:vpos + length].rstrip(b"\0 ").decode("ascii", "replace")
        pos = vpos + length
    try:
        uid = UID(ts or "")
        if not uid.is_transfer_syntax or uid.is_implicit_VR or not uid.is_little_endian or uid.is_deflated:
            return None  # the data set is not explicit VR little endian (encapsulated pixel data is fine)
    except ValueError:  # a private transfer syntax pydicom does not know
        return None
    items: dict[str, RawDataElement] = {}
    while True:
        if pos + 12 > n:
            return None
        group, elem = struct.unpack_from("<HH", buf, pos)
        tag = group << 16 | elem
        if tag > _LAST_WANTED:
            return _FastHeader(items)
        vr = buf[pos + 4:pos + 6]
        if not (vr.isalpha() and vr.isupper()):
            return None
        if vr in _LONG_VR:
            length, vpos = struct.unpack_from("<I", buf, pos + 8)[0], pos + 12
        else:
            length, vpos = struct.unpack_from("<H", buf, pos + 6)[0], pos + 8
        if length == 0xFFFFFFFF:
            return None
        if tag in _WANTED:
            value = buf[vpos:vpos + length]
            if vpos + length > n or not value.isascii():
                return None
            items[_WANTED[tag]] = RawDataElement(Tag(tag), vr.decode(), length, value, vpos, False, True, True, False)
        pos = vpos + length


def series_key(ds: pydicom.Dataset, folder: str) -> str:
    """The series a file belongs to: its SeriesInstanceUID, or (UID emptied by an anonymiser) its
    folder + orientation + pixel spacing. Discovery and loading both call this, so they agree."""
    uid = header_text(ds, "SeriesInstanceUID")
    if uid:
        return f"uid:{uid}"
    try:
        iop = header_floats(ds, "ImageOrientationPatient")
        ps = header_floats(ds, "PixelSpacing")
    except ValueError:
        iop, ps = [], []
    orient = tuple(round(float(x), 3) for x in iop) if iop else ()
    spacing = (ps[0], ps[1]) if len(ps) >= 2 else (1.0, 1.0)
    return f"dir:{folder}|{orient}|{tuple(round(x, 4) for x in spacing)}"


@dataclass
class _Header:
    """What discovery keeps of one file's header."""

    path: str
    rel: str
    sop: str  # SOPInstanceUID ("" when emptied)
    ident: tuple  # (file size, position, instance number): files that may be byte-identical copies
    series: str  # :func:`series_key`
    frames: int


def _read_error(e: Exception) -> str:
    """The reject reason of a file pydicom cannot parse (the same in discovery and loading)."""
    if isinstance(e, InvalidDicomError):
        return "not a DICOM file (no DICM preamble and no parsable header)"
    return f"unreadable DICOM file ({type(e).__name__}: {_short(e)})"


def _duplicates(headers: list[_Header]) -> dict[str, tuple[str, str]]:
    """The files to drop as copies of another (path -> (kept path, why)), decided the same on every run.

    Files sharing a SOPInstanceUID are one instance: the largest copy is kept (a truncated copy is never
    preferred to the whole file), ties going to the first path in sorted order. Files without the UID
    (anonymised) are copies when byte-identical; only files that agree on size, position and instance
    number are hashed, so a series without copies is not read twice.
    """
    dropped: dict[str, tuple[str, str]] = {}
    by_sop: dict[str, list[str]] = defaultdict(list)
    by_ident: dict[tuple, list[str]] = defaultdict(list)
    for h in headers:
        if h.sop:
            by_sop[h.sop].append(h.path)
        else:
            by_ident[h.ident].append(h.path)
    for paths in by_sop.values():
        if len(paths) > 1:
            kept = max(paths, key=lambda q: (os.path.getsize(q), -paths.index(q)))
            dropped.update({q: (kept, "same SOPInstanceUID") for q in paths if q != kept})
    for paths in by_ident.values():
        if len(paths) > 1:
            first_of: dict[str, str] = {}
            for q in paths:
                kept = first_of.setdefault(_file_digest(q), q)
                if kept != q:
                    dropped[q] = (kept, "byte-identical file")
    return dropped


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@SOURCES.register("dicom")
class DicomSource(Source):
    def __init__(self) -> None:
        super().__init__()
        #: identifying values of every header discovery read (never written; prep redacts with them)
        self.phi: list[str] = []

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
        files: list[str] = []
        for p in _walk(root):
            if p.lower().endswith(NON_IMAGE_SUFFIXES):
                self.ignored.append(os.path.relpath(p, base))
            else:
                files.append(p)
        files.sort(key=lambda p: os.path.relpath(p, base))  # the kept copy of a duplicate: first path
        labels = None
        if opts.labels_csv:
            present = {os.path.relpath(p, base) for p in files}
            labels = labels_for_input(opts.labels_csv, base, present, rejects)
        phi: set[str] = set()
        headers: list[_Header] = []  # what grouping needs of every parsed file (not the header: memory)
        for p in files:
            rel = os.path.relpath(p, base)
            # pydicom's warnings may quote header values; loading reads the same file again and records
            # them redacted, so here they are not shown
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    ds = fast_header(p) or pydicom.dcmread(p, stop_before_pixels=True,
                                                           specific_tags=list(HEADER_TAGS))
                    phi.update(phi_values(ds))
                    try:
                        frames = max(1, int((header_floats(ds, "NumberOfFrames") or [1])[0]))
                    except ValueError:
                        frames = 1  # loading rejects the file with the element named
                    headers.append(_Header(p, rel, header_text(ds, "SOPInstanceUID"),
                                           (os.path.getsize(p), header_text(ds, "ImagePositionPatient"),
                                            header_text(ds, "InstanceNumber")),
                                           series_key(ds, os.path.dirname(rel) or "."), frames))
                except Exception as e:  # noqa: BLE001 - truncated/corrupt files raise many kinds of errors
                    rejects.append(Reject(rel, _read_error(e)))
        dropped = _duplicates(headers)
        by_series: dict[str, list[str]] = defaultdict(list)
        frames_of: dict[str, int] = {}
        for h in headers:
            if h.path in dropped:
                kept, why = dropped[h.path]
                rejects.append(Reject(h.rel, f"duplicate of {os.path.relpath(kept, base)} ({why})"))
                continue
            by_series[h.series].append(h.path)
            frames_of[h.path] = h.frames
        self.phi = sorted(phi)
        tasks = []
        for key in sorted(by_series):
            inputs = by_series[key]
            file_labels = {}
            if labels is not None:
                for p in inputs:
                    lab = label_for(labels, os.path.relpath(p, base))
                    if lab is not None:
                        file_labels[p] = lab
            tasks.append(SeriesTask(source=self.name, key=f"series:{key}", inputs=inputs,
                                    options={"base": base, "labels": file_labels,
                                             "slices": sum(frames_of[p] for p in inputs),
                                             "multiframe": [p for p in inputs if frames_of[p] > 1]}))
        return tasks, rejects

    def count_slices(self, task: SeriesTask) -> int:
        """Frames, not files: an Enhanced CT file is one file of many slices."""
        return int(task.options.get("slices", len(task.inputs)))

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
        multiframe = set(task.options.get("multiframe", ()))
        for p in task.inputs:
            rel = os.path.relpath(p, base)
            folder = os.path.dirname(rel) or "."
            try:
                # a multi-frame file's pixel data is decoded frame by frame from the file, never held whole
                ds = pydicom.dcmread(p, stop_before_pixels=p in multiframe)
            except Exception as e:  # noqa: BLE001 - truncated/corrupt files raise many kinds of errors
                rejects.append(Reject(rel, _read_error(e)))
                continue
            phi.update(phi_values(ds))
            modality = header_text(ds, "Modality")
            if modality and modality.upper() != "CT":
                rejects.append(Reject(rel, f"modality {modality}, not CT"))
                continue
            if p not in multiframe and "PixelData" not in ds:
                rejects.append(Reject(rel, "DICOM object without pixel data"))
                continue
            try:
                frames = int((header_floats(ds, "NumberOfFrames") or [1])[0])
            except ValueError as e:
                rejects.append(Reject(rel, f"malformed header: {e}"))
                continue
            key = series_key(ds, folder)
            patient = header_text(ds, "PatientID") or f"dir:{folder}"
            study = header_text(ds, "StudyInstanceUID") or f"dir:{folder}"
            # Enhanced CT keeps its geometry in functional groups, even with a single frame
            if frames > 1 or p in multiframe or "SharedFunctionalGroupsSequence" in ds \
                    or "PerFrameFunctionalGroupsSequence" in ds:
                try:
                    for fr in dicom_enhanced.iter_frames(ds, p):
                        hu, factors = hu_resized(fr.stored, fr.slope, fr.intercept, padding_value=fr.padding,
                                                 size=opts.size, pad_value=opts.pad_hu)
                        name = f"{rel}#{fr.number}"
                        slices.append(_Slice(name, key, fr.stored.shape, fr.order, fr.z, hu,
                                             (fr.spacing[0] * factors[0], fr.spacing[1] * factors[1]),
                                             patient, study, fr.position, fr.orientation))
                        label_of[name] = labels.get(p)
                except dicom_enhanced.FrameError as e:
                    slices = [s for s in slices if not s.rel.startswith(f"{rel}#")]
                    rejects.append(Reject(rel, str(e)))
                continue
            try:
                stored = stored_pixels(ds)
            except dicom_pixels.PixelDecodeError as e:  # names the transfer syntax and its plugin
                rejects.append(Reject(rel, str(e)))
                continue
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
            z, has_pos = _position_along_normal(ipp, iop)
            order = z if has_pos else instance
            spacing = (spacing[0] * factors[0], spacing[1] * factors[1])
            slices.append(_Slice(rel, key, stored.shape, order, z if has_pos else math.nan, hu, spacing,
                                 patient, study, tuple(ipp) if len(ipp) == 3 else None,
                                 tuple(iop) if len(iop) == 6 else None))
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
                                             label=label_of.get(s.rel), input=s.rel, position_mm=s.position,
                                             orientation=s.orientation, native_size=s.size))
            out.append(data)
        if not out:
            out.append(SeriesData(source=self.name, dataset=opts.dataset or self.name, patient="", study="",
                                  series=task.key))
        out[0].rejects.extend(rejects)
        for d in out:
            d.phi = sorted(phi)
        return out


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
