"""Fine-tuning stops on validation, the same rule for every encoder and the baseline, and a verdict
never rests on a cell whose runs were still improving when training ended.

The rule is checked on synthetic validation curves, then inside :meth:`FineTuner.fit` with a scripted
validation AUC (the loop is the real one), the verdict on synthetic cell results, and once end to end
through ``ctssl finetune`` and the report.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from ctssl_base.errors import UserError
from ray_jobs.finetune.config import FinetuneConfig
from ray_jobs.report.tables import (
    convergence_note,
    convergence_table,
    smallest_size_verdict,
    summarise,
    unconverged_cells,
    wilcoxon_vs_baseline,
)
from ssl_core.finetune import (
    FineTuner,
    FineTuneRecipe,
    create_classifier,
    last_improvement,
    should_stop,
    still_improving,
)

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- the rule on synthetic curves

def test_a_flat_curve_stops_after_patience_epochs_and_a_rising_one_never_does():
    flat = [0.7] * 8
    # the first value is the reference; three epochs without a gain end it
    assert [should_stop(flat[:n], patience=3) for n in range(1, 6)] == [False, False, False, True, True]
    rising = [0.5 + 0.02 * i for i in range(20)]
    assert not any(should_stop(rising[:n], patience=3, min_delta=0.01) for n in range(1, 21))
    assert still_improving(rising, window=3, min_delta=0.01)
    assert not still_improving(flat, window=3)


def test_patience_counts_from_the_first_unfrozen_epoch():
    flat = [0.7] * 10
    # backbone frozen for 4 epochs: a plateau of the head alone does not end the run
    assert [should_stop(flat[:n], patience=3, frozen_epochs=4) for n in (6, 7)] == [False, True]


def test_gains_below_min_delta_do_not_count_and_nan_never_improves():
    creep = [0.70, 0.702, 0.704, 0.706, 0.708]  # +0.002 per epoch, 0.008 in all
    assert last_improvement(creep, min_delta=0.005) == 3  # 0.706 is the first more than 0.005 above 0.70
    assert last_improvement(creep, min_delta=0.0) == 4
    assert should_stop(creep[:4], patience=3, min_delta=0.01)  # nothing above 0.01 in 3 epochs
    assert last_improvement([math.nan, math.nan]) is None
    assert last_improvement([math.nan, 0.6, math.nan, 0.61], min_delta=0.005) == 3
    assert last_improvement([0.5, 0.4, 0.45], lower_better=True) == 1  # a loss curve


def test_bad_rule_settings_are_refused():
    with pytest.raises(ValueError, match="patience must be >= 1"):
        FineTuneRecipe(epochs=5, frozen_epochs=0, patience=0)
    with pytest.raises(ValueError, match="min_delta >= 0"):
        FineTuneRecipe(epochs=5, frozen_epochs=0, patience=2, min_delta=-0.1)
    cfg = FinetuneConfig(data="d", storage="s", experiment="e")
    for kw, msg in (({"stopping": "sometimes"}, "--stopping must be one of early, fixed"),
                    ({"patience": 0}, "--patience must be a whole number of epochs >= 1"),
                    ({"min_delta": 1.5}, r"--min-delta must be in \[0, 1\)"),
                    ({"extend_epochs": -1}, "--extend-epochs must be >= 0")):
        with pytest.raises(UserError, match=msg):
            FinetuneConfig(**{**cfg.to_dict(), **kw, "sizes": cfg.sizes}).validate()


def test_the_study_default_stops_on_validation_with_one_bounded_extension_and_fixed_is_the_exact_count():
    cfg = FinetuneConfig(data="d", storage="s", experiment="e", epochs=40)
    cfg.validate()
    assert cfg.stopping == "early" and cfg.stopping_kwargs() == {"patience": 10, "min_delta": 0.001,
                                                                 "extend_epochs": 40}
    assert cfg.epoch_limit == 80 and "at most 40 epochs" in cfg.stopping_text()
    assert "at most 40 epochs" in cfg.protocol_text()
    fixed = FinetuneConfig(data="d", storage="s", experiment="e", epochs=40, stopping="fixed")
    assert fixed.stopping_kwargs() == {"patience": None, "min_delta": 0.0, "extend_epochs": 0}
    assert fixed.epoch_limit == 40 and "exactly 40 epochs" in fixed.stopping_text()
    assert FinetuneConfig(data="d", storage="s", experiment="e", extend_epochs=0).epoch_limit == 70


# ---------------------------------------------------------------- the rule inside FineTuner.fit

def _fit(curve, train: bool = False, **cfg) -> tuple:
    """:meth:`FineTuner.fit` while validation AUC follows ``curve(epoch)``; returns the result and the
    epochs it reported. The epochs themselves are stubbed (``train=True``: real steps of a tiny
    network), since only the loop's decisions are under test and a loaded machine makes real ones slow."""
    torch.manual_seed(0)
    ft = FineTuner(create_classifier("test_resnet", num_classes=2, in_chans=1),
                   FineTuneRecipe(frozen_epochs=0, lr=1e-3, batch_size=8, windows=["soft_tissue"], **cfg), device="cpu")
    seen: list[int] = []
    ft.evaluate = lambda batches, prefix="val_": {"val_auc": curve(len(seen)), "val_loss": 0.5}  # type: ignore
    if not train:
        ft.train_one_epoch = lambda batches, epoch: {  # type: ignore
            "train_loss": 1.0, "frozen": 0.0, "train_images": 8.0, "train_images_per_s": 1.0}
    hu = torch.randn(8, 1, 16, 16) * 100
    y = torch.arange(8) % 2
    res = ft.fit(ft.batches(hu, y, train=True), ft.batches(hu, y, train=False),
                 on_epoch=lambda rec: seen.append(int(rec["epoch"])))
    return res, seen


