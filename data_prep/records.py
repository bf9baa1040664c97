"""The small value types that flow between sources, the prep pipeline and the shard writer.

Sources yield :class:`SeriesTask` objects cheaply (file lists only, no pixels) so that discovery of a
large tree is fast and the tasks can be shipped to Ray workers; loading a task gives a
:class:`SeriesData` with the slices of exactly one series (bounded memory: one series at a time).
Identifiers here are the *raw* values from the input; :mod:`data_prep.deid` turns them into keyed
pseudonyms before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Reject:
    """One input that was not written, with the reason a person can act on."""

    input: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"input": self.input, "reason": self.reason}


@dataclass
class SeriesTask:
    """A unit of prep work: one series (volume) of one patient, not yet read.

    ``key`` is stable across runs (it names the inputs, not their content order) so that a rerun can
    tell which series are already committed.
    """

    source: str  # registry name of the source, e.g. "dicom"
    key: str  # stable, unique within the run; raw (may contain PHI) -> never written as such
    inputs: list[str]  # files belonging to this task
    options: dict = field(default_factory=dict)


@dataclass
class SliceData:
    """One 2-D slice in Hounsfield units (int16, already at the prep resolution)."""

    hu: np.ndarray  # (H, W) int16
    slice_index: int  # position along the slice normal after sorting, 0-based
    z_mm: float  # position along the slice normal (mm); NaN when unknown
    spacing_mm: tuple[float, float]  # (row, col) pixel spacing in mm after resampling
    label: str | None = None
    input: str = ""  # the file (or file#frame) the slice came from, for error messages
    #: geometry of the slice as stored (DICOM sources), for the per-series volume checks; None where a
    #: source has no such notion (2-D images) or the header lacks it
    position_mm: tuple[float, float, float] | None = None  # ImagePositionPatient
    orientation: tuple[float, ...] | None = None  # ImageOrientationPatient (6 direction cosines)
    native_size: tuple[int, int] | None = None  # (rows, cols) before resizing


@dataclass
class SeriesData:
    """A loaded series: raw identifiers + the slices + the rejects found while loading."""

    source: str
    dataset: str  # value of the ``source`` column (dataset name, e.g. "lidc", "phantom")
    patient: str  # raw patient identifier (pseudonymised before writing)
    study: str
    series: str
    slices: list[SliceData] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    #: identifying values seen while loading (header values, a labels CSV's patient column; never
    #: written): every reject path and reason of the run is redacted with those of every series
    phi: list[str] = field(default_factory=list)
    split: str | None = None  # official split of the input set (MedMNIST train/val/test), when it has one
