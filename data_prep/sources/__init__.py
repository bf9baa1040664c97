"""Input sources: each turns some on-disk layout into :class:`~data_prep.records.SeriesTask` s and
loads one task into HU slices.

A registry (not an if-chain) maps names to source classes so that ``ctssl prep --source NAME`` and
auto-detection both work, and a new layout is one new module with ``@SOURCES.register("name")``
(listed in :data:`~data_prep.sources.base.SOURCES`' modules).
"""

from __future__ import annotations

from data_prep.sources.base import SOURCES, Source, get_source, source_names

SOURCES.load()  # register every source on import, so the registry is complete

__all__ = ["SOURCES", "Source", "get_source", "source_names"]
