"""Per-candidate in-memory merge build time, as a worker builds it, against a memory-traffic bound and mergekit.

    python scripts/bench_merge.py                      # ~200M-parameter Llama shape, 3 sources, 2 layer groups
    python scripts/bench_merge.py --mergekit-python /tmp/mkvenv/bin/python
    python scripts/bench_merge.py --threads 1 --cpu-time     # one thread, CPU time: steady on a busy machine

A synthetic Llama-shaped model (scripts/make_synthetic_models.py shapes; random weights, nothing is
downloaded) and three perturbed sources are made in memory. The build is the worker's: base tensors and
fp32 task vectors resident, `merge_named` per tensor writing into a preallocated output tensor of the
base's dtype (bf16), with one `MergeCache` for the whole run (as a worker keeps one) and without.
On the CPU the merge runs the fused kernels (evomerge/merge/_fused.py; "first" includes compiling
them when numba's cache under ~/.cache/evomerge/kernels is cold). Each
candidate draws new parameters per layer group, so nothing but the cache carries over. "first" is a
method's first cached build, which fills what that method needs and is not yet there (ties sorts each
task vector, which breadcrumbs then reuses; dare_ties hashes each entry's uniform and orders the
entries by it, for its L1 lookup; della ranks rows). The bound is one pass in the same run that reads
every task vector once and writes the output: the faster of torch's `out.copy_(deltas.sum(0))` and
a one-pass kernel (`traffic_bound`, no fp32 temporary), timed after every cached build and at the
end (median). A merge also reads the base, so its floor is above the bound: 16 vs 14 bytes per entry
with three fp32 task vectors and bf16 tensors.
Times are medians over repeats; on a busy machine, `--threads 1` gives steadier numbers, and
`--threads 1 --cpu-time` steadier still: each time is this process's CPU time, which other processes
on the machine do not add to (it still counts what they cost in cache misses).

mergekit column: mergekit 0.1.5's own merge method (the same `merge_method` object mergekit-yaml runs)
called per tensor on the same in-memory tensors (fp32 base and sources, dtype float32), with each
tensor's layer-group parameters, in a subprocess of a separate Python that has mergekit; mergekit is
never imported here. Set that environment up once (torch pinned, or pip pulls a CUDA build):

    python3 -m venv /tmp/mkvenv
    /tmp/mkvenv/bin/pip install torch==2.13.0 'mergekit==0.1.5'

Ratios: build / bound (how far from streaming the data once) and mergekit / ours (cached). Random
methods (dare_ties, della) draw different random masks in mergekit; their times still compare.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_synthetic_models import llama_config, llama_shapes, synthetic_tensor  # noqa: E402

METHODS = ("ties", "dare_ties", "breadcrumbs", "della")
N_GROUPS = 2
clock = time.perf_counter  # time.process_time with --cpu-time


def candidate_params(method: str, rng: torch.Generator, n_sources: int) -> list[dict]:
    """One parameter mapping per layer group, drawn inside each method's valid range."""
    def draw(low: float, high: float, n: int | None = None) -> float | list[float]:
        values = (low + (high - low) * torch.rand(n or 1, generator=rng)).tolist()
        values = [round(v, 3) for v in values]
        return values if n else values[0]

    groups = []
    for _ in range(N_GROUPS):
        params = {"weight": draw(0.2, 1.0, n_sources), "density": draw(0.2, 0.8, n_sources), "lambda_": draw(0.8, 1.2)}
        if method == "breadcrumbs":
            params["gamma"] = draw(0.0, 0.05, n_sources)
        if method == "della":
            params["density"] = draw(0.3, 0.7, n_sources)
            params["epsilon"] = draw(0.05, 0.2, n_sources)
        groups.append(params)
    return groups


def make_inputs(n_params: float, n_sources: int) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The config, bf16 base tensors and fp32 task vectors (E, *S), as a worker holds them."""
    from evomerge.models.build import task_vectors

    config = llama_config(n_params)
    base, deltas = {}, {}
    for name, shape in llama_shapes(config):
        base32 = synthetic_tensor(name, shape, 0, torch.float32)
        base[name] = base32.to(torch.bfloat16)
        sources = [synthetic_tensor(name, shape, s, torch.bfloat16, base32) for s in range(1, n_sources + 1)]
        deltas[name] = task_vectors(base[name], sources)
    return config, base, deltas


def time_build(recipe, base, deltas, out, groups, cache) -> float:
    """The worker's build: each merged tensor written into the live tensor (and checked finite)."""
    from evomerge.models.build import check_recipe, merge_named

    started = clock()
    spec = check_recipe(recipe)
    for name, target in out.items():
        merge_named(recipe, spec, name, groups[name], base[name], deltas[name], cache=cache, out=target)
    return clock() - started


