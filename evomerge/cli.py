"""The `evomerge` command line. Heavy imports stay inside the commands, so `--help` is instant.

Every error made on purpose (bad config, missing model, unknown task, ...) prints as one line on stderr
and exits with code 2, before any expensive work or any write. So do the environment's refusals that a
user fixes outside evomerge (a full disk, a read-only or unreachable storage): one line, exit code 2.
Ctrl-C and SIGTERM stop cleanly (exit codes 130 and 143); `evomerge resume` continues the study.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

from evomerge.errors import ConfigError, EvomergeError, SearchError

# OS errors a user fixes outside evomerge, and how
_OS_FIXES = {
    errno.ENOSPC: "free some space, or write elsewhere",
    errno.EDQUOT: "free some of your quota, or write elsewhere",
    errno.EFBIG: "the file is larger than this system allows; write elsewhere",
    errno.EROFS: "the file system is read-only; write elsewhere",
    errno.EACCES: "check the permissions, or use another path",
    errno.EPERM: "check the permissions, or use another path",
}
# what SQLite (through SQLAlchemy and Optuna) says instead of an errno
_SQLITE_FIXES = {
    "database or disk is full": "free some space, or move the storage",
    "attempt to write a readonly database": "make the database and its folder writable, or choose another storage",
    "unable to open database file": "check that the storage's folder exists and is writable",
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as exc:  # Ctrl-C, or evomerge.errors.Stopped for SIGTERM
        name = getattr(exc, "signal_name", "SIGINT")
        print(f"evomerge: stopped ({name}); completed trials are kept and `evomerge resume` continues a study", file=sys.stderr)
        return 143 if name == "SIGTERM" else 130
    except EvomergeError as exc:  # our own one-line errors (config, models, tasks, studies); others re-raise
        print(f"evomerge: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        message = environment_error(exc)
        if message is None:
            raise
        print(f"evomerge: {message}", file=sys.stderr)
        return 2


def environment_error(exc: BaseException) -> str | None:
    """One line for an error the environment raised (a full disk, a read-only file system, a storage that
    refuses writes), found in the exception or its causes; None for anything else (a bug: re-raised)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _OS_FIXES:
            where = f": {seen.filename}" if seen.filename else ""
            return f"{seen.strerror or os.strerror(seen.errno)}{where}; {_OS_FIXES[seen.errno]}"
        text = str(seen)
        for problem, fix in _SQLITE_FIXES.items():
            if problem in text:
                return f"storage error: {problem}; {fix}"
        seen = seen.__cause__ or seen.__context__
    return None


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
    p.add_argument("--arithmetic", choices=["evomerge", "mergekit"], default="evomerge",
                   help="for a mergekit YAML: evomerge (default: fp32, rounded once to the output dtype) or mergekit "
                        "(inputs cast to the YAML's dtype and computed in it, as mergekit-yaml does: its tensors, bit for bit)")
    p.add_argument("--lora-merge-cache", type=Path, metavar="DIR",
                   help="where MODEL+ADAPTER references are written once as merged models (default: $EVOMERGE_CACHE/lora)")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("dashboard", help="serve optuna-dashboard on a study storage (trials, notes, recipe artifacts)")
    p.add_argument("--storage", required=True, help="Optuna storage URL")
    p.add_argument("--host", default="127.0.0.1", help="listen address (0.0.0.0 exposes it; it has no auth)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--artifacts", help="recipe artifact folder (default: next to a sqlite/journal file, or $EVOMERGE_ARTIFACTS)")
    p.set_defaults(func=_cmd_dashboard)

    p = sub.add_parser("delete", help="delete a study (its trials and recipe artifacts) from a storage")
    p.add_argument("study", help="study name")
    p.add_argument("--storage", required=True, help="Optuna storage URL of the study")
    p.add_argument("--yes", action="store_true", help="delete without asking")
    p.set_defaults(func=_cmd_delete)

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
    """The summary lines; a search in which no candidate completed is an error (exit code 2), with no
    "export it" line."""
    heldout = "" if summary.best_heldout is None else f", held-out {summary.best_heldout:.4f}"
    best = "none" if summary.best_fitness is None else f"trial {summary.best_number}, fitness {summary.best_fitness:.4f}{heldout}"
    pruned = f", {summary.pruned} held back after the first pass" if summary.pruned else ""
    print(f"done: {summary.trials}/{summary.budget} candidates ({summary.failed} failed{pruned}) in {summary.wall_s:.0f}s; best: {best}")
    if summary.best_fitness is None:
        raise SearchError(f"no candidate of study {summary.study!r} completed; see why with "
                          f"`evomerge status --storage {storage} {summary.study}`")
    print(f"export it: evomerge export {summary.study} --storage {storage} --out DIR")


