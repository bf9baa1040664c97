"""What running a job on Ray needs beyond connecting (:mod:`ctssl_base.ray_connect`): checking that the
cluster can hold a job, and storage for Ray's own files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from pyarrow import fs as pafs

from ctssl_base import storage
from ctssl_base.errors import UserError


@dataclass(frozen=True)
class WorkerRequest:
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    streams_data: bool = False  # Ray Data read tasks run beside the workers and need >= 1 CPU


def check_capacity(req: WorkerRequest, *, what: str = "--workers") -> None:
    """Fail before training when the cluster cannot place ``req`` (instead of waiting forever).

    Ray would otherwise queue the placement group indefinitely; an autoscaling cluster that grows on
    demand can opt out with ``CTSSL_SKIP_CAPACITY_CHECK=1``.
    """
    import ray

    if os.environ.get("CTSSL_SKIP_CAPACITY_CHECK") == "1":
        return
    total = ray.cluster_resources()
    cpus, gpus = float(total.get("CPU", 0)), float(total.get("GPU", 0))
    need_cpu = req.workers * req.cpus_per_worker
    need_gpu = req.workers * req.gpus_per_worker
    if need_gpu > gpus + 1e-9:
        raise UserError(f"{what} {req.workers} x {req.gpus_per_worker:g} GPU needs {need_gpu:g} GPUs but the "
                        f"cluster has {gpus:g}")
    if need_cpu > cpus + 1e-9:
        raise UserError(f"{what} {req.workers} x {req.cpus_per_worker:g} CPU needs {need_cpu:g} CPUs but the "
                        f"cluster has {cpus:g}")
    if req.streams_data and need_cpu > cpus - 1 + 1e-9:
        # Ray Data's read tasks need a CPU too; without one the stream (and training) waits forever
        raise UserError(f"{what} {req.workers} x {req.cpus_per_worker:g} CPU leaves no CPU of the cluster's "
                        f"{cpus:g} for reading the data; use fewer workers or --cpus-per-worker")
    if req.gpus_per_worker == 0 and req.workers > 0:
        # each worker must also fit on one node
        per_node = [float(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
        if per_node and req.cpus_per_worker > max(per_node) + 1e-9:
            raise UserError(f"--cpus-per-worker {req.cpus_per_worker:g} exceeds the largest node "
                            f"({max(per_node):g} CPUs)")


def arrow_filesystem(url: str):
    """(pyarrow filesystem or None, path) for Ray's ``storage_path`` / ``read_parquet``.

    S3 URLs get an explicit ``S3FileSystem`` with the configured endpoint (MinIO, moto), because
    Ray's own URL parsing knows nothing about ``CTSSL_S3_ENDPOINT_URL``. Local paths are made absolute
    (Ray requires it) and returned without a filesystem.

    Credentials are never given to it: pyarrow keeps explicit keys in the filesystem's pickle, and Ray
    Tune pickles the filesystem into ``tuner.pkl`` in the bucket itself. Without them each process that
    unpickles it takes the keys from its own environment or instance role (AWS's default chain).
    """

    if storage.is_local(url):
        path = url[len("file://"):] if url.startswith("file://") else url
        return None, os.path.abspath(os.path.expanduser(path))
    scheme, rest = url.split("://", 1)
    if scheme not in ("s3", "s3a"):
        raise UserError(f"{url}: only local paths and s3:// URLs are supported for Ray storage")

    # fail in seconds on a dead endpoint, as ctssl_base.storage's clients do (S3_CLIENT_CONFIG)
    cfg = storage.S3_CLIENT_CONFIG
    kw: dict[str, Any] = {"connect_timeout": float(cfg["connect_timeout"]),
                          "retry_strategy": pafs.AwsStandardS3RetryStrategy(
                              max_attempts=cfg["retries"]["max_attempts"])}
    endpoint = storage.s3_endpoint()
    if endpoint:
        kw["scheme"] = "https" if endpoint.startswith("https") else "http"
        kw["endpoint_override"] = endpoint.split("://", 1)[-1]
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        kw["region"] = region
    return pafs.S3FileSystem(**kw), rest.rstrip("/")
