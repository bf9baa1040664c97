"""``ctssl k8s``: run and follow a study on Kubernetes without Helm.

``submit`` creates the prep Job and RayJobs of an experiment config (the same objects the chart
renders, from :mod:`ray_jobs.k8s.objects`); ``status`` prints the release's table; ``logs`` and
``cancel`` act on one stage. Configuration: the in-cluster service account inside a pod, else the
kubeconfig (``--kubeconfig``, ``$KUBECONFIG``, ``~/.kube/config``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml

from ray_jobs import experiment_config
from ray_jobs.errors import CLIError

NAME = "k8s"
HELP = "submit / follow / cancel a study on Kubernetes (KubeRay RayJobs, no Helm needed)"
DESCRIPTION = """\
  ctssl k8s submit -f experiment.yaml -n ml          create the prep Job and RayJobs
  ctssl k8s submit -f experiment.yaml --dry-run      print them as YAML instead
  ctssl k8s status --release study -n ml --mlflow-url http://localhost:5000
  ctssl k8s logs study-pretrain-byol -n ml --follow
  ctssl k8s cancel study-pretrain-swav -n ml         (or --release study for every stage)

The experiment config is the document the chart stores in the <release>-experiment ConfigMap:
  kubectl get cm study-experiment -o jsonpath='{.data.experiment\\.yaml}' > experiment.yaml
"""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--namespace", help="namespace (default: the kubeconfig context's, else default)")
    p.add_argument("--kubeconfig", metavar="FILE", help="kubeconfig file (default $KUBECONFIG or ~/.kube/config)")
    p.add_argument("--context", help="kubeconfig context (default: the current one)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="k8s_command", metavar="ACTION", required=True)
    s = sub.add_parser("submit", help="create the prep Job and RayJobs of an experiment config")
    s.add_argument("-f", "--config", required=True, metavar="FILE", help="experiment config (YAML)")
    s.add_argument("--name", help="override the config's name: object names and run / MLflow experiment names "
                   "(the storage URLs stay as the config says)")
    s.add_argument("--dry-run", action="store_true", help="print the objects as YAML; contact no cluster")
    _common(s)
    st = sub.add_parser("status", help="table of a release's prep Job and RayJobs")
    st.add_argument("--release", required=True, metavar="NAME", help="release / experiment name")
    st.add_argument("--mlflow-url", metavar="URL",
                    help="MLflow UI base URL for run links, e.g. http://localhost:5000 after a port-forward")
    _common(st)
    lg = sub.add_parser("logs", help="logs of a RayJob (its driver) or of the prep Job")
    lg.add_argument("name", help="RayJob or Job name, e.g. study-pretrain-byol")
    lg.add_argument("--tail", type=int, metavar="N", help="only the last N lines per container")
    lg.add_argument("-f", "--follow", action="store_true", help="stream the main container's log")
    _common(lg)
    c = sub.add_parser("cancel", help="delete RayJobs / Jobs (KubeRay stops the Ray job and its cluster)")
    c.add_argument("names", nargs="*", help="RayJob or Job names")
    c.add_argument("--release", metavar="NAME", help="every stage object of this release")
    _common(c)


def _connect(args: argparse.Namespace):
    from ray_jobs.k8s.api import KubeAPI

    return KubeAPI.connect(args.kubeconfig, args.context, args.namespace)


# ------------------------------------------------------------------------------------------- submit
def _service_account(cfg: dict[str, Any]) -> dict[str, Any]:
    from ray_jobs.k8s.objects import labels

    return {"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": cfg["serviceAccountName"], "labels": labels(cfg, "identity")},
            "automountServiceAccountToken": False}


def submit(args: argparse.Namespace) -> int:
    from ray_jobs.k8s.api import SERVICE_ACCOUNT, KubeAPIError
    from ray_jobs.k8s.objects import build_objects

    raw = experiment_config.load(args.config)
    if args.name:
        raw["name"] = args.name
        raw = experiment_config.resolve(raw)
    objs = build_objects(raw)
    if args.dry_run:
        print(yaml.safe_dump_all(objs, sort_keys=False), end="")
        return 0
    api = _connect(args)
    try:
        api.get(SERVICE_ACCOUNT, raw["serviceAccountName"])
    except KubeAPIError as e:
        if e.status != 404:
            raise
        api.create(_service_account(raw))
        print(f"created ServiceAccount {api.namespace}/{raw['serviceAccountName']}")
    created: list[str] = []
    for obj in objs:
        try:
            api.create(obj)
        except KubeAPIError as e:
            done = f" (already created: {', '.join(created)})" if created else ""
            raise KubeAPIError(f"{e}{done}", e.status) from e
        created.append(f"{obj['kind']} {obj['metadata']['name']}")
        print(f"created {obj['kind']} {api.namespace}/{obj['metadata']['name']}")
    print(f"follow it: ctssl k8s status --release {raw['name']} -n {api.namespace}")
    return 0


# ------------------------------------------------------------------------------------------- status
def status(args: argparse.Namespace) -> int:
    from ray_jobs.k8s.api import JOB, RAYJOB
    from ray_jobs.k8s.mlflow_links import MLflowLinks
    from ray_jobs.k8s.objects import INSTANCE_LABEL
    from ray_jobs.k8s.status import render_table, rows

    api = _connect(args)
    selector = f"{INSTANCE_LABEL}={args.release}"
    jobs = [j for j in api.list(JOB, selector)
            if (j["metadata"].get("labels") or {}).get("app.kubernetes.io/component") == "prep"]
    rayjobs = api.list(RAYJOB, selector)
    if not jobs and not rayjobs:
        raise CLIError(f"no prep Job or RayJobs of release {args.release!r} in namespace {api.namespace} "
                       f"(label {selector}); check -n / --release")
    links = MLflowLinks(args.mlflow_url).link if args.mlflow_url else None
    print(render_table(rows(jobs, rayjobs, links)))
    if not args.mlflow_url:
        print(f"\nrun links: kubectl -n {api.namespace} port-forward svc/{args.release}-mlflow 5000:5000, "
              "then add --mlflow-url http://localhost:5000")
    return 0


# --------------------------------------------------------------------------------------------- logs
def _pods_of(api, name: str) -> tuple[str, list[dict[str, Any]]]:
    """(what, pods) whose logs tell the story of object ``name``: the RayJob's submitter (it tails the
    driver), else its head (init containers show the wait for input); or the Job's pods."""
    from ray_jobs.k8s.api import JOB, POD, RAYJOB, KubeAPIError

    try:
        rj = api.get(RAYJOB, name)
    except KubeAPIError as e:
        if e.status != 404:
            raise
        rj = None
    if rj is not None:
        pods = api.list(POD, f"batch.kubernetes.io/job-name={name}")
        if pods:
            return "submitter", pods
        cluster = (rj.get("status") or {}).get("rayClusterName")
        if cluster:
            return "head", api.list(POD, f"ray.io/cluster={cluster},ray.io/node-type=head")
        return "none", []
    try:
        api.get(JOB, name)
    except KubeAPIError as e:
        if e.status == 404:
            raise CLIError(f"no RayJob or Job named {name!r} in namespace {api.namespace}") from e
        raise
    return "job", api.list(POD, f"batch.kubernetes.io/job-name={name}")


