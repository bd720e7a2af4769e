"""Shared test inputs: model counts and valid parameters for any registered method."""

from __future__ import annotations

import torch

from evomerge.merge import MethodSpec


def n_models(spec: MethodSpec) -> int:
    """A model count the method accepts, 3 where it can."""
    return min(spec.max_models or 3, max(spec.min_models, 3))


def params_for(spec: MethodSpec, density: float | None = None) -> dict[str, float]:
    """Defaults, with `density` where the method has one and a della epsilon that fits it."""
    params = {p.name: p.default for p in spec.params}
    if density is not None and "density" in params:
        params["density"] = density
        if "epsilon" in params and density < 1:
            params["epsilon"] = min(density, 1 - density) / 2
    return params


def random_inputs(spec: MethodSpec, shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """base (*shape) and deltas (E, *shape) with mixed signs and distinct magnitudes."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    deltas = torch.randn((n_models(spec), *shape), generator=g) * 0.1
    return base, deltas
