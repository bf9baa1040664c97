"""Security properties of what the chart renders, for the default values and every ci values file.

- the Ray job API (port 8265, which runs any command it is sent) is reachable only from the study's
  Ray pods and the KubeRay operator's pods, and the Ray cluster requires a token;
- the study's Ray pods admit only each other, on the ports Ray listens on (which the chart fixes);
  MLflow, PostgreSQL and MinIO admit only the pods that use them;
- no container but the Ray autoscaler gets a Kubernetes API token, and the release's ServiceAccount
  is bound to no Role of the chart;
- every container runs with a read-only root filesystem, every path it writes is a mounted volume,
  and every /tmp emptyDir has a size limit;
- images can be pinned by digest;
- MLflow runs its basic-auth app and the jobs log in as their own non-admin user; a tracking URI with a
  login in it is refused;
- every generated Secret can be replaced by an existing one; workloads never get MinIO's root login,
  MLflow's S3 user is limited to its artifacts folder, and no secret is on a command line;
- a study whose pre-training cannot be placed on the worker groups is refused at render time;
- PostgreSQL and MinIO have PodDisruptionBudgets.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import PurePosixPath
from typing import Any

import pytest
import yaml

from tests.charts.chart_support import (
    CHART,
    CI_VALUES,
    ci_values,
    containers,
    pod_specs,
    render,
    render_ci,
    render_objects,
    study_objects,
    validation_errors,
)

#: the least a values file must say for a study (the schema requires a bucket; a study its data)
DEFAULT_VALUES: dict[str, Any] = {"storage": {"bucket": "ctssl"}, "study": {
    "apiVersion": "ctssl/v1", "kind": "Study", "metadata": {"name": "brain"},
    "spec": {"data": {"pretrain": {"type": "dicom", "path": "s3://raw/ct"},
                      "labelled": {"type": "shards", "path": "s3://ctssl/labelled"}}}}}
CASES = ["defaults", "defaults-with-minio"] + [p.stem for p in CI_VALUES]
DIGEST = "sha256:" + "0123456789abcdef" * 4
OTHER_DIGEST = "sha256:" + "fedcba9876543210" * 4


def _values(case: str) -> dict[str, Any]:
    if case == "defaults":
        return copy.deepcopy(DEFAULT_VALUES)
    if case == "defaults-with-minio":
        return {**copy.deepcopy(DEFAULT_VALUES), "minio": {"enabled": True}}
    return ci_values(CHART / "ci" / f"{case}.yaml")


def _objects(case: str) -> list[dict[str, Any]]:
    return render_objects(_values(case)) if case.startswith("defaults") else render_ci(case)


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env") or []}


def _secret_ref(env: dict[str, Any]) -> tuple[str, str]:
    ref = env["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


def _workload_containers(objs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """Containers of the study's RayJob (head, workers, submitter), which run the ctssl code."""
    out = []
    for o in objs:
        if o["kind"] == "RayJob":
            for where, pod in pod_specs(o):
                out += [(f"{where}/{c['name']}", c) for c in containers(pod)]
    return out


# ------------------------------------------------------------------------------------------ network
STUDY_PODS = {"app.kubernetes.io/name": "ctssl", "app.kubernetes.io/instance": "study",
              "app.kubernetes.io/component": "study"}


def _ray_policy(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(o for o in objs if o["kind"] == "NetworkPolicy" and o["metadata"]["name"].endswith("-ray"))


def _ray_dashboard_peers(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The peers from outside the study's pods: those of the rules that admit the job API alone."""
    rules = [r for r in _ray_policy(objs)["spec"]["ingress"] if [p["port"] for p in r["ports"]] == [8265]]
    assert len(rules) == 1
    return rules[0]["from"]


@pytest.mark.parametrize("case", CASES)
def test_ray_job_api_is_reachable_only_from_the_release_and_the_operator(case: str) -> None:
    objs = _objects(case)
    for o in (o for o in objs if o["kind"] == "NetworkPolicy"):
        for rule in o["spec"].get("ingress", []):
            for peer in rule["from"]:
                # an empty selector admits every namespace (or every pod of this one)
                assert peer.get("namespaceSelector", {"x": 1}) != {}, (o["metadata"]["name"], peer)
                assert peer.get("podSelector", {"x": 1}) != {}, (o["metadata"]["name"], peer)
    peers = _ray_dashboard_peers(objs)
    assert peers == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}},
                      "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}]
    # every rule names its ports; the other one admits the study's own Ray pods only
    rules = _ray_policy(objs)["spec"]["ingress"]
    assert all(r.get("ports") for r in rules)
    [inner] = [r for r in rules if r["from"] != peers]
    assert inner["from"] == [{"podSelector": {"matchLabels": STUDY_PODS}}]


def test_operator_namespace_and_more_dashboard_peers_come_from_values() -> None:
    named = render_objects({**DEFAULT_VALUES, "networkPolicy": {
        "operator": {"namespace": "ray-ops", "podLabels": {"app": "ray-operator"}},
        "dashboardFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]}})
    assert _ray_dashboard_peers(named) == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ray-ops"}},
         "podSelector": {"matchLabels": {"app": "ray-operator"}}},
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}},
    ]
    assert [e for o in named for e in validation_errors(o)] == []


