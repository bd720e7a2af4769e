"""The real controller loop without Ray: a stand-in for `runtime.pool.WorkerPool` that evaluates each job
in-process, one at a time, with a scripted outcome. For tests of what the controller itself does when it
stops, fails or loses its lease; the Ray path has its own end-to-end tests."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator

import pytest

import evomerge.search.run
from evomerge.runtime.messages import CandidateResult, Job, JobFailure, WorkerSetup

Evaluate = Callable[["FakePool", Job], CandidateResult | JobFailure]  # (pool, job): pool.score(job) scores normally


def gene_fitness(job: Job) -> float:
    """A fitness that depends only on the candidate's genes (held-out jobs: a constant)."""
    values = [float(v) for v in (job.params or {}).values() if isinstance(v, (int, float))]
    return round(statistics.fmean(values), 6) if values else 0.5


class FakePool:
    """WorkerPool's interface: `infos`, `run(next_job)`, `close()`. `evaluate` is set per test."""

    evaluate: Evaluate | None = None
    started = 0

    def __init__(self, setup: WorkerSetup, n_workers: int, **kwargs) -> None:
        self.tasks = [t.name for t in setup.tasks]
        self.infos: list = []
        FakePool.started += 1

    def run(self, next_job: Callable[[], Job | None]) -> Iterator[tuple[Job, CandidateResult | JobFailure]]:
        while (job := next_job()) is not None:
            yield job, FakePool.evaluate(self, job) if FakePool.evaluate else self.score(job)

    def score(self, job: Job) -> CandidateResult:
        fitness = gene_fitness(job)
        return CandidateResult(scores={t: fitness for t in self.tasks}, fitness=fitness, merge_s=0.0, eval_s=0.0)

    def close(self) -> None:
        pass


@pytest.fixture
def fake_ray(monkeypatch: pytest.MonkeyPatch) -> type[FakePool]:
    """Searches in this test run on FakePool; set `FakePool.evaluate` to script outcomes."""
    monkeypatch.setattr(evomerge.search.run, "start_ray", lambda *args, **kwargs: None)
    monkeypatch.setattr(evomerge.search.run, "WorkerPool", FakePool)
    monkeypatch.setattr(FakePool, "evaluate", None)
    monkeypatch.setattr(FakePool, "started", 0)
    return FakePool
