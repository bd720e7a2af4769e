"""Search efficiency on the tiny zoos: best fitness per evaluation spent, several optimizers, one budget.

Every optimizer runs through evomerge's real search loop (`SearchRun`: Optuna study in SQLite, Ray
workers building each candidate in memory, lm-eval scoring on the fitness split), on the same zoo, the
same tasks and the same budget of evaluations; the best trial of each run is then scored on the held-out
split by the same workers (`SearchRun.score_heldout`, top 1).

  cmaes      evomerge's default: pycma CMA-ES over the default space, the `task_arithmetic` preset (one
             weight per source in [0, 1.5] for the whole model, starting at 1; 2 genes on the tiny zoo, 3 on
             the hard one), default popsize and sigma0, bounds [0, 1] in the unit cube
  cmaes_tod  the same CMA-ES over `ties_or_dare`, the default space before issue 16 (9 genes on the tiny
             zoo: the method, weight and density per source in 2 layer groups; 13 on the hard zoo)
  random     uniform random search over the default space (`optimizer.kind: random`)
  tpe        Optuna's TPE over the same space (`optimizer.kind: tpe`; a new trial whenever a worker is free)
  mergekit   what mergekit-evolve 0.1.5 does (mergekit/scripts/evolve.py, mergekit/evo/genome.py):
             `cma.fmin2(parallel_objective=..., x0, sigma0=1/6)`, no bounds, no restarts, pycma's default
             popsize; its genome (layer group x model x [weight, density]) starts at weight 1/n and
             density 1, and decodes weight = |x|, density = clip(|x|, 0, 1). Its method is fixed per
             genome: `ties` here, layer_granularity 2 (= 2 groups on the 4-layer zoo). mergekit-evolve
             sets `normalize: true` for ties and dare_ties; evomerge's ties is normalized TIES too
             (evomerge's dare_ties is not normalized, as in plain mergekit), so ties is the method both
             express exactly. It is plugged in as a controller (`MergekitEvolveController`) with its own
             8-gene space (weight in [0, 2], density in [1e-6, 1]); see that class for the exact mapping.
  cmaes_ties evomerge's default CMA-ES on that same 8-gene ties space (a fifth row, not asked for by the
             comparison itself: it tells whether a difference comes from the optimizer or from the space)
  cmaes_fp   the default CMA-ES with multi-fidelity (`evaluation.first_pass`: every candidate first on 25%
             of each task's examples, only the top half of first passes scored in full); its `examples`
             column counts the examples scored, the deterministic measure of the evaluation work saved
  cmaes_est  the default CMA-ES with estimated fitness (`evaluation.estimate`: anchors chosen from the base's
             and sources' per-example results, 25% of each task's examples per candidate, the best 3 by
             estimate scored in full at the end and ranked by that); `examples` counts the anchor scoring,
             the known models' full scoring that chose the anchors, and the final full scoring. For the
             estimator's quality every candidate is also scored in full afterwards (not counted): the
             Spearman correlation between its estimated and full fitness is reported per run

One more, run only when named in `--methods`:

  gp         Optuna's GP sampler over the default space (`optimizer.kind: gp`; a new trial whenever a
             worker is free, random for the first max(workers, 4))

The options over `ties_or_dare` measured before the default changed (random search, GP, CMA-ES over a
global task-arithmetic space) are kept in docs/results/bench_search_hard_ties_or_dare.md.

`--family` picks the zoo: `llama` (default; tasks zoo_arith + zoo_rev, loglikelihood `acc`) or `hard`
(issue 16: arith, rev and upper specialists, rev over-trained so that it poisons naive merges; tasks
hard_arith + hard_rev + hard_upper, generate_until, `exact_match`). The hard zoo's results are written to
bench_search_hard.*, with its reference merges (docs/results/hard_zoo.json, by
scripts/hard_zoo_references.py) under the table.

Controllers ask whole generations and the last one is truncated to the budget (SearchRun.generations),
so every optimizer is charged exactly `--budget` evaluations. Ray and the two workers start once and one
WorkerPool serves every run (the pool does not depend on the study).

    python scripts/bench_search.py                          # 8 x 3 seeds x 64 evaluations: 6 min on 2 cores
    python scripts/bench_search.py --budget 16 --seeds 1 --out /tmp/bench   # a quick look
    python scripts/bench_search.py --family hard --methods cmaes cmaes_tod random gp cmaes_est   # issue 16

Writes <out>/bench_search.md (table), bench_search.json (every curve) and bench_search.png (best-so-far
curves, mean over seeds with the min..max band); bench_search_hard.* with `--family hard`. matplotlib is
imported lazily, for the plot only: it is not an evomerge dependency (`pip install matplotlib`); without it
the plot is skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import statistics
import sys
import tempfile
import time
import warnings
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from evomerge.config import DEFAULT_SEARCH_SPACE, OPTUNA_SAMPLERS, StudyConfig, load_preset, parse_config  # noqa: E402
from evomerge.search.controllers import make_controller  # noqa: E402
from evomerge.search.spaces import encode_unit  # noqa: E402
from evomerge.study import StudyStore, fitness_of  # noqa: E402
from evomerge.zoo._data import N_EVAL_PER_SPLIT  # noqa: E402

METHODS = ("cmaes", "cmaes_tod", "random", "tpe", "mergekit", "cmaes_ties", "cmaes_fp", "cmaes_est")  # the default run
EXTRA_METHODS = ("gp",)  # run when named in --methods
ALL_METHODS = METHODS + EXTRA_METHODS
ESTIMATE = {"anchors": 0.25, "rescore_top": 3}
LABELS = {
    "cmaes": "evomerge CMA-ES (default)",
    "cmaes_tod": "evomerge CMA-ES on ties_or_dare (the previous default)",
    "cmaes_fp": "evomerge CMA-ES + first pass (multi-fidelity)",
    "random": "random search",
    "tpe": "Optuna TPE",
    "mergekit": "mergekit-evolve's CMA-ES",
    "cmaes_ties": "evomerge CMA-ES on mergekit's space",
    "cmaes_est": "evomerge CMA-ES + estimated fitness (anchors)",
    "gp": "Optuna GP",
}
CMAES_METHODS = ("cmaes", "cmaes_tod", "mergekit", "cmaes_ties", "cmaes_fp", "cmaes_est")  # optimizer.kind cmaes
SAMPLED = {"tpe": "TPE", "gp": "GP"}  # Optuna samplers: their proposals depend on the order trials finish
FIRST_PASS = {"fraction": 0.25, "promote": 0.5}  # --first-pass-fraction, --first-pass-promote
ZOO_EXAMPLES = N_EVAL_PER_SPLIT  # examples per split of each zoo task
MERGEKIT_SPACE = {  # mergekit-evolve's genome as an evomerge space: one method, weight and density per group x model
    "kind": "parameter",
    "methods": ["ties"],
    "layer_groups": 2,
    "params": {"weight": {"low": 0.0, "high": 2.0}, "density": {"low": 1e-6, "high": 1.0}},
}
SPACES = {"mergekit": MERGEKIT_SPACE, "cmaes_ties": MERGEKIT_SPACE, "cmaes_tod": "ties_or_dare"}  # else the default


@dataclass(frozen=True)
class Family:
    """What differs between the zoos the benchmark runs on."""

    task_prefix: str  # the zoo's lm-eval tasks are <prefix>_<skill>
    metric: str  # the tasks' metric in lm-eval's results
    stem: str  # output files: <out>/<stem>.{md,json,png}
    title: str  # the plot's title names the zoo
    caption: str  # the zoo and its tasks, the table caption's first words
    references: str | None = None  # docs/results file with the zoo's reference merges (hard_zoo_references.py)


FAMILIES = {
    "llama": Family("zoo", "acc", "bench_search", "Tiny zoo",
                    "Tiny zoo (llama: 4 layers, d=128; arith + rev specialists), tasks zoo_arith + zoo_rev (200 examples "
                    "per split, exact match)"),
    "hard": Family("hard", "exact_match", "bench_search_hard", "Hard zoo",
                   "Hard zoo (issue 16; hard: 4 layers, d=128; arith, rev and upper specialists, rev over-trained so "
                   "that it poisons naive merges), tasks hard_arith + hard_rev + hard_upper (200 examples per split, "
                   "generate_until, greedy, exact match)", references="hard_zoo.json"),
}


class MergekitEvolveController:
    """mergekit-evolve's optimizer behind evomerge's ask/tell seam.

    mergekit-evolve runs `cma.fmin2(None, parallel_objective=f, x0=x0, sigma0=1/6, options={"maxfevals":
    budget})`: without restarts, fmin2 is exactly an ask/tell loop over one CMAEvolutionStrategy with
    pycma's default options (no bounds, popsize 4 + 3 ln n). Its genotype is a (groups, models, 1, 2)
    array of [weight, density], x0 = [1/n, 1]; it decodes weight = |x| and density = clip(|x|, 0, 1)
    (allow_negative_weights off, the default). The only change is a fixed seed (pycma seeds from the
    clock by default), so runs repeat.

    The decoded values go to SearchRun as a point of the 8-gene space's unit cube. Two values of
    mergekit's range fall outside evomerge's: density 0 (evomerge requires density > 0; it becomes 1e-6,
    i.e. top 0.0001% instead of nothing) and weights above 2 (a group's weights are then all scaled by
    2 / max, which leaves normalized TIES unchanged: its merge is sum(w m d) / sum(w m), homogeneous of
    degree 0 in the weights). Both are counted in `clipped`.
    """

    def __init__(self, genes: list, labels: list[str], n_groups: int, seed: int, sigma0: float = 1 / 6,
                 popsize: int | None = None) -> None:
        import cma

        self.genes, self.labels, self.n_groups = genes, labels, n_groups
        n_models = len(labels)
        x0 = np.zeros((n_groups, n_models, 1, 2))
        x0[..., 0], x0[..., 1] = 1 / n_models, 1.0  # mergekit ModelGenome.initial_genotype(random=False)
        options = {"seed": seed + 1, "verbose": -9, "verb_log": 0}  # seed 0 would mean "from the clock"
        if popsize:
            options["popsize"] = popsize
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.es = cma.CMAEvolutionStrategy(x0.reshape(-1), sigma0, options)
        self.popsize = int(self.es.popsize)
        self.lookahead, self.early = 0, []  # fmin2 asks whole generations: no candidate asked ahead
        self.clipped = 0
        self._raw: list[np.ndarray] = []

    def gene_values(self, genotype: np.ndarray) -> dict[str, float]:
        """mergekit's decoding (genome.genotype_merge_config) into this space's gene values."""
        g = np.asarray(genotype, dtype=float).reshape(self.n_groups, len(self.labels), 1, 2)[:, :, 0, :]
        values: dict[str, float] = {}
        for group in range(self.n_groups):
            weights = np.abs(g[group, :, 0])
            densities = np.clip(np.abs(g[group, :, 1]), 0.0, 1.0)
            if weights.max() > 2.0:
                weights, self.clipped = weights * (2.0 / weights.max()), self.clipped + 1
            if densities.min() < 1e-6:
                densities, self.clipped = np.maximum(densities, 1e-6), self.clipped + 1
            for label, w, d in zip(self.labels, weights, densities):
                values[f"g{group}.weight.{label}"], values[f"g{group}.density.{label}"] = float(w), float(d)
        return values

    def ask_generation(self) -> list[np.ndarray]:
        """A whole generation, no lookahead: fmin2's loop."""
        self._raw = [np.asarray(x, dtype=float) for x in self.es.ask()]
        return [encode_unit(self.genes, self.gene_values(x)) for x in self._raw]

    def tell(self, xs: list[np.ndarray], fitness: list[float | None]) -> None:
        if len(xs) != len(self._raw):
            raise ValueError(f"tell() got {len(xs)} candidates, ask() gave {len(self._raw)}")
        # mergekit-evolve returns -score; a failed candidate there is None, which pycma cannot take
        losses = [math.nan if f is None else -float(f) for f in fitness]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.es.tell(self._raw, losses)

    @property
    def sigma(self) -> float:
        return float(self.es.sigma)

    def dumps(self) -> bytes:
        return pickle.dumps(self)


