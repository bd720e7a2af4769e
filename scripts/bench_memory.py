"""A worker's memory and candidate build time for each `workers.sources_on` mode, on a >= 1B-parameter model.

    python scripts/bench_memory.py                          # 1.1B Llama shape, bf16, 3 sources, CPU
    python scripts/bench_memory.py --out docs/results/bench_memory.md
    python scripts/bench_memory.py --params 5e7 --builds 1   # a quick smoke run

A synthetic Llama-shaped base and three perturbed sources (scripts/make_synthetic_models.py; random
weights, bf16, written once under --dir) are merged by real `CandidateWorker`s, each in its own process
with one torch thread, as Ray would run them. For each mode:

- private memory: the worker's anonymous resident memory (`Anonymous` in /proc/PID/smaps_rollup) after
  start-up and its builds: what it holds that no other process shares;
- node total with 2 workers: two workers started together, the sum of their proportional set sizes
  (`Pss`: a page that both map counts half in each), read while both are alive; memory-mapped sources
  in the page cache count once;
- build time: a worker's candidate build (`CandidateWorker.build`: every merged tensor written into the
  live model) for TIES and task arithmetic with 2 layer groups, default settings (no merge cache: the
  worker keeps KB per tensor), median over --builds, after one warm-up build (kernels compiled, pages
  read, the KB filled). A worker process is timed --rounds times per mode, the modes taking turns in a
  rotating order, so that a machine whose speed drifts during the run slows every mode alike; the table
  gives the median over rounds, and each round's native/fp32 ratio is listed (the two paths cannot run
  in one process at 1.1B here: see below).

On a CPU, device and host both keep private copies of base and sources in RAM (host only differs on a
GPU, where it streams tensors from host memory). "fp32 task vectors (before)" is the worker this project
had before native sources: base plus (E, *S) fp32 task vectors resident (2 + 4E bytes per parameter).
Where two workers of a mode would not fit in the memory available, the node total is computed from one
worker's measured figures (2 x private + the files once) and labelled "computed".

Targets (issue 12): in mmap mode, private memory <= 1.2 x the live model's bytes + the largest tensor's
working set (4 bytes per entry of the largest tensor: one fp32 row an eager sparsifier may form), and two
workers add no second copy of the sources; builds from native sources no slower than from fp32 task vectors.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_synthetic_models import llama_config, llama_shapes, write_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODES = ("device", "host", "mmap", "fp32")
METHOD_PARAMS = (("ties", {"weight": [0.9, 0.6, 0.7], "density": [0.4, 0.5, 0.6]}),
                 ("task_arithmetic", {"weight": [0.5, 0.4, 0.3]}))
GIB = 2**30


def ensure_models(folder: Path, params: float, n_sources: int, hidden: int = 2048) -> dict:
    """Base and sources as bf16 checkpoints under `folder` (made once), with the zoo's tokenizer."""
    import torch

    from evomerge.zoo import char_tokenizer

    config = llama_config(params, hidden=hidden)
    folder.mkdir(parents=True, exist_ok=True)
    for source in range(n_sources + 1):
        path = folder / ("base" if source == 0 else f"source{source}")
        if not (path / "config.json").is_file():
            print(f"bench_memory: writing {path}", flush=True)
            write_model(path, config, source, torch.bfloat16)
            char_tokenizer().save_pretrained(path)
    return config


