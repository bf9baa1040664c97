"""The study's online probe (``pretrain.monitor``): each pre-training run is handed fold 0 of the
fine-tuning study's own patient-level folds, so the probe embeds training and validation slices of the
labelled set and never a test patient of that fold; the keys map onto ``ctssl pretrain``'s settings, and
the probe stays out of the stage's fingerprint (it only watches)."""

from __future__ import annotations

import numpy as np
import pytest

from ray_jobs.finetune.data import load_labelled
from ray_jobs.finetune.folds import make_folds
from ray_jobs.pretrain.config import PretrainConfig
from ray_jobs.pretrain.monitor import build_probe_set
from ray_jobs.study import spec as study_spec
from ray_jobs.study.stages import Context, _monitor_settings, plan
from tests.ray_jobs.tiny_data import write_tiny_dataset


def _study(tmp_path, labelled: str, monitor: dict | None = None, folds: int = 3, val: float = 0.3, seed: int = 7):
    pre = {"methods": {"byol": {}}}
    if monitor is not None:
        pre["monitor"] = monitor
    return study_spec.from_dict({
        "apiVersion": "ctssl/v1", "kind": "Study", "metadata": {"name": "mon"},
        "spec": {"storage": str(tmp_path / "store"), "workdir": str(tmp_path / "work"), "seed": seed,
                 "data": {"pretrain": {"type": "shards", "path": labelled},
                          "labelled": {"type": "shards", "path": labelled}},
                 "pretrain": pre, "finetune": {"folds": folds, "valFraction": val}}})


@pytest.fixture
def labelled(tmp_path) -> str:
    url = str(tmp_path / "labelled")
    write_tiny_dataset(url, patients=12, slices=3, size=32, source="lab", seed=3)
    return url


def test_the_probe_gets_fold_0_of_the_fine_tuning_folds_and_never_its_test_patients(tmp_path, labelled):
    study = _study(tmp_path, labelled, monitor={"every": 6, "k": 5, "slices": 512})
    ctx = Context(study=study, address=None, tracking_uri="sqlite:///unused.db")
    kw = _monitor_settings(ctx)
    assert (kw["monitor_every"], kw["monitor_every_s"], kw["monitor_k"], kw["monitor_slices"]) == (6, None, 5, 512)
    probe = build_probe_set(PretrainConfig(method="byol", data=labelled, storage="s", experiment="e", **kw))

    # the folds the fine-tuning stage makes: its folds, validation share and the study's seed
    data = load_labelled(labelled)
    ft = study.spec["finetune"]
    fold0 = make_folds(data.patients, data.label_names, ft["folds"], ft["valFraction"], seed=study.spec["seed"])[0]
    seen = set(probe.train_rows) | set(probe.val_rows)
    assert set(probe.train_rows) == set(fold0.train) and set(probe.val_rows) == set(fold0.val)
    assert not seen & set(fold0.test) and len(fold0.test) > 0
    assert not set(data.patients[list(seen)]) & set(data.patients[fold0.test])

    # another seed makes other folds: the probe follows the study, it does not keep its own split
    other = _monitor_settings(Context(study=_study(tmp_path, labelled, seed=8), address=None, tracking_uri=""))
    fold0_8 = make_folds(data.patients, data.label_names, 3, 0.3, seed=8)[0]
    probe_8 = build_probe_set(PretrainConfig(method="byol", data=labelled, storage="s", experiment="e", **other))
    assert np.array_equal(np.sort(probe_8.val_rows), np.sort(fold0_8.val))


def test_monitor_keys_durations_off_and_out_of_the_fingerprint(tmp_path, labelled):
    timed = _monitor_settings(Context(study=_study(tmp_path, labelled, {"every": "2m"}), address=None,
                                      tracking_uri=""))
    assert (timed["monitor_every"], timed["monitor_every_s"]) == (None, 120.0)
    defaults = _monitor_settings(Context(study=_study(tmp_path, labelled), address=None, tracking_uri=""))
    assert (defaults["monitor_every"], defaults["monitor_k"], defaults["monitor_slices"]) == (100, 20, 256)
    off = _study(tmp_path, labelled, {"enabled": False})
    assert _monitor_settings(Context(study=off, address=None, tracking_uri="")) == {}

    def pretrain_settings(study):
        return [s.settings for s in plan(study) if s.name.startswith("pretrain-")]

    assert pretrain_settings(_study(tmp_path, labelled, {"every": 3})) == pretrain_settings(off)


@pytest.mark.parametrize("bad", [{"every": 0}, {"every": "soon"}, {"k": 0}, {"slices": 2}, {"often": 1}])
def test_bad_monitor_keys_are_one_line_naming_the_key(tmp_path, labelled, bad):
    with pytest.raises(study_spec.SpecError) as e:
        _study(tmp_path, labelled, bad)
    assert "pretrain.monitor" in str(e.value) and "\n" not in str(e.value).strip()
