"""A candidate worker: each candidate built into a live model in memory and scored with lm-eval.

Per candidate only the recipe changes: what a kind of candidate needs resident is loaded once, by that
kind's builder (`models.live`), and lm-eval scores the built model through a scorer built once. The
class is plain Python; `runtime.pool` wraps it in Ray actors, and the GPU check drives it in-process.
"""

from __future__ import annotations

import os
import time

import torch

from evomerge.models.live import KINDS, LiveBuilder, LoadOptions, builder_type
from evomerge.recipe import PathRecipe, Recipe
from evomerge.runtime.estimate import Anchors
from evomerge.runtime.messages import CandidateResult, FirstPass, WorkerInfo, WorkerSetup
from evomerge.runtime.scoring import LmEvalScorer


class CandidateWorker:
    def __init__(self, setup: WorkerSetup) -> None:
        started = time.perf_counter()
        if setup.threads:
            torch.set_num_threads(setup.threads)
        self.setup = setup
        self.device = torch.device(setup.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.options = LoadOptions(self.device, setup.dtype, setup.allow_pickle, setup.trust_remote_code, setup.merge_cache,
                                   setup.sources_on, spread=(setup.gpus or 0) > 1)
        self._builders: dict[type, LiveBuilder] = {}
        self.builder(KINDS[setup.kind])  # the study's kind is loaded at start-up; another on first use
        self.scorer = LmEvalScorer(setup.tasks, [os.fspath(p) for p in setup.include_paths], batch_size=setup.batch_size,
                                   device=str(self.device))
        self.name = f"{os.uname().nodename}:{os.getpid()}"
        self.startup_s = time.perf_counter() - started

    def builder(self, kind: type) -> LiveBuilder:
        """The builder for a recipe type (Recipe, PathRecipe), made on first use."""
        if kind not in self._builders:
            self._builders[kind] = builder_type(kind)(self.setup.base, self.setup.sources, self.options)
        return self._builders[kind]

    @property
    def model(self) -> torch.nn.Module:
        """The live model merge candidates are written into."""
        return self.builder(Recipe).model

    @property
    def tokenizer(self):  # noqa: ANN201 -- a transformers tokenizer
        return self.builder(Recipe).tokenizer

    def info(self) -> WorkerInfo:
        builders = self._builders.values()
        memory = process_memory()
        where = ",".join(sorted({b.sources_on for b in builders if hasattr(b, "sources_on")}))
        return WorkerInfo(self.name, str(self.device), self.startup_s, sum(b.resident_bytes() for b in builders),
                          memory.get("Rss", 0), sum(b.mapped_bytes() for b in builders), memory.get("Anonymous", 0), where)

    def _per_example(self, model, tokenizer, split: str, anchors: Anchors | None, merge_s: float,  # noqa: ANN001
                     started: float) -> CandidateResult:
        """Anchors: scores estimated from the anchor examples (tasks without anchors scored in full).
        No anchors: every example scored, each one's value kept (a probe that anchors are chosen from)."""
        indices = None if anchors is None else {t: a.indices for t, a in anchors.tasks.items()}
        values, others = self.scorer.example_values(model, tokenizer, split, indices)
        if anchors is None:
            scores = {t: float(sum(v) / len(v)) for t, v in values.items()} | others
            return _scored(scores, self.scorer.fitness(scores), merge_s, started, self, values=values,
                           examples=sum(map(len, values.values())))
        scores = {t: anchors.tasks[t].estimate(v) if t in anchors.tasks else float(sum(v) / len(v))
                  for t, v in values.items()} | others
        return _scored(scores, self.scorer.fitness(scores), merge_s, started, self, estimated=True,
                       examples=sum(map(len, values.values())))

    @torch.no_grad()
    def build(self, recipe: Recipe | PathRecipe) -> float:
        """Make the recipe's candidate the current model (merged weights written in place, or the path
        model pointed at a path's layers); returns seconds spent."""
        started = time.perf_counter()
        self._current = self.builder(type(recipe)).build(recipe)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - started

    def evaluate(self, recipe: Recipe | PathRecipe, split: str = "fitness", first_pass: FirstPass | None = None, *,
                 anchors: Anchors | None = None, values: bool = False) -> CandidateResult:
        """Build the candidate and score it on one split ("fitness" during search, "heldout" to report),
        optionally after a cheap first pass that may end the evaluation early (multi-fidelity), or on
        anchor examples only with the rest estimated, or on every example keeping each one's value."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        merge_s = self.build(recipe)
        model, tokenizer = self._current
        started = time.perf_counter()
        if anchors is not None or values:
            return self._per_example(model, tokenizer, split, anchors, merge_s, started)
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
        return CandidateResult(
            scores=scores,
            fitness=self.scorer.fitness(scores),
            merge_s=merge_s,
            eval_s=time.perf_counter() - started,
            worker=self.name,
            peak_mem_mb=_peak_mem_mb(self.device),
            first_pass=first,
            first_pass_fitness=first_fitness,
        )


def _scored(scores: dict[str, float], fitness: float, merge_s: float, started: float, worker: "CandidateWorker",
            **extra: object) -> CandidateResult:
    return CandidateResult(scores=scores, fitness=fitness, merge_s=merge_s, eval_s=time.perf_counter() - started,
                           worker=worker.name, peak_mem_mb=_peak_mem_mb(worker.device), **extra)


def _peak_mem_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    except ImportError:
        return None


def process_memory(pid: int | str = "self") -> dict[str, int]:
    """Bytes by kind from /proc/PID/smaps_rollup (Linux): Rss, Pss, Anonymous (private allocations),
    Shared_Clean (file pages other processes map too), ...; empty where it cannot be read."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            lines = rollup.read().splitlines()[1:]
    except OSError:
        return {}
    out = {}
    for line in lines:
        key, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            out[key.strip()] = int(parts[0]) * 1024
    return out
