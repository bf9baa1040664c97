"""The report's online-probe section: the k-NN AUC and health curves the probe logged to pre-training
runs are read back per run, summarised per encoder (still rising at the end, or best earlier; a
collapse flagged) and drawn; runs without curves leave the section out."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ray_jobs import tracking
from ray_jobs.pretrain.monitor import TAG_COLLAPSED
from ray_jobs.report.probe_curves import collect_probe_curves, plot_probe_curves, probe_markdown


def _run(cl, exp: str, curve: dict[str, list[float]], steps: list[int], tags: dict[str, str] | None = None) -> str:
    run = cl.create_run(exp, tags=tags or {})
    for metric, values in curve.items():
        for step, v in zip(steps, values, strict=True):
            cl.log_metric(run.info.run_id, metric, v, step=step)
    cl.set_terminated(run.info.run_id)
    return run.info.run_id


def test_curves_are_read_summarised_and_drawn_and_a_collapse_is_flagged(tmp_path):
    cl = tracking.client(f"sqlite:///{tmp_path / 'm.db'}")
    exp = cl.create_experiment("probe")
    steps = [0, 6, 12, 18]
    rising = _run(cl, exp, {"probe.knn_auc": [0.5, 0.6, 0.7, 0.8], "probe.emb_std": [0.02, 0.03, 0.03, 0.04],
                            "probe.eff_rank": [5, 8, 9, 11]}, steps)
    peaked = _run(cl, exp, {"probe.knn_auc": [0.5, 0.9, 0.7, 0.6], "probe.emb_std": [0.02, 0.001, 0.0, 0.0],
                            "probe.eff_rank": [5, 2, 1, 1]}, steps,
                  tags={TAG_COLLAPSED: "true", "probe.collapse_reason": "effective rank 1.0 < 2"})
    silent = _run(cl, exp, {}, [])
    runs = pd.DataFrame({"encoder": ["byol", "swav", "spark", "random"],
                         "run_id": [rising, peaked, silent, ""]})
    curves, collapsed = collect_probe_curves(cl, runs)
    assert set(curves["encoder"]) == {"byol", "swav"} and len(curves) == 2 * 3 * len(steps)
    assert collapsed == {"swav": "effective rank 1.0 < 2"}

    md = probe_markdown(curves, collapsed)
    lines = {ln.split("`")[1]: ln for ln in md.splitlines() if ln.startswith("- `")}
    assert "0.500 at step 0 -> 0.800 at step 18 (still rising at the end)" in lines["byol"]
    assert "best at step 6" in lines["swav"] and "**collapsed** (effective rank 1.0 < 2)" in lines["swav"]
    assert "collapsed" not in lines["byol"] and "spark" not in lines
    assert "![online probe curves](probe_curves.png)" in md

    png = plot_probe_curves(curves, str(tmp_path / "probe_curves.png"))
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
