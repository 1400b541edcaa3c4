"""The controller (fusion/k8s/controller.py) against kmock's Kubernetes API emulator on
127.0.0.1 and a local store, with the test writing what the stages and the Job controller
would: commit records and Job conditions. (tests/test_k8s_sim.py runs the real stages.)"""

from __future__ import annotations

import asyncio
import json
import re

import kmock
import pytest
import pytest_asyncio
import yaml

from fusion import shards
from fusion.config import parse_spec
from fusion.errors import FusionError
from fusion.k8s.controller import Controller, Kube, load_workloads
from fusion.run import RUN_RECORD, Run
from tests.helmchart import IMAGES, render
from tests.k8s_sim import ApiServer

pytestmark = pytest.mark.asyncio

NAMESPACE = "fusion"
SOURCES = ["src-llama", "src-neox"]
MODELS = ["target", *SOURCES]
SHARDS = 3


def spec(store: str) -> dict:
    return {
        "name": "ctl",
        "store": store,
        "models": {"target": {"name": "target", "path": "/models/target"}, "sources": [{"name": s, "path": f"/models/{s}"} for s in SOURCES]},
        "corpus": {"path": "/data/corpus.jsonl"},
    }


class Setup:
    """A run, its workloads from the chart, a controller talking to the emulator."""

    def __init__(self, api, url: str, tmp_path, monkeypatch, store: str | None = None, store_options: dict | None = None):
        self.api = api
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "k", "cluster": {"server": url}}],
                    "users": [{"name": "k", "user": {"token": "t"}}],
                    "contexts": [{"name": "k", "context": {"cluster": "k", "user": "k"}}],
                    "current-context": "k",
                }
            )
        )
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        run_spec = spec(store or str(tmp_path / "store"))
        if store_options:
            run_spec["store_options"] = store_options
        self.run = Run(parse_spec(run_spec))
        rendered = render(spec("s3://runs/ctl"), IMAGES, release="ctl", namespace=NAMESPACE)
        workloads_yaml = tmp_path / "workloads.yaml"
        workloads_yaml.write_text(rendered.configmap["data"]["workloads.yaml"])
        self.workloads = load_workloads(workloads_yaml, self.run)
        self.controller_job = rendered.get("Job", "ctl-controller")
        self.controller = Controller(self.run, self.workloads, Kube(NAMESPACE), "ctl-controller")
        self.hashes = {f"{stage}/{part}": f"h-{stage}-{part}" for stage, part in self.outputs()}
        self.payload = tmp_path / "payload"  # what each test shard holds
        self.payload.mkdir()
        (self.payload / "rows.txt").write_text("computed\n")

    def outputs(self):
        out = [("split", "train"), ("split", "heldout")]
        out += [("vocab", s) for s in SOURCES] + [("logits", m) for m in MODELS] + [("align", s) for s in SOURCES]
        return out + [("fuse", "train"), ("train", "model"), ("eval", "report")]

    def shards_of(self, key: str) -> int:
        return 1 if key.split("/")[0] in ("vocab", "train", "eval") else SHARDS

    # -- what the stages and the cluster would do ------------------------------------------------
    def prepare_done(self, spec_hash: str | None = None):
        outputs = {k: {"config_hash": h, "shards": self.shards_of(k)} for k, h in self.hashes.items()}
        self.run.store.write_json(RUN_RECORD, {"spec_hash": spec_hash or self.run.spec_hash(), "outputs": outputs})

    def write_shards(self, stage: str, part: str, config_hash: str | None = None, only: int | None = None):
        """Commit the part's shards as a stage would (through the commit protocol)."""
        key = f"{stage}/{part}"
        for i in range(self.shards_of(key)) if only is None else [only]:
            shards.write_files_shard(self.run.store, stage, part, i, self.payload, config_hash or self.hashes[key])

    def objects(self, kind: str) -> dict[str, dict]:
        plural = {"Job": "batch/v1/jobs", "PyTorchJob": "kubeflow.org/v1/pytorchjobs"}[kind]
        return {key[2]: obj for key, obj in self.api.objects.items() if str(key[0]) == str(kmock.resource(plural)) and not obj.deleted}

    async def finish(self, kind: str, name: str, condition: str = "Complete", **extra):
        status = {"conditions": [{"type": condition, "status": "True", **extra}]}
        path = {"Job": "batch/v1/namespaces/fusion/jobs", "PyTorchJob": "kubeflow.org/v1/namespaces/fusion/pytorchjobs"}[kind]
        async with self.api.clients[0].patch(f"/apis/{path}/{name}", json={"status": status}) as r:
            assert r.status == 200

    async def step(self) -> bool:
        return await asyncio.to_thread(self.controller.step)


