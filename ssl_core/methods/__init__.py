"""Registry of pre-training methods: ``create_method("byol", backbone="resnet18", ...)``.

Each method lives in its own module, named like the method, and registers itself with
``@METHODS.register(name)``; adding a fifth method is one new file listed in :data:`METHOD_NAMES`.

Importing this package does not import torch (the method modules and :mod:`~ssl_core.methods.base`
are imported on first use), so command-line code can read :data:`METHOD_NAMES` without that cost.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ctssl_base.registry import Registry

if TYPE_CHECKING:
    from ssl_core.methods.base import OptimizerDefaults, SSLMethod, StepContext

#: the pre-training methods, one module each: the one list of them
METHOD_NAMES = ("byol", "mocov2", "swav", "spark")
METHODS: Registry[type[SSLMethod]] = Registry("method", modules=[f"{__name__}.{m}" for m in METHOD_NAMES])


def method_names() -> list[str]:
    return METHODS.names()


def get_method_class(name: str) -> type[SSLMethod]:
    return METHODS.get(name)


def create_method(name: str, **kwargs: Any) -> SSLMethod:
    """Build a method by registry name; ``kwargs`` are the method's constructor arguments
    (``backbone``, ``in_chans``, ``img_size`` and method-specific options)."""
    return get_method_class(name)(**kwargs)


def __getattr__(name: str) -> Any:
    # the base classes need torch: imported when first asked for, not with the package
    if name in ("OptimizerDefaults", "SSLMethod", "StepContext"):
        from ssl_core.methods import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["METHODS", "METHOD_NAMES", "OptimizerDefaults", "SSLMethod", "StepContext", "create_method",
           "get_method_class", "method_names"]
