"""One default per knob: a study file's keys, the config dataclasses and the CLI agree, compared from
the one mapping between the shapes (each config's settings table), not from copies of the values."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from ctssl_base import settings
from ray_jobs.commands import finetune as finetune_cmd
from ray_jobs.finetune.config import DEFAULT_SAMPLES_PER_CLASS, STUDY_KEYS, FinetuneConfig
from ray_jobs.pretrain.config import PretrainConfig
from ray_jobs.study import spec
from tests.conftest import REPO

SCHEMA = json.loads((REPO / "ray_jobs" / "study" / "study.schema.json").read_text())["properties"]["spec"]["properties"]


def _default(cls: type, name: str) -> Any:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _cli(argv: list[str]) -> FinetuneConfig:
    p = argparse.ArgumentParser()
    finetune_cmd.add_arguments(p)
    return finetune_cmd.config_from_args(p.parse_args(argv))


def test_every_finetune_key_defaults_to_its_config_field():
    props = SCHEMA["finetune"]["properties"]
    assert set(STUDY_KEYS) <= set(props), set(STUDY_KEYS) - set(props)
    for key, field in STUDY_KEYS.items():
        assert props[key]["default"] == _default(FinetuneConfig, field), key
    assert props["samplesPerClass"]["default"] == list(DEFAULT_SAMPLES_PER_CLASS)
    # every key of the section is either mapped or one of the few the study itself acts on
    assert set(props) - set(STUDY_KEYS) == {"random", "evaluation", "samplesPerClass"}


def test_a_study_with_no_finetune_section_and_ctssl_finetune_without_flags_build_the_same_config():
    study = spec.loads("apiVersion: ctssl/v1\nkind: Study\nmetadata: {name: d}\nspec:\n  storage: /tmp/d\n"
                       "  data:\n    pretrain: {type: phantom, patients: 4, slices: 4}\n"
                       "    labelled: {type: phantom, patients: 4, slices: 4, task: lesion}\n",
                       "d.yaml")
    from_study = FinetuneConfig.from_study(study.spec["finetune"], data="d", storage="s", experiment="e",
                                           encoders=["random"])
    from_cli = _cli(["--data", "d", "--storage", "s", "--experiment", "e"])
    assert from_study == from_cli == FinetuneConfig(data="d", storage="s", experiment="e")


def test_the_help_quotes_the_config_defaults():
    p = argparse.ArgumentParser(prog="ctssl finetune", description=finetune_cmd.DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    finetune_cmd.add_arguments(p)
    text = " ".join(p.format_help().split())
    d = FinetuneConfig(data="d", storage="s", experiment="e")
    assert f"{d.frozen_epochs} of {d.epochs} epochs frozen" in text
    assert f"(default {','.join(map(str, DEFAULT_SAMPLES_PER_CLASS))}, as in a study file)" in text
    assert f"(default {d.folds})" in text


def test_the_pretrain_and_resources_keys_default_to_pretrain_config():
    pre, res = SCHEMA["pretrain"]["properties"], SCHEMA["resources"]["properties"]
    keys = settings.study_keys(PretrainConfig)
    assert {"backbone", "epochs", "timeBudget", "maxSteps", "batch", "checkpointEvery", "budgetCurve"} <= set(keys)
    for key, field in keys.items():
        assert pre[key]["default"] == _default(PretrainConfig, field), key
    # the rest of the section: the per-method map, where budget-curve checkpoints are probed, the probe block
    assert set(pre) - set(keys) == {"methods", "budgetSizes", "budgetFinetune", "monitor"}
    for key, field in {"workers": "workers", "cpusPerWorker": "cpus_per_worker"}.items():
        assert res[key]["default"] == _default(PretrainConfig, field), key
    # the one documented difference: a study resolves "auto" to the GPUs its cluster has, the CLI asks for 0
    assert res["gpusPerWorker"]["default"] == "auto" and _default(PretrainConfig, "gpus_per_worker") == 0.0


def test_a_study_pretrain_section_and_ctssl_pretrain_flags_build_the_same_config():
    """The same values written as study keys and as flags give one PretrainConfig (the time budget
    parsed from its text either way; a method's own override wins over the section)."""
    from ray_jobs.commands import pretrain as pretrain_cmd

    section = {"backbone": "resnet18", "epochs": 3, "timeBudget": "12m", "maxSteps": 40, "batch": 16,
               "checkpointEvery": 7, "budgetCurve": [0.25, 1.0]}
    rest = {"method": "byol", "data": "d", "storage": "s", "experiment": "e"}
    from_study = settings.from_section(PretrainConfig, {**section, "epochs": 5}, **rest)
    p = argparse.ArgumentParser()
    pretrain_cmd.add_arguments(p)
    from_cli = pretrain_cmd.config_from_args(p.parse_args([
        "--method", "byol", "--data", "d", "--storage", "s", "--experiment", "e", "--backbone", "resnet18",
        "--epochs", "5", "--time-budget", "12m", "--max-steps", "40", "--batch-size", "16",
        "--checkpoint-every", "7", "--keep-at-fractions", "0.25,1"]))
    assert from_study == from_cli and from_cli.time_budget_s == 720.0 and from_cli.keep_at_fractions == [0.25, 1.0]
    assert pretrain_cmd.config_from_args(p.parse_args(["--method", "byol", "--data", "d", "--storage", "s",
                                                       "--experiment", "e"])) == PretrainConfig(**rest)
