"""The fused CPU kernels equal the eager chunked path, for every method built on `_mix`, every keep kind
(magnitude windows with and without edge cuts, DARE and DELLA uniforms, models that keep everything),
every output dtype and model count."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from evomerge.merge import DeltaStats, Noise, TaskVectors, _fused, _methods, get_method, merge_tensor
from evomerge.merge._sparsify import Cut, MagnitudeKeep, _below, top_magnitude_keep

MIX_METHODS = {  # the methods that run through _mix, with parameters that exercise them
    "task_arithmetic": {"weight": [0.7, -0.4, 1.3], "lambda_": 1.2},
    "linear": {"weight": [0.2, 0.5, 0.3]},
    "ties": {"weight": [0.7, 0.4, 1.3], "density": [0.3, 0.55, 1.0], "lambda_": 0.9},
    "dare_ties": {"weight": [0.7, 0.4, 1.3], "density": [0.3, 0.55, 1.0], "lambda_": 1.1},
    "dare_linear": {"weight": [0.7, -0.4, 1.3], "density": [0.3, 0.55, 0.8], "lambda_": 1.0},
    "breadcrumbs": {"weight": [0.7, 0.4, 1.3], "density": [0.3, 0.55, 0.9], "gamma": [0.01, 0.1, 0.0], "lambda_": 1.0},
    "breadcrumbs_ties": {"weight": [0.7, 0.4, 1.3], "density": [0.3, 0.55, 0.9], "gamma": [0.01, 0.1, 0.0], "lambda_": 1.4},
    "della": {"weight": [0.7, 0.4, 1.3], "density": [0.3, 0.5, 1.0], "epsilon": [0.1, 0.2, 0.0], "lambda_": 1.0},
    "della_linear": {"weight": [0.7, 0.4, 1.3], "density": [0.3, 0.5, 0.7], "epsilon": [0.1, 0.2, 0.05], "lambda_": 0.8},
}


def bf16_like_inputs(n_models: int, shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A bf16 base and fp32 task vectors of bf16 sources: many equal magnitudes (so TIES edges get
    cuts), some exact zeros, and entries where every model is dropped."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(torch.bfloat16)
    sources = (base.float() + torch.randn((n_models, *shape), generator=g) * 0.02).to(torch.bfloat16)
    deltas = sources.float() - base.float()
    deltas.view(n_models, -1)[:, :5] = 0
    return base, deltas


def merge_both_ways(method: str, params: dict, base, deltas, out_dtype, monkeypatch, stats=None):
    spec = get_method(method)
    noise = Noise(7, "model.layers.0.mlp.up_proj.weight")
    fused = merge_tensor(spec, base, deltas, params, noise, stats=stats, out=torch.empty(base.shape, dtype=out_dtype))
    with monkeypatch.context() as patch:
        patch.setattr(_fused, "usable", lambda *args, **kwargs: False)
        eager = merge_tensor(spec, base, deltas, params, noise, stats=stats).to(out_dtype)
    return fused, eager


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", sorted(MIX_METHODS))
def test_fused_equals_eager(method, out_dtype, monkeypatch):
    base, deltas = bf16_like_inputs(3, (37, 129), seed=1)
    fused, eager = merge_both_ways(method, MIX_METHODS[method], base, deltas, out_dtype, monkeypatch)
    assert fused.dtype == out_dtype
    assert torch.equal(fused, eager)


@pytest.mark.parametrize("method", sorted(MIX_METHODS))
def test_fused_equals_eager_over_several_eager_chunks(method, monkeypatch):
    """Tensors larger than one eager step (131,072 entries per model for 3 models): the eager side
    carries its keeps, edge cuts and uniforms across chunk boundaries, the fused side does not chunk."""
    base, deltas = bf16_like_inputs(3, (257, 1031), seed=15)  # 264,967 entries: 3 eager chunks, the last partial
    step = _methods._step(3, torch.device("cpu"))
    assert 2 * step < base.numel() < 3 * step
    fused, eager = merge_both_ways(method, MIX_METHODS[method], base, deltas, torch.bfloat16, monkeypatch)
    assert torch.equal(fused, eager)


@pytest.mark.parametrize("n_models", [1, 2, 5])
@pytest.mark.parametrize("method", ["ties", "dare_ties", "della", "breadcrumbs_ties", "linear"])
def test_fused_equals_eager_for_other_model_counts(method, n_models, monkeypatch):
    if method == "linear" or n_models == 1:
        params = {"weight": [0.5 + 0.1 * e for e in range(n_models)]}
    else:
        params = {"weight": [0.3 + 0.2 * e for e in range(n_models)], "density": [0.2 + 0.15 * e for e in range(n_models)]}
        if method == "della":
            params["epsilon"] = 0.1
    base, deltas = bf16_like_inputs(n_models, (1000,), seed=n_models)
    fused, eager = merge_both_ways(method, params, base, deltas, torch.bfloat16, monkeypatch)
    assert torch.equal(fused, eager)


def test_ties_edges_with_cuts_are_fused_exactly(monkeypatch):
    """bf16 task vectors repeat magnitudes, so density edges fall inside runs of equal values."""
    base, deltas = bf16_like_inputs(3, (64, 257), seed=3)
    density = torch.tensor([0.3, 0.45, 0.6])
    keeps = top_magnitude_keep(deltas, density, DeltaStats(deltas))
    assert any(isinstance(k, MagnitudeKeep) and k.cuts for k in keeps), "no edge cut: the case below tests nothing"
    params = {"weight": [1.0, 0.6, 0.9], "density": density.tolist(), "lambda_": 1.0}
    for stats in (None, DeltaStats(deltas, keep_sorted=True)):
        fused, eager = merge_both_ways("ties", params, base, deltas, torch.float32, monkeypatch, stats=stats)
        assert torch.equal(fused, eager)


def test_negative_weights_and_zero_sums(monkeypatch):
    """A negative weight turns off the clamp shortcut (a divisor may be 0 or negative)."""
    base, deltas = bf16_like_inputs(3, (300,), seed=4)
    deltas[2] = -deltas[0]  # equal and opposite: sums of exactly 0
    params = {"weight": [1.0, -0.5, 1.0], "density": 0.7, "lambda_": 1.0}
    fused, eager = merge_both_ways("ties", params, base, deltas, torch.float32, monkeypatch)
    assert torch.equal(fused, eager)


def test_fused_path_is_taken_on_the_cpu(monkeypatch):
    calls = []
    real = _fused.mix
    monkeypatch.setattr(_fused, "mix", lambda *a, **k: calls.append(1) or real(*a, **k))
    base, deltas = bf16_like_inputs(3, (50,), seed=5)
    merge_tensor(get_method("ties"), base, deltas, MIX_METHODS["ties"])
    assert calls == [1]


def test_traffic_bound_kernel_reads_base_and_sources_once():
    base, deltas = bf16_like_inputs(3, (1000,), seed=6)
    sources = (base.float() + deltas).to(torch.bfloat16)
    out = torch.empty(1000, dtype=torch.bfloat16)
    rows = tuple(s.view(torch.uint16).numpy() for s in sources)
    _fused.kernels(3).traffic_bound(rows, base.view(torch.uint16).numpy(), out.view(torch.uint16).numpy())
    assert torch.equal(out, (base.float() + sources[0].float() + sources[1].float() + sources[2].float()).to(torch.bfloat16))


def test_kernels_are_generated_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(_fused, "_KERNEL_DIR", tmp_path / "kernels")  # what use_kernel_dir sets
    source = _fused._module_source(4)
    assert "v3 = " in source and "v4 = " not in source  # unrolled for exactly 4 models
    _fused.kernels.cache_clear()
    try:
        module = _fused.kernels(4)
        assert module.__file__.startswith(str(tmp_path / "kernels"))
        assert [p.name for p in (tmp_path / "kernels").glob("*.py")] == [module.__file__.rsplit("/", 1)[1]]
    finally:
        _fused.kernels.cache_clear()


def fused_kept(keep, row: torch.Tensor) -> torch.Tensor:
    """What the fused kernel keeps of one model's row: a one-model sum with factor 1 over a zero base."""
    one = torch.ones(1)
    return _fused.mix(torch.zeros_like(row), row[None], one, one, [keep], elect_sign=False, normalize=False,
                      lambda_=1.0, plain_divisor=1.0, zero_divisor=1.0)


