"""optuna-dashboard support: recipe artifacts, a study note, and the dashboard server itself.

The controller (the study's single writer) uploads each trial's recipe as a YAML artifact and writes one
study note with a config summary and the commands that resume, inspect and export the study. Artifacts
live in a folder next to a file-backed study (`X.db` -> `X.db.artifacts/`); a database server has no
"next to", so PostgreSQL and MySQL studies need an explicit folder (on a cluster: a shared filesystem
path that both the controller and the dashboard see).

Optuna forbids changing a finished trial, artifacts included (checked on SQLite, journal and PostgreSQL
with optuna 5.0: `UpdateFinishedTrialError`), so a recipe is uploaded while its trial is RUNNING, right
after `StudyStore.start_trial`. If the trial was finished meanwhile (told in the dashboard, say), the
recipe goes to the study instead, still named after its trial, and the controller carries on.
"""

from __future__ import annotations

import os
import re
import shlex
import tempfile
from pathlib import Path

import optuna
import yaml

from evomerge.errors import StudyError
from evomerge.study.storage import StorageUrl, redact

ARTIFACTS_ENV = "EVOMERGE_ARTIFACTS"


def artifact_dir_for(storage_url: str | StorageUrl, override: str | os.PathLike[str] | None = None) -> Path:
    """Where recipe artifacts of studies in `storage_url` live: `override`, $EVOMERGE_ARTIFACTS, or next to the file."""
    chosen = override or os.environ.get(ARTIFACTS_ENV)
    if chosen:
        return Path(chosen).expanduser()
    storage = StorageUrl.parse(storage_url)
    if storage.path is not None:
        return Path(f"{storage.path}.artifacts")
    raise StudyError(
        f"storage {storage.redacted}: recipe artifacts need a folder; pass --artifacts DIR or set "
        f"{ARTIFACTS_ENV}=DIR (on a cluster: a shared filesystem path the controller and the dashboard both see)"
    )


def upload_recipe_artifact(
    study: optuna.Study, trial: optuna.Trial | optuna.trial.FrozenTrial | int, recipe_yaml: str, artifact_dir: Path
) -> str:
    """Store `recipe_yaml` as `recipe-trial<N>.yaml` on the trial (on the study if it already finished); returns the artifact id."""
    from optuna.artifacts import FileSystemArtifactStore, upload_artifact

    number, trial_id = _trial_ids(study, trial)
    artifact_dir = Path(artifact_dir)
    artifact_dir.mkdir(parents=True, exist_ok=True)
    store = FileSystemArtifactStore(os.fspath(artifact_dir))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"recipe-trial{number}.yaml"
        path.write_text(recipe_yaml)
        frozen = study._storage.get_trial(trial_id)
        target = study if frozen.state.is_finished() else frozen
        try:
            return upload_artifact(artifact_store=store, file_path=os.fspath(path), study_or_trial=target,
                                   storage=study._storage, mimetype="text/yaml")
        except optuna.exceptions.UpdateFinishedTrialError:  # finished between the check and the upload
            return upload_artifact(artifact_store=store, file_path=os.fspath(path), study_or_trial=study, mimetype="text/yaml")


def remove_recipe_artifacts(study: optuna.Study, artifact_dir: Path) -> int:
    """Delete the artifact files of the study and of each of its trials from `artifact_dir` (before
    the study itself is deleted); returns how many were removed."""
    from optuna.artifacts import FileSystemArtifactStore, get_all_artifact_meta

    if not Path(artifact_dir).is_dir():
        return 0
    store = FileSystemArtifactStore(os.fspath(artifact_dir))
    owners = [study, *study.get_trials(deepcopy=False)]
    metas = [meta for owner in owners for meta in get_all_artifact_meta(owner, storage=study._storage)]
    for meta in metas:
        if (Path(artifact_dir) / meta.artifact_id).exists():
            store.remove(meta.artifact_id)
    return len(metas)


def _trial_ids(study: optuna.Study, trial: optuna.Trial | optuna.trial.FrozenTrial | int) -> tuple[int, int]:
    """(number, storage trial id) of a trial given as a Trial, a FrozenTrial or a trial number."""
    if isinstance(trial, int):
        try:
            return trial, study._storage.get_trial_id_from_study_id_trial_number(study._study_id, trial)
        except KeyError:
            raise StudyError(f"study {study.study_name!r} has no trial {trial}") from None
    return trial.number, trial._trial_id


