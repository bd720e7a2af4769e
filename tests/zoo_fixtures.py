"""Session fixtures for the tiny model zoo (import them from conftest.py).

The zoos are cached across test runs under ${EVOMERGE_TEST_CACHE:-~/.cache/evomerge-test}/zoo: the
llama zoo takes one to two CPU minutes to build once (its specialists train until they reach their skill
targets; the build fails if one cannot), then loads in well under a second.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from evomerge.zoo import Zoo, build_zoo

REPO_ROOT = Path(__file__).resolve().parents[1]
EVALUATORS_DIR = REPO_ROOT / "evaluators"


def zoo_cache_dir() -> Path:
    return Path(os.environ.get("EVOMERGE_TEST_CACHE") or Path.home() / ".cache" / "evomerge-test") / "zoo"


@pytest.fixture(scope="session")
def zoo_llama() -> Zoo:
    """The real zoo (4-layer d=128 Llama): a base weak on both skills, and arith and rev specialists at
    0.9 exact match or more on their own skill (the build's validation split)."""
    return build_zoo(zoo_cache_dir(), family="llama")


@pytest.fixture(scope="session")
def zoo_qwen2() -> Zoo:
    """A briefly trained Qwen2 zoo (q/k/v biases): same skills, other tensor names."""
    return build_zoo(zoo_cache_dir(), family="qwen2")


@pytest.fixture(scope="session")
def zoo_gpt2() -> Zoo:
    """A briefly trained GPT-2 zoo (transformer.h.N naming, fused c_attn, tied embeddings)."""
    return build_zoo(zoo_cache_dir(), family="gpt2")


@pytest.fixture(scope="session")
def zoo_hard() -> Zoo:
    """The hard zoo (issue 16; 4-layer d=128 Llama): a base weak on three skills, arith, rev and upper
    specialists at 0.9 exact match or more on their own skill, the rev one over-trained so that it poisons
    naive merges (the sum of the task vectors loses 0.15 or more). About two CPU minutes to build once."""
    return build_zoo(zoo_cache_dir(), family="hard")
