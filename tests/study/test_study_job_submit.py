"""``ray job submit -- ctssl study run -f study.yaml`` on a 2-node Ray cluster started with ``ray start``,
shards, checkpoints and the report in S3 (moto on 127.0.0.1): the way a study runs on a cluster. The
job ends with the report in the bucket and the encoders registered in MLflow."""

from __future__ import annotations

import json
import os
import subprocess
import uuid

import pytest

from tests.ray_jobs.servers import VENV_BIN, start_ray_head, start_ray_node
from tests.study.test_study_run import stage_lines, tiny_study

pytestmark = pytest.mark.timeout(900)


def test_ray_job_submit_runs_the_study_on_two_nodes_with_s3_storage(tmp_path, s3_bucket):
    import fsspec

    from ray_jobs import tracking

    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = tmp_path / "study.yaml"
    spec.write_text(tiny_study(tmp_path, name="onjob", storage=f"s3://{s3_bucket}/studies/onjob", tracking=db))
    with start_ray_head(num_cpus=2) as (address, env, gcs), start_ray_node(gcs, env, num_cpus=1):
        env = {k: v for k, v in env.items() if k != "CTSSL_DEID_KEY"}  # a phantom study generates its key
        sub_id = f"study-{uuid.uuid4().hex[:8]}"
        # ctssl is installed on every node (as in the image); the S3 settings travel with the job, since the
        # workers of a running cluster do not share the submitting shell's environment. (No --working-dir:
        # two nodes on one machine share Ray's temp folder, where one node's runtime-env agent would
        # garbage-collect the package the other's driver runs in.)
        runtime_env = json.dumps({"env_vars": {k: env[k] for k in ("CTSSL_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                                                    "AWS_SECRET_ACCESS_KEY")}})
        r = subprocess.run([str(VENV_BIN / "ray"), "job", "submit", "--address", address, "--submission-id", sub_id,
                            "--runtime-env-json", runtime_env, "--",
                            "ctssl", "study", "run", "-f", str(spec)],
                           capture_output=True, text=True, env=env, timeout=800)
        assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:]
        status = subprocess.run([str(VENV_BIN / "ray"), "job", "status", "--address", address, sub_id],
                                capture_output=True, text=True, env=env, timeout=60).stdout
        assert f"Job '{sub_id}' succeeded" in status
    stages = stage_lines(r.stdout)
    assert list(stages)[-3:] == ["finetune", "linear", "report"] and set(stages.values()) == {"ran"}, stages
    assert "connected to Ray at" in r.stdout + r.stderr  # the job's cluster, not a private local Ray
    assert "CPU=3" in r.stdout + r.stderr  # both nodes

    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": os.environ["CTSSL_S3_ENDPOINT_URL"]})
    fs.invalidate_cache()
    root = f"{s3_bucket}/studies/onjob"
    for key in ("report/report.html", "report/report.md", "shards/pretrain/_manifest.json",
                ".stages/report.json"):
        assert fs.exists(f"{root}/{key}"), key
    cl = tracking.client(db)
    assert sorted(m.name for m in cl.search_registered_models()) == ["onjob-byol-all", "onjob-byol-hash6"]

