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

{{/* An image by digest (repo@sha256:...) when images.<name>.digest is set, else by tag. */}}
{{- define "rrp.image" -}}
{{- $img := index .root.Values.images .image -}}
{{- if $img.digest }}
{{- printf "%s@%s" $img.repository $img.digest }}
{{- else }}
{{- printf "%s:%s" $img.repository (default .root.Chart.AppVersion $img.tag) }}
{{- end }}
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

{{/* gRPC probes (Kubernetes' own gRPC health checking): liveness on the server, readiness on the named service.
With TLS on, the kubelet's gRPC probe (plaintext) cannot check the port: the probes run the image's health check in
the container instead (.name: the Service whose name the certificate carries). */}}
{{- define "rrp.grpcProbes" -}}
{{- if include "rrp.tlsOn" .root }}
startupProbe:
  exec:
    command: {{ include "rrp.tlsHealthCommand" . }}
  periodSeconds: 2
  timeoutSeconds: 5
  failureThreshold: 60
livenessProbe:
  exec:
    command: {{ include "rrp.tlsHealthCommand" . }}
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 3
readinessProbe:
  exec:
    command: {{ include "rrp.tlsHealthCommand" (merge (dict "readiness" true) .) }}
  periodSeconds: 2
  timeoutSeconds: 5
  failureThreshold: 1
{{- else }}
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
{{- end }}

{{/* The image's gRPC health check over TLS, as a JSON command: the pod's own port on loopback, the certificate
checked for the component's Service name (.name), .service asked with .readiness. */}}
{{- define "rrp.tlsHealthCommand" -}}
{{- $check := list "/opt/rrp/bin/python" "/opt/rrp/healthcheck.py" "--address" (printf "127.0.0.1:%d" (int .port)) }}
{{- if and .readiness .service }}
{{- $check = concat $check (list "--service" .service) }}
{{- end }}
{{- $name := include "rrp.component" (dict "root" .root "name" .name) }}
{{- concat $check (include "rrp.tlsClientArgs" (dict "root" .root "name" $name) | fromYamlArray) | toJson }}
{{- end }}

{{/* TLS on every gRPC port (tls.enabled): the Secret tls.existingSecret (tls.crt, tls.key, ca.crt) mounted into
every gRPC server and client; servers serve with its certificate, clients trust its CA (and, with tls.mutual, show
its certificate too). "true" when on; refuses to render TLS without a Secret, or before a TorchServe with no front. */}}
{{- define "rrp.tlsOn" -}}
{{- if .Values.tls.enabled }}
{{- if not .Values.tls.existingSecret }}
{{- fail "tls.enabled needs tls.existingSecret: a Secret with tls.crt, tls.key and ca.crt (cert-manager's, say) whose certificate names every Service of the release" }}
{{- end }}
{{- if and .Values.torchserve.enabled (not .Values.torchserve.auth.enabled) }}
{{- fail "tls.enabled needs torchserve.auth.enabled: TorchServe's TLS port is its front, rrp auth-proxy" }}
{{- end }}true
{{- end }}
{{- end }}

{{- define "rrp.tlsVolume" -}}
{{- if include "rrp.tlsOn" . }}
- name: tls
  secret:
    secretName: {{ .Values.tls.existingSecret }}
    defaultMode: 0400
    items:
      - key: tls.crt
        path: tls.crt
      - key: tls.key
        path: tls.key
      - key: ca.crt
        path: ca.crt
{{- end }}
{{- end }}

{{- define "rrp.tlsMount" -}}
{{- if include "rrp.tlsOn" . }}
- name: tls
  mountPath: /var/run/secrets/rrp/tls
  readOnly: true
{{- end }}
{{- end }}

{{/* A server's TLS flags (rrp game-server, scheduler, collector, auth-proxy). */}}
{{- define "rrp.tlsServerArgs" -}}
{{- if include "rrp.tlsOn" . }}
- --tls-cert
- /var/run/secrets/rrp/tls/tls.crt
- --tls-key
- /var/run/secrets/rrp/tls/tls.key
{{- if .Values.tls.mutual }}
- --tls-client-ca
- /var/run/secrets/rrp/tls/ca.crt
{{- end }}
{{- end }}
{{- end }}

