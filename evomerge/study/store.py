"""The Optuna study: the one place a search's trials, recipes and scores are written.

Only the controller process writes (SQLite tolerates one writer; PostgreSQL is for clusters). Each
candidate is a trial: its genes are the trial params (real values, readable in optuna-dashboard), its
recipe and per-task fitness scores are user attributes. The study keeps the full resolved config, so
export and status need only the storage URL and the study name. Held-out scores are computed after a
trial has finished, and Optuna forbids changing finished trials, so they live in study user attributes
(`heldout.<trial number>`).

One controller at a time writes a study: it holds the study's lease (`controlling`, see `study.lease`),
and every write first checks that it still does. A controller that stops (Ctrl-C, SIGTERM, an error)
marks the trials it started and could not finish as interrupted; like the orphans a killed controller
leaves, they are not outcomes, and resume runs their candidates again.
"""

from __future__ import annotations

import base64
import json
import logging
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import optuna
import yaml

from evomerge.config import StudyConfig, parse_config
from evomerge.errors import StudyError
from evomerge.recipe import PathRecipe, Recipe, recipe_from_dict
from evomerge.study.lease import ControllerLease, refuse_if_held
from evomerge.study.storage import StorageUrl

optuna.logging.set_verbosity(optuna.logging.WARNING)
logging.getLogger("optuna").setLevel(logging.WARNING)

CONFIG_ATTR = "evomerge.config"
HELDOUT_PREFIX = "heldout."
CONTROLLER_ATTR = "evomerge.controller"  # -> {"generation", "bytes", "key"}; the state is one attribute, `key`
LEGACY_OPTIMIZER_ATTR = "evomerge.optimizer"  # studies written before 0.2 keep chunked state under this
HISTORY_PREFIX = "history.g"  # per generation: best, median, sigma, failures
FULL_PREFIX = "full."  # estimated trials scored on every example at the end: full.<trial number>
ANCHORS_ATTR = "evomerge.anchors"  # the anchor examples of a search that estimates fitness
WORKERS_ATTR = "workers"  # each worker's start-up time and resident memory
FIRST_PASS_ATTR = "first_pass_fitness"
MAX_ATTEMPTS = 2  # a failed candidate is retried once, then told to the optimizer as failed
ORPHANED = "orphaned"  # fail reasons that are no outcome of their candidate: it runs again on resume
INTERRUPTED = "interrupted"


def study_names(url: str | StorageUrl, backend: optuna.storages.BaseStorage | None = None) -> list[str]:
    """The studies in a storage (none for a file that does not exist: it is not created)."""
    storage = StorageUrl.parse(url)
    if not storage.exists():
        return []
    return [s.study_name for s in optuna.get_all_study_summaries(storage=backend or storage.optuna())]


def refuse_existing(url: str | StorageUrl, name: str) -> None:
    """The one "study already exists" check: a StudyError that says how to go on."""
    storage = StorageUrl.parse(url)
    if name in study_names(storage):
        raise StudyError(
            f"study {name!r} already exists in {storage.redacted}; pass --study NEW_NAME, continue it with "
            f"`evomerge resume {name} --storage {storage.redacted}`, look at it with `evomerge status --storage "
            f"{storage.redacted} {name}`, or delete it with `evomerge delete {name} --storage {storage.redacted}`"
        )


def delete_study(store: StudyStore, url: str | StorageUrl) -> int:
    """Delete a study opened from `url`, and its recipe artifacts (refused while a controller runs it);
    returns the number of trials deleted with it."""
    from evomerge.study.dashboard import artifact_dir_for, remove_recipe_artifacts

    refuse_if_held(store.study)
    storage = StorageUrl.parse(url)
    storage.check_writable()
    try:
        folder = artifact_dir_for(storage)
    except StudyError:  # a database without an artifact folder: no artifacts to find
        folder = None
    if folder is not None:
        remove_recipe_artifacts(store.study, folder)
    trials = len(store.study.get_trials(deepcopy=False))
    optuna.delete_study(study_name=store.study.study_name, storage=store.study._storage)
    return trials


def fitness_of(trial: optuna.trial.FrozenTrial) -> float:
    """The weighted-mean fitness of a completed trial (multi-objective studies keep it as an attribute)."""
    return trial.user_attrs.get("fitness", trial.value if len(trial.values or ()) == 1 else float("nan"))


