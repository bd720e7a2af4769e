"""What crosses between the controller and its workers: small, picklable, torch-free dataclasses.

The controller imports this module only (never the worker), so it stays free of torch: a Ray actor
process is the first to import the worker and the models it builds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from evomerge.config import StudyConfig, TaskConfig
from evomerge.recipe import PathRecipe, Recipe
from evomerge.runtime.estimate import Anchors

if TYPE_CHECKING:
    from collections.abc import Mapping

Split = Literal["fitness", "heldout"]


@dataclass(frozen=True)
class FirstPass:
    """Score the first `fraction` of each task's examples; go on to all of them only if that fitness
    reaches `promote_at` (-inf: always)."""

    fraction: float
    promote_at: float


@dataclass(frozen=True)
class Job:
    """One candidate to build and score: its trial, its recipe, and where it sits in the search."""

    trial: int  # the Optuna trial whose outcome this is (held-out jobs: the trial re-scored)
    recipe: Recipe | PathRecipe
    split: Split = "fitness"
    attempt: int = 0
    first_pass: FirstPass | None = None  # multi-fidelity: see CandidateWorker.evaluate
    generation: int = 0
    candidate: int = 0  # index within its generation (Optuna samplers: within the study)
    params: Mapping[str, float | str] | None = None  # the trial's gene values (to retry a sampler's proposal)
    anchors: Anchors | None = None  # cheap fitness: score these examples and estimate the rest
    values: bool = False  # a probe (trial < 0): return every example's value (to choose anchors)

    def extra(self) -> dict[str, object]:
        """Keyword arguments of the worker's `evaluate` beyond (recipe, split, first_pass), when set."""
        return {k: v for k, v in (("anchors", self.anchors), ("values", self.values)) if v}


@dataclass(frozen=True)
class JobFailure:
    reason: str
    worker_died: bool


@dataclass(frozen=True)
class CandidateResult:
    scores: dict[str, float]
    fitness: float
    merge_s: float
    eval_s: float
    worker: str = ""
    peak_mem_mb: float | None = None
    extra: dict[str, float] = field(default_factory=dict)
    first_pass: dict[str, float] | None = None  # scores of a multi-fidelity first pass, when one ran
    first_pass_fitness: float | None = None
    full: bool = True  # False: held back after the first pass; `scores` and `fitness` are the first pass's
    estimated: bool = False  # `scores` and `fitness` estimated from anchor examples
    examples: int = 0  # examples scored for this result
    values: dict[str, list[float]] | None = None  # per-example values (probes that choose anchors)


@dataclass(frozen=True)
class WorkerInfo:
    """A worker's report once it is ready: where it runs, how long it took, what it keeps resident."""

    worker: str  # "host:pid"
    device: str
    startup_s: float
    resident_bytes: int  # tensors the worker holds privately (live model, copies of base and sources, caches)
    rss_bytes: int  # the process's resident set size after start-up
    mapped_bytes: int = 0  # sources read through memory-mapped files: one copy per node, shared
    anon_bytes: int = 0  # the process's private (anonymous) resident memory
    sources_on: str = ""  # where its base and sources live: device, host or mmap


@dataclass(frozen=True)
class WorkerSetup:
    """Everything a worker needs to start; small and picklable (it crosses to Ray actors)."""

    base: str
    sources: tuple[str, ...]
    tasks: tuple[TaskConfig, ...]
    include_paths: tuple[str, ...]
    batch_size: int = 64
    dtype: str = "auto"
    device: str | None = None  # None: cuda when visible, else cpu
    threads: int | None = None  # torch intra-op threads on CPU
    allow_pickle: bool = False
    trust_remote_code: bool = False
    merge_cache: bool = False
    sources_on: str = "auto"  # device | host | mmap | auto (config.WorkersConfig)
    gpus: float | None = None  # GPUs per worker; above 1 the live model is spread over them
    kind: str = Recipe.kind  # the candidate kind the study searches: its builder is made at start-up

    @classmethod
    def from_config(cls, cfg: StudyConfig, kind: str = Recipe.kind) -> WorkerSetup:
        """The one place a study config becomes a worker's setup."""
        return cls(
            base=str(cfg.models.base),
            sources=tuple(str(s) for s in cfg.models.sources),
            tasks=tuple(cfg.evaluation.tasks),
            include_paths=tuple(cfg.evaluation.include_paths),
            batch_size=cfg.evaluation.batch_size,
            dtype=cfg.models.dtype,
            allow_pickle=cfg.models.allow_pickle,
            trust_remote_code=cfg.models.trust_remote_code,
            merge_cache=cfg.workers.merge_cache,
            sources_on=cfg.workers.sources_on,
            gpus=cfg.workers.gpus_per_worker,
            kind=kind,
        )