def test_magnitude_keeps_with_any_cuts_keep_what_eager_keeps():
    """Thresholds and cut ranges of every side, overlapping and nested, as rank windows make them (a
    lower cut's value is the lower threshold, an upper cut's the first magnitude above the upper one)."""
    g = torch.Generator().manual_seed(8)
    row = (torch.randint(0, 6, (400,), generator=g) * 0.25) * torch.where(torch.rand(400, generator=g) < 0.5, -1.0, 1.0)
    cases = [
        MagnitudeKeep(0.5, 1.0, [Cut(0.5, 40, 300, "lower")]),  # (0.5, 1.0], plus 0.5 inside 40..300
        MagnitudeKeep(0.25, _below(1.0), [Cut(1.0, 0, 123, "upper")]),
        MagnitudeKeep(0.5, _below(1.0), [Cut(0.5, 100, 400, "lower"), Cut(1.0, 17, 220, "upper")]),
        MagnitudeKeep(math.inf, None, [Cut(0.5, 10, 200, "only")]),
        MagnitudeKeep(math.inf, None, [Cut(0.5, 150, 400, "only"), Cut(0.75, 0, 260, "only")]),  # overlapping
        MagnitudeKeep(-1.0, None),
        MagnitudeKeep(math.inf, None),
    ]
    for keep in cases:
        assert torch.equal(fused_kept(keep, row), keep.apply(row, 0)), keep.cuts


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic"])
def test_nan_or_inf_in_a_merge_raises(method, fused, monkeypatch):
    base, deltas = bf16_like_inputs(3, (64,), seed=9)
    deltas[1, 40] = float("nan") if method != "task_arithmetic" else float("inf")
    if not fused:
        monkeypatch.setattr(_fused, "usable", lambda *args, **kwargs: False)
    params = {k: v for k, v in MIX_METHODS[method].items()} | ({"density": 1.0} if "density" in MIX_METHODS[method] else {})
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        merge_tensor(get_method(method), base, deltas, params, out=torch.empty_like(base))


