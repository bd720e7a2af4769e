"""Cheap fitness: score a candidate on a few anchor examples per task, and estimate its full-set score.

After tinyBenchmarks (Polo et al. 2024, arXiv 2402.14992) and MERGE3 (arXiv 2502.10436), which pick
anchor examples from how known models do on them. Here the known models are the ones a merge starts
from: the base and every source, scored once on the whole fitness split before the search. Examples are
grouped by their pattern of results across those models (for exact match, which models get them right;
for graded metrics, the values rounded to tenths); every group gets anchors in proportion to its size
(at least one), drawn at random with a fixed seed, and each anchor stands for its share of its group.
The estimate is the weighted mean of a candidate's values on the anchors: a stratified sample of the
full set, unbiased for the mean and exact on the models the anchors were chosen from whenever every
group is sampled whole. A plain weighted estimator, not an IRT fit: with a handful of known models an
IRT model has little to learn from.

Only tasks whose metric lm-eval aggregates as a mean of per-example values can be estimated; others
are scored in full.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TaskAnchors:
    """One task's anchors: example indices (ascending) and their weights (summing to 1)."""

    indices: tuple[int, ...]
    weights: tuple[float, ...]
    n_examples: int  # the full set the estimate stands for

    def estimate(self, values: Sequence[float]) -> float:
        """The full-set mean estimated from a candidate's values on the anchors (in `indices` order)."""
        if len(values) != len(self.indices):
            raise ValueError(f"{len(values)} values for {len(self.indices)} anchors")
        return float(np.dot(np.asarray(values, dtype=float), np.asarray(self.weights)))


@dataclass(frozen=True)
class Anchors:
    """Per task name, its anchors; tasks not listed are scored in full."""

    tasks: Mapping[str, TaskAnchors]

    def examples(self) -> int:
        return sum(len(a.indices) for a in self.tasks.values())

    def share(self) -> float:
        """Anchors over the examples they stand for."""
        total = sum(a.n_examples for a in self.tasks.values())
        return self.examples() / total if total else 1.0


def choose_task_anchors(values: np.ndarray, fraction: float, seed: int) -> TaskAnchors:
    """Anchors for one task from `values` (models x examples) of the known models.

    fraction: the share of examples to keep (at least one per group of examples that the known models
    treat alike; so a task whose examples fall in many groups keeps more)."""
    if values.ndim != 2 or values.shape[1] == 0:
        raise ValueError(f"values must be (models, examples) with examples; got shape {values.shape}")
    n = values.shape[1]
    groups: dict[tuple, list[int]] = defaultdict(list)
    for index, column in enumerate(np.round(values.T, 1)):
        groups[tuple(column.tolist())].append(index)
    budget = max(len(groups), math.ceil(fraction * n))
    picks = _allocate({key: len(members) for key, members in groups.items()}, budget)
    rng = np.random.default_rng(seed)
    chosen: list[tuple[int, float]] = []
    for key, members in groups.items():
        taken = rng.choice(members, size=picks[key], replace=False)
        chosen += [(int(i), len(members) / picks[key] / n) for i in taken]
    chosen.sort()
    return TaskAnchors(tuple(i for i, _ in chosen), tuple(w for _, w in chosen), n)


def _allocate(sizes: Mapping[tuple, int], budget: int) -> dict[tuple, int]:
    """Anchors per group: one each, then the rest in proportion to size (largest remainders), never
    more than a group has."""
    total = sum(sizes.values())
    if budget >= total:
        return dict(sizes)
    picks = {key: 1 for key in sizes}
    left = budget - len(sizes)
    if left <= 0:
        return picks
    shares = {key: left * size / total for key, size in sizes.items()}
    for key, share in shares.items():
        picks[key] = min(sizes[key], 1 + int(share))
    by_remainder = sorted(shares, key=lambda k: shares[k] - int(shares[k]), reverse=True)
    spare = budget - sum(picks.values())
    while spare > 0:  # largest remainders first, then any group with examples left
        for key in by_remainder:
            if spare > 0 and picks[key] < sizes[key]:
                picks[key] += 1
                spare -= 1
    return picks


def choose_anchors(per_task: Mapping[str, np.ndarray], fraction: float, seed: int = 0) -> Anchors:
    """Anchors for every task given its known models' per-example values (models x examples)."""
    return Anchors({name: choose_task_anchors(v, fraction, seed) for name, v in per_task.items()})


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    ra, rb = _ranks(np.asarray(a, dtype=float)), _ranks(np.asarray(b, dtype=float))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    for value in np.unique(x):  # ties share their mean rank
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks
