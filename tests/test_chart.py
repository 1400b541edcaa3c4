"""helm/fusion, rendered by the real Helm engine and checked without a cluster: every example
run spec works as values, every object is valid for Kubernetes 1.29-1.34 (the PyTorchJob
against the training operator's CRD), and helm-unittest-style assertions on what matters."""

from __future__ import annotations

import json

import pytest
import yaml

from fusion.config import RunSpec, TrainSpec, parse_spec
from fusion.errors import BAD_INPUT_EXIT_CODE
from fusion.k8s.values import ChartValues, default_cluster_values, schema_text
from tests.helmchart import (
    CHART,
    IMAGES,
    JOBS,
    KUBE_VERSIONS,
    PYTORCHJOB_CRD,
    S3,
    STORE_VOLUME,
    as_pod_template,
    lint,
    merge_values,
    pod_templates,
    render,
    render_error,
    restricted_violations,
    validate_kubernetes,
    validate_pytorchjob,
    values_file,
)

TINY = values_file(CHART.parents[1] / "jobs" / "tiny.yaml")
ON_S3 = {"store": "s3://fusion-runs/tiny"}
JOB_IDS = [p.stem for p in JOBS]

# Every cluster key set to something: the widest rendering.
EVERYTHING = {
    "store_options": {"endpoint_url": "http://minio.minio.svc:9000", "region": "eu-west-1"},
    "cluster": {
        "imagePullSecrets": [{"name": "registry"}],
        "serviceAccount": {"name": "fusion-runner", "annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/fusion"}},
        "s3": {"secretName": "fusion-s3"},
        "kueue": {"queueName": "gpu-batch", "priorityClass": "research"},
        "env": [{"name": "HF_HOME", "value": "/tmp/hf"}],
        "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}}],
        "volumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": True}],
        "podLabels": {"team": "nlp"},
        "podAnnotations": {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"},
        "gpuResource": "amd.com/gpu",
        "workloads": {
            "logits": {
                "gpus": 2,
                "nodeSelector": {"node.kubernetes.io/instance-type": "p4d.24xlarge"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "affinity": {
                    "nodeAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": {
                            "nodeSelectorTerms": [{"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["a100", "h100"]}]}]
                        }
                    }
                },
                "priorityClassName": "batch-high",
            },
            "align": {"workers": 16},
            "eval": {"gpus": 0},
        },
    }
}
# Training on several nodes needs the DeepSpeed engine (train.engine), which the run spec may not have yet.
DEEPSPEED = "engine" in TrainSpec.model_fields
MULTI_NODE = {"cluster": {"workloads": {"train": {"workers": 3, "gpus": 8, "nprocPerNode": "8"}}}}
ELASTIC = {"cluster": {"workloads": {"train": {"workers": 3, "gpus": 8, "elastic": {"enabled": True, "minReplicas": 2, "maxReplicas": 6}}}}}
ON_DEEPSPEED = {"train": {"engine": "deepspeed"}}
needs_deepspeed = pytest.mark.skipif(not DEEPSPEED, reason="the run spec has no train.engine yet (the trainer branch)")
MANY_SOURCES = {
    "models": {
        "target": {"name": "llama-2-7b", "path": "/models/llama-2-7b"},
        "sources": [{"name": f"source-{i}", "path": f"/models/source-{i}"} for i in range(5)],
    }
}

CASES = {
    "tiny-s3": (TINY, IMAGES, S3, ON_S3),
    "tiny-volume": (TINY, IMAGES, STORE_VOLUME),
    "everything": (TINY, IMAGES, ON_S3, EVERYTHING),
    "many-sources": (TINY, IMAGES, S3, ON_S3, MANY_SOURCES),
    "cpu-only": (TINY, IMAGES, STORE_VOLUME, {"cluster": {"workloads": {"logits": {"gpus": 0}, "train": {"gpus": 0}, "eval": {"gpus": 0}}}}),
}
if DEEPSPEED:
    CASES["multi-node"] = (TINY, IMAGES, S3, ON_S3, ON_DEEPSPEED, MULTI_NODE)
    CASES["elastic"] = (TINY, IMAGES, S3, ON_S3, ON_DEEPSPEED, ELASTIC)


@pytest.fixture(scope="module")
def rendered():
    return {name: render(*layers) for name, layers in CASES.items()}


# ---- the values schema ----------------------------------------------------------------------
def test_values_schema_is_generated_from_the_run_spec():
    committed = (CHART / "values.schema.json").read_text()
    assert committed == schema_text(), "regenerate: python -m fusion.k8s.values > helm/fusion/values.schema.json"
    schema = json.loads(committed)
    run_spec = RunSpec.model_json_schema(by_alias=True)
    assert set(schema["properties"]) == set(run_spec["properties"]) | {"cluster"}
    assert set(schema["required"]) == set(run_spec["required"])
    assert "cluster" not in RunSpec.model_fields, "the run spec must never grow a key the chart uses"


def test_values_yaml_holds_exactly_the_defaults():
    assert yaml.safe_load((CHART / "values.yaml").read_text()) == default_cluster_values()


@pytest.mark.parametrize("job", JOBS, ids=JOB_IDS)
def test_every_example_run_spec_is_valid_values(job):
    ChartValues.model_validate(values_file(job))


@pytest.mark.parametrize(
    "layers, message",
    [
        ((TINY, IMAGES, ON_S3, {"split": {"block_tokenz": 64}}), "block_tokenz"),
        ((TINY, IMAGES, ON_S3, {"train": {"lambda": 2}}), "/train/lambda"),
        ((TINY, IMAGES, ON_S3, {"cluster": {"workloads": {"logits": {"gpu": 1}}}}), "gpu"),
        ((TINY, IMAGES, ON_S3, {"cluster": {"image": {"cpu": {"digest": "latest"}}}}), "/cluster/image/cpu/digest"),
        ((TINY, IMAGES, ON_S3, {"models": {"target": {"name": "Target_1", "path": "x"}}}), "/models/target/name"),
        ((IMAGES, ON_S3), "missing propert"),
    ],
    ids=["typo-in-run-spec", "out-of-range", "typo-in-cluster", "tag-not-digest", "bad-model-name", "no-run-spec"],
)
def test_bad_values_are_refused_naming_the_key(layers, message):
    assert message in render_error(*layers)


def test_install_without_digests_says_how_to_get_them():
    error = render_error(TINY, S3, ON_S3)
    assert "cluster.image.cpu.digest is empty" in error and "images/README.md" in error


def test_a_local_store_needs_a_volume():
    error = render_error(TINY, IMAGES)
    assert "store \"runs/tiny\" is not reachable from the pods" in error and "storeVolume" in error
    for store in ("/data/runs/tiny", "file:///data/runs/tiny", "memory://tiny"):
        assert "a path under /var/lib/fusion/" in render_error(TINY, IMAGES, STORE_VOLUME, {"store": store})
    for store in ("runs/tiny", "/var/lib/fusion/runs/tiny", "file:///var/lib/fusion/runs/tiny"):
        assert render(TINY, IMAGES, STORE_VOLUME, {"store": store}).run_spec["store"] == store


def test_names_stay_short_and_start_with_a_letter():
    long_name = {"models": {"target": {"name": "t" * 40, "path": "/models/t"}, "sources": [{"name": "s", "path": "/models/s"}]}}
    assert "longer than 52 characters" in render_error(TINY, IMAGES, ON_S3, long_name, release="fusion-run")
    assert "must start with a letter" in render_error(TINY, IMAGES, ON_S3, release="1run")


# ---- lint and schemas -----------------------------------------------------------------------
@pytest.mark.parametrize("job", JOBS, ids=JOB_IDS)
@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_strict_lint_is_clean(job, version):
    assert lint(values_file(job), IMAGES, S3, ON_S3, kube_version=f"v{version}.0") == []


def test_strict_lint_is_clean_with_every_cluster_key():
    assert lint(TINY, IMAGES, ON_S3, EVERYTHING) == []


@pytest.mark.parametrize("job", JOBS, ids=JOB_IDS)
def test_every_example_renders_the_whole_run(job):
    spec = parse_spec(values_file(job))
    r = render(values_file(job), IMAGES, S3, {"store": f"s3://fusion-runs/{spec.name}"})
    sources = [s.name for s in spec.models.sources]
    models = [spec.models.target.name, *sources]
    assert [w["metadata"]["name"] for w in r.workloads] == (
        ["tiny-prepare", "tiny-split"]
        + [f"tiny-vocab-{s}" for s in sources]
        + [f"tiny-logits-{m}" for m in models]
        + [f"tiny-align-{s}" for s in sources]
        + ["tiny-fuse", "tiny-train", "tiny-eval"]
    )
    assert [(o["kind"], o["metadata"]["name"]) for o in r.objects] == [
        ("ConfigMap", "tiny-spec"),
        ("Job", "tiny-controller"),
        ("Role", "tiny-controller"),
        ("RoleBinding", "tiny-controller"),
        ("ServiceAccount", "tiny"),
        ("ServiceAccount", "tiny-controller"),
        ("Pod", "tiny-test-store"),
    ]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_every_object_is_valid_kubernetes(rendered, case, version):
    checked = 0
    for obj in rendered[case].all_objects():
        if obj["kind"] == "PyTorchJob":
            for i, template in enumerate(pod_templates(obj)):
                validate_kubernetes(as_pod_template(template, f"{obj['metadata']['name']}-{i}"), version)
        else:
            validate_kubernetes(obj, version)
        checked += 1
    assert checked == len(rendered[case].all_objects())


@pytest.mark.skipif(not PYTORCHJOB_CRD.exists(), reason="../shared/k8s-schemas is not present")
@pytest.mark.parametrize("case", list(CASES))
def test_pytorchjob_is_valid_for_the_training_operator_crd(rendered, case):
    job = rendered[case].workload("tiny-train")
    validate_pytorchjob(job)


@pytest.mark.skipif(not PYTORCHJOB_CRD.exists(), reason="../shared/k8s-schemas is not present")
def test_the_crd_check_catches_a_misspelled_field(rendered):
    import jsonschema

    job = json.loads(json.dumps(rendered["tiny-s3"].workload("tiny-train")))
    job["spec"]["pytorchReplicaSpecs"]["Master"]["restartPolicyy"] = "Never"
    with pytest.raises(jsonschema.ValidationError, match="restartPolicyy"):
        validate_pytorchjob(job)


# ---- what the workloads do ---------------------------------------------------------------------
def _containers(obj):
    return [c for t in pod_templates(obj) for c in t["spec"]["containers"]]


def test_the_run_spec_reaches_the_pods_unchanged(rendered):
    for case, layers in CASES.items():
        values = merge_values(*layers)
        values.pop("cluster")
        pods_see = rendered[case].run_spec
        assert "cluster" not in pods_see
        assert parse_spec(pods_see).model_dump() == parse_spec(values).model_dump()


def test_edge_numbers_survive_helm(rendered):
    odd = {"train": {"lr": 1e-7, "batch_size": 1024, "checkpoint_every": 1000000}, "corpus": {"path": "tiny:python-stdlib", "max_documents": 12345678901}}
    r = render(TINY, IMAGES, S3, ON_S3, odd)
    spec = parse_spec(r.run_spec)
    assert spec.train.lr == 1e-7 and spec.train.checkpoint_every == 1000000 and spec.corpus.max_documents == 12345678901


def test_images_are_referred_to_by_digest(rendered):
    for case in CASES:
        for obj in rendered[case].all_objects():
            for c in _containers(obj):
                repo, _, digest = c["image"].partition("@sha256:")
                assert len(digest) == 64 and ":" not in repo, c["image"]


def test_gpu_stages_use_the_gpu_image_and_request_gpus_as_quoted_quantities(rendered):
    r = rendered["tiny-s3"]
    for name in ["tiny-logits-target", "tiny-logits-src-llama", "tiny-logits-src-neox", "tiny-train", "tiny-eval"]:
        for c in _containers(r.workload(name)):
            assert "fusion-gpu@" in c["image"]
            limit = c["resources"]["limits"]["nvidia.com/gpu"]
            assert isinstance(limit, str), "Kubernetes client models reject integer quantities"
    for name in ["tiny-prepare", "tiny-split", "tiny-vocab-src-llama", "tiny-align-src-llama", "tiny-fuse"]:
        for c in _containers(r.workload(name)):
            assert "fusion-cpu@" in c["image"] and "nvidia.com/gpu" not in c["resources"].get("limits", {})
    for obj in r.all_objects():
        for c in _containers(obj):
            for group in c["resources"].values():
                assert all(isinstance(v, str) for v in group.values()), group
    widest = rendered["everything"]
    assert _containers(widest.workload("tiny-logits-target"))[0]["resources"]["limits"]["amd.com/gpu"] == "2"
    assert "amd.com/gpu" not in _containers(widest.workload("tiny-eval"))[0]["resources"].get("limits", {})


def test_sharded_stages_are_indexed_jobs_that_fail_only_the_index_on_bad_input(rendered):
    r = rendered["tiny-s3"]
    for name in ["tiny-split", "tiny-logits-target", "tiny-logits-src-neox", "tiny-fuse"]:
        job = r.workload(name)
        spec = job["spec"]
        assert spec["completionMode"] == "Indexed"
        assert job["metadata"]["annotations"]["fusion.dev/completions-from"] == "split-plan"
        assert spec["backoffLimitPerIndex"] == 2 and "backoffLimit" not in spec
        assert spec["template"]["spec"]["restartPolicy"] == "Never"
        rules = spec["podFailurePolicy"]["rules"]
        assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
        assert rules[1] == {"action": "FailIndex", "onExitCodes": {"containerName": "fusion", "operator": "In", "values": [BAD_INPUT_EXIT_CODE]}}


def test_single_pod_stages_fail_the_job_on_bad_input(rendered):
    r = rendered["tiny-s3"]
    for name in ["tiny-prepare", "tiny-vocab-src-llama", "tiny-eval"]:
        spec = r.workload(name)["spec"]
        assert spec["completions"] == 1 and "completionMode" not in spec
        assert spec["podFailurePolicy"]["rules"][1]["action"] == "FailJob"
        assert spec["podFailurePolicy"]["rules"][1]["onExitCodes"]["values"] == [BAD_INPUT_EXIT_CODE]


def test_align_workers_are_a_scalable_work_queue(rendered):
    spec = rendered["tiny-s3"].workload("tiny-align-src-llama")["spec"]
    assert "completions" not in spec and "completionMode" not in spec, "a work queue: parallelism may change"
    assert spec["parallelism"] == 4
    rules = spec["podFailurePolicy"]["rules"]
    assert {"action": "Ignore", "onExitCodes": {"containerName": "fusion", "operator": "In", "values": [143]}} in rules
    assert _containers(rendered["tiny-s3"].workload("tiny-align-src-llama"))[0]["args"] == [
        "worker", "align", "/etc/fusion/run.yaml", "--part", "src-llama"
    ]
    env = {e["name"]: e.get("value") for e in _containers(rendered["tiny-s3"].workload("tiny-align-src-llama"))[0]["env"]}
    assert env["FUSION_LEASE_SECONDS"] == "300"
    assert rendered["everything"].workload("tiny-align-src-neox")["spec"]["parallelism"] == 16
    assert "kubectl -n fusion patch job tiny-align-src-llama --type=merge" in rendered["tiny-s3"].notes


def _replicas(job):
    return {name: r["replicas"] for name, r in job["spec"]["pytorchReplicaSpecs"].items()}


def test_training_is_a_pytorchjob_whose_pods_start_torchrun(rendered):
    job = rendered["tiny-s3"].workload("tiny-train")
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    assert _replicas(job) == {"Master": 1} and "elasticPolicy" not in job["spec"]
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        assert replica["restartPolicy"] == "ExitCode"
        pod = replica["template"]["spec"]
        (container,) = pod["containers"]
        assert container["name"] == "pytorch"
        assert "command" not in container, "the entrypoint: the fusion CLI, which starts torchrun's agent"
        assert container["args"] == ["train", "/etc/fusion/run.yaml"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        shm = next(v for v in pod["volumes"] if v["name"] == "shm")
        assert shm["emptyDir"]["medium"] == "Memory"
        assert {"name": "shm", "mountPath": "/dev/shm"} in container["volumeMounts"]


def test_training_on_several_processes_needs_deepspeed():
    error = render_error(TINY, IMAGES, S3, ON_S3, MULTI_NODE)
    assert "training on 4 node(s) x 8 process(es) needs train.engine=deepspeed" in error
    assert "needs train.engine=deepspeed" in render_error(TINY, IMAGES, S3, ON_S3, {"cluster": {"workloads": {"train": {"gpus": 2}}}})


@needs_deepspeed
def test_multi_node_training_has_a_master_and_workers(rendered):
    job = rendered["multi-node"].workload("tiny-train")
    assert _replicas(job) == {"Master": 1, "Worker": 3} and job["spec"]["nprocPerNode"] == "8"
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        assert replica["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    elastic = rendered["elastic"].workload("tiny-train")["spec"]
    assert _replicas({"spec": elastic}) == {"Worker": 4}
    assert elastic["elasticPolicy"] == {"rdzvBackend": "c10d", "minReplicas": 2, "maxReplicas": 6, "maxRestarts": 3}


def test_placement_reaches_only_its_stage(rendered):
    r = rendered["everything"]
    logits = r.workload("tiny-logits-target")["spec"]["template"]["spec"]
    assert logits["nodeSelector"] == {"node.kubernetes.io/instance-type": "p4d.24xlarge"}
    assert logits["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert logits["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert logits["priorityClassName"] == "batch-high"
    fuse = r.workload("tiny-fuse")["spec"]["template"]["spec"]
    assert not {"nodeSelector", "tolerations", "affinity", "priorityClassName"} & set(fuse)


def test_kueue_labels_go_on_every_workload_but_not_the_controller(rendered):
    r = rendered["everything"]
    for w in r.workloads:
        assert w["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-batch"
        assert w["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "research"
    assert "kueue.x-k8s.io/queue-name" not in r.get("Job", "tiny-controller")["metadata"]["labels"]
    assert not any("kueue.x-k8s.io/queue-name" in w["metadata"]["labels"] for w in rendered["tiny-s3"].workloads)


def test_every_pod_meets_the_restricted_pod_security_standard(rendered):
    for case in CASES:
        for obj in rendered[case].all_objects():
            for template in pod_templates(obj):
                assert_restricted(template["spec"], f"{case}: {obj['kind']} {obj['metadata']['name']}")


def assert_restricted(pod: dict, where: str) -> None:
    assert restricted_violations(pod) == [], where
    for c in pod["containers"]:
        writable = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
        assert {"/tmp", "/var/cache/fusion"} <= writable, where
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["HOME"] == "/tmp" and env["NUMBA_CACHE_DIR"].startswith("/var/cache/fusion"), where


def test_s3_credentials_come_only_from_a_secret_reference(rendered):
    for case in CASES:
        r = rendered[case]
        assert not any(o["kind"] == "Secret" for o in r.all_objects())
        for obj in r.all_objects():
            for c in _containers(obj):
                env = {e["name"]: e for e in c["env"]}
                for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                    if key in env:
                        assert "value" not in env[key] and env[key]["valueFrom"]["secretKeyRef"]["name"] == "fusion-s3"
    tiny = rendered["tiny-s3"]
    env = {e["name"]: e for e in _containers(tiny.workload("tiny-split"))[0]["env"]}
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio.minio.svc:9000"
    volume = {e["name"] for e in _containers(rendered["tiny-volume"].workload("tiny-split"))[0]["env"]}
    assert "AWS_ACCESS_KEY_ID" not in volume


def test_a_store_volume_is_mounted_where_relative_stores_resolve(rendered):
    r = rendered["tiny-volume"]
    assert r.run_spec["store"] == "runs/tiny"
    for obj in [r.get("Job", "tiny-controller"), *r.workloads]:
        for template in pod_templates(obj):
            pod = template["spec"]
            (c,) = pod["containers"]
            assert c["workingDir"] == "/var/lib/fusion"
            assert {"name": "store", "mountPath": "/var/lib/fusion"} in c["volumeMounts"]
            assert {"name": "store", "persistentVolumeClaim": {"claimName": "fusion-runs"}} in pod["volumes"]


def test_the_controller_has_least_privilege(rendered):
    r = rendered["tiny-s3"]
    role = r.get("Role", "tiny-controller")
    assert role["rules"] == [
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "get", "list", "watch", "delete"]},
        {"apiGroups": ["kubeflow.org"], "resources": ["pytorchjobs"], "verbs": ["create", "get", "list", "watch", "delete"]},
    ]
    assert not any(o["kind"] in ("ClusterRole", "ClusterRoleBinding") for o in r.all_objects())
    binding = r.get("RoleBinding", "tiny-controller")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "tiny-controller", "namespace": "fusion"}]
    controller = r.get("Job", "tiny-controller")["spec"]["template"]["spec"]
    assert controller["serviceAccountName"] == "tiny-controller" and controller["automountServiceAccountToken"] is True
    assert controller["containers"][0]["args"] == [
        "k8s", "controller", "/etc/fusion/run.yaml", "--workloads", "/etc/fusion/workloads.yaml", "--job", "tiny-controller", "--poll-seconds", "15",
    ]
    for w in r.workloads:
        for template in pod_templates(w):
            assert template["spec"]["automountServiceAccountToken"] is False
            assert template["spec"]["serviceAccountName"] == "tiny"
    assert r.get("ServiceAccount", "tiny")["automountServiceAccountToken"] is False


def test_helm_test_hook_checks_the_store(rendered):
    pod = rendered["tiny-s3"].get("Pod", "tiny-test-store")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    assert pod["spec"]["containers"][0]["args"] == ["k8s", "check", "/etc/fusion/run.yaml"]


def test_workload_labels_tell_the_controller_what_each_computes(rendered):
    r = rendered["tiny-s3"]
    stages = {w["metadata"]["name"]: (w["metadata"]["labels"]["fusion.dev/stage"], w["metadata"]["labels"].get("fusion.dev/part")) for w in r.workloads}
    assert stages["tiny-split"] == ("split", None)
    assert stages["tiny-logits-src-neox"] == ("logits", "src-neox")
    assert stages["tiny-align-src-llama"] == ("align", "src-llama")
    assert stages["tiny-fuse"] == ("fuse", "train")
    for w in r.workloads:
        assert w["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "fusion-controller"
        assert w["metadata"]["labels"]["app.kubernetes.io/instance"] == "tiny"
