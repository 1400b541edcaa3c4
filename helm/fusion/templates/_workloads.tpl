{{/*
The stage workloads. Helm renders them into the run's ConfigMap (workloads.yaml); the
controller creates each one when the store says its inputs are committed (DESIGN.md §5).

Labels fusion.dev/stage and fusion.dev/part tell the controller what a workload computes;
the inputs come from the stage code itself (fusion.stages.*.inputs). Indexed Jobs carry
fusion.dev/completions-from: split-plan; the controller sets their completions to the
number of shards the prepare step planned.
*/}}

{{/*
A batch/v1 Job of a stage. Args: root, stage, part, suffix, settings, image, args, gpus, shm,
and mode: "indexed" (one index per shard), "workers" (elastic workers claiming shards by
lease) or "single" (one pod).
*/}}
{{- define "fusion.job" -}}
apiVersion: batch/v1
kind: Job
metadata:
  name: {{ include "fusion.name" . }}
  labels:
    {{- include "fusion.workloadLabels" . | nindent 4 }}
  {{- $elastic := and (eq .mode "workers") .root.Values.cluster.kueue.queueName .root.Values.cluster.kueue.elasticJobs }}
  {{- if or (eq .mode "indexed") $elastic }}
  annotations:
    {{- if eq .mode "indexed" }}
    fusion.dev/completions-from: split-plan
    {{- end }}
    {{- if $elastic }}
    # Kueue admits a change of parallelism without suspending the Job (workload slices;
    # Kueue's ElasticJobsViaWorkloadSlices feature gate)
    kueue.x-k8s.io/elastic-job: "true"
    {{- end }}
  {{- end }}
spec:
  {{- with .settings.activeDeadlineSeconds }}
  activeDeadlineSeconds: {{ . }}
  {{- end }}
  {{- if eq .mode "indexed" }}
  completionMode: Indexed
  completions: 1
  parallelism: {{ .settings.parallelism }}
  backoffLimitPerIndex: {{ .settings.backoffLimitPerIndex }}
  {{- else if eq .mode "workers" }}
  # No completions: a work queue. Workers claim shards by lease and exit 0 only once the
  # part is committed; `parallelism` may be patched at any time.
  parallelism: {{ .settings.workers }}
  backoffLimit: {{ .settings.backoffLimit }}
  {{- else }}
  completions: 1
  parallelism: 1
  backoffLimit: {{ .settings.backoffLimit }}
  {{- end }}
  podFailurePolicy:
    rules:
      {{- include "fusion.ignoreDisruptions" . | nindent 6 }}
      # Exit code 3 is bad input (fusion.errors.BAD_INPUT_EXIT_CODE): retrying cannot help.
      - action: {{ if eq .mode "indexed" }}FailIndex{{ else }}FailJob{{ end }}
        onExitCodes:
          containerName: fusion
          operator: In
          values: [3]
      # 200: the store stayed unreachable past store_options.outage_seconds (fusion.errors.
      # STORE_UNREACHABLE_EXIT_CODE). Nothing is lost; an outage does not use up backoffLimit.
      - action: Ignore
        onExitCodes:
          containerName: fusion
          operator: In
          values: [200]
      {{- if eq .mode "workers" }}
      # 143 = SIGTERM: a worker removed by a scale-down (or a drain) is no failure; its shard
      # goes to another worker once the lease is released or expires (leaseSeconds).
      - action: Ignore
        onExitCodes:
          containerName: fusion
          operator: In
          values: [143]
      {{- end }}
  template:
    {{- include "fusion.podTemplate" (merge (dict "container" "fusion" "restartPolicy" "Never") .) | nindent 4 }}
{{- end }}

{{- define "fusion.workload.prepare" -}}
{{- $s := .Values.cluster.workloads.prepare -}}
{{ include "fusion.job" (dict "root" . "stage" "prepare" "part" "" "suffix" "prepare" "settings" $s "image" "cpu" "mode" "single"
    "args" (list "prepare" (include "fusion.specPath" .))) }}
{{- end }}

