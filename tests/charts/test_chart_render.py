"""The chart renders with Helm's own engine, lints clean, and every object it renders is valid.

Built-in kinds are validated with kubernetes-validate (strict) and RayJobs with the KubeRay v1.7.0 CRD
schema, so an object a real API server would reject fails here. A study is one RayJob on an
autoscaling Ray cluster whose worker groups start at 0 pods.
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tests.charts.chart_support import (
    CHART,
    CI_VALUES,
    REPO,
    ci_values,
    notes,
    render,
    render_objects,
    study_objects,
    validation_errors,
)

IDS = [p.stem for p in CI_VALUES]


def test_the_three_ci_values_files_exist() -> None:
    assert IDS == ["cpu-small-values", "external-s3-postgres-values", "gpu-multinode-values"]


@pytest.fixture(scope="module", params=CI_VALUES, ids=IDS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict]]:
    return request.param.stem, render_objects(ci_values(request.param))


def test_ci_values_render_the_platform_and_exactly_one_rayjob_for_the_study(rendered) -> None:
    name, objs = rendered
    kinds = Counter(o["kind"] for o in objs)
    values = ci_values(CHART / "ci" / f"{name}.yaml")
    study = values["study"]["metadata"]["name"]
    assert kinds["RayJob"] == 1
    rj, _ = study_objects(objs)
    assert rj["metadata"]["name"] == f"study-{study}"
    assert rj["spec"]["entrypoint"] == "ctssl study run -f /etc/ctssl/study.yaml"
    assert kinds["ConfigMap"] == 1 and kinds["ServiceAccount"] == 1 and kinds["Role"] == 1
    assert kinds["Deployment"] == 1  # MLflow
    assert kinds["NetworkPolicy"] >= 2  # MLflow and Ray (+ PostgreSQL, MinIO when bundled)
    # no stage of its own: the only batch Job is MinIO's bucket Job
    assert [o["metadata"]["name"] for o in objs if o["kind"] == "Job"] == (
        ["study-minio-bucket"] if values.get("minio", {}).get("enabled") else [])
    statefulsets = {o["metadata"]["name"] for o in objs if o["kind"] == "StatefulSet"}
    assert ("study-postgresql" in statefulsets) == values.get("postgresql", {}).get("enabled", True)
    assert ("study-minio" in statefulsets) == values.get("minio", {}).get("enabled", False)


def test_the_study_cluster_autoscales_every_worker_group_from_zero(rendered) -> None:
    name, objs = rendered
    values = ci_values(CHART / "ci" / f"{name}.yaml")
    rj, _ = study_objects(objs)
    rc = rj["spec"]["rayClusterSpec"]
    assert rc["enableInTreeAutoscaling"] is True
    assert rc["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    assert rc["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # training never lands on the head
    groups = {g["groupName"]: g for g in rc["workerGroupSpecs"]}
    want = {"cpu-workers": values["ray"]["cpuWorkers"]["maxReplicas"],
            "gpu-workers": values["ray"]["gpuWorkers"]["maxReplicas"]}
    assert {g: n for g, n in want.items() if n} == {g: s["maxReplicas"] for g, s in groups.items()}
    for g in groups.values():
        assert g["minReplicas"] == 0 and g["replicas"] == 0, g["groupName"]
    spec = rj["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["backoffLimit"] >= 1
    assert spec["activeDeadlineSeconds"] > 0


def test_every_rendered_object_passes_strict_schema_validation(rendered) -> None:
    _, objs = rendered
    errors = [e for o in objs for e in validation_errors(o)]
    assert errors == []


def test_a_typo_in_a_rayjob_field_fails_crd_validation(rendered) -> None:
    _, objs = rendered
    rj = copy.deepcopy(next(o for o in objs if o["kind"] == "RayJob"))
    spec = rj["spec"]
    spec["shutdownAfterJobFinish"] = spec.pop("shutdownAfterJobFinishes")  # missing "es"
    errors = validation_errors(rj)
    assert len(errors) == 1 and "shutdownAfterJobFinish" in errors[0]
    rj = copy.deepcopy(next(o for o in objs if o["kind"] == "RayJob"))
    rj["spec"]["rayClusterSpec"]["autoscalerOptions"]["idleTimeout"] = 60
    assert any("idleTimeout" in e for e in validation_errors(rj))
    rj = copy.deepcopy(next(o for o in objs if o["kind"] == "RayJob"))
    rj["spec"]["backoffLimit"] = "one"
    assert any("backoffLimit" in e for e in validation_errors(rj))


def test_a_typo_in_a_builtin_kind_fails_strict_validation(rendered) -> None:
    _, objs = rendered
    dep = copy.deepcopy(next(o for o in objs if o["kind"] == "Deployment"))
    dep["spec"]["template"]["spec"]["containers"][0]["imagePullPolicey"] = "Always"
    assert any("imagePullPolicey" in e for e in validation_errors(dep))
    dep = copy.deepcopy(next(o for o in objs if o["kind"] == "Deployment"))
    dep["spec"]["replica"] = 2
    assert any("replica" in e for e in validation_errors(dep))


def test_chart_lints_clean_with_no_dependency_to_fetch() -> None:
    """A fresh clone installs without a chart repository: Chart.yaml declares no dependency (the KubeRay
    operator is installed on its own, docs/operations.md), so strict lint has no finding at all."""
    import helm_python

    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert "dependencies" not in meta and not (CHART / "Chart.lock").exists()
    for path in CI_VALUES:
        report = helm_python.lint(str(CHART), ci_values(path), strict=True, kube_version="v1.33.0", namespace="ml")
        assert report["errors"] == [] and report["messages"] == [], (path, report)


def test_rendering_is_deterministic_apart_from_generated_credentials() -> None:
    values = ci_values(CHART / "ci" / "cpu-small-values.yaml")
    first, second = render(values), render(values)
    generated = "ctssl/templates/secrets-generated.yaml"
    pw1 = first.pop(generated)[2]["data"]["password"]
    pw2 = second.pop(generated)[2]["data"]["password"]
    assert first == second
    assert pw1 != pw2  # the bundled database's password is random, never a value from values.yaml


def test_notes_say_how_to_follow_the_study_and_where_its_report_lands() -> None:
    text = notes(ci_values(CHART / "ci" / "cpu-small-values.yaml"))
    assert "kubectl -n ml port-forward svc/study-mlflow 5000:5000" in text
    assert "ctssl k8s status --release study -n ml" in text
    assert "ctssl k8s logs study-phantom -n ml --follow" in text
    assert "s3://ctssl/study/studies/phantom/report/report.html" in text
    assert "peak 0 GPU(s)" in text
    assert "KubeRay operator (1.7) in namespace kuberay-system" in text
    platform = notes({"storage": {"bucket": "ctssl"}})
    assert "No study" in platform and "ctssl k8s values -f study.yaml" in platform


def test_values_yaml_documents_every_key_with_a_comment() -> None:
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "-")) or ":" not in stripped:
            continue
        key = stripped.split(":", 1)[0]
        if key in ("requests", "limits") or line.startswith(" " * 6 + "- "):
            continue  # inside a resources map: documented by its parent key
        prev = lines[i - 1].strip() if i else ""
        if not prev.startswith("#"):
            undocumented.append(f"line {i + 1}: {key}")
    assert undocumented == []


# ------------------------------------------------------------------------------------------ peak GPUs
def _peak_gpus(rayjob: dict) -> int:
    """GPUs the study's cluster can hold at once: every group at maxReplicas (the head has none)."""
    total = 0
    for g in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        total += g["maxReplicas"] * int(limits.get("nvidia.com/gpu", 0))
    return total


