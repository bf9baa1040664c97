"""Labels CSVs: ``file,label`` rows that attach a class to each input file (or series folder)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from ctssl_base.errors import UserError
from data_prep.records import Reject


def read_labels_csv(path: str, *, root: str | None = None) -> dict[str, str]:
    """Map of input path (relative to ``root``, normalised, forward slashes) -> label.

    Accepts a header with columns ``file`` and ``label`` (extra columns ignored). A missing column,
    an empty file name or a file listed twice with different labels is an error naming the line, and
    only the line: the file names of a CSV are paths into patient folders (often named by PatientID),
    and an error message ends up in logs, where nothing may be redacted yet.
    """
    check_labels_csv(path)
    out: dict[str, str] = {}
    first_line: dict[str, int] = {}
    lineno = 1
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = [c.strip().lower() for c in (reader.fieldnames or [])]
            if "file" not in fields or "label" not in fields:
                raise UserError(f"{path}: labels CSV needs the columns 'file' and 'label' (found {fields})")
            reader.fieldnames = fields
            for lineno, row in enumerate(reader, start=2):
                name = (row.get("file") or "").strip()
                label = (row.get("label") or "").strip()
                if not name:
                    raise UserError(f"{path}:{lineno}: empty file name")
                if label == "":
                    raise UserError(f"{path}:{lineno}: empty label")
                key = normalise_key(name)
                if key in out and out[key] != label:
                    raise UserError(f"{path}:{lineno}: the file of line {first_line[key]} again, with label "
                                    f"{label!r} instead of {out[key]!r}")
                out[key] = label
                first_line.setdefault(key, lineno)
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path}:{lineno}: not a readable CSV text file ({type(e).__name__})") from None
    except OSError as e:
        raise UserError(f"{path}: labels CSV cannot be read ({e.strerror or type(e).__name__})") from None
    if root is not None:
        out = {normalise_key(os.path.relpath(os.path.join(root, k), root)): v for k, v in out.items()}
    return out


def check_labels_csv(path: str) -> None:
    """Fail with one line naming ``path`` when it is not a readable file, before any work starts."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{path}: labels CSV not found")
    if not p.is_file():
        raise UserError(f"{path}: labels CSV is not a file (a folder?); give the CSV file itself")
    if not os.access(p, os.R_OK):
        raise UserError(f"{path}: labels CSV is not readable (permission denied)")


def normalise_key(rel: str) -> str:
    return os.path.normpath(rel).replace(os.sep, "/")


def labels_for_input(labels_csv: str, base: str, present: set[str], rejects: list[Reject]) -> dict[str, str]:
    """The CSV's labels keyed by path relative to the input root ``base``.

    Keys in the CSV are relative to the CSV's own folder (so a CSV can sit anywhere); a key that names
    neither a file in ``present`` (paths relative to ``base``) nor a folder holding one becomes a reject,
    so a typo in the CSV is reported instead of silently leaving images unlabelled.
    """
    labels = read_labels_csv(labels_csv)
    csv_dir = os.path.dirname(os.path.abspath(labels_csv))
    rebased = {normalise_key(os.path.relpath(os.path.join(csv_dir, k), base)): v for k, v in labels.items()}
    present_n = {normalise_key(p) for p in present}
    present_dirs = set()
    for p in present_n:
        while "/" in p:
            p = p.rsplit("/", 1)[0]
            present_dirs.add(p)
    for k in sorted(rebased):
        if k not in present_n and k not in present_dirs:
            rejects.append(Reject(f"{os.path.basename(labels_csv)}: {k}",
                                  "listed in the labels CSV but no such file or folder under the input"))
    return rebased


def label_for(labels: dict[str, str], rel: str) -> str | None:
    """The label of input ``rel``: its own row, else the row of its nearest listed parent folder
    (a label per series or per patient folder)."""
    key = normalise_key(rel)
    while True:
        if key in labels:
            return labels[key]
        if "/" not in key:
            return None
        key = key.rsplit("/", 1)[0]
