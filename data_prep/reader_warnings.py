"""Warnings of the file readers (pydicom, nibabel, Pillow) while prep loads inputs: captured, never printed.

Why: the readers word their warnings with the path of the file they read ("Invalid value for VR UI:
... in /data/DOE^JOHN/1.dcm", "File is missing DICOM File Meta Information header" ...). Input
folders are often named by the patient (PatientName, PatientID), so a warning let through to stderr
- or forwarded from a Ray worker to the driver's stderr - shows an identifier that every reject line
redacts. Prep therefore records them while it reads (Python ``warnings`` and the readers' loggers),
replaces the input paths by ``<input>``, redacts the identifiers known for the run and reports them
as counts per kind, with the redacted texts, in the manifest and one summary line.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

#: the loggers of the readers prep calls; their records of level WARNING and above are captured
READER_LOGGERS = ("pydicom", "nibabel", "PIL")
#: stands for an input path in a captured text (the paths are the very place identifiers sit in)
PATH_MARK = "<input>"
#: distinct texts kept per run (counts per kind always cover every warning)
MAX_MESSAGES = 50


class _ListHandler(logging.Handler):
    def __init__(self, out: list[tuple[str, str]]):
        super().__init__(level=logging.WARNING)
        self._out = out

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed log call must not break a prep
            text = str(record.msg)
        self._out.append((f"{record.name.split('.')[0]} {record.levelname.lower()}", text))


def _package_of(filename: str) -> str:
    """The top-level package a warning was raised in (``.../site-packages/pydicom/x.py`` -> pydicom)."""
    parts = re.split(r"[\\/]", filename)
    for marker in ("site-packages", "dist-packages"):
        if marker in parts:
            i = parts.index(marker)
            if i + 1 < len(parts):
                return parts[i + 1].removesuffix(".py")
    return "python"


@contextmanager
def capture() -> Iterator[list[tuple[str, str]]]:
    """Collect ``(kind, text)`` of every Python warning and reader log record raised in the block.

    Nothing of it reaches stderr: the readers' loggers get only the capturing handler and do not
    propagate for the duration, and ``warnings`` are recorded (each occurrence, not once per place).
    Not thread-safe (``warnings.catch_warnings``): prep loads one chunk at a time per process.
    """
    out: list[tuple[str, str]] = []
    handler = _ListHandler(out)
    saved = []
    for name in READER_LOGGERS:
        lg = logging.getLogger(name)
        saved.append((lg, lg.handlers[:], lg.propagate))
        lg.handlers = [handler]
        lg.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                yield out
            finally:
                _add_warnings(out, [(_package_of(w.filename), w.category.__name__, str(w.message)) for w in caught])
    finally:
        for lg, handlers, propagate in saved:
            lg.handlers = handlers
            lg.propagate = propagate


def _add_warnings(out: list[tuple[str, str]], caught: list[tuple[str, str, str]]) -> None:
    """Append the recorded ``warnings`` (package, category, text) to ``out``; a reader that both logs
    and warns the same text (pydicom's ``warn_and_log``) counts once: its log record is dropped."""
    unpaired: dict[tuple[str, str], int] = {}
    for pkg, _, text in caught:
        unpaired[(pkg, text)] = unpaired.get((pkg, text), 0) + 1
    kept = []
    for kind, text in out:
        key = (kind.split(" ")[0], text)
        if unpaired.get(key, 0) > 0:
            unpaired[key] -= 1
            continue
        kept.append((kind, text))
    out[:] = kept + [(f"{pkg} {category}", text) for pkg, category, text in caught]


def scrub_paths(text: str, paths: Iterable[str], roots: Iterable[str] = ()) -> str:
    """``text`` with each of ``paths`` (as given and absolute) and anything under ``roots`` replaced by
    :data:`PATH_MARK`. Exact paths go first (longest first) so that a path with spaces goes whole."""
    forms = {f for p in paths for f in (p, os.path.abspath(p)) if f}
    for f in sorted(forms, key=len, reverse=True):
        if f in text:
            text = text.replace(f, PATH_MARK)
    for r in sorted({os.path.abspath(r) for r in roots if r} - {os.sep}, key=len, reverse=True):
        text = re.sub(re.escape(r) + r"[^\s'\"]*", PATH_MARK, text)
    return text


def summarize(items: Iterable[tuple[str, str]], clean: Callable[[str], str]) -> list[dict[str, Any]]:
    """Distinct ``{kind, message, count}`` of the captured items, each text passed through ``clean``
    (path scrubbing and redaction) and flattened to one line; most frequent first."""
    counts: dict[tuple[str, str], int] = {}
    for kind, text in items:
        key = (kind, clean(" ".join(str(text).split()))[:300])
        counts[key] = counts.get(key, 0) + 1
    return [{"kind": k, "message": m, "count": n}
            for (k, m), n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def merge(entries: Iterable[dict[str, Any]], clean: Callable[[str], str]) -> dict[str, Any]:
    """The manifest's ``reader_warnings``: total, counts per kind and the distinct (re-cleaned) texts."""
    counts: dict[tuple[str, str], int] = {}
    for e in entries:
        key = (str(e["kind"]), clean(str(e["message"])))
        counts[key] = counts.get(key, 0) + int(e["count"])
    by_kind: dict[str, int] = {}
    for (k, _), n in counts.items():
        by_kind[k] = by_kind.get(k, 0) + n
    messages = [{"kind": k, "message": m, "count": n}
                for (k, m), n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    return {"total": sum(by_kind.values()), "counts": dict(sorted(by_kind.items())),
            "messages": messages[:MAX_MESSAGES]}


def summary_line(info: dict[str, Any], dst: str) -> str | None:
    """One line for the prep summary, or None when the readers raised no warning."""
    if not info or not info.get("total"):
        return None
    kinds = ", ".join(f"{k}: {n}" for k, n in info["counts"].items())
    return (f"  {info['total']} warning(s) from the file readers while loading ({kinds}); "
            f"their texts, paths and identifiers redacted, are in {dst}/_manifest.json (reader_warnings)")
