{{/* ---------------------------------------------------------------- names */}}
{{- define "idsync.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "idsync.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "idsync.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "idsync.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: idsync
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component: (dict "root" $ "component" "idm") */}}
{{- define "idsync.selectorLabels" -}}
app.kubernetes.io/name: {{ include "idsync.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "idsync.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "idsync.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "idsync.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* ------------------------------------------------------------ endpoints */}}
{{- define "idsync.natsUrl" -}}
{{- if .Values.nats.enabled }}
{{- printf "nats://%s.%s.svc.%s:4222" (required "nats.fullnameOverride names the NATS subchart's services" .Values.nats.fullnameOverride) .Release.Namespace .Values.clusterDomain }}
{{- else }}
{{- required "nats.url is required when nats.enabled=false (an external NATS with JetStream)" .Values.nats.url }}
{{- end }}
{{- end }}

{{- define "idsync.natsMonitoringEndpoint" -}}
{{- if .Values.autoscaling.keda.natsServerMonitoringEndpoint }}
{{- .Values.autoscaling.keda.natsServerMonitoringEndpoint }}
{{- else if .Values.nats.enabled }}
{{- printf "%s-headless.%s.svc.%s:8222" .Values.nats.fullnameOverride .Release.Namespace .Values.clusterDomain }}
{{- else }}
{{- fail "autoscaling.keda.natsServerMonitoringEndpoint is required with an external NATS (host:8222 of its monitoring port)" }}
{{- end }}
{{- end }}

{{- define "idsync.idmUrl" -}}
{{- printf "http://%s-idm.%s.svc.%s:%d" (include "idsync.fullname" .) .Release.Namespace .Values.clusterDomain (int .Values.idm.grpcPort) }}
{{- end }}

{{/* ---------------------------------------------------------------- paths */}}
{{- define "idsync.paths" -}}
config: /etc/idsync/idsync.toml
admin: /var/run/idsync/admin
tokens: /var/run/idsync/tokens
bind: /var/run/idsync/bind
postgres: /var/run/idsync/postgres
data: /var/lib/idsync/idm
{{- end }}

{{/* ------------------------------------------------------------------ TOML
     Helm's toToml writes every number as a float (`version = 1.0`), which
     idsync's integer fields refuse; this writes integral numbers as
     integers and everything else as TOML 1.0 that `idsync config check`
     reads. */}}
{{- define "idsync.toml.key" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . }}{{ . }}{{ else }}{{ toJson . }}{{ end -}}
{{- end }}

{{- define "idsync.toml.isTableArray" -}}
{{- if and (kindIs "slice" .) (gt (len .) 0) }}{{ if kindIs "map" (first .) }}true{{ end }}{{ end -}}
{{- end }}

{{- define "idsync.toml.value" -}}
{{- $v := . -}}
{{- if kindIs "string" $v }}{{ toJson $v }}
{{- else if kindIs "bool" $v }}{{ $v }}
{{- else if kindIs "float64" $v }}{{ if eq (float64 (int64 $v)) $v }}{{ int64 $v }}{{ else }}{{ $v }}{{ end }}
{{- else if or (kindIs "int" $v) (kindIs "int64" $v) }}{{ $v }}
{{- else if kindIs "slice" $v }}[{{ range $i, $e := $v }}{{ if $i }}, {{ end }}{{ include "idsync.toml.value" $e }}{{ end }}]
{{- else if kindIs "map" $v }}{ {{- range $i, $k := keys $v | sortAlpha }}{{ if $i }},{{ end }} {{ include "idsync.toml.key" $k }} = {{ include "idsync.toml.value" (get $v $k) }}{{ end }} }
{{- else }}{{ fail (printf "config: cannot write %v (%s) as TOML" $v (kindOf $v)) }}
{{- end }}
{{- end }}

{{/* (dict "t" table "path" "dotted.path") */}}
{{- define "idsync.toml.table" -}}
{{- $t := .t }}{{ $p := .path }}
{{- range $k := keys $t | sortAlpha }}
{{- $v := get $t $k }}
{{- if not (or (kindIs "invalid" $v) (kindIs "map" $v) (include "idsync.toml.isTableArray" $v)) }}
{{ include "idsync.toml.key" $k }} = {{ include "idsync.toml.value" $v }}
{{- end }}
{{- end }}
{{- range $k := keys $t | sortAlpha }}
{{- $v := get $t $k }}
{{- $kp := include "idsync.toml.key" $k }}
{{- if $p }}{{ $kp = printf "%s.%s" $p $kp }}{{ end }}
{{- if kindIs "map" $v }}

