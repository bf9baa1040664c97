{{/*
The argv of every stage, as JSON lists (read back with fromJsonArray). Mirrors
ray_jobs/k8s/stage_commands.py; the chart tests parse each one with the real `ctssl` parser.
ctx: $cfg, or dict "cfg" $cfg "method" "byol" for pre-training.
*/}}

{{- define "ctssl.argv.prep" -}}
{{- $p := .prep -}}
{{- $a := list "ctssl" "prep" $p.source $p.output "--source" $p.sourceType "--workers" (toString ($p.workers | int)) "--size" (toString ($p.size | int)) "--shard-index" "$(JOB_COMPLETION_INDEX)" "--num-shards" (toString ($p.numShards | int)) -}}
{{- if $p.dataset }}{{ $a = concat $a (list "--dataset" $p.dataset) }}{{ end -}}
{{- if $p.labels }}{{ $a = concat $a (list "--labels" $p.labels) }}{{ end -}}
{{- if $p.deidKeySecret }}{{ $a = append $a "--deid-key-file" }}{{ $a = append $a (printf "/etc/ctssl/deid/%s" $p.deidKeyKey) }}{{ end -}}
{{- range $p.extraArgs }}{{ $a = append $a (toString .) }}{{ end -}}
{{- toJson $a -}}
{{- end -}}

{{- define "ctssl.argv.reduce" -}}
{{- $a := list "ctssl" "reduce" .prep.output .reduce.output "--strategy" .reduce.strategy "--tracking-uri" .mlflow.trackingUri "--experiment" (printf "%s-reduce" .name) -}}
{{- range .reduce.extraArgs }}{{ $a = append $a (toString .) }}{{ end -}}
{{- toJson $a -}}
{{- end -}}

{{- define "ctssl.trainWorkers" -}}
{{- $w := .ray.workers -}}
{{- if gt ($w.gpus | int) 0 -}}{{ mul ($w.replicas | int) ($w.gpus | int) }}{{- else -}}{{ $w.replicas | int }}{{- end -}}
{{- end -}}

{{- define "ctssl.pretrainInput" -}}
{{- if .reduce.enabled }}{{ .reduce.output }}{{ else }}{{ .pretrain.data }}{{ end -}}
{{- end -}}

{{- define "ctssl.argv.pretrain" -}}
{{- $c := .cfg -}}
{{- $p := $c.pretrain -}}
{{- $a := list "ctssl" "pretrain" "--method" .method "--data" $p.data -}}
{{- if $c.reduce.enabled }}{{ $a = concat $a (list "--selection" $c.reduce.output) }}{{ end -}}
{{- $a = concat $a (list "--backbone" $p.backbone "--workers" (include "ctssl.trainWorkers" $c)) -}}
{{- if gt ($c.ray.workers.gpus | int) 0 }}{{ $a = concat $a (list "--gpus-per-worker" "1") }}{{ end -}}
{{- $a = concat $a (list "--cpus-per-worker" (toString $p.cpusPerWorker) "--epochs" (toString ($p.epochs | int)) "--batch-size" (toString ($p.batchSize | int)) "--storage" $p.storage "--experiment" (printf "%s-%s" $c.name .method) "--address" "auto" "--tracking-uri" $c.mlflow.trackingUri) -}}
{{- range $p.extraArgs }}{{ $a = append $a (toString .) }}{{ end -}}
{{- toJson $a -}}
{{- end -}}

{{- define "ctssl.argv.finetune" -}}
{{- $c := . -}}
{{- $f := .finetune -}}
{{- $a := list "ctssl" "finetune" "--data" $f.data "--encoder" "random" -}}
{{- range $c.pretrain.methods }}{{ $a = concat $a (list "--encoder" (printf "%s=%s/%s-%s" . $c.pretrain.storage $c.name .)) }}{{ end -}}
{{- $a = concat $a (list "--backbone" $c.pretrain.backbone) -}}
{{- if $f.samplesPerClass }}{{ $a = concat $a (list "--samples-per-class" (toString $f.samplesPerClass)) }}{{ else }}{{ $a = concat $a (list "--reductions" (toString $f.reductions)) }}{{ end -}}
{{- $a = concat $a (list "--folds" (toString ($f.folds | int)) "--cpus-per-trial" (toString $f.cpusPerTrial) "--gpus-per-trial" (toString $f.gpusPerTrial) "--storage" $f.output "--experiment" (printf "%s-finetune" $c.name) "--address" "auto" "--tracking-uri" $c.mlflow.trackingUri) -}}
{{- range $f.extraArgs }}{{ $a = append $a (toString .) }}{{ end -}}
{{- toJson $a -}}
{{- end -}}

{{- define "ctssl.argv.report" -}}
{{- $a := list "ctssl" "report" "--experiment" (printf "%s-finetune" .name) "--tracking-uri" .mlflow.trackingUri "--out" .report.output -}}
{{- range .report.extraArgs }}{{ $a = append $a (toString .) }}{{ end -}}
{{- toJson $a -}}
{{- end -}}

{{/* ctx: dict "cfg" $cfg "urls" (list ...) "what" "manifest" */}}
{{- define "ctssl.argv.wait" -}}
{{- $a := concat (list "ctssl" "wait-for") .urls (list "--what" .what "--timeout" (toString (.cfg.waitFor.timeoutSeconds | int)) "--poll" (toString (.cfg.waitFor.pollSeconds | int))) -}}
{{- toJson $a -}}
{{- end -}}
