"""evomerge and mergekit-evolve 0.1.5 side by side: one run, one machine, same zoo, tasks, budget, workers.

  (a) evomerge: `scripts/bench_search.py`'s `run_one` (SearchRun, SQLite study, Ray CPU workers building
      each candidate in memory, lm-eval on the fitness split, then the best trial on the held-out split),
      for two optimizers: `cmaes` (evomerge's default CMA-ES over the default `task_arithmetic` space) and
      `mergekit` (mergekit-evolve's CMA-ES settings and 8-gene ties genome inside evomerge's loop), one
      run per seed.
  (b) mergekit-evolve 0.1.5, unmodified, in its side venv, as a subprocess per run: its own CLI `main`,
      its default `pool` strategy (merge each candidate to disk with mergekit, load it with lm-eval's
      HFLM in bf16, score, delete), `--num-gpus <workers>` actors. To run on a CPU-only machine it needs
      Ray started with pretend GPUs (its actors all ask for 1 GPU) and three import-time shims (SHIM
      below; scripts/mergekit_evolve_peer.md says why each one). Skipped with a message when the venv is
      missing. Its task YAMLs are evomerge's zoo tasks with `test_split: fitness` (it takes task names
      only), task weights 0.5 so its score is the mean, like evomerge's fitness; lm-eval batch size 64
      as evomerge's (its own default is lm-eval's 1).

The driver in the side venv only adds timing: it wraps `cma.fmin2` (search start/end, xbest), the pool
strategy's `evaluate_genotypes` (every score, per generation) and waits for its actors to be constructed
before the search starts (so start-up and search are split at the same point as for evomerge). Its best
genotype is then scored on the held-out split two ways: its own saved final model (mergekit's bf16 merge,
loaded in bf16 as its evaluator does) through evomerge's scorer, and decoded into evomerge's recipe (the
fp32 merge) on an evomerge worker.

Timing, per run: `search s` is the search loop only (evomerge: SearchRun.generations; mergekit: cma.fmin2);
`start-up s` is everything before it from a cold start (evomerge: from before its imports to the worker
pool being ready, once per script run, shared by its runs; mergekit: from the subprocess launch to its
actors being ready: interpreter, imports, resharding the inputs to bf16, Ray, actors). Candidates per
minute are given both over the search alone and over start-up + search.

    python scripts/bench_peer.py                                  # 64 evaluations, 2 workers, 3 runs each
    python scripts/bench_peer.py --budget 20 --seeds 1 --peer-runs 1 --out /tmp/peer   # a quick look
    EVOMERGE_MK_VENV=/path/venv python scripts/bench_peer.py      # or --mk-venv /path/venv

The side venv (scripts/mergekit_evolve_peer.md, "Setup"): mergekit==0.1.5 with its evolve extras (lm-eval,
ray, cma), torch CPU. Writes <out>/bench_peer.md and .json; the peer's logs go to --log-dir.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
DEFAULT_VENV = "/tmp/mkvenv"

# Installed through PYTHONPATH as sitecustomize, so mergekit's Ray workers get it too.
SHIM = '''"""Shims that let mergekit-evolve 0.1.5 run on a CPU-only machine (written by scripts/bench_peer.py).

1. mergekit/evo/actors.py names `lm_eval.models.vllm_causallms.VLLM` in a class annotation, and every
   evaluator actor imports that module in __init__ (mergekit/evo/monkeypatch.py, monkeypatch_lmeval_vllm);
   lm-eval 0.4.13's module imports vllm, which is not installed (no CPU wheel). A stub module stands in
   for it; nothing calls it without --vllm.
2. OnDiskMergeEvaluator.evaluate_genotype calls torch.<device>.empty_cache(); torch.cpu has none.
   A no-op stands in for it.
