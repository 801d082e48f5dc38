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

{{/* Where the policy set comes from: "configMap" (default), "gitSync" or
"volume"; a render error for contradictory or incomplete values. */}}
{{- define "kcs.policySource" -}}
{{- $src := .Values.policySource | default dict -}}
{{- $git := $src.gitSync | default dict -}}
{{- $vol := $src.volume | default dict -}}
{{- $useVol := or $vol.existingClaim $vol.existingVolume -}}
{{- if and $vol.existingClaim $vol.existingVolume -}}
{{- fail "policySource.volume: set existingClaim or existingVolume, not both" -}}
{{- end -}}
{{- if and $git.enabled $useVol -}}
{{- fail "policySource: gitSync and volume exclude each other" -}}
{{- end -}}
{{- if $git.enabled -}}
{{- if not $git.repo -}}
{{- fail "policySource.gitSync.repo is required when gitSync is enabled" -}}
{{- end -}}
{{- if and $git.ssh.secretName $git.https.secretName -}}
{{- fail "policySource.gitSync: set ssh.secretName or https.secretName, not both" -}}
{{- end -}}
gitSync
{{- else if $useVol -}}
volume
{{- else -}}
configMap
{{- end -}}
{{- end -}}

{{/* A subPath inside the synced repository or the volume: relative, no "..". */}}
{{- define "kcs.subPath" -}}
{{- $p := . | default "" | trimPrefix "/" | trimSuffix "/" -}}
{{- if has ".." (splitList "/" $p) -}}
{{- fail "policySource: a subPath must not contain '..'" -}}
{{- end -}}
{{- $p -}}
{{- end -}}

{{- define "kcs.gitSyncRoot" -}}/etc/keycloak-ci-sts/git{{- end -}}

{{/* The service's policies_dir for the chosen source. */}}
{{- define "kcs.policiesDir" -}}
{{- $kind := include "kcs.policySource" . -}}
{{- if eq $kind "gitSync" -}}
{{- $sub := include "kcs.subPath" .Values.policySource.gitSync.subPath -}}
{{- printf "%s/current" (include "kcs.gitSyncRoot" .) -}}{{- with $sub }}/{{ . }}{{ end -}}
{{- else if eq $kind "volume" -}}
{{- $sub := include "kcs.subPath" .Values.policySource.volume.subPath -}}
/etc/keycloak-ci-sts/policies-volume{{- with $sub }}/{{ . }}{{ end -}}
{{- else -}}
/etc/keycloak-ci-sts/policies
{{- end -}}
{{- end -}}

{{/* values.config with the top-level policies_dir set to where the chart
delivers the policies (replaced, or added first when absent). */}}
{{- define "kcs.config" -}}
{{- $line := printf "policies_dir = %s" (include "kcs.policiesDir" . | quote) -}}
{{- if regexMatch "(?m)^policies_dir\\s*=" .Values.config -}}
{{- regexReplaceAll "(?m)^policies_dir\\s*=.*$" .Values.config $line -}}
{{- else -}}
{{- printf "%s\n%s" $line .Values.config -}}
{{- end -}}
{{- end -}}

{{/* The service's (and the CronJob's) mount of the policies volume. */}}
{{- define "kcs.policiesMount" -}}
{{- $kind := include "kcs.policySource" . -}}
- name: policies
  {{- if eq $kind "gitSync" }}
  mountPath: {{ include "kcs.gitSyncRoot" . }}
  {{- else if eq $kind "volume" }}
  mountPath: /etc/keycloak-ci-sts/policies-volume
  {{- else }}
  mountPath: /etc/keycloak-ci-sts/policies
  {{- end }}
  readOnly: true
{{- end -}}

{{/* The policies volume: the ConfigMap with every file at its path
(policies/, inventory/, keycloak/realm.yaml), git-sync's emptyDir (plus its
/tmp and credentials), or the operator's volume. */}}
{{- define "kcs.policiesVolume" -}}
{{- $kind := include "kcs.policySource" . -}}
{{- if eq $kind "gitSync" }}
{{- $git := .Values.policySource.gitSync }}
- name: policies
  emptyDir: {}
