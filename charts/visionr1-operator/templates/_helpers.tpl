{{/* Names, labels and images shared by the templates. */}}

{{- define "visionr1.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name: the release name alone when it already names the chart. */}}
{{- define "visionr1.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "visionr1.selectorLabels" -}}
app.kubernetes.io/name: {{ include "visionr1.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "visionr1.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "visionr1.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: visionr1
{{- end }}

{{- define "visionr1.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "visionr1.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "visionr1.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{- define "visionr1.trainerImage" -}}
{{- printf "%s:%s" .Values.trainer.image.repository (.Values.trainer.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{- define "visionr1.peeringName" -}}
{{- default (include "visionr1.fullname" .) .Values.ha.peeringName }}
{{- end }}

{{/*
What the operator does in a namespace it watches; the same rules in the ClusterRole
(every namespace) and in each Role (watched namespaces). tests/test_chart_rbac.py runs
the operator with this chart's flags against an API server and checks that these are
exactly the calls it makes.
*/}}
{{- define "visionr1.namespacedRules" -}}
# The runs: kopf watches them and manages its finalizer; the controller writes status.
- apiGroups: [visionr1.io]
  resources: [visionr1runs]
  verbs: [get, list, watch, patch]
- apiGroups: [visionr1.io]
  resources: [visionr1runs/status]
  verbs: [patch]
# Stage objects carry an ownerReference to their run with blockOwnerDeletion, which the
# OwnerReferencesPermissionEnforcement admission plugin allows only with this.
- apiGroups: [visionr1.io]
  resources: [visionr1runs/finalizers]
  verbs: [update]
# One Job per stage attempt: created, adopted after a restart (get), suspended/resumed,
# given its TTL and, once deleted, let go (its finalizer) after its outcome is recorded.
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, patch]
# The stage's config and, for a multi-node stage, the rendezvous Service.
- apiGroups: [""]
  resources: [configmaps, services]
  verbs: [get, create]
# Read-only: a stage pod's exit summary (termination message) and metrics address.
- apiGroups: [""]
  resources: [pods]
  verbs: [list]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
# Under a queueName Kueue owns a Job's spec.suspend: the run's suspend and resume set
# spec.active on the Job's Kueue Workload instead (found by its job-uid label).
- apiGroups: [kueue.x-k8s.io]
  resources: [workloads]
  verbs: [list, patch]
{{- if .Values.ha.enabled }}
{{- if .Values.watchNamespaces }}
- apiGroups: [kopf.dev]
  resources: [kopfpeerings]
  verbs: [list, watch, patch]
{{- end }}
{{- end }}
{{- end }}
