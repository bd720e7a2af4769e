"""One controller per study (issue 14, item 2): the lease every backend keeps, and what search, resume and
delete do with it. The end-to-end fault test (a paused search and a resume of its study, real Ray
workers) is in test_resume_and_faults.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

import evomerge.study.lease
from evomerge.cli import main
from evomerge.config import parse_config
from evomerge.runtime.messages import JobFailure
from evomerge.study import StudyStore
from evomerge.study.lease_cell import LeaseCell
from evomerge.study.lease import LEASE_ATTR, ControllerLease, LeaseHeldError, LeaseLostError, live_holder
from evomerge.study.status import studies_table
from fake_pool import fake_ray  # noqa: F401 (fixture)
from storage_urls import BACKENDS, storage_url, unique_name
from study_configs import zoo_config

RUNNING = optuna.trial.TrialState.RUNNING


@pytest.fixture(params=BACKENDS)
def store(request, tmp_path: Path) -> StudyStore:
    url = storage_url(request.param, tmp_path)
    cfg = parse_config({
        "name": unique_name("lease"), "storage": url,
        "models": {"base": "/m/base", "sources": ["/m/a"]},
        "search_space": {"methods": ["ties"], "params": {"weight": {"low": 0, "high": 1}}},
        "evaluation": {"tasks": [{"name": "zoo_arith"}]},
    })
    return StudyStore.create(cfg, {"w": 1.0})


def write_holder(store: StudyStore, *, host: str = "node-7", pid: int = 4242, renewed_ago_s: float = 0.0) -> None:
    now = time.time()
    store.study.set_user_attr(LEASE_ATTR, {"host": host, "pid": pid, "since": now - 100, "renewed": now - renewed_ago_s,
                                           "ttl_s": 60.0, "token": "theirs"})


def take_over(store: StudyStore) -> None:
    """What another controller does once the lease has expired: a compare-and-set on what it read, which
    fails (and is retried here) when the holder's heartbeat renewed the lease in between."""
    cell = LeaseCell(store.study, LEASE_ATTR)
    theirs = {"host": "node-7", "pid": 4242, "since": time.time() - 100, "renewed": time.time(), "ttl_s": 60.0,
              "token": "theirs"}
    while not cell.replace(cell.read(), theirs):
        pass


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


SECOND_CONTROLLER = """
import sys
from evomerge.study import StudyStore
from evomerge.study.status import studies_table
from evomerge.study.lease import LeaseHeldError
try:
    with StudyStore.open(sys.argv[1], sys.argv[2]).controlling():
        print("acquired")
except LeaseHeldError as exc:
    print(exc)
"""


def second_controller(store: StudyStore) -> str:
    """What another process gets when it tries to take the study's lease."""
    done = subprocess.run([sys.executable, "-c", SECOND_CONTROLLER, store.config.storage, store.study.study_name],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_a_live_lease_refuses_a_second_controller_and_names_the_holder(store: StudyStore) -> None:
    with store.controlling():
        message = second_controller(store)
        assert f"another controller (host {socket.gethostname()}, pid {os.getpid()}, since 20" in message, message
    assert second_controller(store) == "acquired"  # released at the end of the block
    assert live_holder(store.study) is None


def test_a_controller_on_another_host_is_refused_until_its_lease_expires(store: StudyStore) -> None:
    write_holder(store, renewed_ago_s=5)
    with pytest.raises(LeaseHeldError, match=r"another controller \(host node-7, pid 4242, since .*last heartbeat 5s ago"):
        with store.controlling():
            pass
    assert "running (node-7, pid 4242)" in studies_table(store.config.storage)
    write_holder(store, renewed_ago_s=61)  # killed a minute ago: expired
    with store.controlling() as lease:
        assert lease.took_over is not None and lease.took_over.host == "node-7"


def test_a_killed_controller_on_this_host_is_taken_over_at_once(store: StudyStore) -> None:
    write_holder(store, host=socket.gethostname(), pid=dead_pid(), renewed_ago_s=1)
    with store.controlling() as lease:
        assert lease.took_over is not None


def test_a_paused_controller_finds_its_lease_taken_and_writes_nothing(store: StudyStore) -> None:
    dist = {"w": optuna.distributions.FloatDistribution(0, 1)}
    with store.controlling() as lease:
        number, _ = store.start_trial({"w": 0.1}, dist, {"generation": 0, "candidate": 0, "attempt": 0})
        write_holder(store)  # another controller took over while this one was paused past the expiry
        lease._renewed_at -= 3600  # ... and this one wakes up an hour later
        with pytest.raises(LeaseLostError, match="taken over by another controller \\(host node-7, pid 4242"):
            store.finish_trial(number, 0.5, {})
        with pytest.raises(LeaseLostError):
            store.start_trial({"w": 0.2}, dist, {"generation": 0, "candidate": 1, "attempt": 0})
    again = StudyStore.open(store.config.storage, store.study.study_name)
    assert [t.state for t in again.study.get_trials()] == [RUNNING]  # nothing written after the loss
    assert again.study.user_attrs[LEASE_ATTR]["token"] == "theirs"  # and the new holder's lease kept


def test_the_heartbeat_renews_the_lease(store: StudyStore) -> None:
    lease = ControllerLease(store.study, ttl_s=0.6)
    lease.acquire()
    try:
        first = store.study.user_attrs[LEASE_ATTR]["renewed"]
        time.sleep(0.5)
        assert store.study.user_attrs[LEASE_ATTR]["renewed"] > first
    finally:
        lease.release()
    assert store.study.user_attrs[LEASE_ATTR] is None


def test_a_search_that_loses_its_lease_stops_without_writing(zoo_llama, tmp_path, fake_ray, monkeypatch, capsys) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    monkeypatch.setattr(evomerge.study.lease, "TTL_S", 0.3)  # heartbeats every 0.05 s

    def evaluate(pool, job):
        if job.trial == 2:  # paused past the expiry, and another controller took the study over meanwhile
            take_over(StudyStore.open(url, "t"))
            time.sleep(0.2)
        return pool.score(job)

    fake_ray.evaluate = evaluate
    assert main(["search", str(zoo_config(zoo_llama, tmp_path, trials=8))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "was taken over by another controller (host node-7, pid 4242" in err, err
    trials = StudyStore.open(url, "t").study.get_trials()
    assert len(trials) == 3 and trials[2].state == RUNNING  # its result was not written: the new holder owns it


def test_resume_and_delete_refuse_a_running_study(zoo_llama, tmp_path, fake_ray, monkeypatch, capsys) -> None:
    config = zoo_config(zoo_llama, tmp_path, trials=4)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    fake_ray.evaluate = lambda pool, job: JobFailure("RuntimeError: boom", False) if job.trial == 0 else pool.score(job)
    assert main(["search", str(config)]) == 0
    write_holder(StudyStore.open(url, "t"))
    capsys.readouterr()
    for argv in (["resume", "t", "--storage", url, "--trials", "4"], ["delete", "t", "--storage", url, "--yes"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "is being run by another controller (host node-7, pid 4242, since" in err, err
    assert StudyStore.open(url, "t").config.budget.trials == 4  # the stored budget untouched
