"""Optuna samplers as evomerge controllers: they propose each trial from the study's own history.

They need no ask/tell of whole generations: a new trial is asked whenever a worker is free, so no worker
waits for a generation's slowest candidate. The sampler sees real gene values (the trial params).
"""

from __future__ import annotations

import optuna

from evomerge.config import OptimizerConfig, StudyConfig


def sampler_for(cfg: StudyConfig) -> optuna.samplers.BaseSampler:
    """The study's sampler for a search config (random start-up trials: the workers, at least 4)."""
    return make_sampler(cfg.optimizer, n_startup=max(cfg.workers.n, 4))


def make_sampler(cfg: OptimizerConfig, n_startup: int) -> optuna.samplers.BaseSampler:
    """The configured sampler, seeded; `n_startup` random trials before model-based proposals."""
    if cfg.kind == "tpe":
        return optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=n_startup, constant_liar=True,
                                          multivariate=True)
    if cfg.kind == "gp":
        return optuna.samplers.GPSampler(seed=cfg.seed, n_startup_trials=n_startup)
    if cfg.kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=cfg.seed, population_size=max(n_startup, 4))
    if cfg.kind == "optuna_cmaes":
        return optuna.samplers.CmaEsSampler(seed=cfg.seed, n_startup_trials=n_startup, popsize=cfg.popsize)
    if cfg.kind == "optuna_random":
        return optuna.samplers.RandomSampler(seed=cfg.seed)
    # evomerge's own controllers choose params themselves: the study's sampler only replays them.
    return optuna.samplers.RandomSampler(seed=cfg.seed)