def worker_main(args: argparse.Namespace) -> None:
    """One worker process: start, build, report, then wait until the parent has measured it."""
    from evomerge.config import TaskConfig
    from evomerge.recipe import Recipe
    from evomerge.runtime.messages import WorkerSetup
    from evomerge.runtime.worker import CandidateWorker, process_memory

    folder = Path(args.dir)
    sources = tuple(str(folder / f"source{i}") for i in range(1, args.sources + 1))
    setup = WorkerSetup(base=str(folder / "base"), sources=sources, tasks=(TaskConfig(name="zoo_arith", limit=1),),
                        include_paths=(str(REPO / "evaluators"),), device="cpu", threads=1,
                        sources_on="mmap" if args.mode == "fp32" else args.mode)
    started = time.perf_counter()
    worker = CandidateWorker(setup)
    native = worker.build
    build = fp32_builder(worker) if args.mode == "fp32" else native
    startup_s = time.perf_counter() - started
    times, alternating = {}, {}
    for method, params in METHOD_PARAMS:
        recipes = [Recipe(method, setup.base, sources, (params, params), seed=i) for i in range(args.builds + 1)]
        build(recipes[0])  # warm-up: kernels compiled, pages read
        times[method] = statistics.median(build(r) for r in recipes[1:])
        if args.mode == "fp32" and not (skip := interleave_skip(setup)):
            # both paths in one process, interleaved: load that comes and goes hits both
            native(recipes[0])
            pairs = [(native(r), build(r)) for r in recipes[1:] for _ in range(2)]
            alternating[method] = {"native_s": statistics.median(p[0] for p in pairs),
                                   "fp32_s": statistics.median(p[1] for p in pairs)}
    live = worker.builder(Recipe)
    if args.mode == "fp32" and not alternating:
        alternating = {"skipped": interleave_skip(setup)}
    report = {"pid": os.getpid(), "startup_s": startup_s, "build_s": times, "alternating": alternating,
              "memory": process_memory(),
              "live_bytes": sum(t.nbytes for t in live.live.values()),
              "kept_bytes": live.merge_cache.nbytes() if live.merge_cache is not None else 0,
              "n_tensors": len(live.live),
              "largest_numel": max(t.numel() for t in live.live.values()),
              "source_file_bytes": sum(f.stat().st_size for p in (setup.base, *sources) for f in Path(p).glob("*.safetensors"))}
    Path(args.report).write_text(json.dumps(report))
    while not Path(args.report + ".done").exists():  # stay alive (and resident) until measured
        time.sleep(0.2)


def interleave_skip(setup) -> str:
    """Why the interleaved comparison cannot be fair here ("" when it can): the native path reads the
    mapped files, so they must stay in the page cache beside the fp32 worker's private memory; where
    they do not fit, every native build re-reads them from disk and the ratio measures the disk."""
    from evomerge.runtime.worker import process_memory

    files = sum(f.stat().st_size for p in (setup.base, *setup.sources) for f in Path(p).glob("*.safetensors"))
    private = process_memory().get("Anonymous", 0)
    total = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                 if line.startswith("MemTotal:"))
    if private + files <= 0.9 * total:
        return ""
    return (f"not measured at this size: the fp32 worker's {private / GIB:.1f} GiB and the {files / GIB:.1f} GiB of "
            f"mapped sources exceed 90% of this machine's {total / GIB:.1f} GiB, so the native path's pages would be "
            "evicted and re-read from disk (run with a smaller --params; scripts/bench_merge.py times both paths at 195M)")


def fp32_builder(worker):
    """The previous worker's build: a private copy of the base and materialised fp32 task vectors
    resident (made here from the mapped files, tensor by tensor), as evomerge's workers held them.
    The worker's own native build keeps working beside it, for the interleaved comparison."""
    import torch

    from evomerge.models.build import MergeCache, check_recipe, group_map, merge_named, task_vectors
    from evomerge.recipe import Recipe

    live = worker.builder(Recipe)
    cache = MergeCache(keep_sorted=False)  # the KB per tensor that a default worker keeps, as the native path
    mapped = live.inputs
    base = {n: mapped.base[n].clone() for n in mapped.names}
    deltas = {n: task_vectors(base[n], mapped.sources[n]) for n in mapped.names}
    # the mapped views stay (the native build reads them): they are file pages, not private memory

    @torch.no_grad()
    def build(recipe) -> float:
        started = time.perf_counter()
        spec, groups = check_recipe(recipe), group_map(recipe, live.base)
        for name, target in live.live.items():
            merge_named(recipe, spec, name, groups[name], base[name], deltas[name], cache=cache, out=target)
        return time.perf_counter() - started

    return build


