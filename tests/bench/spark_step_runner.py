"""Times SparK training steps of one implementation in a fresh process; prints one JSON line.

Run by ``test_bench_spark.py`` as a subprocess so that the official code (which patches timm's ResNet
and re-registers ConvNeXt names in timm when imported) never shares a process with ctssl.

    python spark_step_runner.py --official-dir /tmp/x/pretrain --backbone resnet18 --size 64 --batch 32

Three sides are built in the same process and their steps interleave (the order rotates every step),
each with the same warm-up and number of timed steps: ctssl with the official code's LAMB (the same
optimiser as the official side), ctssl with its recipe's LAMB (timm's multi-tensor path), and the
official code. All start from the same input tensor: ctssl's crop + flip + windowing runs once before
the timing, so augmentation is timed on no side.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import types

import torch


def _official_imports(official_dir: str) -> None:
    sys.path.insert(0, official_dir)
    # decoder.py imports is_pow2n from utils.misc, whose other imports (pytz, tensorboard) the step
    # does not need; provide just that function instead of installing them.
    misc = types.ModuleType("utils.misc")
    misc.is_pow2n = lambda x: x > 0 and (x & (x - 1) == 0)
    sys.modules["utils.misc"] = misc
    import importlib.util

    # models/resnet.py patches timm's ResNet with a hierarchical forward; load it alone, because
    # models/__init__.py imports names that timm 1.0 no longer has (timm.models.layers.drop)
    spec = importlib.util.spec_from_file_location("spark_official_resnet", f"{official_dir}/models/resnet.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


def official_trainer(backbone: str, size: int, batch: int, decoder_width: int = 768, mask_ratio: float = 0.6,
                     warmup_iters: int = 1, total_iters: int = 1000):
    """The official SparK model, LAMB and lr/wd annealing as its ``main.py`` sets them up (after
    :func:`_official_imports`); returns ``step(x, it) -> loss`` for a batch of 3-channel images."""
    import decoder
    import encoder
    import spark
    import timm
    from utils.lamb import TheSameAsTimmLAMB
    from utils.lr_control import get_param_groups, lr_wd_annealing

    cnn = timm.create_model(backbone, pretrained=False, num_classes=0, global_pool="", in_chans=3)
    enc = encoder.SparseEncoder(cnn, input_size=size, sbn=False)
    dec = decoder.LightDecoder(enc.downsample_raito, width=decoder_width, sbn=False)
    model = spark.SparK(enc, dec, mask_ratio=mask_ratio, densify_norm="bn", sbn=False).train()
    groups = get_param_groups(model, nowd_keys={"cls_token", "pos_embed", "mask_token", "gamma"})
    lr = 2e-4 * batch / 256
    opt = TheSameAsTimmLAMB(groups, lr=lr, weight_decay=0.0, betas=(0.9, 0.95), max_grad_norm=5.0)

    def step(x: torch.Tensor, it: int) -> float:
        lr_wd_annealing(opt, lr, 0.04, 0.2, it, warmup_iters, total_iters)
        loss = model(x, active_b1ff=None, vis=False)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def _official_step(args: argparse.Namespace, data: torch.Tensor):
    step = official_trainer(args.backbone, args.size, args.batch, args.decoder_width)
    return lambda it: step(data, it)


def _our_model(args: argparse.Namespace, hu: torch.Tensor):
    from ssl_core.methods import create_method

    model = create_method("spark", backbone=args.backbone, in_chans=3, img_size=args.size,
                          decoder_width=args.decoder_width).train()
    (view,) = model.views(hu)  # crop + flip + windowing, once: the timed steps start from this view
    view = view.contiguous()
    model.views = lambda images, generator=None: [view]
    return model, view


def _our_step(model, optimizer: str, batch: int):
    from ssl_core.methods import StepContext
    from ssl_core.optim import build_schedule, create_optimizer

    defaults = model.optimizer_defaults()
    opt = create_optimizer(model, defaults, batch_size=batch)
    if optimizer == "official":  # the official code's LAMB (per-tensor loop) on ctssl's groups and settings
        from utils.lamb import TheSameAsTimmLAMB

        recipe = opt
        opt = TheSameAsTimmLAMB([{k: v for k, v in g.items()} for g in recipe.param_groups],
                                lr=recipe.defaults["lr"], weight_decay=recipe.defaults["weight_decay"],
                                betas=recipe.defaults["betas"], max_grad_norm=recipe.defaults["max_grad_norm"])
    sched = build_schedule(opt, defaults, total_steps=1000, steps_per_epoch=1)
    hu = torch.empty(0)  # not read: the model's views are fixed (see _our_model)

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
    _official_imports(args.official_dir)
    torch.manual_seed(0)
    hu = torch.rand(args.batch, 1, args.size, args.size) * 2000.0 - 1000.0
    ours_same, view = _our_model(args, hu)
    ours_recipe = copy.deepcopy(ours_same)
    # the same input tensor on all sides; augmentation is timed on none
    steps = {"ours_same_opt": _our_step(ours_same, "official", args.batch),
             "ours_recipe_opt": _our_step(ours_recipe, "recipe", args.batch),
             "official": _official_step(args, view.clone())}
    names = list(steps)
    for i in range(args.warmup):
        for name in names:
            steps[name](i)
    # interleave the sides step by step, rotating who goes first, so that load from other processes
    # on the machine hits all alike; the ratio of each round is then robust to that load drifting
    times: dict[str, list[float]] = {k: [] for k in steps}
    losses: dict[str, float] = {}
    for i in range(args.steps):
        for name in names[i % len(names):] + names[:i % len(names)]:
            t0 = time.perf_counter()
            losses[name] = steps[name](args.warmup + i)
            times[name].append(time.perf_counter() - t0)
    out = {"backbone": args.backbone, "size": args.size, "batch": args.batch, "steps": args.steps,
           "warmup": args.warmup, "threads": torch.get_num_threads()}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = {"step_s_median": med, "images_per_s": args.batch / med, "loss": losses[name]}
        if name != "official":
            out[name]["pair_ratio_median"] = statistics.median(
                o / u for o, u in zip(times["official"], ts, strict=True))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
