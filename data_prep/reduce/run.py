"""``reduce_dataset``: SRC prep output -> strategy -> selection manifest at DST, plus its report."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from ctssl_base.errors import UserError
from ctssl_base.lease import Lease
from data_prep import shards
from data_prep.reduce.base import Selection, Strategy, empty_selection, get_strategy
from data_prep.reduce.load import base_url_of, load_slice_set
from data_prep.reduce.report import example_pairs, per_series, render_examples_png, write_report
from data_prep.reduce.target import search_threshold

log = logging.getLogger(__name__)


def build_strategy(name: str, options: dict[str, Any] | None = None,
                   inputs: dict[str, Any] | None = None) -> Strategy:
    """``options`` are plain values recorded in the selection manifest; ``inputs`` are objects the
    caller built for the strategy and hands in (the embedding strategy's encoder), never recorded."""
    return get_strategy(name)(**(options or {}), **(inputs or {}))


def _refuse_to_overwrite_prep_output(dst: str) -> None:
    """A selection may replace an older selection at DST, never a prep output (its shards would be
    orphaned and every selection made from it would break)."""
    try:
        existing = shards.read_manifest(dst)
    except UserError:
        return
    if existing.get("kind", "prep") != "selection":
        raise UserError(f"DST {dst} holds a prep output; write the selection to a new folder")


def reduce_dataset(src: str, dst: str, strategy: str, *, threshold: float | None = None,
                   target_fraction: float | None = None, options: dict[str, Any] | None = None,
                   tolerance: float = 0.01, progress: bool = True,
                   inputs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Reduce ``src`` with ``strategy`` and commit the selection at ``dst``; returns the summary
    (also stored in the selection manifest) with the report files' locations. ``inputs``: see
    :func:`build_strategy`. Once the arguments are checked the run holds the lease of ``dst``
    (:mod:`ctssl_base.lease`): a second reduction into it, which would overwrite this one's report
    and selection half-way, is refused in one line."""
    with contextlib.ExitStack() as held:
        return _reduce(src, dst, strategy, held, threshold=threshold, target_fraction=target_fraction,
                       options=options, tolerance=tolerance, progress=progress, inputs=inputs)


def _reduce(src: str, dst: str, strategy: str, held: contextlib.ExitStack, *, threshold: float | None,
            target_fraction: float | None, options: dict[str, Any] | None, tolerance: float, progress: bool,
            inputs: dict[str, Any] | None) -> dict[str, Any]:
    strat = build_strategy(strategy, options, inputs)
    if threshold is not None and target_fraction is not None:
        raise UserError("give either --threshold or --target-fraction, not both")
    if target_fraction is not None and not (0.0 < target_fraction <= 1.0):
        raise UserError(f"--target-fraction {target_fraction!r}: must be in (0, 1]")
    if threshold is not None:
        threshold = strat.check_threshold(threshold)
    if src.rstrip("/") == dst.rstrip("/"):
        raise UserError(f"DST {dst} is the same as SRC: write the selection to a new folder")
    _refuse_to_overwrite_prep_output(dst)
    held.enter_context(Lease(dst, "reduce", tidy=True))

    t0 = time.perf_counter()
    data = load_slice_set(src)
    log.info("reduce %s: %d slices in %d series with strategy %s", src, len(data), len(data.series_name), strategy)
    if len(data):
        strat.prepare(data, progress=progress)
    t1 = time.perf_counter()
    sel: Selection
    if len(data) == 0:
        sel = empty_selection(0, threshold if threshold is not None else strat.default_threshold)
    elif target_fraction is not None:
        sel = search_threshold(strat, target_fraction, tolerance)
    else:
        sel = strat.select(threshold if threshold is not None else strat.check_threshold(strat.default_threshold))
    t2 = time.perf_counter()

    series_rows = per_series(data, sel)
    summary: dict[str, Any] = {
        "strategy": strategy,
        "source": src,
        "threshold_name": strat.threshold_name,
        "threshold": sel.threshold,
        "options": {k: v for k, v in strat.options.items() if v is not None},
        "total": len(data),
        "kept": sel.kept,
        "kept_fraction": sel.fraction,
        "series": len(series_rows),
        "target_fraction": target_fraction,
        "target_reached": sel.info.get("target_reached"),
        "target_warning": sel.info.get("target_warning"),
        "seconds_features": t1 - t0,
        "seconds_select": t2 - t1,
    }
    pairs = example_pairs(sel)
    png = render_examples_png(data, sel, pairs, strategy)
    summary["seconds_total"] = time.perf_counter() - t0
    summary["slices_per_second"] = len(data) / max(summary["seconds_total"], 1e-9)
    summary["report_files"] = write_report(dst, summary, series_rows, png)
    config = {"strategy": strategy, "threshold": sel.threshold, "target_fraction": target_fraction,
              "options": summary["options"], "source": src}
    shards.write_selection(dst, base_url_of(src), [str(s) for s in data.slice_id[sel.keep]], config,
                           {k: v for k, v in summary.items() if k != "report_files"})
    summary["series_rows"] = series_rows
    log.info("kept %d of %d slices (%.4f) with %s = %s in %.1f s", sel.kept, len(data), sel.fraction,
             strat.threshold_name, sel.threshold, summary["seconds_total"])
    return summary
