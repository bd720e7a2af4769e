"""Controllers propose generations of candidates in the unit cube and learn from their fitness.

The seam is ask/tell, one generation at a time; fitness is maximised and None marks a failed candidate.
Controllers know no torch, Ray or storage; their state pickles to bytes so the study can checkpoint it.

Lookahead: when a generation opens, a controller also asks `lookahead` candidates of the *next*
generation from the same distribution. Workers that would otherwise wait for the slowest candidates of
this generation evaluate those; the next generation then consists of them plus fresh candidates asked
after this one is told. The counts are fixed, never timing-dependent, so a run is reproducible and a
resumed study asks exactly what the original would have (the early candidates are part of the
pickled state).
"""

from __future__ import annotations

import math
import pickle
import warnings
from typing import Protocol

import numpy as np

from evomerge.config import OptimizerConfig


class Controller(Protocol):
    """What the search loop needs of an optimizer that works in generations."""

    popsize: int  # candidates per generation
    lookahead: int  # candidates of the next generation asked when a generation opens
    early: list[np.ndarray]  # those candidates, asked by the last ask_generation()

    @property
    def sigma(self) -> float:
        """The current step size in the unit cube (NaN where the optimizer has none)."""
        ...

    def ask_generation(self) -> list[np.ndarray]:
        """This generation's `popsize` candidates (the early ones first); asks the next one's early ones."""
        ...

    def tell(self, xs: list[np.ndarray], fitness: list[float | None]) -> None:
        """Fitness (maximised; None: the candidate failed) of a whole generation, in ask order."""
        ...

    def dumps(self) -> bytes:
        """The whole state, RNG included, for the study's checkpoint (`loads` restores it)."""
        ...


def default_popsize(n_genes: int, n_workers: int = 1) -> int:
    """CMA-ES's 4 + 3 ln(n), rounded up to a multiple of the worker count, and at least twice the worker
    count when there are several: with half a generation of lookahead that keeps workers busy through
    each generation's tail (scripts/bench_sched.py)."""
    size = 4 + int(3 * math.log(max(n_genes, 1)))
    if n_workers > 1:
        size = max(size, 2 * n_workers)
    return int(math.ceil(size / n_workers) * n_workers)


def default_lookahead(popsize: int, n_workers: int) -> int:
    """Half a generation ahead with several workers (enough to cover the tail of a generation whose
    evaluation times vary 3x); none with one worker, which never waits on a barrier."""
    return popsize // 2 if n_workers > 1 else 0


class Generational:
    """ask_generation() on top of a controller's `ask(number)`: the lookahead policy (module docstring)."""

    popsize: int
    lookahead: int = 0
    early: list[np.ndarray] = []  # candidates of the next generation, asked when this one opened

    def ask(self, number: int) -> list[np.ndarray]:
        raise NotImplementedError

    def ask_generation(self) -> list[np.ndarray]:
        """This generation's `popsize` candidates, those asked ahead first; asks the next one's early ones."""
        early = list(self.early)[: self.popsize]
        xs = early + (self.ask(self.popsize - len(early)) if len(early) < self.popsize else [])
        self.early = self.ask(self.lookahead) if self.lookahead else []
        return xs


class CmaEsController(Generational):
    """pycma's CMA-ES over [0, 1]^n (bounds by transformation), maximising fitness."""

    def __init__(self, x0: np.ndarray, cfg: OptimizerConfig, popsize: int, lookahead: int = 0) -> None:
        with warnings.catch_warnings():  # pycma warns at import that matplotlib (for cma.plot) is missing
            warnings.filterwarnings("ignore", message="Could not import matplotlib")
            import cma

        # A private RandomState (not numpy's global one) so that a pickled controller carries its
        # RNG state: a restored checkpoint asks exactly what the original would have asked.
        rng = np.random.RandomState(cfg.seed + 1)
        options = {"bounds": [0.0, 1.0], "popsize": popsize, "randn": rng.randn, "verbose": -9}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.es = cma.CMAEvolutionStrategy(np.asarray(x0, dtype=float), cfg.sigma0, options)
        self.popsize, self.lookahead = popsize, lookahead

    def ask(self, number: int) -> list[np.ndarray]:
        return [np.asarray(x, dtype=float) for x in self.es.ask(number=number)]

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


class RandomController(Generational):
    """Uniform random search over the unit cube: the baseline every optimizer must beat."""

    sigma = math.nan  # no step size

    def __init__(self, n_genes: int, cfg: OptimizerConfig, popsize: int, lookahead: int = 0) -> None:
        self.rng = np.random.default_rng(cfg.seed)
        self.n_genes, self.popsize, self.lookahead = n_genes, popsize, lookahead

    def ask(self, number: int) -> list[np.ndarray]:
        return [self.rng.random(self.n_genes) for _ in range(number)]

    def tell(self, xs: list[np.ndarray], fitness: list[float | None]) -> None:
        del xs, fitness  # random search learns nothing

    def dumps(self) -> bytes:
        return pickle.dumps(self)


def make_controller(cfg: OptimizerConfig, x0: np.ndarray, n_workers: int) -> Controller:
    popsize = cfg.popsize or default_popsize(len(x0), n_workers)
    lookahead = default_lookahead(popsize, n_workers) if cfg.lookahead is None else min(cfg.lookahead, popsize)
    if cfg.kind == "random":
        return RandomController(len(x0), cfg, popsize, lookahead)
    return CmaEsController(x0, cfg, popsize, lookahead)


def loads(state: bytes) -> Controller:
    return pickle.loads(state)
