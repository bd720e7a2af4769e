"""Storage URLs every storage test runs against: SQLite and journal files always, PostgreSQL when
EVOMERGE_TEST_POSTGRES names a server (CI starts one; see .ci/run)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

POSTGRES = os.environ.get("EVOMERGE_TEST_POSTGRES")
BACKENDS = ["sqlite", "journal", "postgresql"]


def storage_url(kind: str, tmp_path: Path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'study.db'}"
    if kind == "journal":
        return f"journal:///{tmp_path / 'study.log'}"
    if not POSTGRES:
        pytest.skip("PostgreSQL tests need EVOMERGE_TEST_POSTGRES=postgresql://USER:PASS@HOST/DB (CI sets it)")
    return POSTGRES


def unique_name(prefix: str) -> str:
    """Study names unique per test, since a PostgreSQL database outlives one test."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"
