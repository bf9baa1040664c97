"""``ctssl pretrain`` as a user runs it, against a plain peer training loop on the same shards.

``make bench-pretrain [DATA=<prep output or selection>] [BUDGET=10m] [METHODS=byol,mocov2,swav,spark]``
(not part of CI: each method takes two budgets of machine time). For each method, one after the other
on the same machine:

* **ctssl**: ``ctssl pretrain --method M --time-budget BUDGET`` in a fresh process, CLI defaults
  otherwise (batch sized from the pool, one worker, which trains in the command's own process;
  ``--ctssl-args "--runner ray"`` measures it on Ray Train instead).
* **peer**: a plain loop in a fresh process, the way a user stitches one together: read the same
  shards with pyarrow into memory, then lightly's example recipe for BYOL / MoCo v2 / SwAV (lightly's
  transforms on PIL images in the training process, its heads and losses from
  ``lightly_peers.py``, the optimiser of lightly's example), or the official SparK code
  (keyu-tian/SparK ``pretrain/``: its model, LAMB, lr/wd schedule and augmentation) for SparK. The
  same backbone, input size, batch and training-loop budget.

Reported per side: images/s **steady state** (after the first pass over the data: ctssl's first epoch
streams the shards, later ones come from its in-memory epoch cache) and images/s **including
start-up** (all images trained / the process's whole wall time: imports, Ray, data loading,
checkpoint). The ratios are ctssl / peer. Results go to OUT/results.md and OUT/results.json.

The official SparK code is read from a bare clone (``CTSSL_SPARK_GIT_DIR``, default
``.spark-official.git``); without one the SparK row has no peer and says so.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
for p in (str(REPO), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

log = logging.getLogger("bench-pretrain")
from ssl_core.methods import METHOD_NAMES as METHODS  # noqa: E402 - after the sys.path set-up

SPARK_GIT_DIR = Path(os.environ.get("CTSSL_SPARK_GIT_DIR", REPO / ".spark-official.git"))
# ctssl's worker logs a progress line every 10 steps: "step N epoch E ... (T s of training)"
PROGRESS = re.compile(r"step (\d+) epoch (\d+) .*?\((\d+) s of training\)")
STOPPED = re.compile(r"stopped after (\d+) steps, ([\d.]+) s of training")
BATCH = re.compile(r"(\d+) workers? x (\d+)")
SPARK_MASK_RATIO = 0.5  # both sides: the ratio a 2x2 patch grid (64 px) realises


# --------------------------------------------------------------------------- data
def phantom_prep(out: Path, size: int) -> str:
    """The default data: a phantom cohort (20 patients x 100 slices) prepped at ``size`` px."""
    prep = out / "phantom-prep"
    if (prep / "_manifest.json").exists():
        return str(prep)
    env = {**os.environ, "CTSSL_DEID_KEY": os.environ.get("CTSSL_DEID_KEY", "bench-pretrain-3c9e1f7a5b2d40688a")}
    cli = [sys.executable, "-m", "ray_jobs.cli"]
    subprocess.run([*cli, "phantom", str(out / "phantom"), "--patients", "20", "--slices", "100",
                    "--no-progress"], check=True, cwd=REPO, env=env)
    subprocess.run([*cli, "prep", str(out / "phantom"), str(prep), "--size", str(size), "--no-progress"],
                   check=True, cwd=REPO, env=env)
    return str(prep)


def load_pool(url: str) -> tuple[Any, str]:
    """(n, H, W) uint8 images of the pool as a peer would view them, and the data's intensity.
    8-bit sources keep their grey values; HU slices get the lung window (-1350..150 HU) as 0..255."""
    import numpy as np

    from data_prep import shards

    manifest = shards.read_manifest(shards.resolve(url).base_url)
    table = shards.read_table(url, columns=["image", "height", "width"])
    images = shards.decode_images(table).astype(np.float32)
    intensity = manifest.get("intensity", "hu")
    if intensity != "gray8":
        images = (images + 1350.0) / 1500.0 * 255.0
    return np.clip(images, 0, 255).astype(np.uint8), intensity


# --------------------------------------------------------------------------- ctssl side
def run_ctssl(method: str, data: str, out: Path, budget: str, backbone: str,
              extra: list[str] | None = None) -> dict[str, Any]:
    from data_prep import shards

    storage = out / "runs"
    manifest = shards.read_manifest(data)
    where = (["--data", manifest["base"], "--selection", data] if manifest.get("kind") == "selection"
             else ["--data", data])
    cmd = [sys.executable, "-m", "ray_jobs.cli", "pretrain", "--method", method, *where,
           "--storage", str(storage), "--experiment", f"bench-{method}-{int(time.time())}",
           "--backbone", backbone, "--time-budget", budget, "--tracking-uri", f"sqlite:///{out / 'mlflow.db'}"]
    cmd += extra or []
    if method == "spark":  # at 64 px a ResNet's 32-px patches form a 2x2 grid: 0.5 is the ratio it can realise
        cmd += ["--method-option", f"mask_ratio={SPARK_MASK_RATIO}"]
    log.info("ctssl: %s", " ".join(cmd))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    text = proc.stdout + proc.stderr
    (out / f"ctssl-{method}.log").write_text(text)
    if proc.returncode != 0:
        raise RuntimeError(f"ctssl pretrain {method} failed (rc {proc.returncode}); see {out}/ctssl-{method}.log")
    return parse_ctssl_log(text, wall)


def parse_ctssl_log(text: str, wall: float) -> dict[str, Any]:
    """Steps, batch, training seconds and the steady-state rate from ``ctssl pretrain``'s output."""
    batch = BATCH.search(text)
    stopped = STOPPED.search(text)
    if not batch or not stopped:
        raise RuntimeError("could not read the batch size or the final step count from ctssl's output")
    workers, per_worker = int(batch.group(1)), int(batch.group(2))
    images_per_step = workers * per_worker
    steps, train_s = int(stopped.group(1)), float(stopped.group(2))
    points = [(int(s), int(e), float(t)) for s, e, t in PROGRESS.findall(text)]
    after = [p for p in points if p[1] >= 1]  # the first epoch read the data through Ray Data
    if len(after) < 2 or after[-1][2] <= after[0][2]:
        raise RuntimeError("the budget ended before two progress lines after the first epoch: use a longer one")
    steady = (after[-1][0] - after[0][0]) * images_per_step / (after[-1][2] - after[0][2])
    return {"steps": steps, "batch": images_per_step, "train_s": train_s, "wall_s": wall,
            "images": steps * images_per_step, "steady_img_s": steady,
            "budget_img_s": steps * images_per_step / train_s, "wall_img_s": steps * images_per_step / wall}


