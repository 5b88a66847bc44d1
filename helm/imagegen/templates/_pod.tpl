{{/*
Pod-level pieces shared by the gateway, encoder, denoiser and VAE pods.
*/}}

{{/*
Pod spec fields common to every imagegen pod: identity, security, termination, scheduling.
Argument: dict "root" $ "spec" STAGE_OR_GATEWAY_BLOCK "gpus" N.
Pods that request GPUs also get gpu.nodeSelector and gpu.tolerations.
*/}}
{{- define "imagegen.podCommon" -}}
{{- $root := .root -}}
serviceAccountName: {{ include "imagegen.serviceAccountName" $root }}
automountServiceAccountToken: false
# No *_SERVICE_HOST/*_PORT variables: a Service named like "imagegen" would inject IMAGEGEN_PORT=tcp://...
enableServiceLinks: false
securityContext:
  {{- toYaml $root.Values.podSecurityContext | nindent 2 }}
{{- /* The kubelet kills a pod this long after SIGTERM: the drain, plus time to release the group and exit. */}}
terminationGracePeriodSeconds: {{ add (int64 $root.Values.drainTimeoutSeconds) 15 }}
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- $nodeSelector := dict -}}
{{- $tolerations := list -}}
{{- if gt (int64 .gpus) 0 -}}
{{- $nodeSelector = merge $nodeSelector (deepCopy $root.Values.gpu.nodeSelector) -}}
{{- $tolerations = concat $tolerations $root.Values.gpu.tolerations -}}
{{- end -}}
{{- $nodeSelector = mergeOverwrite $nodeSelector (.spec.nodeSelector | default dict) -}}
{{- $tolerations = concat $tolerations (.spec.tolerations | default list) -}}
{{- with $nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .spec.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Container security context (every container). */}}
{{- define "imagegen.containerSecurityContext" -}}
securityContext:
  {{- toYaml .Values.containerSecurityContext | nindent 2 }}
{{- end -}}

{{/* Pod annotations: the block's podAnnotations plus Prometheus scrape hints. dict "root" $ "component" NAME
"spec" BLOCK. Renders nothing when there are none. */}}
{{- define "imagegen.podAnnotations" -}}
{{- $annotations := deepCopy (.spec.podAnnotations | default dict) -}}
{{- if and .root.Values.metrics.enabled .root.Values.metrics.annotations -}}
{{- $ports := include "imagegen.componentPorts" . | fromYaml -}}
{{- $_ := set $annotations "prometheus.io/scrape" "true" -}}
{{- $_ := set $annotations "prometheus.io/port" (printf "%d" (int64 $ports.metrics)) -}}
{{- $_ := set $annotations "prometheus.io/path" "/metrics" -}}
{{- end -}}
{{- with $annotations -}}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end -}}
{{- end -}}

{{/*
Environment common to every imagegen container: ports, logging, drain, TLS, and the writable cache locations
(the root filesystem is read-only). dict "root" $ "component" NAME.
*/}}
{{- define "imagegen.serviceEnv" -}}
{{- $root := .root -}}
{{- $ports := include "imagegen.componentPorts" . | fromYaml -}}
- name: IMAGEGEN_PORT
  value: {{ int64 $ports.grpc | quote }}
- name: IMAGEGEN_METRICS_PORT
  value: {{ ternary (int64 $ports.metrics) 0 $root.Values.metrics.enabled | quote }}
- name: IMAGEGEN_LOG_LEVEL
  value: {{ $root.Values.logLevel | quote }}
- name: IMAGEGEN_DRAIN_TIMEOUT
  value: {{ int64 $root.Values.drainTimeoutSeconds | quote }}
{{- /* Every service checks requests against the same limits: the gateway its public ones, the stages their
internal ones (a stage with lower limits than the gateway would refuse what the gateway accepted). */}}
{{- range $key, $value := $root.Values.gateway.requestLimits }}
- name: IMAGEGEN_{{ $key | snakecase | upper }}
  value: {{ int64 $value | quote }}
{{- end }}
{{- if $root.Values.tls.enabled }}
- name: IMAGEGEN_TLS_CERT
  value: /etc/imagegen/tls/tls.crt
- name: IMAGEGEN_TLS_KEY
  value: /etc/imagegen/tls/tls.key
{{- /* The gateway verifies the internal services with the CA; they require client certificates only with mtls. */}}
{{- if or (eq .component "gateway") (include "imagegen.tlsMutual" $root) }}
- name: IMAGEGEN_TLS_CA
  value: /etc/imagegen/tls/ca.crt
{{- end }}
- name: IMAGEGEN_HEALTH_PORT
  value: {{ int64 $ports.health | quote }}
{{- end }}
{{- /* Issue 20: metrics on the pod address (services default to loopback), the internal token, and the opt-in to
listening without credentials where the chart has none to give (checked in gateway.yaml for exposed gateways). */}}
- name: IMAGEGEN_METRICS_HOST
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
{{- if $root.Values.internalToken.enabled }}
- name: IMAGEGEN_INTERNAL_TOKEN_FILE
  value: /etc/imagegen/internal/internal-token
{{- end }}
{{- if or (and (eq .component "gateway") (not $root.Values.gateway.apiKeys.enabled)) (and (ne .component "gateway") (not $root.Values.internalToken.enabled)) }}
- name: IMAGEGEN_ALLOW_UNAUTHENTICATED
  value: "1"
{{- end }}
{{ include "imagegen.runtimeEnv" $root }}
{{- end -}}

