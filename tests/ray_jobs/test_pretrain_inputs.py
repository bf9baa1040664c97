"""Bad pre-training inputs fail with one clear line (exit 2) before Ray or training starts."""

from __future__ import annotations

import os

import pytest

from data_prep import shards
from ray_jobs.cli import main
from tests.ray_jobs.tiny_data import write_tiny_dataset


def _pretrain(tmp_path, *extra: str) -> list[str]:
    return ["pretrain", "--backbone", "resnet18", "--workers", "1", "--epochs", "1", "--batch-size", "4",
            "--storage", str(tmp_path / "runs"), "--experiment", "e1", "--address", "local", *extra]


def test_data_without_committed_manifest_is_rejected(tmp_path, capsys):
    half_written = tmp_path / "half"
    half_written.mkdir()
    (half_written / "part-00000.parquet").write_bytes(b"not yet committed")
    rc = main(_pretrain(tmp_path, "--method", "byol", "--data", str(half_written)))
    err = capsys.readouterr().err
    assert rc == 2
    assert f"--data {half_written}: no committed output here (no _manifest.json)" in err
    assert not (tmp_path / "runs").exists()  # nothing started


def test_unknown_method_lists_the_known_ones(tmp_path, capsys):
    write_tiny_dataset(str(tmp_path / "data"), patients=2, slices=2, size=32)
    rc = main(_pretrain(tmp_path, "--method", "simclr", "--data", str(tmp_path / "data")))
    err = capsys.readouterr().err
    assert rc == 2
    assert "--method 'simclr' is not a pre-training method; known: byol, mocov2, spark, swav" in err


def test_selection_of_another_dataset_is_rejected(tmp_path, capsys):
    write_tiny_dataset(str(tmp_path / "lidc"), patients=2, slices=2, size=32, source="lidc")
    write_tiny_dataset(str(tmp_path / "covid"), patients=2, slices=2, size=32, source="covid")
    shards.write_selection(str(tmp_path / "covid-dhash"), str(tmp_path / "covid"),
                           ["covid-p000-s000", "covid-p001-s001"], config={"strategy": "dhash"})
    rc = main(_pretrain(tmp_path, "--method", "byol", "--data", str(tmp_path / "lidc"),
                        "--selection", str(tmp_path / "covid-dhash")))
    err = capsys.readouterr().err
    assert rc == 2
    assert (f"--selection {tmp_path / 'covid-dhash'} was made from {tmp_path / 'covid'}, not from --data "
            f"{tmp_path / 'lidc'}") in err


def test_batch_larger_than_the_data_is_rejected(tmp_path, capsys):
    write_tiny_dataset(str(tmp_path / "data"), patients=2, slices=3, size=32)
    args = _pretrain(tmp_path, "--method", "byol", "--data", str(tmp_path / "data"))
    args[args.index("--batch-size") + 1] = "64"
    rc = main(args)
    assert rc == 2
    assert "--batch-size 64 over 1 worker(s) needs at least 64 slices" in capsys.readouterr().err


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--workers", "0", "--workers must be >= 1, got 0"),
    ("--checkpoint-every", "0", "--checkpoint-every must be >= 1, got 0"),
    ("--backbone", "resnet_nonexistent", "--backbone 'resnet_nonexistent' is not a timm model"),
])
def test_bad_numbers_and_names_are_named(tmp_path, capsys, flag, value, message):
    write_tiny_dataset(str(tmp_path / "data"), patients=2, slices=2, size=32)
    args = _pretrain(tmp_path, "--method", "byol", "--data", str(tmp_path / "data"))
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "runs" / "e1")


class _StopBeforeRay(Exception):
    pass


