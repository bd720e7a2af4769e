"""Ray actors that each hold one CandidateWorker, fed by a small `ray.wait` loop.

Each actor gets one GPU on a GPU cluster (CPU cores here). Every actor always has at most one candidate
in flight, and a new candidate goes to the first actor that frees up, so a slow candidate delays nobody
else. A candidate whose actor dies is reported as failed with the reason; the actor is replaced (the
controller then decides what to do with the candidate). `max_task_retries=0`: a deterministic out-of-
memory is not blindly rerun.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from evomerge.runtime.messages import CandidateResult, Job, JobFailure, WorkerInfo, WorkerSetup

# The worker class, by import path: the controller never imports it (nor torch); each actor process does.
DEFAULT_WORKER = "evomerge.runtime.worker:CandidateWorker"


class WorkerActor:
    """What runs inside each Ray actor: the worker class (a class, or its import path) and its setup."""

    def __init__(self, worker: type | str, setup: WorkerSetup) -> None:
        if isinstance(worker, str):
            module, _, name = worker.partition(":")
            worker = getattr(importlib.import_module(module), name)
        self.worker = worker(setup)

    def info(self) -> WorkerInfo:
        return self.worker.info()

    def evaluate(self, *args: Any, **kwargs: Any) -> CandidateResult:
        return self.worker.evaluate(*args, **kwargs)


# Set in the workers' environment (and the driver's, where they are not set): worker output that reaches
# the driver (log_to_driver: real warnings and errors) carries no per-load "Loading weights" progress
# bar from transformers, and Ray prints it without ANSI colour codes.
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "RAY_COLOR_PREFIX": "0"}


def start_ray(n_workers: int, cpus_per_worker: float) -> None:
    """Join RAY_ADDRESS when set, else start a private local Ray sized for the workers."""
    import ray

    if ray.is_initialized():
        return
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)  # the driver prints worker lines; a local cluster inherits the rest
    quiet = {name: os.environ[name] for name in QUIET_ENV}
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING", "log_to_driver": True,
                              "runtime_env": {"env_vars": quiet}}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **kwargs)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local cluster needs no token
        cpus = max(math.ceil(n_workers * cpus_per_worker), 1)
        ray.init(num_cpus=cpus, object_store_memory=512 * 2**20, **kwargs)


class WorkerPool:
    def __init__(self, setup: WorkerSetup, n_workers: int, *, cpus: float = 1, gpus: float | None = None,
                 progress: Callable[[str], None] = print, worker_cls: type | str = DEFAULT_WORKER) -> None:
        """`worker_cls` (a class or "module:Class") takes a WorkerSetup and has `info()` and
        `evaluate(recipe, split[, first_pass])`, like CandidateWorker."""
        import ray

        self.setup, self.progress, self.worker_cls = setup, progress, worker_cls
        self.gpus = gpus if gpus is not None else (1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0)
        self.cpus = cpus
        started = time.perf_counter()
        self.actors = [self._new_actor() for _ in range(n_workers)]
        self.infos: list[WorkerInfo] = ray.get([a.info.remote() for a in self.actors])
        self.startup_s = time.perf_counter() - started
        device = self.infos[0].device if self.infos else "?"
        progress(f"workers: {n_workers} ready on {device} in {self.startup_s:.1f}s")
        for info in self.infos:
            mapped = f", maps {info.mapped_bytes / 2**30:.2f} GiB of sources (shared per node)" if info.mapped_bytes else ""
            where = f" (sources on {info.sources_on})" if info.sources_on else ""
            progress(f"workers: {info.worker} holds {info.resident_bytes / 2**30:.2f} GiB of tensors{where}{mapped}; "
                     f"private memory {info.anon_bytes / 2**30:.2f} GiB, RSS {info.rss_bytes / 2**30:.2f} GiB")

    @property
    def size(self) -> int:
        return len(self.actors)

    def _new_actor(self) -> Any:
        import ray

        threads = max(int(self.cpus), 1) if not self.gpus else None
        setup = dataclasses.replace(self.setup, threads=self.setup.threads or threads)
        remote = ray.remote(WorkerActor).options(num_cpus=self.cpus, num_gpus=self.gpus, max_restarts=0, max_task_retries=0)
        return remote.remote(self.worker_cls, setup)

    def run(self, next_job: Callable[[], Job | None]) -> Iterator[tuple[Job, CandidateResult | JobFailure]]:
        """Keep every actor busy with jobs from `next_job()` (None: nothing to hand out right now);
        yields each job with its outcome as soon as it is done.

        While every actor is busy, one job is made ahead (`next_job` starts its trial: study writes), so
        the next actor to free up gets work at once instead of after those writes. A freed actor gets its
        next job before the outcome is yielded, so the caller's bookkeeping overlaps with evaluation;
        `next_job` is asked again after the caller is done with an outcome, so a retry the caller queued
        meanwhile is picked up.
        """
        import ray

        in_flight: dict[Any, tuple[Job, int]] = {}
        idle = list(range(len(self.actors)))[::-1]
        ahead: Job | None = None  # made while every actor was busy

        def fill() -> None:
            nonlocal ahead
            while idle:
                job, ahead = ahead or next_job(), None
                if job is None:
                    return
                slot = idle.pop()
                args = (job.recipe, job.split) if job.first_pass is None else (job.recipe, job.split, job.first_pass)
                in_flight[self.actors[slot].evaluate.remote(*args, **job.extra())] = (job, slot)
            if ahead is None:
                ahead = next_job()

        fill()
        while in_flight:
            done, _ = ray.wait(list(in_flight), num_returns=1)
            job, slot = in_flight.pop(done[0])
            outcome = self._outcome(done[0], slot)
            idle.append(slot)
            fill()
            yield job, outcome
            fill()

    def _outcome(self, ref: Any, slot: int) -> CandidateResult | JobFailure:
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        try:
            return ray.get(ref)
        except (ActorDiedError, ActorUnavailableError, RayActorError) as exc:
            # An unavailable actor may still be alive (unreachable on a starved node) and holding its
            # CPUs or GPU: kill it, or its replacement could wait for those resources forever.
            with contextlib.suppress(Exception):
                ray.kill(self.actors[slot])
            self.actors[slot] = self._new_actor()
            self.progress(f"workers: worker {slot} died ({type(exc).__name__}); replaced it")
            return JobFailure(f"worker died: {_first_line(exc)}", worker_died=True)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            return JobFailure(f"{type(cause).__name__}: {_first_line(cause)}", worker_died=False)

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


def from_queue(queue: deque[Job]) -> Callable[[], Job | None]:
    """A `next_job` that hands out a queue's jobs in order."""
    return lambda: queue.popleft() if queue else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
