"""A simulated Kubernetes cluster for a whole fusion run, on this machine.

The API server is kmock's Kubernetes emulator on 127.0.0.1 (an in-memory object store over
HTTP). The test plays the cluster's other parts, each through that API, as the real ones do:

- the Job controller (batch/v1): Indexed Jobs with backoffLimitPerIndex, work-queue Jobs
  whose parallelism may change, podFailurePolicy, pods tracked with the job-tracking
  finalizer, JOB_COMPLETION_INDEX through the downward API;
- the Kubeflow training operator: a PyTorchJob's Master and Worker pods with the PET_*
  variables torchrun reads, restartPolicy ExitCode;
- Kubeflow Trainer v2 (and the JobSet under it): a TrainJob's node pods built from its
  (Cluster)TrainingRuntime, the TrainJob's runtimePatches and trainer (trainjob_pod), with the
  PET_* variables of the torch plugin; a node Job failed by its podFailurePolicy fails the
  TrainJob, any other failure restarts every node (failurePolicy.maxRestarts times);
- the garbage collector: objects whose owner is gone are deleted (cascading);
- the kubelet: each pod's container runs as a local process with the environment Kubernetes
  would give it (env, fieldRef and secretKeyRef resolved, the service account's API access
  as a kubeconfig), its volumes as local folders. A container's paths under a volume's
  mountPath (in args, env values, workingDir) are mapped to that folder; everything else
  of the filesystem is this machine's. Deleting a pod sends SIGTERM, then SIGKILL; losing a
  node (lose_node) kills the pod's processes outright.

The image's entrypoint is the `fusion` CLI; `fusion` and `torchrun` run from this checkout
(PYTHONPATH), so the code under test is the code in the pods.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import aiohttp
import attrs
import kmock
import yaml

REPO = Path(__file__).resolve().parents[1]
TRACKING = "batch.kubernetes.io/job-tracking"
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
GRACE_SECONDS = 5.0

# Where the cluster's resources live in the API (group/version/plural -> kind).
RESOURCES = {
    "v1/pods": "Pod",
    "v1/configmaps": "ConfigMap",
    "v1/secrets": "Secret",
    "v1/serviceaccounts": "ServiceAccount",
    "v1/services": "Service",
    "v1/events": "Event",
    "monitoring.coreos.com/v1/servicemonitors": "ServiceMonitor",
    "rbac.authorization.k8s.io/v1/roles": "Role",
    "rbac.authorization.k8s.io/v1/rolebindings": "RoleBinding",
    "batch/v1/jobs": "Job",
    "kubeflow.org/v1/pytorchjobs": "PyTorchJob",
    "trainer.kubeflow.org/v1alpha1/trainjobs": "TrainJob",
    "trainer.kubeflow.org/v1alpha1/trainingruntimes": "TrainingRuntime",
    "trainer.kubeflow.org/v1alpha1/clustertrainingruntimes": "ClusterTrainingRuntime",
}
PLURALS = {kind: key for key, kind in RESOURCES.items()}
CLUSTER_SCOPED = {"ClusterTrainingRuntime"}
TRAINER_STEP = "trainer.kubeflow.org/trainjob-ancestor-step"
JOBSET_NAME = "jobset.sigs.k8s.io/jobset-name"


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@attrs.define(kw_only=True)
class ApiServer(kmock.KubernetesEmulator):
    """kmock's emulator plus what the API server adds to a created object."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for key, kind in RESOURCES.items():
            self.resources[key] = kmock.ResourceInfo(kind=kind, namespaced=kind not in CLUSTER_SCOPED)

    async def _handle(self, request):
        if request.action == kmock.action.CREATE and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", now())
            if request.namespace:
                meta.setdefault("namespace", request.namespace)
        return await super()._handle(request)


@dataclass
class Process:
    """A running container."""

    proc: asyncio.subprocess.Process
    log: Path
    started: float
    term_sent: float | None = None


@dataclass
class JobState:
    """What the Job controller tracks of one Job (status it counts from finished pods)."""

    succeeded: set = field(default_factory=set)  # indexes (Indexed) or pod names
    index_failures: dict = field(default_factory=dict)
    failed_indexes: set = field(default_factory=set)
    failed: int = 0
    ignored: int = 0
    condition: dict | None = None


