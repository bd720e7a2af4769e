"""`evomerge demo`: the whole product on the tiny offline zoo, in a few minutes on a laptop CPU.

Builds (or reuses) the zoo, writes a study config a user can read and rerun, searches, exports the best
trial, and prints a table that puts the evolved merge beside the source models, a plain average and
default TIES, on the fitness split and on the held-out split. Every row is scored from a checkpoint on
disk, the evolved one included, so the table also shows that the export reproduces the search. The last
lines are the verdict of this run, whatever it is: did the evolved merge beat the best source model and
default TIES on the held-out split, and by how much. `results.md` and `results.json` in the demo folder
keep the table, the verdict and the timings (scripts/demo_results.py collects them over several runs).
"""

from __future__ import annotations

import json
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from evomerge.config import DEFAULT_SEARCH_SPACE, load_config
from evomerge.export import export_trial, write_recipe_checkpoint
from evomerge.recipe import Recipe
from evomerge.runtime.scoring import LmEvalScorer
from evomerge.search import prepare, run_search, task_specs
from evomerge.study import StudyStore

DEMO_TRIALS = 48
DEMO_SPACE = DEFAULT_SEARCH_SPACE
EVOLVED = "evolved (exported)"
DEFAULT_TIES = "default TIES (density 0.5, weight 1)"
SPECIALIST = "specialist "  # row-name prefix of each source model


@dataclass(frozen=True)
class Row:
    name: str
    fitness: dict[str, float]
    heldout: dict[str, float]

    @property
    def mean_fitness(self) -> float:
        return statistics.fmean(self.fitness.values())

    @property
    def mean_heldout(self) -> float:
        return statistics.fmean(self.heldout.values())


@dataclass(frozen=True)
class Comparison:
    """The evolved merge against one reference row, on the held-out mean."""

    reference: str  # what it is compared with, e.g. "the best source model (specialist arith)"
    evolved: float
    other: float

    @property
    def margin(self) -> float:
        return self.evolved - self.other

    def line(self) -> str:
        outcome = "beat it" if self.margin > 0 else "did NOT beat it"
        return (f"verdict: held-out mean exact match, evolved merge {self.evolved:.3f} vs {self.reference} "
                f"{self.other:.3f}: {outcome} ({self.margin:+.3f})")


@dataclass(frozen=True)
class DemoResult:
    rows: list[Row]
    verdict: list[Comparison]  # against the best source model, then against default TIES
    trials: int
    failed: int
    wall_s: float  # the whole demo, this process
    zoo_s: float  # building the zoo in this run (0 when it was cached)
    search_s: float
    zoo: dict  # the zoo's manifest (zoo.json): recipe, build time, skill scores on its validation split

    @property
    def evolved_won(self) -> bool:
        return all(c.margin > 0 for c in self.verdict)


def run_demo(folder: Path, *, trials: int | None = None, workers: int | None = None,
             progress: Callable[[str], None] = print, zoo_seed: int = 0, zoo_threads: int | None = None) -> DemoResult:
    """Run the demo in folder; its last progress lines are the verdict. zoo_seed and zoo_threads vary
    the zoo build (scripts/demo_results.py measures the spread); `evomerge demo` uses the defaults."""
    with _quiet():
        return _run(folder.resolve(), trials or DEMO_TRIALS, workers or 2, progress, zoo_seed, zoo_threads)


def _run(folder: Path, trials: int, workers: int, progress: Callable[[str], None], zoo_seed: int,
         zoo_threads: int | None) -> DemoResult:
    from evomerge.zoo import build_zoo

    t0 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    zoo = build_zoo(folder / "zoo", seed=zoo_seed, family="llama", progress=progress, threads=zoo_threads)
    zoo_s = time.perf_counter() - t0
    config_path = write_demo_config(folder, zoo.base, zoo.specialists, trials, workers)
    db = folder / "demo.db"
    if db.exists():
        progress(f"demo: replacing the previous demo study {db}")
        db.unlink()
    cfg = load_config(config_path)
    progress(f"demo: config {config_path}")
    summary = run_search(prepare(cfg), progress)
    best = export_trial(StudyStore.open(cfg.storage, cfg.name), None, folder / "best", force=True)
    progress(f"demo: exported trial {best.trial} to {best.out}; scoring every model from disk")
    scorer = LmEvalScorer(task_specs(cfg), cfg.evaluation.include_paths, batch_size=cfg.evaluation.batch_size)
    rows = baseline_rows(scorer, folder, zoo.base, zoo.specialists)
    rows.append(score_row(scorer, EVOLVED, best.out))
    result = DemoResult(rows, verdict(rows), summary.trials, summary.failed, time.perf_counter() - t0, zoo_s,
                        summary.wall_s, json.loads((zoo.root / "zoo.json").read_text()))
    _write_results(folder, result)
    _print_summary(progress, folder, result)
    return result


