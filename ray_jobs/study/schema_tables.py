"""The study schema's keywords that the settings tables own: for each section made from a config
dataclass (``prep`` from :class:`~data_prep.prep.PrepConfig`, ``pretrain`` from
:class:`~ray_jobs.pretrain.config.PretrainConfig`, ``finetune`` from
:class:`~ray_jobs.finetune.config.FinetuneConfig`), every key's default,
description and bounds are written into ``study.schema.json`` from the table (:mod:`ctssl_base.settings`).

``make schema`` runs this first (then the chart's copy and the docs' key reference follow from the
file); tests/study/test_settings_table.py fails when the checked-in file is not what it writes.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from ctssl_base import settings
from data_prep.prep import PrepConfig
from ray_jobs.finetune.config import FinetuneConfig
from ray_jobs.pretrain.config import PretrainConfig
from ray_jobs.study.spec import SCHEMA_FILE

#: study-file section -> the config dataclass whose table defines its keys
SECTIONS: dict[str, type] = {"prep": PrepConfig, "pretrain": PretrainConfig, "finetune": FinetuneConfig}


def synced(doc: dict[str, Any], sections: dict[str, type] = SECTIONS) -> dict[str, Any]:
    """``doc`` (the study schema) with each section's table-owned keywords written in."""
    out = copy.deepcopy(doc)
    spec = out["properties"]["spec"]["properties"]
    for name, cls in sections.items():
        spec[name] = settings.sync_section(spec[name], cls)
    return out


def sync_file(path: Path = SCHEMA_FILE) -> bool:
    """Rewrite ``path`` from the tables; True when it changed."""
    text = path.read_text()
    new = json.dumps(synced(json.loads(text)), indent=2) + "\n"
    if new != text:
        path.write_text(new)
    return new != text


if __name__ == "__main__":
    print("study.schema.json " + ("updated" if sync_file() else "already up to date"))
