"""Reference mode and the reference soft vocabulary map against the original code's outputs
(../shared/reference/alignment-fixture)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from fusion.align import align_fixture, vocab_map
from fusion.align.fixture import sentencepiece_view
from fusion.align.tokens import token_view


@pytest.fixture(scope="module")
def fixture_dir(shared):
    return shared / "reference" / "alignment-fixture"


@pytest.fixture(scope="module")
def views(fixture_dir):
    from tokenizers import Tokenizer

    blend = token_view(Tokenizer.from_file(str(fixture_dir / "tokenizers" / "blend_gpt2_bytelevel.tokenizer.json")))
    base = sentencepiece_view(fixture_dir / "tokenizers" / "base_llama_spm.model")
    return blend, base


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_reference_mode_passes_the_fixture_checker(fixture_dir, tmp_path, mode):
    out = tmp_path / f"{mode}.npz"
    result = align_fixture(fixture_dir, mode, out)
    assert result["target_tokens"] == 20 * 2048 and result["seconds"] > 0
    check = subprocess.run([sys.executable, str(fixture_dir / "check_alignment_fixture.py"), "--fixture",
                            str(fixture_dir), "--mode", mode, "--candidate", str(out)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout[-2000:]
    assert check.stdout.strip().splitlines()[-1] == "20 passed, 0 failed"


def test_fusion_align_fixture_checks_with_the_fixtures_checker(fixture_dir, tmp_path, capsys):
    from fusion.cli import main

    assert main(["align-fixture", "--fixture", str(fixture_dir), "--mode", "hard"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["check"] == "20 passed, 0 failed" and result["out"] is None


def test_a_candidate_that_differs_fails_the_check(fixture_dir, tmp_path):
    """The fixture's checker, run by check_candidate, on a fixture whose expected output was altered."""
    from fusion.align.fixture import check_candidate
    from fusion.errors import FusionError

    altered = tmp_path / "fixture"
    altered.mkdir()
    for f in fixture_dir.iterdir():
        (altered / f.name).symlink_to(f)
    (altered / "expected_hard.npz").unlink()
    expected = dict(np.load(fixture_dir / "expected_hard.npz"))
    expected["val_03"] = expected["val_03"].copy()
    expected["val_03"][5] += 1.0
    np.savez(altered / "expected_hard.npz", **expected)
    check = check_candidate(altered, "hard", fixture_dir / "expected_hard.npz")
    assert (check["passed"], check["failed"]) == (19, 1)
    assert check["failures"] and check["failures"][0].startswith("seq 03: FAIL")
    assert check_candidate(fixture_dir, "hard", fixture_dir / "expected_hard.npz")["failed"] == 0
    (altered / "check_alignment_fixture.py").unlink()
    with pytest.raises(FusionError, match="no check_alignment_fixture.py"):
        check_candidate(altered, "hard", fixture_dir / "expected_hard.npz")


def test_fixture_command_line(fixture_dir, tmp_path):
    out = tmp_path / "hard.npz"
    run = subprocess.run([sys.executable, "-m", "fusion.align.fixture", "--fixture", str(fixture_dir), "--mode", "hard",
                          "--out", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["target_tokens"] == 20 * 2048 and out.exists()


def test_fixture_views_read_the_tokenizer_files(fixture_dir, views):
    blend, base = views
    assert base.strings == json.loads((fixture_dir / "base_vocab.json").read_text())
    assert blend.strings == json.loads((fixture_dir / "blend_vocab.json").read_text())
    assert (base.marker, blend.marker) == ("▁", "Ġ")
    assert base.eos_id == 2 and base.special[:3].all() and base.byte_piece.sum() == 256


def test_soft_map_is_the_original_find_best_mapping(fixture_dir, views, tmp_path, monkeypatch):
    monkeypatch.setenv("FUSION_CACHE_DIR", str(tmp_path))
    blend, base = views
    expected = json.loads((fixture_dir / "vocab_mapping_default.json").read_text())
    mapping = vocab_map(blend, base, "reference-soft")
    spelled = [s.replace("Ġ", "▁") for s in blend.strings]
    assert len(expected) == len(spelled) == len(mapping)
    wrong = [(s, expected[s], base.strings[mapping[i]]) for i, s in enumerate(spelled)
             if expected[s] != base.strings[mapping[i]]]
    assert wrong == []


def test_hard_map_is_exact_strings_only(views, tmp_path, monkeypatch):
    monkeypatch.setenv("FUSION_CACHE_DIR", str(tmp_path))
    blend, base = views
    hard = vocab_map(blend, base, "reference-hard")
    for i in np.flatnonzero(hard >= 0)[:: 97]:
        assert base.strings[hard[i]] == blend.strings[i].replace("Ġ", "▁")
    missing = np.flatnonzero(hard < 0)
    assert len(missing) > 10000
    assert all(blend.strings[i].replace("Ġ", "▁") not in base.vocab for i in missing[::53])
