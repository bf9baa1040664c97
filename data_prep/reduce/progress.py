"""A tqdm bar (rate and ETA) for long work, silent when disabled or when nothing is to be done."""

from __future__ import annotations

import sys
from contextlib import contextmanager

from tqdm import tqdm


class _Null:
    def update(self, n: int = 1) -> None:
        pass


@contextmanager
def progress_bar(total: int, desc: str, enabled: bool, unit: str = "it"):
    if not enabled or total <= 0:
        yield _Null()
        return
    bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, file=sys.stderr, mininterval=1.0,
               smoothing=0.1, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()
