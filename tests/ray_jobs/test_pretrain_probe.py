"""``ctssl pretrain --monitor-data``: the probe's slices come from one fold's training and validation
patients only, a tiny in-process run logs the probe's metrics at the planned steps, and a collapsed
encoder prints one warning line and tags the run."""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import pytest
import torch
from torch import nn

from ctssl_base.errors import UserError
from ray_jobs import tracking
from ray_jobs.cli import main
from ray_jobs.finetune.data import load_labelled
from ray_jobs.finetune.folds import make_folds
from ray_jobs.pretrain.config import PretrainConfig, parse_monitor_every
from ray_jobs.pretrain.monitor import METRICS, TAG_COLLAPSED, Monitor, build_probe_set
from tests.ray_jobs.tiny_data import write_tiny_dataset

pytestmark = pytest.mark.timeout(300)


def _digest(img: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(img, dtype=np.int16).tobytes()).hexdigest()


def _cfg(**kw) -> PretrainConfig:
    return PretrainConfig(method="byol", data="d", storage="s", experiment="e", **kw)


@pytest.fixture
def labelled(tmp_path) -> str:
    url = str(tmp_path / "labelled")
    write_tiny_dataset(url, patients=10, slices=4, size=32, source="lab", seed=1)
    return url


def _split_digests(url: str, cfg: PretrainConfig) -> dict[str, set[str]]:
    data = load_labelled(url)
    split = make_folds(data.patients, data.label_names, cfg.monitor_folds, cfg.monitor_val_fraction,
                       cfg.monitor_fold_seed)[0]
    return {name: {_digest(data.images[i]) for i in getattr(split, name)} for name in ("train", "val", "test")}


@pytest.mark.parametrize("slices", [512, 12])
def test_the_probe_set_holds_training_and_validation_rows_of_fold_0_never_its_test_rows(labelled, slices):
    cfg = _cfg(monitor_data=labelled, monitor_slices=slices)
    ps = build_probe_set(cfg)
    data = load_labelled(labelled)
    split = make_folds(data.patients, data.label_names, 5, 0.2, 0)[0]
    assert set(ps.train_rows) <= set(split.train) and set(ps.val_rows) <= set(split.val)
    assert not (set(ps.train_rows) | set(ps.val_rows)) & set(split.test)
    assert len(split.test) > 0 and ps.size <= slices
    if slices >= len(data.labels):
        assert len(ps.train_rows) == len(split.train) and len(ps.val_rows) == len(split.val)
    assert set(ps.train_labels) == {0, 1} and set(ps.val_labels) == {0, 1}  # every class in both parts
    np.testing.assert_array_equal(ps.train_images, data.images[ps.train_rows])
    np.testing.assert_array_equal(ps.val_labels, data.labels[ps.val_rows])
    assert build_probe_set(_cfg()) is None


def test_monitor_data_that_cannot_make_a_fold_is_one_line_naming_the_flag(tmp_path):
    unlabelled = str(tmp_path / "u")
    write_tiny_dataset(unlabelled, patients=8, slices=2, size=16, labelled=False)
    with pytest.raises(UserError, match=r"^--monitor-data .*/u: no slice has a label"):
        build_probe_set(_cfg(monitor_data=unlabelled))
    few = str(tmp_path / "few")
    write_tiny_dataset(few, patients=4, slices=2, size=16)
    with pytest.raises(UserError, match=r"^--monitor-data .*/few: 4 patients cannot make 5 patient-level folds"):
        build_probe_set(_cfg(monitor_data=few))


def test_monitor_every_takes_steps_or_a_duration_and_bad_values_name_the_flag():
    assert parse_monitor_every("200") == (200, None)
    assert parse_monitor_every("5m") == (None, 300.0)
    assert parse_monitor_every("90s") == (None, 90.0)
    with pytest.raises(UserError, match="--monitor-every expects steps"):
        parse_monitor_every("1.5")
    with pytest.raises(UserError, match="--monitor-every must be >= 1 step, got 0"):
        _cfg(monitor_every=0).validate()
    with pytest.raises(UserError, match="--monitor-k must be >= 1"):
        _cfg(monitor_k=0).validate()
    assert _cfg().monitor_every_steps == 100 and _cfg(monitor_every_s=60.0).monitor_every_steps is None


