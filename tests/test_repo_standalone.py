"""The repository stands alone: its tests, scripts and docs read nothing from beside the checkout.

The test data the suite needs is vendored under tests/data/ (the real JPEG 2000 CT series and the
KubeRay CRDs, each with a README naming its source, licence and version).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"

# Ways a file can point outside the checkout at a sibling "shared" folder: a relative path in text,
# shell or YAML, and a pathlib join from the repository's parent in Python.
OUTSIDE_REFERENCES = [
    re.compile(r"\.\./+shared\b"),
    re.compile(r"""\.parents?(\[\d+\])?\s*/\s*["']shared["']"""),
]


def _tracked_files() -> list[str]:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True).stdout
    return [p for p in out.decode().split("\0") if p]


def test_no_tracked_file_reads_from_a_shared_folder_beside_the_repository() -> None:
    offenders = []
    for rel in _tracked_files():
        path = REPO / rel
        if rel == "tests/test_repo_standalone.py" or not path.is_file():
            continue
        raw = path.read_bytes()
        if b"\0" in raw[:8192]:  # binary (the DICOM files)
            continue
        text = raw.decode("utf-8", errors="replace")
        for n, line in enumerate(text.splitlines(), 1):
            if any(p.search(line) for p in OUTSIDE_REFERENCES):
                offenders.append(f"{rel}:{n}: {line.strip()}")
    assert offenders == [], "files that reference data outside the repository:\n" + "\n".join(offenders)


def test_the_real_ct_series_is_vendored_with_its_licence_note() -> None:
    series = DATA / "real_ct" / "totalsegmentator_example_ct"
    files = sorted(p for p in series.iterdir() if p.is_file())
    assert len(files) == 20 and all(f.name.startswith("CT.") for f in files)
    assert all(f.read_bytes()[128:132] == b"DICM" for f in files)
    assert (DATA / "real_ct" / "totalsegmentator_example_ct_slice_organs.csv").is_file()
    readme = (DATA / "real_ct" / "README.md").read_text()
    assert "Apache License 2.0" in readme and "TotalSegmentator" in readme
    assert "0e65a448d557382b1e925276212b3bec7f5aff83" in readme  # the source commit


def test_the_kuberay_crds_are_vendored_at_the_operator_version_kind_up_installs() -> None:
    crds = DATA / "kuberay-crds"
    for name in ("ray.io_rayjobs.yaml", "ray.io_rayclusters.yaml"):
        assert "kind: CustomResourceDefinition" in (crds / name).read_text()[:200]
    readme = (crds / "README.md").read_text()
    version = re.search(r"KubeRay v(\d+\.\d+\.\d+)", readme).group(1)
    kind_up = (REPO / "infra" / "kind-up.sh").read_text()
    assert f"KUBERAY_VERSION=${{KUBERAY_VERSION:-{version}}}" in kind_up
