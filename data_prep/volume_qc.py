"""Per-series volume checks: is a "series" one regular stack of parallel slices?

A DICOM series is a set of images that share a SeriesInstanceUID, not necessarily a volume. Several
kinds of series are written by prep like any other, yet are not what a model of CT volumes expects,
and the converters radiology teams use (dcm2niix, ITK/SimpleITK, 3D Slicer) refuse or flag each:

- **not a volume**: several slices at one position (a series of repeated images, a dose report or
  localizer set, two reconstructions sharing a UID);
- **missing slices**: steps between neighbouring slices wider than the series' typical step (a file
  lost in transfer, a truncated export);
- **gantry tilt**: slices that stack along a direction that is not the slice normal (a tilted
  gantry: the volume is a sheared stack, not an upright grid);
- **mixed orientation** / **mixed native size**: slices of another orientation or matrix size than
  the rest (a localizer or a reformat mixed into the series).

:func:`check_volume` is pure: it reads only the geometry the source recorded on each slice (stored
position, orientation, native size, position along the normal) and returns flags with reasons that
give millimetres and slice indices, never a file name or header value. Slices without any position
(image folders, MedMNIST) and series of one slice are never flagged; NIfTI volumes have one affine
for all slices, so their geometry is regular by construction.

The tolerances follow what converters accept: dcm2niix treats steps that agree within 0.2 mm as
equal and reports a gantry tilt once 1 - cos(angle) exceeds 1e-4 (about 0.8 degrees); positions
closer than 0.01 mm along the normal are the same position (header values carry a few decimals).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from data_prep.records import SliceData

#: positions closer than this along the slice normal are one position (mm)
SAME_POSITION_MM = 0.01
#: a step is a gap when it exceeds the typical step by more than this (mm) ...
GAP_TOLERANCE_MM = 0.2
#: ... or by more than this fraction of the typical step, when that is smaller (sub-millimetre series)
GAP_TOLERANCE_FRACTION = 0.5
#: stacking direction vs slice normal: flagged beyond this angle (degrees; 1 - cos = 1e-4)
TILT_TOLERANCE_DEG = math.degrees(math.acos(1 - 1e-4))
#: row or column directions of two slices that differ by more than this are another orientation (degrees)
ORIENTATION_TOLERANCE_DEG = 0.1

#: flag -> the words the summary and the report use for it, in the order they are listed
LABELS = {
    "not_a_volume": "not a volume",
    "missing_slices": "missing slices",
    "gantry_tilt": "gantry tilt",
    "mixed_orientation": "mixed orientation",
    "mixed_size": "mixed native size",
}
FLAGS = tuple(LABELS)

#: what prep does with a flagged series: write it and list the flag, leave it out (rejects), or stop
POLICIES = ("warn", "skip", "strict")
DEFAULT_POLICY = "warn"

#: gaps named one by one in a reason before the rest are only counted
_GAPS_SHOWN = 5


@dataclass(frozen=True)
class VolumeFlag:
    """One problem of a series' geometry, with a reason a person can check against the images."""

    flag: str  # one of FLAGS
    reason: str

    @property
    def label(self) -> str:
        return LABELS[self.flag]

    def as_dict(self) -> dict[str, str]:
        return {"flag": self.flag, "reason": self.reason}


def check_volume(slices: Sequence[SliceData]) -> list[VolumeFlag]:
    """The flags of one series' slices (empty when it is a regular volume or has no 3-D geometry).

    The slices may come in any order (they are sorted by position along the normal here); slice
    indices in the reasons are the slices' own ``slice_index``.
    """
    if len(slices) < 2:
        return []
    flags: list[VolumeFlag] = []
    size_flag = _mixed_size(slices)
    if size_flag:
        flags.append(size_flag)
    orient_flag, normal = _orientation(slices)
    if orient_flag:
        # one normal does not describe the series: its positions along "the" normal mean nothing
        return _ordered([orient_flag, *flags])
    z = _positions_along_normal(slices, normal)
    if z is None:
        return flags
    order = np.argsort(z, kind="stable")
    zs = z[order]
    # groups of slices at one position: a new group starts where the step exceeds SAME_POSITION_MM
    starts = np.concatenate([[0], np.flatnonzero(np.diff(zs) > SAME_POSITION_MM) + 1])
    if len(starts) < len(zs):
        flags.append(_not_a_volume(slices, order, zs, starts))
    if len(starts) < 2:
        return _ordered(flags)
    reps = order[starts]  # one slice per position, in position order
    gap_flag = _gaps(slices, reps, zs[starts])
    if gap_flag:
        flags.append(gap_flag)
    if normal is not None:
        tilt_flag = _tilt(slices, reps, normal)
        if tilt_flag:
            flags.append(tilt_flag)
    return _ordered(flags)