# --- one run ------------------------------------------------------------------------------------


@dataclass
class RunResult:
    method: str
    seed: int
    curve: list[float | None] = field(default_factory=list)  # fitness of evaluation i, in completion order
    best: float = math.nan
    heldout: float = math.nan
    best_trial: int = -1
    failed: int = 0
    pruned: int = 0  # held back after a first pass (they count as evaluations; never as the best)
    examples: int = 0  # examples scored over the run (first passes included)
    eval_s: float = 0.0  # worker seconds spent scoring, summed over trials
    popsize: int | None = None
    search_s: float = 0.0
    heldout_s: float = 0.0
    note: str = ""
    spearman: float = math.nan  # cmaes_est: estimated against full fitness over the run's candidates
    heldout_at: dict[str, float] = field(default_factory=dict)  # str(m) -> held-out of the best of the first m

    def best_so_far(self) -> list[float]:
        out, best = [], -math.inf
        for f in self.curve:
            best = max(best, f) if f is not None else best
            out.append(best if best > -math.inf else math.nan)
        return out


def study_config(method: str, seed: int, zoo, budget: int, db: Path, workers: int) -> StudyConfig:
    space = SPACES.get(method, DEFAULT_SEARCH_SPACE)
    space = load_preset(space) if isinstance(space, str) else space
    family = FAMILIES[zoo.family]
    tasks = [{"name": f"{family.task_prefix}_{skill}", "metric": family.metric} for skill in zoo.specialists]
    return parse_config({
        "name": f"{method}-s{seed}",
        "storage": f"sqlite:///{db}",
        "models": {"base": str(zoo.base), "sources": [str(p) for p in zoo.specialists.values()]},
        "search_space": space,
        "evaluation": {"tasks": tasks, "heldout_top_k": 1,
                       "first_pass": FIRST_PASS if method == "cmaes_fp" else None,
                       "estimate": ESTIMATE if method == "cmaes_est" else None},
        "optimizer": {"kind": "cmaes" if method in CMAES_METHODS else method, "seed": seed},
        "budget": {"trials": budget},
        "workers": {"n": workers},
    }, source=f"bench {method}")


