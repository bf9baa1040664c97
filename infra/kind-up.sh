#!/usr/bin/env bash
# Create a kind cluster, build and load the ctssl image, install the KubeRay operator and the chart
# with the CPU-only values, and upload a small CT series so the study runs end to end:
#
#   infra/kind-up.sh                      # everything, with the real CT series vendored in tests/data/real_ct
#   DICOM_DIR=/data/my-ct infra/kind-up.sh  # your own series instead of the bundled example
#   .venv/bin/ctssl phantom /tmp/phantom --patients 4 --slices 32 --size 128 \
#     && DICOM_DIR=/tmp/phantom infra/kind-up.sh   # a synthetic phantom cohort instead
#
# Needs docker, kind, kubectl and helm on PATH, and internet access for the base images.
set -euo pipefail

CLUSTER=${CLUSTER:-ctssl}
NAMESPACE=${NAMESPACE:-ctssl}
RELEASE=${RELEASE:-study}
IMAGE_REPO=${IMAGE_REPO:-ctssl}
IMAGE_TAG=${IMAGE_TAG:-0.1.0}
KUBERAY_VERSION=${KUBERAY_VERSION:-1.7.0}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VALUES=${VALUES:-$ROOT/charts/ctssl/ci/cpu-small-values.yaml}
DICOM_DIR=${DICOM_DIR:-$ROOT/tests/data/real_ct/totalsegmentator_example_ct}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}

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

log "installing the KubeRay operator $KUBERAY_VERSION"
helm repo add kuberay https://ray-project.github.io/kuberay-helm/ --force-update >/dev/null
helm upgrade --install kuberay-operator kuberay/kuberay-operator --version "$KUBERAY_VERSION" \
  --namespace kuberay-system --create-namespace --wait

log "installing chart release $RELEASE into namespace $NAMESPACE"
helm upgrade --install "$RELEASE" "$ROOT/charts/ctssl" --namespace "$NAMESPACE" --create-namespace \
  -f "$VALUES" --set image.repository="$IMAGE_REPO" --set image.tag="$IMAGE_TAG" --wait --timeout 10m

# The prep Job waits (init container `ctssl wait-for`) until its source exists in the bucket:
# upload the example series through a port-forward to MinIO.
if [ -d "$DICOM_DIR" ]; then
  log "uploading $DICOM_DIR to MinIO"
  kubectl -n "$NAMESPACE" port-forward "svc/$RELEASE-minio" 19000:9000 >/dev/null &
  PF=$!
  trap 'kill $PF 2>/dev/null || true' EXIT
  sleep 3
  SRC=$(kubectl -n "$NAMESPACE" get cm "$RELEASE-experiment" -o jsonpath='{.data.experiment\.yaml}' \
        | "$PYTHON" -c 'import sys, yaml; print(yaml.safe_load(sys.stdin)["prep"]["source"])')
  AWS_ACCESS_KEY_ID=$(kubectl -n "$NAMESPACE" get secret "$RELEASE-s3" -o jsonpath='{.data.AWS_ACCESS_KEY_ID}' | base64 -d) \
  AWS_SECRET_ACCESS_KEY=$(kubectl -n "$NAMESPACE" get secret "$RELEASE-s3" -o jsonpath='{.data.AWS_SECRET_ACCESS_KEY}' | base64 -d) \
  "$PYTHON" - "$DICOM_DIR" "$SRC" <<'PY'
import sys

import s3fs

src, dst = sys.argv[1], sys.argv[2]
fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": "http://127.0.0.1:19000"})
fs.put(src.rstrip("/") + "/", dst.rstrip("/") + "/", recursive=True)
print(f"uploaded {len(fs.find(dst))} files to {dst}")
PY
else
  log "no DICOM_DIR ($DICOM_DIR); upload your series to the prep source before the prep Job gives up"
fi

cat <<MSG

Done. Follow the study:
  kubectl -n $NAMESPACE get job,rayjob
  ctssl k8s status --release $RELEASE -n $NAMESPACE
  kubectl -n $NAMESPACE port-forward svc/$RELEASE-mlflow 5000:5000     # MLflow UI on http://localhost:5000
The fine-tuning RayJob waits for a labelled prep output at finetune.data (see docs/operations.md).
Delete everything: kind delete cluster --name $CLUSTER
MSG
