"""The uniforms random methods draw: a fixed function of (seed, tensor name, model, entry), so the same
on every device. The pinned values below are that guarantee: integer ops that give these bits here give
them on a GPU too (there is no generator state to differ)."""

from __future__ import annotations

import pytest
import torch

from evomerge.models.build import tensor_noise
from evomerge.merge import METHODS, DeltaStats, Noise, merge_tensor
from evomerge.merge._random import HASH_CHUNK, UNIFORM_BITS, uniform_int
from evomerge.merge._sparsify import UniformKeep, _fixed_sum, _UniformBuckets

NAME = "model.layers.0.mlp.up_proj.weight"


def _ints(u: torch.Tensor) -> list[int]:
    return [int(v) for v in (u.double() * 2**UNIFORM_BITS)]


def test_uniforms_are_a_fixed_known_sequence():
    noise = Noise(1, NAME)
    assert (noise.key(0), noise.key(2)) == (3746328314, 1669590278)
    assert _ints(noise.uniforms(0, 5)) == [15206609, 13936188, 9816498, 1701384, 2119533]
    assert _ints(noise.uniforms(2, 3)) == [12700754, 4040859, 3920260]
    assert uniform_int(noise, 1, 2**32 - 1) * 2**UNIFORM_BITS == 1718259  # no int64 overflow at the top index


def test_tensor_ops_match_the_python_reference_across_chunks():
    noise, n = Noise(3, "w"), HASH_CHUNK + 77  # two chunks
    u = noise.uniforms(1, n)
    assert u.dtype == torch.float32 and torch.equal(u * 2**UNIFORM_BITS, noise.levels(1, n))
    for i in [0, 1, 2, HASH_CHUNK - 1, HASH_CHUNK, n - 1]:
        assert u[i].item() == uniform_int(noise, 1, i)
    assert tensor_noise(3, "w") == noise


def test_uniforms_are_uniform_and_streams_differ():
    u = Noise(0, NAME).uniforms(0, 200_000)
    assert 0 <= u.min() and u.max() < 1
    assert torch.histc(u, bins=10, min=0, max=1).div(len(u)).sub(0.1).abs().max() < 0.005
    others = [Noise(0, NAME).uniforms(1, 200_000), Noise(1, NAME).uniforms(0, 200_000), Noise(0, "x").uniforms(0, 200_000)]
    for other in others:  # another model, seed or tensor: uncorrelated keep masks
        both = ((u < 0.5) & (other < 0.5)).float().mean().item()
        assert abs(both - 0.25) < 0.005


def test_huge_tensors_are_refused():
    with pytest.raises(ValueError, match="below 2\\^32 entries"):
        Noise().uniforms(0, 1 << 32)


@pytest.mark.parametrize("low", [1e-4, 0.25, 0.3, 0.5 + 2**-13, 0.999, 1 - 2**-24])
def test_cached_dare_norm_lookup_equals_the_masked_sum(low):
    flat = torch.randn(50_000, generator=torch.Generator().manual_seed(0)).bfloat16().float()
    levels = Noise(5, "t").levels(0, len(flat))
    keep = UniformKeep(levels, float(torch.tensor(low, dtype=torch.float32)))
    shift = 20
    assert _UniformBuckets(levels, flat, shift).kept(flat, keep.limit, shift) == _fixed_sum(flat, shift, keep)


@pytest.mark.parametrize("ranks", [None, torch.rand(3000, generator=torch.Generator().manual_seed(1))])
def test_float_masks_keep_exactly_where_the_uniform_is_below_p(ranks):
    levels = Noise(2, "t").levels(0, 3000)
    row = torch.randn(3000, generator=torch.Generator().manual_seed(2))
    keep = UniformKeep(levels, 0.3, ranks, 0.2)
    p = torch.full((3000,), 0.3) if ranks is None else ranks * 0.2 + 0.3  # fp32, as DELLA computes it
    out = torch.empty(1000)
    keep.write(row[1000:2000], 1000, out)
    expected = torch.where(levels * 2.0**-24 < p, row, 0.0)
    assert torch.equal(out, expected[1000:2000])
    assert torch.equal(keep.apply(row, 0), expected)


@pytest.mark.parametrize("name", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_random_merges_depend_on_seed_and_name_not_on_a_generator(name):
    g = torch.Generator().manual_seed(0)
    base, deltas = torch.randn(30, 40, generator=g), torch.randn(3, 30, 40, generator=g)
    params = {"density": 0.4, "epsilon": 0.1} if name.startswith("della") else {"density": 0.4}
    spec = METHODS[name]
    a = merge_tensor(spec, base, deltas, params, Noise(1, "a"))
    torch.manual_seed(123)  # the global generator plays no part
    assert torch.equal(a, merge_tensor(spec, base, deltas, params, Noise(1, "a")))
    assert not torch.equal(a, merge_tensor(spec, base, deltas, params, Noise(1, "b")))
    assert not torch.equal(a, merge_tensor(spec, base, deltas, params, Noise(2, "a")))
    cached = DeltaStats(deltas, keep_sorted=True)
    assert torch.equal(a, merge_tensor(spec, base, deltas, params, Noise(1, "a"), stats=cached))
    assert torch.equal(a, merge_tensor(spec, base, deltas, params, Noise(1, "a"), stats=cached))  # from the cache


@pytest.mark.parametrize("scale", [1.0, 1e-30, 1e30])
def test_fixed_point_norms_are_exact_and_do_not_overflow(scale):
    from fractions import Fraction

    from evomerge.merge._sparsify import _fixed_shift

    flat = torch.randn(70_000, generator=torch.Generator().manual_seed(3)) * scale
    shift = _fixed_shift(float(flat.abs().max()), flat.numel())
    exact = sum(int(Fraction(abs(v)) * Fraction(2) ** shift) for v in flat.tolist())  # floor of each, summed
    assert _fixed_sum(flat, shift) == exact < 2**62
    assert exact * 2.0**-shift == pytest.approx(flat.double().abs().sum().item(), rel=1e-6)
