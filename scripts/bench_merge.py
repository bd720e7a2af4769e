"""Per-candidate in-memory merge build time, as a worker builds it, against the one-pass bound and mergekit.

    python scripts/bench_merge.py                      # ~200M-parameter Llama shape, 3 sources, 2 layer groups
    python scripts/bench_merge.py --mergekit-python /tmp/mkvenv/bin/python
    python scripts/bench_merge.py --threads 1 --cpu-time     # one thread, CPU time: steady on a busy machine
    python scripts/bench_merge.py --out docs/results/bench_merge.md   # also write the table there
    python scripts/bench_merge.py --release 4039bd1    # also the last release before native sources, same run

A synthetic Llama-shaped model (scripts/make_synthetic_models.py shapes; random weights, nothing is
downloaded) and three perturbed bf16 sources are made in memory. The build is the worker's: base and
sources resident in their dtype (bf16), `merge_named` per tensor writing into a preallocated bf16 output
tensor, with the task vectors formed where the kernels use them, never materialised. Two settings,
labelled: the default (`workers.merge_cache: false`: the worker keeps only KB per tensor, its
`MergeCache(keep_sorted=False)`, filled by two untimed builds of each method) and with the cache
(`merge_cache: true`, one `MergeCache` for the whole run, as a worker keeps one; "first" is a method's
first cached build, which fills what it needs: ties sorts each task vector, which breadcrumbs then
reuses; dare_* order entries by uniform; della ranks rows). On the CPU the task-vector methods run the fused kernels
(evomerge/merge/_fused.py; a first build also compiles them when numba's cache under
~/.cache/evomerge/kernels is cold). Each candidate draws new parameters per layer group.

The bound is the one-pass kernel `traffic_bound` in the same run: it reads the base and every source
once in their dtype and writes the output once, 2(E + 2) bytes per entry in bf16 (10 for three
sources): no merge can move less. It is timed after every cached build and at the end (median).
"fp32 task vectors, same kernels" times this checkout's code on resident (E, *S) fp32 task vectors (the
previous worker's inputs: 2 + 4E bytes per entry read; default settings, its own light cache), to show
what reading native sources changes. `--release REV` also times revision REV's own worker build (its code, its inputs as it
held them; scripts/release_baseline.py, in a child process) for the same candidates; 4039bd1 is the last
revision before native sources. The default, fp32 and release builds alternate, so load that comes and
goes hits them alike: machines here vary by 2x from day to day, so only numbers from one run compare.

Times are medians over repeats; on a busy machine, `--threads 1` gives steadier numbers, and
`--threads 1 --cpu-time` steadier still: each time is this process's CPU time, which other processes
on the machine do not add to (it still counts what they cost in cache misses).

mergekit column: mergekit 0.1.5's own merge method (the same `merge_method` object mergekit-yaml runs)
called per tensor on the same in-memory tensors (fp32 base and sources, dtype float32), with each
tensor's layer-group parameters, in a subprocess of a separate Python that has mergekit; mergekit is
never imported here. Set that environment up once (torch pinned, or pip pulls a CUDA build):

    python3 -m venv /tmp/mkvenv
    /tmp/mkvenv/bin/pip install torch==2.13.0 'mergekit==0.1.5'

Random methods (dare_*, della*) draw different random masks in mergekit; their times still compare.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_synthetic_models import llama_config, llama_shapes, synthetic_tensor  # noqa: E402
from release_baseline import PREVIOUS_RELEASE, ReleaseBaseline  # noqa: E402

METHODS = ("task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
           "della_linear", "linear", "slerp", "model_stock", "consensus")
N_GROUPS = 2
clock = time.perf_counter  # time.process_time with --cpu-time
# Where each parameter is drawn: inside its valid range, where merges are useful.
WINDOWS = {"weight": (0.2, 1.0), "density": (0.3, 0.7), "lambda_": (0.8, 1.2), "gamma": (0.0, 0.05),
           "epsilon": (0.05, 0.2), "t": (0.2, 0.8), "tall_lambda": (0.2, 0.6), "k": (2.0, 2.0)}


def n_sources_for(method: str, n_sources: int) -> int:
    from evomerge.merge import get_method

    return min(n_sources, get_method(method).max_models or n_sources)


def candidate_params(method: str, rng: torch.Generator, n_sources: int) -> list[dict]:
    """One parameter mapping per layer group, drawn inside each method's valid range."""
    from evomerge.merge import get_method

    def draw(low: float, high: float, n: int | None = None) -> float | list[float]:
        values = (low + (high - low) * torch.rand(n or 1, generator=rng)).tolist()
        values = [round(v, 3) for v in values]
        return values if n else values[0]

    spec = get_method(method)
    n = n_sources_for(method, n_sources)
    return [{p.name: draw(*WINDOWS[p.name], n if p.per_model else None) for p in spec.params} for _ in range(N_GROUPS)]


