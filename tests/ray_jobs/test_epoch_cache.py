"""The per-worker epoch cache: later epochs come from memory with the same batch count, reshuffled."""

from __future__ import annotations

import numpy as np

from ray_jobs.pretrain.epoch_cache import EpochCache


def _stream(calls: list[int], n_batches: int = 5, bs: int = 4):
    def make():
        calls.append(1)
        for b in range(n_batches):
            yield np.full((bs, 2, 2), b, np.float32) + np.arange(bs, dtype=np.float32)[:, None, None] / 10
    return make


def _take(it, k):
    return [next(it) for _ in range(k)]


def test_second_epoch_is_served_from_memory_with_same_rows_in_a_new_order():
    calls: list[int] = []
    cache = EpochCache(max_bytes=1 << 20, batch_size=4, seed=0)
    first = _take(cache.epoch(0, _stream(calls), full_epoch=True, steps=3), 3)  # loop stops after 3 steps
    second = _take(cache.epoch(1, _stream(calls), full_epoch=True, steps=3), 3)
    third = list(cache.epoch(2, _stream(calls), full_epoch=True, steps=3))
    assert len(calls) == 1, "the data pipeline must run once"
    assert len(third) == 3 and all(b.shape == (4, 2, 2) for b in third)
    rows = lambda bs: sorted(float(x) for b in bs for x in b[:, 0, 0])  # noqa: E731
    assert rows(first) == rows(second) == rows(third)
    assert [b[:, 0, 0].tolist() for b in second] != [b[:, 0, 0].tolist() for b in third]


def test_too_large_or_partial_epochs_keep_streaming():
    calls: list[int] = []
    small = EpochCache(max_bytes=100, batch_size=4, seed=0)  # 3 batches of 64 bytes do not fit
    for e in range(3):
        _take(small.epoch(e, _stream(calls), full_epoch=True, steps=3), 3)
    assert len(calls) == 3 and not small.ready
    calls.clear()
    resumed = EpochCache(max_bytes=1 << 20, batch_size=4, seed=0)
    _take(resumed.epoch(0, _stream(calls), full_epoch=False, steps=3), 2)  # resumed mid-epoch: not cached
    assert not resumed.ready
    _take(resumed.epoch(1, _stream(calls), full_epoch=True, steps=3), 3)
    assert resumed.ready and len(calls) == 2
