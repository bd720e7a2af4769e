"""The storage contract: every backend (SQLite, journal file, PostgreSQL) passes the same tests."""

from pathlib import Path

import optuna
import pytest

from evomerge.config import parse_config
from evomerge.errors import StudyError
from evomerge.study import StudyStore, study_names
from storage_urls import BACKENDS, storage_url, unique_name


def make_cfg(url: str, name: str):
    return parse_config({
        "name": name, "storage": url,
        "models": {"base": "/m/base", "sources": ["/m/a", "/m/b"]},
        "search_space": {"methods": ["ties"], "params": {"weight": {"low": 0, "high": 1}}},
        "evaluation": {"tasks": [{"name": "zoo_arith"}]},
    })


@pytest.fixture(params=BACKENDS)
def store(request, tmp_path: Path) -> StudyStore:
    url = storage_url(request.param, tmp_path)
    return StudyStore.create(make_cfg(url, unique_name("contract")), {"g0.weight.a": 1.0})


def dists():
    return {"g0.weight.a": optuna.distributions.FloatDistribution(0, 1)}


def test_trials_keep_params_attrs_and_outcomes(store: StudyStore) -> None:
    recipe = {"method": "ties", "base": "/m/base", "sources": ["/m/a"], "groups": [{"weight": [0.3]}]}
    n0, _ = store.start_trial({"g0.weight.a": 0.3}, dists(), {"generation": 0, "candidate": 0, "attempt": 0, "recipe": recipe})
    n1, _ = store.start_trial({"g0.weight.a": 0.7}, dists(), {"generation": 0, "candidate": 1, "attempt": 1})
    assert store.finish_trial(n0, 0.5, {"scores.fitness": {"zoo_arith": 0.5}})
    assert store.fail_trial(n1, "ValueError: boom")
    again = StudyStore.open(store.config.storage, store.study.study_name)
    t0 = again.trial(None)
    assert t0.number == n0 and t0.params == {"g0.weight.a": 0.3} and t0.value == 0.5
    assert t0.user_attrs["scores.fitness"] == {"zoo_arith": 0.5}
    assert StudyStore.recipe_of(t0).sources == ("/m/a",)
    assert again.trial(n1).user_attrs["fail_reason"] == "ValueError: boom"
    assert again.candidate_outcomes() == {(0, 0): 0.5, (0, 1): None}
    assert again.config.name == store.study.study_name


def test_controller_checkpoint_round_trips_in_chunks(store: StudyStore) -> None:
    state = bytes(range(256)) * 2000 + b"tail"  # ~0.5 MB, compresses poorly enough to need chunks
    import os
    state += os.urandom(200_000)
    store.save_controller(3, state)
    assert store.load_controller() == (3, state)
    store.save_controller(4, b"small")
    assert store.load_controller() == (4, b"small")


def test_orphans_are_failed_and_not_final(store: StudyStore) -> None:
    n, _ = store.start_trial({"g0.weight.a": 0.1}, dists(), {"generation": 2, "candidate": 5, "attempt": 0})
    fresh = StudyStore.open(store.config.storage, store.study.study_name)  # as after a crash
    assert fresh.fail_orphans() == [n]
    assert fresh.trial(n).state == optuna.trial.TrialState.FAIL
    assert fresh.candidate_outcomes() == {}  # an orphan's candidate must run again


def test_finished_elsewhere_does_not_break_the_writer(store: StudyStore) -> None:
    n, _ = store.start_trial({"g0.weight.a": 0.2}, dists(), {"generation": 0, "candidate": 0, "attempt": 0})
    store.study.tell(n, state=optuna.trial.TrialState.FAIL)  # what optuna-dashboard's "fail" does
    assert store.finish_trial(n, 0.9, {"x": 1}) is False


def test_duplicate_and_missing_studies(store: StudyStore) -> None:
    cfg = store.config
    with pytest.raises(StudyError, match="already exists"):
        StudyStore.create(cfg, {})
    with pytest.raises(StudyError, match="not found"):
        StudyStore.open(cfg.storage, "no-such-study")
    assert cfg.name in study_names(cfg.storage)


def test_unsupported_url() -> None:
    with pytest.raises(StudyError, match="unsupported URL"):
        study_names("redis://localhost")


def test_controller_state_is_one_attribute_per_checkpoint(store: StudyStore) -> None:
    store.save_controller(0, b"first" * 1000)
    store.save_controller(1, b"second" * 1000)
    attrs = StudyStore.open(store.config.storage, store.study.study_name).study.user_attrs
    head = attrs["evomerge.controller"]
    assert head == {"generation": 1, "bytes": 6000, "key": "evomerge.controller.g1"}
    assert attrs["evomerge.controller.g0"] == ""  # the superseded state is blanked, not left behind
    assert not [k for k in attrs if k.startswith("evomerge.optimizer")]  # no chunks


def test_generation_history_and_workers_are_kept(store: StudyStore) -> None:
    store.record_generation({"generation": 1, "best": 0.5, "median": 0.4, "failures": 0, "sigma": 0.2})
    store.record_generation({"generation": 0, "best": 0.3, "median": 0.2, "failures": 1, "sigma": None})
    store.record_workers([{"worker": "h:1", "device": "cpu", "startup_s": 2.5, "resident_bytes": 10, "rss_bytes": 20}])
    again = StudyStore.open(store.config.storage, store.study.study_name)
    assert [r["generation"] for r in again.history()] == [0, 1] and again.history()[1]["best"] == 0.5
    assert again.study.user_attrs["workers"][0]["resident_bytes"] == 10