[{{ $kp }}]
{{- include "idsync.toml.table" (dict "t" $v "path" $kp) }}
{{- else if include "idsync.toml.isTableArray" $v }}
{{- range $e := $v }}

[[{{ $kp }}]]
{{- include "idsync.toml.table" (dict "t" $e "path" $kp) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* ----------------------------------------------------------- the config
     idsync.toml from `.Values.config` with what the chart owns filled in:
     where NATS and the IDM are, where the IDM listens and stores, and the
     files the Secrets are mounted as. (dict "root" $ "detector" instance)
     — with a detector instance, resources it does not own have live sync,
     reconciliation schedules and agreement schedules taken away. */}}
{{- define "idsync.config" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $paths := include "idsync.paths" $root | fromYaml }}
{{- $c := deepCopy (default dict $v.config) }}
{{- if not (hasKey $c "version") }}{{ $_ := set $c "version" 1 }}{{ end }}
{{- $nats := default dict $c.nats }}
{{- $_ := set $nats "url" (include "idsync.natsUrl" $root) }}
{{- $_ := set $c "nats" $nats }}
{{- $idm := default dict $c.idm }}
{{- $_ := set $idm "url" (include "idsync.idmUrl" $root) }}
{{- $_ := set $idm "listen" (printf "0.0.0.0:%d" (int $v.idm.grpcPort)) }}
{{- $_ := set $idm "http_bind" (printf "0.0.0.0:%d" (int $v.idm.statusPort)) }}
{{- $_ := set $idm "admin_token_file" (printf "%s/%s" $paths.admin $v.secrets.admin.key) }}
{{- $_ := unset $idm "admin_token_env" }}
{{- if eq $v.idm.store "postgres" }}
{{- $_ := set $idm "store" "postgres" }}
{{- $_ := set $idm "postgres_url_file" (printf "%s/%s" $paths.postgres $v.idm.postgres.key) }}
{{- $_ := unset $idm "postgres_url_env" }}
{{- $_ := unset $idm "data_dir" }}
{{- else }}
{{- /* `store` is left out for the embedded store (its default), so that
       builds without the postgres store read this file too. */}}
{{- $_ := unset $idm "store" }}
{{- $_ := set $idm "data_dir" $paths.data }}
{{- end }}
{{- $_ := set $c "idm" $idm }}
{{- range $name, $a := (default dict $c.agreements) }}
{{- if not (or $a.token_file $a.token_env) }}
{{- $_ := set $a "token_file" (printf "%s/%s" $paths.tokens $name) }}
{{- end }}
{{- end }}
{{- range $r := (default list $c.resources) }}
{{- if not (or $r.bind_password_file $r.bind_password_env) }}
{{- $_ := set $r "bind_password_file" (printf "%s/%s" $paths.bind $r.name) }}
{{- end }}
{{- end }}
{{- with .detector }}
{{- $own := .resources }}
{{- range $r := (default list $c.resources) }}
{{- if not (has $r.name $own) }}
{{- $_ := set $r "live_sync" false }}
{{- $_ := unset $r "reconcile_schedule" }}
{{- end }}
{{- end }}
{{- range $name, $a := (default dict $c.agreements) }}
{{- $mine := false }}
{{- range $r := (default list $c.resources) }}
{{- if and (eq (toString $r.agreement) $name) (has $r.name $own) }}{{ $mine = true }}{{ end }}
{{- end }}
{{- if not $mine }}{{ $_ := unset $a "schedule" }}{{ end }}
{{- end }}
{{- end }}
{{- include "idsync.toml.table" (dict "t" $c "path" "") | trimPrefix "\n" }}
{{ end }}

