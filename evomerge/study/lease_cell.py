"""The study attribute that holds a controller lease, replaced only if it still holds what was read.

A lease kept with plain reads and writes loses to a race: a holder's heartbeat reads its own lease,
another controller takes the lease over, and the heartbeat's write then overwrites the takeover; both
controllers go on writing. So every lease change is a compare-and-set on the stored value:

    RDB (SQLite, PostgreSQL)  one conditional UPDATE (or an INSERT against the unique (study, key)
                              constraint): atomic in the database, across hosts
    journal file              the read and the append under an exclusive flock on the journal file
                              (Optuna's own journal lock is a separate file, so the two never meet)
    in-memory                 a process-wide lock (one process is all that can see it)

(A journal kept in Redis, which evomerge does not open, would get only the process-wide lock.)
"""

from __future__ import annotations

import fcntl
import json
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import optuna
import sqlalchemy as sa

_MEMORY_LOCK = threading.Lock()


class LeaseCell:
    """One study's lease attribute: `read` it, and `replace` it only if it still equals `expected`."""

    def __init__(self, study: optuna.Study, key: str) -> None:
        self.study = study
        self.key = key
        storage = study._storage
        if isinstance(storage, optuna.storages._CachedStorage):  # how Optuna wraps an RDBStorage
            storage = storage._backend
        self._rdb = storage if isinstance(storage, optuna.storages.RDBStorage) else None
        journal = storage._backend if isinstance(storage, optuna.storages.JournalStorage) else None
        self._journal_file: str | None = getattr(journal, "_file_path", None)

    def read(self) -> object:
        return self.study.user_attrs.get(self.key)

    def replace(self, expected: object, new: object) -> bool:
        """Store `new` if the attribute still equals `expected` (None: absent or released); False, and
        nothing written, when another writer changed it since it was read."""
        if self._rdb is not None:
            return self._replace_sql(self._rdb.engine, expected, new)
        with self._exclusive():
            if self.read() != expected:
                return False
            self.study.set_user_attr(self.key, new)
            return True

    def _replace_sql(self, engine: sa.engine.Engine, expected: object, new: object) -> bool:
        table = sa.table("study_user_attributes", sa.column("study_id"), sa.column("key"), sa.column("value_json"))
        study_id = self.study._study_id
        where = sa.and_(table.c.study_id == study_id, table.c.key == self.key)
        with engine.begin() as conn:
            stored = conn.execute(sa.select(table.c.value_json).where(where)).scalar_one_or_none()
            if (None if stored is None else json.loads(stored)) != expected:
                return False
            if stored is None:
                try:
                    conn.execute(sa.insert(table).values(study_id=study_id, key=self.key, value_json=json.dumps(new)))
                except sa.exc.IntegrityError:  # another writer inserted it first
                    return False
                return True
            done = conn.execute(sa.update(table).where(where, table.c.value_json == stored)
                                .values(value_json=json.dumps(new)))
            return done.rowcount == 1

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        if self._journal_file is None:
            with _MEMORY_LOCK:
                yield
            return
        with Path(self._journal_file).open("rb") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
