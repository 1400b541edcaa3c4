"""helm/fusion rendered by the real Helm engine (helm-python-sdk: Helm's Go SDK through a C
library), the way `helm template RELEASE helm/fusion -f A.yaml -f B.yaml` renders it, and the
rendered objects checked against real schemas.
"""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "fusion"
JOBS = sorted((REPO / "jobs").glob("*.yaml"))
SCHEMAS = REPO.parent / "shared" / "k8s-schemas"
PYTORCHJOB_CRD = SCHEMAS / "kubeflow.org_pytorchjobs.yaml"
# Kubeflow Trainer v2.3: kind -> its CRD; and the torch runtime that release ships
TRAINER_CRDS = {
    "TrainJob": SCHEMAS / "trainer.kubeflow.org_trainjobs.yaml",
    "ClusterTrainingRuntime": SCHEMAS / "trainer.kubeflow.org_clustertrainingruntimes.yaml",
    "TrainingRuntime": SCHEMAS / "trainer.kubeflow.org_trainingruntimes.yaml",
}
TORCH_DISTRIBUTED = SCHEMAS / "runtime-torch-distributed.yaml"
KUBE_VERSIONS = ["1.29", "1.30", "1.31", "1.32", "1.33", "1.34"]

# Values every install needs besides a run spec: image digests (images/README.md).
IMAGES = {
    "cluster": {
        "image": {
            "cpu": {"digest": "sha256:" + "c" * 64},
            "gpu": {"digest": "sha256:" + "9" * 64},
        }
    }
}
S3 = {"cluster": {"s3": {"secretName": "fusion-s3"}}, "store_options": {"endpoint_url": "http://minio.minio.svc:9000"}}
STORE_VOLUME = {"cluster": {"storeVolume": {"claimName": "fusion-runs"}}}


def values_file(path: Path) -> dict:
    """A values file read as `helm -f` reads it."""
    return helm.values_from_yaml(Path(path).read_text(encoding="utf-8"))


def merge_values(*layers: dict) -> dict:
    """Helm's -f/--set layering: later layers win, maps merge, everything else is replaced."""
    out: dict = {}
    for layer in layers:
        _merge(out, copy.deepcopy(layer))
    return out


def _merge(base: dict, top: dict) -> None:
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


@dataclass
class Rendered:
    templates: dict[str, str]

    @functools.cached_property
    def objects(self) -> list[dict]:
        """What `helm install` creates (hooks included), in template order."""
        out = []
        for name, text in sorted(self.templates.items()):
            if name.endswith(".txt"):
                continue
            out.extend(doc for doc in yaml.safe_load_all(text) if doc)
        return out

    def get(self, kind: str, name: str) -> dict:
        for obj in self.objects:
            if obj["kind"] == kind and obj["metadata"]["name"] == name:
                return obj
        raise KeyError(f"no {kind} {name} in {[(o['kind'], o['metadata']['name']) for o in self.objects]}")

    @functools.cached_property
    def configmap(self) -> dict:
        return next(o for o in self.objects if o["kind"] == "ConfigMap")

    @functools.cached_property
    def workloads(self) -> list[dict]:
        """The stage workloads the controller creates (workloads.yaml in the run's ConfigMap)."""
        return [doc for doc in yaml.safe_load_all(self.configmap["data"]["workloads.yaml"]) if doc]

    def workload(self, name: str) -> dict:
        for w in self.workloads:
            if w["metadata"]["name"] == name:
                return w
        raise KeyError(f"no workload {name} in {[w['metadata']['name'] for w in self.workloads]}")

    @functools.cached_property
    def run_spec(self) -> dict:
        return yaml.safe_load(self.configmap["data"]["run.yaml"])

    @property
    def notes(self) -> str:
        return next(text for name, text in self.templates.items() if name.endswith("NOTES.txt"))

    def all_objects(self) -> list[dict]:
        return self.objects + self.workloads


def render(*layers: dict, release: str = "tiny", namespace: str = "fusion") -> Rendered:
    with helm.Chart.load(str(CHART)) as chart:
        templates = chart.render(values=merge_values(*layers), name=release, namespace=namespace, is_install=True)
    return Rendered({name: text for name, text in templates.items() if text.strip()})


def render_error(*layers: dict, release: str = "tiny") -> str:
    """The message `helm install` would fail with (values schema or a template's `fail`)."""
    try:
        render(*layers, release=release)
    except helm.HelmError as e:
        return str(e)
    raise AssertionError("the chart rendered, but it should have refused these values")


