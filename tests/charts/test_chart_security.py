"""Security properties of what the chart renders, for the default values and every ci values file.

- the Ray job API (port 8265, which runs any command it is sent) is reachable only from the release's
  own pods and the KubeRay operator's pods, and the Ray cluster requires a token;
- no container but the Ray autoscaler gets a Kubernetes API token;
- every container runs with a read-only root filesystem, and every path it writes is a mounted volume;
- images can be pinned by digest;
- MLflow runs its basic-auth app and the jobs log in with the admin login from a Secret;
- every generated Secret can be replaced by an existing one, and workloads never get MinIO's root login.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import PurePosixPath
from typing import Any

import pytest

from tests.charts.chart_support import (
    CHART,
    CI_VALUES,
    ci_values,
    containers,
    pod_specs,
    render,
    render_ci,
    render_objects,
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
def _ray_dashboard_peers(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    ray = next(o for o in objs if o["kind"] == "NetworkPolicy" and o["metadata"]["name"].endswith("-ray"))
    rules = [r for r in ray["spec"]["ingress"] if r.get("ports")]
    assert [p["port"] for r in rules for p in r["ports"]] == [8265]
    return [peer for r in rules for peer in r["from"]]


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
    # every other port of the Ray pods: the release's own pods only
    ray = next(o for o in objs if o["kind"] == "NetworkPolicy" and o["metadata"]["name"].endswith("-ray"))
    open_rules = [r for r in ray["spec"]["ingress"] if not r.get("ports")]
    assert open_rules == [{"from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "ctssl",
                                                                     "app.kubernetes.io/instance": "study"}}}]}]


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
def test_mlflow_runs_basic_auth_and_every_job_logs_in_from_the_secret(case: str) -> None:
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
    # the auth-config emptyDir lives in memory: the file holds the database URI with its password
    assert next(v for v in pod["volumes"] if v["name"] == "auth-config")["emptyDir"]["medium"] == "Memory"
    secret = next(o for o in objs if o["kind"] == "Secret" and o["metadata"]["name"] == "study-mlflow-auth")
    assert set(secret["data"]) == {"username", "password", "flask-secret-key"}
    jobs = _workload_containers(objs)
    assert jobs
    for where, c in jobs:
        e = _env(c)
        if "MLFLOW_TRACKING_URI" not in e:
            continue  # seed-cache and the submitter run no ctssl command
        assert _secret_ref(e["MLFLOW_TRACKING_USERNAME"]) == ("study-mlflow-auth", "username"), where
        assert _secret_ref(e["MLFLOW_TRACKING_PASSWORD"]) == ("study-mlflow-auth", "password"), where


def test_the_rendered_auth_config_is_what_mlflow_reads(tmp_path, monkeypatch) -> None:
    """Run the init container's script with its env and read the file back with MLflow's own reader
    (a '%' of a URL-encoded password must survive configparser's interpolation)."""
    pod = _mlflow_pod(render_objects(DEFAULT_VALUES))
    init = pod["initContainers"][0]
    assert init["command"][:2] == ["python", "-c"]
    uri = "postgresql://mlflow:p%40ss@study-postgresql:5432/mlflow"
    path = tmp_path / "basic_auth.ini"
    monkeypatch.setenv("MLFLOW_BACKEND_STORE_URI", uri)
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(path))
    monkeypatch.setenv("AUTH_DEFAULT_PERMISSION", _env(init)["AUTH_DEFAULT_PERMISSION"]["value"])
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_USERNAME", "ctssl-admin")
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "a-long-random-password")
    exec(compile(init["command"][2], "auth-config", "exec"), {})  # noqa: S102 - the chart's own script
    assert path.stat().st_mode & 0o777 == 0o600
    # mlflow.server.auth's package init needs Flask-WTF (the image has it, see the next test): load the
    # config reader on its own
    import importlib.util

    import mlflow

    spec = importlib.util.spec_from_file_location(
        "mlflow_auth_config", PurePosixPath(mlflow.__file__).parent / "server" / "auth" / "config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.read_auth_config()
    assert cfg.database_uri == uri and cfg.default_permission == "READ"
    assert (cfg.admin_username, cfg.admin_password) == ("ctssl-admin", "a-long-random-password")


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
    external = render_objects({**DEFAULT_VALUES, "mlflow": {
        "enabled": False, "trackingUri": "https://mlflow.example.com", "auth": {"existingSecret": "mlflow-login"}}})
    assert not any(o["kind"] == "Secret" for o in external)
    logged_in = [c for _, c in _workload_containers(external) if "MLFLOW_TRACKING_URI" in _env(c)]
    assert logged_in and all(_secret_ref(_env(c)["MLFLOW_TRACKING_PASSWORD"]) == ("mlflow-login", "password")
                             for c in logged_in)


# ----------------------------------------------------------------------------------------- Secrets
def test_every_generated_secret_can_be_an_existing_one() -> None:
    values = {**copy.deepcopy(DEFAULT_VALUES),
              "storage": {"bucket": "ctssl", "existingSecret": "site-s3-user"},
              "minio": {"enabled": True, "existingSecret": "site-minio-root"},
              "postgresql": {"existingSecret": "site-pg"},
              "mlflow": {"auth": {"existingSecret": "site-mlflow-login"}}}
    objs = render_objects(values)
    assert [o["metadata"]["name"] for o in objs if o["kind"] == "Secret"] == []
    refs = {_secret_ref(e)[0] for o in objs for _, pod in pod_specs(o) for c in containers(pod)
            for e in c.get("env") or [] if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]}
    assert refs == {"site-s3-user", "site-minio-root", "site-pg", "site-mlflow-login"}
    assert [e for o in objs for e in validation_errors(o)] == []