@pytest.mark.parametrize("case", CASES)
def test_the_ray_cluster_requires_a_token_and_only_the_autoscaler_gets_an_api_token(case: str) -> None:
    """Ray's job API runs whatever it is sent: KubeRay's token mode guards it beyond the NetworkPolicy.
    No pod mounts a service account token; the head pod projects one into the autoscaler sidecar alone
    (KubeRay binds the service account to a Role for the cluster's pods)."""
    objs = _objects(case)
    for o in objs:
        for where, pod in pod_specs(o):
            assert pod.get("automountServiceAccountToken") is False, where
            for c in containers(pod):
                for m in c.get("volumeMounts") or []:
                    assert not m["mountPath"].startswith("/var/run/secrets/kubernetes.io"), (where, c["name"])
    rj = next(o for o in objs if o["kind"] == "RayJob")
    rc = rj["spec"]["rayClusterSpec"]
    assert rc["authOptions"] == {"mode": "token"}
    mounts = {m["mountPath"]: m for m in rc["autoscalerOptions"]["volumeMounts"]}
    api = mounts["/var/run/secrets/kubernetes.io/serviceaccount"]
    assert api["readOnly"] is True
    head = rc["headGroupSpec"]["template"]["spec"]
    vol = next(v for v in head["volumes"] if v["name"] == api["name"])
    sources = vol["projected"]["sources"]
    assert sources[0]["serviceAccountToken"]["path"] == "token"
    assert {"ca.crt", "namespace"} <= {i["path"] for s in sources[1:] for i in next(iter(s.values()))["items"]}


# ------------------------------------------------------------------------------ read-only root FS
#: what each container writes (besides nothing else: its root filesystem is read-only)
RAY_HOME_CACHE = "/home/ray/.cache"  # numba's compiled kernels
WRITES: dict[str, list[str]] = {
    "ray-head": ["/tmp", "/tmp/ray", "/dev/shm", RAY_HOME_CACHE],
    "ray-worker": ["/tmp", "/tmp/ray", "/dev/shm", RAY_HOME_CACHE],
    "ray-job-submitter": ["/tmp"],
    "seed-cache": ["/seed"],
    "mlflow": ["/tmp"],
    "auth-config": ["/etc/mlflow-auth"],
    "postgresql": ["/tmp", "/var/run/postgresql", "/var/lib/postgresql/data"],
    "minio": ["/tmp", "/data"],
    "mc": ["/tmp"],
}


def _covering_mount(container: dict[str, Any], path: str) -> dict[str, Any] | None:
    best = None
    for m in container.get("volumeMounts") or []:
        mp = PurePosixPath(m["mountPath"])
        covers = PurePosixPath(path) == mp or mp in PurePosixPath(path).parents
        if covers and (best is None or len(m["mountPath"]) > len(best["mountPath"])):
            best = m  # the innermost mount decides
    return best


@pytest.mark.parametrize("case", CASES)
def test_every_container_has_a_read_only_root_and_mounts_what_it_writes(case: str) -> None:
    objs = _objects(case)
    seen = set()
    for o in objs:
        claims = {t["metadata"]["name"] for t in (o.get("spec") or {}).get("volumeClaimTemplates", [])}
        for where, pod in pod_specs(o):
            volumes = {v["name"]: v for v in pod.get("volumes") or []}
            for c in containers(pod):
                name = c["name"]
                assert c["securityContext"]["readOnlyRootFilesystem"] is True, (where, name)
                writes = WRITES[name]
                env = _env(c)
                writes = writes + [env[k]["value"] for k in ("PGDATA", "MC_CONFIG_DIR") if k in env]
                for path in writes:
                    m = _covering_mount(c, path)
                    assert m is not None, f"{where}/{name} writes {path} but mounts no volume there"
                    assert not m.get("readOnly"), (where, name, path)
                    vol = volumes.get(m["name"])
                    assert (vol is not None and "emptyDir" in vol) or m["name"] in claims, (where, name, path)
                seen.add(name)
    expected = {"ray-head", "ray-worker", "ray-job-submitter", "seed-cache", "mlflow", "auth-config"}
    values = _values(case)
    if values.get("postgresql", {}).get("enabled", True):
        expected.add("postgresql")
    if values.get("minio", {}).get("enabled", False):
        expected |= {"minio", "mc"}
    assert expected <= seen
    # the autoscaler sidecar (KubeRay builds it from autoscalerOptions, with /tmp/ray added)
    for o in (o for o in objs if o["kind"] == "RayJob"):
        auto = o["spec"]["rayClusterSpec"]["autoscalerOptions"]
        assert auto["securityContext"]["readOnlyRootFilesystem"] is True
        assert _covering_mount(auto, "/tmp")["name"] == "tmp"


def test_pods_that_run_ctssl_code_seed_the_compiled_kernel_cache_first() -> None:
    """numba loads cached kernels only from a folder it can write: the pods copy the image's cache into
    an emptyDir before anything else runs, and mount it where numba looks (NUMBA_CACHE_DIR)."""
    dockerfile = (CHART.parents[1] / "infra" / "Dockerfile").read_text()
    assert re.search(rf"NUMBA_CACHE_DIR={re.escape(RAY_HOME_CACHE)}/numba\b", dockerfile)
    for o in render_ci("gpu-multinode-values"):
        for where, pod in pod_specs(o):
            if where.endswith("/submitter") or o["kind"] != "RayJob":
                continue
            seed = pod["initContainers"][0]
            assert seed["name"] == "seed-cache", where
            assert f"cp -a {RAY_HOME_CACHE}/. /seed/" in seed["command"][-1]
            assert _covering_mount(seed, "/seed")["name"] == "cache"
            assert _covering_mount(pod["containers"][0], f"{RAY_HOME_CACHE}/numba")["name"] == "cache", where


# ------------------------------------------------------------------------------------------ images
def test_images_are_pinned_by_digest_when_one_is_given() -> None:
    values = {**copy.deepcopy(DEFAULT_VALUES),
              "image": {"repository": "registry.example.com:5000/ml/ctssl", "tag": "0.1.0", "digest": DIGEST},
              "minio": {"enabled": True, "imageDigest": OTHER_DIGEST, "mcImageDigest": DIGEST},
              "postgresql": {"imageDigest": OTHER_DIGEST}}
    objs = render_objects(values)
    images = {c["name"]: c["image"] for o in objs for _, pod in pod_specs(o) for c in containers(pod)}
    assert images.pop("minio") == f"quay.io/minio/minio@{OTHER_DIGEST}"
    assert images.pop("mc") == f"quay.io/minio/mc@{DIGEST}"
    assert images.pop("postgresql") == f"postgres@{OTHER_DIGEST}"
    assert set(images.values()) == {f"registry.example.com:5000/ml/ctssl@{DIGEST}"}
    assert [e for o in objs for e in validation_errors(o)] == []


