{{/*
Names, labels, ports and the normalized model list. Pod-level pieces (env, probes, volumes, scheduling) are in
_pod.tpl.
*/}}

{{/* The chart name. */}}
{{- define "imagegen.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* "<release>-<chart>" (or the release name when it already contains the chart name), at most 30 characters
so that the derived names ("<fullname>-<model>-<component>...", model names at most 20) stay within Kubernetes'
limits; multi-node denoiser groups need "<fullname>-<model>" within 37 (checked in imagegen.models). */}}
{{- define "imagegen.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 30 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 30 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 30 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "imagegen.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Selector labels. Argument: dict "root" $ "component" NAME [ "model" MODEL ] [ "extra" MAP ].
Every pod carries app.kubernetes.io/component; model pods also carry imagegen/model.
*/}}
{{- define "imagegen.selectorLabels" -}}
app.kubernetes.io/name: {{ include "imagegen.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- with .model }}
imagegen/model: {{ .name }}
{{- end }}
{{- range $key, $value := .extra }}
{{ $key }}: {{ $value | quote }}
{{- end }}
{{- end -}}

{{/* All labels of an object; same argument as imagegen.selectorLabels. */}}
{{- define "imagegen.labels" -}}
helm.sh/chart: {{ include "imagegen.chart" .root }}
{{ include "imagegen.selectorLabels" . }}
app.kubernetes.io/part-of: imagegen
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The container ports of docs/services.md ("health" is the plaintext health-only port used with TLS). */}}
{{- define "imagegen.ports" -}}
gateway: {grpc: 50051, metrics: 9100, health: 50061, http: 8000}
encoder: {grpc: 50052, metrics: 9101, health: 50062}
denoiser: {grpc: 50053, metrics: 9102, health: 50063}
vae: {grpc: 50054, metrics: 9103, health: 50064}
redis: {redis: 6379}
{{- end -}}

{{/* The ports of one component. Argument: dict "root" $ "component" NAME. Returns YAML; use with fromYaml. */}}
{{- define "imagegen.componentPorts" -}}
{{- get (include "imagegen.ports" .root | fromYaml) .component | toYaml -}}
{{- end -}}

