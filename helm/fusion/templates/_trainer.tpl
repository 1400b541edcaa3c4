{{/*
Training on Kubeflow Trainer v2 (cluster.workloads.train.operator: trainjob): a TrainJob on a
torch runtime. The runtime is either the chart's own (runtime.name empty: trainingruntime.yaml,
one per release, carrying every pod setting of cluster.workloads.train) or one the cluster
already has, e.g. Kubeflow's torch-distributed; then the TrainJob's runtimePatches bring the
pod settings a patch may carry (service account, security contexts, volumes and mounts,
placement, grace period) and the chart refuses the ones it may not.
*/}}

{{/* The runtime's name: the user's, or fusion-NAMESPACE-RELEASE (cluster-wide, so the namespace is in it). */}}
{{- define "fusion.trainingRuntimeName" -}}
{{- $s := .Values.cluster.workloads.train -}}
{{- $name := default (printf "fusion-%s-%s" .Release.Namespace .Release.Name) $s.runtime.name -}}
{{- if gt (len $name) 63 -}}
{{- fail (printf "the training runtime name %q is longer than 63 characters: use a shorter release name or set cluster.workloads.train.runtime.name" $name) -}}
{{- end -}}
{{- $name -}}
{{- end }}

{{/*
The arguments of fusion.podTemplate for a train pod, as YAML (a template cannot return a
dict): the callers add root and settings. Arg: the chart context.
*/}}
{{- define "fusion.trainPodArgs" -}}
{{- $s := .Values.cluster.workloads.train -}}
{{- toYaml (dict "stage" "train" "part" "" "image" "gpu" "gpus" $s.gpus "shm" $s.shmSize
    "grace" (include "fusion.trainGraceSeconds" $s | int)
    "env" (list (dict "name" "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" "value" (include "fusion.trainShutdownSeconds" $s)))
    "args" (list "train" (include "fusion.specPath" .))) -}}
{{- end }}

{{/* The TrainJob. Args: fusion.podTemplate's (container "node"). */}}
{{- define "fusion.trainJob" -}}
{{- $root := .root -}}
{{- $s := .settings -}}
{{- $shipped := not $s.runtime.name -}}
{{- if $s.elastic.enabled -}}
{{- fail "cluster.workloads.train.elastic needs operator=pytorchjob: a TrainJob trains on a fixed number of nodes (workers + 1)" -}}
{{- end -}}
{{- if eq $s.nprocPerNode "cpu" -}}
{{- fail "cluster.workloads.train.nprocPerNode=cpu: a TrainJob takes auto, gpu or a number of processes per node" -}}
{{- end -}}
{{- if not $shipped -}}
{{- range $key := list "runtimeClassName" "priorityClassName" "topologySpreadConstraints" -}}
{{- if get $s $key -}}
{{- fail (printf "cluster.workloads.train.%s cannot be patched into the runtime %q (a TrainJob's runtimePatches do not carry it): set it in that runtime, or leave cluster.workloads.train.runtime.name empty and the chart ships one" $key $s.runtime.name) -}}
{{- end -}}
{{- end -}}
{{- if and $root.Values.cluster.storeVolume.claimName (not (hasPrefix "/" (trimPrefix "file://" $root.Values.store))) -}}
{{- fail (printf "store %q is relative to the store volume, but the runtime %q sets the train pods' working directory: give the store as /var/lib/fusion/..., or leave cluster.workloads.train.runtime.name empty" $root.Values.store $s.runtime.name) -}}
{{- end -}}
{{- end -}}
{{- $template := include "fusion.podTemplate" . | fromYaml -}}
{{- $pod := $template.spec -}}
{{- $c := index $pod.containers 0 -}}
apiVersion: trainer.kubeflow.org/v1alpha1
kind: TrainJob
metadata:
  name: {{ include "fusion.name" (dict "root" $root "suffix" "train") }}
  labels:
    {{- include "fusion.workloadLabels" . | nindent 4 }}
