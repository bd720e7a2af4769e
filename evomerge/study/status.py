"""Plain-text views of studies: one line per study, or one line per trial of a study."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from evomerge.study.lease import live_holder
from evomerge.study.storage import StorageUrl
from evomerge.study.store import StudyStore, fitness_of


def studies_table(url: str) -> str:
    storage = StorageUrl.parse(url)
    if not storage.exists():
        return f"no studies in {storage.redacted} (the file does not exist yet)"
    backend = storage.optuna()
    rows = [("study", "done", "pruned", "failed", "running", "best", "state")]
    for summary in optuna.get_all_study_summaries(storage=backend):
        study = optuna.load_study(study_name=summary.study_name, storage=backend)
        trials = study.get_trials(deepcopy=False)
        count = {s: sum(t.state == s for t in trials) for s in TrialState}
        best = max((fitness_of(t) for t in trials if t.state == TrialState.COMPLETE), default=None)
        state = _state(study, count[TrialState.RUNNING])
        rows.append((summary.study_name, str(count[TrialState.COMPLETE]), str(count[TrialState.PRUNED]), str(count[TrialState.FAIL]),
                     str(count[TrialState.RUNNING]), "-" if best is None else f"{best:.4f}", state))
    return _table(rows) if len(rows) > 1 else f"no studies in {storage.redacted}"


def _state(study: optuna.Study, running: int) -> str:
    """Running (a controller holds the study's lease), stopped mid-run (RUNNING trials, no controller), or idle."""
    holder = live_holder(study)
    if holder is not None:
        return f"running ({holder.host}, pid {holder.pid})"
    return "stopped mid-run" if running else "idle"


def trials_table(storage: str, name: str) -> str:
    store = StudyStore.open(storage, name)
    trials = store.study.get_trials(deepcopy=False)
    rows = [("trial", "state", "fitness", "held-out", "method", "merge_s", "eval_s", "note")]
    for t in trials:
        heldout = store.heldout(t.number)
        recipe = t.user_attrs.get("recipe") or {}
        rows.append((
            str(t.number), t.state.name,
            _fitness_cell(t),
            "-" if heldout is None else f"{heldout['fitness']:.4f}",
            str(recipe.get("method", recipe.get("kind", "-"))),  # stored dicts: a merge names its method
            _num(t.user_attrs.get("merge_s")), _num(t.user_attrs.get("eval_s")),
            str(t.user_attrs.get("fail_reason", ""))[:60],
        ))
    best = store.trial(None) if any(t.state == TrialState.COMPLETE for t in trials) else None
    footer = f"\nbest: trial {best.number}, fitness {fitness_of(best):.4f}" if best else ""
    return _table(rows) + footer


def _fitness_cell(trial: optuna.trial.FrozenTrial) -> str:
    if trial.state == TrialState.COMPLETE:
        return f"{fitness_of(trial):.4f}"
    if trial.state == TrialState.PRUNED and "fitness" in trial.user_attrs:
        return f"({fitness_of(trial):.4f} first pass)"
    return "-"


def _num(value: object) -> str:
    return "-" if value is None else f"{float(value):.2f}"


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