# --------------------------------------------------------------------------- peer side
def run_peer(method: str, data: str, out: Path, budget_s: float, backbone: str, batch: int,
             official_dir: Path | None) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--peer", method, "--data", data, "--budget",
           f"{budget_s}s", "--backbone", backbone, "--batch", str(batch), "--out", str(out)]
    if official_dir is not None:
        cmd += ["--official-dir", str(official_dir)]
    log.info("peer: %s", " ".join(cmd))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (out / f"peer-{method}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"peer {method} failed (rc {proc.returncode}); see {out}/peer-{method}.log")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["wall_s"] = wall
    res["wall_img_s"] = res["images"] / wall
    return res


def _loader(images, transform, batch: int):
    """Batches of ``transform``ed PIL images (grey as RGB), shuffled, in the training process: on 2
    cores a loader process would only compete with the training threads."""
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset

    class Pool(Dataset):
        def __len__(self) -> int:
            return len(images)

        def __getitem__(self, i: int):
            return transform(Image.fromarray(images[i]).convert("RGB"))

    return DataLoader(Pool(), batch_size=batch, shuffle=True, drop_last=True, num_workers=0)


def _lightly_peer(method: str, images, backbone: str, batch: int):
    """lightly's example: its transforms, its model (``lightly_peers``), its example optimiser."""
    import torch
    from lightly_peers import PEERS, lightly_transform

    from ssl_core.backbones import create_backbone

    loader = _loader(images, lightly_transform(method, images.shape[-1]), batch)
    model = PEERS[method](create_backbone(backbone, in_chans=3)).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.Adam(params, lr=1e-3) if method == "swav"  # lightly's SwAV example
           else torch.optim.SGD(params, lr=0.06))  # lightly's BYOL / MoCo examples

    def step(views, it: int) -> float:
        loss = model.step(list(views), it)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return loader, step


