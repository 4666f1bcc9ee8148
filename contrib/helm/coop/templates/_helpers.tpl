{{/* The release's base name. */}}
{{- define "coop.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "coop.labels" -}}
app.kubernetes.io/part-of: coop
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "coop.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end -}}

{{- define "coop.kbName" -}}{{ include "coop.fullname" . }}-kb{{- end -}}
{{- define "coop.nodeName" -}}{{ include "coop.fullname" . }}-node{{- end -}}

{{/* ClusterKB's host, as nodes reach it. */}}
{{- define "coop.kbHost" -}}{{ include "coop.kbName" . }}.{{ .Release.Namespace }}.svc{{- end -}}

{{- define "coop.scheme" -}}{{ if .Values.tls.enabled }}https{{ else }}http{{ end }}{{- end -}}

{{- define "coop.caSecret" -}}{{ .Values.tls.ca.secretName | default (printf "%s-ca" (include "coop.fullname" .)) }}{{- end -}}

{{/* The CA volume: ca.crt and ca.key, whatever the Secret calls them. */}}
{{- define "coop.caVolume" -}}
- name: ca
  secret:
    secretName: {{ include "coop.caSecret" . }}
    defaultMode: 0440
    {{- if eq .Values.tls.ca.source "cert-manager" }}
    items:
      - {key: tls.crt, path: ca.crt}
      - {key: tls.key, path: ca.key}
    {{- else }}
    items:
      - {key: ca.crt, path: ca.crt}
      - {key: ca.key, path: ca.key}
    {{- end }}
- name: tls
  emptyDir: {medium: Memory, sizeLimit: 1Mi}
{{- end -}}

{{/* The pod's security context for coop's own containers: no privilege. */}}
{{- define "coop.restricted" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities: {drop: [ALL]}
seccompProfile: {type: RuntimeDefault}
{{- end -}}