def time_bound(deltas, out) -> float:
    """The faster of two passes that read every task vector once and write the output: torch's sum
    (which also writes and reads an fp32 temporary) and a one-pass kernel with no temporary."""
    from evomerge.merge._fused import kernels

    started = clock()
    for name, target in out.items():
        target.copy_(deltas[name].sum(0))
    torch_s = clock() - started
    started = clock()
    for name, target in out.items():
        flat = deltas[name].reshape(len(deltas[name]), -1).numpy()
        kernels(len(flat)).traffic_bound(tuple(flat), target.view(-1).view(torch.uint16).numpy())
    return min(torch_s, clock() - started)


def bench_ours(args, config, base, deltas) -> tuple[dict[str, dict[str, float]], dict[str, int], dict[str, list]]:
    from evomerge.models.build import MergeCache
    from evomerge.models.layout import LayerGroups, group_of_each
    from evomerge.recipe import Recipe

    groups = group_of_each(list(base), LayerGroups(config["num_hidden_layers"], N_GROUPS))
    out = {n: torch.empty_like(t) for n, t in base.items()}
    rng = torch.Generator().manual_seed(0)
    rows, candidates, bounds = {}, {}, []
    cache = MergeCache()  # one per worker, whatever the method: sorted magnitudes serve ties and breadcrumbs
    for method in args.methods:
        cands = [candidate_params(method, rng, args.sources) for _ in range(args.repeats + 1)]
        candidates[method] = cands
        recipes = [Recipe(method, "base", tuple(f"s{i}" for i in range(args.sources)), tuple(g), seed=1) for g in cands]
        first = time_build(recipes[0], base, deltas, out, groups, cache)
        cached = []
        for r in recipes[1:]:  # a bound next to each build, so load that comes and goes hits both
            cached.append(time_build(r, base, deltas, out, groups, cache))
            bounds.append(time_bound(deltas, out))
        plain = [time_build(r, base, deltas, out, groups, None) for r in recipes[1 : 1 + args.uncached_repeats]]
        rows[method] = {"first": first, "cached": statistics.median(cached), "uncached": statistics.median(plain) if plain else float("nan")}
        print(f"  {method}: first {first:.2f}s, cached {rows[method]['cached']:.2f}s, uncached {rows[method]['uncached']:.2f}s", flush=True)
    del cache
    rows["_bound"] = {"bound": statistics.median(bounds + [time_bound(deltas, out) for _ in range(3)])}
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
    for method, cands in spec["candidates"].items():
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


def print_table(rows: dict, mk: dict[str, float]) -> None:
    bound = rows["_bound"]["bound"]
    print(f"\nmemory-traffic bound (read all task vectors once, write the output): {bound:.3f}s")
    head = "| method | first build s | cached s | uncached s | cached / bound | uncached / bound | mergekit s | mergekit / ours |"
    print(head)
    print("|" + " --- |" * (head.count("|") - 1))
    for method, r in rows.items():
        if method.startswith("_"):
            continue
        mk_s = mk.get(method)
        mk_cells = f"{mk_s:.2f} | {mk_s / r['cached']:.1f}x" if mk_s else "- | -"
        print(f"| {method} | {r['first']:.2f} | {r['cached']:.2f} | {r['uncached']:.2f} | "
              f"{r['cached'] / bound:.1f}x | {r['uncached'] / bound:.1f}x | {mk_cells} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=2e8, help="model size in parameters (default 2e8)")
    parser.add_argument("--sources", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--repeats", type=int, default=1, help="cached candidates per method after the first (median)")
    parser.add_argument("--uncached-repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--cpu-time", action="store_true", help="time by this process's CPU time (needs --threads 1)")
    parser.add_argument("--mergekit-python", help="a Python with mergekit 0.1.5 (see the docstring)")
    parser.add_argument("--mergekit-repeats", type=int, default=1)
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
    config, base, deltas = make_inputs(args.params, args.sources)
    n = sum(t.numel() for t in base.values())
    print(f"inputs: {n / 1e6:.0f}M parameters, {config['num_hidden_layers']} layers, {args.sources} sources, "
          f"{N_GROUPS} layer groups, torch threads {torch.get_num_threads()} ({time.perf_counter() - started:.0f}s to make)")
    rows, groups, candidates = bench_ours(args, config, base, deltas)
    del deltas
    mk = bench_mergekit(args, groups, candidates) if args.mergekit_python else {}
    print_table(rows, mk)
    return 0


if __name__ == "__main__":
    sys.exit(main())
