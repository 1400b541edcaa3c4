"""What an operator sees of a fusion run on Kubernetes, kept current by the controller.

- Events (core/v1): one for every stage transition (a workload created, a part committed,
  workers started again) on the workload it concerns, and for the run's own transitions
  (prepared, complete, failed) on the controller's Job, so `kubectl describe job ...` and
  `kubectl get events` tell the story. A failure is a Warning.
- A status ConfigMap (RELEASE-status, installed by the chart, rewritten every pass): per stage
  part its state, shards committed of total, how much is done and how much per second in the
  stage's unit (UNITS: tokens for logits, align, fuse and train), for train also the optimizer
  steps, plus the run's phase and its last error. `kubectl get configmap RELEASE-status -o
  jsonpath='{.data.summary}'` prints it as a table.
- Prometheus metrics on the controller (GET /metrics, the plain-text exposition format,
  version 0.0.4), scraped through the chart's Service or ServiceMonitor.

Nothing here may stop the run: an API call that fails is logged once and the run goes on.
The controller calls the hooks (owned, prepared, created, committed, restarted, failed,
complete) and `refresh` once per pass; everything else is read from the store: the shards'
commit records, and for train, which commits its one shard only at the end, the trainer's
progress record (fusion/training/metrics.py).
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from fusion import shards
from fusion.store import Store
from fusion.training import metrics as training_metrics

COMPONENT = "fusion-controller"
STAGE_ORDER = ("split", "vocab", "logits", "align", "fuse", "train", "eval")  # how the summary lists them
RATE_WINDOW_SECONDS = 60.0  # rows per second: over about the last minute
# What a row of each stage's commit records is; train counts the tokens trained on instead.
UNITS = {"split": "blocks", "vocab": "entries", "logits": "tokens", "align": "tokens", "fuse": "tokens", "train": "tokens", "eval": "files"}


def stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---- per part progress, from the store --------------------------------------------------------
@dataclass
class PartProgress:
    stage: str
    part: str
    total: int
    config_hash: str = ""  # this run's, from run.json: a progress record of other settings is not shown
    state: str = "waiting"  # waiting -> running -> committed
    workload: str = ""
    committed: int = 0
    rows: int = 0
    rows_per_second: float = 0.0
    rows_of: dict[int, int] = field(default_factory=dict)  # shard -> rows, records read once
    samples: list[tuple[float, int]] = field(default_factory=list)  # (time, rows) within the window
    settled: bool = False  # read once more after it was committed: nothing changes any more
    steps: int = 0  # train: optimizer steps done, of steps_total, when the trainer last wrote
    steps_total: int = 0
    updated: str = ""

    @property
    def unit(self) -> str:
        return UNITS.get(self.stage, "rows")

    def read(self, store: Store, now: float) -> None:
        """New shard records since the last pass (one listing, then only the new records)."""
        if self.settled:
            return
        self.settled = self.state == "committed"
        new = sorted(shards.committed_indices(store, self.stage, self.part) - set(self.rows_of))
        if new:
            blobs = store.get_objects([shards.record_path(self.stage, self.part, i) for i in new])
            for i in new:
                blob = blobs.get(shards.record_path(self.stage, self.part, i))
                try:
                    self.rows_of[i] = int(json.loads(blob).get("rows", 0)) if blob else 0
                except ValueError:
                    self.rows_of[i] = 0
        self.committed, self.rows = len(self.rows_of), sum(self.rows_of.values())
        if self.stage == "train":
            self.read_training(store)
            return
        self.samples = [s for s in self.samples if now - s[0] <= RATE_WINDOW_SECONDS] + [(now, self.rows)]
        first_time, first_rows = self.samples[0]
        self.rows_per_second = (self.rows - first_rows) / (now - first_time) if now > first_time and not self.settled else 0.0

    def read_training(self, store: Store) -> None:
        """Steps, tokens and tokens per second as the trainer last wrote them."""
        record = training_metrics.read_progress(store, self.config_hash) or {}
        self.steps, self.steps_total = int(record.get("step", 0)), int(record.get("steps", 0))
        self.rows = int(record.get("tokens", 0))
        self.rows_per_second = 0.0 if self.settled else float(record.get("tokens_per_second", 0.0))
        self.updated = record.get("updated_at", "")

    def as_dict(self) -> dict:
        out = {
            "stage": self.stage,
            "part": self.part,
            "state": self.state,
            "workload": self.workload,
            "shardsCommitted": self.committed,
            "shardsTotal": self.total,
            "rows": self.rows,
            "rowsPerSecond": round(self.rows_per_second, 1),
            "unit": self.unit,
        }
        if self.stage == "train":
            out.update(steps=self.steps, stepsTotal=self.steps_total, updatedAt=self.updated)
        return out


def summary(phase: str, parts: list[PartProgress], last_error: str) -> str:
    """The status as `kubectl get`-style columns: DONE and RATE/S count UNITs."""
    lines = [f"{'STAGE':<7} {'PART':<16} {'STATE':<10} {'SHARDS':>7} {'STEPS':>11} {'DONE':>12} {'RATE/S':>9}  {'UNIT':<7}  WORKLOAD"]
    for p in parts:
        steps = f"{p.steps}/{p.steps_total}" if p.steps_total else "-"
        lines.append(
            f"{p.stage:<7} {p.part:<16} {p.state:<10} {f'{p.committed}/{p.total}':>7} {steps:>11} {p.rows:>12,} "
            f"{p.rows_per_second:>9,.0f}  {p.unit:<7}  {p.workload or '-'}"
        )
    lines.append(f"phase: {phase}" + (f"; last error: {last_error}" if last_error else ""))
    return "\n".join(lines) + "\n"


# ---- metrics --------------------------------------------------------------------------------------
def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def exposition(run: str, phase: str, parts: list[PartProgress], counters: dict[str, dict[tuple, float]]) -> str:
    """The Prometheus text exposition format (version 0.0.4)."""
    out = []

    def family(name: str, kind: str, help_text: str, samples: list[tuple[dict, float]]) -> None:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            text = ",".join(f'{k}="{_label_value(str(v))}"' for k, v in {"run": run, **labels}.items())
            out.append(f"{name}{{{text}}} {value:g}" if isinstance(value, float) else f"{name}{{{text}}} {value}")

    def per_part(value) -> list[tuple[dict, float]]:
        return [({"stage": p.stage, "part": p.part}, value(p)) for p in parts]

    family("fusion_part_shards_committed", "gauge", "Shards of a stage part that have a commit record.", per_part(lambda p: p.committed))
    family("fusion_part_shards_total", "gauge", "Shards a stage part has, as planned.", per_part(lambda p: p.total))
    family(
        "fusion_part_rows", "gauge",
        "What a stage part has done, in its unit: blocks (split), vocabulary entries (vocab), tokens (logits, align, fuse, train), files (eval).",
        per_part(lambda p: p.rows),
    )
    family("fusion_part_rows_per_second", "gauge", "fusion_part_rows per second over about the last minute (train: as the trainer last reported).", per_part(lambda p: float(round(p.rows_per_second, 3))))
    family("fusion_part_committed", "gauge", "1 once the stage part is committed.", per_part(lambda p: int(p.state == "committed")))
    training = [p for p in parts if p.stage == "train"]

    def per_training(value) -> list[tuple[dict, float]]:
        return [({"part": p.part}, value(p)) for p in training]

    family("fusion_train_steps", "gauge", "Optimizer steps done, as the trainer last reported.", per_training(lambda p: p.steps))
    family("fusion_train_steps_total", "gauge", "Optimizer steps the training has in all.", per_training(lambda p: p.steps_total))
    family("fusion_train_tokens", "gauge", "Tokens trained on so far.", per_training(lambda p: p.rows))
    family("fusion_train_tokens_per_second", "gauge", "Tokens trained on per second, as the trainer last reported; 0 once committed.", per_training(lambda p: float(round(p.rows_per_second, 3))))
    phases = ("Pending", "Running", "Complete", "Failed")
    family("fusion_run_phase", "gauge", "1 for the run's current phase.", [({"phase": ph}, int(ph == phase)) for ph in phases])
    for name, (help_text, samples) in sorted(counters.items()):
        family(name, "counter", help_text, [(dict(labels), value) for labels, value in sorted(samples.items())])
    return "\n".join(out) + "\n"


class MetricsServer:
    """GET /metrics on a port of the controller's pod, in a daemon thread."""

    def __init__(self, port: int, render, host: str = "0.0.0.0"):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404)
                    return
                body = render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # scrapes are not news
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="metrics", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---- the observer ----------------------------------------------------------------------------------
class Observer:
    """Events, the status ConfigMap and the metrics of one run. `core` is a kubernetes
    CoreV1Api (None: no API, e.g. in a test of the metrics alone)."""

    def __init__(self, core, namespace: str, run_name: str, status_name: str, log, pod_name: str = ""):
        self.core = core
        self.namespace = namespace
        self.run_name = run_name
        self.status_name = status_name
        self.log = log
        self.pod_name = pod_name
        self.phase = "Pending"
        self.last_error = ""
        self.parts: dict[str, PartProgress] = {}
        self.controller: dict | None = None  # the controller's Job (run-level events go there)
        self.objects: dict[str, dict] = {}  # workloads created, by name (their Events need the uid)
        self.lock = threading.Lock()
        self.counters: dict[str, tuple[str, dict[tuple, float]]] = {
            "fusion_workloads_created_total": ("Stage workloads the controller created.", {}),
            "fusion_parts_committed_total": ("Stage parts the controller committed.", {}),
            "fusion_workers_restarted_total": ("Times a work queue's workers were started again.", {}),
            "fusion_failures_total": ("Failures that ended the run.", {}),
            "fusion_events_failed_total": ("Events the API did not accept.", {}),
        }
        self.quiet: set[str] = set()  # API errors already logged

    # -- the hooks the controller calls ------------------------------------------------------------
    def owned(self, controller_job: dict) -> None:
        """The controller's Job, known from the first pass on: run-level Events go there, a
        failure before prepare completes included."""
        self.controller = controller_job

    def prepared(self, outputs: dict[str, dict], message: str) -> None:
        for key, out in outputs.items():
            stage, part = key.split("/", 1)
            self.parts.setdefault(key, PartProgress(stage, part, int(out["shards"]), out.get("config_hash", "")))
        self.phase = "Running"
        self.event(self.controller, "Prepared", message)

    def created(self, obj: dict, outputs: list[tuple[str, str]], message: str) -> None:
        self.objects[obj["metadata"]["name"]] = obj
        for stage, part in outputs:
            p = self.parts.get(f"{stage}/{part}")
            if p is not None:
                p.state, p.workload = "running", f"{obj['kind']}/{obj['metadata']['name']}"
        self._count("fusion_workloads_created_total", stage=outputs[0][0] if outputs else "prepare", kind=obj["kind"])
        self.event(obj, "Created", message)

    def committed(self, obj: dict | None, stage: str, part: str, message: str) -> None:
        """A part committed, by the controller or (found in refresh) by the stage's own pods."""
        p = self.parts.get(f"{stage}/{part}")
        if p is not None:
            if p.state == "committed":
                return
            p.state = "committed"
        self._count("fusion_parts_committed_total", stage=stage)
        self.event(self._known(obj), "Committed", message)

    def restarted(self, obj: dict, message: str) -> None:
        self._count("fusion_workers_restarted_total", workload=obj["metadata"]["name"])
        self.event(self._known(obj), "WorkersRestarted", message, warning=True)

    def failed(self, obj: dict | None, message: str, reason: str = "Failed") -> None:
        self.phase, self.last_error = "Failed", message
        self._count("fusion_failures_total", reason=reason)
        if obj is not None and obj is not self.controller:
            self.event(obj, reason, message, warning=True)
        self.event(self.controller, "RunFailed", message, warning=True)
        self.write_status()

    def error(self, message: str) -> None:
        """A passing trouble (the API or the store unreachable for a moment): kept as the last error."""
        self.last_error = message
        self.write_status()

    def complete(self, message: str) -> None:
        self.phase = "Complete"
        for p in self.parts.values():
            p.state, p.committed = "committed", p.total
        self.event(self.controller, "RunComplete", message)
        self.write_status()

    def refresh(self, store: Store, committed: set[str]) -> None:
        """Once per pass: progress from the store, then the status ConfigMap."""
        now = time.monotonic()
        for key, p in self.parts.items():
            try:
                p.read(store, now)
            except OSError as e:
                self.log(f"status: cannot read {key}: {e}")
            if key in committed and p.state != "committed":
                name = p.workload.split("/", 1)[-1]
                self.committed(self.objects.get(name), p.stage, p.part, f"committed {key} ({p.total} shard(s))")
        self.write_status()

    # -- the objects -------------------------------------------------------------------------------
    def ordered_parts(self) -> list[PartProgress]:
        def rank(p: PartProgress) -> tuple:
            return (STAGE_ORDER.index(p.stage) if p.stage in STAGE_ORDER else len(STAGE_ORDER), p.part)

        return sorted(self.parts.values(), key=rank)

    def status_data(self) -> dict[str, str]:
        parts = self.ordered_parts()
        return {
            "phase": self.phase,
            "updated": stamp(),
            "lastError": self.last_error,
            "summary": summary(self.phase, parts, self.last_error),
            "status.json": json.dumps({"run": self.run_name, "phase": self.phase, "lastError": self.last_error, "parts": [p.as_dict() for p in parts]}, indent=1),
        }

    def write_status(self) -> None:
        if self.core is None:
            return
        body = {"data": self.status_data()}
        self._api("status", lambda: self.core.patch_namespaced_config_map(self.status_name, self.namespace, body))

    def event(self, obj: dict | None, reason: str, message: str, warning: bool = False) -> None:
        """A core/v1 Event about obj (a workload, or the controller's Job)."""
        if obj is None or self.core is None:
            return
        meta = obj["metadata"]
        now = stamp()
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}", "namespace": self.namespace},
            "involvedObject": {
                "apiVersion": obj.get("apiVersion", "batch/v1"),
                "kind": obj.get("kind", "Job"),
                "name": meta["name"],
                "namespace": self.namespace,
                "uid": meta.get("uid", ""),
            },
            "reason": reason,
            "message": message[:1024],
            "type": "Warning" if warning else "Normal",
            "source": {"component": COMPONENT},
            "reportingComponent": f"fusion.dev/{COMPONENT}",
            "reportingInstance": self.pod_name or COMPONENT,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        if not self._api("events", lambda: self.core.create_namespaced_event(self.namespace, body)):
            self._count("fusion_events_failed_total")

    def metrics(self) -> str:
        with self.lock:
            counters = {name: (help_text, dict(samples)) for name, (help_text, samples) in self.counters.items()}
        return exposition(self.run_name, self.phase, self.ordered_parts(), counters)

    # -- helpers -------------------------------------------------------------------------------------
    def _known(self, obj: dict | None) -> dict | None:
        """The created object (with its uid) for a manifest of the same name; else the manifest,
        else the controller's Job."""
        if obj is None:
            return self.controller
        return self.objects.get(obj["metadata"]["name"], obj)

    def _count(self, name: str, **labels) -> None:
        with self.lock:
            samples = self.counters[name][1]
            key = tuple(sorted(labels.items()))
            samples[key] = samples.get(key, 0) + 1

    def _api(self, what: str, call) -> bool:
        try:
            call()
            return True
        except Exception as e:  # the API refused or is away: the run goes on, said once per kind of failure
            status = getattr(e, "status", None)
            key = f"{what}:{status or type(e).__name__}"
            if key not in self.quiet:
                self.quiet.add(key)
                reason = f"{status} {getattr(e, 'reason', '')}".strip() if status else f"{type(e).__name__}: {e}"
                self.log(f"cannot write {what} ({reason}); the run goes on without")
            return False


def core_api(kube) -> object:
    """A CoreV1Api on the controller's API connection (fusion.k8s.controller.Kube)."""
    from kubernetes import client

    return client.CoreV1Api(kube.api.api_client)


def status_name(job_name: str) -> str:
    """RELEASE-status for the controller Job RELEASE-controller (the chart's names)."""
    return re.sub(r"-controller$", "", job_name) + "-status"
