#!/usr/bin/env bash
# Re-run every benchmark whose numbers the README quotes, writing docs/results/ (run it on a quiet
# machine, nothing else running: the benchmarks report ratios measured side by side, and wall times).
#
#   bash scripts/refresh_results.sh              # all of them, about an hour on 2 cores
#   bash scripts/refresh_results.sh merge memory # only some (names below)
#
# bench_peer needs mergekit-evolve's side venv (see scripts/mergekit_evolve_peer.md; --mk-venv or
# EVOMERGE_MK_VENV); without it that row is skipped by the script itself. The demo table comes from
# scripts/demo_results.py (several builds from an empty cache; see its docstring), the mergekit parity
# table from scripts/mergekit_parity.py (needs mergekit 0.1.5 in a side venv): both run separately.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=docs/results
ALL=(sizes merge merge_mk memory search throughput spaces sched peer)
MK_PY=${EVOMERGE_MK_VENV:-/tmp/mkvenv}/bin/python
run() { echo "== $*" >&2; "$PY" "$@"; }
for name in "${@:-${ALL[@]}}"; do
  case "$name" in
    sizes) run scripts/model_sizes.py --out "$OUT/model_sizes.md" ;;
    merge) run scripts/bench_merge.py --repeats 5 --uncached-repeats 5 --release 4039bd1 --out "$OUT/bench_merge.md" ;;
    merge_mk)  # one thread, CPU time, against mergekit's own merge (skipped without its side venv)
      if [ -x "$MK_PY" ]; then
        run scripts/bench_merge.py --params 1e8 --threads 1 --cpu-time --repeats 3 --uncached-repeats 3 --methods ties dare_ties breadcrumbs della \
          --mergekit-python "$MK_PY" --out "$OUT/bench_merge_vs_mergekit.md"
      else echo "refresh_results: no $MK_PY: bench_merge against mergekit skipped" >&2; fi ;;
    memory) run scripts/bench_memory.py --out "$OUT/bench_memory.md" ;;
    search) run scripts/bench_search.py --out "$OUT" ;;
    throughput) run scripts/bench_throughput.py --out "$OUT" ;;
    spaces) run scripts/bench_spaces.py --out "$OUT/spaces.md" ;;
    sched) run scripts/bench_sched.py | tee "$OUT/bench_sched.txt" ;;
    peer) run scripts/bench_peer.py --out "$OUT" ;;
    *) echo "refresh_results: unknown name '$name'; known: ${ALL[*]}" >&2; exit 2 ;;
  esac
done