def start_workers(args: argparse.Namespace, mode: str, count: int, tag: str) -> list[dict]:
    """`count` worker processes of `mode` at once; their reports, with Pss read while all are alive."""
    reports = [Path(args.dir) / f"report-{mode}-{tag}-{i}.json" for i in range(count)]
    for r in reports:
        for stale in (r, Path(str(r) + ".done")):
            stale.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--dir", args.dir, "--sources", str(args.sources), "--builds", str(args.builds)]
    procs = [subprocess.Popen([*cmd, "--worker", mode, "--report", str(r)]) for r in reports]
    try:
        while not all(r.exists() for r in reports):
            if any(p.poll() not in (None, 0) for p in procs):
                raise RuntimeError(f"a {mode} worker failed (exit {[p.poll() for p in procs]})")
            time.sleep(0.5)
        out = [json.loads(r.read_text()) for r in reports]
        from evomerge.runtime.worker import process_memory

        for o in out:
            o["memory_all_alive"] = process_memory(o["pid"])
    finally:
        for r in reports:
            Path(str(r) + ".done").touch()
        for p in procs:
            p.wait(timeout=120)
    return out


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def measure(args: argparse.Namespace, mode: str, n_params: int) -> dict | None:
    if mode == "fp32":
        need = (2 + 2 + 4 * args.sources) * n_params * 1.1
        if need > 0.9 * available_bytes():
            print(f"bench_memory: fp32 task vectors need about {need / GIB:.1f} GiB, {available_bytes() / GIB:.1f} GiB "
                  "is available: not measured", flush=True)
            return None
    one = start_workers(args, mode, 1, "one")[0]
    private = one["memory"].get("Anonymous", 0)
    files = one["source_file_bytes"]
    row = {"mode": mode, "private": private, "live": one["live_bytes"], "largest": one["largest_numel"],
           "kept": one["kept_bytes"], "n_tensors": one["n_tensors"], "sources": args.sources,
           "build_s": one["build_s"], "startup_s": one["startup_s"], "files": files, "alternating": one["alternating"]}
    needed = 2 * private + (files if mode == "mmap" else 0)
    if needed < 0.85 * available_bytes() and not (mode == "fp32" and args.skip_two_fp32):
        two = start_workers(args, mode, 2, "two")
        row["node_two"] = sum(w["memory_all_alive"].get("Pss", 0) for w in two)
        row["node_two_how"] = "measured"
    else:
        row["node_two"] = 2 * one["memory"].get("Pss", 0) - (files if mode == "mmap" else 0)
        row["node_two_how"] = "computed"
    print(f"bench_memory: {mode}: private {private / GIB:.2f} GiB, node with 2 workers {row['node_two'] / GIB:.2f} GiB "
          f"({row['node_two_how']}), builds {row['build_s']}", flush=True)
    row["rounds"] = [row["build_s"]]
    return row


def time_rounds(args: argparse.Namespace, rows: list[dict]) -> None:
    """Rounds 2 .. --rounds: one more worker process per mode, the modes in a rotating order; each
    row's build_s becomes the median over its rounds (round 1 is the memory measurement's process)."""
    for r in range(1, args.rounds):
        for row in rows[r % len(rows):] + rows[: r % len(rows)]:
            times = start_workers(args, row["mode"], 1, f"round{r}")[0]["build_s"]
            row["rounds"].append(times)
            print(f"bench_memory: round {r + 1}: {row['mode']} builds {times}", flush=True)
    for row in rows:
        row["build_s"] = {m: statistics.median(t[m] for t in row["rounds"]) for m in row["rounds"][0]}


