"""The controller of a fusion run on Kubernetes.

It runs as a Job beside the run (helm/fusion/templates/controller.yaml) and creates each
stage's workload, rendered by Helm into the run's ConfigMap, once the stage's inputs are
committed in the store. So no workload exists before it can start, and no GPU workload holds
nodes while upstream work runs: a training job is created when the packed data is committed,
not when alignment starts. The order comes from the data (the run's pipeline says what each
part reads, fusion/pipeline.py; run.json what it planned; commit records what is done), never
from a fixed sequence.

Every pass (each --poll-seconds) derives everything from the store and the API:

  1. prepare, the first workload, checks the spec, models and corpus, plans the shards and
     writes run.json with every output's config hash and shard count. It runs once per
     install, so run.json always describes the spec being installed.
  2. every other workload whose outputs are not all committed:
     - no object yet, and all its inputs committed: create it (an Indexed Job gets
       completions = the planned shards), owned by the controller's Job, so that
       `helm uninstall` removes it;
     - its object succeeded: commit its parts (_COMMITTED.json, written after checking that
       every shard has its record);
     - its object failed: the run fails (exit code 3), naming the workload.
  3. once every output is committed: print the run's status and exit 0.

Each of these is also told to fusion.k8s.observe (Events, the status ConfigMap, metrics).

A restarted controller continues where it was; installing the same run again resumes from
the store (stage code skips committed shards). A committed output whose config hash differs
from this spec's is an error, never reused.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import yaml

from fusion import shards
from fusion.config import load_spec
from fusion.errors import FusionError
from fusion.pipeline import STAGES, attach, open_run
from fusion.run import RUN_RECORD, Run
from fusion.status import format_status, status

STAGE_LABEL = "fusion.dev/stage"
PART_LABEL = "fusion.dev/part"
COMPLETIONS_FROM = "fusion.dev/completions-from"
PREPARE = "prepare"

# kind -> (group, version, plural): everything the controller touches is namespaced.
RESOURCES = {
    "Job": ("batch", "v1", "jobs"),
    "PyTorchJob": ("kubeflow.org", "v1", "pytorchjobs"),
    "TrainJob": ("trainer.kubeflow.org", "v1alpha1", "trainjobs"),
}
SUCCEEDED = {"Job": "Complete", "PyTorchJob": "Succeeded", "TrainJob": "Complete"}
# What serves each kind (named when the cluster does not), and the label its pods carry.
OPERATORS = {
    "PyTorchJob": "the Kubeflow training operator v1.9.0",
    "TrainJob": "Kubeflow Trainer v2.3 (or set cluster.workloads.train.operator=pytorchjob)",
}
POD_SELECTORS = {
    "Job": "job-name",
    "PyTorchJob": "training.kubeflow.org/job-name",
    "TrainJob": "jobset.sigs.k8s.io/jobset-name",
}
MAX_WORKER_RESTARTS = 3
FAILED = "Failed"


def log(message: str) -> None:
    stamp = datetime.now(timezone.utc).strftime("%H:%M:%S")
    print(f"[controller {stamp}] {message}", flush=True)


# ---- the Kubernetes API ------------------------------------------------------------------------
class Kube:
    """The few calls the controller makes, on plain dicts (no client models: they reject
    integer quantities and drop fields they do not know)."""

    def __init__(self, namespace: str):
        from kubernetes import client, config

        settings = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=settings)  # the pod's service account
        except config.ConfigException:  # outside a cluster: $KUBECONFIG or ~/.kube/config
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG"), client_configuration=settings)
        self.namespace = namespace
        self.api = client.CustomObjectsApi(client.ApiClient(settings))
        self.ApiException = client.ApiException

    def _call(self, kind: str, verb: str, *args, **kwargs):
        group, version, plural = RESOURCES[kind]
        method = getattr(self.api, f"{verb}_namespaced_custom_object")
        return method(group, version, self.namespace, plural, *args, **kwargs)

    def get(self, kind: str, name: str) -> dict | None:
        try:
            return self._call(kind, "get", name)
        except self.ApiException as e:
            if e.status == 404:
                return None
            raise

    def create(self, obj: dict) -> dict | None:
        """Create obj; the object as created (its uid included), read back if the reply lacks it."""
        try:
            created = self._call(obj["kind"], "create", obj)
            if isinstance(created, dict) and (created.get("metadata") or {}).get("uid"):
                return created
            return self.get(obj["kind"], obj["metadata"]["name"])
        except self.ApiException as e:
            if e.status == 404 and obj["kind"] in OPERATORS:
                group, version, _ = RESOURCES[obj["kind"]]
                raise FusionError(
                    f"this cluster does not serve {group}/{version} {obj['kind']}: install {OPERATORS[obj['kind']]} (k8s/README.md)"
                ) from None
            if e.status in (400, 403, 422):
                raise FusionError(f"cannot create {obj['kind']} {obj['metadata']['name']}: {e.status} {e.reason}: {e.body}") from None
            raise

    def delete(self, kind: str, name: str) -> None:
        try:
            self._call(kind, "delete", name, body={"propagationPolicy": "Background"})
        except self.ApiException as e:
            if e.status != 404:
                raise


def condition(obj: dict, kind: str) -> dict | None:
    """The object's condition of that type, if it is true."""
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == kind and c.get("status") == "True":
            return c
    return None


