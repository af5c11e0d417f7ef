{{/* Names, labels and the pieces every pod shares. */}}

{{- define "rrp.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "rrp.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "rrp.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "rrp.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* A component's resource name: <fullname>-<component>, at most 63 characters. */}}
{{- define "rrp.component" -}}
{{- printf "%s-%s" (include "rrp.fullname" .root) .name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "rrp.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rrp.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .name }}
{{- end }}

{{- define "rrp.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{ include "rrp.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: rallyrobopilot
{{- end }}

{{/* Labels that open NetworkPolicies: .peers is a list of roles (game-client, collector-client, redis-client, model-client, scheduler-client). */}}
{{- define "rrp.peerLabels" -}}
{{- range .peers }}
rallyrobopilot.io/{{ . }}: "true"
{{- end }}
{{- end }}

{{- define "rrp.image" -}}
{{- $img := index .root.Values.images .image -}}
{{- printf "%s:%s" $img.repository (default .root.Chart.AppVersion $img.tag) }}
{{- end }}

{{- define "rrp.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext }}
{{- end }}

{{- define "rrp.containerSecurityContext" -}}
{{- toYaml .Values.containerSecurityContext }}
{{- end }}

{{/* Prometheus annotations for a pod whose container serves /metrics on .Values.metrics.port. */}}
{{- define "rrp.metricsAnnotations" -}}
{{- if .Values.metrics.enabled }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .Values.metrics.port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end }}

{{- define "rrp.metricsArgs" -}}
{{- if .Values.metrics.enabled }}
- --metrics-port
- {{ .Values.metrics.port | quote }}
{{- end }}
{{- end }}

{{- define "rrp.metricsPort" -}}
{{- if .Values.metrics.enabled }}
- name: metrics
  containerPort: {{ .Values.metrics.port }}
  protocol: TCP
{{- end }}
{{- end }}

{{/* The OTLP endpoint: the values' own, else the chart's Jaeger when it is on, else none (tracing off). */}}
{{- define "rrp.otlpEndpoint" -}}
{{- if .Values.telemetry.otlpEndpoint }}
{{- .Values.telemetry.otlpEndpoint }}
{{- else if .Values.jaeger.enabled }}
{{- printf "http://%s:4317" (include "rrp.component" (dict "root" . "name" "jaeger")) }}
{{- end }}
{{- end }}

{{/* Environment every container gets: OpenTelemetry settings, a writable HOME on the read-only root. */}}
{{- define "rrp.commonEnv" -}}
- name: HOME
  value: /tmp
- name: MPLCONFIGDIR
  value: /tmp/matplotlib
- name: OTEL_SERVICE_NAME
  value: {{ .name }}
{{- $endpoint := include "rrp.otlpEndpoint" .root }}
{{- if $endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ $endpoint | quote }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: grpc
{{- end }}
- name: OTEL_TRACES_SAMPLER
  value: parentbased_traceidratio
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ .root.Values.telemetry.samplingRatio | quote }}
- name: OTEL_PROPAGATORS
  value: tracecontext,baggage
- name: K8S_POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: K8S_NAMESPACE_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: OTEL_RESOURCE_ATTRIBUTES
  value: "k8s.pod.name=$(K8S_POD_NAME),k8s.namespace.name=$(K8S_NAMESPACE_NAME),service.namespace={{ .root.Release.Namespace }},service.version={{ .root.Chart.AppVersion }}"
{{- end }}

{{/* gRPC probes (Kubernetes' own gRPC health checking): liveness on the server, readiness on the named service. */}}
{{- define "rrp.grpcProbes" -}}
startupProbe:
  grpc:
    port: {{ .port }}
  periodSeconds: 2
  failureThreshold: 60
livenessProbe:
  grpc:
    port: {{ .port }}
  periodSeconds: 10
  timeoutSeconds: 2
  failureThreshold: 3
readinessProbe:
  grpc:
    port: {{ .port }}
    service: {{ .service }}
  periodSeconds: 2
  timeoutSeconds: 2
  failureThreshold: 1
{{- end }}

{{/* Writable scratch on a read-only root filesystem. */}}
{{- define "rrp.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit }}
{{- end }}

{{- define "rrp.tmpMount" -}}
- name: tmp
  mountPath: /tmp
{{- end }}

{{- define "rrp.redisSecretName" -}}
{{- default (include "rrp.component" (dict "root" . "name" "redis")) .Values.redis.auth.existingSecret }}
{{- end }}

{{- define "rrp.redisUrl" -}}
{{- printf "redis://%s:%d/0" (include "rrp.component" (dict "root" . "name" "redis")) (int .Values.redis.port) }}
{{- end }}

{{- define "rrp.gameDiscover" -}}
{{- printf "%s.%s.svc.%s:%d" (include "rrp.component" (dict "root" . "name" "game-server")) .Release.Namespace .Values.clusterDomain (int .Values.gameServer.port) }}
{{- end }}

{{- define "rrp.address" -}}
{{- printf "%s:%d" (include "rrp.component" (dict "root" .root "name" .name)) (int .port) }}
{{- end }}

{{- define "rrp.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Scheduling knobs shared by every workload. */}}
{{- define "rrp.scheduling" -}}
{{- with .Values.nodeSelector }}
nodeSelector:
{{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
{{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
