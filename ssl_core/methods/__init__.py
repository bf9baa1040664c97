"""Registry of pre-training methods: ``create_method("byol", backbone="resnet18", ...)``.

Each method lives in its own module, named like the method, and registers itself with
``@METHODS.register(name)``; adding a fifth method is one new file in this package: :data:`METHOD_NAMES`
is the package's modules (the shared ``base`` and ``common`` aside), and the study schema's method list
and defaults, the CLI's choices and help, and the benchmarks' method lists are read from it.

Importing this package does not import torch (the method modules and :mod:`~ssl_core.methods.base`
are imported on first use), so command-line code can read :data:`METHOD_NAMES` without that cost.
"""

from __future__ import annotations

import pkgutil
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ctssl_base.registry import Registry

if TYPE_CHECKING:
    from ssl_core.augment import MultiView
    from ssl_core.methods.base import OptimizerDefaults, SSLMethod, StepContext

#: modules of this package that hold code the methods share, not a method
SUPPORT_MODULES = frozenset({"base", "common"})


def discover(path: Iterable[str]) -> tuple[str, ...]:
    """The method modules in a package folder, sorted: every module but the shared ones and ``_private``
    ones. Listing files, not importing them, keeps this free of torch."""
    return tuple(sorted(m.name for m in pkgutil.iter_modules(list(path))
                        if not m.ispkg and m.name not in SUPPORT_MODULES and not m.name.startswith("_")))


#: the pre-training methods, one module each: the one list of them
METHOD_NAMES = discover(__path__)
METHODS: Registry[type[SSLMethod]] = Registry("method", modules=[f"{__name__}.{m}" for m in METHOD_NAMES])


def method_names() -> list[str]:
    return METHODS.names()


def get_method_class(name: str) -> type[SSLMethod]:
    return METHODS.get(name)


def create_method(name: str, **kwargs: Any) -> SSLMethod:
    """Build a method by registry name; ``kwargs`` are the method's constructor arguments
    (``backbone``, ``in_chans``, ``img_size`` and method-specific options)."""
    return get_method_class(name)(**kwargs)


def create_views(method: str, img_size: int, **kwargs: Any) -> MultiView:
    """The default view recipe of a method by registry name (its class's ``VIEWS``)."""
    return get_method_class(method).VIEWS(img_size, **kwargs)


def __getattr__(name: str) -> Any:
    # the base classes need torch: imported when first asked for, not with the package
    if name in ("OptimizerDefaults", "SSLMethod", "StepContext"):
        from ssl_core.methods import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["METHODS", "METHOD_NAMES", "SUPPORT_MODULES", "OptimizerDefaults", "SSLMethod", "StepContext",
           "create_method", "create_views", "discover", "get_method_class", "method_names"]