def controller_for(method: str, prepared, workers: int):
    cfg, space = prepared.cfg, prepared.space
    if cfg.optimizer.kind in OPTUNA_SAMPLERS:
        return None
    if method == "mergekit":
        return MergekitEvolveController(space.genes, space.labels, cfg.search_space.layer_groups, cfg.optimizer.seed)
    x0 = np.array([g.to_unit(g.default) for g in space.genes])  # as run_search does
    return make_controller(cfg.optimizer, x0, workers)


def run_one(method: str, seed: int, zoo, args: argparse.Namespace, pool, db: Path) -> RunResult:
    """What search._drive does, on a pool shared across runs."""
    from evomerge.search import SearchRun, prepare
    from evomerge.search.estimation import rescore_in_full, search_anchors

    prepared = prepare(study_config(method, seed, zoo, args.budget, db, args.workers))
    if prepared.setup != pool.setup:
        raise ValueError(f"{method}: its worker setup differs from the shared pool's; the runs would not be comparable")
    store = StudyStore.create(prepared.cfg, {g.name: g.default for g in prepared.space.genes})
    controller = controller_for(method, prepared, args.workers)
    progress = print if args.verbose else (lambda _: None)
    estimate = prepared.cfg.evaluation.estimate
    started = time.perf_counter()
    anchors = search_anchors(pool, store, prepared.cfg, progress) if estimate is not None else None
    run = SearchRun(prepared, store, controller, pool, progress=progress, anchors=anchors)
    result = RunResult(method, seed, popsize=getattr(controller, "popsize", None))
    if controller is None:
        run.sampled()
    else:
        run.generations(0)
    if estimate is not None:
        rescore_in_full(pool, store, estimate.rescore_top, progress)
    result.search_s = time.perf_counter() - started
    run.score_heldout()
    result.heldout_s = time.perf_counter() - started - result.search_s
    _read_results(store, result)
    result.heldout_at = heldout_of_best_so_far(run, marks(args.budget) + [args.budget])
    if anchors is not None:
        result.spearman = estimate_quality(store, pool)
    if isinstance(controller, MergekitEvolveController) and controller.clipped:
        result.note = f"{controller.clipped} group(s) clipped to evomerge's range"
    return result