def write_study_note(study: optuna.Study, config_yaml: str, storage_url: str, study_name: str) -> None:
    """The dashboard's study note: what is searched, how, and the commands to resume, inspect and export it."""
    from optuna_dashboard import save_note

    save_note(study, study_note(config_yaml, storage_url, study_name))


def study_note(config_yaml: str, storage_url: str, study_name: str) -> str:
    """Markdown for `write_study_note` (the storage password, if any, is hidden)."""
    cfg = yaml.safe_load(config_yaml) or {}
    models, space = cfg.get("models", {}), cfg.get("search_space", {})
    evaluation, opt = cfg.get("evaluation", {}), cfg.get("optimizer", {})
    tasks = ", ".join(f"{t['name']} ({t.get('metric', 'acc')}, weight {t.get('weight', 1.0)})" for t in evaluation.get("tasks", []))
    params = ", ".join(f"{k} [{v['low']}, {v['high']}]" for k, v in space.get("params", {}).items())
    fixed = ", ".join(f"{k}={v}" for k, v in space.get("fixed", {}).items())
    url, name = shlex.quote(redact(storage_url)), shlex.quote(study_name)
    lines = [
        f"## evomerge study `{study_name}`",
        "",
        f"- **models**: base `{models.get('base')}`; sources " + ", ".join(f"`{s}`" for s in models.get("sources", [])),
        f"- **space**: {space.get('kind', 'parameter')}, methods {', '.join(space.get('methods', []))}, "
        f"{space.get('layer_groups', 1)} layer group(s); searched {params or 'nothing'}" + (f"; fixed {fixed}" if fixed else ""),
        f"- **tasks**: {tasks or 'none'}",
        f"- **optimizer**: {opt.get('kind', 'cmaes')}, population {opt.get('popsize') or 'default'}, "
        f"sigma0 {opt.get('sigma0', 0.25)}, seed {opt.get('seed', 0)}",
        f"- **budget**: {cfg.get('budget', {}).get('trials', '?')} trials on {cfg.get('workers', {}).get('n', '?')} workers",
        "",
        "Each trial's recipe is in its user attribute `recipe` and in its artifact `recipe-trial<N>.yaml`; "
        "per-task scores are in `scores.fitness`, held-out scores in the study attributes `heldout.<N>`.",
        "",
        "```sh",
        f"evomerge status --storage {url} {name}",
        f"evomerge resume {name} --storage {url}",
        f"evomerge export {name} --storage {url} --out DIR",
        "```",
    ]
    if redact(storage_url) != storage_url:
        lines.append("\n(The storage password is hidden; use your own.)")
    return "\n".join(lines) + "\n"



def run_dashboard(storage_url: str, *, host: str = "127.0.0.1", port: int = 8080, artifact_dir: str | None = None) -> None:
    """Serve optuna-dashboard on the study storage until interrupted (it blocks)."""
    from optuna.artifacts import FileSystemArtifactStore
    from optuna_dashboard import run_server

    url = StorageUrl.parse(storage_url)
    if not url.exists():  # opening it would create an empty storage file (and an artifact folder beside it)
        raise StudyError(f"storage {url.redacted}: no such file; pass the storage of an existing study "
                         "(`evomerge search` writes it)")
    storage = url.optuna()
    try:
        folder = artifact_dir_for(storage_url, artifact_dir)
    except StudyError:
        folder = None
        print(f"dashboard: no artifact folder for {redact(storage_url)}, so recipe artifacts are not shown; "
              f"pass --artifacts DIR or set {ARTIFACTS_ENV}")
    store = None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        store = FileSystemArtifactStore(os.fspath(folder))
    shown = "localhost" if host in ("0.0.0.0", "::") else host
    print(f"dashboard: http://{shown}:{port}/dashboard  (storage {redact(storage_url)}, artifacts {folder or 'none'}); Ctrl-C stops it", flush=True)
    run_server(storage, host=host, port=port, artifact_store=store)
