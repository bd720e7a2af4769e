"""Throughput on the tiny zoo: candidates per minute end to end, with 1 and with 2 workers.

Real pieces throughout: evomerge's `SearchRun` loop with its CMA-ES over the `ties_or_dare` space (TIES
and DARE-TIES builds: they cost more per candidate than the default space's task arithmetic), a SQLite
study, Ray workers (`WorkerPool`) building each candidate in memory and scoring it with lm-eval
(zoo_arith + zoo_rev, 200 examples each, fitness split). One script run measures both worker counts,
one after the other, on the same Ray instance; for each:

  wall_s         the search loop (SearchRun.generations), worker start-up excluded (reported apart)
  merge_s        summed over trials: building candidates in the live model (trial attr merge_s)
  eval_s         summed over trials: lm-eval scoring (trial attr eval_s)
  overhead_s     wall_s - (merge_s + eval_s) / workers: everything that is not a busy worker, i.e.
                 asking/telling, study writes, Ray dispatch and result transfer, and workers idling at
                 the generation barrier (CMA-ES tells whole generations)
  controller_s   the part of wall_s the controller process spent not waiting for a result: starting and
                 finishing trials (decode, study writes, recipe artifacts), ask/tell, optimizer
                 checkpoints. Much of it overlaps with workers evaluating, so it is not a part of
                 overhead_s; when it exceeds the eval time per candidate, the controller is the bottleneck
  cpu_s          CPU seconds (user + system) the worker processes and the controller process used during
                 the loop (psutil): unlike the wall times, these do not grow when other jobs take the cores,
                 so cpu ms per candidate says what a core per worker would deliver; the 1-minute load
                 average before each row says how busy the machine was

    python scripts/bench_throughput.py                   # 40 trials each with 1 and 2 workers
    python scripts/bench_throughput.py --trials 20 --workers 1 2 --out /tmp/tp

Writes <out>/bench_throughput.md and .json. The machine this was written on has 2 cores shared with
other jobs: 2 workers (one thread each) plus the controller contend for them, so the 2-worker speed-up
is a floor for a machine with a core per worker (or a GPU per worker).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from evomerge.config import StudyConfig, load_preset, parse_config  # noqa: E402
from evomerge.search.controllers import make_controller  # noqa: E402
from evomerge.study import StudyStore  # noqa: E402


class Meter:
    """A WorkerPool stand-in for SearchRun that times how long the controller waits for results.

    Starting a trial (`next_job`: decode, study writes, the recipe artifact) runs inside the pool's loop,
    so its time is timed apart and not counted as waiting.
    """

    def __init__(self, pool) -> None:
        self.pool, self.wait_s = pool, 0.0

    @property
    def size(self) -> int:
        return self.pool.size

    def run(self, next_job) -> Iterator[tuple[object, object]]:
        def timed_next_job():
            started = time.perf_counter()
            try:
                return next_job()
            finally:
                self.wait_s -= time.perf_counter() - started

        outcomes = self.pool.run(timed_next_job)
        while True:
            started = time.perf_counter()
            try:
                item = next(outcomes)
            except StopIteration:
                self.wait_s += time.perf_counter() - started
                return
            self.wait_s += time.perf_counter() - started
            yield item


@dataclass
class Row:
    workers: int
    trials: int
    failed: int
    startup_s: float
    wall_s: float
    merge_s: float
    eval_s: float
    overhead_s: float
    controller_s: float
    merge_ms_per_trial: float
    eval_ms_per_trial: float
    worker_cpu_s: float
    controller_cpu_s: float
    load_before: float
    fail_reasons: list[str]

    @property
    def per_min(self) -> float:
        return 60 * self.trials / self.wall_s


def study_config(zoo, trials: int, workers: int, db: Path) -> StudyConfig:
    return parse_config({
        "name": f"throughput-{workers}w",
        "storage": f"sqlite:///{db}",
        "models": {"base": str(zoo.base), "sources": [str(p) for p in zoo.specialists.values()]},
        "search_space": load_preset("ties_or_dare"),
        "evaluation": {"tasks": [{"name": f"zoo_{skill}"} for skill in zoo.specialists], "heldout_top_k": 0},
        "optimizer": {"kind": "cmaes", "seed": 0},
        "budget": {"trials": trials},
        "workers": {"n": workers},
    }, source="bench_throughput")


def measure(zoo, trials: int, workers: int, folder: Path) -> Row:
    from evomerge.runtime.pool import WorkerPool
    from evomerge.search import SearchRun, prepare

    prepared = prepare(study_config(zoo, trials, workers, folder / f"tp{workers}.db"))
    import ray

    load_before = os.getloadavg()[0]
    pool = WorkerPool(prepared.setup, workers, cpus=1, progress=print)
    try:
        procs = [_process(info.worker) for info in pool.infos]
        store = StudyStore.create(prepared.cfg, {g.name: g.default for g in prepared.space.genes})
        x0 = np.array([g.to_unit(g.default) for g in prepared.space.genes])
        controller = make_controller(prepared.cfg.optimizer, x0, workers)
        meter = Meter(pool)
        run = SearchRun(prepared, store, controller, meter, progress=lambda _: None)
        cpu_before, own_before = _cpu_s(procs), time.process_time()
        started = time.perf_counter()
        run.generations(0)
        wall_s = time.perf_counter() - started
        worker_cpu_s, controller_cpu_s = _cpu_s(procs) - cpu_before, time.process_time() - own_before
    finally:
        pool.close()
    done = store.completed()
    import optuna

    reasons = sorted({t.user_attrs.get("fail_reason", "?")[:200] for t in store.study.get_trials(deepcopy=False)
                      if t.state == optuna.trial.TrialState.FAIL})
    merge_s = sum(t.user_attrs["merge_s"] for t in done)
    eval_s = sum(t.user_attrs["eval_s"] for t in done)
    return Row(workers=workers, trials=len(done), failed=run.summary.failed, startup_s=pool.startup_s, wall_s=wall_s,
               merge_s=merge_s, eval_s=eval_s, overhead_s=wall_s - (merge_s + eval_s) / workers,
               controller_s=wall_s - meter.wait_s, merge_ms_per_trial=1000 * merge_s / len(done),
               eval_ms_per_trial=1000 * eval_s / len(done), worker_cpu_s=worker_cpu_s,
               controller_cpu_s=controller_cpu_s, load_before=load_before,
               fail_reasons=reasons)


def _process(worker_name: str):
    import psutil

    return psutil.Process(int(worker_name.rsplit(":", 1)[1]))  # CandidateWorker.name is "host:pid"


def _cpu_s(procs) -> float:
    return sum(sum(p.cpu_times()[:2]) for p in procs)


def table(rows: list[Row]) -> str:
    head = ["workers", "trials", "candidates / min", "wall s", "merge s (sum)", "eval s (sum)",
            "overhead s (share of wall)", "controller busy s", "merge ms / cand.", "eval ms / cand.",
            "worker CPU ms / cand.", "controller CPU ms / cand.", "worker start-up s", "load avg before"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.workers, r.trials, f"**{r.per_min:.0f}**", f"{r.wall_s:.1f}", f"{r.merge_s:.1f}", f"{r.eval_s:.1f}",
                 f"{r.overhead_s:.1f} ({100 * r.overhead_s / r.wall_s:.0f}%)", f"{r.controller_s:.1f}",
                 f"{r.merge_ms_per_trial:.0f}", f"{r.eval_ms_per_trial:.0f}", f"{1000 * r.worker_cpu_s / r.trials:.0f}",
                 f"{1000 * r.controller_cpu_s / r.trials:.0f}", f"{r.startup_s:.1f}", f"{r.load_before:.1f}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results")
    parser.add_argument("--zoo", type=Path, default=None, help="zoo cache folder (default: the test cache)")
    args = parser.parse_args(argv)

    from evomerge.runtime.pool import start_ray
    from evomerge.zoo import build_zoo

    sys.path.insert(0, str(REPO / "tests"))
    from zoo_fixtures import zoo_cache_dir

    zoo = build_zoo(args.zoo or zoo_cache_dir(), family="llama")
    start_ray(max(args.workers), 1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_throughput-") as tmp:
        for n in args.workers:
            rows.append(measure(zoo, args.trials, n, Path(tmp)))
            print(f"{n} worker(s): {rows[-1].per_min:.0f} candidates/min, {rows[-1].failed} failed {rows[-1].fail_reasons}", flush=True)
    md = table(rows)
    speedup = f" 2 workers vs 1: {rows[-1].per_min / rows[0].per_min:.2f}x." if len(rows) > 1 else ""
    header = (f"Tiny zoo (llama), `ties_or_dare`, evomerge's CMA-ES (popsize 10), {args.trials} trials per row, "
              f"SQLite study, Ray CPU workers with 1 thread each on a shared 2-core machine.{speedup}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_throughput.md").write_text(f"{header}\n\n{md}\n")
    (args.out / "bench_throughput.json").write_text(json.dumps(
        [{**asdict(r), "candidates_per_min": round(r.per_min, 1)} for r in rows], indent=1))
    print(f"\n{header}\n\n{md}\nwrote {args.out}/bench_throughput.{{md,json}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
