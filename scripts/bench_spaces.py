"""Compare the search spaces on the tiny zoo at one budget: parameter space (PS), layer swap, DFS, PS+DFS.

Each space gets the same number of evaluations (default 48) with evomerge's default CMA-ES, real Ray
workers and lm-eval scoring on the fitness split; the table reports the best trial's fitness and its
held-out score. PS+DFS chains two studies: the PS study's best trial is one of the DFS sources (with the
rev specialist), so it is charged the PS budget too.

    python scripts/bench_spaces.py [--trials 48] [--out docs/results/spaces.md]
    python scripts/bench_spaces.py --trials 4 --workers 1 --spaces ps psdfs   # a smoke run (tests)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from evomerge.config import load_preset, parse_config  # noqa: E402
from evomerge.search import prepare, run_search  # noqa: E402
from evomerge.study import StudyStore  # noqa: E402
from evomerge.zoo import build_zoo  # noqa: E402
from zoo_fixtures import zoo_cache_dir  # noqa: E402


SPACES = ("ps", "swap", "dfs", "psdfs")  # the table's rows, in order


def study(name: str, storage: str, base, sources: list, space: dict, trials: int, workers: int) -> dict:
    return {
        "name": name, "storage": storage,
        "models": {"base": base, "sources": sources},
        "search_space": load_preset(space),
        "evaluation": {"tasks": [{"name": "zoo_arith"}, {"name": "zoo_rev"}], "heldout_top_k": 1},
        "optimizer": {"kind": "cmaes", "seed": 0},
        "budget": {"trials": trials},
        "workers": {"n": workers},
    }


def run(cfg: dict) -> tuple[float, float, float]:
    started = time.perf_counter()
    summary = run_search(prepare(parse_config(cfg)), progress=lambda line: None)
    store = StudyStore.open(cfg["storage"], cfg["name"])
    heldout = store.heldout(summary.best_number)
    return summary.best_fitness, heldout["fitness"], time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=48)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--spaces", nargs="+", choices=SPACES, default=list(SPACES),
                        help="which rows (psdfs needs ps: it chains the ps study's best)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if "psdfs" in args.spaces and "ps" not in args.spaces:
        parser.error("--spaces psdfs chains the ps study's best trial: add ps")
    zoo = build_zoo(zoo_cache_dir(), family="llama")
    base, arith, rev = str(zoo.base), str(zoo.specialists["arith"]), str(zoo.specialists["rev"])
    storage = f"sqlite:///{tempfile.mkdtemp(prefix='bench-spaces-')}/spaces.db"
    n, w = args.trials, args.workers
    spaces = {
        "ps": ("parameter space (ties_or_dare)", study("ps", storage, base, [arith, rev], "ties_or_dare", n, w)),
        "swap": ("layer swap (per layer)", study("swap", storage, base, [arith, rev], "layer_swap", n, w)),
        "dfs": ("data-flow (dfs, r=2)", study("dfs", storage, base, [arith, rev], "dfs", n, w)),
        "psdfs": ("PS+DFS (PS best + rev)",
                  study("psdfs", storage, base, [{"study": "ps", "storage": storage}, rev], "dfs", n, w)),
    }
    rows = ["| space | evaluations | best fitness | held-out of best | wall s |", "|---|---|---|---|---|"]
    for key in SPACES:
        if key not in args.spaces:
            continue
        label, cfg = spaces[key]
        fitness, heldout, wall = run(cfg)
        spent = args.trials * (2 if key == "psdfs" else 1)
        rows.append(f"| {label} | {spent} | {fitness:.3f} | {heldout:.3f} | {wall:.0f} |")
        print(rows[-1], flush=True)
    table = "\n".join(rows)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
