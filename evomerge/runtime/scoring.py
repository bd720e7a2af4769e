"""Score a live (in-memory) model with lm-eval tasks, building the task objects once per worker.

Each candidate is a new set of weights written into the same model object, so nothing here caches
results: every score() call re-runs every request (lm-eval's response cache keys on requests, not
weights, so it is never enabled). What is reused is only what does not depend on the weights: the
task index, the task objects with their datasets, and the HFLM wrapper around the model.

Split override: lm-eval 0.4.13 treats a bare dict spec `{"task": "zoo_arith", "test_split": ...}` as
a brand-new inline task (the registered YAML is not merged in), but applies per-task overrides given
inside a group's task list. So each task is loaded as a one-member wrapper group per split.
"""

from __future__ import annotations

import difflib
import functools
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from evomerge.config import TaskConfig
from evomerge.runtime.messages import Split
from evomerge.runtime.tasks import SPLITS, lm_eval_log_level, task_manager

if TYPE_CHECKING:  # lm_eval is a heavy import (seconds): keep it off the CLI/config fast paths
    from lm_eval.tasks import TaskManager
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_FEWSHOT_SEED = 1234  # lm-eval's default fewshot seed; re-applied every call so few-shot contexts never drift


@contextmanager
def _no_request_progress_bars() -> Iterator[None]:
    """lm-eval's Task.build_all_requests draws a tqdm bar on every call with no switch to turn it off;
    a worker scoring thousands of candidates would print thousands. Swap it for a disabled bar."""
    import lm_eval.api.task as task_module
    from tqdm import tqdm

    task_module.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        task_module.tqdm = tqdm