def test_peak_gpus_of_each_example_are_documented_in_the_operations_guide() -> None:
    """docs/operations.md's table gives each ci values file's peak GPU count (not a sum over stages:
    the stages share one autoscaling cluster)."""
    guide = (REPO / "docs" / "operations.md").read_text()
    documented = {m.group(1): int(m.group(2)) for m in
                  re.finditer(r"^\| `charts/ctssl/ci/([\w-]+)\.yaml` \|.*?\| (\d+) \|\s*$", guide, re.M)}
    peaks = {}
    for path in CI_VALUES:
        rj, _ = study_objects(render_objects(ci_values(path)))
        peaks[path.stem] = _peak_gpus(rj)
        assert rj["metadata"]["annotations"]["ctssl.io/peak-gpus"] == str(peaks[path.stem])
    assert peaks == {"cpu-small-values": 0, "external-s3-postgres-values": 2, "gpu-multinode-values": 8}
    assert documented == peaks


# ------------------------------------------------------------------------------------------ variants
VARIANTS = {
    "platform-only": {"study": None},
    "external-mlflow": {"mlflow": {"enabled": False, "trackingUri": "https://mlflow.example.com"}},
    "no-network-policy-no-rbac": {"networkPolicy": {"enabled": False}, "rbac": {"create": False},
                                  "serviceAccount": {"create": False, "name": "existing-sa"}},
    "gpu-group": {"ray": {"gpuWorkers": {"maxReplicas": 3, "gpus": 2}}},
    "kueue-and-runtime-env": {"rayJob": {"queueName": "team-a", "runtimeEnv": {"env_vars": {"NCCL_DEBUG": "INFO"}}}},
    "deid-secret": {"deid": {"existingSecret": "site-deid"}},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variants_of_the_cpu_values_render_valid_objects(variant: str) -> None:
    values = copy.deepcopy(ci_values(CHART / "ci" / "cpu-small-values.yaml"))
    for key, patch in VARIANTS[variant].items():
        values[key] = {**values.get(key, {}), **patch} if isinstance(patch, dict) else patch
    if variant == "gpu-group":
        values["ray"]["gpuWorkers"] = {**ci_values(CHART / "ci" / "cpu-small-values.yaml")["ray"]["gpuWorkers"],
                                       "maxReplicas": 3, "gpus": 2}
    objs = render_objects(values)
    assert [e for o in objs for e in validation_errors(o)] == []
    names = {(o["kind"], o["metadata"]["name"]) for o in objs}
    if variant == "platform-only":
        assert not {k for k, _ in names} & {"RayJob", "ConfigMap"}
        assert ("Deployment", "study-mlflow") in names
        return
    rj, study = study_objects(objs)
    head = rj["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    env = {e["name"]: e for e in head["containers"][0]["env"]}
    if variant == "external-mlflow":
        assert ("Deployment", "study-mlflow") not in names and ("StatefulSet", "study-postgresql") not in names
        assert study["spec"]["tracking"]["uri"] == "https://mlflow.example.com"
        assert env["MLFLOW_TRACKING_URI"]["value"] == "https://mlflow.example.com"
    if variant == "no-network-policy-no-rbac":
        assert not {k for k, _ in names} & {"NetworkPolicy", "Role", "RoleBinding", "ServiceAccount"}
        assert head["serviceAccountName"] == "existing-sa"
    if variant == "gpu-group":
        gpu = next(g for g in rj["spec"]["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "gpu-workers")
        assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] == 3
        assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2
        assert env["CTSSL_AUTOSCALER_MAX_GPUS"]["value"] == "6"
        assert study["spec"]["resources"]["maxConcurrentTrials"] == 6  # one trial per GPU at the peak
        assert "gpusPerWorker" not in study["spec"]["resources"]  # auto: ctssl decides on the cluster
    if variant == "kueue-and-runtime-env":
        assert rj["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
        assert yaml.safe_load(rj["spec"]["runtimeEnvYAML"]) == {"env_vars": {"NCCL_DEBUG": "INFO"}}
    if variant == "deid-secret":
        assert study["spec"]["deid"]["keyFile"] == "/etc/ctssl/deid/deid-key"
        vol = next(v for v in head["volumes"] if v["name"] == "deid-key")
        assert vol["secret"]["secretName"] == "site-deid"
        mount = next(m for m in head["containers"][0]["volumeMounts"] if m["name"] == "deid-key")
        assert mount == {"name": "deid-key", "mountPath": "/etc/ctssl/deid", "readOnly": True}
    else:
        assert "deid" not in study["spec"]  # a phantom study generates its key


def _render_error(values: dict) -> str:
    import helm_python

    with helm_python.Chart.load(str(CHART)) as chart, pytest.raises(helm_python.HelmError) as err:
        chart.render(values, name="study", namespace="ml")
    return str(err.value)


def test_a_study_that_cannot_fit_the_worker_groups_fails_at_install_naming_the_values() -> None:
    """The groups start empty, so ctssl cannot see what the autoscaler may add: the chart refuses a study
    that could never be placed (Ray would wait forever for it)."""
    base = ci_values(CHART / "ci" / "gpu-multinode-values.yaml")
    too_many = copy.deepcopy(base)
    too_many["study"]["spec"]["resources"]["workers"] = 12
    assert ("study.spec.resources: 12 worker(s) x auto GPU need 12 GPUs but ray.gpuWorkers holds 8 "
            "(maxReplicas 4 x gpus 2)") in _render_error(too_many)
    fat = copy.deepcopy(base)
    fat["study"]["spec"]["resources"]["cpusPerWorker"] = 20
    assert "study.spec.resources.cpusPerWorker 20 exceeds the 16 CPUs of a ray.gpuWorkers pod" in _render_error(fat)
    cpu = ci_values(CHART / "ci" / "cpu-small-values.yaml")
    cpu["study"]["spec"]["resources"]["gpusPerWorker"] = 1
    assert "ray.gpuWorkers holds 0" in _render_error(cpu)


def test_a_rayjob_name_longer_than_kuberay_allows_is_refused_with_the_fix(tmp_path: Path) -> None:
    values = ci_values(CHART / "ci" / "cpu-small-values.yaml")
    values["fullnameOverride"] = "s" * 30
    values["study"]["metadata"]["name"] = "a-study-name-of-twenty"
    err = _render_error(values)
    assert "KubeRay allows 47" in err and "shorten the release name" in err
    values["study"]["metadata"]["name"] = "s" * 16  # 30 + 1 + 16 = 47: fits
    objs = render_objects(values)
    assert len(study_objects(objs)[0]["metadata"]["name"]) == 47
    assert [e for o in objs for e in validation_errors(o)] == []
