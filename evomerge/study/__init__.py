"""The study: the Optuna database a search writes (one writer, the controller), and what reads it.

    store.py      StudyStore: trials, recipes, scores, optimizer checkpoints, history (the only writer); delete_study
    lease.py      ControllerLease: one controller per study (host, pid, since; heartbeat and expiry)
    lease_cell.py LeaseCell: the lease attribute, changed only by compare-and-set (atomic per backend)
    storage.py    StorageUrl: sqlite / postgresql / journal URLs, parsed once
    status.py     plain-text tables of studies and trials
    dashboard.py  optuna-dashboard: recipe artifacts, the study note, the server

No torch here, and nothing from `evomerge.search` (import-linter contracts).
"""

from evomerge.study.storage import StorageUrl, optuna_storage
from evomerge.study.lease import ControllerLease, LeaseHeldError, LeaseLostError
from evomerge.study.store import (
    FIRST_PASS_ATTR,
    MAX_ATTEMPTS,
    StudyStore,
    delete_study,
    fitness_of,
    refuse_existing,
    study_names,
)

__all__ = ["FIRST_PASS_ATTR", "MAX_ATTEMPTS", "ControllerLease", "LeaseHeldError", "LeaseLostError", "StorageUrl",
           "StudyStore", "delete_study", "fitness_of", "optuna_storage", "refuse_existing", "study_names"]
