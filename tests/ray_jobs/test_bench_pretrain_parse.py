"""The end-to-end pre-training benchmark (``tests/bench/bench_pretrain_e2e.py``) reads its ctssl side's
rates from what ``ctssl pretrain`` prints. These lines are copied from a real run's output; the test
keeps the benchmark's reading of them right: steady state starts after the first epoch (which ran
through Ray Data), and a run too short to have a steady state is an error, not a made-up rate."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "bench_pretrain_e2e.py"

LOG = """\
12:09:53 INFO ray_jobs.pretrain.driver: pre-training mocov2 on /data/pool: 536 slices of 64x64 -> 64 px, \
1 workers x 32, 16 steps/epoch until 2m time budget (training-loop time; start-up not counted), on Ray Train
\x1b[36m(RayTrainWorker pid=3345)\x1b[0m step 10 epoch 0 loss 4.7809 113.0 img/s 1.08 steps/s; 2m time budget \
8 % spent (9 s of training) ETA 111s
\x1b[36m(RayTrainWorker pid=3345)\x1b[0m step 20 epoch 1 loss 4.7645 112.1 img/s 3.48 steps/s; 2m time budget \
10 % spent (12 s of training) ETA 108s
\x1b[36m(RayTrainWorker pid=3345)\x1b[0m step 380 epoch 23 loss 4.7431 95.1 img/s 3.02 steps/s; 2m time budget \
99 % spent (119 s of training) ETA 1s
\x1b[36m(RayTrainWorker pid=3345)\x1b[0m 2m time budget: stopped after 383 steps, 120.0 s of training
"""


# the same run trained in the CLI's process (--runner in-process, the default for one local worker)
IN_PROCESS_LOG = re.sub(r"\x1b\[36m\(RayTrainWorker pid=3345\)\x1b\[0m ", "12:10:01 INFO ctssl.pretrain: ",
                        LOG.replace("on Ray Train", "in this process"))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_pretrain_e2e", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("log", [LOG, IN_PROCESS_LOG], ids=["ray-train", "in-process"])
def test_rates_count_the_whole_run_and_steady_state_after_the_first_epoch(bench, log):
    assert "RayTrainWorker" not in IN_PROCESS_LOG and "ctssl.pretrain: step 380" in IN_PROCESS_LOG
    res = bench.parse_ctssl_log(log, wall=151.8)
    assert (res["steps"], res["batch"], res["images"]) == (383, 32, 383 * 32)
    assert res["steady_img_s"] == pytest.approx((380 - 20) * 32 / (119 - 12))
    assert res["budget_img_s"] == pytest.approx(383 * 32 / 120.0)
    assert res["wall_img_s"] == pytest.approx(383 * 32 / 151.8)


def test_a_run_without_two_progress_lines_after_the_first_epoch_is_refused(bench):
    short = "\n".join(line for line in LOG.splitlines() if "step 380" not in line)
    with pytest.raises(RuntimeError, match="use a longer one"):
        bench.parse_ctssl_log(short, wall=40.0)
    with pytest.raises(RuntimeError, match="final step count"):
        bench.parse_ctssl_log(LOG.replace("stopped after", "ended at"), wall=40.0)
