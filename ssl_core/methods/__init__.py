"""Registry of pre-training methods: ``create_method("byol", backbone="resnet18", ...)``.

Each method lives in its own module and registers itself with :func:`register`; adding a fifth
method is one new file listed in ``_METHOD_MODULES``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from ssl_core.methods.base import OptimizerDefaults, SSLMethod, StepContext

_REGISTRY: dict[str, type[SSLMethod]] = {}
_METHOD_MODULES = ("byol", "mocov2", "swav", "spark")


def register(name: str) -> Callable[[type[SSLMethod]], type[SSLMethod]]:
    def deco(cls: type[SSLMethod]) -> type[SSLMethod]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _load_all() -> None:
    for m in _METHOD_MODULES:
        try:
            importlib.import_module(f"{__name__}.{m}")
        except ModuleNotFoundError as e:  # a method module not written yet must not break the rest
            if e.name != f"{__name__}.{m}":
                raise


def method_names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get_method_class(name: str) -> type[SSLMethod]:
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def create_method(name: str, **kwargs: Any) -> SSLMethod:
    """Build a method by registry name; ``kwargs`` are the method's constructor arguments
    (``backbone``, ``in_chans``, ``img_size`` and method-specific options)."""
    return get_method_class(name)(**kwargs)


__all__ = ["OptimizerDefaults", "SSLMethod", "StepContext", "create_method", "get_method_class",
           "method_names", "register"]
