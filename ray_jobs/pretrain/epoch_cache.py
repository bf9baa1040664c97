"""Keep a worker's epoch of slices in memory when it is small, so later epochs skip Ray Data.

Every ``iter_batches`` call over a Ray Train dataset shard starts a new streaming execution (list
files, read tasks, split coordinator): seconds of fixed cost per epoch. For the pools the papers use
that is noise, but for small ones (the demo, a brain-CT set of a few thousand slices) it dominates
the run. So the first *complete* epoch a worker streams is kept, if it fits under ``max_bytes``, and
later epochs are reshuffled from memory with the same number of batches. Large pools never fit and
keep streaming, which is what bounds memory there. A worker's rows then stay the same across
epochs (they are an equal, disjoint split either way); the local shuffle differs every epoch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

import numpy as np

log = logging.getLogger(__name__)


class EpochCache:
    def __init__(self, max_bytes: int, batch_size: int, seed: int):
        self.max_bytes = max_bytes
        self.batch_size = batch_size
        self.seed = seed
        self._data: np.ndarray | None = None
        self._too_big = max_bytes <= 0

    @property
    def ready(self) -> bool:
        return self._data is not None

    def epoch(self, epoch: int, stream: Callable[[], Iterable[np.ndarray]], full_epoch: bool,
              steps: int) -> Iterator[np.ndarray]:
        """Batches of (n, H, W) float32 HU for ``epoch``: from memory once cached, else from ``stream``.

        ``steps`` is the number of batches an epoch has: the training loop stops consuming after it,
        so the cache is completed when the ``steps``-th batch arrives, not when the stream ends.
        ``full_epoch`` is False when a run resumes mid-epoch: that partial epoch is not cached, since
        later epochs must have the full number of batches.
        """
        if self._data is not None:
            rng = np.random.default_rng((self.seed, epoch))
            order = rng.permutation(len(self._data))
            for i in range(0, len(order) - self.batch_size + 1, self.batch_size):
                yield self._data[np.sort(order[i:i + self.batch_size])]
            return
        kept: list[np.ndarray] = []
        size = 0
        caching = full_epoch and not self._too_big
        for batch in stream():
            if caching:
                size += batch.nbytes
                if size > self.max_bytes:
                    caching, kept = False, []
                    self._too_big = True
                    log.info("epoch cache: a worker's epoch exceeds %d MB; streaming every epoch",
                             self.max_bytes >> 20)
                else:
                    kept.append(batch)
                    if len(kept) == steps:
                        self._data = np.concatenate(kept)
                        caching, kept = False, []
                        log.info("epoch cache: %d slices (%.1f MB) kept in memory; later epochs skip the "
                                 "data pipeline", len(self._data), self._data.nbytes / 2**20)
            yield batch
