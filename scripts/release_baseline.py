"""Another git revision's worker build, timed beside this checkout's in the same run (for bench_merge.py).

Machines here differ from day to day (the same one-pass bound took 0.031 s one day and 0.068 s another),
so a release's time is only comparable when measured in the same run. This module checks the revision's
`evomerge/` out into a temporary folder (`git archive`) and starts a child Python with that folder first on
its path: the child makes the same synthetic inputs, holds them as that revision's worker held them
(`evomerge.models.build.task_vectors`: fp32 task vectors resident, for the revisions before native
sources), and times that revision's `merge_named` per tensor for the candidates the parent sends, one
build at a time, so the parent can alternate its own builds with the child's.

Memory: the child holds base, output and E fp32 task vectors: 2 + 2 + 4E bytes per parameter.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PREVIOUS_RELEASE = "4039bd1"  # the last commit before native sources (b7aa066): what a worker ran when issue 12 was filed


class ReleaseBaseline:
    """A child process timing revision `rev`'s candidate builds; `build` returns seconds (or None where that
    revision refuses the method or its parameters)."""

    def __init__(self, rev: str, params: float, sources: int, hidden: int, threads: int, cpu_time: bool) -> None:
        self.rev = rev
        self._folder = tempfile.TemporaryDirectory(prefix=f"evomerge-{rev}-")
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "evomerge"], capture_output=True)
        if archive.returncode != 0:
            raise RuntimeError(f"git archive {rev} failed: {archive.stderr.decode().strip()}")
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(self._folder.name, filter="data")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([self._folder.name, os.environ.get("PYTHONPATH", "")]))
        cmd = [sys.executable, __file__, "--params", str(params), "--sources", str(sources), "--hidden", str(hidden),
               "--threads", str(threads)] + (["--cpu-time"] if cpu_time else [])
        self._child = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        ready = self._child.stdout.readline()
        if not ready.startswith("ready"):
            self.close()
            raise RuntimeError(f"revision {rev}'s child did not start (exit {self._child.poll()})")
        self._warm: set[str] = set()

    def build(self, method: str, n: int, groups: list[dict]) -> float | None:
        """Seconds for one build of this candidate (the method's first request also builds once untimed:
        that revision's kernels compile then)."""
        request = {"method": method, "n": n, "groups": groups, "warm": method not in self._warm}
        self._child.stdin.write(json.dumps(request) + "\n")
        self._child.stdin.flush()
        reply = json.loads(self._child.stdout.readline())
        self._warm.add(method)
        if "error" in reply:
            print(f"  {self.rev}: {method}: {reply['error']}", file=sys.stderr, flush=True)
            return None
        return reply["s"]

    def close(self) -> None:
        if self._child.poll() is None:
            self._child.stdin.close()
            self._child.wait(timeout=60)
        self._folder.cleanup()


def child_main(argv: list[str]) -> None:
    """Runs with the revision's evomerge first on sys.path: answer build requests from stdin, one line each."""
    import argparse

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_merge import N_GROUPS, make_inputs  # shapes and values as the parent's (no evomerge import)

    from evomerge.models.build import check_recipe, merge_named, task_vectors
    from evomerge.models.layout import LayerGroups, group_of_each
    from evomerge.recipe import Recipe

    parser = argparse.ArgumentParser()
    parser.add_argument("--params", type=float)
    parser.add_argument("--sources", type=int)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--cpu-time", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter
    config, base, sources = make_inputs(args.params, args.sources, args.hidden)
    deltas = {name: task_vectors(base[name], sources.pop(name)) for name in list(base)}  # as that worker held them
    groups = group_of_each(list(base), LayerGroups(config["num_hidden_layers"], N_GROUPS))
    out = {name: torch.empty_like(t) for name, t in base.items()}

    def build(recipe) -> float:
        started = clock()
        spec = check_recipe(recipe)
        for name, target in out.items():
            merge_named(recipe, spec, name, groups[name], base[name], deltas[name][: len(recipe.sources)], cache=None, out=target)
        return clock() - started

    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        try:
            n = request["n"]
            recipe = Recipe(request["method"], "base", tuple(f"s{i}" for i in range(n)), tuple(request["groups"]), seed=1)
            if request["warm"]:
                build(recipe)
            reply = {"s": build(recipe)}
        except Exception as exc:  # that revision may lack a method or a parameter: reported, not fatal
            reply = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    child_main(sys.argv[1:])