{{/* A client's TLS flags (.root; .name: the name to check in the servers' certificates when tls.serverName is
empty; none: the name dialled). */}}
{{- define "rrp.tlsClientArgs" -}}
{{- if include "rrp.tlsOn" .root }}
- --tls-ca
- /var/run/secrets/rrp/tls/ca.crt
{{- if .root.Values.tls.mutual }}
- --tls-client-cert
- /var/run/secrets/rrp/tls/tls.crt
- --tls-client-key
- /var/run/secrets/rrp/tls/tls.key
{{- end }}
{{- with (.root.Values.tls.serverName | default .name) }}
- --tls-server-name
- {{ . | quote }}
{{- end }}
{{- end }}
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

{{/* Placement of a replicated workload: soft anti-affinity per node and a soft spread over zones and nodes, so
that replicas land apart where the cluster allows and still schedule where it does not. */}}
{{- define "rrp.placement" -}}
affinity:
  podAntiAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 100
        podAffinityTerm:
          topologyKey: kubernetes.io/hostname
          labelSelector:
            matchLabels:
              {{- include "rrp.selectorLabels" . | nindent 14 }}
topologySpreadConstraints:
  - maxSkew: 1
    topologyKey: topology.kubernetes.io/zone
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        {{- include "rrp.selectorLabels" . | nindent 8 }}
  - maxSkew: 1
    topologyKey: kubernetes.io/hostname
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        {{- include "rrp.selectorLabels" . | nindent 8 }}
{{- end }}

{{/* A PodDisruptionBudget; .budget holds minAvailable or maxUnavailable. Unhealthy pods (not ready: a TorchServe
waiting for its first model, a crash-looping one) may always be evicted, so they never block a node drain. */}}
{{- define "rrp.pdb" -}}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "rrp.component" . }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "rrp.labels" . | nindent 4 }}
spec:
  {{- if hasKey .budget "maxUnavailable" }}
  maxUnavailable: {{ .budget.maxUnavailable }}
  {{- else }}
  minAvailable: {{ .budget.minAvailable }}
  {{- end }}
  unhealthyPodEvictionPolicy: AlwaysAllow
  selector:
    matchLabels:
      {{- include "rrp.selectorLabels" . | nindent 6 }}
{{- end }}

{{/* The checksum of the Redis password, as a pod annotation: a changed password rolls Redis and its clients. An
existingSecret is read with lookup (empty under `helm template`, so the annotation stays constant there: GitOps
tools roll pods with their own secret reloaders). */}}
{{- define "rrp.redisChecksum" -}}
{{- if .Values.redis.auth.existingSecret }}
{{- $s := lookup "v1" "Secret" .Release.Namespace .Values.redis.auth.existingSecret }}
checksum/redis-auth: {{ (dig "data" "password" "" ($s | default dict)) | sha256sum | quote }}
{{- else }}
checksum/redis-auth: {{ include "rrp.redisPassword" . | sha256sum | quote }}
{{- end }}
{{- end }}

{{/* The generated Redis password (base64), the same for every template that asks within one render: kept from the
live Secret when there is one (install, upgrade), else made once and memoised in .Values. */}}
{{- define "rrp.redisPassword" -}}
{{- if not (hasKey .Values.redis.auth "generated") }}
{{- $old := lookup "v1" "Secret" .Release.Namespace (include "rrp.component" (dict "root" . "name" "redis")) }}
{{- $_ := set .Values.redis.auth "generated" (dig "data" "password" (randAlphaNum 32 | b64enc) ($old | default dict)) }}
{{- end }}
{{- .Values.redis.auth.generated }}
{{- end }}

{{/* A store (PVC) mounted by several pods (.sharers > 1) must be ReadWriteMany, unless singleNode says every pod
runs on one node (ReadWriteOnce is per node); ReadWriteOncePod is never shared. */}}
{{- define "rrp.checkSharedStore" -}}
{{- if gt (int .sharers) 1 }}
{{- if eq .accessMode "ReadWriteOncePod" }}
{{- fail (printf "%s: ReadWriteOncePod, but %d workloads mount it: use ReadWriteMany" .what (int .sharers)) }}
{{- end }}
{{- if and (eq .accessMode "ReadWriteOnce") (not .root.Values.singleNode) }}
{{- fail (printf "%s: ReadWriteOnce, but %d workloads mount it and pods on other nodes would hang on Multi-Attach: use ReadWriteMany (a RWX StorageClass), or set singleNode=true on a one-node cluster" .what (int .sharers)) }}
{{- end }}
{{- end }}
{{- end }}

