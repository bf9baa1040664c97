"""Writing a report's pages: report.md, one self-contained report.html (pictures inlined as base64) and
report.json, and the sections every report has beside its results (pre-training, the online probe,
the embedding maps). A fine-tuning study's report (:mod:`ray_jobs.report.build`) and a linear-only
study's (:mod:`ray_jobs.report.linear_report`) are both written through here.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from ray_jobs.report.embedding_maps import SECTION as MAPS_SECTION
from ray_jobs.report.embedding_maps import MapsInput, write_maps
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

log = logging.getLogger(__name__)

#: the artifact folder of the study's parent run the report's files go to (``log_to_run``)
REPORT_ARTIFACT = "report"


@dataclass
class ReportPaths:
    markdown: str
    html: str
    plot: str
    summary_csv: str
    pretrain_plot: str | None = None  # AUC vs pre-training time; None when the experiment has no such runs




@dataclass
class Extras:
    """The sections a report has beside its own results, and the files they drew."""

    pre_table: pd.DataFrame | None = None
    pre_plot: str | None = None
    curves: pd.DataFrame = field(default_factory=pd.DataFrame)
    collapsed: dict[str, Any] = field(default_factory=dict)
    probe_plot: str | None = None
    maps_text: str | None = None  # None: the report draws no maps
    maps_files: list[str] = field(default_factory=list)

    def sections(self) -> list[tuple[str, str]]:
        return [
            *([("Pre-training", f"{PRETRAIN_NOTE}\n\n{pretraining_markdown(self.pre_table)}\n\n"
                f"![AUC vs pre-training time]({PRETRAIN_PLOT})")] if self.pre_table is not None else []),
            *([("Online probe during pre-training", probe_markdown(self.curves, self.collapsed))]
              if self.probe_plot else []),
            *([(MAPS_SECTION, self.maps_text)] if self.maps_text is not None else []),
        ]

    def files(self) -> list[str]:
        return [*([self.pre_plot] if self.pre_plot else []), *([self.probe_plot] if self.probe_plot else []),
                *self.maps_files]


def extras(cl: Any, study: Any, baseline: str, encoders: list[str], summary: pd.DataFrame,
           maps: MapsInput | None, out: str, title: str) -> Extras:
    """The pre-training table and plot (each encoder's run beside its AUC per size in ``summary``), the
    online probe's curves, the embedding maps: from the study's MLflow experiment, drawn into ``out``."""
    pre = collect_pretraining(cl, study.experiment_id, encoders, study.tags, study.params)
    ex = Extras()
    if not pre.empty:
        ex.pre_table = pretraining_table(pre, summary, baseline)
        ex.pre_plot = plot_auc_vs_pretrain_time(ex.pre_table, os.path.join(out, PRETRAIN_PLOT),
                                                title=f"{title}: AUC vs pre-training time")
        ex.curves, ex.collapsed = collect_probe_curves(cl, pre)
        if not ex.curves.empty:
            ex.probe_plot = plot_probe_curves(ex.curves, os.path.join(out, PROBE_PLOT), title=f"{title}: online probe")
    if maps is not None:
        ex.maps_text, ex.maps_files = embedding_maps(maps, out)
    return ex


def write_pages(out: str, title: str, sections: list[tuple[str, str]], plot: str, summary_csv: str, ex: Extras,
                tables: dict[str, pd.DataFrame], doc: dict[str, Any]) -> tuple[ReportPaths, list[str]]:
    """report.md, report.html (``tables``: the data frames its sections show as tables) and report.json
    (``doc`` and the pre-training rows) into ``out``; the paths, and every file to log to the study's
    run."""
    md_path = os.path.join(out, "report.md")
    with open(md_path, "w") as f:
        f.write("\n\n".join(f"## {h}\n\n{b}" for h, b in sections) + "\n")
    html_path = os.path.join(out, "report.html")
    pretraining = display_table(ex.pre_table) if ex.pre_table is not None else pd.DataFrame()
    with open(html_path, "w") as f:
        f.write(html_page(title, sections, plot, {**tables, "pretraining": pretraining}, pretrain_plot=ex.pre_plot))
    json_path = os.path.join(out, "report.json")
    with open(json_path, "w") as f:
        json.dump({**doc, "pretraining": [] if ex.pre_table is None else ex.pre_table.to_dict(orient="records")},
                  f, indent=1, default=str)
    paths = ReportPaths(markdown=md_path, html=html_path, plot=plot, summary_csv=summary_csv, pretrain_plot=ex.pre_plot)
    return paths, [md_path, html_path, plot, *ex.files(), summary_csv, json_path]


def embedding_maps(inp: MapsInput | None, out: str) -> tuple[str, list[str]]:
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


def html_page(title: str, sections: list[tuple[str, str]], plot: str, tables: dict[str, pd.DataFrame],
              pretrain_plot: str | None = None) -> str:
    """The report as one self-contained page: every section under its own heading; tables from the
    data frames, prose from the markdown, the plots inlined (the pictures a section's markdown names
    are read from the folder of ``plot``)."""
    img = _png_base64(plot)
    folder = os.path.dirname(plot)
    fmt = {"float_format": lambda v: f"{v:.4g}", "index": False, "na_rep": "n/a", "border": 0}
    table_of = {"Test metrics": "summary", "Paired Wilcoxon": "wilcoxon", "Patient-level bootstrap": "bootstrap",
                "Minimal samples": "minimal", "Fine-tuning recipe": "recipes", "Pre-training": "pretraining",
                "Linear-probe test AUC": "summary", "Paired difference": "paired"}
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
