"""Benchmark (``make bench``; not part of CI): a whole fine-tuning study as ``ctssl finetune`` runs it —
Ray started by the study, Ray Tune trials, an MLflow child run with predictions per trial, the summary —
against the same cells run back to back in one process with no Ray, Tune or MLflow.

Both sides compute the same thing: :func:`ray_jobs.finetune.cell.fit_cell` for every (encoder, size,
fold, seed) of the grid, with the same settings, subsets and seeds. Both get the whole machine: the
study runs ``cpu_count`` one-CPU trials at once, the peer one process with ``cpu_count`` torch threads.
The ratio (study wall / peer wall) is the price of the orchestration a user pays; the target is <= 1.2.
The peer runs first, then the study (one round each: a side lasts minutes, far longer than a load
change on an idle machine).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch

from tests.ray_jobs.tiny_data import write_tiny_dataset

SIZES = "5,20,all"
FOLDS = 3
EPOCHS = 6
RECIPES = ["1e-3:0", "1e-3:1"]
BATCH = 16


def _encoder_folder(path) -> str:
    """An encoder folder as pre-training leaves it (encoder.pt + encoder_config.json)."""
    from ssl_core.backbones import create_backbone, export_encoder_state_dict

    path.mkdir()
    torch.manual_seed(1)
    torch.save(export_encoder_state_dict(create_backbone("resnet18", in_chans=1)), path / "encoder.pt")
    (path / "encoder_config.json").write_text(json.dumps({"backbone": "resnet18", "in_chans": 1, "method": "seeded"}))
    return str(path)


def _peer(cfg) -> tuple[float, list[float]]:
    """The study's cells back to back in this process; returns (wall seconds, test AUCs)."""
    from ray_jobs.finetune.cell import fit_cell
    from ray_jobs.finetune.data import load_labelled
    from ray_jobs.finetune.encoders import resolve_encoders
    from ray_jobs.finetune.folds import make_folds, nested_subset
    from ray_jobs.finetune.study import _encoder_payload, plan_grid
    from ray_jobs.trial_record import SizeSpec
    from ssl_core.finetune import FineTuner, create_classifier

    t0 = time.perf_counter()
    data = load_labelled(cfg.data)
    folds = make_folds(data.patients, data.label_names, cfg.folds, cfg.val_fraction, seed=cfg.fold_seed)
    specs = resolve_encoders(cfg.encoders, default_backbone=cfg.backbone, in_chans=cfg.in_chans, tracking_uri="")
    encs = _encoder_payload(specs, data.intensity, data.intensity_stats)
    images, labels = torch.from_numpy(data.images.astype(np.float32)), torch.from_numpy(data.labels)
    aucs = []
    for t in plan_grid([s.name for s in specs], cfg.sizes, cfg.folds, cfg.seeds):
        enc, split, seed = encs[t["encoder"]], folds[t["fold"]], t["seed"]
        train = nested_subset(split.train, data.labels, SizeSpec.from_label(t["size"]), seed)
        cell = fit_cell(images, labels, train, split.val, split.test, recipes=cfg.recipe_grid(),
                        make_model=lambda enc=enc: create_classifier(enc["backbone"], len(data.classes),
                                                                     enc["in_chans"], encoder_state=enc["state"]),
                        epochs=cfg.epochs, seed=seed, init_seed=seed * 1009 + t["fold"],
                        finetune_kwargs={"weight_decay": cfg.weight_decay, "batch_size": cfg.batch_size,
                                         "img_size": int(data.images.shape[-1]), "windows": enc["windows"],
                                         "bn_recalibrate": cfg.bn_recalibrate})
        aucs.append(FineTuner.metrics(cell.y_test, cell.p_test, prefix="test_")["test_auc"])
    return time.perf_counter() - t0, aucs


def test_bench_finetune_study_vs_the_same_cells_in_one_process(tmp_path):
    import ray

    from ray_jobs.finetune.config import FinetuneConfig, parse_sizes
    from ray_jobs.finetune.study import run_study
    from ray_jobs.report.collect import collect_trials

    cores = os.cpu_count() or 1
    data = str(tmp_path / "lab")
    write_tiny_dataset(data, patients=24, slices=8, size=64)  # 192 slices, 2 classes, whole patients
    cfg = FinetuneConfig(data=data, storage=str(tmp_path / "tune"), experiment="bench-study",
                         encoders=["random", f"seeded={_encoder_folder(tmp_path / 'enc')}"], backbone="resnet18",
                         sizes=parse_sizes(samples_per_class=SIZES), folds=FOLDS, seeds=[0], epochs=EPOCHS,
                         recipes=RECIPES, batch_size=BATCH, val_fraction=0.25, max_concurrent=cores,
                         tracking_uri=f"sqlite:///{tmp_path / 'ft.db'}")
    if ray.is_initialized():
        ray.shutdown()

    torch.set_num_threads(cores)
    peer_s, peer_aucs = _peer(cfg)

    t0 = time.perf_counter()
    res = run_study(cfg)  # starts its own local Ray, as the CLI does
    study_s = time.perf_counter() - t0
    ray.shutdown()
    trials = collect_trials(res.tracking_uri, "bench-study", res.parent_run_id)
    n = len(peer_aucs)
    print(f"\n[bench finetune] study of {n} cells (2 encoders x sizes {SIZES} x {FOLDS} folds, resnet18 64 px, "
          f"{len(RECIPES)} recipes x {EPOCHS} epochs, {cores} cores): whole study {study_s:.1f} s "
          f"(Ray start-up, {res.trials} Tune trials {cores} at a time, MLflow runs and predictions, summary; "
          f"sum of trial times {trials['trial_time_s'].sum():.1f} s) vs the same cells back to back in one "
          f"process with {cores} threads {peer_s:.1f} s: ratio = {study_s / peer_s:.2f}x (target <= 1.2); "
          f"mean test AUC study {trials['test_auc'].mean():.3f}, peer {np.mean(peer_aucs):.3f}")
    assert res.trials == n and res.failed == 0
