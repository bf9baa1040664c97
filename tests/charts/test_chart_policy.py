"""Policy on what the chart renders: Pod Security "restricted" settings, resources on every container,
no secret values outside Secrets, /dev/shm on Ray pods, and GPUs only where a GPU group asks for them
(the autoscaler sidecar, which KubeRay builds from autoscalerOptions, included)."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.charts.chart_support import CHART, CI_VALUES, containers, pod_specs, render_ci

IDS = [p.stem for p in CI_VALUES]
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|PRIVATE_KEY", re.I)
INLINE_CREDENTIALS = re.compile(r"://[^/\s:@]+:([^@\s]+)@")


@pytest.mark.parametrize("stem", IDS)
def test_every_pod_and_container_runs_restricted(stem: str) -> None:
    pods = [p for o in render_ci(stem) for p in pod_specs(o)]
    assert len(pods) >= 5
    for where, pod in pods:
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] > 0, where
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert pod.get("hostNetwork") is not True and pod.get("hostPID") is not True, where
        for c in containers(pod):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, (where, c["name"])
            assert sc["capabilities"] == {"drop": ["ALL"]}, (where, c["name"])
            assert sc.get("privileged", False) is False, (where, c["name"])
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, (where, c["name"])
        for v in pod.get("volumes") or []:
            assert "hostPath" not in v, (where, v)
    for rj in (o for o in render_ci(stem) if o["kind"] == "RayJob"):
        sc = rj["spec"]["rayClusterSpec"]["autoscalerOptions"]["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["runAsNonRoot"] is True and sc["seccompProfile"] == {"type": "RuntimeDefault"}


@pytest.mark.parametrize("stem", IDS)
def test_every_container_requests_and_limits_cpu_and_memory(stem: str) -> None:
    for o in render_ci(stem):
        for where, pod in pod_specs(o):
            for c in containers(pod):
                res = c["resources"]
                for part in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(res.get(part, {})), (where, c["name"], part)
        if o["kind"] == "RayJob":
            res = o["spec"]["rayClusterSpec"]["autoscalerOptions"]["resources"]
            assert {"cpu", "memory"} <= set(res["requests"]) and {"cpu", "memory"} <= set(res["limits"])


@pytest.mark.parametrize("stem", IDS)
def test_no_secret_value_appears_outside_a_secret(stem: str) -> None:
    objs = render_ci(stem)
    for o in objs:
        for where, pod in pod_specs(o):
            for c in containers(pod):
                for env in c.get("env") or []:
                    if SECRET_NAME.search(env["name"]):
                        assert "valueFrom" in env and "value" not in env, (where, env["name"])
                    m = INLINE_CREDENTIALS.search(env.get("value", ""))
                    if m:  # credentials inside a URL only as $(VAR) references to Secret-backed vars
                        assert re.fullmatch(r"\$\([A-Z_]+\)", m.group(1)), (where, env["name"])
        assert o["kind"] != "Secret" or "stringData" not in o
    # the only Secrets are the generated credentials of bundled services (random, see render test)
    secrets = {o["metadata"]["name"] for o in objs if o["kind"] == "Secret"}
    assert secrets <= {"study-s3", "study-minio-root", "study-postgresql", "study-mlflow-auth", "study-mlflow-jobs",
                       "study-mlflow-s3"}


def test_values_yaml_defaults_hold_no_secret_values() -> None:
    def walk(node, path=""):
        if isinstance(node, dict):
            for k, v in node.items():
                yield from walk(v, f"{path}.{k}" if path else k)
        else:
            yield path, node

    for path, value in walk(yaml.safe_load((CHART / "values.yaml").read_text())):
        leaf = path.rsplit(".", 1)[-1]
        if re.search(r"password|secretkey|token|accesskey", leaf, re.I) and not leaf.endswith("Key"):
            assert value in ("", None), path
        if isinstance(value, str):
            assert not INLINE_CREDENTIALS.search(value), path


@pytest.mark.parametrize("stem", IDS)
def test_every_ray_pod_mounts_a_memory_backed_dev_shm(stem: str) -> None:
    rayjobs = [o for o in render_ci(stem) if o["kind"] == "RayJob"]
    assert rayjobs
    for rj in rayjobs:
        for where, pod in pod_specs(rj):
            if where.endswith("/submitter"):
                continue  # the submitter only runs `ray job submit`
            shm = [v for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
            assert len(shm) == 1 and shm[0]["emptyDir"]["sizeLimit"], where
            ray = pod["containers"][0]
            assert {"name": shm[0]["name"], "mountPath": "/dev/shm"} in ray["volumeMounts"], where


def test_gpu_limits_only_on_the_gpu_worker_group() -> None:
    gpu_values = yaml.safe_load((CHART / "ci" / "gpu-multinode-values.yaml").read_text())
    [rj] = [o for o in render_ci("gpu-multinode-values") if o["kind"] == "RayJob"]
    for where, pod in pod_specs(rj):
        for c in containers(pod):
            gpus = c["resources"].get("limits", {}).get("nvidia.com/gpu")
            if where.endswith("/gpu-workers") and c in pod["containers"]:
                assert gpus == gpu_values["ray"]["gpuWorkers"]["gpus"] == 2, where
            else:
                assert gpus is None and "nvidia.com/gpu" not in c["resources"].get("requests", {}), where
    groups = {g["groupName"]: g for g in rj["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    assert sorted(groups) == ["cpu-workers", "gpu-workers"]
    gpu = groups["gpu-workers"]["template"]["spec"]
    assert gpu["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert gpu["tolerations"][0]["key"] == "nvidia.com/gpu" and gpu["priorityClassName"] == "ml-batch"
    assert "nodeAffinity" in gpu["affinity"]
    assert "nodeSelector" not in groups["cpu-workers"]["template"]["spec"]


def test_cpu_only_values_render_no_gpu_anywhere() -> None:
    text = yaml.safe_dump_all(render_ci("cpu-small-values"))
    assert "nvidia.com/gpu" not in text
    for rj in (o for o in render_ci("cpu-small-values") if o["kind"] == "RayJob"):
        assert [g["groupName"] for g in rj["spec"]["rayClusterSpec"]["workerGroupSpecs"]] == ["cpu-workers"]


@pytest.mark.parametrize("stem", IDS)
def test_rayjobs_clean_up_and_are_bounded_in_time_and_retries(stem: str) -> None:
    values = yaml.safe_load((CHART / "ci" / f"{stem}.yaml").read_text())
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())["rayJob"]
    want = {**defaults, **values.get("rayJob", {})}
    for rj in (o for o in render_ci(stem) if o["kind"] == "RayJob"):
        spec = rj["spec"]
        assert spec["shutdownAfterJobFinishes"] is True
        assert spec["ttlSecondsAfterFinished"] == want["ttlSecondsAfterFinished"]
        assert spec["activeDeadlineSeconds"] == want["activeDeadlineSeconds"]
        assert spec["backoffLimit"] == want["backoffLimit"]
        assert spec["rayClusterSpec"]["rayVersion"] == "2.60.0"


@pytest.mark.parametrize("stem", IDS)
def test_network_policies_select_every_pod_of_the_release(stem: str) -> None:
    """Each pod template of the release is selected by some NetworkPolicy (no unguarded pod)."""
    objs = render_ci(stem)
    policies = [o["spec"]["podSelector"] for o in objs if o["kind"] == "NetworkPolicy"]

    def selected(labels: dict) -> bool:
        for sel in policies:
            if any(labels.get(k) != v for k, v in sel.get("matchLabels", {}).items()):
                continue
            if all(labels.get(e["key"]) in e["values"] for e in sel.get("matchExpressions", [])):
                return True
        return False

    for o in objs:
        templates = []
        if o["kind"] in ("Deployment", "StatefulSet", "Job"):
            templates = [o["spec"]["template"]]
        elif o["kind"] == "RayJob":
            rc = o["spec"]["rayClusterSpec"]
            templates = [rc["headGroupSpec"]["template"], o["spec"]["submitterPodTemplate"]]
            templates += [g["template"] for g in rc.get("workerGroupSpecs", [])]
        for t in templates:
            assert selected(t["metadata"]["labels"]), (o["kind"], o["metadata"]["name"])
