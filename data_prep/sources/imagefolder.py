"""Folders of PNG / JPEG images with a labels CSV (COVID-CT style sets) -> labelled 8-bit slices.

Images may be grey or colour (turned into grey) and of any size (fitted into the prep size with the
aspect ratio kept by padding with black). Intensity is "gray8": pixel values 0..255, not HU; 16-bit
grey PNGs are scaled to 0..255.

The labels CSV (``--labels``, else ``labels.csv`` in the folder) has the columns ``file,label`` and
optionally ``patient``; paths are relative to the CSV. A row naming a file that is not there is a
reject naming that file; images the CSV does not name are written without a label. Identifiers:
every image is its own series; the patient is the CSV's ``patient`` value when given (so folds can
keep a patient's images together), else the image itself (one pseudo-patient per image).
"""

from __future__ import annotations

import csv
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from ctssl_base.errors import UserError
from data_prep.hu import resize_square
from data_prep.labels import label_for, labels_for_input, normalise_key
from data_prep.records import Reject, SeriesData, SeriesTask, SliceData
from data_prep.sources.base import SOURCES, PrepOptions, Source

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CHUNK_IMAGES = 512
DEFAULT_CSV = "labels.csv"


def _walk(root: str) -> list[str]:
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        out += [os.path.join(d, f) for f in sorted(files) if not f.startswith(".")]
    return out


def read_gray8(path: str) -> np.ndarray:
    """An image file -> (H, W) int16 grey values 0..255."""
    with Image.open(path) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im, dtype=np.float64)
            top = 65535.0 if arr.max() > 255 else 255.0
            return np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.int16)
        if im.mode == "F":
            raise ValueError("floating-point image; expected 8- or 16-bit grey or RGB")
        if im.mode != "L":
            im = im.convert("L")  # RGB(A), palette, 1-bit: ITU-R 601 luma
        return np.asarray(im, dtype=np.uint8).astype(np.int16)


def _patients_column(csv_path: str) -> dict[str, str]:
    """file -> patient from the optional ``patient`` column (labels come from read_labels_csv)."""
    with open(csv_path, newline="", encoding="utf-8-sig") as f:  # as read_labels_csv: a BOM is no column
        reader = csv.DictReader(f)
        fields = [c.strip().lower() for c in (reader.fieldnames or [])]
        if "patient" not in fields:
            return {}
        reader.fieldnames = fields
        return {normalise_key((r.get("file") or "").strip()): (r.get("patient") or "").strip()
                for r in reader if (r.get("file") or "").strip() and (r.get("patient") or "").strip()}


@SOURCES.register("imagefolder")
class ImageFolderSource(Source):
    intensity = "gray8"

    @classmethod
    def detect(cls, root: str) -> bool:
        if not os.path.isdir(root):
            return False
        files = _walk(root)[:2000]
        return any(p.lower().endswith(IMAGE_SUFFIXES) for p in files) and not any(
            p.lower().endswith((".dcm", ".nii", ".nii.gz", ".npz")) for p in files)

    def discover(self, root: str, opts: PrepOptions) -> tuple[list[SeriesTask], list[Reject]]:
        if not os.path.isdir(root):
            raise UserError(f"{root}: not a folder (an image folder source needs a folder of PNG/JPEG files)")
        base = root
        csv_path = opts.labels_csv
        if csv_path is None and os.path.isfile(os.path.join(root, DEFAULT_CSV)):
            csv_path = os.path.join(root, DEFAULT_CSV)
        images, self.ignored = [], []
        for p in _walk(root):
            if p.lower().endswith(IMAGE_SUFFIXES):
                images.append(p)
            else:
                self.ignored.append(os.path.relpath(p, base))
        rejects: list[Reject] = []
        present = {os.path.relpath(p, base) for p in images}
        labels: dict[str, str] | None = None
        patients: dict[str, str] = {}
        if csv_path:
            labels = labels_for_input(csv_path, base, present, rejects)
            csv_dir = os.path.dirname(os.path.abspath(csv_path))
            patients = {normalise_key(os.path.relpath(os.path.join(csv_dir, k), base)): v
                        for k, v in _patients_column(csv_path).items()}
        tasks = []
        for start in range(0, len(images), CHUNK_IMAGES):
            chunk = images[start:start + CHUNK_IMAGES]
            meta = {}
            for p in chunk:
                rel = normalise_key(os.path.relpath(p, base))
                meta[p] = (rel, label_for(labels, rel) if labels else None, patients.get(rel) or rel)
            tasks.append(SeriesTask(source=self.name, key=f"images:{meta[chunk[0]][0]}", inputs=chunk,
                                    options={"base": base, "meta": meta}))
        return tasks, rejects

    def load(self, task: SeriesTask, opts: PrepOptions) -> SeriesData:
        series = self.load_many(task, opts)
        if len(series) != 1:
            raise UserError(f"{task.key}: holds {len(series)} images; use load_many")
        return series[0]

    def load_many(self, task: SeriesTask, opts: PrepOptions) -> list[SeriesData]:
        dataset = opts.dataset or self.name
        out: list[SeriesData] = []
        bad: list[Reject] = []
        for p in task.inputs:
            rel, label, patient = task.options["meta"][p]
            try:
                img = read_gray8(p)
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
                bad.append(Reject(rel, f"unreadable image ({type(e).__name__}: {str(e)[:160]})"))
                continue
            if img.ndim != 2 or min(img.shape) < 1:
                bad.append(Reject(rel, f"unexpected image shape {img.shape}"))
                continue
            g, _ = resize_square(img, opts.size, pad_value=0)
            # a patient value from the CSV identifies a person (files are often named by it); the
            # default, the image's own path, does not, and must not blank out other files' names
            data = SeriesData(source=self.name, dataset=dataset, patient=patient, study=patient, series=rel,
                              phi=[patient] if patient != rel else [])
            data.slices.append(SliceData(hu=g, slice_index=0, z_mm=float("nan"),
                                         spacing_mm=(float("nan"), float("nan")), label=label, input=rel))
            out.append(data)
        if bad:
            # rejects ride on an identity-free carrier: attached to an image's series, the prep would
            # redact that image's name from them (and the names of files that share its prefix)
            out.append(SeriesData(source=self.name, dataset=dataset, patient="", study="", series="", rejects=bad))
        return out
