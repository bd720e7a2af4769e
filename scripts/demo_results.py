"""Run `evomerge demo` from an empty cache several times and write what it measured to docs/results/demo.md.

Each run gets a fresh folder and a fresh EVOMERGE_CACHE, so it builds its zoo and compiles its merge
kernels as a new user's first run does; runs differ in the zoo build's torch threads
(EVOMERGE_ZOO_THREADS) and, with --seeds, in the zoo seed (a proxy for another machine: a CPU whose float
rounding differs sends training down another path, as another seed does). --load N keeps N busy
processes running beside the demo, like a shared machine. The README's demo table and ranges come from
the file this writes.

    python scripts/demo_results.py                                  # zoo seed 0 at 1 and 2 threads
    python scripts/demo_results.py --threads 1 --seeds 0 1 2 --append
    python scripts/demo_results.py --threads 1 --load 2 --append    # beside 2 busy processes
    python scripts/demo_results.py --report-only                    # the .md again from the .json

Zoo seed 0 runs the real command line (`evomerge demo --dir ...`); other seeds call the same `run_demo`
with that seed in a child process (the command line has no seed option). Wall time is the child's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "results" / "demo.md"


@dataclass(frozen=True)
class Run:
    seed: int
    threads: int
    load: int  # busy processes beside the demo


def main() -> None:
    args = _parse()
    if args.one is not None:
        _one_run(Path(args.one), args.seeds[0], args.threads[0])
        return
    runs = [Run(seed, threads, args.load) for seed in args.seeds for threads in args.threads]
    raw_path = args.out.with_suffix(".json")
    if args.report_only:
        args.out.write_text(report(json.loads(raw_path.read_text())))
        print(f"wrote {args.out} from {raw_path}")
        return
    done = json.loads(raw_path.read_text()) if args.append and raw_path.exists() else []
    for run in runs:
        done.append(_measure(run, args.work))
        raw_path.write_text(json.dumps(done, indent=1) + "\n")  # after each run: a long session keeps what it has
        args.out.write_text(report(done))
    print(f"wrote {args.out} and {raw_path}")


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="zoo build torch threads, one run each")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="zoo seeds, one run per seed and thread count")
    p.add_argument("--load", type=int, default=0, help="busy processes to run beside each demo")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "evomerge-demo-results")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--append", action="store_true", help="add to the runs already in OUT's .json instead of replacing them")
    p.add_argument("--report-only", action="store_true", help="rewrite OUT from the runs in OUT's .json, running nothing")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one demo in this process, in this folder
    return p.parse_args()


def _one_run(folder: Path, seed: int, threads: int) -> None:
    from evomerge.zoo.demo import run_demo

    run_demo(folder, zoo_seed=seed, zoo_threads=threads)


def _measure(run: Run, work: Path) -> dict:
    """One demo from an empty folder and cache; returns its results.json plus how it ran."""
    folder = work / f"seed{run.seed}-threads{run.threads}-load{run.load}"
    shutil.rmtree(folder, ignore_errors=True)
    env = os.environ | {"EVOMERGE_CACHE": str(folder / "cache"), "EVOMERGE_ZOO_THREADS": str(run.threads)}
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(run.load)]
    load_before = os.getloadavg()[0]
    print(f"demo: zoo seed {run.seed}, {run.threads} zoo thread(s), {run.load} busy process(es), "
          f"load {load_before:.1f}: {folder}", flush=True)
    t0 = time.perf_counter()
    try:
        subprocess.run(_command(run, folder / "demo"), env=env, check=True, cwd=REPO)
    finally:
        for process in busy:
            process.kill()
            process.wait()
    wall_s = time.perf_counter() - t0
    result = json.loads((folder / "demo" / "results.json").read_text())
    return result | {"run": {"seed": run.seed, "threads": run.threads, "load": run.load, "wall_s": round(wall_s, 1),
                             "load_avg_before": round(load_before, 2), "load_avg_after": round(os.getloadavg()[0], 2),
                             "zoo_digest": zoo_digest(folder / "demo" / "zoo" / "llama"),
                             "command": " ".join(["python", "scripts/demo_results.py", *sys.argv[1:]])}}


def zoo_digest(root: Path) -> str:
    """A short hash of the zoo's weights (base, then each specialist): equal digests, bit-identical zoos."""
    digest = hashlib.sha256()
    for name in ("base", "arith", "rev"):
        digest.update((root / name / "model.safetensors").read_bytes())
    return digest.hexdigest()[:12]


def _command(run: Run, folder: Path) -> list[str]:
    if run.seed == 0:  # the user's command, exactly
        return [str(Path(sys.executable).with_name("evomerge")), "demo", "--dir", str(folder)]
    return [sys.executable, __file__, "--one", str(folder), "--seeds", str(run.seed), "--threads", str(run.threads)]


# --- the report ------------------------------------------------------------------------------------


def _row(result: dict, name: str) -> dict:
    return next(r for r in result["rows"] if r["name"] == name)


def _best_source(result: dict) -> dict:
    return max((r for r in result["rows"] if r["name"].startswith("specialist ")), key=lambda r: r["mean_heldout"])


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}:{seconds % 60:04.1f}"


