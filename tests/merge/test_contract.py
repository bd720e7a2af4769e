"""The contract every registered merge method keeps, run over all of METHODS."""

from __future__ import annotations

import pytest
import torch

from evomerge.merge import METHODS, MethodSpec, Noise, get_method, merge_tensor
from ._cases import n_models, params_for, random_inputs

ALL = sorted(METHODS)
SPARSIFIERS = sorted(name for name, spec in METHODS.items() if any(p.name == "density" for p in spec.params))
RANDOM = sorted(name for name, spec in METHODS.items() if spec.random)
SHAPES = [(), (7,), (4, 6), (2, 3, 4)]


def _merge(spec: MethodSpec, base, deltas, params, seed: int = 0) -> torch.Tensor:
    return merge_tensor(spec, base, deltas, params, Noise(seed, "w"))


def test_registry_ids_are_function_names_and_defaults_are_valid():
    assert len(ALL) >= 12
    for name, spec in METHODS.items():
        assert spec.name == name == spec.fn.__name__
        assert get_method(name) is spec
        assert spec.needs_base
        for p in spec.params:
            assert p.contains(p.default), (name, p)
    assert set(RANDOM) == {"dare_ties", "dare_linear", "della", "della_linear"}


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7,), (4, 6)])
def test_zero_deltas_give_base(name, dtype, shape):
    spec = METHODS[name]
    base = torch.randn(shape).to(dtype)
    deltas = torch.zeros((n_models(spec), *shape), dtype=dtype)
    for density in (None, 0.5):
        out = _merge(spec, base, deltas, params_for(spec, density))
        assert torch.equal(out, base.float())


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("shape", SHAPES)
def test_shape_dtype_device_kept_and_output_finite(name, shape):
    spec = METHODS[name]
    base, deltas = random_inputs(spec, shape)
    out = _merge(spec, base.to(torch.bfloat16), deltas.to(torch.bfloat16), params_for(spec, 0.5))
    assert out.shape == base.shape
    assert out.dtype == torch.float32
    assert out.device == base.device
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ALL)
def test_inputs_not_mutated_and_not_aliased(name):
    spec = METHODS[name]
    base, deltas = random_inputs(spec, (5, 8))
    base_before, deltas_before = base.clone(), deltas.clone()
    out = _merge(spec, base, deltas, params_for(spec, 0.5))
    assert torch.equal(base, base_before) and torch.equal(deltas, deltas_before)
    out += 1  # the caller may write into the result without touching the inputs
    assert torch.equal(base, base_before) and torch.equal(deltas, deltas_before)


@pytest.mark.parametrize("name", ALL)
def test_same_seed_same_output(name):
    spec = METHODS[name]
    base, deltas = random_inputs(spec, (6, 10))
    params = params_for(spec, 0.5)
    assert torch.equal(_merge(spec, base, deltas, params, seed=3), _merge(spec, base, deltas, params, seed=3))


@pytest.mark.parametrize("name", RANDOM)
def test_random_methods_use_the_noise(name):
    spec = METHODS[name]
    base, deltas = random_inputs(spec, (6, 10))
    params = params_for(spec, 0.5)
    assert not torch.equal(_merge(spec, base, deltas, params, seed=1), _merge(spec, base, deltas, params, seed=2))
    none, default = (merge_tensor(spec, base, deltas, params, noise) for noise in (None, Noise()))
    assert torch.equal(none, default)  # no noise given: Noise()


@pytest.mark.parametrize("name", SPARSIFIERS)
def test_density_one_keeps_every_entry(name):
    spec = METHODS[name]
    base, deltas = random_inputs(spec, (20, 50))
    out = _merge(spec, base, deltas[:1], params_for(spec, 1.0))
    torch.testing.assert_close(out, base + deltas[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", SPARSIFIERS)
def test_tiny_density_keeps_few_entries(name):
    spec = METHODS[name]
    base, deltas = random_inputs(spec, (20, 50))  # 1000 entries; density 0.01 keeps about 10
    out = _merge(spec, base, deltas[:1], params_for(spec, 0.01))
    changed = int((out != base).sum())
    assert 1 <= changed <= 30
