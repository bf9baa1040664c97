"""``ctssl export``: a pre-trained encoder as files that plain timm / torchvision / torch code loads."""

from __future__ import annotations

import argparse
import io
import json
import os
import posixpath
import tempfile
from dataclasses import dataclass
from typing import Any

from ctssl_base import storage
from ctssl_base.errors import UserError
from ctssl_base.uri_secrets import redact_uri
from ray_jobs import tracking

NAME = "export"
HELP = "write an encoder as a plain timm / torchvision state dict (+ TorchScript, torch.export, ONNX)"
DESCRIPTION = """\
Read a pre-trained encoder and write it in formats that need neither ctssl nor MLflow to load:

  encoder_timm.pt          state dict for timm.create_model(ARCH, num_classes=0, in_chans=C)
  encoder_torchvision.pt   state dict for torchvision.models.ARCH() with fc dropped (ResNets only)
  encoder_torchscript.pt   --torchscript: torch.jit.load(path)
  encoder.pt2              --pt2: torch.export.load(path).module()
  encoder.onnx             --onnx: needs the onnx and onnxscript packages
  export.json              architecture, input size, channels, the CT windows and standardisation
                           that turn stored values into network input, the pre-training method

Every file is loaded back and checked to give the encoder's features on a fixed input before the
command ends. --rgb writes a 1-channel encoder for the stock 3-channel model (a grey slice copied into
the three channels then gives the same features).

SOURCE is an encoder folder or pre-training checkpoint / run folder (local or s3://), an encoder file
(encoder.pt, with encoder_config.json beside it or --backbone), runs:/RUN_ID of a pre-training run,
or a registered encoder models:/NAME/VERSION or models:/NAME@ALIAS.

Example:
  ctssl export models:/covid-byol@best-at-n5 --tracking-uri http://mlflow:5000 --out byol-export/
  ctssl export runs/byol-r50 --out byol-export/ --torchscript
"""

#: the files written into --out
TIMM_FILE = "encoder_timm.pt"
TORCHVISION_FILE = "encoder_torchvision.pt"
TORCHSCRIPT_FILE = "encoder_torchscript.pt"
PT2_FILE = "encoder.pt2"
ONNX_FILE = "encoder.onnx"
SIDECAR_FILE = "export.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SOURCE",
                   help="encoder/checkpoint/run folder, encoder.pt file, runs:/RUN_ID, models:/NAME/VERSION or "
                        "models:/NAME@ALIAS")
    p.add_argument("--out", required=True, metavar="DIR", help="local folder to write the files into")
    p.add_argument("--tracking-uri", metavar="URI",
                   help="MLflow tracking URI for runs:/ and models:/ sources (default $MLFLOW_TRACKING_URI)")
    p.add_argument("--storage", metavar="URL",
                   help="a run's local --storage, to find its default SQLite tracking store when no URI is given")
    p.add_argument("--backbone", metavar="NAME", help="timm architecture of a bare state dict without config")
    p.add_argument("--in-chans", type=int, metavar="C", help="input channels of a bare state dict (default 1)")
    p.add_argument("--img-size", type=int, metavar="PX",
                   help="input size (default: the size it was pre-trained at, from its config)")
    p.add_argument("--rgb", action="store_true",
                   help="1-channel encoder: write it for the stock 3-channel model (first kernel repeated / 3)")
    p.add_argument("--torchscript", action="store_true", help="also write a traced TorchScript file")
    p.add_argument("--pt2", action="store_true", help="also write a torch.export archive")
    p.add_argument("--onnx", action="store_true", help="also write an ONNX graph (needs onnx and onnxscript)")


@dataclass
class Loaded:
    """An encoder read from a SOURCE: its timm-layout weights and its ``encoder_config``."""

    state: dict[str, Any]
    config: dict[str, Any]
    where: str  # the file the weights came from, for messages


def _error(source: str, what: str):  # noqa: ANN202 - UserError
    return UserError(f"{source}: {what}")


