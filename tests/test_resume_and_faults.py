"""Cluster-grade behaviour with real Ray workers: SIGKILLed or SIGTERMed controller + resume, a second
controller refused while the first is paused (SIGSTOP), dying workers, raising candidates."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from evomerge.config import load_config
from evomerge.search import prepare, resume_search, run_search
from evomerge.study import StudyStore
from evomerge.runtime.worker import CandidateWorker
from storage_urls import storage_url, unique_name
from study_configs import zoo_config

pytestmark = pytest.mark.slow
COMPLETE, FAIL = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL


def params_by_candidate(store: StudyStore) -> dict[tuple[int, int], dict]:
    return {(t.user_attrs["generation"], t.user_attrs["candidate"]): t.params
            for t in store.study.get_trials(states=(COMPLETE,))}


def wait_for_completed(url: str, name: str, n: int, timeout_s: float) -> None:
    from evomerge.study import optuna_storage

    storage = optuna_storage(url)
    if isinstance(storage, str):  # one engine for all polls: a new PostgreSQL engine costs seconds
        storage = optuna.storages.RDBStorage(storage)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            study = optuna.load_study(study_name=name, storage=storage)
            if len(study.get_trials(deepcopy=False, states=(COMPLETE,))) >= n:
                return
        except KeyError:  # the study does not exist yet
            pass
        time.sleep(0.1)
    raise AssertionError(f"fewer than {n} trials completed within {timeout_s}s")


COMMON = dict(trials=8, popsize=4, limit=40)

# A worker (pickled by value to the Ray workers) whose evaluations take 0.5 s more and, when GATE names a
# folder, whose 8th fitness evaluation never ends: a search then completes at most 7 of its 8 trials, so
# a signal sent once 5 have completed lands mid-generation however slow or busy the machine is (a
# starved test process used to see the search finish first).
SLOW_WORKER = """
import os, time
from evomerge.runtime.worker import CandidateWorker

def evaluate(self, recipe, split="fitness"):
    time.sleep(0.5)
    if GATE and split == "fitness" and _evaluation_index() >= 7:
        time.sleep(600)  # killed long before: the signal under test stops the search
    return CandidateWorker.evaluate(self, recipe, split)

def _evaluation_index():
    for i in range(1000):  # one file per evaluation, across the worker processes
        try:
            os.close(os.open(os.path.join(GATE, str(i)), os.O_CREAT | os.O_EXCL))
            return i
        except FileExistsError:
            pass