@pytest.mark.parametrize("fused", [True, False])
def test_finite_fp32_that_overflows_bf16_raises(fused, monkeypatch):
    """A merged value finite in fp32 but beyond bf16's range is inf in a bf16 output: both paths refuse it."""
    base, deltas = bf16_like_inputs(3, (64,), seed=12)
    deltas[0, 5] = 3.0e38  # times weight 1.133: 3.399e38, finite in fp32, rounds to inf in bf16 (largest 3.3895e38)
    if not fused:
        monkeypatch.setattr(_fused, "usable", lambda *args, **kwargs: False)
    out = torch.empty(64, dtype=torch.bfloat16)
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        merge_tensor(get_method("task_arithmetic"), base, deltas, {"weight": [1.133, 0.0, 0.0], "lambda_": 1.0}, out=out)


def test_overflow_into_fp16_raises():
    base, deltas = bf16_like_inputs(3, (64,), seed=10)
    deltas[0, 3] = 60000.0  # times weight 1.3 and lambda 1.2: beyond fp16's 65504
    params = {"weight": [1.3, 0.0, 0.0], "lambda_": 1.2}
    with pytest.raises(FloatingPointError):
        merge_tensor(get_method("task_arithmetic"), base, deltas, params, out=torch.empty(64, dtype=torch.float16))


