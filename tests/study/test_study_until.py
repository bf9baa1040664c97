"""``ctssl study run --until STAGE``: the stages up to STAGE run and the driver stops; the next run
reuses them; a name that is no stage of the study is refused in one line listing the stages."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.study.test_study_run import _env, stage_lines, tiny_study

pytestmark = pytest.mark.timeout(600)


def _run(spec, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ray_jobs.cli", "study", "run", "-f", str(spec), *extra], cwd=REPO,
                          capture_output=True, text=True, env=_env(), timeout=500)


def test_until_runs_the_data_stages_then_stops_and_the_next_run_reuses_them(tmp_path):
    spec = tmp_path / "study.yaml"
    spec.write_text(tiny_study(tmp_path, name="until"))

    bad = _run(spec, "--until", "pretrain-moco")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "--until 'pretrain-moco': no such stage" in bad.stderr and "pretrain-byol-all" in bad.stderr
    assert not (tmp_path / "store" / ".stages").exists()  # refused before anything ran

    first = _run(spec, "--until", "reduce-hash6")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    ran = stage_lines(first.stdout)
    assert ran == {"phantom-pretrain": "ran", "prep-pretrain": "ran", "phantom-labelled": "ran",
                   "prep-labelled": "ran", "reduce-hash6": "ran"}, first.stdout
    assert "stopped after stage reduce-hash6" in first.stdout and "report:" not in first.stdout
    assert sorted(p.stem for p in (tmp_path / "store" / ".stages").glob("*.json")) == sorted(ran)

    again = _run(spec, "--until", "prep-labelled")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert stage_lines(again.stdout) == {"phantom-pretrain": "reused", "prep-pretrain": "reused",
                                         "phantom-labelled": "reused", "prep-labelled": "reused"}
