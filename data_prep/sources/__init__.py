"""Input sources: each turns some on-disk layout into :class:`~data_prep.records.SeriesTask` s and
loads one task into HU slices.

A registry (not an if-chain) maps names to source classes so that ``ctssl prep --source NAME`` and
auto-detection both work, and a new layout is one new module with ``@register_source``.
"""

from __future__ import annotations

import importlib

from data_prep.sources.base import Source, get_source, register_source, source_names

# Modules that register sources when imported. Listed here so the registry is complete on import.
_SOURCE_MODULES = ("dicom", "nifti", "medmnist", "imagefolder")
for _m in _SOURCE_MODULES:
    try:
        importlib.import_module(f"{__name__}.{_m}")
    except ModuleNotFoundError as e:  # a source module not written yet must not break the others
        if e.name != f"{__name__}.{_m}":
            raise

__all__ = ["Source", "get_source", "register_source", "source_names"]