{{- define "fusion.workload.split" -}}
{{- $s := .Values.cluster.workloads.split -}}
{{ include "fusion.job" (dict "root" . "stage" "split" "part" "" "suffix" "split" "settings" $s "image" "cpu" "mode" "indexed"
    "args" (list "stage" "split" (include "fusion.specPath" .))) }}
{{- end }}

{{/* Args: root, part (a source model). */}}
{{- define "fusion.workload.vocab" -}}
{{- $s := .root.Values.cluster.workloads.vocab -}}
{{ include "fusion.job" (dict "root" .root "stage" "vocab" "part" .part "suffix" (printf "vocab-%s" .part) "settings" $s "image" "cpu" "mode" "single"
    "args" (list "stage" "vocab" (include "fusion.specPath" .root) "--part" .part)) }}
{{- end }}

{{/* Args: root, part (any model, the target included). */}}
{{- define "fusion.workload.logits" -}}
{{- $s := .root.Values.cluster.workloads.logits -}}
{{ include "fusion.job" (dict "root" .root "stage" "logits" "part" .part "suffix" (printf "logits-%s" .part) "settings" $s "image" "gpu" "mode" "indexed"
    "gpus" $s.gpus "shm" $s.shmSize
    "args" (list "stage" "logits" (include "fusion.specPath" .root) "--part" .part)) }}
{{- end }}

{{/* Args: root, part (a source model). */}}
{{- define "fusion.workload.align" -}}
{{- $s := .root.Values.cluster.workloads.align -}}
{{ include "fusion.job" (dict "root" .root "stage" "align" "part" .part "suffix" (printf "align-%s" .part) "settings" $s "image" "cpu" "mode" "workers"
    "env" (list (dict "name" "FUSION_LEASE_SECONDS" "value" ($s.leaseSeconds | toString)))
    "args" (list "worker" "align" (include "fusion.specPath" .root) "--part" .part)) }}
{{- end }}

{{- define "fusion.workload.fuse" -}}
{{- $s := .Values.cluster.workloads.fuse -}}
{{ include "fusion.job" (dict "root" . "stage" "fuse" "part" "train" "suffix" "fuse" "settings" $s "image" "cpu" "mode" "indexed"
    "args" (list "stage" "fuse" (include "fusion.specPath" .) "--part" "train")) }}
{{- end }}

{{- define "fusion.workload.eval" -}}
{{- $s := .Values.cluster.workloads.eval -}}
{{ include "fusion.job" (dict "root" . "stage" "eval" "part" "" "suffix" "eval" "settings" $s "image" "gpu" "mode" "single"
    "gpus" $s.gpus "shm" $s.shmSize
    "args" (list "stage" "eval" (include "fusion.specPath" .))) }}
{{- end }}