3. mergekit/evo/helpers.py evaluate_model gives lm-eval's HFLM no device, so HFLM takes its default
   `cuda` (torch has no CUDA here: transformers' caching_allocator_warmup -> torch.cuda lazy init ->
   AssertionError). A wrapper adds `device="cpu"` to its model_kwargs (which evaluate_model merges into
   HFLM's model_args); everything else in evaluate_model (bf16 dtype, batch size, lm-eval call) is
   untouched. mergekit/evo/actors.py imports evaluate_model by name from helpers after helpers has run,
   so the on-disk actors get the wrapper.
"""
import importlib.abc
import importlib.util
import sys
import types


def _vllm_stub(module):
    stub = types.ModuleType("lm_eval.models.vllm_causallms")
    stub.VLLM = type("VLLM", (), {})
    module.vllm_causallms = stub
    sys.modules["lm_eval.models.vllm_causallms"] = stub


def _cpu_empty_cache(module):
    if not hasattr(module.cpu, "empty_cache"):
        module.cpu.empty_cache = lambda: None


def _lmeval_on_cpu(module):
    original = module.evaluate_model

    def evaluate_model(*args, model_kwargs=None, **kwargs):
        return original(*args, model_kwargs={"device": "cpu", **(model_kwargs or {})}, **kwargs)

    module.evaluate_model = evaluate_model


_AFTER = {"lm_eval.models": _vllm_stub, "torch": _cpu_empty_cache, "mergekit.evo.helpers": _lmeval_on_cpu}


class _After(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        patch = _AFTER.pop(name, None)
        if patch is None:
            return None
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            patch(module)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _After())
'''

PEER_VERSIONS = ("mergekit", "lm_eval", "ray", "cma", "torch", "transformers")


# --- (b) the peer: inputs, the driver that runs inside its venv, one run -------------------------


def write_peer_inputs(folder: Path, zoo, include_path: Path) -> None:
    """genome.yaml, the fitness-split task YAMLs and the shim, in `folder`."""
    import yaml

    (folder / "shim").mkdir(parents=True, exist_ok=True)
    (folder / "shim" / "sitecustomize.py").write_text(SHIM)
    (folder / "tasks").mkdir(exist_ok=True)
    for skill in zoo.specialists:
        (folder / "tasks" / f"zoo_{skill}_fit.yaml").write_text(
            f"# evomerge's zoo_{skill} on its fitness split (mergekit-evolve takes task names only)\n"
            f"include: {include_path / f'zoo_{skill}.yaml'}\ntask: zoo_{skill}_fit\ntest_split: fitness\n")
    genome = {
        "genome": {"models": [str(p) for p in zoo.specialists.values()], "merge_method": "ties",
                   "base_model": str(zoo.base), "layer_granularity": 2},  # 2 layer groups on the 4-layer zoo
        # score = weighted sum; 1/n each makes it the mean, as evomerge's fitness
        "tasks": [{"name": f"zoo_{skill}_fit", "weight": 1 / len(zoo.specialists)} for skill in zoo.specialists],
        "apply_chat_template": False,  # the zoo's byte-level tokenizer has no chat template
        "fewshot_as_multiturn": False,
    }
    (folder / "genome.yaml").write_text(yaml.safe_dump(genome, sort_keys=False))


def peer_command(folder: Path, storage: Path, budget: int, workers: int, batch_size: int) -> list[str]:
    """mergekit-evolve's arguments, as a user types them (the default on-disk `pool` strategy)."""
    return [str(folder / "genome.yaml"), "--storage-path", str(storage), "--task-search-path", str(folder / "tasks"),
            "--max-fevals", str(budget), "--no-merge-cuda", "--num-gpus", str(workers), "--batch-size", str(batch_size),
            "--random-seed", "0", "--no-wandb"]


def _cpu_s(procs) -> float:
    """CPU seconds (user + system) of these processes and of their finished children (psutil). Unlike
    bench_throughput._cpu_s this counts children: lm-eval's simple_evaluate, which mergekit-evolve calls per
    candidate, runs `pip list` and `git` in subprocesses (torch's collect_env, lm-eval's git hash)."""
    return sum(sum(p.cpu_times()[:4]) for p in procs)


def peer_driver(result_path: str, workers: int, argv: list[str]) -> int:
    """Runs in the side venv: Ray with pretend GPUs, then mergekit-evolve's own main(), timed."""
    from importlib.metadata import version

    rec: dict = {"launched": float(os.environ.get("BENCH_PEER_LAUNCHED", "nan")), "driver_start": time.time(),
                 "generations": [], "scores": []}
    try:
        import ray

        ray.init(num_cpus=workers, num_gpus=workers, include_dashboard=False)  # its actors each ask for 1 GPU
        import cma
        import mergekit.evo.strategy as strategy
        from mergekit.scripts.evolve import main

        rec["versions"] = {name: version(name.replace("_", "-")) for name in PEER_VERSIONS}
        pool_cls, procs = strategy.ActorPoolEvaluationStrategy, []
        init, evaluate, fmin2 = pool_cls.__init__, pool_cls.evaluate_genotypes, cma.fmin2

        def timed_init(self, *args, **kwargs):
            import psutil

            init(self, *args, **kwargs)
            pids = ray.get([a.__ray_call__.remote(lambda _: os.getpid()) for a in self.actor_pool._idle_actors])
            rec["ready"] = time.time()  # the actors are constructed
            procs.extend(psutil.Process(pid) for pid in pids)

        def timed_evaluate(self, genotypes):
            started = time.time()
            results = evaluate(self, genotypes)
            rec["generations"].append({"start": started, "end": time.time(), "n": len(genotypes)})
            rec["scores"].extend(r["score"] for r in results)
            return results

        def timed_fmin2(*args, **kwargs):
            cpu, own = _cpu_s(procs), time.process_time()
            rec["search_start"] = time.time()
            xbest, es = fmin2(*args, **kwargs)
            rec["search_end"] = time.time()
            rec["worker_cpu_s"], rec["controller_cpu_s"] = _cpu_s(procs) - cpu, time.process_time() - own
            rec.update(xbest=[float(v) for v in es.result.xbest], fbest=-float(es.result.fbest),
                       evaluations=int(es.result.evaluations), popsize=int(es.popsize), cma_seed=es.opts["seed"])
            return xbest, es

        pool_cls.__init__, pool_cls.evaluate_genotypes, cma.fmin2 = timed_init, timed_evaluate, timed_fmin2
        main.main(args=argv, prog_name="mergekit-evolve", standalone_mode=False)
        return 0
    finally:
        rec["driver_end"] = time.time()
        Path(result_path).write_text(json.dumps(rec))


def run_peer(venv: Path, folder: Path, budget: int, workers: int, batch_size: int, log: Path) -> dict:
    storage = folder / "storage"
    shutil.rmtree(storage, ignore_errors=True)  # a cold start: resharding included, as a user's first run
    result = folder / "peer_result.json"
    argv = peer_command(folder, storage, budget, workers, batch_size)
    env = {**os.environ, "PYTHONPATH": str(folder / "shim"), "PYTHONUNBUFFERED": "1",
           "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    load_before = os.getloadavg()[0]
    launched = time.time()
    env["BENCH_PEER_LAUNCHED"] = repr(launched)
    with open(log, "w") as out:
        proc = subprocess.run([str(venv / "bin" / "python"), __file__, "--peer-driver", str(result), str(workers), *argv],
                              env=env, stdout=out, stderr=subprocess.STDOUT, cwd=folder)
    exited = time.time()
    rec = json.loads(result.read_text()) if result.exists() else {}
    if proc.returncode or "search_end" not in rec:
        tail = log.read_text()[-1500:]
        raise RuntimeError(f"mergekit-evolve failed (exit {proc.returncode}); log {log}:\n{tail}")
    scores = rec["scores"]
    return {
        "load_before": load_before,
        "startup_s": rec["ready"] - launched,
        "search_s": rec["search_end"] - rec["search_start"],
        "process_s": exited - launched,  # + saving the final model, Ray shutdown
        "evaluations": len(scores),
        "generations": [g["n"] for g in rec["generations"]],
        "failed": sum(s is None for s in scores),
        "worker_cpu_ms": 1000 * rec["worker_cpu_s"] / len(scores),
        "controller_cpu_ms": 1000 * rec["controller_cpu_s"] / len(scores),
        "best": rec["fbest"],
        f"best_at_{budget}": max((s for s in scores[:budget] if s is not None), default=math.nan),
        "curve": scores,
        "xbest": rec["xbest"],
        "popsize": rec["popsize"],
        "cma_seed": rec["cma_seed"],
        "versions": rec["versions"],
        "final_model": str(storage / "final_model"),
        "command": "mergekit-evolve " + " ".join(argv),
    }


def score_peer_best(peer: dict, zoo, budget: int, folder: Path) -> None:
    """Its best genotype on both splits: (1) its saved final model (bf16 merge, loaded in bf16 as its
    evaluator loads candidates) through evomerge's scorer; (2) decoded into evomerge's recipe, fp32 build."""
    import torch
    from bench_search import MergekitEvolveController, study_config
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.runtime.scoring import LmEvalScorer
    from evomerge.search import prepare
    from evomerge.runtime.worker import CandidateWorker

    folder.mkdir(parents=True, exist_ok=True)
    prepared = prepare(study_config("mergekit", 0, zoo, budget, folder / "decode.db", 1))
    setup = prepared.setup
    path = peer["final_model"]
    scorer = LmEvalScorer(setup.tasks, [os.fspath(p) for p in setup.include_paths], batch_size=setup.batch_size)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    for split in ("fitness", "heldout"):
        peer[f"own_model_{split}"] = scorer.fitness(scorer.score(model, tokenizer, split))
    ctrl = MergekitEvolveController(prepared.space.genes, prepared.space.labels, prepared.cfg.search_space.layer_groups, 0)
    recipe = prepared.space.decode(ctrl.gene_values(peer["xbest"]))
    worker = CandidateWorker(setup)
    for split in ("fitness", "heldout"):
        peer[f"fp32_recipe_{split}"] = worker.evaluate(recipe, split).fitness
    peer["decode_clipped"] = ctrl.clipped


# --- (a) evomerge -------------------------------------------------------------------------------


def run_evomerge(zoo, args, started: float, tmp: Path) -> tuple[list[dict], float, float]:
    import ray
    from bench_search import run_one, study_config
    from bench_throughput import _process

    from evomerge.runtime.pool import WorkerPool, start_ray
    from evomerge.search import prepare

    setup = prepare(study_config("cmaes", 0, zoo, args.budget, tmp / "probe.db", args.workers)).setup
    start_ray(args.workers, 1)
    pool = WorkerPool(setup, args.workers, cpus=1, progress=print)
    procs = [_process(info.worker) for info in pool.infos]
    startup_s = time.perf_counter() - started
    rows = []
    try:
        for seed in range(args.seeds):
            for method in ("cmaes", "mergekit"):
                load_before = os.getloadavg()[0]
                cpu, own = _cpu_s(procs), time.process_time()
                r = run_one(method, seed, zoo, args, pool, tmp / "bench.db")
                # run_one also scores the best trial on the held-out split: one more evaluation of the same size
                worker_cpu_ms = 1000 * (_cpu_s(procs) - cpu) / (len(r.curve) + 1)
                controller_cpu_ms = 1000 * (time.process_time() - own) / (len(r.curve) + 1)
                rows.append({"method": method, "seed": seed, "load_before": load_before, "search_s": r.search_s,
                             "evaluations": len(r.curve), "failed": r.failed, "best": r.best, "heldout": r.heldout,
                             "popsize": r.popsize, "worker_cpu_ms": worker_cpu_ms,
                             "controller_cpu_ms": controller_cpu_ms, "curve": r.curve})
                print(f"evomerge {method:8s} seed {seed}: {len(r.curve)} evals in {r.search_s:.1f}s, best {r.best:.4f}, "
                      f"held-out {r.heldout:.4f}", flush=True)
    finally:
        pool.close()
        ray.shutdown()
    return rows, startup_s, pool.startup_s


# --- report -------------------------------------------------------------------------------------


def _mean_sd(values, fmt="{:.3f}") -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.fmean(values))} ± {fmt.format(statistics.stdev(values))}"


