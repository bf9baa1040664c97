"""The kind of each reject, for prep's one-line count per kind.

Reject reasons are sentences written for the one input they name; a run over an archive has hundreds,
and a user first wants to know what kinds of trouble it met and how often ("12 duplicate, 3 pixel
data not decoded"). The kind is read off the reason's opening words, which every source writes
from a small fixed set (the table below); a reason no rule knows counts as "other", so a new reject
text is never dropped from the count, only left unnamed.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

#: (kind, pattern matched at the start of the reason), first match wins
KINDS: tuple[tuple[str, re.Pattern[str]], ...] = tuple((kind, re.compile(pattern)) for kind, pattern in (
    ("duplicate", r"duplicate of "),
    ("pixel data not decoded", r"(pixel data (of frame \d+ )?could not be decoded|frame \d+: )"),
    ("left out by the volume checks", r"series not written \(--volume-check skip\)"),
    ("not CT", r"modality "),
    ("no pixel data", r"DICOM object without pixel data"),
    ("not a DICOM file", r"not a DICOM file"),
    ("unreadable file", r"unreadable "),
    ("malformed header", r"malformed header"),
    ("unusable multi-frame object", r"multi-frame object"),
    ("size differs from its series", r"slice size \S+ differs"),
    ("not a scalar image or volume", r"(unexpected (pixel array|image) shape|\S+ colour voxels|complex voxels|"
                                     r"voxels of type |a \d+-D image of shape )"),
    ("NaN or infinite values", r"(image has NaN|\d+ of \d+ voxels are NaN)"),
    ("values out of range", r"values \S+ outside "),
))


def kind_of(reason: str) -> str:
    """The kind of one reject reason ("other" when no rule of :data:`KINDS` matches)."""
    for kind, pattern in KINDS:
        if pattern.match(reason):
            return kind
    return "other"


def counts(rejects: Iterable[dict[str, str]]) -> Counter[str]:
    """Rejects per kind (the manifest's reject records: ``{"input", "reason"}``)."""
    return Counter(kind_of(r.get("reason", "")) for r in rejects)


def summary_line(rejects: list[dict[str, str]]) -> str:
    """``rejects by kind: 3 duplicate, 1 pixel data not decoded`` (most frequent first); '' for none."""
    c = counts(rejects)
    if not c:
        return ""
    ranked = sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))
    return "rejects by kind: " + ", ".join(f"{n} {kind}" for kind, n in ranked)
