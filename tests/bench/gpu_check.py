"""GPU check: training-step throughput and peak memory of each method on one GPU, against lightly,
and the CPU cores needed to keep that GPU fed.

Run from the repository root (``make gpu-check``)::

    python tests/bench/gpu_check.py [--steps 50] [--warmup 5] [--img-size 224] [--batch 64]
                                    [--methods byol,mocov2,swav,spark] [--backbone resnet50]
                                    [--device cuda|cpu] [--out FILE.json]

What it measures, and why this way:

* **ctssl's step is the product's step**: ``ssl_core.methods.create_method``, the method's own
  optimiser recipe built by ``ssl_core.optim`` (LARS / SGD / LAMB, lr scaled to the batch) with its
  schedule, bf16 autocast and channels_last on CUDA, gradient clipping where the recipe has it, the
  post-step hook (EMA, queue), and one host read of the step's scalars, as the pre-training loop in
  ``ray_jobs/pretrain/loop.py`` does. Each step starts from float32 HU slices in host memory at the
  prep resolution and includes ``to_training_tensor`` (host-to-device copy, resize to ``--img-size``)
  and the method's augmentation, which runs on the GPU inside ``training_step``.
* **lightly's step** (BYOL, MoCo v2, SwAV; lightly has no SparK) is the peer from ``lightly_peers.py``
  with the same backbone, head widths, queue / prototype sizes, precision, memory format and the same
  optimiser recipe (so the ratio compares the method implementations, not optimisers). It gets its
  views precomputed on the GPU, so the ratio is conservative for ctssl.
* Timing: warm-up steps first (per side, alone, which is also where peak memory is read), then the
  timed steps of the two sides alternate, each step between ``torch.cuda.synchronize`` calls; img/s is
  batch x steps / total time. Peak memory is ``torch.cuda.max_memory_allocated`` during the side's
  warm-up minus what was allocated before that side was built (the other side's resident tensors).
* Input pipeline, on one CPU thread (``torch.set_num_threads(1)``): on a GPU worker the CPU's share
  per slice is decoding the Parquet row's int16 bytes to float32 HU (``decode_batch``) and
  ``to_training_tensor`` (copy to the device, resize there); augmentation is on the GPU. So the cores
  needed to feed one GPU are GPU img/s / (slices per second per core) for that work. Reading the
  Parquet files and zstd decompression (Ray Data read tasks) are not included, so that figure is a
  lower bound. For comparison the script also times each method's augmentation (``method.views``)
  on CPU tensors: the cores a pipeline that augmented on the CPU would need.

Without a CUDA device and without ``--device cpu`` it prints one line and exits 0. ``--device cpu``
runs the same code on the CPU (fp32, no autocast, as the product does there) so CI can exercise it.
Imports only torch, timm, numpy and ssl_core (lightly when installed), so it runs on a bare GPU box.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parents[2]
_HERE = Path(__file__).resolve().parent
for _p in (str(_REPO), str(_HERE)):  # run as a script from anywhere: ssl_core and the peers module
    if _p not in sys.path:
        sys.path.insert(0, _p)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from ssl_core.methods import METHOD_NAMES  # noqa: E402

NO_CUDA_LINE = "gpu-check: no CUDA device on this machine; nothing to measure"
ALL_METHODS = METHOD_NAMES
GIB = float(1 << 30)

# Method options: the product's defaults, except that SwAV's prototypes are not frozen, so that both
# sides compute the prototypes' gradient in every timed step (the product freezes them for its first
# iterations only). The lightly peer gets the same queue length / prototype count.
METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "byol": {},
    "mocov2": {"queue_size": 65536},
    "swav": {"n_local": 6, "n_prototypes": 3000, "freeze_prototypes_iters": 0},
    "spark": {},
}


# ----------------------------------------------------------------------------- the worker's CPU side
# Mirrors of ray_jobs.pretrain.data.decode_batch and .to_training_tensor. That module imports
# data_prep.shards and with it pyarrow, which a bare GPU box lacks; tests/ssl_core/test_gpu_check.py
# checks that these give exactly what the product's functions give.
def decode_batch(batch: dict[str, Any]) -> np.ndarray:
    """(n, H, W) float32 HU from a numpy batch of the ``image``/``height``/``width`` columns."""
    imgs, hs, ws = batch["image"], batch["height"], batch["width"]
    n, h, w = len(imgs), int(hs[0]), int(ws[0])
    return np.frombuffer(b"".join(imgs), dtype="<i2").reshape(n, h, w).astype(np.float32)


def to_training_tensor(hu: np.ndarray, img_size: int | None, device: torch.device) -> torch.Tensor:
    """(n, 1, S, S) float32 HU tensor on ``device``, resized with antialiasing when S differs."""
    x = torch.from_numpy(hu).unsqueeze(1).to(device, non_blocking=True)
    if img_size is not None and (x.shape[-2] != img_size or x.shape[-1] != img_size):
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", antialias=True, align_corners=False)
    return x


def synthetic_row_batch(n: int, size: int, seed: int = 0) -> dict[str, Any]:
    """A Ray Data numpy batch as a pre-training worker receives it: one int16 HU slice per row."""
    rng = np.random.default_rng(seed)
    hu = np.clip(rng.normal(-400.0, 400.0, size=(n, size, size)), -1024, 3071).astype("<i2")
    return {"image": np.array([s.tobytes() for s in hu], dtype=object),
            "height": np.full(n, size, np.int32), "width": np.full(n, size, np.int32)}


# ----------------------------------------------------------------------------- results
@dataclass
class Side:
    """One implementation's figures for one method (None where not measured)."""

    img_s: float | None = None
    step_ms: list[float] = field(default_factory=list)
    peak_gib: float | None = None
    status: str = "ok"  # "ok", "lightly not installed: ...", "no lightly peer", "error: ..."

    def as_dict(self) -> dict[str, Any]:
        ms = sorted(self.step_ms)
        return {"img_s": self.img_s, "peak_gib": self.peak_gib, "status": self.status,
                "step_ms_median": ms[len(ms) // 2] if ms else None,
                "step_ms_min": ms[0] if ms else None, "step_ms_max": ms[-1] if ms else None}


@dataclass
class MethodResult:
    method: str
    options: dict[str, Any]
    views_per_image: int = 0
    ctssl: Side = field(default_factory=Side)
    lightly: Side = field(default_factory=Side)
    cpu_augment_img_s_per_core: float | None = None  # full view sets per second, one thread

    @property
    def ratio(self) -> float | None:
        a, b = self.ctssl.img_s, self.lightly.img_s
        return a / b if a and b else None

    def as_dict(self, feed_slices_s_per_core: float | None) -> dict[str, Any]:
        gpu = self.ctssl.img_s
        aug = self.cpu_augment_img_s_per_core
        return {
            "method": self.method, "options": self.options, "views_per_image": self.views_per_image,
            "ctssl": self.ctssl.as_dict(), "lightly": self.lightly.as_dict(), "ratio": self.ratio,
            "cpu_augment_views_s_per_core": aug * self.views_per_image if aug else None,
            "cpu_augment_img_s_per_core": aug,
            "cores_to_feed": gpu / feed_slices_s_per_core if gpu and feed_slices_s_per_core else None,
            "cores_if_augmented_on_cpu": gpu / aug if gpu and aug else None,
        }


# ----------------------------------------------------------------------------- the two steps
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 on CUDA, plain fp32 on CPU: what ray_jobs/pretrain/loop.py uses."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _scalars(out: dict[str, Any]) -> dict[str, float]:
    """The loop's per-step metric read (one device-to-host sync per step, as in the product)."""
    return {k: float(v.detach()) for k, v in out.items() if isinstance(v, torch.Tensor) and v.numel() == 1}


def _optimizer(params: Any, defaults: Any, batch: int, total_steps: int) -> tuple[Any, Any]:
    from ssl_core.optim import build_schedule, create_optimizer

    opt = create_optimizer(params, defaults, batch)
    return opt, build_schedule(opt, defaults, total_steps, steps_per_epoch=total_steps)


def build_ctssl_step(method: nn.Module, hu: np.ndarray, args: argparse.Namespace, device: torch.device,
                     total_steps: int) -> Callable[[int], None]:
    """One pre-training step as the product's loop runs it, from host float32 HU to the post-step hook."""
    from ssl_core.methods import StepContext

    defaults = method.optimizer_defaults()
    opt, sched = _optimizer(method, defaults, args.batch, total_steps)
    extra = defaults.extra
    clip = extra.get("max_grad_norm", extra.get("clip_grad_norm"))  # as optim_setup.max_grad_norm

    def step(n: int) -> None:
        ctx = StepContext(step=n, total_steps=total_steps)
        images = to_training_tensor(hu, args.img_size, device)
        with _autocast(device):
            out = method.training_step(images, ctx)
        opt.zero_grad(set_to_none=True)
        sched.step(n)
        out["loss"].backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(method.parameters(), float(clip))
        opt.step()
        method.after_optimizer_step(ctx)
        _scalars(out)

    return step


def build_lightly_step(peer: nn.Module, views: list[torch.Tensor], defaults: Any, args: argparse.Namespace,
                       device: torch.device, total_steps: int) -> Callable[[int], None]:
    """lightly's step with the same optimiser recipe and parameter groups as ctssl's side."""
    from ssl_core.methods import SSLMethod

    # the same split as ctssl's methods: no weight decay (and no LARS adaptation) for norms and biases
    groups = SSLMethod.param_groups(peer)  # type: ignore[arg-type]  # only uses named_parameters()
    opt, sched = _optimizer(groups, defaults, args.batch, total_steps)

    def step(n: int) -> None:
        with _autocast(device):
            loss = peer.step(views, n)
        opt.zero_grad(set_to_none=True)
        sched.step(n)
        loss.backward()
        opt.step()
        float(loss.detach())

    return step


def _warm_up(step: Callable[[int], None], n: int, device: torch.device, base: int) -> float | None:
    """Run ``n`` steps; peak GiB allocated above ``base`` bytes while they ran (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(n):
        step(i)
    _sync(device)
    if device.type != "cuda":
        return None
    return (torch.cuda.max_memory_allocated(device) - base) / GIB


def _allocated(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    _sync(device)
    return torch.cuda.memory_allocated(device)


def _timed(sides: list[tuple[Callable[[int], None], Side]], args: argparse.Namespace,
           device: torch.device) -> None:
    """Alternate the sides step by step (the order flips every round) and time each step; a side whose
    step raises is marked failed and leaves the rotation, the other goes on."""
    live = list(sides)
    for r in range(args.steps):
        for step, side in list(live if r % 2 == 0 else live[::-1]):
            try:
                _sync(device)
                t0 = time.perf_counter()
                step(args.warmup + r)
                _sync(device)
            except Exception as e:
                traceback.print_exc()
                side.status, side.step_ms = _error(e), []
                live = [x for x in live if x[1] is not side]
                continue
            side.step_ms.append((time.perf_counter() - t0) * 1e3)
    for _, side in live:
        side.img_s = args.batch * len(side.step_ms) / (sum(side.step_ms) / 1e3)


def _error(e: BaseException) -> str:
    return f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


def measure_method(name: str, args: argparse.Namespace, device: torch.device, peers: Any,
                   lightly_status: str, hu: np.ndarray, log: Callable[[str], None]) -> MethodResult:
    from ssl_core.backbones import create_backbone
    from ssl_core.device import channels_last
    from ssl_core.methods import create_method

    res = MethodResult(method=name, options=dict(METHOD_OPTIONS.get(name, {})))
    total = args.warmup + args.steps
    sides: list[tuple[Callable[[int], None], Side]] = []
    method = peer = ours = theirs = views = None
    torch.manual_seed(0)
    try:
        base = _allocated(device)
        method = create_method(name, backbone=args.backbone, in_chans=1, img_size=args.img_size, **res.options)
        method.to(device)
        method = channels_last(method, device)
        res.views_per_image = len(method.views)
        ours = build_ctssl_step(method, hu, args, device, total)
        res.ctssl.peak_gib = _warm_up(ours, args.warmup, device, base)
        sides.append((ours, res.ctssl))
    except Exception as e:  # report the row, go on with the next method
        res.ctssl.status = _error(e)
        log(f"[gpu-check] {name}: ctssl failed: {res.ctssl.status}")
        traceback.print_exc()  # one device run must be enough to see why
    if peers is None:
        res.lightly.status = lightly_status
    elif name not in peers.PEERS:
        res.lightly.status = "no lightly peer"
    elif method is not None:
        try:
            base = _allocated(device)
            kw = {"mocov2": {"queue": res.options.get("queue_size", 65536)},
                  "swav": {"prototypes": res.options.get("n_prototypes", 3000)}}.get(name, {})
            peer = peers.PEERS[name](create_backbone(args.backbone, in_chans=1), **kw).to(device)
            peer = channels_last(peer, device)
            views = [channels_last(v, device) for v in
                     peers.peer_views(name, args.batch, args.img_size, res.options.get("n_local", 0), device)]
            theirs = build_lightly_step(peer, views, method.optimizer_defaults(), args, device, total)
            res.lightly.peak_gib = _warm_up(theirs, args.warmup, device, base)
            sides.append((theirs, res.lightly))
        except Exception as e:
            res.lightly.status = _error(e)
            log(f"[gpu-check] {name}: lightly failed: {res.lightly.status}")
            traceback.print_exc()
    else:
        res.lightly.status = "not run (ctssl side failed)"
    _timed(sides, args, device)
    if method is not None:
        try:
            res.cpu_augment_img_s_per_core = cpu_augment_rate(method, args)
        except Exception as e:  # the GPU figures stand without it
            log(f"[gpu-check] {name}: CPU augmentation timing failed: {_error(e)}")
    method = peer = ours = theirs = views = None  # free this method's GPU memory before the next one
    sides.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


# ----------------------------------------------------------------------------- CPU side, one thread
@contextlib.contextmanager
def one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _rate(fn: Callable[[], Any], seconds: float, max_calls: int = 50) -> float:
    """Calls per second of ``fn`` after one untimed call: at least 2 calls, about ``seconds`` long."""
    fn()
    n, t0 = 0, time.perf_counter()
    while n < 2 or (time.perf_counter() - t0 < seconds and n < max_calls):
        fn()
        n += 1
    return n / (time.perf_counter() - t0)


def cpu_feed_rate(args: argparse.Namespace, device: torch.device) -> float:
    """Slices per second one CPU thread turns from Parquet row bytes into the device tensor the step
    takes (decode_batch + to_training_tensor, including the copy to ``device`` and its completion)."""
    batch = synthetic_row_batch(args.batch, args.prep_size, seed=1)

    def feed() -> None:
        to_training_tensor(decode_batch(batch), args.img_size, device)
        _sync(device)

    with one_thread():
        return _rate(feed, args.cpu_seconds) * args.batch


def cpu_augment_rate(method: nn.Module, args: argparse.Namespace) -> float:
    """Images per second whose full view set one CPU thread makes with the method's own ``views``,
    from CPU float32 HU at ``--img-size`` (what a pipeline that augmented on the CPU would pay)."""
    n = min(args.batch, args.cpu_images)
    hu = to_training_tensor(decode_batch(synthetic_row_batch(n, args.prep_size, seed=2)), args.img_size,
                            torch.device("cpu"))
    with one_thread(), torch.no_grad():
        return _rate(lambda: method.views(hu), args.cpu_seconds) * n


# ----------------------------------------------------------------------------- report
def _f(v: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def _side_text(side: Side) -> str:
    if side.status != "ok":
        return side.status
    peak = "" if side.peak_gib is None else f", peak {side.peak_gib:.2f} GiB"
    return f"{_f(side.img_s)} img/s{peak}"


def format_table(results: list[MethodResult], feed: float | None, device: torch.device) -> str:
    on_gpu = device.type == "cuda"
    lines = ["| method | ctssl img/s | lightly img/s | ratio | ctssl peak GiB | lightly peak GiB |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        peer = _f(r.lightly.img_s) if r.lightly.status == "ok" else r.lightly.status
        ours = _f(r.ctssl.img_s) if r.ctssl.status == "ok" else r.ctssl.status
        lines.append(f"| {r.method} | {ours} | {peer} | {_f(r.ratio, '{:.2f}')} | "
                     f"{_f(r.ctssl.peak_gib, '{:.2f}')} | {_f(r.lightly.peak_gib, '{:.2f}')} |")
    where = "copy to the GPU and resize there" if on_gpu else "resize on the CPU"
    lines += ["", f"Input pipeline, one CPU thread. CPU work per slice in the product ({where}; "
              f"decode_batch + to_training_tensor): {_f(feed)} slices/s per core. "
              + ("Augmentation runs on the GPU inside the step (included in the img/s above). "
                 if on_gpu else "Augmentation runs inside the step on this device. ")
              + "Parquet read and zstd decompression (Ray Data read tasks) are not included, so "
              "'cores to feed' is a lower bound.", "",
              "| method | views per image | device img/s | cores to feed (lower bound) | "
              "CPU augmentation views/s per core | cores if augmented on the CPU |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        d = r.as_dict(feed)
        lines.append(f"| {r.method} | {r.views_per_image} | {_f(r.ctssl.img_s)} | "
                     f"{_f(d['cores_to_feed'], '{:.3g}')} | {_f(d['cpu_augment_views_s_per_core'])} | "
                     f"{_f(d['cores_if_augmented_on_cpu'], '{:.3g}')} |")
    return "\n".join(lines)


def _lightly() -> tuple[Any, str]:
    """(peers module or None, status): any failure to import lightly becomes a one-line status."""
    try:
        import lightly_peers
        from lightly import __version__ as v
    except ImportError as e:
        if (getattr(e, "name", None) or "lightly").split(".")[0] == "lightly":
            return None, "lightly not installed"
        return None, f"lightly import failed (missing {e.name})"[:200]
    except Exception as e:  # a broken install must not stop the ctssl measurements
        return None, f"lightly import failed ({_error(e)})"[:200]
    return lightly_peers, f"lightly {v}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=50, help="timed steps per side (default 50)")
    p.add_argument("--warmup", type=int, default=5,
                   help="untimed steps per side before timing, >= 1 (default 5)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--prep-size", type=int, default=256,
                   help="resolution of the slices as prep stores them (default 256, prep's default)")
    p.add_argument("--batch", type=int, default=64, help="images per step (one GPU)")
    p.add_argument("--methods", default=",".join(ALL_METHODS))
    p.add_argument("--backbone", default="resnet50", help="timm backbone (test_resnet for a quick CPU smoke run)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="default: cuda when there is one, else report that and exit 0")
    p.add_argument("--cpu-seconds", type=float, default=1.0, help="time spent per CPU-side rate (default 1 s)")
    p.add_argument("--cpu-images", type=int, default=16, help="images per call when timing CPU augmentation")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    a = p.parse_args(argv)
    a.methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    unknown = [m for m in a.methods if m not in ALL_METHODS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; known: {', '.join(ALL_METHODS)}")
    if min(a.steps, a.warmup, a.batch) < 1:  # peak memory is read during warm-up, after the first step
        p.error("--steps, --warmup and --batch must be >= 1")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device is None or args.device == "cuda":
        if not torch.cuda.is_available():
            print(NO_CUDA_LINE)
            return 0
        args.device = "cuda"
    device = torch.device(args.device)

    def log(msg: str) -> None:
        print(msg, flush=True)

    import timm

    peers, lightly_status = _lightly()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    precision = "bf16 autocast, channels_last" if device.type == "cuda" else "fp32"
    log(f"[gpu-check] {name}; torch {torch.__version__}, timm {timm.__version__}, {lightly_status}; "
        f"{args.backbone} at {args.img_size} px (slices stored at {args.prep_size} px), batch {args.batch}, "
        f"{precision}; {args.warmup} warm-up + {args.steps} timed steps per side, sides alternating")
    hu = decode_batch(synthetic_row_batch(args.batch, args.prep_size))
    t_start = time.perf_counter()
    results = []
    for m in args.methods:
        t0 = time.perf_counter()
        r = measure_method(m, args, device, peers, lightly_status, hu, log)
        results.append(r)
        log(f"[gpu-check] {m}: ctssl {_side_text(r.ctssl)}; lightly {_side_text(r.lightly)}; "
            f"ratio {_f(r.ratio, '{:.2f}')}; CPU augmentation {_f(r.cpu_augment_img_s_per_core)} img/s "
            f"per core; {time.perf_counter() - t0:.0f} s")
    feed = cpu_feed_rate(args, device)
    log(f"[gpu-check] CPU side per slice (decode_batch + to_training_tensor to {device.type}), one thread: "
        f"{feed:.1f} slices/s")
    log("")
    log(format_table(results, feed, device))
    log(f"\n[gpu-check] total {time.perf_counter() - t_start:.0f} s")
    failed = [r.method for r in results if r.ctssl.status != "ok" or r.lightly.status.startswith("error")]
    if args.out is not None:
        doc = {
            "device": name, "device_type": device.type, "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version(), "lightly": lightly_status, "backbone": args.backbone,
            "img_size": args.img_size, "prep_size": args.prep_size, "batch": args.batch, "steps": args.steps,
            "warmup": args.warmup, "precision": precision,
            "input_pipeline": {
                "threads": 1, "slices_s_per_core": feed,
                "measured": "decode_batch (int16 row bytes -> float32 HU) + to_training_tensor "
                            f"({'copy to the GPU, resize there' if device.type == 'cuda' else 'resize on the CPU'})",
                "not_included": "Parquet read and zstd decompression in Ray Data read tasks",
                "augmentation_runs_on": device.type,
            },
            "methods": [r.as_dict(feed) for r in results],
            "failed": failed,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
        log(f"[gpu-check] wrote {args.out}")
    if failed:
        log(f"[gpu-check] failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