def test_patience_stops_a_flat_run_early():
    res, seen = _fit(lambda e: 0.8, train=True, epochs=20, patience=3)
    assert seen == [0, 1, 2, 3] and res.epochs_run == 4
    assert res.stopped_early and res.converged and not res.extended and res.best_epoch == 0


def test_a_run_still_rising_at_the_maximum_continues_once_and_is_unconverged_if_it_keeps_rising():
    res, seen = _fit(lambda e: 0.5 + 0.01 * e, epochs=6, patience=2, min_delta=0.001, extend_epochs=4)
    assert len(seen) == 10 and res.max_epochs == 10  # 6, then once up to 4 more: the bound holds
    assert res.extended and not res.stopped_early and not res.converged and res.best_epoch == 9


def test_a_run_that_levels_off_during_its_extension_stops_and_counts_as_converged():
    res, seen = _fit(lambda e: min(0.5 + 0.05 * e, 0.8), epochs=5, patience=2, extend_epochs=10)
    # rising to epoch 6 (0.8), then flat: stops 2 epochs later, inside the extension
    assert res.extended and res.stopped_early and res.converged and len(seen) == 9 and res.best_epoch == 6


def test_the_fixed_protocol_runs_exactly_n_epochs_whatever_the_curve():
    for curve in (lambda e: 0.8, lambda e: 0.5 + 0.01 * e):
        res, seen = _fit(curve, epochs=7)
        assert seen == list(range(7)) and not res.stopped_early and not res.extended
    assert not res.converged  # still rising into its last 10 %: flagged, as before
    flat, _ = _fit(lambda e: 0.8, epochs=7)
    assert flat.converged


# ---------------------------------------------------------------- the verdict on synthetic cells

