"""`ctssl k8s` against a real HTTP server on 127.0.0.1 that speaks the Kubernetes API paths it uses.

The RayJobs it serves are the ones the chart renders (labels, annotations), with the status KubeRay
writes; the server records every request, so the tests check what a cluster would receive and that
errors name the object and the reason.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from ray_jobs.cli import main
from ray_jobs.k8s.status import DEPLOYMENT_NOTES
from tests.charts.chart_support import render_ci, study_objects
from tests.k8s.fake_kube import FakeKube


@pytest.fixture
def kube(tmp_path: Path):
    with FakeKube() as k:
        k.kubeconfig_path = k.kubeconfig(tmp_path / "kubeconfig")
        yield k


def ctssl(kube: FakeKube, *args: str) -> int:
    return main(["k8s", *args, "--kubeconfig", str(kube.kubeconfig_path)])


def chart_rayjob(status: dict | None = None, stem: str = "cpu-small-values", name: str | None = None) -> dict:
    """The study RayJob exactly as the chart renders it, with a KubeRay status."""
    rj = copy.deepcopy(study_objects(render_ci(stem))[0])
    if name:
        rj["metadata"]["name"] = name
    rj["status"] = status or {}
    return rj


def submitter_pod(rayjob: str, suffix: str = "q9", created: str = "2026-01-01T10:00:00Z") -> dict:
    return {"metadata": {"name": f"{rayjob}-{suffix}", "creationTimestamp": created,
                         "labels": {"batch.kubernetes.io/job-name": rayjob}},
            "spec": {"containers": [{"name": "ray-job-submitter"}]}}


DRIVER_LOG = """\
study phantom: 9 stages, storage s3://ctssl/study/studies/phantom, MLflow http://study-mlflow:5000, 0 GPU per worker
[1/9] phantom-pretrain: synthetic CT cohort (pretrain, DICOM) - reusing the finished stage from \
2026-01-01 10:01:00 (12s then)
[2/9] prep-pretrain: prep of the pretrain set to Parquet shards ... (not run yet)
    pretrain: 128 slices from 8 series, 0 rejected -> s3://ctssl/study/studies/phantom/shards/pretrain
