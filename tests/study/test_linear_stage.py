"""The study's linear-probe stage: on by default, off with finetune.linearProbe: false, in the plan."""

from __future__ import annotations

import pandas as pd

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
    text = study_text(tmp_path / "s").replace("epochs: 3, batch: 8}", "epochs: 3, batch: 8, linearProbe: false}")
    off = {s.name: s for s in stage_plan(spec.loads(text, "s.yaml"))}
    assert "linear" not in off and "linear" not in off["report"].needs


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
