"""`ctssl prep` input checks and resume cleanup, through the real command line.

A bad ``--labels`` path or an input with nothing in it must fail in one line naming what is wrong
(exit 2), before anything is written; a resume must leave no temp file of a crashed run behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_prep import shards
from ray_jobs.cli import main
from tests.conftest import TEST_DEID_KEY
from tests.data_prep.dicom_factory import write_series


@pytest.fixture
def deid_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CTSSL_DEID_KEY", TEST_DEID_KEY)


def _prep(src: Path, dst: Path, *extra: str) -> list[str]:
    return ["prep", str(src), str(dst), "--executor", "local", "--no-progress", "--size", "0", *extra]


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one error line, got:\n{err}"
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(("make", "what"), [
    (lambda p: None, "labels CSV not found"),
    (lambda p: p.mkdir(), "labels CSV is not a file (a folder?); give the CSV file itself"),
])
def test_a_missing_or_wrong_labels_path_is_one_line_naming_the_file(tmp_path, capsys, deid_key, make, what):
    src, dst = tmp_path / "src", tmp_path / "out"
    write_series(src / "p1" / "s1", 2)
    labels = tmp_path / "missing.csv"
    make(labels)
    rc = main(_prep(src, dst, "--labels", str(labels)))
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2
    assert line == f"ctssl prep: error: {labels}: {what}"
    assert not dst.exists(), "nothing may be written before the inputs are checked"


def test_a_labels_file_that_is_not_text_is_one_line(tmp_path, capsys, deid_key):
    src, dst = tmp_path / "src", tmp_path / "out"
    write_series(src / "p1" / "s1", 2)
    labels = tmp_path / "labels.csv"
    labels.write_bytes(b"file,label\n\xff\xfe\x00binary\n")
    assert main(_prep(src, dst, "--labels", str(labels))) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{labels}:" in line and "not a readable CSV text file" in line


def _empty(root: Path) -> None:
    root.mkdir()


def _only_non_images(root: Path) -> None:
    root.mkdir()
    (root / "README.txt").write_text("no images here\n")
    (root / "labels.csv").write_text("file,label\n")


@pytest.mark.parametrize("source", ["dicom", "nifti", "medmnist", "imagefolder"])
@pytest.mark.parametrize("layout", [_empty, _only_non_images])
def test_a_source_with_no_input_fails_and_commits_nothing(tmp_path, capsys, deid_key, source, layout):
    src, dst = tmp_path / "src", tmp_path / "out"
    layout(src)
    rc = main(_prep(src, dst, "--source", source))
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2
    assert line.startswith(f"ctssl prep: error: no input found under {src} (--source {source})")
    if layout is _only_non_images:
        assert line.endswith(": 2 non-image files ignored")
    assert not dst.exists(), "an empty output would let the next stage go ahead on nothing"


def test_the_cli_exits_non_zero_for_an_empty_dicom_source(tmp_path):
    """The exit status is what a pipeline (a Kubernetes Job, make) acts on."""
    (tmp_path / "src").mkdir()
    r = subprocess.run([sys.executable, "-m", "ray_jobs.cli", "prep", str(tmp_path / "src"), str(tmp_path / "out"),
                        "--source", "dicom", "--executor", "local"],
                       env={**os.environ, "CTSSL_DEID_KEY": TEST_DEID_KEY}, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert r.stderr.splitlines()[-1] == f"ctssl prep: error: no input found under {tmp_path / 'src'} (--source dicom)"
    assert "Traceback" not in r.stderr and "committed" not in r.stdout
    assert not (tmp_path / "out").exists()


def test_temp_commit_files_of_a_crashed_run_are_removed_on_resume(tmp_path):
    """A kill -9 while a commit record is written leaves ``_commits/NAME.json.tmp-*``; the resume
    removes it (and the manifest's temp file), but never another --shard-index's temp files."""
    src, dst = tmp_path / "src", tmp_path / "out"
    for p in range(3):
        write_series(src / f"p{p}" / "s", 2, seed=p)
    env = {**os.environ, "CTSSL_DEID_KEY": TEST_DEID_KEY, "CTSSL_FAILPOINT": "write.half:2"}
    cmd = [sys.executable, "-m", "ray_jobs.cli", "prep", str(src), str(dst), "--executor", "local", "--size", "0",
           "--no-progress", "--rows-per-shard", "2"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == -9, r.stderr  # killed half-way through writing the first commit record
    stale = list((dst / "_commits").glob("*.tmp-*"))
    assert len(stale) == 1 and stale[0].name.startswith("i000-")
    other_index = dst / "_commits" / "i001-0123456789abcdef.json.tmp-5eed1e55"
    other_index.write_text("{")  # another index's record being written right now: not ours to delete
    (dst / "_manifest.json.tmp-0badf00d").write_text("{")

    env.pop("CTSSL_FAILPOINT")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    left = sorted(p.name for p in dst.rglob("*.tmp-*"))
    assert left == [other_index.name]
    assert "orphan file(s)" in r.stderr
    t = shards.read_table(str(dst))
    assert t.num_rows == 6 and len(set(np.asarray(t["slice_id"]))) == 6
