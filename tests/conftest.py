"""Shared fixtures: environment, the ../shared assets, and a micro fusion run that builds in
seconds (three small models of two architectures and two tokenizer families)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared is not present")
    return SHARED


@pytest.fixture(scope="session")
def micro(tmp_path_factory):
    """Models and a corpus for a micro run, built once per test session."""
    from tests.micro import build_micro

    return build_micro(tmp_path_factory.mktemp("micro"))
