"""A setting is added in one place: a field of its stage's table (ctssl_base.settings) becomes a CLI flag,
a study key with its default and description in the schema, and a line of the help, with no other edit."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from ctssl_base import settings
from ray_jobs.commands import finetune as finetune_cmd
from ray_jobs.finetune.config import FinetuneConfig
from ray_jobs.study import schema_tables
from ray_jobs.study.spec import SCHEMA_FILE


def _with_throwaway() -> type:
    """FinetuneConfig plus one setting, declared as a new knob would be."""
    field = settings.setting(7, key="throwAway", schema={"minimum": 1, "maximum": 9}, metavar="N",
                             help="a knob for this test, used with {stopping} (default {default})")
    return dataclasses.make_dataclass("Throwaway", [("throw_away", int, field)], bases=(FinetuneConfig,))


def test_a_new_setting_is_a_flag_a_study_key_with_its_schema_default_and_help():
    cls = _with_throwaway()
    p = argparse.ArgumentParser(prog="ctssl finetune")
    settings.add_flags(p, cls)
    finetune_cmd.add_arguments(argparse.ArgumentParser())  # the real command still builds
    args = p.parse_args(["--data", "d", "--storage", "s", "--experiment", "e", "--throw-away", "3"])
    assert settings.from_args(cls, args).throw_away == 3
    assert settings.from_args(cls, p.parse_args(["--data", "d", "--storage", "s", "--experiment", "e"])
                              ).throw_away == 7
    help_text = " ".join(p.format_help().split())
    assert "--throw-away N a knob for this test, used with --stopping (default 7)" in help_text
    doc = schema_tables.synced(json.loads(SCHEMA_FILE.read_text()), {"finetune": cls})
    prop = doc["properties"]["spec"]["properties"]["finetune"]["properties"]["throwAway"]
    assert prop == {"type": "integer", "default": 7, "minimum": 1, "maximum": 9,
                    "description": "a knob for this test, used with `stopping` (default 7)."}
    assert settings.from_section(cls, {"throwAway": 5}, data="d", storage="s", experiment="e").throw_away == 5


def test_the_checked_in_schema_is_what_the_tables_write():
    """`make schema` after a table edit: the file holds each table-owned keyword as the table states it."""
    doc = json.loads(SCHEMA_FILE.read_text())
    assert schema_tables.synced(doc) == doc, "run `make schema`: study.schema.json differs from the settings tables"


def test_a_help_text_naming_an_unknown_setting_fails_loudly():
    field = settings.setting(1, key="x", help="see {no_such_field}")
    cls = dataclasses.make_dataclass("Bad", [("x", int, field)])
    with pytest.raises(KeyError, match="no_such_field"):
        settings.schema_fields(cls)