{{- define "imagegen.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{- define "imagegen.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "imagegen.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
imagegen.overlay: copies dict "src" into dict "dst" in place; maps merge key by key, everything else (lists,
scalars, false, 0) replaces. Unlike sprig's merge functions it lets false and 0 override.
*/}}
{{- define "imagegen.overlay" -}}
{{- $dst := .dst -}}
{{- range $key, $value := .src -}}
{{- if and (kindIs "map" $value) (kindIs "map" (get $dst $key)) -}}
{{- include "imagegen.overlay" (dict "dst" (get $dst $key) "src" $value) -}}
{{- else -}}
{{- $_ := set $dst $key $value -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
imagegen.models: the served models, normalized and checked, as YAML {models: [...]}; use
`(include "imagegen.models" . | fromYaml).models`. Each model gets:
  name      DNS-safe short name (given or derived from id), used in resource names and the imagegen/model label
  fullname  "<fullname>-<name>", the prefix of its objects
  modelDir  the folder inside the pods (weights.mountPath/path)
  world     the denoiser group size P x C
  weights   the effective weights block (global, overlaid with the model's own)
  loraDir   the denoiser's IMAGEGEN_LORA_DIR (weights.mountPath/loraPath), or "" without loraPath
  defaults  the model's request defaults (steps, guidanceScale, width, height, negativePrompt), as given
  encoder, denoiser, vae: stageDefaults overlaid with the model's block, with device, dtype and gpus resolved
    (denoiser: gpus and nprocPerNode per pod, P x C / nodesPerGroup)
*/}}
{{- define "imagegen.models" -}}
{{- $root := . -}}
{{- $prefix := include "imagegen.fullname" $root -}}
{{- $out := list -}}
{{- $seenIds := dict -}}
{{- $seenNames := dict -}}
{{- range $i, $m := $root.Values.models -}}
{{- $name := $m.name | default (regexReplaceAll "[^a-z0-9]+" ($m.id | lower) "-" | trimPrefix "-" | trunc 20 | trimSuffix "-") -}}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $name) -}}
{{- fail (printf "models[%d]: cannot derive a DNS-safe name from id %q; set models[%d].name" $i $m.id $i) -}}
{{- end -}}
{{- if hasKey $seenIds $m.id -}}
{{- fail (printf "models[%d]: duplicate id %q" $i $m.id) -}}
{{- end -}}
{{- if hasKey $seenNames $name -}}
{{- fail (printf "models[%d]: name %q is already used by another model; set models[%d].name" $i $name $i) -}}
{{- end -}}
{{- $_ := set $seenIds $m.id true -}}
{{- $_ := set $seenNames $name true -}}
{{- $weights := deepCopy $root.Values.weights -}}
{{- $_ := include "imagegen.overlay" (dict "dst" $weights "src" ($m.weights | default dict)) -}}
{{- $device := $m.device | default "cuda" -}}
{{- $sp := int64 ($m.sp | default 1) -}}
{{- $c := ternary 2 1 (eq ($m.cfgParallel | default false) true) -}}
{{- $world := mul $sp $c -}}
{{- $ulysses := int64 ($m.ulysses | default 0) -}}
{{- if and (gt $ulysses 0) (ne (mod $sp $ulysses) 0) -}}
{{- fail (printf "models[%d] (%s): ulysses %d does not divide sp %d (the group is U x R = sp ranks)" $i $m.id $ulysses $sp) -}}
{{- end -}}
{{- $model := dict "id" $m.id "name" $name "fullname" (printf "%s-%s" $prefix $name) "family" $m.family
      "path" $m.path "modelDir" (printf "%s/%s" (trimSuffix "/" $weights.mountPath) $m.path)
      "device" $device "dtype" ($m.dtype | default "") "sp" $sp "ulysses" $ulysses "cfgParallel" (eq $c 2) "world" $world
      "weights" $weights "tiny" ($m.tiny | default dict) "defaults" ($m.defaults | default dict)
      "loraDir" (ternary (printf "%s/%s" (trimSuffix "/" $weights.mountPath) $m.loraPath) "" (ne ($m.loraPath | default "") "")) -}}
{{- range $stageName := list "encoder" "denoiser" "vae" -}}
{{- $stage := deepCopy (get $root.Values.stageDefaults $stageName) -}}
{{- $_ := include "imagegen.overlay" (dict "dst" $stage "src" ((get $m $stageName) | default dict)) -}}
{{- $_ := set $stage "device" ($stage.device | default $device) -}}
{{- $_ := set $stage "dtype" ($stage.dtype | default $model.dtype) -}}
{{- if eq $stageName "denoiser" -}}
{{- $nodes := int64 $stage.nodesPerGroup -}}
{{- if ne (mod $world $nodes) 0 -}}
{{- fail (printf "models[%d] (%s): denoiser.nodesPerGroup %d does not divide the group size P x C = %d" $i $m.id $nodes $world) -}}
{{- end -}}
{{- if and (gt $nodes 1) (gt (len $model.fullname) 37) -}}
{{- fail (printf "models[%d] (%s): %q is too long for the StatefulSets of multi-node groups (37 characters at most); shorten models[%d].name or set fullnameOverride" $i $m.id $model.fullname $i) -}}
{{- end -}}
{{- $_ := set $stage "nodesPerGroup" $nodes -}}
{{- $_ := set $stage "nprocPerNode" (div $world $nodes) -}}
{{- $_ := set $stage "gpus" (ternary (div $world $nodes) 0 (eq $stage.device "cuda")) -}}
{{- else -}}
{{- $_ := set $stage "gpus" (ternary (int64 $stage.gpus) 0 (eq $stage.device "cuda")) -}}
{{- end -}}
{{- if hasKey ($stage.resources.limits | default dict) $root.Values.gpu.resourceName -}}
{{- fail (printf "models[%d] (%s): do not set %s in %s.resources; the chart derives it (encoder/vae: gpus; denoiser: P x C / nodesPerGroup)" $i $m.id $root.Values.gpu.resourceName $stageName) -}}
{{- end -}}
{{- if hasKey ($stage.resources.requests | default dict) $root.Values.gpu.resourceName -}}
{{- fail (printf "models[%d] (%s): do not set %s in %s.resources; the chart derives it (encoder/vae: gpus; denoiser: P x C / nodesPerGroup)" $i $m.id $root.Values.gpu.resourceName $stageName) -}}
{{- end -}}
{{- $_ := set $model $stageName $stage -}}
{{- end -}}
{{- $out = append $out $model -}}
{{- end -}}
{{- toYaml (dict "models" $out) -}}
{{- end -}}

