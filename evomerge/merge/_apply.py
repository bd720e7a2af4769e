"""The one call path into a merge method: `merge_tensor` fills defaults, checks every value against
the catalog (`catalog.MethodSpec`: one-line errors naming method, parameter, value, range and fix),
turns per-model values into (E,) fp32 tensors on the deltas' device, and checks the result is finite.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from evomerge.merge._deltas import TaskVectors
from evomerge.merge._random import Noise
from evomerge.merge._sparsify import DeltaStats
from evomerge.merge.catalog import MergeParamError, MethodSpec, ParamValue


def all_finite(t: Tensor) -> bool:
    """No NaN or inf in t: its min and max are finite (NaN propagates through both). One vectorized
    reduction, unlike torch.isfinite(t).all(), which makes a bool tensor (about 50x slower on bf16)."""
    return t.numel() == 0 or bool(torch.isfinite(torch.stack(torch.aminmax(t))).all())


def check_finite(t: Tensor) -> Tensor:
    """t, after making sure it has no NaN or inf (FloatingPointError otherwise)."""
    if not all_finite(t):
        raise FloatingPointError("merged values are NaN or inf")
    return t


def copy_checked(out: Tensor, merged: Tensor) -> Tensor:
    """out.copy_(merged) for a finite merged, checking again where out's dtype may overflow (fp16, bf16)."""
    out.copy_(merged)
    narrower = out.dtype != merged.dtype and torch.finfo(out.dtype).max < torch.finfo(merged.dtype).max
    return check_finite(out) if narrower else out


def merge_tensor(
    spec: MethodSpec,
    base: Tensor,
    deltas: Tensor | TaskVectors,
    params: Mapping[str, ParamValue],
    noise: Noise | None = None,
    *,
    stats: DeltaStats | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Merge one tensor. base: (*S) any float dtype; deltas: the E task vectors (source - base), as
    `TaskVectors(base, sources)` (sources read in their own dtype, never materialised) or as a
    materialised (E, *S) tensor; both give bit-identical results. params: floats, or one value per model for per-model params. Returns (*S) fp32 full weights, or,
    given out (*S, any float dtype), writes them into out, rounded once as `.to(out.dtype)` rounds,
    and returns out (the task-vector methods write it directly: no fp32 copy of the tensor is made).
    Raises FloatingPointError when a merged value is NaN or inf (the task-vector methods check as
    they go; a recipe that overflows is degenerate, and a checkpoint of it would be useless).

    noise: the uniforms random methods draw (`Noise(seed, tensor_name)`; None: Noise()).

    stats: a `DeltaStats` built on these same deltas, kept by a caller that merges them many times
    (it holds their sorted magnitudes, so sparsifying needs no selection); results are bit-identical
    with or without it."""
    if not isinstance(deltas, TaskVectors):
        if deltas.dim() != base.dim() + 1 or deltas.shape[1:] != base.shape:
            raise MergeParamError(
                f"{spec.name}: deltas shape {tuple(deltas.shape)} does not fit base shape {tuple(base.shape)}; "
                f"deltas must be (n_models, *base.shape)"
            )
        deltas = TaskVectors.from_deltas(base, deltas)
    elif deltas.item_shape != tuple(base.shape):
        raise MergeParamError(f"{spec.name}: task vectors of shape {deltas.item_shape} do not fit base shape {tuple(base.shape)}")
    if spec.fn is None:
        from evomerge.merge import _methods  # noqa: F401  (binds every catalogued method's function)
    resolved = spec.resolve(params, deltas.n_models)
    kwargs = {
        name: torch.tensor(value, dtype=torch.float32, device=deltas.device) if isinstance(value, list) else value
        for name, value in resolved.items()
    }
    if spec.uses_stats:
        if stats is not None and not stats.tv.same(deltas):
            raise ValueError(f"{spec.name}: stats were built for other task vectors; build one DeltaStats per deltas tensor")
        kwargs["stats"] = stats
    if out is not None and out.shape != base.shape:
        raise MergeParamError(f"{spec.name}: out shape {tuple(out.shape)} is not the base shape {tuple(base.shape)}")
    if spec.writes_out:
        return spec.fn(base, deltas, noise=noise, out=out, **kwargs)
    merged = check_finite(spec.fn(base, deltas, noise=noise, **kwargs))
    return merged if out is None else copy_checked(out, merged)
