"""SparK training-step throughput against the official SparK code (keyu-tian/SparK ``pretrain/``),
and the time of one fine-tuning epoch against a plain per-image PyTorch loop.

The official code is read from a clone of https://github.com/keyu-tian/SparK named by
``CTSSL_SPARK_GIT_DIR`` (its ``.git`` folder, or a bare mirror), exported with ``git archive`` into a
temporary directory for the run and never copied into the project. Both implementations get the
same timm backbone, batch size, input size, decoder width (768), mask ratio (0.6), LAMB settings
(lr 2e-4 x batch / 256, clip 5) and 3-channel input tensor; augmentation is timed on no side (ctssl's
crop + flip + windowing runs once before the timing and its view is the input of every side). ctssl
is timed twice: with the official code's LAMB class (the same optimiser) and with its recipe's LAMB
(timm's multi-tensor path). The three sides run in one subprocess (the official code patches timm's
ResNet class; ctssl's encoder does not use the patched forward) with the same warm-up and number of
steps, their steps interleaved, so load from other processes hits all alike.

Run: ``make bench BENCH_ARGS="-k spark"`` or
``.venv/bin/python -m pytest tests/bench/test_bench_spark.py -s -p no:cacheprovider --override-ini=addopts=``
Steps per configuration: ``CTSSL_BENCH_STEPS`` (default 10, after 1 warm-up step per side; fewer steps swing by +-5 %).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SPARK_GIT_DIR = Path(os.environ.get("CTSSL_SPARK_GIT_DIR", ROOT / ".spark-official.git"))
STEPS = int(os.environ.get("CTSSL_BENCH_STEPS", "10"))

# (backbone, input px, batch): the demo's and the papers' backbones at 64 px, then sizes where masking matters
# (64 px is a 2x2 patch grid; 96 px 3x3; 160 px 5x5)
#: large configurations take many minutes per step on a loaded 2-core machine; the suite-wide
#: 900 s test timeout is for CI tests, not for benchmarks
pytestmark = pytest.mark.timeout(4 * 3600)

CONFIGS = [("resnet18", 64, 32), ("resnet50", 64, 16), ("resnet18", 96, 32), ("resnet50", 160, 16)]


@pytest.fixture(scope="module")
def official_pretrain_dir():
    if not (SPARK_GIT_DIR / "HEAD").exists():
        pytest.skip(f"no clone of the official SparK at {SPARK_GIT_DIR}: git clone --bare "
                    "https://github.com/keyu-tian/SparK and set CTSSL_SPARK_GIT_DIR to it")
    with tempfile.TemporaryDirectory(prefix="spark_official_") as tmp:
        archive = Path(tmp) / "pretrain.tar"
        subprocess.run(["git", f"--git-dir={SPARK_GIT_DIR}", "archive", "-o", str(archive), "HEAD", "pretrain"],
                       check=True)
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        yield Path(tmp) / "pretrain"


@pytest.mark.parametrize("backbone,size,batch", CONFIGS, ids=[f"{b}-{s}px-b{n}" for b, s, n in CONFIGS])
def test_spark_step_throughput_vs_official(official_pretrain_dir, backbone, size, batch):
    cmd = [sys.executable, str(HERE / "spark_step_runner.py"), "--official-dir", str(official_pretrain_dir),
           "--backbone", backbone, "--size", str(size), "--batch", str(batch), "--steps", str(STEPS)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    off = res["official"]
    print(f"\n[spark] {backbone} {size}px batch {batch} ({res['threads']} threads, {res['warmup']} warm-up + {STEPS} "
          "timed steps per side, sides interleaved; augmentation timed on no side; load average "
          f"{os.getloadavg()[0]:.2f}): official {off['images_per_s']:.2f} img/s")
    for key, label in (("ours_same_opt", "ctssl, official LAMB (same optimiser)"),
                       ("ours_recipe_opt", "ctssl, recipe LAMB (timm, multi-tensor)")):
        ours = res[key]
        ratio = ours["images_per_s"] / off["images_per_s"]
        print(f"[spark]   {label:42s} {ours['images_per_s']:7.2f} img/s  ratio {ratio:.2f}"
              f" (median of per-step ratios {ours['pair_ratio_median']:.2f})")
        assert ours["loss"] == ours["loss"]  # trained (finite loss)
    assert off["loss"] == off["loss"]


def _blobs(n: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 2
    hu = 20.0 * torch.randn(n, 1, size, size, generator=g)
    hu[y == 1, :, size // 4: size // 2, size // 4: size // 2] += 400.0
    return hu, y


def test_finetune_epoch_time_vs_plain_loop():
    """One epoch of :class:`FineTuner` (batched GPU-able augmentation) against the usual loop that
    augments image by image with torchvision transforms, same model, optimiser, batch and data."""
    import timm
    from torchvision.transforms import v2

    from ssl_core.ct_window import apply_window
    from ssl_core.finetune import FineTuner, FineTuneRecipe, create_classifier

    n, size, batch = 256, 64, 64
    hu, y = _blobs(n, size)

    torch.manual_seed(0)
    model = create_classifier("resnet18", num_classes=2, in_chans=1)
    ft = FineTuner(model, FineTuneRecipe(epochs=1, frozen_epochs=0, batch_size=batch, windows=["soft_tissue"]),
                   device="cpu")
    train = ft.batches(hu, y, train=True)

    torch.manual_seed(0)
    ref = timm.create_model("resnet18", pretrained=False, in_chans=1, num_classes=2)
    opt = torch.optim.Adam(ref.parameters(), lr=1e-4, weight_decay=5e-4)
    per_image = v2.Compose([v2.RandomResizedCrop(size, scale=(0.85, 1.0), ratio=(0.9, 1.1), antialias=True),
                            v2.RandomHorizontalFlip(), v2.RandomRotation(10)])

    def plain_epoch() -> None:
        ref.train()
        order = torch.randperm(n)
        for i in range(0, n, batch):
            idx = order[i:i + batch]
            x = torch.stack([per_image(hu[j]) for j in idx])
            x = apply_window(x, ["soft_tissue"])
            loss = torch.nn.functional.cross_entropy(ref(x), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()

    ours_t, ref_t = [], []
    for epoch in range(3):  # alternate; the first pair warms up
        t0 = time.perf_counter()
        ft.train_one_epoch(train, epoch)
        t1 = time.perf_counter()
        plain_epoch()
        t2 = time.perf_counter()
        if epoch:
            ours_t.append(t1 - t0)
            ref_t.append(t2 - t1)
    o, r = statistics.median(ours_t), statistics.median(ref_t)
    print(f"\n[finetune] resnet18 {size}px, {n} images, batch {batch}: ctssl epoch {o:.2f}s "
          f"({n / o:.1f} img/s), plain loop {r:.2f}s ({n / r:.1f} img/s), ratio {r / o:.2f} (target >= 1.0)")
    assert o > 0 and r > 0
