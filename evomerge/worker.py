"""A candidate worker: sources resident in memory, each candidate built into one live model and scored.

Per candidate only the recipe changes: the base tensors and the task vectors are loaded once, the merged
weights are written in place into the live model's parameters (no disk writes), and lm-eval scores that
model through a scorer built once. The class is plain Python; `evomerge.pool` wraps it in Ray actors, and
the GPU check drives it in-process without Ray.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch

from evomerge.build import MergeCache, check_recipe, group_map, merge_named, task_vectors
from evomerge.checkpoints import Checkpoint, check_mergeable
from evomerge.errors import ModelError
from evomerge.path_model import PathModels
from evomerge.path_recipe import PathRecipe
from evomerge.recipe import Recipe
from evomerge.scoring import LmEvalScorer, TaskSpec

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class WorkerSetup:
    """Everything a worker needs to start; small and picklable (it crosses to Ray actors)."""

    base: str
    sources: tuple[str, ...]
    tasks: tuple[TaskSpec, ...]
    include_paths: tuple[str, ...]
    batch_size: int = 64
    dtype: str = "auto"
    device: str | None = None  # None: cuda when visible, else cpu
    threads: int | None = None  # torch intra-op threads on CPU
    allow_pickle: bool = False
    trust_remote_code: bool = False
    merge_cache: bool = False


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


@dataclass(frozen=True)
class FirstPass:
    """Score the first `fraction` of each task's examples; go on to all of them only if that fitness
    reaches `promote_at` (-inf: always)."""

    fraction: float
    promote_at: float


class CandidateWorker:
    def __init__(self, setup: WorkerSetup) -> None:
        started = time.perf_counter()
        if setup.threads:
            torch.set_num_threads(setup.threads)
        self.setup = setup
        self.device = torch.device(setup.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, self.tokenizer = _load_live_model(setup, self.device)
        self.base = Checkpoint.open(setup.base, allow_pickle=setup.allow_pickle)
        sources = [Checkpoint.open(s, allow_pickle=setup.allow_pickle) for s in setup.sources]
        check_mergeable(self.base, zip(setup.sources, sources))
        self.live = _live_tensors(self.model, self.base.names)
        self.base_tensors = {n: self.base.tensor(n).to(self.device) for n in self.base.names}
        self.deltas = {n: task_vectors(self.base.tensor(n), [s.tensor(n) for s in sources]).to(self.device) for n in self.base.names}
        # Sorted |delta| per tensor and source: TIES/Breadcrumbs thresholds become lookups (8 bytes per
        # entry per source, built on the first candidate that needs it); off by default for large models.
        self.merge_cache = MergeCache() if setup.merge_cache else None
        self.scorer = LmEvalScorer(setup.tasks, [os.fspath(p) for p in setup.include_paths], batch_size=setup.batch_size, device=str(self.device))
        self._group_maps: dict[tuple[int, tuple[str, ...]], dict[str, int]] = {}
        # Data-flow candidates: models a path names load on first use; one path-model shell is reused.
        self.paths = PathModels(self.device, _DTYPES.get(setup.dtype, "auto"), allow_pickle=setup.allow_pickle,
                                trust_remote_code=setup.trust_remote_code)
        self._path_model: tuple[torch.nn.Module, object] | None = None
        self.name = f"{os.uname().nodename}:{os.getpid()}"
        self.startup_s = time.perf_counter() - started

    def info(self) -> dict[str, object]:
        return {"worker": self.name, "device": str(self.device), "startup_s": self.startup_s}

    @torch.no_grad()
    def build(self, recipe: Recipe | PathRecipe) -> float:
        """Write the recipe's merged weights into the live model (or point the path model at a path's
        layers); returns seconds spent."""
        started = time.perf_counter()
        if isinstance(recipe, PathRecipe):
            self._path_model = self.paths.build(recipe), self.paths.tokenizer(recipe)
            return time.perf_counter() - started
        spec = check_recipe(recipe)
        key = (recipe.n_groups, recipe.kinds)  # a group map depends on nothing else in the recipe
        groups = self._group_maps.get(key) or self._group_maps.setdefault(key, group_map(recipe, self.base))
        for name, target in self.live.items():
            base, deltas = self.base_tensors[name], self.deltas[name]
            # raises FloatingPointError on NaN or inf; the next build overwrites every tensor, this one included
            merge_named(recipe, spec, name, groups[name], base, deltas, cache=self.merge_cache, out=target)
        _sync(self.device)
        return time.perf_counter() - started

    def evaluate(self, recipe: Recipe | PathRecipe, split: str = "fitness", first_pass: FirstPass | None = None) -> CandidateResult:
        """Build the candidate and score it on one split ("fitness" during search, "heldout" to report),
        optionally after a cheap first pass that may end the evaluation early (multi-fidelity)."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        merge_s = self.build(recipe)
        model, tokenizer = self._path_model if isinstance(recipe, PathRecipe) else (self.model, self.tokenizer)
        started = time.perf_counter()
        first = first_fitness = None
        if first_pass is None:
            scores = self.scorer.score(model, tokenizer, split)
        else:
            partial = self.scorer.score_first_pass(model, tokenizer, split, first_pass.fraction)
            first, first_fitness = partial.scores, self.scorer.fitness(partial.scores)
            if first_fitness < first_pass.promote_at:
                return CandidateResult(scores=first, fitness=first_fitness, merge_s=merge_s,
                                       eval_s=time.perf_counter() - started, worker=self.name,
                                       peak_mem_mb=_peak_mem_mb(self.device), first_pass=first,
                                       first_pass_fitness=first_fitness, full=False)
            scores = self.scorer.score_rest(model, tokenizer, partial)  # the first pass's examples are not redone
        eval_s = time.perf_counter() - started
        return CandidateResult(
            scores=scores,
            fitness=self.scorer.fitness(scores),
            merge_s=merge_s,
            eval_s=eval_s,
            worker=self.name,
            peak_mem_mb=_peak_mem_mb(self.device),
            first_pass=first,
            first_pass_fitness=first_fitness,
        )


def _load_live_model(setup: WorkerSetup, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Checkpoint.open(setup.base, allow_pickle=setup.allow_pickle).path
    dtype = _DTYPES.get(setup.dtype, "auto")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=setup.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=setup.trust_remote_code)
    return model.to(device).eval(), tokenizer


def _live_tensors(model: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """The live model's tensors under the checkpoint's names (state_dict tensors share storage)."""
    state = model.state_dict()
    missing = [n for n in names if n not in state]
    if missing:
        raise ModelError(
            f"the loaded model has no tensor {missing[0]!r} that the checkpoint has ({len(missing)} such); "
            "its modeling code renames weights, which evomerge does not support yet"
        )
    return {n: state[n] for n in names}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mem_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    except ImportError:
        return None
