"""Which model sizes and source counts fit which accelerator, per `workers.sources_on` mode (computed).

    python scripts/model_sizes.py --out docs/results/model_sizes.md

Bytes per parameter of a worker's GPU, for E sources and a live model in bf16 (see config.WorkersConfig):
device 2(E + 2) (live model, base and sources resident), host and mmap 2 (the live model; base and sources
stay in host memory or the page cache and stream tensor by tensor), and the worker this project had before
native sources, 2 + 2 + 4E (live model, a base copy, fp32 task vectors). A configuration "fits" when that
is at most 90% of the GPU's memory (the rest for lm-eval's activations and the tensors in flight). Where
nothing fits one GPU, the smallest `workers.gpus_per_worker` over which the live model spreads is given.
These are computed, not measured: scripts/bench_memory.py measures the CPU side (1.1B parameters), and
scripts/gpu_check.sh measures a 7B-shaped merge on a GPU when one is lent.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

GIB = 2**30
GPUS = (("24 GiB (L4, A10, RTX 4090)", 24), ("48 GiB (L40S, A6000)", 48), ("80 GiB (A100, H100)", 80), ("139 GiB (H200)", 139))
MODELS = (("7B (Mistral-7B)", 7.24e9), ("8B (Llama-3-8B)", 8.03e9), ("13B", 13.0e9), ("34B", 34.4e9), ("70B (Llama-3-70B)", 70.6e9))
USABLE = 0.9


def bytes_per_param(mode: str, n_sources: int) -> float:
    return {"device": 2 * (n_sources + 2), "host/mmap": 2, "before": 2 + 2 + 4 * n_sources}[mode]


def cell(params: float, gib: int, n_sources: int) -> str:
    room = USABLE * gib * GIB
    fits = [m for m in ("device", "host/mmap") if bytes_per_param(m, n_sources) * params <= room]
    before = "yes" if bytes_per_param("before", n_sources) * params <= room else "no"
    if fits:
        return f"{' and '.join(fits)} (before: {before})"
    k = next((k for k in (2, 4, 8) if 2 * params / k <= room), None)
    return f"host/mmap over {k} GPUs" if k else "more than 8 GPUs"


def table(n_sources: int) -> str:
    head = f"| model, E = {n_sources} | GPU bytes: device / host or mmap / before | " + " | ".join(g for g, _ in GPUS) + " |"
    lines = [head, "|" + " --- |" * (2 + len(GPUS))]
    for name, params in MODELS:
        sizes = " / ".join(f"{bytes_per_param(m, n_sources) * params / GIB:.0f}" for m in ("device", "host/mmap", "before"))
        lines.append(f"| {name} | {sizes} GiB | " + " | ".join(cell(params, gib, n_sources) for _, gib in GPUS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    text = "\n\n".join(table(e) for e in args.sources)
    print(text)
    if args.out:
        args.out.write_text("# scripts/model_sizes.py (computed, not measured)\n\n`python scripts/model_sizes.py "
                            + " ".join(argv if argv is not None else sys.argv[1:]) + "`\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