{{/* Writable locations for everything that caches (HOME, Hugging Face, torch/triton compile caches). */}}
{{- define "imagegen.runtimeEnv" -}}
- name: HOME
  value: /cache
- name: XDG_CACHE_HOME
  value: /cache
- name: HF_HOME
  value: /cache/huggingface
- name: HF_HUB_OFFLINE
  value: "1"
- name: TORCHINDUCTOR_CACHE_DIR
  value: /cache/torchinductor
- name: TRITON_CACHE_DIR
  value: /cache/triton
- name: IMAGEGEN_CACHE
  value: /cache/imagegen
{{- end -}}

{{/*
Environment of a model stage (encoder, denoiser, vae): device, dtype, the embedding cache, the queue.
dict "root" $ "model" MODEL "component" NAME.
*/}}
{{- define "imagegen.modelEnv" -}}
{{- $root := .root -}}
{{- $stage := get .model .component -}}
{{- /* Stages bind 127.0.0.1 unless told otherwise: here, the pod's own address (the gateway, the kubelet's
probes and Prometheus reach them there). */}}
- name: IMAGEGEN_HOST
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: IMAGEGEN_DEVICE
  value: {{ $stage.device | quote }}
{{- with $stage.dtype }}
- name: IMAGEGEN_DTYPE
  value: {{ . | quote }}
{{- end }}
{{- if has .component (list "encoder" "denoiser") }}
{{- with include "imagegen.redisUrl" $root }}
- name: IMAGEGEN_REDIS_URL
  value: {{ . | quote }}
{{- end }}
{{- if include "imagegen.redisAuth" $root }}
- name: IMAGEGEN_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "imagegen.redisSecretName" $root }}
      key: {{ include "imagegen.redisSecretKey" $root }}
{{- end }}
- name: IMAGEGEN_CACHE_TTL
  value: {{ int64 $root.Values.embeddingCache.ttlSeconds | quote }}
- name: IMAGEGEN_CACHE_BYTES
  value: {{ int64 $root.Values.embeddingCache.lruBytes | quote }}
{{- end }}
{{- if eq .component "denoiser" }}
- name: IMAGEGEN_QUEUE_SIZE
  value: {{ int64 $stage.queueSize | quote }}
{{- if gt (int64 $stage.maxBatch) 0 }}
- name: IMAGEGEN_MAX_BATCH
  value: {{ int64 $stage.maxBatch | quote }}
{{- end }}
- name: IMAGEGEN_BATCH_WAIT_MS
  value: {{ $stage.batchWaitMs | toString | quote }}
{{- with .model.loraDir }}
- name: IMAGEGEN_LORA_DIR
  value: {{ . | quote }}
{{- end }}
{{- if gt (int64 .model.world) 1 }}
{{- /* torchrun forwards SIGTERM to every rank, then kills them after this many seconds: rank 0 must be able
to finish its drain (--drain-timeout) and release the other ranks first. */}}
- name: TORCH_ELASTIC_SHUTDOWN_TIMEOUT
  value: {{ add (int64 $root.Values.drainTimeoutSeconds) 10 | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/*
Container ports: grpc, metrics (when enabled) and, with TLS, the plaintext health port. dict "root" $
"component" NAME.
*/}}
{{- define "imagegen.containerPorts" -}}
{{- $ports := include "imagegen.componentPorts" . | fromYaml -}}
- name: grpc
  containerPort: {{ int64 $ports.grpc }}
  protocol: TCP
{{- if .root.Values.metrics.enabled }}
- name: metrics
  containerPort: {{ int64 $ports.metrics }}
  protocol: TCP
{{- end }}
{{- if .root.Values.tls.enabled }}
- name: health
  containerPort: {{ int64 $ports.health }}
  protocol: TCP
{{- end }}
{{- end -}}

{{/*
Native gRPC startup, readiness and liveness probes on grpc.health.v1 (service ""), on the gRPC port, or on the
plaintext health port with TLS on (the kubelet's gRPC probe cannot do TLS). dict "root" $ "component" NAME
"probes" {startup, readiness, liveness}.
*/}}
{{- define "imagegen.probes" -}}
{{- $ports := include "imagegen.componentPorts" . | fromYaml -}}
{{- $port := ternary $ports.health $ports.grpc .root.Values.tls.enabled -}}
{{- range $kind := list "startup" "readiness" "liveness" }}
{{ $kind }}Probe:
  grpc:
    port: {{ int64 $port }}
  {{- range $field, $value := get $.probes $kind }}
  {{ $field }}: {{ int64 $value }}
  {{- end }}
{{- end }}
{{- end -}}