def _read_state(source: str, data: bytes) -> dict[str, Any]:
    import torch

    if not data.startswith((b"PK", b"\x80")):  # torch.save writes a zip archive (older torch: a pickle)
        raise _error(source, "not an encoder state dict (not a file written by torch.save)")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError: one line naming it
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise _error(source, f"not a readable encoder state dict ({type(e).__name__}: {first[:160]})") from None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise _error(source, "not an encoder state dict (expected a mapping of parameter names to tensors)")
    return state


def _from_storage(source: str) -> Loaded:
    """An encoder file, an encoder folder, or a checkpoint / run folder (its newest checkpoint_* that
    holds the encoder), local or on object storage."""
    from ray_jobs.pretrain.checkpoint import ENCODER_CONFIG_FILE, ENCODER_FILE

    fs, root = storage.open_fs(source)
    try:
        exists, is_dir = fs.exists(root), fs.isdir(root)
    except Exception as e:  # noqa: BLE001 - an unreachable store: say which and why
        raise _error(source, storage.describe_error(source, e)) from None
    if not exists:
        raise _error(source, "not found")
    if is_dir:
        folder = root
        if not fs.exists(storage.join(root, ENCODER_FILE)):
            subs = sorted(p for p in fs.ls(root, detail=False)
                          if posixpath.basename(p.rstrip("/")).startswith("checkpoint_"))
            found = [p for p in reversed(subs) if fs.exists(storage.join(p, ENCODER_FILE))]
            if not found:
                raise _error(source, f"no {ENCODER_FILE} here nor in a checkpoint_* folder (only a finished "
                                     "pre-training's final checkpoint holds the encoder)")
            folder = found[0]
        file = storage.join(folder, ENCODER_FILE)
    else:
        file, folder = root, posixpath.dirname(root)
    state = _read_state(source, fs.cat_file(file))
    cfg_path = storage.join(folder, ENCODER_CONFIG_FILE)
    config = json.loads(fs.cat_file(cfg_path)) if fs.exists(cfg_path) else {}
    return Loaded(state, config, file)


def _mlflow_folder(source: str, uri: str) -> str:
    """The artifact URI of the encoder folder a ``runs:/`` or ``models:/`` source names."""

    if source.startswith("runs:/"):
        parts = source[len("runs:/"):].strip("/").split("/", 1)
        if not parts[0]:
            raise _error(source, "no run id; expected runs:/RUN_ID")
        return f"runs:/{parts[0]}/{parts[1] if len(parts) > 1 else tracking.ENCODER_ARTIFACT}"
    ref = source[len("models:/"):].strip("/")
    cl = tracking.client(uri)
    if "@" in ref:
        name, alias = ref.split("@", 1)
        version = cl.get_model_version_by_alias(name, alias).version
    elif "/" in ref:
        name, version = ref.rsplit("/", 1)
    else:
        raise _error(source, "expected models:/NAME/VERSION or models:/NAME@ALIAS")
    return cl.get_model_version_download_uri(name, version)


def _from_mlflow(source: str, uri: str) -> Loaded:
    bar = os.environ.get(BAR_VAR)
    os.environ[BAR_VAR] = "false"  # two small downloads: no progress bar lines
    try:
        return _download(source, uri)
    finally:
        if bar is None:
            os.environ.pop(BAR_VAR, None)
        else:
            os.environ[BAR_VAR] = bar


BAR_VAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


