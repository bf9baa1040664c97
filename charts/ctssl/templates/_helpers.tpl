{{/*
Names, labels and the pieces every pod shares. The study's objects (prep Job, RayJobs) are built
from the resolved experiment config ($cfg, see _experiment.tpl), exactly as ray_jobs/k8s/objects.py
builds them for `ctssl k8s submit`; the chart tests check the two agree.
*/}}

{{- define "ctssl.fullname" -}}
{{- .Values.fullnameOverride | default .Release.Name | trunc 30 | trimSuffix "-" -}}
{{- end -}}

{{- define "ctssl.serviceAccountName" -}}
{{- .Values.serviceAccount.name | default (include "ctssl.fullname" .) -}}
{{- end -}}

{{/* Labels Helm adds on top of the study labels (not part of the experiment contract). */}}
{{- define "ctssl.helmLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service | quote }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{- define "ctssl.selectorLabels" -}}
app.kubernetes.io/name: ctssl
app.kubernetes.io/instance: {{ include "ctssl.fullname" . | quote }}
{{- end -}}

{{/* Labels of a stack component (MinIO, PostgreSQL, MLflow): ctx = dict "root" $ "component" "mlflow" */}}
{{- define "ctssl.labels" -}}
{{ include "ctssl.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component | quote }}
app.kubernetes.io/part-of: ctssl
{{- end -}}

{{/* Study labels from the experiment config: ctx = dict "cfg" $cfg "component" "pretrain" "method" "byol" */}}
{{- define "ctssl.studyLabels" -}}
app.kubernetes.io/name: ctssl
app.kubernetes.io/instance: {{ .cfg.name | quote }}
app.kubernetes.io/component: {{ .component | quote }}
app.kubernetes.io/part-of: ctssl
{{- if .method }}
ctssl.io/method: {{ .method | quote }}
{{- end }}
{{- end -}}

{{- define "ctssl.storageRoot" -}}
{{- printf "s3://%s/%s" .Values.storage.bucket (.Values.storage.prefix | default (include "ctssl.fullname" .) | trimAll "/") -}}
{{- end -}}

{{- define "ctssl.s3Endpoint" -}}
{{- if .Values.storage.endpoint -}}
{{- .Values.storage.endpoint -}}
{{- else if .Values.minio.enabled -}}
{{- printf "http://%s-minio:9000" (include "ctssl.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "ctssl.s3Secret" -}}
{{- if .Values.storage.existingSecret -}}
{{- .Values.storage.existingSecret -}}
{{- else if .Values.minio.enabled -}}
{{- printf "%s-s3" (include "ctssl.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "ctssl.trackingUri" -}}
{{- if .Values.mlflow.trackingUri -}}
{{- .Values.mlflow.trackingUri -}}
{{- else -}}
{{- printf "http://%s-mlflow:%d" (include "ctssl.fullname" .) (.Values.mlflow.port | int) -}}
{{- end -}}
{{- end -}}

{{- define "ctssl.postgresSecret" -}}
{{- .Values.postgresql.existingSecret | default (printf "%s-postgresql" (include "ctssl.fullname" .)) -}}
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

{{- define "ctssl.containerSecurityContext" -}}
allowPrivilegeEscalation: false
privileged: false
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* S3 credentials (Secret refs only), endpoint and MLflow location: ctx = $cfg */}}
{{- define "ctssl.storageEnv" -}}
{{- $s := .storage -}}
{{- if $s.credentialsSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ $s.credentialsSecret | toJson }}
      key: {{ $s.accessKeyIdKey | toJson }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $s.credentialsSecret | toJson }}
      key: {{ $s.secretAccessKeyKey | toJson }}
{{- end }}
- name: AWS_DEFAULT_REGION
  value: {{ $s.region | toJson }}
{{- if $s.endpoint }}
- name: AWS_ENDPOINT_URL
  value: {{ $s.endpoint | toJson }}
- name: CTSSL_S3_ENDPOINT_URL
  value: {{ $s.endpoint | toJson }}
- name: MLFLOW_S3_ENDPOINT_URL
  value: {{ $s.endpoint | toJson }}
{{- end }}
- name: MLFLOW_TRACKING_URI
  value: {{ .mlflow.trackingUri | toJson }}
{{- end -}}

{{/* serviceAccountName, token, securityContext, pull secrets: ctx = $cfg */}}
{{- define "ctssl.podSpecCommon" -}}
serviceAccountName: {{ .serviceAccountName | toJson }}
automountServiceAccountToken: false
securityContext:
  {{- include "ctssl.podSecurityContext" .securityContext | nindent 2 }}
{{- if .imagePullSecrets }}
imagePullSecrets:
{{- range .imagePullSecrets }}
  - name: {{ . | toJson }}
{{- end }}
{{- end }}
{{- end -}}

{{/* A ctssl container's image, env, resources, securityContext: ctx = dict "cfg" $cfg "name" "x" "resources" map */}}
{{- define "ctssl.containerCommon" -}}
name: {{ .name | toJson }}
image: {{ printf "%s:%s" .cfg.image.repository (toString .cfg.image.tag) | toJson }}
imagePullPolicy: {{ .cfg.image.pullPolicy | toJson }}
{{- if not .noEnv }}
env:
  {{- include "ctssl.storageEnv" .cfg | nindent 2 }}
{{- end }}
resources:
  {{- toYaml .resources | nindent 2 }}
securityContext:
  {{- include "ctssl.containerSecurityContext" . | nindent 2 }}
{{- end -}}

{{/* Quote an argv list into one shell line, only where needed (mirrors stage_commands.shell_join). */}}
{{- define "ctssl.shjoin" -}}
{{- $out := list -}}
{{- range . -}}
{{- $a := toString . -}}
{{- if regexMatch "^[A-Za-z0-9_./:=@%+,-]+$" $a -}}
{{- $out = append $out $a -}}
{{- else -}}
{{- $out = append $out (printf "'%s'" (replace "'" "'\"'\"'" $a)) -}}
{{- end -}}
{{- end -}}
{{- join " " $out -}}
{{- end -}}
