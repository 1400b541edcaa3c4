"""What `fusion run` says as it goes: per stage, how many shards it computed and how many it
reused; after each stage, an estimate of the time left; at the end, which stages ran and which
did not, and where the fused model and the report are.

Stage times are kept in logs/local-timings.json (stage -> seconds of the run that computed
it). A stage that a later run only reuses keeps its measured time there.

The estimate of the time left comes, per stage still to run, from:
  1. the stage's time recorded in the store by an earlier run (scaled by the share of its shards
     still missing), else
  2. for train and eval, the logits stage's measured throughput: a forward pass costs about the
     same per token and weight byte in every model, and training about three of them per token
     and epoch (forward and backward), else
  3. nothing: the stage is named as not estimated (its progress bar gives its own estimate).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from fusion import shards
from fusion.pipeline import STAGES, attach
from fusion.run import Run

TIMINGS = "logs/local-timings.json"


@dataclass
class ShardCount:
    pending: int  # shards (of all the stage's parts) not committed yet
    total: int


def count_shards(run: Run, stage: str) -> ShardCount:
    """Shards of every part of `stage`, and how many lack a commit record (one listing per part
    that is not committed as a whole; records are checked when the stage reads them)."""
    pipeline = attach(run).pipeline
    pending = total = 0
    for part in pipeline.parts(stage):
        n = pipeline.shard_count(stage, part)
        total += n
        if not shards.is_part_committed(run.store, stage, part, run.hash(stage, part)):
            pending += n - len(shards.committed_indices(run.store, stage, part) & set(range(n)))
    return ShardCount(pending, total)


def is_complete(run: Run, stage: str) -> bool:
    return all(shards.is_part_committed(run.store, stage, p, run.hash(stage, p)) for p in attach(run).pipeline.parts(stage))


def duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


class Progress:
    """Follows one `fusion run`: call `start` once the run is planned, `stage_done` after each
    stage, and `end_lines` at the end."""

    def __init__(self, run: Run, stages: list[str], say: Callable[[str], None] | None = None):
        self.run, self.stages = run, stages
        self.say = say or (lambda line: print(line, flush=True))
        self.timings: dict[str, float] = dict(run.store.read_json(TIMINGS) or {})
        self.outcomes: dict[str, tuple[int, int, float]] = {}  # stage -> (computed, reused, seconds)

    def start(self) -> None:
        """Say the estimate of the whole run, if there is one (a store that ran before)."""
        eta = self.eta_line()
        if eta:
            self.say(eta)

    def stage_done(self, stage: str, count: ShardCount, seconds: float) -> None:
        computed, reused = count.pending, count.total - count.pending
        recorded = self.timings.get(stage)
        if computed:
            self.timings[stage] = round(seconds, 3)  # ms: a stage whose maps were cached takes a few
        self.outcomes[stage] = (computed, reused, seconds)
        self.run.store.write_json(TIMINGS, self.timings)
        if computed and reused:
            self.say(f"[fusion] {stage}: {plural(computed, 'shard')} computed, {reused} reused, in {duration(seconds)}")
        elif computed:
            self.say(f"[fusion] {stage}: {plural(computed, 'shard')} computed in {duration(seconds)}")
        else:
            before = f"; computed earlier in {duration(recorded)}" if recorded else ""
            self.say(f"[fusion] {stage}: {plural(reused, 'shard')} reused (committed earlier{before})")
        eta = self.eta_line() if computed else None  # reusing takes no time: the estimate stands
        if eta:
            self.say(eta)

    # ---- the estimate of the time left ----------------------------------------------------
    def eta_line(self) -> str | None:
        left = [s for s in self.stages if s not in self.outcomes]
        counts = {s: count_shards(self.run, s) for s in left}
        left = [s for s in left if counts[s].pending]
        if not left:
            return None
        estimates = {s: self.estimate(s, counts[s]) for s in left}
        known = {s: e for s, e in estimates.items() if e is not None}
        unknown = [s for s, e in estimates.items() if e is None]
        if not known:
            return None
        total = sum(known.values())
        parts = ", ".join(f"{s} ~{duration(e)}" for s, e in known.items())
        rest = f"; {', '.join(unknown)} not estimated yet" if unknown else ""
        until = time.strftime(" (until about %H:%M)", time.localtime(time.time() + total)) if total >= 60 else ""
        return f"[fusion] time left: {'more than' if unknown else 'about'} {duration(total)}{until}: {parts}{rest}"

    def estimate(self, stage: str, count: ShardCount) -> float | None:
        if stage in self.timings and count.total:
            return self.timings[stage] * count.pending / count.total
        logits_seconds = self.timings.get("logits")
        if stage not in ("train", "eval") or not logits_seconds:
            return None
        costs = self.forward_costs()
        if costs is None:
            return None
        per_model, train_blocks, heldout_blocks = costs
        target = self.run.target.name
        seconds_per_cost = logits_seconds / sum(per_model.values())
        if stage == "train":
            return 3 * self.run.spec.train.epochs * per_model[target] * seconds_per_cost
        scored = min(heldout_blocks, self.run.spec.eval.max_blocks or heldout_blocks)
        # every model, and the fused target, on the held-out blocks
        return scored / train_blocks * (sum(per_model.values()) + per_model[target]) * seconds_per_cost

    def forward_costs(self) -> tuple[dict[str, float], int, int] | None:
        """Per model: training tokens x weight bytes (from the logits records); and the number of
        training and held-out blocks."""
        store = self.run.store
        train_blocks = shards.part_status(store, "split", "train").rows
        heldout_blocks = shards.part_status(store, "split", "heldout").rows
        per_model = {}
        for m in self.run.spec.models.all():
            tokens = shards.part_status(store, "logits", m.name).rows
            weight_bytes = sum(size for _, size in self.run.model_identity(m.name)["weights"])
            per_model[m.name] = float(tokens) * weight_bytes
        if not train_blocks or not all(per_model.values()):
            return None
        return per_model, train_blocks, heldout_blocks

    # ---- the end of the run -----------------------------------------------------------------
    def end_lines(self, how_to_finish: str) -> list[str]:
        """Which stages ran (computed or reused) and which did not; if the run is complete,
        where the model and report are, and the report."""
        from fusion import report

        run = self.run
        missing = [s for s in STAGES if s not in self.outcomes and not is_complete(run, s)]
        computed = [s for s, (c, _, _) in self.outcomes.items() if c]
        reused = [s for s, (c, _, _) in self.outcomes.items() if not c]
        did = []
        if computed:
            did.append(f"computed {', '.join(computed)}")
        if reused:
            did.append(f"reused {', '.join(reused)}")
        lines = []
        if missing:
            lines.append(f"[fusion] run '{run.spec.name}' is not complete in {run.store.url}: {'; '.join(did) or 'nothing ran'}")
            lines.append(f"[fusion] not run: {', '.join(missing)}; {how_to_finish}")
            return lines
        lines.append(f"[fusion] run '{run.spec.name}' complete in {run.store.url} ({'; '.join(did) or 'all stages committed earlier'})")
        lines.append(f"[fusion] fused model: {run.store.uri(shards.files_path('train', 'model', 0))}")
        found = report.read_report(run.store)
        if found is not None:
            table = report.format_report(found, report.report_uris(run.store))
            lines += [f"[fusion] {line}" for line in table.splitlines() if line]
        return lines