def _download(source: str, uri: str) -> Loaded:
    import mlflow

    from ray_jobs.pretrain.checkpoint import ENCODER_CONFIG_FILE, ENCODER_FILE

    with tempfile.TemporaryDirectory() as tmp:
        try:
            folder = _mlflow_folder(source, uri).rstrip("/")
            local = mlflow.artifacts.download_artifacts(artifact_uri=f"{folder}/{ENCODER_FILE}", dst_path=tmp,
                                                        tracking_uri=uri)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - no such run / model / alias / artifact, server down
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise _error(source, f"no {ENCODER_FILE} to read at {tracking.redact_uri(uri)} ({first[:200]})") from None
        with open(local, "rb") as f:
            state = _read_state(source, f.read())
        try:
            cpath = mlflow.artifacts.download_artifacts(artifact_uri=f"{folder}/{ENCODER_CONFIG_FILE}",
                                                        dst_path=tmp, tracking_uri=uri)
            with open(cpath) as f:
                config = json.load(f)
        except Exception:  # noqa: BLE001 - an encoder logged without its config: --backbone then says it
            config = {}
    return Loaded(state, config, f"{folder}/{ENCODER_FILE}")


def load_source(args: argparse.Namespace) -> Loaded:
    """Read SOURCE and settle its architecture, channels and input size (flags fill what the config lacks)."""
    source = args.source
    if source.startswith(("runs:/", "models:/")):
        from ray_jobs import tracking

        loaded = _from_mlflow(source, tracking.resolve_tracking_uri(args.tracking_uri, args.storage))
    else:
        loaded = _from_storage(source)
    cfg = dict(loaded.config)
    if args.backbone:
        cfg["backbone"] = args.backbone
    if args.in_chans:
        cfg["in_chans"] = args.in_chans
    if args.img_size:
        cfg["img_size"] = args.img_size
    if not cfg.get("backbone"):
        raise _error(source, "no encoder_config.json names the architecture; give --backbone (and --in-chans)")
    import timm

    if not timm.list_models(cfg["backbone"]):
        origin = "--backbone" if args.backbone else "its encoder_config.json"
        raise _error(source, f"unknown architecture {cfg['backbone']!r} named by {origin} (not a timm model)")
    cfg.setdefault("in_chans", 1)
    loaded.config = cfg
    return loaded


def _check_features(a, b, what: str) -> float:  # noqa: ANN001 - tensors
    import torch

    from ssl_core.export import CHECK_ATOL

    if a.shape != b.shape or not torch.allclose(a, b, atol=CHECK_ATOL, rtol=CHECK_ATOL):
        from ctssl_base.errors import UserError

        raise UserError(f"{what}: read back, it does not reproduce the encoder's features; nothing to trust here")
    return float((a - b).abs().max())


