"""`ctssl study run --fresh` deletes only what the study's stages wrote, and only in roots it made."""

from __future__ import annotations

import pytest

from ctssl_base.errors import UserError
from ray_jobs.commands.study import _clean
from ray_jobs.study import runner, spec
from tests.study.test_study_run import tiny_study


def _study(tmp_path):
    f = tmp_path / "study.yaml"
    f.write_text(tiny_study(tmp_path))
    return spec.load(f)


def _fill(root, names):
    for n in names:
        p = root / n / "x" if "." not in n else root / n
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("data")


def test_fresh_deletes_the_stage_outputs_and_leaves_the_users_files(tmp_path):
    study = _study(tmp_path)
    store, work = tmp_path / "store", tmp_path / "work"
    _fill(store, ["dicom", "notes.txt", *runner.STORAGE_OUTPUTS])
    _fill(work, ["thesis", *runner.WORKDIR_OUTPUTS])
    runner.mark_root(str(store), study.name)
    runner.mark_root(str(work), study.name)
    _clean(study)
    assert sorted(p.name for p in store.iterdir()) == sorted([runner.SENTINEL, "dicom", "notes.txt"])
    assert sorted(p.name for p in work.iterdir()) == sorted([runner.SENTINEL, "thesis"])
    assert (store / "dicom" / "x").read_text() == "data"


@pytest.mark.parametrize("which", ["store", "work"])
def test_a_root_without_the_sentinel_is_refused_in_one_line_and_nothing_goes(tmp_path, which):
    study = _study(tmp_path)
    for root in ("store", "work"):
        _fill(tmp_path / root, ["dicom", "runs", "phantom"])
    runner.mark_root(str(tmp_path / ("work" if which == "store" else "store")), study.name)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    key = "storage" if which == "store" else "workdir"
    with pytest.raises(UserError, match=rf"^--fresh: {key} .*{which} has no \.ctssl-study\.json naming study 'tiny'"):
        _clean(study)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    runner.mark_root(str(tmp_path / which), "another")  # a sentinel of another study is no better
    with pytest.raises(UserError, match="naming study 'tiny'"):
        _clean(study)


def test_a_second_driver_on_a_leased_root_is_refused_and_changes_nothing(tmp_path):
    from ctssl_base.lease import Lease, LeaseHeld

    study = _study(tmp_path)
    with Lease(study.storage, "study tiny"), pytest.raises(LeaseHeld, match="is in use by study tiny on host"):
        runner.run(study)
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == []  # no marker, no sentinel
    assert not (tmp_path / "work").exists()
