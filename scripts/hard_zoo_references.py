"""Reference points of the hard zoo (issue 16): the merges a search on it is measured against.

Builds (or reuses) the hard zoo (`evomerge.zoo`, family "hard": a base and arith, rev and upper
specialists, the rev one over-trained so that it poisons naive merges), merges with evomerge's merge
code (`write_recipe_checkpoint`, what `evomerge merge` runs) and scores every merge with evomerge's
lm-eval scorer on the hard_* tasks (generate_until, greedy, exact match; evaluators/zoo/hard_*.yaml):

  - the base and each source alone;
  - the plain average (linear, weight 1 each), default TIES (density 0.5, weight 1 each) and task
    arithmetic with weights 1;
  - a coarse grid of task-arithmetic weights, {0, 0.25, 0.5, 0.75, 1} per source (125 merges), scored
    on the fitness split. The grid's best by fitness, scored on the held-out split, is the hand-tuned
    reference; the next best few are scored held-out too, to show how much the choice depends on noise.

Writes <out>/hard_zoo.md (the table, the command, the date, cores, wall time) and hard_zoo.json (every
score, the grid's included). Usage: .venv/bin/python scripts/hard_zoo_references.py [--zoo DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from evomerge.config import TaskConfig  # noqa: E402
from evomerge.recipe import Recipe  # noqa: E402

GRID = (0.0, 0.25, 0.5, 0.75, 1.0)  # task-arithmetic weight of each source
HELDOUT_TOP = 5  # grid merges (best by fitness) also scored on the held-out split
FAMILY = "hard"
NAIVE = ("plain average", "default TIES", "task arithmetic, weights 1")


@dataclass(frozen=True)
class Scored:
    name: str
    recipe: str  # method and weights, or the model dir's name for a source
    fitness: dict[str, float]  # task -> exact match
    heldout: dict[str, float] | None = None  # None: not scored on the held-out split
    weights: tuple[float, ...] | None = None  # a grid point's task-arithmetic weights

    @property
    def mean_fitness(self) -> float:
        return statistics.fmean(self.fitness.values())

    @property
    def mean_heldout(self) -> float | None:
        return None if self.heldout is None else statistics.fmean(self.heldout.values())


def hard_tasks(skills: list[str]) -> list[TaskConfig]:
    return [TaskConfig(name=f"hard_{skill}", metric="exact_match") for skill in skills]


class Bench:
    """One live model that every checkpoint is loaded into, and the scorer built once around it."""

    def __init__(self, zoo, work: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from evomerge.runtime.scoring import LmEvalScorer

        torch.set_num_threads(1)  # a tiny model: threads only spin
        self.zoo, self.work = zoo, work
        self.model = AutoModelForCausalLM.from_pretrained(zoo.base).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(zoo.base)
        self.scorer = LmEvalScorer(hard_tasks(list(zoo.specialists)), [REPO / "evaluators"], batch_size=64)
        self.sources = tuple(str(p) for p in zoo.specialists.values())

    def load(self, model_dir: Path) -> None:
        from safetensors.torch import load_file

        self.model.load_state_dict(load_file(model_dir / "model.safetensors"))
        self.model.eval()

    def merge(self, recipe: Recipe) -> Path:
        from evomerge.export import write_recipe_checkpoint

        out = self.work / "merged"
        write_recipe_checkpoint(recipe, out, card="# hard zoo reference merge\n")
        return out

    def score(self, name: str, label: str, model_dir: Path, *, heldout: bool) -> Scored:
        self.load(model_dir)
        fitness = self.scorer.score(self.model, self.tokenizer, "fitness")
        held = self.scorer.score(self.model, self.tokenizer, "heldout") if heldout else None
        return Scored(name, label, fitness, held)

    def score_recipe(self, name: str, recipe: Recipe, *, heldout: bool) -> Scored:
        return self.score(name, describe(recipe), self.merge(recipe), heldout=heldout)

    def score_grid_point(self, name: str, weights: tuple[float, ...], *, heldout: bool) -> Scored:
        recipe = Recipe("task_arithmetic", str(self.zoo.base), self.sources, ({"weight": weights},))
        return replace(self.score_recipe(name, recipe, heldout=heldout), weights=weights)


def describe(recipe: Recipe) -> str:
    params = ", ".join(f"{k} {_fmt(v)}" for k, v in recipe.groups[0].items())
    return f"{recipe.method} ({params})"


def _fmt(value) -> str:
    return "(" + ", ".join(f"{v:g}" for v in value) + ")" if isinstance(value, tuple | list) else f"{value:g}"


def naive_recipes(bench: Bench) -> dict[str, Recipe]:
    """NAIVE's recipes: the plain average, default TIES, task arithmetic with weights 1."""
    ones, halves, base = tuple(1.0 for _ in bench.sources), tuple(0.5 for _ in bench.sources), str(bench.zoo.base)
    return dict(zip(NAIVE, (Recipe("linear", base, bench.sources, ({"weight": ones},)),
                            Recipe("ties", base, bench.sources, ({"weight": ones, "density": halves},)),
                            Recipe("task_arithmetic", base, bench.sources, ({"weight": ones},))), strict=True))


