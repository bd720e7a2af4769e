"""One search: validate everything, then ask, dispatch, score and tell, generation by generation.

Everything that can be wrong with the input is checked in `prepare` before the study is written or Ray
starts: model paths, tensor names and shapes, the search space against the merge methods, the lm-eval
task names, the storage URL and study name. The controller process is the study's only writer.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from evomerge.checkpoints import Checkpoint, check_mergeable
from evomerge.config import StudyConfig
from evomerge.errors import StudyError
from evomerge.layout import num_layers
from evomerge.optimize import Controller, make_controller
from evomerge.pool import Job, JobFailure, WorkerPool, start_ray
from evomerge.scoring import TaskSpec, check_tasks
from evomerge.spaces import ParameterSpace, decode_unit
from evomerge.study import StudyStore, check_storage_url, study_names
from evomerge.worker import CandidateResult, WorkerSetup

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Prepared:
    cfg: StudyConfig
    space: ParameterSpace
    setup: WorkerSetup


@dataclass
class SearchSummary:
    study: str
    storage: str
    budget: int = 0
    trials: int = 0
    failed: int = 0
    best_number: int | None = None
    best_fitness: float | None = None
    best_heldout: float | None = None
    wall_s: float = 0.0
    history: list[dict] = field(default_factory=list)


def task_specs(cfg: StudyConfig) -> tuple[TaskSpec, ...]:
    return tuple(TaskSpec(**t.model_dump()) for t in cfg.evaluation.tasks)


def prepare(cfg: StudyConfig) -> Prepared:
    """Check all input; raise an EvomergeError with a one-line message on the first problem."""
    check_storage_url(cfg.storage)
    if cfg.name in study_names(cfg.storage):
        raise StudyError(f"study {cfg.name!r} already exists in {cfg.storage}; pass --study NEW_NAME")
    base = Checkpoint.open(cfg.models.base, allow_pickle=cfg.models.allow_pickle)
    sources = [(s, Checkpoint.open(s, allow_pickle=cfg.models.allow_pickle)) for s in cfg.models.sources]
    check_mergeable(base, sources)
    space = ParameterSpace(cfg.search_space, cfg.models.base, cfg.models.sources, num_layers(base.config), seed=cfg.optimizer.seed)
    tasks = task_specs(cfg)
    check_tasks(tasks, cfg.evaluation.include_paths)
    setup = WorkerSetup(
        base=cfg.models.base,
        sources=tuple(cfg.models.sources),
        tasks=tasks,
        include_paths=tuple(cfg.evaluation.include_paths),
        batch_size=cfg.evaluation.batch_size,
        dtype=cfg.models.dtype,
        allow_pickle=cfg.models.allow_pickle,
        trust_remote_code=cfg.models.trust_remote_code,
    )
    return Prepared(cfg, space, setup)


def run_search(prepared: Prepared, progress: Progress = print) -> SearchSummary:
    cfg, space = prepared.cfg, prepared.space
    store = StudyStore.create(cfg, {g.name: g.default for g in space.genes})
    x0 = np.array([g.to_unit(g.default) for g in space.genes])
    controller = make_controller(cfg.optimizer, x0, cfg.workers.n)
    progress(f"study {cfg.name!r} in {cfg.storage}: {len(space.genes)} genes, population {controller.popsize}, "
             f"budget {cfg.budget.trials} trials, {cfg.workers.n} workers")
    start_ray(cfg.workers.n, cfg.workers.cpus_per_worker)
    pool = WorkerPool(prepared.setup, cfg.workers.n, cpus=cfg.workers.cpus_per_worker, gpus=cfg.workers.gpus_per_worker, progress=progress)
    summary = SearchSummary(study=cfg.name, storage=cfg.storage, budget=cfg.budget.trials)
    started = time.perf_counter()
    try:
        _generations(cfg, space, controller, store, pool, summary, progress)
        _score_heldout(cfg, store, pool, summary, progress)
    finally:
        pool.close()
    summary.wall_s = time.perf_counter() - started
    return summary


def _generations(cfg: StudyConfig, space: ParameterSpace, controller: Controller, store: StudyStore,
                 pool: WorkerPool, summary: SearchSummary, progress: Progress) -> None:
    generation = 0
    while summary.trials < cfg.budget.trials:
        xs = controller.ask()[: cfg.budget.trials - summary.trials]
        fitness = _run_generation(generation, xs, space, store, pool, summary, progress)
        if len(xs) == controller.popsize:  # a truncated last generation is scored but not told
            controller.tell(xs, fitness)
        scored = [f for f in fitness if f is not None]
        summary.history.append({
            "generation": generation,
            "best": max(scored) if scored else None,
            "median": statistics.median(scored) if scored else None,
            "failures": fitness.count(None),
            "sigma": getattr(controller, "sigma", math.nan),
        })
        generation += 1


def _run_generation(generation: int, xs: list[np.ndarray], space: ParameterSpace, store: StudyStore,
                    pool: WorkerPool, summary: SearchSummary, progress: Progress) -> list[float | None]:
    jobs = []
    distributions = {g.name: g.distribution() for g in space.genes}
    for index, x in enumerate(xs):
        values = decode_unit(space.genes, x)
        recipe = space.decode(values)
        number = store.start_trial(values, distributions, {"generation": generation, "candidate": index, "recipe": recipe.to_dict()})
        jobs.append(Job(key=(index, number), recipe=recipe))
    fitness: list[float | None] = [None] * len(xs)
    for job, outcome in pool.run(jobs):
        index, number = job.key
        summary.trials += 1
        if isinstance(outcome, JobFailure):
            store.fail_trial(number, outcome.reason)
            summary.failed += 1
            progress(f"[{summary.trials}/{summary.budget}] trial {number} FAILED: {outcome.reason}")
            continue
        fitness[index] = outcome.fitness
        store.finish_trial(number, outcome.fitness, _result_attrs(outcome))
        if summary.best_fitness is None or outcome.fitness > summary.best_fitness:
            summary.best_fitness, summary.best_number = outcome.fitness, number
        progress(_progress_line(summary, generation, number, outcome))
    return fitness


def _result_attrs(result: CandidateResult) -> dict:
    attrs = {"scores.fitness": result.scores, "merge_s": round(result.merge_s, 4), "eval_s": round(result.eval_s, 4), "worker": result.worker}
    if result.peak_mem_mb is not None:
        attrs["peak_mem_mb"] = round(result.peak_mem_mb, 1)
    return attrs


def _progress_line(summary: SearchSummary, generation: int, number: int, r: CandidateResult) -> str:
    tasks = " ".join(f"{k}={v:.3f}" for k, v in r.scores.items())
    return (f"[{summary.trials}/{summary.budget}] gen {generation} trial {number}: fitness {r.fitness:.4f} ({tasks}) "
            f"| best {summary.best_fitness:.4f} (trial {summary.best_number}) | merge {r.merge_s:.2f}s eval {r.eval_s:.2f}s")


def _score_heldout(cfg: StudyConfig, store: StudyStore, pool: WorkerPool, summary: SearchSummary, progress: Progress) -> None:
    """Score the top-k trials (by fitness) on the held-out split and record it in the study."""
    k = cfg.evaluation.heldout_top_k
    top = sorted(store.completed(), key=lambda t: t.value, reverse=True)[:k]
    if not top:
        return
    progress(f"held-out: scoring the best {len(top)} trials")
    jobs = [Job(key=t.number, recipe=StudyStore.recipe_of(t), split="heldout") for t in top]
    for job, outcome in pool.run(jobs):
        if isinstance(outcome, JobFailure):
            progress(f"held-out: trial {job.key} failed: {outcome.reason}")
            continue
        store.set_heldout(job.key, outcome.scores, outcome.fitness)
        if job.key == summary.best_number:
            summary.best_heldout = outcome.fitness
        tasks = " ".join(f"{k}={v:.3f}" for k, v in outcome.scores.items())
        progress(f"held-out: trial {job.key}: {outcome.fitness:.4f} ({tasks})")
