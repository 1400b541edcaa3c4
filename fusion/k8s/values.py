"""The Helm chart's values: a run spec (fusion.config.RunSpec) plus one `cluster` key.

Everything a run spec holds stays at the top level, so any jobs/*.yaml works as `-f` values;
everything about the cluster (images, resources, placement, credentials) lives under
`cluster`, so the two can never collide. The chart hands the pods the values without
`cluster` as their run spec.

helm/fusion/values.schema.json is generated from these models:

    python -m fusion.k8s.values > helm/fusion/values.schema.json

and helm/fusion/values.yaml holds exactly the defaults below (tests keep both in sync).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field

from fusion.config import RunSpec, Strict

DIGEST_PATTERN = r"^(sha256:[a-f0-9]{64})?$"
QUANTITY = int | str  # Kubernetes quantities: 2, "500m", "16Gi"; the chart quotes them all


class Image(Strict):
    repository: str = Field(description="Image repository, without tag or digest.")
    digest: str = Field(
        "",
        pattern=DIGEST_PATTERN,
        description="sha256:... digest the pods run (images are referred to by digest only). "
        "Required at install time; images/README.md says how to build and push them.",
    )


class Images(Strict):
    cpu: Image = Image(repository="ghcr.io/fusion-llm/fusion-cpu")
    gpu: Image = Image(repository="ghcr.io/fusion-llm/fusion-gpu")
    pullPolicy: Literal["IfNotPresent", "Always", "Never"] = "IfNotPresent"


class LocalName(Strict):
    name: str


class ServiceAccount(Strict):
    create: bool = Field(True, description="Create the service account the stage pods run as.")
    name: str = Field("", description="Its name; default: the release name.")
    annotations: dict[str, str] = Field(
        {}, description="e.g. eks.amazonaws.com/role-arn for S3 access by workload identity."
    )


class SecurityContext(Strict):
    runAsUser: int = Field(10001, ge=1, description="Non-root uid; the images' `fusion` user.")
    runAsGroup: int = Field(10001, ge=1)
    fsGroup: int = Field(10001, ge=1, description="Group that owns mounted volumes (store volume, caches).")


class S3(Strict):
    """Credentials only: the endpoint and region are the run spec's `store_options`, the one
    place every pod, the controller and `helm test` read them from."""

    secretName: str = Field(
        "",
        description="Secret holding S3 credentials (k8s/s3-secret.example.yaml). Empty: no keys are "
        "passed (workload identity, or a store that is not on S3).",
    )
    accessKeyIdKey: str = Field("AWS_ACCESS_KEY_ID", description="Key of the access key id in the Secret.")
    secretAccessKeyKey: str = Field("AWS_SECRET_ACCESS_KEY", description="Key of the secret key in the Secret.")


class StoreVolume(Strict):
    claimName: str = Field(
        "",
        description="A ReadWriteMany PersistentVolumeClaim for a store that is a path rather than s3://. "
        "It is mounted at /var/lib/fusion and pods start there, so `store: runs/tiny` lands on it.",
    )


class Kueue(Strict):
    queueName: str = Field("", description="LocalQueue for every stage workload (kueue.x-k8s.io/queue-name).")
    priorityClass: str = Field("", description="Kueue WorkloadPriorityClass (kueue.x-k8s.io/priority-class).")
    elasticJobs: bool = Field(
        True,
        description="Mark the alignment worker Jobs elastic (kueue.x-k8s.io/elastic-job: \"true\"), so that patching their "
        "parallelism resizes them instead of suspending and requeueing them; needs Kueue's ElasticJobsViaWorkloadSlices "
        "feature gate. Only with queueName.",
    )


class Resources(Strict):
    requests: dict[str, QUANTITY] = {}
    limits: dict[str, QUANTITY] = {}


class Toleration(Strict):
    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    tolerationSeconds: int | None = None


class Placement(Strict):
    """Where and how big the pods of one workload are, and how long they may take."""

    resources: Resources = Resources()
    nodeSelector: dict[str, str] = {}
    tolerations: list[Toleration] = []
    affinity: dict[str, Any] = Field({}, description="A Kubernetes Affinity, as is.")
    topologySpreadConstraints: list[dict[str, Any]] = Field(
        [],
        description="Kubernetes TopologySpreadConstraints, as is; the pods carry the labels "
        "app.kubernetes.io/instance, fusion.dev/stage and fusion.dev/part to select them by.",
    )
    priorityClassName: str = ""
    runtimeClassName: str = Field("", description="RuntimeClass of the pods (e.g. nvidia, gvisor, kata); empty: the cluster's default.")
    terminationGracePeriodSeconds: int | None = Field(
        None, ge=0, description="Seconds a pod has between SIGTERM and SIGKILL; unset: Kubernetes' 30 (train: sized from train.preemption)."
    )
    activeDeadlineSeconds: int | None = Field(
        None, ge=1, description="The workload fails once it has run this long (the Job's, PyTorchJob's or TrainJob's activeDeadlineSeconds); unset: no limit."
    )


def _resources(cpu: QUANTITY, memory: str) -> Resources:
    return Resources(requests={"cpu": cpu, "memory": memory}, limits={"memory": memory})


class JobSettings(Placement):
    backoffLimit: int = Field(3, ge=0, description="Retries of a failed pod (bad input, exit code 3, is never retried).")


class IndexedSettings(Placement):
    parallelism: int = Field(4, ge=1, description="Shards computed at once (at most the number of shards).")
    backoffLimitPerIndex: int = Field(2, ge=0, description="Retries of one shard; exit code 3 fails the shard at once.")


class GpuIndexedSettings(IndexedSettings):
    gpus: int = Field(1, ge=0, description="GPUs per pod (the `cluster.gpuResource` resource); 0 runs on CPU.")
    shmSize: str = Field("8Gi", description="Size of the memory-backed /dev/shm.")


class GpuJobSettings(JobSettings):
    gpus: int = Field(1, ge=0, description="GPUs per pod; 0 runs on CPU.")
    shmSize: str = "8Gi"


class AlignSettings(Placement):
    workers: int = Field(
        4,
        ge=1,
        description="Worker pods per source at the start; change it while they run with "
        "`kubectl patch job RELEASE-align-SOURCE --type=merge -p '{\"spec\":{\"parallelism\":N}}'`.",
    )
    backoffLimit: int = Field(6, ge=0, description="Failed workers tolerated (scale-downs and evictions do not count).")
    leaseSeconds: int = Field(
        300, ge=10, description="A lost worker's shard is taken over after this long (FUSION_LEASE_SECONDS); leases are renewed while a shard runs."
    )


class Elastic(Strict):
    enabled: bool = Field(False, description="torchrun elastic training: nodes may join and leave.")
    minReplicas: int = Field(1, ge=1)
    maxReplicas: int = Field(4, ge=1)
    maxRestarts: int = Field(3, ge=0)


class Preemption(Strict):
    """What a preempted (SIGTERM'd) train pod must still do: finish its step and save a
    checkpoint (fusion/training/checkpoint.py). torchrun's agent waits stepSeconds +
    saveSeconds for its workers (TORCH_ELASTIC_SHUTDOWN_TIMEOUT), and the pod's grace period
    adds exitSeconds for the agent itself, unless terminationGracePeriodSeconds is set."""

    stepSeconds: int = Field(300, ge=1, description="The longest an optimizer step takes (the step in flight when SIGTERM comes).")
    saveSeconds: int = Field(600, ge=1, description="The longest writing one checkpoint to the store takes.")
    exitSeconds: int = Field(30, ge=0, description="Margin for torchrun's agent to exit once its workers have.")


class Runtime(Strict):
    name: str = Field(
        "",
        description="The Trainer v2 runtime the TrainJob references, e.g. torch-distributed (Kubeflow's); empty: the chart "
        "ships its own torch ClusterTrainingRuntime, fusion-NAMESPACE-RELEASE, carrying every pod setting and a failure "
        "policy that restarts the nodes from the newest checkpoint. A named runtime's failure policy applies instead (and "
        "backoffLimit does not): torch-distributed has none, so a preempted node or a lost peer fails the TrainJob and the "
        "run (k8s/README.md, Which training operator).",
    )
    kind: Literal["ClusterTrainingRuntime", "TrainingRuntime"] = Field(
        "ClusterTrainingRuntime", description="Its kind: cluster-wide, or a TrainingRuntime in the release's namespace."
    )


class TrainSettings(Placement):
    operator: Literal["pytorchjob", "trainjob"] = Field(
        "pytorchjob",
        description="pytorchjob: a kubeflow.org/v1 PyTorchJob (Kubeflow training operator v1.9); trainjob: a "
        "trainer.kubeflow.org/v1alpha1 TrainJob (Kubeflow Trainer v2) on a torch runtime (`runtime`).",
    )
    runtime: Runtime = Runtime()
    preemption: Preemption = Preemption()
    workers: int = Field(
        0, ge=0, description="Nodes beside the first (PyTorchJob Workers beside the Master; TrainJob numNodes - 1); more than one process needs train.engine=deepspeed."
    )
    gpus: int = Field(1, ge=0, description="GPUs per node.")
    nprocPerNode: str = Field("auto", pattern=r"^(auto|cpu|gpu|[1-9][0-9]*)$", description="torchrun processes per node.")
    shmSize: str = "32Gi"
    backoffLimit: int = Field(3, ge=0)
    elastic: Elastic = Elastic()


class ServiceMonitor(Strict):
    enabled: bool = Field(False, description="Install a Prometheus Operator ServiceMonitor (monitoring.coreos.com/v1) for the metrics.")
    interval: str = Field("30s", pattern=r"^[0-9]+(ms|s|m|h)$", description="Scrape interval.")
    labels: dict[str, str] = Field({}, description="Labels your Prometheus selects ServiceMonitors by (e.g. release: prometheus).")


class Metrics(Strict):
    port: int = Field(9090, ge=0, le=65535, description="Port of the controller's Prometheus metrics (GET /metrics); 0: none, and no Service.")
    serviceMonitor: ServiceMonitor = ServiceMonitor()


class ControllerSettings(Placement):
    pollSeconds: float = Field(15, gt=0, description="How often the controller reads the store and the API.")
    metrics: Metrics = Metrics()
    backoffLimit: int = Field(6, ge=0, description="Restarts of the controller (it resumes where it was).")


class Workloads(Strict):
    """Per-stage cluster settings. Stage *settings* (top-k, lambda...) are run spec keys."""

    prepare: JobSettings = JobSettings(resources=_resources(2, "8Gi"))
    split: IndexedSettings = IndexedSettings(resources=_resources(4, "16Gi"), parallelism=8)
    vocab: JobSettings = JobSettings(resources=_resources(2, "8Gi"))
    logits: GpuIndexedSettings = GpuIndexedSettings(resources=_resources(8, "64Gi"))
    align: AlignSettings = AlignSettings(resources=_resources(8, "32Gi"))
    fuse: IndexedSettings = IndexedSettings(resources=_resources(4, "32Gi"), parallelism=8)
    train: TrainSettings = TrainSettings(resources=_resources(32, "512Gi"))
    eval: GpuJobSettings = GpuJobSettings(resources=_resources(8, "64Gi"))


class Cluster(Strict):
    image: Images = Images()
    imagePullSecrets: list[LocalName] = []
    serviceAccount: ServiceAccount = ServiceAccount()
    securityContext: SecurityContext = SecurityContext()
    s3: S3 = S3()
    storeVolume: StoreVolume = StoreVolume()
    gpuResource: str = Field("nvidia.com/gpu", description="Extended resource name of a GPU.")
    kueue: Kueue = Kueue()
    env: list[dict[str, Any]] = Field([], description="Extra environment variables (Kubernetes EnvVar) for every fusion container.")
    volumes: list[dict[str, Any]] = Field([], description="Extra pod volumes, e.g. a PersistentVolumeClaim holding the models.")
    volumeMounts: list[dict[str, Any]] = Field([], description="Where the extra volumes are mounted in every fusion container.")
    podLabels: dict[str, str] = {}
    podAnnotations: dict[str, str] = {}
    controller: ControllerSettings = ControllerSettings(resources=_resources("250m", "512Mi"))
    workloads: Workloads = Workloads()


class ChartValues(RunSpec):
    """A run spec plus the `cluster` key: the values of helm/fusion."""

    cluster: Cluster = Cluster()


def schema() -> dict:
    """values.schema.json: the run spec's schema plus the cluster keys."""
    out = ChartValues.model_json_schema(by_alias=True)
    out["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    out["title"] = "fusion chart values: a run spec (fusion.config.RunSpec) plus cluster keys"
    return out


def schema_text() -> str:
    return json.dumps(schema(), indent=2, sort_keys=True) + "\n"


def default_cluster_values() -> dict:
    """What helm/fusion/values.yaml holds."""
    return {"cluster": Cluster().model_dump(mode="json", by_alias=True)}


if __name__ == "__main__":
    print(schema_text(), end="")
