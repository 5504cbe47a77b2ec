{{/* The chart's name, release-scoped. */}}
{{- define "zygote.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "zygote.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "zygote.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: node-installer
{{- end -}}

{{/* containerd's config file (or k3s/rke2's template of it) on the node. */}}
{{- define "zygote.containerdConfig" -}}
{{- if .Values.containerd.configFile -}}
{{- .Values.containerd.configFile -}}
{{- else if eq .Values.k8sDistribution "k3s" -}}
/var/lib/rancher/k3s/agent/etc/containerd/config.toml.tmpl
{{- else if eq .Values.k8sDistribution "rke2" -}}
/var/lib/rancher/rke2/agent/etc/containerd/config.toml.tmpl
{{- else -}}
/etc/containerd/config.toml
{{- end -}}
{{- end -}}

{{/* containerd's socket on the node. */}}
{{- define "zygote.containerdSocket" -}}
{{- if .Values.containerd.socket -}}
{{- .Values.containerd.socket -}}
{{- else if has .Values.k8sDistribution (list "k3s" "rke2") -}}
/run/k3s/containerd/containerd.sock
{{- else -}}
/run/containerd/containerd.sock
{{- end -}}
{{- end -}}

{{/* How containerd is restarted, run in the node's namespaces. */}}
{{- define "zygote.containerdRestart" -}}
{{- $host := "nsenter --target 1 --mount --uts --ipc --net --pid --" -}}
{{- if .Values.containerd.restart -}}
{{- if eq .Values.containerd.restart "none" -}}
none
{{- else if eq .Values.containerd.restart "systemd" -}}
{{ $host }} systemctl restart containerd
{{- else -}}
{{ $host }} sh -c {{ .Values.containerd.restart | squote }}
{{- end -}}
{{- else if eq .Values.k8sDistribution "k3s" -}}
{{ $host }} sh -c 'if systemctl is-active -q k3s; then systemctl restart k3s; else systemctl restart k3s-agent; fi'
{{- else if eq .Values.k8sDistribution "rke2" -}}
{{ $host }} sh -c 'if systemctl is-active -q rke2-server; then systemctl restart rke2-server; else systemctl restart rke2-agent; fi'
{{- else -}}
{{ $host }} systemctl restart containerd
{{- end -}}
{{- end -}}
