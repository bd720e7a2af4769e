"""Genes: named, bounded search variables, and their map to the unit cube the optimizers search."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Gene:
    """A float in [low, high], or a choice among `choices` (then low/high are unused)."""

    name: str
    low: float = 0.0
    high: float = 1.0
    default: float | str = 0.0
    choices: tuple[str, ...] | None = None

    def from_unit(self, u: float) -> float | str:
        u = min(max(float(u), 0.0), 1.0)
        if self.choices is not None:
            return self.choices[min(int(u * len(self.choices)), len(self.choices) - 1)]
        return self.low + u * (self.high - self.low)

    def to_unit(self, value: float | str) -> float:
        if self.choices is not None:
            return (self.choices.index(str(value)) + 0.5) / len(self.choices)
        if self.high == self.low:
            return 0.5
        return min(max((float(value) - self.low) / (self.high - self.low), 0.0), 1.0)

    def distribution(self) -> Any:
        """The Optuna distribution recording this gene in a trial (dashboard-readable values)."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution

        if self.choices is not None:
            return CategoricalDistribution(list(self.choices))
        return FloatDistribution(self.low, max(self.high, self.low + 1e-12))


def decode_unit(genes: list[Gene], x: np.ndarray) -> dict[str, float | str]:
    """Gene values for a point of the unit cube (one coordinate per gene)."""
    if len(x) != len(genes):
        raise ValueError(f"expected {len(genes)} coordinates, got {len(x)}")
    return {g.name: g.from_unit(u) for g, u in zip(genes, x)}


def encode_unit(genes: list[Gene], values: dict[str, float | str]) -> np.ndarray:
    return np.array([g.to_unit(values[g.name]) for g in genes], dtype=float)
