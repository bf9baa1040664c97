"""Few-label fine-tuning on a real 8-bit CT image folder: ctssl's four methods and lightly's BYOL /
MoCo v2, each pre-trained for the same wall-clock budget, against a tuned random baseline.

``make bench-real DATA=<folder> [BUDGET=12m]`` (not part of CI: it needs a real data set and about
an hour and a half at 12 minutes per method). The folder holds images and a ``labels.csv``
(``file,label``), as ``ctssl prep`` reads it. What it does:

1. ``ctssl prep`` the folder at ``--size`` px (labels from the CSV).
2. A fixed 70 / 30 split by image (seed 0; rows ordered by their pseudonymous slice id first, so the
   split does not depend on file order). The 70 % is the pre-training pool (a selection manifest) and
   the labelled pool; 20 % of it (seed 0) is the fixed validation set, the rest the training
   candidates. The 30 % is the test set, used once per fine-tuning run.
3. ``ctssl pretrain --time-budget`` for each ctssl method (CLI defaults otherwise: the batch sized to
   the pool), and a plain lightly loop for BYOL and MoCo v2 with lightly's own example recipes
   (transforms, heads, losses, SGD lr 0.06, EMA schedules, MoCo's 4,096-key memory bank) on the same
   images, backbone, batch and budget.
4. Fine-tuning of every encoder (random init included) at N images per class (nested subsets of the
   training candidates, one per seed), each with its recipe chosen on the validation set from the
   same grid ``ctssl finetune`` uses by default, batch-norm statistics re-estimated, and test AUC of
   the best validation epoch. Each recipe trains as ``ctssl finetune`` does by default: until
   validation stops improving (``--patience`` epochs without a gain above ``--min-delta``), at most
   ``--ft-epochs``, continued once by ``--extend-epochs`` when still improving there; a run that still
   improves after that is unconverged and its (encoder, N, seed) cell is left out of the differences
   to random. ``--stopping fixed`` trains exactly ``--ft-epochs`` instead.
5. A table: each encoder's mean test AUC per N, each SSL encoder minus random with the per-seed
   differences, and the best ctssl method minus the best lightly one. Written to OUT/results.md and
   OUT/results.json.

Everything runs on the CPU with the threads of this machine; a rerun reuses a finished prep and
finished pre-training runs (delete OUT to start over).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
for _path in (str(REPO), str(REPO / "tests" / "bench")):  # ctssl, and lightly_peers beside this file
    if _path not in sys.path:
        sys.path.insert(0, _path)

log = logging.getLogger("bench-real")

from ray_jobs.finetune.config import DEFAULT_MIN_DELTA, DEFAULT_PATIENCE  # noqa: E402 - after the sys.path set-up
from ssl_core.methods import METHOD_NAMES as CTSSL_METHODS  # noqa: E402

LIGHTLY_METHODS = ("byol", "mocov2")


def parse_budget(text: str) -> float:
    from ray_jobs.pretrain.config import parse_duration

    return parse_duration(text)


# --------------------------------------------------------------------------- data
def prep(data: Path, out: Path, size: int) -> str:
    dst = out / "prep"
    if (dst / "_manifest.json").exists():
        return str(dst)
    key = os.environ.get("CTSSL_DEID_KEY", "bench-real-key-9f1c3e7a5b2d4068e1f7a3c9b5d2e4f6")
    env = {**os.environ, "CTSSL_DEID_KEY": key}
    cmd = [sys.executable, "-m", "ray_jobs.cli", "prep", str(data), str(dst), "--source", "imagefolder",
           "--labels", str(data / "labels.csv"), "--size", str(size)]
    log.info("prep: %s", " ".join(cmd))
    subprocess.run(cmd, check=True, env=env, cwd=REPO)
    return str(dst)


def split(prep_url: str, out: Path) -> dict[str, Any]:
    """The fixed split (see the module docstring); writes the pool selection, returns arrays."""
    from data_prep import shards

    t = shards.read_table(prep_url, columns=["slice_id", "label", "image", "height", "width"])
    ids = np.asarray(t.column("slice_id").to_pylist())
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    labels_txt = np.asarray(t.column("label").to_pylist())[order]
    images = shards.decode_images(t)[order]
    classes = sorted(set(labels_txt.tolist()))
    y = np.array([classes.index(v) for v in labels_txt], dtype=np.int64)
    perm = np.random.default_rng(0).permutation(len(ids))
    n_test = int(round(0.3 * len(ids)))
    test, pool = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    vperm = np.random.default_rng(0).permutation(pool)
    n_val = int(round(0.2 * len(pool)))
    val, cand = np.sort(vperm[:n_val]), np.sort(vperm[n_val:])
    sel = out / "pool"
    if not (sel / "_manifest.json").exists():
        shards.write_selection(str(sel), prep_url, ids[pool].tolist(), {"strategy": "bench-real 70 % split"})
    return {"images": images, "y": y, "classes": classes, "pool": pool, "val": val, "cand": cand, "test": test,
            "pool_url": str(sel)}


# --------------------------------------------------------------------------- pre-training
def pretrain_ctssl(method: str, prep_url: str, pool_url: str, out: Path, budget: str,
                   backbone: str) -> dict[str, Any]:
    """``ctssl pretrain`` as a user runs it; returns the encoder folder, steps and wall time."""
    storage = out / "runs"
    done = out / f"ctssl-{method}.json"
    if done.exists():
        return json.loads(done.read_text())
    cmd = [sys.executable, "-m", "ray_jobs.cli", "pretrain", "--method", method, "--data", prep_url,
           "--selection", pool_url,
           "--storage", str(storage), "--experiment", f"bench-real-{method}", "--backbone", backbone,
           "--time-budget", budget, "--tracking-uri", f"sqlite:///{out / 'mlflow.db'}"]
    if method == "spark":  # a 64 px input is a 2x2 patch grid: 0.5 is the mask ratio it can realise
        cmd += ["--method-option", "mask_ratio=0.5"]
    log.info("pretrain: %s", " ".join(cmd))
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO)
    wall = time.perf_counter() - t0
    from ray_jobs.finetune.encoders import _load_from_folder

    _, cfg = _load_from_folder(str(storage / f"bench-real-{method}"))
    res = {"encoder": str(storage / f"bench-real-{method}"), "steps": cfg.get("steps"),
           "images_seen": cfg.get("images_seen"), "wall_s": wall, "batch": cfg.get("batch_size")}
    done.write_text(json.dumps(res))
    return res


def pretrain_lightly(method: str, images: np.ndarray, out: Path, budget_s: float, backbone: str,
                     batch: int) -> dict[str, Any]:
    """A plain lightly loop (lightly's example recipe) for ``budget_s`` seconds of training; the
    timm backbone's weights are saved for fine-tuning (3 channels, ImageNet normalisation as the
    lightly transforms apply it)."""
    import torch
    from lightly.loss import NegativeCosineSimilarity, NTXentLoss
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead, MoCoProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.utils.scheduler import cosine_schedule
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset

    from ssl_core.backbones import create_backbone, export_encoder_state_dict, feature_dim

    done = out / f"lightly-{method}.json"
    if done.exists():
        return json.loads(done.read_text())
    torch.manual_seed(0)
    from lightly_peers import lightly_transform

    transform = lightly_transform(method, images.shape[-1])

    class Pool(Dataset):
        def __len__(self) -> int:
            return len(images)

        def __getitem__(self, i: int):
            img = Image.fromarray(np.clip(images[i], 0, 255).astype(np.uint8)).convert("RGB")
            return transform(img)

    # augmentation in the training process: on 2 cores a loader process would compete with the
    # training threads (the PIL transforms of a 64 px batch cost a few % of a step)
    loader = DataLoader(Pool(), batch_size=batch, shuffle=True, drop_last=True, num_workers=0)
    net = create_backbone(backbone, in_chans=3)
    d = feature_dim(net)
    if method == "byol":
        proj, pred = BYOLProjectionHead(d, 4096, 256), BYOLPredictionHead(256, 4096, 256)
        net_m, proj_m = copy.deepcopy(net), copy.deepcopy(proj)
        deactivate_requires_grad(net_m)
        deactivate_requires_grad(proj_m)
        params = [*net.parameters(), *proj.parameters(), *pred.parameters()]
        crit = NegativeCosineSimilarity()
    else:
        proj = MoCoProjectionHead(d, 2048, 128)
        net_m, proj_m = copy.deepcopy(net), copy.deepcopy(proj)
        deactivate_requires_grad(net_m)
        deactivate_requires_grad(proj_m)
        params = [*net.parameters(), *proj.parameters()]
        crit = NTXentLoss(temperature=0.1, memory_bank_size=(4096, 128))
    opt = torch.optim.SGD(params, lr=0.06)
    steps, t0 = 0, time.perf_counter()
    elapsed = 0.0
    while elapsed < budget_s:
        for views in loader:
            frac = min(1.0, elapsed / budget_s)
            x0, x1 = views[0], views[1]
            if method == "byol":
                m = cosine_schedule(int(frac * 1000), 1000, 0.996, 1)
                update_momentum(net, net_m, m)
                update_momentum(proj, proj_m, m)
                p0 = pred(proj(net(x0).flatten(1)))
                p1 = pred(proj(net(x1).flatten(1)))
                with torch.no_grad():
                    z0, z1 = proj_m(net_m(x0).flatten(1)), proj_m(net_m(x1).flatten(1))
                loss = 0.5 * (crit(p0, z1) + crit(p1, z0))
            else:
                update_momentum(net, net_m, 0.99)
                update_momentum(proj, proj_m, 0.99)
                q = proj(net(x0).flatten(1))
                with torch.no_grad():
                    k = proj_m(net_m(x1).flatten(1))
                loss = crit(q, k)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            elapsed = time.perf_counter() - t0
            if steps % 20 == 0:
                rate = steps / elapsed
                log.info("lightly %s: step %d loss %.3f, %.2f steps/s, %.0f s left", method, steps, float(loss),
                         rate, max(0.0, budget_s - elapsed))
            if elapsed >= budget_s:
                break
    path = out / f"lightly-{method}.pt"
    torch.save(export_encoder_state_dict(net), path)
    res = {"encoder": str(path), "steps": steps, "images_seen": steps * batch, "wall_s": elapsed, "batch": batch}
    done.write_text(json.dumps(res))
    return res


# --------------------------------------------------------------------------- fine-tuning
IMAGENET = ((0.485, 0.229), (0.456, 0.224), (0.406, 0.225))


def load_encoder(spec: dict[str, Any]):
    import torch

    from ray_jobs.finetune.encoders import _load_from_folder

    if spec["kind"] == "random":
        return None, {}
    if spec["kind"] == "lightly":
        return torch.load(spec["encoder"], map_location="cpu", weights_only=True), {}
    return _load_from_folder(spec["encoder"])


def finetune_one(name: str, spec: dict[str, Any], data: dict[str, Any], n: int, seed: int, epochs: int,
                 backbone: str, stats: dict[str, float], recipes, stop: dict[str, Any]) -> dict[str, Any]:
    """One (encoder, N, seed): every recipe on the same subset, the best on validation is tested."""
    import torch

    from ray_jobs.finetune.cell import fit_cell, late_best
    from ssl_core.ct_window import dataset_windows, standardised
    from ssl_core.finetune import FineTuner, create_classifier

    state, cfg = load_encoder(spec)
    in_chans = 3 if spec["kind"] == "lightly" else int(cfg.get("in_chans", 1))
    if spec["kind"] == "lightly":
        windows = [standardised("gray8", m, s) for m, s in IMAGENET]
    else:
        windows = cfg.get("windows") or dataset_windows("gray8", stats, in_chans)
    y = data["y"]
    rng = np.random.default_rng(1000 + seed)
    train = np.concatenate([rng.permutation(data["cand"][y[data["cand"]] == c])[:n]
                            for c in range(len(data["classes"]))])
    t0 = time.perf_counter()
    cell = fit_cell(torch.from_numpy(data["images"].astype(np.float32)), torch.from_numpy(y), train, data["val"],
                    data["test"], recipes=recipes, epochs=epochs, seed=seed, init_seed=seed,
                    make_model=lambda: create_classifier(backbone, num_classes=len(data["classes"]),
                                                         in_chans=in_chans, encoder_state=state),
                    finetune_kwargs={"batch_size": 32, "windows": windows, "bn_recalibrate": True, **stop})
    test = FineTuner.metrics(cell.y_test, cell.p_test, prefix="test_")
    fit = cell.fit
    return {"encoder": name, "n": n, "seed": seed, "test_auc": test["test_auc"], "val_auc": cell.best_val,
            "recipe": cell.recipe.label, "best_epoch": fit.best_epoch,
            "late_best": late_best(fit.best_epoch, fit.max_epochs or epochs), "epochs_run": fit.epochs_run,
            "max_epochs": fit.max_epochs, "stopped_early": fit.stopped_early, "extended": fit.extended,
            "converged": fit.converged, "seconds": time.perf_counter() - t0}


def stop_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The FinetuneConfig fields of the stopping rule: ctssl finetune's default rule, or a fixed count."""
    if args.stopping == "fixed":
        return {"patience": None}
    extend = args.ft_epochs if args.extend_epochs is None else args.extend_epochs
    return {"patience": args.patience, "min_delta": args.min_delta, "extend_epochs": extend}


