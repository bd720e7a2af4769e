"""Scheduling benchmark: how busy do the workers stay, and what does the controller cost per trial?

Real pieces throughout: Ray actors through evomerge's `WorkerPool`, the `SearchRun` controller loop,
pycma CMA-ES, and a SQLite study. Only the evaluation is fake: a `SleepWorker` sleeps a deterministic
time drawn from [low, high] by hashing the recipe (high = 3 x low by default: evaluation times that
vary 3x) and returns a smooth fitness of the recipe's numbers.

  utilization   = time the workers spent evaluating / (workers x wall time of the search loop)
  overhead/trial = controller time per trial: (wall - time spent waiting for a result + time spent in
                   next_job, which the pool calls while it waits) / trials: asking, telling, decoding,
                   and the study writes (start_trial, finish_trial, optimizer checkpoints)

Three sections:
  generations  SearchRun.generations (CMA-ES: each generation told whole, in order), popsize = 1x, 2x, 4x
               the worker count, each twice: `barrier` (lookahead 0: a generation waits for its slowest
               candidate) and `lookahead` (the default: half a generation of the next one is asked early
               and fills the workers that would wait)
  sampled      the Optuna samplers' loop (SearchRun.sampled: a new trial whenever a worker is free, no
               generations), here optuna_random (scheduling only) and tpe (its proposal cost included)
  simulated    the same two policies in a discrete-event simulation with evomerge's CMA-ES controller on
               a 12-gene quadratic, to compare the best fitness reached per evaluation and per wall second

    python scripts/bench_sched.py | tee docs/results/bench_sched.txt   # everything: about 12 minutes on 2 cores
    python scripts/bench_sched.py --sections simulated   # the policy comparison alone: 20 s
    python scripts/bench_sched.py --workers 8 16 --sections generations simulated

Evaluations take 1-3 s by default: the controller spends tens of milliseconds per trial on study
writes, so much shorter evaluations would measure the controller, not the scheduling.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from bench_throughput import Meter as WaitMeter  # noqa: E402
from evomerge.config import StudyConfig, parse_config  # noqa: E402
from evomerge.search.controllers import make_controller  # noqa: E402
from evomerge.recipe import Recipe  # noqa: E402
from evomerge.search.spaces import build_space, decode_unit  # noqa: E402

CPUS_PER_ACTOR = 0.1  # sleepers need no CPU; 16 of them fit a 2-core machine


# --- the fake evaluation ------------------------------------------------------------------------


def recipe_unit(recipe: Recipe) -> float:
    """A deterministic number in [0, 1) from the recipe's content."""
    digest = hashlib.sha256(json.dumps(recipe.to_dict(), sort_keys=True).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def recipe_fitness(recipe: Recipe) -> float:
    """Higher is better; peaks when every searched number is 0.6."""
    values = [v for g in recipe.groups for p in g.values() for v in (p if isinstance(p, tuple) else (p,))]
    return -statistics.fmean((v - 0.6) ** 2 for v in values)


def sleep_worker(low_s: float, high_s: float) -> type:
    """A worker class (for WorkerPool's `worker_cls`) whose evaluation sleeps low_s..high_s seconds."""

    class SleepWorker:
        def __init__(self, setup: object) -> None:
            self.name = f"sleep:{os.getpid()}"

        def info(self):
            from evomerge.runtime.messages import WorkerInfo

            return WorkerInfo(self.name, "sleep", 0.0, 0, 0)

        def evaluate(self, recipe: Recipe, split: str = "fitness"):
            from evomerge.runtime.messages import CandidateResult

            duration_s = low_s + (high_s - low_s) * recipe_unit(recipe)
            started = time.perf_counter()
            time.sleep(duration_s)
            fitness = recipe_fitness(recipe)
            return CandidateResult(scores={"sleep": fitness}, fitness=fitness, merge_s=0.0,
                                   eval_s=time.perf_counter() - started, worker=self.name)

    return SleepWorker


# --- a study over fake models -------------------------------------------------------------------


def bench_config(folder: Path, name: str, n_workers: int, popsize: int, generations: int, kind: str = "cmaes",
                 lookahead: int | None = None) -> StudyConfig:
    return parse_config({
        "name": name,
        "storage": f"sqlite:///{folder / (name + '.db')}",
        "models": {"base": "/fake/base", "sources": ["/fake/math", "/fake/code", "/fake/chat"]},
        "search_space": {"methods": ["ties"], "layer_groups": 2,
                         "params": {"weight": {"low": 0, "high": 1.5}, "density": {"low": 0.1, "high": 1}}},
        "evaluation": {"tasks": [{"name": "sleep"}], "heldout_top_k": 0},
        "optimizer": {"kind": kind, "popsize": popsize, "seed": 0, "lookahead": lookahead},
        "budget": {"trials": popsize * generations},
        "workers": {"n": n_workers, "cpus_per_worker": CPUS_PER_ACTOR, "gpus_per_worker": 0},
    }, source="bench")


def prepared(cfg: StudyConfig, worker_cls: type):
    from evomerge.search import Prepared
    from evomerge.runtime.messages import WorkerSetup

    space = build_space(cfg.search_space, cfg.models.base, cfg.models.sources, n_layers=8, seed=0)
    setup = WorkerSetup(base=cfg.models.base, sources=tuple(cfg.models.sources), tasks=(), include_paths=())
    return Prepared(cfg, space, setup, worker_cls=worker_cls)


# --- measuring a loop ---------------------------------------------------------------------------


class Meter(WaitMeter):
    """bench_throughput's Meter (the time the controller waits for results, trial creation inside the
    pool not counted as waiting), plus the workers' busy time and the trial count."""

    def __init__(self, pool) -> None:
        super().__init__(pool)
        self.busy_s, self.trials = 0.0, 0

    def run(self, next_job) -> Iterator[tuple[object, object]]:
        for job, outcome in super().run(next_job):
            self.busy_s += getattr(outcome, "eval_s", 0.0) + getattr(outcome, "merge_s", 0.0)
            self.trials += 1
            yield job, outcome


@dataclass
class Row:
    section: str
    workers: int
    popsize: int
    spread: str
    trials: int
    wall_s: float
    utilization: float
    overhead_ms: float


def measure(section: str, meter: Meter, n_workers: int, popsize: int, spread: str, loop) -> Row:
    meter.wait_s = meter.busy_s = 0.0
    meter.trials = 0
    started = time.perf_counter()
    loop()
    wall_s = time.perf_counter() - started
    return Row(section, n_workers, popsize, spread, meter.trials, wall_s, meter.busy_s / (n_workers * wall_s),
               1000 * (wall_s - meter.wait_s) / max(meter.trials, 1))


def run_generations(folder: Path, meter: Meter, worker_cls: type, n_workers: int, popsize: int, generations: int,
                    lookahead: int | None) -> None:
    """evomerge's controller loop, unchanged: SearchRun.generations over a fresh study."""
    from evomerge.search import SearchRun
    from evomerge.study import StudyStore

    cfg = bench_config(folder, f"gen-{n_workers}-{popsize}-{lookahead}", n_workers, popsize, generations, lookahead=lookahead)
    prep = prepared(cfg, worker_cls)
    store = StudyStore.create(cfg, {g.name: g.default for g in prep.space.genes})
    controller = make_controller(cfg.optimizer, np.array([g.to_unit(g.default) for g in prep.space.genes]), n_workers)
    SearchRun(prep, store, controller, meter, progress=lambda _: None).generations(0)


def run_sampled(folder: Path, meter: Meter, worker_cls: type, n_workers: int, trials: int, kind: str) -> None:
    """An Optuna sampler through SearchRun.sampled: a new trial whenever a worker frees up."""
    from evomerge.search import SearchRun
    from evomerge.study import StudyStore

    cfg = bench_config(folder, f"{kind}-{n_workers}", n_workers, n_workers, 1, kind=kind).with_overrides(**{"budget.trials": trials})
    prep = prepared(cfg, worker_cls)
    store = StudyStore.create(cfg, {g.name: g.default for g in prep.space.genes})
    SearchRun(prep, store, None, meter, progress=lambda _: None).sampled()


# --- simulation: utilization and search quality, no Ray -----------------------------------------


def simulate(lookahead: int, n_workers: int, popsize: int, n_evals: int, low_s: float, high_s: float, seed: int) -> dict:
    """Discrete-event run of SearchRun.generations' policy with evomerge's CMA-ES controller (the real
    `ask_generation` and lookahead) on a 12-gene weighted quadratic; no Ray, no study."""
    from evomerge.config import OptimizerConfig

    rng = np.random.default_rng(seed)
    centre, weights = rng.uniform(0.2, 0.8, 12), np.logspace(0, 1, 12)
    ctrl = make_controller(OptimizerConfig(seed=seed, popsize=popsize, lookahead=lookahead), np.full(12, 0.5), n_workers)
    current = {"xs": ctrl.ask_generation(), "f": {}, "queue": list(range(popsize))}
    following = {"xs": list(ctrl.early), "f": {}, "queue": list(range(len(ctrl.early)))}
    events: list[tuple[float, int, int, np.ndarray]] = []  # (finish time, tiebreak, generation slot, x)
    now = busy = 0.0
    asked = done = 0
    best, trace = -math.inf, []
    while done < n_evals:
        while asked < n_evals and len(events) < n_workers and (current["queue"] or following["queue"]):
            gen = current if current["queue"] else following
            index = gen["queue"].pop(0)
            duration = rng.uniform(low_s, high_s)
            busy += duration
            heapq.heappush(events, (now + duration, asked, index, gen is current))
            asked += 1
        now, _, index, of_current = heapq.heappop(events)
        gen = current if of_current else following
        gen["f"][index] = -float(np.sum(weights * (gen["xs"][index] - centre) ** 2))
        done += 1
        best = max(best, gen["f"][index])
        trace.append((now, best))
        if len(current["f"]) == popsize:
            ctrl.tell(current["xs"], [current["f"][i] for i in range(popsize)])
            # in-flight events of `following` refer to it as "not current": re-tag them as current
            events = [(t, k, i, True) for (t, k, i, c) in events]
            heapq.heapify(events)
            current = following
            early = len(current["xs"])
            current["xs"] = ctrl.ask_generation()
            current["queue"] += list(range(early, popsize))
            following = {"xs": list(ctrl.early), "f": {}, "queue": list(range(len(ctrl.early)))}
    return {"wall_s": now, "utilization": busy / (n_workers * now), "best": best, "trace": trace}


def best_by(trace: list[tuple[float, float]], wall_s: float) -> float:
    best = -math.inf
    for t, value in trace:
        if t > wall_s:
            break
        best = value
    return best


def simulated_rows(n_workers: int, mults: list[int], n_evals: int, seeds: int) -> list[dict]:
    rows = []
    for mult in mults:
        popsize = mult * n_workers
        policies = {"barrier": 0, "lookahead": popsize // 2}
        runs = {p: [simulate(ahead, n_workers, popsize, n_evals, 1.0, 3.0, s) for s in range(seeds)] for p, ahead in policies.items()}
        same_wall = statistics.median(r["wall_s"] for r in runs["lookahead"])
        for policy, rs in runs.items():
            rows.append({
                "policy": policy, "workers": n_workers, "popsize": popsize,
                "utilization": statistics.fmean(r["utilization"] for r in rs),
                "loss_at_n": statistics.median(-r["best"] for r in rs),
                "loss_at_wall": statistics.median(-best_by(r["trace"], same_wall) for r in rs),
                "wall": statistics.fmean(r["wall_s"] for r in rs),
            })
    return rows


# --- driver -------------------------------------------------------------------------------------


def ray_rows(args: argparse.Namespace) -> list[Row]:
    import ray

    from evomerge.runtime.pool import WorkerPool
    from evomerge.runtime.messages import WorkerSetup

    worker_cls = sleep_worker(args.low, args.high)
    spread = f"{args.low:g}-{args.high:g}s"
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(dir=args.study_dir) as tmp:
        folder = Path(tmp)
        for n_workers in args.workers:
            setup = WorkerSetup(base="/fake/base", sources=(), tasks=(), include_paths=())
            pool = WorkerPool(setup, n_workers, cpus=CPUS_PER_ACTOR, gpus=0, progress=print, worker_cls=worker_cls)
            meter = Meter(pool)
            for mult in args.mults:
                popsize = mult * n_workers
                generations = max(args.min_generations, math.ceil(args.trials_per_worker * n_workers / popsize))
                for label, ahead in (("barrier", 0), ("lookahead", None)) if "generations" in args.sections else ():
                    rows.append(measure(label, meter, n_workers, popsize, spread,
                                        lambda: run_generations(folder, meter, worker_cls, n_workers, popsize, generations, ahead)))
                    print(format_row(rows[-1]), flush=True)
            for kind in args.samplers if "sampled" in args.sections else ():
                trials = args.trials_per_worker * n_workers
                rows.append(measure(kind, meter, n_workers, 0, spread,
                                    lambda: run_sampled(folder, meter, worker_cls, n_workers, trials, kind)))
                print(format_row(rows[-1]), flush=True)
            pool.close()
    ray.shutdown()
    return rows


HEADER = f"{'loop':<13} {'workers':>7} {'popsize':>7} {'eval time':>10} {'trials':>6} {'wall s':>7} {'util %':>7} {'ctrl ms/trial':>13}"


def format_row(row: Row) -> str:
    popsize = row.popsize or "-"
    return (f"{row.section:<13} {row.workers:>7} {popsize:>7} {row.spread:>10} {row.trials:>6} "
            f"{row.wall_s:>7.1f} {100 * row.utilization:>7.1f} {row.overhead_ms:>13.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[16])
    parser.add_argument("--mults", type=int, nargs="+", default=[1, 2, 4], help="popsize = mult x workers")
    parser.add_argument("--low", type=float, default=1.0, help="shortest evaluation, seconds")
    parser.add_argument("--high", type=float, default=3.0, help="longest evaluation, seconds")
    parser.add_argument("--trials-per-worker", type=int, default=24, help="budget per run = this x workers (rounded up to whole generations)")
    parser.add_argument("--study-dir", type=Path, default=Path("/dev/shm") if Path("/dev/shm").is_dir() else None,
                        help="where the SQLite studies go (default: /dev/shm, so disk fsyncs do not dominate)")
    parser.add_argument("--min-generations", type=int, default=2)
    parser.add_argument("--sections", nargs="+", default=["generations", "sampled", "simulated"],
                        choices=["generations", "sampled", "simulated"])
    parser.add_argument("--samplers", nargs="+", default=["optuna_random", "tpe"], help="Optuna samplers for the sampled section")
    parser.add_argument("--sim-evals", type=int, default=640)
    parser.add_argument("--sim-seeds", type=int, default=24)
    args = parser.parse_args(argv)
    if {"generations", "sampled"} & set(args.sections):
        print(f"real Ray actors (sleepers), real SearchRun / pycma / SQLite study in {args.study_dir or tempfile.gettempdir()}\n" + HEADER)
        ray_rows(args)
    if "simulated" in args.sections:
        print(f"\nsimulated: eval time uniform 1-3 (3x), {args.sim_evals} evaluations, median of {args.sim_seeds} seeds; "
              "loss = weighted squared distance to the optimum of a 12-gene quadratic (lower is better)")
        print(f"{'policy':<10} {'workers':>7} {'popsize':>7} {'util %':>7} {'loss @ N evals':>15} {'loss @ same wall':>17}")
        for n_workers in args.workers:
            for r in simulated_rows(n_workers, args.mults, args.sim_evals, args.sim_seeds):
                print(f"{r['policy']:<10} {r['workers']:>7} {r['popsize']:>7} {100 * r['utilization']:>7.1f} "
                      f"{r['loss_at_n']:>15.4f} {r['loss_at_wall']:>17.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
