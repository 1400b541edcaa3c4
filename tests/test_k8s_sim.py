"""`helm install` of a whole micro run on a simulated cluster (tests/k8s_sim.py): the Helm-
rendered objects are applied to kmock's API emulator on 127.0.0.1, every pod runs as a local
process against an S3 server on 127.0.0.1, and the run completes in the order of its data:
no workload exists before its inputs are committed. It runs once with each training operator,
each on another S3 server: a PyTorchJob (training operator v1.9) on SeaweedFS (a real S3
server) and a TrainJob on the chart's torch runtime (Kubeflow Trainer v2) on moto's emulator.
The order of the stages does not depend on the operator, so the TrainJob install starts from a
store that holds every stage up to fuse (computed here first, in this process): the controller
prepares, then creates only the training and evaluation workloads.
With the PyTorchJob, mid-run, the alignment workers are scaled 1 -> 3 -> 2 and one is killed,
and still every shard is committed exactly once; then the training master's node is lost after a
checkpoint, and training resumes from it. The controller's Events, status ConfigMap and
metrics follow the run. Then `helm uninstall` removes everything the run created, and
installing again resumes from the store without recomputing anything.

The `kubectl get` and `kubectl describe` views of the finished run are printed (`pytest -s`),
and with FUSION_WRITE_VIEWS=DIR written to DIR/kubectl-views-OPERATOR.txt: k8s/README.md
shows them (tests/test_k8s_manifests.py checks that its blocks have their shape)."""

from __future__ import annotations

import json
import os
import re
import urllib.request
from pathlib import Path

import kmock
import pytest
import yaml

from fusion.config import TrainSpec, parse_spec
from fusion.launch_local import run_all
from fusion.run import RUN_ID_ENV, Run
from fusion.errors import PEER_LOST_EXIT_CODE
from tests.helmchart import IMAGES, merge_values, render
from tests.k8s_sim import ApiServer, Cluster, free_port, kubectl_views, s3_server, secret, timeline, until

RELEASE = "micro"
NAMESPACE = "fusion"
BUCKET = "runs"
SOURCES = ["src-llama", "src-neox"]
MODELS = ["target", *SOURCES]
UPSTREAM = ["split", "vocab", "logits", "align", "fuse"]


pytestmark = pytest.mark.asyncio

# What each workload reads: written out here, independently of the stage code, from DESIGN.md §2.
INPUTS = {
    f"{RELEASE}-prepare": [],
    f"{RELEASE}-split": [],
    **{f"{RELEASE}-vocab-{s}": [] for s in SOURCES},
    **{f"{RELEASE}-logits-{m}": ["split/train"] for m in MODELS},
    **{f"{RELEASE}-align-{s}": ["split/train", "logits/target", f"logits/{s}", f"vocab/{s}"] for s in SOURCES},
    f"{RELEASE}-fuse": ["logits/target", *(f"align/{s}" for s in SOURCES)],
    f"{RELEASE}-train": ["fuse/train"],
    f"{RELEASE}-eval": ["split/heldout", "train/model"],
}


@pytest.fixture
def s3(request):
    """An S3 server (request.param: moto or seaweedfs), a versioned bucket (to count how often
    each object was written)."""
    with s3_server(BUCKET, versioned=True, backend=request.param) as server:
        yield server


def committed(client, prefix: str = "micro/") -> set[str]:
    """The committed parts ("stage/part") in the store."""
    out = set()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for obj in page.get("Contents", []):
            if obj["Key"].endswith("/_COMMITTED.json"):
                out.add(obj["Key"][len(prefix) : -len("/_COMMITTED.json")])
    return out


def versions(client, prefix: str) -> dict[str, int]:
    """How many times each object under prefix was written."""
    counts: dict[str, int] = {}
    for page in client.get_paginator("list_object_versions").paginate(Bucket=BUCKET, Prefix=prefix):
        for v in page.get("Versions", []):
            counts[v["Key"]] = counts.get(v["Key"], 0) + 1
    return counts


WORKLOAD_KINDS = ("Job", "PyTorchJob", "TrainJob")


