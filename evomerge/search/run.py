"""One search: validate everything, then ask, dispatch, score and tell, generation by generation.

Everything that can be wrong with the input is checked in `prepare` before the study is written or Ray
starts: model paths, tensor names and shapes, the search space against the merge methods, the lm-eval
task names, the storage URL and study name. The controller process is the study's only writer.

Resume: the optimizer is checkpointed in the study before each generation is asked. `resume` marks
trials left RUNNING as failed, restores the checkpoint, asks the same generation again (the same
candidates, since the controller's RNG state is part of the checkpoint), reuses the candidates of that
generation that already have an outcome, and runs the rest. A study stopped before its first checkpoint
(Ctrl-C while workers start) resumes from its start; a finished one returns its summary without Ray.

Reliability: a controller holds the study's lease while it runs (`study.lease`), so a second `search`
or `resume` of the same study is refused. Ctrl-C and SIGTERM (a scheduler's preemption) stop the same
clean way: the trials in flight are marked interrupted (resume runs them again), the workers are
closed, the lease is released. A search whose first 2 x workers evaluations all fail with the same
error stops with that error instead of spending its budget on it.
"""

from __future__ import annotations

import dataclasses
import math
import re
import signal
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from optuna.trial import TrialState

from evomerge.config import OPTUNA_SAMPLERS, StudyConfig
from evomerge.errors import ConfigError, SearchError, Stopped, StudyError
from evomerge.models.headers import broken_checkpoint_message
from evomerge.runtime.messages import CandidateResult, FirstPass, Job, JobFailure
from evomerge.runtime.pool import DEFAULT_WORKER, WorkerPool, from_queue, start_ray
from evomerge.runtime.estimate import Anchors
from evomerge.search.controllers import Controller, loads, make_controller
from evomerge.search.estimation import rescore_in_full, search_anchors
from evomerge.search.prepare import Prepared, prepare
from evomerge.search.samplers import sampler_for
from evomerge.search.spaces import decode_unit
from evomerge.study.dashboard import artifact_dir_for, upload_recipe_artifact, write_study_note
from evomerge.study.lease import LeaseLostError, refuse_if_held
from evomerge.study.store import FIRST_PASS_ATTR, MAX_ATTEMPTS, StudyStore, fitness_of

Progress = Callable[[str], None]


@dataclass
class SearchSummary:
    study: str
    storage: str
    budget: int = 0
    trials: int = 0  # candidates with a final outcome, resumed ones included
    failed: int = 0
    pruned: int = 0  # held back after a multi-fidelity first pass
    best_number: int | None = None
    best_fitness: float | None = None
    best_heldout: float | None = None
    wall_s: float = 0.0
    history: list[dict] = field(default_factory=list)


def run_search(prepared: Prepared, progress: Progress = print) -> SearchSummary:
    """Start a new study and search it to its budget."""
    cfg, space = prepared.cfg, prepared.space
    store = StudyStore.create(cfg, {g.name: g.default for g in space.genes}, sampler_for(cfg))
    with store.controlling():
        write_study_note(store.study, cfg.to_yaml(), cfg.storage, cfg.name)
        return _drive(prepared, store, _new_controller(prepared), 0, progress)


def _new_controller(prepared: Prepared) -> Controller | None:
    """evomerge's own optimizer at the start of a search (None for Optuna samplers), from the genes' defaults."""
    cfg, genes = prepared.cfg, prepared.space.genes
    if cfg.optimizer.kind in OPTUNA_SAMPLERS:
        return None
    return make_controller(cfg.optimizer, np.array([g.to_unit(g.default) for g in genes]), cfg.workers.n)


