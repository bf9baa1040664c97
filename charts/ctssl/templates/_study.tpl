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
worker groups (Ray would otherwise wait for resources the autoscaler can never add). The head's
driver skips ctssl's own capacity check (CTSSL_SKIP_CAPACITY_CHECK: the groups start empty), so this
is the whole check: its GPUs, each worker's CPUs on one pod, the group's pods at maxReplicas holding
every worker, and one CPU of the cluster left for the data reads beside them, as ctssl's check
asks. The head offers Ray no CPUs (num-cpus 0), so it counts for nothing here.
*/}}
{{- define "ctssl.studyFile" -}}
{{- $study := deepCopy .Values.study -}}
{{- $name := include "ctssl.studyName" . -}}
{{- $spec := $study.spec -}}
{{- $_ := set $spec "storage" (include "ctssl.studyStorage" .) -}}
{{- $tracking := $spec.tracking | default dict -}}
{{- with $tracking.uri }}{{ include "ctssl.refuseLogin" (dict "uri" . "key" "study.spec.tracking.uri") }}{{ end -}}
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
{{- /* a worker's CPUs (and GPUs) are on one pod: how many workers one pod holds, and the group */ -}}
{{- $perPod := floor (addf (divf $podCpus $cpw) 0.000001) | int -}}
{{- if $usesGpu -}}
{{- $gpwNum := ternary 1.0 (float64 $gpw) (eq (toString $gpw) "auto") -}}
{{- $byGpu := floor (addf (divf ($gpu.gpus | int) $gpwNum) 0.000001) | int -}}
{{- $perPod = min $perPod $byGpu -}}
{{- end -}}
{{- $maxWorkers := mul ($group.maxReplicas | int) $perPod -}}
{{- if gt $workers $maxWorkers -}}
{{- fail (printf "study.spec.resources: %d worker(s) x %v CPUs cannot all be placed: ray.%s holds %d at most (maxReplicas %d pods x %d per pod; a pod has %d CPUs, its cpu limit%s); raise ray.%s.maxReplicas or its resources.limits.cpu, or lower study.spec.resources.workers or cpusPerWorker" $workers $cpw $groupName $maxWorkers ($group.maxReplicas | int) $perPod $podCpus (ternary (printf ", and %d GPU(s)" ($gpu.gpus | int)) "" $usesGpu) $groupName) -}}
{{- end -}}
{{- /* ctssl's check: pre-training streams its data with Ray Data, whose read tasks need a CPU too */ -}}
{{- $clusterCpus := add (mul ($cpu.maxReplicas | int) (include "ctssl.podCpus" $cpu.resources | int)) (mul ($gpu.maxReplicas | int) (include "ctssl.podCpus" $gpu.resources | int)) -}}
{{- $needCpus := mulf $workers $cpw -}}
{{- if gt (addf $needCpus 1.0) (addf (float64 $clusterCpus) 0.000001) -}}
{{- fail (printf "study.spec.resources: %d worker(s) x %v CPUs take %v of the %d CPUs the worker groups hold at their largest (ray.cpuWorkers and ray.gpuWorkers: maxReplicas x cpu limit) and leave none for pre-training's data reads, which need 1; raise ray.%s.maxReplicas or its resources.limits.cpu, or lower study.spec.resources.workers or cpusPerWorker" $workers $cpw $needCpus $clusterCpus $groupName) -}}
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

{{/*
The `ray start` flags of every Ray pod that fix the ports Ray would otherwise pick at random, so that
the Ray NetworkPolicy can admit exactly these (networkpolicies.yaml, ctssl.rayPorts).
*/}}
{{- define "ctssl.rayPortParams" -}}
{{- $p := .Values.ray.ports -}}
node-manager-port: {{ $p.nodeManager | int | quote }}
object-manager-port: {{ $p.objectManager | int | quote }}
runtime-env-agent-port: {{ $p.runtimeEnvAgent | int | quote }}
dashboard-agent-grpc-port: {{ $p.dashboardAgentGrpc | int | quote }}
dashboard-agent-listen-port: {{ $p.dashboardAgentListen | int | quote }}
metrics-export-port: {{ $p.metricsExport | int | quote }}
min-worker-port: {{ $p.minWorker | int | quote }}
max-worker-port: {{ $p.maxWorker | int | quote }}
{{- end -}}

{{/*
Every port a study's Ray pod listens on for the others, as NetworkPolicy `ports` entries: GCS, the
dashboard / job API and the client server (fixed, as KubeRay's head Service names them) and the
ports of ray.ports, the worker processes' range as one entry.
*/}}
{{- define "ctssl.rayPorts" -}}
{{- $p := .Values.ray.ports -}}
{{- if lt ($p.maxWorker | int) ($p.minWorker | int) -}}
{{- fail (printf "ray.ports.maxWorker %d is below ray.ports.minWorker %d" ($p.maxWorker | int) ($p.minWorker | int)) -}}
{{- end -}}
{{- range $port := list 6379 8265 10001 $p.nodeManager $p.objectManager $p.runtimeEnvAgent $p.dashboardAgentGrpc $p.dashboardAgentListen $p.metricsExport }}
- port: {{ $port | int }}
  protocol: TCP
{{- end }}
- port: {{ $p.minWorker | int }}
  endPort: {{ $p.maxWorker | int }}
  protocol: TCP
{{- end -}}