def table(rows: list[dict], config: dict, n_params: int) -> str:
    from evomerge.merge._numba import SUM_BUCKET_BITS

    live = rows[0]["live"]
    budget = 1.2 * live + 4 * rows[0]["largest"]
    lines = [f"{n_params / 1e9:.2f}B parameters ({config['num_hidden_layers']} layers, hidden {config['hidden_size']}), "
             f"bf16, 3 sources; live model {live / GIB:.2f} GiB; base + sources on disk {rows[0]['files'] / GIB:.2f} GiB; "
             f"one torch thread per worker; CPU.", "",
             "| sources_on | private memory per worker (GiB) | / live model | node total, 2 workers (GiB) | "
             "ties build s | task_arithmetic build s | start-up s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        name = "fp32 task vectors (before)" if r["mode"] == "fp32" else r["mode"]
        lines.append(f"| {name} | {r['private'] / GIB:.2f} | {r['private'] / live:.2f}x | {r['node_two'] / GIB:.2f} "
                     f"({r['node_two_how']}) | {r['build_s']['ties']:.2f} | {r['build_s']['task_arithmetic']:.2f} | "
                     f"{r['startup_s']:.1f} |")
    by = {r["mode"]: r for r in rows}
    if "mmap" in by:
        m = by["mmap"]
        lines += ["", f"mmap target: private {m['private'] / GIB:.2f} GiB <= 1.2 x live + 4 x largest tensor "
                  f"({budget / GIB:.2f} GiB): {'met' if m['private'] <= budget else 'NOT met'}."]
        if m["node_two_how"] == "measured":
            extra = m["node_two"] - (m["private"] + m["files"])
            lines.append(f"Two mmap workers: node total {m['node_two'] / GIB:.2f} GiB = one worker with its files "
                         f"{(m['private'] + m['files']) / GIB:.2f} GiB + {extra / GIB:.2f} GiB for the second "
                         f"(a second copy of the sources would add {m['files'] / GIB:.2f} GiB).")
    if "mmap" in by:
        m = by["mmap"]
        dare = m["n_tensors"] * m["sources"] * 8 << SUM_BUCKET_BITS
        lines += ["", f"Kept between candidates by an mmap worker (its `MergeCache(keep_sorted=False)` after the builds above; "
                  f"ties's magnitude histograms): {m['kept'] / 2**20:.1f} MiB measured, {m['kept'] / m['live']:.2e} bytes per "
                  f"live-model byte; DARE would add 8 x 2^{SUM_BUCKET_BITS} bytes per tensor per source, "
                  f"{dare / 2**20:.1f} MiB for these {m['n_tensors']} tensors (computed)."]
    if "fp32" in by and len(by["fp32"]["rounds"]) > 1:
        fp32 = by["fp32"]["rounds"]
        lines += ["", f"Build time per round (a worker process per mode per round, modes in turn; the table gives the "
                  f"median), and native / fp32 task vectors within each round:"]
        for method in fp32[0]:
            for r in (x for x in rows if x["mode"] != "fp32"):
                ratios = [a[method] / b[method] for a, b in zip(r["rounds"], fp32)]
                lines.append(f"- {method}, {r['mode']}: " + ", ".join(f"{a[method]:.2f}" for a in r["rounds"])
                             + " s against fp32 " + ", ".join(f"{b[method]:.2f}" for b in fp32)
                             + " s: " + ", ".join(f"{x:.2f}x" for x in ratios)
                             + f" (median {statistics.median(ratios):.2f}x)")
    if "fp32" in by:
        lines += ["", "Build time from native sources against fp32 task vectors, both in one process, the same "
                  "candidates interleaved, each built twice by each path:"]
        alternating = by["fp32"]["alternating"]
        if "skipped" in alternating:
            lines.append(f"- {alternating['skipped']}.")
        for method, ab in ({} if "skipped" in alternating else alternating).items():
            lines.append(f"- {method}: native {ab['native_s']:.2f} s, fp32 task vectors {ab['fp32_s']:.2f} s: "
                         f"native takes {ab['native_s'] / ab['fp32_s']:.2f}x the time.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=1.1e9)
    parser.add_argument("--sources", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=2048, help="hidden size (default 2048; small for a smoke run)")
    parser.add_argument("--builds", type=int, default=3, help="timed builds per method (median)")
    parser.add_argument("--rounds", type=int, default=3, help="worker processes timed per mode, modes in turn (median)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--dir", default=None, help="where the synthetic models live (default: the evomerge cache)")
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file")
    parser.add_argument("--measure-two-fp32", dest="skip_two_fp32", action="store_false",
                        help="also start two fp32-task-vector workers together when memory allows (slow)")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.mode = args.worker
        worker_main(args)
        return 0
    from evomerge.dirs import cache_root

    args.dir = str(Path(args.dir) if args.dir else cache_root() / "bench_memory" / f"{args.params:.3g}-{args.sources}-{args.hidden}")
    config = ensure_models(Path(args.dir), args.params, args.sources, args.hidden)
    n_params = sum(int(__import__("math").prod(s)) for _, s in llama_shapes(config))
    rows = [row for mode in args.modes if (row := measure(args, mode, n_params)) is not None]
    time_rounds(args, rows)
    text = table(rows, config, n_params)
    print("\n" + text)
    if args.out:
        command = "python scripts/bench_memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
        args.out.write_text(f"# scripts/bench_memory.py ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, "
                            f"{available_bytes() / GIB:.0f} GiB available at the end)\n\n`{command}`\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
