"""The command lines each stage runs in the cluster, built from a resolved experiment config.

The chart's ``_commands.tpl`` builds the same argv lists; the chart tests render both and parse every
one with the real ``ctssl`` parser, so the CLI, the chart and ``ctssl k8s submit`` cannot drift apart.
"""

from __future__ import annotations

import re
from typing import Any

# Kubernetes expands $(VAR) in a container's command from its env: each Indexed Job pod gets its index.
JOB_INDEX_REF = "$(JOB_COMPLETION_INDEX)"
DEID_KEY_DIR = "/etc/ctssl/deid"
_SAFE = re.compile(r"^[A-Za-z0-9_./:=@%+,-]+$")


def shell_quote(arg: str) -> str:
    """Single-quote only what needs it, so entrypoints stay readable in ``kubectl get rayjob -o yaml``."""
    return arg if _SAFE.match(arg) else "'" + arg.replace("'", "'\"'\"'") + "'"


def shell_join(argv: list[str]) -> str:
    return " ".join(shell_quote(str(a)) for a in argv)


def experiment_name(cfg: dict[str, Any], method: str) -> str:
    """Per-method run name: checkpoints under ``pretrain.storage/<it>`` and the MLflow experiment."""
    return f"{cfg['name']}-{method}"


def checkpoint_url(cfg: dict[str, Any], method: str) -> str:
    return f"{cfg['pretrain']['storage']}/{experiment_name(cfg, method)}"


def pretrain_input(cfg: dict[str, Any]) -> str:
    """The commit marker pre-training waits for: the selection when reduction runs, else the shards."""
    return cfg["reduce"]["output"] if cfg["reduce"]["enabled"] else cfg["pretrain"]["data"]


def train_workers(cfg: dict[str, Any]) -> tuple[int, int]:
    """(Ray Train workers, GPUs per worker): one worker per GPU, or one per pod on CPU-only groups."""
    w = cfg["ray"]["workers"]
    if w["gpus"] > 0:
        return w["replicas"] * w["gpus"], 1
    return w["replicas"], 0


def prep_argv(cfg: dict[str, Any]) -> list[str]:
    p = cfg["prep"]
    argv = ["ctssl", "prep", p["source"], p["output"], "--source", p["sourceType"],
            "--workers", str(p["workers"]), "--size", str(p["size"]),
            "--shard-index", JOB_INDEX_REF, "--num-shards", str(p["numShards"])]
    if p["dataset"]:
        argv += ["--dataset", p["dataset"]]
    if p["labels"]:
        argv += ["--labels", p["labels"]]
    if p["deidKeySecret"]:
        argv += ["--deid-key-file", f"{DEID_KEY_DIR}/{p['deidKeyKey']}"]
    return argv + [str(a) for a in p["extraArgs"]]


def reduce_argv(cfg: dict[str, Any]) -> list[str]:
    r = cfg["reduce"]
    return ["ctssl", "reduce", cfg["prep"]["output"], r["output"], "--strategy", r["strategy"],
            "--tracking-uri", cfg["mlflow"]["trackingUri"], "--experiment", reduce_experiment(cfg),
            *[str(a) for a in r["extraArgs"]]]


def reduce_experiment(cfg: dict[str, Any]) -> str:
    """MLflow experiment of the reduction report (kept fraction, threshold, per-volume counts)."""
    return f"{cfg['name']}-reduce"


def pretrain_argv(cfg: dict[str, Any], method: str) -> list[str]:
    p = cfg["pretrain"]
    workers, gpus = train_workers(cfg)
    argv = ["ctssl", "pretrain", "--method", method, "--data", p["data"]]
    if cfg["reduce"]["enabled"]:
        argv += ["--selection", cfg["reduce"]["output"]]
    argv += ["--backbone", p["backbone"], "--workers", str(workers)]
    if gpus:
        argv += ["--gpus-per-worker", str(gpus)]
    argv += ["--cpus-per-worker", str(p["cpusPerWorker"]), "--epochs", str(p["epochs"]),
             "--batch-size", str(p["batchSize"]), "--storage", p["storage"],
             "--experiment", experiment_name(cfg, method), "--address", "auto",
             "--tracking-uri", cfg["mlflow"]["trackingUri"]]
    return argv + [str(a) for a in p["extraArgs"]]


def wait_argv(urls: list[str], what: str, cfg: dict[str, Any]) -> list[str]:
    w = cfg["waitFor"]
    return ["ctssl", "wait-for", *urls, "--what", what, "--timeout", str(w["timeoutSeconds"]),
            "--poll", str(w["pollSeconds"])]


def study_name(cfg: dict[str, Any]) -> str:
    """The fine-tuning study's name: its MLflow experiment, read back by ``ctssl report``."""
    return f"{cfg['name']}-finetune"


def finetune_argv(cfg: dict[str, Any]) -> list[str]:
    f = cfg["finetune"]
    argv = ["ctssl", "finetune", "--data", f["data"], "--encoder", "random"]
    for method in cfg["pretrain"]["methods"]:
        argv += ["--encoder", f"{method}={checkpoint_url(cfg, method)}"]
    argv += ["--backbone", cfg["pretrain"]["backbone"]]
    if f["samplesPerClass"]:
        argv += ["--samples-per-class", str(f["samplesPerClass"])]
    else:
        argv += ["--reductions", str(f["reductions"])]
    argv += ["--folds", str(f["folds"]), "--cpus-per-trial", str(f["cpusPerTrial"]),
             "--gpus-per-trial", str(f["gpusPerTrial"]), "--storage", f["output"],
             "--experiment", study_name(cfg), "--address", "auto", "--tracking-uri", cfg["mlflow"]["trackingUri"]]
    return argv + [str(a) for a in f["extraArgs"]]


def report_argv(cfg: dict[str, Any]) -> list[str]:
    r = cfg["report"]
    return ["ctssl", "report", "--experiment", study_name(cfg), "--tracking-uri", cfg["mlflow"]["trackingUri"],
            "--out", r["output"], *[str(a) for a in r["extraArgs"]]]