def lint(*layers: dict, kube_version: str | None = None) -> list[dict]:
    """`helm lint --strict` findings: warnings and errors (info-level notes are left out)."""
    report = helm.lint(str(CHART), values=merge_values(*layers), strict=True, kube_version=kube_version)
    return [m for m in report["messages"] if m["severity"] >= 2] + [{"error": e} for e in report["errors"]]


# ---- schemas ------------------------------------------------------------------------------------
def validate_kubernetes(obj: dict, version: str) -> None:
    """Strict validation (unknown fields are errors) against Kubernetes `version`'s OpenAPI."""
    kubernetes_validate.validate(obj, version, strict=True)


@functools.cache
def crd_schema(path: Path) -> dict:
    """A CRD's structural schema (its first version's openAPIV3Schema), unknown fields closed."""
    crd = yaml.safe_load(Path(path).read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return _closed(schema)


def pytorchjob_schema() -> dict:
    return crd_schema(PYTORCHJOB_CRD)


def _closed(node):
    """The CRD's structural schema with unknown fields made errors: the API server would prune
    them silently, so a misspelled field would vanish instead of failing."""
    if isinstance(node, list):
        return [_closed(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: _closed(schema) for name, schema in value.items()}
        else:
            out[key] = _closed(value)
    if "properties" in node and "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def validate_pytorchjob(obj: dict) -> None:
    jsonschema.Draft7Validator(pytorchjob_schema()).validate(obj)


def validate_trainer(obj: dict) -> None:
    """A TrainJob or (Cluster)TrainingRuntime against Kubeflow Trainer v2.3's CRD (the
    structural schema; the CEL rules in x-kubernetes-validations are not evaluated)."""
    jsonschema.Draft7Validator(crd_schema(TRAINER_CRDS[obj["kind"]])).validate(obj)


def pod_templates(obj: dict) -> list[dict]:
    """The pod templates of a Job, a PyTorchJob or a training runtime (a TrainJob has none of
    its own: its pods are its runtime's, see tests/k8s_sim.trainjob_pod)."""
    if obj["kind"] == "PyTorchJob":
        return [r["template"] for r in obj["spec"]["pytorchReplicaSpecs"].values()]
    if obj["kind"] == "Job":
        return [obj["spec"]["template"]]
    if obj["kind"] in ("ClusterTrainingRuntime", "TrainingRuntime"):
        return [r["template"]["spec"]["template"] for r in obj["spec"]["template"]["spec"]["replicatedJobs"]]
    if obj["kind"] == "Pod":
        return [{"metadata": obj["metadata"], "spec": obj["spec"]}]
    return []


def as_pod_template(template: dict, name: str) -> dict:
    """A pod template as a v1 PodTemplate object, for kubernetes-validate."""
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}


def to_json(obj) -> str:
    return json.dumps(obj, indent=1, sort_keys=True)


# ---- the restricted Pod Security Standard --------------------------------------------------------
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}


def restricted_violations(pod: dict) -> list[str]:
    """What breaks the restricted profile of the Pod Security Standards
    (kubernetes.io/docs/concepts/security/pod-security-standards), plus a read-only root
    filesystem, which this project asks of every container."""
    out = []
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(flag):
            out.append(flag)
    for volume in pod.get("volumes", []):
        if set(volume) - {"name"} - RESTRICTED_VOLUMES:
            out.append(f"volume {volume['name']}: {sorted(set(volume) - {'name'})}")
    pod_sc = pod.get("securityContext") or {}
    if (pod_sc.get("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
        out.append("pod seccompProfile")
    if pod_sc.get("runAsUser") == 0:
        out.append("pod runAsUser 0")
    for c in pod["containers"] + pod.get("initContainers", []):
        sc = c.get("securityContext") or {}
        name = c["name"]
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation")
        if (sc.get("capabilities") or {}).get("drop") != ["ALL"] or set((sc.get("capabilities") or {}).get("add") or []) - {"NET_BIND_SERVICE"}:
            out.append(f"{name}: capabilities")
        if not (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")) or sc.get("runAsUser") == 0:
            out.append(f"{name}: runAsNonRoot")
        if sc.get("privileged") or any("hostPort" in p for p in c.get("ports", [])):
            out.append(f"{name}: privileged or hostPort")
        if sc.get("readOnlyRootFilesystem") is not True:
            out.append(f"{name}: readOnlyRootFilesystem")
    return out