def make_inputs(n_params: float, n_sources: int, hidden: int = 1024) -> tuple[dict, dict[str, torch.Tensor], dict[str, list[torch.Tensor]]]:
    """The config, bf16 base tensors and bf16 source tensors, as a worker holds them."""
    config = llama_config(n_params, hidden=hidden)
    base, sources = {}, {}
    for name, shape in llama_shapes(config):
        base32 = synthetic_tensor(name, shape, 0, torch.float32)
        base[name] = base32.to(torch.bfloat16)
        sources[name] = [synthetic_tensor(name, shape, s, torch.bfloat16, base32) for s in range(1, n_sources + 1)]
    return config, base, sources


def time_build(recipe, base, inputs, out, groups, cache) -> float:
    """The worker's build: each merged tensor written into the live tensor (and checked finite).
    inputs[name]: the sources (a list, native) or materialised fp32 task vectors (a tensor)."""
    from evomerge.merge import TaskVectors
    from evomerge.models.build import check_recipe, merge_named

    n = len(recipe.sources)
    started = clock()
    spec = check_recipe(recipe)
    for name, target in out.items():
        given = inputs[name]
        # fp32 task vectors come sliced to n once by the caller: the same tensor object each time, as a
        # light cache knows its tensors by identity
        deltas = TaskVectors(base[name], given[:n]) if isinstance(given, list) else given
        merge_named(recipe, spec, name, groups[name], base[name], deltas, cache=cache, out=target)
    return clock() - started


def time_bound(base, sources, out, n: int) -> float:
    """One pass that reads the base and n sources once, in their dtype, and writes the output."""
    from evomerge.merge._deltas import array_of
    from evomerge.merge._fused import kernels

    started = clock()
    for name, target in out.items():
        rows = tuple(array_of(s) for s in sources[name][:n])
        kernels(n).traffic_bound(rows, array_of(base[name]), array_of(target))
    return clock() - started


