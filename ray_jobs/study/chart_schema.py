"""The study schema inside the Helm chart's ``values.schema.json``, so ``helm install`` refuses a bad
study before any pod starts. Generated from :func:`ray_jobs.study.spec.schema` (the file with the
methods registry filled in); ``make schema`` writes it and a chart test checks it is current.

The chart's copy differs in two ways only: the ``study`` block may be null (a release without a
study), and ``spec.storage`` may be left out (the chart fills it in from its own storage values).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from ray_jobs.study.spec import schema

VALUES_SCHEMA = Path(__file__).resolve().parents[2] / "charts" / "ctssl" / "values.schema.json"
#: what the chart fills in for a study that leaves it out, so the values' study need not say it
CHART_FILLS = ("storage",)


def values_study_schema() -> tuple[dict[str, Any], dict[str, Any]]:
    """(values.schema.json's ``study`` property, its ``$defs``). The ``$defs`` move to the root of
    values.schema.json, where the study schema's ``#/$defs/...`` references point."""
    study = copy.deepcopy(schema())
    defs = study.pop("$defs")
    for key in ("$schema", "$id"):
        study.pop(key)
    study["type"] = ["object", "null"]
    spec = study["properties"]["spec"]
    spec["required"] = [k for k in spec["required"] if k not in CHART_FILLS]
    study["description"] = ("The study (ctssl/v1 Study, docs/study-spec.md); null: no study. " + study["description"])
    return study, defs


def sync_values_schema(path: Path = VALUES_SCHEMA) -> bool:
    """Write the study schema into values.schema.json; True when it changed."""
    values = json.loads(path.read_text())
    study, defs = values_study_schema()
    changed = values["properties"].get("study") != study or values.get("$defs") != defs
    values["properties"]["study"] = study
    values["$defs"] = defs
    path.write_text(json.dumps(values, indent=2) + "\n")
    return changed


if __name__ == "__main__":
    print("values.schema.json " + ("updated" if sync_values_schema() else "already up to date"))