{{/* The detector instances: a list of {name, resources}; [] is one detector
     for every source. Checks that each source has exactly one. */}}
{{- define "idsync.detectors" -}}
{{- $v := .Values }}
{{- $instances := $v.detector.instances }}
{{- if not $instances }}
{{- $instances = list (dict "name" "" "resources" list) }}
{{- else }}
{{- $owner := dict }}
{{- range $i := $instances }}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" (toString $i.name)) }}
{{- fail (printf "detector.instances: name %q must be a DNS label" (toString $i.name)) }}
{{- end }}
{{- range $r := $i.resources }}
{{- if hasKey $owner $r }}{{ fail (printf "detector.instances: resource %q is in %q and %q; one syncrepl session per source" $r (get $owner $r) $i.name) }}{{ end }}
{{- $_ := set $owner $r $i.name }}
{{- end }}
{{- end }}
{{- $agreements := default dict $v.config.agreements }}
{{- range $r := (default list $v.config.resources) }}
{{- $a := get $agreements (toString $r.agreement) }}
{{- $scheduled := and $r.agreement $a (get $a "schedule") }}
{{- if and (or $r.live_sync $r.reconcile_schedule $scheduled) (not (hasKey $owner $r.name)) }}
{{- fail (printf "detector.instances: resource %q is detected (live_sync, reconcile_schedule or its agreement's schedule) but no instance lists it" $r.name) }}
{{- end }}
{{- end }}
{{- range $name, $a := $agreements }}
{{- if $a.schedule }}
{{- $owners := dict }}
{{- range $r := (default list $v.config.resources) }}
{{- if and (eq (toString $r.agreement) $name) (hasKey $owner $r.name) }}{{ $_ := set $owners (get $owner $r.name) true }}{{ end }}
{{- end }}
{{- if gt (len $owners) 1 }}
{{- fail (printf "detector.instances: agreement %q has a schedule and resources in several instances (%s); put them in one" $name (keys $owners | sortAlpha | join ", ")) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- toYaml (dict "instances" $instances) }}
{{- end }}

{{/* --------------------------------------------------------- pod pieces */}}
{{- define "idsync.env" -}}
- name: IDSYNC_CONFIG
  value: /etc/idsync/idsync.toml
- name: IDSYNC_LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
- name: RUST_LOG
  value: {{ .Values.logFilter | quote }}
- name: IDSYNC_HEALTH_BIND
  value: {{ printf "0.0.0.0:%d" (int .Values.healthPort) | quote }}
- name: IDSYNC_SHUTDOWN_GRACE_SECONDS
  value: {{ .Values.shutdownGraceSeconds | quote }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "idsync.terminationGrace" -}}
{{- if le (int .Values.terminationGracePeriodSeconds) (int .Values.shutdownGraceSeconds) }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must be above shutdownGraceSeconds (%v): the service drains within the latter, Kubernetes kills at the former" .Values.terminationGracePeriodSeconds .Values.shutdownGraceSeconds) }}
{{- end }}
{{- .Values.terminationGracePeriodSeconds }}
{{- end }}

{{- define "idsync.probes" -}}
livenessProbe:
  httpGet:
    path: /healthz
    port: health
  {{- toYaml .Values.probes.liveness | nindent 2 }}
readinessProbe:
  httpGet:
    path: /readyz
    port: health
  {{- toYaml .Values.probes.readiness | nindent 2 }}
{{- end }}

{{/* Pod metadata annotations: config checksum, scrape annotations.
     (dict "root" $ "config" rendered-config "extra" map) */}}
{{- define "idsync.podAnnotations" -}}
checksum/config: {{ .config | sha256sum }}
{{- if .root.Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .root.Values.healthPort | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- with .root.Values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- with .extra }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Everything in a pod spec but the containers' specifics.
     (dict "root" $ "component" name "c" component-values) */}}
{{- define "idsync.podCommon" -}}
{{- $v := .root.Values -}}
serviceAccountName: {{ include "idsync.serviceAccountName" .root }}
automountServiceAccountToken: false
enableServiceLinks: false
terminationGracePeriodSeconds: {{ include "idsync.terminationGrace" .root }}
securityContext:
  {{- toYaml $v.podSecurityContext | nindent 2 }}
{{- with $v.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (default $v.nodeSelector .c.nodeSelector) }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (default $v.tolerations .c.tolerations) }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (default $v.affinity .c.affinity) }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .c.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end }}

