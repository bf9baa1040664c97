"""Name -> plug-in registries: source readers, reduction strategies, pre-training methods.

One helper for all three so that they register, look up and list names the same way::

    SOURCES = Registry("source", error=UserError, modules=["data_prep.sources.dicom", ...])

    @SOURCES.register("dicom")
    class DicomSource(Source): ...

    SOURCES.get("dicom")  # the class; an unknown name raises ``error`` naming the known ones

``modules`` are imported on the first lookup, or when :meth:`Registry.load` is called (each registers
its plug-ins when imported): importing the registry stays cheap, and a plug-in module that is not
written yet does not break the others. :meth:`Registry.names` is sorted; iterating, ``values()`` and
``items()`` follow the order of registration (the order of ``modules``).

It imports nothing from the project: ``data_prep`` (sources, reduction strategies) and ``ssl_core``
(methods) both use it, and neither depends on the other.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Plug-ins of one ``kind`` by name. :meth:`register` sets the plug-in's ``name`` attribute."""

    def __init__(self, kind: str, *, error: type[Exception] = ValueError, modules: Iterable[str] = ()):
        self.kind = kind
        self._error = error
        self._modules = tuple(modules)
        self._loaded = False
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator: ``@REGISTRY.register("name")``. A name can be taken only once."""

        def deco(obj: T) -> T:
            old = self._items.get(name)
            if old is not None and old is not obj:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            obj.name = name  # type: ignore[attr-defined]
            self._items[name] = obj
            return obj

        return deco

    def load(self) -> None:
        """Import the plug-in modules (once)."""
        if self._loaded:
            return
        for module in self._modules:
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as e:  # a plug-in module not written yet must not break the rest
                if e.name != module:
                    raise
        self._loaded = True

    def get(self, name: str) -> T:
        """The plug-in registered as ``name``; an unknown name raises the registry's error class with
        the known names."""
        self.load()
        try:
            return self._items[name]
        except KeyError:
            raise self._error(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        self.load()
        return sorted(self._items)

    def __iter__(self) -> Iterator[str]:
        self.load()
        return iter(list(self._items))

    def __len__(self) -> int:
        self.load()
        return len(self._items)

    def __contains__(self, name: object) -> bool:
        self.load()
        return name in self._items

    def values(self) -> list[T]:
        self.load()
        return list(self._items.values())

    def items(self) -> list[tuple[str, T]]:
        self.load()
        return list(self._items.items())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
