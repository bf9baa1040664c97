"""The image and the local-cluster script agree with the chart they serve."""

from __future__ import annotations

import re
import shutil
import subprocess

import yaml

from tests.charts.chart_support import CHART, REPO

INFRA = REPO / "infra"


def test_image_is_ray_2_60_python_3_11_non_root_with_ctssl_entry_point() -> None:
    text = (INFRA / "Dockerfile").read_text()
    base = re.search(r"^ARG RAY_IMAGE=(\S+)$", text, re.M).group(1)
    assert re.fullmatch(r"rayproject/ray:2\.60\.0-py311-cu12\d", base)
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and all(not u.startswith(("root", "0")) for u in users)
    assert users[0] == "1000:100" == "{runAsUser}:{runAsGroup}".format(
        **yaml.safe_load((CHART / "values.yaml").read_text())["securityContext"])
    assert 'ENTRYPOINT ["ctssl"]' in text
    ignore = (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
    assert ignore[1] == "**" and "!ray_jobs/**" in ignore  # the 7 GB .venv never enters the context


def test_versions_agree_between_pyproject_chart_and_image_tag() -> None:
    import tomllib

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert meta["appVersion"] == values["image"]["tag"] == version
    assert values["ray"]["version"] == "2.60.0"


def test_kind_script_installs_the_operator_and_a_phantom_study_then_waits_for_the_report() -> None:
    script = INFRA / "kind-up.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "charts/ctssl/ci/cpu-small-values.yaml" in text
    assert "KUBERAY_VERSION=${KUBERAY_VERSION:-1.7.0}" in text
    assert 'kind load docker-image "$IMAGE_REPO:$IMAGE_TAG"' in text
    assert "--config \"$ROOT/infra/kind-config.yaml\"" in text
    assert 'helm upgrade --install "$RELEASE" "$ROOT/charts/ctssl"' in text  # from the clone, no chart repo
    assert "{.status.jobDeploymentStatus}" in text and "Complete)" in text  # waits for the study
    assert "report.html" in text and 'port-forward svc/$RELEASE-mlflow 5000:5000' in text
    # the study it installs generates its pool and labelled set inside the cluster: nothing to upload
    study = yaml.safe_load((CHART / "ci" / "cpu-small-values.yaml").read_text())["study"]
    assert {src["type"] for src in study["spec"]["data"].values()} == {"phantom"}
    assert "upload" not in text.lower()
    kind = yaml.safe_load((INFRA / "kind-config.yaml").read_text())
    assert kind["kind"] == "Cluster" and [n["role"] for n in kind["nodes"]].count("worker") >= 1


# -------------------------------------------------------------------- kind-up.sh with stand-in tools
STUB = r"""#!/usr/bin/env bash
# stands in for one tool: records its arguments, answers the queries kind-up.sh makes
printf '%s %s\n' "$(basename "$0")" "$*" >> "$STUB_LOG"
case "$(basename "$0") $*" in
  "kind get clusters") ;;  # no cluster yet
  *"get rayjob -l app.kubernetes.io/instance="*) printf 'study-ctssl-7f3a' ;;
  *"ctssl\.io/storage"*) printf 's3://ctssl/study/studies/phantom' ;;
  *"{.status.jobDeploymentStatus}"*) printf '%s' "$STUB_STATE" ;;
esac
"""


def _run_kind_up(tmp_path, state: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """infra/kind-up.sh from a copy of the clone without a .venv, with docker, kind, kubectl and helm
    replaced by :data:`STUB`; returns the run and the tool calls in order."""
    root = tmp_path / "clone"
    (root / "infra").mkdir(parents=True)
    (root / "infra" / "kind-up.sh").write_text((INFRA / "kind-up.sh").read_text())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("docker", "kind", "kubectl", "helm"):
        (bin_dir / tool).write_text(STUB)
        (bin_dir / tool).chmod(0o755)
    log = tmp_path / "calls.log"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "STUB_LOG": str(log), "STUB_STATE": state}
    r = subprocess.run(["bash", str(root / "infra" / "kind-up.sh")], capture_output=True, text=True, env=env,
                       timeout=60)
    return r, log.read_text().splitlines()


def test_kind_up_creates_builds_loads_installs_then_waits_and_says_where_the_report_is(tmp_path) -> None:
    r, calls = _run_kind_up(tmp_path, "Complete")
    assert r.returncode == 0, r.stderr
    root = tmp_path / "clone"
    steps = [c for c in calls if not c.startswith("kubectl -n")]
    assert steps == [
        "kind get clusters",
        f"kind create cluster --name ctssl --config {root}/infra/kind-config.yaml --wait 120s",
        "kubectl config use-context kind-ctssl",
        f"docker build -f {root}/infra/Dockerfile -t ctssl:0.1.0 {root}",
        "kind load docker-image ctssl:0.1.0 --name ctssl",
        "helm repo add kuberay https://ray-project.github.io/kuberay-helm/ --force-update",
        "helm upgrade --install kuberay-operator kuberay/kuberay-operator --version 1.7.0 --namespace "
        "kuberay-system --create-namespace --wait",
        f"helm upgrade --install study {root}/charts/ctssl --namespace ctssl --create-namespace -f "
        f"{root}/charts/ctssl/ci/cpu-small-values.yaml --set image.repository=ctssl --set image.tag=0.1.0 "
        "--wait --timeout 10m",
    ]
    assert calls[-1] == "kubectl -n ctssl get rayjob study-ctssl-7f3a -o jsonpath={.status.jobDeploymentStatus}"
    assert "the study finished" in r.stdout
    assert "The study's report: s3://ctssl/study/studies/phantom/report/report.html" in r.stdout
    assert "ctssl k8s logs study-ctssl-7f3a -n ctssl --follow" in r.stdout
    assert "port-forward svc/study-mlflow 5000:5000" in r.stdout


def test_kind_up_stops_with_the_jobs_log_command_when_the_study_fails(tmp_path) -> None:
    r, calls = _run_kind_up(tmp_path, "Failed")
    assert r.returncode == 1
    assert "kind-up: RayJob study-ctssl-7f3a is Failed; its log: ctssl k8s logs study-ctssl-7f3a -n ctssl" in r.stderr
    assert calls[-1] == "kubectl -n ctssl get rayjob study-ctssl-7f3a"  # the status it shows before stopping
    assert "The study's report" not in r.stdout


def test_kind_up_names_a_missing_tool(tmp_path) -> None:
    bin_dir = tmp_path / "bin"  # only what the script needs besides the four tools
    bin_dir.mkdir()
    (bin_dir / "dirname").symlink_to(shutil.which("dirname"))
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path)}
    r = subprocess.run([shutil.which("bash"), str(INFRA / "kind-up.sh")], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 1 and r.stderr.strip() == "kind-up: 'docker' is not on PATH"
