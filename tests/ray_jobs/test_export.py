"""The encoder anywhere: ``ctssl export`` files load in a process that has only torch, timm and
torchvision (ctssl not importable) and give ctssl's encoder features; a registered encoder is an MLflow
PyTorch model, and a study's report puts alias ``best-at-<smallest size>`` on its best encoder.

The encoder is a real ResNet-18 (an architecture timm and torchvision both have; ctssl's tiny
``test_resnet`` exists in timm only) built by ssl_core's BYOL at 32 px and saved the way pre-training
saves its final encoder. Its batch-norm statistics are randomised, so a file loaded in training mode
or with a statistic lost would give other features.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ray_jobs import tracking
from ray_jobs.cli import main
from ray_jobs.pretrain import checkpoint as ckpt_io
from ray_jobs.pretrain.checkpoint import Progress
from ray_jobs.pretrain.config import PretrainConfig
from ray_jobs.pretrain.loop import encoder_config
from ssl_core.backbones import export_encoder_state_dict

IMG = 32
TOL = {"atol": 1e-5, "rtol": 1e-5}


def _encoder(seed: int) -> torch.nn.Module:
    """ssl_core's BYOL encoder (ResNet-18, 1 channel) with random weights and batch-norm statistics."""
    from ssl_core.methods import create_method

    torch.manual_seed(seed)
    enc = create_method("byol", backbone="resnet18", img_size=IMG, in_chans=1).encoder()
    g = torch.Generator().manual_seed(seed)
    for m in enc.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0.0, 0.2, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
    return enc.eval()


def _save_like_pretrain(enc: torch.nn.Module, folder: Path, method: str = "byol") -> None:
    cfg = PretrainConfig(method=method, data="pool", storage="runs", experiment="x", backbone="resnet18")
    ckpt_io.save_encoder(str(folder), export_encoder_state_dict(enc),
                         encoder_config(cfg, IMG, "tinyct", Progress(step=7, epoch=1), None, 16))


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A final checkpoint folder holding the encoder, a fixed input and ctssl's features of it."""
    root = tmp_path_factory.mktemp("export")
    enc = _encoder(0)
    folder = root / "run" / "checkpoint_000001"
    _save_like_pretrain(enc, folder)
    x = torch.rand(3, 1, IMG, IMG, generator=torch.Generator().manual_seed(5)) * 2 - 0.5
    with torch.no_grad():
        ref = enc(x)
    torch.save({"x": x, "features": ref}, root / "probe.pt")
    return SimpleNamespace(root=root, run=root / "run", folder=folder, module=enc, x=x, features=ref)


FRESH = r"""
import importlib.util, json, sys
sys.path.append(sys.argv[1])  # site-packages, without its .pth files: no editable ctssl finder
for name in ("ctssl_base", "ssl_core", "ray_jobs", "data_prep"):
    assert importlib.util.find_spec(name) is None, f"{name} is importable"
import torch, timm, torchvision
plain, rgb = sys.argv[2], sys.argv[3]
probe = torch.load(sys.argv[4], weights_only=True)
x, ref = probe["x"], probe["features"]
side = json.load(open(f"{plain}/export.json"))
arch, chans = side["architecture"], side["in_chans"]
out = {}
with torch.no_grad():
    m = timm.create_model(arch, pretrained=False, num_classes=0, in_chans=chans)
    m.load_state_dict(torch.load(f"{plain}/encoder_timm.pt", weights_only=True), strict=True)
    out["timm"] = m.eval()(x)
    tv = torchvision.models.get_model(arch, weights=None)
    tv.fc = torch.nn.Identity()
    tv.conv1 = torch.nn.Conv2d(chans, 64, 7, 2, 3, bias=False)
    tv.load_state_dict(torch.load(f"{plain}/encoder_torchvision.pt", weights_only=True), strict=True)
    out["torchvision"] = tv.eval()(x)
    out["torchscript"] = torch.jit.load(f"{plain}/encoder_torchscript.pt")(x)
    out["pt2"] = torch.export.load(f"{plain}/encoder.pt2").module()(x)
    x3 = x.repeat(1, 3, 1, 1)  # --rgb: the stock 3-channel models, the grey slice in every channel
    m3 = timm.create_model(arch, pretrained=False, num_classes=0)
    m3.load_state_dict(torch.load(f"{rgb}/encoder_timm.pt", weights_only=True), strict=True)
    out["timm rgb"] = m3.eval()(x3)
    tv3 = torchvision.models.get_model(arch, weights=None)
    tv3.fc = torch.nn.Identity()
    tv3.load_state_dict(torch.load(f"{rgb}/encoder_torchvision.pt", weights_only=True), strict=True)
    out["torchvision rgb"] = tv3.eval()(x3)
assert "mlflow" not in sys.modules  # nothing but torch, timm and torchvision was needed
diffs = {k: float((v - ref).abs().max()) for k, v in out.items()}
assert all(v.shape == ref.shape for v in out.values()), {k: tuple(v.shape) for k, v in out.items()}
print(json.dumps(diffs))
"""


