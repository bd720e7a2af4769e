"""The `evomerge` command line. Heavy imports stay inside the commands, so `--help` is instant.

Every error made on purpose (bad config, missing model, unknown task, ...) prints as one line on stderr
and exits with code 2, before any expensive work or any write.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from evomerge.errors import EvomergeError


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("evomerge: interrupted", file=sys.stderr)
        return 130
    except EvomergeError as exc:  # our own one-line errors (config, models, tasks, studies); others re-raise
        print(f"evomerge: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evomerge", description="Evolutionary search for LLM merge recipes.")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="build the tiny zoo, run a search, export it, print a results table")
    p.add_argument("--dir", type=Path, default=Path("runs/demo"), help="working folder (default: runs/demo)")
    p.add_argument("--trials", type=int, default=None, help="evaluation budget (default: the demo config's)")
    p.add_argument("--workers", type=int, default=None, help="Ray workers (default: 2)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("zoo", help="the tiny offline model zoo")
    zoo = p.add_subparsers(required=True, metavar="ACTION")
    b = zoo.add_parser("build", help="build (or reuse) base + specialist checkpoints in DIR")
    b.add_argument("dir", type=Path)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--family", default="llama", choices=["llama", "qwen2", "gpt2"])
    b.set_defaults(func=_cmd_zoo_build)

    p = sub.add_parser("search", help="run a search described by a study config YAML")
    p.add_argument("config", type=Path)
    p.add_argument("--study", help="study name (overrides the config's name)")
    p.add_argument("--storage", help="Optuna storage URL (default: the config's, sqlite:///evomerge.db)")
    p.add_argument("--trials", type=int, help="evaluation budget (overrides budget.trials)")
    p.add_argument("--workers", type=int, help="number of Ray workers (overrides workers.n)")
    p.set_defaults(func=_cmd_search)

    p = sub.add_parser("resume", help="continue a stopped or killed study where it left off")
    p.add_argument("study", help="study name")
    p.add_argument("--storage", required=True, help="Optuna storage URL of the study")
    p.add_argument("--trials", type=int, help="evaluate this many more candidates (default: finish the stored budget)")
    p.set_defaults(func=_cmd_resume)

    p = sub.add_parser("export", help="write a trial's merge as an HF checkpoint folder, or as a mergekit YAML")
    p.add_argument("study", help="study name")
    p.add_argument("--storage", required=True, help="Optuna storage URL, e.g. sqlite:///evomerge.db")
    p.add_argument("--out", type=Path, required=True,
                   help="output folder (must not exist or be empty); with --format mergekit, a .yaml file or a folder for mergekit.yaml")
    p.add_argument("--format", choices=["checkpoint", "mergekit"], default="checkpoint",
                   help="checkpoint: weights, recipe.yaml, model card (+ mergekit.yaml where expressible); "
                        "mergekit: only the mergekit-yaml config, no weights built")
    p.add_argument("--trial", type=int, help="trial number (default: the best completed trial)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--pareto", action="store_true",
                   help="list the Pareto front (multi-objective studies) and export each trial to OUT/trial-N")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("merge", help="apply an evomerge recipe or a mergekit YAML file and write the merged checkpoint")
    p.add_argument("recipe", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("dashboard", help="serve optuna-dashboard on a study storage (trials, notes, recipe artifacts)")
    p.add_argument("--storage", required=True, help="Optuna storage URL")
    p.add_argument("--host", default="127.0.0.1", help="listen address (0.0.0.0 exposes it; it has no auth)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--artifacts", help="recipe artifact folder (default: next to a sqlite/journal file, or $EVOMERGE_ARTIFACTS)")
    p.set_defaults(func=_cmd_dashboard)

    p = sub.add_parser("status", help="list studies, or the trials of one study")
    p.add_argument("study", nargs="?", help="study name (omit to list all studies)")
    p.add_argument("--storage", default="sqlite:///evomerge.db")
    p.set_defaults(func=_cmd_status)
    return parser


def _cmd_zoo_build(args: argparse.Namespace) -> int:
    from evomerge.zoo import build_zoo

    zoo = build_zoo(args.dir, seed=args.seed, family=args.family)
    print(f"base: {zoo.base}")
    for skill, path in zoo.specialists.items():
        print(f"{skill}: {path}")
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from evomerge.config import load_config
    from evomerge.search import prepare, run_search

    cfg = load_config(args.config).with_overrides(
        **{"name": args.study, "storage": args.storage, "budget.trials": args.trials, "workers.n": args.workers}
    )
    _print_summary(run_search(prepare(cfg)), cfg.storage)
    return 0


def _cmd_resume(args: argparse.Namespace) -> int:
    from evomerge.search import resume_search
    from evomerge.study import StudyStore

    store = StudyStore.open(args.storage, args.study)
    _print_summary(resume_search(store, args.trials), args.storage)
    return 0


def _print_summary(summary, storage: str) -> None:
    heldout = "" if summary.best_heldout is None else f", held-out {summary.best_heldout:.4f}"
    best = "none" if summary.best_fitness is None else f"trial {summary.best_number}, fitness {summary.best_fitness:.4f}{heldout}"
    pruned = f", {summary.pruned} held back after the first pass" if summary.pruned else ""
    print(f"done: {summary.trials}/{summary.budget} candidates ({summary.failed} failed{pruned}) in {summary.wall_s:.0f}s; best: {best}")
    print(f"export it: evomerge export {summary.study} --storage {storage} --out DIR")


def _cmd_export(args: argparse.Namespace) -> int:
    from evomerge.export import check_out_dir, export_trial
    from evomerge.study import StudyStore

    if args.format == "mergekit":
        return _export_mergekit(args)
    check_out_dir(args.out, args.force)
    store = StudyStore.open(args.storage, args.study)
    numbers = [t.number for t in store.pareto_front()] if args.pareto else [args.trial]
    for number in numbers:
        out = args.out / f"trial-{number}" if args.pareto else args.out
        result = export_trial(store, number, out, force=args.force)
        scores = store.trial(result.trial).user_attrs.get("scores.fitness", {})
        shown = " ".join(f"{k}={v:.3f}" for k, v in scores.items())
        print(f"exported trial {result.trial} ({shown}) to {result.out} ({len(result.files)} weight file(s), recipe.yaml, README.md)")
    return 0


def _export_mergekit(args: argparse.Namespace) -> int:
    from evomerge.errors import ConfigError
    from evomerge.export import export_mergekit
    from evomerge.study import StudyStore

    if args.pareto and args.out.suffix in (".yaml", ".yml"):
        raise ConfigError(f"--out {args.out}: with --pareto, give a folder (each trial goes to OUT/trial-N/mergekit.yaml)")
    store = StudyStore.open(args.storage, args.study)
    numbers = [t.number for t in store.pareto_front()] if args.pareto else [args.trial]
    jobs = [(n, args.out / f"trial-{n}" if args.pareto else args.out) for n in numbers]
    for result in export_mergekit(store, jobs, force=args.force):
        print(f"exported trial {result.trial} as mergekit YAML to {result.out} (no weights; mergekit-yaml builds them)")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from evomerge.errors import ConfigError
    from evomerge.export import check_out_dir, write_recipe_checkpoint
    from evomerge.export.mergekit import is_mergekit_config, load_mergekit_recipe
    from evomerge.recipe import recipe_from_yaml

    if not args.recipe.is_file():
        raise ConfigError(f"recipe {args.recipe}: no such file")
    text = args.recipe.read_text()
    recipe = load_mergekit_recipe(text) if is_mergekit_config(text) else recipe_from_yaml(text)
    check_out_dir(args.out, args.force)
    files = write_recipe_checkpoint(recipe, args.out, card=f"# Merged model\n\nRecipe: `{args.recipe.name}`\n")
    print(f"wrote {args.out} ({len(files)} weight file(s))")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from evomerge.study.status import studies_table, trials_table

    print(trials_table(args.storage, args.study) if args.study else studies_table(args.storage))
    return 0


def _cmd_dashboard(args: argparse.Namespace) -> int:
    from evomerge.study.dashboard import run_dashboard

    run_dashboard(args.storage, host=args.host, port=args.port, artifact_dir=args.artifacts)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from evomerge.zoo.demo import run_demo

    run_demo(args.dir, trials=args.trials, workers=args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
