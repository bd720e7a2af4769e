"""The Optuna study: the one place a search's trials, recipes and scores are written.

Only the controller process writes (SQLite tolerates one writer; PostgreSQL is for clusters). Each
candidate is a trial: its genes are the trial params (real values, readable in optuna-dashboard), its
recipe and per-task fitness scores are user attributes. The study keeps the full resolved config, so
export and status need only the storage URL and the study name. Held-out scores are computed after a
trial has finished, and Optuna forbids changing finished trials, so they live in study user attributes
(`heldout.<trial number>`).
"""

from __future__ import annotations

import base64
import json
import logging
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from evomerge.config import StudyConfig, parse_config
from evomerge.errors import StudyError
from evomerge.path_recipe import PathRecipe, recipe_from_dict
from evomerge.recipe import Recipe

optuna.logging.set_verbosity(optuna.logging.WARNING)
logging.getLogger("optuna").setLevel(logging.WARNING)

CONFIG_ATTR = "evomerge.config"
HELDOUT_PREFIX = "heldout."
OPTIMIZER_ATTR = "evomerge.optimizer"
FIRST_PASS_ATTR = "first_pass_fitness"
_CHUNK_CHARS = 60_000  # MySQL's TEXT holds 64 KB; SQLite and PostgreSQL hold any size
MAX_ATTEMPTS = 2  # a failed candidate is retried once, then told to the optimizer as failed


_RDB_SCHEMES = ("sqlite:///", "postgresql://", "postgresql+psycopg://", "postgresql+psycopg2://", "mysql://", "mysql+pymysql://")
_JOURNAL = "journal:///"


def storage_exists(url: str) -> bool:
    """False only for a file-backed URL whose file is not there yet (opening it would create it)."""
    for prefix in ("sqlite:///", _JOURNAL):
        if url.startswith(prefix):
            path = url.removeprefix(prefix)
            return path == ":memory:" or Path(path).is_file()
    return True


def check_storage_url(url: str) -> None:
    if not url.startswith((*_RDB_SCHEMES, _JOURNAL)):
        raise StudyError(
            f"storage {url!r}: unsupported URL; use sqlite:///FILE.db (default), "
            "postgresql://USER:PASSWORD@HOST/DB, or journal:///FILE.log"
        )


def optuna_storage(url: str) -> str | optuna.storages.BaseStorage:
    """What Optuna takes for `url`: the URL itself for databases, a JournalStorage for journal files."""
    check_storage_url(url)
    if url.startswith(_JOURNAL):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url.removeprefix(_JOURNAL)))
    return url


def study_names(url: str) -> list[str]:
    if not storage_exists(url):
        return []
    return [s.study_name for s in optuna.get_all_study_summaries(storage=optuna_storage(url))]


def fitness_of(trial: optuna.trial.FrozenTrial) -> float:
    """The weighted-mean fitness of a completed trial (multi-objective studies keep it as an attribute)."""
    return trial.user_attrs.get("fitness", trial.value if len(trial.values or ()) == 1 else float("nan"))


def sampler_for(cfg: StudyConfig) -> optuna.samplers.BaseSampler:
    from evomerge.optimize._optuna import make_sampler

    return make_sampler(cfg.optimizer, n_startup=max(cfg.workers.n, 4))