def run(args: argparse.Namespace) -> int:
    import torch

    from ssl_core import export as ex

    if args.onnx and ex.onnx_missing():
        raise UserError(f"--onnx needs the {' and '.join(ex.onnx_missing())} package(s) (pip install "
                        f"{' '.join(ex.ONNX_PACKAGES)}); nothing written")
    loaded = load_source(args)
    cfg = loaded.config
    backbone, chans = str(cfg["backbone"]), int(cfg["in_chans"])
    try:
        module = ex.encoder_module(backbone, loaded.state, chans)
    except ValueError as e:
        raise UserError(f"{args.source}: {e}") from None
    if args.rgb and chans != 1:
        raise UserError(f"--rgb: {args.source} has {chans} input channels; --rgb widens a 1-channel encoder")
    need_size = args.torchscript or args.pt2 or args.onnx
    img_size = cfg.get("img_size")
    if need_size and not img_size:
        raise UserError(f"{args.source}: no input size in its config; give --img-size for the traced formats")
    out = args.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out}: exists and is not a folder")
    os.makedirs(out, exist_ok=True)

    probe = ex.example_input(chans, int(img_size or 64))
    with torch.no_grad():
        reference = module(probe)
    state = {k: v.contiguous() for k, v in module.state_dict().items()}
    files_chans = chans
    if args.rgb:
        state = ex.rgb_state_dict(backbone, state)
        files_chans = 3
        probe = probe.repeat(1, 3, 1, 1)  # the grey slice copied into three channels
    lines = []
    written: dict[str, str] = {}

    plain = ex.encoder_module(backbone, state, files_chans) if args.rgb else module
    torch.save(state, os.path.join(out, TIMM_FILE))
    reread = ex.encoder_module(backbone, torch.load(os.path.join(out, TIMM_FILE), weights_only=True), files_chans)
    with torch.no_grad():
        d = _check_features(reread(probe), reference, TIMM_FILE)
    written["timm"] = TIMM_FILE
    lines.append(f"{TIMM_FILE}: timm.create_model({backbone!r}, num_classes=0, in_chans={files_chans}); "
                 f"max feature difference {d:.2g}")
    torchvision_note = None
    try:
        tv_state = ex.torchvision_state_dict(backbone, state)
    except ValueError as e:
        torchvision_note = str(e)
    else:
        import torchvision

        torch.save(tv_state, os.path.join(out, TORCHVISION_FILE))
        tv = torchvision.models.get_model(backbone, weights=None)
        tv.fc = torch.nn.Identity()
        if files_chans != 3:
            c = tv.conv1
            tv.conv1 = torch.nn.Conv2d(files_chans, c.out_channels, c.kernel_size, c.stride, c.padding, bias=False)
        tv.load_state_dict(torch.load(os.path.join(out, TORCHVISION_FILE), weights_only=True))
        with torch.no_grad():
            d = _check_features(tv.eval()(probe), reference, TORCHVISION_FILE)
        written["torchvision"] = TORCHVISION_FILE
        lines.append(f"{TORCHVISION_FILE}: torchvision.models.{backbone}() with fc = Identity()"
                     + ("" if files_chans == 3 else f" and a {files_chans}-channel conv1")
                     + f"; max feature difference {d:.2g}")
    for flag, key, name, save in ((args.torchscript, "torchscript", TORCHSCRIPT_FILE, ex.save_torchscript),
                                  (args.pt2, "pt2", PT2_FILE, ex.save_exported_program),
                                  (args.onnx, "onnx", ONNX_FILE, ex.save_onnx)):
        if flag:
            try:
                checked = save(plain, os.path.join(out, name), probe) is not False
            except Exception as e:  # noqa: BLE001 - a model the tracer / exporter cannot take: say which
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise UserError(f"{args.source}: cannot write {name} ({type(e).__name__}: {first[:200]})") from None
            written[key] = name
            lines.append(f"{name}: written and checked against the encoder's features" if checked else
                         f"{name}: written, not checked (onnxruntime is not installed)")
    sidecar = _sidecar(args, cfg, files_chans, img_size, module, written, torchvision_note)
    with open(os.path.join(out, SIDECAR_FILE), "w") as f:
        json.dump(sidecar, f, indent=1)
    print(f"exported {backbone} ({cfg.get('method', 'unknown method')}, {files_chans} channel"
          f"{'s' if files_chans > 1 else ''}) from {loaded.where} into {out}:")
    for line in [*lines, f"{SIDECAR_FILE}: architecture, input size and normalisation"]:
        print(f"  {line}")
    if torchvision_note:
        print(f"  no torchvision file: {torchvision_note}")
    return 0


def _sidecar(args: argparse.Namespace, cfg: dict[str, Any], chans: int, img_size: Any, module: Any,
             written: dict[str, str], torchvision_note: str | None) -> dict[str, Any]:
    """What a user of the files needs besides the weights; no data values, only the run's settings."""
    from ssl_core.backbones import feature_dim
    from ssl_core.export import input_description

    return {
        "architecture": cfg["backbone"],
        "in_chans": chans,
        "pretrained_in_chans": int(cfg["in_chans"]),
        "rgb_from_grey": bool(args.rgb),
        "input_size": [int(img_size), int(img_size)] if img_size else None,
        "feature_dim": feature_dim(module),
        "input": input_description(cfg, chans),
        "method": cfg.get("method"),
        "pretraining": {k: cfg.get(k) for k in ("steps", "epochs", "images_seen", "batch_size") if k in cfg},
        "source": redact_uri(args.source),
        "files": written,
        "torchvision": torchvision_note or "loads into torchvision.models."
                                           f"{cfg['backbone']}() with fc = torch.nn.Identity()",
    }
