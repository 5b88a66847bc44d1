{{/*
The workloads of a model's stages (encoder, denoiser, vae): pod template, Deployment and Service.
*/}}

{{/*
Selector labels of a stage's pods. dict "root" $ "model" MODEL "component" NAME [ "extra" MAP ].
Denoiser pods also carry imagegen/role: leader (node rank 0: serves gRPC and metrics) or worker.
*/}}
{{- define "imagegen.stageSelectorLabels" -}}
{{- include "imagegen.selectorLabels" (dict "root" .root "component" .component "model" .model "extra" .extra) -}}
{{- end -}}

{{/*
The command of a stage's container, per docs/services.md:
  imagegen serve encoder|vae --model DIR --model-id ID
  imagegen serve denoiser --model DIR --model-id ID --sp P [--ulysses U] [--cfg-parallel] [--default-* V]
                                                                                      (group of 1)
  torchrun --nnodes=1 --nproc-per-node=PxC --no-python imagegen serve denoiser ...     (one-pod group)
  torchrun --nnodes=N --nproc-per-node=PxC/N --node-rank=R --master-addr=LEADER ...    (multi-node group)
dict "root" $ "model" MODEL "component" NAME [ "masterAddr" HOST ] [ "nodeRank" "0" | "$(NODE_RANK)" ].
*/}}
{{- define "imagegen.stageCommand" -}}
{{- $model := .model -}}
{{- $stage := get $model .component -}}
{{- $serve := list "serve" .component "--model" $model.modelDir "--model-id" $model.id -}}
{{- if eq .component "denoiser" -}}
{{- $serve = concat $serve (list "--sp" (printf "%d" (int64 $model.sp))) -}}
{{- if gt (int64 $model.ulysses) 0 -}}
{{- $serve = concat $serve (list "--ulysses" (printf "%d" (int64 $model.ulysses))) -}}
{{- end -}}
{{- if $model.cfgParallel -}}
{{- $serve = append $serve "--cfg-parallel" -}}
{{- end -}}
{{- range $key, $flag := dict "steps" "--default-steps" "guidanceScale" "--default-guidance-scale" "width" "--default-width" "height" "--default-height" "negativePrompt" "--default-negative-prompt" -}}
{{- if hasKey $model.defaults $key -}}
{{- $serve = concat $serve (list $flag (printf "%v" (get $model.defaults $key))) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and (eq .component "denoiser") (gt (int64 $model.world) 1) -}}
{{- $torchrun := list (printf "--nnodes=%d" (int64 $stage.nodesPerGroup)) (printf "--nproc-per-node=%d" (int64 $stage.nprocPerNode)) -}}
{{- if gt (int64 $stage.nodesPerGroup) 1 -}}
{{- $torchrun = concat $torchrun (list (printf "--node-rank=%s" .nodeRank) (printf "--master-addr=%s" .masterAddr) (printf "--master-port=%d" (int64 $stage.masterPort))) -}}
{{- end -}}
command: ["torchrun"]
args:
  {{- toYaml (concat $torchrun (list "--no-python" "imagegen") $serve) | nindent 2 }}
{{- else -}}
command: ["imagegen"]
args:
  {{- toYaml $serve | nindent 2 }}
{{- end -}}
{{- end -}}

{{/*
The pod template of a stage. dict "root" $ "model" MODEL "component" NAME "extra" LABELS
[ "worker" BOOL ] [ "masterAddr" HOST ] [ "nodeRank" "0" ].
Workers (ranks > 0 of a multi-node denoiser group) serve neither gRPC nor metrics: no ports, no probes.
*/}}
{{- define "imagegen.stagePodTemplate" -}}
{{- $root := .root -}}
{{- $model := .model -}}
{{- $component := .component -}}
{{- $stage := get $model $component -}}
{{- $shm := ternary $stage.shmSizeLimit "" (eq $component "denoiser") -}}
{{- $volumeArgs := dict "root" $root "model" $model "shm" $shm "apiKeys" false -}}
metadata:
  labels:
    {{- include "imagegen.labels" (dict "root" $root "component" $component "model" $model "extra" .extra) | nindent 4 }}
    {{- with $stage.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- if .worker }}
  {{- with $stage.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- else }}
  {{- with include "imagegen.podAnnotations" (dict "root" $root "component" $component "spec" $stage) }}
  {{- . | nindent 2 }}
  {{- end }}
  {{- end }}