def test_exported_files_load_without_ctssl_and_give_its_encoder_features(encoder, tmp_path, capsys):
    plain, rgb = tmp_path / "plain", tmp_path / "rgb"
    # the run folder: its newest checkpoint holding encoder.pt is found, as finetune --encoder does
    assert main(["export", str(encoder.run), "--out", str(plain), "--torchscript", "--pt2"]) == 0
    assert main(["export", str(encoder.folder / "encoder.pt"), "--out", str(rgb), "--rgb"]) == 0
    printed = capsys.readouterr().out
    assert "max feature difference" in printed and str(encoder.folder / "encoder.pt") in printed

    side = json.loads((plain / "export.json").read_text())
    assert side["architecture"] == "resnet18" and side["in_chans"] == 1 and side["input_size"] == [IMG, IMG]
    assert side["feature_dim"] == 512 and side["method"] == "byol" and side["pretraining"]["steps"] == 7
    assert side["input"]["values"] == "Hounsfield units (HU)"
    assert [(c["name"], c["center"], c["width"]) for c in side["input"]["channels"]] == [("lung", -600.0, 1500.0)]
    assert set(side["files"]) == {"timm", "torchvision", "torchscript", "pt2"}
    rgb_side = json.loads((rgb / "export.json").read_text())
    assert rgb_side["in_chans"] == 3 and rgb_side["pretrained_in_chans"] == 1
    assert len(rgb_side["input"]["channels"]) == 3

    script = tmp_path / "fresh.py"
    script.write_text(FRESH)
    proc = subprocess.run([sys.executable, "-I", "-S", str(script), sysconfig.get_paths()["purelib"], str(plain),
                           str(rgb), str(encoder.root / "probe.pt")], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    diffs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(diffs) == {"timm", "torchvision", "torchscript", "pt2", "timm rgb", "torchvision rgb"}
    # same kernels, same order of operations: the 1-channel files give ctssl's features to the bit or
    # nearly; the rgb files sum three thirds of each kernel, which rounds differently
    assert max(diffs[k] for k in ("timm", "torchvision", "torchscript", "pt2")) <= 1e-5, diffs
    assert max(diffs["timm rgb"], diffs["torchvision rgb"]) <= 1e-4, diffs
    assert encoder.features.abs().max() > 0.1  # features far from zero: the comparison means something


def _run_with_encoder(cl, exp_id: str, enc: torch.nn.Module, folder: Path, method: str) -> str:
    """A pre-training run of the study's experiment whose encoder is logged as the driver logs it."""
    run_id = cl.create_run(exp_id, run_name=method, tags={"method": method}).info.run_id
    _save_like_pretrain(enc, folder, method)
    tracking.log_artifacts(cl, run_id, [str(folder / ckpt_io.ENCODER_FILE), str(folder / ckpt_io.ENCODER_CONFIG_FILE)],
                           tracking.ENCODER_ARTIFACT)
    return run_id


def _summary(path: Path, aucs: dict[tuple[str, str], float]) -> str:
    import pandas as pd

    pd.DataFrame([{"encoder": e, "size": s, "auc_mean": a} for (e, s), a in aucs.items()]).to_csv(path, index=False)
    return str(path)


def test_registered_encoder_loads_with_mlflow_pytorch_by_the_alias_the_report_sets(encoder, tmp_path, capsys):
    import mlflow

    from ray_jobs.pretrain.mlflow_run import register_encoder
    from ray_jobs.study.stages import Context, _alias_best

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cl = tracking.client(uri)
    exp = tracking.get_or_create_experiment(cl, "study", f"file://{tmp_path / 'artifacts'}")
    other = _encoder(1)
    runs = {"byol": _run_with_encoder(cl, exp, encoder.module, tmp_path / "byol", "byol"),
            "spark": _run_with_encoder(cl, exp, other, tmp_path / "spark", "spark")}
    cfg = PretrainConfig(method="byol", data="pool", storage=str(tmp_path / "runs"), experiment="byol",
                         backbone="resnet18", register_as="study-byol")
    assert register_encoder(cl, cfg, runs["byol"]) == "1"
    assert register_encoder(cl, cfg, runs["byol"]) == "1"  # a rerun adds nothing
    tracking.register_artifact(cl, "study-spark", runs["spark"])  # a second encoder of the study
    listed = {f.path for f in cl.list_artifacts(runs["byol"], "encoder")}
    # the finetune / export files stay where they were, MLflow's model sits beside them
    assert {"encoder/encoder.pt", "encoder/encoder_config.json", "encoder/MLmodel"} <= listed

    parent = cl.create_run(exp, run_name="study").info.run_id
    ctx = Context(study=SimpleNamespace(name="study"), address=None, tracking_uri=uri,
                  results={"pretrain-byol": {"encoder": "byol", "run_id": runs["byol"]},
                           "pretrain-spark": {"encoder": "spark", "run_id": runs["spark"]},
                           "finetune": {"parent_run_id": parent}})
    # byol best at the smallest size (n5), spark at all data; random is no registered encoder
    first = _alias_best(ctx, _summary(tmp_path / "s1.csv", {("random", "n5"): 0.9, ("byol", "n5"): 0.7,
                                                             ("spark", "n5"): 0.6, ("spark", "all"): 0.95,
                                                             ("byol", "all"): 0.8}))
    assert first["best_at_smallest"] == {"size": "n5", "encoder": "byol", "auc_mean": 0.7,
                                         "model_uri": "models:/study-byol@best-at-n5"}
    assert cl.get_model_version_by_alias("study-byol", "best-at-n5").run_id == runs["byol"]

    mlflow.set_tracking_uri(uri)
    try:
        import mlflow.pytorch

        module = mlflow.pytorch.load_model("models:/study-byol@best-at-n5")
    finally:
        mlflow.set_tracking_uri(None)
    assert isinstance(module, torch.nn.Module)
    x = torch.cat([encoder.x, encoder.x.flip(0)])  # another batch size than the example's
    with torch.no_grad():
        torch.testing.assert_close(module(x), encoder.module(x), **TOL)

    # the study rerun finds spark better at n5: the alias moves, no other encoder keeps it
    second = _alias_best(ctx, _summary(tmp_path / "s2.csv", {("byol", "n5"): 0.6, ("spark", "n5"): 0.75,
                                                              ("spark", "n10"): 0.8}))
    assert second["best_at_smallest"]["model_uri"] == "models:/study-spark@best-at-n5"
    assert "best-at-n5" not in cl.get_registered_model("study-byol").aliases
    assert cl.get_model_version_by_alias("study-spark", "best-at-n5").run_id == runs["spark"]
    assert cl.get_run(parent).data.tags["best_encoder_at_n5"] == "models:/study-spark@best-at-n5"
    assert "best mean AUC at n5: spark (0.750)" in capsys.readouterr().out

    # ctssl export reads the registered version the alias names
    out = tmp_path / "from-registry"
    assert main(["export", "models:/study-spark@best-at-n5", "--tracking-uri", uri, "--out", str(out)]) == 0
    state = torch.load(out / "encoder_timm.pt", weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in export_encoder_state_dict(other).items())


def _error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ": error: " in ln]
    assert len(lines) == 1, lines
    return lines[0]


