"""Downstream evaluation with lm-evaluation-harness (eval.lm_eval, fusion/harness.py): a local
multiple-choice task (the hubs are unreachable here) scored on every model of a micro run,
committed beside bits per byte, reported, and equal to the same items scored by hand."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from fusion import report
from fusion.cli import main
from fusion.config import parse_spec
from fusion.launch_local import run_all
from fusion.pipeline import open_run
from fusion.stages import train
from fusion.summary import count_shards

pytest.importorskip("lm_eval")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

TASK = "stdlib-mc"
# (context, choices, answer): the micro models learned Python's standard library
ITEMS = [
    ("import", ["os", "the", "("], 0),
    ("def __init__(self", ["):", " is", "."], 0),
    ("for i in", ["range(", "which", "["], 0),
    ("return", ["None", "when", "::"], 0),
    ("if x is", ["the", "None", "def"], 1),
    ("raise", ["of", "ValueError(", "and"], 1),
    ("class Foo(", ["the", "from", "object):"], 2),
    ("self.", ["the", "is", "_name"], 2),
]


def write_task(folder: Path) -> Path:
    """A task folder for include_path: the YAML and its items, a local JSON Lines file."""
    folder.mkdir()
    data = folder / "items.jsonl"
    data.write_text("".join(json.dumps({"context": c, "choices": ch, "answer": a}) + "\n" for c, ch, a in ITEMS))
    (folder / f"{TASK}.yaml").write_text(yaml.safe_dump({
        "task": TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
    }))
    return folder


@pytest.fixture(scope="module")
def scored(micro, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm-eval")
    tasks = write_task(tmp / "tasks")
    lm_eval = {"tasks": [TASK], "include_path": str(tasks), "batch_size": 4}
    spec = micro.spec(tmp / "store", **{"eval.lm_eval": lm_eval, "corpus.max_documents": 6, "eval.max_blocks": 8})
    run = open_run(parse_spec(spec))
    run_all(run)
    return run, tasks


def by_hand(folder: Path, tokenizer_folder: Path) -> tuple[float, float]:
    """acc and acc_norm of ITEMS as lm-eval defines them, computed here: the choice with the
    highest log-likelihood of " choice" after the context token and the context (acc_norm:
    divided by the choice's length in characters)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(tokenizer_folder)
    start = [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
    right = right_norm = 0
    for context, choices, answer in ITEMS:
        lls = []
        for choice in choices:
            head = start + tok(context, add_special_tokens=False)["input_ids"]
            whole = start + tok(f"{context} {choice}", add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
            lls.append(sum(logp[i - 1, whole[i]].item() for i in range(len(head), len(whole))))
        right += int(np.argmax(lls) == answer)
        right_norm += int(np.argmax(np.array(lls) / [len(c) for c in choices]) == answer)
    return right / len(ITEMS), right_norm / len(ITEMS)


def test_the_report_has_lm_eval_scores_of_every_model_beside_bits_per_byte(scored, capsys):
    run, _ = scored
    assert count_shards(run, "eval").pending == 0  # both parts committed: a rerun reuses them
    found = report.read_report(run.store)
    lm_eval = found["lm_eval"]
    labels = [r["model"] for r in found["results"]]
    assert labels == ["target (before)", "target (fused)", "src-llama", "src-neox"]
    assert [r["model"] for r in lm_eval["results"]] == labels
    for r in lm_eval["results"]:
        assert r["samples"] == {TASK: len(ITEMS)} and r["shots"] == {TASK: 0}
        assert set(r["tasks"][TASK]) == {"acc", "acc_norm"}
        assert r["tasks"][TASK]["acc"]["stderr"] > 0 or r["tasks"][TASK]["acc"]["value"] in (0.0, 1.0)

    assert main(["report", run.store.url]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("task "))
    assert lines[header].split()[:3] == ["task", "items", "metric"] and all(label in lines[header] for label in labels)
    acc_row = lines[header + 1].split()
    assert acc_row[:5] == [TASK, f"{len(ITEMS)}", "items,", "0-shot", "acc"]
    values = [float(acc_row[i]) for i in range(5, len(acc_row), 3)]
    assert values == pytest.approx([r["tasks"][TASK]["acc"]["value"] for r in lm_eval["results"]], abs=5e-5)
    assert any(line.startswith("lm_eval.json") for line in lines)


def test_the_scores_are_those_of_the_items_scored_by_hand(scored, micro, tmp_path):
    run, _ = scored
    fused = train.model_folder(run, tmp_path / "fused")
    folders = {"target (before)": micro.models["target"], "target (fused)": fused,
               "src-llama": micro.models["src-llama"], "src-neox": micro.models["src-neox"]}
    found = report.read_report(run.store)["lm_eval"]["results"]
    for r in found:
        acc, acc_norm = by_hand(folders[r["model"]], folders[r["model"]])
        assert r["tasks"][TASK]["acc"]["value"] == pytest.approx(acc, abs=1e-9), r["model"]
        assert r["tasks"][TASK]["acc_norm"]["value"] == pytest.approx(acc_norm, abs=1e-9), r["model"]


def test_the_command_scores_a_folder_as_the_stage_does(scored, micro, capsys):
    run, tasks = scored
    assert main(["lm-eval", str(micro.models["src-neox"]), "--tasks", TASK, "--include-path", str(tasks), "--json"]) == 0
    alone = json.loads(capsys.readouterr().out)["results"][0]
    in_run = next(r for r in report.read_report(run.store)["lm_eval"]["results"] if r["model"] == "src-neox")
    assert alone["tasks"] == in_run["tasks"]


def test_named_tasks_without_lm_eval_fail_validation_naming_the_package(micro, tmp_path, monkeypatch, capsys):
    spec = micro.write_spec(tmp_path / "spec.yaml", tmp_path / "store", **{"eval.lm_eval.tasks": ["arc_easy"]})
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` fails as if it were not installed
    assert main(["validate", str(spec)]) == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "eval.lm_eval.tasks: the lm-eval package is not installed" in err and 'pip install -c constraints.txt -e ".[eval]"' in err
    assert main(["validate", str(micro.write_spec(tmp_path / "plain.yaml", tmp_path / "store"))]) == 0  # no tasks: not needed


def test_an_unknown_task_fails_validation_naming_it(scored, micro, tmp_path, capsys):
    _, tasks = scored
    spec = micro.write_spec(tmp_path / "spec.yaml", tmp_path / "store",
                            **{"eval.lm_eval": {"tasks": [TASK, "no-such-task"], "include_path": str(tasks)}})
    assert main(["validate", str(spec)]) == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "eval.lm_eval.tasks: unknown task(s) no-such-task: not in lm-eval" in err  # the known one is not named
    assert main(["lm-eval", str(micro.models["src-neox"]), "--tasks", f"{TASK},no-such-task", "--include-path", str(tasks)]) == 3
    assert "--tasks: unknown task(s) no-such-task" in capsys.readouterr().err
