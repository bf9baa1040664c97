"""Benchmarks of the Ray jobs (run with ``make bench``; not part of CI). Each prints a ratio to a peer
measured in the same run:

* input pipeline (Parquet on S3 -> Ray Data -> decode -> method augmentation, inside a Ray worker)
  in slices/s against the slices/s a resnet50 BYOL training step consumes;
* pre-training images/s with 2 Ray Train workers against 1 worker.

The fine-tuning study's benchmark is test_bench_finetune_study.py.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from ray_jobs import tracking
from tests.ray_jobs.tiny_data import write_tiny_dataset

SIZE = 256  # prep resolution for the pipeline benchmark (512 in production; halved for this 2-core box)


@pytest.fixture(scope="module")
def bench_ray(s3_server):
    import ray

    from ctssl_base.ray_connect import forwarded_env

    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"CTSSL_S3_ENDPOINT_URL": s3_server, "AWS_ENDPOINT_URL": s3_server,
                     "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1"}.items():
            mp.setenv(k, v)
        import boto3

        boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket="bench")
        if ray.is_initialized():
            ray.shutdown()
        # 3 logical CPUs on the 2-core box: 2 training workers + 1 for Ray Data's read tasks
        ray.init(address="local", num_cpus=3, runtime_env={"env_vars": forwarded_env()})
        yield s3_server
        ray.shutdown()


def _pipeline_rate(url: str, batch: int, img_size: int) -> float:
    """slices/s from S3 shards to augmented BYOL views, measured inside one Ray worker process."""
    import ray

    from ray_jobs.pretrain.data import build_dataset, decode_batch, inspect_data, to_training_tensor

    info = inspect_data(url, None)
    ds = build_dataset(info)
    it = ds.streaming_split(1)[0]

    @ray.remote(num_cpus=1)
    def consume(it) -> float:
        from ssl_core.methods import create_views

        views = create_views("byol", img_size)
        n, t0 = 0, None
        for b in it.iter_batches(batch_size=batch, batch_format="numpy", drop_last=True, prefetch_batches=2):
            x = to_training_tensor(decode_batch(b), None, torch.device("cpu"))
            views(x)
            if t0 is None:  # exclude pipeline start-up (first batch)
                t0 = time.perf_counter()
                continue
            n += len(x)
        return n / (time.perf_counter() - t0)

    return ray.get(consume.remote(it))


def _step_rate(batch: int, img_size: int, steps: int = 3) -> float:
    """slices/s one resnet50 BYOL training step consumes (forward, backward, optimiser, EMA)."""
    from ssl_core.methods import StepContext, create_method

    torch.manual_seed(0)
    m = create_method("byol", backbone="resnet50", in_chans=1, img_size=img_size)
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    x = torch.randn(batch, 1, SIZE, SIZE) * 300 - 500
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        loss = m.training_step(x, StepContext(step=i, total_steps=steps + 1))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.after_optimizer_step(StepContext(step=i, total_steps=steps + 1))
        if i:
            times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def test_bench_input_pipeline_vs_resnet50_step(bench_ray):
    url = "s3://bench/pipeline"
    write_tiny_dataset(url, patients=32, slices=16, size=SIZE, shards_count=4)  # 512 slices of 256x256
    batch, img = 16, 224
    pipe = _pipeline_rate(url, batch, img)
    step = _step_rate(batch, img)
    print(f"\n[bench ray_jobs] input pipeline {pipe:.1f} slices/s (S3 Parquet {SIZE}px -> BYOL views {img}px, "
          f"1 worker) vs resnet50 BYOL step {step:.2f} slices/s (CPU, batch {batch}): "
          f"pipeline/step = {pipe / step:.1f}x")
    assert pipe > 0 and step > 0


def _pretrain_rate(tmp_path, data: str, workers: int) -> float:
    from ray_jobs.pretrain.config import PretrainConfig
    from ray_jobs.pretrain.driver import run_pretrain

    cfg = PretrainConfig(method="byol", data=data, backbone="resnet18", workers=workers, epochs=1,
                         batch_size=8 * workers, img_size=64, storage=str(tmp_path / "runs"),
                         experiment=f"scale-{workers}", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}",
                         checkpoint_every=1000, log_every=5, steps_per_epoch=20,
                         method_options={"hidden_dim": 256, "out_dim": 64})
    res = run_pretrain(cfg)
    rates = [v for s, v in tracking.metric_history(tracking.client(res.tracking_uri), res.run_id, "images_per_s")
             if s > 3]  # skip warm-up steps
    return statistics.median(rates)


def test_bench_pretrain_scaling_one_vs_two_workers(bench_ray, tmp_path):
    data = str(tmp_path / "data")
    write_tiny_dataset(data, patients=40, slices=16, size=64)  # 640 slices
    one = _pretrain_rate(tmp_path, data, 1)
    two = _pretrain_rate(tmp_path, data, 2)
    print(f"\n[bench ray_jobs] pre-training BYOL resnet18 64px, 8 img/worker/step: 1 worker {one:.1f} img/s, "
          f"2 workers {two:.1f} img/s: scaling = {two / one:.2f}x (ideal 2x on 2 free cores)")
    assert one > 0 and two > 0
