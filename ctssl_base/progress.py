"""Progress for long work: a tqdm bar on a terminal, a periodic log line (rate, ETA) elsewhere.

Kubernetes and Ray job logs are not terminals; a bar there prints carriage returns into the log, so
the same object switches to one line every few seconds.
"""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType

from tqdm import tqdm

log = logging.getLogger("ctssl.progress")


def _fmt_eta(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


def format_rate(per_second: float, unit: str) -> str:
    """Slow work (fine-tuning trials) reads better per minute than as "0.0 trials/s"."""
    if 0 < per_second < 0.1:
        return f"{per_second * 60:.1f} {unit}/min"
    return f"{per_second:.1f} {unit}/s"


class Progress:
    def __init__(self, total: int, unit: str, desc: str, enabled: bool = True, every_s: float = 10.0):
        self.total, self.unit, self.desc = total, unit, desc
        self.n = 0
        self.enabled = enabled
        self.every_s = every_s
        self._t0 = time.perf_counter()
        self._last = self._t0
        self._bar = None
        if enabled and sys.stderr.isatty():
            self._bar = tqdm(total=total, unit=unit, desc=desc, dynamic_ncols=True, smoothing=0.1)

    def update(self, n: int) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.perf_counter()
        if self.enabled and (now - self._last >= self.every_s or self.n >= self.total):
            self._last = now
            log.info("%s", self.line())

    def line(self) -> str:
        el = time.perf_counter() - self._t0
        rate = self.n / el if el > 0 else 0.0
        eta = (self.total - self.n) / rate if rate > 0 else float("inf")
        pct = 100.0 * self.n / self.total if self.total else 100.0
        return (f"{self.desc}: {self.n}/{self.total} {self.unit} ({pct:.0f}%) "
                f"{format_rate(rate, self.unit)}, elapsed {_fmt_eta(el)}, ETA {_fmt_eta(eta)}")

    def set_description(self, desc: str) -> None:
        self.desc = desc
        if self._bar is not None:
            self._bar.set_description(desc, refresh=False)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self.n < self.total and et is None:
            log.info("%s", self.line())