class LmEvalScorer:
    """Built once per worker: the TaskManager (lm-eval defaults only if needed) and the task objects per
    split; HFLM is built lazily around the live model the first time score() is called with it."""

    def __init__(
        self, tasks: Sequence[TaskConfig], include_paths: Sequence[Path], *, batch_size: int = 64, device: str = "cpu"
    ) -> None:
        self.specs = tuple(tasks)
        _check_specs(self.specs)
        self.batch_size = batch_size
        self.device = device
        manager = task_manager([t.name for t in self.specs], include_paths)
        with lm_eval_log_level(logging.ERROR):  # per-task "custom kwargs"/"no generation_kwargs" chatter
            self._splits = {split: _load_split(manager, self.specs, split) for split in SPLITS}
        fitness_tasks = self._splits["fitness"].leaves
        self.signs = {spec.name: 1.0 if _higher_is_better(fitness_tasks[spec.name], spec) else -1.0 for spec in self.specs}
        self._lm: Any = None  # HFLM around the model last scored

    def score(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, split: Split) -> dict[str, float]:
        """task name -> metric value on that split, computed afresh from the model's current weights."""
        tasks = self._tasks(split)
        results = self._evaluate(model, tokenizer, tasks, self._samples(tasks), log_samples=False)
        return {spec.name: _metric(results["results"], spec, split) for spec in self.specs}

    def score_first_pass(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, split: Split,
                         fraction: float) -> FirstPassScores:
        """Scores on the first `fraction` of each task's examples (at least one), keeping each task's
        per-example metric values so that `score_rest` can finish the full scores without redoing them."""
        tasks = self._tasks(split)
        counts = self._counts(tasks, fraction)
        samples = {name: list(range(n)) for name, n in counts.items()}
        results = self._evaluate(model, tokenizer, tasks, samples, log_samples=True)
        scores = {spec.name: _metric(results["results"], spec, split) for spec in self.specs}
        full = self._counts(tasks, 1.0)
        items = {}
        for spec in self.specs:
            leaf = self._single_leaf(tasks, spec)
            if leaf is not None and counts[leaf.task_name] < full[leaf.task_name]:
                items[spec.name] = _items(results["samples"][leaf.task_name], spec)
        return FirstPassScores(scores, split, counts, items)

    def score_rest(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, first: FirstPassScores) -> dict[str, float]:
        """The full scores of the model `first` was computed on, exactly as `score` gives them: tasks whose
        metric aggregates per-example values (every leaf task) score only the examples the first pass
        did not, and aggregate all values in example order as lm-eval does; groups are scored again."""
        tasks = self._tasks(first.split)
        full = self._counts(tasks, 1.0)
        samples = {}
        for spec in self.specs:
            for leaf in tasks.leaves[spec.name]:
                start = first.counts[leaf.task_name] if spec.name in first.items else 0
                samples[leaf.task_name] = list(range(start, full[leaf.task_name]))
        results = self._evaluate(model, tokenizer, tasks, samples, log_samples=True)
        out = {}
        for spec in self.specs:
            if spec.name in first.items:
                leaf = tasks.leaves[spec.name][0]
                aggregate = leaf.aggregation()[_metric_key(spec)[0]]
                out[spec.name] = float(aggregate(first.items[spec.name] + _items(results["samples"][leaf.task_name], spec)))
            else:
                out[spec.name] = _metric(results["results"], spec, first.split)
        return out

    def estimable(self) -> list[str]:
        """Tasks whose fitness can be estimated from anchor examples: a zero-shot task (not a group)
        whose metric lm-eval aggregates as a mean of per-example values."""
        tasks = self._tasks("fitness")
        return [spec.name for spec in self.specs if self._single_leaf(tasks, spec) is not None
                and getattr(tasks.leaves[spec.name][0].aggregation()[_metric_key(spec)[0]], "__name__", "") == "mean"]

    def example_values(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, split: Split,
                       indices: Mapping[str, Sequence[int]] | None = None) -> tuple[dict[str, list[float]], dict[str, float]]:
        """(per-example metric values of every estimable task, at `indices` (task -> ascending example
        indices) or at all of its examples; full scores of the other tasks)."""
        tasks = self._tasks(split)
        full = self._counts(tasks, 1.0)
        chosen = set(self.estimable())
        samples = {}
        for spec in self.specs:
            for leaf in tasks.leaves[spec.name]:
                wanted = indices.get(spec.name) if indices is not None and spec.name in chosen else None
                samples[leaf.task_name] = list(wanted) if wanted is not None else list(range(full[leaf.task_name]))
        results = self._evaluate(model, tokenizer, tasks, samples, log_samples=True)
        values = {name: [float(v) for v in _items(results["samples"][name], spec)]
                  for spec in self.specs if (name := spec.name) in chosen}
        others = {spec.name: _metric(results["results"], spec, split) for spec in self.specs if spec.name not in chosen}
        return values, others

    def _tasks(self, split: Split) -> _SplitTasks:
        if split not in SPLITS:
            raise ValueError(f"split = {split!r}; allowed: {', '.join(SPLITS)}")
        return self._splits[split]

    def _evaluate(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, tasks: _SplitTasks,
                  samples: dict[str, list[int]], *, log_samples: bool) -> dict[str, Any]:
        from lm_eval.evaluator import evaluate

        lm = self._hflm(model, tokenizer)
        for task in tasks.task_dict["tasks"].values():
            task.set_fewshot_seed(seed=_FEWSHOT_SEED)
        with lm_eval_log_level(logging.WARNING), _no_request_progress_bars():
            return evaluate(lm=lm, task_dict=tasks.task_dict, samples=samples, bootstrap_iters=0, log_samples=log_samples)

    def _single_leaf(self, tasks: _SplitTasks, spec: TaskConfig) -> Any:
        """The task object when `spec` names one plain zero-shot task (not a group) whose metric lm-eval
        aggregates from per-example values; None otherwise. (Few-shot contexts are drawn from one
        sequence over the examples scored, so a pass that starts mid-way would draw other contexts.)"""
        leaves = tasks.leaves[spec.name]
        if len(leaves) != 1 or leaves[0].task_name != spec.name or (leaves[0].config.num_fewshot or 0) > 0:
            return None
        return leaves[0] if _metric_key(spec)[0] in leaves[0].aggregation() else None

    def fitness(self, scores: Mapping[str, float]) -> float:
        """Weighted mean of the task scores by TaskConfig.weight, each signed so that higher is better:
        a metric lm-eval marks lower-is-better (perplexity, word error rate) counts negated. The
        search maximises fitness; the per-task scores are stored as lm-eval reports them."""
        missing = [s.name for s in self.specs if s.name not in scores]
        if missing:
            raise KeyError(f"scores lack task(s) {', '.join(missing)}; got {', '.join(scores) or 'none'}")
        total = sum(s.weight for s in self.specs)
        return sum(s.weight * self.signs[s.name] * scores[s.name] for s in self.specs) / total

    def _hflm(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> Any:
        """Reuse the HFLM while the model and tokenizer objects are the same (their weights may change)."""
        import torch

        if model.device.type != torch.device(self.device).type:
            raise ValueError(f"model is on {model.device}, scorer was built for device {self.device!r}; "
                             f"move the model (model.to({self.device!r})) or build the scorer with device={model.device.type!r}")
        if self._lm is None or self._lm.model is not model or self._lm.tokenizer is not tokenizer:
            with lm_eval_log_level(logging.ERROR):  # "pretrained is not a str" warning: intended here
                self._lm = _quiet_hflm_class()(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size)
        model.eval()
        return self._lm

    def _samples(self, tasks: _SplitTasks) -> dict[str, list[int]]:
        """Per-task limits as lm-eval `samples` (the first doc indices): evaluate() has one global limit."""
        return {name: list(range(n)) for name, n in self._counts(tasks, 1.0).items()}

    def _counts(self, tasks: _SplitTasks, fraction: float) -> dict[str, int]:
        """Leaf task name -> how many of its first examples are scored: the limit (or all), times
        `fraction` rounded up."""
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction = {fraction}; must be in (0, 1]")
        counts = {}
        for spec in self.specs:
            for task in tasks.leaves[spec.name]:
                n = len(task.eval_docs) if spec.limit is None else min(spec.limit, len(task.eval_docs))
                counts[task.task_name] = max(1, math.ceil(fraction * n))
        return counts


def _check_specs(specs: Sequence[TaskConfig]) -> None:
    if not specs:
        raise ValueError("no tasks to score; give at least one TaskConfig")
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"task(s) {', '.join(dupes)} listed more than once; list each task once (combine weights)")
    if sum(s.weight for s in specs) <= 0:
        raise ValueError("all task weights are 0; give at least one task a weight > 0")


