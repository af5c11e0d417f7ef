{{/* One Job of the pipeline. .job: name, args (list), peers (list), redis (bool), modelStore (bool: the model store,
read-write), gpu (int, optional: nvidia.com/gpu limit), modelToken (bool: the inference token's file), lease (bool: the deployer's Lease), waitFor (list of files the Job's inputs are: an init container waits until every one exists).

The Job is named by its pod template's hash: an upgrade with the same values renders the same Job, which Helm leaves
alone (no rerun), and a changed input makes a new Job (a Job's pod template is immutable). The template carries no
chart or app version label for that reason. */}}
{{- define "rrp.jobPod" -}}
{{- $root := .root }}
{{- $c := dict "root" $root "name" .job.name }}
metadata:
  labels:
    {{- include "rrp.selectorLabels" $c | nindent 4 }}
    app.kubernetes.io/part-of: rallyrobopilot
    {{- include "rrp.peerLabels" (dict "peers" .job.peers) | nindent 4 }}
spec:
  restartPolicy: Never
  {{- include "rrp.imagePullSecrets" $root | nindent 2 }}
  automountServiceAccountToken: false
  {{- if .job.lease }}
  {{- include "rrp.leaseAccount" $root | nindent 2 }}
  {{- end }}
  enableServiceLinks: false
  terminationGracePeriodSeconds: 30
  securityContext:
    {{- include "rrp.podSecurityContext" $root | nindent 4 }}
  {{- include "rrp.scheduling" $root | nindent 2 }}
  {{- with .job.waitFor }}
  initContainers:
    # The Job's inputs are files an earlier Job leaves last (its summary, the model card): wait for them, so that
    # every Job of the pipeline may start at once and still run in order.
    - name: wait-inputs
      image: {{ include "rrp.image" (dict "root" $root "image" "trainer") }}
      imagePullPolicy: {{ $root.Values.pullPolicy }}
      command:
        - sh
        - -c
        - >-
          end=$(( $(date +%s) + {{ int $root.Values.jobs.waitTimeoutSeconds }} ));
          for f in "$@"; do
          until [ -f "$f" ]; do
          if [ "$(date +%s)" -ge "$end" ]; then echo "gave up waiting for $f" >&2; exit 1; fi;
          echo "waiting for $f"; sleep 5;
          done; done
        - wait-inputs
        {{- toYaml . | nindent 8 }}
      resources:
        requests: {cpu: 10m, memory: 16Mi}
        limits: {cpu: 100m, memory: 64Mi}
      securityContext:
        {{- include "rrp.containerSecurityContext" $root | nindent 8 }}
      volumeMounts:
        - name: artifacts
          mountPath: /artifacts
          readOnly: true
  {{- end }}
  containers:
    - name: {{ .job.name }}
      image: {{ include "rrp.image" (dict "root" $root "image" "trainer") }}
      imagePullPolicy: {{ $root.Values.pullPolicy }}
      args:
        {{- toYaml .job.args | nindent 8 }}
        {{- if .job.tls }}
        {{- include "rrp.tlsClientArgs" (dict "root" $root) | nindent 8 }}
        {{- end }}
      env:
        {{- include "rrp.commonEnv" $c | nindent 8 }}
        {{- if .job.lease }}
        {{- include "rrp.leaseEnv" $root | nindent 8 }}
        {{- end }}
        {{- if .job.redis }}
        - name: RRP_REDIS_PASSWORD
          valueFrom:
            secretKeyRef:
              name: {{ include "rrp.redisSecretName" $root }}
              key: password
        {{- end }}
      resources:
        {{- $resources := deepCopy $root.Values.jobs.resources }}
        {{- if gt (int (.job.gpu | default 0)) 0 }}
        {{- $_ := set $resources "limits" (merge (dict "nvidia.com/gpu" (int .job.gpu)) ($resources.limits | default dict)) }}
        {{- end }}
        {{- toYaml $resources | nindent 8 }}
      securityContext:
        {{- include "rrp.containerSecurityContext" $root | nindent 8 }}
      volumeMounts:
        {{- include "rrp.tmpMount" $root | nindent 8 }}
        - name: artifacts
          mountPath: /artifacts
        {{- if .job.modelStore }}
        - name: model-store
          mountPath: /models
        {{- end }}
        {{- if .job.modelToken }}
        {{- include "rrp.modelTokenMount" $root | nindent 8 }}
        {{- end }}
        {{- if .job.lease }}
        {{- include "rrp.leaseMount" $root | nindent 8 }}
        {{- end }}
        {{- if .job.tls }}
        {{- include "rrp.tlsMount" $root | nindent 8 }}
        {{- end }}
  volumes:
    {{- include "rrp.tmpVolume" $root | nindent 4 }}
    - name: artifacts
      persistentVolumeClaim:
        claimName: {{ include "rrp.component" (dict "root" $root "name" "artifacts") }}
    {{- if .job.modelStore }}
    - name: model-store
      persistentVolumeClaim:
        claimName: {{ include "rrp.component" (dict "root" $root "name" "model-store") }}
    {{- end }}
    {{- if .job.modelToken }}
    {{- include "rrp.modelTokenVolume" $root | nindent 4 }}
    {{- end }}
    {{- if .job.lease }}
    {{- include "rrp.leaseVolume" $root | nindent 4 }}
    {{- end }}
    {{- if .job.tls }}
    {{- include "rrp.tlsVolume" $root | nindent 4 }}
    {{- end }}
{{- end }}

{{- define "rrp.job" -}}
{{- $root := .root }}
{{- $c := dict "root" $root "name" .job.name }}
{{- $pod := include "rrp.jobPod" . }}
apiVersion: batch/v1
kind: Job
metadata:
  name: {{ printf "%s-%s" (include "rrp.component" $c | trunc 52 | trimSuffix "-") ($pod | sha256sum | trunc 10) }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "rrp.labels" $c | nindent 4 }}
spec:
  backoffLimit: {{ $root.Values.jobs.backoffLimit }}
  {{- with $root.Values.jobs.ttlSecondsAfterFinished }}
  ttlSecondsAfterFinished: {{ . }}
  {{- end }}
  template:
    {{- $pod | nindent 4 }}
{{- end }}
