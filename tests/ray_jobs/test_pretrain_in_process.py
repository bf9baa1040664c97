"""A one-worker ``ctssl pretrain`` on the local machine trains in the CLI's own process.

No Ray is started: the shards are read with pyarrow (:class:`ShardStream`), checkpoints are written to
``--storage`` in Ray Train's layout (:class:`CheckpointStore`), and a rerun resumes from the newest
complete one. Several workers or a named cluster still go to Ray Train.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
from pathlib import Path

import pytest

from ctssl_base.errors import ManifestError, UserError
from data_prep import shards
from ray_jobs.cli import main
from ray_jobs.pretrain import checkpoint as ckpt_io
from ray_jobs.pretrain.checkpoint_store import PARTIAL_PREFIX, CheckpointStore
from ray_jobs.pretrain.config import PretrainConfig
from ray_jobs.pretrain.data import inspect_data
from ray_jobs.pretrain.shard_stream import ShardStream
from ray_jobs.pretrain.sizing import check_local_device, runs_in_process
from tests.ray_jobs.tiny_data import write_tiny_dataset

pytestmark = pytest.mark.timeout(300)


def _digests(table) -> list[str]:
    return [hashlib.sha256(v.as_py()).hexdigest() for v in table.column("image")]


# ------------------------------------------------------------------------------------ shard stream
@pytest.fixture
def pool(tmp_path):
    """36 slices in 3 shards, and a selection of 20 of them."""
    base = str(tmp_path / "data")
    write_tiny_dataset(base, patients=6, slices=6, size=16, shards_count=3)
    ids = shards.read_table(base, ["slice_id"]).column("slice_id").to_pylist()
    sel = str(tmp_path / "sel")
    shards.write_selection(sel, base, ids[::2] + ids[1:8:2], {"strategy": "test"})
    return base, sel


@pytest.mark.parametrize("which", ["data", "selection"])
def test_an_epoch_holds_every_committed_row_once_in_batches_of_the_pixel_columns(pool, which):
    base, sel = pool
    url = base if which == "data" else sel
    info = inspect_data(base, None if which == "data" else sel)
    want = collections.Counter(_digests(shards.read_table(url, ["image"])))
    assert sum(want.values()) == (36 if which == "data" else 22)
    stream = ShardStream(info, seed=3)
    batches = list(stream.iter_batches(batch_size=5, drop_last=False))
    assert all(b.column_names == ["image", "height", "width"] for b in batches)
    assert [b.num_rows for b in batches[:-1]] == [5] * (len(batches) - 1) and 0 < batches[-1].num_rows <= 5
    got = collections.Counter(d for b in batches for d in _digests(b))
    assert got == want
    # drop_last: only full batches; the decoded pixels are those the shards hold
    full = list(stream.iter_batches(batch_size=5, drop_last=True))
    assert len(full) == sum(want.values()) // 5 and all(b.num_rows == 5 for b in full)
    assert shards.decode_images(full[0]).shape == (5, 16, 16)


def test_each_epoch_has_its_own_order_and_a_seed_repeats_it(pool):
    base, _ = pool
    info = inspect_data(base, None)

    def order(stream):
        return [d for b in stream.iter_batches(batch_size=4, local_shuffle_buffer_size=64) for d in _digests(b)]

    a, b = ShardStream(info, seed=1), ShardStream(info, seed=1)
    first, second = order(a), order(a)
    assert sorted(first) == sorted(second) and first != second
    assert order(b) == first  # the same seed, the same first epoch
    # a buffer larger than the pool shuffles across shards: the first batch is not one shard's rows
    per_shard = [set(_digests(shards.read_shard(base, s, ["image"]))) for s in shards.read_manifest(base)["shards"]]
    assert not any(set(first[:12]) <= rows for rows in per_shard)


def test_a_tampered_shard_is_named_not_trained_on(pool):
    base, _ = pool
    info = inspect_data(base, None)
    first = shards.read_manifest(base)["shards"][0]["path"]
    path = Path(base) / first
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=f"shard {first} does not match its manifest checksum"):
        list(ShardStream(info).iter_batches(batch_size=4))


# ---------------------------------------------------------------------------------- checkpoint store
def _checkpoint(tmp_path, step: int) -> str:
    d = tmp_path / f"local-{step}"
    d.mkdir()
    (d / ckpt_io.STATE_FILE).write_bytes(b"state %d" % step)
    (d / ckpt_io.PROGRESS_FILE).write_text(json.dumps({"step": step}))
    return str(d)


def _check_store(store: CheckpointStore, fs, tmp_path) -> None:
    assert store.latest() is None
    paths = [store.save(_checkpoint(tmp_path, step)) for step in (2, 4, 6)]
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(store.run_dir))
    assert names == sorted(p.rsplit("/", 1)[-1] for p in paths[1:])  # the newest two are kept
    assert store.latest() == paths[2]
    with fs.open(f"{paths[2]}/{ckpt_io.STATE_FILE}", "rb") as f:
        assert f.read() == b"state 6"
    # a folder without progress.json (a save cut short) is never the latest, and the next save removes it
    half = f"{store.run_dir}/checkpoint_2099-01-01_00-00-00.000000"
    fs.makedirs(half, exist_ok=True)
    fs.pipe_file(f"{half}/{ckpt_io.STATE_FILE}", b"half")
    assert store.latest() == paths[2]
    last = store.save(_checkpoint(tmp_path, 8))
    assert store.complete() == [paths[2], last]
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(store.run_dir)) == sorted(
        p.rsplit("/", 1)[-1] for p in (paths[2], last))


def test_checkpoints_on_a_local_disk_keep_the_newest_two_and_appear_whole(tmp_path):
    import fsspec

    store = CheckpointStore(str(tmp_path / "runs"), "exp")
    os.makedirs(store.run_dir)
    (tmp_path / "runs" / "exp" / f"{PARTIAL_PREFIX}dead").mkdir()  # a copy a killed process left behind
    _check_store(store, fsspec.filesystem("file"), tmp_path)
    assert not any(n.startswith(PARTIAL_PREFIX) for n in os.listdir(store.run_dir))


def test_checkpoints_on_s3_keep_the_newest_two_and_appear_whole(tmp_path, s3_bucket):
    from ctssl_base import storage

    store = CheckpointStore(f"s3://{s3_bucket}/runs", "exp")
    fs, _ = storage.open_fs(f"s3://{s3_bucket}")
    _check_store(store, fs, tmp_path)


# ------------------------------------------------------------------------------------ which runner
def _cfg(**kw) -> PretrainConfig:
    return PretrainConfig(method="byol", data="d", storage="s", experiment="e", **kw)


def test_auto_trains_one_worker_here_and_everything_else_on_ray_train(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert runs_in_process(_cfg()) is True
    assert runs_in_process(_cfg(address="local")) is False  # a Ray was named, even the local one
    assert runs_in_process(_cfg(workers=2)) is False
    assert runs_in_process(_cfg(runner="ray")) is False
    assert runs_in_process(_cfg(workers=2, runner="ray")) is False
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")  # under `ray job submit`
    assert runs_in_process(_cfg()) is False
    assert runs_in_process(_cfg(runner="in-process")) is True
    with pytest.raises(UserError, match="--runner in-process trains one worker in this process; --workers 2"):
        runs_in_process(_cfg(workers=2, runner="in-process"))
    with pytest.raises(UserError, match="--runner must be one of auto, ray, in-process, got 'threads'"):
        _cfg(runner="threads").validate()


def test_gpus_this_machine_lacks_are_refused_in_one_line(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    check_local_device(_cfg())  # a CPU run needs nothing
    with pytest.raises(UserError, match="--gpus-per-worker 1: this machine has no CUDA device"):
        check_local_device(_cfg(gpus_per_worker=1.0))


# ------------------------------------------------------------------------------- the CLI, end to end
def test_a_one_worker_run_trains_without_ray_and_a_rerun_after_a_crash_resumes(tmp_path, monkeypatch, capsys):
    import ray

    from ctssl_base import ray_connect
    from ray_jobs import tracking
    from ray_jobs.pretrain import trainer

    def no_ray(monkeypatch) -> None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        monkeypatch.setattr(ray_connect, "connect", lambda *a, **k: pytest.fail("Ray was started"))
        monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray was started"))
        monkeypatch.setattr(trainer, "build_dataset", lambda *a, **k: pytest.fail("Ray Data was used"))

    was_up = ray.is_initialized()  # an earlier test of the session may have left a Ray running
    no_ray(monkeypatch)
    write_tiny_dataset(str(tmp_path / "data"), patients=4, slices=8, size=32)  # 32 slices
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["pretrain", "--method", "byol", "--data", str(tmp_path / "data"), "--backbone", "test_resnet",
            "--batch-size", "8", "--max-steps", "6", "--checkpoint-every", "2", "--storage", str(tmp_path / "runs"),
            "--experiment", "local", "--tracking-uri", db, "--method-option", "hidden_dim=64",
            "--method-option", "out_dim=32"]

    def crash(*_a, **_k):
        raise RuntimeError("disk full while writing the encoder")

    # the first attempt dies when it writes the final checkpoint, after the ones at steps 2 and 4
    monkeypatch.setattr(ckpt_io, "save_encoder", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        main(args)
    store = CheckpointStore(str(tmp_path / "runs"), "local")
    assert [ckpt_io.load_progress(p).step for p in store.complete()] == [2, 4]
    monkeypatch.undo()
    no_ray(monkeypatch)

    assert main(args) == 0
    assert "6 steps, 1 epochs, 1 restart(s)" in capsys.readouterr().out
    assert ray.is_initialized() == was_up
    final = store.latest()
    assert ckpt_io.load_progress(final).step == 6 and ckpt_io.load_progress(final).finished
    assert os.path.exists(os.path.join(final, ckpt_io.ENCODER_FILE))
    assert len(store.complete()) == 2  # the newest two, nothing else left in the run folder
    cl = tracking.client(db)
    (run,) = cl.search_runs([cl.get_experiment_by_name("local").experiment_id])
    assert run.info.status == "FINISHED"  # the failed attempt's run, continued
    assert run.data.params["runner_effective"] == "in-process" and run.data.params["runner"] == "auto"
    assert run.data.tags["checkpoint"] == final
    assert tracking.metric_history(cl, run.info.run_id, "resumed_from_step") == [(4, 4.0)]