# ------------------------------------------------------------------------------------------ helpers
def _n(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def _ordered(flags: list[VolumeFlag]) -> list[VolumeFlag]:
    return sorted(flags, key=lambda f: FLAGS.index(f.flag))


def _mixed_size(slices: Sequence[SliceData]) -> VolumeFlag | None:
    sizes = Counter(s.native_size for s in slices if s.native_size is not None)
    if len(sizes) < 2:
        return None
    parts = ", ".join(f"{r}x{c} ({_n(n, 'slice')})" for (r, c), n in sizes.most_common())
    return VolumeFlag("mixed_size", f"slices of {len(sizes)} native sizes: {parts}")


def _unit(v: np.ndarray) -> np.ndarray | None:
    n = float(np.linalg.norm(v))
    return v / n if n > 1e-6 else None


def _angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    return math.degrees(math.acos(min(1.0, max(-1.0, float(np.dot(a, b))))))


def _orientation(slices: Sequence[SliceData]) -> tuple[VolumeFlag | None, np.ndarray | None]:
    """(a mixed-orientation flag or None, the slice normal of the series or None when unknown).

    The reference is the orientation most slices have; slices with no orientation are not compared."""
    known = [(i, np.asarray(s.orientation, float)) for i, s in enumerate(slices)
             if s.orientation is not None and len(s.orientation) == 6]
    if not known:
        return None, None
    common = Counter(tuple(np.round(o, 3)) for _, o in known).most_common(1)[0][0]
    ref = np.asarray(common, float)
    row, col = _unit(ref[:3]), _unit(ref[3:])
    if row is None or col is None:
        return None, None
    worst, odd = 0.0, 0
    for _, o in known:
        r, c = _unit(o[:3]), _unit(o[3:])
        if r is None or c is None:
            odd += 1
            worst = max(worst, 90.0)
            continue
        a = max(_angle_deg(r, row), _angle_deg(c, col))
        if a > ORIENTATION_TOLERANCE_DEG:
            odd += 1
            worst = max(worst, a)
    normal = _unit(np.cross(row, col))
    if odd:
        return VolumeFlag("mixed_orientation",
                          f"{odd} of {len(slices)} slices have another orientation than the rest "
                          f"(row or column direction up to {worst:.1f} degrees apart; tolerance "
                          f"{ORIENTATION_TOLERANCE_DEG:g} degrees)"), normal
    return None, normal


def _positions_along_normal(slices: Sequence[SliceData], normal: np.ndarray | None) -> np.ndarray | None:
    """Each slice's position along the normal (mm): from the stored position when every slice has one
    and the normal is known, else the source's ``z_mm`` when every slice has one; None otherwise."""
    if normal is not None and all(s.position_mm is not None and len(s.position_mm) == 3 for s in slices):
        z = np.asarray([s.position_mm for s in slices], float) @ normal
        if np.all(np.isfinite(z)):
            return z
    z = np.asarray([s.z_mm for s in slices], float)
    return z if np.all(np.isfinite(z)) else None


def _not_a_volume(slices: Sequence[SliceData], order: np.ndarray, zs: np.ndarray,
                  starts: np.ndarray) -> VolumeFlag:
    n = len(zs)
    if len(starts) == 1:
        return VolumeFlag("not_a_volume", f"all {n} slices at one position (z {zs[0]:.2f} mm)")
    ends = np.concatenate([starts[1:], [n]])
    shared = [(a, b) for a, b in zip(starts, ends, strict=True) if b - a > 1]
    a, b = shared[0]
    first = sorted(int(slices[i].slice_index) for i in order[a:b])
    verb = "holds" if len(shared) == 1 else "hold"
    return VolumeFlag("not_a_volume",
                      f"{n} slices at only {len(starts)} positions: {_n(len(shared), 'position')} {verb} more "
                      f"than one slice (the first at z {zs[a]:.2f} mm: slices {', '.join(map(str, first))})")


def _gaps(slices: Sequence[SliceData], reps: np.ndarray, uz: np.ndarray) -> VolumeFlag | None:
    steps = np.diff(uz)
    if len(steps) < 2:  # one step has nothing to be compared with
        return None
    typical = float(np.median(steps))
    tol = min(GAP_TOLERANCE_MM, GAP_TOLERANCE_FRACTION * typical)
    wide = np.flatnonzero(steps > typical + tol)
    if not len(wide):
        return None
    missing = sum(max(1, round(float(steps[i]) / typical) - 1) for i in wide)
    where = [f"{steps[i]:.2f} mm between slices {slices[reps[i]].slice_index} and {slices[reps[i + 1]].slice_index} "
             f"(z {uz[i]:.2f} to {uz[i + 1]:.2f} mm)" for i in wide[:_GAPS_SHOWN]]
    more = f"; and {len(wide) - _GAPS_SHOWN} more" if len(wide) > _GAPS_SHOWN else ""
    return VolumeFlag("missing_slices",
                      f"{_n(len(wide), 'step')} wider than the typical {typical:.2f} mm (tolerance {tol:.2f} mm), "
                      f"about {_n(missing, 'slice')} missing: {'; '.join(where)}{more}")


def _tilt(slices: Sequence[SliceData], reps: np.ndarray, normal: np.ndarray) -> VolumeFlag | None:
    """The angle between the slice normal and the stacking direction: the sum of the steps between
    consecutive positions (first to last), which rounding of single positions hardly moves."""
    first, last = slices[reps[0]].position_mm, slices[reps[-1]].position_mm
    v = _unit(np.asarray(last, float) - np.asarray(first, float))
    if v is None:
        return None
    angle = _angle_deg(v, normal)
    angle = min(angle, 180.0 - angle)  # slices stacked against the normal are as upright
    if angle <= TILT_TOLERANCE_DEG:
        return None
    return VolumeFlag("gantry_tilt",
                      f"slices stack {angle:.1f} degrees off the slice normal (tolerance {TILT_TOLERANCE_DEG:.1f} "
                      "degrees)")


# ------------------------------------------------------------------------------------------ policy
def check_policy(policy: str) -> str:
    """``policy`` when it is one of :data:`POLICIES`; else a :class:`UserError` naming the choices."""
    from ctssl_base.errors import UserError

    if policy not in POLICIES:
        raise UserError(f"--volume-check {policy!r}: choose one of {', '.join(POLICIES)}")
    return policy


def strict_message(series_id: str, flags: Sequence[dict[str, str]]) -> str:
    """The one line ``--volume-check strict`` stops with: the series' pseudonym and its first flag."""
    f = flags[0]
    more = f" (and {_n(len(flags) - 1, 'more flag')})" if len(flags) > 1 else ""
    return (f"series {series_id}: {LABELS.get(f['flag'], f['flag'])}: {f['reason']}{more}; "
            "--volume-check strict stops at a flagged series (warn writes it and lists the flag, skip leaves it out)")


def skip_reason(flags: Sequence[VolumeFlag]) -> str:
    """The reject reason of each slice of a series that ``--volume-check skip`` leaves out."""
    return "series not written (--volume-check skip): " + "; ".join(f"{f.label}: {f.reason}" for f in flags)


def counts(series: Sequence[dict]) -> dict[str, int]:
    """Flagged series per flag (a series with two flags counts in both), every flag present."""
    c = Counter(f["flag"] for s in series for f in s.get("flags", []))
    return {k: c.get(k, 0) for k in FLAGS}


def summary_lines(qc: dict) -> list[str]:
    """prep's summary of the volume checks: a count per class, then one line per class with an example
    (empty when nothing was flagged)."""
    series = qc.get("series", [])
    if not series:
        return []
    n = qc.get("counts") or counts(series)
    classes = [k for k in FLAGS if n.get(k)]
    policy = qc.get("policy", DEFAULT_POLICY)
    done = {"warn": "written", "skip": "not written, listed as rejects", "strict": "stopped"}.get(policy, policy)
    out = [f"{len(series)} series flagged by the volume checks (--volume-check {policy}: {done}): "
           + ", ".join(f"{n[k]} {LABELS[k]}" for k in classes)]
    for k in classes:
        ex = next(s for s in series if any(f["flag"] == k for f in s["flags"]))
        reason = next(f["reason"] for f in ex["flags"] if f["flag"] == k)
        out.append(f"  {LABELS[k]}: {n[k]} series, e.g. {ex['series_id']}: {reason}")
    return out
