"""The online probe of a pre-training run (``--monitor-data``): which slices it uses, when it runs,
what it logs.

The driver reads the labelled prep output once, makes the fine-tuning study's patient-level folds
(:func:`ray_jobs.finetune.folds.make_folds`, same ``k``, validation share and seed) and keeps the
training and validation rows of one fold. The test rows of that fold never leave the driver, so no
probe can see them. A stratified, seeded subsample of at most ``monitor_slices`` of those rows bounds
the probe's cost; the same rows are used at every probe of the run.

In the training loop, rank 0 alone probes (the other ranks wait at their next all-reduce): at step 0
of a fresh run (the random-initialisation baseline), every ``monitor_every`` steps or
``monitor_every_s`` seconds of training, and at the last step. The probe's time is kept out of the
training-loop clock, so a ``--time-budget`` run trains as long as without the probe and its
schedules are unchanged; the probe draws no random numbers, so the training itself is unchanged too.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from ctssl_base.errors import UserError
from ray_jobs import tracking
from ray_jobs.finetune.data import load_labelled
from ray_jobs.finetune.folds import make_folds
from ray_jobs.pretrain.config import PretrainConfig

log = logging.getLogger("ctssl.pretrain")

#: the step metrics a probe logs
METRICS = ("probe.knn_auc", "probe.emb_std", "probe.eff_rank")
TAG_COLLAPSED = "probe.collapsed"


def _subsample(rows: np.ndarray, labels: np.ndarray, quota: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``quota`` of ``rows``, each class keeping its share (at least one row per class)."""
    if len(rows) <= quota:
        return np.sort(rows)
    keep = []
    for c in np.unique(labels[rows]):
        members = rows[labels[rows] == c]
        n = max(1, int(round(quota * len(members) / len(rows))))
        keep.append(rng.permutation(members)[:n])
    return np.sort(np.concatenate(keep))


def build_probe_set(cfg: PretrainConfig):  # noqa: ANN201 - ssl_core.probe.ProbeSet, torch imported lazily
    """The probe's slices from ``cfg.monitor_data`` (None without it); one line naming the flag when
    the data cannot make a fold."""
    if not cfg.monitor_data:
        return None
    from ssl_core.probe import ProbeSet

    try:
        data = load_labelled(cfg.monitor_data)
        split = make_folds(data.patients, data.label_names, cfg.monitor_folds, cfg.monitor_val_fraction,
                           cfg.monitor_fold_seed)[0]
    except UserError as e:
        raise UserError(f"--monitor-data {cfg.monitor_data}: {str(e).removeprefix('--data ')}") from None
    rng = np.random.default_rng([cfg.monitor_fold_seed, 0x9B0E])
    n_train, n_val = len(split.train), len(split.val)
    quota_val = max(1, int(round(cfg.monitor_slices * n_val / (n_train + n_val))))
    train = _subsample(split.train, data.labels, cfg.monitor_slices - quota_val, rng)
    val = _subsample(split.val, data.labels, quota_val, rng)
    if set(train.tolist()) & set(split.test.tolist()) or set(val.tolist()) & set(split.test.tolist()):
        raise AssertionError("probe rows overlap the fold's test split")  # guards a future edit
    ps = ProbeSet(train_images=data.images[train], train_labels=data.labels[train], val_images=data.images[val],
                  val_labels=data.labels[val], classes=list(data.classes), train_rows=train, val_rows=val)
    log.info("probe: %d training and %d validation slices of fold 0 of %d (patient-level; its %d test slices "
             "are not used), %d classes, from %s", len(train), len(val), cfg.monitor_folds, len(split.test),
             len(data.classes), cfg.monitor_data)
    return ps


def ship(probe_set: Any, in_process: bool) -> Any:
    """What the payload carries: the set itself in this process, an object-store reference for Ray
    Train workers (the images would otherwise be pickled into every worker's config)."""
    if probe_set is None or in_process:
        return probe_set
    import ray

    return ray.put(probe_set)