def run(bench: Bench, grid_values: tuple[float, ...], say: Callable[[str], None]) -> tuple[list[Scored], list[Scored]]:
    """(reference rows: sources and naive merges, scored on both splits; the grid, best fitness first)."""
    rows = [bench.score("base", "-", bench.zoo.base, heldout=True)]
    say(_line(rows[-1]))
    over = json.loads((bench.zoo.root / "zoo.json").read_text())["overtrained"]["skill"]
    for skill, path in bench.zoo.specialists.items():
        rows.append(bench.score(f"source {skill}", "over-trained" if skill == over else "-", path, heldout=True))
        say(_line(rows[-1]))
    for name, recipe in naive_recipes(bench).items():
        rows.append(bench.score_recipe(name, recipe, heldout=True))
        say(_line(rows[-1]))
    grid, started = [], time.perf_counter()
    points = list(itertools.product(grid_values, repeat=len(bench.sources)))
    for i, weights in enumerate(points, 1):
        grid.append(bench.score_grid_point("grid", weights, heldout=False))
        if i % 5 == 0 or i == len(points):
            best = max(grid, key=lambda s: s.mean_fitness)
            say(f"grid {i}/{len(points)} ({time.perf_counter() - started:.0f} s): {_line(grid[-1])}; "
                f"best so far {best.recipe} {best.mean_fitness:.3f}")
    grid.sort(key=lambda s: -s.mean_fitness)
    for i, point in enumerate(grid[:HELDOUT_TOP]):  # merged and scored again, on both splits
        grid[i] = bench.score_grid_point(f"grid #{i + 1} by fitness", point.weights, heldout=True)
        say(_line(grid[i]))
    return rows, grid


def _line(s: Scored) -> str:
    held = "" if s.heldout is None else f", held-out {s.mean_heldout:.3f}"
    cells = " ".join(f"{k.removeprefix('hard_')} {v:.3f}" for k, v in s.fitness.items())
    return f"{s.name}: {s.recipe}: fitness {s.mean_fitness:.3f} ({cells}){held}"


