{{/*
Names. The fullname is cut at 45 characters: a CronJob's name may have at most
52 (its Jobs append 11), so "<fullname>-submit" fits, and every other name
("-mlflow", "-pipeline") stays within the 63 of a DNS label.
*/}}
{{- define "dpsynth.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "dpsynth.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 45 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 45 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 45 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "dpsynth.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "dpsynth.mlflow.fullname" -}}
{{- printf "%s-mlflow" (include "dpsynth.fullname" .) }}
{{- end }}

{{- define "dpsynth.submit.fullname" -}}
{{- printf "%s-submit" (include "dpsynth.fullname" .) }}
{{- end }}

{{/*
Labels. Called with (dict "ctx" $ "component" "mlflow").
*/}}
{{- define "dpsynth.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dpsynth.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "dpsynth.labels" -}}
helm.sh/chart: {{ include "dpsynth.chart" .ctx }}
{{ include "dpsynth.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: dpsynth
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- end }}

{{/*
Image reference. Called with (dict "ctx" $ "image" .Values.mlflow.image):
the component's repository/tag win, then the top-level image, then the tag
"<appVersion>-cpu" that `make image-cpu` builds.
*/}}
{{- define "dpsynth.image" -}}
{{- $repository := default .ctx.Values.image.repository .image.repository }}
{{- $tag := default (printf "%s-cpu" .ctx.Chart.AppVersion) (default .ctx.Values.image.tag .image.tag) }}
{{- printf "%s:%s" $repository $tag }}
{{- end }}

{{- define "dpsynth.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "dpsynth.submit.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name: name an existing ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Host headers the MLflow server accepts (MLFLOW_SERVER_ALLOWED_HOSTS). MLflow
rejects any other Host to stop DNS rebinding; replacing its default list
(localhost and private IPs) with the Service's names keeps in-cluster clients
and `kubectl port-forward` working. /health is exempt, so probes need no entry.
*/}}
{{- define "dpsynth.mlflow.allowedHosts" -}}
{{- $svc := include "dpsynth.mlflow.fullname" . }}
{{- $ns := .Release.Namespace }}
{{- $port := toString .Values.mlflow.service.port }}
{{- $hosts := list "localhost" "localhost:*" "127.0.0.1" "127.0.0.1:*" }}
{{- range $name := list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns $.Values.clusterDomain) }}
{{- $hosts = append $hosts $name }}
{{- $hosts = append $hosts (printf "%s:%s" $name $port) }}
{{- end }}
{{- concat $hosts .Values.mlflow.allowedHosts | uniq | join "," }}
{{- end }}

{{/*
A pipeline parameter as `dpsynth submit --param` text. Helm reads numbers from
values files as float64, so 1000000 would print as 1e+06: integral numbers
print as integers; lists and maps as JSON (which `dpsynth submit` parses).
*/}}
{{- define "dpsynth.paramValue" -}}
{{- if and (kindIs "float64" .) (eq . (floor .)) }}
{{- int64 . }}
{{- else if or (kindIs "map" .) (kindIs "slice" .) }}
{{- toJson . }}
{{- else }}
{{- . }}
{{- end }}
{{- end }}
