"""``ctssl demo`` as a user runs it, shrunk to CI size, with its storage on a real S3 API server.

One run goes through every stage (phantom -> prep -> reduce -> pre-training -> study -> report) with
shards, checkpoints and the study's Tune state in S3 (moto's server on 127.0.0.1); the second run of
the same command must reuse every stage and say so, and a changed fine-tuning setting must redo only
the stages after pre-training, each saying why.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(900)

TINY = ["--pretrain-patients", "6", "--labelled-patients", "6", "--slices", "8", "--labelled-slices", "8",
        "--size", "64", "--methods", "byol,spark", "--pretrain-epochs", "1", "--pretrain-batch", "16",
        "--folds", "3", "--samples-per-class", "2,all", "--finetune-epochs", "2",
        "--finetune-recipes", "1e-3:0,1e-4:1"]


def _demo(out: Path, storage: str, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "CTSSL_DEID_KEY")}
    return subprocess.run([sys.executable, "-m", "ray_jobs.cli", "demo", "--out", str(out), "--storage", storage,
                           *TINY, *extra], capture_output=True, text=True, env=env, timeout=800)


def _stage_lines(text: str) -> dict[str, str]:
    """stage name -> "reused" or "ran", from the demo's stage headers."""
    out = {}
    for m in re.finditer(r"^\[\d+/\d+\] ([\w-]+): .*?(reusing the finished stage|done in)", text, re.M):
        out[m.group(1)] = "reused" if m.group(2).startswith("reusing") else "ran"
    return out


def test_tiny_demo_on_s3_runs_every_stage_then_reuses_them(tmp_path, s3_bucket):
    import fsspec

    out = tmp_path / "demo"
    storage = f"s3://{s3_bucket}/ctssl-demo"
    first = _demo(out, storage)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-6000:]
    stages = _stage_lines(first.stdout)
    assert list(stages) == ["phantom-pretrain", "prep-pretrain", "phantom-labelled", "prep-labelled", "reduce-hash6",
                            "pretrain-byol", "pretrain-spark", "finetune", "budget", "linear", "report"]
    assert set(stages.values()) == {"ran"}

    # Shards and checkpoints went to the bucket, not to the output folder.
    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": os.environ["CTSSL_S3_ENDPOINT_URL"]})
    fs.invalidate_cache()
    for name in ("pretrain", "labelled", "pretrain-hash6"):
        assert fs.exists(f"{s3_bucket}/ctssl-demo/shards/{name}/_manifest.json"), name
    assert fs.ls(f"{s3_bucket}/ctssl-demo/runs")
    assert fs.exists(f"{s3_bucket}/ctssl-demo/.stages/pretrain-byol.json")  # markers beside the data
    assert fs.exists(f"{s3_bucket}/ctssl-demo/report/report.html")
    assert not (out / "store").exists()

    # The report exists, names all three encoders and the study's sizes, and its plot was written.
    report = (out / "report" / "report.md").read_text()
    for enc in ("random", "byol", "spark"):
        assert enc in report
    assert (out / "report" / "report.html").exists()
    assert list((out / "report").glob("*.png"))
    assert "mlflow ui --backend-store-uri sqlite:///" in first.stdout
    # Study progress is one line with trials done, rate and ETA, not Tune's table.
    assert re.search(r"finetune demo-grid: \d+/18 trials.*epochs/(s|min).*ETA", first.stderr + first.stdout)

    second = _demo(out, storage)
    assert second.returncode == 0, second.stderr[-4000:]
    again = _stage_lines(second.stdout)
    assert list(again) == list(stages) and set(again.values()) == {"reused"}, again

    # A fine-tuning setting changes: data, reduction and pre-training are reused, the study and report redo.
    third = _demo(out, storage, "--finetune-epochs", "3")
    assert third.returncode == 0, third.stderr[-4000:]
    redo = _stage_lines(third.stdout)
    assert [k for k, v in redo.items() if v == "ran"] == ["finetune", "budget", "linear", "report"], redo
    assert re.search(r"^\[\d+/11\] finetune: .*settings changed: epochs 2 -> 3", third.stdout, re.M), third.stdout
    assert re.search(r"^\[11/11\] report: .*its input was redone: finetune, budget, linear", third.stdout,
                     re.M), third.stdout

    bad = _demo(out, storage, "--finetune-epochs", "1", "--finetune-recipes", "1e-3:2")  # 2 frozen in 1 epoch
    assert bad.returncode == 2
    assert "--finetune-recipes: 0.001:2 freezes more than --finetune-epochs 1" in bad.stderr