def test_bad_sources_are_one_line_naming_the_input(encoder, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "out")
    assert _error(["export", str(tmp_path / "nothing.pt"), "--out", out], capsys) == \
        f"ctssl export: error: {tmp_path / 'nothing.pt'}: not found"
    (tmp_path / "empty").mkdir()
    assert "no encoder.pt here nor in a checkpoint_* folder" in _error(["export", str(tmp_path / "empty"),
                                                                        "--out", out], capsys)
    (tmp_path / "notes.pt").write_text("not weights")
    assert _error(["export", str(tmp_path / "notes.pt"), "--out", out], capsys).endswith(
        "notes.pt: not an encoder state dict (not a file written by torch.save)")
    odd = tmp_path / "odd"
    odd.mkdir()
    torch.save(export_encoder_state_dict(encoder.module), odd / "encoder.pt")
    (odd / "encoder_config.json").write_text(json.dumps({"backbone": "resnet_from_elsewhere", "in_chans": 1}))
    assert _error(["export", str(odd), "--out", out], capsys) == (
        f"ctssl export: error: {odd}: unknown architecture 'resnet_from_elsewhere' named by its "
        "encoder_config.json (not a timm model)")
    assert "does not fit timm model 'resnet34'" in _error(["export", str(encoder.folder), "--backbone", "resnet34",
                                                           "--out", out], capsys)
    monkeypatch.setattr("ssl_core.export.onnx_missing", lambda: ["onnx", "onnxscript"])  # as where neither is
    assert _error(["export", str(encoder.folder), "--out", out, "--onnx"], capsys) == (
        "ctssl export: error: --onnx needs the onnx and onnxscript package(s) (pip install onnx onnxscript); "
        "nothing written")
    assert not (tmp_path / "out").exists()