def _per_min(rows: list[dict], startup: float | None = None, *, with_startup: bool) -> list[float]:
    """Candidates per minute of each run, over its search alone or over start-up + search (a run's own
    start-up, or `startup` when given: evomerge's, once per script run)."""
    return [60 * r["evaluations"] / (r["search_s"] + ((r["startup_s"] if startup is None else startup) if with_startup else 0))
            for r in rows]


def summarize(data: dict) -> tuple[str, dict]:
    ev, peers, budget = data["evomerge"], data["peer"], data["budget"]
    groups = [("evomerge, default CMA-ES (`task_arithmetic`)", [r for r in ev if r["method"] == "cmaes"], "ev"),
              ("evomerge, mergekit-evolve's CMA-ES + genome (ties, 8 genes)", [r for r in ev if r["method"] == "mergekit"], "ev")]
    if peers:
        groups.append(("mergekit-evolve 0.1.5 (on-disk `pool` strategy, 3 shims)", peers, "mk"))
    head = ["run", "runs", "evaluations / run", "search s / run", "start-up s", "**candidates / min, search only**",
            "candidates / min, with start-up", "worker CPU ms / cand.", "controller CPU ms / cand.", f"best fitness @{budget}", "best fitness (all evals)", "held-out of best",
            "load avg before"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rates = {}
    for label, rows, kind in groups:
        if not rows:
            continue
        startup = data["evomerge_startup_s"] if kind == "ev" else None
        search_only = _per_min(rows, with_startup=False)
        with_startup = _per_min(rows, startup, with_startup=True)
        rates[label] = (statistics.fmean(search_only), statistics.fmean(with_startup),
                        statistics.fmean(r["worker_cpu_ms"] for r in rows))
        if kind == "ev":
            at_budget = [max((f for f in r["curve"][:budget] if f is not None), default=math.nan) for r in rows]
            best_all, held = at_budget, _mean_sd([r["heldout"] for r in rows])
            startup_cell = f"{startup:.1f} (once, shared)"
        else:
            at_budget = [r[f"best_at_{budget}"] for r in rows]
            best_all = [r["best"] for r in rows]
            held = (f"{_mean_sd([r.get('own_model_heldout') for r in rows])} (its bf16 model); "
                    f"{_mean_sd([r.get('fp32_recipe_heldout') for r in rows])} (its recipe, fp32)")
            startup_cell = _mean_sd([r["startup_s"] for r in rows], "{:.1f}")
        cells = [label, len(rows), _mean_sd([r["evaluations"] for r in rows], "{:.0f}"),
                 _mean_sd([r["search_s"] for r in rows], "{:.1f}"), startup_cell,
                 f"**{_mean_sd(search_only, '{:.0f}')}**", _mean_sd(with_startup, "{:.0f}"),
                 _mean_sd([r["worker_cpu_ms"] for r in rows], "{:.0f}"), _mean_sd([r["controller_cpu_ms"] for r in rows], "{:.0f}"),
                 _mean_sd(at_budget),
                 _mean_sd(best_all), held, _mean_sd([r["load_before"] for r in rows], "{:.1f}")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    ratios = {}
    mk = rates.get(groups[-1][0]) if peers else None
    if mk:
        for label, (so, ws, cpu) in rates.items():
            if label != groups[-1][0]:
                ratios[label] = {"search_only": so / mk[0], "with_startup": ws / mk[1], "worker_cpu": mk[2] / cpu}
    return "\n".join(lines), ratios


def report(data: dict, out: Path) -> str:
    md, ratios = summarize(data)
    data["ratios_vs_mergekit_evolve"] = ratios
    lines = [f"evomerge vs mergekit-evolve 0.1.5 on the tiny zoo (llama: 4 layers, d=128; arith + rev specialists), "
             f"tasks zoo_arith + zoo_rev (200 examples per split, exact match, fitness split during the search), "
             f"budget {data['budget']} evaluations, {data['workers']} CPU workers with 1 thread each, lm-eval batch size "
             f"{data['batch_size']}, one script run on {data['machine']}. Mean ± sd over runs. "
             f"Command: `{data['command']}`.", "", md, ""]
    if data.get("peer_skipped"):
        lines.append(f"mergekit-evolve: skipped ({data['peer_skipped']}).")
    for label, r in ratios.items():
        lines.append(f"- {label} vs mergekit-evolve: **{r['search_only']:.1f}x** candidates per minute over the search "
                     f"alone, {r['with_startup']:.1f}x including start-up; {r['worker_cpu']:.1f}x less worker CPU time per "
                     f"candidate.")
    if data["peer"]:
        p = data["peer"][0]
        lines += ["", f"mergekit-evolve command (inside the driver, after `ray.init(num_cpus={data['workers']}, "
                      f"num_gpus={data['workers']})`, PYTHONPATH=<shim>): `{p['command']}`. Its pycma seeds from the clock "
                      f"(seeds seen: {', '.join(str(r['cma_seed']) for r in data['peer'])}); popsize {p['popsize']}, so "
                      f"`--max-fevals {data['budget']}` runs whole generations past the budget plus fmin2's final "
                      f"evaluation of the mean (generations: {p['generations']}): candidates per minute count every "
                      f"evaluation; `best fitness @{data['budget']}` is the best of its first {data['budget']}.",
                  "", "Held-out of mergekit-evolve's best: (1) its saved final model (mergekit's bf16 merge of its best "
                      "genotype), loaded in bf16 as its evaluator loads candidates, scored by evomerge's scorer; on the "
                      "fitness split that gives " + ", ".join(f"{r['own_model_fitness']:.4f}" for r in data["peer"]) +
                      " against its own best scores " + ", ".join(f"{r['best']:.4f}" for r in data["peer"]) +
                      " (the two scorers agree); (2) its best genotype decoded into evomerge's recipe (mergekit's "
                      "decoding, `bench_search.MergekitEvolveController.gene_values`) and built by an evomerge worker in "
                      "fp32: fitness " + ", ".join(f"{r['fp32_recipe_fitness']:.4f}" for r in data["peer"]) + "."]
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in data["versions"].items()) + "."]
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_peer.md").write_text(text)
    (out / "bench_peer.json").write_text(json.dumps(data, indent=1))
    return text


