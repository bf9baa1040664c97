"""docs/bad-inputs.md says what each bad input prints: run every command of its table through the real
`ctssl` command line and require the error line the table shows.

The commands run in a temporary folder prepared as the document describes (relative paths, so the
lines are what a user sees); `<port>` becomes a loopback port nothing listens on. None of the cases
may start Ray: a case that would is a failure here, not a slow test.
"""

from __future__ import annotations

import json
import re
import shlex
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO, TEST_DEID_KEY

DOC = REPO / "docs" / "bad-inputs.md"
#: the cases the document must keep (a substring of each one's command)
REQUIRED = ["prep ct shards --labels missing.csv", "prep empty shards --source dicom",
            "CTSSL_DEID_KEY=aaaaaaaaaaaaaaaa", "--tracking-uri file:///x", "--log-every 0",
            "finetune --data unlabelled", "report --experiment no-such-study", "CTSSL_S3_ENDPOINT_URL="]
ENV_SCRUB = ("CTSSL_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MLFLOW_TRACKING_URI",
             "RAY_ADDRESS", "AWS_PROFILE")


def _code(cell: str) -> str:
    """The text of a markdown code span (`x` or `` x `` when it holds backticks itself)."""
    cell = cell.strip()
    if cell.startswith("`` ") and cell.endswith(" ``"):
        return cell[3:-3]
    assert cell.startswith("`") and cell.endswith("`") and "`" not in cell[1:-1], cell
    return cell[1:-1]


def doc_cases() -> list[tuple[str, str, str]]:
    """(bad input, command, error line) of every row of the document's table."""
    rows = []
    for line in DOC.read_text().splitlines():
        if not line.startswith("| ") or line.startswith(("| bad input", "|---")):
            continue
        cells = line.strip().strip("|").split(" | ")
        assert len(cells) == 3, line
        rows.append((cells[0].strip(), _code(cells[1]), _code(cells[2])))
    return rows


CASES = doc_cases()


def test_the_document_covers_the_required_cases() -> None:
    commands = [c for _, c, _ in CASES]
    for needle in REQUIRED:
        assert any(needle in c for c in commands), f"docs/bad-inputs.md has no case for {needle!r}"


FRESH_STUDY = """\
apiVersion: ctssl/v1
kind: Study
metadata:
  name: tiny
spec:
  storage: ct
  workdir: empty
  tracking:
    uri: sqlite:///mlflow.db
  data:
    pretrain: {type: phantom, patients: 6, slices: 8, renderSize: 64, size: 32}
    labelled: {type: phantom, patients: 6, slices: 8, renderSize: 64, size: 32, task: region}
  pretrain:
    backbone: test_resnet
    methods:
      byol: {}
  finetune:
    samplesPerClass: [2]
    folds: 2
"""


#: fresh.yaml with a typo in the size of its phantom pool
HUGE_STUDY = FRESH_STUDY.replace("pretrain: {type: phantom, patients: 6,",
                                 "pretrain: {type: phantom, patients: 1000000000,")
#: fresh.yaml with nine levels of nine YAML aliases (9**9 strings once expanded) in a method's options
BOMB_STUDY = FRESH_STUDY.replace("      byol: {}\n", "      byol:\n        options:\n" + "".join(
    f"          a{i}: &a{i} [{', '.join(['lol' if i == 0 else f'*a{i - 1}'] * 9)}]\n" for i in range(9)))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ct/ (three PNG slices), empty/, unlabelled/ (the prep output of ct/), weak.key, flat/ (a DICOM
    series of four slices at one position), repeated/ (a hand-made prep output whose series holds each
    slice twice), leased/ (an output whose lease a prep on another host
    holds: a lease file with a far expiry stands for that live driver, whose host, pid and start the
    error line names, so the line is the same on every run)."""
    from data_prep.prep import PrepConfig, run_prep
    from tests.data_prep.dicom_factory import write_ct
    from tests.data_prep.test_dicom_series_identity import _hand_made_output

    root = tmp_path_factory.mktemp("bad-inputs")
    (root / "ct").mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * (i + 1), np.uint8)).save(root / "ct" / f"slice{i}.png")
    (root / "empty").mkdir()
    (root / "weak.key").write_text("password" * 4 + "\n")
    for i in range(4):  # fixed UIDs: the error line names the series by its pseudonym
        write_ct(root / "flat" / f"IM{i}", np.full((8, 8), -1000, np.int16), z=5.0, series_uid="1.2.3.4.5",
                 study_uid="1.2.3.4", instance=i + 1)
    (root / "fresh.yaml").write_text(FRESH_STUDY)  # --fresh on ct/, which holds no study sentinel
    (root / "leased").mkdir()
    (root / "leased" / ".ctssl-lease.i000.json").write_text(json.dumps(
        {"host": "worker-2", "pid": 4242, "what": "prep (index 0 of 1)", "since": "2026-01-05T09:30:00+0000",
         "expires": 4102444800}))  # 2100-01-01
    _hand_made_output(str(root / "repeated"), [0, 1, 2, 0, 1, 2], [f"ser-{i:05d}" for i in (0, 1, 2, 0, 1, 2)])
    (root / "huge.yaml").write_text(HUGE_STUDY)  # validate: a count above its maximum
    (root / "bomb.yaml").write_text(BOMB_STUDY)  # run: refused as it is read
    run_prep(PrepConfig(src=str(root / "ct"), dst=str(root / "unlabelled"), size=8, executor="local",
                        progress=False), TEST_DEID_KEY.encode())
    return root


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(("what", "command", "expected"), CASES, ids=[w.strip("`") for w, _, _ in CASES])
def test_each_bad_input_gives_the_documented_error_line(what, command, expected, workdir, monkeypatch, capsys):
    import ray

    import ctssl_base.ray_connect
    from ray_jobs.cli import main

    def no_ray(*args, **kwargs):
        raise AssertionError(f"{command!r} starts Ray; bad inputs must fail before that")

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setattr(ctssl_base.ray_connect, "init_local", no_ray)
    port = str(_closed_port())
    words = shlex.split(command.replace("<port>", port))
    for var in ENV_SCRUB:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CTSSL_DEID_KEY", TEST_DEID_KEY)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    while re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        name, value = words.pop(0).split("=", 1)
        monkeypatch.setenv(name, value)
    assert words[0] == "ctssl", command
    monkeypatch.chdir(workdir)
    rc = main(words[1:])
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ": error: " in ln]
    assert rc == 2 and errors, err
    assert "Traceback" not in err
    assert errors[0] == expected.replace("<port>", port)
