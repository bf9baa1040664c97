{{/*
Names, labels and the pieces every pod shares. Every helper takes the root context ($) unless its
comment says otherwise. The study's own objects (its spec ConfigMap and its RayJob) are in
_study.tpl and study.yaml.
*/}}

{{- define "ctssl.fullname" -}}
{{- .Values.fullnameOverride | default .Release.Name | trunc 30 | trimSuffix "-" -}}
{{- end -}}

{{- define "ctssl.serviceAccountName" -}}
{{- .Values.serviceAccount.name | default (include "ctssl.fullname" .) -}}
{{- end -}}

{{/* Labels Helm adds on top of the component labels. */}}
{{- define "ctssl.helmLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service | quote }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{- define "ctssl.selectorLabels" -}}
app.kubernetes.io/name: ctssl
app.kubernetes.io/instance: {{ include "ctssl.fullname" . | quote }}
{{- end -}}

{{/* Labels of a component (MinIO, PostgreSQL, MLflow, the study): ctx = dict "root" $ "component" "mlflow" */}}
{{- define "ctssl.labels" -}}
{{ include "ctssl.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component | quote }}
app.kubernetes.io/part-of: ctssl
{{- end -}}

{{/* The folder of the release inside the bucket (no slash at either end). */}}
{{- define "ctssl.storagePrefix" -}}
{{- .Values.storage.prefix | default (include "ctssl.fullname" .) | trimAll "/" -}}
{{- end -}}

{{- define "ctssl.storageRoot" -}}
{{- printf "s3://%s/%s" .Values.storage.bucket (include "ctssl.storagePrefix" .) -}}
{{- end -}}

{{/* The folder of MLflow's artifacts inside the bucket (the only one MLflow's own S3 user may use). */}}
{{- define "ctssl.mlflowArtifactsPrefix" -}}
{{- printf "%s/%s" (include "ctssl.storagePrefix" .) (.Values.mlflow.artifactsPrefix | trimAll "/") -}}
{{- end -}}

{{- define "ctssl.s3Endpoint" -}}
{{- if .Values.storage.endpoint -}}
{{- .Values.storage.endpoint -}}
{{- else if .Values.minio.enabled -}}
{{- printf "http://%s-minio:9000" (include "ctssl.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* The S3 keys every workload gets: with the bundled MinIO, a user limited to the bucket (never root). */}}
{{- define "ctssl.s3Secret" -}}
{{- if .Values.storage.existingSecret -}}
{{- .Values.storage.existingSecret -}}
{{- else if .Values.minio.enabled -}}
{{- printf "%s-s3" (include "ctssl.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/*
The S3 keys of MLflow's server (its artifacts): with the bundled MinIO, a user of its own limited to
the artifacts folder; otherwise the workloads' keys (or none: IAM roles).
*/}}
{{- define "ctssl.mlflowS3Secret" -}}
{{- if .Values.mlflow.artifactsExistingSecret -}}
{{- .Values.mlflow.artifactsExistingSecret -}}
{{- else if .Values.minio.enabled -}}
{{- printf "%s-mlflow-s3" (include "ctssl.fullname" .) -}}
{{- else -}}
{{- include "ctssl.s3Secret" . -}}
{{- end -}}
{{- end -}}

{{/* MinIO's root login: only MinIO and its bucket Job read it. */}}
{{- define "ctssl.minioRootSecret" -}}
{{- .Values.minio.existingSecret | default (printf "%s-minio-root" (include "ctssl.fullname" .)) -}}
{{- end -}}

{{/* The MLflow server's admin login (empty: the server needs none). Never given to a workload. */}}
{{- define "ctssl.mlflowAuthSecret" -}}
{{- $a := .Values.mlflow.auth -}}
{{- if $a.enabled -}}
{{- if $a.existingSecret -}}
{{- $a.existingSecret -}}
{{- else if .Values.mlflow.enabled -}}
{{- printf "%s-mlflow-auth" (include "ctssl.fullname" .) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
The jobs' own MLflow login (empty: the server needs none): a user without admin rights that the
server's auth-config init container creates. For an external server (mlflow.enabled=false) the
login named for the jobs, or else auth.existingSecret.
*/}}
{{- define "ctssl.mlflowJobsSecret" -}}
{{- $a := .Values.mlflow.auth -}}
{{- $jobs := $a.jobs | default dict -}}
{{- if $a.enabled -}}
{{- if $jobs.existingSecret -}}
{{- $jobs.existingSecret -}}
{{- else if .Values.mlflow.enabled -}}
{{- printf "%s-mlflow-jobs" (include "ctssl.fullname" .) -}}
{{- else -}}
{{- $a.existingSecret -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Refuses a URI with a login in it (scheme://user:password@host): what the chart renders from it (the
study's ConfigMap, the pods' environment, NOTES) is readable by everyone who can read the release.
The message names the key, never the URI. ctx = dict "uri" U "key" "mlflow.trackingUri"
*/}}
{{- define "ctssl.refuseLogin" -}}
{{- if regexMatch "^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*@" (toString .uri) -}}
{{- fail (printf "%s holds a login (user:password@ in the URI), which would be written into the study's ConfigMap and the pods' environment: remove it from the URI and put the login into the Secret named by mlflow.auth.jobs.existingSecret (keys mlflow.auth.usernameKey / mlflow.auth.passwordKey)" .key) -}}
{{- end -}}
{{- end -}}

{{/* The namespace of the KubeRay operator, whose pods poll each Ray head's job API. */}}
{{- define "ctssl.operatorNamespace" -}}
{{- .Values.networkPolicy.operator.namespace | default "kuberay-system" -}}
{{- end -}}

{{/*
An image reference: "name:tag", or "name@sha256:..." when a digest is given (the tag is dropped, so
the digest alone decides what runs). ctx = dict "image" "repo:tag" "digest" "sha256:..."
*/}}
{{- define "ctssl.imageRef" -}}
{{- if .digest -}}
{{- printf "%s@%s" (regexReplaceAll ":[^/:@]+$" (toString .image) "") .digest -}}
{{- else -}}
{{- toString .image -}}
{{- end -}}
{{- end -}}

{{/* The ctssl image. */}}
{{- define "ctssl.image" -}}
{{- $i := .Values.image -}}
{{- if $i.digest -}}
{{- printf "%s@%s" $i.repository $i.digest -}}
{{- else -}}
{{- printf "%s:%s" $i.repository (toString $i.tag) -}}
{{- end -}}
{{- end -}}

{{- define "ctssl.trackingUri" -}}
{{- if .Values.mlflow.trackingUri -}}
{{- include "ctssl.refuseLogin" (dict "uri" .Values.mlflow.trackingUri "key" "mlflow.trackingUri") -}}
{{- .Values.mlflow.trackingUri -}}
{{- else -}}
{{- printf "http://%s-mlflow:%d" (include "ctssl.fullname" .) (.Values.mlflow.port | int) -}}
{{- end -}}
{{- end -}}

{{- define "ctssl.postgresSecret" -}}
{{- .Values.postgresql.existingSecret | default (printf "%s-postgresql" (include "ctssl.fullname" .)) -}}
{{- end -}}

{{/* The MLflow server's backend store URI (PostgreSQL), from Secrets only */}}
{{- define "ctssl.mlflowDatabaseEnv" -}}
{{- if .Values.postgresql.enabled -}}
- name: PGPASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "ctssl.postgresSecret" . | quote }}
      key: {{ .Values.postgresql.passwordKey | quote }}
- name: MLFLOW_BACKEND_STORE_URI
  value: {{ printf "postgresql+psycopg2://%s:$(PGPASSWORD)@%s-postgresql:5432/%s" .Values.postgresql.username (include "ctssl.fullname" .) .Values.postgresql.database | quote }}
{{- else -}}
- name: MLFLOW_BACKEND_STORE_URI
  valueFrom:
    secretKeyRef:
      name: {{ .Values.postgresql.external.existingSecret | quote }}
      key: {{ .Values.postgresql.external.uriKey | quote }}
{{- end -}}
{{- end -}}

{{/* Pod security context: ctx = the securityContext map (runAsUser, runAsGroup, fsGroup) */}}
{{- define "ctssl.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .runAsUser | int }}
runAsGroup: {{ .runAsGroup | int }}
fsGroup: {{ .fsGroup | int }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Every container: nothing but its mounted volumes is writable (readOnlyRootFilesystem). */}}
{{- define "ctssl.containerSecurityContext" -}}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* S3 credentials (Secret refs only) and endpoint: ctx = dict "root" $ "secret" S (empty: none, IAM) */}}
{{- define "ctssl.s3Env" -}}
{{- $s := .root.Values.storage -}}
{{- $secret := .secret -}}
{{- $endpoint := include "ctssl.s3Endpoint" .root -}}
{{- if $secret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ $secret | toJson }}
      key: {{ $s.accessKeyIdKey | toJson }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $secret | toJson }}
      key: {{ $s.secretAccessKeyKey | toJson }}
{{- end }}
- name: AWS_DEFAULT_REGION
  value: {{ $s.region | toJson }}
{{- if $endpoint }}
- name: AWS_ENDPOINT_URL
  value: {{ $endpoint | toJson }}
- name: CTSSL_S3_ENDPOINT_URL
  value: {{ $endpoint | toJson }}
- name: MLFLOW_S3_ENDPOINT_URL
  value: {{ $endpoint | toJson }}
{{- end }}
{{- end -}}

{{/* The workloads' S3 credentials and endpoint, MLflow's location and the jobs' own (non-admin) login. */}}
{{- define "ctssl.storageEnv" -}}
{{- $login := include "ctssl.mlflowJobsSecret" . -}}
{{- include "ctssl.s3Env" (dict "root" . "secret" (include "ctssl.s3Secret" .)) }}
- name: MLFLOW_TRACKING_URI
  value: {{ include "ctssl.trackingUri" . | toJson }}
{{- if $login }}
- name: MLFLOW_TRACKING_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ $login | toJson }}
      key: {{ .Values.mlflow.auth.usernameKey | toJson }}
- name: MLFLOW_TRACKING_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $login | toJson }}
      key: {{ .Values.mlflow.auth.passwordKey | toJson }}
{{- end }}
{{- end -}}