@pytest_asyncio.fixture
async def setup(tmp_path, monkeypatch):
    async with ApiServer() as api, kmock.Server(api) as server:
        s = Setup(api, str(server.url).rstrip("/"), tmp_path, monkeypatch)
        async with api.clients[0].post(f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs", json=s.controller_job) as r:
            assert r.status == 200
        yield s


async def test_workloads_appear_in_the_order_of_their_data(setup):
    s = setup
    assert not await s.step()
    assert set(s.objects("Job")) == {"ctl-controller", "ctl-prepare"}, "prepare comes first, alone"
    assert not await s.step()
    assert set(s.objects("Job")) == {"ctl-controller", "ctl-prepare"}, "nothing else while prepare runs"

    s.prepare_done()
    await s.finish("Job", "ctl-prepare")
    await s.step()
    assert set(s.objects("Job")) == {"ctl-controller", "ctl-prepare", "ctl-split", "ctl-vocab-src-llama", "ctl-vocab-src-neox"}
    split = s.objects("Job")["ctl-split"]
    assert split["spec"]["completions"] == SHARDS and split["spec"]["parallelism"] == SHARDS  # min(8, shards)
    owner = s.objects("Job")["ctl-controller"]["metadata"]["uid"]
    assert split["metadata"]["ownerReferences"] == [{"apiVersion": "batch/v1", "kind": "Job", "name": "ctl-controller", "uid": owner}]
    assert split["metadata"]["namespace"] == NAMESPACE

    # split's pods committed every shard and the Job completed: the controller commits the parts
    for part in ("train", "heldout"):
        s.write_shards("split", part)
    await s.finish("Job", "ctl-split")
    await s.step()
    assert shards.is_part_committed(s.run.store, "split", "train", s.hashes["split/train"])
    assert shards.is_part_committed(s.run.store, "split", "heldout", s.hashes["split/heldout"])
    await s.step()
    logits = {f"ctl-logits-{m}" for m in MODELS}
    assert logits <= set(s.objects("Job")) and not {"ctl-align-src-llama", "ctl-fuse"} & set(s.objects("Job"))
    assert s.objects("Job")["ctl-logits-target"]["spec"]["parallelism"] == SHARDS  # min(4, shards)

    # align of a source waits for its vocab, the target's and its own logits
    for m in MODELS:
        s.write_shards("logits", m)
        await s.finish("Job", f"ctl-logits-{m}")
    s.write_shards("vocab", "src-llama")
    shards.commit_part(s.run.store, "vocab", "src-llama", 1, s.hashes["vocab/src-llama"])  # a single-pod Job commits itself
    await s.step()
    await s.step()
    assert "ctl-align-src-llama" in s.objects("Job") and "ctl-align-src-neox" not in s.objects("Job")
    assert "completions" not in s.objects("Job")["ctl-align-src-llama"]["spec"]

    s.write_shards("vocab", "src-neox")
    await s.finish("Job", "ctl-vocab-src-neox")
    await s.step()
    await s.step()
    assert "ctl-align-src-neox" in s.objects("Job")
    assert "ctl-train" not in s.objects("PyTorchJob") and "ctl-fuse" not in s.objects("Job")

    for src in SOURCES:  # the workers commit their part themselves
        s.write_shards("align", src)
        shards.commit_part(s.run.store, "align", src, SHARDS, s.hashes[f"align/{src}"])
    await s.step()
    assert "ctl-fuse" in s.objects("Job") and not s.objects("PyTorchJob"), "no GPU job before its data"
    s.write_shards("fuse", "train")
    await s.finish("Job", "ctl-fuse")
    await s.step()
    await s.step()
    train = s.objects("PyTorchJob")["ctl-train"]
    assert train["metadata"]["ownerReferences"][0]["uid"] == owner
    assert "ctl-eval" not in s.objects("Job")

    s.write_shards("train", "model")
    await s.finish("PyTorchJob", "ctl-train", "Succeeded")
    await s.step()
    await s.step()
    assert "ctl-eval" in s.objects("Job")
    s.write_shards("eval", "report")
    await s.finish("Job", "ctl-eval")
    await s.step()
    assert await s.step(), "every output committed: the run is complete"


async def test_a_failed_workload_fails_the_run_naming_it(setup):
    s = setup
    await s.step()
    s.prepare_done()
    await s.finish("Job", "ctl-prepare")
    await s.step()
    await s.finish("Job", "ctl-split", "Failed", reason="FailedIndexes", message="failed indexes 1")
    with pytest.raises(FusionError, match=r"Job ctl-split failed \(FailedIndexes: failed indexes 1\)"):
        await s.step()


async def test_a_succeeded_workload_without_its_shards_is_an_error(setup):
    s = setup
    await s.step()
    s.prepare_done()
    await s.finish("Job", "ctl-prepare")
    await s.step()
    s.write_shards("split", "train")  # heldout never written
    await s.finish("Job", "ctl-split")
    with pytest.raises(FusionError, match="split/heldout.*shard-00000 is not committed"):
        await s.step()


async def test_outputs_of_another_configuration_are_refused(setup):
    s = setup
    s.write_shards("split", "train", config_hash="h-old")
    shards.commit_part(s.run.store, "split", "train", SHARDS, "h-old")
    await s.step()
    s.prepare_done()
    await s.finish("Job", "ctl-prepare")
    with pytest.raises(FusionError, match="committed with config hash h-old"):
        await s.step()


async def test_a_run_record_of_another_spec_is_refused(setup):
    s = setup
    await s.step()
    s.prepare_done(spec_hash="0123456789abcdef")
    await s.finish("Job", "ctl-prepare")
    with pytest.raises(FusionError, match="describes another run spec"):
        await s.step()


async def test_a_spec_changed_mid_run_is_refused(setup, tmp_path):
    """helm upgrade with another run spec: the mounted spec changes under the controller."""
    s = setup
    spec_file = tmp_path / "run.yaml"
    spec_file.write_text(yaml.safe_dump(spec(str(tmp_path / "store"))))
    s.controller.spec_path = str(spec_file)
    await s.step()
    s.prepare_done()
    await s.finish("Job", "ctl-prepare")
    await s.step()
    spec_file.write_text(yaml.safe_dump({**spec(str(tmp_path / "store")), "train": {"lambda": 0.7}}))
    with pytest.raises(FusionError, match=r"run.yaml changed mid-run \(spec hash \w+ -> \w+: helm upgrade\?\): refused"):
        await s.step()


async def test_leftovers_of_an_earlier_install_are_replaced(setup):
    s = setup
    leftover = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "ctl-prepare", "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": "ctl-controller", "uid": "gone"}]},
        "spec": {},
    }
    async with s.api.clients[0].post(f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs", json=leftover) as r:
        assert r.status == 200
    await s.step()
    prepare = s.objects("Job")["ctl-prepare"]
    assert prepare["metadata"]["ownerReferences"][0]["uid"] == s.objects("Job")["ctl-controller"]["metadata"]["uid"]
    touching = [r for r in list(s.api) if "ctl-prepare" in (r.name, ((r.data or {}).get("metadata") or {}).get("name"))]
    methods = [r.method.value for r in touching]
    # (then a GET: the emulator answers a create with 200 and no body the client reads, a real API server with 201 and the object)
    assert methods[methods.index("DELETE") :][:3] == ["DELETE", "GET", "POST"], "deleted, then created"


async def test_a_restarted_controller_takes_over_the_running_workloads(setup):
    """The controller's pod restarted mid-run (its node drained): the new process finds the
    workloads the old one created, keeps them (same uids, nothing created twice) and goes on."""
    s = setup
    await s.step()
    s.prepare_done()
    await s.finish("Job", "ctl-prepare")
    await s.step()
    before = {name: job["metadata"]["uid"] for name, job in s.objects("Job").items()}
    assert {"ctl-split", "ctl-vocab-src-llama", "ctl-vocab-src-neox"} <= set(before)

    s.controller = Controller(s.run, s.workloads, Kube(NAMESPACE), "ctl-controller")  # a new process
    await s.step()
    assert {name: job["metadata"]["uid"] for name, job in s.objects("Job").items()} == before
    for part in ("train", "heldout"):
        s.write_shards("split", part)
    await s.finish("Job", "ctl-split")
    await s.step()
    await s.step()
    assert {f"ctl-logits-{m}" for m in MODELS} <= set(s.objects("Job")), "the new controller carries the run on"
    assert {name: s.objects("Job")[name]["metadata"]["uid"] for name in before} == before


async def test_a_cluster_without_the_training_operator_is_explained(setup):
    s = setup
    s.api["post", "/apis/kubeflow.org/v1/namespaces/fusion/pytorchjobs"] << kmock.KubernetesNotFoundError
    await s.step()
    s.prepare_done()
    await s.finish("Job", "ctl-prepare")
    for key in s.hashes:
        stage, part = key.split("/")
        if stage not in ("train", "eval"):
            s.write_shards(stage, part)
            shards.commit_part(s.run.store, stage, part, s.shards_of(key), s.hashes[key])
    with pytest.raises(FusionError, match="does not serve kubeflow.org/v1 PyTorchJob: install the Kubeflow training operator v1.9.0"):
        await s.step()


async def test_workers_that_finish_with_shards_left_are_started_again(setup):
    """A worker lost after the others ran out of work leaves its shard behind, and a Job one of
    whose pods succeeded starts no new pods: the controller starts the workers again."""
    s = setup
    await s.step()
    s.prepare_done()
    await s.finish("Job", "ctl-prepare")
    for key in s.hashes:
        stage, part = key.split("/")
        if stage in ("split", "vocab", "logits"):
            s.write_shards(stage, part)
            shards.commit_part(s.run.store, stage, part, s.shards_of(key), s.hashes[key])
    await s.step()
    first = s.objects("Job")["ctl-align-src-llama"]["metadata"]["uid"]
    s.write_shards("align", "src-llama", only=0)
    await s.finish("Job", "ctl-align-src-llama")
    await s.step()
    assert "ctl-align-src-llama" not in s.objects("Job")
    await s.step()
    assert s.objects("Job")["ctl-align-src-llama"]["metadata"]["uid"] != first, "started again"
    assert not shards.is_part_committed(s.run.store, "align", "src-llama", s.hashes["align/src-llama"])
    for _ in range(2):  # started again at most 3 times
        await s.finish("Job", "ctl-align-src-llama")
        await s.step()
        await s.step()
    await s.finish("Job", "ctl-align-src-llama")
    with pytest.raises(FusionError, match="ctl-align-src-llama: its workers finished 4 times with shards left"):
        await s.step()


# ---- what an operator sees (fusion/k8s/observe.py) ---------------------------------------------------
@pytest_asyncio.fixture
async def observed(setup):
    """The setup's controller with an observer: Events and the status ConfigMap through the emulator."""
    from fusion.k8s import observe

    s = setup
    status = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ctl-status", "namespace": NAMESPACE}, "data": {"phase": "Pending"}}
    async with s.api.clients[0].post(f"/api/v1/namespaces/{NAMESPACE}/configmaps", json=status) as r:
        assert r.status == 200
    s.logged = []
    s.observer = observe.Observer(observe.core_api(s.controller.kube), NAMESPACE, "ctl", observe.status_name("ctl-controller"), s.logged.append, "ctl-controller-abcde")
    s.controller.observer = s.observer
    yield s


def _events(s) -> list[dict]:
    plural = str(kmock.resource("v1/events"))
    return [obj for key, obj in s.api.objects.items() if str(key[0]) == plural and not obj.deleted]


def _status(s) -> dict:
    plural = str(kmock.resource("v1/configmaps"))
    (cm,) = [obj for key, obj in s.api.objects.items() if str(key[0]) == plural and key[2] == "ctl-status"]
    return dict(cm["data"])


async def test_every_transition_is_an_event_and_the_status_stays_current(observed):
    s = observed
    await s.step()
    s.prepare_done()
    await s.finish("Job", "ctl-prepare")
    await s.step()
    events = _events(s)
    controller_uid = s.objects("Job")["ctl-controller"]["metadata"]["uid"]
    prepared = [e for e in events if e["reason"] == "Prepared"]
    assert len(prepared) == 1 and prepared[0]["involvedObject"] == {
        "apiVersion": "batch/v1", "kind": "Job", "name": "ctl-controller", "namespace": NAMESPACE, "uid": controller_uid,
    }
    created = {e["involvedObject"]["name"]: e for e in events if e["reason"] == "Created"}
    assert set(created) == {"ctl-prepare", "ctl-split", "ctl-vocab-src-llama", "ctl-vocab-src-neox"}
    split = s.objects("Job")["ctl-split"]
    assert created["ctl-split"]["involvedObject"]["uid"] == split["metadata"]["uid"], "`kubectl describe job ctl-split` selects by uid"
    assert created["ctl-split"]["type"] == "Normal" and "Indexed Job, 3 shard(s)" in created["ctl-split"]["message"]
    assert created["ctl-split"]["source"] == {"component": "fusion-controller"} and created["ctl-split"]["reportingInstance"] == "ctl-controller-abcde"

    status = _status(s)
    assert status["phase"] == "Running" and status["lastError"] == ""
    parts = {f"{p['stage']}/{p['part']}": p for p in json.loads(status["status.json"])["parts"]}
    assert parts["split/train"] == {
        "stage": "split", "part": "train", "state": "running", "workload": "Job/ctl-split",
        "shardsCommitted": 0, "shardsTotal": SHARDS, "rows": 0, "rowsPerSecond": 0.0, "unit": "blocks",
    }
    assert parts["fuse/train"]["state"] == "waiting"

    s.write_shards("split", "train", only=0)  # one shard of three: progress shows before the part is done
    await s.step()
    parts = {f"{p['stage']}/{p['part']}": p for p in json.loads(_status(s)["status.json"])["parts"]}
    assert parts["split/train"]["shardsCommitted"] == 1 and parts["split/train"]["rows"] == 1
    assert re.search(r"^split\s+train\s+running\s+1/3\s+-\s+1\s+[\d,]+\s+blocks\s+Job/ctl-split$", _status(s)["summary"], re.M)

    for part in ("train", "heldout"):
        s.write_shards("split", part)
    await s.finish("Job", "ctl-split")
    await s.step()
    committed = {e["message"] for e in _events(s) if e["reason"] == "Committed"}
    assert committed == {"committed split/train (3 shard(s))", "committed split/heldout (3 shard(s))"}
    # a part the stage's own pods commit (a vocab Job) is an Event too, found in the store
    s.write_shards("vocab", "src-llama")
    shards.commit_part(s.run.store, "vocab", "src-llama", 1, s.hashes["vocab/src-llama"])
    await s.step()
    vocab = [e for e in _events(s) if e["reason"] == "Committed" and e["involvedObject"]["name"] == "ctl-vocab-src-llama"]
    assert len(vocab) == 1 and vocab[0]["involvedObject"]["uid"] == s.objects("Job")["ctl-vocab-src-llama"]["metadata"]["uid"]
    await s.step()
    assert len([e for e in _events(s) if e["reason"] == "Committed"]) == 3, "once per part"

    await s.finish("Job", "ctl-vocab-src-neox", "Failed", reason="BackoffLimitExceeded", message="too many failed pods")
    with pytest.raises(FusionError):
        await asyncio.to_thread(s.controller.loop, 0.01)
    warnings = {(e["involvedObject"]["name"], e["reason"]) for e in _events(s) if e["type"] == "Warning"}
    assert warnings == {("ctl-vocab-src-neox", "WorkloadFailed"), ("ctl-controller", "RunFailed")}
    status = _status(s)
    assert status["phase"] == "Failed" and "Job ctl-vocab-src-neox failed (BackoffLimitExceeded" in status["lastError"]
    assert "last error: Job ctl-vocab-src-neox failed" in status["summary"]


async def test_a_failure_before_prepare_completes_is_a_run_failed_event(observed):
    s = observed
    await s.step()
    await s.finish("Job", "ctl-prepare", "Failed", reason="BackoffLimitExceeded", message="the corpus is missing")
    with pytest.raises(FusionError, match="Job ctl-prepare failed"):
        await asyncio.to_thread(s.controller.loop, 0.01)
    warnings = [e for e in _events(s) if e["type"] == "Warning"]
    assert {(e["involvedObject"]["name"], e["reason"]) for e in warnings} == {("ctl-prepare", "WorkloadFailed"), ("ctl-controller", "RunFailed")}
    (run_failed,) = [e for e in warnings if e["reason"] == "RunFailed"]
    assert run_failed["involvedObject"]["uid"] == s.objects("Job")["ctl-controller"]["metadata"]["uid"]
    assert "the corpus is missing" in run_failed["message"]
    assert _status(s)["phase"] == "Failed"


async def test_events_the_api_refuses_do_not_stop_the_run(observed):
    s = observed
    s.api["post", f"/api/v1/namespaces/{NAMESPACE}/events"] << kmock.KubernetesError(status=403, reason="Forbidden", message="events is forbidden")
    await s.step()
    await s.step()
    s.prepare_done()
    await s.finish("Job", "ctl-prepare")
    await s.step()
    assert "ctl-split" in s.objects("Job"), "the run goes on"
    assert [m for m in s.logged if m.startswith("cannot write events")] == ["cannot write events (403 Forbidden); the run goes on without"]
    assert 'fusion_events_failed_total{run="ctl"} ' in s.observer.metrics()


async def test_metrics_are_served_in_the_prometheus_text_format():
    from fusion.k8s import observe

    o = observe.Observer(None, NAMESPACE, "ctl", "ctl-status", print)
    o.owned({"metadata": {"name": "ctl-controller"}})
    o.prepared({"split/train": {"shards": 3, "config_hash": "h"}, "vocab/src-llama": {"shards": 1, "config_hash": "h"}}, "prepared")
    o.created({"kind": "Job", "metadata": {"name": "ctl-split", "uid": "u"}}, [("split", "train")], "created")
    o.parts["split/train"].committed, o.parts["split/train"].rows = 2, 4096
    o.committed(None, "vocab", "src-llama", "committed")
    server = observe.MetricsServer(0, o.metrics, host="127.0.0.1")
    try:
        import urllib.error
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as r:
            assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
            text = r.read().decode()
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/other", timeout=5)
    finally:
        server.close()
    lines = text.splitlines()
    sample = re.compile(r'^[a-z_]+\{([a-z]+="[^"]*",?)+\} -?[0-9.e+]+$')
    for line in lines:
        assert line.startswith(("# HELP ", "# TYPE ")) or sample.match(line), line
    assert 'fusion_part_shards_committed{run="ctl",stage="split",part="train"} 2' in lines
    assert 'fusion_part_shards_total{run="ctl",stage="split",part="train"} 3' in lines
    assert 'fusion_part_rows{run="ctl",stage="split",part="train"} 4096' in lines
    assert 'fusion_part_committed{run="ctl",stage="vocab",part="src-llama"} 1' in lines
    assert 'fusion_run_phase{run="ctl",phase="Running"} 1' in lines and 'fusion_run_phase{run="ctl",phase="Failed"} 0' in lines
    assert 'fusion_workloads_created_total{run="ctl",kind="Job",stage="split"} 1' in lines
    assert "# TYPE fusion_parts_committed_total counter" in lines
    types = [line.split()[2] for line in lines if line.startswith("# TYPE ")]
    assert len(types) == len(set(types)), "one TYPE line per family"


async def test_training_shows_its_steps_and_tokens_per_second(tmp_path, monkeypatch):
    """Training commits its one shard only at the end: the status and the metrics show the
    trainer's progress record (fusion/training/metrics.py) while it runs."""
    from types import SimpleNamespace

    from fusion.k8s import observe
    from fusion.store import Store
    from fusion.training import metrics
    from fusion.training.distributed import World

    store = Store(str(tmp_path / "store"))
    o = observe.Observer(None, NAMESPACE, "ctl", "ctl-status", print)
    o.owned({"metadata": {"name": "ctl-controller"}})
    o.prepared({"fuse/train": {"shards": 3, "config_hash": "h-fuse"}, "train/model": {"shards": 1, "config_hash": "h-train"}}, "prepared")
    o.created({"kind": "PyTorchJob", "metadata": {"name": "ctl-train", "uid": "u"}}, [("train", "model")], "created")

    def train_status() -> dict:
        o.refresh(store, set())
        return next(p for p in json.loads(o.status_data()["status.json"])["parts"] if p["stage"] == "train")

    assert train_status()["steps"] == 0 and train_status()["stepsTotal"] == 0, "no record yet"

    # the trainer, resumed after one step of 100 tokens, writes a record after each step here
    monkeypatch.setattr(metrics, "PROGRESS_SECONDS", 0.0)
    trainer = metrics.Progress(SimpleNamespace(store=store, hash=lambda stage, part: "h-train"), World(0, 1, 0, "cpu", False), 7, [{"tokens": 100}])
    for step in (2, 3):
        trainer.stepped({"step": step, "tokens": 4096})
    train = train_status()
    assert (train["steps"], train["stepsTotal"], train["rows"], train["unit"]) == (3, 7, 8292, "tokens")
    assert train["rowsPerSecond"] > 0 and re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", train["updatedAt"])
    table = o.status_data()["summary"]
    assert re.search(r"^train\s+model\s+running\s+0/1\s+3/7\s+8,292\s+[\d,]+\s+tokens\s+PyTorchJob/ctl-train$", table, re.M), table
    assert re.search(r"^fuse\s+train\s+waiting\s+0/3\s+-\s+0\s+0\s+tokens\s+-$", table, re.M), "other stages as before"
    lines = o.metrics().splitlines()
    assert 'fusion_train_steps{run="ctl",part="model"} 3' in lines and 'fusion_train_steps_total{run="ctl",part="model"} 7' in lines
    assert 'fusion_train_tokens{run="ctl",part="model"} 8292' in lines
    (rate,) = [line for line in lines if line.startswith('fusion_train_tokens_per_second{run="ctl",part="model"} ')]
    assert float(rate.rsplit(" ", 1)[1]) > 0

    # committed: the steps stay, the rate is 0 as for every committed part
    o.committed(None, "train", "model", "committed")
    train = train_status()
    assert (train["steps"], train["rows"], train["rowsPerSecond"]) == (3, 8292, 0.0)

    # a record an earlier run of other settings left is not this training's
    o2 = observe.Observer(None, NAMESPACE, "ctl", "ctl-status", print)
    o2.prepared({"train/model": {"shards": 1, "config_hash": "h-other"}}, "prepared")
    o2.refresh(store, set())
    assert o2.parts["train/model"].steps == 0 and o2.parts["train/model"].rows == 0
