"""The Kubernetes objects of a study (prep Job, RayJobs), built from a resolved experiment config.

This mirrors ``charts/ctssl/templates/`` object for object: the chart tests render the chart, read
back its experiment ConfigMap, build the objects here from it and require identical specs. So
``ctssl k8s submit`` creates what ``helm install`` would, security contexts and waits included.
"""

from __future__ import annotations

import copy
from typing import Any

from ray_jobs.k8s import stage_commands as sc

RAYJOB_API = "ray.io/v1"
COMPONENT_LABEL = "app.kubernetes.io/component"
INSTANCE_LABEL = "app.kubernetes.io/instance"
METHOD_LABEL = "ctssl.io/method"
MLFLOW_EXPERIMENT_ANNOTATION = "ctssl.io/mlflow-experiment"
HEAD_PORTS = [
    {"containerPort": 6379, "name": "gcs-server"},
    {"containerPort": 8265, "name": "dashboard"},
    {"containerPort": 10001, "name": "client"},
]


def selector_labels(cfg: dict[str, Any]) -> dict[str, str]:
    return {"app.kubernetes.io/name": "ctssl", INSTANCE_LABEL: cfg["name"]}


def labels(cfg: dict[str, Any], component: str, method: str | None = None) -> dict[str, str]:
    out = {**selector_labels(cfg), COMPONENT_LABEL: component, "app.kubernetes.io/part-of": "ctssl"}
    if method:
        out[METHOD_LABEL] = method
    return out


def pod_security_context(cfg: dict[str, Any]) -> dict[str, Any]:
    s = cfg["securityContext"]
    return {"runAsNonRoot": True, "runAsUser": s["runAsUser"], "runAsGroup": s["runAsGroup"],
            "fsGroup": s["fsGroup"], "seccompProfile": {"type": "RuntimeDefault"}}


#: the image user's cache folder: the image bakes numba's compiled kernels into it
CACHE_DIR = "/home/ray/.cache"


