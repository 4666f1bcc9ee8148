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
{{- end -}}

{{/* The pod's certificate, issued by its init container. */}}
{{- define "coop.tlsVolume" -}}
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


{{/* Where the host's coop node (proxy mode) finds its certificate. */}}
{{- define "coop.hostTLSDir" -}}{{ trimSuffix "/" .Values.node.host.configDir }}/tls{{- end -}}

{{/*
coop node's args, "node" first, for the pod's coop node (observer mode) and
for the host's (proxy mode: coop install writes them to node.toml). Takes a
dict: ctx (the root context) and root, containerdAddress, tlsDir: those
paths as that coop node sees them. $(NODE_NAME) and $(NODE_IP) are the
container's environment, expanded by Kubernetes.
*/}}
{{- define "coop.nodeArgs" -}}
{{- $v := .ctx.Values }}
{{- $n := $v.node }}
{{- $scheme := include "coop.scheme" .ctx }}
{{- $kb := $v.kb.endpoint | default (include "coop.kbHost" .ctx) -}}
- node
- --name=$(NODE_NAME)
- --root={{ .root }}
- --content-mode={{ $n.contentMode }}
- --containerd-address={{ .containerdAddress }}
{{- if eq $n.contentMode "proxy" }}
- --content-socket={{ $n.contentSocket }}
{{- if $n.claim }}
- --claim
- --claim-parallel={{ $n.claimParallel }}
- --claim-registry={{ $n.claimRegistry }}
- --hosts-dir={{ $v.containerd.hostsDir }}
{{- if $n.registryCredentials }}
- --registry-credentials={{ $n.registryCredentials }}
{{- end }}
{{- else }}
- --claim=false
{{- end }}
{{- end }}
- --peer-listen=:{{ $n.peerPort }}
- --advertise={{ $scheme }}://$(NODE_IP):{{ $n.peerPort }}
- --mirror-listen=127.0.0.1:{{ $n.mirrorPort }}
- --index={{ $n.index }}
- --period={{ $n.period }}
- --peer-timeout={{ $n.peerTimeout }}
- --policy={{ $n.policy }}
- --max-uploads={{ $n.maxUploads }}
- --upload-limit={{ int64 $n.uploadLimit }}
- --download-buffer={{ $n.downloadBuffer }}
- --max-blob-size={{ $n.maxBlobSize }}
- --max-unverified={{ $n.maxUnverified }}
- --stall-timeout={{ $n.stallTimeout }}
- --swarm={{ $n.swarm }}
- --log-level={{ $n.logLevel }}
{{- if $v.kb.enabled }}
- --kb={{ $scheme }}://{{ $kb }}:{{ $v.kb.port }}
- --neighbors-from-kb
{{- if or (eq $v.kb.feed "push") (eq $n.index "push") }}
- --nats-url=nats://{{ $kb }}:{{ $v.kb.natsPort }}
{{- end }}
{{- end }}
{{- with $n.shareNamespaces }}
- --share-namespaces={{ join "," . }}
{{- end }}
{{- with $n.serveContainers }}
- --serve-containers={{ join "," . }}
{{- end }}
{{- if $n.allowRemoteStop }}
- --allow-remote-stop
{{- end }}
{{- if $v.tls.enabled }}
- --tls-dir={{ .tlsDir }}
{{- else }}
- --insecure
{{- end }}
{{- range $n.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end -}}