class Monitor:
    """Rank 0's probe schedule, the probe itself and its MLflow output."""

    def __init__(self, probe_set: Any, cfg: PretrainConfig, encoder: Any, *, img_size: int,
                 windows: list | None, device: Any, mlog: Any, cl: Any, run_id: str) -> None:
        self.data, self.cfg, self.encoder = probe_set, cfg, encoder
        self.img_size, self.windows, self.device = img_size, windows, device
        self.mlog, self.cl, self.run_id = mlog, cl, run_id
        self.every = cfg.monitor_every_steps
        self.every_s = cfg.monitor_every_s
        self.spent_s = 0.0  # seconds spent probing: kept out of the training-loop clock
        self.last_step: int | None = None
        self._last_end = time.perf_counter()
        self.collapsed = False
        self.results: list[tuple[int, Any]] = []

    @classmethod
    def create(cls, payload: dict[str, Any], cfg: PretrainConfig, method: Any, *, img_size: int, device: Any,
               mlog: Any, cl: Any, run_id: str) -> Monitor | None:
        """The monitor of rank 0 (None when the run has no ``--monitor-data``)."""
        shipped = payload.get("monitor")
        if shipped is None:
            return None
        import ray

        data = ray.get(shipped) if isinstance(shipped, ray.ObjectRef) else shipped
        mon = cls(data, cfg, method.encoder(), img_size=img_size,
                  windows=payload.get("method_options", {}).get("windows"), device=device, mlog=mlog, cl=cl,
                  run_id=run_id)

        tracking.set_tags(cl, run_id, {"probe.train_slices": len(data.train_images),
                                       "probe.val_slices": len(data.val_images), "probe.k": cfg.monitor_k,
                                       "probe.temperature": cfg.monitor_temperature})
        return mon

    def due(self, step: int) -> bool:
        if step == self.last_step:
            return False
        if self.every_s is not None:
            return time.perf_counter() - self._last_end >= self.every_s
        return step % self.every == 0

    def probe(self, step: int) -> float:
        """Probe now and log at ``step``; returns the seconds it took."""
        from ssl_core.probe import run_probe

        t0 = time.perf_counter()
        res = run_probe(self.encoder, self.data, img_size=self.img_size, windows=self.windows,
                        in_chans=self.cfg.in_chans, k=self.cfg.monitor_k, temperature=self.cfg.monitor_temperature,
                        device=self.device)
        metrics = {k: v for k, v in res.metrics().items() if np.isfinite(v)}
        dt = time.perf_counter() - t0
        self.mlog.log({**metrics, "probe.time_s": dt}, step)
        self.results.append((step, res))
        reason = res.health.collapse_reason()
        log.info("probe at step %d: k-NN AUC %.3f, emb_std %.4g, eff_rank %.1f (%.1f s)", step, res.knn_auc,
                 res.health.emb_std, res.health.eff_rank, dt)
        if reason and not self.collapsed:
            self.collapsed = True
            log.warning("probe at step %d: the embeddings look collapsed (%s); the run continues", step, reason)
            from ray_jobs import tracking

            tracking.set_tags(self.cl, self.run_id, {TAG_COLLAPSED: "true", "probe.collapse_step": step,
                                                     "probe.collapse_reason": reason})
        self.last_step = step
        self._last_end = time.perf_counter()
        spent = self._last_end - t0
        self.spent_s += spent
        return spent

    def maybe(self, step: int) -> float:
        """Probe when the schedule says so; the seconds spent (0.0 when not)."""
        return self.probe(step) if self.due(step) else 0.0

    def finish(self, step: int) -> float:
        """The last step's probe, unless that step was just probed."""
        return 0.0 if step == self.last_step else self.probe(step)


__all__ = ["METRICS", "TAG_COLLAPSED", "Monitor", "build_probe_set", "ship"]
