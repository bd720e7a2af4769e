"""The merge-method registry: what each method takes, how its parameters are checked, one call path.

A method is a pure function ``fn(base, deltas, *, noise, **params) -> Tensor`` registered with
``@register(ParamSpec, ...)``; its registry id is its function name. ``merge_tensor`` is the one way
to call a method: it fills defaults, checks every value against its ``ParamSpec`` (errors are one
line that names method, parameter, value, allowed range and fix) and turns per-model values into
(E,) fp32 tensors on the deltas' device.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeAlias

import torch
from torch import Tensor

from evomerge.errors import ConfigError
from evomerge.merge._random import Noise
from evomerge.merge._sparsify import DeltaStats

ParamValue: TypeAlias = float | Sequence[float] | Tensor
Resolved: TypeAlias = dict[str, float | list[float]]  # per-model -> one float per model
# A cross-parameter rule: gets resolved values and the model count, returns an error text or None.
Constraint: TypeAlias = Callable[[Resolved, int], str | None]

METHODS: dict[str, MethodSpec] = {}


class MergeParamError(ConfigError):
    """A merge method was asked for with a name, parameter, value or model count it cannot take."""


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a merge method: its valid range (also the default search bounds)."""

    name: str
    low: float
    high: float
    default: float
    per_model: bool  # True: one value per source model, an (E,) tensor; False: one float
    low_inclusive: bool = True
    high_inclusive: bool = True

    def interval(self) -> str:
        """The valid range in interval notation, e.g. '(0, 1]'."""
        left = "[" if self.low_inclusive else "("
        right = "]" if self.high_inclusive else ")"
        return f"{left}{self.low:g}, {self.high:g}{right}"

    def contains(self, value: float) -> bool:
        above = value >= self.low if self.low_inclusive else value > self.low
        below = value <= self.high if self.high_inclusive else value < self.high
        return above and below  # False for NaN

    def fix(self, value: float) -> str:
        """How to bring an out-of-range value back into range."""
        if math.isnan(value):
            return "use a finite number"
        if value < self.low or (value == self.low and not self.low_inclusive):
            return f"raise it to {self.low:g} or more" if self.low_inclusive else f"raise it above {self.low:g}"
        return f"lower it to {self.high:g} or less" if self.high_inclusive else f"lower it below {self.high:g}"


@dataclass(frozen=True)
class MethodSpec:
    """A registered merge method: its function, parameters and how many source models it takes."""

    name: str  # registry id == function name (e.g. "ties", "dare_ties")
    fn: Callable[..., Tensor]
    params: tuple[ParamSpec, ...]
    needs_base: bool  # every method here works on deltas from a base; kept for clarity
    min_models: int = 1  # number of source (non-base) models allowed
    max_models: int | None = None
    random: bool = False  # draws uniforms from `noise` (dare_*, della*)
    constraints: tuple[Constraint, ...] = ()
    uses_stats: bool = False  # takes `stats` (a DeltaStats): sparsifiers, whose edges can be precomputed
    writes_out: bool = False  # takes `out`: writes the merged tensor straight into the caller's tensor

    def param(self, name: str) -> ParamSpec:
        """The ParamSpec called `name`; KeyError if this method has none."""
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(f"{self.name} has no parameter {name!r}")

    def check(self, params: Mapping[str, ParamValue], n_models: int) -> None:
        """Raise MergeParamError (one line: method, parameter, value, allowed range, fix) on any
        wrong model count, unknown parameter name, out-of-range value or broken constraint."""
        self.resolve(params, n_models)

    def resolve(self, params: Mapping[str, ParamValue], n_models: int) -> Resolved:
        """Checked values with defaults filled in: a list of n_models floats for per-model params."""
        self._check_model_count(n_models)
        self._check_names(params)
        resolved = {p.name: _resolve_one(self.name, p, params.get(p.name, p.default), n_models) for p in self.params}
        for constraint in self.constraints:
            if (problem := constraint(resolved, n_models)) is not None:
                raise MergeParamError(f"{self.name}: {problem}")
        return resolved

    def _check_model_count(self, n_models: int) -> None:
        low, high = self.min_models, self.max_models
        if low <= n_models and (high is None or n_models <= high):
            return
        if high == low:
            bound, allowed, fix = low, f"exactly {low}", f"pass exactly {low}"
        elif n_models < low:
            bound, allowed, fix = low, f"at least {low}", "add source models"
        else:
            bound, allowed, fix = high, f"at most {high}", "drop source models"
        raise MergeParamError(
            f"{self.name}: got {n_models} source {_models(n_models)}; {self.name} takes {allowed} "
            f"source {_models(bound)} besides the base; {fix}"
        )

    def _check_names(self, params: Mapping[str, ParamValue]) -> None:
        known = [p.name for p in self.params]
        for name in params:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
                hint = f" (did you mean: {', '.join(close)}?)" if close else ""
                takes = ", ".join(known) if known else "no parameters"
                raise MergeParamError(f"{self.name}: unknown parameter {name!r}{hint}; {self.name} takes: {takes}")


