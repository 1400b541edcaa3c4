"""What `fusion run` says: stages computed and reused, measured times kept, the time left, what
did not run; and `fusion report STORE`. One micro run through the CLI, in three steps."""

import json
import re

import pytest
import yaml

from fusion.cli import main
from fusion.errors import BAD_INPUT_EXIT_CODE
from fusion.summary import TIMINGS

LATER = ["align", "fuse", "train", "eval"]


def cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def steps(micro, tmp_path_factory):
    """A micro run: first only split, vocab, logits; then the rest; then again (all reused).
    The steps run in `step`, with the asking test's capsys."""
    root = tmp_path_factory.mktemp("summary")
    store = root / "store"
    spec = root / "micro.yaml"
    spec.write_text(yaml.safe_dump(micro.spec(store)))
    return store, spec


def run_step(capsys, store, spec, *extra):
    code, out, err = cli(capsys, "run", spec, *extra)
    assert code == 0, err
    return out, json.loads((store / TIMINGS).read_text())


@pytest.fixture(scope="module")
def outputs(steps):
    """Step name -> (stdout, the timings file after it)."""
    return {}


def step(name, capsys, steps, outputs):
    """Each step runs once per module, in order, whichever test asks first."""
    store, spec = steps
    order = ["partial", "rest", "again"]
    for earlier in order[: order.index(name) + 1]:
        if earlier not in outputs:
            extra = ("--stages", "split,vocab,logits") if earlier == "partial" else ()
            outputs[earlier] = run_step(capsys, store, spec, *extra)
    return outputs[name]


def test_a_partial_run_says_what_ran_and_what_did_not(capsys, steps, outputs):
    out, timings = step("partial", capsys, steps, outputs)
    assert "'micro' complete" not in out and "is not complete" in out
    assert "computed split, vocab, logits" in out
    assert f"not run: {', '.join(LATER)}" in out and "without --stages" in out
    assert re.search(r"\[fusion\] logits: \d+ shards computed in [\d.]+ s", out), out
    assert set(timings) == {"split", "vocab", "logits"} and all(t > 0 for t in timings.values())


def test_finishing_the_run_reuses_the_first_stages_estimates_the_rest_and_names_the_report(capsys, steps, outputs):
    _, first = step("partial", capsys, steps, outputs)
    out, timings = step("rest", capsys, steps, outputs)
    store, _ = steps
    for stage in ("split", "vocab", "logits"):
        assert re.search(rf"\[fusion\] {stage}: \d+ shards? reused \(committed earlier; computed earlier in", out), out
    for stage in LATER:
        assert re.search(rf"\[fusion\] {stage}: \d+ shards? computed in", out), out
    # the estimate of train and eval from the logits stage's throughput, before either ran
    first_eta = next(line for line in out.splitlines() if line.startswith("[fusion] time left:"))
    assert "train ~" in first_eta and "eval ~" in first_eta and "align, fuse not estimated yet" in first_eta
    assert "done in 0.0 s" not in out
    assert f"run 'micro' complete in {store.as_uri()}" in out
    named = [line for line in out.splitlines() if "report." in line]
    assert [line.split()[1] for line in named] == ["report.json", "report.png"], named
    assert "eval/report/shard-00000.files/report.png" in out and "target (fused)" in out
    assert {k: timings[k] for k in first} == first  # the reused stages keep their measured times
    assert set(timings) == {"split", "vocab", "logits", *LATER}


def test_a_rerun_says_what_it_reused_and_keeps_the_timings(capsys, steps, outputs):
    _, before = step("rest", capsys, steps, outputs)
    out, after = step("again", capsys, steps, outputs)
    assert after == before and all(t > 0 for t in after.values())
    for stage, seconds in before.items():
        assert re.search(rf"\[fusion\] {stage}: \d+ shards? reused \(committed earlier; computed earlier in", out), out
    assert " computed in" not in out and "time left" not in out
    assert "complete in" in out and "(reused split, vocab, logits, align, fuse, train, eval)" in out


def test_report_shows_the_table_and_the_files(capsys, steps, outputs):
    step("rest", capsys, steps, outputs)
    store, _ = steps
    code, out, _ = cli(capsys, "report", store)
    assert code == 0
    stored = json.loads((store / "eval/report/shard-00000.files/report.json").read_text())
    for result in stored["results"]:
        assert re.search(rf"^{re.escape(result['model'])} +{result['bits_per_byte']:.4f}", out, re.M), out
    assert f"report.json  {store.as_uri()}/eval/report/shard-00000.files/report.json" in out
    assert f"report.png   {store.as_uri()}/eval/report/shard-00000.files/report.png" in out
    assert "fused vs before:" in out and "training:" in out
    code, out, _ = cli(capsys, "report", store, "--json")
    assert code == 0 and json.loads(out) == stored


def test_report_before_eval_and_outside_a_store_is_one_line(capsys, steps, outputs, tmp_path):
    step("rest", capsys, steps, outputs)
    code, _, err = cli(capsys, "report", tmp_path)
    assert code == BAD_INPUT_EXIT_CODE and "not a fusion run store" in err and err.count("\n") == 1
    store, _ = steps
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "run.json").write_bytes((store / "run.json").read_bytes())
    code, _, err = cli(capsys, "report", unfinished)
    assert code == BAD_INPUT_EXIT_CODE and "no report yet" in err and "fusion status" in err
