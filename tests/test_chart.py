"""helm/fusion, rendered by the real Helm engine and checked without a cluster: every example
run spec works as values, every object is valid for Kubernetes 1.29-1.34 (the PyTorchJob
against the training operator's CRD, the TrainJob and training runtimes against Kubeflow
Trainer v2.3's), and helm-unittest-style assertions on what matters."""

from __future__ import annotations

import json

import pytest
import yaml

from fusion.config import RunSpec, TrainSpec, parse_spec
from fusion.errors import BAD_INPUT_EXIT_CODE, PEER_LOST_EXIT_CODE, STORE_UNREACHABLE_EXIT_CODE
from fusion.k8s.values import ChartValues, default_cluster_values, schema_text
from tests.helmchart import (
    CHART,
    IMAGES,
    JOBS,
    KUBE_VERSIONS,
    PYTORCHJOB_CRD,
    S3,
    TORCH_DISTRIBUTED,
    TRAINER_CRDS,
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
    validate_trainer,
    values_file,
)
from tests.k8s_sim import trainjob_pod

TINY = values_file(CHART.parents[1] / "jobs" / "tiny.yaml")
ON_S3 = {"store": "s3://fusion-runs/tiny"}
JOB_IDS = [p.stem for p in JOBS]

SPREAD = {
    "maxSkew": 1,
    "topologyKey": "topology.kubernetes.io/zone",
    "whenUnsatisfiable": "ScheduleAnyway",
    "labelSelector": {"matchLabels": {"app.kubernetes.io/instance": "tiny", "fusion.dev/stage": "logits"}},
}
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
        "controller": {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}}, "activeDeadlineSeconds": 604800},
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
                "runtimeClassName": "nvidia",
                "activeDeadlineSeconds": 86400,
                "terminationGracePeriodSeconds": 60,
                "topologySpreadConstraints": [SPREAD],
            },
            "align": {"workers": 16},
            "train": {"runtimeClassName": "nvidia", "topologySpreadConstraints": [SPREAD], "activeDeadlineSeconds": 259200},
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
TRAINJOB = {"cluster": {"workloads": {"train": {"operator": "trainjob"}}}}
NAMED_RUNTIME = {"cluster": {"workloads": {"train": {"operator": "trainjob", "runtime": {"name": "torch-distributed"}}}}}
NAMESPACED_RUNTIME = {"cluster": {"workloads": {"train": {"operator": "trainjob", "runtime": {"kind": "TrainingRuntime"}}}}}
# EVERYTHING without what a patch of a named runtime cannot carry
PATCHABLE = {"cluster": {"workloads": {"train": {"nodeSelector": {"pool": "h100"}, "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}]}}}}
CASES["trainjob"] = (TINY, IMAGES, S3, ON_S3, EVERYTHING, TRAINJOB)
CASES["trainjob-named-runtime"] = (TINY, IMAGES, S3, ON_S3, NAMED_RUNTIME, PATCHABLE, {"cluster": {"imagePullSecrets": [{"name": "registry"}]}})
CASES["trainjob-namespaced-runtime"] = (TINY, IMAGES, STORE_VOLUME, NAMESPACED_RUNTIME)
TRAINJOB_CASES = ["trainjob", "trainjob-named-runtime", "trainjob-namespaced-runtime"]
if DEEPSPEED:
    CASES["multi-node"] = (TINY, IMAGES, S3, ON_S3, ON_DEEPSPEED, MULTI_NODE)
    CASES["elastic"] = (TINY, IMAGES, S3, ON_S3, ON_DEEPSPEED, ELASTIC)
    CASES["trainjob-multi-node"] = (TINY, IMAGES, S3, ON_S3, ON_DEEPSPEED, MULTI_NODE, TRAINJOB)
    TRAINJOB_CASES.append("trainjob-multi-node")


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
    assert [(o["kind"], o["metadata"]["name"]) for o in r.objects] == INSTALLED
    assert r.workload("tiny-train")["kind"] == "PyTorchJob"
    on_trainer = render(values_file(job), IMAGES, S3, {"store": f"s3://fusion-runs/{spec.name}"}, TRAINJOB)
    assert [(o["kind"], o["metadata"]["name"]) for o in on_trainer.objects] == INSTALLED + [("ClusterTrainingRuntime", "fusion-fusion-tiny")]
    assert on_trainer.workload("tiny-train")["kind"] == "TrainJob"


INSTALLED = [
    ("ConfigMap", "tiny-spec"),
    ("Job", "tiny-controller"),
    ("Service", "tiny-controller-metrics"),
    ("Role", "tiny-controller"),
    ("RoleBinding", "tiny-controller"),
    ("ServiceAccount", "tiny"),
    ("ServiceAccount", "tiny-controller"),
    ("ConfigMap", "tiny-status"),
    ("Pod", "tiny-test-store"),
]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_every_object_is_valid_kubernetes(rendered, case, version):
    checked = 0
    for obj in rendered[case].all_objects():
        if obj["kind"] in ("PyTorchJob", "ClusterTrainingRuntime", "TrainingRuntime"):  # CRDs: their pod templates here, the rest below
            for i, template in enumerate(pod_templates(obj)):
                validate_kubernetes(as_pod_template(template, f"{obj['metadata']['name']}-{i}"), version)
        elif obj["kind"] in ("TrainJob", "ServiceMonitor"):  # CRDs without pod templates (the TrainJob's pods: below)
            pass
        else:
            validate_kubernetes(obj, version)
        checked += 1
    assert checked == len(rendered[case].all_objects())


@pytest.mark.skipif(not PYTORCHJOB_CRD.exists(), reason="../shared/k8s-schemas is not present")
@pytest.mark.parametrize("case", [c for c in CASES if c not in TRAINJOB_CASES])
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
        {"apiGroups": ["trainer.kubeflow.org"], "resources": ["trainjobs"], "verbs": ["create", "get", "list", "watch", "delete"]},
        {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
        {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["tiny-status"], "verbs": ["get", "patch"]},
    ]
    assert not any(o["kind"] in ("ClusterRole", "ClusterRoleBinding") for o in r.all_objects())
    binding = r.get("RoleBinding", "tiny-controller")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "tiny-controller", "namespace": "fusion"}]
    controller = r.get("Job", "tiny-controller")["spec"]["template"]["spec"]
    assert controller["serviceAccountName"] == "tiny-controller" and controller["automountServiceAccountToken"] is True
    assert controller["containers"][0]["args"] == [
        "k8s", "controller", "/etc/fusion/run.yaml", "--workloads", "/etc/fusion/workloads.yaml", "--job", "tiny-controller", "--poll-seconds", "15",
        "--metrics-port", "9090",
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


def micro_spec(**overrides) -> dict:
    """tests/micro.py's run spec, with its models and corpus where pods would mount them (nothing is built)."""
    from pathlib import Path

    from tests.micro import Micro

    names = ("target", "src-llama", "src-neox")
    micro = Micro(Path("/models"), {n: Path(f"/models/{n}") for n in names}, Path("/data/corpus.jsonl"))
    return micro.spec("s3://fusion-runs/micro", **overrides)


def test_the_charts_workloads_compute_exactly_the_pipelines_parts(tmp_path):
    from fusion.k8s.controller import load_workloads
    from fusion.pipeline import STAGES, open_run

    spec = micro_spec()
    workloads = tmp_path / "workloads.yaml"
    workloads.write_text(render(spec, IMAGES, release="micro").configmap["data"]["workloads.yaml"])
    run = open_run(parse_spec(spec), build_models=False)
    computed = [o for w in load_workloads(workloads, run) for o in w.outputs]
    assert sorted(computed) == sorted((stage, part) for stage in STAGES for part in run.pipeline.parts(stage))

    # a chart rendered from another spec (a source more, a source less) is refused, naming what differs
    from fusion.errors import FusionError

    three = {"name": "src-gpt2", "path": "/models/src-gpt2"}
    other = micro_spec(**{"models.sources": [*spec["models"]["sources"], three]})
    workloads.write_text(render(other, IMAGES, release="micro").configmap["data"]["workloads.yaml"])
    with pytest.raises(FusionError) as refused:
        load_workloads(workloads, run)
    message = str(refused.value)
    assert "do not match run micro's pipeline" in message
    assert "micro-vocab-src-gpt2 computes vocab/src-gpt2, which the run does not have" in message
    assert "micro-align-src-gpt2 computes align/src-gpt2" in message
    bigger = open_run(parse_spec(other), build_models=False)
    workloads.write_text(render(spec, IMAGES, release="micro").configmap["data"]["workloads.yaml"])
    with pytest.raises(FusionError, match="no workload computes vocab/src-gpt2; no workload computes logits/src-gpt2"):
        load_workloads(workloads, bigger)


# ---- placement and lifecycle ---------------------------------------------------------------------
def test_runtime_class_topology_spread_and_deadlines_reach_only_their_stage(rendered):
    r = rendered["everything"]
    logits = r.workload("tiny-logits-target")
    pod = logits["spec"]["template"]["spec"]
    assert pod["runtimeClassName"] == "nvidia" and pod["terminationGracePeriodSeconds"] == 60
    assert pod["topologySpreadConstraints"] == [SPREAD]
    assert logits["spec"]["activeDeadlineSeconds"] == 86400
    fuse = r.workload("tiny-fuse")
    assert not {"runtimeClassName", "terminationGracePeriodSeconds", "topologySpreadConstraints"} & set(fuse["spec"]["template"]["spec"])
    assert "activeDeadlineSeconds" not in fuse["spec"]
    train = r.workload("tiny-train")
    assert train["spec"]["runPolicy"]["activeDeadlineSeconds"] == 259200
    for replica in train["spec"]["pytorchReplicaSpecs"].values():
        assert replica["template"]["spec"]["runtimeClassName"] == "nvidia"
        assert replica["template"]["spec"]["topologySpreadConstraints"] == [SPREAD]
    assert r.get("Job", "tiny-controller")["spec"]["activeDeadlineSeconds"] == 604800
    trainjob = rendered["trainjob"].workload("tiny-train")
    assert trainjob["spec"]["activeDeadlineSeconds"] == 259200
    (runtime,) = [o for o in rendered["trainjob"].objects if o["kind"] == "ClusterTrainingRuntime"]
    node = pod_templates(runtime)[0]["spec"]
    assert node["runtimeClassName"] == "nvidia" and node["topologySpreadConstraints"] == [SPREAD]


def test_image_pull_secrets_reach_every_pod(rendered):
    for case in ("everything", "trainjob", "trainjob-named-runtime"):
        r = rendered[case]
        for obj in r.all_objects():
            for template in pod_templates(obj):
                assert template["spec"]["imagePullSecrets"] == [{"name": "registry"}], (case, obj["metadata"]["name"])
    patch = _runtime_patch(rendered["trainjob-named-runtime"].workload("tiny-train"))
    assert patch["spec"]["imagePullSecrets"] == [{"name": "registry"}]


def test_train_grace_period_covers_a_step_and_a_save(rendered):
    for case in ("tiny-s3", "trainjob"):
        r = rendered[case]
        train = r.workload("tiny-train")
        pods = pod_templates(train) or pod_templates(next(o for o in r.objects if o["kind"] == "ClusterTrainingRuntime"))
        for template in pods:
            assert template["spec"]["terminationGracePeriodSeconds"] == 300 + 600 + 30
            env = {e["name"]: e.get("value") for e in template["spec"]["containers"][0]["env"]}
            assert env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "900", "torchrun's agent waits for the save"
    assert "terminationGracePeriodSeconds" not in rendered["tiny-s3"].workload("tiny-split")["spec"]["template"]["spec"]
    slow = {"cluster": {"workloads": {"train": {"preemption": {"stepSeconds": 40, "saveSeconds": 1800, "exitSeconds": 10}}}}}
    pod = render(TINY, IMAGES, S3, ON_S3, slow).workload("tiny-train")["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 1850
    assert {"name": "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "value": "1840"} in pod["containers"][0]["env"]
    fixed = {"cluster": {"workloads": {"train": {"terminationGracePeriodSeconds": 3600}}}}
    assert render(TINY, IMAGES, S3, ON_S3, fixed).workload("tiny-train")["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"][
        "terminationGracePeriodSeconds"
    ] == 3600
    short = {"cluster": {"workloads": {"train": {"terminationGracePeriodSeconds": 120}}}}
    error = render_error(TINY, IMAGES, S3, ON_S3, short)
    assert "cluster.workloads.train.terminationGracePeriodSeconds=120 is shorter than a step plus a save" in error


@pytest.mark.parametrize(
    "layers, message",
    [
        ((TINY, IMAGES, ON_S3, {"cluster": {"workloads": {"split": {"activeDeadlineSeconds": 0}}}}), "/cluster/workloads/split/activeDeadlineSeconds"),
        ((TINY, IMAGES, ON_S3, {"cluster": {"workloads": {"train": {"terminationGracePeriodSeconds": -1}}}}), "terminationGracePeriodSeconds"),
        ((TINY, IMAGES, ON_S3, {"cluster": {"workloads": {"train": {"operator": "mpijob"}}}}), "/cluster/workloads/train/operator"),
        ((TINY, IMAGES, ON_S3, {"cluster": {"workloads": {"eval": {"topologySpreadConstraints": {"maxSkew": 1}}}}}), "topologySpreadConstraints"),
    ],
    ids=["zero-deadline", "negative-grace", "unknown-operator", "spread-not-a-list"],
)
def test_bad_lifecycle_values_are_refused_naming_the_key(layers, message):
    assert message in render_error(*layers)


# ---- training on Kubeflow Trainer v2 ------------------------------------------------------------
needs_trainer_crds = pytest.mark.skipif(not TRAINER_CRDS["TrainJob"].exists(), reason="../shared/k8s-schemas is not present")


def _runtime(r):
    (runtime,) = [o for o in r.objects if o["kind"] in ("ClusterTrainingRuntime", "TrainingRuntime")]
    return runtime


def _stock_runtime() -> dict:
    return yaml.safe_load(TORCH_DISTRIBUTED.read_text())


def _runtime_patch(trainjob):
    (patch,) = trainjob["spec"]["runtimePatches"]
    (job,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    return job["template"]["spec"]["template"]


@needs_trainer_crds
@pytest.mark.parametrize("case", TRAINJOB_CASES)
def test_trainer_objects_are_valid_for_the_v2_3_crds(rendered, case):
    r = rendered[case]
    trainjob = r.workload("tiny-train")
    validate_trainer(trainjob)
    if case != "trainjob-named-runtime":
        validate_trainer(_runtime(r))


@needs_trainer_crds
def test_the_trainer_crd_check_catches_a_misspelled_field(rendered):
    import jsonschema

    validate_trainer(_stock_runtime())  # the release's own runtime passes
    job = json.loads(json.dumps(rendered["trainjob"].workload("tiny-train")))
    job["spec"]["trainer"]["numNode"] = 2
    with pytest.raises(jsonschema.ValidationError, match="numNode"):
        validate_trainer(job)
    runtime = json.loads(json.dumps(_runtime(rendered["trainjob"])))
    runtime["spec"]["mlPolicy"]["torch"]["numProcPerNode"] = "auto"  # v2.3 moved it to the TrainJob
    with pytest.raises(jsonschema.ValidationError, match="numProcPerNode"):
        validate_trainer(runtime)


def test_a_trainjob_runs_the_same_training_on_the_charts_runtime(rendered):
    r = rendered["trainjob"]
    job = r.workload("tiny-train")
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and job["kind"] == "TrainJob"
    assert job["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime", "name": "fusion-fusion-tiny"}
    trainer = job["spec"]["trainer"]
    assert trainer["command"] == ["fusion"] and trainer["args"] == ["train", "/etc/fusion/run.yaml"]
    assert trainer["numNodes"] == 1 and "numProcPerNode" not in trainer, "auto: the runtime's torch plugin decides"
    assert trainer["resourcesPerNode"]["limits"]["amd.com/gpu"] == "1" and "fusion-gpu@sha256:" in trainer["image"]
    assert "runtimePatches" not in job["spec"], "the chart's runtime carries every pod setting"
    runtime = _runtime(r)
    assert runtime["spec"]["mlPolicy"] == {"numNodes": 1, "torch": {}}
    (node_job,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    assert node_job["name"] == "node" and node_job["template"]["metadata"]["labels"] == {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}
    rules = node_job["template"]["spec"]["podFailurePolicy"]["rules"]
    assert {"action": "FailJob", "onExitCodes": {"containerName": "node", "operator": "In", "values": [BAD_INPUT_EXIT_CODE]}} in rules
    assert runtime["spec"]["template"]["spec"]["failurePolicy"]["rules"] == [{"name": "badInput", "action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"]}]
    pod = node_job["template"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and [c["name"] for c in pod["containers"]] == ["node"]
    assert {"name": "spec", "configMap": {"name": "tiny-spec"}} in pod["volumes"]
    namespaced = _runtime(rendered["trainjob-namespaced-runtime"])
    assert namespaced["kind"] == "TrainingRuntime" and namespaced["metadata"]["namespace"] == "fusion"
    assert rendered["trainjob-namespaced-runtime"].workload("tiny-train")["spec"]["runtimeRef"]["kind"] == "TrainingRuntime"


@needs_deepspeed
def test_a_multi_node_trainjob_asks_for_its_nodes_and_processes(rendered):
    trainer = rendered["trainjob-multi-node"].workload("tiny-train")["spec"]["trainer"]
    assert trainer["numNodes"] == 4 and trainer["numProcPerNode"] == 8
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "8"


@pytest.mark.skipif(not TORCH_DISTRIBUTED.exists(), reason="../shared/k8s-schemas is not present")
@pytest.mark.parametrize("case", ["trainjob", "trainjob-named-runtime"])
@pytest.mark.parametrize("version", [KUBE_VERSIONS[0], KUBE_VERSIONS[-1]])
def test_the_trainjobs_node_pods_are_fusion_pods(rendered, case, version):
    """The pod Trainer v2 makes of the TrainJob and its runtime (the chart's, or the release's
    torch-distributed with the TrainJob's runtimePatches) is valid, restricted, and runs the
    fusion CLI with the spec, the store credentials and the torch plugin's PET_* variables."""
    r = rendered[case]
    runtime = _stock_runtime() if case == "trainjob-named-runtime" else _runtime(r)
    pod = trainjob_pod(r.workload("tiny-train"), runtime, 1, "tiny-train-node-0-0.tiny-train", 29400)
    validate_kubernetes(as_pod_template({"metadata": pod["metadata"], "spec": pod["spec"]}, "tiny-train-node"), version)
    assert_restricted(pod["spec"], case)
    (node,) = pod["spec"]["containers"]
    assert node["command"] == ["fusion"] and node["args"] == ["train", "/etc/fusion/run.yaml"] and "fusion-gpu@sha256:" in node["image"]
    env = {e["name"]: e for e in node["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "fusion-s3"
    assert env["PET_MASTER_ADDR"]["value"] == "tiny-train-node-0-0.tiny-train" and env["PET_NODE_RANK"]["value"] == "1"
    assert {"name": "spec", "mountPath": "/etc/fusion", "readOnly": True} in node["volumeMounts"]
    stage_pods = r.workload("tiny-split")["spec"]["template"]["spec"]
    assert pod["spec"]["serviceAccountName"] == stage_pods["serviceAccountName"] and pod["spec"]["terminationGracePeriodSeconds"] == 930
    assert pod["spec"]["securityContext"] == stage_pods["securityContext"]
    assert pod["metadata"]["labels"]["fusion.dev/stage"] == "train"
    if case == "trainjob-named-runtime":
        assert pod["spec"]["nodeSelector"] == {"pool": "h100"} and pod["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_a_named_runtime_refuses_what_a_patch_cannot_carry():
    for key, value in (("runtimeClassName", "nvidia"), ("priorityClassName", "high"), ("topologySpreadConstraints", [SPREAD])):
        error = render_error(TINY, IMAGES, S3, ON_S3, NAMED_RUNTIME, {"cluster": {"workloads": {"train": {key: value}}}})
        assert f"cluster.workloads.train.{key} cannot be patched into the runtime \"torch-distributed\"" in error
    assert "sets the train pods' working directory" in render_error(TINY, IMAGES, STORE_VOLUME, NAMED_RUNTIME)
    render(TINY, IMAGES, STORE_VOLUME, NAMED_RUNTIME, {"store": "/var/lib/fusion/runs/tiny"})  # an absolute store path is fine
    assert "needs operator=pytorchjob" in render_error(TINY, IMAGES, S3, ON_S3, {"train": {"engine": "deepspeed"}} if DEEPSPEED else {}, ELASTIC, TRAINJOB)
    assert "nprocPerNode=cpu" in render_error(TINY, IMAGES, S3, ON_S3, TRAINJOB, {"cluster": {"workloads": {"train": {"nprocPerNode": "cpu"}}}})


def test_a_named_runtime_is_warned_about_its_failure_policy(rendered):
    """A named runtime's failure policy applies (a runtimePatch cannot carry one), and Kubeflow's
    torch-distributed has none: the install notes say that a preemption then fails the run."""
    if TORCH_DISTRIBUTED.exists():
        assert "failurePolicy" not in _stock_runtime()["spec"]["template"]["spec"], "the stock runtime grew a failure policy: revisit this warning"
    notes = " ".join(rendered["trainjob-named-runtime"].notes.split())
    assert "WARNING: the TrainJob runs on the runtime ClusterTrainingRuntime/torch-distributed: its failure policy decides" in notes
    assert "a preempted train node (exit 143) or a lost peer (exit 201) fails the TrainJob and the run" in notes
    for case in ("trainjob", "trainjob-namespaced-runtime", "tiny-s3"):
        assert "WARNING" not in rendered[case].notes, case


# ---- Kueue ------------------------------------------------------------------------------------------
def test_kueue_reads_queue_labels_on_the_workload_and_the_elastic_annotation_on_align_jobs(rendered):
    """Kueue's job integrations read kueue.x-k8s.io/queue-name and priority-class from the
    workload object's labels (Job, PyTorchJob, TrainJob; not its pods'), and workload slicing
    from the Job's annotation kueue.x-k8s.io/elastic-job: "true" (a string)."""
    for case in ("everything", "trainjob"):
        r = rendered[case]
        kinds = set()
        for w in r.workloads:
            kinds.add(w["kind"])
            labels, annotations = w["metadata"]["labels"], w["metadata"].get("annotations") or {}
            assert labels["kueue.x-k8s.io/queue-name"] == "gpu-batch" and labels["kueue.x-k8s.io/priority-class"] == "research"
            assert not any(k.startswith("kueue.x-k8s.io/queue") for k in annotations)
            for template in pod_templates(w):
                assert not any(k.startswith("kueue.x-k8s.io/") for k in template["metadata"]["labels"]), "Kueue reads the workload, not its pods"
            elastic = annotations.get("kueue.x-k8s.io/elastic-job")
            if w["metadata"]["labels"]["fusion.dev/stage"] == "align":
                assert elastic == "true" and "completions" not in w["spec"] and "completionMode" not in w["spec"]
            else:
                assert elastic is None, w["metadata"]["name"]
            assert "kueue.x-k8s.io/elastic-job" not in labels
        assert {"Job", "TrainJob" if case == "trainjob" else "PyTorchJob"} == kinds
    assert not any("kueue.x-k8s.io/elastic-job" in (w["metadata"].get("annotations") or {}) for w in rendered["tiny-s3"].workloads), "no queue, no Kueue"
    off = render(TINY, IMAGES, S3, ON_S3, {"cluster": {"kueue": {"queueName": "q", "elasticJobs": False}}})
    assert "kueue.x-k8s.io/elastic-job" not in (off.workload("tiny-align-src-llama")["metadata"].get("annotations") or {})


# ---- observability --------------------------------------------------------------------------------
def test_the_controller_serves_metrics_behind_a_service_and_an_optional_service_monitor(rendered):
    r = rendered["everything"]
    controller = r.get("Job", "tiny-controller")["spec"]["template"]
    (container,) = controller["spec"]["containers"]
    assert container["ports"] == [{"name": "metrics", "containerPort": 9090, "protocol": "TCP"}]
    service = r.get("Service", "tiny-controller-metrics")
    assert all(controller["metadata"]["labels"][k] == v for k, v in service["spec"]["selector"].items())
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}]
    monitor = r.get("ServiceMonitor", "tiny-controller")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["metadata"]["labels"]["release"] == "prometheus"
    assert all(service["metadata"]["labels"][k] == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s"}]
    assert not any(o["kind"] == "ServiceMonitor" for o in rendered["tiny-s3"].objects)
    none = render(TINY, IMAGES, S3, ON_S3, {"cluster": {"controller": {"metrics": {"port": 0}}}})
    assert not any(o["kind"] == "Service" for o in none.objects)
    (container,) = none.get("Job", "tiny-controller")["spec"]["template"]["spec"]["containers"]
    assert "ports" not in container and container["args"][-2:] == ["--metrics-port", "0"]


def test_the_status_configmap_is_installed_for_the_controller_to_keep_current(rendered):
    status = rendered["tiny-s3"].get("ConfigMap", "tiny-status")
    assert status["data"]["phase"] == "Pending"
    role = rendered["tiny-s3"].get("Role", "tiny-controller")
    assert {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["tiny-status"], "verbs": ["get", "patch"]} in role["rules"]
    assert {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]} in role["rules"]


def test_an_unreachable_store_is_retried_and_the_release_names_the_run(rendered):
    """Exit 200 (the store stayed unreachable past store_options.outage_seconds) restarts the pod
    without using up backoffLimit; training pods restart on it and on 201 (peers lost) through
    restartPolicy ExitCode (128-255); every pod carries NAMESPACE/RELEASE as the run's identity."""
    r = rendered["tiny-s3"]
    ignore = {"action": "Ignore", "onExitCodes": {"operator": "In", "values": [STORE_UNREACHABLE_EXIT_CODE]}}
    for name in ["tiny-prepare", "tiny-split", "tiny-align-src-llama", "tiny-eval", "tiny-controller"]:
        job = r.workload(name) if name != "tiny-controller" else r.get("Job", name)
        rules = [{**rule, "onExitCodes": {k: v for k, v in rule.get("onExitCodes", {}).items() if k != "containerName"}}
                 for rule in job["spec"]["podFailurePolicy"]["rules"]]
        assert ignore in rules, name
        env = {e["name"]: e.get("value") for e in _containers(job)[0]["env"]}
        assert env["FUSION_RUN_ID"] == "fusion/tiny", name
    assert 128 <= STORE_UNREACHABLE_EXIT_CODE <= 255 and 128 <= PEER_LOST_EXIT_CODE <= 255
    train = r.workload("tiny-train")
    for replica in train["spec"]["pytorchReplicaSpecs"].values():
        assert replica["restartPolicy"] == "ExitCode"
    # the chart's Trainer v2 runtime: its node pods are replaced on 200 and 201 without using up
    # the JobSet's restarts, and fail the TrainJob on 3
    (runtime,) = [o for o in rendered["trainjob"].objects if o["kind"] == "ClusterTrainingRuntime"]
    (node,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    rules = node["template"]["spec"]["podFailurePolicy"]["rules"]
    codes = {rule["action"]: rule["onExitCodes"]["values"] for rule in rules if "onExitCodes" in rule}
    assert codes == {"FailJob": [3], "Ignore": [STORE_UNREACHABLE_EXIT_CODE, PEER_LOST_EXIT_CODE]}
