"""The chart renders with Helm's own engine, lints clean, and every object it renders is valid.

Built-in kinds are validated with kubernetes-validate (strict) and RayJobs with the KubeRay v1.7.0 CRD
schema, so an object a real API server would reject fails here.
"""

from __future__ import annotations

import copy
import shutil
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tests.charts.chart_support import (
    CHART,
    CI_VALUES,
    ci_values,
    notes,
    render,
    render_objects,
    validation_errors,
)

IDS = [p.stem for p in CI_VALUES]


def test_the_three_ci_values_files_exist() -> None:
    assert IDS == ["cpu-small-values", "external-s3-postgres-values", "gpu-multinode-values"]


@pytest.fixture(scope="module", params=CI_VALUES, ids=IDS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict]]:
    return request.param.stem, render_objects(ci_values(request.param))


def test_ci_values_render_the_whole_stack_and_one_rayjob_per_method(rendered) -> None:
    name, objs = rendered
    kinds = Counter(o["kind"] for o in objs)
    values = ci_values(CHART / "ci" / f"{name}.yaml")
    methods = values["pretrain"]["methods"]
    reduce = values.get("reduce", {}).get("enabled", False)
    # one RayJob per method, one for the study (+ one for the reduction when it is on)
    assert kinds["RayJob"] == len(methods) + 1 + int(reduce)
    rayjobs = {o["metadata"]["name"] for o in objs if o["kind"] == "RayJob"}
    assert {f"study-pretrain-{m}" for m in methods} | {"study-finetune"} <= rayjobs
    assert ("study-reduce" in rayjobs) == reduce
    assert kinds["ConfigMap"] == 1 and kinds["ServiceAccount"] == 1 and kinds["Role"] == 1
    assert kinds["Deployment"] == 1  # MLflow
    assert kinds["NetworkPolicy"] >= 3
    statefulsets = {o["metadata"]["name"] for o in objs if o["kind"] == "StatefulSet"}
    bundled_pg = values.get("postgresql", {}).get("enabled", True)
    assert ("study-postgresql" in statefulsets) == bundled_pg
    assert ("study-minio" in statefulsets) == values.get("minio", {}).get("enabled", False)
    prep = next(o for o in objs if o["kind"] == "Job" and o["metadata"]["name"] == "study-prep")
    assert prep["spec"]["completionMode"] == "Indexed"
    assert prep["spec"]["completions"] == values["prep"]["numShards"]
    assert prep["spec"]["parallelism"] == values["prep"]["parallelism"]


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
    head = rj["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["volumeMount"] = head.pop("volumeMounts")
    assert any("volumeMount" in e for e in validation_errors(rj))
    rj = copy.deepcopy(next(o for o in objs if o["kind"] == "RayJob"))
    rj["spec"]["backoffLimit"] = "one"
    assert any("backoffLimit" in e for e in validation_errors(rj))


def test_a_typo_in_a_builtin_kind_fails_strict_validation(rendered) -> None:
    _, objs = rendered
    job = copy.deepcopy(next(o for o in objs if o["kind"] == "Job" and o["metadata"]["name"] == "study-prep"))
    job["spec"]["template"]["spec"]["containers"][0]["imagePullPolicey"] = "Always"
    assert any("imagePullPolicey" in e for e in validation_errors(job))
    dep = copy.deepcopy(next(o for o in objs if o["kind"] == "Deployment"))
    dep["spec"]["replica"] = 2
    assert any("replica" in e for e in validation_errors(dep))


def test_chart_lints_clean_and_only_notes_the_unvendored_operator_dependency(tmp_path: Path) -> None:
    """The KubeRay operator is an optional dependency fetched by `helm dependency build`, which needs
    the network; everything else must lint clean in strict mode for every ci values file."""
    import helm_python

    for path in CI_VALUES:
        report = helm_python.lint(str(CHART), ci_values(path), strict=True, kube_version="v1.33.0",
                                  namespace="ml")
        assert report["errors"] == ["chart directory is missing these dependencies: kuberay-operator"], path
        assert [m for m in report["messages"] if "kuberay-operator" not in m["error"]] == []
    # the same chart without the optional dependency: no finding at all
    copy_dir = tmp_path / "ctssl"
    shutil.copytree(CHART, copy_dir)
    meta = yaml.safe_load((copy_dir / "Chart.yaml").read_text())
    meta.pop("dependencies")
    (copy_dir / "Chart.yaml").write_text(yaml.safe_dump(meta))
    for path in CI_VALUES:
        report = helm_python.lint(str(copy_dir), ci_values(path), strict=True, kube_version="v1.33.0")
        assert report["messages"] == [] and report["errors"] == [], (path, report)


def test_kuberay_operator_is_an_optional_dependency_off_by_default() -> None:
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    dep = next(d for d in meta["dependencies"] if d["name"] == "kuberay-operator")
    assert dep["version"] == "1.7.0" and dep["condition"] == "kuberay-operator.enabled"
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["kuberay-operator"]["enabled"] is False
    assert not (CHART / "charts").exists()  # nothing fetched is vendored


def test_rendering_is_deterministic_apart_from_generated_credentials() -> None:
    values = ci_values(CHART / "ci" / "gpu-multinode-values.yaml")
    first, second = render(values), render(values)
    generated = "ctssl/templates/secrets-generated.yaml"
    pw1 = first.pop(generated)[0]["data"]["password"]
    pw2 = second.pop(generated)[0]["data"]["password"]
    assert first == second
    assert pw1 != pw2  # the bundled database's password is random, never a value from values.yaml


def test_notes_explain_port_forwards_and_ray_job_submit() -> None:
    text = notes(ci_values(CHART / "ci" / "cpu-small-values.yaml"))
    assert "kubectl -n ml port-forward svc/study-mlflow 5000:5000" in text
    assert "port-forward svc/<raycluster-name>-head-svc 8265:8265" in text
    assert "ray job submit --address http://localhost:8265 -- ctssl pretrain" in text
    assert "ctssl k8s status --release study -n ml" in text
    assert "kuberay-operator.enabled=false" in text  # says the operator must exist already


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


VARIANTS = {
    "external-mlflow": {"mlflow": {"enabled": False, "trackingUri": "https://mlflow.example.com"}},
    "no-prep": {"prep": {"enabled": False, "source": ""}, "pretrain": {"data": "s3://other/shards"}},
    "report-only": {"finetune": {"enabled": False, "data": ""}},
    "no-finetune-no-report": {"finetune": {"enabled": False}, "report": {"enabled": False}},
    "no-methods": {"pretrain": {"methods": []}},
    "no-network-policy-no-rbac": {"networkPolicy": {"enabled": False}, "rbac": {"create": False},
                                  "serviceAccount": {"create": False, "name": "existing-sa"}},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variants_of_the_cpu_values_render_valid_objects(variant: str) -> None:
    values = copy.deepcopy(ci_values(CHART / "ci" / "cpu-small-values.yaml"))
    for key, patch in VARIANTS[variant].items():
        values[key] = {**values.get(key, {}), **patch}
    objs = render_objects(values)
    assert [e for o in objs for e in validation_errors(o)] == []
    names = {(o["kind"], o["metadata"]["name"]) for o in objs}
    # `ctssl k8s submit` builds the same stage objects from the rendered experiment config
    from ray_jobs.k8s.objects import build_objects
    from tests.charts.chart_support import experiment_from_render

    built = {(o["kind"], o["metadata"]["name"]): o["spec"] for o in build_objects(experiment_from_render(objs))}
    assert built == {(o["kind"], o["metadata"]["name"]): o["spec"] for o in objs
                     if o["kind"] == "RayJob" or o["metadata"]["name"] == "study-prep"}
    if variant == "external-mlflow":
        assert ("Deployment", "study-mlflow") not in names and ("StatefulSet", "study-postgresql") not in names
        rj = next(o for o in objs if o["kind"] == "RayJob")
        assert "--tracking-uri https://mlflow.example.com" in rj["spec"]["entrypoint"]
    if variant == "no-prep":
        assert ("Job", "study-prep") not in names
        rj = next(o for o in objs if o["metadata"]["name"] == "study-pretrain-byol")
        head = rj["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
        waits = {c["name"]: c["command"] for c in head["initContainers"]}
        assert waits["wait-for-data"][2] == "s3://other/shards"
    if variant == "report-only":
        ft = next(o for o in objs if o["metadata"]["name"] == "study-finetune")
        assert ft["spec"]["entrypoint"].startswith("ctssl report ")
        head = ft["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
        assert [c["name"] for c in head["initContainers"]] == ["seed-cache"]  # nothing to wait for
    if variant == "no-finetune-no-report":
        assert ("RayJob", "study-finetune") not in names
    if variant == "no-methods":
        assert [n for k, n in names if k == "RayJob"] == ["study-finetune"]
    if variant == "no-network-policy-no-rbac":
        assert not {k for k, _ in names} & {"NetworkPolicy", "Role", "RoleBinding", "ServiceAccount"}
        rj = next(o for o in objs if o["kind"] == "RayJob")
        assert rj["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["serviceAccountName"] == "existing-sa"
