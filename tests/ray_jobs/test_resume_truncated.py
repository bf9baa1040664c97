"""A rerun after a crash that left the newest checkpoint torn resumes from the previous complete one.

A driver killed while its newest checkpoint's ``state.pt`` was being written leaves that file cut
short. The rerun must neither fail on it nor start afresh: it continues from the checkpoint before,
and finishes. Two ways of being torn are run end to end through ``ctssl pretrain`` (one worker, in
this process, a tiny backbone, 6 steps with a checkpoint every 2):

- cut short: the file is smaller than ``manifest.json`` says, so the folder does not count as a
  checkpoint at all (:class:`CheckpointStore`) and the rerun is handed the one before;
- torn in place: the size still matches but the bytes are not a checkpoint, so the rerun is handed
  the torn folder, fails to read it, and falls back to :meth:`CheckpointStore.older` (``_resume``).
"""

from __future__ import annotations

import logging
import os

import pytest

from ray_jobs.cli import main
from ray_jobs.pretrain import checkpoint as ckpt_io
from ray_jobs.pretrain.checkpoint_store import CheckpointStore
from tests.ray_jobs.tiny_data import write_tiny_dataset

pytestmark = pytest.mark.timeout(120)


def _no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    from ctssl_base import ray_connect

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray_connect, "connect", lambda *a, **k: pytest.fail("Ray was started"))
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray was started"))


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """The data and one MLflow database for both cases (a new database costs its migrations)."""
    root = tmp_path_factory.mktemp("torn")
    write_tiny_dataset(str(root / "data"), patients=4, slices=8, size=32)  # 32 slices
    return str(root / "data"), f"sqlite:///{root / 'mlflow.db'}"


@pytest.mark.parametrize("torn", ["cut short", "torn in place"])
def test_a_rerun_after_a_torn_newest_checkpoint_resumes_from_the_previous_one(torn, shared, tmp_path, monkeypatch,
                                                                               capsys, caplog):
    from ray_jobs import tracking

    _no_ray(monkeypatch)
    data, db = shared
    experiment = torn.replace(" ", "-")
    args = ["pretrain", "--method", "byol", "--data", data, "--backbone", "test_resnet",
            "--batch-size", "8", "--max-steps", "6", "--checkpoint-every", "2", "--storage", str(tmp_path / "runs"),
            "--experiment", experiment, "--tracking-uri", db, "--method-option", "hidden_dim=64",
            "--method-option", "out_dim=32"]

    def killed(*_a, **_k):
        raise RuntimeError("driver killed while writing the final checkpoint")

    # the first attempt dies at the final checkpoint, after those at steps 2 and 4
    monkeypatch.setattr(ckpt_io, "save_encoder", killed)
    with pytest.raises(RuntimeError, match="driver killed"):
        main(args)
    monkeypatch.undo()
    _no_ray(monkeypatch)
    store = CheckpointStore(str(tmp_path / "runs"), experiment)
    older, newest = store.complete()
    assert [ckpt_io.load_progress(older).step, ckpt_io.load_progress(newest).step] == [2, 4]

    state = os.path.join(newest, ckpt_io.STATE_FILE)
    size = os.path.getsize(state)
    with open(state, "r+b") as f:
        if torn == "cut short":
            f.truncate(size // 2)
        else:  # same size, second half zeros: the manifest still matches, the content does not load
            f.seek(size // 2)
            f.write(b"\0" * (size - size // 2))
    assert os.path.getsize(state) == (size // 2 if torn == "cut short" else size)
    assert store.latest() == (older if torn == "cut short" else newest)

    caplog.set_level(logging.INFO)
    assert main(args) == 0
    out = capsys.readouterr().out
    logs = caplog.text
    assert "rank 0 resumed from step 2 " in logs, logs
    if torn == "torn in place":
        assert f"checkpoint {newest} cannot be resumed from" in logs
        assert f"resuming from the older checkpoint {older} (step 2)" in logs
    assert "6 steps, 1 epochs, 1 restart(s)" in out
    final = store.latest()
    assert ckpt_io.load_progress(final).step == 6 and ckpt_io.load_progress(final).finished
    assert os.path.exists(os.path.join(final, ckpt_io.ENCODER_FILE))
    # the steps after 2 were trained again: checkpoints at 4 (new) and 6; the torn folder was pruned
    assert [ckpt_io.load_progress(p).step for p in store.complete()] == [4, 6]
    assert not os.path.exists(newest)
    cl = tracking.client(db)
    (run,) = cl.search_runs([cl.get_experiment_by_name(experiment).experiment_id])
    assert run.info.status == "FINISHED"
    assert tracking.metric_history(cl, run.info.run_id, "resumed_from_step") == [(2, 2.0)]
