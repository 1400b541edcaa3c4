"""The fusion package's import graph at one or more git revisions: modules, import edges (lazy
imports inside functions included) and import cycles, with the same reading of the code as
tests/test_topology.py, which fails on any cycle.

    python bench/import_graph.py [REV ...]      # default: d89d6e4 (before the redesign) and HEAD

Prints a table, then one JSON line {REV: {"modules", "edges", "cycles": [sizes]}}.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.test_topology import import_cycles, import_graph  # noqa: E402


def graph_at(rev: str) -> dict[str, set[str]]:
    """The import graph of fusion/ as it is at `rev` (extracted into a temporary folder)."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "fusion"], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        return import_graph(Path(tmp))


def main() -> None:
    revs = sys.argv[1:] or ["d89d6e4", "HEAD"]
    report = {}
    print(f"{'revision':<12} {'modules':>7} {'edges':>6}  cycles (modules in each)")
    for rev in revs:
        graph = graph_at(rev)
        cycles = sorted((len(c) for c in import_cycles(graph)), reverse=True)
        report[rev] = {"modules": len(graph), "edges": sum(len(v) for v in graph.values()), "cycles": cycles}
        print(f"{rev:<12} {len(graph):>7} {report[rev]['edges']:>6}  {cycles or 'none'}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