{{/*
Training, on either Kubeflow operator (cluster.workloads.train.operator):

- pytorchjob (default): a kubeflow.org/v1 PyTorchJob (training operator v1.9). Every pod runs
  `fusion train SPEC`, which starts torchrun's agent from the variables the operator sets
  (PET_NNODES, PET_NPROC_PER_NODE, MASTER_ADDR, MASTER_PORT); the workers initialise DeepSpeed
  from the torch distributed environment (no ssh, no hostfile) and the pod exits with the first
  failed worker's code (3: bad input; 128+: killed), which restartPolicy ExitCode needs (torchrun
  alone flattens them to 1). Not elastic: a Master and `workers` Workers. Elastic: `workers + 1`
  Workers that rendezvous through c10d, between elastic.minReplicas and elastic.maxReplicas nodes.
- trainjob: a trainer.kubeflow.org/v1alpha1 TrainJob (Kubeflow Trainer v2) on a torch runtime,
  `workers + 1` nodes; the same `fusion train SPEC` in every pod, the torchrun agent reading the
  PET_* variables (PET_MASTER_ADDR, PET_MASTER_PORT among them) the runtime's torch plugin sets.

More than one process needs train.engine=deepspeed: refused here rather than after hours.
*/}}
{{- define "fusion.workload.train" -}}
{{- $s := .Values.cluster.workloads.train -}}
{{- $engine := (.Values.train | default dict).engine | default "torch" -}}
{{- $perNode := ternary $s.gpus 1 (has $s.nprocPerNode (list "auto" "gpu")) -}}
{{- if regexMatch "^[0-9]+$" $s.nprocPerNode }}{{ $perNode = atoi $s.nprocPerNode }}{{ end -}}
{{- if and (ne $engine "deepspeed") (or (gt (int $s.workers) 0) $s.elastic.enabled (gt (int $perNode) 1)) -}}
{{- fail (printf "training on %d node(s) x %d process(es) needs train.engine=deepspeed (train.engine=%s trains in one process)" (add $s.workers 1) (int $perNode) $engine) -}}
{{- end -}}
{{- $pod := include "fusion.trainPodArgs" . | fromYaml -}}
{{- $_ := set $pod "root" . -}}
{{- $_ := set $pod "settings" $s -}}
{{- if eq $s.operator "trainjob" }}
{{- include "fusion.trainJob" (merge (dict "container" "node" "restartPolicy" "") $pod) }}
{{- else }}
{{- $_ := set $pod "container" "pytorch" -}}
{{- $_ := set $pod "restartPolicy" "" }}
apiVersion: kubeflow.org/v1
kind: PyTorchJob
metadata:
  name: {{ include "fusion.name" (dict "root" . "suffix" "train") }}
  labels:
    {{- include "fusion.workloadLabels" $pod | nindent 4 }}
spec:
  nprocPerNode: {{ $s.nprocPerNode | quote }}
  runPolicy:
    backoffLimit: {{ $s.backoffLimit }}
    cleanPodPolicy: None
    {{- with $s.activeDeadlineSeconds }}
    activeDeadlineSeconds: {{ . }}
    {{- end }}
  {{- if $s.elastic.enabled }}
  elasticPolicy:
    rdzvBackend: c10d
    minReplicas: {{ $s.elastic.minReplicas }}
    maxReplicas: {{ $s.elastic.maxReplicas }}
    maxRestarts: {{ $s.elastic.maxRestarts }}
  {{- end }}
  pytorchReplicaSpecs:
    {{- if not $s.elastic.enabled }}
    Master:
      replicas: 1
      # ExitCode: 1-127 (bad input is 3) fail the job, 128+ (killed, preempted; 200 store
      # unreachable, 201 peers lost: fusion/errors.py) restart the pod, which resumes.
      restartPolicy: ExitCode
      template:
        {{- include "fusion.podTemplate" $pod | nindent 8 }}
    {{- end }}
    {{- $workers := ternary (add $s.workers 1) $s.workers $s.elastic.enabled }}
    {{- if gt (int $workers) 0 }}
    Worker:
      replicas: {{ $workers }}
      restartPolicy: ExitCode
      template:
        {{- include "fusion.podTemplate" $pod | nindent 8 }}
    {{- end }}
{{- end }}
{{- end }}

{{/* Every workload of the run, as one multi-document YAML. */}}
{{- define "fusion.workloads" -}}
{{- $root := . -}}
{{- $sources := list -}}
{{- range .Values.models.sources }}{{ $sources = append $sources .name }}{{ end -}}
{{- $models := prepend $sources .Values.models.target.name -}}
{{ include "fusion.workload.prepare" . }}
---
{{ include "fusion.workload.split" . }}
{{- range $sources }}
---
{{ include "fusion.workload.vocab" (dict "root" $root "part" .) }}
{{- end }}
{{- range $models }}
---
{{ include "fusion.workload.logits" (dict "root" $root "part" .) }}
{{- end }}
{{- range $sources }}
---
{{ include "fusion.workload.align" (dict "root" $root "part" .) }}
{{- end }}
---
{{ include "fusion.workload.fuse" . }}
---
{{ include "fusion.workload.train" . }}
---
{{ include "fusion.workload.eval" . }}
{{- end }}
