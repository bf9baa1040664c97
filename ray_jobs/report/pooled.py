"""A test with power at small fold counts: patient-level bootstrap of the pooled out-of-fold AUC.

The paired Wilcoxon test over folds has a floor (p >= 0.25 with 3 folds), so it cannot say whether
a demo-sized study shows an effect. Every trial also logs its test predictions; the folds' test sets
are disjoint groups of patients and together cover every labelled patient once. Pooling an encoder's
predictions over the folds (per seed) gives one prediction per labelled slice, the same slices as the
baseline's pooled predictions, so the two AUCs can be compared on the same patients: resample
*patients* with replacement (slices of one patient are correlated and move together), recompute both
macro one-vs-rest AUCs, and read the two-sided p-value and a 95 % interval off the differences.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from ray_jobs.report.tables import by_encoder_and_size
from ray_jobs.trial_record import PREDICTIONS_ARTIFACT

Predictions = dict[str, dict[str, np.ndarray]]  # run_id -> {y, p, rows, patients}


def load_predictions(cl, run_ids: list[str]) -> Predictions:  # noqa: ANN001 - MlflowClient
    """Each run's logged test predictions; runs without the artifact (older studies) are left out."""
    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR

    out: Predictions = {}
    # one small file per trial: MLflow's per-download progress bar would print a line for each
    bar = os.environ.get(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name)
    os.environ[MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name] = "false"
    try:
        _download(cl, run_ids, out)
    finally:
        if bar is None:
            os.environ.pop(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name, None)
        else:
            os.environ[MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name] = bar
    return out


def _download(cl, run_ids: list[str], out: Predictions) -> None:  # noqa: ANN001 - MlflowClient
    """One GET per trial, several at a time. Why: ``MlflowClient.download_artifacts`` costs three
    requests per run (the run for its artifact URI, a listing, the file); a 525-trial study spent most
    of its report there. The runs' artifact URIs come from a few paged searches instead."""

    uris = _artifact_uris(cl, run_ids)
    with tempfile.TemporaryDirectory() as tmp:
        def one(rid: str) -> None:
            path = _fetch(cl, rid, uris.get(rid), os.path.join(tmp, rid))
            if path is not None:
                with np.load(path, allow_pickle=False) as z:
                    out[rid] = {k: z[k] for k in ("y", "p", "rows", "patients")}

        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(one, run_ids))


def _artifact_uris(cl, run_ids: list[str], chunk: int = 200) -> dict[str, str]:  # noqa: ANN001
    """run id -> artifact root, from searches of ``chunk`` ids each (the trials share one experiment)."""
    if not run_ids:
        return {}
    try:
        exp = cl.get_run(run_ids[0]).info.experiment_id
    except Exception:  # noqa: BLE001 - unknown id: every run falls back to the per-run download
        return {}
    uris: dict[str, str] = {}
    for i in range(0, len(run_ids), chunk):
        ids = ", ".join(f"'{r}'" for r in run_ids[i:i + chunk])
        token = None
        while True:
            page = cl.search_runs([exp], filter_string=f"attributes.run_id IN ({ids})", max_results=1000,
                                  page_token=token)
            uris.update({r.info.run_id: r.info.artifact_uri for r in page})
            token = page.token
            if not token:
                break
    return uris