{{/* The secret volumes a component needs: list of "admin", "tokens", "bind",
     "postgres". */}}
{{- define "idsync.secretVolumes" -}}
{{- $v := .root.Values }}
{{- range $s := .secrets }}
{{- if eq $s "admin" }}
- name: admin
  secret:
    secretName: {{ required "secrets.admin.existingSecret names the Secret with the administrator credential" $v.secrets.admin.existingSecret }}
    defaultMode: 0440
    items:
      - key: {{ $v.secrets.admin.key }}
        path: {{ $v.secrets.admin.key }}
{{- else if eq $s "tokens" }}
- name: tokens
  secret:
    secretName: {{ required "secrets.syncTokens.existingSecret names the Secret with the agreements' sync tokens" $v.secrets.syncTokens.existingSecret }}
    defaultMode: 0440
{{- else if eq $s "bind" }}
- name: bind
  secret:
    secretName: {{ required "secrets.bindPasswords.existingSecret names the Secret with the resources' bind passwords" $v.secrets.bindPasswords.existingSecret }}
    defaultMode: 0440
{{- else if eq $s "postgres" }}
- name: postgres
  secret:
    secretName: {{ required "idm.postgres.existingSecret names the Secret with the PostgreSQL URL (idm.store=postgres)" $v.idm.postgres.existingSecret }}
    defaultMode: 0440
    items:
      - key: {{ $v.idm.postgres.key }}
        path: {{ $v.idm.postgres.key }}
{{- end }}
{{- end }}
{{- end }}

{{- define "idsync.secretMounts" -}}
{{- $paths := include "idsync.paths" .root | fromYaml }}
{{- range $s := .secrets }}
- name: {{ $s }}
  mountPath: {{ get $paths $s }}
  readOnly: true
{{- end }}
{{- end }}

{{/* The main container of a service. (dict "root" $ "service" "idm"
     "c" component-values "secrets" list "ports" extra-ports-yaml
     "mounts" extra-mounts-yaml) */}}
{{- define "idsync.container" -}}
{{- $v := .root.Values -}}
- name: {{ .service }}
  image: {{ include "idsync.image" .root }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  command: ["/usr/local/bin/idsync-{{ .service }}"]
  env:
    {{- include "idsync.env" .root | nindent 4 }}
    {{- with .c.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    - name: health
      containerPort: {{ $v.healthPort }}
      protocol: TCP
    {{- with .ports }}
    {{- . | nindent 4 }}
    {{- end }}
  {{- include "idsync.probes" .root | nindent 2 }}
  resources:
    {{- required (printf "%s.resources: requests and limits" .service) .c.resources | toYaml | nindent 4 }}
  securityContext:
    {{- toYaml $v.containerSecurityContext | nindent 4 }}
  volumeMounts:
    - name: config
      mountPath: /etc/idsync
      readOnly: true
    - name: tmp
      mountPath: /tmp
    {{- include "idsync.secretMounts" (dict "root" .root "secrets" .secrets) | nindent 4 }}
    {{- with .mounts }}
    {{- . | nindent 4 }}
    {{- end }}
    {{- with $v.extraVolumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}

{{/* Volumes of a pod. (dict "root" $ "configMap" name "secrets" list "tmp" size) */}}
{{- define "idsync.volumes" -}}
- name: config
  configMap:
    name: {{ .configMap }}
- name: tmp
  emptyDir:
    sizeLimit: {{ default "64Mi" .tmp }}
{{- include "idsync.secretVolumes" (dict "root" .root "secrets" .secrets) }}
{{- with .root.Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The durable consumers a worker reads, for KEDA: list of {stream, consumer}. */}}
{{- define "idsync.consumers" -}}
{{- $consumers := list }}
{{- if eq .service "correlator" }}
{{- $consumers = list (dict "stream" "IDSYNC_CHANGES" "consumer" "correlator") }}
{{- else if eq .service "applier" }}
{{- range $name, $_ := (default dict .root.Values.config.agreements) }}
{{- $consumers = append $consumers (dict "stream" "IDSYNC_DECISIONS" "consumer" (printf "applier-%s" $name)) }}
{{- end }}
{{- else if eq .service "provisioner" }}
{{- $consumers = list (dict "stream" "IDSYNC_FOCUS" "consumer" "provisioner") }}
{{- end }}
{{- toYaml (dict "consumers" $consumers) }}
{{- end }}

{{- define "idsync.autoscaling.check" -}}
{{- if and .Values.autoscaling.keda.enabled .Values.autoscaling.hpa.enabled }}
{{- fail "autoscaling: set one of keda.enabled and hpa.enabled; a KEDA ScaledObject makes its own HPA, and two autoscalers on one Deployment fight" }}
{{- end }}
{{- end }}