slow = type("SlowWorker", (CandidateWorker,), {"evaluate": evaluate})
"""

# The controller under test, as its own process: the real search loop on that worker.
SLOW_SEARCH = """
import dataclasses, sys
from evomerge.config import load_config
from evomerge.search import prepare, run_search
GATE = sys.argv[2]
""" + SLOW_WORKER + """
run_search(dataclasses.replace(prepare(load_config(sys.argv[1])), worker_cls=slow))
"""


@pytest.fixture(scope="module")
def straight(zoo_llama, tmp_path_factory) -> dict:
    """Params per (generation, candidate) of an uninterrupted 2-generation search (trial params do not
    depend on the storage backend, so every resume test compares with this one run)."""
    tmp = tmp_path_factory.mktemp("straight")
    cfg = load_config(zoo_config(zoo_llama, tmp, name="straight", **COMMON))
    run_search(prepare(cfg), progress=lambda s: None)
    return params_by_candidate(StudyStore.open(cfg.storage, "straight"))


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_sigkilled_controller_resumes_to_the_same_trials(zoo_llama, straight, tmp_path: Path, backend: str) -> None:
    url = storage_url(backend, tmp_path)
    killed = unique_name("killed")
    config = zoo_config(zoo_llama, tmp_path, name=killed, storage=url, **COMMON)
    (tmp_path / "gate").mkdir()
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SEARCH, str(config), str(tmp_path / "gate")],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_completed(url, killed, 5, timeout_s=240)  # into the second generation
    finally:
        proc.send_signal(signal.SIGKILL)  # the controller, mid-generation
        proc.wait()
        os.killpg(proc.pid, signal.SIGKILL)  # and the Ray processes it started
    store = StudyStore.open(url, killed)
    done_before = len(store.completed())
    assert 5 <= done_before < 8, done_before
    summary = resume_search(store, None, progress=lambda s: None)
    assert summary.trials == 8
    resumed = params_by_candidate(StudyStore.open(url, killed))
    assert sorted(resumed) == [(g, c) for g in (0, 1) for c in range(4)]
    differ = {key: (straight[key], resumed[key]) for key in straight if straight[key] != resumed.get(key)}
    assert not differ, f"killed after {done_before} trials; (generation, candidate) -> (straight, resumed): {differ}"


def test_resume_with_more_trials_continues_the_same_search(zoo_llama, straight, tmp_path: Path) -> None:
    cfg = load_config(zoo_config(zoo_llama, tmp_path, name="short", **{**COMMON, "trials": 4}))
    run_search(prepare(cfg), progress=lambda s: None)
    resume_search(StudyStore.open(cfg.storage, "short"), 4, progress=lambda s: None)
    assert params_by_candidate(StudyStore.open(cfg.storage, "short")) == straight


def flaky_worker_class(marker_dir: Path) -> type:
    """A real worker that dies (SIGKILL) on its first candidate, and raises for candidates with a high weight."""

    def evaluate(self, recipe, split="fitness"):
        marker = marker_dir / "killed-once"
        if split == "fitness" and not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        if recipe.groups[0]["weight"][0] > 1.2:
            raise RuntimeError("simulated CUDA out of memory")
        return CandidateWorker.evaluate(self, recipe, split)

    return type("FlakyWorker", (CandidateWorker,), {"evaluate": evaluate})


def test_dead_workers_and_raising_candidates_do_not_stop_the_search(zoo_llama, tmp_path: Path) -> None:
    url = storage_url("sqlite", tmp_path)
    prepared = prepare(load_config(zoo_config(zoo_llama, tmp_path, name="flaky", trials=8, limit=20)))
    import dataclasses

    lines: list[str] = []
    prepared = dataclasses.replace(prepared, worker_cls=flaky_worker_class(tmp_path))
    summary = run_search(prepared, progress=lines.append)
    store = StudyStore.open(url, "flaky")
    trials = store.study.get_trials()
    reasons = [t.user_attrs.get("fail_reason", "") for t in trials if t.state == FAIL]
    assert any(r.startswith("worker died") for r in reasons), reasons
    assert any("simulated CUDA out of memory" in r for r in reasons), reasons
    assert summary.trials == 8  # the budget is spent: every candidate has an outcome
    outcomes = store.candidate_outcomes()
    assert len(outcomes) == 8
    assert sum(v is None for v in outcomes.values()) == summary.failed >= 1
    assert len(store.completed()) == 8 - summary.failed  # no completed trial lost
    assert any("replaced it" in line for line in lines)


# The same slow controller, through the command line (exit codes and stderr as a user sees them); the
# gate folder, if any, comes in EVOMERGE_TEST_GATE.
SLOW_CLI = """
import dataclasses, os, sys
import evomerge.search
from evomerge.cli import main
GATE = os.environ.get("EVOMERGE_TEST_GATE")
""" + SLOW_WORKER + """
prepare = evomerge.search.prepare
evomerge.search.prepare = lambda cfg, **kw: dataclasses.replace(prepare(cfg, **kw), worker_cls=slow)
sys.exit(main(sys.argv[1:]))
"""


def start_slow_cli(*argv: str, gate: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "EVOMERGE_TEST_GATE": str(gate) if gate else ""}
    if gate:
        gate.mkdir()
    return subprocess.Popen([sys.executable, "-c", SLOW_CLI, *argv], start_new_session=True, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop_group(proc: subprocess.Popen) -> None:
    """Kill whatever the controller left (its Ray processes), once it has exited or to end a failed test."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_sigterm_stops_cleanly_and_resume_finishes_with_the_same_trials(zoo_llama, straight, tmp_path: Path) -> None:
    """SIGTERM (a scheduler's preemption) stops like Ctrl-C: one line, exit 143, no native stack dump, no
    RUNNING trial left; `resume` then finishes the study with the params of an uninterrupted run."""
    url = storage_url("sqlite", tmp_path)
    config = zoo_config(zoo_llama, tmp_path, name="termed", **COMMON)
    proc = start_slow_cli("search", str(config), gate=tmp_path / "gate")
    try:
        wait_for_completed(url, "termed", 5, timeout_s=240)
        proc.send_signal(signal.SIGTERM)  # the controller only, as `kill PID` does
        _, err = proc.communicate(timeout=120)
    finally:
        stop_group(proc)
    assert proc.returncode == 143, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("evomerge: stopped (SIGTERM)"), err[-3000:]
    for crash in ("Fatal Python error", "SIGABRT", "SIGTERM received", "Aborted", "core dumped", "Traceback"):
        assert crash not in err, err[-3000:]
    store = StudyStore.open(url, "termed")
    assert not store.study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    summary = resume_search(store, None, progress=lambda s: None)
    assert summary.trials == 8
    assert params_by_candidate(StudyStore.open(url, "termed")) == straight