{{/* Resources with the GPU count (request = limit) added. dict "root" $ "resources" MAP "gpus" N. */}}
{{- define "imagegen.resources" -}}
{{- $resources := deepCopy (.resources | default dict) -}}
{{- if gt (int64 .gpus) 0 -}}
{{- $limits := $resources.limits | default dict -}}
{{- $requests := $resources.requests | default dict -}}
{{- $_ := set $limits .root.Values.gpu.resourceName (int64 .gpus) -}}
{{- $_ := set $requests .root.Values.gpu.resourceName (int64 .gpus) -}}
{{- $_ := set $resources "limits" $limits -}}
{{- $_ := set $resources "requests" $requests -}}
{{- end -}}
resources:
  {{- toYaml $resources | nindent 2 }}
{{- end -}}

{{/*
Volumes of an imagegen pod: /tmp and /cache scratch, TLS material, and for model pods the weights (and /dev/shm
for the denoiser). dict "root" $ "model" MODEL_OR_NIL "shm" SIZE_OR_"" "apiKeys" BOOL.
*/}}
{{- define "imagegen.volumes" -}}
{{- $root := .root -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ $root.Values.scratch.tmpSizeLimit }}
- name: cache
  emptyDir:
    sizeLimit: {{ $root.Values.scratch.cacheSizeLimit }}
{{- if $root.Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ include "imagegen.tlsSecretName" $root }}
    defaultMode: 0440
{{- end }}
{{- if $root.Values.internalToken.enabled }}
- name: internal-token
  secret:
    secretName: {{ include "imagegen.internalTokenSecretName" $root }}
    defaultMode: 0440
    items:
      - key: {{ include "imagegen.internalTokenSecretKey" $root }}
        path: internal-token
{{- end }}
{{- if .apiKeys }}
- name: api-keys
  secret:
    secretName: {{ include "imagegen.apiKeysSecretName" $root }}
    defaultMode: 0440
    items:
      - key: {{ include "imagegen.apiKeysSecretKey" $root }}
        path: api-keys
{{- end }}
{{- with .model }}
{{- $weights := .weights }}
- name: weights
{{- if eq $weights.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ required "weights.pvc.claimName is required with weights.source pvc" $weights.pvc.claimName }}
    readOnly: true
{{- else if eq $weights.source "hostPath" }}
  hostPath:
    path: {{ required "weights.hostPath.path is required with weights.source hostPath" $weights.hostPath.path }}
    type: {{ $weights.hostPath.type }}
{{- else }}
  emptyDir:
    sizeLimit: {{ $weights.tiny.sizeLimit }}
{{- end }}
{{- end }}
{{- with .shm }}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ . }}
{{- end }}
{{- end -}}

{{/* The mounts matching imagegen.volumes; the weights are always read-only here. Same argument. */}}
{{- define "imagegen.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: cache
  mountPath: /cache
{{- if .root.Values.tls.enabled }}
- name: tls
  mountPath: /etc/imagegen/tls
  readOnly: true
{{- end }}
{{- if .root.Values.internalToken.enabled }}
- name: internal-token
  mountPath: /etc/imagegen/internal
  readOnly: true
{{- end }}
{{- if .apiKeys }}
- name: api-keys
  mountPath: /etc/imagegen/api-keys
  readOnly: true
{{- end }}
{{- with .model }}
- name: weights
  mountPath: {{ .weights.mountPath }}
  readOnly: true
{{- end }}
{{- if .shm }}
- name: shm
  mountPath: /dev/shm
{{- end }}
{{- end -}}

{{/*
weights.source tiny: an init container writes a tiny random-weight checkpoint of the model's family into the
emptyDir (`imagegen make-tiny`; deterministic for a seed, so every pod of the model builds the same weights).
dict "root" $ "model" MODEL.
*/}}
{{- define "imagegen.tinyInitContainer" -}}
{{- $root := .root -}}
{{- $model := .model -}}
- name: make-tiny
  image: {{ include "imagegen.image" $root }}
  imagePullPolicy: {{ $root.Values.image.pullPolicy }}
  command: ["imagegen"]
  args:
    - make-tiny
    - --family
    - {{ $model.family | quote }}
    {{- with $model.tiny.variant }}
    - --variant
    - {{ . | quote }}
    {{- end }}
    - --seed
    - {{ int64 ($model.tiny.seed | default 0) | quote }}
    - --out
    - {{ $model.modelDir | quote }}
  env:
    {{- include "imagegen.runtimeEnv" $root | nindent 4 }}
  resources:
    requests:
      cpu: 500m
      memory: 1Gi
    limits:
      memory: 4Gi
  {{- include "imagegen.containerSecurityContext" $root | nindent 2 }}
  volumeMounts:
    - name: tmp
      mountPath: /tmp
    - name: cache
      mountPath: /cache
    - name: weights
      mountPath: {{ $model.weights.mountPath }}
{{- end -}}
