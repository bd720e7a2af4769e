"""`evomerge demo`: the whole product on the tiny offline zoo, in a few minutes on a laptop CPU.

Builds (or reuses) the zoo, writes a study config a user can read and rerun, searches, exports the best
trial, and prints a table that puts the evolved merge beside the source models, a plain average and
default TIES, on the fitness split and on the held-out split. Every row is scored from a checkpoint on
disk, the evolved one included, so the table also shows that the export reproduces the search.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from evomerge.config import load_config
from evomerge.export import export_trial, write_recipe_checkpoint
from evomerge.recipe import Recipe
from evomerge.runtime.scoring import LmEvalScorer
from evomerge.search import prepare, run_search, task_specs
from evomerge.study import StudyStore

DEMO_TRIALS = 48
DEMO_SPACE = "ties_or_dare"


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


def run_demo(folder: Path, *, trials: int | None = None, workers: int | None = None,
             progress: Callable[[str], None] = print) -> list[Row]:
    from evomerge.zoo import build_zoo

    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    zoo = build_zoo(folder / "zoo", seed=0, family="llama", progress=progress)
    config_path = write_demo_config(folder, zoo.base, zoo.specialists, trials or DEMO_TRIALS, workers or 2)
    db = folder / "demo.db"
    if db.exists():
        progress(f"demo: replacing the previous demo study {db}")
        db.unlink()
    cfg = load_config(config_path)
    progress(f"demo: config {config_path}")
    summary = run_search(prepare(cfg), progress)
    store = StudyStore.open(cfg.storage, cfg.name)
    best = export_trial(store, None, folder / "best", force=True)
    progress(f"demo: exported trial {best.trial} to {best.out}")
    scorer = LmEvalScorer(task_specs(cfg), cfg.evaluation.include_paths, batch_size=cfg.evaluation.batch_size)
    rows = baseline_rows(scorer, folder, zoo.base, zoo.specialists, progress)
    rows.append(score_row(scorer, "evolved (exported)", best.out))
    table = results_table(rows)
    (folder / "results.md").write_text(table + "\n")
    progress(f"\nsearch: {summary.trials} trials, {summary.failed} failed, {summary.wall_s:.0f}s\n{table}")
    return rows


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


def baseline_rows(scorer: LmEvalScorer, folder: Path, base: Path, specialists: dict[str, Path],
                  progress: Callable[[str], None]) -> list[Row]:
    """Base, each specialist, the plain average and default TIES, each scored from disk."""
    rows = [score_row(scorer, "base", base)] + [score_row(scorer, f"specialist {k}", p) for k, p in specialists.items()]
    sources = tuple(str(p) for p in specialists.values())
    ones = tuple(1.0 for _ in sources)
    recipes = {
        "plain average": Recipe("linear", str(base), sources, ({"weight": ones},)),
        "default TIES (density 0.5, weight 1)": Recipe("ties", str(base), sources, ({"weight": ones, "density": tuple(0.5 for _ in sources)},)),
    }
    for name, recipe in recipes.items():
        out = folder / "baselines" / name.split(" (")[0].replace(" ", "_")
        write_recipe_checkpoint(recipe, out, card=f"# {name}\n")
        rows.append(score_row(scorer, name, out))
    progress("demo: scored source models and baselines")
    return rows


def score_row(scorer: LmEvalScorer, name: str, path: Path) -> Row:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return Row(name, scorer.score(model, tokenizer, "fitness"), scorer.score(model, tokenizer, "heldout"))


def results_table(rows: list[Row]) -> str:
    tasks = list(rows[0].fitness)
    head = ["model", *[f"{t} fit" for t in tasks], "mean fit", *[f"{t} held-out" for t in tasks], "mean held-out"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.name, *[f"{r.fitness[t]:.3f}" for t in tasks], f"{r.mean_fitness:.3f}",
                 *[f"{r.heldout[t]:.3f}" for t in tasks], f"**{r.mean_heldout:.3f}**"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