def _evaluations(store: StudyStore) -> tuple[list, list]:
    """(every finished trial, one per evaluation in completion order: a retried candidate's last attempt)."""
    import optuna

    state = optuna.trial.TrialState
    finished = [t for t in store.study.get_trials(deepcopy=False) if t.state in (state.COMPLETE, state.FAIL, state.PRUNED)]
    final = {}  # (generation, candidate) -> its last attempt: a retried candidate is one evaluation
    for t in sorted(finished, key=lambda t: t.datetime_complete):
        final[(t.user_attrs.get("generation"), t.user_attrs.get("candidate"))] = t
    return finished, sorted(final.values(), key=lambda t: t.datetime_complete)


def heldout_of_best_so_far(run, at: list[int]) -> dict[str, float]:
    """For each m in `at`: the held-out fitness of the best of the first m evaluations (by the fitness the
    search saw), scored by the run's pool where the run did not score it already."""
    import optuna

    store = run.store
    ordered = [t for t in _evaluations(store)[1] if t.state == optuna.trial.TrialState.COMPLETE]
    best = {m: max(ordered[:m], key=fitness_of, default=None) for m in at}
    todo = {t.number: t for t in best.values() if t is not None and store.heldout(t.number) is None}
    run.score_on_heldout(list(todo.values()))
    held = {m: store.heldout(t.number) if t is not None else None for m, t in best.items()}
    return {str(m): h["fitness"] for m, h in held.items() if h}