# --------------------------------------------------------------------------- report
def table(rows: list[dict[str, Any]], pre: dict[str, dict[str, Any]], sizes: list[int], seeds: list[int],
          budget: str) -> str:
    rows = [r for r in rows if r["n"] in sizes and r["seed"] in seeds]  # earlier runs may hold other sizes
    by = {(r["encoder"], r["n"], r["seed"]): r["test_auc"] for r in rows}
    ok = {(r["encoder"], r["n"], r["seed"]): bool(r.get("converged", True)) for r in rows}
    encoders = ["random"] + [e for e in pre]
    lines = [f"Pre-training budget {budget} per method; test AUC (mean over seeds {seeds}).", "",
             "| encoder | steps | " + " | ".join(f"N={n}" for n in sizes) + " |",
             "|---|---|" + "---|" * len(sizes)]
    for e in encoders:
        vals = [np.mean([by[(e, n, s)] for s in seeds]) for n in sizes]
        steps = pre.get(e, {}).get("steps", "-")
        lines.append(f"| {e} | {steps} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    lines += ["", "SSL minus tuned random (mean over the seeds where both runs converged; per seed, "
              "'unconv.' where either did not):", "",
              "| encoder | " + " | ".join(f"N={n}" for n in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for e in encoders[1:]:
        cells = []
        for n in sizes:
            both = [ok[(e, n, s)] and ok[("random", n, s)] for s in seeds]
            d = [by[(e, n, s)] - by[("random", n, s)] for s in seeds]
            kept = [x for x, k in zip(d, both, strict=True) if k]
            mean = f"{np.mean(kept):+.3f}" if kept else "no converged pair"
            cells.append(f"{mean} ({', '.join(f'{x:+.3f}' if k else 'unconv.' for x, k in zip(d, both, strict=True))})")
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    ct = [e for e in encoders if e.startswith("ctssl-")]
    li = [e for e in encoders if e.startswith("lightly-")]
    if ct and li:
        lines += ["", "Best ctssl method minus best lightly method (means over seeds):", ""]
        for n in sizes:
            bc = max(ct, key=lambda e: np.mean([by[(e, n, s)] for s in seeds]))
            bl = max(li, key=lambda e: np.mean([by[(e, n, s)] for s in seeds]))
            d = np.mean([by[(bc, n, s)] for s in seeds]) - np.mean([by[(bl, n, s)] for s in seeds])
            lines.append(f"- N={n}: {bc} vs {bl}: {d:+.3f}")
    recipes: dict[str, dict[str, int]] = {}
    for r in rows:
        recipes.setdefault(r["encoder"], {}).setdefault(r["recipe"], 0)
        recipes[r["encoder"]][r["recipe"]] += 1
    lines += ["", "Recipes chosen on validation: " + "; ".join(
        f"{e}: " + ", ".join(f"{k} x{v}" for k, v in sorted(c.items())) for e, c in recipes.items())]
    late = sum(bool(r["late_best"]) for r in rows)
    lines.append(f"Runs whose best epoch was in the last 10 %: {late} of {len(rows)}.")
    if all("converged" in r for r in rows):
        early = sum(bool(r["stopped_early"]) for r in rows)
        ext = sum(bool(r["extended"]) for r in rows)
        unconv = sum(not r["converged"] for r in rows)
        runs = [r["epochs_run"] for r in rows]
        lines.append(f"Stopping (the chosen recipe of each run): {early} of {len(rows)} stopped on validation, "
                     f"{len(rows) - early} ran to their maximum; {ext} were continued once; {unconv} unconverged "
                     f"(left out of the differences); epochs per run {min(runs)}-{max(runs)}, "
                     f"mean {np.mean(runs):.1f}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", type=Path, help="folder with images and labels.csv (file,label)")
    p.add_argument("--out", type=Path, default=Path("bench-real-out"))
    p.add_argument("--budget", default="12m", help="wall-clock pre-training budget per method (default 12m)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--sizes", default="10,20,40,100")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default=",".join(CTSSL_METHODS))
    p.add_argument("--lightly", default=",".join(LIGHTLY_METHODS), help="lightly peers ('' for none)")
    p.add_argument("--ft-epochs", type=int, default=30, help="the maximum per recipe (exact with --stopping fixed)")
    p.add_argument("--stopping", choices=("early", "fixed"), default="early")
    p.add_argument("--patience", type=int, default=DEFAULT_PATIENCE)
    p.add_argument("--min-delta", type=float, default=DEFAULT_MIN_DELTA)
    p.add_argument("--extend-epochs", type=int, help="one continuation of a run still improving (default --ft-epochs)")
    p.add_argument("--recipes", help="fine-tuning grid LR:FROZEN,... (default: ctssl finetune's)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not (args.data / "labels.csv").exists():
        print(f"bench-real: {args.data}/labels.csv not found (a folder of images with file,label rows)")
        return 2
    import torch

    from data_prep import intensity
    from ray_jobs.finetune.config import default_recipes, parse_recipes

    torch.set_num_threads(os.cpu_count() or 1)
    args.out.mkdir(parents=True, exist_ok=True)
    sizes = [int(x) for x in args.sizes.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    recipes = parse_recipes(args.recipes) or default_recipes(args.ft_epochs)
    stop = stop_kwargs(args)
    prep_url = prep(args.data, args.out, args.size)
    data = split(prep_url, args.out)
    stats = intensity.dataset_stats(data["pool_url"])
    log.info("split: %d pool (%d validation, %d training candidates), %d test; classes %s",
             len(data["pool"]), len(data["val"]), len(data["cand"]), len(data["test"]), data["classes"])
    pre: dict[str, dict[str, Any]] = {}
    for m in [x for x in args.methods.split(",") if x]:
        pre[f"ctssl-{m}"] = {"kind": "ctssl", **pretrain_ctssl(m, prep_url, data["pool_url"], args.out,
                                                                 args.budget, args.backbone)}
    batch = next((v.get("batch") for v in pre.values() if v.get("batch")), 32)
    for m in [x for x in args.lightly.split(",") if x]:
        pre[f"lightly-{m}"] = {"kind": "lightly", **pretrain_lightly(
            m, data["images"][data["pool"]], args.out, parse_budget(args.budget), args.backbone, int(batch))}
    encoders = {"random": {"kind": "random"}, **pre}
    rows_path = args.out / "finetune.jsonl"
    rows = [json.loads(x) for x in rows_path.read_text().splitlines()] if rows_path.exists() else []
    done = {(r["encoder"], r["n"], r["seed"]) for r in rows}
    # smallest N first across every encoder: the few-label sizes the study is about finish first
    todo = [(e, n, s) for n in sizes for s in seeds for e in encoders if (e, n, s) not in done]
    t0 = time.perf_counter()
    for i, (e, n, s) in enumerate(todo):
        r = finetune_one(e, encoders[e], data, n, s, args.ft_epochs, args.backbone, stats, recipes, stop)
        rows.append(r)
        with rows_path.open("a") as f:
            f.write(json.dumps(r) + "\n")
        el = time.perf_counter() - t0
        log.info("fine-tune %d/%d %s N=%d seed %d: test AUC %.3f (%s), ETA %.0f s", i + 1, len(todo), e, n, s,
                 r["test_auc"], r["recipe"], el / (i + 1) * (len(todo) - i - 1))
    md = table(rows, pre, sizes, seeds, args.budget)
    (args.out / "results.md").write_text(md + "\n")
    (args.out / "results.json").write_text(json.dumps({"pretrain": pre, "finetune": rows,
                                                       "split": {k: len(data[k]) for k in ("pool", "val", "test")}},
                                                      indent=1, default=str))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
