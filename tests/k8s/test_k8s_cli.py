"""`ctssl k8s` against a real HTTP server on 127.0.0.1 that speaks the Kubernetes API paths it uses.

The server records every request, so the tests check what a cluster would receive: created RayJobs
must validate against the KubeRay CRD schema, errors must name the object and the reason.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ray_jobs.cli import main
from ray_jobs.k8s.status import DEPLOYMENT_NOTES
from tests.charts.chart_support import experiment_from_render, render_ci, validation_errors
from tests.k8s.fake_kube import FakeKube


@pytest.fixture
def kube(tmp_path: Path):
    with FakeKube() as k:
        k.kubeconfig_path = k.kubeconfig(tmp_path / "kubeconfig")
        yield k


def ctssl(kube: FakeKube, *args: str) -> int:
    return main(["k8s", *args, "--kubeconfig", str(kube.kubeconfig_path)])


def experiment_file(tmp_path: Path, stem: str = "gpu-multinode-values") -> Path:
    """The experiment config exactly as the chart stores it in its ConfigMap."""
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(experiment_from_render(render_ci(stem))))
    return path


def test_submit_creates_the_study_and_every_rayjob_validates_against_the_crd(kube, tmp_path, capsys) -> None:
    assert ctssl(kube, "submit", "-f", str(experiment_file(tmp_path))) == 0
    rayjobs = kube.created("rayjobs")
    assert [r["metadata"]["name"] for r in rayjobs] == [
        "study-reduce", "study-pretrain-byol", "study-pretrain-mocov2", "study-pretrain-swav",
        "study-pretrain-spark", "study-finetune"]
    for body in rayjobs + kube.created("jobs") + kube.created("serviceaccounts"):
        assert validation_errors(body) == [], body["metadata"]["name"]
    # the namespace comes from the kubeconfig context, the token from its user
    assert {r["path"].split("/namespaces/")[1].split("/")[0] for r in kube.requests} == {"ml"}
    assert {r["auth"] for r in kube.requests} == {"Bearer test-token"}
    [job] = kube.created("jobs")
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 64
    out = capsys.readouterr().out
    assert "created RayJob ml/study-pretrain-spark" in out and "created ServiceAccount ml/study" in out


def test_submit_reuses_an_existing_service_account_and_honours_namespace_and_name(kube, tmp_path) -> None:
    kube.put("serviceaccounts", {"metadata": {"name": "study"}}, namespace="other")
    assert ctssl(kube, "submit", "-f", str(experiment_file(tmp_path, "cpu-small-values")),
                 "-n", "other", "--name", "trial2") == 0
    assert kube.created("serviceaccounts") == []
    names = [r["metadata"]["name"] for r in kube.created("rayjobs")]
    assert names == ["trial2-pretrain-byol", "trial2-pretrain-spark", "trial2-finetune"]
    assert all("/namespaces/other/" in r["path"] for r in kube.requests)
    byol = kube.created("rayjobs")[0]
    assert "--experiment trial2-byol" in byol["spec"]["entrypoint"]
    assert byol["metadata"]["labels"]["app.kubernetes.io/instance"] == "trial2"


def test_submit_dry_run_prints_yaml_and_contacts_no_cluster(kube, tmp_path, capsys) -> None:
    assert main(["k8s", "submit", "-f", str(experiment_file(tmp_path, "cpu-small-values")), "--dry-run",
                 "--kubeconfig", str(tmp_path / "missing")]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["kind"] for d in docs] == ["Job", "RayJob", "RayJob", "RayJob"]
    assert kube.requests == []


def test_submitting_twice_says_the_object_exists_and_how_to_remove_it(kube, tmp_path, capsys) -> None:
    cfg = str(experiment_file(tmp_path, "cpu-small-values"))
    assert ctssl(kube, "submit", "-f", cfg) == 0
    capsys.readouterr()
    assert ctssl(kube, "submit", "-f", cfg) == 2
    err = capsys.readouterr().err.strip()
    assert err == ('ctssl k8s: error: cannot create Job ml/study-prep: HTTP 409 AlreadyExists: '
                   'jobs.batch "study-prep" already exists (it already exists; remove it with '
                   '`ctssl k8s cancel study-prep -n ml` or change `name` in the experiment config)')


def test_a_rayjob_conflict_midway_lists_what_was_already_created(kube, tmp_path, capsys) -> None:
    kube.put("rayjobs", {"metadata": {"name": "study-pretrain-spark"}})
    assert ctssl(kube, "submit", "-f", str(experiment_file(tmp_path, "cpu-small-values"))) == 2
    err = capsys.readouterr().err
    assert "cannot create RayJob ml/study-pretrain-spark: HTTP 409 AlreadyExists" in err
    assert "(already created: Job study-prep, RayJob study-pretrain-byol)" in err


def test_forbidden_names_the_object_the_reason_and_rbac(kube, tmp_path, capsys) -> None:
    kube.failures[("POST", "rayjobs")] = (
        403, "Forbidden", 'rayjobs.ray.io is forbidden: User "alice" cannot create resource "rayjobs" '
                          'in API group "ray.io" in the namespace "ml"')
    assert ctssl(kube, "submit", "-f", str(experiment_file(tmp_path, "cpu-small-values"))) == 2
    err = capsys.readouterr().err
    assert "cannot create RayJob ml/study-pretrain-byol: HTTP 403 Forbidden: rayjobs.ray.io is forbidden: " \
           'User "alice" cannot create resource "rayjobs"' in err
    assert "lacks RBAC permission" in err


def test_missing_kuberay_crds_are_explained(kube, tmp_path, capsys) -> None:
    kube.served.discard("rayjobs")
    assert ctssl(kube, "submit", "-f", str(experiment_file(tmp_path, "cpu-small-values"))) == 2
    err = capsys.readouterr().err
    assert "cannot create RayJob ml/study-pretrain-byol: HTTP 404 NotFound" in err
    assert "is the KubeRay operator (its CRDs) installed? check `kubectl get crd rayjobs.ray.io`" in err


def test_logs_and_cancel_of_a_missing_object_say_it_does_not_exist(kube, capsys) -> None:
    assert ctssl(kube, "logs", "study-pretrain-nope") == 2
    assert "no RayJob or Job named 'study-pretrain-nope' in namespace ml" in capsys.readouterr().err
    assert ctssl(kube, "cancel", "study-pretrain-nope") == 2
    assert "no RayJob or Job named 'study-pretrain-nope' in namespace ml" in capsys.readouterr().err


def test_unreachable_api_server_is_named(tmp_path, capsys) -> None:
    with FakeKube() as k:
        kc = k.kubeconfig(tmp_path / "kc")
    # the server is stopped now: nothing listens on its port
    assert main(["k8s", "status", "--release", "study", "--kubeconfig", str(kc)]) == 2
    err = capsys.readouterr().err
    assert f"API server {k.url} unreachable" in err


def _rayjob(name: str, component: str, method: str | None, status: dict) -> dict:
    labels = {"app.kubernetes.io/instance": "study", "app.kubernetes.io/component": component}
    if method:
        labels["ctssl.io/method"] = method
    return {"apiVersion": "ray.io/v1", "kind": "RayJob",
            "metadata": {"name": name, "labels": labels,
                         "annotations": {"ctssl.io/mlflow-experiment": f"study-{method or component}"}},
            "spec": {"backoffLimit": 2}, "status": status}


def test_status_renders_every_job_deployment_status(kube, capsys) -> None:
    states = list(DEPLOYMENT_NOTES) + ["Hibernating"]  # the ten KubeRay 1.7 states + a future one
    assert len(DEPLOYMENT_NOTES) == 10
    for i, state in enumerate(states):
        status = {"jobDeploymentStatus": state} if state else {}
        if state == "Failed":
            status.update(jobStatus="FAILED", reason="DeadlineExceeded", message="activeDeadlineSeconds passed")
        if state == "Retrying":
            status.update(failed=1)
        if state == "Running":
            status.update(jobStatus="RUNNING")
        kube.put("rayjobs", _rayjob(f"study-pretrain-m{i:02d}", "pretrain", f"m{i:02d}", status))
    kube.put("jobs", {"metadata": {"name": "study-prep", "labels": {
        "app.kubernetes.io/instance": "study", "app.kubernetes.io/component": "prep"}},
        "spec": {"completions": 4}, "status": {"succeeded": 2, "active": 2}})
    assert ctssl(kube, "status", "--release", "study") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["STAGE", "KIND", "NAME", "JOB", "STATUS", "DEPLOYMENT", "NOTE", "MLFLOW"]
    rows = {line.split()[2]: line for line in lines[1:] if line.strip() and not line.startswith("run links")}
    assert rows["study-prep"].split()[:6] == ["prep", "Job", "study-prep", "RUNNING", "2/4", "indexes"]
    for i, state in enumerate(states):
        row = rows[f"study-pretrain-m{i:02d}"]
        cells = row.split()
        assert cells[:3] == [f"pretrain/m{i:02d}", "RayJob", f"study-pretrain-m{i:02d}"]
        assert cells[4] == (state or "New")
        if state in DEPLOYMENT_NOTES:
            assert DEPLOYMENT_NOTES[state] in row
        assert f"experiment study-m{i:02d}" in row
    assert rows["study-pretrain-m05"].split()[3] == "FAILED"
    assert "failed: DeadlineExceeded activeDeadlineSeconds passed" in rows["study-pretrain-m05"]
    assert "(1 failed attempt(s), backoffLimit 2)" in rows["study-pretrain-m09"]
    assert "state 'Hibernating' is unknown to this ctssl version" in rows["study-pretrain-m10"]
    assert lines[-1].startswith("run links: kubectl -n ml port-forward svc/study-mlflow 5000:5000")


def test_status_of_a_failed_prep_job_names_the_failed_indexes(kube, capsys) -> None:
    kube.put("jobs", {"metadata": {"name": "study-prep", "labels": {
        "app.kubernetes.io/instance": "study", "app.kubernetes.io/component": "prep"}},
        "spec": {"completions": 4}, "status": {"succeeded": 3, "failed": 3, "failedIndexes": "2", "conditions": [
            {"type": "Failed", "status": "True", "reason": "FailedIndexes", "message": "Job has failed indexes"}]}})
    assert ctssl(kube, "status", "--release", "study") == 0
    row = capsys.readouterr().out.splitlines()[1]
    assert row.split()[:5] == ["prep", "Job", "study-prep", "FAILED", "3/4"]
    assert row.endswith("FailedIndexes: Job has failed indexes; failed indexes 2  -")


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


def test_status_links_each_rayjob_to_its_latest_mlflow_run(kube, capsys) -> None:
    kube.put("rayjobs", _rayjob("study-pretrain-byol", "pretrain", "byol", {"jobDeploymentStatus": "Running"}))
    kube.put("rayjobs", _rayjob("study-pretrain-swav", "pretrain", "swav", {"jobDeploymentStatus": "Initializing"}))
    kube.put("rayjobs", _rayjob("study-finetune", "finetune", None, {}))
    kube.mlflow = {"study-byol": ("7", ["run-new", "run-old"]), "study-finetune": ("9", [])}
    assert ctssl(kube, "status", "--release", "study", "--mlflow-url", kube.url + "/") == 0
    out = capsys.readouterr().out
    assert f"{kube.url}/#/experiments/7/runs/run-new" in out
    assert f"{kube.url}/#/experiments/9\n" in out + "\n"  # no run yet: the experiment page
    assert "(no MLflow experiment study-swav yet)" in out
    # stage order: pre-training rows before the fine-tuning study
    names = [line.split()[2] for line in out.splitlines()[1:] if line.strip()]
    assert names == ["study-pretrain-byol", "study-pretrain-swav", "study-finetune"]


def test_status_of_an_unknown_release_says_where_it_looked(kube, capsys) -> None:
    assert ctssl(kube, "status", "--release", "nope") == 2
    assert "no prep Job or RayJobs of release 'nope' in namespace ml (label app.kubernetes.io/instance=nope)" \
        in capsys.readouterr().err


def test_logs_of_a_rayjob_show_the_submitter_then_fall_back_to_the_waiting_head(kube, capsys) -> None:
    kube.put("rayjobs", _rayjob("study-pretrain-byol", "pretrain", "byol",
                                {"jobDeploymentStatus": "Initializing", "rayClusterName": "study-pretrain-byol-x7k2p"}))
    kube.put("pods", {"metadata": {"name": "study-pretrain-byol-x7k2p-head-abcde", "labels": {
        "ray.io/cluster": "study-pretrain-byol-x7k2p", "ray.io/node-type": "head"}},
        "spec": {"initContainers": [{"name": "wait-for-data"}], "containers": [{"name": "ray-head"}]}})
    kube.logs[("study-pretrain-byol-x7k2p-head-abcde", "wait-for-data")] = \
        "00:01:00 INFO ctssl.wait_for: waiting for 1 manifest(s), 1m00s elapsed\n"
    kube.logs[("study-pretrain-byol-x7k2p-head-abcde", "ray-head")] = ""
    assert ctssl(kube, "logs", "study-pretrain-byol") == 0
    out = capsys.readouterr().out
    assert "==> study-pretrain-byol-x7k2p-head-abcde/wait-for-data (head) <==" in out
    assert "waiting for 1 manifest(s), 1m00s elapsed" in out
    # once KubeRay's submitter Job runs, its pod (tailing the driver) is what `logs` shows
    kube.put("pods", {"metadata": {"name": "study-pretrain-byol-sub-q9", "labels": {
        "batch.kubernetes.io/job-name": "study-pretrain-byol"}}, "spec": {"containers": [{"name": "ray-job-submitter"}]}})
    kube.logs[("study-pretrain-byol-sub-q9", "ray-job-submitter")] = "step 100 loss 3.21\n"
    assert ctssl(kube, "logs", "study-pretrain-byol", "--tail", "50") == 0
    out = capsys.readouterr().out
    assert out == "==> study-pretrain-byol-sub-q9/ray-job-submitter (submitter) <==\nstep 100 loss 3.21\n"
    log_req = [r for r in kube.requests if r["path"].endswith("/log")][-1]
    assert log_req["query"] == {"container": "ray-job-submitter", "tailLines": "50"}


def test_follow_streams_the_prep_job_log(kube, capsys) -> None:
    kube.put("jobs", {"metadata": {"name": "study-prep"}, "spec": {}})
    kube.put("pods", {"metadata": {"name": "study-prep-0-abc", "labels": {"batch.kubernetes.io/job-name": "study-prep"}},
                      "spec": {"containers": [{"name": "prep"}]}})
    kube.logs[("study-prep-0-abc", "prep")] = "prep: 120/240 series, 14.2 series/s, ETA 0:00:08\n"
    assert ctssl(kube, "logs", "study-prep", "--follow") == 0
    assert capsys.readouterr().out.endswith("prep: 120/240 series, 14.2 series/s, ETA 0:00:08\n")
    assert kube.requests[-1]["query"]["follow"] == "true"


def test_cancel_release_deletes_every_stage_object(kube, tmp_path, capsys) -> None:
    assert ctssl(kube, "submit", "-f", str(experiment_file(tmp_path, "cpu-small-values"))) == 0
    kube.put("jobs", {"metadata": {"name": "study-minio-bucket", "labels": {
        "app.kubernetes.io/instance": "study", "app.kubernetes.io/component": "minio-bucket"}}})
    assert ctssl(kube, "cancel", "--release", "study") == 0
    deleted = [r["path"].rsplit("/", 1)[1] for r in kube.requests if r["method"] == "DELETE"]
    assert sorted(deleted) == ["study-finetune", "study-prep", "study-pretrain-byol", "study-pretrain-spark"]
    assert all(r["body"]["propagationPolicy"] == "Background" for r in kube.requests if r["method"] == "DELETE")
    assert ("jobs", "ml", "study-minio-bucket") in kube.objects  # not a stage: left alone


def test_bad_experiment_config_is_named_with_the_key(kube, tmp_path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"storage": {"root": "s3://b/s"}, "prep": {"source": "s3://b/raw"},
                                   "finetune": {"data": "s3://b/l"}, "pretrain": {"methods": ["byol", "simclr"]}}))
    assert ctssl(kube, "submit", "-f", str(bad)) == 2
    assert f"{bad}: experiment config: pretrain.methods: unknown method 'simclr'; known: byol, mocov2, swav, spark" \
        in capsys.readouterr().err
    bad.write_text(yaml.safe_dump({"storage": {"root": "s3://b/s", "bucket": "b"}}))
    assert ctssl(kube, "submit", "-f", str(bad)) == 2
    assert "experiment config: storage.bucket: unknown key" in capsys.readouterr().err
    assert kube.requests == []
