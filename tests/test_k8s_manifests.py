"""k8s/: what a cluster needs first, valid for Kubernetes 1.29-1.34 and consistent with the chart."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from fusion.k8s.values import ChartValues
from tests.helmchart import CHART, IMAGES, KUBE_VERSIONS, lint, merge_values, render, restricted_violations, validate_kubernetes, values_file

K8S = Path(__file__).resolve().parents[1] / "k8s"
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "values-local.yaml")
KUEUE = "kueue.x-k8s.io/v1beta2"  # what Kueue 0.20 serves (it no longer serves v1beta1); a CRD: no schema here, checked for shape below


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def everything() -> list[dict]:
    return [d for p in MANIFESTS for d in documents(p)]


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_cluster_manifests_are_valid_kubernetes(version):
    checked = set()
    for obj in everything():
        if obj["apiVersion"] == KUEUE:
            continue
        validate_kubernetes(obj, version)
        checked.add(obj["kind"])
    assert checked == {"Namespace", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding", "Secret", "Deployment", "Service", "Job"}


def test_kueue_manifests_use_the_api_kueue_serves_now():
    docs = documents(K8S / "kueue.yaml")
    assert docs and {d["apiVersion"] for d in docs} == {KUEUE}
    readme = (K8S / "README.md").read_text()
    assert "ElasticJobsViaWorkloadSlices" in readme and "kueue.x-k8s.io/elastic-job" in readme


def test_kueue_queues_are_what_the_chart_refers_to():
    kinds = {d["kind"]: d for d in documents(K8S / "kueue.yaml")}
    assert set(kinds) == {"ResourceFlavor", "ClusterQueue", "LocalQueue"}
    local = kinds["LocalQueue"]
    assert local["metadata"]["namespace"] == "fusion" and local["spec"]["clusterQueue"] == kinds["ClusterQueue"]["metadata"]["name"]
    flavors = {f["name"] for g in kinds["ClusterQueue"]["spec"]["resourceGroups"] for f in g["flavors"]}
    assert flavors == {kinds["ResourceFlavor"]["metadata"]["name"]}
    r = render(values_file(CHART.parents[1] / "jobs/tiny.yaml"), IMAGES, {"store": "s3://runs/tiny", "cluster": {"kueue": {"queueName": local["metadata"]["name"]}}})
    assert all(w["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "fusion" for w in r.workloads)


def test_the_namespace_enforces_the_restricted_standard():
    (ns,) = documents(K8S / "namespace.yaml")
    assert ns["metadata"]["name"] == "fusion"
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_minio_pods_are_restricted_and_pinned():
    for obj in documents(K8S / "minio.yaml"):
        if obj["kind"] in ("Deployment", "Job"):
            pod = obj["spec"]["template"]["spec"]
            assert restricted_violations(pod) == [], obj["metadata"]["name"]
            for c in pod["containers"]:
                assert "@sha256:" in c["image"]


def test_the_local_setup_fits_together():
    secret = documents(K8S / "s3-secret.example.yaml")[0]
    minio_root = next(d for d in documents(K8S / "minio.yaml") if d["kind"] == "Secret")
    chart_s3 = yaml.safe_load((CHART / "values.yaml").read_text())["cluster"]["s3"]
    assert secret["stringData"][chart_s3["accessKeyIdKey"]] == minio_root["stringData"]["MINIO_ROOT_USER"]
    assert secret["stringData"][chart_s3["secretAccessKeyKey"]] == minio_root["stringData"]["MINIO_ROOT_PASSWORD"]
    local = values_file(K8S / "values-local.yaml")
    assert local["cluster"]["s3"]["secretName"] == secret["metadata"]["name"]
    tiny = values_file(CHART.parents[1] / "jobs/tiny.yaml")
    on_minio = {"store": "s3://runs/tiny", **IMAGES_FOR_LOCAL}
    ChartValues.model_validate(merge_values(tiny, local, on_minio))
    assert lint(tiny, local, on_minio) == []
    r = render(tiny, local, on_minio)
    assert all("k3d-fusion-registry.localhost:5050/" in c["image"] for w in r.workloads for t in _templates(w) for c in t["spec"]["containers"])
    assert "s3://runs/tiny" in (K8S / "README.md").read_text()


IMAGES_FOR_LOCAL = {"cluster": {"image": {k: {"digest": v["digest"]} for k, v in IMAGES["cluster"]["image"].items()}}}


def _templates(obj):
    if obj["kind"] == "PyTorchJob":
        return [r["template"] for r in obj["spec"]["pytorchReplicaSpecs"].values()]
    return [obj["spec"]["template"]]


def test_installers_may_grant_what_the_controller_gets():
    """RBAC forbids granting permissions one does not hold: the installer Role must cover the chart's."""
    installer = next(d for d in documents(K8S / "installer-rbac.yaml") if d["kind"] == "Role")
    r = render(values_file(CHART.parents[1] / "jobs/tiny.yaml"), IMAGES, {"store": "s3://runs/tiny"})
    held = {(g, res, v) for rule in installer["rules"] for g in rule["apiGroups"] for res in rule["resources"] for v in rule["verbs"]}
    for rule in r.get("Role", "tiny-controller")["rules"]:
        for g in rule["apiGroups"]:
            for res in rule["resources"]:
                for v in rule["verbs"]:
                    assert (g, res, v) in held, (g, res, v)
    kinds = {(o["apiVersion"].split("/")[0] if "/" in o["apiVersion"] else "", o["kind"]) for o in r.objects}
    plural = {
        "ConfigMap": "configmaps", "ServiceAccount": "serviceaccounts", "Role": "roles", "RoleBinding": "rolebindings",
        "Job": "jobs", "Pod": "pods", "Service": "services",
    }
    for group, kind in kinds:
        assert (group, plural[kind], "create") in held, kind
    # Training on Trainer v2: a namespaced runtime is within the Role, the chart's cluster-wide one needs the ClusterRole
    assert ("trainer.kubeflow.org", "trainingruntimes", "create") in held and ("trainer.kubeflow.org", "trainjobs", "delete") in held
    cluster_role = next(d for d in documents(K8S / "installer-rbac.yaml") if d["kind"] == "ClusterRole")
    assert {"apiGroups": ["trainer.kubeflow.org"], "resources": ["clustertrainingruntimes"], "verbs": ["create", "get", "list", "watch", "update", "patch", "delete"]} in cluster_role["rules"]
    monitored = render(values_file(CHART.parents[1] / "jobs/tiny.yaml"), IMAGES, {"store": "s3://runs/tiny"}, {"cluster": {"controller": {"metrics": {"serviceMonitor": {"enabled": True}}}}})
    assert any(o["kind"] == "ServiceMonitor" for o in monitored.objects) and ("monitoring.coreos.com", "servicemonitors", "create") in held


