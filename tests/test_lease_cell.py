"""The lease's compare-and-set (study.lease_cell) on every backend: a stale write is refused, and
writers in separate processes that increment one attribute by compare-and-set lose no increment
(with a plain read and write they do)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from evomerge.study.lease_cell import LeaseCell
from evomerge.study.storage import optuna_storage
from storage_urls import BACKENDS, storage_url, unique_name

KEY = "evomerge.test-cell"

INCREMENTER = """
import sys, optuna
from evomerge.study.lease_cell import LeaseCell
from evomerge.study.storage import optuna_storage
optuna.logging.set_verbosity(optuna.logging.WARNING)
cell = LeaseCell(optuna.load_study(study_name=sys.argv[2], storage=optuna_storage(sys.argv[1])), sys.argv[3])
for _ in range(int(sys.argv[4])):
    while True:
        seen = cell.read()
        if cell.replace(seen, {"n": (seen or {"n": 0})["n"] + 1}):
            break
"""


@pytest.fixture(params=BACKENDS)
def url(request, tmp_path: Path) -> str:
    return storage_url(request.param, tmp_path)


@pytest.fixture
def study(url: str) -> optuna.Study:
    return optuna.create_study(study_name=unique_name("cell"), storage=optuna_storage(url))


def test_a_write_against_a_stale_read_is_refused(study: optuna.Study) -> None:
    cell = LeaseCell(study, KEY)
    assert cell.read() is None
    assert cell.replace(None, {"token": "a"})
    assert not cell.replace(None, {"token": "b"})  # it is no longer absent
    assert cell.replace({"token": "a"}, {"token": "a", "renewed": 2.5})
    assert not cell.replace({"token": "a"}, {"token": "c"})  # renewed since that read
    assert cell.read() == {"token": "a", "renewed": 2.5}
    assert cell.replace({"token": "a", "renewed": 2.5}, None)
    assert cell.read() is None and cell.replace(None, {"token": "d"})  # released, then taken again


def test_concurrent_writers_lose_no_update(study: optuna.Study, url: str) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", INCREMENTER, url, study.study_name, KEY, "25"], stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    assert LeaseCell(study, KEY).read() == {"n": 75}

