"""lm-eval task names and splits, checked before any model loads (no torch: the controller runs this).

`task_manager` builds the cheapest lm-eval TaskManager that knows every name: the project's include
paths alone when they suffice, lm-eval's ~14.7k defaults (about 4 s to index) only when needed.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from evomerge.config import TaskConfig
from evomerge.errors import ConfigError
from evomerge.runtime.messages import Split

if TYPE_CHECKING:  # lm_eval is a heavy import (seconds): keep it off the CLI/config fast paths
    from lm_eval.tasks import TaskManager

SPLITS: tuple[Split, ...] = ("fitness", "heldout")


class UnknownTaskError(ConfigError):
    """A task name that no include path and no lm-eval default registers."""


def check_tasks(tasks: Sequence[TaskConfig], include_paths: Sequence[Path]) -> None:
    """Raise UnknownTaskError if a task name is not registered (in include_paths, or lm-eval's defaults).

    lm-eval's defaults (~14.7k tasks, ~4 s to index) are indexed only if include_paths lack a name.
    """
    task_manager([t.name for t in tasks], include_paths)


def task_manager(names: Sequence[str], include_paths: Sequence[Path]) -> TaskManager:
    """The cheapest TaskManager that knows every name: include_paths alone if it can, else with defaults."""
    from lm_eval.tasks import TaskManager

    paths = [str(Path(p)) for p in include_paths]
    not_dirs = [p for p in paths if not Path(p).is_dir()]
    if not_dirs:
        raise UnknownTaskError(f"task include path {not_dirs[0]!r} is not a directory; fix the path or remove it")
    with lm_eval_log_level(logging.ERROR):  # the index build warns about unrelated YAMLs it skips
        manager = TaskManager(include_path=paths or None, include_defaults=False)
        if any(name not in manager.all_tasks for name in names):
            manager = TaskManager(include_path=paths or None, include_defaults=True)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise UnknownTaskError(_unknown_message(unknown[0], manager.all_tasks, paths))
    return manager


def _unknown_message(name: str, known: Sequence[str], paths: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f" (did you mean: {', '.join(close)}?)" if close else ""
    where = f"lm-eval's built-in tasks and YAML files under {', '.join(paths)}" if paths else "lm-eval's built-in tasks"
    return f"unknown lm-eval task {name!r}{hint}; looked in {where}"


@contextmanager
def lm_eval_log_level(level: int) -> Iterator[None]:
    logger = logging.getLogger("lm_eval")
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