def bench_ours(args, config, base, sources, baseline=None) -> tuple[dict[str, dict[str, float]], dict[str, int], dict[str, list]]:
    from evomerge.merge import TaskVectors
    from evomerge.models.build import MergeCache, task_vectors
    from evomerge.models.layout import LayerGroups, group_of_each
    from evomerge.recipe import Recipe

    groups = group_of_each(list(base), LayerGroups(config["num_hidden_layers"], N_GROUPS))
    out = {n: torch.empty_like(t) for n, t in base.items()}
    rng = torch.Generator().manual_seed(0)
    rows, candidates, bounds = {}, {}, {}
    cache = MergeCache()  # one per worker, whatever the method: sorted magnitudes serve ties and breadcrumbs
    light, light_fp32 = MergeCache(keep_sorted=False), MergeCache(keep_sorted=False)  # what default workers keep
    fp32 = {n: task_vectors(base[n], sources[n]) for n in base} if args.compare_fp32 else None
    fp32_of = {}  # the first n task vectors per tensor, sliced once: a light cache knows its tensors by identity
    for method in args.methods:
        n = n_sources_for(method, args.sources)
        if fp32 and n not in fp32_of:
            fp32_of[n] = {name: deltas[:n] for name, deltas in fp32.items()}
        cands = [candidate_params(method, rng, args.sources) for _ in range(args.repeats + 1)]
        candidates[method] = cands
        recipes = [Recipe(method, "base", tuple(f"s{i}" for i in range(n)), tuple(g), seed=1) for g in cands]
        first = time_build(recipes[0], base, sources, out, groups, cache)
        cached = []
        for r in recipes[1:]:  # a bound next to each build, so load that comes and goes hits both
            cached.append(time_build(r, base, sources, out, groups, cache))
            bounds.setdefault(n, []).append(time_bound(base, sources, out, n))
        plain, old, release = [], [], []
        for _ in range(2):  # untimed: fill the light caches (DARE's hash-bucket sums come with a second build)
            time_build(recipes[0], base, sources, out, groups, light)
            if fp32:
                time_build(recipes[0], base, fp32_of[n], out, groups, light_fp32)
        for r, params in zip(recipes[1 : 1 + args.uncached_repeats], cands[1:]):  # the paths alternate: load hits all alike
            plain.append(time_build(r, base, sources, out, groups, light))
            if fp32:
                old.append(time_build(r, base, fp32_of[n], out, groups, light_fp32))
            if baseline:
                release.append(baseline.build(method, n, params))
        rows[method] = {"n": n, "first": first, "cached": statistics.median(cached), "uncached": statistics.median(plain),
                        "fp32": statistics.median(old) if old else float("nan"),
                        "release": statistics.median(release) if release and None not in release else float("nan")}
        print(f"  {method}: first {first:.2f}s, cached {rows[method]['cached']:.2f}s, default {rows[method]['uncached']:.2f}s"
              + (f", fp32 task vectors {rows[method]['fp32']:.2f}s" if old else "")
              + (f", {baseline.rev} {rows[method]['release']:.2f}s" if release else ""), flush=True)
    del cache, light, light_fp32, fp32, fp32_of
    for n in bounds:
        bounds[n] += [time_bound(base, sources, out, n) for _ in range(3)]
    rows["_bound"] = {n: statistics.median(b) for n, b in bounds.items()}
    return rows, groups, candidates


def bench_mergekit(args, groups: dict[str, int], candidates: dict[str, list]) -> dict[str, float]:
    spec = {"params": args.params, "sources": args.sources, "groups": groups, "candidates": candidates,
            "repeats": args.mergekit_repeats}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    cmd = [args.mergekit_python, __file__, "--mergekit-child", f.name, "--threads", str(torch.get_num_threads())]
    cmd += ["--cpu-time"] if args.cpu_time else []
    done = subprocess.run(cmd, capture_output=True, text=True)
    Path(f.name).unlink()
    if done.returncode != 0:
        print(f"mergekit run failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}", file=sys.stderr)
        return {}
    return json.loads(done.stdout.strip().splitlines()[-1])


def mergekit_child(spec_file: str) -> None:
    """Runs under the mergekit Python: rebuild the same tensors, time mergekit's merge method per tensor."""
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    spec = json.loads(Path(spec_file).read_text())
    config = llama_config(spec["params"])
    tensors = {}
    for name, shape in llama_shapes(config):
        tensors[name] = [synthetic_tensor(name, shape, s, torch.bfloat16).float() for s in range(spec["sources"] + 1)]
    times = {}
    known = getattr(registry, "REGISTERED_MERGE_METHODS", None) or registry._METHODS  # the name moved between 0.1.5 builds
    for method, cands in spec["candidates"].items():
        if method not in known:
            continue
        merge = registry.get(method)
        runs = []
        for groups_params in cands[1 : 1 + spec["repeats"]]:
            mk_params = [{("lambda" if k == "lambda_" else k): v for k, v in g.items()} for g in groups_params]
            started = clock()
            for name, group in spec["groups"].items():
                inputs = TensorGroup.from_tensors(tensors[name], base_index=0)
                merge([inputs], parameters=mk_params[group], dtype=torch.float32)
            runs.append(clock() - started)
        times[method] = statistics.median(runs)
        print(f"  mergekit {method}: {times[method]:.2f}s", file=sys.stderr, flush=True)
    print(json.dumps(times))


