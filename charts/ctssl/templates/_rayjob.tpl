{{/*
One RayJob: a CPU head that first waits for the stage's inputs (init containers running
`ctssl wait-for`), one worker group (GPU when ray.workers.gpus > 0), /dev/shm as a memory emptyDir,
a submitter pod that passes Pod Security "restricted". Mirrors ray_jobs/k8s/objects.rayjob.
ctx: dict "root" $ "cfg" $cfg "name" N "component" C "method" M "entrypoint" E
          "waits" (list (dict "name" "wait-for-data" "argv" (list ...))) "mlflowExperiment" X "withWorkers" true
*/}}
{{- define "ctssl.rayjob" -}}
{{- $cfg := .cfg -}}
{{- $labelCtx := dict "cfg" $cfg "component" .component "method" .method -}}
apiVersion: ray.io/v1
kind: RayJob
metadata:
  name: {{ .name | toJson }}
  labels:
    {{- include "ctssl.studyLabels" $labelCtx | nindent 4 }}
    {{- include "ctssl.helmLabels" .root | nindent 4 }}
  {{- if .mlflowExperiment }}
  annotations:
    ctssl.io/mlflow-experiment: {{ .mlflowExperiment | toJson }}
  {{- end }}
spec:
  entrypoint: {{ .entrypoint | toJson }}
  submissionMode: K8sJobMode
  shutdownAfterJobFinishes: {{ $cfg.rayJob.shutdownAfterJobFinishes }}
  ttlSecondsAfterFinished: {{ $cfg.rayJob.ttlSecondsAfterFinished | int }}
  activeDeadlineSeconds: {{ $cfg.rayJob.activeDeadlineSeconds | int }}
  backoffLimit: {{ $cfg.rayJob.backoffLimit | int }}
  submitterPodTemplate:
    metadata:
      labels:
        {{- include "ctssl.studyLabels" $labelCtx | nindent 8 }}
        ctssl.io/ray-node: submitter
    spec:
      {{- include "ctssl.podSpecCommon" $cfg | nindent 6 }}
      restartPolicy: Never
      containers:
        - {{- include "ctssl.containerCommon" (dict "cfg" $cfg "name" "ray-job-submitter" "resources" $cfg.ray.submitter.resources "noEnv" true) | nindent 10 }}
      volumes:
        {{- include "ctssl.writableVolumes" dict | nindent 8 }}
  rayClusterSpec:
    rayVersion: {{ $cfg.ray.version | toJson }}
    enableInTreeAutoscaling: false
    headGroupSpec:
      rayStartParams:
        dashboard-host: "0.0.0.0"
        {{- if .withWorkers }}
        num-cpus: {{ $cfg.ray.head.numCpus | toString | toJson }}
        {{- end }}
      template:
        metadata:
          labels:
            {{- include "ctssl.studyLabels" $labelCtx | nindent 12 }}
            ctssl.io/ray-node: head
        spec:
          {{- include "ctssl.podSpecCommon" $cfg | nindent 10 }}
          initContainers:
            - {{- include "ctssl.seedCache" $cfg | nindent 14 }}
            {{- range .waits }}
            - {{- include "ctssl.containerCommon" (dict "cfg" $cfg "name" .name "resources" $cfg.ray.initResources) | nindent 14 }}
              command: {{ toJson .argv }}
            {{- end }}
          containers:
            - {{- include "ctssl.containerCommon" (dict "cfg" $cfg "name" "ray-head" "resources" $cfg.ray.head.resources "cache" true "mounts" (list (dict "name" "dshm" "mountPath" "/dev/shm"))) | nindent 14 }}
              ports:
                - containerPort: 6379
                  name: gcs-server
                - containerPort: 8265
                  name: dashboard
                - containerPort: 10001
                  name: client
          volumes:
            {{- include "ctssl.writableVolumes" (dict "cache" true) | nindent 12 }}
            - name: dshm
              emptyDir:
                medium: Memory
                sizeLimit: {{ $cfg.ray.head.shmSize | toJson }}
    {{- if .withWorkers }}
    {{- $w := $cfg.ray.workers }}
    {{- $res := deepCopy $w.resources }}
    {{- if gt ($w.gpus | int) 0 }}
    {{- $limits := get $res "limits" | default dict }}
    {{- $_ := set $limits "nvidia.com/gpu" ($w.gpus | int) }}
    {{- $_ := set $res "limits" $limits }}
    {{- end }}
    workerGroupSpecs:
      - groupName: {{ if gt ($w.gpus | int) 0 }}gpu-workers{{ else }}cpu-workers{{ end }}
        replicas: {{ $w.replicas | int }}
        minReplicas: {{ $w.replicas | int }}
        maxReplicas: {{ $w.replicas | int }}
        rayStartParams: {}
        template:
          metadata:
            labels:
              {{- include "ctssl.studyLabels" $labelCtx | nindent 14 }}
              ctssl.io/ray-node: worker
          spec:
            {{- include "ctssl.podSpecCommon" $cfg | nindent 12 }}
            {{- with $w.nodeSelector }}
            nodeSelector:
              {{- toYaml . | nindent 14 }}
            {{- end }}
            {{- with $w.tolerations }}
            tolerations:
              {{- toYaml . | nindent 14 }}
            {{- end }}
            initContainers:
              - {{- include "ctssl.seedCache" $cfg | nindent 16 }}
            containers:
              - {{- include "ctssl.containerCommon" (dict "cfg" $cfg "name" "ray-worker" "resources" $res "cache" true "mounts" (list (dict "name" "dshm" "mountPath" "/dev/shm"))) | nindent 16 }}
            volumes:
              {{- include "ctssl.writableVolumes" (dict "cache" true) | nindent 14 }}
              - name: dshm
                emptyDir:
                  medium: Memory
                  sizeLimit: {{ $w.shmSize | toJson }}
    {{- end }}
{{- end -}}
