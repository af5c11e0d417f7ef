{{/* One Job of the pipeline. .job: name, args (list), peers (list), redis (bool), modelStore (bool: the model store, read-write), gpu (int, optional: nvidia.com/gpu limit). */}}
{{- define "rrp.job" -}}
{{- $root := .root }}
{{- $c := dict "root" $root "name" .job.name }}
apiVersion: batch/v1
kind: Job
metadata:
  # A new name each release revision: a Job's pod template is immutable.
  name: {{ printf "%s-%d" (include "rrp.component" $c) (int $root.Release.Revision) | trunc 63 | trimSuffix "-" }}
  labels:
    {{- include "rrp.labels" $c | nindent 4 }}
spec:
  backoffLimit: {{ $root.Values.jobs.backoffLimit }}
  ttlSecondsAfterFinished: {{ $root.Values.jobs.ttlSecondsAfterFinished }}
  template:
    metadata:
      labels:
        {{- include "rrp.labels" $c | nindent 8 }}
        {{- include "rrp.peerLabels" (dict "peers" .job.peers) | nindent 8 }}
    spec:
      restartPolicy: Never
      {{- include "rrp.imagePullSecrets" $root | nindent 6 }}
      automountServiceAccountToken: false
      terminationGracePeriodSeconds: 30
      securityContext:
        {{- include "rrp.podSecurityContext" $root | nindent 8 }}
      {{- include "rrp.scheduling" $root | nindent 6 }}
      containers:
        - name: {{ .job.name }}
          image: {{ include "rrp.image" (dict "root" $root "image" "trainer") }}
          imagePullPolicy: {{ $root.Values.pullPolicy }}
          args:
            {{- toYaml .job.args | nindent 12 }}
          env:
            {{- include "rrp.commonEnv" $c | nindent 12 }}
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
            {{- toYaml $resources | nindent 12 }}
          securityContext:
            {{- include "rrp.containerSecurityContext" $root | nindent 12 }}
          volumeMounts:
            {{- include "rrp.tmpMount" $root | nindent 12 }}
            - name: artifacts
              mountPath: /artifacts
            {{- if .job.modelStore }}
            - name: model-store
              mountPath: /models
            {{- end }}
      volumes:
        {{- include "rrp.tmpVolume" $root | nindent 8 }}
        - name: artifacts
          persistentVolumeClaim:
            claimName: {{ include "rrp.component" (dict "root" $root "name" "artifacts") }}
        {{- if .job.modelStore }}
        - name: model-store
          persistentVolumeClaim:
            claimName: {{ include "rrp.component" (dict "root" $root "name" "model-store") }}
        {{- end }}
{{- end }}
