"""Assembling the report: markdown + PNG + one self-contained HTML page (image embedded as base64)."""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass

import pandas as pd

from ctssl_base import storage
from ctssl_base.errors import UserError
from ray_jobs import tracking
from ray_jobs.report.budget_plot import protocols_section, report_section
from ray_jobs.report.collect import load_study, unfinished_note
from ray_jobs.report.embedding_maps import SECTION as MAPS_SECTION
from ray_jobs.report.embedding_maps import MapsInput, write_maps
from ray_jobs.report.plots import plot_auc_vs_size
from ray_jobs.report.pooled import bootstrap_markdown, bootstrap_vs_baseline, load_predictions
from ray_jobs.report.pretraining import (
    PRETRAIN_NOTE,
    PRETRAIN_PLOT,
    collect_pretraining,
    display_table,
    plot_auc_vs_pretrain_time,
    pretraining_markdown,
    pretraining_table,
)
from ray_jobs.report.probe_curves import PROBE_PLOT, collect_probe_curves, plot_probe_curves, probe_markdown
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
    #: a study's linear_probe.csv (its linear stage): the linear probe beside fine-tuning at every size;
    #: without it that section shows the budget curve's probed sizes
    linear_probe: str | None = None


#: the artifact folder of the study's parent run the report's files go to (``log_to_run``)
REPORT_ARTIFACT = "report"


@dataclass
class ReportPaths:
    markdown: str
    html: str
    plot: str
    summary_csv: str
    pretrain_plot: str | None = None  # AUC vs pre-training time; None when the experiment has no such runs


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
    pre = collect_pretraining(cl, study.experiment_id, sorted(trials["encoder"].unique()), study.tags, study.params)
    pre_table = pretraining_table(pre, summary, cfg.baseline) if not pre.empty else None
    pre_plot = None
    if pre_table is not None:
        pre_plot = plot_auc_vs_pretrain_time(pre_table, os.path.join(out, PRETRAIN_PLOT),
                                             title=f"{cfg.experiment}: AUC vs pre-training time")
    curves, collapsed = collect_probe_curves(cl, pre) if not pre.empty else (pd.DataFrame(), {})
    probe_plot = None if curves.empty else plot_probe_curves(curves, os.path.join(out, PROBE_PLOT),
                                                             title=f"{cfg.experiment}: online probe")
    maps_text, maps_files = _embedding_maps(cfg.embedding_maps, out)
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
        *([("Pre-training", f"{PRETRAIN_NOTE}\n\n{pretraining_markdown(pre_table)}\n\n"
            f"![AUC vs pre-training time]({PRETRAIN_PLOT})")] if pre_table is not None else []),
        *([("Online probe during pre-training", probe_markdown(curves, collapsed))] if probe_plot else []),
        *([(MAPS_SECTION, maps_text)] if cfg.embedding_maps is not None else []),
        *([report_section(cfg.budget_curve, out, summary)] if cfg.budget_curve else []),
        *([protocols_section(linear, summary)] if (linear := cfg.linear_probe or cfg.budget_curve) else []),
        (f"Paired Wilcoxon signed-rank test against `{cfg.baseline}`",
         wilcoxon_markdown(wil, cfg.baseline) if not wil.empty else f"no `{cfg.baseline}` trials to compare with"),
        (f"Patient-level bootstrap of the pooled out-of-fold AUC against `{cfg.baseline}`",
         (BOOTSTRAP_NOTE + "\n\n" + bootstrap_markdown(boot, cfg.baseline)) if not boot.empty
         else "no logged test predictions to pool (trials from an older ctssl, or no baseline)"),
        (f"Minimal samples per class ({rule})", _minimal_markdown(minimal, searched)),
        *([(VOLUME_SECTION, volume_checks_markdown(cfg.prep_manifests))] if cfg.prep_manifests else []),
    ]
    md_text = "\n\n".join(f"## {h}\n\n{b}" for h, b in sections) + "\n"
    md_path = os.path.join(out, "report.md")
    with open(md_path, "w") as f:
        f.write(md_text)
    html_path = os.path.join(out, "report.html")
    with open(html_path, "w") as f:
        f.write(_html(cfg.experiment, sections, plot, {
            "summary": summary, "wilcoxon": wil, "bootstrap": boot, "minimal": minimal,
            "recipes": recipe_table(trials),
            "pretraining": display_table(pre_table) if pre_table is not None else pd.DataFrame()},
            pretrain_plot=pre_plot))
    json_path = os.path.join(out, "report.json")
    with open(json_path, "w") as f:
        json.dump({"parent_run_id": study.parent_run_id, "minimal": minimal.to_dict(orient="records"),
                   "searched_minimal": searched, "convergence": conv.to_dict(orient="records"),
                   "pretraining": [] if pre_table is None else pre_table.to_dict(orient="records")},
                  f, indent=1, default=str)
    paths = ReportPaths(markdown=md_path, html=html_path, plot=plot, summary_csv=csv, pretrain_plot=pre_plot)
    if cfg.log_to_run:
        files = [md_path, html_path, plot, *([pre_plot] if pre_plot else []), *([probe_plot] if probe_plot else []),
                 *maps_files, csv, json_path]
        tracking.log_artifacts(cl, study.parent_run_id, files, REPORT_ARTIFACT)
    return paths