{{/* Object names of a model's stage: dict "model" MODEL "component" NAME. */}}
{{- define "imagegen.stageName" -}}
{{- printf "%s-%s" .model.fullname .component -}}
{{- end -}}

{{/* The gateway's IMAGEGEN_ROUTES: {"MODEL_ID": {"encoder": "svc:port", "denoiser": ..., "vae": ...}}. */}}
{{- define "imagegen.routes" -}}
{{- $root := . -}}
{{- $ports := include "imagegen.ports" $root | fromYaml -}}
{{- $routes := dict -}}
{{- range $m := (include "imagegen.models" $root | fromYaml).models -}}
{{- $route := dict -}}
{{- range $component := list "encoder" "denoiser" "vae" -}}
{{- $port := int64 (get (get $ports $component) "grpc") -}}
{{- $_ := set $route $component (printf "%s:%d" (include "imagegen.stageName" (dict "model" $m "component" $component)) $port) -}}
{{- end -}}
{{- $_ := set $routes $m.id $route -}}
{{- end -}}
{{- toJson $routes -}}
{{- end -}}

{{/* Redis: the URL the services use ("" in mode none). */}}
{{- define "imagegen.redisUrl" -}}
{{- if eq .Values.redis.mode "internal" -}}
{{- printf "redis://%s-redis:%d/%d" (include "imagegen.fullname" .) 6379 (int64 .Values.redis.internal.database) -}}
{{- else if eq .Values.redis.mode "external" -}}
{{- required "redis.external.url is required when redis.mode is external" .Values.redis.external.url -}}
{{- end -}}
{{- end -}}

{{/* Redis: the Secret holding the password (an existing one or the chart's). */}}
{{- define "imagegen.redisSecretName" -}}
{{- .Values.redis.auth.existingSecret | default (printf "%s-redis" (include "imagegen.fullname" .)) -}}
{{- end -}}

{{- define "imagegen.redisSecretKey" -}}
{{- if .Values.redis.auth.existingSecret -}}
{{- .Values.redis.auth.existingSecretKey -}}
{{- else -}}
redis-password
{{- end -}}
{{- end -}}

{{/* True ("true") when Redis is used with a password. */}}
{{- define "imagegen.redisAuth" -}}
{{- if and (ne .Values.redis.mode "none") .Values.redis.auth.enabled -}}
{{- if or (eq .Values.redis.mode "internal") .Values.redis.auth.password .Values.redis.auth.existingSecret -}}
true
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "imagegen.tlsSecretName" -}}
{{- .Values.tls.existingSecret | default (printf "%s-tls" (include "imagegen.fullname" .)) -}}
{{- end -}}

{{/* True ("true") with mTLS between the gateway and the internal services (the TLS Secret's ca.crt). */}}
{{- define "imagegen.tlsMutual" -}}
{{- if and .Values.tls.enabled .Values.tls.mtls -}}
true
{{- end -}}
{{- end -}}

{{- define "imagegen.apiKeysSecretName" -}}
{{- .Values.gateway.apiKeys.existingSecret | default (printf "%s-api-keys" (include "imagegen.fullname" .)) -}}
{{- end -}}

{{- define "imagegen.apiKeysSecretKey" -}}
{{- if .Values.gateway.apiKeys.existingSecret -}}
{{- .Values.gateway.apiKeys.existingSecretKey -}}
{{- else -}}
api-keys
{{- end -}}
{{- end -}}

{{/* The model the gateway uses when a request names none. */}}
{{- define "imagegen.defaultModel" -}}
{{- $first := index .Values.models 0 -}}
{{- $id := .Values.gateway.defaultModel | default $first.id -}}
{{- $ids := list -}}
{{- range .Values.models }}{{ $ids = append $ids .id }}{{ end -}}
{{- if not (has $id $ids) -}}
{{- fail (printf "gateway.defaultModel %q is not the id of a model in models" $id) -}}
{{- end -}}
{{- $id -}}
{{- end -}}

{{/* The internal token's Secret and key (internalToken). */}}
{{- define "imagegen.internalTokenSecretName" -}}
{{- .Values.internalToken.existingSecret | default (printf "%s-internal-token" (include "imagegen.fullname" .)) -}}
{{- end -}}

{{- define "imagegen.internalTokenSecretKey" -}}
{{- if .Values.internalToken.existingSecret -}}
{{- .Values.internalToken.existingSecretKey -}}
{{- else -}}
internal-token
{{- end -}}
{{- end -}}
