"""TSV-Merge, Iso-C and Iso-CTS against TIES on the tiny zoos: the papers' default recipes, then equal-budget searches.

    python scripts/compare_spectral.py [--trials 16] [--families llama,qwen2] [--out docs/results/spectral_vs_ties.md]

Each zoo (`evomerge.zoo.build_zoo`, cached under --zoo-cache; the tests' cache by default) has a base and
two specialists (`arith`, `rev`). Default recipes (every weight 1; TIES density 0.5; lambda_ 1, and 1.5
as FusionBench runs Iso-C/CTS; Iso-CTS common_space_fraction 0.8) are built in memory as a worker builds
them and scored on the fitness and held-out splits (exact match, every example). Then one CMA-ES search
per method with the same budget (--trials, one layer group, popsize 4, two workers; TIES searches weight
and density per source, the spectral methods weight per source and lambda_, Iso-CTS also the fraction),
and its best trial's held-out score. The Llama zoo is the one whose specialists reach their skills (the
Qwen2 test zoo is briefly trained: every recipe here, TIES and task arithmetic included, scored 0 to 0.005 on it).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULTS = {  # name -> (method, fixed parameters besides weight)
    "ties (density 0.5)": ("ties", {"density": 0.5}),
    "task_arithmetic": ("task_arithmetic", {}),
    "tsv_merge": ("tsv_merge", {"lambda_": 1.0}),
    "iso_c": ("iso_c", {"lambda_": 1.0}),
    "iso_c (lambda 1.5)": ("iso_c", {"lambda_": 1.5}),
    "iso_cts": ("iso_cts", {"common_space_fraction": 0.8, "lambda_": 1.0}),
    "iso_cts (lambda 1.5)": ("iso_cts", {"common_space_fraction": 0.8, "lambda_": 1.5}),
}
SPACES = {
    "ties": {"weight": {"low": 0.0, "high": 1.5}, "density": {"low": 0.1, "high": 1.0}},
    "tsv_merge": {"weight": {"low": 0.0, "high": 1.5}, "lambda_": {"low": 0.5, "high": 2.0}},
    "iso_c": {"weight": {"low": 0.0, "high": 1.5}, "lambda_": {"low": 0.5, "high": 2.0}},
    "iso_cts": {"weight": {"low": 0.0, "high": 1.5}, "lambda_": {"low": 0.5, "high": 2.0},
                "common_space_fraction": {"low": 0.5, "high": 1.0}},
}


def default_rows(zoo, scorer) -> list[tuple[str, dict, dict]]:  # noqa: ANN001
    """(name, fitness scores, held-out scores) of each default recipe, built as a worker builds it."""
    import torch

    from evomerge.models.live import LiveMerge, LoadOptions
    from evomerge.recipe import Recipe

    sources = tuple(str(p) for p in zoo.specialists.values())
    live = LiveMerge(str(zoo.base), sources, LoadOptions(torch.device("cpu")))
    rows = []
    for name, (method, fixed) in DEFAULTS.items():
        params = {"weight": tuple(1.0 for _ in sources), **{k: (v,) * len(sources) if k == "density" else v for k, v in fixed.items()}}
        model, tokenizer = live.build(Recipe(method, str(zoo.base), sources, (params,)))
        rows.append((name, scorer.score(model, tokenizer, "fitness"), scorer.score(model, tokenizer, "heldout")))
    return rows


def searched(zoo, method: str, trials: int, work: Path) -> tuple[dict, dict, float]:  # noqa: ANN001
    """(best trial's fitness scores, its held-out scores, wall seconds) of one search over `method`."""
    from evomerge.cli import main
    from evomerge.study import StudyStore

    config = {
        "name": method, "storage": f"sqlite:///{work / 'studies.db'}",
        "models": {"base": str(zoo.base), "sources": [str(p) for p in zoo.specialists.values()]},
        "search_space": {"kind": "parameter", "methods": [method], "layer_groups": 1, "params": SPACES[method]},
        "evaluation": {"tasks": [{"name": f"zoo_{s}"} for s in zoo.specialists], "heldout_top_k": 1},
        "optimizer": {"kind": "cmaes", "seed": 0, "popsize": 4},
        "budget": {"trials": trials},
        "workers": {"n": 2},
    }
    path = work / f"{method}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    started = time.perf_counter()
    if main(["search", str(path)]) != 0:
        raise SystemExit(f"search over {method} failed")
    store = StudyStore.open(config["storage"], method)
    best = store.trial(None)
    return best.user_attrs["scores.fitness"], store.heldout(best.number)["scores"], time.perf_counter() - started


def spectrum_line(zoo) -> str:  # noqa: ANN001
    """Why flat spectra fail here: the summed task vectors of one attention matrix, their top and median
    singular values against the one value Iso-C gives every direction (their mean)."""
    import torch

    from evomerge.models.checkpoints import Checkpoint

    name = "model.layers.1.self_attn.q_proj.weight"
    base = Checkpoint.open(str(zoo.base)).tensor(name).float()
    summed = sum(Checkpoint.open(str(p)).tensor(name).float() - base for p in zoo.specialists.values())
    s = torch.linalg.svdvals(summed)
    return (f"{name} of the summed task vectors: top singular values {', '.join(f'{v:.3f}' for v in s[:3].tolist())}, "
            f"median {float(s.median()):.4f}; Iso-C gives all {s.numel()} directions {float(s.mean()):.4f} (their mean).")


def mean(scores: dict) -> float:
    return sum(scores.values()) / len(scores)


def table(family: str, defaults: list, searches: dict, trials: int) -> list[str]:
    skills = list(defaults[0][1])
    head = " | ".join(f"{s} fit | {s} held-out" for s in skills)
    lines = [f"### {family} zoo", "", f"| recipe | {head} | mean held-out |", "|---" * (2 + 2 * len(skills)) + "|"]
    for name, fit, held in defaults:
        cells = " | ".join(f"{fit[s]:.3f} | {held[s]:.3f}" for s in skills)
        lines.append(f"| {name} | {cells} | **{mean(held):.3f}** |")
    for method, (fit, held, seconds) in searches.items():
        cells = " | ".join(f"{fit[s]:.3f} | {held[s]:.3f}" for s in skills)
        lines.append(f"| {method}, searched ({trials} trials, {seconds:.0f} s) | {cells} | **{mean(held):.3f}** |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="llama")
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--zoo-cache", type=Path, default=Path(os.environ.get("EVOMERGE_TEST_CACHE") or Path.home() / ".cache" / "evomerge-test") / "zoo")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "spectral_vs_ties.md")
    args = parser.parse_args()

    from evomerge.config import TaskConfig
    from evomerge.dirs import EVALUATORS_DIR
    from evomerge.runtime.scoring import LmEvalScorer
    from evomerge.zoo import build_zoo

    started = time.perf_counter()
    lines = ["# Spectral merges against TIES on the tiny zoos", "",
             f"`python scripts/compare_spectral.py --trials {args.trials} --families {args.families}` (exact match, every "
             "example of each split; searches: CMA-ES, one layer group, popsize 4, two CPU workers).", ""]
    for family in args.families.split(","):
        zoo = build_zoo(args.zoo_cache, family=family)
        scorer = LmEvalScorer([TaskConfig(name=f"zoo_{s}") for s in zoo.specialists], [EVALUATORS_DIR])
        defaults = default_rows(zoo, scorer)
        with tempfile.TemporaryDirectory() as tmp:
            searches = {m: searched(zoo, m, args.trials, Path(tmp)) for m in SPACES}
        lines += table(family, defaults, searches, args.trials)
        if family == "llama":
            lines += [spectrum_line(zoo), ""]
        print("\n".join(table(family, defaults, searches, args.trials)), flush=True)
    lines.append(f"Total {time.perf_counter() - started:.0f} s on this machine's 2 shared CPU cores.")
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