class Cluster:
    """The simulated cluster around an ApiServer: call `tick()` in a loop."""

    def __init__(self, api_url: str, namespace: str, root: Path, image_env: dict[str, str]):
        self.url = api_url.rstrip("/")
        self.namespace = namespace
        self.root = root
        self.image_env = image_env
        self.session: aiohttp.ClientSession | None = None
        self.processes: dict[str, Process] = {}  # pod uid -> its container
        self.jobs: dict[str, JobState] = {}  # job uid -> state
        self.ports: dict[str, int] = {}  # PyTorchJob or TrainJob uid -> its rendezvous port
        self.restarts: dict[str, int] = {}  # TrainJob uid -> JobSet restarts so far
        self.events: list[tuple[float, str]] = []  # the timeline
        self.started = time.monotonic()
        root.mkdir(parents=True, exist_ok=True)
        self.kubeconfig = root / "kubeconfig.yaml"
        self.kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "sim", "cluster": {"server": self.url}}],
                    "users": [{"name": "sim", "user": {"token": "simulated"}}],
                    "contexts": [{"name": "sim", "context": {"cluster": "sim", "user": "sim", "namespace": namespace}}],
                    "current-context": "sim",
                }
            )
        )

    async def __aenter__(self):
        self.session = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc):
        for uid in list(self.processes):
            await self._stop(uid, force=True)
        await self.session.close()

    def event(self, message: str) -> None:
        self.events.append((round(time.monotonic() - self.started, 1), message))

    # ---- the API, as a client ----------------------------------------------------------------
    def path(self, kind: str, name: str | None = None) -> str:
        group_version, plural = PLURALS[kind].rsplit("/", 1)
        base = f"/api/{group_version}" if group_version == "v1" else f"/apis/{group_version}"
        scope = "" if kind in CLUSTER_SCOPED else f"/namespaces/{self.namespace}"
        return f"{self.url}{base}{scope}/{plural}" + (f"/{name}" if name else "")

    async def _json(self, method: str, url: str, body=None):
        async with self.session.request(method, url, json=body) as r:
            data = await r.json(content_type=None)
            if r.status == 404:
                return None
            if r.status >= 400:
                raise RuntimeError(f"{method} {url}: {r.status} {data}")
            return data

    async def list(self, kind: str) -> list[dict]:
        return (await self._json("GET", self.path(kind)) or {}).get("items", [])

    async def get(self, kind: str, name: str) -> dict | None:
        return await self._json("GET", self.path(kind, name))

    async def create(self, obj: dict) -> dict:
        return await self._json("POST", self.path(obj["kind"]), obj)

    async def patch(self, kind: str, name: str, body: dict) -> dict | None:
        return await self._json("PATCH", self.path(kind, name), body)

    async def delete(self, kind: str, name: str) -> None:
        await self._json("DELETE", self.path(kind, name))


    # ---- `helm install`, `kubectl` --------------------------------------------------------------
    async def apply(self, objects: list[dict]) -> None:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj = {**obj, "metadata": {**obj["metadata"], "namespace": self.namespace}}
            await self.create(obj)

    async def uninstall(self, objects: list[dict]) -> None:
        """`helm uninstall`: delete what the release installed; the rest is the GC's work."""
        for obj in objects:
            await self.delete(obj["kind"], obj["metadata"]["name"])

    # ---- one pass of every controller -------------------------------------------------------------
    async def tick(self) -> None:
        """Every controller once, on one snapshot of the cluster (what they change shows next time)."""
        snapshot = {kind: await self.list(kind) for kind in PLURALS}
        await self.collect_garbage(snapshot)
        pods = snapshot["Pod"]
        for job in snapshot["Job"]:
            await self.sync_job(job, pods)
        await self.release_orphans(pods, {j["metadata"]["uid"] for j in snapshot["Job"]})
        for job in snapshot["PyTorchJob"]:
            await self.sync_pytorchjob(job, pods)
        runtimes = {(o["kind"], o["metadata"]["name"]): o for kind in ("TrainingRuntime", "ClusterTrainingRuntime") for o in snapshot[kind]}
        for job in snapshot["TrainJob"]:
            await self.sync_trainjob(job, pods, runtimes)
        await self.kubelet(pods)

    async def collect_garbage(self, snapshot: dict[str, list[dict]]) -> None:
        objects = [obj for objs in snapshot.values() for obj in objs]
        alive = {obj["metadata"]["uid"] for obj in objects}
        for obj in objects:
            owners = [r["uid"] for r in obj["metadata"].get("ownerReferences") or []]
            if owners and not any(uid in alive for uid in owners) and not obj["metadata"].get("deletionTimestamp"):
                self.event(f"garbage collector deletes {obj['kind']} {obj['metadata']['name']} (owner gone)")
                await self.delete(obj["kind"], obj["metadata"]["name"])

    # ---- the Job controller -------------------------------------------------------------------------
    async def release_orphans(self, pods: list[dict], job_uids: set[str]) -> None:
        """Pods whose Job is gone lose the tracking finalizer, so that they can be deleted."""
        for pod in pods:
            owners = {r["uid"] for r in pod["metadata"].get("ownerReferences") or [] if r["kind"] == "Job"}
            if owners and not owners & job_uids and TRACKING in (pod["metadata"].get("finalizers") or []):
                await self.patch("Pod", pod["metadata"]["name"], {"metadata": {"finalizers": []}})

    async def sync_job(self, job: dict, all_pods: list[dict]) -> None:
        meta, spec = job["metadata"], job["spec"]
        state = self.jobs.setdefault(meta["uid"], JobState())
        pods = owned(all_pods, meta["uid"])
        indexed = spec.get("completionMode") == "Indexed"
        for pod in pods:
            if pod["status"].get("phase") in ("Succeeded", "Failed") and TRACKING in (pod["metadata"].get("finalizers") or []):
                self._count(job, state, pod, indexed)
                await self.patch("Pod", pod["metadata"]["name"], {"metadata": {"finalizers": []}})
        active = [p for p in pods if p["status"].get("phase") not in ("Succeeded", "Failed")]
        running = [p for p in active if not p["metadata"].get("deletionTimestamp")]
        if state.condition is None:
            state.condition = self._finished(spec, state, indexed, active)
            if state.condition is not None:
                self.event(f"Job {meta['name']}: {state.condition['type']}" + (f" ({state.condition['reason']})" if state.condition["type"] == "Failed" else ""))
        if state.condition is not None and state.condition["type"] == "Failed":
            for pod in running:
                await self.delete("Pod", pod["metadata"]["name"])
        elif state.condition is None:
            await self._scale(job, state, indexed, running)
        status = {
            "active": len(active),
            "succeeded": len(state.succeeded),
            "failed": state.failed,
            "conditions": [state.condition] if state.condition else [],
        }
        if indexed:
            status["completedIndexes"] = ",".join(str(i) for i in sorted(state.succeeded))
            status["failedIndexes"] = ",".join(str(i) for i in sorted(state.failed_indexes))
        if job.get("status") != status:
            await self.patch("Job", meta["name"], {"status": status})

    def _count(self, job: dict, state: JobState, pod: dict, indexed: bool) -> None:
        key = int(pod["metadata"]["annotations"][INDEX_ANNOTATION]) if indexed else pod["metadata"]["name"]
        code = exit_code(pod)
        if code == 0:
            state.succeeded.add(key)
            return
        action = pod_failure_action(job["spec"].get("podFailurePolicy"), pod)
        self.event(f"pod {pod['metadata']['name']} exited {code}: {action}")
        if action == "Ignore":
            state.ignored += 1
            return
        state.failed += 1
        if action == "FailJob":
            state.condition = {"type": "Failed", "status": "True", "reason": "PodFailurePolicy", "message": f"pod {pod['metadata']['name']} exited {code}"}
        elif indexed:
            state.index_failures[key] = state.index_failures.get(key, 0) + 1
            if action == "FailIndex" or state.index_failures[key] > job["spec"].get("backoffLimitPerIndex", 0):
                state.failed_indexes.add(key)
        elif state.failed > job["spec"].get("backoffLimit", 6):
            state.condition = {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "too many failed pods"}

    def _finished(self, spec: dict, state: JobState, indexed: bool, active: list) -> dict | None:
        completions = spec.get("completions")
        if indexed:
            if len(state.succeeded) == completions:
                return {"type": "Complete", "status": "True"}
            if not active and len(state.succeeded) + len(state.failed_indexes) == completions:
                return {"type": "Failed", "status": "True", "reason": "FailedIndexes", "message": f"failed indexes {sorted(state.failed_indexes)}"}
            return None
        if completions is not None:
            return {"type": "Complete", "status": "True"} if len(state.succeeded) >= completions else None
        # a work queue: complete once a pod succeeded and none is left running
        return {"type": "Complete", "status": "True"} if state.succeeded and not active else None

    async def _scale(self, job: dict, state: JobState, indexed: bool, running: list) -> None:
        spec, name = job["spec"], job["metadata"]["name"]
        parallelism = spec.get("parallelism", 1)
        if indexed:
            busy = {int(p["metadata"]["annotations"][INDEX_ANNOTATION]) for p in running}
            pending = [i for i in range(spec["completions"]) if i not in state.succeeded | state.failed_indexes | busy]
            for i in pending[: max(0, parallelism - len(running))]:
                await self._create_pod(job, index=i)
            return
        if spec.get("completions") is not None:
            want = min(parallelism, spec["completions"] - len(state.succeeded))
        else:  # a work queue: once a pod succeeded no new ones start, but the running ones finish
            want = min(parallelism, len(running)) if state.succeeded else parallelism
        for _ in range(max(0, want - len(running))):
            await self._create_pod(job)
        if len(running) > want:  # a scale-down: the newest pods go first
            for pod in sorted(running, key=lambda p: p["metadata"]["creationTimestamp"] + p["metadata"]["name"])[want:]:
                self.event(f"Job {name}: parallelism {parallelism}, deleting pod {pod['metadata']['name']}")
                await self.delete("Pod", pod["metadata"]["name"])

    async def _create_pod(self, job: dict, index: int | None = None) -> None:
        template = job["spec"]["template"]
        name = job["metadata"]["name"] + (f"-{index}" if index is not None else "") + f"-{uuid.uuid4().hex[:5]}"
        spec = yaml.safe_load(yaml.safe_dump(template["spec"]))
        annotations = dict(template["metadata"].get("annotations") or {})
        if index is not None:
            annotations[INDEX_ANNOTATION] = str(index)
            for c in spec["containers"]:
                c.setdefault("env", []).append(
                    {"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{INDEX_ANNOTATION}']"}}}
                )
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "labels": {**(template["metadata"].get("labels") or {}), "batch.kubernetes.io/job-name": job["metadata"]["name"], "job-name": job["metadata"]["name"]},
                "annotations": annotations,
                "finalizers": [TRACKING],
                "ownerReferences": [owner_ref(job)],
            },
            "spec": spec,
            "status": {"phase": "Pending"},
        }
        await self.create(pod)

    # ---- the training operator --------------------------------------------------------------------
    async def sync_pytorchjob(self, job: dict, all_pods: list[dict]) -> None:
        """Pods named <job>-<master|worker>-<i>; restartPolicy ExitCode: 1-127 fail the job,
        128+ (killed) restart the pod; done when the Master (else every Worker) exits 0."""
        meta, spec = job["metadata"], job["spec"]
        if any(c.get("status") == "True" and c.get("type") in ("Succeeded", "Failed") for c in (job.get("status") or {}).get("conditions") or []):
            return
        pods = {p["metadata"]["name"]: p for p in owned(all_pods, meta["uid"])}
        replicas = [(rtype, i) for rtype in ("Master", "Worker") for i in range(spec["pytorchReplicaSpecs"].get(rtype, {}).get("replicas", 0))]
        port = self.ports.setdefault(meta["uid"], free_port())
        codes = {}
        for rank, (rtype, i) in enumerate(replicas):
            name = f"{meta['name']}-{rtype.lower()}-{i}"
            if name not in pods:
                await self._create_replica(job, rtype, i, rank, len(replicas), port)
            elif pods[name]["status"].get("phase") in ("Succeeded", "Failed"):
                codes[name] = exit_code(pods[name])
        condition = None
        for name, code in codes.items():
            if 0 < code < 128:
                condition = {"type": "Failed", "status": "True", "reason": "PyTorchJobFailed", "message": f"{name} exited {code}"}
            elif code >= 128:
                self.event(f"PyTorchJob {meta['name']}: {name} exited {code}, restarting it")
                await self.delete("Pod", name)
        master = f"{meta['name']}-master-0"
        if condition is None and (codes.get(master) == 0 or (master not in pods and len(codes) == len(replicas) and not any(codes.values()))):
            condition = {"type": "Succeeded", "status": "True", "reason": "PyTorchJobSucceeded"}
        if condition is not None:
            self.event(f"PyTorchJob {meta['name']}: {condition['type']}")
            await self.patch("PyTorchJob", meta["name"], {"status": {"conditions": [condition]}})

    async def _create_replica(self, job: dict, rtype: str, i: int, rank: int, world: int, port: int) -> None:
        spec = job["spec"]
        template = spec["pytorchReplicaSpecs"][rtype]["template"]
        pod_spec = yaml.safe_load(yaml.safe_dump(template["spec"]))
        pod_spec["restartPolicy"] = "Never"  # ExitCode: the operator decides on restarts
        master = f"{job['metadata']['name']}-master-0"
        nproc = spec.get("nprocPerNode", "auto")
        env = {
            "MASTER_ADDR": "127.0.0.1",  # the operator's Service for the Master; one host here
            "MASTER_PORT": str(port),
            "WORLD_SIZE": str(world),
            "RANK": str(rank),
            "PET_MASTER_ADDR": "127.0.0.1",
            "PET_MASTER_PORT": str(port),
            "PET_NNODES": str(world),
            "PET_NODE_RANK": str(rank),
            "PET_NPROC_PER_NODE": "1" if nproc in ("auto", "gpu") else nproc,  # no GPUs here
        }
        for c in pod_spec["containers"]:
            if c["name"] == "pytorch":
                c.setdefault("env", []).extend({"name": k, "value": v} for k, v in env.items())
        name = f"{job['metadata']['name']}-{rtype.lower()}-{i}"
        self.event(f"PyTorchJob {job['metadata']['name']}: pod {name} (rank {rank} of {world}, master {master})")
        await self.create(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": name,
                    "labels": {**(template["metadata"].get("labels") or {}), "training.kubeflow.org/replica-type": rtype.lower()},
                    "ownerReferences": [owner_ref(job)],
                },
                "spec": pod_spec,
                "status": {"phase": "Pending"},
            }
        )

    # ---- Kubeflow Trainer v2 -------------------------------------------------------------------------
    async def sync_trainjob(self, job: dict, all_pods: list[dict], runtimes: dict) -> None:
        """Node pods named <job>-node-0-<i>: the JobSet's one replicated Job `node`, numNodes
        pods. All of them exit 0: Complete. A pod failed and its Job's podFailurePolicy says
        FailJob (the JobSet's failurePolicy rule for PodFailurePolicy: FailJobSet): Failed. Any
        other failure recreates every node pod, failurePolicy.maxRestarts times at most."""
        meta, spec = job["metadata"], job["spec"]
        if any(c.get("status") == "True" and c.get("type") in ("Complete", "Failed") for c in (job.get("status") or {}).get("conditions") or []):
            return
        ref = spec["runtimeRef"]
        runtime = runtimes.get((ref.get("kind", "ClusterTrainingRuntime"), ref["name"]))
        if runtime is None:
            return  # the real controller waits, reporting the missing runtime in its status
        pods = {p["metadata"]["name"]: p for p in owned(all_pods, meta["uid"])}
        nodes = spec["trainer"].get("numNodes", runtime["spec"]["mlPolicy"].get("numNodes", 1))
        port = self.ports.setdefault(meta["uid"], free_port())
        names = [f"{meta['name']}-node-0-{i}" for i in range(nodes)]
        codes = {}
        for rank, name in enumerate(names):
            if name not in pods:
                pod = trainjob_pod(job, runtime, rank, "127.0.0.1", port)  # one host here: the headless Service's name is this machine
                pod["metadata"].update(name=name, ownerReferences=[owner_ref(job)])
                self.event(f"TrainJob {meta['name']}: pod {name} (node {rank} of {nodes})")
                await self.create(pod)
            elif pods[name]["status"].get("phase") in ("Succeeded", "Failed"):
                codes[name] = exit_code(pods[name])
        condition = None
        failed = {name: code for name, code in codes.items() if code != 0}
        node_job = _trainer_job(runtime)
        policy = node_job["template"]["spec"].get("podFailurePolicy")
        restarts = runtime["spec"]["template"]["spec"].get("failurePolicy", {}).get("maxRestarts", 0)
        if failed:
            name, code = next(iter(failed.items()))
            if pod_failure_action(policy, pods[name]) == "FailJob":
                condition = {"type": "Failed", "status": "True", "reason": "TrainingRuntimeFailed", "message": f"{name} exited {code} (PodFailurePolicy)"}
            elif self.restarts.get(meta["uid"], 0) >= restarts:
                condition = {"type": "Failed", "status": "True", "reason": "TrainingRuntimeFailed", "message": f"{name} exited {code}, {restarts} restart(s) used"}
            else:
                self.restarts[meta["uid"]] = self.restarts.get(meta["uid"], 0) + 1
                self.event(f"TrainJob {meta['name']}: {name} exited {code}, restarting the JobSet")
                for other in names:
                    if other in pods:
                        await self.delete("Pod", other)
        elif len(codes) == nodes:
            condition = {"type": "Complete", "status": "True", "reason": "JobsCompleted"}
        if condition is not None:
            self.event(f"TrainJob {meta['name']}: {condition['type']}")
            await self.patch("TrainJob", meta["name"], {"status": {"conditions": [condition]}})

    # ---- the kubelet ------------------------------------------------------------------------------
    async def kubelet(self, pods: list[dict]) -> None:
        seen = set()
        for pod in pods:
            uid, name = pod["metadata"]["uid"], pod["metadata"]["name"]
            seen.add(uid)
            phase = pod["status"].get("phase")
            if phase == "Pending" and uid not in self.processes:
                await self._start(pod)
            elif uid in self.processes:
                p = self.processes[uid]
                if p.proc.returncode is not None:
                    await self._finish(pod)
                elif pod["metadata"].get("deletionTimestamp"):
                    if p.term_sent is None:
                        self.event(f"kubelet: SIGTERM to pod {name}")
                        p.proc.send_signal(signal.SIGTERM)
                        p.term_sent = time.monotonic()
                    elif time.monotonic() - p.term_sent > GRACE_SECONDS:
                        p.proc.kill()
        for uid in list(self.processes):  # deleted outright (no finalizer): stop the container
            if uid not in seen:
                await self._stop(uid, force=False)

    async def _start(self, pod: dict) -> None:
        name = pod["metadata"]["name"]
        (container,) = pod["spec"]["containers"]
        pod_dir = self.root / "pods" / name
        mounts = await self._volumes(pod, container, pod_dir)
        env = {
            "PATH": os.environ["PATH"],
            "PYTHONPATH": str(REPO),
            "LANG": "C.UTF-8",
            **self.image_env,
        }
        for var in container.get("env", []):
            env[var["name"]] = remap(await self._env_value(pod, var), mounts)
        if pod["spec"].get("automountServiceAccountToken") is not False:
            env["KUBECONFIG"] = str(self.kubeconfig)  # the service account's access to the API
        command = container.get("command") or ["fusion"]  # the image's entrypoint
        program = {"fusion": [sys.executable, "-m", "fusion"], "torchrun": [sys.executable, "-m", "torch.distributed.run"]}[command[0]]
        argv = program + [remap(a, mounts) for a in command[1:] + container.get("args", [])]
        cwd = remap(container["workingDir"], mounts) if "workingDir" in container else str(pod_dir)  # else: the image's WORKDIR
        log = pod_dir / "log.txt"
        out = open(log, "ab")  # a pod restarted under its name appends (kubectl logs --previous, too)
        proc = await asyncio.create_subprocess_exec(*argv, env=env, cwd=cwd, stdout=out, stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        out.close()
        self.processes[pod["metadata"]["uid"]] = Process(proc, log, time.monotonic())
        await self.patch("Pod", name, {"status": {"phase": "Running", "startTime": now()}})
        self.event(f"kubelet: pod {name} runs `{' '.join(['fusion' if a == '-m' else a for a in argv[2:]][:6])}`")

    async def _finish(self, pod: dict) -> None:
        p = self.processes.pop(pod["metadata"]["uid"])
        code = p.proc.returncode
        code = 128 - code if code < 0 else code  # killed by signal N: 128 + N, as container runtimes report
        phase = "Succeeded" if code == 0 else "Failed"
        self.event(f"kubelet: pod {pod['metadata']['name']} exited {code} after {time.monotonic() - p.started:.1f} s")
        await self.patch(
            "Pod",
            pod["metadata"]["name"],
            {"status": {"phase": phase, "containerStatuses": [{"name": pod["spec"]["containers"][0]["name"], "state": {"terminated": {"exitCode": code}}}]}},
        )

    async def _stop(self, uid: str, force: bool) -> None:
        p = self.processes.pop(uid)
        if p.proc.returncode is None:
            p.proc.send_signal(signal.SIGKILL if force else signal.SIGTERM)
            try:
                await asyncio.wait_for(p.proc.wait(), GRACE_SECONDS)
            except asyncio.TimeoutError:
                p.proc.kill()
                await p.proc.wait()

    async def _volumes(self, pod: dict, container: dict, pod_dir: Path) -> dict[str, str]:
        """Each mounted volume as a local folder; returns mountPath -> folder."""
        folders = {}
        for volume in pod["spec"].get("volumes", []):
            folder = pod_dir / "volumes" / volume["name"]
            if "persistentVolumeClaim" in volume:
                folder = self.root / "claims" / volume["persistentVolumeClaim"]["claimName"]
            folder.mkdir(parents=True, exist_ok=True)
            if "configMap" in volume:
                cm = await self.get("ConfigMap", volume["configMap"]["name"])
                for key, value in cm["data"].items():
                    (folder / key).write_text(value)
            elif "secret" in volume:
                secret = await self.get("Secret", volume["secret"]["secretName"])
                for key, value in secret["data"].items():
                    (folder / key).write_bytes(base64.b64decode(value))
            folders[volume["name"]] = str(folder)
        return {m["mountPath"]: folders[m["name"]] for m in container.get("volumeMounts", [])}

    async def _env_value(self, pod: dict, var: dict) -> str:
        if "value" in var:
            return str(var["value"])
        source = var["valueFrom"]
        if "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            if path.startswith("metadata.annotations['"):
                return pod["metadata"]["annotations"][path[len("metadata.annotations['") : -2]]
            return {"metadata.name": pod["metadata"]["name"], "metadata.namespace": self.namespace}[path]
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            secret = await self.get("Secret", ref["name"])
            return base64.b64decode(secret["data"][ref["key"]]).decode()
        raise ValueError(f"unsupported env source {source}")

    async def lose_node(self, pod_name: str) -> None:
        """The node under a pod is lost: every process of the pod dies at once, with no SIGTERM
        and no grace (SIGKILL to the container's process group). The kubelet then reports the
        container as exited 137, as a real one does for a container killed outright."""
        pod = await self.get("Pod", pod_name)
        p = self.processes.get(pod["metadata"]["uid"])
        assert p is not None and p.proc.returncode is None, f"pod {pod_name} has no running container to lose"
        os.killpg(p.proc.pid, signal.SIGKILL)
        self.event(f"node of pod {pod_name} lost: its processes killed")

    def logs(self, prefix: str) -> str:
        return "\n".join(
            f"==== {d.name}\n{(d / 'log.txt').read_text(errors='replace')[-3000:]}"
            for d in sorted((self.root / "pods").glob(f"{prefix}*"))
            if (d / "log.txt").exists()
        )


def _trainer_job(runtime: dict) -> dict:
    """The runtime's replicated Job that runs the trainer (the ancestor-step label says which)."""
    jobs = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    for rj in jobs:
        if ((rj["template"].get("metadata") or {}).get("labels") or {}).get(TRAINER_STEP) == "trainer":
            return rj
    raise AssertionError(f"runtime {runtime['metadata']['name']} has no trainer job")


def trainjob_pod(job: dict, runtime: dict, node_rank: int, master_addr: str, master_port: int) -> dict:
    """A TrainJob's node pod, as Kubeflow Trainer v2's torch plugin and the JobSet make it:
    the runtime's trainer pod template, the TrainJob's runtimePatches on it (pod fields
    replaced, labels and annotations merged, a container's securityContext replaced and its
    volumeMounts added), then the TrainJob's trainer (image, command, args, env by name,
    resourcesPerNode) and the PET_* variables on the `node` container."""
    rj = _trainer_job(runtime)
    template = yaml.safe_load(yaml.safe_dump(rj["template"]["spec"]["template"]))
    meta, pod = template.setdefault("metadata", {}), template["spec"]
    for patch in job["spec"].get("runtimePatches") or []:
        for jp in patch["trainingRuntimeSpec"]["template"]["spec"].get("replicatedJobs") or []:
            if jp["name"] != rj["name"]:
                continue
            tp = jp["template"]["spec"]["template"]
            for key in ("labels", "annotations"):
                meta.setdefault(key, {}).update((tp.get("metadata") or {}).get(key) or {})
            for key, value in (tp.get("spec") or {}).items():
                if key != "containers":
                    pod[key] = value
            for cp in (tp.get("spec") or {}).get("containers") or []:
                c = next(c for c in pod["containers"] if c["name"] == cp["name"])
                if "securityContext" in cp:
                    c["securityContext"] = cp["securityContext"]
                c["volumeMounts"] = (c.get("volumeMounts") or []) + (cp.get("volumeMounts") or [])
    trainer = job["spec"]["trainer"]
    nodes = trainer.get("numNodes", runtime["spec"]["mlPolicy"].get("numNodes", 1))
    (node,) = [c for c in pod["containers"] if c["name"] == "node"]
    for key in ("image", "command", "args"):
        if key in trainer:
            node[key] = trainer[key]
    if "resourcesPerNode" in trainer:
        node["resources"] = trainer["resourcesPerNode"]
    pet = {
        "PET_NNODES": str(nodes),
        "PET_NPROC_PER_NODE": str(trainer.get("numProcPerNode", 1)),  # "auto" on a machine without GPUs: 1
        "PET_NODE_RANK": str(node_rank),
        "PET_MASTER_ADDR": master_addr,
        "PET_MASTER_PORT": str(master_port),
    }
    env = {e["name"]: e for e in node.get("env") or []}
    env.update({e["name"]: e for e in trainer.get("env") or []})
    env.update({k: {"name": k, "value": v} for k, v in pet.items()})
    node["env"] = list(env.values())
    pod["restartPolicy"] = "Never"
    meta["labels"] = {**meta.get("labels", {}), JOBSET_NAME: job["metadata"]["name"], "trainer.kubeflow.org/trainjob-name": job["metadata"]["name"]}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": pod, "status": {"phase": "Pending"}}


def remap(value: str, mounts: dict[str, str]) -> str:
    """A container path under a volume's mountPath, as the volume's local folder."""
    for mount in sorted(mounts, key=len, reverse=True):
        if value == mount or value.startswith(mount.rstrip("/") + "/"):
            return mounts[mount] + value[len(mount.rstrip("/")) :]
    return value


def owned(objects: list[dict], owner_uid: str) -> list[dict]:
    return [o for o in objects if any(r.get("uid") == owner_uid for r in o["metadata"].get("ownerReferences") or [])]


def exit_code(pod: dict) -> int | None:
    for status in pod["status"].get("containerStatuses") or []:
        terminated = status.get("state", {}).get("terminated")
        if terminated is not None:
            return terminated["exitCode"]
    return None


def pod_failure_action(policy: dict | None, pod: dict) -> str:
    """The action of the first podFailurePolicy rule that matches a failed pod ("Count" if none)."""
    code = exit_code(pod)
    conditions = {(c["type"], c.get("status", "True")) for c in pod["status"].get("conditions") or []}
    for rule in (policy or {}).get("rules", []):
        on_codes = rule.get("onExitCodes")
        if on_codes is not None:
            inside = code in on_codes["values"]
            if inside == (on_codes["operator"] == "In"):
                return rule["action"]
        for pattern in rule.get("onPodConditions", []):
            if (pattern["type"], pattern.get("status", "True")) in conditions:
                return rule["action"]
    return "Count"


def owner_ref(obj: dict) -> dict:
    return {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "name": obj["metadata"]["name"],
        "uid": obj["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def until(cluster: Cluster, predicate, timeout: float, what: str, interval: float = 0.3):
    """Run the cluster until predicate() (a coroutine) returns something true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await cluster.tick()
        result = await predicate()
        if result:
            return result
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; timeline:\n" + timeline(cluster))


async def kubectl_views(cluster: Cluster, release: str) -> str:
    """What `kubectl get` and `kubectl describe` show of a run, from the API (their columns)."""
    out = [f"$ kubectl get jobs,pytorchjobs,trainjobs -l app.kubernetes.io/instance={release}"]
    rows = [("NAME", "STATUS", "COMPLETIONS")]
    for kind, plural in (("Job", "job.batch"), ("PyTorchJob", "pytorchjob.kubeflow.org"), ("TrainJob", "trainjob.trainer.kubeflow.org")):
        for obj in await cluster.list(kind):
            conditions = [c["type"] for c in (obj.get("status") or {}).get("conditions") or [] if c.get("status") == "True"]
            done = ""
            if kind == "Job":
                succeeded, spec = (obj.get("status") or {}).get("succeeded", 0), obj["spec"]
                done = f"{succeeded}/{spec['completions']}" if "completions" in spec else f"{succeeded}/1 of {spec.get('parallelism', 1)}"
            rows.append((f"{plural}/{obj['metadata']['name']}", conditions[-1] if conditions else "Running", done))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    out += ["   ".join(cell.ljust(w) for cell, w in zip(r, width)).rstrip() for r in rows]
    status = await cluster.get("ConfigMap", f"{release}-status")
    out += ["", f"$ kubectl get configmap {release}-status -o jsonpath='{{.data.summary}}'", status["data"]["summary"].rstrip()]
    events = sorted(await cluster.list("Event"), key=lambda e: (e.get("lastTimestamp") or "", e["metadata"]["name"]))
    for name in (f"{release}-train", f"{release}-controller"):
        mine = [e for e in events if e["involvedObject"]["name"] == name]
        kind = mine[0]["involvedObject"]["kind"].lower() if mine else "job"
        out += ["", f"$ kubectl describe {kind} {name}", "...", "Events:", "  Type     Reason       From               Message", "  ----     ------       ----               -------"]
        out += [f"  {e['type']:<8} {e['reason']:<12} {e['source']['component']:<18} {e['message']}" for e in mine]
    return "\n".join(out)


def timeline(cluster: Cluster) -> str:
    return "\n".join(f"{t:7.1f} s  {message}" for t, message in cluster.events)


def secret(name: str, data: dict[str, str]) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name},
        "type": "Opaque",
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }




@contextlib.contextmanager
def s3_server(bucket: str, versioned: bool = False, backend: str = "moto"):
    """An S3 server on 127.0.0.1 (moto's, or SeaweedFS: tests/s3.py) with one bucket and the
    credentials test/test; yields (endpoint URL, boto3 client)."""
    import boto3
    import s3fs

    from tests.s3 import SeaweedFS, start_moto

    if backend == "moto":
        server, url = start_moto()
        stop = server.stop
    else:
        server = SeaweedFS("test", "test").start()
        url, stop = server.url, server.close
    s3fs.S3FileSystem.clear_instance_cache()  # fsspec caches filesystems, endpoint included
    try:
        client = boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test")
        client.create_bucket(Bucket=bucket)
        if versioned:
            client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
        yield url, client
        # moto's servers in one process share their buckets: leave none behind for the next test
        for page in client.get_paginator("list_object_versions").paginate(Bucket=bucket):
            for v in page.get("Versions", []) + page.get("DeleteMarkers", []):
                client.delete_object(Bucket=bucket, Key=v["Key"], VersionId=v["VersionId"])
        client.delete_bucket(Bucket=bucket)
    finally:
        stop()
        s3fs.S3FileSystem.clear_instance_cache()
