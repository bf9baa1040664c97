"""DICOM trees of any layout -> CT series.

Files are grouped by SeriesInstanceUID. Anonymised data often has that UID emptied (see the real
series under shared/data/real_ct), so without it we fall back to folder + geometry (rows, columns,
orientation, pixel spacing): files of one folder with one geometry are one series. Slices are
ordered by their position along the slice normal (ImagePositionPatient . (row x col direction)),
never by file name or InstanceNumber, which scanners and anonymisers reorder freely.
"""

from __future__ import annotations

import math
import os
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from data_prep.errors import UserError
from data_prep.hu import resize_square, to_hu
from data_prep.labels import normalise_key, read_labels_csv
from data_prep.records import Reject, SeriesData, SeriesTask, SliceData
from data_prep.sources.base import PrepOptions, Source, register_source

#: Files next to DICOMs that are not images: listed as "ignored", not rejected.
NON_IMAGE_SUFFIXES = (".csv", ".json", ".txt", ".md", ".xml", ".pdf", ".html", ".yaml", ".yml", ".py", ".key")

#: Header values that identify a person or an exam; collected per series to redact messages.
PHI_TAGS = ("PatientName", "PatientID", "OtherPatientIDs", "PatientBirthDate", "AccessionNumber",
            "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "InstitutionName",
            "InstitutionAddress", "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName",
            "StudyID", "FrameOfReferenceUID")

_HEADER_TAGS = ["Modality", "SeriesInstanceUID", "StudyInstanceUID", "PatientID", "Rows", "Columns",
                "ImageOrientationPatient", "PixelSpacing", "NumberOfFrames", *PHI_TAGS]


@dataclass
class _Header:
    path: str
    modality: str
    series_uid: str
    study_uid: str
    patient_id: str
    rows: int
    cols: int
    orientation: tuple[float, ...]
    spacing: tuple[float, ...]
    frames: int
    phi: list[str]


def phi_values(ds: pydicom.Dataset) -> list[str]:
    """Identifying strings in a header (and the parts of a person name), for redaction."""
    out: list[str] = []
    for tag in PHI_TAGS:
        v = ds.get(tag)
        if v is None or v == "":
            continue
        vals = v if isinstance(v, pydicom.multival.MultiValue) else [v]
        for x in vals:
            s = str(x).strip()
            if len(s) >= 3:
                out.append(s)
                out.extend(p for p in s.replace("^", " ").split() if len(p) >= 3)
    return out


def _read_header(path: str) -> _Header:
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    iop = ds.get("ImageOrientationPatient")
    ps = ds.get("PixelSpacing")
    return _Header(
        path=path,
        modality=str(ds.get("Modality", "") or ""),
        series_uid=str(ds.get("SeriesInstanceUID", "") or ""),
        study_uid=str(ds.get("StudyInstanceUID", "") or ""),
        patient_id=str(ds.get("PatientID", "") or ""),
        rows=int(ds.get("Rows", 0) or 0),
        cols=int(ds.get("Columns", 0) or 0),
        orientation=tuple(round(float(x), 3) for x in iop) if iop else (),
        spacing=tuple(round(float(x), 4) for x in ps) if ps else (),
        frames=int(ds.get("NumberOfFrames", 1) or 1),
        phi=phi_values(ds),
    )


def _walk(root: str) -> list[str]:
    if os.path.isfile(root):
        return [root]
    files = []
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        files.extend(os.path.join(d, n) for n in sorted(names) if not n.startswith("."))
    return files