spec:
  runtimeRef:
    apiGroup: trainer.kubeflow.org
    kind: {{ $s.runtime.kind }}
    name: {{ include "fusion.trainingRuntimeName" $root }}
  {{- with $s.activeDeadlineSeconds }}
  activeDeadlineSeconds: {{ . }}
  {{- end }}
  trainer:
    image: {{ $c.image }}
    command: [fusion]
    args:
      {{- toYaml $c.args | nindent 6 }}
    numNodes: {{ add $s.workers 1 }}
    {{- if regexMatch "^[0-9]+$" $s.nprocPerNode }}
    numProcPerNode: {{ atoi $s.nprocPerNode }}
    {{- end }}
    resourcesPerNode:
      {{- toYaml $c.resources | nindent 6 }}
    env:
      {{- toYaml $c.env | nindent 6 }}
  {{- if not $shipped }}
  runtimePatches:
    - manager: fusion.dev/chart
      trainingRuntimeSpec:
        template:
          spec:
            replicatedJobs:
              - name: node
                template:
                  spec:
                    template:
                      metadata:
                        {{- toYaml $template.metadata | nindent 24 }}
                      spec:
                        {{- toYaml (pick $pod "serviceAccountName" "securityContext" "imagePullSecrets" "nodeSelector" "tolerations" "affinity" "terminationGracePeriodSeconds" "volumes") | nindent 24 }}
                        containers:
                          - name: node
                            securityContext:
                              {{- toYaml $c.securityContext | nindent 30 }}
                            volumeMounts:
                              {{- toYaml $c.volumeMounts | nindent 30 }}
  {{- end }}
{{- end }}

{{/*
The chart's own torch runtime: the JobSet of `numNodes` node pods the TrainJob runs, each the
full fusion pod template. A node Job fails at once on bad input (exit 3, podFailurePolicy),
and then so does the JobSet. A pod that exits 200 (the store stayed unreachable) or 201 (its
peers went away: a lost node) is replaced without counting as a failure, as with the
PyTorchJob's restartPolicy ExitCode, whose restarts the training operator does not count
against backoffLimit either. Any other failure (a killed or preempted pod: 128+) restarts the
JobSet, at most backoffLimit times, and training resumes from its newest checkpoint.
*/}}
{{- define "fusion.trainingRuntime" -}}
{{- $s := .Values.cluster.workloads.train -}}
{{- $pod := include "fusion.trainPodArgs" . | fromYaml -}}
{{- $_ := set $pod "root" . -}}
{{- $_ := set $pod "settings" $s -}}
{{- $_ := set $pod "container" "node" -}}
{{- $_ := set $pod "restartPolicy" "Never" -}}
apiVersion: trainer.kubeflow.org/v1alpha1
kind: {{ $s.runtime.kind }}
metadata:
  name: {{ include "fusion.trainingRuntimeName" . }}
  {{- if eq $s.runtime.kind "TrainingRuntime" }}
  namespace: {{ .Release.Namespace }}
  {{- end }}
  labels:
    {{- include "fusion.labels" . | nindent 4 }}
    app.kubernetes.io/component: train
    trainer.kubeflow.org/framework: torch
spec:
  mlPolicy:
    numNodes: 1
    torch: {}
  template:
    spec:
      failurePolicy:
        maxRestarts: {{ $s.backoffLimit }}
        rules:
          - name: badInput
            action: FailJobSet
            onJobFailureReasons: [PodFailurePolicy]
      replicatedJobs:
        - name: node
          template:
            metadata:
              labels:
                trainer.kubeflow.org/trainjob-ancestor-step: trainer
            spec:
              backoffLimit: 0
              podFailurePolicy:
                rules:
                  {{- include "fusion.ignoreDisruptions" . | nindent 18 }}
                  - action: FailJob
                    onExitCodes:
                      containerName: node
                      operator: In
                      values: [3]
                  - action: Ignore
                    onExitCodes:
                      containerName: node
                      operator: In
                      values: [200, 201]
              template:
                {{- include "fusion.podTemplate" $pod | nindent 16 }}
{{- end }}
