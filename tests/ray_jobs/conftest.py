"""Fixtures of the Ray job tests live in :mod:`tests.ray_jobs.servers` (re-exported here)."""

from tests.ray_jobs.servers import mlflow_server, ray_cluster, ray_s3  # noqa: F401
