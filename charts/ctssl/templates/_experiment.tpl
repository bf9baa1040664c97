{{/*
The resolved experiment config (same keys as ray_jobs/experiment_config.DEFAULTS, every URL derived).
It is stored in the <fullname>-experiment ConfigMap and is the only input of the study templates, so
`ctssl k8s submit -f experiment.yaml` builds the same objects from the same document.
Usage: {{- $cfg := include "ctssl.experiment" . | fromYaml }}
*/}}
{{- define "ctssl.experiment" -}}
{{- $v := .Values -}}
{{- $root := include "ctssl.storageRoot" . -}}
{{- $prepOut := $v.prep.output | default (printf "%s/shards" $root) -}}
name: {{ include "ctssl.fullname" . | toJson }}
image:
  repository: {{ $v.image.repository | toJson }}
  tag: {{ $v.image.tag | toString | toJson }}
  digest: {{ $v.image.digest | default "" | toJson }}
  pullPolicy: {{ $v.image.pullPolicy | toJson }}
imagePullSecrets: {{ $v.imagePullSecrets | toJson }}
serviceAccountName: {{ include "ctssl.serviceAccountName" . | toJson }}
securityContext:
  runAsUser: {{ $v.securityContext.runAsUser | int }}
  runAsGroup: {{ $v.securityContext.runAsGroup | int }}
  fsGroup: {{ $v.securityContext.fsGroup | int }}
storage:
  root: {{ $root | toJson }}
  endpoint: {{ include "ctssl.s3Endpoint" . | toJson }}
  region: {{ $v.storage.region | toJson }}
  credentialsSecret: {{ include "ctssl.s3Secret" . | toJson }}
  accessKeyIdKey: {{ $v.storage.accessKeyIdKey | toJson }}
  secretAccessKeyKey: {{ $v.storage.secretAccessKeyKey | toJson }}
mlflow:
  trackingUri: {{ include "ctssl.trackingUri" . | toJson }}
  credentialsSecret: {{ include "ctssl.mlflowAuthSecret" . | toJson }}
  usernameKey: {{ $v.mlflow.auth.usernameKey | toJson }}
  passwordKey: {{ $v.mlflow.auth.passwordKey | toJson }}
waitFor:
  timeoutSeconds: {{ $v.waitFor.timeoutSeconds | int }}
  pollSeconds: {{ $v.waitFor.pollSeconds | int }}
prep:
  enabled: {{ $v.prep.enabled }}
  source: {{ $v.prep.source | toJson }}
  sourceType: {{ $v.prep.sourceType | toJson }}
  output: {{ $prepOut | toJson }}
  numShards: {{ $v.prep.numShards | int }}
  parallelism: {{ $v.prep.parallelism | int }}
  workers: {{ $v.prep.workers | int }}
  size: {{ $v.prep.size | int }}
  dataset: {{ $v.prep.dataset | toJson }}
  labels: {{ $v.prep.labels | toJson }}
  deidKeySecret: {{ $v.prep.deidKeySecret | toJson }}
  deidKeyKey: {{ $v.prep.deidKeyKey | toJson }}
  extraArgs: {{ $v.prep.extraArgs | toJson }}
  backoffLimitPerIndex: {{ $v.prep.backoffLimitPerIndex | int }}
  ttlSecondsAfterFinished: {{ $v.prep.ttlSecondsAfterFinished | int }}
  resources: {{ $v.prep.resources | toJson }}
reduce:
  enabled: {{ $v.reduce.enabled }}
  strategy: {{ $v.reduce.strategy | toJson }}
  output: {{ $v.reduce.output | default (printf "%s/selection" $root) | toJson }}
  extraArgs: {{ $v.reduce.extraArgs | toJson }}
pretrain:
  methods: {{ $v.pretrain.methods | toJson }}
  data: {{ $v.pretrain.data | default $prepOut | toJson }}
  backbone: {{ $v.pretrain.backbone | toJson }}
  epochs: {{ $v.pretrain.epochs | int }}
  batchSize: {{ $v.pretrain.batchSize | int }}
  cpusPerWorker: {{ $v.pretrain.cpusPerWorker | toJson }}
  storage: {{ $v.pretrain.storage | default (printf "%s/pretrain" $root) | toJson }}
  extraArgs: {{ $v.pretrain.extraArgs | toJson }}
finetune:
  enabled: {{ $v.finetune.enabled }}
  data: {{ $v.finetune.data | toJson }}
  output: {{ $v.finetune.output | default (printf "%s/finetune" $root) | toJson }}
  folds: {{ $v.finetune.folds | int }}
  reductions: {{ $v.finetune.reductions | toString | toJson }}
  samplesPerClass: {{ $v.finetune.samplesPerClass | toString | toJson }}
  cpusPerTrial: {{ $v.finetune.cpusPerTrial | toJson }}
  gpusPerTrial: {{ $v.finetune.gpusPerTrial | toJson }}
  extraArgs: {{ $v.finetune.extraArgs | toJson }}
report:
  enabled: {{ $v.report.enabled }}
  output: {{ $v.report.output | default (printf "%s/report" $root) | toJson }}
  extraArgs: {{ $v.report.extraArgs | toJson }}
rayJob:
  shutdownAfterJobFinishes: {{ $v.rayJob.shutdownAfterJobFinishes }}
  ttlSecondsAfterFinished: {{ $v.rayJob.ttlSecondsAfterFinished | int }}
  activeDeadlineSeconds: {{ $v.rayJob.activeDeadlineSeconds | int }}
  backoffLimit: {{ $v.rayJob.backoffLimit | int }}
ray:
  version: {{ $v.ray.version | toString | toJson }}
  head:
    numCpus: {{ $v.ray.head.numCpus | toString | toJson }}
    shmSize: {{ $v.ray.head.shmSize | toJson }}
    resources: {{ $v.ray.head.resources | toJson }}
  workers:
    replicas: {{ $v.ray.workers.replicas | int }}
    gpus: {{ $v.ray.workers.gpus | int }}
    shmSize: {{ $v.ray.workers.shmSize | toJson }}
    resources: {{ $v.ray.workers.resources | toJson }}
    nodeSelector: {{ $v.ray.workers.nodeSelector | toJson }}
    tolerations: {{ $v.ray.workers.tolerations | toJson }}
  submitter:
    resources: {{ $v.ray.submitter.resources | toJson }}
  initResources: {{ $v.ray.initResources | toJson }}
{{- end -}}
