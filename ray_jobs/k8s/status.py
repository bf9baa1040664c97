"""The status table of a release: its prep Job and RayJobs, one row each, in stage order.

A RayJob has two status fields: ``jobStatus`` (the Ray job: PENDING/RUNNING/SUCCEEDED/FAILED/STOPPED)
and ``jobDeploymentStatus`` (KubeRay's lifecycle of cluster + submission). The note column says in
words what each lifecycle state means for the user, so the table answers "what is it doing now?".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ray_jobs.k8s.objects import COMPONENT_LABEL, METHOD_LABEL, MLFLOW_EXPERIMENT_ANNOTATION

# KubeRay v1.7 JobDeploymentStatus values -> what they mean for the study ("" is the operator's "New").
DEPLOYMENT_NOTES: dict[str, str] = {
    "": "new: the KubeRay operator has not picked it up yet",
    "Initializing": "starting its Ray cluster (the head first waits for the stage's input)",
    "Waiting": "waiting for a job submission to the cluster",
    "Running": "running on its Ray cluster",
    "Complete": "finished; the cluster is removed after ttlSecondsAfterFinished",
    "Failed": "failed",
    "ValidationFailed": "rejected by the operator: the spec is invalid",
    "Suspending": "suspending: its cluster is being deleted",
    "Suspended": "suspended; set spec.suspend=false to resume",
    "Retrying": "an attempt failed; retrying on a fresh cluster",
}
STAGE_ORDER = {"prep": 0, "reduce": 1, "pretrain": 2, "finetune": 3}
HEADERS = ("STAGE", "KIND", "NAME", "JOB STATUS", "DEPLOYMENT", "NOTE", "MLFLOW")


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


def job_row_status(obj: dict[str, Any]) -> tuple[str, str, str]:
    """(job status, progress, note) of a batch Job (the Indexed prep Job)."""
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    conds = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
    done, failed, active = status.get("succeeded", 0), status.get("failed", 0), status.get("active", 0)
    total = spec.get("completions", 1)
    progress = f"{done}/{total} indexes done"
    if "Complete" in conds:
        return "SUCCEEDED", progress, "all shards written, manifest committed"
    failed_indexes = f"; failed indexes {status['failedIndexes']}" if status.get("failedIndexes") else ""
    if "Failed" in conds:
        c = conds["Failed"]
        return "FAILED", progress, f"{c.get('reason', '')}: {c.get('message', '')}".strip(": ") + failed_indexes
    if active:
        return "RUNNING", progress, f"{active} pod(s) running, {failed} failed attempt(s){failed_indexes}"
    return "PENDING", progress, "waiting for pods to start (or for the source to be uploaded)"


def rows(jobs: list[dict[str, Any]], rayjobs: list[dict[str, Any]],
         mlflow_link: Callable[[str], str] | None = None) -> list[tuple[str, ...]]:
    out: list[tuple[int, tuple[str, ...]]] = []
    for j in jobs:
        stage = (j["metadata"].get("labels") or {}).get(COMPONENT_LABEL, "prep")
        js, progress, note = job_row_status(j)
        out.append((STAGE_ORDER.get(stage, 9), (stage, "Job", j["metadata"]["name"], js, progress, note, "-")))
    for r in rayjobs:
        meta = r["metadata"]
        lab = meta.get("labels") or {}
        stage = lab.get(COMPONENT_LABEL, "?")
        if lab.get(METHOD_LABEL):
            stage = f"{stage}/{lab[METHOD_LABEL]}"
        status = r.get("status") or {}
        experiment = (meta.get("annotations") or {}).get(MLFLOW_EXPERIMENT_ANNOTATION, "")
        link = (mlflow_link(experiment) if mlflow_link else f"experiment {experiment}") if experiment else "-"
        out.append((STAGE_ORDER.get(lab.get(COMPONENT_LABEL, ""), 9),
                    (stage, "RayJob", meta["name"], status.get("jobStatus") or "-", deployment_label(status),
                     rayjob_note(r), link)))
    return [row for _, row in sorted(out, key=lambda t: (t[0], t[1][2]))]


def render_table(table: list[tuple[str, ...]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in table)) if table else len(h) for i, h in enumerate(HEADERS)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(HEADERS, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table]
    return "\n".join(lines)