def scrape(port: int) -> dict[str, float]:
    """The controller's metrics, as {'name{labels}': value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


@pytest.mark.parametrize(("operator", "s3"), [("pytorchjob", "seaweedfs"), ("trainjob", "moto")], indirect=["s3"])
async def test_helm_install_runs_the_whole_run_in_order(micro, s3, tmp_path, monkeypatch, operator):
    s3_url, client = s3
    metrics_port = free_port()
    # With the PyTorchJob a training node is lost mid-training: 3 epochs (~300 steps), a checkpoint
    # every 10, so that the loss comes long before the end however slowly the test polls.
    checkpoint_every = 10 if operator == "pytorchjob" else 1000
    train_settings = {"train.checkpoint_every": checkpoint_every, "train.epochs": 3 if operator == "pytorchjob" else 1}
    spec = micro.spec(f"s3://{BUCKET}/micro", **{"split.shard_blocks": 240, **train_settings})
    spec["store_options"] = {"endpoint_url": s3_url, "region": "us-east-1"}  # what every pod and the controller use
    nodes = 1
    if "engine" in TrainSpec.model_fields:  # several training nodes need the DeepSpeed engine
        spec["train"]["engine"] = "deepspeed"
        nodes = 2
    values = merge_values(
        spec,
        IMAGES,
        {
            "cluster": {
                "s3": {"secretName": "fusion-s3"},
                "controller": {"pollSeconds": 0.5, "metrics": {"port": metrics_port}},
                "workloads": {
                    "split": {"parallelism": 2},
                    "logits": {"gpus": 0, "parallelism": 2},
                    "align": {"workers": 1, "leaseSeconds": 15},  # a killed worker's shard is taken over soon
                    "fuse": {"parallelism": 2},
                    "train": {"gpus": 0, "workers": nodes - 1, "operator": operator},
                    "eval": {"gpus": 0},
                },
            }
        },
    )
    rendered = render(values, release=RELEASE, namespace=NAMESPACE)
    if operator == "trainjob":  # split, vocab, logits, align, fuse committed first, from the pods' own spec
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
        monkeypatch.setenv(RUN_ID_ENV, f"{NAMESPACE}/{RELEASE}")  # as a pod of this release: the store's owner
        config = next(o for o in rendered.objects if o["kind"] == "ConfigMap" and "run.yaml" in o.get("data", {}))
        run_all(Run(parse_spec(yaml.safe_load(config["data"]["run.yaml"]))), UPSTREAM)
    expected = set(INPUTS) if operator == "pytorchjob" else {f"{RELEASE}-prepare", f"{RELEASE}-train", f"{RELEASE}-eval"}
    installed = [o for o in rendered.objects if "helm.sh/hook" not in (o["metadata"].get("annotations") or {})]
    image_env = {"FUSION_CACHE_DIR": str(tmp_path / "image-cache"), "OMP_NUM_THREADS": "1"}

    async with ApiServer() as api, kmock.Server(api) as server:
        async with Cluster(str(server.url), NAMESPACE, tmp_path / "cluster", image_env) as cluster:
            seen: dict[str, float] = {}

            async def check_order():
                """Every workload that exists had its inputs committed (checked the moment it
                appears: the store is read after the API, so it can only hold more commits than
                when the workload was created, never fewer)."""
                existing = [(kind, o["metadata"]["name"]) for kind in WORKLOAD_KINDS for o in await cluster.list(kind)]
                done = committed(client)
                for kind, name in existing:
                    if name in INPUTS and name not in seen:
                        missing = [i for i in INPUTS[name] if i not in done]
                        assert not missing, f"{name} was created before {missing} were committed\n{timeline(cluster)}"
                        assert name == f"{RELEASE}-prepare" or f"{RELEASE}-prepare" in seen
                        seen[name] = cluster.events[-1][0] if cluster.events else 0.0
                        cluster.event(f"controller created {kind} {name}")
                return done

            async def job(name):
                return await cluster.get("Job", name)

            async def running(name):
                pods = [p for p in await cluster.list("Pod") if p["metadata"]["labels"].get("job-name") == name]
                return [p for p in pods if p["status"].get("phase") in ("Pending", "Running") and not p["metadata"].get("deletionTimestamp")]

            # For the views: the status table while the trainer reports tokens per second, the
            # first one mid-training, else the last one before train/model was committed.
            training = {"summary": "", "mid_run": False}

            async def watch_training():
                if training["mid_run"]:
                    return
                data = ((await cluster.get("ConfigMap", f"{RELEASE}-status")) or {}).get("data") or {}
                parts = json.loads(data.get("status.json") or "{}").get("parts", [])
                train = next((p for p in parts if p["stage"] == "train" and p["state"] == "running"), None)
                if train is not None and train["rowsPerSecond"] > 0:
                    training.update(summary=data["summary"], mid_run=train["steps"] < train["stepsTotal"])

            async def progress(predicate):
                await check_order()
                await watch_training()
                return await predicate()

            # kubectl create secret generic fusion-s3 ...; helm install micro helm/fusion -f values.yaml
            await cluster.create(secret("fusion-s3", {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}))
            await cluster.apply(installed)
            cluster.event("helm install")

            # Alignment workers: 1 -> 3 while the stage runs, one killed, then 2 (once: it is the
            # same with either training operator).
            align = f"{RELEASE}-align-src-llama"
            if operator == "pytorchjob":
                await until(cluster, lambda: progress(lambda: running(align)), 420, f"{align} to run")
            else:
                await until(cluster, lambda: progress(lambda: cluster.get("TrainJob", f"{RELEASE}-train")), 420,
                            "the TrainJob to be created")
            mid_run = scrape(metrics_port)  # the controller's metrics while the run goes on
            assert mid_run['fusion_run_phase{run="micro",phase="Running"}'] == 1
            # (with the TrainJob the scrape can fall between the workload's creation and the end of the
            # controller's step, where it refreshes what is committed: split is checked once, here)
            if operator == "pytorchjob":
                assert mid_run['fusion_part_committed{run="micro",stage="split",part="train"}'] == 1
            if operator == "pytorchjob":
                await cluster.patch("Job", align, {"spec": {"parallelism": 3}})
                cluster.event(f"kubectl patch job {align} parallelism 3")
                pods = await until(cluster, lambda: progress(lambda: _at_least(running(align), 3)), 300, "3 align workers")
                victim = pods[-1]["metadata"]["name"]
                known = {p["metadata"]["name"] for p in await cluster.list("Pod")}
                await cluster.delete("Pod", victim)
                cluster.event(f"kubectl delete pod {victim}")

                async def replaced_or_done():
                    """A new worker, or (on a slow machine the other two may take every shard left
                    first) the Job complete: either way the killed worker's shard was not lost."""
                    new = [p for p in await cluster.list("Pod") if p["metadata"]["labels"].get("job-name") == align
                           and p["metadata"]["name"] not in known]
                    return new or await _condition(job(align), "Complete")

                await until(cluster, lambda: progress(replaced_or_done), 300, "a replacement worker")
                await cluster.patch("Job", align, {"spec": {"parallelism": 2}})
                cluster.event(f"kubectl patch job {align} parallelism 2")

            master = f"{RELEASE}-train-master-0"
            if operator == "pytorchjob":
                # The master's node is lost after the first checkpoint: its processes die outright
                # (137), the worker loses its peer (201, retryable), the training operator restarts
                # both, and training resumes from that checkpoint (same with either operator: once).
                latest = "micro/train/checkpoints/latest.json"
                await until(cluster, lambda: progress(lambda: _exists_async(client, latest)), 600, "the first checkpoint")
                await cluster.lose_node(master)

            controller = f"{RELEASE}-controller"
            await until(cluster, lambda: progress(lambda: _condition(job(controller), "Complete", "Failed")), 600, "the run to end")
            final = await job(controller)
            assert final["status"]["conditions"][0]["type"] == "Complete", (
                cluster.logs(controller) + cluster.logs(f"{RELEASE}-") + "\n" + timeline(cluster)
            )

            # The whole run, each shard once.
            assert committed(client) == {
                "split/train", "split/heldout", *(f"vocab/{s}" for s in SOURCES), *(f"logits/{m}" for m in MODELS),
                *(f"align/{s}" for s in SOURCES), "fuse/train", "train/model", "eval/report",
            }
            assert set(seen) == expected
            run_json = json.loads(client.get_object(Bucket=BUCKET, Key="micro/run.json")["Body"].read())
            shards = run_json["outputs"]["align/src-llama"]["shards"]
            records = {k: n for k, n in versions(client, "micro/align/src-llama/").items() if re.search(r"/src-llama/shard-\d{5}\.json$", k)}
            assert len(records) == shards and set(records.values()) == {1}, f"align records written more than once: {records}"
            assert not [k for k in versions(client, "micro/align/") if "/_leases/" in k and _exists(client, k)], "a lease was left behind"

            if operator == "pytorchjob":
                told = "\n".join(message for _, message in cluster.events)
                assert f"{master} exited 137, restarting it" in told, timeline(cluster)
                assert f"{RELEASE}-train-worker-0 exited {PEER_LOST_EXIT_CODE}, restarting it" in told, timeline(cluster)
                master_log = (cluster.root / "pods" / master / "log.txt").read_text(errors="replace")  # every incarnation
                starts = [int(step) for step in re.findall(r"steps from step (\d+)", master_log)]
                assert len(starts) >= 2 and starts[0] == 0 and starts[-1] >= checkpoint_every, (
                    cluster.logs(f"{RELEASE}-train") + "\n" + timeline(cluster)
                )
                model = versions(client, "micro/train/model/")
                assert model and set(model.values()) == {1}, f"the fused model was written more than once: {model}"

            # What an operator sees: the training workload of this operator, an Event for every
            # workload created and every part committed, and the status ConfigMap complete.
            train = await cluster.get({"pytorchjob": "PyTorchJob", "trainjob": "TrainJob"}[operator], f"{RELEASE}-train")
            assert train is not None and train["status"]["conditions"][0]["type"] in ("Succeeded", "Complete")
            events = await cluster.list("Event")
            reasons = {(e["involvedObject"]["name"], e["reason"]) for e in events}
            for name in expected:
                assert (name, "Created") in reasons, name
            assert {(f"{RELEASE}-controller", r) for r in ("Prepared", "RunComplete")} <= reasons
            assert sum(1 for e in events if e["reason"] == "Committed") == len(committed(client))
            created = next(e for e in events if e["reason"] == "Created" and e["involvedObject"]["name"] == f"{RELEASE}-train")
            assert created["involvedObject"]["uid"] == train["metadata"]["uid"], "kubectl describe finds it"
            status = (await cluster.get("ConfigMap", f"{RELEASE}-status"))["data"]
            assert status["phase"] == "Complete" and status["lastError"] == ""
            parts = json.loads(status["status.json"])["parts"]
            assert {f"{p['stage']}/{p['part']}" for p in parts} == committed(client)
            assert all(p["state"] == "committed" and p["shardsCommitted"] == p["shardsTotal"] for p in parts)
            assert next(p for p in parts if p["stage"] == "align")["rows"] > 0
            trained = next(p for p in parts if p["stage"] == "train")
            assert trained["steps"] == trained["stepsTotal"] > 0 and trained["rows"] > 0, "the trainer's progress record reached the status"
            views = await kubectl_views(cluster, RELEASE)
            if training["summary"]:
                views += f"\n\n$ kubectl get configmap {RELEASE}-status -o jsonpath='{{.data.summary}}'   # earlier, while training\n"
                views += training["summary"].rstrip()
            print("\n" + views)
            if os.environ.get("FUSION_WRITE_VIEWS"):
                folder = Path(os.environ["FUSION_WRITE_VIEWS"])
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"kubectl-views-{operator}.txt").write_text(views + "\n")

            # helm uninstall: everything the run created goes (the garbage collector follows owners).
            await cluster.uninstall(installed)
            cluster.event("helm uninstall")

            async def nothing_left():
                return not any([await cluster.list(kind) for kind in (*WORKLOAD_KINDS, "Pod", "ConfigMap", "ClusterTrainingRuntime", "Service")])

            await until(cluster, nothing_left, 240, "uninstall to remove everything")

            if operator != "pytorchjob":
                return  # resuming is the same with either operator: once is enough

            # Installing the same run again resumes from the store: only prepare runs, nothing is recomputed.
            before = versions(client, "micro/")
            seen.clear()
            await cluster.apply(installed)
            cluster.event("helm install (again)")
            await until(cluster, lambda: progress(lambda: _condition(job(controller), "Complete", "Failed")), 600, "the resumed run to end")
            assert (await job(controller))["status"]["conditions"][0]["type"] == "Complete"
            assert set(seen) == {f"{RELEASE}-prepare"}
            after = versions(client, "micro/")
            rewritten = {k for k in after if after[k] != before.get(k) and not k.endswith(("run.json",)) and "/logs/" not in k}
            assert not rewritten, f"a resumed install rewrote {sorted(rewritten)[:5]}"
            print("\n" + timeline(cluster))  # pytest -s shows the run as it went


async def _at_least(pods_coro, n):
    pods = await pods_coro
    return pods if len(pods) >= n else None


async def _condition(job_coro, *types):
    job = await job_coro
    conditions = (job or {}).get("status", {}).get("conditions") or []
    return any(c["type"] in types and c["status"] == "True" for c in conditions)


async def _exists_async(client, key: str) -> bool:
    return _exists(client, key)


def _exists(client, key: str) -> bool:
    try:
        client.head_object(Bucket=BUCKET, Key=key)
        return True
    except client.exceptions.ClientError:
        return False
