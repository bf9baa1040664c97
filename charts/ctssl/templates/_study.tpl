{{/*
The study: its name, its RayJob's name, and the study file the RayJob runs (the values' `study:`
block, which values.schema.json checks with the study schema, plus what the cluster decides when the
study leaves it out). Only ctssl itself interprets the study: the chart adds no stage of its own.
*/}}

{{- define "ctssl.studyName" -}}
{{- .Values.study.metadata.name -}}
{{- end -}}

{{/* KubeRay names the RayCluster "<RayJob>-<5 chars>" and its Service "<cluster>-head-svc": 47 at most. */}}
{{- define "ctssl.rayJobName" -}}
{{- $n := printf "%s-%s" (include "ctssl.fullname" .) (include "ctssl.studyName" .) -}}
{{- if gt (len $n) 47 -}}
{{- fail (printf "the study's RayJob would be named %q (%d characters) but KubeRay allows 47: shorten the release name (or fullnameOverride) or study.metadata.name" $n (len $n)) -}}
{{- end -}}
{{- $n -}}
{{- end -}}

{{- define "ctssl.studyStorage" -}}
{{- .Values.study.spec.storage | default (printf "%s/studies/%s" (include "ctssl.storageRoot" .) (include "ctssl.studyName" .)) -}}
{{- end -}}

{{/* Ray's CPUs of a pod: its CPU limit rounded up, as KubeRay passes it to `ray start`. ctx = resources */}}
{{- define "ctssl.podCpus" -}}
{{- $c := toString (.limits.cpu | default .requests.cpu) -}}
{{- if hasSuffix "m" $c -}}
{{- div (add (trimSuffix "m" $c | atoi) 999) 1000 -}}
{{- else -}}
{{- ceil (float64 $c) | int -}}
{{- end -}}
{{- end -}}

{{/* GPUs the GPU group has at its largest (0: no GPU group). */}}
{{- define "ctssl.maxGpus" -}}
{{- mul (.Values.ray.gpuWorkers.maxReplicas | int) (.Values.ray.gpuWorkers.gpus | int) -}}
{{- end -}}

{{/*
The study file the RayJob runs, as YAML: the study as written, with the cluster's choices filled in
where it says nothing. Fails, naming the values to change, when a pre-training run cannot fit the
worker groups (Ray would otherwise wait for resources the autoscaler can never add).
*/}}
{{- define "ctssl.studyFile" -}}
{{- $study := deepCopy .Values.study -}}
{{- $name := include "ctssl.studyName" . -}}
{{- $spec := $study.spec -}}
{{- $_ := set $spec "storage" (include "ctssl.studyStorage" .) -}}
{{- $tracking := $spec.tracking | default dict -}}
{{- if not $tracking.uri }}{{ $_ := set $tracking "uri" (include "ctssl.trackingUri" .) }}{{ end -}}
{{- $_ := set $spec "tracking" $tracking -}}
{{- if not $spec.workdir }}{{ $_ := set $spec "workdir" (printf "/tmp/ctssl/%s" $name) }}{{ end -}}
{{- if .Values.deid.existingSecret -}}
{{- $deid := $spec.deid | default dict -}}
{{- if not $deid.keyFile }}{{ $_ := set $deid "keyFile" (printf "/etc/ctssl/deid/%s" .Values.deid.key) }}{{ end -}}
{{- $_ := set $spec "deid" $deid -}}
{{- end -}}
{{- $res := $spec.resources | default dict -}}
{{- $maxGpus := include "ctssl.maxGpus" . | int -}}
{{- $cpu := .Values.ray.cpuWorkers -}}
{{- $gpu := .Values.ray.gpuWorkers -}}
{{- if not $res.maxConcurrentTrials -}}
{{- $trials := mul ($cpu.maxReplicas | int) (include "ctssl.podCpus" $cpu.resources | int) -}}
{{- if gt $maxGpus 0 }}{{ $trials = $maxGpus }}{{ end -}}
{{- $_ := set $res "maxConcurrentTrials" (max $trials 1) -}}
{{- end -}}
{{- $_ := set $spec "resources" $res -}}
{{- /* the fit of one pre-training run: workers x GPUs, and each worker's CPUs on one pod */ -}}
{{- $workers := $res.workers | default 1 | int -}}
{{- $gpw := $res.gpusPerWorker | default "auto" -}}
{{- $usesGpu := or (and (eq (toString $gpw) "auto") (gt $maxGpus 0)) (and (ne (toString $gpw) "auto") (gt (float64 $gpw) 0.0)) -}}
{{- if $usesGpu -}}
{{- $need := ternary $workers (ceil (mulf $workers (float64 $gpw)) | int) (eq (toString $gpw) "auto") -}}
{{- if gt $need $maxGpus -}}
{{- fail (printf "study.spec.resources: %d worker(s) x %s GPU need %d GPUs but ray.gpuWorkers holds %d (maxReplicas %d x gpus %d)" $workers (toString $gpw) $need $maxGpus ($gpu.maxReplicas | int) ($gpu.gpus | int)) -}}
{{- end -}}
{{- end -}}
{{- $group := ternary $gpu $cpu $usesGpu -}}
{{- $groupName := ternary "gpuWorkers" "cpuWorkers" $usesGpu -}}
{{- if eq ($group.maxReplicas | int) 0 -}}
{{- fail (printf "the study pre-trains on ray.%s, whose maxReplicas is 0" $groupName) -}}
{{- end -}}
{{- $cpw := $res.cpusPerWorker | default 1 | float64 -}}
{{- $podCpus := include "ctssl.podCpus" $group.resources | int -}}
{{- if gt $cpw (float64 $podCpus) -}}
{{- fail (printf "study.spec.resources.cpusPerWorker %v exceeds the %d CPUs of a ray.%s pod (its cpu limit)" $cpw $podCpus $groupName) -}}
{{- end -}}
{{- toYaml $study -}}
{{- end -}}

{{/* Labels of the study's objects and pods: ctx = dict "root" $ ["node" "head"] */}}
{{- define "ctssl.studyLabels" -}}
{{ include "ctssl.labels" (dict "root" .root "component" "study") }}
ctssl.io/study: {{ include "ctssl.studyName" .root | quote }}
{{- with .node }}
ctssl.io/ray-node: {{ . | quote }}
{{- end }}
{{- end -}}