# ---- workloads ----------------------------------------------------------------------------------
@dataclass
class Workload:
    """One stage workload from the chart's workloads.yaml."""

    manifest: dict
    outputs: list[tuple[str, str]]  # (stage, part) it writes
    inputs: list[tuple[str, str]]  # (stage, part) it reads; it starts once they are committed

    @property
    def name(self) -> str:
        return self.manifest["metadata"]["name"]

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def stage(self) -> str:
        return self.manifest["metadata"]["labels"][STAGE_LABEL]

    @property
    def indexed(self) -> bool:
        return (self.manifest["metadata"].get("annotations") or {}).get(COMPLETIONS_FROM) == "split-plan"

    @property
    def work_queue(self) -> bool:
        """Workers that claim shards by lease: a Job with parallelism but no completions."""
        return self.kind == "Job" and "completions" not in self.manifest["spec"]


def load_workloads(path: Path, run: Run) -> list[Workload]:
    """The workloads of the chart, prepare first; inputs and outputs from the run's pipeline,
    whose outputs they must compute exactly, each once (`check_topology`)."""
    attach(run, build_models=False)
    try:
        docs = [d for d in yaml.safe_load_all(Path(path).read_text(encoding="utf-8")) if d]
    except (OSError, yaml.YAMLError) as e:
        raise FusionError(f"{path}: cannot read the workloads ({e})") from None
    prepare, stages = [], []  # stages: (manifest, its outputs)
    for manifest in docs:
        labels = manifest.get("metadata", {}).get("labels", {})
        stage = labels.get(STAGE_LABEL)
        if manifest.get("kind") not in RESOURCES or stage is None:
            raise FusionError(f"{path}: {manifest.get('kind')} {manifest.get('metadata', {}).get('name')} is no stage workload")
        if stage == PREPARE:
            prepare.append(Workload(manifest, [], []))
            continue
        if stage not in STAGES:
            raise FusionError(f"{path}: unknown stage {stage!r} in {manifest['metadata']['name']}")
        parts = [labels[PART_LABEL]] if PART_LABEL in labels else run.pipeline.parts(stage)
        stages.append((manifest, [(stage, p) for p in parts]))
    if not prepare:
        raise FusionError(f"{path}: no prepare workload")
    check_topology(path, run, stages)
    out = prepare
    for manifest, outputs in stages:
        inputs = []
        for stage, part in outputs:
            inputs += [i for i in run.pipeline.inputs(stage, part) if i not in outputs and i not in inputs]
        out.append(Workload(manifest, outputs, inputs))
    return out