def table(rows: dict, mk: dict[str, float], release: str | None) -> str:
    bounds = rows["_bound"]
    lines = [f"one-pass bound (read base and E sources once in bf16, write the output; 2(E + 2) bytes per entry): "
             + ", ".join(f"{b:.3f}s for E = {n}" for n, b in sorted(bounds.items())), ""]
    head = ("| method | E | default (no cache) s | default / bound | fp32 task vectors, same kernels s | "
            f"release {release or '-'} s | with cache s | "
            "with cache / bound | first cached build s | mergekit s | mergekit / ours (default) |")
    lines += [head, "|" + " --- |" * (head.count("|") - 1)]
    for method, r in rows.items():
        if method.startswith("_"):
            continue
        bound = bounds[r["n"]]
        mk_s = mk.get(method)
        mk_cells = f"{mk_s:.2f} | {mk_s / r['uncached']:.1f}x" if mk_s else "- | -"
        lines.append(f"| {method} | {r['n']} | {r['uncached']:.3f} | {r['uncached'] / bound:.1f}x | {r['fp32']:.3f} | "
                     f"{r['release']:.3f} | {r['cached']:.3f} | {r['cached'] / bound:.1f}x | {r['first']:.2f} | {mk_cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=2e8, help="model size in parameters (default 2e8)")
    parser.add_argument("--sources", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size (default 1024; small for a smoke run)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--repeats", type=int, default=1, help="cached candidates per method after the first (median)")
    parser.add_argument("--uncached-repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--cpu-time", action="store_true", help="time by this process's CPU time (needs --threads 1)")
    parser.add_argument("--mergekit-python", help="a Python with mergekit 0.1.5 (see the docstring)")
    parser.add_argument("--mergekit-repeats", type=int, default=1)
    parser.add_argument("--no-compare-fp32", dest="compare_fp32", action="store_false",
                        help="skip timing the previous path (fp32 task vectors resident)")
    parser.add_argument("--release", metavar="REV", help=f"also time git revision REV's worker build in the same run, "
                        f"alternating with ours (scripts/release_baseline.py; {PREVIOUS_RELEASE}: the last before native sources)")
    parser.add_argument("--out", type=Path, help="also write the command and the table to this markdown file")
    parser.add_argument("--mergekit-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time:
        if torch.get_num_threads() != 1:
            parser.error("--cpu-time counts this process's CPU time, as one thread's; add --threads 1")
        global clock
        clock = time.process_time
    if args.mergekit_child:
        mergekit_child(args.mergekit_child)
        return 0
    started = time.perf_counter()
    config, base, sources = make_inputs(args.params, args.sources, args.hidden)
    n = sum(t.numel() for t in base.values())
    heading = (f"inputs: {n / 1e6:.0f}M parameters, {config['num_hidden_layers']} layers, {args.sources} bf16 sources, "
               f"{N_GROUPS} layer groups, torch threads {torch.get_num_threads()}")
    print(f"{heading} ({time.perf_counter() - started:.0f}s to make)")
    baseline = None
    if args.release:
        baseline = ReleaseBaseline(args.release, args.params, args.sources, args.hidden, torch.get_num_threads(), args.cpu_time)
        print(f"release {args.release}: its worker's inputs made in a child process", flush=True)
    try:
        rows, groups, candidates = bench_ours(args, config, base, sources, baseline)
    finally:
        if baseline:
            baseline.close()
    mk = bench_mergekit(args, groups, candidates) if args.mergekit_python else {}
    text = table(rows, mk, args.release)
    print("\n" + text)
    if args.out:
        command = "python scripts/bench_merge.py " + " ".join(argv if argv is not None else sys.argv[1:])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"# scripts/bench_merge.py ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores)\n\n"
                            f"`{command}`\n\n{heading}\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
