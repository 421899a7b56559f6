{{/* Name of the chart, overridable. */}}
{{- define "warren-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified name: the release name, plus the chart name unless the release name has it. */}}
{{- define "warren-operator.fullname" -}}
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

{{- define "warren-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object of the release. */}}
{{- define "warren-operator.labels" -}}
helm.sh/chart: {{ include "warren-operator.chart" . }}
{{ include "warren-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: warren
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels selecting the operator's pods. Never change: a Deployment's selector is immutable. */}}
{{- define "warren-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "warren-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "warren-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "warren-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The namespace watched in namespace mode (the first, when several are). */}}
{{- define "warren-operator.watchNamespace" -}}
{{- if .Values.rbac.watchNamespaces }}
{{- first .Values.rbac.watchNamespaces }}
{{- else }}
{{- default .Release.Namespace .Values.rbac.watchNamespace }}
{{- end }}
{{- end }}

{{/* Every namespace watched in namespace mode, comma-separated (--namespace). */}}
{{- define "warren-operator.watchNamespaces" -}}
{{- if .Values.rbac.watchNamespaces }}
{{- join "," (uniq .Values.rbac.watchNamespaces) }}
{{- else }}
{{- include "warren-operator.watchNamespace" . }}
{{- end }}
{{- end }}

{{- define "warren-operator.leaseName" -}}
{{- default (include "warren-operator.fullname" .) .Values.leaderElection.leaseName }}
{{- end }}

{{/* The broker image of RabbitClusters without spec.image (--broker-image). */}}
{{- define "warren-operator.brokerImage" -}}
{{- $tag := default .Chart.AppVersion .Values.brokerImage.tag }}
{{- if .Values.brokerImage.digest }}
{{- printf "%s@%s" .Values.brokerImage.repository .Values.brokerImage.digest }}
{{- else }}
{{- printf "%s:%s" .Values.brokerImage.repository $tag }}
{{- end }}
{{- end }}

{{- define "warren-operator.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* Namespaces the broker PodMonitor and the alerts look at. */}}
{{- define "warren-operator.brokerNamespaces" -}}
{{- if eq .Values.rbac.scope "namespace" }}
{{- include "warren-operator.watchNamespaces" . | replace "," "|" }}
{{- end }}
{{- end }}

{{/*
What the operator does with the Kubernetes API, per resource (see operator/src/cluster/
controller.rs, lease.rs). Used for the ClusterRole (cluster scope) or the Role in the
watched namespace (namespace scope). charts/test.sh runs the operator with exactly these
permissions: a missing one fails it.
*/}}
{{- define "warren-operator.rules" -}}
# The custom resources: watched, finalizers added and removed (JSON patch), status patched.
- apiGroups: ["warren.dev"]
  resources: ["rabbitclusters", "policies", "federations", "shovels", "vhosts", "users", "permissions", "topicpermissions", "queues", "exchanges", "bindings", "operatorpolicies"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["warren.dev"]
  resources: ["rabbitclusters/status", "policies/status", "federations/status", "shovels/status", "vhosts/status", "users/status", "permissions/status", "topicpermissions/status", "queues/status", "exchanges/status", "bindings/status", "operatorpolicies/status"]
  verbs: ["patch"]
# Owner references with blockOwnerDeletion need this where OwnerReferencesPermissionEnforcement is on.
- apiGroups: ["warren.dev"]
  resources: ["rabbitclusters/finalizers", "policies/finalizers", "federations/finalizers", "shovels/finalizers", "vhosts/finalizers", "users/finalizers", "permissions/finalizers", "topicpermissions/finalizers", "queues/finalizers", "exchanges/finalizers", "bindings/finalizers", "operatorpolicies/finalizers"]
  verbs: ["update"]
# What a RabbitCluster owns, written by server-side apply (which needs create for a new
# object and patch); the StatefulSet is also deleted (orphaning its pods) to grow its volume
# claim template. Nothing else is deleted: owner references let the garbage collector do it.
- apiGroups: ["apps"]
  resources: ["statefulsets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["services", "configmaps", "secrets", "serviceaccounts"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch"]
# Pods are only read: is a node running before it is drained.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get"]
# Volume expansion resizes the claims.
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get", "patch"]
# Events about every create, update and failure (kube-rs Recorder: events.k8s.io/v1).
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}