def _commands(block: str) -> list[tuple[str, list[str]]]:
    """A console block as (command, output lines)."""
    out: list[tuple[str, list[str]]] = []
    for line in block.splitlines():
        if line.startswith("$ "):
            out.append((line[2:], []))
        elif out and line:
            out[-1][1].append(line)
    return out


def test_the_readme_shows_the_simulated_runs_views():
    """k8s/README.md shows what the simulated run prints, with either training operator
    (tests/k8s_sim.py kubectl_views; FUSION_WRITE_VIEWS=DIR pytest tests/test_k8s_sim.py writes
    them to files): pasted in, they keep the shape of what the controller writes now."""
    from fusion.k8s import observe

    blocks = re.findall(r"```console\n(.*?)```", (K8S / "README.md").read_text(), re.S)
    views = [_commands(b) for b in blocks if b.startswith("$ kubectl get jobs,pytorchjobs,trainjobs")]
    header = observe.summary("Complete", [], "").splitlines()[0]
    kinds = set()
    for view in views:
        (get, rows), *rest = view
        assert rows[0].split() == ["NAME", "STATUS", "COMPLETIONS"]
        (train,) = [r.split()[0] for r in rows if r.split()[0].endswith("/micro-train")]
        kinds.add(train.split(".")[0])
        tables = [lines for command, lines in rest if command.startswith("kubectl get configmap micro-status")]
        assert tables, get
        for lines in tables:
            assert lines[0] == header and lines[-1].startswith("phase: ")
            assert all(len(row.split()) == len(header.split()) for row in lines[1:-1]), "a column more or less than the controller's"
            assert {row.split()[0] for row in lines[1:-1]} == set(observe.STAGE_ORDER)
        described = [command for command, _ in rest if command.startswith("kubectl describe")]
        assert described == [f"kubectl describe {train.split('.')[0]} micro-train", "kubectl describe job micro-controller"]
    assert kinds == {"pytorchjob", "trainjob"}, "a view of a run with each operator"
