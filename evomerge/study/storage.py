"""Study storage URLs, parsed and checked once into a typed value that every command passes around.

    sqlite:///FILE.db            one file, one writer (the default)
    postgresql://USER:PASS@HOST/DB   (also postgresql+psycopg:// and postgresql+psycopg2://) for clusters
    journal:///FILE.log          Optuna's journal file
"""

from __future__ import annotations

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

    def optuna(self) -> str | optuna.storages.BaseStorage:
        """What Optuna takes: the URL itself for databases, a JournalStorage for journal files."""
        if self.scheme == "journal":
            import optuna
            from optuna.storages.journal import JournalFileBackend

            return optuna.storages.JournalStorage(JournalFileBackend(str(self.path)))
        return self.url


def optuna_storage(url: str | StorageUrl) -> str | optuna.storages.BaseStorage:
    """What Optuna takes for a URL (see `StorageUrl.optuna`)."""
    return StorageUrl.parse(url).optuna()


def redact(url: str) -> str:
    """`url` with its password, if any, replaced by `***`."""
    return re.sub(r"^([a-z0-9+]+://[^:/@]+):[^@]*@", r"\1:***@", url)
