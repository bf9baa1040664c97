#!/usr/bin/env bash
# From a clone to a finished study on a local kind cluster: creates the cluster, builds and loads the
# ctssl image, installs the KubeRay operator and the chart with charts/ctssl/ci/cpu-small-values.yaml
# (MinIO, PostgreSQL, MLflow, and a phantom study whose pool and labelled set are generated inside the
# cluster), waits for the study's RayJob, fetches the report and says how to open the MLflow UI.
#
#   infra/kind-up.sh                  # everything (about 30-60 minutes on a laptop, CPU only)
#   WAIT=0 infra/kind-up.sh           # install and return; follow with `ctssl k8s status`
#   VALUES=my-values.yaml infra/kind-up.sh
#
# Needs docker, kind, kubectl and helm on PATH, and internet access for the base images and the
# KubeRay operator chart (the ctssl chart itself installs from this clone). Fetching the report uses
# the project's .venv (`make setup`); without it the script prints where the report is.
set -euo pipefail

CLUSTER=${CLUSTER:-ctssl}
NAMESPACE=${NAMESPACE:-ctssl}
RELEASE=${RELEASE:-study}
IMAGE_REPO=${IMAGE_REPO:-ctssl}
IMAGE_TAG=${IMAGE_TAG:-0.1.0}
KUBERAY_VERSION=${KUBERAY_VERSION:-1.7.0}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VALUES=${VALUES:-$ROOT/charts/ctssl/ci/cpu-small-values.yaml}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
WAIT=${WAIT:-1}
TIMEOUT_MIN=${TIMEOUT_MIN:-120}
REPORT_DIR=${REPORT_DIR:-$ROOT/kind-report}

log() { printf '\033[1m[kind-up]\033[0m %s\n' "$*"; }
for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null || { echo "kind-up: '$tool' is not on PATH" >&2; exit 1; }
done

if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  log "cluster $CLUSTER exists"
else
  log "creating kind cluster $CLUSTER"
  kind create cluster --name "$CLUSTER" --config "$ROOT/infra/kind-config.yaml" --wait 120s
fi
kubectl config use-context "kind-$CLUSTER" >/dev/null

log "building $IMAGE_REPO:$IMAGE_TAG"
docker build -f "$ROOT/infra/Dockerfile" -t "$IMAGE_REPO:$IMAGE_TAG" "$ROOT"
log "loading the image into the cluster's nodes"
kind load docker-image "$IMAGE_REPO:$IMAGE_TAG" --name "$CLUSTER"

log "installing the KubeRay operator $KUBERAY_VERSION (namespace kuberay-system)"
helm repo add kuberay https://ray-project.github.io/kuberay-helm/ --force-update >/dev/null
helm upgrade --install kuberay-operator kuberay/kuberay-operator --version "$KUBERAY_VERSION" \
  --namespace kuberay-system --create-namespace --wait

log "installing chart release $RELEASE into namespace $NAMESPACE (platform + the phantom study)"
helm upgrade --install "$RELEASE" "$ROOT/charts/ctssl" --namespace "$NAMESPACE" --create-namespace \
  -f "$VALUES" --set image.repository="$IMAGE_REPO" --set image.tag="$IMAGE_TAG" --wait --timeout 10m

RAYJOB=$(kubectl -n "$NAMESPACE" get rayjob -l "app.kubernetes.io/instance=$RELEASE" -o jsonpath='{.items[0].metadata.name}')
STORAGE=$(kubectl -n "$NAMESPACE" get rayjob "$RAYJOB" -o jsonpath='{.metadata.annotations.ctssl\.io/storage}')
REPORT="$STORAGE/report"
status() {
  if [ -x "$ROOT/.venv/bin/ctssl" ]; then
    "$ROOT/.venv/bin/ctssl" k8s status --release "$RELEASE" -n "$NAMESPACE" | head -2
  else
    kubectl -n "$NAMESPACE" get rayjob "$RAYJOB"
  fi
}

if [ "$WAIT" = "1" ]; then
  log "waiting for RayJob $RAYJOB (every stage of the study runs in it; up to $TIMEOUT_MIN minutes)"
  deadline=$(( $(date +%s) + TIMEOUT_MIN * 60 ))
  while :; do
    state=$(kubectl -n "$NAMESPACE" get rayjob "$RAYJOB" -o jsonpath='{.status.jobDeploymentStatus}')
    case "$state" in
      Complete) log "the study finished"; break ;;
      Failed|ValidationFailed)
        status
        echo "kind-up: RayJob $RAYJOB is $state; its log: ctssl k8s logs $RAYJOB -n $NAMESPACE" >&2
        exit 1 ;;
    esac
    [ "$(date +%s)" -lt "$deadline" ] || { echo "kind-up: still $state after $TIMEOUT_MIN minutes" >&2; exit 1; }
    status || true
    sleep 60
  done
  if [ -x "$PYTHON" ]; then
    log "fetching the report from $REPORT into $REPORT_DIR"
    kubectl -n "$NAMESPACE" port-forward "svc/$RELEASE-minio" 19000:9000 >/dev/null &
    PF=$!
    trap 'kill $PF 2>/dev/null || true' EXIT
    sleep 3
    AWS_ACCESS_KEY_ID=$(kubectl -n "$NAMESPACE" get secret "$RELEASE-s3" -o jsonpath='{.data.AWS_ACCESS_KEY_ID}' | base64 -d) \
    AWS_SECRET_ACCESS_KEY=$(kubectl -n "$NAMESPACE" get secret "$RELEASE-s3" -o jsonpath='{.data.AWS_SECRET_ACCESS_KEY}' | base64 -d) \
    "$PYTHON" - "$REPORT" "$REPORT_DIR" <<'PY'
import sys

import s3fs

src, dst = sys.argv[1], sys.argv[2]
fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": "http://127.0.0.1:19000"})
fs.get(src.rstrip("/") + "/", dst.rstrip("/") + "/", recursive=True)
print(f"report files: {', '.join(sorted(p.rsplit('/', 1)[-1] for p in fs.find(src)))}")
PY
    kill "$PF" 2>/dev/null || true
  fi
fi

cat <<MSG

The study's report: $REPORT/report.html (report.md, auc_vs_size.png, summary.csv beside it)
$( [ -f "$REPORT_DIR/report.html" ] && echo "  a copy: $REPORT_DIR/report.html" )
Follow or inspect the study:
  ctssl k8s status --release $RELEASE -n $NAMESPACE
  ctssl k8s logs $RAYJOB -n $NAMESPACE --follow
MLflow UI (every run of the study, the encoders in the Model Registry):
  kubectl -n $NAMESPACE port-forward svc/$RELEASE-mlflow 5000:5000     # then open http://localhost:5000
  kubectl -n $NAMESPACE get secret $RELEASE-mlflow-auth -o jsonpath='{.data.username}' | base64 -d; echo
  kubectl -n $NAMESPACE get secret $RELEASE-mlflow-auth -o jsonpath='{.data.password}' | base64 -d; echo
Delete everything: kind delete cluster --name $CLUSTER
MSG
