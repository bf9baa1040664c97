"""The experiment config: one YAML document that says what a study on Kubernetes runs.

The Helm chart renders it (fully resolved) into the ``<name>-experiment`` ConfigMap, and
``ctssl k8s submit`` reads the same document to create the same Job and RayJobs without Helm.
Keeping one document as the contract between the two is what lets a test prove that the chart and
the Python builder (:mod:`ray_jobs.k8s.objects`) produce identical objects.

Every key has a default here that mirrors ``charts/ctssl/values.yaml``; :func:`resolve` fills the
defaults in, derives the stage URLs from ``storage.root`` and rejects bad values with a message that
names the key.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

from ray_jobs.errors import CLIError

# The pre-training methods the chart and `ctssl pretrain` know (a test checks them against the CLI).
METHODS = ("byol", "mocov2", "swav", "spark")
# KubeRay derives RayCluster / Service names from the RayJob name and limits RayJob names to 47
# characters; "<name>-pretrain-mocov2" must fit.
MAX_NAME_LEN = 30
_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_URL_RE = re.compile(r"^(s3://|file://|/)\S+$")
_DIGEST_RE = re.compile(r"^sha256:[a-f0-9]{64}$")
_QUANTITY_RE = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|M|G|T)?$")

DEFAULTS: dict[str, Any] = {
    "name": "ctssl",
    "image": {"repository": "ctssl", "tag": "0.1.0", "digest": "", "pullPolicy": "IfNotPresent"},
    "imagePullSecrets": [],
    "serviceAccountName": "ctssl",
    "securityContext": {"runAsUser": 1000, "runAsGroup": 100, "fsGroup": 100},
    "storage": {
        "root": "",
        "endpoint": "",
        "region": "us-east-1",
        "credentialsSecret": "",
        "accessKeyIdKey": "AWS_ACCESS_KEY_ID",
        "secretAccessKeyKey": "AWS_SECRET_ACCESS_KEY",
    },
    # credentialsSecret None: the chart's auth Secret "<name>-mlflow-auth" when the tracking URI is the
    # chart's own server (derived below), else none; "" = the server needs no login
    "mlflow": {"trackingUri": "", "credentialsSecret": None, "usernameKey": "username", "passwordKey": "password"},
    "waitFor": {"timeoutSeconds": 86400, "pollSeconds": 30},
    "prep": {
        "enabled": True,
        "source": "",
        "sourceType": "dicom",
        "output": "",
        "numShards": 4,
        "parallelism": 2,
        "workers": 1,
        "size": 256,
        "dataset": "",
        "labels": "",
        "deidKeySecret": "",
        "deidKeyKey": "deid-key",
        "extraArgs": [],
        "backoffLimitPerIndex": 2,
        "ttlSecondsAfterFinished": 86400,
        "resources": {"requests": {"cpu": "1", "memory": "4Gi"}, "limits": {"cpu": "2", "memory": "8Gi"}},
    },
    "reduce": {"enabled": False, "strategy": "hash", "output": "", "extraArgs": []},
    "pretrain": {
        "methods": list(METHODS),
        "data": "",
        "backbone": "resnet50",
        "epochs": 100,
        "batchSize": 256,
        "cpusPerWorker": 1,
        "storage": "",
        "extraArgs": [],
    },
    "finetune": {
        "enabled": True,
        "data": "",
        "output": "",
        "folds": 5,
        "reductions": "0,25,50,75,90",
        "samplesPerClass": "",
        "cpusPerTrial": 1,
        "gpusPerTrial": 0,
        "extraArgs": [],
    },
    "report": {"enabled": True, "output": "", "extraArgs": []},
    "rayJob": {
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": 3600,
        "activeDeadlineSeconds": 604800,
        "backoffLimit": 1,
    },
    "ray": {
        "version": "2.60.0",
        "head": {
            "numCpus": "0",
            "shmSize": "2Gi",
            "resources": {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"cpu": "2", "memory": "8Gi"}},
        },
        "workers": {
            "replicas": 2,
            "gpus": 1,
            "shmSize": "16Gi",
            "resources": {"requests": {"cpu": "8", "memory": "48Gi"}, "limits": {"cpu": "8", "memory": "48Gi"}},
            "nodeSelector": {},
            "tolerations": [],
        },
        "submitter": {
            "resources": {"requests": {"cpu": "200m", "memory": "512Mi"},
                          "limits": {"cpu": "500m", "memory": "1Gi"}},
        },
        "initResources": {"requests": {"cpu": "100m", "memory": "256Mi"},
                          "limits": {"cpu": "500m", "memory": "512Mi"}},
    },
}


def _merge(base: dict[str, Any], over: dict[str, Any], where: str) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if key not in base:
            raise CLIError(f"{where}{key}: unknown key (known: {', '.join(sorted(base))})")
        # free-form maps (resources, nodeSelector) are taken whole, not merged key by key
        if isinstance(base[key], dict) and isinstance(value, dict) and base[key] and \
                key not in ("resources", "nodeSelector"):
            out[key] = _merge(base[key], value, f"{where}{key}.")
        else:
            out[key] = copy.deepcopy(value)
    return out


def _require(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise CLIError(f"experiment config: {key}: {msg}")


def _positive_int(cfg: dict[str, Any], key: str, minimum: int = 1) -> None:
    node: Any = cfg
    for part in key.split("."):
        node = node[part]
    _require(isinstance(node, int) and not isinstance(node, bool) and node >= minimum, key,
             f"must be an integer >= {minimum}, got {node!r}")


def _check_url(value: str, key: str) -> None:
    _require(isinstance(value, str) and bool(_URL_RE.match(value)) and "'" not in value, key,
             f"must be an s3://, file:// or absolute path URL without spaces or quotes, got {value!r}")


def resolve(raw: dict[str, Any] | None) -> dict[str, Any]:
    """Defaults filled in, stage URLs derived, every value checked; idempotent."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise CLIError(f"experiment config: must be a mapping, got {type(raw).__name__}")
    cfg = _merge(DEFAULTS, raw, "experiment config: ")

    name = cfg["name"]
    _require(isinstance(name, str) and bool(_NAME_RE.match(name)) and len(name) <= MAX_NAME_LEN, "name",
             f"must be a DNS label of at most {MAX_NAME_LEN} characters, got {name!r}")
    root = str(cfg["storage"]["root"]).rstrip("/")
    _require(bool(root), "storage.root", "is required (the bucket folder every stage writes under, "
             "e.g. s3://my-bucket/study1)")
    _check_url(root, "storage.root")
    cfg["storage"]["root"] = root

    prep, reduce, pre, ft = cfg["prep"], cfg["reduce"], cfg["pretrain"], cfg["finetune"]
    prep["output"] = prep["output"] or f"{root}/shards"
    reduce["output"] = reduce["output"] or f"{root}/selection"
    pre["data"] = pre["data"] or prep["output"]
    pre["storage"] = pre["storage"] or f"{root}/pretrain"
    ft["output"] = ft["output"] or f"{root}/finetune"
    cfg["report"]["output"] = cfg["report"]["output"] or f"{root}/report"

    if prep["enabled"]:
        _require(bool(prep["source"]), "prep.source", "is required when prep.enabled (the DICOM folder or bucket)")
        _check_url(prep["source"], "prep.source")
        _positive_int(cfg, "prep.numShards")
        _positive_int(cfg, "prep.parallelism")
        _positive_int(cfg, "prep.workers")
        _positive_int(cfg, "prep.size", 8)
    for key, url in (("prep.output", prep["output"]), ("reduce.output", reduce["output"]),
                     ("pretrain.data", pre["data"]), ("pretrain.storage", pre["storage"]),
                     ("finetune.output", ft["output"]), ("report.output", cfg["report"]["output"])):
        _check_url(url, key)

    methods = pre["methods"]
    _require(isinstance(methods, list), "pretrain.methods", "must be a list")
    for m in methods:
        _require(m in METHODS, "pretrain.methods", f"unknown method {m!r}; known: {', '.join(METHODS)}")
    _require(len(set(methods)) == len(methods), "pretrain.methods", f"lists a method twice: {methods}")
    _positive_int(cfg, "pretrain.epochs")
    _positive_int(cfg, "pretrain.batchSize")
    if ft["enabled"]:
        _require(bool(ft["data"]), "finetune.data", "is required when finetune.enabled (labelled prep output URL)")
        _check_url(ft["data"], "finetune.data")
        _positive_int(cfg, "finetune.folds", 2)
    _positive_int(cfg, "ray.workers.replicas")
    _positive_int(cfg, "ray.workers.gpus", 0)
    _positive_int(cfg, "rayJob.backoffLimit", 0)
    _positive_int(cfg, "rayJob.ttlSecondsAfterFinished", 0)
    _positive_int(cfg, "rayJob.activeDeadlineSeconds")
    _positive_int(cfg, "waitFor.timeoutSeconds")
    _positive_int(cfg, "waitFor.pollSeconds")
    for key in ("ray.head.shmSize", "ray.workers.shmSize"):
        node: Any = cfg
        for part in key.split("."):
            node = node[part]
        _require(isinstance(node, str) and bool(_QUANTITY_RE.match(node)), key,
                 f"must be a Kubernetes quantity such as 2Gi, got {node!r}")
    digest = cfg["image"]["digest"]
    _require(digest == "" or (isinstance(digest, str) and bool(_DIGEST_RE.match(digest))), "image.digest",
             f"must be empty or sha256:<64 lowercase hex digits>, got {digest!r}")
    own_server = not cfg["mlflow"]["trackingUri"]
    if own_server:
        cfg["mlflow"]["trackingUri"] = f"http://{name}-mlflow:5000"
    if cfg["mlflow"]["credentialsSecret"] is None:
        cfg["mlflow"]["credentialsSecret"] = f"{name}-mlflow-auth" if own_server else ""
    return cfg


def load(path: str | Path) -> dict[str, Any]:
    """Read and resolve an experiment config file; errors name the file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise CLIError(f"{p}: cannot read experiment config ({e.strerror})") from e
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise CLIError(f"{p}: not valid YAML ({e})") from e
    try:
        return resolve(raw)
    except CLIError as e:
        raise CLIError(f"{p}: {e}") from e
