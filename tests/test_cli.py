"""The command line itself: --version, a closed pipe, shard ranges, and the README's commands
block against the parser (so the two cannot drift apart)."""

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fusion import __version__
from fusion.cli import build_parser, main
from fusion.errors import BAD_INPUT_EXIT_CODE

REPO = Path(__file__).resolve().parents[1]


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"fusion {__version__}"


def prepared_store(micro, tmp_path):
    spec = tmp_path / "micro.yaml"
    spec.write_text(yaml.safe_dump(micro.spec(tmp_path / "store")))
    assert main(["prepare", str(spec)]) == 0
    return spec, tmp_path / "store"


@pytest.mark.parametrize("command", [["schema"], ["status", "{store}", "--json"]])
def test_a_reader_that_leaves_early_ends_the_command_quietly(micro, tmp_path, command):
    """`fusion status STORE | head`: the pipe closes before the output is written."""
    _, store = prepared_store(micro, tmp_path)
    args = [a.format(store=store) for a in command]
    proc = subprocess.Popen([sys.executable, "-m", "fusion", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the interpreter has even started: every write meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait() == 128 + 13  # as a program killed by SIGPIPE
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err, err


@pytest.mark.parametrize("shard", ["99", "15", "-1"])
def test_a_shard_out_of_range_says_so(micro, tmp_path, capsys, shard):
    spec, _ = prepared_store(micro, tmp_path)
    capsys.readouterr()
    assert main(["stage", "fuse", str(spec), "--shard", shard]) == BAD_INPUT_EXIT_CODE
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(rf"fusion: error: --shard {shard}: out of range; stage fuse part train has 15 shard\(s\) \(0\.\.14\)", err), err


def test_a_job_completion_index_out_of_range_names_the_variable(micro, tmp_path, capsys, monkeypatch):
    spec, _ = prepared_store(micro, tmp_path)
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "40")
    assert main(["stage", "align", str(spec), "--part", "src-neox"]) == BAD_INPUT_EXIT_CODE
    assert "$JOB_COMPLETION_INDEX 40: out of range; stage align part src-neox" in capsys.readouterr().err


# ---- the README's commands block --------------------------------------------------------------------
def usage(parser: argparse.ArgumentParser) -> str:
    """One command's arguments the way the README writes them: positionals by metavar (`X...` for
    one or more), `--opt VALUE` (bracketed unless required, `...` if repeatable), choices as a|b."""
    words = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if isinstance(action, argparse._VersionAction):
            words.append("--version")
            continue
        value = "|".join(action.choices) if action.choices else (action.metavar or action.dest.upper())
        if not action.option_strings:
            words.append(value + ("..." if action.nargs == "+" else ""))
            continue
        flag = max(action.option_strings, key=len)
        word = flag if action.nargs == 0 else f"{flag} {value}"
        repeatable = isinstance(action, argparse._AppendAction)
        words.append((word if action.required else f"[{word}]") + ("..." if repeatable else ""))
    return " ".join(words)


def command_lines(parser: argparse.ArgumentParser, prefix: str = "fusion") -> list[str]:
    """`fusion COMMAND ARGS` for every command and subcommand the parser has."""
    lines = []
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    own = usage(parser)
    if own or not subparsers:
        lines.append(f"{prefix} {own}".rstrip())
    for group in subparsers:
        for name, sub in group.choices.items():
            lines += command_lines(sub, f"{prefix} {name}")
    return lines


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Commands\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```\w*\n(.*?)```", section, re.S).group(1)  # the first block: the commands
    return [re.split(r"\s{2,}", line.strip(), maxsplit=1)[0] for line in block.splitlines() if line.startswith("fusion")]


def test_the_readme_lists_every_command_and_option_of_the_cli():
    expected = command_lines(build_parser())
    assert "fusion run SPEC [--store URL] [--set KEY=VALUE]... [--stages STAGE,...] [--redo STAGE]" in expected
    assert readme_commands() == expected, "README.md ## Commands block should read:\n" + "\n".join(expected)