def test_images_run_by_tag_without_a_digest() -> None:
    images = {c["image"] for o in render_objects({**DEFAULT_VALUES, "minio": {"enabled": True}})
              for _, pod in pod_specs(o) for c in containers(pod)}
    assert images == {"ctssl:0.1.0", "postgres:16.10-alpine", "quay.io/minio/minio:RELEASE.2025-09-07T16-13-09Z",
                      "quay.io/minio/mc:RELEASE.2025-08-13T08-35-41Z"}


@pytest.mark.parametrize("path", ["image.digest", "minio.imageDigest", "postgresql.imageDigest"])
def test_schema_rejects_a_malformed_digest(path: str) -> None:
    import helm_python

    values = copy.deepcopy(DEFAULT_VALUES)
    top, leaf = path.split(".")
    values.setdefault(top, {})[leaf] = "sha256:not-hex"
    with helm_python.Chart.load(str(CHART)) as chart, pytest.raises(helm_python.HelmValuesError) as err:
        chart.render(values, name="study", namespace="ml")
    assert f"at '/{top}/{leaf}'" in str(err.value)


# ------------------------------------------------------------------------------------------ MLflow
def _mlflow_pod(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(o for o in objs if o["kind"] == "Deployment")["spec"]["template"]["spec"]


@pytest.mark.parametrize("case", CASES)
def test_mlflow_runs_basic_auth_and_every_job_logs_in_as_its_own_user(case: str) -> None:
    objs = _objects(case)
    pod = _mlflow_pod(objs)
    server = pod["containers"][0]
    assert server["command"][:4] == ["mlflow", "server", "--app-name", "basic-auth"]
    env = _env(server)
    config_path = env["MLFLOW_AUTH_CONFIG_PATH"]["value"]
    assert _covering_mount(server, config_path)["name"] == "auth-config"
    assert _secret_ref(env["MLFLOW_AUTH_ADMIN_USERNAME"]) == ("study-mlflow-auth", "username")
    assert _secret_ref(env["MLFLOW_AUTH_ADMIN_PASSWORD"]) == ("study-mlflow-auth", "password")
    assert _secret_ref(env["MLFLOW_FLASK_SERVER_SECRET_KEY"]) == ("study-mlflow-auth", "flask-secret-key")
    init = pod["initContainers"][0]
    assert init["name"] == "auth-config" and _env(init)["MLFLOW_AUTH_CONFIG_PATH"]["value"] == config_path
    # the init container makes the jobs' user from the jobs' Secret (and knows the admin's name)
    assert _secret_ref(_env(init)["JOBS_USERNAME"]) == ("study-mlflow-jobs", "username")
    assert _secret_ref(_env(init)["JOBS_PASSWORD"]) == ("study-mlflow-jobs", "password")
    assert _secret_ref(_env(init)["MLFLOW_AUTH_ADMIN_USERNAME"]) == ("study-mlflow-auth", "username")
    # the auth-config emptyDir lives in memory: the file holds the database URI with its password
    assert next(v for v in pod["volumes"] if v["name"] == "auth-config")["emptyDir"]["medium"] == "Memory"
    secret = next(o for o in objs if o["kind"] == "Secret" and o["metadata"]["name"] == "study-mlflow-auth")
    assert set(secret["data"]) == {"username", "password", "flask-secret-key"}
    jobs_secret = next(o for o in objs if o["kind"] == "Secret" and o["metadata"]["name"] == "study-mlflow-jobs")
    assert set(jobs_secret["data"]) == {"username", "password"}
    assert jobs_secret["data"]["username"] != secret["data"]["username"]
    jobs = _workload_containers(objs)
    logged_in = [(w, c) for w, c in jobs if "MLFLOW_TRACKING_URI" in _env(c)]
    assert {w.rsplit("/", 1)[-1] for w, _ in logged_in} == {"ray-head", "ray-worker"}
    for where, c in logged_in:
        e = _env(c)
        assert _secret_ref(e["MLFLOW_TRACKING_USERNAME"]) == ("study-mlflow-jobs", "username"), where
        assert _secret_ref(e["MLFLOW_TRACKING_PASSWORD"]) == ("study-mlflow-jobs", "password"), where
    # the admin login reaches the MLflow pod only
    for o in objs:
        for where, p in pod_specs(o):
            for c in containers(p):
                names = {_secret_ref(e)[0] for e in _env(c).values() if "secretKeyRef" in e.get("valueFrom", {})}
                assert "study-mlflow-auth" not in names or o["kind"] == "Deployment", (where, c["name"])


#: runs the init container's script as the pod would (env from the test), twice: once on a fresh
#: database, then again after the jobs' user was made an admin, with a new password
AUTH_CONFIG_RUNS = r"""
import json, os, sqlite3, sys
script, db = sys.argv[1], sys.argv[2]
exec(compile(script, "auth-config", "exec"), {})
with sqlite3.connect(db) as conn:
    conn.execute("UPDATE users SET is_admin = 1 WHERE username = ?", (os.environ["JOBS_USERNAME"],))
os.environ["JOBS_PASSWORD"] = "a-second-password-for-the-jobs"
exec(compile(script, "auth-config", "exec"), {})
with sqlite3.connect(db) as conn:
    print(json.dumps(conn.execute("SELECT username, password_hash, is_admin FROM users").fetchall()))
"""


def _run_auth_config(tmp_path, env: dict[str, str]) -> subprocess.CompletedProcess:
    pod = _mlflow_pod(render_objects(DEFAULT_VALUES))
    init = pod["initContainers"][0]
    assert init["command"][:2] == ["python", "-c"]
    db = tmp_path / "mlflow-p%40ss.db"  # a '%' in the URI, as in a URL-encoded password
    full = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{db}",
            "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "basic_auth.ini"),
            "AUTH_DEFAULT_PERMISSION": _env(init)["AUTH_DEFAULT_PERMISSION"]["value"], **env}
    sqlite_file = str(db).replace("%40", "@")  # where SQLAlchemy, decoding the URI, puts the database
    return subprocess.run([sys.executable, "-c", AUTH_CONFIG_RUNS, init["command"][2], sqlite_file], env=full,
                          capture_output=True, text=True, timeout=120)


