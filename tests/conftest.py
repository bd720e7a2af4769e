"""Shared fixtures. The zoo fixtures build real tiny checkpoints once and cache them across runs."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from zoo_fixtures import zoo_gpt2, zoo_llama, zoo_qwen2  # noqa: E402,F401  (fixtures)


@pytest.fixture(scope="session", autouse=True)
def _stop_ray_at_the_end():
    yield
    import sys

    if "ray" in sys.modules:
        import ray

        ray.shutdown()