{{/* serviceAccountName, no token, securityContext, pull secrets */}}
{{- define "ctssl.podSpecCommon" -}}
serviceAccountName: {{ include "ctssl.serviceAccountName" . | toJson }}
automountServiceAccountToken: false
securityContext:
  {{- include "ctssl.podSecurityContext" .Values.securityContext | nindent 2 }}
{{- if .Values.imagePullSecrets }}
imagePullSecrets:
{{- range .Values.imagePullSecrets }}
  - name: {{ . | toJson }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Where a pod may run: ctx = a group's values (nodeSelector, tolerations, affinity, priorityClassName) */}}
{{- define "ctssl.placement" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .priorityClassName }}
priorityClassName: {{ . | toJson }}
{{- end }}
{{- end -}}

{{/*
A ctssl container's image, env, resources, securityContext and writable mounts:
ctx = dict "root" $ "name" "x" "resources" map ["env" true] ["cache" true] ["mounts" (list ...)] ["extraEnv" (list ...)]
The root filesystem is read-only: /tmp (Ray's /tmp/ray included) is an emptyDir, and with "cache"
so is ~/.cache (numba's kernel cache, seeded from the image by ctssl.seedCache; see there).
*/}}
{{- define "ctssl.containerCommon" -}}
name: {{ .name | toJson }}
image: {{ include "ctssl.image" .root | toJson }}
imagePullPolicy: {{ .root.Values.image.pullPolicy | toJson }}
{{- if or .env .extraEnv }}
env:
  {{- if .env }}
  {{- include "ctssl.storageEnv" .root | nindent 2 }}
  {{- end }}
  {{- with .extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}
resources:
  {{- toYaml .resources | nindent 2 }}
securityContext:
  {{- include "ctssl.containerSecurityContext" . | nindent 2 }}
volumeMounts:
  - name: tmp
    mountPath: /tmp
  {{- if .cache }}
  - name: cache
    mountPath: {{ include "ctssl.cacheDir" . }}
  {{- end }}
  {{- with .mounts }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end -}}

{{/* The image user's cache folder: the image bakes numba's compiled kernels into it. */}}
{{- define "ctssl.cacheDir" -}}/home/ray/.cache{{- end -}}

{{/*
An init container copying the image's ~/.cache (numba's compiled kernels) into the writable "cache"
emptyDir. numba only uses a cache folder it can write to, so the baked, read-only copy would make
every kernel fail to load; the copy keeps the compiled code (no 10-15 s compile per process).
*/}}
{{- define "ctssl.seedCache" -}}
{{- include "ctssl.containerCommon" (dict "root" . "name" "seed-cache" "resources" .Values.ray.initResources "mounts" (list (dict "name" "cache" "mountPath" "/seed"))) }}
command: ["sh", "-c", {{ printf "cp -a %s/. /seed/ 2>/dev/null || true" (include "ctssl.cacheDir" .) | toJson }}]
{{- end -}}

{{/*
The emptyDirs behind the writable mounts of ctssl.containerCommon: ctx = dict "tmpSize" S ["cache" bool].
/tmp has a size limit, so a runaway writer gets its pod evicted instead of filling the node's disk.
*/}}
{{- define "ctssl.writableVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ required "a /tmp size limit (tmpSize)" .tmpSize | toJson }}
{{- if .cache }}
- name: cache
  emptyDir: {}
{{- end }}
{{- end -}}