def _fetch(cl, rid: str, root: str | None, dst: str) -> str | None:  # noqa: ANN001 - MlflowClient
    """The local path of ``rid``'s predictions file, or None when the run has none (older studies)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    os.makedirs(dst, exist_ok=True)
    if root:
        local = os.path.join(dst, os.path.basename(PREDICTIONS_ARTIFACT))
        try:
            # the file's own GET; the repository API's public download lists the folder first
            repo = get_artifact_repository(root, tracking_uri=cl.tracking_uri)
            repo._download_file(PREDICTIONS_ARTIFACT, local)
            return local
        except Exception:  # noqa: BLE001 - no such artifact, or a store without direct file access
            pass
    try:
        return cl.download_artifacts(rid, PREDICTIONS_ARTIFACT, dst)
    except Exception:  # noqa: BLE001 - MlflowException / OSError: no such artifact
        return None


def macro_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Macro one-vs-rest ROC AUC with tied scores counted half (as scikit-learn); NaN when a class
    has no positive or no negative. Binary: ``p`` may be (N, 2) or (N,) positive-class scores."""

    if p.ndim == 1 or p.shape[1] == 2:
        scores = [p if p.ndim == 1 else p[:, 1]]
        targets = [y == 1]
    else:
        scores = [p[:, k] for k in range(p.shape[1])]
        targets = [y == k for k in range(p.shape[1])]
    aucs = []
    for s, t in zip(scores, targets, strict=True):
        n_pos = int(t.sum())
        n_neg = len(t) - n_pos
        if n_pos == 0 or n_neg == 0:
            return math.nan
        r = rankdata(s)
        aucs.append((r[t].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return float(np.mean(aucs))


def _pooled(preds: Predictions, run_ids: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    parts = [preds[r] for r in run_ids if r in preds]
    if len(parts) != len(run_ids) or not parts:
        return None
    rows = np.concatenate([q["rows"] for q in parts])
    order = np.argsort(rows, kind="stable")
    return (rows[order], np.concatenate([q["y"] for q in parts])[order],
            np.concatenate([q["p"] for q in parts])[order], np.concatenate([q["patients"] for q in parts])[order])


def bootstrap_vs_baseline(trials: pd.DataFrame, preds: Predictions, baseline: str = "random", n_boot: int = 1000,
                          seed: int = 0, auc: Callable[[np.ndarray, np.ndarray], float] = macro_auc) -> pd.DataFrame:
    """Per (encoder, size): pooled-AUC difference to ``baseline`` with a patient bootstrap.

    Pairs are (size, seed) with every fold present on both sides; several seeds are averaged. Columns:
    encoder, size, patients, slices, auc, auc_base, diff, ci_low, ci_high, p_value, n_boot.
    """
    cols = ["encoder", "size", "patients", "slices", "auc", "auc_base", "diff", "ci_low", "ci_high", "p_value",
            "n_boot"]
    if trials.empty or baseline not in set(trials["encoder"]):
        return pd.DataFrame(columns=cols)
    rng = np.random.default_rng(seed)
    rows_out = []
    for (enc, size), g in trials[trials["encoder"] != baseline].groupby(["encoder", "size"], sort=False):
        b = trials[(trials["encoder"] == baseline) & (trials["size"] == size)]
        diffs, points, bases, n_pat, n_sl = [], [], [], 0, 0
        for sd, gs in g.groupby("seed"):
            bs = b[b["seed"] == sd]
            folds = sorted(set(gs["fold"]) & set(bs["fold"]))
            if not folds or len(folds) != gs["fold"].nunique():
                continue
            ours = _pooled(preds, [gs[gs["fold"] == f]["run_id"].iloc[0] for f in folds])
            base = _pooled(preds, [bs[bs["fold"] == f]["run_id"].iloc[0] for f in folds])
            if ours is None or base is None or not np.array_equal(ours[0], base[0]):
                continue
            _, y, p, pats = ours
            _, _, pb, _ = base
            uniq, inv = np.unique(pats, return_inverse=True)
            members = [np.flatnonzero(inv == i) for i in range(len(uniq))]
            boot = np.full(n_boot, np.nan)
            for i in range(n_boot):
                take = np.concatenate([members[j] for j in rng.integers(0, len(uniq), len(uniq))])
                boot[i] = auc(y[take], p[take]) - auc(y[take], pb[take])
            diffs.append(boot)
            points.append(auc(y, p))
            bases.append(auc(y, pb))
            n_pat, n_sl = len(uniq), len(y)
        if not diffs:
            continue
        d = np.nanmean(np.vstack(diffs), axis=0)  # average over seeds, per bootstrap replicate
        d = d[np.isfinite(d)]
        point = float(np.mean(points) - np.mean(bases))
        if len(d):
            frac_le = (np.sum(d <= 0) + 1) / (len(d) + 1)
            frac_ge = (np.sum(d >= 0) + 1) / (len(d) + 1)
            pval = float(min(1.0, 2 * min(frac_le, frac_ge)))
            lo, hi = (float(x) for x in np.percentile(d, [2.5, 97.5]))
        else:
            pval, lo, hi = math.nan, math.nan, math.nan
        rows_out.append({"encoder": enc, "size": size, "patients": n_pat, "slices": n_sl,
                         "auc": float(np.mean(points)), "auc_base": float(np.mean(bases)), "diff": point,
                         "ci_low": lo, "ci_high": hi, "p_value": pval, "n_boot": len(d)})

    return by_encoder_and_size(pd.DataFrame(rows_out, columns=cols))


def bootstrap_markdown(table: pd.DataFrame, baseline: str) -> str:
    lines = [f"| encoder | size | patients | slices | pooled AUC | {baseline} | ΔAUC | 95 % CI | p |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in table.itertuples(index=False):
        ci = "n/a" if not math.isfinite(r.ci_low) else f"{r.ci_low:+.3f} .. {r.ci_high:+.3f}"
        p = "n/a" if not math.isfinite(r.p_value) else f"{r.p_value:.3g}"
        lines.append(f"| {r.encoder} | {r.size} | {r.patients} | {r.slices} | {r.auc:.3f} | {r.auc_base:.3f} | "
                     f"{r.diff:+.3f} | {ci} | {p} |")
    return "\n".join(lines)