@register_source
class DicomSource(Source):
    name = "dicom"

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
        headers: list[_Header] = []
        ignored: list[str] = []
        for p in _walk(root):
            rel = os.path.relpath(p, base)
            if p.lower().endswith(NON_IMAGE_SUFFIXES):
                ignored.append(rel)
                continue
            try:
                h = _read_header(p)
            except InvalidDicomError:
                rejects.append(Reject(rel, "not a DICOM file (no DICM preamble and no parsable header)"))
                continue
            except Exception as e:  # noqa: BLE001 - truncated/corrupt files raise many kinds of errors
                rejects.append(Reject(rel, f"unreadable DICOM header ({type(e).__name__}: {_short(e)})"))
                continue
            if h.modality and h.modality.upper() != "CT":
                rejects.append(Reject(rel, f"modality {h.modality}, not CT"))
                continue
            if h.rows <= 0 or h.cols <= 0:
                rejects.append(Reject(rel, "no image (Rows/Columns missing: not an image object)"))
                continue
            if h.frames > 1:
                rejects.append(Reject(rel, f"multi-frame object ({h.frames} frames) is not supported yet"))
                continue
            headers.append(h)

        groups: dict[str, list[_Header]] = defaultdict(list)
        for h in headers:
            if h.series_uid:
                key = f"uid:{h.series_uid}"
            else:
                folder = os.path.relpath(os.path.dirname(h.path), base)
                key = f"dir:{folder}|{h.orientation}|{h.spacing}"
            groups[key].append(h)

        labels = self._labels(opts, base, rejects, {os.path.relpath(h.path, base) for h in headers})
        tasks: list[SeriesTask] = []
        for key in sorted(groups):
            hs = groups[key]
            sizes = Counter((h.rows, h.cols) for h in hs)
            (rows, cols), _ = sizes.most_common(1)[0]
            keep = []
            for h in hs:
                if (h.rows, h.cols) != (rows, cols):
                    rejects.append(Reject(os.path.relpath(h.path, base),
                                          f"slice size {h.rows}x{h.cols} differs from the rest of its "
                                          f"series ({rows}x{cols}); a series must have one size"))
                else:
                    keep.append(h)
            first = keep[0]
            folder = os.path.relpath(os.path.dirname(first.path), base)
            patient = first.patient_id or f"dir:{folder}"
            study = first.study_uid or f"dir:{folder}"
            inputs = [h.path for h in keep]
            file_labels = {}
            if labels is not None:
                for h in keep:
                    lab = _label_for(labels, os.path.relpath(h.path, base))
                    if lab is not None:
                        file_labels[h.path] = lab
            phi = sorted({v for h in keep for v in h.phi})
            tasks.append(SeriesTask(source=self.name, key=key, inputs=inputs,
                                    options={"patient": patient, "study": study, "base": base,
                                             "labels": file_labels, "phi": phi}))
        self.ignored = ignored
        return tasks, rejects

    @staticmethod
    def _labels(opts: PrepOptions, base: str, rejects: list[Reject], present: set[str]) -> dict[str, str] | None:
        if not opts.labels_csv:
            return None
        labels = read_labels_csv(opts.labels_csv)
        csv_dir = os.path.dirname(os.path.abspath(opts.labels_csv))
        # Keys are relative to the CSV's folder; re-express them relative to the input root.
        rebased = {normalise_key(os.path.relpath(os.path.join(csv_dir, k), base)): v for k, v in labels.items()}
        present_dirs = {normalise_key(os.path.dirname(p)) for p in present}
        for k in sorted(rebased):
            if k not in present and k not in present_dirs and not os.path.exists(os.path.join(base, k)):
                rejects.append(Reject(f"{os.path.basename(opts.labels_csv)}: {k}",
                                      "listed in the labels CSV but no such file or folder under the input"))
        return rebased

    def load(self, task: SeriesTask, opts: PrepOptions) -> SeriesData:
        base = task.options["base"]
        labels: dict[str, str] = task.options.get("labels", {})
        data = SeriesData(source=self.name, dataset=opts.dataset or self.name,
                          patient=task.options["patient"], study=task.options["study"], series=task.key)
        items = []
        for p in task.inputs:
            rel = os.path.relpath(p, base)
            try:
                ds = pydicom.dcmread(p)
                if "PixelData" not in ds:
                    data.rejects.append(Reject(rel, "DICOM object without pixel data"))
                    continue
                stored = ds.pixel_array
            except Exception as e:  # noqa: BLE001 - decoder errors come in many types
                data.rejects.append(Reject(rel, f"pixel data could not be decoded ({type(e).__name__}: {_short(e)})"))
                continue
            if stored.ndim != 2:
                data.rejects.append(Reject(rel, f"unexpected pixel array shape {stored.shape} (colour or multi-frame)"))
                continue
            slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
            intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
            pad = ds.get("PixelPaddingValue")
            hu = to_hu(stored, slope, intercept, padding_value=None if pad is None else float(pad))
            z, has_pos = _position_along_normal(ds)
            spacing = tuple(float(x) for x in ds.get("PixelSpacing", [1.0, 1.0]))[:2]
            order_key = z if has_pos else float(ds.get("InstanceNumber", 0) or 0)
            items.append((order_key, z if has_pos else math.nan, hu, spacing, labels.get(p), rel))
        items.sort(key=lambda it: it[0])
        for i, (_, z, hu, spacing, label, rel) in enumerate(items):
            img, (fr, fc) = resize_square(hu, opts.size, pad_value=opts.pad_hu)
            data.slices.append(SliceData(hu=img, slice_index=i, z_mm=z,
                                         spacing_mm=(spacing[0] * fr, spacing[1] * fc), label=label, input=rel))
        return data


def _position_along_normal(ds: pydicom.Dataset) -> tuple[float, bool]:
    ipp, iop = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
    if not ipp or not iop or len(iop) != 6 or len(ipp) != 3:
        return math.nan, False
    r, c = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    n = np.cross(r, c)
    return float(np.dot(np.asarray(ipp, float), n)), True


def _label_for(labels: dict[str, str], rel: str) -> str | None:
    key = normalise_key(rel)
    while True:
        if key in labels:
            return labels[key]
        if "/" not in key:
            return None
        key = key.rsplit("/", 1)[0]


def _short(e: Exception, n: int = 160) -> str:
    s = str(e).replace("\n", " ")
    return s if len(s) <= n else s[: n - 3] + "..."