{{/* The shared inference token (base64) of a generated model-token Secret: kept from the live Secret, else made once
per render (memoised in .Values, like the Redis password). */}}
{{- define "rrp.modelToken" -}}
{{- if not (hasKey .Values.torchserve.auth "generated") }}
{{- $old := lookup "v1" "Secret" .Release.Namespace (include "rrp.component" (dict "root" . "name" "model-token")) }}
{{- $_ := set .Values.torchserve.auth "generated" (dig "data" "token" (randAlphaNum 40 | b64enc) ($old | default dict)) }}
{{- end }}
{{- .Values.torchserve.auth.generated }}
{{- end }}

{{- define "rrp.modelTokenSecretName" -}}
{{- default (include "rrp.component" (dict "root" . "name" "model-token")) .Values.torchserve.auth.existingSecret }}
{{- end }}

{{- define "rrp.modelTokenChecksum" -}}
{{- if .Values.torchserve.auth.existingSecret }}
{{- $s := lookup "v1" "Secret" .Release.Namespace .Values.torchserve.auth.existingSecret }}
checksum/model-token: {{ (dig "data" "token" "" ($s | default dict)) | sha256sum | quote }}
{{- else }}
checksum/model-token: {{ include "rrp.modelToken" . | sha256sum | quote }}
{{- end }}
{{- end }}

{{/* The model clients' side of inference auth: the token file mounted, and the flag that sends it. */}}
{{- define "rrp.modelTokenVolume" -}}
- name: model-token
  secret:
    secretName: {{ include "rrp.modelTokenSecretName" . }}
    defaultMode: 0400
    items:
      - key: token
        path: token
{{- end }}

{{- define "rrp.modelTokenMount" -}}
- name: model-token
  mountPath: /var/run/secrets/rrp/model-token
  readOnly: true
{{- end }}

{{- define "rrp.modelTokenArgs" -}}
{{- if .Values.torchserve.auth.enabled }}
- --token-file
- /var/run/secrets/rrp/model-token/token
{{- end }}
{{- end }}

{{/* The deployer's Lease (templates/lease.yaml): its service account, and its token as an explicit projected
volume at the usual path (automountServiceAccountToken stays false: no other pod gets a token). */}}
{{- define "rrp.leaseOn" -}}
{{- if and .Values.deployer.lease.enabled (or .Values.deployer.enabled .Values.jobs.deployModel.enabled) }}true{{ end }}
{{- end }}

{{- define "rrp.leaseAccount" -}}
{{- if include "rrp.leaseOn" . }}
serviceAccountName: {{ include "rrp.component" (dict "root" . "name" "deployer") }}
{{- end }}
{{- end }}

{{- define "rrp.leaseEnv" -}}
{{- if include "rrp.leaseOn" . }}
- name: RRP_DEPLOY_LEASE
  value: {{ include "rrp.component" (dict "root" . "name" "deployer") | quote }}
{{- end }}
{{- end }}

{{- define "rrp.leaseMount" -}}
{{- if include "rrp.leaseOn" . }}
- name: kube-api-access
  mountPath: /var/run/secrets/kubernetes.io/serviceaccount
  readOnly: true
{{- end }}
{{- end }}

{{- define "rrp.leaseVolume" -}}
{{- if include "rrp.leaseOn" . }}
- name: kube-api-access
  projected:
    defaultMode: 0444
    sources:
      - serviceAccountToken:
          path: token
          expirationSeconds: 3600
      - configMap:
          name: kube-root-ca.crt
          items:
            - key: ca.crt
              path: ca.crt
      - downwardAPI:
          items:
            - path: namespace
              fieldRef:
                fieldPath: metadata.namespace
{{- end }}
{{- end }}
