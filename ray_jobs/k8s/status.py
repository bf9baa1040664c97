"""The status table of a release: one row per study RayJob (the chart makes one per study).

A RayJob has two status fields: ``jobStatus`` (the Ray job: PENDING/RUNNING/SUCCEEDED/FAILED/STOPPED)
and ``jobDeploymentStatus`` (KubeRay's lifecycle of cluster + submission). The note column says in
words what each lifecycle state means for the user, and the stage column shows the study's stage
from the driver's log (``[3/9] pretrain-byol: ...``), so the table answers "what is it doing now?".
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

INSTANCE_LABEL = "app.kubernetes.io/instance"
COMPONENT_LABEL = "app.kubernetes.io/component"
STUDY_LABEL = "ctssl.io/study"
MLFLOW_EXPERIMENT_ANNOTATION = "ctssl.io/mlflow-experiment"
STORAGE_ANNOTATION = "ctssl.io/storage"

# KubeRay v1.7 JobDeploymentStatus values -> what they mean for the study ("" is the operator's "New").
DEPLOYMENT_NOTES: dict[str, str] = {
    "": "new: the KubeRay operator has not picked it up yet",
    "Initializing": "starting its Ray cluster (the head pod; worker pods come when a stage asks for them)",
    "Waiting": "waiting for a job submission to the cluster",
    "Running": "running on its Ray cluster",
    "Complete": "finished; the cluster is removed after ttlSecondsAfterFinished",
    "Failed": "failed",
    "ValidationFailed": "rejected by the operator: the spec is invalid",
    "Suspending": "suspending: its cluster is being deleted",
    "Suspended": "suspended (e.g. queued by Kueue); set spec.suspend=false to resume",
    "Retrying": "the driver failed; retrying on a fresh cluster, resuming from the stage markers",
}
HEADERS = ("STUDY", "RAYJOB", "JOB STATUS", "DEPLOYMENT", "STAGE", "NOTE", "MLFLOW")
#: the runner's header of a stage: "[3/9] pretrain-byol: pre-training byol on ... (not run yet)"
STAGE_LINE = re.compile(r"^\[(\d+)/(\d+)\] ([\w-]+): (.*)$", re.M)


def deployment_label(status: dict[str, Any]) -> str:
    value = status.get("jobDeploymentStatus") or ""
    return value if value else "New"


def rayjob_note(obj: dict[str, Any]) -> str:
    status = obj.get("status") or {}
    value = status.get("jobDeploymentStatus") or ""
    note = DEPLOYMENT_NOTES.get(value, f"state {value!r} is unknown to this ctssl version")
    if value == "Retrying" or status.get("failed"):
        note += f" ({status.get('failed', 0)} failed attempt(s), backoffLimit {obj['spec'].get('backoffLimit', 0)})"
    detail = " ".join(x for x in (status.get("reason"), status.get("message")) if x)
    if detail and value in ("Failed", "ValidationFailed", "Retrying"):
        note += f": {detail}"
    return note


def current_stage(log: str) -> str:
    """"3/9 pretrain-byol (done|reused)" from the driver's log: the last stage header it printed."""
    found = list(STAGE_LINE.finditer(log))
    if not found:
        return "-"
    i, n, name, rest = found[-1].groups()
    state = "reused" if "reusing the finished stage" in rest else ("done" if " done in " in f" {rest}" else "running")
    return f"{i}/{n} {name} ({state})"


def rows(rayjobs: list[dict[str, Any]], stage_of: Callable[[dict[str, Any]], str] | None = None,
         mlflow_link: Callable[[str], str] | None = None) -> list[tuple[str, ...]]:
    out = []
    for r in sorted(rayjobs, key=lambda o: o["metadata"]["name"]):
        meta = r["metadata"]
        status = r.get("status") or {}
        study = (meta.get("labels") or {}).get(STUDY_LABEL, "?")
        experiment = (meta.get("annotations") or {}).get(MLFLOW_EXPERIMENT_ANNOTATION, "")
        link = (mlflow_link(experiment) if mlflow_link else f"experiment {experiment}") if experiment else "-"
        out.append((study, meta["name"], status.get("jobStatus") or "-", deployment_label(status),
                    stage_of(r) if stage_of else "-", rayjob_note(r), link))
    return out


def report_location(rayjob: dict[str, Any]) -> str | None:
    """Where the study's report lands (``<storage>/report/report.html``), from the RayJob's annotation."""
    storage = (rayjob["metadata"].get("annotations") or {}).get(STORAGE_ANNOTATION)
    return f"{storage.rstrip('/')}/report/report.html" if storage else None


def render_table(table: list[tuple[str, ...]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in table)) if table else len(h) for i, h in enumerate(HEADERS)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(HEADERS, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table]
    return "\n".join(lines)