def container_security_context() -> dict[str, Any]:
    """Pod Security "restricted", and a read-only root filesystem: only mounted volumes are writable."""
    return {"allowPrivilegeEscalation": False, "privileged": False, "readOnlyRootFilesystem": True,
            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


def image(cfg: dict[str, Any]) -> str:
    """``repository@digest`` when a digest is pinned (a moved tag cannot change what runs), else ``:tag``."""
    img = cfg["image"]
    if img.get("digest"):
        return f"{img['repository']}@{img['digest']}"
    return f"{img['repository']}:{img['tag']}"


def storage_env(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """S3 credentials (from a Secret, never inline), endpoint and MLflow location for every container."""
    s = cfg["storage"]
    env: list[dict[str, Any]] = []
    if s["credentialsSecret"]:
        env += [
            {"name": "AWS_ACCESS_KEY_ID",
             "valueFrom": {"secretKeyRef": {"name": s["credentialsSecret"], "key": s["accessKeyIdKey"]}}},
            {"name": "AWS_SECRET_ACCESS_KEY",
             "valueFrom": {"secretKeyRef": {"name": s["credentialsSecret"], "key": s["secretAccessKeyKey"]}}},
        ]
    env.append({"name": "AWS_DEFAULT_REGION", "value": s["region"]})
    if s["endpoint"]:
        env += [{"name": "AWS_ENDPOINT_URL", "value": s["endpoint"]},
                {"name": "CTSSL_S3_ENDPOINT_URL", "value": s["endpoint"]},
                {"name": "MLFLOW_S3_ENDPOINT_URL", "value": s["endpoint"]}]
    m = cfg["mlflow"]
    env.append({"name": "MLFLOW_TRACKING_URI", "value": m["trackingUri"]})
    if m["credentialsSecret"]:  # MLflow's basic-auth login of the jobs
        env += [
            {"name": "MLFLOW_TRACKING_USERNAME",
             "valueFrom": {"secretKeyRef": {"name": m["credentialsSecret"], "key": m["usernameKey"]}}},
            {"name": "MLFLOW_TRACKING_PASSWORD",
             "valueFrom": {"secretKeyRef": {"name": m["credentialsSecret"], "key": m["passwordKey"]}}},
        ]
    return env


def _pod_spec_common(cfg: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "serviceAccountName": cfg["serviceAccountName"],
        "automountServiceAccountToken": False,
        "securityContext": pod_security_context(cfg),
    }
    if cfg["imagePullSecrets"]:
        spec["imagePullSecrets"] = [{"name": n} for n in cfg["imagePullSecrets"]]
    return spec


def _container(cfg: dict[str, Any], name: str, resources: dict[str, Any], *, cache: bool = False,
               mounts: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A ctssl container. The root filesystem is read-only, so /tmp (Ray's /tmp/ray included) is an
    emptyDir, and with ``cache`` so is ~/.cache (numba's kernels, seeded by :func:`_seed_cache`)."""
    vm = [{"name": "tmp", "mountPath": "/tmp"}]
    if cache:
        vm.append({"name": "cache", "mountPath": CACHE_DIR})
    vm += copy.deepcopy(mounts or [])
    return {"name": name, "image": image(cfg), "imagePullPolicy": cfg["image"]["pullPolicy"],
            "env": storage_env(cfg), "resources": copy.deepcopy(resources),
            "securityContext": container_security_context(), "volumeMounts": vm}


def _seed_cache(cfg: dict[str, Any]) -> dict[str, Any]:
    """Copies the image's ~/.cache into the writable "cache" emptyDir before the pod's other containers
    start: numba only uses a cache folder it can write to, so the image's read-only copy of the
    compiled kernels would make them fail to load; the copy keeps them (no compile per process)."""
    c = _container(cfg, "seed-cache", cfg["ray"]["initResources"], mounts=[{"name": "cache", "mountPath": "/seed"}])
    del c["env"]
    c["command"] = ["sh", "-c", f"cp -a {CACHE_DIR}/. /seed/ 2>/dev/null || true"]
    return c


def _writable_volumes(cache: bool = False) -> list[dict[str, Any]]:
    return [{"name": "tmp", "emptyDir": {}}] + ([{"name": "cache", "emptyDir": {}}] if cache else [])


# ------------------------------------------------------------------------------------------ prep Job
def prep_job(cfg: dict[str, Any]) -> dict[str, Any]:
    p = cfg["prep"]
    key_mount = [{"name": "deid-key", "mountPath": sc.DEID_KEY_DIR, "readOnly": True}] if p["deidKeySecret"] else []
    container = _container(cfg, "prep", p["resources"], cache=True, mounts=key_mount)
    container["command"] = sc.prep_argv(cfg)
    container["env"] = [{"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {
        "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}}] + container["env"]
    pod = _pod_spec_common(cfg)
    pod["restartPolicy"] = "Never"
    # the bucket may still be being created (bundled MinIO) or the upload still running
    pod["initContainers"] = [_seed_cache(cfg),
                             _wait_container(cfg, "wait-for-source", sc.wait_argv([p["source"]], "file", cfg))]
    pod["containers"] = [container]
    pod["volumes"] = _writable_volumes(cache=True)
    if p["deidKeySecret"]:
        pod["volumes"].append({"name": "deid-key", "secret": {"secretName": p["deidKeySecret"], "defaultMode": 256}})
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": f"{cfg['name']}-prep", "labels": labels(cfg, "prep")},
        "spec": {
            "completionMode": "Indexed",
            "completions": p["numShards"],
            "parallelism": p["parallelism"],
            "backoffLimitPerIndex": p["backoffLimitPerIndex"],
            "ttlSecondsAfterFinished": p["ttlSecondsAfterFinished"],
            "template": {"metadata": {"labels": labels(cfg, "prep")}, "spec": pod},
        },
    }


# ------------------------------------------------------------------------------------------- RayJobs
def _wait_container(cfg: dict[str, Any], name: str, argv: list[str]) -> dict[str, Any]:
    c = _container(cfg, name, cfg["ray"]["initResources"])
    c["command"] = argv
    return c


def _shm(size: str) -> dict[str, Any]:
    return {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": size}}


def ray_cluster_spec(cfg: dict[str, Any], component: str, method: str | None,
                     waits: list[tuple[str, list[str]]], with_workers: bool = True) -> dict[str, Any]:
    """A CPU head (which waits for the stage's inputs in init containers) and one worker group,
    GPU when ``ray.workers.gpus`` > 0. ``/dev/shm`` is a memory emptyDir: Ray's object store and
    PyTorch's DataLoader need far more than the container runtime's 64 MiB default."""
    head, workers = cfg["ray"]["head"], cfg["ray"]["workers"]
    shm_mount = [{"name": "dshm", "mountPath": "/dev/shm"}]
    head_container = _container(cfg, "ray-head", head["resources"], cache=True, mounts=shm_mount)
    head_container["ports"] = copy.deepcopy(HEAD_PORTS)
    head_pod = _pod_spec_common(cfg)
    head_pod["initContainers"] = [_seed_cache(cfg)] + [_wait_container(cfg, n, a) for n, a in waits]
    head_pod["containers"] = [head_container]
    head_pod["volumes"] = _writable_volumes(cache=True) + [_shm(head["shmSize"])]
    head_params = {"dashboard-host": "0.0.0.0"}
    if with_workers:
        head_params["num-cpus"] = str(head["numCpus"])
    spec: dict[str, Any] = {
        "rayVersion": cfg["ray"]["version"],
        "enableInTreeAutoscaling": False,
        "headGroupSpec": {
            "rayStartParams": head_params,
            "template": {"metadata": {"labels": {**labels(cfg, component, method), "ctssl.io/ray-node": "head"}},
                         "spec": head_pod},
        },
    }
    if not with_workers:
        return spec
    worker_container = _container(cfg, "ray-worker", workers["resources"], cache=True, mounts=shm_mount)
    if workers["gpus"] > 0:
        worker_container["resources"].setdefault("limits", {})["nvidia.com/gpu"] = workers["gpus"]
    worker_pod = _pod_spec_common(cfg)
    worker_pod["initContainers"] = [_seed_cache(cfg)]
    worker_pod["containers"] = [worker_container]
    worker_pod["volumes"] = _writable_volumes(cache=True) + [_shm(workers["shmSize"])]
    if workers["nodeSelector"]:
        worker_pod["nodeSelector"] = copy.deepcopy(workers["nodeSelector"])
    if workers["tolerations"]:
        worker_pod["tolerations"] = copy.deepcopy(workers["tolerations"])
    spec["workerGroupSpecs"] = [{
        "groupName": worker_group_name(cfg),
        "replicas": workers["replicas"],
        "minReplicas": workers["replicas"],
        "maxReplicas": workers["replicas"],
        "rayStartParams": {},
        "template": {"metadata": {"labels": {**labels(cfg, component, method), "ctssl.io/ray-node": "worker"}},
                     "spec": worker_pod},
    }]
    return spec


def worker_group_name(cfg: dict[str, Any]) -> str:
    return "gpu-workers" if cfg["ray"]["workers"]["gpus"] > 0 else "cpu-workers"


def _submitter(cfg: dict[str, Any], component: str, method: str | None) -> dict[str, Any]:
    """KubeRay fills in the `ray job submit` command; we supply a pod that passes Pod Security."""
    pod = _pod_spec_common(cfg)
    pod["restartPolicy"] = "Never"
    c = _container(cfg, "ray-job-submitter", cfg["ray"]["submitter"]["resources"])
    del c["env"]
    pod["containers"] = [c]
    pod["volumes"] = _writable_volumes()
    return {"metadata": {"labels": {**labels(cfg, component, method), "ctssl.io/ray-node": "submitter"}},
            "spec": pod}


def rayjob(cfg: dict[str, Any], name: str, component: str, method: str | None, entrypoint: str,
           waits: list[tuple[str, list[str]]], mlflow_experiment: str, with_workers: bool = True) -> dict[str, Any]:
    rj = cfg["rayJob"]
    metadata: dict[str, Any] = {"name": name, "labels": labels(cfg, component, method)}
    if mlflow_experiment:
        metadata["annotations"] = {MLFLOW_EXPERIMENT_ANNOTATION: mlflow_experiment}
    return {
        "apiVersion": RAYJOB_API,
        "kind": "RayJob",
        "metadata": metadata,
        "spec": {
            "entrypoint": entrypoint,
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": rj["shutdownAfterJobFinishes"],
            "ttlSecondsAfterFinished": rj["ttlSecondsAfterFinished"],
            "activeDeadlineSeconds": rj["activeDeadlineSeconds"],
            "backoffLimit": rj["backoffLimit"],
            "submitterPodTemplate": _submitter(cfg, component, method),
            "rayClusterSpec": ray_cluster_spec(cfg, component, method, waits, with_workers),
        },
    }


def reduce_rayjob(cfg: dict[str, Any]) -> dict[str, Any]:
    waits = [("wait-for-shards", sc.wait_argv([cfg["prep"]["output"]], "manifest", cfg))]
    return rayjob(cfg, f"{cfg['name']}-reduce", "reduce", None, sc.shell_join(sc.reduce_argv(cfg)), waits,
                  mlflow_experiment=sc.reduce_experiment(cfg), with_workers=False)


def pretrain_rayjob(cfg: dict[str, Any], method: str) -> dict[str, Any]:
    waits = [("wait-for-data", sc.wait_argv([sc.pretrain_input(cfg)], "manifest", cfg))]
    return rayjob(cfg, f"{cfg['name']}-pretrain-{method}", "pretrain", method,
                  sc.shell_join(sc.pretrain_argv(cfg, method)), waits, sc.experiment_name(cfg, method))


def finetune_rayjob(cfg: dict[str, Any]) -> dict[str, Any]:
    steps = []
    if cfg["finetune"]["enabled"]:
        steps.append(sc.shell_join(sc.finetune_argv(cfg)))
    if cfg["report"]["enabled"]:
        steps.append(sc.shell_join(sc.report_argv(cfg)))
    waits: list[tuple[str, list[str]]] = []
    methods = cfg["pretrain"]["methods"]
    if cfg["finetune"]["enabled"]:
        waits.append(("wait-for-data", sc.wait_argv([cfg["finetune"]["data"]], "manifest", cfg)))
    if cfg["finetune"]["enabled"] and methods:
        waits.append(("wait-for-checkpoints",
                      sc.wait_argv([sc.checkpoint_url(cfg, m) for m in methods], "checkpoint", cfg)))
    return rayjob(cfg, f"{cfg['name']}-finetune", "finetune", None, " && ".join(steps), waits,
                  sc.study_name(cfg))


def build_objects(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Every stage object of the study, in the order the stages run."""
    objs: list[dict[str, Any]] = []
    if cfg["prep"]["enabled"]:
        objs.append(prep_job(cfg))
    if cfg["reduce"]["enabled"]:
        objs.append(reduce_rayjob(cfg))
    objs += [pretrain_rayjob(cfg, m) for m in cfg["pretrain"]["methods"]]
    if cfg["finetune"]["enabled"] or cfg["report"]["enabled"]:
        objs.append(finetune_rayjob(cfg))
    return objs