def test_resume_with_settings_its_checkpoints_cannot_take_is_refused_before_ray(tmp_path, capsys, monkeypatch):
    """Same --experiment, other backbone: one line naming the change, not a retried state_dict error."""
    from ctssl_base import ray_connect
    from ray_jobs import ray_cluster
    from ray_jobs.pretrain import driver
    from ray_jobs.pretrain.resume_guard import SETTINGS_FILE

    connected = []

    def stop(*_a, **_k):
        raise _StopBeforeRay

    # Ray itself is not needed here: connecting is recorded, training is replaced by a stop
    monkeypatch.setattr(ray_connect, "connect", lambda *a, **k: connected.append(1))
    monkeypatch.setattr(ray_cluster, "check_capacity", lambda *a, **k: None)
    monkeypatch.setattr(driver, "open_run", stop)
    write_tiny_dataset(str(tmp_path / "data"), patients=2, slices=4, size=32)
    first = _pretrain(tmp_path, "--method", "byol", "--data", str(tmp_path / "data"))
    with pytest.raises(_StopBeforeRay):  # the first run records its settings just before training
        main(first)
    assert (tmp_path / "runs" / "e1" / SETTINGS_FILE).exists()
    (tmp_path / "runs" / "e1" / "checkpoint_2026-01-01_00-00-00.000000").mkdir()  # what Ray Train leaves

    changed = [*first]
    changed[changed.index("--backbone") + 1] = "resnet34"
    connected.clear()
    rc = main(changed)
    assert connected == []  # refused before connecting to Ray
    err = capsys.readouterr().err
    assert rc == 2
    assert "--experiment 'e1'" in err and "already has checkpoints made with other settings" in err
    assert "backbone: 'resnet18' -> 'resnet34'" in err
    assert "method_options" not in err  # only what differs is named

    with pytest.raises(_StopBeforeRay):  # the original settings pass the guard and go on to resume
        main(first)


def test_settings_the_method_cannot_take_fail_before_ray(tmp_path, capsys, monkeypatch):
    """SparK on a ResNet needs at least two 32-px patches per side: 32 px images are refused in one line."""
    from ctssl_base import ray_connect

    def stop(*_a, **_k):
        raise _StopBeforeRay

    monkeypatch.setattr(ray_connect, "connect", stop)
    write_tiny_dataset(str(tmp_path / "data"), patients=2, slices=4, size=32)
    rc = main(_pretrain(tmp_path, "--method", "spark", "--data", str(tmp_path / "data")))
    err = capsys.readouterr().err
    assert rc == 2
    assert "--method spark with --backbone resnet18 at 32 px: img_size 32 gives a single 32-px patch" in err
    rc = main(_pretrain(tmp_path, "--method", "byol", "--data", str(tmp_path / "data"), "--method-option", "bogus=1"))
    assert rc == 2 and "bogus" in capsys.readouterr().err


def test_spark_at_a_size_whose_patch_grid_cannot_hold_its_mask_ratio_is_refused_before_ray(tmp_path, capsys,
                                                                                          monkeypatch):
    """64 px with a ResNet's 32-px patches is a 2x2 grid: 0.6 would silently mask 2 of 4 (0.5)."""
    from ctssl_base import ray_connect

    def stop(*_a, **_k):
        raise _StopBeforeRay

    monkeypatch.setattr(ray_connect, "connect", stop)
    write_tiny_dataset(str(tmp_path / "data"), patients=2, slices=4, size=64)
    rc = main(_pretrain(tmp_path, "--method", "spark", "--data", str(tmp_path / "data")))
    err = capsys.readouterr().err
    assert rc == 2
    assert ("--method spark with --backbone resnet18 at 64 px: resnet18's 32-px patches make a 2x2 grid, so mask "
            "ratio 0.6 would mask 2 of 4 patches (0.50); use --img-size 96 (3x3: 0.56) or 160 (5x5: 0.60), or "
            "--method-option mask_ratio=0.5") in err
    assert len(err.strip().splitlines()) == 1
    # the ratio the grid realises, asked for explicitly, goes ahead (to Ray, stopped here)
    with pytest.raises(_StopBeforeRay):
        main(_pretrain(tmp_path, "--method", "spark", "--data", str(tmp_path / "data"),
                       "--method-option", "mask_ratio=0.5"))


@pytest.mark.parametrize(("extra", "message"), [
    (["--log-every", "0"], "--log-every must be >= 1, got 0"),
    (["--time-budget", "12 minutes"], "--time-budget expects a duration like 90s, 12m, 1.5h or plain seconds"),
    (["--time-budget", "0s"], "--time-budget must be > 0 seconds"),
    (["--max-steps", "0"], "--max-steps must be >= 1, got 0"),
    (["--shuffle-buffer", "-1"], "--shuffle-buffer must be >= 0"),
])
def test_numbers_a_worker_would_trip_over_are_refused_by_the_cli(tmp_path, capsys, extra, message):
    rc = main(_pretrain(tmp_path, "--method", "byol", "--data", str(tmp_path / "no-data-needed"), *extra))
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
