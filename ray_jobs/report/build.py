"""Assembling the report: markdown + PNG + one self-contained HTML page (image embedded as base64)."""

from __future__ import annotations

import logging
import math
import os
import tempfile
from dataclasses import dataclass

import pandas as pd

from ctssl_base import storage
from ctssl_base.errors import UserError
from ray_jobs import tracking
from ray_jobs.report.budget_plot import protocols_section, report_section
from ray_jobs.report.collect import load_study, unfinished_note
from ray_jobs.report.embedding_maps import MapsInput
from ray_jobs.report.linear_report import build_linear
from ray_jobs.report.pages import REPORT_ARTIFACT, ReportPaths, extras, write_pages
from ray_jobs.report.plots import plot_auc_vs_size
from ray_jobs.report.pooled import bootstrap_markdown, bootstrap_vs_baseline, load_predictions
from ray_jobs.report.tables import (
    convergence_note,
    convergence_table,
    minimal_samples,
    recipe_markdown,
    recipe_table,
    smallest_size_verdict,
    summarise,
    summary_markdown,
    wilcoxon_markdown,
    wilcoxon_vs_baseline,
)
from ray_jobs.report.volume_checks import SECTION as VOLUME_SECTION
from ray_jobs.report.volume_checks import volume_checks_markdown

log = logging.getLogger(__name__)

DEFAULT_MARGIN = 0.02  # used when neither the study nor the report names a target


@dataclass
class ReportConfig:
    experiment: str
    out: str
    study_run: str | None = None
    tracking_uri: str | None = None
    storage: str | None = None
    baseline: str = "random"
    target_auc: float | None = None
    margin: float | None = None
    #: also log the report's files as artifacts of the study's parent run (folder "report")
    log_to_run: bool = False
    #: data set (role) -> URL of the prep output it came from: the report lists their volume checks
    prep_manifests: dict[str, str] | None = None
    #: the encoders and data of the "What the encoders learned" pictures; None: no such section
    embedding_maps: MapsInput | None = None
    #: a study's budget_curve.csv (its budget stage): the "Gain versus pre-training budget" section
    budget_curve: str | None = None
    #: a study's budget_finetune.csv (its budget-finetune stage): the same curve under fine-tuning
    budget_finetune: str | None = None
    #: a study's linear_probe.csv (its linear stage): the linear probe beside fine-tuning at every size;
    #: without it that section shows the budget curve's probed sizes
    linear_probe: str | None = None


def _param_float(params: dict[str, str], key: str) -> float | None:
    v = params.get(key)
    try:
        f = float(v) if v not in (None, "None", "") else None
    except ValueError:
        return None
    return f if f is not None and math.isfinite(f) else None


def _minimal_markdown(table: pd.DataFrame, searched: dict[str, str]) -> str:
    lines = ["| encoder | AUC threshold | smallest size reaching it | samples/class | AUC there | full-data AUC |"
             + (" searched minimum |" if searched else ""),
             "|---|---|---|---|---|---|" + ("---|" if searched else "")]
    for r in table.itertuples(index=False):
        thr = "n/a" if not math.isfinite(r.threshold) else f"{r.threshold:.3f}"
        spc = "not reached" if not math.isfinite(r.min_samples_per_class) else f"{r.min_samples_per_class:.0f}"
        auc = "n/a" if not math.isfinite(r.auc_at_min) else f"{r.auc_at_min:.3f}"
        line = f"| {r.encoder} | {thr} | {r.min_size or '-'} | {spc} | {auc} | {r.full_auc:.3f} |"
        if searched:
            line += f" {searched.get(r.encoder, '-')} |"
        lines.append(line)
    return "\n".join(lines)


def build_report(cfg: ReportConfig) -> ReportPaths:
    """Build the report into ``cfg.out``: a local folder, or any storage URL (``s3://...``), where the
    files are built in a temporary folder and then uploaded, each with an atomic write."""
    if storage.is_local(cfg.out):
        return _build(cfg, storage.open_fs(cfg.out)[1])
    storage.check_writable(cfg.out)  # fail before reading the study, with the URL in the message
    fs, root = storage.open_fs(cfg.out)
    with tempfile.TemporaryDirectory(prefix="ctssl-report-") as tmp:
        local = _build(cfg, tmp)
        for name in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, name), "rb") as f:
                storage.write_bytes_atomic(fs, storage.join(root, name), f.read())
    base = cfg.out.rstrip("/")
    return ReportPaths(**{k: storage.join(base, os.path.basename(v)) if v else v for k, v in vars(local).items()})