def check_topology(path: Path, run: Run, stages: list[tuple[dict, list[tuple[str, str]]]]) -> None:
    """The chart renders one workload per stage and part (helm/fusion/templates/_workloads.tpl);
    the run's pipeline says what the parts are. A chart rendered from another spec (other
    models) would leave outputs that no workload computes, and the run would wait forever:
    refused here, naming every difference."""
    expected = [(stage, part) for stage in STAGES for part in run.pipeline.parts(stage)]
    made_by: dict[tuple[str, str], list[str]] = {}
    for manifest, outputs in stages:
        for output in outputs:
            made_by.setdefault(output, []).append(manifest["metadata"]["name"])
    problems = [f"no workload computes {s}/{p}" for s, p in expected if (s, p) not in made_by]
    problems += [f"{', '.join(names)} compute{'s' if len(names) == 1 else ''} {s}/{p}, which the run does not have"
                 for (s, p), names in made_by.items() if (s, p) not in expected]
    problems += [f"{s}/{p} is computed by {len(names)} workloads ({', '.join(names)})"
                 for (s, p), names in made_by.items() if (s, p) in expected and len(names) > 1]
    if problems:
        raise FusionError(
            f"{path}: the chart's workloads do not match run {run.spec.name}'s pipeline: {'; '.join(problems)} "
            f"(render the chart with this run spec as its values)"
        )