def _read_results(store: StudyStore, result: RunResult) -> None:
    import optuna

    state = optuna.trial.TrialState
    finished, ordered = _evaluations(store)
    result.curve = [fitness_of(t) if t.state == state.COMPLETE else None for t in ordered]
    result.failed = sum(t.state == state.FAIL for t in ordered)
    result.pruned = sum(t.state == state.PRUNED for t in ordered)
    result.eval_s = round(sum(t.user_attrs.get("eval_s", 0.0) for t in finished), 2)
    per_task = {t.name: t.limit or ZOO_EXAMPLES for t in store.config.evaluation.tasks}
    first = store.config.evaluation.first_pass
    for t in finished:  # a promoted candidate's full pass skips its first-pass examples (zero-shot leaf tasks)
        if t.state == state.COMPLETE:
            result.examples += t.user_attrs["examples"] if t.user_attrs.get("estimated") else sum(per_task.values())
        elif t.state == state.PRUNED:
            result.examples += sum(max(1, math.ceil(first.fraction * n)) for n in per_task.values())
    if store.anchors() is not None:  # the known models' full scoring, and the best ones' full scoring at the end
        known = len(store.config.models.sources) + 1
        rescored = sum(store.full(t.number) is not None for t in store.completed())
        result.examples += (known + rescored) * sum(per_task.values())
    top = store.ranked()[0]  # the trial score_heldout scored
    result.best, result.best_trial = store.reported_fitness(top), top.number
    held = store.heldout(top.number)
    result.heldout = held["fitness"] if held else math.nan


def estimate_quality(store: StudyStore, pool) -> float:
    """Spearman correlation of estimated and full fitness over every completed candidate (each scored in
    full here, for this measurement only)."""
    from evomerge.runtime.estimate import spearman
    from evomerge.runtime.messages import Job, JobFailure
    from evomerge.runtime.pool import from_queue

    trials = {t.number: t for t in store.completed()}
    queue = deque(Job(trial=n, recipe=StudyStore.recipe_of(t)) for n, t in trials.items())
    full = {job.trial: outcome.fitness for job, outcome in pool.run(from_queue(queue)) if not isinstance(outcome, JobFailure)}
    numbers = sorted(full)
    return spearman([fitness_of(trials[n]) for n in numbers], [full[n] for n in numbers])


# --- report -------------------------------------------------------------------------------------


