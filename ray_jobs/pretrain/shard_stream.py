"""The pre-training input without Ray Data: committed shards read with pyarrow in this process.

A run with one worker on the local machine trains in the driver process (see
:func:`ray_jobs.pretrain.sizing.runs_in_process`); there is no Ray Data there, so this object stands
in for ``ray.train.get_dataset_shard("train")``. It offers the one call the training loop makes,
``iter_batches``, with the same rows (the committed ones, filtered to a selection's slice ids) and
the same batch contents (the pixel columns), so the loop's code is the same for both.

Each ``iter_batches`` call is one epoch: the shards in a new random order, the next one read by a
background thread while the current one is consumed (pyarrow's decompression releases the GIL), and
the rows shuffled within a window of at least one shard and ``local_shuffle_buffer_size`` rows.
Memory holds that window and one shard ahead, never the dataset (the epoch cache decides separately
whether a small pool is kept).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa

from data_prep import shards
from ray_jobs.pretrain.data import PIXEL_COLUMNS, DataInfo, KeepSelected


class ShardStream:
    def __init__(self, info: DataInfo, seed: int = 0):
        resolved = shards.resolve(info.read_url)
        self.base_url = resolved.base_url
        self.files = [s for s in resolved.files if int(s["rows"]) > 0]
        self.keep_ids = resolved.keep_ids
        self._keep = KeepSelected(resolved.keep_ids) if resolved.keep_ids is not None else None
        self.seed = seed
        self.epochs_started = 0

    def _read(self, shard: dict[str, Any]) -> pa.Table:
        cols = PIXEL_COLUMNS + (["slice_id"] if self.keep_ids is not None else [])
        t = shards.read_shard(self.base_url, shard, cols)
        return t if self._keep is None else self._keep(t)

    def _tables(self, order: np.ndarray) -> Iterator[pa.Table]:
        """The shards in ``order``, each read while the one before it is being consumed."""
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-read") as pool:
            ahead = pool.submit(self._read, self.files[order[0]]) if len(order) else None
            for i in range(len(order)):
                table = ahead.result()
                ahead = pool.submit(self._read, self.files[order[i + 1]]) if i + 1 < len(order) else None
                yield table

    def iter_batches(self, *, batch_size: int, batch_format: str = "numpy", drop_last: bool = True,
                     local_shuffle_buffer_size: int | None = None, **_: Any) -> Iterator[pa.Table]:
        """One epoch of batches of ``batch_size`` rows of the pixel columns (a pyarrow table each,
        which :func:`data_prep.shards.decode_images` reads like Ray Data's numpy batches).
        ``batch_format`` and the prefetch options of Ray Data's signature are accepted and need
        nothing here. With ``drop_last`` the last, short batch is left out."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        rng = np.random.default_rng((self.seed, self.epochs_started))
        self.epochs_started += 1
        window = max(local_shuffle_buffer_size or 0, batch_size)
        buf: pa.Table | None = None
        for table in self._tables(rng.permutation(len(self.files))):
            buf = table if buf is None else pa.concat_tables([buf, table])
            if buf.num_rows < window:
                continue
            buf = buf.take(pa.array(rng.permutation(buf.num_rows)))
            full = buf.num_rows // batch_size * batch_size
            for i in range(0, full, batch_size):
                yield buf.slice(i, batch_size)
            buf = buf.slice(full)  # the rest joins the next window
        if buf is None or buf.num_rows == 0:
            return
        buf = buf.take(pa.array(rng.permutation(buf.num_rows)))
        for i in range(0, buf.num_rows, batch_size):
            part = buf.slice(i, batch_size)
            if part.num_rows == batch_size or not drop_last:
                yield part
