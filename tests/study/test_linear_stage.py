"""The study's linear-probe stage: on by default (finetune.evaluation: both), off with evaluation: finetune,
alone with evaluation: linear; in the plan."""

from __future__ import annotations

import pandas as pd
import pytest

from ctssl_base.errors import UserError
from ray_jobs.study import plan, spec
from ray_jobs.study.stages import plan as stage_plan
from tests.study.test_study_plan import study_text


def test_the_linear_probe_stage_runs_before_the_report_unless_switched_off(tmp_path):
    study = spec.loads(study_text(tmp_path / "s"), "s.yaml")
    stages = {s.name: s for s in stage_plan(study)}
    assert "linear" in stages and "linear" in stages["report"].needs
    assert stages["linear"].needs == ["finetune"] and stages["linear"].settings["samplesPerClass"] == [2, "all"]
    p = plan.make_plan(study, plan.Options())
    row = next(r for r in p.rows if r.stage == "linear")
    assert row.work.startswith("5 encoders") and row.wall_s > 0  # random + byol, spark at 2 levels
    text = study_text(tmp_path / "s").replace("epochs: 3, batch: 8}", "epochs: 3, batch: 8, evaluation: finetune}")
    off = {s.name: s for s in stage_plan(spec.loads(text, "s.yaml"))}
    assert "linear" not in off and "linear" not in off["report"].needs and "finetune" in off


def test_a_linear_only_study_has_no_fine_tuning_stage(tmp_path):
    """evaluation: linear probes straight after pre-training; the budget stage logs to the linear stage's
    parent run, so it comes after it; the plan's report row has no trials to collect."""
    text = study_text(tmp_path / "s").replace("epochs: 3, batch: 8}", "epochs: 3, batch: 8, evaluation: linear}")
    text = text.replace("methods: {byol: {}, spark: {}}}", "methods: {byol: {}, spark: {}}, budgetCurve: [0.5, 1]}")
    study = spec.loads(text, "s.yaml")
    stages = stage_plan(study)
    names = [s.name for s in stages]
    assert "finetune" not in names and names[-3:] == ["linear", "budget", "report"]
    by = {s.name: s for s in stages}
    pretrain = [n for n in names if n.startswith("pretrain-")]
    assert by["linear"].needs == ["prep-labelled", *pretrain] and by["budget"].needs == ["linear"]
    assert by["report"].needs == ["linear", "budget"]
    p = plan.make_plan(study, plan.Options())
    assert [r.stage for r in p.rows] == names and next(r for r in p.rows if r.stage == "report").work == \
        "the linear probe's cells"

    # the budget curve also fine-tuned: a stage after the probe's, planned as fine-tuning trials of
    # random init and each of the 4 runs' 2 checkpoints at the smallest size (9 x 1 x 3 folds x 1 seed)
    tuned = text.replace("budgetCurve: [0.5, 1]}", "budgetCurve: [0.5, 1], budgetFinetune: true}")
    study = spec.loads(tuned, "s.yaml")
    by = {s.name: s for s in stage_plan(study)}
    assert list(by)[-4:] == ["linear", "budget", "budget-finetune", "report"]
    assert by["budget-finetune"].needs == ["linear"] and "budget-finetune" in by["report"].needs
    row = next(r for r in plan.make_plan(study, plan.Options()).rows if r.stage == "budget-finetune")
    assert row.details["trials"] == 27 and row.wall_s > 0
    lone = tuned.replace("budgetCurve: [0.5, 1], ", "")
    with pytest.raises(UserError, match="budgetFinetune .* give pretrain.budgetCurve"):
        stage_plan(spec.loads(lone, "s.yaml"))


def test_fine_tuning_trials_make_the_budget_table_with_random_init_first():
    from ray_jobs.finetune.config import parse_sizes
    from ray_jobs.study.budget_curve import finetune_encoders, finetune_table

    encoders = finetune_encoders({"byol": {1.0: "f/1", 0.5: "f/0.5"}})
    assert list(encoders) == ["byol@0.5", "byol@1"] and encoders["byol@1"] == ("byol", 1.0, "f/1")
    rows = [{"encoder": e, "size": "n2", "fold": f, "seed": 0, "test_auc": auc + 0.01 * f}
            for e, auc in (("random", 0.6), ("byol@0.5", 0.7), ("byol@1", 0.8)) for f in range(3)]
    table = finetune_table(pd.DataFrame(rows), encoders, {"byol@0.5": (12, 30.0), "byol@1": (24, 60.0)},
                           parse_sizes(samples_per_class="2"))
    assert list(zip(table["method"], table["fraction"], table["step"], strict=True)) == [
        ("random", 0.0, 0), ("byol", 0.5, 12), ("byol", 1.0, 24)]
    assert list(table["n"]) == [3, 3, 3] and abs(table["auc_mean"].iloc[2] - 0.81) < 1e-9


def test_the_side_by_side_section_covers_every_size_of_the_linear_table(tmp_path):
    """Sizes the fine-tuning study lacks read n/a; the rest pair the two protocols."""
    from ray_jobs.report.budget_plot import protocols_section

    cols = ["method", "fraction", "step", "train_time_s", "size", "auc_mean", "ci_low", "ci_high", "n"]
    rows = [["random", 0.0, 0, 0.0, s, 0.6, 0.5, 0.7, 6] for s in ("2", "all")]
    rows += [["byol-all", 1.0, 24, 9.0, s, 0.8, 0.7, 0.9, 6] for s in ("2", "all")]
    csv = tmp_path / "linear_probe.csv"
    pd.DataFrame(rows, columns=cols).to_csv(csv, index=False)
    summary = pd.DataFrame({"encoder": ["random", "byol-all"], "size": ["all", "all"], "auc_mean": [0.7, 0.85],
                            "auc_std": [0.01, 0.02]})
    _, body = protocols_section(str(csv), summary)
    assert "| byol-all | all | 0.800 [0.700, 0.900] | 0.850 ± 0.020 | +0.050 | 6 |" in body
    assert "| byol-all | 2 | 0.800 [0.700, 0.900] | n/a | n/a | 6 |" in body


def test_a_gpu_study_embeds_on_a_ray_worker_with_the_same_features(tmp_path):
    """The remote path a GPU study takes (here with 0 GPUs, on a local Ray): the worker loads the
    labelled set itself and returns the features the driver's own embedding gives."""
    import types

    import numpy as np
    import ray

    from ray_jobs.finetune.data import load_labelled
    from ray_jobs.finetune.encoders import resolve_encoder
    from ray_jobs.finetune.linear_probe import embed_labelled
    from ray_jobs.study.budget_curve import embedder
    from tests.ray_jobs.tiny_data import write_tiny_dataset

    url = str(tmp_path / "labelled")
    write_tiny_dataset(url, patients=4, slices=2, size=32)
    spec_ = resolve_encoder("random", default_backbone="test_resnet", in_chans=None, tracking_uri="")
    ctx = types.SimpleNamespace(gpus_per_worker=0.0, address=None)
    assert embedder(ctx, url) is embed_labelled  # a CPU study embeds in the driver
    try:
        remote = embedder(ctx, url, num_gpus=0)
        assert ray.is_initialized()
        got = remote(spec_, None)  # the driver's copy of the data is not used
    finally:
        ray.shutdown()
    want = embed_labelled(spec_, load_labelled(url))
    assert got.shape == want.shape == (8, want.shape[1]) and np.allclose(got, want, atol=1e-5)