def resume_search(store: StudyStore, more_trials: int | None, progress: Progress = print,
                  worker_cls: type | str = DEFAULT_WORKER) -> SearchSummary:
    """Continue a stopped or killed study from its last optimizer checkpoint (from its start when it
    stopped before the first one). Refused, before anything is written, while another controller runs
    it; a finished study (budget spent, held-out scored) returns its summary without starting Ray."""
    if more_trials is not None and more_trials < 1:
        raise ConfigError(f"--trials {more_trials}: resume evaluates this many more candidates; give a number >= 1, "
                          "or leave --trials out to finish the stored budget")
    refuse_if_held(store.study)
    cfg = store.config
    if more_trials is None and _finished(store, cfg):
        progress(f"study {cfg.name!r} is finished ({cfg.budget.trials} candidates, held-out scored); nothing to resume "
                 "(pass --trials N to search N more candidates)")
        return finished_summary(store, cfg)
    if more_trials is not None:
        cfg = cfg.with_overrides(**{"budget.trials": len(store.candidate_outcomes()) + more_trials})
    prepared = dataclasses.replace(prepare(cfg, new_study=False), worker_cls=worker_cls)
    store.study.sampler = sampler_for(cfg)  # its configured sampler back (samplers are not stored)
    with store.controlling() as lease:
        if lease.took_over is not None:
            progress(f"resume: took over the lease of a stopped controller ({lease.took_over.describe()})")
        orphans = store.fail_orphans()
        if orphans:
            progress(f"resume: marked {len(orphans)} orphaned RUNNING trial(s) as failed: {orphans}; their candidates run again")
        if more_trials is not None:
            store.update_config(cfg)
        generation, controller = _restored_controller(store, prepared)
        return _drive(prepared, store, controller, generation, progress)


def _restored_controller(store: StudyStore, prepared: Prepared) -> tuple[int, Controller | None]:
    """(generation, optimizer) from the last checkpoint; generation 0 and a new optimizer when the study
    stopped before its first checkpoint (the same seed asks the same candidates)."""
    checkpoint = store.load_controller() if prepared.cfg.optimizer.kind not in OPTUNA_SAMPLERS else (0, None)
    if checkpoint is None:
        return 0, _new_controller(prepared)
    generation, state = checkpoint
    return generation, None if state is None else loads(state)


def _finished(store: StudyStore, cfg: StudyConfig) -> bool:
    """Every candidate of the budget has an outcome and the best trials have their held-out scores."""
    if len(store.candidate_outcomes()) < cfg.budget.trials:
        return False
    top = store.ranked()[: cfg.evaluation.heldout_top_k]
    return all(store.heldout(t.number) is not None for t in top)


def finished_summary(store: StudyStore, cfg: StudyConfig) -> SearchSummary:
    """The summary of a study from what it stores (no search runs)."""
    outcomes = store.candidate_outcomes()
    summary = SearchSummary(study=cfg.name, storage=cfg.storage, budget=cfg.budget.trials, trials=len(outcomes),
                            failed=sum(f is None for f in outcomes.values()), history=store.history())
    summary.pruned = len(store.study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)))
    ranked = store.ranked()
    if ranked:
        best = ranked[0]
        heldout = store.heldout(best.number)
        summary.best_number, summary.best_fitness = best.number, store.reported_fitness(best)
        summary.best_heldout = None if heldout is None else heldout["fitness"]
    return summary


def _drive(prepared: Prepared, store: StudyStore, controller: Controller | None, generation: int, progress: Progress) -> SearchSummary:
    cfg = prepared.cfg
    how = f"population {controller.popsize}" if controller else f"Optuna sampler {cfg.optimizer.kind}"
    progress(f"study {cfg.name!r} in {cfg.storage}: {len(prepared.space.genes)} genes, {how}, "
             f"budget {cfg.budget.trials} trials, {cfg.workers.n} workers")
    start_ray(cfg.workers.n, cfg.workers.cpus_per_worker)
    with _sigterm_stops():  # after ray.init, which installs a SIGTERM handler of its own
        pool = None
        try:
            pool = WorkerPool(prepared.setup, cfg.workers.n, cpus=cfg.workers.cpus_per_worker,
                              gpus=cfg.workers.gpus_per_worker, progress=progress, worker_cls=prepared.worker_cls)
            store.record_workers([dataclasses.asdict(info) for info in pool.infos])
            estimate = cfg.evaluation.estimate
            anchors = search_anchors(pool, store, cfg, progress) if estimate is not None else None
            run = SearchRun(prepared, store, controller, pool, progress, anchors=anchors)
            started = time.perf_counter()
            if controller is None:
                run.sampled()
            else:
                run.generations(generation)
            if estimate is not None:
                rescore_in_full(pool, store, estimate.rescore_top, progress)
                run.note_best()
            run.score_heldout()
        except BaseException as exc:
            _abandon_running(store, exc, progress)
            raise
        finally:
            if pool is not None:
                pool.close()
    run.summary.wall_s = time.perf_counter() - started
    return run.summary


