"""The reduction report: numbers a reader checks first, and pictures of what was removed.

``report.md`` (kept fraction overall and per series, threshold, time), ``per_series.csv`` and
``examples.png`` (removed slices next to the kept slice that made them redundant) under
``DST/report/``. Series are shown by their pseudonymous ids only.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np

from ctssl_base import storage
from data_prep.dhash import hamming, minmax_uint8
from data_prep.reduce.base import Selection, SliceSet

REPORT_DIR = "report"
MAX_EXAMPLES = 6


def per_series(data: SliceSet, sel: Selection) -> list[dict[str, Any]]:
    rows = []
    for (start, stop), name in zip(data.series_bounds(), data.series_name, strict=True):
        kept = int(sel.keep[start:stop].sum())
        rows.append({"series_id": name, "slices": stop - start, "kept": kept,
                     "kept_fraction": kept / max(1, stop - start)})
    return rows


def example_pairs(sel: Selection, k: int = MAX_EXAMPLES) -> list[tuple[int, int]]:
    """Up to ``k`` (removed, cause) pairs spread evenly over the dataset (deterministic)."""
    dropped = np.flatnonzero(~sel.keep)
    if dropped.size == 0:
        return []
    pick = dropped[np.unique(np.linspace(0, dropped.size - 1, min(k, dropped.size)).round().astype(int))]
    return [(int(i), int(sel.cause[i])) for i in pick]


def render_examples_png(data: SliceSet, sel: Selection, pairs: list[tuple[int, int]], strategy_name: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, len(pairs))
    fig, axes = plt.subplots(rows, 2, figsize=(6, 3 * rows), squeeze=False)
    if not pairs:
        for ax in axes.ravel():
            ax.axis("off")
        axes[0, 0].text(0.5, 0.5, "no slice was removed", ha="center", va="center")
    else:
        need = np.array(sorted({p for pair in pairs for p in pair}))
        hu = data.load_pixels(need) if data.load_pixels is not None else None
        img = dict(zip(need.tolist(), minmax_uint8(hu), strict=True)) if hu is not None else {}
        for r, (removed, cause) in enumerate(pairs):
            note = ""
            if data.dhash is not None:
                note = f"  dhash distance {int(hamming(data.dhash[removed], data.dhash[cause]))}"
            for c, (idx, title) in enumerate(((cause, "kept (reference)"), (removed, "removed"))):
                ax = axes[r, c]
                if idx in img:
                    ax.imshow(img[idx], cmap="gray", vmin=0, vmax=255)
                ax.set_title(f"{title}\nseries {data.series_name[data.series[idx]][:10]} slice "
                             f"{int(data.slice_index[idx])}" + (note if c == 1 else ""), fontsize=7)
                ax.axis("off")
    fig.suptitle(f"{strategy_name}: removed near-duplicates (right) and the slice that caused it (left)",
                 fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def render_markdown(summary: dict[str, Any], series_rows: list[dict[str, Any]]) -> str:
    lines = [
        f"# Dataset reduction: {summary['strategy']}",
        "",
        f"- source: `{summary['source']}`",
        f"- kept: {summary['kept']} of {summary['total']} slices (fraction {summary['kept_fraction']:.4f})",
        f"- threshold: {summary['threshold_name']} = {summary['threshold']}",
        f"- options: {summary['options']}",
    ]
    if summary.get("target_fraction") is not None:
        lines.append(f"- target fraction: {summary['target_fraction']} (reached: {summary['target_reached']})")
        if summary.get("target_warning"):
            lines.append(f"- warning: {summary['target_warning']}")
    lines += [
        f"- time: {summary['seconds_total']:.2f} s total ({summary['seconds_features']:.2f} s features, "
        f"{summary['seconds_select']:.2f} s selection), {summary['slices_per_second']:.0f} slices/s",
        "",
        "![examples](examples.png)",
        "",
        "## Per series",
        "",
        "| series | slices | kept | kept fraction |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {r['series_id']} | {r['slices']} | {r['kept']} | {r['kept_fraction']:.3f} |" for r in series_rows]
    return "\n".join(lines) + "\n"


def write_report(dst: str, summary: dict[str, Any], series_rows: list[dict[str, Any]], png: bytes) -> dict[str, str]:
    """Write the report files under ``DST/report/``; returns name -> full path/URL."""
    fs, root = storage.open_fs(dst)
    folder = storage.join(root, REPORT_DIR)
    storage.ensure_dir(fs, folder)
    csv = "series_id,slices,kept,kept_fraction\n" + "".join(
        f"{r['series_id']},{r['slices']},{r['kept']},{r['kept_fraction']:.6f}\n" for r in series_rows)
    files = {"report.md": render_markdown(summary, series_rows).encode(), "per_series.csv": csv.encode(),
             "examples.png": png}
    out = {}
    for name, data in files.items():
        path = storage.join(folder, name)
        storage.write_bytes_atomic(fs, path, data)
        out[name] = storage.full_url(dst, path)
    return out


def local_copies(paths: dict[str, str], tmpdir: str) -> list[str]:
    """Local files for MLflow's ``log_artifact`` (copies when the report lives in an object store)."""
    out = []
    for name, url in paths.items():
        if storage.is_local(url):
            out.append(url)
            continue
        fs, p = storage.open_fs(url)
        local = os.path.join(tmpdir, name)
        fs.get(p, local)
        out.append(local)
    return out
