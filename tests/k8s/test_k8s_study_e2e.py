"""The chart's study, run as KubeRay would run it, on this machine.

The chart is rendered with a tiny study; then what KubeRay and the cluster would do is done here:

- PostgreSQL: a real one (initdb / pg_ctl), with the user, database and generated password of the
  chart's PostgreSQL StatefulSet and Secret;
- MLflow: the chart's MLflow container command with its rendered environment (the backend store URI
  from the PostgreSQL Secret, artifacts proxied to S3), on moto S3, behind its basic-auth app with
  the config file the chart's init container writes, which also makes the jobs' own (non-admin) user;
  the jobs log in as that user;
- the Ray cluster: `ray start` for the head and a second node, with the environment of the rendered
  head and worker containers (Secrets resolved, Service names mapped to 127.0.0.1 as cluster DNS
  would), the head offering no CPUs as `num-cpus: "0"` says;
- the job: `ray job submit` of the rendered entrypoint and runtime environment, the study file being
  the rendered ConfigMap's `study.yaml` (mounted at /etc/ctssl/study.yaml on the head).

The job ends with the report in S3 beside the study's data, the encoders registered in MLflow, and
the runs in PostgreSQL.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import requests
import yaml

from tests.charts.chart_support import render_objects, study_objects
from tests.ray_jobs.servers import (
    VENV_BIN,
    start_mlflow_server,
    start_postgres,
    start_ray_head,
    start_ray_node,
)
from tests.study.test_study_run import stage_lines, tiny_study

pytestmark = pytest.mark.timeout(900)

S3_SECRET = "e2e-s3"  # a Secret the user created (storage.existingSecret): moto's keys


def chart_values(bucket: str, endpoint: str, name: str) -> dict:
    """The tiny study of tests/study as the chart's `study:` values, left to the chart's storage and
    MLflow; one CPU worker pod of 2 CPUs, as on a small cluster."""
    study = yaml.safe_load(tiny_study(Path("/unused"), name=name))
    for key in ("storage", "workdir", "tracking"):
        study["spec"].pop(key)
    study["spec"]["reduction"]["levels"] = [6]  # one pre-training run (on the selection) is enough here
    study["spec"]["pretrain"]["maxSteps"] = 8
    study["spec"]["finetune"]["epochs"] = 1
    return {
        "storage": {"bucket": bucket, "endpoint": endpoint, "existingSecret": S3_SECRET},
        "mlflow": {"workers": 1},  # the default basic-auth app: every job logs in
        "study": study,
        "rayJob": {"runtimeEnv": {"env_vars": {"CTSSL_E2E_RUN": name}}},
        "ray": {"cpuWorkers": {"maxReplicas": 1, "resources": {"requests": {"cpu": "2", "memory": "4Gi"},
                                                               "limits": {"cpu": "2", "memory": "4Gi"}}},
                "gpuWorkers": {"maxReplicas": 0}},
    }


def container_env(container: dict, secrets: dict[tuple[str, str], str], services: dict[str, str]) -> dict[str, str]:
    """A container's environment as the kubelet makes it: Secret references resolved, `$(VAR)` of earlier
    variables expanded; Service addresses replaced by where they listen here."""
    out: dict[str, str] = {}
    for e in container.get("env") or []:
        if "valueFrom" in e:
            ref = e["valueFrom"]["secretKeyRef"]
            value = secrets[(ref["name"], ref["key"])]
        else:
            value = re.sub(r"\$\((\w+)\)", lambda m: out.get(m.group(1), m.group(0)), e["value"])
        for service, local in services.items():
            value = value.replace(service, local)
        out[e["name"]] = value
    return out


def test_the_rendered_rayjob_runs_the_study_on_ray_with_mlflow_on_postgresql(tmp_path, s3_bucket, monkeypatch):
    import psycopg2

    from ray_jobs import tracking

    endpoint = os.environ["CTSSL_S3_ENDPOINT_URL"]
    name = f"e2e-{uuid.uuid4().hex[:6]}"
    objs = render_objects(chart_values(s3_bucket, endpoint, name))
    rj, study = study_objects(objs)
    secrets = {(o["metadata"]["name"], k): base64.b64decode(v).decode()
               for o in objs if o["kind"] == "Secret" for k, v in o["data"].items()}
    secrets[(S3_SECRET, "AWS_ACCESS_KEY_ID")] = secrets[(S3_SECRET, "AWS_SECRET_ACCESS_KEY")] = "testing"
    pg_pod = next(o for o in objs if o["metadata"]["name"] == "study-postgresql" and o["kind"] == "StatefulSet")
    pg_env = container_env(pg_pod["spec"]["template"]["spec"]["containers"][0], secrets, {})
    mlflow_pod = next(o for o in objs if o["kind"] == "Deployment")["spec"]["template"]["spec"]
    mlflow = mlflow_pod["containers"][0]
    workdir = Path(study["spec"]["workdir"])

    with start_postgres(pg_env["POSTGRES_USER"], pg_env["POSTGRES_PASSWORD"], pg_env["POSTGRES_DB"]) as pg:
        # the auth-config emptyDir, here a folder
        services = {"study-postgresql:5432": f"{pg.host}:{pg.port}", "/etc/mlflow-auth": str(tmp_path / "mlflow-auth")}
        (tmp_path / "mlflow-auth").mkdir()
        base_env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
        [init] = mlflow_pod["initContainers"]  # writes basic_auth.ini (users live in PostgreSQL)
        assert init["name"] == "auth-config"
        # `python` is the image's, here this venv's: the script loads MLflow's auth store for the jobs' user
        subprocess.run([str(VENV_BIN / "python"), *init["command"][1:]], check=True,
                       env={**base_env, **container_env(init, secrets, services)})
        server_env = {**base_env, **container_env(mlflow, secrets, services)}
        # the chart's URI (the image's driver named), its password from the chart's Secret
        assert server_env["MLFLOW_BACKEND_STORE_URI"] == pg.uri.replace("postgresql://", "postgresql+psycopg2://")
        assert mlflow["command"][:4] == ["mlflow", "server", "--app-name", "basic-auth"]
        with start_mlflow_server(mlflow["command"], server_env) as server:
            services["http://study-mlflow:5000"] = server.uri
            # without the login from the Secret the server answers nothing but /health
            anonymous = requests.get(f"{server.uri}/api/2.0/mlflow/experiments/search?max_results=1", timeout=30)
            assert anonymous.status_code == 401
            rc = rj["spec"]["rayClusterSpec"]
            head = rc["headGroupSpec"]["template"]["spec"]["containers"][0]
            [group] = rc["workerGroupSpecs"]
            worker = group["template"]["spec"]["containers"][0]
            head_env = container_env(head, secrets, services)
            worker_env = container_env(worker, secrets, services)
            assert head_env["MLFLOW_TRACKING_URI"] == server.uri and head_env["CTSSL_S3_ENDPOINT_URL"] == endpoint
            # the jobs log in as their own user, not as the admin the server was started with (this
            # test's client too, below)
            assert head_env["MLFLOW_TRACKING_USERNAME"] != server_env["MLFLOW_AUTH_ADMIN_USERNAME"]
            assert head_env["MLFLOW_TRACKING_PASSWORD"] == secrets[("study-mlflow-jobs", "password")]
            # the study file, at the head's mount point here
            spec_file = tmp_path / "etc-ctssl" / "study.yaml"
            spec_file.parent.mkdir()
            text = yaml.safe_dump(study, sort_keys=False)
            for service, local in services.items():
                text = text.replace(service, local)
            spec_file.write_text(text)
            entrypoint = shlex.split(rj["spec"]["entrypoint"])
            entrypoint[entrypoint.index("/etc/ctssl/study.yaml")] = str(spec_file)
            runtime_env = yaml.safe_load(rj["spec"]["runtimeEnvYAML"])

            for k in [k for k in os.environ if k.startswith(("CTSSL_", "AWS_", "MLFLOW_"))]:
                monkeypatch.delenv(k)  # a pod has only its container's environment
            for k, v in head_env.items():
                monkeypatch.setenv(k, v)
            head_cpus = int(rc["headGroupSpec"]["rayStartParams"]["num-cpus"])
            worker_cpus = int(worker["resources"]["limits"]["cpu"])
            try:
                with start_ray_head(num_cpus=head_cpus) as (address, env, gcs):
                    node_env = {**{k: v for k, v in env.items() if k not in head_env}, **worker_env}
                    with start_ray_node(gcs, node_env, num_cpus=worker_cpus):
                        sub_id = f"{rj['metadata']['name']}-{uuid.uuid4().hex[:5]}"
                        r = subprocess.run([str(VENV_BIN / "ray"), "job", "submit", "--address", address,
                                            "--submission-id", sub_id, "--runtime-env-json", json.dumps(runtime_env),
                                            "--", *entrypoint],
                                           capture_output=True, text=True, env=env, timeout=780)
                        (tmp_path / "driver.log").write_text(r.stdout + r.stderr)
                        assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
            stages = stage_lines(r.stdout)
            assert list(stages)[-3:] == ["finetune", "linear", "report"] and set(stages.values()) == {"ran"}, stages
            assert f"MLflow {server.uri}" in r.stdout  # the chart's tracking URI, through the Service

            # the report beside the study's data, where the chart said it would be
            import fsspec

            fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": endpoint}, key="testing", secret="testing")
            storage = rj["metadata"]["annotations"]["ctssl.io/storage"]
            assert storage == f"s3://{s3_bucket}/study/studies/{name}" == study["spec"]["storage"]
            root = storage.removeprefix("s3://")
            for key in ("report/report.html", "report/report.md", ".stages/report.json"):
                assert fs.exists(f"{root}/{key}"), key
            # artifacts went through the server to the chart's artifact root in S3
            assert fs.find(f"{s3_bucket}/study/mlflow")
            cl = tracking.client(server.uri)
            assert name in [e.name for e in cl.search_experiments()]
            assert [m.name for m in cl.search_registered_models()] == [f"{name}-byol"]
            # a submitted job (RAY_ADDRESS set by Ray) pre-trains on Ray Train workers, never in the driver
            exp = cl.get_experiment_by_name(name).experiment_id
            pretrain_runs = cl.search_runs([exp], "tags.`ctssl.stage` = 'pretrain'")
            assert [r.data.params["runner_effective"] for r in pretrain_runs] == ["ray"]

        # every run is in PostgreSQL (the server is gone: read the database itself)
        with psycopg2.connect(host=pg.host, port=pg.port, user=pg.user, password=pg.password,
                              dbname=pg.database) as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM runs r JOIN experiments e ON r.experiment_id = e.experiment_id "
                        "WHERE e.name = %s", (name,))
            assert cur.fetchone()[0] >= 3  # the pre-training run, the study's parent run and its trials
            cur.execute("SELECT count(*) FROM registered_models WHERE name LIKE %s", (f"{name}-%",))
            assert cur.fetchone()[0] == 1
