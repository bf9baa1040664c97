"""How the driver sizes a run from the data before Ray starts: steps per epoch and data-sized options."""

from __future__ import annotations

import pytest

from ctssl_base.errors import UserError
from ray_jobs.pretrain.config import PretrainConfig
from ray_jobs.pretrain.data import DataInfo
from ray_jobs.pretrain.sizing import method_options, plan_steps


def _info(rows: int, intensity: str = "hu") -> DataInfo:
    return DataInfo(read_url="/d", base_url="/d", dataset="lidc", rows=rows, height=64, width=64,
                    intensity=intensity, selection=None)


def _cfg(method: str, **kw) -> PretrainConfig:
    return PretrainConfig(method=method, data="/d", storage="/s", experiment="e", **kw)


def test_every_worker_takes_the_same_number_of_full_batches():
    # 1,000 slices over 3 workers -> 333 each; global batch 48 -> 16 per worker -> 20 full batches
    assert plan_steps(_cfg("byol", workers=3, batch_size=48), _info(1000)) == 20
    assert plan_steps(_cfg("byol", workers=3, batch_size=48, steps_per_epoch=5), _info(1000)) == 5


def test_a_global_batch_not_divisible_by_workers_is_rejected():
    with pytest.raises(UserError, match="--batch-size 50 is the global batch and must be divisible by --workers 3"):
        _cfg("byol", workers=3, batch_size=50).validate()


def test_moco_queue_and_swav_prototypes_are_sized_from_a_small_pool():
    # a 1,700-slice pool: a 65,536-key queue would hold every image's own old keys many times over
    moco = method_options(_cfg("mocov2", batch_size=32), _info(1700))
    assert moco["queue_size"] == 416  # 1700 // 4 = 425, rounded down to a multiple of the batch 32
    swav = method_options(_cfg("swav", batch_size=32), _info(1700), total_steps=200)
    assert swav["n_prototypes"] == 170 and swav["freeze_prototypes_iters"] == 20


def test_explicit_options_win_and_large_pools_keep_the_paper_defaults():
    assert method_options(_cfg("mocov2", method_options={"queue_size": 128}), _info(1700))["queue_size"] == 128
    assert "queue_size" not in method_options(_cfg("mocov2", batch_size=256), _info(1_000_000))


def test_gray8_datasets_get_the_gray8_window_standardised_by_the_pools_statistics(monkeypatch):
    from data_prep import intensity

    seen = []
    monkeypatch.setattr(intensity, "dataset_stats", lambda url: seen.append(url) or {"mean": 51.0, "std": 25.5})
    info = _info(500, "gray8")
    assert method_options(_cfg("byol", in_chans=3), info)["windows"] == ["gray8@0.2/0.1"] * 3
    assert seen == [info.read_url]
    monkeypatch.setattr(intensity, "dataset_stats", lambda url: None)  # no usable statistics: plain gray8
    assert method_options(_cfg("byol"), info)["windows"] == ["gray8"]
    assert "windows" not in method_options(_cfg("byol"), _info(500, "hu"))
