"""Loading the numba kernels lazily, and falling back to numpy when numba is missing.

Importing a kernel module loads numba and the kernel's cached machine code (~0.5-1 s), which a
process that never prepares data should not pay; a missing numba must not break prep either.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any


@functools.cache
def optional_kernel(module: str, name: str) -> Callable[..., Any] | None:
    """``module.name`` imported on first use, or None when the module cannot be imported."""
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError:
        return None