def logs(args: argparse.Namespace) -> int:
    api = _connect(args)
    what, pods = _pods_of(api, args.name)
    if not pods:
        print(f"{args.name}: no pods yet (the operator has not started its cluster); "
              f"try `ctssl k8s status` or again in a minute", file=sys.stderr)
        return 1
    # oldest first; --follow takes the newest (a retried submitter or head replaces the old pod)
    pods.sort(key=lambda p: (p["metadata"].get("creationTimestamp") or "", p["metadata"]["name"]))
    if args.follow:
        pod = pods[-1]
        container = pod["spec"]["containers"][0]["name"]
        print(f"==> {pod['metadata']['name']}/{container} (following) <==", flush=True)
        for chunk in api.follow_pod_log(pod["metadata"]["name"], container):
            sys.stdout.write(chunk.decode("utf-8", "replace"))
            sys.stdout.flush()
        return 0
    for pod in pods:
        spec = pod.get("spec") or {}
        for c in (spec.get("initContainers") or []) + (spec.get("containers") or []):
            print(f"==> {pod['metadata']['name']}/{c['name']} ({what}) <==")
            print(api.pod_log(pod["metadata"]["name"], c["name"], args.tail).rstrip("\n"))
    return 0


# ------------------------------------------------------------------------------------------- cancel
def cancel(args: argparse.Namespace) -> int:
    from ray_jobs.k8s.api import JOB, RAYJOB, KubeAPIError
    from ray_jobs.k8s.objects import INSTANCE_LABEL

    if not args.names and not args.release:
        raise CLIError("name the RayJobs / Jobs to cancel, or pass --release NAME for all of a release")
    api = _connect(args)
    targets: list[tuple[Any, str]] = []
    if args.release:
        sel = f"{INSTANCE_LABEL}={args.release}"
        targets += [(RAYJOB, o["metadata"]["name"]) for o in api.list(RAYJOB, sel)]
        targets += [(JOB, o["metadata"]["name"]) for o in api.list(JOB, sel)
                    if (o["metadata"].get("labels") or {}).get("app.kubernetes.io/component") == "prep"]
        if not targets:
            raise CLIError(f"release {args.release!r} has no RayJobs or prep Job in namespace {api.namespace}")
    for name in args.names:
        try:
            api.get(RAYJOB, name)
            targets.append((RAYJOB, name))
        except KubeAPIError as e:
            if e.status != 404:
                raise
            try:
                api.get(JOB, name)
            except KubeAPIError as e2:
                if e2.status == 404:
                    raise CLIError(f"no RayJob or Job named {name!r} in namespace {api.namespace}") from e2
                raise
            targets.append((JOB, name))
    for kind, name in targets:
        api.delete(kind, name)
        print(f"deleted {kind.kind} {api.namespace}/{name}")
    return 0


ACTIONS = {"submit": submit, "status": status, "logs": logs, "cancel": cancel}


def run(args: argparse.Namespace) -> int:
    return ACTIONS[args.k8s_command](args)