@dataclass(frozen=True)
class _SplitTasks:
    task_dict: dict[str, Any]  # lm-eval TaskDict: tasks, groups, group_map
    leaves: dict[str, list[Any]]  # spec name -> its leaf Task objects


def _load_split(manager: TaskManager, specs: Sequence[TaskConfig], split: Split) -> _SplitTasks:
    """The task objects of one split; each spec is a one-member wrapper group carrying its overrides."""
    tasks: dict[str, Any] = {}
    groups: dict[str, Any] = {}
    leaves: dict[str, list[Any]] = {}
    for spec in specs:
        if spec.name in manager.all_tags:  # lm-eval would apply the overrides to a tag's tasks wrongly
            members = sorted(manager.task_index[spec.name].tags)
            raise ValueError(f"{spec.name!r} is an lm-eval tag, not a task or group; list its tasks instead: {', '.join(members)}")
        kind = "group" if spec.name in manager.all_groups else "task"
        member: dict[str, Any] = {kind: spec.name, "test_split": spec.split(split)}
        if spec.num_fewshot is not None:
            member["num_fewshot"] = spec.num_fewshot
        try:
            loaded = manager.load([{"group": f"evomerge_{split}::{spec.name}", "task": [member]}])
        except KeyError as err:  # lm-eval indexes dataset[split] while building the task
            raise ValueError(_missing_split_message(manager, spec, split, err)) from err
        tasks.update(loaded["tasks"])
        groups.update(loaded["groups"])
        leaves[spec.name] = list(loaded["tasks"].values())
    group_map = {g.name: g.child_names for g in groups.values()}
    return _SplitTasks({"tasks": tasks, "groups": groups, "group_map": group_map}, leaves)


def _missing_split_message(manager: TaskManager, spec: TaskConfig, split: Split, err: KeyError) -> str:
    field = "fitness_split" if split == "fitness" else "heldout_split"
    try:  # the task as its YAML defines it, to list the splits its dataset has
        tasks = manager.load([spec.name])["tasks"].values()
        have = sorted({str(s) for task in tasks for s in (getattr(task, "dataset", None) or [])})
    except Exception:  # noqa: BLE001 - only for the message; the original error is chained
        have = []
    listed = f" (splits: {', '.join(have)})" if have else ""
    return (f"task {spec.name!r} has no split {spec.split(split)!r}{listed}; set {field} to one of its splits "
            f"(lm-eval: KeyError {err})")


@dataclass(frozen=True)
class FirstPassScores:
    """A multi-fidelity first pass: its scores, and what `LmEvalScorer.score_rest` needs to finish."""

    scores: dict[str, float]
    split: Split
    counts: dict[str, int]  # leaf task name -> examples scored
    items: dict[str, list[Any]]  # spec name -> per-example metric values, in example order (leaf tasks)


def _higher_is_better(leaves: list[Any], spec: TaskConfig) -> bool:
    """lm-eval's `higher_is_better` for the spec's metric (from its first leaf task; True when unstated)."""
    metric = _metric_key(spec)[0]
    for task in leaves[:1]:
        return bool(task.higher_is_better().get(metric, True))
    return True


def _metric_key(spec: TaskConfig) -> tuple[str, str]:
    """(metric, filter) of a spec's metric, e.g. ("exact_match", "none")."""
    metric, _, filter_name = spec.metric.partition(",")
    return metric, filter_name or "none"


def _items(samples: list[dict[str, Any]], spec: TaskConfig) -> list[Any]:
    """The per-example values of spec's metric from lm-eval's logged samples, in example order."""
    metric, filter_name = _metric_key(spec)
    rows = sorted((s for s in samples if s.get("filter", "none") == filter_name), key=lambda s: s["doc_id"])
    return [s[metric] for s in rows]


def _metric(results: Mapping[str, Mapping[str, Any]], spec: TaskConfig, split: Split) -> float:
    key = spec.metric if "," in spec.metric else f"{spec.metric},none"
    row = results.get(spec.name, {})
    if key not in row:
        have = sorted(k.removesuffix(",none") for k, v in row.items() if isinstance(v, (int, float)) and "_stderr" not in k)
        raise ValueError(f"task {spec.name!r} reports no metric {spec.metric!r} on split {spec.split(split)!r} "
                         f"(metrics: {', '.join(have) or 'none'}); set metric to one of them")
    return float(row[key])


@functools.cache
def _quiet_hflm_class() -> type:
    from lm_eval.models.huggingface import HFLM

    class QuietHFLM(HFLM):
        """HFLM without per-call progress bars (evaluate() gives it no way to ask)."""

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=True)

    return QuietHFLM