# --- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()  # before evomerge, torch, Ray are imported: its start-up counts from here
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=int, default=64, help="evaluations per run")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=3, help="evomerge runs per optimizer (seeds 0..n-1)")
    parser.add_argument("--peer-runs", type=int, default=3, help="mergekit-evolve runs (its CMA-ES seeds from the clock)")
    parser.add_argument("--batch-size", type=int, default=64, help="lm-eval batch size for mergekit-evolve "
                        "(evomerge's evaluation.batch_size default is 64)")
    parser.add_argument("--mk-venv", type=Path, default=Path(os.environ.get("EVOMERGE_MK_VENV", DEFAULT_VENV)),
                        help=f"mergekit-evolve's side venv (default: $EVOMERGE_MK_VENV or {DEFAULT_VENV})")
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp/mkpeer/bench_logs"), help="mergekit-evolve's logs")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results")
    parser.add_argument("--zoo", type=Path, default=None, help="zoo cache folder (default: the test cache)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)

    sys.path[:0] = [str(REPO), str(REPO / "scripts"), str(REPO / "tests")]
    import evomerge
    from zoo_fixtures import zoo_cache_dir

    from evomerge.zoo import build_zoo

    zoo = build_zoo(args.zoo or zoo_cache_dir(), family="llama", progress=None)
    venv_python = args.mk_venv / "bin" / "python"
    skipped = None if venv_python.exists() else f"no side venv at {args.mk_venv} (set --mk-venv or EVOMERGE_MK_VENV)"
    if skipped:
        print(f"mergekit-evolve: {skipped}; only evomerge runs", flush=True)
    import lm_eval
    import ray
    import torch
    import transformers

    data = {"budget": args.budget, "workers": args.workers, "batch_size": args.batch_size,
            "command": " ".join(["python scripts/bench_peer.py", *(argv if argv is not None else sys.argv[1:])]),
            "machine": f"{platform.node()} ({os.cpu_count()} CPUs, {platform.processor() or platform.machine()})",
            "versions": {"evomerge": evomerge.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                         "lm_eval": lm_eval.__version__, "ray": ray.__version__},
            "peer_skipped": skipped, "peer": []}
    with tempfile.TemporaryDirectory(prefix="bench_peer-") as tmp:
        tmp = Path(tmp)
        data["evomerge"], data["evomerge_startup_s"], data["evomerge_pool_startup_s"] = run_evomerge(zoo, args, started, tmp)
        if not skipped:
            folder = tmp / "peer"
            write_peer_inputs(folder, zoo, REPO / "evaluators" / "zoo")
            args.log_dir.mkdir(parents=True, exist_ok=True)
            for i in range(args.peer_runs):
                peer = run_peer(args.mk_venv, folder, args.budget, args.workers, args.batch_size, args.log_dir / f"run{i}.log")
                score_peer_best(peer, zoo, args.budget, tmp / f"decode{i}")
                data["peer"].append(peer)
                print(f"mergekit-evolve run {i}: {peer['evaluations']} evals in {peer['search_s']:.1f}s "
                      f"(+{peer['startup_s']:.1f}s start-up), best {peer['best']:.4f}, its model held-out "
                      f"{peer['own_model_heldout']:.4f}, recipe fp32 held-out {peer['fp32_recipe_heldout']:.4f}", flush=True)
            data["versions"].update({f"{k} (side venv)": v for k, v in data["peer"][0]["versions"].items()})
            data["peer_genome_yaml"] = (folder / "genome.yaml").read_text()
    data["load_avg_end"] = os.getloadavg()
    print(report(data, args.out))
    print(f"wrote {args.out}/bench_peer.{{md,json}}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--peer-driver":  # inside mergekit-evolve's venv
        sys.exit(peer_driver(sys.argv[2], int(sys.argv[3]), sys.argv[4:]))
    sys.exit(main())
