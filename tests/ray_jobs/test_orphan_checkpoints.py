"""A checkpoint folder Ray Train never registered (its writer died mid-save) is deleted after the run."""

from __future__ import annotations

import logging

from ray_jobs.pretrain.orphans import prune_unregistered


def _ckpt(run, name):
    d = run / name
    d.mkdir(parents=True)
    (d / "state.pt").write_bytes(b"x" * 10)
    return d


def test_unregistered_checkpoints_go_and_registered_ones_and_other_files_stay(tmp_path, caplog):
    run = tmp_path / "exp"
    kept = [_ckpt(run, "checkpoint_2026-01-01_00-00-03.0"), _ckpt(run, "checkpoint_2026-01-01_00-00-04.0")]
    stray = _ckpt(run, "checkpoint_2026-01-01_00-00-02.0")
    (run / "ctssl_run_settings.json").write_text("{}")
    (run / "checkpoint_manager_snapshot.json").write_text("{}")
    with caplog.at_level(logging.INFO):
        removed = prune_unregistered(str(tmp_path), "exp", [str(kept[0]), str(kept[1]) + "/"])
    assert removed == [stray.name]
    assert not stray.exists() and all(k.exists() for k in kept)
    assert (run / "ctssl_run_settings.json").exists() and (run / "checkpoint_manager_snapshot.json").exists()
    assert stray.name in caplog.text


def test_nothing_registered_deletes_nothing_and_a_missing_run_is_fine(tmp_path):
    run = tmp_path / "exp"
    only = _ckpt(run, "checkpoint_2026-01-01_00-00-02.0")
    assert prune_unregistered(str(tmp_path), "exp", []) == []
    assert only.exists()
    assert prune_unregistered(str(tmp_path), "absent", ["checkpoint_x"]) == []