class _Constant(nn.Module):
    """An encoder whose output is the same for every slice (a collapsed one)."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.ones(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(len(x), 16)


class _Method:
    def __init__(self, enc: nn.Module) -> None:
        self._enc = enc

    def encoder(self) -> nn.Module:
        return self._enc


def test_a_constant_output_encoder_warns_once_and_tags_the_run(labelled, tmp_path, caplog):
    cl = tracking.client(f"sqlite:///{tmp_path / 'm.db'}")
    run_id = cl.create_run(tracking.get_or_create_experiment(cl, "probe")).info.run_id
    mlog = tracking.MetricLogger(cl, run_id, flush_every=1)
    cfg = _cfg(monitor_data=labelled, monitor_every=3)
    mon = Monitor.create({"monitor": build_probe_set(cfg)}, cfg, _Method(_Constant()), img_size=32,
                         device=torch.device("cpu"), mlog=mlog, cl=cl, run_id=run_id)
    with caplog.at_level(logging.WARNING, logger="ctssl.pretrain"):
        for step in range(1, 7):
            mon.maybe(step)
    assert mon.last_step == 6 and [s for s, _ in mon.results] == [3, 6]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "probe at step 3: the embeddings look collapsed (emb_std 0" in warnings[0]
    tags = cl.get_run(run_id).data.tags
    assert tags[TAG_COLLAPSED] == "true" and tags["probe.collapse_step"] == "3"
    assert "eff_rank 0 < 2" in tags["probe.collapse_reason"]
    assert tracking.metric_history(cl, run_id, "probe.eff_rank") == [(3, 0.0), (6, 0.0)]


def test_a_tiny_pretrain_run_logs_the_probe_at_its_steps_and_embeds_only_fold_0_train_and_val(
        tmp_path, labelled, monkeypatch):
    import ssl_core.probe as probe_mod

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    write_tiny_dataset(str(tmp_path / "data"), patients=4, slices=8, size=32)  # 32 slices, 4 steps an epoch
    embedded: set[str] = set()
    real_embed = probe_mod.embed

    def recording_embed(encoder, hu, **kw):  # noqa: ANN001, ANN202
        embedded.update(_digest(x) for x in hu)
        return real_embed(encoder, hu, **kw)

    monkeypatch.setattr(probe_mod, "embed", recording_embed)
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["pretrain", "--method", "byol", "--data", str(tmp_path / "data"), "--backbone", "test_resnet",
            "--batch-size", "8", "--max-steps", "5", "--storage", str(tmp_path / "runs"), "--experiment", "probe",
            "--tracking-uri", db, "--method-option", "hidden_dim=64", "--method-option", "out_dim=32",
            "--monitor-data", labelled, "--monitor-every", "2"]
    assert main(args) == 0
    cl = tracking.client(db)
    (run,) = cl.search_runs([cl.get_experiment_by_name("probe").experiment_id])
    for key in METRICS:
        steps = [s for s, _ in tracking.metric_history(cl, run.info.run_id, key)]
        assert steps == [0, 2, 4, 5], key  # the start, every 2 steps, and the last step
    aucs = [v for _, v in tracking.metric_history(cl, run.info.run_id, "probe.knn_auc")]
    assert all(0.0 <= v <= 1.0 for v in aucs)
    assert run.data.params["monitor_data"] == labelled and TAG_COLLAPSED not in run.data.tags
    parts = _split_digests(labelled, PretrainConfig.from_dict({**_cfg().to_dict(), "monitor_data": labelled}))
    assert embedded == parts["train"] | parts["val"]  # every probe slice, and only these
    assert not embedded & parts["test"]
