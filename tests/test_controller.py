"""The controller (fusion/k8s/controller.py) against kmock's Kubernetes API emulator on
127.0.0.1 and a local store, with the test writing what the stages and the Job controller
would: commit records and Job conditions. (tests/test_k8s_sim.py runs the real stages.)"""

from __future__ import annotations

import asyncio

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

    def __init__(self, api, url: str, tmp_path, monkeypatch):
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
        self.run = Run(parse_spec(spec(str(tmp_path / "store"))))
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
    assert [r.method.value for r in touching][-3:] == ["DELETE", "GET", "POST"], "deleted, then created"


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
