"""Scheduling benchmark: how busy do the workers stay, and what does the controller cost per trial?

Real pieces throughout: Ray actors through evomerge's `WorkerPool`, the `SearchRun` controller loop,
pycma CMA-ES, and a SQLite study. Only the evaluation is fake: a `SleepWorker` sleeps a deterministic
time drawn from [low, high] by hashing the recipe (high = 3 x low by default: evaluation times that
vary 3x) and returns a smooth fitness of the recipe's numbers.

  utilization   = time the workers spent evaluating / (workers x wall time of the search loop)
  overhead/trial = (wall - time the controller spent waiting for a result) / trials: asking, telling,
                   decoding, and the study writes (start_trial, finish_trial, optimizer checkpoints)

Four sections:
  measured    the current loop (SearchRun: one barrier per generation, as CMA-ES tells whole
              generations), for popsize = 1x, 2x, 4x, 8x the worker count
  prototype   two loops on the same real pool and study, both starting a candidate's trial only when a
              worker is free (SearchRun starts a whole generation's trials before dispatching any):
              lazy-barrier  the same barrier per generation
              tail-fill     once a generation has nothing left to hand out, free workers start candidates
                            of the next one, sampled from the current distribution (at most half a
                            generation ahead); each generation is still told whole, in order
  sampled     the Optuna samplers' loop (SearchRun.sampled: a new trial whenever a worker is free, no
              generations), here optuna_random (scheduling only) and tpe (its proposal cost included)
  simulated   the same two policies in a discrete-event simulation with a real pycma optimizer on a
              12-gene quadratic, to compare the best fitness reached per evaluation and per wall second

    python scripts/bench_sched.py                        # everything: about 8 minutes on 2 cores
    python scripts/bench_sched.py --sections simulated   # the policy comparison alone: 20 s
    python scripts/bench_sched.py --workers 8 16 --sections measured simulated

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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from evomerge.config import StudyConfig, parse_config  # noqa: E402
from evomerge.optimize import make_controller  # noqa: E402
from evomerge.recipe import Recipe  # noqa: E402
from evomerge.spaces import build_space, decode_unit  # noqa: E402

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

        def info(self) -> dict[str, object]:
            return {"worker": self.name, "device": "sleep", "startup_s": 0.0}

        def evaluate(self, recipe: Recipe, split: str = "fitness"):
            from evomerge.worker import CandidateResult

            duration_s = low_s + (high_s - low_s) * recipe_unit(recipe)
            started = time.perf_counter()
            time.sleep(duration_s)
            fitness = recipe_fitness(recipe)
            return CandidateResult(scores={"sleep": fitness}, fitness=fitness, merge_s=0.0,
                                   eval_s=time.perf_counter() - started, worker=self.name)

    return SleepWorker


# --- a study over fake models -------------------------------------------------------------------


def bench_config(folder: Path, name: str, n_workers: int, popsize: int, generations: int, kind: str = "cmaes") -> StudyConfig:
    return parse_config({
        "name": name,
        "storage": f"sqlite:///{folder / (name + '.db')}",
        "models": {"base": "/fake/base", "sources": ["/fake/math", "/fake/code", "/fake/chat"]},
        "search_space": {"methods": ["ties"], "layer_groups": 2,
                         "params": {"weight": {"low": 0, "high": 1.5}, "density": {"low": 0.1, "high": 1}}},
        "evaluation": {"tasks": [{"name": "sleep"}], "heldout_top_k": 0},
        "optimizer": {"kind": kind, "popsize": popsize, "seed": 0},
        "budget": {"trials": popsize * generations},
        "workers": {"n": n_workers, "cpus_per_worker": CPUS_PER_ACTOR, "gpus_per_worker": 0},
    }, source="bench")


def prepared(cfg: StudyConfig, worker_cls: type):
    from evomerge.search import Prepared
    from evomerge.worker import WorkerSetup

    space = build_space(cfg.search_space, cfg.models.base, cfg.models.sources, n_layers=8, seed=0)
    setup = WorkerSetup(base=cfg.models.base, sources=tuple(cfg.models.sources), tasks=(), include_paths=())
    return Prepared(cfg, space, setup, worker_cls=worker_cls)


# --- measuring a loop ---------------------------------------------------------------------------


@dataclass
class Meter:
    """Wraps a WorkerPool: counts the time the controller spends waiting for results, and busy time."""

    pool: object
    wait_s: float = 0.0
    busy_s: float = 0.0
    trials: int = 0

    @property
    def size(self) -> int:
        return self.pool.size

    def run(self, next_job) -> Iterator[tuple[object, object]]:
        results = self.pool.run(next_job)
        while True:
            started = time.perf_counter()
            try:
                job, outcome = next(results)  # dispatches free workers, then ray.wait
            except StopIteration:
                return
            finally:
                self.wait_s += time.perf_counter() - started
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


def run_barrier(folder: Path, meter: Meter, worker_cls: type, n_workers: int, popsize: int, generations: int) -> None:
    """The current controller loop, unchanged: SearchRun over a fresh study."""
    from evomerge.search import SearchRun
    from evomerge.study import StudyStore

    cfg = bench_config(folder, f"barrier-{n_workers}-{popsize}", n_workers, popsize, generations)
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


class TailFillRun:
    """Prototype loop: candidates (and their trials) are made only when a worker is free, and when
    generation g has nothing left to hand out, free workers take candidates of g+1.

    Those early candidates are sampled from the distribution as it was before g was told (pycma
    `ask(number=1)`), at most `ahead` of them per generation (0: a barrier like SearchRun's, but with
    trials started lazily); generations are still told whole and in order. The study writes are the
    same as SearchRun's (one trial per candidate, an optimizer checkpoint per generation).
    """

    def __init__(self, folder: Path, meter: Meter, worker_cls: type, n_workers: int, popsize: int, generations: int,
                 ahead: int) -> None:
        from evomerge.study import StudyStore

        cfg = bench_config(folder, f"fill{ahead}-{n_workers}-{popsize}", n_workers, popsize, generations)
        self.prep = prepared(cfg, worker_cls)
        genes = self.prep.space.genes
        self.store = StudyStore.create(cfg, {g.name: g.default for g in genes})
        self.controller = make_controller(cfg.optimizer, np.array([g.to_unit(g.default) for g in genes]), n_workers)
        self.distributions = {g.name: g.distribution() for g in genes}
        self.meter, self.popsize, self.budget = meter, popsize, cfg.budget.trials
        self.ahead = ahead
        self.gens: dict[int, dict] = {}  # generation -> {"xs": [...], "fitness": [...], "done": n}
        self.told = 0  # oldest generation not told yet
        self.asked = self.finished = 0

    def run(self) -> None:
        from evomerge.pool import Job

        def next_job() -> Job | None:
            generation = self._open_generation() if self.asked < self.budget else None
            return None if generation is None else self._job(generation)

        for job, outcome in self.meter.run(next_job):
            generation, index, number = job.key
            attrs = {"scores.fitness": outcome.scores, "merge_s": outcome.merge_s, "eval_s": outcome.eval_s, "worker": outcome.worker}
            self.store.finish_trial(number, outcome.fitness, attrs)  # the attributes SearchRun writes
            gen = self.gens[generation]
            gen["fitness"][index], gen["done"] = outcome.fitness, gen["done"] + 1
            self.finished += 1
            while self.told in self.gens and self.gens[self.told]["done"] == self.popsize:
                told = self.gens.pop(self.told)
                self.controller.tell(told["xs"], told["fitness"])
                self.told += 1
                self.store.save_controller(self.told, self.controller.dumps())

    def _open_generation(self) -> int | None:
        for generation in (self.told, self.told + 1):
            asked = len(self.gens.setdefault(generation, {"xs": [], "fitness": [], "done": 0})["xs"])
            limit = self.popsize if generation == self.told else self.ahead
            if asked < limit:
                return generation
        return None

    def _job(self, generation: int):
        from evomerge.pool import Job

        gen = self.gens[generation]
        x = np.asarray(self.controller.es.ask(number=1)[0], dtype=float)
        values = decode_unit(self.prep.space.genes, x)
        recipe = self.prep.space.decode(values)
        attrs = {"generation": generation, "candidate": len(gen["xs"]), "attempt": 0}
        number, values = self.store.start_trial(values, self.distributions, attrs)
        self.store.set_recipe(number, recipe.to_dict())
        gen["xs"].append(x)
        gen["fitness"].append(None)
        self.asked += 1
        return Job(key=(generation, len(gen["xs"]) - 1, number), recipe=recipe)


# --- simulation: utilization and search quality, no Ray -----------------------------------------


def simulate(policy: str, n_workers: int, popsize: int, n_evals: int, low_s: float, high_s: float, seed: int) -> dict:
    """Discrete-event run of `policy` ("barrier" or "tail-fill") with pycma on a 12-gene quadratic."""
    import cma

    rng = np.random.default_rng(seed)
    centre, weights = rng.uniform(0.2, 0.8, 12), np.logspace(0, 1, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        es = cma.CMAEvolutionStrategy(np.full(12, 0.5), 0.25, {"bounds": [0, 1], "popsize": popsize, "seed": seed + 1, "verbose": -9})
    gens: dict[int, dict] = {}
    events: list[tuple[float, int, int]] = []
    now = busy = 0.0
    told = asked = done = 0
    best, trace = -math.inf, []
    while done < n_evals:
        while asked < n_evals and len(events) < n_workers:
            generation = _sim_generation(policy, gens, told, popsize)
            if generation is None:
                break
            gen = gens.setdefault(generation, {"xs": [], "f": [], "done": 0})
            gen["xs"].append(es.ask(number=1)[0])
            gen["f"].append(None)
            duration = rng.uniform(low_s, high_s)
            busy += duration
            heapq.heappush(events, (now + duration, generation, len(gen["xs"]) - 1))
            asked += 1
        now, generation, index = heapq.heappop(events)
        gen = gens[generation]
        gen["f"][index] = -float(np.sum(weights * (gen["xs"][index] - centre) ** 2))
        gen["done"] += 1
        done += 1
        best = max(best, gen["f"][index])
        trace.append((now, best))
        while told in gens and gens[told]["done"] == popsize:
            es.tell(gens[told]["xs"], [-f for f in gens.pop(told)["f"]])
            told += 1
    return {"wall_s": now, "utilization": busy / (n_workers * now), "best": best, "trace": trace}


def _sim_generation(policy: str, gens: dict, told: int, popsize: int) -> int | None:
    if len(gens.get(told, {"xs": []})["xs"]) < popsize:
        return told
    if policy == "tail-fill" and len(gens.get(told + 1, {"xs": []})["xs"]) < popsize // 2:
        return told + 1
    return None


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
        runs = {p: [simulate(p, n_workers, popsize, n_evals, 1.0, 3.0, s) for s in range(seeds)] for p in ("barrier", "tail-fill")}
        same_wall = statistics.median(r["wall_s"] for r in runs["tail-fill"])
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

    from evomerge.pool import WorkerPool
    from evomerge.worker import WorkerSetup

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
                if "measured" in args.sections:
                    rows.append(measure("measured", meter, n_workers, popsize, spread,
                                        lambda: run_barrier(folder, meter, worker_cls, n_workers, popsize, generations)))
                    print(format_row(rows[-1]), flush=True)
                for label, ahead in (("lazy-barrier", 0), ("tail-fill", popsize // 2)):
                    if "prototype" in args.sections and mult in args.prototype_mults:
                        loop = TailFillRun(folder, meter, worker_cls, n_workers, popsize, generations, ahead)
                        rows.append(measure(label, meter, n_workers, popsize, spread, loop.run))
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
    parser.add_argument("--mults", type=int, nargs="+", default=[1, 2, 4, 8], help="popsize = mult x workers")
    parser.add_argument("--prototype-mults", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--low", type=float, default=1.0, help="shortest evaluation, seconds")
    parser.add_argument("--high", type=float, default=3.0, help="longest evaluation, seconds")
    parser.add_argument("--trials-per-worker", type=int, default=8, help="budget per run = this x workers (rounded up to whole generations)")
    parser.add_argument("--study-dir", type=Path, default=Path("/dev/shm") if Path("/dev/shm").is_dir() else None,
                        help="where the SQLite studies go (default: /dev/shm, so disk fsyncs do not dominate)")
    parser.add_argument("--min-generations", type=int, default=2)
    parser.add_argument("--sections", nargs="+", default=["measured", "prototype", "sampled", "simulated"],
                        choices=["measured", "prototype", "sampled", "simulated"])
    parser.add_argument("--samplers", nargs="+", default=["optuna_random", "tpe"], help="Optuna samplers for the sampled section")
    parser.add_argument("--sim-evals", type=int, default=640)
    parser.add_argument("--sim-seeds", type=int, default=24)
    args = parser.parse_args(argv)
    if {"measured", "prototype", "sampled"} & set(args.sections):
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