def _spark_peer(images, backbone: str, batch: int, official_dir: Path):
    """The official SparK code as its ``main.py`` trains: RandomResizedCrop(0.67-1) + flip + ImageNet
    normalisation, its sparse encoder / light decoder (width 768), LAMB and lr/wd annealing."""
    from spark_step_runner import _official_imports, official_trainer
    from torchvision import transforms

    _official_imports(str(official_dir))
    size = images.shape[-1]
    transform = transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(0.67, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    step = official_trainer(backbone, size, batch, mask_ratio=SPARK_MASK_RATIO, warmup_iters=40)
    return _loader(images, transform, batch), step


def peer_main(args: argparse.Namespace) -> None:
    """One peer run in this process; prints one JSON line (steps, images, rates)."""
    import torch

    from ray_jobs.pretrain.config import parse_duration

    torch.manual_seed(0)
    budget_s = parse_duration(args.budget)
    images, _ = load_pool(args.data)
    if args.peer == "spark":
        loader, step = _spark_peer(images, args.backbone, args.batch, args.official_dir)
    else:
        loader, step = _lightly_peer(args.peer, images, args.backbone, args.batch)
    steps, elapsed, first_epoch = 0, 0.0, None
    t0 = time.perf_counter()
    while elapsed < budget_s:
        for views in loader:
            step(views, steps)
            steps += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= budget_s:
                break
        if first_epoch is None:
            first_epoch = (steps, elapsed)
    done_steps, done_s = first_epoch if first_epoch and first_epoch[1] < elapsed else (0, 0.0)
    print(json.dumps({"steps": steps, "batch": args.batch, "train_s": elapsed, "images": steps * args.batch,
                      "steady_img_s": (steps - done_steps) * args.batch / max(elapsed - done_s, 1e-9),
                      "budget_img_s": steps * args.batch / elapsed, "threads": torch.get_num_threads()}))


# --------------------------------------------------------------------------- driver
def official_spark_dir(tmp: Path) -> Path | None:
    if not (SPARK_GIT_DIR / "HEAD").exists():
        return None
    archive = tmp / "pretrain.tar"
    subprocess.run(["git", f"--git-dir={SPARK_GIT_DIR}", "archive", "-o", str(archive), "HEAD", "pretrain"],
                   check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(tmp, filter="data")
    return tmp / "pretrain"


def render(rows: list[dict[str, Any]], budget: str, data: str) -> str:
    lines = [f"`ctssl pretrain --time-budget {budget}` vs a plain peer loop on {data}", "",
             "| method | peer | ctssl steady img/s | peer steady img/s | steady ratio | ctssl img/s incl. start-up "
             "| peer img/s incl. start-up | ratio incl. start-up | ctssl wall s | peer wall s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        c, p = r["ctssl"], r.get("peer")
        if p is None:
            lines.append(f"| {r['method']} | {r['peer_name']} | {c['steady_img_s']:.1f} | - | - | "
                         f"{c['wall_img_s']:.1f} | - | - | {c['wall_s']:.0f} | - |")
            continue
        lines.append(f"| {r['method']} | {r['peer_name']} | {c['steady_img_s']:.1f} | {p['steady_img_s']:.1f} | "
                     f"**{c['steady_img_s'] / p['steady_img_s']:.2f}** | {c['wall_img_s']:.1f} | "
                     f"{p['wall_img_s']:.1f} | **{c['wall_img_s'] / p['wall_img_s']:.2f}** | "
                     f"{c['wall_s']:.0f} | {p['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="prep output or selection URL (default: a 64 px phantom prepped into OUT)")
    p.add_argument("--budget", default="10m", help="training-loop budget per side (default 10m)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--size", type=int, default=64, help="prep size of the default phantom data")
    p.add_argument("--out", type=Path, default=Path("bench-pretrain-out"))
    p.add_argument("--ctssl-args", default="", help='extra `ctssl pretrain` options, e.g. "--runner ray"')
    p.add_argument("--peer", choices=METHODS, help=argparse.SUPPRESS)  # internal: run one peer side
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--official-dir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.peer:
        peer_main(args)
        return
    from ray_jobs.pretrain.config import parse_duration

    args.out.mkdir(parents=True, exist_ok=True)
    data = args.data or phantom_prep(args.out, args.size)
    budget_s = parse_duration(args.budget)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench_pretrain_") as tmp:
        official = official_spark_dir(Path(tmp))
        for method in args.methods.split(","):
            ctssl = run_ctssl(method, data, args.out, args.budget, args.backbone, shlex.split(args.ctssl_args))
            row: dict[str, Any] = {"method": method, "ctssl": ctssl,
                                   "peer_name": "official SparK" if method == "spark" else "lightly example"}
            if method == "spark" and official is None:
                row["peer_name"] = f"none (no official SparK clone at {SPARK_GIT_DIR})"
            else:
                row["peer"] = run_peer(method, data, args.out, budget_s, args.backbone, ctssl["batch"], official)
            rows.append(row)
            log.info("%s: steady %.1f img/s; %s", method, ctssl["steady_img_s"],
                     f"peer {row['peer']['steady_img_s']:.1f} img/s" if "peer" in row else row["peer_name"])
    table = render(rows, args.budget + (f" {args.ctssl_args}" if args.ctssl_args else ""),
                   args.data or "the 64 px phantom")
    (args.out / "results.json").write_text(json.dumps({"budget": args.budget, "data": data, "rows": rows,
                                                       "load": os.getloadavg()}, indent=1))
    (args.out / "results.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