def _trials(random_unconverged: int = 0, byol_unconverged: int = 0) -> pd.DataFrame:
    """byol is +0.05 above random at n5 in every fold; the patient-level bootstrap would support it."""
    rows = []
    for fold in range(5):
        for enc, size, auc in (("random", "n5", 0.60), ("random", "all", 0.70), ("byol", "n5", 0.65),
                               ("byol", "all", 0.72)):
            bad = size == "n5" and fold < (random_unconverged if enc == "random" else byol_unconverged)
            rows.append({"encoder": enc, "size": size, "fold": fold, "seed": 0, "test_auc": auc + 0.01 * fold,
                         "test_f1_macro": auc, "test_accuracy": auc, "train_per_class_min": 5 if size == "n5" else 50,
                         "stopped_early": 0.0 if bad else 1.0, "extended": 1.0 if bad else 0.0,
                         "converged": 0.0 if bad else 1.0, "epochs_run": 40.0 if bad else 12.0,
                         "max_epochs": 40.0 if bad else 20.0})
    return pd.DataFrame(rows)


BOOT = pd.DataFrame([{"encoder": "byol", "size": "n5", "patients": 40, "diff": 0.05, "ci_low": 0.01,
                      "ci_high": 0.09, "p_value": 0.004}])


def _verdict(t: pd.DataFrame) -> str:
    return smallest_size_verdict(summarise(t), wilcoxon_vs_baseline(t), "random", boot=BOOT,
                                 convergence=convergence_table(t))


def test_converged_cells_give_the_usual_verdict_and_the_counts():
    t = _trials()
    assert "`byol` beats `random`" in _verdict(t)
    note = convergence_note(convergence_table(t))
    assert note.startswith("Of 20 runs, 20 stopped on validation before the maximum number of epochs and 0 hit")
    assert "Every cell converged" in note


def test_an_unconverged_baseline_cell_means_no_verdict_never_a_win():
    t = _trials(random_unconverged=1)
    v = _verdict(t)
    assert "beats `random`" not in v
    assert "`random` at n5 is **unconverged** (1/5 runs still improving at the maximum)" in v
    assert "- `byol`: mean AUC 0.670 (+0.050); not judged (unconverged baseline)." in v
    assert "**No verdict at n5: the `random` cell is unconverged" in v
    conv = convergence_table(t)
    assert list(zip(unconverged_cells(conv).encoder, unconverged_cells(conv)["size"], strict=True)) == [
        ("random", "n5")]
    note = convergence_note(conv)
    assert "Of 20 runs, 19 stopped on validation before the maximum number of epochs and 1 hit the maximum " \
           "(1 of them still improving there, continued once); 1 ended with validation still improving." in note
    assert "**Unconverged**, left out of the verdict: `random` at n5 (1/5 runs)" in note


def test_an_unconverged_encoder_cell_is_left_out_with_a_line_saying_so():
    v = _verdict(_trials(byol_unconverged=3))
    assert "- `byol` is not judged: unconverged cell (3/5 runs still improving at the maximum)" in v
    assert "**0 of 0 pre-trained encoders beat `random` at n5.** Left out of the verdict as unconverged: byol." in v


def test_trials_of_an_older_ctssl_are_judged_by_their_late_best_epoch():
    t = _trials().drop(columns=["stopped_early", "extended", "converged", "epochs_run", "max_epochs"])
    t["late_best"] = ((t.encoder == "random") & (t["size"] == "n5") & (t.fold == 0)).astype(float)
    conv = convergence_table(t)
    cell = conv[(conv.encoder == "random") & (conv["size"] == "n5")].iloc[0]
    assert (cell.n_stopped, cell.n_hit_max, cell.n_unconverged) == (0, 5, 1)  # fixed length: all hit the maximum
    assert "No verdict at n5" in _verdict(t)


# ---------------------------------------------------------------- end to end through `ctssl finetune`