# ---- the controller -----------------------------------------------------------------------------
class Controller:
    def __init__(self, run: Run, workloads: list[Workload], kube: Kube, job_name: str, observer=None, spec_path=None):
        self.run = run
        self.spec_path = spec_path  # the mounted run spec, read again every pass (refuse_a_changed_spec)
        self.observer = observer  # fusion.k8s.observe.Observer, or None
        self.store = run.store
        self.workloads = workloads
        self.kube = kube
        self.job_name = job_name
        self.owner: dict | None = None
        self.outputs: dict[str, dict] | None = None  # from run.json, once prepare is done
        self.committed: set[str] = set()
        self.restarts: dict[str, int] = {}  # work-queue Jobs started again

    def notify(self, hook: str, *args) -> None:
        """Tell the observer (Events, status ConfigMap, metrics) what happened."""
        if self.observer is not None:
            getattr(self.observer, hook)(*args)

    # -- ownership: everything the controller creates goes away with its Job ------------------
    def owner_reference(self) -> dict:
        if self.owner is None:
            job = self.kube.get("Job", self.job_name)
            if job is None:
                raise FusionError(f"the controller's own Job {self.job_name} does not exist")
            self.owner = {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "name": job["metadata"]["name"],
                "uid": job["metadata"]["uid"],
            }
            self.notify("owned", job)
        return self.owner

    def mine(self, obj: dict) -> bool:
        uid = self.owner_reference()["uid"]
        return any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or [])

    def current(self, w: Workload) -> tuple[dict | None, bool]:
        """The workload's object if this controller created it, and whether it may be created
        now. A leftover of an earlier install (an uninstall that orphaned it) is deleted first."""
        obj = self.kube.get(w.kind, w.name)
        if obj is None or self.mine(obj):
            return obj, obj is None
        if not obj["metadata"].get("deletionTimestamp"):
            log(f"deleting {w.kind} {w.name}: left over from an earlier install")
            self.kube.delete(w.kind, w.name)
        return None, self.kube.get(w.kind, w.name) is None  # still going away: a later pass creates it

    # -- the store --------------------------------------------------------------------------
    def is_committed(self, stage: str, part: str) -> bool:
        key = f"{stage}/{part}"
        if key in self.committed:
            return True
        want = self.outputs[key]["config_hash"]
        if not shards.is_part_committed(self.store, stage, part, want):
            return False
        self.committed.add(key)
        return True

    def read_run_record(self) -> dict[str, dict]:
        record = self.store.read_json(RUN_RECORD)
        if record is None or "outputs" not in record:
            raise FusionError(f"{self.store.uri(RUN_RECORD)}: prepare succeeded but wrote no run record with outputs")
        if record.get("spec_hash") != self.run.spec_hash():
            raise FusionError(
                f"{self.store.uri(RUN_RECORD)} describes another run spec (spec hash {record.get('spec_hash')}, "
                f"this one's is {self.run.spec_hash()}): is another install writing to the same store?"
            )
        return record["outputs"]

    # -- one workload ------------------------------------------------------------------------
    def create(self, w: Workload) -> None:
        obj = copy.deepcopy(w.manifest)
        obj["metadata"]["namespace"] = self.kube.namespace
        obj["metadata"]["ownerReferences"] = [self.owner_reference()]
        what = w.kind
        if w.indexed:
            n = self.outputs[f"{w.outputs[0][0]}/{w.outputs[0][1]}"]["shards"]
            obj["spec"]["completions"] = n
            obj["spec"]["parallelism"] = min(n, obj["spec"].get("parallelism", n))
            what = f"Indexed Job, {n} shard(s), {obj['spec']['parallelism']} at once"
        elif w.kind == "Job" and "completions" not in obj["spec"]:
            what = f"Job of {obj['spec'].get('parallelism', 1)} worker(s)"
        created = self.kube.create(obj)
        after = ", ".join(f"{s}/{p}" for s, p in w.inputs) or "the plan"
        log(f"created {w.name} ({what}) after {after}")
        self.notify("created", created or obj, w.outputs, f"created {w.name} ({what}) after {after}")

    def commit(self, w: Workload) -> None:
        """A workload succeeded: commit its parts, which checks every shard's record.

        Workers exit once no shard is left to claim; if one of them was lost after the others
        had exited, its shard is still uncommitted when the Job completes (a Job whose pod
        succeeded starts no new pods). Then the workers are started again, a few times at most."""
        if w.work_queue:
            missing = [
                f"{stage}/{part}/{shards.shard_name(i)}"
                for stage, part in w.outputs
                for i in range(self.outputs[f"{stage}/{part}"]["shards"])
                if shards.read_record(self.store, stage, part, i) is None
            ]
            if missing:
                self.restarts[w.name] = self.restarts.get(w.name, 0) + 1
                if self.restarts[w.name] > MAX_WORKER_RESTARTS:
                    raise FusionError(f"{w.name}: its workers finished {MAX_WORKER_RESTARTS + 1} times with shards left: {missing[:3]}")
                log(f"{w.name} finished with {len(missing)} shard(s) left ({missing[0]}...): starting its workers again")
                self.notify("restarted", w.manifest, f"finished with {len(missing)} shard(s) left ({missing[0]}...): starting its workers again")
                self.kube.delete(w.kind, w.name)
                return
        for stage, part in w.outputs:
            key = f"{stage}/{part}"
            shards.commit_part(self.store, stage, part, self.outputs[key]["shards"], self.outputs[key]["config_hash"])
            self.committed.add(key)
            log(f"committed {key} ({self.outputs[key]['shards']} shard(s)) from {w.name}")
            self.notify("committed", w.manifest, stage, part, f"committed {key} ({self.outputs[key]['shards']} shard(s))")

    def follow(self, w: Workload) -> bool:
        """Create the workload if it does not exist; True once it succeeded."""
        obj, creatable = self.current(w)
        if obj is None:
            if creatable:
                self.create(w)
            return False
        failed = condition(obj, FAILED)
        if failed is not None:
            pods = f"{POD_SELECTORS[w.kind]}={w.name}"
            message = (
                f"{w.kind} {w.name} failed ({failed.get('reason')}: {failed.get('message')}); see "
                f"`kubectl logs -l {pods}`, fix the cause, then install the run again to resume"
            )
            self.notify("failed", obj, message, "WorkloadFailed")
            raise FusionError(message)
        return condition(obj, SUCCEEDED[w.kind]) is not None

    # -- the loop ----------------------------------------------------------------------------
    def refuse_a_changed_spec(self) -> None:
        """A `helm upgrade` that changes the run spec mid-run is refused: the kubelet updates the
        mounted spec, which no longer matches the one this run started with. The controller
        stops (exit 3), and every pod started with the new spec refuses to work too
        (fusion/ownership.py), so nothing runs half-upgraded."""
        current = Run(load_spec(self.spec_path)).owner()["spec_hash"]
        started = self.run.owner()["spec_hash"]
        if current != started:
            raise FusionError(
                f"the run spec {self.spec_path} changed mid-run (spec hash {started} -> {current}: helm upgrade?): "
                "refused, nothing was started with it; restore the previous values and install again to resume, "
                "or install the changed run under another store prefix"
            )

    def step(self) -> bool:
        """One pass; True once every output of the run is committed."""
        self.owner_reference()  # first: a failure of any later step is an Event on the controller's Job
        if self.spec_path is not None:
            self.refuse_a_changed_spec()
        if self.outputs is None:
            if not self.follow(self.workloads[0]):
                return False
            self.outputs = self.read_run_record()
            log(f"prepared: {len(self.outputs)} outputs, {self.outputs['split/train']['shards']} shard(s) per sharded stage")
            self.notify("prepared", self.outputs, f"prepared: {len(self.outputs)} outputs, {self.outputs['split/train']['shards']} shard(s) per sharded stage")
        done = True
        for w in self.workloads[1:]:
            if all(self.is_committed(s, p) for s, p in w.outputs):
                continue
            done = False
            if not all(self.is_committed(s, p) for s, p in w.inputs):
                continue
            if self.follow(w):
                self.commit(w)
        self.notify("refresh", self.store, self.committed)
        return done

    def loop(self, poll_seconds: float) -> None:
        log(f"run {self.run.spec.name}: {len(self.workloads)} workloads, store {self.store.url}")
        while True:
            try:
                if self.step():
                    log("every stage output is committed: the run is complete")
                    self.notify("complete", "every stage output is committed: the run is complete")
                    return
            except (FusionError, PermissionError) as e:
                if self.observer is not None and self.observer.phase != "Failed":
                    self.observer.failed(None, str(e))
                raise
            except self.kube.ApiException as e:
                if e.status in (401, 403):
                    self.notify("failed", None, f"the Kubernetes API refused the controller: {e.status} {e.reason}")
                    raise FusionError(f"the Kubernetes API refused the controller: {e.status} {e.reason}") from None
                log(f"Kubernetes API error, retrying: {e.status} {e.reason}")
                self.notify("error", f"Kubernetes API error, retrying: {e.status} {e.reason}")
            except OSError as e:  # the API server or the store is unreachable for a moment
                log(f"retrying after {type(e).__name__}: {e}")
                self.notify("error", f"retrying after {type(e).__name__}: {e}")
            time.sleep(poll_seconds)


def main(spec_path: str, workloads_path: str, job_name: str, namespace: str | None, poll_seconds: float, metrics_port: int = 0) -> int:
    from fusion.k8s import observe

    run = open_run(load_spec(spec_path), build_models=False)
    namespace = namespace or _pod_namespace()
    kube = Kube(namespace)
    observer = observe.Observer(observe.core_api(kube), namespace, run.spec.name, observe.status_name(job_name), log, os.environ.get("POD_NAME", ""))
    metrics = observe.MetricsServer(metrics_port, observer.metrics) if metrics_port else None
    if metrics is not None:
        log(f"metrics on :{metrics.port}/metrics")
    try:
        Controller(run, load_workloads(Path(workloads_path), run), kube, job_name, observer, spec_path).loop(poll_seconds)
    finally:
        if metrics is not None:
            metrics.close()
    print(format_status(status(run.store)), flush=True)
    return 0


def _pod_namespace() -> str:
    """The namespace the controller runs in (the chart passes POD_NAMESPACE)."""
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    if path.exists():
        return path.read_text().strip()
    raise FusionError("the controller's namespace is unknown: pass --namespace or set POD_NAMESPACE")