spec:
  {{- include "imagegen.podCommon" (dict "root" $root "spec" $stage "gpus" $stage.gpus) | nindent 2 }}
  {{- if eq $model.weights.source "tiny" }}
  initContainers:
    {{- include "imagegen.tinyInitContainer" (dict "root" $root "model" $model) | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ $component }}
      image: {{ include "imagegen.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      {{- include "imagegen.stageCommand" . | nindent 6 }}
      {{- if not .worker }}
      ports:
        {{- include "imagegen.containerPorts" (dict "root" $root "component" $component) | nindent 8 }}
      {{- end }}
      env:
        {{- include "imagegen.serviceEnv" (dict "root" $root "component" $component) | nindent 8 }}
        {{- include "imagegen.modelEnv" (dict "root" $root "model" $model "component" $component) | nindent 8 }}
        {{- if .worker }}
        - name: NODE_RANK
          valueFrom:
            fieldRef:
              fieldPath: metadata.labels['apps.kubernetes.io/pod-index']
        {{- end }}
        {{- with $stage.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- if not .worker }}
      {{- include "imagegen.probes" (dict "root" $root "component" $component "probes" $stage.probes) | trim | nindent 6 }}
      {{- end }}
      {{- include "imagegen.resources" (dict "root" $root "resources" $stage.resources "gpus" $stage.gpus) | nindent 6 }}
      {{- include "imagegen.containerSecurityContext" $root | nindent 6 }}
      volumeMounts:
        {{- include "imagegen.volumeMounts" $volumeArgs | nindent 8 }}
  volumes:
    {{- include "imagegen.volumes" $volumeArgs | nindent 4 }}
{{- end -}}

{{/* A stage as a Deployment (encoder, vae, and one-pod denoiser groups). dict "root" $ "model" MODEL
"component" NAME. */}}
{{- define "imagegen.stageDeployment" -}}
{{- $stage := get .model .component -}}
{{- $extra := ternary (dict "imagegen/role" "leader") (dict) (eq .component "denoiser") -}}
{{- $args := dict "root" .root "model" .model "component" .component "extra" $extra -}}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "imagegen.stageName" . }}
  labels:
    {{- include "imagegen.labels" $args | nindent 4 }}
spec:
  replicas: {{ int64 $stage.replicas }}
  {{- with $stage.updateStrategy }}
  strategy:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "imagegen.stageSelectorLabels" $args | nindent 6 }}
  template:
    {{- include "imagegen.stagePodTemplate" $args | nindent 4 }}
{{- end -}}

{{/*
The Service of a stage: headless, so that DNS returns every ready pod and a gRPC client with round_robin spreads
its calls over them (a ClusterIP would pin each HTTP/2 connection to one pod). Denoiser: leaders only.
dict "root" $ "model" MODEL "component" NAME.
*/}}
{{- define "imagegen.stageService" -}}
{{- $ports := include "imagegen.componentPorts" . | fromYaml -}}
{{- $extra := ternary (dict "imagegen/role" "leader") (dict) (eq .component "denoiser") -}}
---
apiVersion: v1
kind: Service
metadata:
  name: {{ include "imagegen.stageName" . }}
  labels:
    {{- include "imagegen.labels" (dict "root" .root "component" .component "model" .model) | nindent 4 }}
spec:
  clusterIP: None
  selector:
    {{- include "imagegen.stageSelectorLabels" (dict "root" .root "component" .component "model" .model "extra" $extra) | nindent 4 }}
  ports:
    - name: grpc
      port: {{ int64 $ports.grpc }}
      targetPort: grpc
      protocol: TCP
      appProtocol: grpc
{{- end -}}
