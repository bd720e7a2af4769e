"""Everything checked before a search writes its study or starts Ray, in the controller, without torch.

`prepare` checks that the storage can be written, reads model headers (not weights: a truncated file or
a missing shard shows there), checks that the sources fit the base, builds the search space against the
merge-method catalog, and loads the lm-eval tasks (their splits and metrics); the first problem stops it
with a one-line EvomergeError. Trials of other studies named as models (PS+DFS) and LoRA sources
(MODEL+ADAPTER) are written as local checkpoints first, by a child process (`evomerge.export.trial_models`),
since building them needs torch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

from evomerge.config import StudyConfig, TrialRef
from evomerge.errors import ConfigError
from evomerge.models.headers import CheckpointHeader, check_mergeable
from evomerge.models.layout import num_layers
from evomerge.recipe.refs import is_lora
from evomerge.runtime.messages import WorkerSetup
from evomerge.runtime.pool import DEFAULT_WORKER
from evomerge.runtime.tasks import check_tasks
from evomerge.search.spaces import SearchSpace, build_space
from evomerge.study.storage import StorageUrl
from evomerge.study.store import refuse_existing


@dataclass(frozen=True)
class Prepared:
    cfg: StudyConfig
    space: SearchSpace
    setup: WorkerSetup
    worker_cls: type | str = DEFAULT_WORKER  # tests and benchmarks swap in instrumented workers


def task_specs(cfg: StudyConfig) -> tuple:
    """The tasks a worker scores (the config's own TaskConfig objects)."""
    return tuple(cfg.evaluation.tasks)


def prepare(cfg: StudyConfig, *, new_study: bool = True) -> Prepared:
    """Check all input; raise an EvomergeError with a one-line message on the first problem."""
    storage = StorageUrl.parse(cfg.storage)
    storage.check_writable()
    if new_study:
        refuse_existing(storage, cfg.name)
    cfg = materialize_trial_models(cfg)  # PS+DFS: trials of other studies become local checkpoint folders
    base = CheckpointHeader.open(cfg.models.base, allow_pickle=cfg.models.allow_pickle)
    sources = [(s, CheckpointHeader.open(s, allow_pickle=cfg.models.allow_pickle)) for s in cfg.models.sources]
    check_mergeable(base, sources)
    configs = {cfg.models.base: base.config, **{ref: header.config for ref, header in sources}}
    space = build_space(cfg.search_space, cfg.models.base, list(cfg.models.sources), num_layers(base.config),
                        seed=cfg.optimizer.seed, configs=configs)
    check_tasks(task_specs(cfg), cfg.evaluation.include_paths)
    return Prepared(cfg, space, WorkerSetup.from_config(cfg, space.kind))


def materialize_trial_models(cfg: StudyConfig) -> StudyConfig:
    """`cfg` with every trial reference and LoRA source (MODEL+ADAPTER) in `models` replaced by the folder
    of its checkpoint, written by a child process (building one loads torch, which the controller never does)."""
    models = cfg.models
    if not any(isinstance(ref, TrialRef) or is_lora(ref) for ref in (models.base, *models.sources)):
        return cfg
    done = subprocess.run([sys.executable, "-m", "evomerge.export.trial_models"], input=cfg.to_yaml(),
                          capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise ConfigError(lines[-1].removeprefix("evomerge: ") if lines else f"exporting trial models failed ({done.returncode})")
    resolved = json.loads(done.stdout.strip().splitlines()[-1])
    return cfg.with_overrides(**{"models.base": resolved["base"], "models.sources": resolved["sources"]})
