"""Study storage URLs, parsed and checked once into a typed value that every command passes around.

    sqlite:///FILE.db            one file, one writer (the default)
    postgresql://USER:PASS@HOST/DB   (also postgresql+psycopg:// and postgresql+psycopg2://) for clusters
    journal:///FILE.log          Optuna's journal file

Opening a storage never creates it by accident: commands that only read (status, export, resume's
checks) see a missing file as "no studies", and `check_writable` refuses a location a search could
not write (a missing or read-only folder, a read-only file) before anything is written. A server or
file that cannot be opened is a one-line StudyError, never a driver traceback.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from evomerge.errors import StudyError

if TYPE_CHECKING:
    import optuna

Scheme = Literal["sqlite", "postgresql", "journal"]
_PREFIXES: tuple[tuple[str, Scheme], ...] = (
    ("sqlite:///", "sqlite"),
    ("postgresql://", "postgresql"),
    ("postgresql+psycopg://", "postgresql"),
    ("postgresql+psycopg2://", "postgresql"),
    ("journal:///", "journal"),
)
SUPPORTED = "sqlite:///FILE.db (default), postgresql://USER:PASSWORD@HOST/DB, or journal:///FILE.log"
CONNECT_TIMEOUT_S = 10  # an unreachable database server fails in seconds, not after TCP's minutes


@dataclass(frozen=True)
class StorageUrl:
    url: str
    scheme: Scheme
    path: Path | None  # the file of a sqlite or journal URL (None for sqlite's :memory: and for servers)

    @classmethod
    def parse(cls, url: str | StorageUrl) -> StorageUrl:
        """The typed URL, or a one-line StudyError naming the forms that work."""
        if isinstance(url, StorageUrl):
            return url
        for prefix, scheme in _PREFIXES:
            if url.startswith(prefix):
                rest = url.removeprefix(prefix)
                if scheme == "postgresql":
                    return cls(url, scheme, None)
                if not rest:
                    raise StudyError(f"storage {url!r}: no file named after {prefix!r}; use {SUPPORTED}")
                return cls(url, scheme, None if rest == ":memory:" else Path(rest))
        raise StudyError(f"storage {redact(url)!r}: unsupported URL; use {SUPPORTED}")

    def __str__(self) -> str:
        return self.url

    @property
    def file_backed(self) -> bool:
        return self.path is not None

    def exists(self) -> bool:
        """False only for a file-backed URL whose file is not there yet (opening it would create it)."""
        return self.path is None or self.path.is_file()

    @property
    def redacted(self) -> str:
        return redact(self.url)

    def check_writable(self) -> None:
        """A one-line StudyError when a search could not write here: the file's folder is missing or
        read-only, or the file is read-only (SQLite also writes a journal file beside the database)."""
        if self.path is None:
            return
        folder = self.path.parent.resolve()
        if not folder.is_dir():
            raise StudyError(f"storage {self.redacted}: folder {folder} does not exist; create it (mkdir -p {folder}) "
                             "or choose another storage path")
        if not _writable(folder):
            raise StudyError(f"storage {self.redacted}: folder {folder} is not writable; make it writable or choose "
                             "another storage path")
        if self.path.exists() and not (self.path.is_file() and _writable(self.path)):
            what = "is not a file" if not self.path.is_file() else "is read-only"
            raise StudyError(f"storage {self.redacted}: {self.path} {what}; choose another storage path")

    def optuna(self) -> optuna.storages.BaseStorage:
        """What Optuna takes: an RDBStorage for databases, a JournalStorage for journal files, connected
        now, so an unreachable server or an unopenable file is a one-line StudyError here."""
        import optuna
        import sqlalchemy.exc

        try:
            if self.scheme == "journal":
                from optuna.storages.journal import JournalFileBackend

                return optuna.storages.JournalStorage(JournalFileBackend(str(self.path)))
            kwargs = {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}} if self.scheme == "postgresql" else {}
            return optuna.storages.RDBStorage(self.url, engine_kwargs=kwargs)
        except (ImportError, ValueError, OSError, sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as exc:
            raise StudyError(f"storage {self.redacted}: cannot open it ({self.hide_password(first_line(exc))}); "
                             f"{self._open_hint()}") from None

    def _open_hint(self) -> str:
        if self.scheme == "postgresql":
            return "check the URL (postgresql://USER:PASSWORD@HOST[:PORT]/DB), that the server is up and reachable, and the credentials"
        return "check that the file is a study storage of this kind and that its folder exists and is readable"

    def hide_password(self, text: str) -> str:
        """`text` with this URL's password, if any, replaced by `***` (driver messages may repeat it)."""
        match = re.match(r"^[a-z0-9+]+://[^:/@]+:([^@]*)@", self.url)
        return text.replace(match.group(1), "***") if match and match.group(1) else text


def optuna_storage(url: str | StorageUrl) -> optuna.storages.BaseStorage:
    """What Optuna takes for a URL (see `StorageUrl.optuna`)."""
    return StorageUrl.parse(url).optuna()


def first_line(exc: BaseException) -> str:
    """An exception's first line without a driver's "(module.Error)" prefix: enough to act on."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return re.sub(r"^\([\w.]+\) ", "", text)[:300]


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK)


def redact(url: str) -> str:
    """`url` with its password, if any, replaced by `***`."""
    return re.sub(r"^([a-z0-9+]+://[^:/@]+):[^@]*@", r"\1:***@", url)