def _runs_table(results: list[dict]) -> list[str]:
    head = ["zoo seed", "zoo threads", "busy procs", "load before / after", "wall (m:s)", "zoo build", "search", "base",
            "best source", "plain avg", "default TIES", "evolved", "evolved - best source", "evolved - TIES"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        run, margins = r["run"], {c["reference"].split(" (")[0]: c["margin"] for c in r["verdict"]}
        cells = [run["seed"], run["threads"], run["load"], f"{run['load_avg_before']:.1f} / {run['load_avg_after']:.1f}", _minutes(run["wall_s"]),
                 _minutes(r["zoo_s"]), _minutes(r["search_s"]), f"{_row(r, 'base')['mean_heldout']:.3f}",
                 f"{_best_source(r)['mean_heldout']:.3f} ({_best_source(r)['name'].split()[-1]})",
                 f"{_row(r, 'plain average')['mean_heldout']:.3f}", f"{_row(r, 'default TIES (density 0.5, weight 1)')['mean_heldout']:.3f}",
                 f"**{_row(r, 'evolved (exported)')['mean_heldout']:.3f}**",
                 f"{margins['the best source model']:+.3f}", f"{margins['default TIES']:+.3f}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines


def _zoo_table(results: list[dict]) -> list[str]:
    head = ["zoo seed", "zoo threads", "base arith / rev", "arith specialist arith / rev", "rev specialist arith / rev",
            "fine-tune steps arith / rev", "build s", "weights digest"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        zoo, run = r["zoo"], r["run"]
        scores, steps = zoo["skill_scores"], zoo["finetune_steps"]
        cells = [run["seed"], zoo["torch_threads"], *(f"{scores[m]['arith']:.3f} / {scores[m]['rev']:.3f}" for m in ("base", "arith", "rev")),
                 f"{steps['arith']} / {steps['rev']}", f"{zoo['build_s']:.0f}", f"`{run['zoo_digest']}`"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines


def _span(values: list[float], fmt: str = "{:.3f}") -> str:
    return fmt.format(min(values)) if min(values) == max(values) else f"{fmt.format(min(values))} to {fmt.format(max(values))}"


def _ranges(results: list[dict]) -> list[str]:
    evolved = [_row(r, "evolved (exported)")["mean_heldout"] for r in results]
    over_source = [r["verdict"][0]["margin"] for r in results]
    over_ties = [r["verdict"][1]["margin"] for r in results]
    won = sum(r["evolved_won"] for r in results)
    lines = [
        f"- the evolved merge beat both the best source model and default TIES in **{won} of {len(results)}** runs",
        f"- evolved held-out mean: {_span(evolved)} (median {statistics.median(evolved):.3f})",
        f"- margin over the best source model: {_span(over_source, '{:+.3f}')}; over default TIES: {_span(over_ties, '{:+.3f}')}",
    ]
    for threads, load in sorted({(r["run"]["threads"], r["run"]["load"]) for r in results}):
        runs = [r["run"] for r in results if (r["run"]["threads"], r["run"]["load"]) == (threads, load)]
        beside = "nothing of ours beside it" if load == 0 else f"{load} busy process(es) beside it"
        loads = _span([x for run in runs for x in (run["load_avg_before"], run["load_avg_after"])], "{:.1f}")
        lines.append(f"- wall time from an empty cache, {threads} zoo thread(s), {beside}: "
                     f"{_span([run['wall_s'] for run in runs], '{:.0f}')} s ({len(runs)} run(s), load average {loads})")
    return lines


def _machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    import torch

    return f"{os.cpu_count()} CPU cores ({model}), torch {torch.__version__}, Python {platform.python_version()}"


def report(results: list[dict]) -> str:
    first = results[0]
    lines = [
        "# `evomerge demo` from an empty cache",
        "",
        "Written by `scripts/demo_results.py`: each run is `evomerge demo` (for zoo seeds other than 0, the same "
        "`run_demo` with that seed) in a fresh folder with a fresh `EVOMERGE_CACHE`, so it builds its zoo and compiles "
        f"its merge kernels as a first run does. Machine: {_machine()}, shared with other jobs (the 1-minute load "
        "average before and after each run is in the table). Scores are the held-out split's mean exact match "
        "over zoo_arith and zoo_rev (200 prompts each). Commands, in order:",
        "",
        *(f"    {command}" for command in dict.fromkeys(r["run"]["command"] for r in results)),
        "",
        "## Ranges over every run",
        "",
        *_ranges(results),
        "",
        "## Runs",
        "",
        *_runs_table(results),
        "",
        "## The zoo each run built (exact match on the build's own validation split, 200 prompts per skill)",
        "",
        *_zoo_table(results),
        "",
        f"## Full table of the first run (zoo seed {first['run']['seed']}, {first['run']['threads']} zoo thread(s))",
        "",
        _full_table(first),
        "",
        *(f"    {c}" for c in _verdict_lines(first)),
        "",
    ]
    return "\n".join(lines)


def _full_table(result: dict) -> str:
    from evomerge.zoo.demo import Row, results_table

    return results_table([Row(r["name"], r["fitness"], r["heldout"]) for r in result["rows"]])


def _verdict_lines(result: dict) -> list[str]:
    from evomerge.zoo.demo import Comparison

    return [Comparison(c["reference"], c["evolved"], c["other"]).line() for c in result["verdict"]]


if __name__ == "__main__":
    main()
