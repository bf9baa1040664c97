"""The GPU check (``tests/bench/gpu_check.py``, ``make gpu-check``) on a machine without a GPU.

CI has no GPU, so these tests keep the script's code path alive: a tiny ``--device cpu`` run must
produce a row with a positive rate for every requested method, and without CUDA the script must say
so in one line and succeed. The script carries copies of the pre-training worker's decode and
``to_training_tensor`` (the originals import pyarrow, which a bare GPU box lacks); the last test keeps
those copies equal to the product's functions, so the check times what the product runs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests" / "bench" / "gpu_check.py"

pytestmark = pytest.mark.timeout(600)


def _run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=e, capture_output=True,
                          text=True, timeout=540)


def _lightly_importable() -> bool:
    return importlib.util.find_spec("lightly") is not None


def test_cpu_smoke_run_reports_every_method(tmp_path):
    out = tmp_path / "gpu_check.json"
    methods = ["byol", "mocov2", "swav", "spark"]
    r = _run(["--device", "cpu", "--backbone", "test_resnet", "--img-size", "64", "--prep-size", "64",
              "--batch", "4", "--steps", "1", "--warmup", "1", "--cpu-seconds", "0.05", "--cpu-images", "4",
              "--methods", ",".join(methods), "--out", str(out)], env={"OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    for m in methods:
        assert any(line.startswith(f"| {m} |") for line in table), r.stdout
    doc = json.loads(out.read_text())
    assert doc["device_type"] == "cpu" and doc["backbone"] == "test_resnet"
    assert [row["method"] for row in doc["methods"]] == methods
    assert doc["input_pipeline"]["slices_s_per_core"] > 0
    for row in doc["methods"]:
        assert row["ctssl"]["status"] == "ok" and row["ctssl"]["img_s"] > 0, row
        assert row["views_per_image"] >= 1 and row["cpu_augment_views_s_per_core"] > 0, row
        assert row["cores_to_feed"] > 0 and row["cores_if_augmented_on_cpu"] > 0, row
        if row["method"] == "spark":
            assert row["lightly"]["status"] == "no lightly peer"
        elif _lightly_importable():
            assert row["lightly"]["status"] == "ok" and row["lightly"]["img_s"] > 0, row
            assert row["ratio"] > 0
        else:
            assert row["lightly"]["status"].startswith("lightly not installed"), row


def test_without_cuda_says_so_in_one_line_and_succeeds():
    r = _run([], env={"CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["gpu-check: no CUDA device on this machine; nothing to measure"]
    assert r.stderr == ""


def _load_script():
    spec = importlib.util.spec_from_file_location("ctssl_gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def test_cpu_side_copies_match_the_product():
    from ray_jobs.pretrain import data as product

    gc = _load_script()
    batch = gc.synthetic_row_batch(3, 40, seed=5)
    hu = gc.decode_batch(batch)
    np.testing.assert_array_equal(hu, product.decode_batch(batch))
    assert hu.dtype == np.float32 and hu.shape == (3, 40, 40)
    cpu = torch.device("cpu")
    for size in (None, 40, 32):
        torch.testing.assert_close(gc.to_training_tensor(hu, size, cpu), product.to_training_tensor(hu, size, cpu),
                                   rtol=0, atol=0)
