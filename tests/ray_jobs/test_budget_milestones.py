"""Budget-curve checkpoints (``--keep-at-fractions``): kept outside the rotation, complete, and all
there after a run that crashed past the first one is resumed.

One worker in this process, a tiny backbone, 8 steps with a checkpoint every 2 (the rotation keeps
two) and milestones at 1/4, 1/2 and the end: steps 2, 4 and 8.
"""

from __future__ import annotations

import json
import os

import pytest

from ctssl_base.errors import UserError
from ray_jobs.cli import main
from ray_jobs.pretrain import checkpoint as ckpt_io
from ray_jobs.pretrain.checkpoint_store import CheckpointStore
from ray_jobs.pretrain.config import PretrainConfig
from tests.ray_jobs.test_resume_truncated import _no_ray
from tests.ray_jobs.tiny_data import write_tiny_dataset

pytestmark = pytest.mark.timeout(120)


def test_milestones_survive_rotation_and_a_resume(tmp_path, monkeypatch):
    _no_ray(monkeypatch)
    data = str(tmp_path / "data")
    write_tiny_dataset(data, patients=4, slices=8, size=32)
    args = ["pretrain", "--method", "byol", "--data", data, "--backbone", "test_resnet", "--batch-size", "8",
            "--max-steps", "8", "--checkpoint-every", "2", "--storage", str(tmp_path / "runs"),
            "--experiment", "curve", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--method-option", "hidden_dim=64", "--method-option", "out_dim=32",
            "--keep-at-fractions", "0.25,0.5,1"]
    real_save = CheckpointStore.save_milestone

    def crash_after_first(self, local_dir, fraction):  # noqa: ANN001, ANN202
        if fraction > 0.25:
            raise RuntimeError("driver killed after the first milestone")
        return real_save(self, local_dir, fraction)

    monkeypatch.setattr(CheckpointStore, "save_milestone", crash_after_first)
    with pytest.raises(RuntimeError, match="driver killed"):
        main(args)
    store = CheckpointStore(str(tmp_path / "runs"), "curve")
    assert list(store.milestones()) == [0.25]
    monkeypatch.setattr(CheckpointStore, "save_milestone", real_save)
    assert main(args) == 0

    kept = store.milestones()
    assert list(kept) == [0.25, 0.5, 1.0]
    steps = {f: ckpt_io.load_progress(p).step for f, p in kept.items()}
    assert steps == {0.25: 2, 0.5: 4, 1.0: 8}
    times = [ckpt_io.load_progress(p).train_time_s for p in kept.values()]
    assert times == sorted(times) and times[0] > 0
    for path in kept.values():  # manifest-complete, with the encoder a probe reads
        with open(os.path.join(path, ckpt_io.MANIFEST_FILE)) as f:
            listed = json.load(f)["files"]
        assert {ckpt_io.ENCODER_FILE, ckpt_io.STATE_FILE, ckpt_io.PROGRESS_FILE} <= listed.keys()
        assert all(os.path.getsize(os.path.join(path, n)) == s for n, s in listed.items())
    # the rotation kept only the newest two of its own, and left the milestones alone
    assert len(store.complete()) == 2


@pytest.mark.parametrize("bad", [[0.5, 0.25], [0.0, 1.0], [0.5, 0.5], [1.5]])
def test_bad_fractions_are_refused_with_one_line(bad):
    cfg = PretrainConfig(method="byol", data="d", storage="s", experiment="e", keep_at_fractions=bad)
    with pytest.raises(UserError, match="--keep-at-fractions"):
        cfg.validate()
