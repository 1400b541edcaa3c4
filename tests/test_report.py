"""report.png's layout (legends clear of the data, the loss smoothed) and the terminal report,
on a report and training log made up here."""

import numpy as np
import pytest

from fusion.report import format_report
from fusion.stages.evaluate import figure, smooth

pytest.importorskip("matplotlib")


def made_up(domains=("code", "prose"), steps=200):
    rng = np.random.default_rng(0)
    names = ["target (before)", "target (fused)", "src-a", "src-b"]
    results = [
        {"model": n, "path": n, "bits_per_byte": 2.0 + i / 10, "domains": {d: 2.0 + i / 10 + j / 5 for j, d in enumerate(domains)}}
        for i, n in enumerate(names)
    ]
    log = [
        {"step": s + 1, "loss": 3 - s / steps + rng.normal(0, 0.3), "clm": 3.2 - s / steps + rng.normal(0, 0.3),
         "fusion": 1 + rng.normal(0, 0.1)}
        for s in range(steps)
    ]
    report = {
        "run": "made-up", "heldout": {"blocks": 12, "bytes": 3456},
        "method": {"align": "default", "fuse": {"function": "mince", "level": "sequence", "metric": "nll_per_byte"}, "lambda": 0.9},
        "results": results, "training": {"steps": steps, "first": log[0], "last": log[-1]},
        "coverage": {"src-a": 0.95, "src-b": None},
    }
    return report, log


def overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


@pytest.mark.parametrize("domains", [("code", "prose"), ("prose",), ()])
def test_legends_cover_no_bar_and_no_plot(domains):
    report, log = made_up(domains)
    fig = figure(report, log)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    bars_ax, loss_ax = fig.axes
    bars = [p.get_window_extent(renderer) for p in bars_ax.patches]
    assert len(bars) == 4 * (len(domains) + 1 if len(domains) > 1 else 1)
    for ax in fig.axes:
        legend = ax.get_legend().get_window_extent(renderer)
        assert not any(overlaps(legend, bar) for bar in bars)
        assert not overlaps(legend, bars_ax.get_window_extent(renderer))
        assert not overlaps(legend, loss_ax.get_window_extent(renderer))
    labels = [t.get_text() for t in bars_ax.get_legend().get_texts()]
    assert labels == [r["model"] for r in report["results"]]


def test_the_loss_is_drawn_raw_and_faint_and_smoothed():
    report, log = made_up()
    loss_ax = figure(report, log).axes[1]
    lines = loss_ax.get_lines()
    faint = [line for line in lines if (line.get_alpha() or 1) < 0.5]
    solid = [line for line in lines if (line.get_alpha() or 1) == 1]
    assert len(faint) == len(solid) == 3
    raw = np.asarray(faint[0].get_ydata())
    smoothed = np.asarray(solid[0].get_ydata())
    assert len(smoothed) == len(raw) and np.std(np.diff(smoothed)) < np.std(np.diff(raw)) / 3
    assert [t.get_text() for t in loss_ax.get_legend().get_texts()] == [f"{k} (mean of 10 steps)" for k in ("loss", "clm", "fusion")]


def test_smooth_is_a_trailing_mean():
    assert smooth([1, 3, 5, 7], 2).tolist() == [1, 2, 4, 6]
    assert smooth([4.0], 5).tolist() == [4.0]


def test_the_terminal_report_is_a_table_with_the_files():
    report, _ = made_up()
    text = format_report(report, {"report.json": "file:///r/report.json", "report.png": "file:///r/report.png"})
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("model"))
    assert header.split() == ["model", "bits/byte", "code", "prose"]
    assert any(line.split()[-3:] == ["2.1000", "2.1000", "2.3000"] and line.startswith("target (fused)") for line in lines)
    assert "fused vs before: +0.1000 bits/byte (+5.0%)" in text
    assert "src-a 95.0%, src-b —" in text
    assert lines[-2:] == ["report.json  file:///r/report.json", "report.png   file:///r/report.png"]


def test_lm_eval_scores_are_a_second_table_task_and_metric_by_model():
    from fusion.harness import scores

    report, _ = made_up()
    out = {  # simple_evaluate's result, cut down: a group with a filtered metric, a task, "N/A" where lm-eval has no stderr
        "results": {
            "bbh": {"alias": "bbh", "exact_match,get-answer": 0.25, "exact_match_stderr,get-answer": "N/A"},
            "arc_easy": {"alias": "arc_easy", "sample_len": 100, "acc,none": 0.5, "acc_stderr,none": 0.05},
        },
        "n-samples": {"arc_easy": {"original": 2376, "effective": 100}},
        "n-shot": {"arc_easy": 0},
    }
    parsed = scores(out)
    assert parsed["tasks"] == {
        "bbh": {"exact_match,get-answer": {"value": 0.25, "stderr": None}},
        "arc_easy": {"acc": {"value": 0.5, "stderr": 0.05}},
    }
    report["lm_eval"] = {
        "lm_eval": "0.4.13", "settings": {"limit": 100},
        "results": [{"model": "target (before)", **parsed}, {"model": "target (fused)", **parsed, "tasks": {"arc_easy": parsed["tasks"]["arc_easy"]}}],
    }
    lines = format_report(report, {"report.json": "file:///r/report.json"}).splitlines()
    title = lines.index("lm-evaluation-harness 0.4.13, at most 100 items per task (value ± standard error):")
    assert lines[title + 1].split() == ["task", "items", "metric", "target", "(before)", "target", "(fused)"]
    assert lines[title + 2].split() == ["bbh", "exact_match,get-answer", "0.2500", "—"]
    assert lines[title + 3].split() == ["arc_easy", "100", "items,", "0-shot", "acc", "0.5000", "±", "0.0500", "0.5000", "±", "0.0500"]