def _abandon_running(store: StudyStore, error: BaseException, progress: Progress) -> None:
    """A stopping controller marks the trials it started and could not finish as interrupted (resume
    runs them again), unless its lease was taken over: then it writes nothing more."""
    if isinstance(error, LeaseLostError):
        return
    why = error.signal_name if isinstance(error, Stopped) else "Ctrl-C" if isinstance(error, KeyboardInterrupt) \
        else f"{type(error).__name__}: {str(error).strip()[:200]}"
    try:
        numbers = store.abandon_running(why)
    except Exception as exc:  # noqa: BLE001 -- noted on the error that stopped the search, which propagates
        error.add_note(f"trials in flight were left RUNNING ({type(exc).__name__}: {exc}); resume marks them as orphans")
        return
    if numbers:
        progress(f"stopping: marked {len(numbers)} unfinished trial(s) as interrupted: {numbers}; `evomerge resume` runs them again")


@contextmanager
def _sigterm_stops() -> Iterator[None]:
    """SIGTERM (a cluster scheduler's preemption) stops the search as Ctrl-C does: a `Stopped` raised in
    the controller's main thread, so the same cleanup runs (Ray's own handler exits abruptly instead).
    A second SIGTERM during that cleanup is ignored; the previous handler is back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Stopped("SIGTERM")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class _Generation:
    """One generation in flight: its candidates so far, their outcomes, and what is left to hand out."""

    number: int
    xs: list[np.ndarray]
    size: int  # popsize, or fewer when the budget ends inside this generation
    fitness: dict[int, float | None] = field(default_factory=dict)  # candidate -> outcome (None: failed)
    queue: deque[tuple[int, int]] = field(default_factory=deque)  # (candidate, attempt) not yet dispatched

    @property
    def complete(self) -> bool:
        return len(self.fitness) == self.size


class SearchRun:
    """The controller loop of one search process: the only writer of the study."""

    def __init__(self, prepared: Prepared, store: StudyStore, controller: Controller | None, pool: WorkerPool,
                 progress: Progress, *, anchors: Anchors | None = None) -> None:
        self.cfg, self.space, self.anchors = prepared.cfg, prepared.space, anchors
        self.store, self.controller, self.pool, self.progress = store, controller, pool, progress
        self.distributions = {g.name: g.distribution() for g in self.space.genes}
        self.outcomes = store.candidate_outcomes()  # (generation, candidate) -> fitness | None
        self.first_passes = store.first_passes()  # (generation, candidate) -> first-pass fitness
        self.artifact_dir = _artifact_dir(self.cfg.storage, progress)
        self.summary = SearchSummary(study=self.cfg.name, storage=self.cfg.storage, budget=self.cfg.budget.trials)
        self._first_failures: list[str] | None = []  # this run's failure reasons until a candidate succeeds
        self._note_previous()

    def _note_previous(self) -> None:
        self.summary.trials = len(self.outcomes)
        self.summary.failed = sum(f is None for f in self.outcomes.values())
        self.note_best()

    def note_best(self) -> None:
        """The summary's best trial, as the study ranks it (full scores before estimates)."""
        ranked = self.store.ranked()
        if ranked:
            self.summary.best_number, self.summary.best_fitness = ranked[0].number, self.store.reported_fitness(ranked[0])

    def generations(self, generation: int) -> None:
        """Our controllers: generations told whole and in order; workers that would wait for the slowest
        candidates of one generation take the early candidates of the next (the controller's lookahead).

        At most two generations are in flight. The optimizer is checkpointed when a generation opens,
        before it is asked; a truncated last generation (the budget ends inside it) is scored, not told.
        """
        current = self._open(generation)
        following = self._following(current)

        def next_job() -> Job | None:
            for gen in (current, following):
                if gen is not None and gen.queue:
                    index, attempt = gen.queue.popleft()
                    return self._job(gen.number, index, gen.xs[index], attempt)
            return None

        def advance() -> bool:
            """Tell every finished generation and open the next; False when the search is over."""
            nonlocal current, following
            while current is not None and current.complete:
                if current.size < self.controller.popsize:
                    return False  # scored, not told: resume (with more trials) completes and tells it
                fitness = [current.fitness[i] for i in range(current.size)]
                self.controller.tell(current.xs, fitness)
                self._record_history(current.number, fitness)
                current = self._open(current.number + 1, following)
                following = self._following(current)
            return current is not None

        if not advance():
            return
        for job, outcome in self.pool.run(next_job):
            gen = current if job.generation == current.number else following
            if not isinstance(outcome, JobFailure):
                gen.fitness[job.candidate] = outcome.fitness
                self._completed(job, outcome)
            elif self._failed(job, outcome):
                gen.queue.append((job.candidate, job.attempt + 1))
            else:
                gen.fitness[job.candidate] = None
            if not advance():
                return  # nothing is in flight: the last generation was the only one open

    def _open(self, number: int, early: _Generation | None = None) -> _Generation | None:
        """Checkpoint the optimizer, then ask generation `number` (None once the budget is spent).

        `early` holds the candidates of this generation that were asked (and maybe dispatched or done)
        when the previous one opened; the rest are queued here.
        """
        self.store.save_controller(number, self.controller.dumps())
        size = self._size(number)
        if size <= 0:
            return None
        gen = early if early is not None else _Generation(number, [], size)
        asked_early = len(gen.xs)
        gen.xs = self.controller.ask_generation()
        self._take_or_queue(gen, range(min(asked_early, size), size))
        return gen

    def _following(self, current: _Generation | None) -> _Generation | None:
        """The next generation's early candidates (the controller asked them when `current` opened)."""
        if current is None or current.size < self.controller.popsize:
            return None
        size = self._size(current.number + 1)
        if size <= 0:
            return None
        gen = _Generation(current.number + 1, list(self.controller.early), size)
        self._take_or_queue(gen, range(min(len(gen.xs), size)))
        return gen

    def _size(self, number: int) -> int:
        """Candidates in generation `number`: popsize, fewer where the budget ends, <= 0 past it."""
        return min(self.controller.popsize, self.cfg.budget.trials - number * self.controller.popsize)

    def _take_or_queue(self, gen: _Generation, indices: range) -> None:
        """Outcomes the study already has for these candidates (a resumed run) are taken; the rest queued."""
        for i in indices:
            if (gen.number, i) in self.outcomes:
                gen.fitness[i] = self.outcomes[(gen.number, i)]
            else:
                gen.queue.append((i, 0))

    def sampled(self) -> None:
        """Optuna samplers: a new trial whenever a worker frees up, until the budget is spent."""
        retries: deque[Job] = deque()
        counter = iter(range(len(self.outcomes), self.cfg.budget.trials))

        def next_job() -> Job | None:
            if retries:
                failed = retries.popleft()  # the same proposal again, in a new trial
                return self._job(0, failed.candidate, dict(failed.params), attempt=failed.attempt + 1)
            index = next(counter, None)
            return None if index is None else self._job(0, index, None, attempt=0)

        for job, outcome in self.pool.run(next_job):
            if isinstance(outcome, JobFailure):
                if self._failed(job, outcome):
                    retries.append(job)
            else:
                self._completed(job, outcome)

    def _job(self, generation: int, index: int, x: np.ndarray | dict | None, attempt: int) -> Job:
        """Start the trial for one candidate: `x` a point of the unit cube (our controllers), a dict of
        gene values (a sampler's proposal being retried), or None (ask the study's sampler)."""
        values = decode_unit(self.space.genes, x) if isinstance(x, np.ndarray) else x
        attrs = {"generation": generation, "candidate": index, "attempt": attempt}
        number, values = self.store.start_trial(values, self.distributions, attrs)
        recipe = self.space.decode(values)
        self.store.set_recipe(number, recipe.to_dict())
        if self.artifact_dir is not None:  # while RUNNING: Optuna refuses artifacts on finished trials
            upload_recipe_artifact(self.store.study, number, recipe.to_yaml(), self.artifact_dir)
        return Job(trial=number, recipe=recipe, attempt=attempt, first_pass=self._first_pass(generation, index),
                   generation=generation, candidate=index, params=values, anchors=self.anchors)

    def _first_pass(self, generation: int, index: int) -> FirstPass | None:
        """Multi-fidelity: the bar a candidate's first pass must reach to be scored in full.

        The bar is a quantile of earlier candidates' first passes. With generations it uses only
        generations that are always complete when this candidate is dispatched (g-1 for fresh candidates,
        g-2 for early ones), so it does not depend on timing and a run repeats exactly. Optuna samplers use
        every first pass known so far, after a warm-up.
        """
        cfg = self.cfg.evaluation.first_pass
        if cfg is None:
            return None
        if self.controller is not None:
            last_complete = generation - (2 if index < self.controller.lookahead else 1)
            earlier = [f for (g, _), f in self.first_passes.items() if g <= last_complete]
            enough = bool(earlier)
        else:
            earlier = list(self.first_passes.values())
            enough = len(earlier) >= (cfg.warmup or 2 * self.cfg.workers.n)
        bar = float(np.quantile(earlier, 1 - cfg.promote)) if enough else -math.inf
        return FirstPass(cfg.fraction, bar)

    def _failed(self, job: Job, failure: JobFailure) -> bool:
        """Record a failed attempt; True when the candidate gets another attempt."""
        number = job.trial
        self.store.fail_trial(number, failure.reason)
        retry = job.attempt + 1 < MAX_ATTEMPTS
        if not retry:
            self.outcomes[(job.generation, job.candidate)] = None
            self.summary.trials += 1
            self.summary.failed += 1
        what = "retrying once" if retry else "giving up; the optimizer sees it as failed"
        self.progress(f"[{self.summary.trials}/{self.summary.budget}] trial {number} FAILED ({what}): {failure.reason}")
        self._stop_if_hopeless(failure.reason)
        return retry

    def _stop_if_hopeless(self, reason: str) -> None:
        """A search whose first 2 x workers evaluations all fail with the same error (numbers aside) stops
        with that error: every later candidate would fail the same way (a NaN in a checkpoint, a metric the
        task does not report, an out-of-memory at any recipe). One success disarms this for the run."""
        if self._first_failures is None:
            return
        self._first_failures.append(re.sub(r"\d+(\.\d+)?", "#", reason))
        n = 2 * self.cfg.workers.n
        if len(self._first_failures) == n and len(set(self._first_failures)) == 1:
            raise SearchError(_hopeless_message(self.cfg, reason, n))

    def _completed(self, job: Job, result: CandidateResult) -> None:
        generation, index, number = job.generation, job.candidate, job.trial
        self._first_failures = None
        objectives = None
        if self.cfg.optimizer.objectives == "per_task":
            objectives = [result.scores[t.name] for t in self.cfg.evaluation.tasks]
        attrs = _result_attrs(result)
        if result.first_pass is not None:
            self.first_passes[(generation, index)] = attrs[FIRST_PASS_ATTR] = result.first_pass_fitness
            attrs["scores.first_pass"] = result.first_pass
        if result.full:
            recorded = self.store.finish_trial(number, result.fitness, attrs, objectives)
        else:
            recorded = self.store.prune_trial(number, result.fitness, attrs)
        if not recorded:
            self.progress(f"trial {number} was finished outside evomerge (dashboard?); its state is kept")
        self.outcomes[(generation, index)] = result.fitness
        self.summary.trials += 1
        self.summary.pruned += not result.full
        if result.full and (self.summary.best_fitness is None or result.fitness > self.summary.best_fitness):
            self.summary.best_fitness, self.summary.best_number = result.fitness, number
        tasks = " ".join(f"{k}={v:.3f}" for k, v in result.scores.items())
        what = ("estimated fitness" if result.estimated else "fitness") if result.full else "first pass (not promoted)"
        best = "-" if self.summary.best_fitness is None else f"{self.summary.best_fitness:.4f} (trial {self.summary.best_number})"
        self.progress(
            f"[{self.summary.trials}/{self.summary.budget}] gen {generation} trial {number}: {what} {result.fitness:.4f} ({tasks}) "
            f"| best {best} | merge {result.merge_s:.2f}s eval {result.eval_s:.2f}s"
        )

    def _record_history(self, generation: int, fitness: list[float | None]) -> None:
        scored = [f for f in fitness if f is not None]
        sigma = self.controller.sigma
        row = {
            "generation": generation,
            "best": max(scored) if scored else None,
            "median": statistics.median(scored) if scored else None,
            "failures": fitness.count(None),
            "sigma": None if math.isnan(sigma) else sigma,
        }
        self.summary.history.append(row)
        self.store.record_generation(row)

    def score_heldout(self) -> None:
        """Score the top-k trials (by fitness) on the held-out split and record it in the study."""
        top = self.store.ranked()[: self.cfg.evaluation.heldout_top_k]
        top = [t for t in top if self.store.heldout(t.number) is None]
        if top:
            self.progress(f"held-out: scoring the best {len(top)} trials")
            self.score_on_heldout(top)

    def score_on_heldout(self, trials: list) -> None:
        """Score these trials on the held-out split and record it in the study (a failure is reported)."""
        queue = deque(Job(trial=t.number, recipe=StudyStore.recipe_of(t), split="heldout") for t in trials)
        for job, outcome in self.pool.run(from_queue(queue)):
            if isinstance(outcome, JobFailure):
                self.progress(f"held-out: trial {job.trial} failed: {outcome.reason}")
                continue
            self.store.set_heldout(job.trial, outcome.scores, outcome.fitness)
            if job.trial == self.summary.best_number:
                self.summary.best_heldout = outcome.fitness
            tasks = " ".join(f"{k}={v:.3f}" for k, v in outcome.scores.items())
            self.progress(f"held-out: trial {job.trial}: {outcome.fitness:.4f} ({tasks})")


