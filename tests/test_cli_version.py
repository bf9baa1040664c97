"""`ctssl --version` prints the installed package version and exits 0."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from ray_jobs.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_version_flag_prints_the_package_version_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"ctssl {version('ctssl')}"


def test_version_flag_from_a_process() -> None:
    r = subprocess.run([sys.executable, "-m", "ray_jobs.cli", "--version"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"ctssl {version('ctssl')}"