def test_the_init_container_writes_mlflows_config_and_makes_the_jobs_a_user_of_their_own(tmp_path) -> None:
    """The script of the MLflow pod's init container, run with its env: the config file MLflow reads (a
    '%' of a URL-encoded password survives configparser's interpolation), and in the auth database the
    jobs' user, created non-admin, and on the next start given the Secret's password and no admin right."""
    r = _run_auth_config(tmp_path, {"MLFLOW_AUTH_ADMIN_USERNAME": "ctssl-admin", "JOBS_USERNAME": "ctssl-jobs",
                                    "JOBS_PASSWORD": "a-first-password-for-the-jobs"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "MLflow user 'ctssl-jobs' of the jobs is ready (not an admin)" in r.stdout
    [(user, pw_hash, is_admin)] = json.loads(r.stdout.strip().splitlines()[-1])
    from werkzeug.security import check_password_hash

    assert (user, is_admin) == ("ctssl-jobs", 0)
    assert check_password_hash(pw_hash, "a-second-password-for-the-jobs")
    path = tmp_path / "basic_auth.ini"
    assert path.stat().st_mode & 0o777 == 0o600
    import configparser

    cfg = configparser.ConfigParser()  # as MLflow's read_auth_config reads it (with interpolation)
    cfg.read(path)
    assert cfg["mlflow"]["database_uri"] == f"sqlite:///{tmp_path / 'mlflow-p%40ss.db'}"
    assert cfg["mlflow"]["default_permission"] == "READ"


def test_the_init_container_refuses_a_jobs_login_that_is_the_admins(tmp_path) -> None:
    r = _run_auth_config(tmp_path, {"MLFLOW_AUTH_ADMIN_USERNAME": "ctssl-admin", "JOBS_USERNAME": "ctssl-admin",
                                    "JOBS_PASSWORD": "a-first-password-for-the-jobs"})
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (
        "auth-config: the jobs' MLflow user 'ctssl-admin' is the admin user: give the jobs' Secret "
        "(mlflow.auth.jobs.existingSecret) a user name of its own")


def test_the_image_has_what_the_basic_auth_app_imports() -> None:
    """`mlflow server --app-name basic-auth` imports Flask-WTF (mlflow's "auth" extra)."""
    dockerfile = (CHART.parents[1] / "infra" / "Dockerfile").read_text()
    assert re.search(r'pip install [^\n]*-c constraints\.txt \. [^\n]*"Flask-WTF[<>=]', dockerfile)


def test_mlflow_without_auth_and_an_external_server_with_a_login() -> None:
    off = render_objects({**DEFAULT_VALUES, "mlflow": {"auth": {"enabled": False}}})
    pod = _mlflow_pod(off)
    assert "--app-name" not in pod["containers"][0]["command"] and "initContainers" not in pod
    assert not any(o["kind"] == "Secret" and "mlflow" in o["metadata"]["name"] for o in off)
    assert all("MLFLOW_TRACKING_PASSWORD" not in _env(c) for _, c in _workload_containers(off))
    assert "JOBS_PASSWORD" not in yaml.safe_dump_all(off)
    external = render_objects({**DEFAULT_VALUES, "mlflow": {
        "enabled": False, "trackingUri": "https://mlflow.example.com", "auth": {"existingSecret": "mlflow-login"}}})
    assert not any(o["kind"] == "Secret" for o in external)
    logged_in = [c for _, c in _workload_containers(external) if "MLFLOW_TRACKING_URI" in _env(c)]
    assert logged_in and all(_secret_ref(_env(c)["MLFLOW_TRACKING_PASSWORD"]) == ("mlflow-login", "password")
                             for c in logged_in)
    own = render_objects({**DEFAULT_VALUES, "mlflow": {
        "enabled": False, "trackingUri": "https://mlflow.example.com",
        "auth": {"existingSecret": "mlflow-login", "jobs": {"existingSecret": "jobs-login"}}}})
    logged_in = [c for _, c in _workload_containers(own) if "MLFLOW_TRACKING_URI" in _env(c)]
    assert logged_in and all(_secret_ref(_env(c)["MLFLOW_TRACKING_USERNAME"]) == ("jobs-login", "username")
                             for c in logged_in)


# ----------------------------------------------------------------------------------------- Secrets
def test_every_generated_secret_can_be_an_existing_one() -> None:
    values = {**copy.deepcopy(DEFAULT_VALUES),
              "storage": {"bucket": "ctssl", "existingSecret": "site-s3-user"},
              "minio": {"enabled": True, "existingSecret": "site-minio-root"},
              "postgresql": {"existingSecret": "site-pg"},
              "mlflow": {"artifactsExistingSecret": "site-mlflow-s3",
                         "auth": {"existingSecret": "site-mlflow-login", "jobs": {"existingSecret": "site-jobs"}}}}
    objs = render_objects(values)
    assert [o["metadata"]["name"] for o in objs if o["kind"] == "Secret"] == []
    refs = {_secret_ref(e)[0] for o in objs for _, pod in pod_specs(o) for c in containers(pod)
            for e in c.get("env") or [] if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]}
    assert refs == {"site-s3-user", "site-minio-root", "site-pg", "site-mlflow-login", "site-jobs", "site-mlflow-s3"}
    assert [e for o in objs for e in validation_errors(o)] == []


def test_generated_secrets_are_random_kept_on_uninstall_and_read_back_on_upgrade() -> None:
    values = {**DEFAULT_VALUES, "minio": {"enabled": True}}
    first, second = render(values), render(values)
    path = "ctssl/templates/secrets-generated.yaml"
    a, b = first[path], second[path]
    assert [s["metadata"]["name"] for s in a] == ["study-minio-root", "study-s3", "study-postgresql",
                                                 "study-mlflow-auth", "study-mlflow-jobs", "study-mlflow-s3"]
    for s1, s2 in zip(a, b, strict=True):
        assert s1["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
        changing = [k for k in s1["data"] if s1["data"][k] != s2["data"][k]]
        fixed = {"study-mlflow-auth": ["username"], "study-mlflow-jobs": ["username"]}.get(s1["metadata"]["name"], [])
        assert sorted(changing) == sorted(k for k in s1["data"] if k not in fixed)
    template = (CHART / "templates" / "secrets-generated.yaml").read_text()
    assert 'lookup "v1" "Secret" .root.Release.Namespace .name' in template


def _minio_bucket_job(objs: list[dict[str, Any]]) -> dict[str, Any]:
    job = next(o for o in objs if o["kind"] == "Job" and o["metadata"]["name"].endswith("-minio-bucket"))
    return job["spec"]["template"]["spec"]["containers"][0]


def test_workloads_get_a_bucket_scoped_minio_user_never_the_root_login() -> None:
    objs = render_ci("cpu-small-values")
    minio = next(o for o in objs if o["kind"] == "StatefulSet" and o["metadata"]["name"] == "study-minio")
    root_env = _env(minio["spec"]["template"]["spec"]["containers"][0])
    assert _secret_ref(root_env["MINIO_ROOT_USER"])[0] == "study-minio-root"
    assert _secret_ref(root_env["MINIO_ROOT_PASSWORD"])[0] == "study-minio-root"
    jobs = _workload_containers(objs)
    keyed = [(w, c) for w, c in jobs if "AWS_ACCESS_KEY_ID" in _env(c)]
    assert {w.rsplit("/", 1)[-1] for w, _ in keyed} == {"ray-head", "ray-worker"}
    for where, c in keyed:
        assert _secret_ref(_env(c)["AWS_ACCESS_KEY_ID"]) == ("study-s3", "AWS_ACCESS_KEY_ID"), where
        assert _secret_ref(_env(c)["AWS_SECRET_ACCESS_KEY"]) == ("study-s3", "AWS_SECRET_ACCESS_KEY"), where
    # the root login reaches MinIO and its bucket Job only
    for o in objs:
        for where, pod in pod_specs(o):
            for c in containers(pod):
                names = {_secret_ref(e)[0] for e in _env(c).values() if "secretKeyRef" in e.get("valueFrom", {})}
                if "study-minio-root" in names:
                    assert c["name"] in ("minio", "mc"), where
    # the bucket Job makes the workloads' user from study-s3's keys, MLflow's from study-mlflow-s3's
    env = _env(_minio_bucket_job(objs))
    assert _secret_ref(env["USER_ACCESS_KEY"]) == ("study-s3", "AWS_ACCESS_KEY_ID")
    assert _secret_ref(env["MLFLOW_SECRET_KEY"]) == ("study-mlflow-s3", "AWS_SECRET_ACCESS_KEY")
    assert env["MC_HOST_local"]["value"] == "http://$(ROOT_USER):$(ROOT_PASSWORD)@study-minio:9000"
    # MLflow's server stores artifacts with its own keys
    server = _mlflow_pod(objs)["containers"][0]
    assert _secret_ref(_env(server)["AWS_SECRET_ACCESS_KEY"]) == ("study-mlflow-s3", "AWS_SECRET_ACCESS_KEY")


#: a stand-in for `mc`: records each call's arguments and what it read on stdin (JSON lines)
FAKE_MC = r"""#!/usr/bin/env python3
import json, os, sys
stdin = "" if sys.stdin.isatty() else sys.stdin.read()
files = {a: open(a).read() for a in sys.argv[1:] if a.endswith(".json") and os.path.exists(a)}
with open(os.environ["MC_LOG"], "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:], "stdin": stdin, "files": files}) + "\n")
"""


def test_the_bucket_job_passes_no_secret_on_a_command_line_and_scopes_mlflows_user(tmp_path) -> None:
    """The bucket Job's script, run with its env against a stand-in `mc`: no secret value is ever an
    argument (the secret keys go in on stdin), the workloads' user gets the bucket, MLflow's user the
    artifacts folder <prefix>/<artifactsPrefix>/ only."""
    objs = render_objects({**copy.deepcopy(DEFAULT_VALUES), "minio": {"enabled": True}})
    mc = _minio_bucket_job(objs)
    assert mc["command"][:2] == ["/bin/sh", "-ec"]
    secrets = {"ROOT_USER": "root-abc", "ROOT_PASSWORD": "root-secret-pw-1234567890",
               "USER_ACCESS_KEY": "ctssl-abc", "USER_SECRET_KEY": "workload-secret-1234567890",
               "MLFLOW_ACCESS_KEY": "mlflow-abc", "MLFLOW_SECRET_KEY": "mlflow-secret-1234567890"}
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "MC_LOG": str(tmp_path / "mc.log")}
    for e in mc["env"]:
        env[e["name"]] = secrets[e["name"]] if "valueFrom" in e else e["value"]
    assert set(secrets) <= set(env)
    (tmp_path / "mc").write_text(FAKE_MC.replace("/usr/bin/env python3", sys.executable))
    (tmp_path / "mc").chmod(0o755)
    r = subprocess.run(mc["command"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    calls = [json.loads(line) for line in (tmp_path / "mc.log").read_text().splitlines()]
    for call in calls:
        for secret in ("ROOT_PASSWORD", "USER_SECRET_KEY", "MLFLOW_SECRET_KEY"):
            assert secrets[secret] not in " ".join(call["argv"]), (secret, call["argv"])
    adds = {c["argv"][4]: c["stdin"] for c in calls if c["argv"][:4] == ["admin", "user", "add", "local"]}
    assert adds == {"ctssl-abc": "workload-secret-1234567890\n", "mlflow-abc": "mlflow-secret-1234567890\n"}
    policies = {c["argv"][4]: json.loads(next(iter(c["files"].values())))
                for c in calls if c["argv"][:4] == ["admin", "policy", "create", "local"]}
    attached = {c["argv"][-1]: c["argv"][4] for c in calls if c["argv"][:4] == ["admin", "policy", "attach", "local"]}
    assert attached == {"ctssl-abc": "ctssl-ctssl", "mlflow-abc": "ctssl-ctssl-mlflow"}

    def resources(policy: dict[str, Any]) -> set[str]:
        return {r for st in policy["Statement"] for r in st["Resource"]}

    assert resources(policies["ctssl-ctssl"]) == {"arn:aws:s3:::ctssl", "arn:aws:s3:::ctssl/*"}
    mlflow = policies["ctssl-ctssl-mlflow"]
    assert resources(mlflow) == {"arn:aws:s3:::ctssl", "arn:aws:s3:::ctssl/study/mlflow/*"}
    for st in mlflow["Statement"]:
        assert all(a.startswith("s3:") and "*" not in a for a in st["Action"])
        if "arn:aws:s3:::ctssl" in st["Resource"] and "s3:ListBucket" in st["Action"]:
            assert st["Condition"] == {"StringLike": {"s3:prefix": ["study/mlflow", "study/mlflow/*"]}}
    # the prefix is the server's artifact root
    server = _mlflow_pod(objs)["containers"][0]["command"]
    assert server[server.index("--artifacts-destination") + 1] == "s3://ctssl/study/mlflow"


# ------------------------------------------------------------------------------- tracking URI login
@pytest.mark.parametrize("where", ["mlflow.trackingUri", "study.spec.tracking.uri"])
def test_a_tracking_uri_with_a_login_is_refused_without_repeating_it(where: str) -> None:
    values = copy.deepcopy(DEFAULT_VALUES)
    uri = "https://alice:s3cr3t-pw@mlflow.example.com"
    if where == "mlflow.trackingUri":
        values["mlflow"] = {"enabled": False, "trackingUri": uri}
    else:
        values["study"]["spec"]["tracking"] = {"uri": uri}
    err = _render_error(values)
    assert f"{where} holds a login (user:password@ in the URI)" in err
    assert "mlflow.auth.jobs.existingSecret" in err
    assert "s3cr3t-pw" not in err and "alice" not in err


@pytest.mark.parametrize("case", CASES)
def test_no_rendered_uri_carries_a_login(case: str) -> None:
    """Neither the study's ConfigMap nor any env value holds a password in a URI (only $(VAR) references to
    Secret-backed variables, as PostgreSQL's URI and the bucket Job's MinIO alias use)."""
    text = yaml.safe_dump_all(_objects(case))
    found = re.findall(r"[a-z0-9+.-]+://[^/\s:@'\"]+:([^@\s'\"]+)@", text)
    assert all(re.fullmatch(r"\$\([A-Z_]+\)", pw) for pw in found), found


def _render_error(values: dict[str, Any]) -> str:
    import helm_python

    with helm_python.Chart.load(str(CHART)) as chart, pytest.raises(helm_python.HelmError) as err:
        chart.render(values, name="study", namespace="ml")
    return str(err.value)


# ------------------------------------------------------------------------------------------- RBAC
@pytest.mark.parametrize("case", CASES)
def test_the_release_service_account_is_bound_to_no_role_of_the_chart(case: str) -> None:
    """The viewer Role is for people: the pods call no Kubernetes API (KubeRay binds the account to the
    autoscaler's Role of the Ray cluster itself)."""
    objs = _objects(case)
    assert [o["metadata"]["name"] for o in objs if o["kind"] == "Role"] == ["study-viewer"]
    for o in objs:
        if o["kind"] in ("RoleBinding", "ClusterRoleBinding"):
            assert all(s["kind"] != "ServiceAccount" or s["name"] != "study" for s in o["subjects"]), o


def test_viewers_are_bound_to_the_viewer_role_and_the_pods_account_is_refused() -> None:
    viewers = [{"kind": "Group", "name": "ml-team"}, {"kind": "ServiceAccount", "name": "ci", "namespace": "tools"}]
    objs = render_objects({**DEFAULT_VALUES, "rbac": {"viewers": viewers}})
    [binding] = [o for o in objs if o["kind"] == "RoleBinding"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "study-viewer"}
    assert binding["subjects"] == [{"kind": "Group", "name": "ml-team", "apiGroup": "rbac.authorization.k8s.io"},
                                   {"kind": "ServiceAccount", "name": "ci", "namespace": "tools"}]
    assert [e for o in objs for e in validation_errors(o)] == []
    err = _render_error({**DEFAULT_VALUES, "rbac": {"viewers": [{"kind": "ServiceAccount", "name": "study"}]}})
    assert "rbac.viewers names study, the ServiceAccount the release's pods run as" in err


# ----------------------------------------------------------------------------- who reaches what
def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        inside = labels.get(e["key"]) in e.get("values", [])
        if {"In": not inside, "NotIn": inside, "Exists": e["key"] not in labels,
                "DoesNotExist": e["key"] in labels}[e["operator"]]:
            return False
    return True


def _pod_templates(objs: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """Name of each pod template of the release (the Ray ones by their ray-node label) -> its labels."""
    out = {}
    for o in objs:
        spec = o.get("spec") or {}
        if o["kind"] in ("Deployment", "StatefulSet", "Job"):
            out[o["metadata"]["name"]] = spec["template"]["metadata"]["labels"]
        elif o["kind"] == "RayJob":
            rc = spec["rayClusterSpec"]
            for t in [rc["headGroupSpec"]["template"], spec["submitterPodTemplate"]] + [
                    g["template"] for g in rc.get("workerGroupSpecs", [])]:
                out[t["metadata"]["labels"]["ctssl.io/ray-node"]] = t["metadata"]["labels"]
    return out


def _admitted(objs: list[dict[str, Any]], policy: str) -> dict[str, list[int]]:
    """Pods of the release a NetworkPolicy admits (same namespace, podSelector peers) -> their ports."""
    pol = next(o for o in objs if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == policy)
    out: dict[str, list[int]] = {}
    for name, labels in _pod_templates(objs).items():
        for rule in pol["spec"]["ingress"]:
            if any("namespaceSelector" not in p and _selects(p["podSelector"], labels) for p in rule["from"]):
                out.setdefault(name, []).extend(
                    q for p in rule["ports"] for q in range(p["port"], p.get("endPort", p["port"]) + 1))
    return out


def _ray_listen_ports(rayjob: dict[str, Any]) -> set[int]:
    """Every port the chart has Ray listen on: the fixed head ports and each pod's `ray start` port flags."""
    rc = rayjob["spec"]["rayClusterSpec"]
    head = rc["headGroupSpec"]["template"]["spec"]["containers"][0]
    ports = {p["containerPort"] for p in head["ports"]}
    for params in [rc["headGroupSpec"]["rayStartParams"]] + [g["rayStartParams"] for g in rc["workerGroupSpecs"]]:
        fixed = {k: int(v) for k, v in params.items() if k.endswith("-port")}
        assert set(fixed) == {"node-manager-port", "object-manager-port", "runtime-env-agent-port",
                              "dashboard-agent-grpc-port", "dashboard-agent-listen-port", "metrics-export-port",
                              "min-worker-port", "max-worker-port"}, params
        ports |= {v for k, v in fixed.items() if k not in ("min-worker-port", "max-worker-port")}
        ports |= set(range(fixed["min-worker-port"], fixed["max-worker-port"] + 1))
    return ports


@pytest.mark.parametrize("case", CASES)
def test_each_service_admits_only_the_pods_that_use_it_on_its_ports(case: str) -> None:
    objs = _objects(case)
    values = _values(case)
    [rj] = [o for o in objs if o["kind"] == "RayJob"]
    groups = [g["groupName"] for g in rj["spec"]["rayClusterSpec"]["workerGroupSpecs"]]
    ray_nodes = {"head", *groups}
    # Ray: the study's own pods (the submitter too: it submits through the job API), on Ray's ports only
    ray = _admitted(objs, "study-ray")
    assert set(ray) == ray_nodes | {"submitter"}
    listen = _ray_listen_ports(rj)
    assert {6379, 8265, 10001} <= listen and len(listen) < 10100
    for name, ports in ray.items():
        assert set(ports) == listen, name
    # MLflow: the pods that log to it (head and workers run ctssl), on its port
    mlflow_port = values.get("mlflow", {}).get("port", 5000)
    assert _admitted(objs, "study-mlflow") == {n: [mlflow_port] for n in ray_nodes}
    if values.get("postgresql", {}).get("enabled", True):
        assert _admitted(objs, "study-postgresql") == {"study-mlflow": [5432]}
    if values.get("minio", {}).get("enabled", False):
        assert _admitted(objs, "study-minio") == {n: [9000] for n in ray_nodes | {"study-mlflow", "study-minio-bucket"}}


def test_the_ray_ports_come_from_values_and_a_reversed_worker_range_is_refused() -> None:
    ports = {"nodeManager": 7001, "objectManager": 7002, "runtimeEnvAgent": 7003, "dashboardAgentGrpc": 7004,
             "dashboardAgentListen": 7005, "metricsExport": 7006, "minWorker": 20000, "maxWorker": 20100}
    objs = render_objects({**DEFAULT_VALUES, "ray": {"ports": ports}})
    [rj] = [o for o in objs if o["kind"] == "RayJob"]
    want = {6379, 8265, 10001, *range(7001, 7007), *range(20000, 20101)}
    assert _ray_listen_ports(rj) == want
    assert set(_admitted(objs, "study-ray")["head"]) == want
    assert [e for o in objs for e in validation_errors(o)] == []
    err = _render_error({**DEFAULT_VALUES, "ray": {"ports": {"minWorker": 20000, "maxWorker": 19000}}})
    assert "ray.ports.maxWorker 19000 is below ray.ports.minWorker 20000" in err


def test_more_mlflow_peers_come_from_values() -> None:
    peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "team-b"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/component": "study"}}}
    objs = render_objects({**DEFAULT_VALUES, "networkPolicy": {"mlflowFrom": [peer]}})
    pol = next(o for o in objs if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "study-mlflow")
    assert pol["spec"]["ingress"][0]["from"][1:] == [peer]


# ------------------------------------------------------------------------------------ /tmp limits
@pytest.mark.parametrize("case", CASES)
def test_every_tmp_emptydir_has_a_size_limit(case: str) -> None:
    seen = 0
    for o in _objects(case):
        for where, pod in pod_specs(o):
            volumes = {v["name"]: v for v in pod.get("volumes") or []}
            for c in containers(pod):
                m = _covering_mount(c, "/tmp")
                if m is None:
                    continue
                assert volumes[m["name"]]["emptyDir"]["sizeLimit"], (where, c["name"])
                seen += 1
    assert seen >= 7


def test_tmp_size_limits_come_from_values_and_bad_sizes_are_refused() -> None:
    import helm_python

    values = {**copy.deepcopy(DEFAULT_VALUES), "minio": {"enabled": True, "tmpSize": "3Gi"},
              "mlflow": {"tmpSize": "5Gi"}, "postgresql": {"tmpSize": "300Mi"},
              "ray": {"head": {"tmpSize": "40Gi"}, "cpuWorkers": {"tmpSize": "50Gi"},
                      "gpuWorkers": {"tmpSize": "60Gi"}, "submitter": {"tmpSize": "128Mi"}}}
    sizes = {}
    for o in render_objects(values):
        for where, pod in pod_specs(o):
            tmp = next(v for v in pod["volumes"] if v["name"] == "tmp")
            sizes[where] = tmp["emptyDir"]["sizeLimit"]
    assert sizes == {"study-brain/head": "40Gi", "study-brain/cpu-workers": "50Gi",
                     "study-brain/gpu-workers": "60Gi", "study-brain/submitter": "128Mi",
                     "Deployment/study-mlflow": "5Gi", "StatefulSet/study-postgresql": "300Mi",
                     "StatefulSet/study-minio": "3Gi", "Job/study-minio-bucket": "3Gi"}
    bad = {**copy.deepcopy(DEFAULT_VALUES), "ray": {"head": {"tmpSize": "lots"}}}
    with helm_python.Chart.load(str(CHART)) as chart, pytest.raises(helm_python.HelmValuesError) as err:
        chart.render(bad, name="study", namespace="ml")
    assert "at '/ray/head/tmpSize'" in str(err.value)


# --------------------------------------------------------------------------------- disruption budgets
def test_postgresql_and_minio_have_disruption_budgets_from_values() -> None:
    values = {**copy.deepcopy(DEFAULT_VALUES), "minio": {"enabled": True}}
    objs = render_objects(values)
    pdbs = {o["metadata"]["name"]: o["spec"] for o in objs if o["kind"] == "PodDisruptionBudget"}
    assert set(pdbs) == {"study-postgresql", "study-minio"}
    for name, spec in pdbs.items():
        sts = next(o for o in objs if o["kind"] == "StatefulSet" and o["metadata"]["name"] == name)
        assert _selects(spec["selector"], sts["spec"]["template"]["metadata"]["labels"]), name
        assert not any(_selects(spec["selector"], labels) for n, labels in _pod_templates(objs).items() if n != name)
        assert spec["maxUnavailable"] == 0 and spec["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert [e for o in objs for e in validation_errors(o)] == []
    values["postgresql"] = {"pdb": {"enabled": False}}
    values["minio"]["pdb"] = {"maxUnavailable": 1}
    pdbs = {o["metadata"]["name"]: o["spec"] for o in render_objects(values) if o["kind"] == "PodDisruptionBudget"}
    assert set(pdbs) == {"study-minio"} and pdbs["study-minio"]["maxUnavailable"] == 1


# ----------------------------------------------------------------------------------- capacity check
CPU_STUDY = "cpu-small-values"  # 2 CPU pods of 2 CPUs at most, no GPU group


def _cpu_study(workers: int, cpus: float, replicas: int = 2, pod_cpus: str = "2") -> dict[str, Any]:
    values = ci_values(CHART / "ci" / f"{CPU_STUDY}.yaml")
    values["study"]["spec"]["resources"].update(workers=workers, cpusPerWorker=cpus)
    values["ray"]["cpuWorkers"].update(maxReplicas=replicas, resources={
        "requests": {"cpu": pod_cpus, "memory": "4Gi"}, "limits": {"cpu": pod_cpus, "memory": "4Gi"}})
    return values


@pytest.mark.parametrize(("workers", "cpus", "replicas", "pod_cpus"), [
    (1, 2, 2, "2"),  # the ci values themselves
    (3, 1, 2, "2"),  # 3 of 4 CPUs, one left for the data reads
    (3, 3, 3, "4"),  # one worker per pod
    (4, 0.5, 1, "3"),  # 2 of 3 CPUs
])
def test_a_cpu_study_that_fits_the_worker_group_renders(workers: int, cpus: float, replicas: int,
                                                        pod_cpus: str) -> None:
    _, study = study_objects(render_objects(_cpu_study(workers, cpus, replicas, pod_cpus)))
    assert study["spec"]["resources"]["workers"] == workers


def test_a_cpu_study_whose_workers_cannot_all_be_placed_is_refused_naming_the_values() -> None:
    """workers x cpusPerWorker against the group at maxReplicas, a worker's CPUs on one pod: 3 workers of
    3 CPUs fit 3 pods of 4 CPUs (9 of 12), a 4th does not although 12 CPUs would."""
    err = _render_error(_cpu_study(4, 3, 3, "4"))
    assert ("study.spec.resources: 4 worker(s) x 3 CPUs cannot all be placed: ray.cpuWorkers holds 3 at most "
            "(maxReplicas 3 pods x 1 per pod; a pod has 4 CPUs, its cpu limit); raise "
            "ray.cpuWorkers.maxReplicas or its resources.limits.cpu, or lower study.spec.resources.workers or "
            "cpusPerWorker") in err
    err = _render_error(_cpu_study(3, 2))
    assert "3 worker(s) x 2 CPUs cannot all be placed: ray.cpuWorkers holds 2 at most" in err


def test_a_cpu_study_that_leaves_no_cpu_for_its_data_reads_is_refused() -> None:
    """ctssl's own check (skipped on the head, whose groups start empty) wants one CPU beside the
    workers for Ray Data's read tasks."""
    err = _render_error(_cpu_study(2, 2))
    assert ("study.spec.resources: 2 worker(s) x 2 CPUs take 4 of the 4 CPUs the worker groups hold at their "
            "largest") in err
    assert "raise ray.cpuWorkers.maxReplicas or its resources.limits.cpu" in err


def test_the_heads_cpus_do_not_make_a_study_fit() -> None:
    """The head offers Ray no CPUs (num-cpus 0): a big head changes nothing."""
    values = _cpu_study(3, 2)
    values["ray"]["head"]["resources"] = {"requests": {"cpu": "64", "memory": "8Gi"},
                                          "limits": {"cpu": "64", "memory": "8Gi"}}
    assert "ray.cpuWorkers holds 2 at most" in _render_error(values)


def test_gpu_workers_must_fit_a_pod_by_cpus_as_well_as_by_gpus() -> None:
    """8 workers x 1 GPU on 4 pods x 2 GPUs: with 9 CPUs each only one fits a 16-CPU pod."""
    values = ci_values(CHART / "ci" / "gpu-multinode-values.yaml")
    values["study"]["spec"]["resources"]["cpusPerWorker"] = 9
    err = _render_error(values)
    assert ("8 worker(s) x 9 CPUs cannot all be placed: ray.gpuWorkers holds 4 at most (maxReplicas 4 pods x 1 "
            "per pod; a pod has 16 CPUs, its cpu limit, and 2 GPU(s))") in err
