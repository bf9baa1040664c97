"""Times SparK training steps of one implementation in a fresh process; prints one JSON line.

Run by ``test_bench_spark.py`` as a subprocess so that the official code (which patches timm's ResNet
and re-registers ConvNeXt names in timm when imported) never shares a process with ctssl.

    python spark_step_runner.py --official-dir /tmp/x/pretrain --backbone resnet18 --size 64 --batch 32

Both implementations are built in the same process and their steps alternate.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import types

import torch


def _official_step(args: argparse.Namespace):
    sys.path.insert(0, args.official_dir)
    # decoder.py imports is_pow2n from utils.misc, whose other imports (pytz, tensorboard) the step
    # does not need; provide just that function instead of installing them.
    misc = types.ModuleType("utils.misc")
    misc.is_pow2n = lambda x: x > 0 and (x & (x - 1) == 0)
    sys.modules["utils.misc"] = misc
    import importlib.util

    import timm

    # models/resnet.py patches timm's ResNet with a hierarchical forward; load it alone, because
    # models/__init__.py imports names that timm 1.0 no longer has (timm.models.layers.drop)
    spec = importlib.util.spec_from_file_location("spark_official_resnet", f"{args.official_dir}/models/resnet.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))

    import decoder
    import encoder
    import spark
    from utils.lamb import TheSameAsTimmLAMB
    from utils.lr_control import get_param_groups, lr_wd_annealing

    cnn = timm.create_model(args.backbone, pretrained=False, num_classes=0, global_pool="", in_chans=3)
    enc = encoder.SparseEncoder(cnn, input_size=args.size, sbn=False)
    dec = decoder.LightDecoder(enc.downsample_raito, width=args.decoder_width, sbn=False)
    model = spark.SparK(enc, dec, mask_ratio=0.6, densify_norm="bn", sbn=False).train()
    groups = get_param_groups(model, nowd_keys={"cls_token", "pos_embed", "mask_token", "gamma"})
    lr = 2e-4 * args.batch / 256
    opt = TheSameAsTimmLAMB(groups, lr=lr, weight_decay=0.0, betas=(0.9, 0.95), max_grad_norm=5.0)
    # the official loader hands over augmented, normalised images; the step starts from those
    data = torch.rand(args.batch, 3, args.size, args.size)

    def step(it: int) -> float:
        lr_wd_annealing(opt, lr, 0.04, 0.2, it, 1, 1000)
        loss = model(data, active_b1ff=None, vis=False)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def _our_step(args: argparse.Namespace):
    from ssl_core.methods import StepContext, create_method
    from ssl_core.optim import build_schedule, create_optimizer

    model = create_method("spark", backbone=args.backbone, in_chans=3, img_size=args.size,
                          decoder_width=args.decoder_width).train()
    defaults = model.optimizer_defaults()
    opt = create_optimizer(model, defaults, batch_size=args.batch)
    sched = build_schedule(opt, defaults, total_steps=1000, steps_per_epoch=1)
    # ours starts from raw HU slices: crop + flip + windowing happen inside the step
    hu = torch.rand(args.batch, 1, args.size, args.size) * 2000.0 - 1000.0

    def step(it: int) -> float:
        sched.step(it)
        ctx = StepContext(it, 1000)
        loss = model.training_step(hu, ctx)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.after_optimizer_step(ctx)
        return float(loss.detach())

    return step


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--official-dir", required=True)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--decoder-width", type=int, default=768)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args()
    torch.manual_seed(0)
    steps = {"official": _official_step(args), "ours": _our_step(args)}
    for i in range(args.warmup):
        for step in steps.values():
            step(i)
    # alternate the two implementations step by step, so that load from other processes on the
    # machine hits both alike; the ratio of each pair is then robust to that load drifting
    times: dict[str, list[float]] = {k: [] for k in steps}
    losses: dict[str, float] = {}
    for i in range(args.steps):
        for name, step in (steps.items() if i % 2 == 0 else reversed(steps.items())):
            t0 = time.perf_counter()
            losses[name] = step(args.warmup + i)
            times[name].append(time.perf_counter() - t0)
    pair_ratios = [o / u for o, u in zip(times["official"], times["ours"], strict=True)]
    out = {"backbone": args.backbone, "size": args.size, "batch": args.batch, "steps": args.steps,
           "threads": torch.get_num_threads(), "pair_ratio_median": statistics.median(pair_ratios)}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = {"step_s_median": med, "images_per_s": args.batch / med, "loss": losses[name]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