class StudyStore:
    """The study's single writer."""

    def __init__(self, study: optuna.Study) -> None:
        self.study = study
        self._running: dict[int, optuna.Trial] = {}
        self._lease: ControllerLease | None = None

    @classmethod
    def create(cls, cfg: StudyConfig, genes: Mapping[str, Any], sampler: optuna.samplers.BaseSampler | None = None) -> StudyStore:
        """A new study for `cfg`; `sampler` proposes trials (the controller's; default: one that replays
        enqueued params, which is all evomerge's own controllers need)."""
        storage = StorageUrl.parse(cfg.storage)
        storage.check_writable()
        refuse_existing(storage, cfg.name)
        directions = ["maximize"] * (len(cfg.evaluation.tasks) if cfg.optimizer.objectives == "per_task" else 1)
        try:
            study = optuna.create_study(storage=storage.optuna(), study_name=cfg.name, directions=directions,
                                        sampler=sampler or optuna.samplers.RandomSampler(seed=cfg.optimizer.seed))
        except optuna.exceptions.DuplicatedStudyError:  # created by another process since refuse_existing
            refuse_existing(storage, cfg.name)
            raise
        study.set_user_attr(CONFIG_ATTR, cfg.to_yaml())
        study.set_user_attr("evomerge.genes", list(genes))
        return cls(study)

    @classmethod
    def open(cls, url: str | StorageUrl, name: str | None) -> StudyStore:
        storage = StorageUrl.parse(url)
        backend = storage.optuna() if storage.exists() else None
        names = study_names(storage, backend)
        if name is None:
            if len(names) != 1:
                raise StudyError(f"storage {storage.redacted} holds {len(names)} studies ({', '.join(names) or 'none'}); name one")
            name = names[0]
        if name not in names:
            raise StudyError(f"study {name!r} not found in {storage.redacted} (studies there: {', '.join(names) or 'none'})")
        return cls(optuna.load_study(study_name=name, storage=backend))

    @contextmanager
    def controlling(self, ttl_s: float | None = None) -> Iterator[ControllerLease]:
        """Hold the study's controller lease for the block: a LeaseHeldError (naming the holder) while
        another controller runs the study; inside, every write checks the lease is still held."""
        lease = ControllerLease(self.study, ttl_s)
        lease.acquire()
        self._lease = lease
        try:
            yield lease
        except BaseException as exc:
            _release_after(lease, exc)
            raise
        else:
            lease.release()
        finally:
            self._lease = None

    def _guard(self) -> None:
        """Before every write: the lease, when one is held, must still be ours (LeaseLostError otherwise)."""
        if self._lease is not None:
            self._lease.check()

    @property
    def config(self) -> StudyConfig:
        text = self.study.user_attrs.get(CONFIG_ATTR)
        if text is None:
            raise StudyError(f"study {self.study.study_name!r} was not made by evomerge (no stored config)")
        return parse_config(yaml.safe_load(text), source=f"study {self.study.study_name}")

    def start_trial(self, params: Mapping[str, Any] | None, distributions: Mapping[str, Any], attrs: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        """A RUNNING trial holding exactly `params` (or, when None, params the study's sampler proposes);
        returns its number and params."""
        self._guard()
        if params is not None:
            self.study.enqueue_trial(dict(params), user_attrs=dict(attrs))
        trial = self.study.ask(fixed_distributions=dict(distributions))
        if params is None:
            for key, value in attrs.items():
                trial.set_user_attr(key, value)
        self._running[trial.number] = trial
        return trial.number, dict(trial.params)

    def set_recipe(self, number: int, recipe: dict[str, Any]) -> None:
        self._guard()
        self._running[number].set_user_attr("recipe", recipe)

    def finish_trial(self, number: int, fitness: float, attrs: Mapping[str, Any], objectives: list[float] | None = None) -> bool:
        """Record a scored trial; False when someone finished it meanwhile (in the dashboard, say).

        `fitness` is the weighted mean over tasks (also kept as the `fitness` user attribute); a
        multi-objective study is told `objectives` (one score per task) instead.
        """
        return self._close(number, {**attrs, "fitness": fitness}, fitness=objectives or fitness)

    def prune_trial(self, number: int, fitness: float, attrs: Mapping[str, Any]) -> bool:
        """Record a candidate held back after its multi-fidelity first pass: PRUNED, with the first-pass
        fitness as its value (and `fitness` attribute); False when someone finished it meanwhile."""
        try:
            self._running[number].report(fitness, step=0)
        except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
            pass  # finished elsewhere; _close says so
        return self._close(number, {**attrs, "fitness": fitness}, state=optuna.trial.TrialState.PRUNED)

    def fail_trial(self, number: int, reason: str) -> bool:
        return self._close(number, {"fail_reason": reason}, state=optuna.trial.TrialState.FAIL)

    def abandon_running(self, why: str) -> list[int]:
        """Fail the trials this controller started and could not finish (it is stopping: `why`); they are
        no outcome of their candidates, which resume runs again. Returns their numbers.

        A stop (Ctrl-C, SIGTERM) lands between any two Python statements, also inside `start_trial`
        after the study made the trial and before this store knew it: as the lease holder, every
        unfinished trial in the study is one this controller started, so those are failed too."""
        self._adopt_unfinished()
        why = f"{INTERRUPTED}: the search stopped ({why}) before this trial finished; `evomerge resume` runs it again"
        return [number for number in sorted(self._running) if self.fail_trial(number, why)]

    def _adopt_unfinished(self) -> list[int]:
        """Track the study's RUNNING and WAITING trials this store does not know yet; returns their numbers.
        A WAITING trial is one `start_trial` enqueued and a stop or a kill left before `ask` took it; the
        next `ask` would hand its params (and candidate) to another candidate, so it is made RUNNING here,
        to be failed like the rest."""
        waiting, running = optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING
        adopted = []
        for frozen in self.study.get_trials(deepcopy=False, states=(waiting, running)):
            if frozen.number in self._running:
                continue
            if frozen.state == waiting:
                self.study._storage.set_trial_state_values(frozen._trial_id, running)
            self._running[frozen.number] = optuna.Trial(self.study, frozen._trial_id)
            adopted.append(frozen.number)
        return adopted

    def _close(self, number: int, attrs: dict[str, Any], **outcome: Any) -> bool:
        self._guard()
        trial = self._running[number]  # known until told: a stop in between leaves it to abandon_running
        try:
            for key, value in attrs.items():
                trial.set_user_attr(key, value)
            self.study.tell(trial, outcome.get("fitness"), state=outcome.get("state"), skip_if_finished=True)
            told = True
        except optuna.exceptions.UpdateFinishedTrialError:
            told = False
        del self._running[number]
        return told

    def save_controller(self, generation: int, state: bytes) -> None:
        """Checkpoint the optimizer as it is before asking `generation`: one attribute holding the
        compressed state, then the header that points at it (written last, so a controller killed
        mid-checkpoint leaves the previous checkpoint whole); the superseded state is blanked."""
        self._guard()
        key = f"{CONTROLLER_ATTR}.g{generation}"
        self.study.set_user_attr(key, base64.b64encode(zlib.compress(state, 6)).decode())
        previous = self.study.user_attrs.get(CONTROLLER_ATTR)
        self.study.set_user_attr(CONTROLLER_ATTR, {"generation": generation, "bytes": len(state), "key": key})
        if previous and previous["key"] != key:
            self.study.set_user_attr(previous["key"], "")

    def load_controller(self) -> tuple[int, bytes] | None:
        """(generation, state) of the last optimizer checkpoint; None before the first."""
        attrs = self.study.user_attrs
        head = attrs.get(CONTROLLER_ATTR)
        if head is not None:
            return head["generation"], zlib.decompress(base64.b64decode(attrs[head["key"]]))
        legacy = attrs.get(LEGACY_OPTIMIZER_ATTR)  # chunked across attributes by evomerge 0.1
        if legacy is None:
            return None
        text = "".join(attrs[f"{LEGACY_OPTIMIZER_ATTR}.g{legacy['generation']}.{i}"] for i in range(legacy["chunks"]))
        return legacy["generation"], zlib.decompress(base64.b64decode(text))

    def record_generation(self, row: Mapping[str, Any]) -> None:
        """One generation's summary (best, median, sigma, failures), shown with the study's attributes."""
        self._guard()
        self.study.set_user_attr(f"{HISTORY_PREFIX}{row['generation']}", dict(row))

    def history(self) -> list[dict[str, Any]]:
        rows = [v for k, v in self.study.user_attrs.items() if k.startswith(HISTORY_PREFIX)]
        return sorted(rows, key=lambda r: r["generation"])

    def record_workers(self, workers: list[Mapping[str, Any]]) -> None:
        """Each worker's host:pid, device, start-up seconds and resident bytes (the latest start)."""
        self._guard()
        self.study.set_user_attr(WORKERS_ATTR, [dict(w) for w in workers])

    def fail_orphans(self) -> list[int]:
        """Mark RUNNING (and WAITING) trials left by a stopped or killed controller FAIL; returns their numbers."""
        self._guard()
        orphans = self._adopt_unfinished()
        for number in orphans:
            self.fail_trial(number, f"{ORPHANED}: the controller stopped before this trial finished")
        return orphans

    def candidate_outcomes(self) -> dict[tuple[int, int], float | None]:
        """(generation, candidate) -> fitness (a pruned candidate's first-pass fitness), or None for a
        candidate that failed all its attempts."""
        out: dict[tuple[int, int], float | None] = {}
        for t in self.study.get_trials(deepcopy=False):
            key = (t.user_attrs.get("generation"), t.user_attrs.get("candidate"))
            if None in key:
                continue
            if t.state == optuna.trial.TrialState.COMPLETE or (t.state == optuna.trial.TrialState.PRUNED and "fitness" in t.user_attrs):
                out[key] = fitness_of(t)
            elif t.state == optuna.trial.TrialState.FAIL and t.user_attrs.get("attempt", 0) >= MAX_ATTEMPTS - 1 \
                    and key not in out and not str(t.user_attrs.get("fail_reason", "")).startswith((ORPHANED, INTERRUPTED)):
                out[key] = None
        return out

    def first_passes(self) -> dict[tuple[int, int], float]:
        """(generation, candidate) -> first-pass fitness, for the candidates that had a first pass."""
        return {(t.user_attrs["generation"], t.user_attrs["candidate"]): t.user_attrs[FIRST_PASS_ATTR]
                for t in self.study.get_trials(deepcopy=False) if FIRST_PASS_ATTR in t.user_attrs}

    def update_config(self, cfg: StudyConfig) -> None:
        self._guard()
        self.study.set_user_attr(CONFIG_ATTR, cfg.to_yaml())

    def set_heldout(self, number: int, scores: Mapping[str, float], fitness: float) -> None:
        self._guard()
        self.study.set_user_attr(f"{HELDOUT_PREFIX}{number}", {"scores": dict(scores), "fitness": fitness})

    def heldout(self, number: int) -> dict[str, Any] | None:
        return self.study.user_attrs.get(f"{HELDOUT_PREFIX}{number}")

    def set_full(self, number: int, scores: Mapping[str, float], fitness: float) -> None:
        """The full-set fitness of a trial whose value was estimated from anchor examples."""
        self._guard()
        self.study.set_user_attr(f"{FULL_PREFIX}{number}", {"scores": dict(scores), "fitness": fitness})

    def full(self, number: int) -> dict[str, Any] | None:
        return self.study.user_attrs.get(f"{FULL_PREFIX}{number}")

    def set_anchors(self, anchors: Mapping[str, Any]) -> None:
        """The anchor examples of an estimating search (chosen once; a resume reuses them)."""
        self._guard()
        self.study.set_user_attr(ANCHORS_ATTR, dict(anchors))

    def anchors(self) -> dict[str, Any] | None:
        return self.study.user_attrs.get(ANCHORS_ATTR)

    def reported_fitness(self, trial: optuna.trial.FrozenTrial) -> float:
        """What a trial is reported and compared by: its full-set fitness where it was estimated and
        then scored in full, else its fitness."""
        full = self.full(trial.number)
        return fitness_of(trial) if full is None else full["fitness"]

    def ranked(self) -> list[optuna.trial.FrozenTrial]:
        """Completed trials, best first. In a study that estimates fitness, trials scored in full come first
        (by full fitness): an estimate alone never makes a trial the best."""
        done = self.completed()
        rescored = [t for t in done if self.full(t.number) is not None]
        rest = [t for t in done if self.full(t.number) is None]
        return sorted(rescored, key=self.reported_fitness, reverse=True) + sorted(rest, key=fitness_of, reverse=True)

    def pareto_front(self) -> list[optuna.trial.FrozenTrial]:
        return self.study.best_trials if len(self.study.directions) > 1 else [self.trial(None)]

    def completed(self) -> list[optuna.trial.FrozenTrial]:
        return self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))

    def completed_trial(self, number: int | None) -> optuna.trial.FrozenTrial:
        """Trial `number` (None: the best), which must be COMPLETE (a one-line StudyError otherwise)."""
        trial = self.trial(number)
        if trial.state != optuna.trial.TrialState.COMPLETE:
            raise StudyError(f"trial {trial.number} is {trial.state.name}, not COMPLETE; choose a completed trial "
                             f"(`evomerge status --storage URL {self.study.study_name}` lists them)")
        return trial

    def trial(self, number: int | None) -> optuna.trial.FrozenTrial:
        """Trial `number`, or the best completed trial when None."""
        trials = self.completed() if number is None else [t for t in self.study.get_trials(deepcopy=False) if t.number == number]
        if not trials:
            what = "no completed trial" if number is None else f"no trial {number}"
            raise StudyError(f"study {self.study.study_name!r} has {what}")
        if number is None:
            return self.ranked()[0]
        return trials[0]

    @staticmethod
    def recipe_of(trial: optuna.trial.FrozenTrial) -> Recipe | PathRecipe:
        data = trial.user_attrs.get("recipe")
        if data is None:
            raise StudyError(f"trial {trial.number} has no recipe (state {trial.state.name})")
        return recipe_from_dict(json.loads(data) if isinstance(data, str) else data)


def _release_after(lease: ControllerLease, error: BaseException) -> None:
    """Release the lease while `error` propagates; a failure to release is noted on `error`, not raised
    in its place (a full disk that stopped the search may stop the release too)."""
    try:
        lease.release()
    except Exception as exc:  # noqa: BLE001 -- kept as a note on the error that is being raised
        error.add_note(f"the controller lease was not released ({type(exc).__name__}: {exc}); it expires by itself")
