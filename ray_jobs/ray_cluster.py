"""Connecting to Ray explicitly, checking the cluster can hold a job, and storage for Ray's own files.

``ray.init()`` without an address silently attaches to any cluster whose address file an earlier run
left behind, so every entry point goes through :func:`connect`, which always names the address. The
environment that Ray workers need to reach object storage and MLflow (S3 endpoint, credentials,
tracking URI) is forwarded explicitly, because worker processes of an already running cluster do not
inherit the driver's environment.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from data_prep.ray_runtime import init_local
from ray_jobs.errors import CLIError

log = logging.getLogger(__name__)

#: environment variables a worker needs to read shards / write checkpoints / log to MLflow
FORWARDED_ENV_PREFIXES = ("CTSSL_", "AWS_", "MLFLOW_")


def forwarded_env() -> dict[str, str]:
    """The driver's storage and tracking settings, to be set again inside Ray workers."""
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}


def job_env_vars() -> dict[str, str]:
    """The ``env_vars`` of the runtime env this driver was submitted with (``ray job submit
    --runtime-env-json``); empty outside a submitted job. Ray refuses a ``ray.init`` whose runtime env
    names a variable the job's already sets, and the job's reach every worker anyway."""
    import json

    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return {}
    try:
        env = (json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}
    except (ValueError, AttributeError):
        return {}
    return {str(k): str(v) for k, v in env.items()} if isinstance(env, dict) else {}


def apply_env(env: dict[str, str] | None) -> None:
    """Set forwarded variables in a worker (without overriding what the worker already has set)."""
    for k, v in (env or {}).items():
        os.environ.setdefault(k, v)


def resolve_address(address: str | None) -> str:
    """``--address`` if given, else ``$RAY_ADDRESS`` (set by ``ray job submit``), else a new local Ray."""
    return address or os.environ.get("RAY_ADDRESS") or "local"


def connect(address: str | None = None, *, log_to_driver: bool = True) -> None:
    """Attach to (or start) Ray at an explicit address; a no-op when this process is already connected.

    Without an address, a private local Ray is started on 127.0.0.1 (dashboard included, on
    127.0.0.1:8265), see :func:`data_prep.ray_runtime.init_local`.

    Being already connected is the in-process case (tests, ``ctssl demo``): the caller chose the
    cluster, so it is respected.
    """
    import ray

    if ray.is_initialized():
        return
    addr = resolve_address(address)
    job_env = job_env_vars()
    runtime_env: dict[str, Any] = {"env_vars": {k: v for k, v in forwarded_env().items() if k not in job_env}}
    try:
        if addr == "local":  # this machine's alone: 127.0.0.1 only, with a private token
            init_local(runtime_env=runtime_env, log_to_driver=log_to_driver)
        else:
            ray.init(address=addr, runtime_env=runtime_env, log_to_driver=log_to_driver)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise CLIError(f"cannot connect to the Ray cluster at {addr!r}: {e}") from e
    log.info("connected to Ray at %s: %s", addr, _describe(ray.cluster_resources()))


def _describe(res: dict[str, float]) -> str:
    return ", ".join(f"{k}={res[k]:g}" for k in ("CPU", "GPU") if k in res) or "no resources"


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
        raise CLIError(f"{what} {req.workers} x {req.gpus_per_worker:g} GPU needs {need_gpu:g} GPUs but the "
                       f"cluster has {gpus:g}")
    if need_cpu > cpus + 1e-9:
        raise CLIError(f"{what} {req.workers} x {req.cpus_per_worker:g} CPU needs {need_cpu:g} CPUs but the "
                       f"cluster has {cpus:g}")
    if req.streams_data and need_cpu > cpus - 1 + 1e-9:
        # Ray Data's read tasks need a CPU too; without one the stream (and training) waits forever
        raise CLIError(f"{what} {req.workers} x {req.cpus_per_worker:g} CPU leaves no CPU of the cluster's "
                       f"{cpus:g} for reading the data; use fewer workers or --cpus-per-worker")
    if req.gpus_per_worker == 0 and req.workers > 0:
        # each worker must also fit on one node
        per_node = [float(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
        if per_node and req.cpus_per_worker > max(per_node) + 1e-9:
            raise CLIError(f"--cpus-per-worker {req.cpus_per_worker:g} exceeds the largest node "
                           f"({max(per_node):g} CPUs)")


def arrow_filesystem(url: str):
    """(pyarrow filesystem or None, path) for Ray's ``storage_path`` / ``read_parquet``.

    S3 URLs get an explicit ``S3FileSystem`` with the configured endpoint (MinIO, moto), because
    Ray's own URL parsing knows nothing about ``CTSSL_S3_ENDPOINT_URL``. Local paths are made absolute
    (Ray requires it) and returned without a filesystem.
    """
    from data_prep import storage

    if storage.is_local(url):
        path = url[len("file://"):] if url.startswith("file://") else url
        return None, os.path.abspath(os.path.expanduser(path))
    scheme, rest = url.split("://", 1)
    if scheme not in ("s3", "s3a"):
        raise CLIError(f"{url}: only local paths and s3:// URLs are supported for Ray storage")
    from pyarrow import fs as pafs

    # fail in seconds on a dead endpoint, as data_prep.storage's clients do (S3_CLIENT_CONFIG)
    cfg = storage.S3_CLIENT_CONFIG
    kw: dict[str, Any] = {"connect_timeout": float(cfg["connect_timeout"]),
                          "retry_strategy": pafs.AwsStandardS3RetryStrategy(
                              max_attempts=cfg["retries"]["max_attempts"])}
    endpoint = storage.s3_endpoint()
    if endpoint:
        kw["scheme"] = "https" if endpoint.startswith("https") else "http"
        kw["endpoint_override"] = endpoint.split("://", 1)[-1]
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kw["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
        kw["secret_key"] = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
        if os.environ.get("AWS_SESSION_TOKEN"):
            kw["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        kw["region"] = region
    return pafs.S3FileSystem(**kw), rest.rstrip("/")