def _cmd_export(args: argparse.Namespace) -> int:
    from evomerge.export import check_out_dir, export_trial
    from evomerge.export.checkpoint import refuse_protected
    from evomerge.study import StudyStore

    if args.format == "mergekit":
        return _export_mergekit(args)
    protect = _study_paths(args.storage)
    if args.pareto:  # OUT holds one folder per trial: each is checked (and replaced) on its own
        refuse_protected(args.out, protect)
        if args.out.exists() and not args.out.is_dir():
            raise ConfigError(f"--out {args.out}: is a file; with --pareto, give a folder (each trial goes to OUT/trial-N)")
    else:
        check_out_dir(args.out, args.force, protect)
    store = StudyStore.open(args.storage, args.study)
    numbers = [t.number for t in store.pareto_front()] if args.pareto else [args.trial]
    for number in numbers:
        out = args.out / f"trial-{number}" if args.pareto else args.out
        result = export_trial(store, number, out, force=args.force, protect=protect)
        scores = store.trial(result.trial).user_attrs.get("scores.fitness", {})
        shown = " ".join(f"{k}={v:.3f}" for k, v in scores.items())
        print(f"exported trial {result.trial} ({shown}) to {result.out} ({len(result.files)} weight file(s), recipe.yaml, README.md)")
    return 0


def _study_paths(url: str) -> list[Path]:
    """The files a study lives in (a sqlite or journal file, its artifact folder): never an export's --out."""
    from evomerge.study import StorageUrl
    from evomerge.study.dashboard import artifact_dir_for

    storage = StorageUrl.parse(url)
    if storage.path is None:
        return []
    return [storage.path, artifact_dir_for(storage)]


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
    from evomerge.export.lora import resolve_loras
    from evomerge.export.mergekit import is_mergekit_config, load_mergekit_recipe
    from evomerge.recipe import recipe_from_yaml

    if not args.recipe.is_file():
        raise ConfigError(f"recipe {args.recipe}: no such file")
    text = args.recipe.read_text()
    _check_yaml(text, args.recipe)
    recipe = load_mergekit_recipe(text, arithmetic=args.arithmetic) if is_mergekit_config(text) else recipe_from_yaml(text)
    check_out_dir(args.out, args.force)
    recipe = resolve_loras(recipe, args.lora_merge_cache)
    files = write_recipe_checkpoint(recipe, args.out, card=f"# Merged model\n\nRecipe: `{args.recipe.name}`\n")
    print(f"wrote {args.out} ({len(files)} weight file(s))")
    return 0


def _check_yaml(text: str, path: Path) -> None:
    """A one-line ConfigError, with the line and column, for a recipe file that is not valid YAML."""
    import yaml

    try:
        yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"recipe {path}: malformed YAML{where}: {problem}; fix the file") from None


def _cmd_delete(args: argparse.Namespace) -> int:
    from evomerge.study import StudyStore, delete_study
    from evomerge.study.storage import redact

    store = StudyStore.open(args.storage, args.study)
    trials = len(store.study.get_trials(deepcopy=False))
    if not args.yes and not _confirmed(f"delete study {args.study!r} ({trials} trials) from {redact(args.storage)}?"):
        raise ConfigError(f"study {args.study!r} not deleted; answer y, or pass --yes to delete without asking")
    delete_study(store, args.storage)
    print(f"deleted study {args.study!r} ({trials} trials and its recipe artifacts) from {redact(args.storage)}")
    return 0


def _confirmed(question: str) -> bool:
    """Ask on the terminal; False (never asked) when stdin is not one, so scripts must pass --yes."""
    if not sys.stdin.isatty():
        return False
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


def _cmd_status(args: argparse.Namespace) -> int:
    from evomerge.study.status import studies_table, trials_table

    print(trials_table(args.storage, args.study) if args.study else studies_table(args.storage))
    return 0


def _cmd_dashboard(args: argparse.Namespace) -> int:
    from evomerge.study.dashboard import run_dashboard

    run_dashboard(args.storage, host=args.host, port=args.port, artifact_dir=args.artifacts)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    for flag, value in (("--trials", args.trials), ("--workers", args.workers)):
        if value is not None and value < 1:  # checked before the zoo is built (the demo would take 0 as "default")
            raise ConfigError(f"{flag} {value}: give a number >= 1, or leave {flag} out for the demo's default")
    from evomerge.zoo.demo import run_demo

    run_demo(args.dir, trials=args.trials, workers=args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