def _embedding_maps(inp: MapsInput | None, out: str) -> tuple[str, list[str]]:
    """The maps' section text and PNGs. A failure (an encoder that no longer loads, a pool that moved)
    costs the pictures, with one line saying why, not the report: the tables stand without them."""
    if inp is None:
        return "", []
    try:
        res = write_maps(inp, out)
    except Exception as e:  # noqa: BLE001 - the pictures are an addition; the report is still written
        log.warning("embedding maps not drawn: %s", e)
        return f"Not drawn: {type(e).__name__}: {e}", []
    return res.markdown, res.files


def _protocol_from_params(params: dict[str, str]) -> str:
    """How recipes were set, for a study that did not tag it (one fixed recipe for every encoder)."""
    lr, frozen, epochs = params.get("lr", "?"), params.get("frozen_epochs", "?"), params.get("epochs", "?")
    return f"fixed recipe for every encoder (lr {lr}, backbone frozen for {frozen} of {epochs} epochs), not tuned"


BOOTSTRAP_NOTE = ("Each encoder's test predictions are pooled over the folds (every labelled patient is "
                  "a test patient exactly once), compared with the baseline's on the same slices, and "
                  "patients are resampled with replacement (1,000 times) to give a 95 % interval and a "
                  "two-sided p-value for the difference in macro AUC.")


_IMAGE = re.compile(r"^!\[(?P<alt>[^\]]*)\]\((?P<file>[^)/\\]+\.png)\)$")


def _md_inline(text: str, folder: str | None = None) -> str:
    """The little markdown the report's prose uses (bold, code, bullet lists) as HTML; a line that is
    only ``![alt](picture.png)`` with the picture in ``folder`` (the report's) is inlined, so every
    section's plots show in the one self-contained page without code of its own here."""
    out, items = [], []
    for line in text.splitlines():
        m = _IMAGE.match(line.strip())
        if m and folder and os.path.isfile(os.path.join(folder, m["file"])):
            out.append(f'<img alt="{html.escape(m["alt"])}" '
                       f'src="data:image/png;base64,{_png_base64(os.path.join(folder, m["file"]))}">')
            continue
        h = html.escape(line)
        h = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", h)
        h = re.sub(r"`(.+?)`", r"<code>\1</code>", h)
        if line.startswith("- "):
            items.append(f"<li>{h[2:]}</li>")
            continue
        if items:
            out.append("<ul>" + "".join(items) + "</ul>")
            items = []
        if line.strip():
            out.append(f"<p>{h}</p>")
    if items:
        out.append("<ul>" + "".join(items) + "</ul>")
    return "".join(out)


def _png_base64(path: str) -> str:
    with open(path, "rb") as f:
        return base64.b64encode(f.read()).decode()


def _html(title: str, sections, plot: str, tables: dict[str, pd.DataFrame], pretrain_plot: str | None = None) -> str:
    """The report as one self-contained page: every section under its own heading; tables from the
    data frames, prose from the markdown, the plots inlined (the pictures a section's markdown names
    are read from the folder of ``plot``)."""
    img = _png_base64(plot)
    folder = os.path.dirname(plot)
    fmt = {"float_format": lambda v: f"{v:.4g}", "index": False, "na_rep": "n/a", "border": 0}
    table_of = {"Test metrics": "summary", "Paired Wilcoxon": "wilcoxon", "Patient-level bootstrap": "bootstrap",
                "Minimal samples": "minimal", "Fine-tuning recipe": "recipes", "Pre-training": "pretraining"}
    body = [f"<h1>{html.escape(sections[0][0])}</h1>", _md_inline(sections[0][1])]
    for head, text in sections[1:]:
        body.append(f"<h2>{html.escape(head)}</h2>")
        key = next((v for k, v in table_of.items() if head.startswith(k)), None)
        if head.startswith("AUC vs"):
            body.append(f'<img alt="AUC vs training-set size" src="data:image/png;base64,{img}">')
        elif key is not None and not tables.get(key, pd.DataFrame()).empty:
            # the section's prose (notes, the protocol), then its table from the data frame
            parts = [p for p in text.split("\n\n") if not p.lstrip().startswith("|")]
            body.extend(_md_inline(p) for p in parts if not p.lstrip().startswith("!["))
            body.append(tables[key].to_html(**fmt))
            body.extend(_md_inline(p, folder) for p in parts if p.lstrip().startswith("!["))
        else:
            body.append(_md_inline(text, folder))
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
             "td,th{padding:.2em .6em;border-bottom:1px solid #ddd;text-align:right}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")
