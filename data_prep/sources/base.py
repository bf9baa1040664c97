"""The source interface and its registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from ctssl_base.errors import UserError
from ctssl_base.registry import Registry
from data_prep.records import Reject, SeriesData, SeriesTask


@dataclass
class PrepOptions:
    """Options every source honours when loading slices."""

    size: int | None = 256  # output in-plane size (square, aspect kept by padding); None = native
    dataset: str = ""  # value for the ``source`` column; default: the source's name
    labels_csv: str | None = None  # optional per-file / per-series labels
    pad_hu: int = -1024  # value used for padding to square (air)


class Source(ABC):
    """A layout of CT data on disk."""

    name: str = ""  # set by ``@SOURCES.register(name)``
    #: inputs seen by the last discover() that are not images (CSV, JSON...): listed, not rejected
    ignored: list[str]

    def __init__(self) -> None:
        self.ignored = []

    @classmethod
    def detect(cls, root: str) -> bool:
        """Whether ``root`` looks like this source's layout (used when --source is not given)."""
        return False

    @abstractmethod
    def discover(self, root: str, opts: PrepOptions) -> tuple[list[SeriesTask], list[Reject]]:
        """List the series under ``root`` without decoding pixels; inputs that cannot belong to any
        series (unreadable, not CT...) are returned as rejects so that nothing is silently lost."""

    @abstractmethod
    def load(self, task: SeriesTask, opts: PrepOptions) -> SeriesData:
        """Decode one series into HU slices at the prep resolution. Bad slices become rejects in
        the returned object; only a failure of the whole series raises :class:`UserError`."""

    def load_many(self, task: SeriesTask, opts: PrepOptions) -> list[SeriesData]:
        """All series in a task. Sources whose unit of discovery can hold several series (a DICOM
        folder) override this; the default is the one series of :meth:`load`."""
        return [self.load(task, opts)]

    def count_slices(self, task: SeriesTask) -> int:
        """Expected number of slices (for the progress bar); files by default."""
        return len(task.inputs)


#: the sources by name; their modules register them when imported (``data_prep.sources`` imports all)
SOURCES: Registry[type[Source]] = Registry(
    "source", error=UserError,
    modules=[f"data_prep.sources.{m}" for m in ("dicom", "nifti", "medmnist", "imagefolder")])


def source_names() -> list[str]:
    return SOURCES.names()


def get_source(name: str) -> Source:
    return SOURCES.get(name)()


def detect_source(root: str) -> Source:
    """The first registered source (in name order) whose layout matches ``root``."""
    for name in source_names():
        if SOURCES.get(name).detect(root):
            return SOURCES.get(name)()
    raise UserError(
        f"{root}: could not tell the layout (DICOM tree, NIfTI files, MedMNIST .npz, image folder + "
        f"labels CSV); pass --source {{{','.join(source_names())}}}"
    )