@contextmanager
def _quiet() -> Iterator[None]:
    """What the demo prints is its own progress: no "Loading weights" bar per model it scores, no pycma
    warning that it cannot plot (the workers' bars are off too: `runtime.pool.QUIET_ENV`)."""
    from transformers.utils import logging as hf_logging

    bars_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Could not import matplotlib", category=UserWarning)
            yield
    finally:
        if bars_on:
            hf_logging.enable_progress_bar()


def write_demo_config(folder: Path, base: Path, specialists: dict[str, Path], trials: int, workers: int) -> Path:
    config = {
        "name": "demo",
        "storage": f"sqlite:///{folder / 'demo.db'}",
        "models": {"base": str(base), "sources": [str(p) for p in specialists.values()]},
        "search_space": DEMO_SPACE,
        "evaluation": {"tasks": [{"name": f"zoo_{skill}"} for skill in specialists]},
        "optimizer": {"kind": "cmaes", "seed": 0},
        "budget": {"trials": trials},
        "workers": {"n": workers},
    }
    path = folder / "study.yaml"
    path.write_text("# Written by `evomerge demo`; rerun with: evomerge search " + str(path) + " --study demo2\n"
                    + yaml.safe_dump(config, sort_keys=False))
    return path


def baseline_rows(scorer: LmEvalScorer, folder: Path, base: Path, specialists: dict[str, Path]) -> list[Row]:
    """Base, each specialist, the plain average and default TIES, each scored from disk."""
    rows = [score_row(scorer, "base", base)] + [score_row(scorer, SPECIALIST + k, p) for k, p in specialists.items()]
    sources = tuple(str(p) for p in specialists.values())
    ones = tuple(1.0 for _ in sources)
    recipes = {
        "plain average": Recipe("linear", str(base), sources, ({"weight": ones},)),
        DEFAULT_TIES: Recipe("ties", str(base), sources, ({"weight": ones, "density": tuple(0.5 for _ in sources)},)),
    }
    for name, recipe in recipes.items():
        out = folder / "baselines" / name.split(" (")[0].replace(" ", "_")
        write_recipe_checkpoint(recipe, out, card=f"# {name}\n")
        rows.append(score_row(scorer, name, out))
    return rows


def score_row(scorer: LmEvalScorer, name: str, path: Path) -> Row:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only spin, and badly so on a busy machine
    try:
        return Row(name, scorer.score(model, tokenizer, "fitness"), scorer.score(model, tokenizer, "heldout"))
    finally:
        torch.set_num_threads(before)


def verdict(rows: list[Row]) -> list[Comparison]:
    """The evolved row (named EVOLVED) against the best source model and against default TIES."""
    by_name = {r.name: r for r in rows}
    evolved = by_name[EVOLVED].mean_heldout
    best = max((r for r in rows if r.name.startswith(SPECIALIST)), key=lambda r: r.mean_heldout)
    return [Comparison(f"the best source model ({best.name})", evolved, best.mean_heldout),
            Comparison("default TIES", evolved, by_name[DEFAULT_TIES].mean_heldout)]


def results_table(rows: list[Row]) -> str:
    tasks = list(rows[0].fitness)
    head = ["model", *[f"{t} fit" for t in tasks], "mean fit", *[f"{t} held-out" for t in tasks], "mean held-out"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.name, *[f"{r.fitness[t]:.3f}" for t in tasks], f"{r.mean_fitness:.3f}",
                 *[f"{r.heldout[t]:.3f}" for t in tasks], f"**{r.mean_heldout:.3f}**"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s" if seconds >= 60 else f"{seconds:.0f} s"


def _timing_line(result: DemoResult) -> str:
    zoo = f"zoo built in {_minutes(result.zoo_s)}" if result.zoo_s >= 1 else "zoo cached"
    return (f"demo: {_minutes(result.wall_s)} in all ({zoo}; search of {result.trials} trials, "
            f"{result.failed} failed, {_minutes(result.search_s)})")


def _print_summary(progress: Callable[[str], None], folder: Path, result: DemoResult) -> None:
    progress(f"\n{results_table(result.rows)}\n")
    progress(f"{_timing_line(result)}; table in {folder / 'results.md'}")
    for comparison in result.verdict:
        progress(comparison.line())


def _write_results(folder: Path, result: DemoResult) -> None:
    lines = [results_table(result.rows), "", _timing_line(result), "", *(c.line() for c in result.verdict)]
    (folder / "results.md").write_text("\n".join(lines) + "\n")
    data = {"rows": [asdict(r) | {"mean_fitness": r.mean_fitness, "mean_heldout": r.mean_heldout} for r in result.rows],
            "verdict": [asdict(c) | {"margin": c.margin} for c in result.verdict], "evolved_won": result.evolved_won,
            "trials": result.trials, "failed": result.failed, "wall_s": round(result.wall_s, 1),
            "zoo_s": round(result.zoo_s, 1), "search_s": round(result.search_s, 1), "zoo": result.zoo}
    (folder / "results.json").write_text(json.dumps(data, indent=2) + "\n")
