"""Where a worker keeps its sources (device, host, mmap) changes memory, never results."""

from __future__ import annotations

from pathlib import Path

import pytest

from evomerge.cli import main
from evomerge.study import StudyStore
from study_configs import zoo_config

pytestmark = pytest.mark.slow


def test_a_zoo_search_gives_identical_trials_in_every_mode(zoo_llama, tmp_path: Path, capsys) -> None:
    outcomes = {}
    for mode in ("device", "host", "mmap"):
        config = zoo_config(zoo_llama, tmp_path, name=mode, trials=8, popsize=4, limit=20,
                            search_space={"preset": "ties_or_dare"}, workers__sources_on=mode)
        assert main(["search", str(config)]) == 0
        assert f"(sources on {mode})" in capsys.readouterr().out
        store = StudyStore.open(f"sqlite:///{tmp_path / 'study.db'}", mode)
        trials = store.study.get_trials()
        outcomes[mode] = [(t.params, t.value, t.user_attrs["scores.fitness"]) for t in trials]
        workers = store.study.user_attrs["workers"]
        if mode == "mmap":  # no private copy of the sources: only the live model is resident
            assert all(w["mapped_bytes"] > 0 and w["resident_bytes"] < w["mapped_bytes"] for w in workers)
        else:
            assert all(w["mapped_bytes"] == 0 for w in workers)
    assert len(outcomes["device"]) == 8
    assert outcomes["device"] == outcomes["host"] == outcomes["mmap"]