def test_generated_secrets_are_random_kept_on_uninstall_and_read_back_on_upgrade() -> None:
    values = {**DEFAULT_VALUES, "minio": {"enabled": True}}
    first, second = render(values), render(values)
    path = "ctssl/templates/secrets-generated.yaml"
    a, b = first[path], second[path]
    assert [s["metadata"]["name"] for s in a] == ["study-minio-root", "study-s3", "study-postgresql",
                                                 "study-mlflow-auth"]
    for s1, s2 in zip(a, b, strict=True):
        assert s1["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
        changing = [k for k in s1["data"] if s1["data"][k] != s2["data"][k]]
        fixed = {"study-mlflow-auth": ["username"]}.get(s1["metadata"]["name"], [])
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
    # the bucket Job makes the workloads' user (keys from study-s3) with a policy for this bucket only
    mc = _minio_bucket_job(objs)
    env = _env(mc)
    assert _secret_ref(env["USER_ACCESS_KEY"]) == ("study-s3", "AWS_ACCESS_KEY_ID")
    assert env["MC_HOST_local"]["value"] == "http://$(ROOT_USER):$(ROOT_PASSWORD)@study-minio:9000"
    script = mc["command"][-1]
    policy_text = script.split("<<EOF\n", 1)[1].split("\nEOF\n", 1)[0].replace("$BUCKET", env["BUCKET"]["value"])
    policy = json.loads(policy_text)
    resources = {r for st in policy["Statement"] for r in st["Resource"]}
    assert resources == {"arn:aws:s3:::ctssl", "arn:aws:s3:::ctssl/*"}
    assert all(a.startswith("s3:") and "*" not in a for st in policy["Statement"] for a in st["Action"])
    for step in ('mc admin policy create local "$POLICY" /tmp/policy.json',
                 'mc admin user add local "$USER_ACCESS_KEY" "$USER_SECRET_KEY"',
                 'mc admin policy attach local "$POLICY" --user "$USER_ACCESS_KEY"'):
        assert step in script
