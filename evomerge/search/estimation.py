"""Cheap fitness in a search (`evaluation.estimate`): anchors chosen once, estimates during, full scores at the end.

Before the first candidate, the known models are scored on every fitness example by the workers: the
base and each source, built as task arithmetic with one-hot weights (base + 1.0 * (source - base) is the
source exactly). Their per-example values choose each task's anchors (`runtime.estimate`), which the study
keeps, so a resume uses the same ones. Every candidate is then scored on its anchors only and told to the
optimizer by its estimate. At the end the best `rescore_top` candidates by estimate are scored on every
example; those full scores are what the study reports, ranks and exports (`StudyStore.ranked`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import numpy as np

from evomerge.config import StudyConfig
from evomerge.recipe import Recipe
from evomerge.runtime.estimate import Anchors, TaskAnchors, choose_anchors
from evomerge.runtime.messages import Job, JobFailure
from evomerge.runtime.pool import WorkerPool, from_queue
from evomerge.study.store import StudyStore, fitness_of

Progress = Callable[[str], None]


def known_model_recipes(cfg: StudyConfig) -> list[Recipe]:
    """The base (every weight 0) and each source (its weight 1, the others 0), as merge recipes."""
    sources = tuple(str(s) for s in cfg.models.sources)
    one_hots = [tuple(0.0 for _ in sources)] + [tuple(float(i == e) for i in range(len(sources))) for e in range(len(sources))]
    return [Recipe("task_arithmetic", str(cfg.models.base), sources, ({"weight": w},)) for w in one_hots]


def search_anchors(pool: WorkerPool, store: StudyStore, cfg: StudyConfig, progress: Progress) -> Anchors:
    """The study's anchors: stored ones (a resumed search), or chosen now from the known models."""
    stored = store.anchors()
    if stored is not None:
        return anchors_from_dict(stored)
    recipes = known_model_recipes(cfg)
    progress(f"estimate: scoring the base and {len(recipes) - 1} sources on every fitness example to choose anchors")
    queue = deque(Job(trial=-1 - i, recipe=r, values=True) for i, r in enumerate(recipes))
    values: dict[int, dict[str, list[float]]] = {}
    for job, outcome in pool.run(from_queue(queue)):
        if isinstance(outcome, JobFailure):
            raise RuntimeError(f"estimate: scoring known model {-1 - job.trial} failed: {outcome.reason}")
        values[-1 - job.trial] = outcome.values
    tasks = values[0].keys()
    per_task = {t: np.array([values[m][t] for m in sorted(values)]) for t in tasks}
    anchors = choose_anchors(per_task, cfg.evaluation.estimate.anchors, cfg.evaluation.estimate.seed)
    store.set_anchors(anchors_to_dict(anchors))
    shares = ", ".join(f"{t} {len(a.indices)}/{a.n_examples}" for t, a in anchors.tasks.items())
    progress(f"estimate: each candidate is scored on {anchors.examples()} anchor examples ({100 * anchors.share():.0f}%: {shares})")
    return anchors


def rescore_in_full(pool: WorkerPool, store: StudyStore, top: int, progress: Progress) -> None:
    """Score the best `top` trials by estimate on every fitness example, and record those full scores."""
    best = [t for t in sorted(store.completed(), key=fitness_of, reverse=True)
            if store.full(t.number) is None][:top]
    if not best:
        return
    progress(f"estimate: scoring the best {len(best)} candidates by estimate on every fitness example")
    queue = deque(Job(trial=t.number, recipe=StudyStore.recipe_of(t)) for t in best)
    for job, outcome in pool.run(from_queue(queue)):
        if isinstance(outcome, JobFailure):
            progress(f"estimate: trial {job.trial} failed in full: {outcome.reason}")
            continue
        store.set_full(job.trial, outcome.scores, outcome.fitness)
        progress(f"estimate: trial {job.trial}: full fitness {outcome.fitness:.4f}")


def anchors_to_dict(anchors: Anchors) -> dict:
    return {t: {"indices": list(a.indices), "weights": list(a.weights), "n": a.n_examples} for t, a in anchors.tasks.items()}


def anchors_from_dict(data: dict) -> Anchors:
    return Anchors({t: TaskAnchors(tuple(a["indices"]), tuple(a["weights"]), a["n"]) for t, a in data.items()})
