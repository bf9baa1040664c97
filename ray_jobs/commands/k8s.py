"""``ctssl k8s``: follow the studies the Helm chart runs on Kubernetes.

The chart (``charts/ctssl``) is the one definition of every Kubernetes object: a study is its values'
``study:`` block, run as one KubeRay RayJob. ``values`` turns a study file into that block; ``status``
prints a release's studies with their current stage; ``logs`` shows a study's driver log; ``cancel``
deletes a study's RayJob (and so its Ray cluster). Configuration: the in-cluster service account
inside a pod, else the kubeconfig (``--kubeconfig``, ``$KUBECONFIG``, ``~/.kube/config``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml

from ctssl_base.errors import UserError
from ray_jobs.k8s.api import KubeAPI
from ray_jobs.k8s.mlflow_links import MLflowLinks
from ray_jobs.k8s.status import current_stage
from ray_jobs.study import spec

NAME = "k8s"
HELP = "run and follow a study on Kubernetes (the Helm chart's RayJob: values / status / logs / cancel)"
DESCRIPTION = """\
  ctssl k8s values -f study.yaml > study-values.yaml    the study as the chart's `study:` values
  helm install study charts/ctssl -n ml -f platform.yaml -f study-values.yaml
  ctssl k8s status --release study -n ml --mlflow-url http://localhost:5000
  ctssl k8s logs study-phantom -n ml --follow           the study driver's log
  ctssl k8s cancel study-phantom -n ml                  (or --release study for every study)
