{{- define "kcs.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kcs.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kcs.labels" -}}
app.kubernetes.io/name: {{ include "kcs.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The policies volume: every file at its path (policies/, inventory/, keycloak/realm.yaml). */}}
{{- define "kcs.policiesVolume" -}}
- name: policies
  configMap:
    name: {{ include "kcs.fullname" . }}-policies
    items:
      {{- range $name, $_ := .Values.policies }}
      - key: {{ $name }}
        path: {{ $name }}
      {{- end }}
      {{- range $name, $_ := .Values.inventory }}
      - key: inventory.{{ $name }}
        path: inventory/{{ $name }}
      {{- end }}
      {{- if .Values.realmModel }}
      - key: keycloak.realm.yaml
        path: keycloak/realm.yaml
      {{- end }}
{{- end -}}

{{- define "kcs.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kcs.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