[2/9] prep-pretrain: prep of the pretrain set to Parquet shards done in 40s (total 0.9 min)
[3/9] phantom-labelled: synthetic CT cohort (labelled, DICOM) ... (not run yet)
"""


def test_status_shows_each_study_with_its_stage_report_and_mlflow_experiment(kube, capsys) -> None:
    kube.put("rayjobs", chart_rayjob({"jobStatus": "RUNNING", "jobDeploymentStatus": "Running"}))
    kube.put("pods", submitter_pod("study-phantom"))
    kube.logs[("study-phantom-q9", "ray-job-submitter")] = DRIVER_LOG
    kube.put("rayjobs", {"metadata": {"name": "unrelated", "labels": {"app.kubernetes.io/instance": "study"}}})
    assert ctssl(kube, "status", "--release", "study") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["STUDY", "RAYJOB", "JOB", "STATUS", "DEPLOYMENT", "STAGE", "NOTE", "MLFLOW"]
    row = lines[1]
    assert row.split()[:8] == ["phantom", "study-phantom", "RUNNING", "Running", "3/9", "phantom-labelled",
                               "(running)", "running"]
    assert row.endswith("experiment phantom")
    assert len([line for line in lines if line.startswith("phantom ")]) == 1  # a RayJob without a study: not shown
    assert "report of study-phantom (when it finishes): s3://ctssl/study/studies/phantom/report/report.html" in lines
    assert lines[-1].startswith("run links: kubectl -n ml port-forward svc/study-mlflow 5000:5000")
    log_req = [r for r in kube.requests if r["path"].endswith("/log")][-1]
    assert log_req["query"] == {"container": "ray-job-submitter", "tailLines": "400"}


def test_status_renders_every_job_deployment_status(kube, capsys) -> None:
    states = list(DEPLOYMENT_NOTES) + ["Hibernating"]  # the ten KubeRay 1.7 states + a future one
    assert len(DEPLOYMENT_NOTES) == 10
    for i, state in enumerate(states):
        status = {"jobDeploymentStatus": state} if state else {}
        if state == "Failed":
            status.update(jobStatus="FAILED", reason="DeadlineExceeded", message="activeDeadlineSeconds passed")
        if state == "Retrying":
            status.update(failed=1)
        kube.put("rayjobs", chart_rayjob(status, name=f"study-s{i:02d}"))
    assert ctssl(kube, "status", "--release", "study") == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[1]: line for line in lines[1:] if line.startswith("phantom ")}
    for i, state in enumerate(states):
        row = rows[f"study-s{i:02d}"]
        assert row.split()[3] == (state or "New")
        assert row.split()[4] == "-"  # no submitter pod yet: no stage
        if state in DEPLOYMENT_NOTES:
            assert DEPLOYMENT_NOTES[state] in row
    assert rows["study-s05"].split()[2] == "FAILED"
    assert "failed: DeadlineExceeded activeDeadlineSeconds passed" in rows["study-s05"]
    assert "(1 failed attempt(s), backoffLimit 1)" in rows["study-s09"]
    assert "state 'Hibernating' is unknown to this ctssl version" in rows["study-s10"]


def test_status_links_the_study_to_its_mlflow_experiment(kube, capsys) -> None:
    kube.put("rayjobs", chart_rayjob({"jobDeploymentStatus": "Running"}))
    kube.put("rayjobs", chart_rayjob({}, stem="gpu-multinode-values"))
    kube.mlflow = {"phantom": ("7", ["run-new"])}
    assert ctssl(kube, "status", "--release", "study", "--mlflow-url", kube.url + "/") == 0
    out = capsys.readouterr().out
    assert f"{kube.url}/#/experiments/7\n" in out
    assert "(no MLflow experiment lidc-r50 yet)" in out
    assert [line.split()[1] for line in out.splitlines()[1:3]] == ["study-lidc-r50", "study-phantom"]


def test_status_of_an_unknown_release_says_where_it_looked(kube, capsys) -> None:
    assert ctssl(kube, "status", "--release", "nope") == 2
    assert "no study RayJob of release 'nope' in namespace ml (label app.kubernetes.io/instance=nope)" \
        in capsys.readouterr().err


def test_forbidden_names_the_object_the_reason_and_rbac(kube, capsys) -> None:
    kube.failures[("GET", "rayjobs")] = (
        403, "Forbidden", 'rayjobs.ray.io is forbidden: User "alice" cannot list resource "rayjobs" '
                          'in API group "ray.io" in the namespace "ml"')
    assert ctssl(kube, "status", "--release", "study") == 2
    err = capsys.readouterr().err
    assert "cannot list rayjobs in namespace ml: HTTP 403 Forbidden: rayjobs.ray.io is forbidden" in err
    assert "the chart's <release>-viewer Role covers status and logs" in err


def test_missing_kuberay_crds_are_explained(kube, capsys) -> None:
    kube.served.discard("rayjobs")
    assert ctssl(kube, "status", "--release", "study") == 2
    err = capsys.readouterr().err
    assert "cannot list rayjobs in namespace ml: HTTP 404 NotFound" in err
    assert "is the KubeRay operator (its CRDs) installed? check `kubectl get crd rayjobs.ray.io`" in err


def test_logs_show_the_submitter_and_fall_back_to_the_starting_head(kube, capsys) -> None:
    kube.put("rayjobs", chart_rayjob({"jobDeploymentStatus": "Initializing", "rayClusterName": "study-phantom-x7k2p"}))
    kube.put("pods", {"metadata": {"name": "study-phantom-x7k2p-head-abcde", "labels": {
        "ray.io/cluster": "study-phantom-x7k2p", "ray.io/node-type": "head"}},
        "spec": {"initContainers": [{"name": "seed-cache"}], "containers": [{"name": "ray-head"}]}})
    kube.logs[("study-phantom-x7k2p-head-abcde", "seed-cache")] = ""
    kube.logs[("study-phantom-x7k2p-head-abcde", "ray-head")] = "Ray runtime started.\n"
    assert ctssl(kube, "logs", "study-phantom") == 0
    out = capsys.readouterr().out
    assert "==> study-phantom-x7k2p-head-abcde/ray-head (head) <==\nRay runtime started." in out
    # once KubeRay's submitter Job runs, its pod (tailing the driver) is what `logs` shows; a retry's
    # newer pod comes last
    kube.put("pods", submitter_pod("study-phantom"))
    kube.put("pods", submitter_pod("study-phantom", "r2", "2026-01-01T11:00:00Z"))
    kube.logs[("study-phantom-q9", "ray-job-submitter")] = "attempt 1\n"
    kube.logs[("study-phantom-r2", "ray-job-submitter")] = DRIVER_LOG
    assert ctssl(kube, "logs", "study-phantom", "--tail", "50") == 0
    out = capsys.readouterr().out
    assert out.startswith("==> study-phantom-q9/ray-job-submitter (submitter) <==\nattempt 1\n"
                          "==> study-phantom-r2/ray-job-submitter (submitter) <==\nstudy phantom: 9 stages")
    log_req = [r for r in kube.requests if r["path"].endswith("/log")][-1]
    assert log_req["query"] == {"container": "ray-job-submitter", "tailLines": "50"}


def test_follow_streams_the_newest_driver_log(kube, capsys) -> None:
    kube.put("rayjobs", chart_rayjob({"jobDeploymentStatus": "Running"}))
    kube.put("pods", submitter_pod("study-phantom"))
    kube.logs[("study-phantom-q9", "ray-job-submitter")] = DRIVER_LOG
    assert ctssl(kube, "logs", "study-phantom", "--follow") == 0
    assert capsys.readouterr().out.endswith("[3/9] phantom-labelled: synthetic CT cohort (labelled, DICOM) ... "
                                            "(not run yet)\n")
    assert kube.requests[-1]["query"]["follow"] == "true"


def test_logs_and_cancel_of_a_missing_rayjob_say_it_does_not_exist(kube, capsys) -> None:
    assert ctssl(kube, "logs", "study-nope") == 2
    assert "no RayJob named 'study-nope' in namespace ml" in capsys.readouterr().err
    assert ctssl(kube, "cancel", "study-nope") == 2
    assert "no RayJob named 'study-nope' in namespace ml" in capsys.readouterr().err
    assert ctssl(kube, "cancel") == 2
    assert "--release NAME" in capsys.readouterr().err


def test_cancel_deletes_the_release_studies_and_nothing_else(kube, capsys) -> None:
    kube.put("rayjobs", chart_rayjob({"jobDeploymentStatus": "Running"}))
    kube.put("rayjobs", {"metadata": {"name": "other", "labels": {"app.kubernetes.io/instance": "study"}}})
    kube.put("pods", submitter_pod("study-phantom"))
    assert ctssl(kube, "cancel", "--release", "study") == 0
    deleted = [r["path"].rsplit("/", 1)[1] for r in kube.requests if r["method"] == "DELETE"]
    assert deleted == ["study-phantom"]
    assert all(r["body"]["propagationPolicy"] == "Background" for r in kube.requests if r["method"] == "DELETE")
    assert ("rayjobs", "ml", "other") in kube.objects
    assert "deleted RayJob ml/study-phantom" in capsys.readouterr().out
    assert ctssl(kube, "cancel", "--release", "study") == 2
    assert "release 'study' has no study RayJob in namespace ml" in capsys.readouterr().err


def test_in_cluster_configuration_is_used_inside_a_pod(tmp_path, monkeypatch) -> None:
    """With KUBERNETES_SERVICE_HOST set and no --kubeconfig, the pod's service account is used."""
    from kubernetes.config import incluster_config

    from ray_jobs.k8s import api as k8s_api

    token, ca, ns = tmp_path / "token", tmp_path / "ca.crt", tmp_path / "namespace"
    token.write_text("pod-token")
    ca.write_text("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")
    ns.write_text("study-ns\n")
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(token))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(ca))
    monkeypatch.setattr(k8s_api, "IN_CLUSTER_NAMESPACE_FILE", str(ns))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    api = k8s_api.KubeAPI.connect()
    assert api.namespace == "study-ns"
    assert api.api.configuration.host == "https://10.96.0.1:443"
    assert api.api.configuration.auth_settings()["BearerToken"]["value"].lower() == "bearer pod-token"
    # an explicit kubeconfig still wins inside a pod
    with FakeKube() as k:
        other = k8s_api.KubeAPI.connect(str(k.kubeconfig(tmp_path / "kc", namespace="elsewhere")))
        assert other.namespace == "elsewhere" and other.api.configuration.host == k.url


def test_unreachable_api_server_is_named(tmp_path, capsys) -> None:
    with FakeKube() as k:
        kc = k.kubeconfig(tmp_path / "kc")
    # the server is stopped now: nothing listens on its port
    assert main(["k8s", "status", "--release", "study", "--kubeconfig", str(kc)]) == 2
    err = capsys.readouterr().err
    assert f"API server {k.url} unreachable" in err
