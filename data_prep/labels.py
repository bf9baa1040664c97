"""Labels CSVs: ``file,label`` rows that attach a class to each input file (or series folder)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from data_prep.errors import UserError


def read_labels_csv(path: str, *, root: str | None = None) -> dict[str, str]:
    """Map of input path (relative to ``root``, normalised, forward slashes) -> label.

    Accepts a header with columns ``file`` and ``label`` (extra columns ignored). A missing column,
    an empty file name or a file listed twice with different labels is an error naming the line.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: labels CSV not found")
    out: dict[str, str] = {}
    with p.open(newline="") as f:
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
                raise UserError(f"{path}:{lineno}: empty label for {name}")
            key = normalise_key(name)
            if key in out and out[key] != label:
                raise UserError(f"{path}:{lineno}: {name} listed twice with labels {out[key]!r} and {label!r}")
            out[key] = label
    if root is not None:
        out = {normalise_key(os.path.relpath(os.path.join(root, k), root)): v for k, v in out.items()}
    return out


def normalise_key(rel: str) -> str:
    return os.path.normpath(rel).replace(os.sep, "/")