def _models(count: int | None) -> str:
    return "model" if count == 1 else "models"


def _resolve_one(method: str, spec: ParamSpec, value: ParamValue, n_models: int) -> float | list[float]:
    """One parameter's value as a float (global) or n_models floats (per-model), range-checked."""
    values = _as_floats(method, spec.name, value)
    if isinstance(values, list) and not spec.per_model:
        raise MergeParamError(
            f"{method}: {spec.name} got {len(values)} values; "
            f"{spec.name} is one number shared by all models; give one number"
        )
    if isinstance(values, list) and len(values) != n_models:
        raise MergeParamError(
            f"{method}: {spec.name} got {len(values)} values for {n_models} models; "
            "give one value per model, or one number for all"
        )
    for index, v in enumerate(values if isinstance(values, list) else [values]):
        if not spec.contains(v):
            where = f" for models[{index}]" if isinstance(values, list) else ""
            raise MergeParamError(
                f"{method}: {spec.name} = {v!r}{where}; {spec.name} must be in {spec.interval()}; {spec.fix(v)}"
            )
    if spec.per_model and not isinstance(values, list):
        return [values] * n_models
    return values


def _as_floats(method: str, name: str, value: ParamValue) -> float | list[float]:
    try:
        if isinstance(value, Tensor):
            value = value.tolist()  # 0-d -> float, (E,) -> list
        if isinstance(value, Sequence) and not isinstance(value, str):
            return [float(v) for v in value]
        return float(value)
    except (TypeError, ValueError):
        raise MergeParamError(f"{method}: {name} = {value!r}; {name} must be a number or a list of numbers") from None


def register(
    *params: ParamSpec,
    min_models: int = 1,
    max_models: int | None = None,
    random: bool = False,
    constraints: tuple[Constraint, ...] = (),
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Register a merge function under its own name, with the parameters it takes."""

    def add(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if fn.__name__ in METHODS:
            raise ValueError(f"merge method {fn.__name__!r} is registered twice")
        takes = inspect.signature(fn).parameters
        METHODS[fn.__name__] = MethodSpec(
            fn.__name__, fn, params, True, min_models, max_models, random, constraints, "stats" in takes, "out" in takes
        )
        return fn

    return add


def get_method(name: str) -> MethodSpec:
    """The registered method called `name`; unknown names get a did-you-mean error."""
    if name in METHODS:
        return METHODS[name]
    close = difflib.get_close_matches(name, list(METHODS), n=3, cutoff=0.5)
    if close:
        raise MergeParamError(f"unknown merge method {name!r} (did you mean: {', '.join(close)}?)")
    raise MergeParamError(f"unknown merge method {name!r}; known methods: {', '.join(sorted(METHODS))}")


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
    deltas: Tensor,
    params: Mapping[str, ParamValue],
    noise: Noise | None = None,
    *,
    stats: DeltaStats | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Merge one tensor. base: (*S) any float dtype; deltas: (E, *S) task vectors (source - base);
    params: floats, or one value per model for per-model params. Returns (*S) fp32 full weights, or,
    given out (*S, any float dtype), writes them into out, rounded once as `.to(out.dtype)` rounds,
    and returns out (the task-vector methods write it directly: no fp32 copy of the tensor is made).
    Raises FloatingPointError when a merged value is NaN or inf (the task-vector methods check as
    they go; a recipe that overflows is degenerate, and a checkpoint of it would be useless).

    noise: the uniforms random methods draw (`Noise(seed, tensor_name)`; None: Noise()).

    stats: a `DeltaStats` built on these same deltas, kept by a caller that merges them many times
    (it holds their sorted magnitudes, so sparsifying needs no selection); results are bit-identical
    with or without it."""
    if deltas.dim() != base.dim() + 1 or deltas.shape[1:] != base.shape:
        raise MergeParamError(
            f"{spec.name}: deltas shape {tuple(deltas.shape)} does not fit base shape {tuple(base.shape)}; "
            f"deltas must be (n_models, *base.shape)"
        )
    resolved = spec.resolve(params, deltas.shape[0])
    kwargs = {
        name: torch.tensor(value, dtype=torch.float32, device=deltas.device) if isinstance(value, list) else value
        for name, value in resolved.items()
    }
    if spec.uses_stats:
        if stats is not None and stats.deltas is not deltas:
            raise ValueError(f"{spec.name}: stats were built for other task vectors; build one DeltaStats per deltas tensor")
        kwargs["stats"] = stats
    if out is not None and out.shape != base.shape:
        raise MergeParamError(f"{spec.name}: out shape {tuple(out.shape)} is not the base shape {tuple(base.shape)}")
    if spec.writes_out:
        return spec.fn(base, deltas, noise=noise, out=out, **kwargs)
    merged = check_finite(spec.fn(base, deltas, noise=noise, **kwargs))
    return merged if out is None else copy_checked(out, merged)
