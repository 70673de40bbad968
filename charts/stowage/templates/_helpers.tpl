{{/* Names. */}}
{{- define "stowage.fullname" -}}
{{- if contains "stowage" .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-stowage" .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "stowage.labels" -}}
app.kubernetes.io/name: stowage
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "stowage.selector" -}}
app.kubernetes.io/name: stowage
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "stowage.image" -}}
{{- $img := .Values.image -}}
{{- if $img.digest -}}
{{- printf "%s@%s" $img.repository $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $img.repository (default .Chart.AppVersion $img.tag) -}}
{{- end -}}
{{- end -}}

{{/* The enabled backend kinds in a fixed order, comma-separated (Helm templates return strings). */}}
{{- define "stowage.enabled" -}}
{{- $out := list -}}
{{- range $k := list "local" "nfs" "glusterfs" "s3" "rbd" -}}
{{- if (index $.Values.backends $k).enabled -}}{{- $out = append $out $k -}}{{- end -}}
{{- end -}}
{{- join "," $out -}}
{{- end -}}

{{- define "stowage.enabledList" -}}
{{- $e := include "stowage.enabled" . -}}
{{- if $e -}}{{- toJson (splitList "," $e) -}}{{- else -}}[]{{- end -}}
{{- end -}}

{{/* The CSI socket of stowage-controller / stowage-node inside their pods. One backend: the
     driver's own socket name (works with single-backend binaries too); several: the
     {driver} placeholder, which the binaries replace by each driver's name. */}}
{{- define "stowage.endpoint" -}}
{{- $kinds := include "stowage.enabledList" . | fromJsonArray -}}
{{- if eq (len $kinds) 1 -}}
{{- printf "unix:///csi/%s.stowage.io.sock" (first $kinds) -}}
{{- else -}}
unix:///csi/{driver}.sock
{{- end -}}
{{- end -}}

{{/* The socket path kubelet dials, on the host. */}}
{{- define "stowage.registrationPath" -}}
{{- $kinds := include "stowage.enabledList" . | fromJsonArray -}}
{{- $dir := printf "%s/plugins/stowage" (trimSuffix "/" .Values.kubeletRoot) -}}
{{- if eq (len $kinds) 1 -}}
{{- printf "%s/%s.stowage.io.sock" $dir (first $kinds) -}}
{{- else -}}
{{- printf "%s/{driver}.sock" $dir -}}
{{- end -}}
{{- end -}}

{{/* stowage-provisioner: every driver's socket, comma-separated. */}}
{{- define "stowage.provisionerEndpoints" -}}
{{- $out := list -}}
{{- range $k := include "stowage.enabledList" . | fromJsonArray -}}
{{- $out = append $out (printf "unix:///csi/%s.stowage.io.sock" $k) -}}
{{- end -}}
{{- join "," $out -}}
{{- end -}}

{{/* The Secret holding a backend's credentials ("" when none). */}}
{{- define "stowage.secretName" -}}
{{- $b := index .root.Values.backends .kind -}}
{{- if and $b.credentials $b.credentials.existingSecret -}}
{{- $b.credentials.existingSecret -}}
{{- else if and $b.credentials $b.credentials.create -}}
{{- printf "%s-%s-credentials" (include "stowage.fullname" .root) .kind -}}
{{- end -}}
{{- end -}}

{{/* One backend's Stowage config document (a map), with the chart's defaults filled in. */}}
{{- define "stowage.backendConfig" -}}
{{- $root := .root -}}
{{- $kind := .kind -}}
{{- $cfg := deepCopy (index $root.Values.backends $kind).config -}}
{{- $_ := set $cfg "backend" $kind -}}
{{- if and (eq $kind "s3") (not (hasKey $cfg "nodeStateDir")) -}}
{{- $_ := set $cfg "nodeStateDir" (printf "%s/s3" (trimSuffix "/" $root.Values.stateDir)) -}}
{{- end -}}
{{- if and (eq $kind "rbd") (include "stowage.secretName" (dict "root" $root "kind" "rbd")) -}}
{{- range $name, $inst := $cfg.instances -}}
{{- if not (hasKey $inst "keyringFile") -}}{{- $_ := set $inst "keyringFile" "/etc/stowage/ceph/keyring" -}}{{- end -}}
{{- if not (hasKey $inst "runDir") -}}{{- $_ := set $inst "runDir" "/run/stowage/rbd" -}}{{- end -}}
{{- end -}}
{{- end -}}
{{- toJson $cfg -}}
{{- end -}}

{{/* The config file: today's single-backend form for one backend, `backends:` for several. */}}
{{- define "stowage.config" -}}
{{- $kinds := include "stowage.enabledList" . | fromJsonArray -}}
{{- if eq (len $kinds) 1 -}}
{{- include "stowage.backendConfig" (dict "root" . "kind" (first $kinds)) | fromJson | toYaml -}}
{{- else -}}
{{- $docs := list -}}
{{- range $k := $kinds -}}
{{- $docs = append $docs (include "stowage.backendConfig" (dict "root" $ "kind" $k) | fromJson) -}}
{{- end -}}
{{- dict "backends" $docs | toYaml -}}
{{- end -}}
{{- end -}}

{{/* Does an enabled backend need X? */}}
{{- define "stowage.localBaseDirs" -}}
{{- $dirs := list -}}
{{- if .Values.backends.local.enabled -}}
{{- range $name, $inst := .Values.backends.local.config.instances -}}
{{- $dirs = append $dirs $inst.baseDir -}}
{{- end -}}
{{- end -}}
{{- toJson $dirs -}}
{{- end -}}