- name: git-sync-tmp
  emptyDir: {}
{{- with (or $git.ssh.secretName $git.https.secretName) }}
- name: git-sync-secret
  secret:
    secretName: {{ . }}
    # owned by root, group fsGroup (a supplementary group of git-sync's user)
    defaultMode: 0440
{{- end }}
{{- else if eq $kind "volume" }}
{{- $vol := .Values.policySource.volume }}
- name: policies
  {{- if $vol.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ $vol.existingClaim }}
    readOnly: true
  {{- else }}
  {{- toYaml $vol.existingVolume | nindent 2 }}
  {{- end }}
{{- else }}
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
{{- end }}
{{- end -}}

{{/* The git-sync container: a native sidecar of the service (restartPolicy
Always, started before it, probed on its HTTP endpoint) or, with oneTime, an
init container that syncs once (the keycloakApply CronJob).
Call with (dict "root" $ "oneTime" bool). */}}
{{- define "kcs.gitSyncContainer" -}}
{{- $ := .root -}}
{{- $git := $.Values.policySource.gitSync -}}
- name: git-sync
  image: "{{ required "policySource.gitSync.image.repository is required with gitSync: the git-sync v4 image your cluster pulls" $git.image.repository }}:{{ $git.image.tag }}"
  imagePullPolicy: {{ $git.image.pullPolicy }}
  {{- if not .oneTime }}
  restartPolicy: Always
  {{- end }}
  args:
    - --repo={{ $git.repo }}
    - --ref={{ $git.ref }}
    - --root={{ include "kcs.gitSyncRoot" $ }}
    - --link=current
    - --sync-timeout={{ $git.syncTimeout }}
    {{- if .oneTime }}
    - --one-time
    {{- else }}
    - --period={{ $git.period }}
    - --max-failures={{ $git.maxFailures }}
    - --http-bind=:{{ $git.httpPort }}
    {{- end }}
    {{- if $git.ssh.secretName }}
    - --ssh
    - --ssh-key-file=/etc/git-secret/ssh
    - --ssh-known-hosts-file=/etc/git-secret/known_hosts
    {{- else if $git.https.secretName }}
    - --password-file=/etc/git-secret/password
    {{- end }}
  {{- if $git.https.secretName }}
  env:
    - name: GITSYNC_USERNAME
      valueFrom:
        secretKeyRef:
          name: {{ $git.https.secretName }}
          key: username
  {{- end }}
  {{- if not .oneTime }}
  ports:
    - name: git-sync
      containerPort: {{ $git.httpPort }}
      protocol: TCP
  # 5xx until the first sync: the service starts with its policies in place.
  startupProbe:
    httpGet:
      path: /
      port: git-sync
    periodSeconds: 2
    failureThreshold: 150
  {{- end }}
  resources:
    {{- toYaml $git.resources | nindent 4 }}
  securityContext:
    {{- toYaml $git.securityContext | nindent 4 }}
  volumeMounts:
    - name: policies
      mountPath: {{ include "kcs.gitSyncRoot" $ }}
    - name: git-sync-tmp
      mountPath: /tmp
    {{- if or $git.ssh.secretName $git.https.secretName }}
    - name: git-sync-secret
      mountPath: /etc/git-secret
      readOnly: true
    {{- end }}
{{- end -}}

{{- define "kcs.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kcs.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/*
The service's image: `image.repository` (required, no registry is named by the
chart), then `@image.digest` when set, else `:image.tag` (default: appVersion).
*/}}
{{- define "keycloak-ci-sts.image" -}}
{{- $repo := required "image.repository is required: the keycloak-ci-sts image you built and pushed (docs/src/releases.md)" .Values.image.repository -}}
{{- if regexMatch "[[:space:]@]" $repo -}}
{{- fail "image.repository must be a repository name only (no whitespace, tag or digest: set image.tag or image.digest)" -}}
{{- end -}}
{{- with .Values.image.digest -}}
{{- if not (regexMatch "^sha256:[0-9a-f]{64}$" .) -}}
{{- fail "image.digest must be sha256:<64 hex digits>" -}}
{{- end -}}
{{ $repo }}@{{ . }}
{{- else -}}
{{ $repo }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end -}}
