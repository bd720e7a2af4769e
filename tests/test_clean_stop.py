"""Stopping a search is clean however it happens (issue 14, items 3, 7 and 10): Ctrl-C and SIGTERM leave no
RUNNING trial, a study stopped before its first optimizer checkpoint resumes from its start, a finished
study resumes without Ray, and `evomerge delete` removes a study for good.

These run the real controller loop on `fake_pool.FakePool` (no Ray); test_resume_and_faults.py sends a
real SIGTERM to a real search."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import optuna
import pytest

import evomerge.search.run
from evomerge.cli import main
from evomerge.study import StudyStore
from fake_pool import FakePool, fake_ray  # noqa: F401 (fixture)
from study_configs import zoo_config

RUNNING, COMPLETE = optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.COMPLETE


def url_of(tmp: Path) -> str:
    return f"sqlite:///{tmp / 'study.db'}"


def params_by_candidate(url: str, name: str = "t") -> dict[tuple[int, int], dict]:
    trials = StudyStore.open(url, name).study.get_trials(states=(COMPLETE,))
    return {(t.user_attrs["generation"], t.user_attrs["candidate"]): t.params for t in trials}


@pytest.fixture
def straight(zoo_llama, tmp_path_factory, fake_ray) -> dict:
    """Params per candidate of an uninterrupted 8-trial search on the fake pool."""
    tmp = tmp_path_factory.mktemp("straight")
    assert main(["search", str(zoo_config(zoo_llama, tmp, trials=8))]) == 0
    return params_by_candidate(url_of(tmp))


def stop_at(trial: int, stop) -> None:
    """Score normally, but `stop()` while trial `trial` is being evaluated."""
    def evaluate(pool, job):
        if job.trial == trial:
            stop()
        return pool.score(job)
    FakePool.evaluate = evaluate


def one_line(err: str) -> str:
    err = err.strip()
    assert err.count("\n") == 0 and err.startswith("evomerge: "), err
    return err


def test_sigterm_stops_like_ctrl_c_and_resume_finishes_identically(zoo_llama, straight, tmp_path, fake_ray, capsys) -> None:
    config = zoo_config(zoo_llama, tmp_path, trials=8)
    handler = signal.getsignal(signal.SIGTERM)
    stop_at(5, lambda: os.kill(os.getpid(), signal.SIGTERM))
    capsys.readouterr()
    assert main(["search", str(config)]) == 143
    assert "stopped (SIGTERM)" in one_line(capsys.readouterr().err)
    assert signal.getsignal(signal.SIGTERM) is handler  # the controller's handler is gone with it
    trials = StudyStore.open(url_of(tmp_path), "t").study.get_trials()
    assert RUNNING not in {t.state for t in trials}
    assert trials[5].user_attrs["fail_reason"].startswith("interrupted: the search stopped (SIGTERM)")
    FakePool.evaluate = None
    assert main(["resume", "t", "--storage", url_of(tmp_path)]) == 0
    assert params_by_candidate(url_of(tmp_path)) == straight


def test_ctrl_c_mid_search_leaves_no_running_trial(zoo_llama, tmp_path, fake_ray, capsys) -> None:
    def interrupt():
        raise KeyboardInterrupt

    stop_at(3, interrupt)
    assert main(["search", str(zoo_config(zoo_llama, tmp_path, trials=8))]) == 130
    one_line(capsys.readouterr().err)
    trials = StudyStore.open(url_of(tmp_path), "t").study.get_trials()
    assert [t.state for t in trials[:3]] == [COMPLETE] * 3 and RUNNING not in {t.state for t in trials}


def test_stops_inside_study_writes_leave_no_unfinished_trial(zoo_llama, straight, tmp_path, fake_ray, monkeypatch, capsys) -> None:
    """Ctrl-C and SIGTERM land between any two statements, study writes included: after a trial's params
    were enqueued, after `ask` made it RUNNING (before the store knew it), or before the `tell` closing
    one. No trial is left RUNNING or WAITING (a WAITING one would give its params to the next candidate
    asked), and resume finishes like an uninterrupted search."""
    ask, tell, plan = optuna.Study.ask, optuna.Study.tell, {}

    def stop_if(where: str, number: int) -> None:
        if plan.get(where) == number:
            plan.clear()  # once: the stopping controller's own writes go through
            raise KeyboardInterrupt

    def interrupted_ask(study, *args, **kwargs):
        stop_if("enqueued", len(study.trials) - 1)  # the newest trial is WAITING: enqueued, not asked
        trial = ask(study, *args, **kwargs)
        stop_if("asked", trial.number)
        return trial

    def interrupted_tell(study, trial, *args, **kwargs):
        stop_if("telling", getattr(trial, "number", trial))
        return tell(study, trial, *args, **kwargs)

    monkeypatch.setattr(optuna.Study, "ask", interrupted_ask)
    monkeypatch.setattr(optuna.Study, "tell", interrupted_tell)
    search = ["search", str(zoo_config(zoo_llama, tmp_path, trials=8))]
    for argv, where, number in ((search, "enqueued", 3), (["resume", "t", "--storage", url_of(tmp_path)], "asked", 5),
                                (["resume", "t", "--storage", url_of(tmp_path)], "telling", 7)):
        plan[where] = number
        assert main(argv) == 130, where
        one_line(capsys.readouterr().err)
        assert not plan, where  # it stopped there
        states = {t.state for t in StudyStore.open(url_of(tmp_path), "t").study.get_trials()}
        assert not states & {RUNNING, optuna.trial.TrialState.WAITING}, (where, states)
    assert main(["resume", "t", "--storage", url_of(tmp_path)]) == 0
    assert params_by_candidate(url_of(tmp_path)) == straight


def test_ctrl_c_while_workers_start_leaves_a_study_that_resumes_from_its_start(
        zoo_llama, straight, tmp_path, fake_ray, monkeypatch, capsys) -> None:
    def interrupted_start(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evomerge.search.run, "WorkerPool", interrupted_start)
    config = zoo_config(zoo_llama, tmp_path, trials=8)
    assert main(["search", str(config)]) == 130
    store = StudyStore.open(url_of(tmp_path), "t")
    assert store.load_controller() is None and store.study.get_trials() == []
    monkeypatch.setattr(evomerge.search.run, "WorkerPool", FakePool)
    assert main(["resume", "t", "--storage", url_of(tmp_path)]) == 0
    assert params_by_candidate(url_of(tmp_path)) == straight


def test_resuming_a_finished_study_starts_no_ray(zoo_llama, tmp_path, fake_ray, monkeypatch, capsys) -> None:
    assert main(["search", str(zoo_config(zoo_llama, tmp_path, trials=4))]) == 0
    before = StudyStore.open(url_of(tmp_path), "t").study.user_attrs
    monkeypatch.setattr(evomerge.search.run, "start_ray", lambda *a, **k: pytest.fail("Ray started for a finished study"))
    capsys.readouterr()
    assert main(["resume", "t", "--storage", url_of(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "is finished" in out and "done: 4/4 candidates" in out
    assert StudyStore.open(url_of(tmp_path), "t").study.user_attrs == before  # nothing rewritten


def test_delete_removes_the_study_and_its_artifacts(zoo_llama, tmp_path, fake_ray, monkeypatch, capsys) -> None:
    config = zoo_config(zoo_llama, tmp_path, trials=4)
    assert main(["search", str(config)]) == 0
    artifacts = tmp_path / "study.db.artifacts"
    assert len(list(artifacts.iterdir())) == 4  # one recipe per trial
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda question: "n")
    assert main(["delete", "t", "--storage", url_of(tmp_path)]) == 2  # asked, and declined
    monkeypatch.setattr("builtins.input", lambda question: "y")
    assert main(["delete", "t", "--storage", url_of(tmp_path)]) == 0
    assert list(artifacts.iterdir()) == []
    assert main(["status", "--storage", url_of(tmp_path), "t"]) == 2
    assert main(["search", str(config)]) == 0  # the name is free again
