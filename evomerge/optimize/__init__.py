"""Controllers propose generations of candidates in the unit cube and learn from their fitness.

The seam is ask/tell, one generation at a time; fitness is maximised and None marks a failed candidate.
Controllers know no torch, Ray or storage; their state pickles to bytes so the study can checkpoint it.
"""

from __future__ import annotations

import math
import pickle
import warnings
from typing import Protocol

import numpy as np

from evomerge.config import OptimizerConfig


class Controller(Protocol):
    popsize: int

    def ask(self) -> list[np.ndarray]: ...

    def tell(self, xs: list[np.ndarray], fitness: list[float | None]) -> None: ...

    def dumps(self) -> bytes: ...


def default_popsize(n_genes: int, n_workers: int = 1) -> int:
    """CMA-ES's 4 + 3 ln(n), rounded up to a multiple of the worker count so no worker idles."""
    size = 4 + int(3 * math.log(max(n_genes, 1)))
    return int(math.ceil(size / n_workers) * n_workers)


class CmaEsController:
    """pycma's CMA-ES over [0, 1]^n (bounds by transformation), maximising fitness."""

    def __init__(self, x0: np.ndarray, cfg: OptimizerConfig, popsize: int) -> None:
        import cma

        # A private RandomState (not numpy's global one) so that a pickled controller carries its
        # RNG state: a restored checkpoint asks exactly what the original would have asked.
        rng = np.random.RandomState(cfg.seed + 1)
        options = {"bounds": [0.0, 1.0], "popsize": popsize, "randn": rng.randn, "verbose": -9}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.es = cma.CMAEvolutionStrategy(np.asarray(x0, dtype=float), cfg.sigma0, options)
        self.popsize = popsize

    def ask(self) -> list[np.ndarray]:
        return [np.asarray(x, dtype=float) for x in self.es.ask()]

    def tell(self, xs: list[np.ndarray], fitness: list[float | None]) -> None:
        # pycma minimises and replaces NaN (a failed candidate) by the generation's median.
        losses = [math.nan if f is None else -float(f) for f in fitness]
        if all(math.isnan(v) for v in losses):
            losses = [0.0] * len(losses)  # a generation that failed entirely carries no information
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.es.tell(xs, losses)

    @property
    def sigma(self) -> float:
        return float(self.es.sigma)

    def dumps(self) -> bytes:
        return pickle.dumps(self)


class RandomController:
    """Uniform random search over the unit cube: the baseline every optimizer must beat."""

    def __init__(self, n_genes: int, cfg: OptimizerConfig, popsize: int) -> None:
        self.rng = np.random.default_rng(cfg.seed)
        self.n_genes, self.popsize = n_genes, popsize
        self.sigma = math.nan

    def ask(self) -> list[np.ndarray]:
        return [self.rng.random(self.n_genes) for _ in range(self.popsize)]

    def tell(self, xs: list[np.ndarray], fitness: list[float | None]) -> None:
        del xs, fitness  # random search learns nothing

    def dumps(self) -> bytes:
        return pickle.dumps(self)


def make_controller(cfg: OptimizerConfig, x0: np.ndarray, n_workers: int) -> Controller:
    popsize = cfg.popsize or default_popsize(len(x0), n_workers)
    if cfg.kind == "random":
        return RandomController(len(x0), cfg, popsize)
    return CmaEsController(x0, cfg, popsize)


def loads(state: bytes) -> Controller:
    return pickle.loads(state)
