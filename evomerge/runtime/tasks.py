"""lm-eval task names, splits and metrics, checked before any model loads (no torch: the controller runs this).

`task_manager` builds the cheapest lm-eval TaskManager that knows every name: the project's include
paths alone when they suffice, lm-eval's ~14.7k defaults (about 4 s to index) only when needed.
`check_tasks` then loads each task once, as a worker would (lm-eval reads its dataset to build it), so a
split its dataset lacks or a metric it does not report stops the search before the study is written.
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
    """Raise UnknownTaskError if a task name is not registered (in include_paths, or lm-eval's defaults),
    and a ConfigError if it is a tag, lacks its fitness or held-out split, or does not report its metric.

    lm-eval's defaults (~14.7k tasks, ~4 s to index) are indexed only if include_paths lack a name.
    """
    manager = task_manager([t.name for t in tasks], include_paths)
    for spec in tasks:
        check_task(manager, spec)


def check_task(manager: TaskManager, spec: TaskConfig) -> None:
    """One task's splits and metric against the task as lm-eval builds it (a one-line ConfigError)."""
    if spec.name in manager.all_tags:
        members = ", ".join(sorted(manager.task_index[spec.name].tags))
        raise ConfigError(f"task {spec.name!r} is an lm-eval tag, not a task or group; list its tasks instead: {members}")
    loaded = _load(manager, spec.name)
    leaves = list(loaded["tasks"].values())
    for leaf in leaves:
        for which in SPLITS:
            _check_split(spec, leaf, which)
    group = loaded["groups"].get(spec.name)
    if group is not None:
        _check_metric(spec, _group_metrics(group))
    elif leaves:
        _check_metric(spec, _leaf_metrics(leaves[0]))


def _load(manager: TaskManager, name: str) -> dict:
    """The task as lm-eval builds it (its dataset read); a task that cannot be built is a one-line ConfigError
    naming lm-eval's error, here in the controller rather than in every worker."""
    try:
        with lm_eval_log_level(logging.ERROR):
            return manager.load([name])
    except Exception as exc:  # noqa: BLE001 -- any failure to build the task (a dataset download, its YAML's code)
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise ConfigError(f"task {name!r} cannot be loaded ({type(exc).__name__}: {first}); check the task's YAML "
                          "and that its dataset is available here") from exc


def _check_split(spec: TaskConfig, leaf: object, which: Split) -> None:
    dataset = getattr(leaf, "dataset", None)
    if not hasattr(dataset, "keys"):  # a task without a split-keyed dataset: nothing to check up front
        return
    split, have = spec.split(which), sorted(str(k) for k in dataset.keys())
    if split not in have:
        field = "fitness_split" if which == "fitness" else "heldout_split"
        inside = "" if leaf.task_name == spec.name else f" (in group {spec.name!r})"
        raise ConfigError(f"config error: task {leaf.task_name!r}{inside} has no split {split!r} (its splits: "
                          f"{', '.join(have) or 'none'}); set {field} of task {spec.name!r} to one of them")


def _leaf_metrics(task: object) -> dict[str, set[str]]:
    """metric -> the filters it is reported under (lm-eval's results key "metric,filter")."""
    filters = {str(f["name"]) for f in (getattr(task.config, "filter_list", None) or []) if isinstance(f, dict) and "name" in f}
    return {str(metric): filters or {"none"} for metric in task.aggregation()}


def _group_metrics(group: object) -> dict[str, set[str]]:
    """A group reports only the metrics its aggregate_metric_list names."""
    metrics: dict[str, set[str]] = {}
    for agg in getattr(group, "aggregate_metric_list", None) or []:
        listed = getattr(agg, "filter_list", None)
        filters = {listed} if isinstance(listed, str) else set(listed or [])
        metrics.setdefault(str(agg.metric), set()).update(filters)
    return metrics


def _check_metric(spec: TaskConfig, reported: dict[str, set[str]]) -> None:
    metric, _, filter_name = spec.metric.partition(",")
    if metric not in reported:
        have = ", ".join(sorted(reported)) or "none"
        raise ConfigError(f"config error: task {spec.name!r} does not report metric {metric!r} (it reports: {have}); "
                          "set metric to one of them")
    filters, filter_name = reported[metric], filter_name or "none"  # as the scorer reads results: "metric,filter"
    if filters and filter_name not in filters:
        raise ConfigError(f"config error: task {spec.name!r} reports {metric!r} under filter(s) {', '.join(sorted(filters))}, "
                          f"not {filter_name!r}; write metric: {metric},{sorted(filters)[0]}")


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


