{{/*
Names, labels and the pod template every fusion workload shares.
*/}}

{{/* The run spec the pods read: the values without `cluster`. */}}
{{- define "fusion.runSpec" -}}
{{- omit .Values "cluster" | toYaml -}}
{{- end }}

{{/*
RELEASE-SUFFIX. At most 52 characters: Jobs name their pods after themselves, and the
training operator names Services after the PyTorchJob (DNS labels of at most 63).
*/}}
{{- define "fusion.name" -}}
{{- $name := printf "%s-%s" .root.Release.Name .suffix -}}
{{- if gt (len $name) 52 -}}
{{- fail (printf "the object name %q is longer than 52 characters: use a shorter release name (or model names)" $name) -}}
{{- end -}}
{{- $name -}}
{{- end }}

{{- define "fusion.serviceAccountName" -}}
{{- default .Release.Name .Values.cluster.serviceAccount.name -}}
{{- end }}

{{- define "fusion.selectorLabels" -}}
app.kubernetes.io/name: fusion
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of the objects Helm installs. */}}
{{- define "fusion.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{ include "fusion.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
fusion.dev/run: {{ .Values.name }}
{{- end }}

{{/* Labels of a stage's pods; args: root, stage, part ("" for every part). */}}
{{- define "fusion.podLabels" -}}
{{ include "fusion.selectorLabels" .root }}
app.kubernetes.io/component: {{ .stage }}
fusion.dev/run: {{ .root.Values.name }}
{{- if not (has .stage (list "controller" "test")) }}
fusion.dev/stage: {{ .stage }}
{{- end }}
{{- with .part }}
fusion.dev/part: {{ . }}
{{- end }}
{{- with .root.Values.cluster.podLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Labels of a stage's workload object. The controller creates these objects, so they are
managed by it, not by Helm; Kueue labels go on the workload, where Kueue looks for them.
*/}}
{{- define "fusion.workloadLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: fusion-controller
{{ include "fusion.podLabels" . }}
{{- with .root.Values.cluster.kueue.queueName }}
kueue.x-k8s.io/queue-name: {{ . }}
{{- end }}
{{- with .root.Values.cluster.kueue.priorityClass }}
kueue.x-k8s.io/priority-class: {{ . }}
{{- end }}
{{- end }}

{{/* image: "cpu" or "gpu"; images are referred to by digest only. */}}
{{- define "fusion.image" -}}
{{- $image := get .root.Values.cluster.image .image -}}
{{- if not $image.digest -}}
{{- fail (printf "cluster.image.%s.digest is empty: build and push images/ (images/README.md), then --set cluster.image.%s.digest=sha256:..." .image .image) -}}
{{- end -}}
{{- printf "%s@%s" $image.repository $image.digest -}}
{{- end }}

{{/* The store must be reachable from every pod: s3://, or a path on the store volume. */}}
{{- define "fusion.checkStore" -}}
{{- $store := .Values.store -}}
{{- $path := trimPrefix "file://" $store -}}
{{- if not (hasPrefix "s3://" $store) -}}
{{- if not .Values.cluster.storeVolume.claimName -}}
{{- fail (printf "store %q is not reachable from the pods: use --set store=s3://BUCKET/PREFIX, or a ReadWriteMany volume with --set cluster.storeVolume.claimName=PVC" $store) -}}
{{- end -}}
{{- if or (contains "://" $path) (and (hasPrefix "/" $path) (not (hasPrefix "/var/lib/fusion/" $path))) -}}
{{- fail (printf "store %q: with cluster.storeVolume the store is a relative path, or a path under /var/lib/fusion/ (where the volume is mounted)" $store) -}}
{{- end -}}
{{- end -}}
{{- if not (regexMatch "^[a-z]" .Release.Name) -}}
{{- fail (printf "release name %q must start with a letter (the training operator names Services after it)" .Release.Name) -}}
{{- end -}}
{{- end }}

{{/* Kubernetes quantities, quoted: API client models reject bare integers such as nvidia.com/gpu: 1. */}}
{{- define "fusion.quantities" -}}
{{- $out := dict -}}
{{- range $name, $value := . }}{{ $_ := set $out $name ($value | toString) }}{{ end -}}
{{- toYaml $out -}}
{{- end }}

{{/*
The pod template spec of a stage. Args:
  root       the chart context
  stage      stage name; part: the part or ""
  settings   cluster.workloads.<stage> (or cluster.controller)
  image      "cpu" | "gpu"
  container  container name ("fusion"; "pytorch" in a PyTorchJob)
  command    optional list (default: the image's entrypoint, the fusion CLI)
  args       list
  gpus       GPUs per pod (0: none)
  shm        size of the memory-backed /dev/shm ("": none)
  grace      optional: terminationGracePeriodSeconds (default: the settings')
  env        optional list: the stage's own variables
  restartPolicy  "Never" for Jobs; "" to leave it to the training operator
  ports      optional list of container ports
  serviceAccountName  optional (default: the stage pods' service account)
*/}}
{{- define "fusion.podTemplate" -}}
{{- $root := .root -}}
{{- $c := $root.Values.cluster -}}
{{- $s := .settings -}}
metadata:
  labels:
    {{- include "fusion.podLabels" . | nindent 4 }}
  {{- with $c.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- with .restartPolicy }}
  restartPolicy: {{ . }}
  {{- end }}
  serviceAccountName: {{ default (include "fusion.serviceAccountName" $root) .serviceAccountName }}
  automountServiceAccountToken: {{ .serviceAccountName | empty | not }}
  enableServiceLinks: false
  securityContext:
    runAsNonRoot: true
    runAsUser: {{ $c.securityContext.runAsUser }}
    runAsGroup: {{ $c.securityContext.runAsGroup }}
    fsGroup: {{ $c.securityContext.fsGroup }}
    seccompProfile:
      type: RuntimeDefault
  {{- with $c.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $s.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with $s.runtimeClassName }}
  runtimeClassName: {{ . }}
  {{- end }}
  {{- $grace := ternary .grace $s.terminationGracePeriodSeconds (hasKey . "grace") }}
  {{- if not (kindIs "invalid" $grace) }}
  terminationGracePeriodSeconds: {{ $grace }}
  {{- end }}
  {{- with $s.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $s.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $s.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $s.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ .container }}
      image: {{ include "fusion.image" . }}
      imagePullPolicy: {{ $c.image.pullPolicy }}
      {{- with .command }}
      command:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      args:
        {{- toYaml .args | nindent 8 }}
      {{- with .ports }}
      ports:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- if $c.storeVolume.claimName }}
      workingDir: /var/lib/fusion
      {{- end }}
      env:
        - name: POD_NAME
          valueFrom:
            fieldRef:
              fieldPath: metadata.name
        - name: POD_NAMESPACE
          valueFrom:
            fieldRef:
              fieldPath: metadata.namespace
        - name: HOME
          value: /tmp
        # the run's identity in run.json (fusion/ownership.py): another release never writes here,
        # nor a release of the same name in another namespace
        - name: FUSION_RUN_ID
          value: {{ printf "%s/%s" $root.Release.Namespace $root.Release.Name | quote }}
        - name: TQDM_DISABLE
          value: "1"
        - name: HF_HUB_OFFLINE
          value: "1"
        - name: PYTHONUNBUFFERED
          value: "1"
        - name: MPLCONFIGDIR
          value: /tmp/matplotlib
        - name: NUMBA_CACHE_DIR
          value: /var/cache/fusion/numba
        {{- with $c.s3.secretName }}
        - name: AWS_ACCESS_KEY_ID
          valueFrom:
            secretKeyRef:
              name: {{ . }}
              key: {{ $c.s3.accessKeyIdKey }}
        - name: AWS_SECRET_ACCESS_KEY
          valueFrom:
            secretKeyRef:
              name: {{ . }}
              key: {{ $c.s3.secretAccessKeyKey }}
        {{- end }}
        {{- /* the spec's store settings, also for tools in the pod that read the AWS environment */}}
        {{- $store := $root.Values.store_options | default dict }}
        {{- with $store.endpoint_url }}
        - name: AWS_ENDPOINT_URL
          value: {{ . | quote }}
        {{- end }}
        {{- with $store.region }}
        - name: AWS_DEFAULT_REGION
          value: {{ . | quote }}
        {{- end }}
        {{- with .env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
        {{- with $c.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      resources:
        {{- $requests := $s.resources.requests | default dict }}
        {{- $limits := $s.resources.limits | default dict }}
        {{- if .gpus }}
        {{- $limits = merge (dict $c.gpuResource .gpus) $limits }}
        {{- end }}
        {{- with $requests }}
        requests:
          {{- include "fusion.quantities" . | nindent 10 }}
        {{- end }}
        {{- with $limits }}
        limits:
          {{- include "fusion.quantities" . | nindent 10 }}
        {{- end }}
      securityContext:
        allowPrivilegeEscalation: false
        readOnlyRootFilesystem: true
        runAsNonRoot: true
        capabilities:
          drop: [ALL]
      volumeMounts:
        - name: spec
          mountPath: /etc/fusion
          readOnly: true
        - name: tmp
          mountPath: /tmp
        - name: cache
          mountPath: /var/cache/fusion
        {{- if .shm }}
        - name: shm
          mountPath: /dev/shm
        {{- end }}
        {{- if $c.storeVolume.claimName }}
        - name: store
          mountPath: /var/lib/fusion
        {{- end }}
        {{- with $c.volumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: spec
      configMap:
        name: {{ include "fusion.name" (dict "root" $root "suffix" "spec") }}
    - name: tmp
      emptyDir: {}
    - name: cache
      emptyDir: {}
    {{- with .shm }}
    - name: shm
      emptyDir:
        medium: Memory
        sizeLimit: {{ . }}
    {{- end }}
    {{- with $c.storeVolume.claimName }}
    - name: store
      persistentVolumeClaim:
        claimName: {{ . }}
    {{- end }}
    {{- with $c.volumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}

{{/* podFailurePolicy rules every stage shares: disruptions are no failures. */}}
{{- define "fusion.ignoreDisruptions" -}}
- action: Ignore
  onPodConditions:
    - type: DisruptionTarget
      status: "True"
{{- end }}

{{/* The spec path inside every pod. */}}
{{- define "fusion.specPath" -}}/etc/fusion/run.yaml{{- end }}

{{/*
Train pods' grace period: a preempted pod finishes its step and saves a checkpoint
(fusion/training/checkpoint.py), so torchrun's agent waits step + save for its workers
(TORCH_ELASTIC_SHUTDOWN_TIMEOUT) and the pod gets that plus the agent's own exit, unless
terminationGracePeriodSeconds is set, which then must cover step + save. Arg: the train settings.
*/}}
{{- define "fusion.trainShutdownSeconds" -}}
{{- add .preemption.stepSeconds .preemption.saveSeconds -}}
{{- end }}

{{- define "fusion.trainGraceSeconds" -}}
{{- $shutdown := include "fusion.trainShutdownSeconds" . | int -}}
{{- if kindIs "invalid" .terminationGracePeriodSeconds -}}
{{- add $shutdown .preemption.exitSeconds -}}
{{- else if lt (int .terminationGracePeriodSeconds) $shutdown -}}
{{- fail (printf "cluster.workloads.train.terminationGracePeriodSeconds=%d is shorter than a step plus a save (preemption.stepSeconds + preemption.saveSeconds = %d): a preempted pod would be killed before its checkpoint is written" (int .terminationGracePeriodSeconds) $shutdown) -}}
{{- else -}}
{{- .terminationGracePeriodSeconds -}}
{{- end -}}
{{- end }}