class StudyStore:
    """The study's single writer."""

    def __init__(self, study: optuna.Study) -> None:
        self.study = study
        self._running: dict[int, optuna.Trial] = {}

    @classmethod
    def create(cls, cfg: StudyConfig, genes: Mapping[str, Any]) -> StudyStore:
        check_storage_url(cfg.storage)
        if cfg.name in study_names(cfg.storage):
            raise StudyError(
                f"study {cfg.name!r} already exists in {cfg.storage}; pass --study NEW_NAME, "
                f"or look at it with `evomerge status --storage {cfg.storage} {cfg.name}`"
            )
        directions = ["maximize"] * (len(cfg.evaluation.tasks) if cfg.optimizer.objectives == "per_task" else 1)
        study = optuna.create_study(storage=optuna_storage(cfg.storage), study_name=cfg.name,
                                    directions=directions, sampler=sampler_for(cfg))
        study.set_user_attr(CONFIG_ATTR, cfg.to_yaml())
        study.set_user_attr("evomerge.genes", list(genes))
        return cls(study)

    @classmethod
    def open(cls, storage: str, name: str | None) -> StudyStore:
        check_storage_url(storage)
        names = study_names(storage)
        if name is None:
            if len(names) != 1:
                raise StudyError(f"storage {storage} holds {len(names)} studies ({', '.join(names) or 'none'}); name one")
            name = names[0]
        if name not in names:
            raise StudyError(f"study {name!r} not found in {storage} (studies there: {', '.join(names) or 'none'})")
        study = optuna.load_study(study_name=name, storage=optuna_storage(storage))
        store = cls(study)
        if CONFIG_ATTR in study.user_attrs:  # give a resumed study its configured sampler back
            study.sampler = sampler_for(store.config)
        return store

    @property
    def config(self) -> StudyConfig:
        text = self.study.user_attrs.get(CONFIG_ATTR)
        if text is None:
            raise StudyError(f"study {self.study.study_name!r} was not made by evomerge (no stored config)")
        import yaml

        return parse_config(yaml.safe_load(text), source=f"study {self.study.study_name}")

    def start_trial(self, params: Mapping[str, Any] | None, distributions: Mapping[str, Any], attrs: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        """A RUNNING trial holding exactly `params` (or, when None, params the study's sampler proposes);
        returns its number and params."""
        if params is not None:
            self.study.enqueue_trial(dict(params), user_attrs=dict(attrs))
        trial = self.study.ask(fixed_distributions=dict(distributions))
        if params is None:
            for key, value in attrs.items():
                trial.set_user_attr(key, value)
        self._running[trial.number] = trial
        return trial.number, dict(trial.params)

    def set_recipe(self, number: int, recipe: dict[str, Any]) -> None:
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

    def _close(self, number: int, attrs: dict[str, Any], **outcome: Any) -> bool:
        trial = self._running.pop(number)
        try:
            for key, value in attrs.items():
                trial.set_user_attr(key, value)
            self.study.tell(trial, outcome.get("fitness"), state=outcome.get("state"), skip_if_finished=True)
        except optuna.exceptions.UpdateFinishedTrialError:
            return False
        return True

    def save_controller(self, generation: int, state: bytes) -> None:
        """Checkpoint the optimizer as it is before asking `generation` (compressed, in chunks).

        Chunks go under generation-specific keys and the header that points at them is written last,
        so a controller killed mid-checkpoint leaves the previous checkpoint intact.
        """
        text = base64.b64encode(zlib.compress(state, 6)).decode()
        chunks = [text[i : i + _CHUNK_CHARS] for i in range(0, len(text), _CHUNK_CHARS)]
        for i, chunk in enumerate(chunks):
            self.study.set_user_attr(f"{OPTIMIZER_ATTR}.g{generation}.{i}", chunk)
        previous = self.study.user_attrs.get(OPTIMIZER_ATTR)
        self.study.set_user_attr(OPTIMIZER_ATTR, {"generation": generation, "chunks": len(chunks), "bytes": len(state)})
        if previous and previous["generation"] != generation:  # blank the superseded checkpoint
            for i in range(previous["chunks"]):
                self.study.set_user_attr(f"{OPTIMIZER_ATTR}.g{previous['generation']}.{i}", "")

    def load_controller(self) -> tuple[int, bytes] | None:
        attrs = self.study.user_attrs
        head = attrs.get(OPTIMIZER_ATTR)
        if head is None:
            return None
        text = "".join(attrs[f"{OPTIMIZER_ATTR}.g{head['generation']}.{i}"] for i in range(head["chunks"]))
        return head["generation"], zlib.decompress(base64.b64decode(text))

    def fail_orphans(self) -> list[int]:
        """Mark RUNNING trials (left by a stopped or killed controller) FAIL; returns their numbers."""
        orphans = self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        for frozen in orphans:
            self._running[frozen.number] = optuna.Trial(self.study, frozen._trial_id)
            self.fail_trial(frozen.number, "orphaned: the controller stopped before this trial finished")
        return [t.number for t in orphans]

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
                    and key not in out and not str(t.user_attrs.get("fail_reason", "")).startswith("orphaned"):
                out[key] = None
        return out

    def first_passes(self) -> dict[tuple[int, int], float]:
        """(generation, candidate) -> first-pass fitness, for the candidates that had a first pass."""
        return {(t.user_attrs["generation"], t.user_attrs["candidate"]): t.user_attrs[FIRST_PASS_ATTR]
                for t in self.study.get_trials(deepcopy=False) if FIRST_PASS_ATTR in t.user_attrs}

    def update_config(self, cfg: StudyConfig) -> None:
        self.study.set_user_attr(CONFIG_ATTR, cfg.to_yaml())

    def set_heldout(self, number: int, scores: Mapping[str, float], fitness: float) -> None:
        self.study.set_user_attr(f"{HELDOUT_PREFIX}{number}", {"scores": dict(scores), "fitness": fitness})

    def heldout(self, number: int) -> dict[str, Any] | None:
        return self.study.user_attrs.get(f"{HELDOUT_PREFIX}{number}")

    def pareto_front(self) -> list[optuna.trial.FrozenTrial]:
        return self.study.best_trials if len(self.study.directions) > 1 else [self.trial(None)]

    def completed(self) -> list[optuna.trial.FrozenTrial]:
        return self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))

    def trial(self, number: int | None) -> optuna.trial.FrozenTrial:
        """Trial `number`, or the best completed trial when None."""
        trials = self.completed() if number is None else [t for t in self.study.get_trials(deepcopy=False) if t.number == number]
        if not trials:
            what = "no completed trial" if number is None else f"no trial {number}"
            raise StudyError(f"study {self.study.study_name!r} has {what}")
        if number is None:
            return max(trials, key=fitness_of)
        return trials[0]

    @staticmethod
    def recipe_of(trial: optuna.trial.FrozenTrial) -> Recipe | PathRecipe:
        data = trial.user_attrs.get("recipe")
        if data is None:
            raise StudyError(f"trial {trial.number} has no recipe (state {trial.state.name})")
        return recipe_from_dict(json.loads(data) if isinstance(data, str) else data)