def pause_between_writes(proc: subprocess.Popen, db: Path, timeout_s: float = 60) -> None:
    """SIGSTOP a controller at a moment it does not keep readers out of its SQLite file: paused in the
    middle of a commit, it would hold the file locked, and every other process would fail with "database
    is locked" (what a user pausing a search there gets too; not what this test is about)."""
    import sqlite3

    deadline = time.monotonic() + timeout_s
    while True:
        proc.send_signal(signal.SIGSTOP)
        try:
            with contextlib.closing(sqlite3.connect(db, timeout=0)) as conn:
                conn.execute("SELECT count(*) FROM trials").fetchone()
            return
        except sqlite3.OperationalError:
            if time.monotonic() > deadline:
                raise
            proc.send_signal(signal.SIGCONT)
            time.sleep(0.05)


def test_a_second_controller_is_refused_while_the_first_is_paused(zoo_llama, straight, tmp_path: Path, monkeypatch, capsys) -> None:
    """Issue 14's reproduction: pause a search (SIGSTOP), resume its study, continue the search. The resume
    is refused naming the search's host, pid and start; the search then finishes its budget alone."""
    import socket

    import evomerge.search.run
    from evomerge.cli import main

    monkeypatch.setattr(evomerge.search.run, "start_ray", lambda *a, **k: pytest.fail("the refused resume started Ray"))
    url = storage_url("sqlite", tmp_path)
    config = zoo_config(zoo_llama, tmp_path, name="paused", **COMMON)
    proc = start_slow_cli("search", str(config))
    try:
        wait_for_completed(url, "paused", 2, timeout_s=240)
        try:
            pause_between_writes(proc, tmp_path / "study.db")
            for argv in (["resume", "paused", "--storage", url], ["delete", "paused", "--storage", url, "--yes"]):
                capsys.readouterr()
                assert main(argv) == 2
                err = capsys.readouterr().err.strip()
                assert err.count("\n") == 0, err
                assert f"being run by another controller (host {socket.gethostname()}, pid {proc.pid}, since " in err, err
        finally:
            proc.send_signal(signal.SIGCONT)
        out, err = proc.communicate(timeout=300)
    finally:
        stop_group(proc)
    assert proc.returncode == 0, err[-3000:]
    assert "done: 8/8 candidates (0 failed)" in out
    store = StudyStore.open(url, "paused")
    assert len(store.study.get_trials()) == 8  # no orphans, no second generation run twice
    assert params_by_candidate(store) == straight


def test_an_unreachable_worker_is_killed_before_it_is_replaced(monkeypatch) -> None:
    """ActorUnavailableError: the actor may still be alive and hold its CPUs or GPU; a replacement started
    beside it could wait for them forever, so the pool kills it first (no Ray needed: ray.get/kill faked)."""
    import ray
    from ray.exceptions import ActorUnavailableError

    from evomerge.runtime.pool import WorkerPool

    killed = []
    monkeypatch.setattr(ray, "get", lambda ref: (_ for _ in ()).throw(ActorUnavailableError("unreachable", None)))
    monkeypatch.setattr(ray, "kill", killed.append)
    pool = WorkerPool.__new__(WorkerPool)
    pool.actors, pool.progress = ["old"], lambda line: None
    monkeypatch.setattr(pool, "_new_actor", lambda: "new", raising=False)
    outcome = pool._outcome("ref", 0)
    assert outcome.worker_died and "worker died" in outcome.reason
    assert killed == ["old"] and pool.actors == ["new"]