def mean_sd(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {sd:.3f}"


def marks(budget: int) -> list[int]:
    """The evaluation counts the tables report besides the budget: 16, 32, 64 below it, a quarter, a half."""
    return sorted({m for m in (16, 32, 64) if m < budget} | {max(budget // 4, 1), max(budget // 2, 1)} - {budget})


def heldout_table(results: list[RunResult], budget: int) -> str:
    """Held-out of the best so far at each mark (runs that recorded it); empty when none did."""
    at = [*marks(budget), budget]
    lines = []
    for method in ALL_METHODS:
        runs = [r for r in results if r.method == method and r.heldout_at]
        if runs:
            cells = [mean_sd([r.heldout_at[str(m)] for r in runs if str(m) in r.heldout_at]) for m in at]
            lines.append("| " + " | ".join([LABELS[method], *cells]) + " |")
    if not lines:
        return ""
    head = ["optimizer", *[f"held-out of the best @{m}" for m in at]]
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *lines])


def table(results: list[RunResult], budget: int) -> str:
    marks_ = marks(budget)
    head = ["optimizer", *[f"best fitness @{m}" for m in marks_], f"best fitness @{budget}", "held-out of best",
            "search s / run", "eval s / run", "examples / run", "failed / run", "pruned / run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in ALL_METHODS:
        runs = [r for r in results if r.method == method]
        if not runs:
            continue
        at = [mean_sd([r.best_so_far()[m - 1] for r in runs if len(r.curve) >= m]) for m in marks_]
        cells = [LABELS[method], *at, f"**{mean_sd([r.best for r in runs])}**", f"**{mean_sd([r.heldout for r in runs])}**",
                 f"{statistics.fmean(r.search_s for r in runs):.0f}", f"{statistics.fmean(r.eval_s for r in runs):.0f}",
                 f"{statistics.fmean(r.examples for r in runs):,.0f}", f"{statistics.fmean(r.failed for r in runs):.1f}",
                 f"{statistics.fmean(r.pruned for r in runs):.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[RunResult], budget: int, path: Path, family: Family, reference: dict | None = None) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install matplotlib)"
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    for method in ALL_METHODS:
        curves = [r.best_so_far()[:budget] for r in results if r.method == method]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        arr = np.array([c[:n] for c in curves], dtype=float)
        x = np.arange(1, n + 1)
        line, = ax.plot(x, np.nanmean(arr, axis=0), label=f"{LABELS[method]} ({len(curves)} seeds)")
        ax.fill_between(x, np.nanmin(arr, axis=0), np.nanmax(arr, axis=0), color=line.get_color(), alpha=0.15)
    if reference is not None:
        ax.axhline(reference["fitness"], color="black", linestyle="--", linewidth=1,
                   label=f"hand-tuned reference (grid's best), fitness {reference['fitness']:.3f}")
    means = [np.nanmean([r.best_so_far()[max(budget // 8, 1) - 1] for r in results if r.method == m]) for m in ALL_METHODS
             if any(r.method == m for r in results)]
    ax.set_ylim(bottom=max(0.0, min(means) - 0.05))  # the first few evaluations are off the bottom: the ends matter
    ax.set_xlabel("evaluations spent")
    ax.set_ylabel("best fitness so far (fitness split)")
    ax.set_title(f"{family.title}: best fitness per evaluation (mean of seeds; band: min..max)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return f"plot: {path} ({path.stat().st_size // 1024} KB)"


# --- the hard zoo's reference merges --------------------------------------------------------------


def load_references(family: Family, zoo) -> dict | None:
    """The zoo's reference merges from docs/results (hard_zoo_references.py), or None where it has none.

    Returns {"file", "date", "same_zoo", "lines": [{"name", "fitness", "heldout"}, ...]}, the hand-tuned
    reference (the grid's best by fitness) first."""
    path = REPO / "docs" / "results" / family.references if family.references else None
    if path is None or not path.is_file():
        return None
    refs = json.loads(path.read_text())
    rows = {r["name"]: r for r in refs["rows"]}
    best_source = max((r for r in refs["rows"] if r["name"].startswith("source ")), key=lambda r: r["mean_heldout"])
    grid = ", ".join(f"{g:g}" for g in refs["grid_values"])
    named = [(f"hand-tuned reference: the best of the task-arithmetic grid {{{grid}}} per source by fitness, "
              f"{refs['reference']['recipe']}", refs["reference"]),
             *((name, rows[name]) for name in ("plain average", "default TIES", "task arithmetic, weights 1") if name in rows),
             (f"best single source ({best_source['name'].removeprefix('source ')})", best_source)]
    fingerprint = json.loads((zoo.root / "zoo.json").read_text())["fingerprint"]
    return {"file": f"docs/results/{family.references}", "date": refs["date"],
            "same_zoo": refs["zoo"]["fingerprint"] == fingerprint,
            "lines": [{"name": name, "fitness": round(r["mean_fitness"], 4), "heldout": round(r["mean_heldout"], 4)}
                      for name, r in named]}


def references_text(refs: dict, results: list[RunResult]) -> str:
    """The reference merges as a list under the table, and how many runs reach the hand-tuned one held-out."""
    where = "the same zoo build" if refs["same_zoo"] else "ANOTHER build of the zoo (rerun scripts/hard_zoo_references.py)"
    lines = [f"Reference merges ({refs['file']}, scripts/hard_zoo_references.py, {refs['date']}, on {where}; "
             "each merge scored on both splits):", ""]
    lines += [f"- {r['name']}: fitness {r['fitness']:.3f}, held-out **{r['heldout']:.3f}**" for r in refs["lines"]]
    target = refs["lines"][0]["heldout"]
    reached = [f"{LABELS[m]} {sum(r.heldout >= target for r in runs)}/{len(runs)}" for m in ALL_METHODS
               if (runs := [r for r in results if r.method == m])]
    lines += ["", f"Runs whose best trial's held-out reaches the hand-tuned reference's {target:.3f}: {', '.join(reached)}."]
    return "\n".join(lines)


# --- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=int, default=64, help="evaluations per run")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", nargs="+", choices=ALL_METHODS, default=list(METHODS))
    parser.add_argument("--family", choices=FAMILIES, default="llama", help="the zoo: llama (tiny) or hard (issue 16)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results")
    parser.add_argument("--zoo", type=Path, default=None, help="zoo cache folder (default: the test cache)")
    parser.add_argument("--verbose", action="store_true", help="print every trial")
    parser.add_argument("--first-pass-fraction", type=float, default=FIRST_PASS["fraction"], help="cmaes_fp: share of examples in the first pass")
    parser.add_argument("--first-pass-promote", type=float, default=FIRST_PASS["promote"], help="cmaes_fp: share of candidates scored in full")
    parser.add_argument("--replot", action="store_true", help="only rewrite <out>/bench_search[_hard].{md,png} from its .json")
    args = parser.parse_args(argv)
    FIRST_PASS.update(fraction=args.first_pass_fraction, promote=args.first_pass_promote)
    family = FAMILIES[args.family]
    if args.replot:
        data = json.loads((args.out / f"{family.stem}.json").read_text())
        print(report(data, [RunResult(**r) for r in data["runs"]], args.out, family))
        return 0

    from evomerge.runtime.pool import WorkerPool, start_ray
    from evomerge.search import prepare
    from evomerge.zoo import build_zoo

    sys.path.insert(0, str(REPO / "tests"))
    from zoo_fixtures import zoo_cache_dir

    wall_started = time.perf_counter()
    zoo = build_zoo(args.zoo or zoo_cache_dir(), family=args.family)
    args.out.mkdir(parents=True, exist_ok=True)
    results: list[RunResult] = []
    with tempfile.TemporaryDirectory(prefix="bench_search-") as tmp:
        db = Path(tmp) / "bench.db"
        setup = prepare(study_config("cmaes", 0, zoo, args.budget, Path(tmp) / "probe.db", args.workers)).setup
        start_ray(args.workers, 1)
        pool = WorkerPool(setup, args.workers, cpus=1, progress=print)
        try:
            for seed in range(args.seeds):
                for method in args.methods:
                    r = run_one(method, seed, zoo, args, pool, db)
                    results.append(r)
                    print(f"{method:9s} seed {seed}: best {r.best:.4f} (trial {r.best_trial}) held-out {r.heldout:.4f} "
                          f"| {len(r.curve)} evals, {r.failed} failed, popsize {r.popsize}, search {r.search_s:.0f}s "
                          f"held-out {r.heldout_s:.0f}s {r.note}", flush=True)
        finally:
            pool.close()
    wall_s = time.perf_counter() - wall_started
    data = {"budget": args.budget, "seeds": args.seeds, "workers": args.workers, "wall_s": round(wall_s, 1), "first_pass": FIRST_PASS,
            "worker_startup_s": round(pool.startup_s, 1), "runs": [asdict(r) for r in results]}
    refs = load_references(family, zoo)
    if refs is not None:  # the hard zoo only: the llama zoo's json keeps its keys
        data["references"] = refs
    (args.out / f"{family.stem}.json").write_text(json.dumps(data, indent=1))
    print(report(data, results, args.out, family))
    return 0


def repeatability(methods: set[str]) -> str:
    """Which rows repeat from run to run: the Optuna samplers' do not."""
    sampled = [name for m, name in SAMPLED.items() if m in methods]
    text = "The CMA-ES and random rows repeat exactly from run to run"
    if not sampled:
        return text + "."
    whose = " and ".join(f"{name}'s" for name in sampled)
    rows = "its row varies" if len(sampled) == 1 else "their rows vary"
    return f"{text}; {whose} proposals depend on the order in which asynchronous trials finish, so {rows} between runs."


def report(data: dict, results: list[RunResult], out: Path, family: Family) -> str:
    """Write <out>/<stem>.md and .png from the runs; returns what to print."""
    md = table(results, data["budget"])
    held = heldout_table(results, data["budget"])
    md += f"\n\nHeld-out (the held-out split) of the best trial so far, by the fitness the search saw:\n\n{held}" if held else ""
    header = (f"{family.caption}, {data['budget']} evaluations per run, {data['seeds']} seed(s), {data['workers']} "
              f"Ray workers (CPU, shared 2-core machine); mean ± sd over seeds. Held-out: the best trial re-scored on "
              f"the held-out split. Total wall time {data['wall_s'] / 60:.1f} min (worker start-up "
              f"{data['worker_startup_s']:.0f}s). {repeatability({r.method for r in results})}")
    if "first_pass" in data and any(r.method == "cmaes_fp" for r in results):
        fp = data["first_pass"]
        header += (f" First pass: every candidate on the first {fp['fraction']:.0%} of each task's examples, those "
                   f"reaching the top {fp['promote']:.0%} of earlier first passes on the rest; `examples` counts the "
                   f"examples scored (pruned candidates never count as the best).")
    est = [r for r in results if r.method == "cmaes_est"]
    if est:
        header += (f" Estimated fitness: each candidate on {ESTIMATE['anchors']:.0%} of each task's examples (anchors "
                   f"chosen from the base's and sources' results; `examples` includes scoring them and the best "
                   f"{ESTIMATE['rescore_top']} in full); Spearman correlation of estimated and full fitness over each "
                   f"run's candidates: {mean_sd([r.spearman for r in est])} (runs: "
                   + ", ".join(f"{r.spearman:.3f}" for r in est) + ").")
    weight = load_preset(DEFAULT_SEARCH_SPACE)["params"]["weight"]
    header += (f" Default space (`{DEFAULT_SEARCH_SPACE}`): one task-arithmetic weight per source in "
               f"[{weight['low']:g}, {weight['high']:g}] for the whole model, lambda 1.")
    refs = data.get("references")
    below = f"\n\n{references_text(refs, results)}" if refs else ""
    (out / f"{family.stem}.md").write_text(f"{header}\n\n{md}{below}\n")
    reference = refs["lines"][0] if refs else None
    note = plot(results, data["budget"], out / f"{family.stem}.png", family, reference)
    return f"\n{header}\n\n{md}{below}\n\n{note}\nwrote {out}/{family.stem}.{{md,json}}"


if __name__ == "__main__":
    sys.exit(main())
