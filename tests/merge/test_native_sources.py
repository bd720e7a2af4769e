"""Merging from sources in their own dtype (task vectors formed where they are used) equals merging
materialised fp32 task vectors, bit for bit: every method, cached and not, fused and eager, at real sizes."""

from __future__ import annotations

import pytest
import torch

from evomerge.merge import METHODS, TASK_VECTOR_METHODS, DeltaStats, Noise, TaskVectors, _methods, merge_tensor
from evomerge.models.build import task_vectors

from ._cases import n_models as models_for, params_for

BIG = (4100, 4100)  # 16.8M entries: over one accelerator chunk of the eager path (2^24) and many CPU chunks
MEDIUM = (1025, 1031)  # 1M entries: methods that form every task vector whole (geometric ones)


def inputs(shape: tuple[int, ...], n: int, seed: int, dtype: torch.dtype = torch.bfloat16,
           base_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and n fine-tunes of it: equal magnitudes are common (bf16), some entries unchanged."""
    g = torch.Generator().manual_seed(seed)
    base32 = torch.randn(shape, generator=g) * 0.02
    base = base32.to(base_dtype or dtype)
    sources = []
    for _ in range(n):
        s = (base32 + torch.randn(shape, generator=g) * 0.002).to(dtype)
        s.view(-1)[:7] = base.view(-1)[:7].to(dtype)  # zero task vector entries
        sources.append(s)
    return base, sources


def both_ways(name: str, base, sources, params, *, cached: bool, out_dtype=torch.bfloat16):
    spec = METHODS[name]
    native = TaskVectors(base, sources)
    reference = task_vectors(base, sources)
    results = []
    for deltas in (native, reference):
        stats = DeltaStats(deltas, keep_sorted=True) if cached and spec.uses_stats else None
        out = torch.empty(base.shape, dtype=out_dtype) if spec.writes_out else None
        merged = merge_tensor(spec, base, deltas, params, Noise(3, "w"), stats=stats, out=out)
        results.append(merged if out is None else out)
    return results


def n_models(name: str) -> int:
    return models_for(METHODS[name])


def chunked(name: str) -> bool:
    """Methods that read task vectors chunk by chunk or in compiled passes (the ones native sources change)."""
    return name in TASK_VECTOR_METHODS or name == "linear"


@pytest.mark.parametrize("cached", [False, True], ids=["uncached", "cached"])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_is_bit_identical_at_real_sizes(name: str, cached: bool) -> None:
    """16.8M entries for the task-vector family; 1M for the methods that form every task vector whole."""
    base, sources = inputs(BIG if chunked(name) else MEDIUM, n_models(name), seed=1)
    native, reference = both_ways(name, base, sources, params_for(METHODS[name], 0.4), cached=cached)
    assert torch.equal(native, reference)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_the_eager_path_in_many_chunks_is_bit_identical(name: str, monkeypatch) -> None:
    """The accelerator path (eager torch ops, chunk by chunk), here on the CPU with the kernels off."""
    monkeypatch.setattr(_methods, "MIX_CHUNK", 3000)  # about 1000 entries per model per chunk
    monkeypatch.setattr(_methods._fused, "usable", lambda *a, **k: False)
    base, sources = inputs((61, 67), n_models(name), seed=2)
    for cached in (False, True):
        native, reference = both_ways(name, base, sources, params_for(METHODS[name], 0.3), cached=cached)
        assert torch.equal(native, reference), (name, cached)


@pytest.mark.parametrize(("dtype", "base_dtype"), [
    (torch.float32, None), (torch.float16, None), (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
])
@pytest.mark.parametrize("name", ["ties", "dare_ties", "della", "breadcrumbs", "task_arithmetic", "linear"])
def test_other_dtypes_and_mixed_dtypes_are_bit_identical(name: str, dtype, base_dtype) -> None:
    base, sources = inputs((129, 257), 3, seed=3, dtype=dtype, base_dtype=base_dtype)
    for cached in (False, True):
        native, reference = both_ways(name, base, sources, params_for(METHODS[name], 0.5), cached=cached,
                                      out_dtype=base.dtype)
        assert torch.equal(native, reference), (name, cached)


def test_sources_are_read_not_written_and_no_task_vectors_are_kept() -> None:
    base, sources = inputs((300, 200), 3, seed=4)
    before = [s.clone() for s in sources]
    deltas = TaskVectors(base, sources)
    stats = DeltaStats(deltas)
    merge_tensor(METHODS["ties"], base, deltas, {"density": 0.3}, stats=stats)
    assert all(torch.equal(a, b) for a, b in zip(before, sources))
    # nothing per entry: only each model's magnitude histogram, bounded by its 2^15 buckets (one slice here)
    histograms = [stats.histogram(e) for e in range(3)]
    assert all(h.parts == 1 and len(h.buckets) <= 2**15 for h in histograms)
    assert stats.nbytes() == sum(h.nbytes() for h in histograms) <= 3 * (2 + 4) * 2**15


@pytest.mark.parametrize("name", ["ties", "breadcrumbs", "dare_ties", "della"])
def test_stats_kept_across_candidates_give_each_candidate_a_fresh_merge(name: str) -> None:
    """What a worker keeps per tensor between candidates by default (the magnitude histograms, L1 norms
    and DARE's per-hash-bucket sums of `DeltaStats(keep_sorted=False)`) changes no bit of any later
    candidate: not when the thread count that sliced the histograms has changed since (2 slices kept,
    1 thread merging), nor when the recipe seed changes (another stream: the sums are counted again)."""
    base, sources = inputs((700, 600), 3, seed=6)  # 420k entries: several 65536-entry slices
    spec, deltas = METHODS[name], TaskVectors(base, sources)
    kept = DeltaStats(deltas)
    threads = torch.get_num_threads()
    try:
        for i, (fraction, seed) in enumerate(((0.2, 1), (0.5, 1), (0.9, 1), (0.35, 1), (0.6, 2), (0.45, 2), (0.3, 2))):
            torch.set_num_threads(2 if i == 0 else 1)
            params = params_for(spec, fraction)
            fresh = merge_tensor(spec, base, deltas, params, Noise(seed, "w"), stats=DeltaStats(deltas))
            again = merge_tensor(spec, base, deltas, params, Noise(seed, "w"), stats=kept)
            assert torch.equal(fresh, again), (name, fraction)
    finally:
        torch.set_num_threads(threads)
    if name in ("ties", "breadcrumbs"):
        assert [kept.histogram(e).parts for e in range(3)] == [2, 2, 2]
    if name == "dare_ties":  # the sums of the last seed's streams are held
        assert [held[0] for held in kept._hash_sums] == [Noise(2, "w").key(e) for e in range(3)]
