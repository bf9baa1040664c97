"""Rendering the chart with Helm's own engine and validating what it renders.

Shared by tests/charts and tests/k8s: the Kubernetes built-in kinds are checked with
kubernetes-validate (strict: unknown fields fail), RayJob / RayCluster with the KubeRay v1.7.0 CRD
schemas, converted so that unknown fields fail as they do under strict server-side validation.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from ray_jobs.study.chart_schema import VALUES_SCHEMA, sync_values_schema, values_study_schema

__all__ = ["VALUES_SCHEMA", "sync_values_schema", "values_study_schema"]

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "ctssl"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
CRD_DIR = REPO / "tests" / "data" / "kuberay-crds"  # KubeRay v1.7.0, see its README
KUBE_VERSION = "1.33.0"
RELEASE, NAMESPACE = "study", "ml"


def ci_values(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


def render(values: dict[str, Any] | None = None, name: str = RELEASE) -> dict[str, list[dict[str, Any]]]:
    """Template path -> the objects it rendered (NOTES.txt excluded), via helm_python (Helm v4 engine)."""
    import helm_python

    with helm_python.Chart.load(str(CHART)) as chart:
        out = chart.render(values or {}, name=name, namespace=NAMESPACE, is_install=True)
    return {path: [d for d in yaml.safe_load_all(text) if d]
            for path, text in out.items() if not path.endswith("NOTES.txt")}


def render_objects(values: dict[str, Any] | None = None, name: str = RELEASE) -> list[dict[str, Any]]:
    return [obj for objs in render(values, name).values() for obj in objs]


def notes(values: dict[str, Any] | None = None) -> str:
    import helm_python

    with helm_python.Chart.load(str(CHART)) as chart:
        out = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE)
    return next(text for path, text in out.items() if path.endswith("NOTES.txt"))


def _strict(schema: Any) -> Any:
    """The CRD's OpenAPI schema as JSON Schema with Kubernetes' meaning of its extensions."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    s = {k: _strict(v) for k, v in schema.items() if not k.startswith("x-kubernetes-validations")}
    if s.pop("x-kubernetes-int-or-string", False):
        s.pop("type", None)
        s = {"anyOf": [{"type": "integer"}, {"type": "string"}], **s}
    preserve = s.pop("x-kubernetes-preserve-unknown-fields", False)
    for k in [k for k in s if k.startswith("x-kubernetes-")]:
        s.pop(k)
    if s.get("type") == "object" and not preserve and "properties" in s and "additionalProperties" not in s:
        s["additionalProperties"] = False
    return s


@functools.cache
def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    files = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
    path = CRD_DIR / files[kind]
    assert path.is_file(), f"KubeRay CRD expected at {path} (vendored in tests/data/kuberay-crds)"
    crd = yaml.safe_load(path.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    # metadata is `type: object` in every CRD; the API server checks it as ObjectMeta
    schema["properties"]["metadata"] = {
        "type": "object", "required": ["name"], "additionalProperties": False,
        "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 47},
                       "namespace": {"type": "string"},
                       "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                       "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}}
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
    return jsonschema.Draft7Validator(schema)


def validation_errors(obj: dict[str, Any]) -> list[str]:
    """Every schema violation of one object, as 'Kind/name: path: message'."""
    import kubernetes_validate

    where = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    if obj.get("apiVersion", "").startswith("ray.io/"):
        return [f"{where}: {'.'.join(map(str, e.absolute_path))}: {e.message}"
                for e in crd_validator(obj["kind"]).iter_errors(obj)]
    try:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{where}: {'.'.join(map(str, e.absolute_path))}: {e.message}"]
    return []


def study_objects(objs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the RayJob, the study document of its spec ConfigMap) of a render with one study."""
    [rj] = [o for o in objs if o["kind"] == "RayJob"]
    cm = next(o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == f"{rj['metadata']['name']}-spec")
    return rj, yaml.safe_load(cm["data"]["study.yaml"])


# ------------------------------------------------------------------- the study schema in values.schema.json
# generated by ray_jobs.study.chart_schema (`make schema`); VALUES_SCHEMA, values_study_schema and
# sync_values_schema are re-exported from there for the chart tests


@functools.cache
def _render_ci_cached(stem: str) -> tuple[dict[str, Any], ...]:
    return tuple(render_objects(ci_values(CHART / "ci" / f"{stem}.yaml")))


def render_ci(stem: str) -> list[dict[str, Any]]:
    """The objects a ci values file renders (rendered once per session; callers get a copy)."""
    return copy.deepcopy(list(_render_ci_cached(stem)))


def pod_specs(obj: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every pod spec in an object, with where it is: workload templates, Ray head / workers, submitter."""
    spec = obj.get("spec") or {}
    kind = obj["kind"]
    if kind in ("Deployment", "StatefulSet", "Job"):
        return [(f"{kind}/{obj['metadata']['name']}", spec["template"]["spec"])]
    if kind == "RayJob":
        name = obj["metadata"]["name"]
        rc = spec["rayClusterSpec"]
        out = [(f"{name}/head", rc["headGroupSpec"]["template"]["spec"])]
        out += [(f"{name}/{g['groupName']}", g["template"]["spec"]) for g in rc.get("workerGroupSpecs", [])]
        if "submitterPodTemplate" in spec:
            out.append((f"{name}/submitter", spec["submitterPodTemplate"]["spec"]))
        return out
    return []


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return list(pod.get("initContainers") or []) + list(pod.get("containers") or [])


if __name__ == "__main__":  # kept for habit: `make schema` runs ray_jobs.study.chart_schema
    print("values.schema.json " + ("updated" if sync_values_schema() else "already up to date"))