"""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--namespace", help="namespace (default: the kubeconfig context's, else default)")
    p.add_argument("--kubeconfig", metavar="FILE", help="kubeconfig file (default $KUBECONFIG or ~/.kube/config)")
    p.add_argument("--context", help="kubeconfig context (default: the current one)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="k8s_command", metavar="ACTION", required=True)
    v = sub.add_parser("values", help="print a study file as the Helm chart's `study:` values (checked first)")
    v.add_argument("-f", "--file", required=True, help="the study file (YAML)")
    st = sub.add_parser("status", help="table of a release's studies: RayJob state and current stage")
    st.add_argument("--release", required=True, metavar="NAME", help="Helm release name")
    st.add_argument("--mlflow-url", metavar="URL",
                    help="MLflow UI base URL for run links, e.g. http://localhost:5000 after a port-forward")
    _common(st)
    lg = sub.add_parser("logs", help="a study's driver log (KubeRay's submitter pod tails it)")
    lg.add_argument("name", help="the study's RayJob, e.g. study-phantom")
    lg.add_argument("--tail", type=int, metavar="N", help="only the last N lines per container")
    lg.add_argument("-f", "--follow", action="store_true", help="stream the log")
    _common(lg)
    c = sub.add_parser("cancel", help="delete study RayJobs (KubeRay stops the Ray job and deletes its cluster)")
    c.add_argument("names", nargs="*", help="RayJob names")
    c.add_argument("--release", metavar="NAME", help="every study RayJob of this release")
    _common(c)


def _connect(args: argparse.Namespace):
    return KubeAPI.connect(args.kubeconfig, args.context, args.namespace)


# ------------------------------------------------------------------------------------------- values
def values(args: argparse.Namespace) -> int:
    """The study document (as written, not with its defaults) under `study:`: values.schema.json checks
    it again at install, and the chart fills in storage, MLflow and the work folder where it is silent."""

    study = spec.load(args.file)
    print(f"# from {args.file} (ctssl k8s values)")
    print(yaml.safe_dump({"study": study.raw}, sort_keys=False), end="")
    return 0


# ------------------------------------------------------------------------------------------- status
def _submitter_pods(api, name: str) -> list[dict[str, Any]]:
    """KubeRay's submitter Job is named after the RayJob; its pod tails the driver's log. Newest last."""
    from ray_jobs.k8s.api import POD

    pods = api.list(POD, f"batch.kubernetes.io/job-name={name}")
    return sorted(pods, key=lambda p: (p["metadata"].get("creationTimestamp") or "", p["metadata"]["name"]))


def _stage_reader(api) -> Any:
    from ray_jobs.k8s.api import KubeAPIError

    def stage_of(rayjob: dict[str, Any]) -> str:
        try:
            pods = _submitter_pods(api, rayjob["metadata"]["name"])
            if not pods:
                return "-"
            pod = pods[-1]
            return current_stage(api.pod_log(pod["metadata"]["name"], pod["spec"]["containers"][0]["name"], 400))
        except KubeAPIError:
            return "-"  # no log yet (pod starting) or no permission to read logs

    return stage_of


def status(args: argparse.Namespace) -> int:
    from ray_jobs.k8s.api import RAYJOB
    from ray_jobs.k8s.status import INSTANCE_LABEL, STUDY_LABEL, render_table, report_location, rows

    api = _connect(args)
    selector = f"{INSTANCE_LABEL}={args.release}"
    rayjobs = [r for r in api.list(RAYJOB, selector) if STUDY_LABEL in (r["metadata"].get("labels") or {})]
    if not rayjobs:
        raise UserError(f"no study RayJob of release {args.release!r} in namespace {api.namespace} "
                        f"(label {selector}); check -n / --release, or the release has no `study:` values")
    links = MLflowLinks(args.mlflow_url).link if args.mlflow_url else None
    print(render_table(rows(rayjobs, _stage_reader(api), links)))
    for r in sorted(rayjobs, key=lambda o: o["metadata"]["name"]):
        where = report_location(r)
        if where:
            print(f"\nreport of {r['metadata']['name']} (when it finishes): {where}")
    if not args.mlflow_url:
        print(f"\nrun links: kubectl -n {api.namespace} port-forward svc/{args.release}-mlflow 5000:5000, "
              "then add --mlflow-url http://localhost:5000")
    return 0


# --------------------------------------------------------------------------------------------- logs
def _pods_of(api, name: str) -> tuple[str, list[dict[str, Any]]]:
    """(what, pods) whose logs tell the study's story: KubeRay's submitter (it tails the driver), else
    the Ray head while the cluster starts."""
    from ray_jobs.k8s.api import POD, RAYJOB, KubeAPIError

    try:
        rj = api.get(RAYJOB, name)
    except KubeAPIError as e:
        if e.status == 404:
            raise UserError(f"no RayJob named {name!r} in namespace {api.namespace}; "
                            f"`ctssl k8s status --release <release>` lists the studies") from e
        raise
    pods = _submitter_pods(api, name)
    if pods:
        return "submitter", pods
    cluster = (rj.get("status") or {}).get("rayClusterName")
    if cluster:
        return "head", api.list(POD, f"ray.io/cluster={cluster},ray.io/node-type=head")
    return "none", []


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
    from ray_jobs.k8s.api import RAYJOB, KubeAPIError
    from ray_jobs.k8s.status import INSTANCE_LABEL, STUDY_LABEL

    if not args.names and not args.release:
        raise UserError("name the study RayJobs to cancel, or pass --release NAME for every study of a release")
    api = _connect(args)
    targets: list[str] = []
    if args.release:
        sel = f"{INSTANCE_LABEL}={args.release}"
        targets += [o["metadata"]["name"] for o in api.list(RAYJOB, sel)
                    if STUDY_LABEL in (o["metadata"].get("labels") or {})]
        if not targets:
            raise UserError(f"release {args.release!r} has no study RayJob in namespace {api.namespace}")
    for name in args.names:
        try:
            api.get(RAYJOB, name)
        except KubeAPIError as e:
            if e.status == 404:
                raise UserError(f"no RayJob named {name!r} in namespace {api.namespace}") from e
            raise
        targets.append(name)
    for name in targets:
        api.delete(RAYJOB, name)
        print(f"deleted RayJob {api.namespace}/{name} (its Ray cluster goes with it; finished stages stay "
              "in storage, so reinstalling the study resumes it)")
    return 0


ACTIONS = {"values": values, "status": status, "logs": logs, "cancel": cancel}


def run(args: argparse.Namespace) -> int:
    return ACTIONS[args.k8s_command](args)