def _hopeless_message(cfg: StudyConfig, reason: str, n: int) -> str:
    """The one line a hopeless search stops with: the broken checkpoint when a NaN or inf in one made
    every merge fail, else the shared error."""
    models = (cfg.models.base, *cfg.models.sources)
    broken = broken_checkpoint_message([str(m) for m in models], reason, allow_pickle=cfg.models.allow_pickle)
    if broken is not None:
        return broken
    return (f"the first {n} candidates all failed with the same error, so every candidate would: {reason}; fix that, "
            f"then continue with `evomerge resume {cfg.name} --storage URL`, or remove the study with `evomerge delete`")


def _artifact_dir(storage: str, progress: Progress) -> Path | None:
    """Where recipe artifacts go; None (with a note) for a database study without a configured folder."""
    try:
        folder = artifact_dir_for(storage)
    except StudyError as exc:
        progress(f"note: recipes are not uploaded as dashboard artifacts: {exc}")
        return None
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _result_attrs(result: CandidateResult) -> dict:
    attrs = {"scores.fitness": result.scores, "merge_s": round(result.merge_s, 4), "eval_s": round(result.eval_s, 4), "worker": result.worker}
    if result.peak_mem_mb is not None:
        attrs["peak_mem_mb"] = round(result.peak_mem_mb, 1)
    if result.estimated:  # the scores and fitness are estimates from `examples` anchor examples
        attrs.update(estimated=True, examples=result.examples)
    return attrs
