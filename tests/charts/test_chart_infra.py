"""The image and the local-cluster script agree with the chart they serve."""

from __future__ import annotations

import re
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
