"""Deterministic crash injection for the crash-and-resume tests.

``CTSSL_FAILPOINT=name:N`` makes the process SIGKILL itself the N-th time it passes ``hit(name)``:
the same abrupt death as ``kill -9`` or an OOM kill, but at a chosen point (e.g. after a shard's
bytes are written and before its commit record), so the resume logic is tested where it matters.
Unset, ``hit`` costs one dict lookup.
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def hit(name: str) -> None:
    spec = os.environ.get("CTSSL_FAILPOINT")
    if not spec:
        return
    target, _, n = spec.partition(":")
    if target != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] >= int(n or 1):
        os.kill(os.getpid(), signal.SIGKILL)
