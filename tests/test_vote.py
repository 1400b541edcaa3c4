"""Crowd voting (fusion/vote.py): ROUGE-L by hand, the choice rule, and `fusion vote` on micro models."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fusion.cli import main
from fusion.errors import BAD_INPUT_EXIT_CODE
from fusion.vote import choose, lcs_length, rouge_l_chars, rouge_l_words, similarity_matrix


def test_rouge_l_against_hand_computed_cases():
    assert lcs_length("ABCBDAB", "BDCABA") == 4
    assert lcs_length("", "abc") == 0
    # LCS of the words: the cat on mat (4); P = 4/5, R = 4/6
    assert rouge_l_words("The cat on a mat", "the cat sat on the mat") == pytest.approx(2 * 0.8 * (4 / 6) / (0.8 + 4 / 6))
    assert rouge_l_words("same words.", "Same words .") == 1.0
    assert rouge_l_chars("abcd", "abed") == pytest.approx(0.75)  # LCS abd: P = R = 3/4
    assert rouge_l_chars("", "abc") == 0.0


def test_the_candidate_closest_to_the_crowd_wins():
    texts = ["the market rose sharply today", "stocks fell", "the market rose today", "the market rose sharply"]
    winner, scores = choose(texts, "rouge-l-word")
    assert winner == 0 and scores[1] == scores.min()
    sim = similarity_matrix(texts, "rouge-l-char")
    assert np.allclose(sim, sim.T) and np.allclose(np.diag(sim), 1)
    # embedding cosine: the middle vector is closest to both others
    vectors = {"a": [1.0, 0.0], "b": [1.0, 1.0], "c": [0.0, 1.0]}
    winner, _ = choose(["a", "b", "c"], "embedding", lambda ts: np.array([vectors[t] for t in ts]))
    assert winner == 1
    assert choose(["x", "x"], "rouge-l-word")[0] == 0  # a tie goes to the earlier member


@pytest.mark.parametrize("similarity", ["rouge-l-word", "embedding"])
def test_vote_command_across_vocabularies(micro, capsys, similarity):
    folders = [str(micro.models[n]) for n in ("target", "src-llama", "src-neox")]
    assert main(["vote", *folders, "--prompt", "def main(argv):\n    ", "--max-new-tokens", "12",
                 "--similarity", similarity]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [c["model"] for c in result["candidates"]] == ["target", "src-llama", "src-neox"]
    scores = [c["score"] for c in result["candidates"]]
    assert result["winner"] == int(np.argmax(scores)) and result["text"] == result["candidates"][result["winner"]]["text"]
    if similarity == "rouge-l-word":
        texts = [c["text"] for c in result["candidates"]]
        assert np.allclose(choose(texts, similarity)[1], scores, atol=1e-6)


def test_vote_refuses_a_folder_that_is_no_model(micro, tmp_path, capsys):
    assert main(["vote", str(micro.models["target"]), str(tmp_path), "--prompt", "x"]) == BAD_INPUT_EXIT_CODE
    assert "is not a model folder" in capsys.readouterr().err