@pytest.mark.parametrize("ranked", [False, True])
def test_compiled_l1_sums_equal_the_chunked_eager_sums(ranked):
    """DARE's and DELLA's kept L1 norms and the full norms, hashed and summed in compiled passes."""
    from evomerge.merge._sparsify import _fixed_sum, random_keep, rank_sampled_keep

    _, deltas = bf16_like_inputs(2, (40, 3000), seed=11)
    stats = DeltaStats(deltas)
    density, noise = torch.tensor([0.4, 0.6]), Noise(5, "w")
    keeps = rank_sampled_keep(density, torch.tensor([0.1, 0.3]), noise, stats) if ranked else random_keep(density, noise, stats)
    for e, keep in enumerate(keeps):
        total, shift = stats.fixed_l1(e)
        assert total == _fixed_sum(stats.flat(e), shift)
        assert stats.kept_fixed_l1(e, keep) == _fixed_sum(stats.flat(e), shift, keep) > 0


@pytest.mark.parametrize("numel", [3000, 3 << 20], ids=["scan", "inverse-hash"])
def test_dare_kept_norm_from_hash_bucket_sums_equals_one_pass(numel):
    """A kept DARE norm as a prefix of per-hash-bucket sums plus the boundary bucket's share equals the
    one-pass sum, for densities at and inside bucket edges; the share comes from a scan of every
    entry's hash (small tensors) or from the hashes of the bucket turned back into indices (large)."""
    from evomerge.merge._numba import SUM_BUCKET_BITS, boundary_fixed_sum, hash_bucket_sums, uniform_fixed_sums
    from evomerge.merge._random import M32, WEYL, hash32_int
    from evomerge.merge._sparsify import UniformKeep

    g = torch.Generator().manual_seed(13)
    base = torch.randn(numel, generator=g).to(torch.bfloat16)
    source = (base.float() + torch.randn(numel, generator=g) * 0.02).to(torch.bfloat16)
    values, sub = TaskVectors(base, [source]).pair(0)
    key, scale = np.uint32(Noise(3, "w").key(0)), 2.0**30
    sums = hash_bucket_sums(values, key, scale, 2, sub)
    assert int(sums.sum()) == uniform_fixed_sums(values, key, np.uint32(0), scale, sub)[0]
    at_entries = [hash32_int(((i * WEYL) & M32) ^ int(key)) for i in (0, numel // 2, numel - 1)]  # an entry's hash is top
    tops = [UniformKeep(lambda: None, d).top for d in (1e-7, 0.25, 0.3, 0.5 + 2**-13, 0.77, 1 - 2**-24)] + at_entries
    for top in tops:
        kept = int(sums[: top >> (32 - SUM_BUCKET_BITS)].sum()) + int(boundary_fixed_sum(values, key, np.uint32(top), scale, 2, sub))
        assert kept == uniform_fixed_sums(values, key, np.uint32(top), scale, sub)[1], top


def test_fused_merges_leave_torch_thread_count_alone():
    """numba's OpenMP layer would reset torch's threads (a worker sized to one would run two)."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        base, deltas = bf16_like_inputs(3, (5000,), seed=12)
        merge_tensor(get_method("ties"), base, deltas, MIX_METHODS["ties"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("from_sources", [False, True])
def test_compiled_magnitude_selection_equals_the_torch_radix_select(from_sources, monkeypatch):
    """Edges, one or two per pass, and the positions of equal magnitudes, from the recorded buckets and
    from the scan, equal the torch radix select's and the eager index order's."""
    from evomerge.merge import _sparsify
    from evomerge.merge._numba import nth_equal
    from evomerge.merge._sparsify import select_edge, select_edges_compiled

    monkeypatch.setattr(_sparsify, "RECORD_FRACTION", 1)  # record every bucket, however large

    base, deltas = bf16_like_inputs(1, (300_000,), seed=13)  # above one 65536-entry part: the parallel split runs
    flat = deltas[0]
    flat[7] = -0.0
    magnitudes = flat.abs()
    values, sub = flat.numpy(), None
    if from_sources:  # bf16 sources whose differences from the base are these task vectors
        source = (base.float() + flat).to(torch.bfloat16)
        flat = source.float() - base.float()
        magnitudes = flat.abs()
        values, sub = source.view(torch.uint16).numpy(), base.view(torch.uint16).numpy()
    ranks = (0, 1, 4, 1000, 150_000, 299_998, 299_999)
    pairs = [[r] for r in ranks] + [[4, 150_000], [150_000, 150_001], [1000, 299_999]]
    for pair in pairs:
        edges, records = select_edges_compiled(values, sub, pair)
        for rank, edge in zip(pair, edges):
            assert edge == select_edge(magnitudes, rank)
            where = (magnitudes == edge.value).nonzero().squeeze(1)
            ordinals = [0, edge.equal // 2, edge.equal - 1]
            expected = [int(where[i]) for i in ordinals]
            assert nth_equal(values, np.float32(edge.value), np.array(ordinals), sub).tolist() == expected
            bits = int(np.array(edge.value, dtype=np.float32).view(np.uint32))
            index, low = records[bits >> 16]
            assert index[np.flatnonzero(low == (bits & 0xFFFF))[ordinals]].tolist() == expected
    monkeypatch.setattr(_sparsify, "RECORD_FRACTION", 10**9)  # none recorded: positions come from the scan
    assert select_edges_compiled(values, sub, [1000, 299_999])[1] == {}


def test_a_live_tensor_of_another_dtype_gets_the_merge_rounded_to_the_base_dtype():
    """A worker may hold its live model in fp32 over a bf16 base: it must score what export writes."""
    from evomerge.models.build import check_recipe, merge_named
    from evomerge.recipe import Recipe

    base, deltas = bf16_like_inputs(3, (64, 33), seed=14)
    recipe = Recipe("ties", "base", ("a", "b", "c"), ({"weight": [0.7, 0.4, 1.3], "density": 0.5},))
    spec = check_recipe(recipe)
    live = merge_named(recipe, spec, "w", 0, base, deltas, out=torch.empty(base.shape, dtype=torch.float32))
    exported = merge_named(recipe, spec, "w", 0, base, deltas)
    assert exported.dtype == torch.bfloat16
    assert torch.equal(live, exported.float())


@pytest.mark.parametrize("shape", [(7, 3000), (64, 2), (5000,), (6, 1)])
def test_compiled_row_ranks_equal_the_torch_stable_argsort(shape):
    """DELLA's row ranks by the compiled radix sort, from bf16 sources and from fp32 task vectors,
    equal the torch argsort's bit for bit: ties (bf16 differences repeat), -0, NaN and inf included."""
    from evomerge.merge import TaskVectors
    from evomerge.merge._sparsify import _normalized_row_ranks, _ranking_view, _undo_ranking_view

    base, deltas = bf16_like_inputs(1, shape, seed=17)
    sources = (base.float() + deltas).to(torch.bfloat16)
    special = sources.view(-1)
    special[1], special[2], special[3] = float("nan"), float("inf"), -float("inf")
    base.view(-1)[4] = -0.0
    special[4] = 0.0
    native = TaskVectors(base, [sources[0]])
    fp32 = TaskVectors.from_deltas(base, torch.stack([sources[0].float() - base.float()]))
    one = fp32.deltas[0].view(1, *shape)
    expected = _undo_ranking_view(_normalized_row_ranks(_ranking_view(one)), one).reshape(-1)
    for tv in (native, fp32):
        got = DeltaStats(tv).row_ranks(0)
        assert torch.equal(got.view(torch.int32), expected.view(torch.int32))