def _build(cfg: ReportConfig, out: str) -> ReportPaths:
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        if not cfg.storage:
            raise UserError("give --tracking-uri (or MLFLOW_TRACKING_URI), or the study's local --storage")
        uri = tracking.resolve_tracking_uri(None, cfg.storage)
    study = load_study(uri, cfg.experiment, cfg.study_run)
    if study.tags.get(tracking.TAG_STAGE) == "linear":  # a study without fine-tuning (evaluation: linear)
        return build_linear(cfg, out, study)
    trials = study.trials
    if trials.empty:
        raise UserError(f"study run {study.parent_run_id} of {cfg.experiment!r} has no finished trials")
    os.makedirs(out, exist_ok=True)
    summary = summarise(trials)
    wil = wilcoxon_vs_baseline(trials, cfg.baseline)
    preds = load_predictions(tracking.client(uri), trials["run_id"].tolist())
    boot = bootstrap_vs_baseline(trials, preds, cfg.baseline)
    target = cfg.target_auc if cfg.target_auc is not None else _param_float(study.params, "search_target_auc")
    margin = cfg.margin if cfg.margin is not None else _param_float(study.params, "search_margin")
    if target is None and margin is None:
        margin = DEFAULT_MARGIN
    minimal = minimal_samples(summary, target, margin)
    conv = convergence_table(trials)
    protocol = study.tags.get("protocol_text") or _protocol_from_params(study.params)
    stopping = study.tags.get("stopping_text") or (f"fixed length: {study.params.get('epochs', '?')} epochs per "
                                                   "recipe")
    searched = {k[len("min_spc."):]: v for k, v in study.tags.items() if k.startswith("min_spc.")}

    plot = plot_auc_vs_size(trials, os.path.join(out, "auc_vs_size.png"), title=f"{cfg.experiment}: AUC vs size")
    cl = tracking.client(uri)
    ex = extras(cl, study, cfg.baseline, sorted(trials["encoder"].unique()), summary, cfg.embedding_maps, out,
                cfg.experiment)
    csv = os.path.join(out, "summary.csv")
    summary.to_csv(csv, index=False)
    rule = f"mean test AUC >= {target}" if target is not None else f"within {margin} of the largest size's AUC"
    sections = [
        (f"Fine-tuning study `{cfg.experiment}`",
         f"MLflow parent run `{study.parent_run_id}`; {len(trials)} finished trials; dataset "
         f"{study.tags.get('dataset', '?')}; classes {study.params.get('classes', '?')}."
         + (f"\n\n{note}" if (note := unfinished_note(study.unfinished)) else "")),
        ("Verdict at the smallest training-set size",
         smallest_size_verdict(summary, wil, cfg.baseline, boot=boot, protocol=protocol, convergence=conv)
         + f"\n\nTraining length: {stopping}. {convergence_note(conv)}"),
        ("Test metrics (mean ± std over folds)", summary_markdown(summary)),
        ("Fine-tuning recipe per encoder", f"{protocol[:1].upper()}{protocol[1:]}.\n\n"
         + recipe_markdown(recipe_table(trials))),
        ("AUC vs training-set size", "![AUC vs training-set size](auc_vs_size.png)"),
        *ex.sections(),
        *([report_section(cfg.budget_curve, out, summary, cfg.budget_finetune)] if cfg.budget_curve else []),
        *([protocols_section(linear, summary)] if (linear := cfg.linear_probe or cfg.budget_curve) else []),
        (f"Paired Wilcoxon signed-rank test against `{cfg.baseline}`",
         wilcoxon_markdown(wil, cfg.baseline) if not wil.empty else f"no `{cfg.baseline}` trials to compare with"),
        (f"Patient-level bootstrap of the pooled out-of-fold AUC against `{cfg.baseline}`",
         (BOOTSTRAP_NOTE + "\n\n" + bootstrap_markdown(boot, cfg.baseline)) if not boot.empty
         else "no logged test predictions to pool (trials from an older ctssl, or no baseline)"),
        (f"Minimal samples per class ({rule})", _minimal_markdown(minimal, searched)),
        *([(VOLUME_SECTION, volume_checks_markdown(cfg.prep_manifests))] if cfg.prep_manifests else []),
    ]
    paths, files = write_pages(out, cfg.experiment, sections, plot, csv, ex, tables={
        "summary": summary, "wilcoxon": wil, "bootstrap": boot, "minimal": minimal, "recipes": recipe_table(trials)},
        doc={"parent_run_id": study.parent_run_id, "minimal": minimal.to_dict(orient="records"),
             "searched_minimal": searched, "convergence": conv.to_dict(orient="records")})
    if cfg.log_to_run:
        tracking.log_artifacts(cl, study.parent_run_id, files, REPORT_ARTIFACT)
    return paths


def _protocol_from_params(params: dict[str, str]) -> str:
    """How recipes were set, for a study that did not tag it (one fixed recipe for every encoder)."""
    lr, frozen, epochs = params.get("lr", "?"), params.get("frozen_epochs", "?"), params.get("epochs", "?")
    return f"fixed recipe for every encoder (lr {lr}, backbone frozen for {frozen} of {epochs} epochs), not tuned"


BOOTSTRAP_NOTE = ("Each encoder's test predictions are pooled over the folds (every labelled patient is "
                  "a test patient exactly once), compared with the baseline's on the same slices, and "
                  "patients are resampled with replacement (1,000 times) to give a 95 % interval and a "
                  "two-sided p-value for the difference in macro AUC.")
