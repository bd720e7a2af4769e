"""Every benchmark script runs end to end at a tiny size, so none rots unnoticed (their numbers are not
checked here: speed belongs to the scripts' own reports, measured side by side)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from zoo_fixtures import zoo_cache_dir, zoo_hard  # noqa: F401  (zoo_hard: a fixture conftest does not import)

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str, timeout_s: int = 600) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout_s)
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_bench_merge(tmp_path: Path) -> None:
    out = run("bench_merge.py", "--params", "1e6", "--hidden", "64", "--methods", "ties", "dare_ties", "linear", "slerp",
              "--release", "HEAD", "--out", str(tmp_path / "m.md"))  # HEAD: a revision every clone has
    table = (tmp_path / "m.md").read_text()
    assert "one-pass bound" in out and "| ties | 3 |" in table and "release HEAD s" in table
    assert "nan" not in table.split("| ties | 3 |")[1].splitlines()[0]  # the child timed HEAD's ties


def test_bench_memory(tmp_path: Path) -> None:
    out = run("bench_memory.py", "--params", "1e6", "--hidden", "64", "--builds", "1", "--rounds", "2", "--modes", "mmap", "fp32",
              "--dir", str(tmp_path / "models"), "--out", str(tmp_path / "mem.md"))
    text = (tmp_path / "mem.md").read_text()
    assert "| mmap |" in text and "fp32 task vectors (before)" in text and "native takes" in out
    assert "Build time per round" in text  # two rounds: each mode timed in a second process


def test_bench_sched() -> None:
    out = run("bench_sched.py", "--workers", "4", "--mults", "1", "--low", "0.01", "--high", "0.03",
              "--trials-per-worker", "2", "--sections", "generations", "simulated", "--sim-evals", "16", "--sim-seeds", "1")
    assert "simulated" in out


def test_bench_search(zoo_llama, tmp_path: Path) -> None:
    # past one generation (popsize 10), where the controller's next one is asked; evomerge's own CMA-ES
    # runs in test_bench_search_hard and in every search test
    run("bench_search.py", "--budget", "11", "--seeds", "1", "--methods", "mergekit", "--workers", "1",
        "--out", str(tmp_path), "--zoo", str(zoo_cache_dir()))
    assert (tmp_path / "bench_search.md").is_file()


def test_bench_search_hard(zoo_hard, tmp_path: Path) -> None:
    # the hard zoo's tasks (generate_until, exact_match), the default CMA-ES and GP (past its 4 random
    # start-up trials). Its own file names: the tiny zoo's results are not overwritten
    run("bench_search.py", "--family", "hard", "--budget", "5", "--seeds", "1", "--methods", "cmaes", "gp",
        "--workers", "1", "--out", str(tmp_path), "--zoo", str(zoo_cache_dir()))
    text = (tmp_path / "bench_search_hard.md").read_text()
    assert text.startswith("Hard zoo") and "| Optuna GP |" in text and "hand-tuned reference" in text
    assert not (tmp_path / "bench_search.md").exists()


def test_bench_throughput(zoo_llama, tmp_path: Path) -> None:
    run("bench_throughput.py", "--trials", "4", "--workers", "1", "--out", str(tmp_path), "--zoo", str(zoo_cache_dir()))
    assert list(tmp_path.glob("bench_throughput*"))


def test_bench_peer_without_its_side_venv(zoo_llama, tmp_path: Path) -> None:
    out = run("bench_peer.py", "--budget", "4", "--seeds", "1", "--peer-runs", "0", "--workers", "1",
              "--mk-venv", str(tmp_path / "no-venv"), "--out", str(tmp_path), "--zoo", str(zoo_cache_dir()))
    assert "only evomerge runs" in out


def test_bench_spaces(zoo_llama, tmp_path: Path) -> None:
    # layer swap, DFS and the PS+DFS chain have their own end-to-end tests (test_dataflow_e2e)
    run("bench_spaces.py", "--trials", "4", "--workers", "1", "--spaces", "ps", "--out", str(tmp_path / "spaces.md"))
    assert "| parameter space" in (tmp_path / "spaces.md").read_text()