def table(rows: list[Scored]) -> str:
    tasks = list(rows[0].fitness)
    short = [t.removeprefix("hard_") for t in tasks]
    head = ["model", "recipe", *[f"{t} fit" for t in short], "mean fit", *[f"{t} held-out" for t in short], "mean held-out"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        held = [f"{r.heldout[t]:.3f}" for t in tasks] + [f"**{r.mean_heldout:.3f}**"] if r.heldout else ["-"] * (len(tasks) + 1)
        cells = [r.name, r.recipe, *[f"{r.fitness[t]:.3f}" for t in tasks], f"{r.mean_fitness:.3f}", *held]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(out: Path, rows: list[Scored], grid: list[Scored], manifest: dict, timing: tuple[float, float],
                  grid_values: tuple[float, ...], command: str) -> None:
    """hard_zoo.md and hard_zoo.json in out; timing: (wall_s, zoo_s)."""
    wall_s, zoo_s = timing
    best = grid[0]
    sources = [r for r in rows if r.name.startswith("source ")]
    best_source = max(sources, key=lambda r: r.mean_heldout or 0.0)
    by_name = {r.name: r for r in rows}
    summary = [
        f"- hand-tuned reference (grid's best by fitness): **{best.recipe}**, held-out mean **{best.mean_heldout:.3f}** "
        f"(fitness {best.mean_fitness:.3f})",
        f"- best single source: {best_source.name}, held-out {best_source.mean_heldout:.3f}",
        *(f"- {name}: held-out {by_name[name].mean_heldout:.3f}" for name in NAIVE),
    ]
    text = "\n".join([
        "# Hard zoo: reference points",
        "",
        f"Measured {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC by `{command}` on {os.cpu_count()} CPU cores "
        f"({platform.processor() or platform.machine()}), 1 torch thread; wall time {wall_s / 60:.1f} min "
        f"({'zoo built in ' + format(zoo_s, '.0f') + ' s' if zoo_s > 5 else 'zoo cached'}; each merge written to "
        "disk, loaded and scored).",
        "",
        _zoo_paragraph(manifest),
        "",
        *summary,
        "",
        table(rows + grid[:HELDOUT_TOP]),
        "",
        f"The grid: task arithmetic, weight in {{{', '.join(f'{g:g}' for g in grid_values)}}} per source (arith, rev, upper), "
        f"{len(grid)} merges scored on the fitness split; the {HELDOUT_TOP} best also on the held-out split (rows "
        "`grid #k`). Fitness means of the whole grid: "
        f"best {grid[0].mean_fitness:.3f}, median {statistics.median(g.mean_fitness for g in grid):.3f}, "
        f"worst {grid[-1].mean_fitness:.3f}.",
        "",
        *_build_table(manifest),
    ])
    out.mkdir(parents=True, exist_ok=True)
    (out / "hard_zoo.md").write_text(text)
    data = {"command": command, "date": f"{dt.datetime.now(dt.UTC):%Y-%m-%dT%H:%M:%SZ}", "cores": os.cpu_count(),
            "wall_s": round(wall_s, 1), "grid_values": list(grid_values),
            "rows": [asdict(r) | {"mean_fitness": r.mean_fitness, "mean_heldout": r.mean_heldout} for r in rows],
            "grid": [asdict(g) | {"mean_fitness": g.mean_fitness, "mean_heldout": g.mean_heldout} for g in grid],
            "reference": asdict(best) | {"mean_fitness": best.mean_fitness, "mean_heldout": best.mean_heldout},
            "zoo_s": round(zoo_s, 1), "zoo": manifest}
    (out / "hard_zoo.json").write_text(json.dumps(data, indent=2) + "\n")


def _zoo_paragraph(manifest: dict) -> str:
    over = manifest["overtrained"]
    return (f"The zoo: `build_zoo(dir, family=\"hard\")` (fingerprint {manifest['fingerprint']}, built in "
            f"{manifest['build_s']} s on {manifest['torch_threads']} torch thread): a 4-layer d=128 Llama base and "
            f"specialists for {', '.join(manifest['specialists'])}, fine-tuned to {manifest['recipe']['skill_target']} "
            f"exact match; the **{over['skill']} specialist is over-trained** ({over['steps']} more steps at lr "
            f"{over['lr']:g} on its skill alone, after the {manifest['finetune_steps'][over['skill']]} steps that reached "
            "its target). Tasks: hard_arith, hard_rev, hard_upper (`evaluators/zoo/hard_*.yaml`: generate_until, greedy, "
            "exact match; 200 examples per split). Merges by `write_recipe_checkpoint` (= `evomerge merge`), scored "
            "by `LmEvalScorer`.")


def _build_table(manifest: dict) -> list[str]:
    skills = list(manifest["specialists"])
    merged = {name.replace("_", " "): scores for name, scores in manifest["naive_merge_scores"].items()}
    rows = {**manifest["skill_scores"], **merged}
    return ["The build's own check (teacher-forced exact match on its validation split, `zoo.json`; \"task sum\" is "
            "task arithmetic with weights 1, \"at target\" the same with the over-trained specialist as it was at its "
            "target; the build fails unless over-training lowers that sum by the recipe's poison margin):", "",
            "| model | " + " | ".join(skills) + " |", "|" + "---|" * (1 + len(skills)),
            *(f"| {name} | " + " | ".join(f"{by[s]:.3f}" for s in skills) + " |" for name, by in rows.items()), ""]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", type=Path, default=None, help="zoo cache folder (default: the test cache)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results")
    parser.add_argument("--grid", type=float, nargs="+", default=list(GRID), help="task-arithmetic weights per source")
    args = parser.parse_args()
    from evomerge.zoo import build_zoo

    sys.path.insert(0, str(REPO / "tests"))
    from zoo_fixtures import zoo_cache_dir

    command = "python " + shlex.join([f"scripts/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    started = time.perf_counter()
    zoo = build_zoo(args.zoo or zoo_cache_dir(), family=FAMILY)
    zoo_s = time.perf_counter() - started
    manifest = json.loads((zoo.root / "zoo.json").read_text())
    with tempfile.TemporaryDirectory(prefix="hard_zoo_refs-") as tmp:
        rows, grid = run(Bench(zoo, Path(tmp)), tuple(args.grid), lambda line: print(line, flush=True))
    wall_s = time.perf_counter() - started
    write_results(args.out, rows, grid, manifest, (wall_s, zoo_s), tuple(args.grid), command)
    print(f"wrote {args.out / 'hard_zoo.md'} and hard_zoo.json ({wall_s / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