def _ctssl(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE",
                                                           "RAY_ADDRESS")}
    return subprocess.run([sys.executable, "-m", "ray_jobs.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def test_ctssl_finetune_stops_on_validation_logs_how_each_run_ended_and_the_report_counts_them(tmp_path):
    from ray_jobs.report.build import ReportConfig, build_report
    from ray_jobs.report.collect import load_study
    from tests.ray_jobs.tiny_data import write_tiny_dataset

    data = str(tmp_path / "data")
    write_tiny_dataset(data, patients=8, slices=4, size=32, seed=3)
    r = _ctssl("finetune", "--data", data, "--backbone", "test_resnet", "--samples-per-class", "all",
               "--folds", "2", "--epochs", "3", "--patience", "1", "--extend-epochs", "2", "--recipes", "1e-3:0",
               "--batch-size", "8", "--storage", str(tmp_path / "runs"), "--experiment", "conv",
               "--address", "local", "--max-concurrent", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    study = load_study(uri, "conv")
    t = study.trials
    assert len(t) == 2 and study.tags["stopping"] == "early"
    assert "stops after 1 epoch without a validation AUC gain above 0.001" in study.tags["stopping_text"]
    for row in t.itertuples():
        assert row.epochs_run <= row.max_epochs <= 5 and row.max_epochs in (3, 5)
        assert row.extended == float(row.max_epochs == 5)
        # a run ends either on the rule or at its maximum while still improving
        assert row.stopped_early or (row.epochs_run == row.max_epochs and not row.converged)
        assert 0 <= row.best_epoch < row.epochs_run
    paths = build_report(ReportConfig(experiment="conv", out=str(tmp_path / "report"), tracking_uri=uri))
    md = Path(paths.markdown).read_text()
    stopped = int((t.stopped_early.astype(bool) & ~t.extended.astype(bool)).sum())
    assert f"Of 2 runs, {stopped} stopped on validation before the maximum number of epochs and {2 - stopped} hit" in md
    assert "Training length: until validation stops improving" in md
    conv = json.loads(Path(paths.markdown).with_name("report.json").read_text())["convergence"]
    assert [c["n_trials"] for c in conv] == [2]


# ---------------------------------------------------------------- the study file's keys

def test_the_study_files_finetune_keys_reach_the_study_settings(monkeypatch):
    from ray_jobs.finetune import study as ft_study
    from ray_jobs.study import spec, stages

    text = """apiVersion: ctssl/v1
kind: Study
metadata: {name: keys}
spec:
  storage: /tmp/unused
  data:
    pretrain: {type: shards, path: /tmp/unused-pool}
    labelled: {type: shards, path: /tmp/unused-labelled}
  pretrain: {methods: {byol: {}}}
  finetune: {epochs: 30, stopping: fixed, patience: 4, minDelta: 0.01, extendEpochs: 0}
"""
    seen: list[FinetuneConfig] = []

    class Done:
        parent_run_id, trials, failed = "p", 0, 0

        def summary_markdown(self) -> str:
            return ""

    monkeypatch.setattr(ft_study, "run_study", lambda cfg: seen.append(cfg) or Done())
    stages._finetune(stages.Context(study=spec.loads(text), address=None, tracking_uri="sqlite://"))
    assert (seen[0].epochs, seen[0].stopping, seen[0].patience, seen[0].min_delta, seen[0].extend_epochs) == (
        30, "fixed", 4, 0.01, 0)
    default = spec.loads(text.replace(", stopping: fixed, patience: 4, minDelta: 0.01, extendEpochs: 0", ""))
    ft = default.spec["finetune"]
    assert (ft["stopping"], ft["patience"], ft["minDelta"], ft["extendEpochs"]) == ("early", 10, 0.001, None)
    with pytest.raises(spec.SpecError, match=r"spec\.finetune\.stopping"):
        spec.loads(text.replace("stopping: fixed", "stopping: sometimes"))


def test_the_demo_stops_on_validation_with_a_patience_shorter_than_its_maximum():
    from ray_jobs.study import spec

    ft = spec.load(REPO / "examples" / "phantom.yaml").spec["finetune"]
    assert ft["stopping"] == "early" and 1 <= ft["patience"] < ft["epochs"]
