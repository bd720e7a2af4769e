"""The merge-method catalog: every method's parameters, ranges and model counts, as plain data (no torch).

The controller (search spaces, config checks, mergekit import) reads this catalog without loading
torch; the tensor functions in `_methods` attach themselves to their entries (`MethodSpec.fn`) when
the tensor side is imported. A method's registry id is its function's name.

The task-vector family is one table, `TASK_VECTOR_METHODS`: mergekit's generalized task arithmetic

    merged = base + lambda_ * sum_i(w_i * m_i * sparse(d_i)) / (normalize ? sum_i(w_i * m_i) : 1)

parameterised by its sparsifier, sign election (m_i: the sign-agreement mask), normalize and the L1
rescale of the kept entries; mergekit's `normalize` / `rescale` flags are fixed per method to mergekit's
defaults. Adding a method of this family is one row.

Parameter ranges are the valid values and the default search bounds: weight in [-1, 2] (negative
subtracts a task vector, Ilharco et al.'s negation; above 1 amplifies), linear's weight in [0, 1]
(it is normalized, so only ratios matter), density in (0, 1], lambda_ in [0, 2], gamma in [0, 0.5],
epsilon in [0, 0.5), t in [0, 1]. Defaults follow mergekit (density 1, gamma 0.01, epsilon 0.15,
lambda 1) and 1.0 for weight, which mergekit requires explicitly.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal, TypeAlias

from evomerge.errors import ConfigError

ParamValue: TypeAlias = Any  # a float, a sequence of floats (one per model), or a tensor of them
Resolved: TypeAlias = dict[str, float | list[float]]  # per-model -> one float per model
# A cross-parameter rule: gets resolved values and the model count, returns an error text or None.
Constraint: TypeAlias = Callable[[Resolved, int], str | None]


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
    """A merge method: its function (bound when the tensor side is imported), parameters and model counts."""

    name: str  # registry id == function name (e.g. "ties", "dare_ties")
    fn: Callable[..., Any] | None
    params: tuple[ParamSpec, ...]
    needs_base: bool  # every method here works on deltas from a base; kept for clarity
    min_models: int = 1  # number of source (non-base) models allowed
    max_models: int | None = None
    random: bool = False  # draws uniforms from `noise` (dare_*, della*)
    constraints: tuple[Constraint, ...] = ()

    @property
    def uses_stats(self) -> bool:
        """Takes `stats` (a DeltaStats): sparsifiers, whose edges can be precomputed."""
        return self.fn is not None and "stats" in _parameters(self.fn)

    @property
    def writes_out(self) -> bool:
        """Takes `out`: writes the merged tensor straight into the caller's tensor."""
        return self.fn is not None and "out" in _parameters(self.fn)

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


@cache
def _parameters(fn: Callable[..., Any]) -> frozenset[str]:
    import inspect

    return frozenset(inspect.signature(fn).parameters)


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
        if hasattr(value, "tolist"):  # a tensor or array: 0-d -> float, (E,) -> list
            value = value.tolist()
        if isinstance(value, Sequence) and not isinstance(value, str):
            return [float(v) for v in value]
        return float(value)
    except (TypeError, ValueError):
        raise MergeParamError(f"{method}: {name} = {value!r}; {name} must be a number or a list of numbers") from None


# --- the catalog ------------------------------------------------------------------------------------

WEIGHT = ParamSpec("weight", -1.0, 2.0, 1.0, per_model=True)
DENSITY = ParamSpec("density", 0.0, 1.0, 1.0, per_model=True, low_inclusive=False)
LAMBDA = ParamSpec("lambda_", 0.0, 2.0, 1.0, per_model=False)
GAMMA = ParamSpec("gamma", 0.0, 0.5, 0.01, per_model=True)
EPSILON = ParamSpec("epsilon", 0.0, 0.5, 0.15, per_model=True, high_inclusive=False)

Sparsifier = Literal["none", "top_magnitude", "random", "middle_magnitude", "rank_sampled"]


def _della_window(values: Resolved, n_models: int) -> str | None:
    """mergekit raises unless density - epsilon > 0 and density + epsilon < 1 (density < 1 only)."""
    for index, (d, eps) in enumerate(zip(values["density"], values["epsilon"])):
        if d < 1 and not (d - eps > 0 and d + eps < 1):
            where = f" for models[{index}]" if n_models > 1 else ""
            return (
                f"density = {d!r}, epsilon = {eps!r}{where}; density - epsilon and density + epsilon must lie "
                f"in (0, 1); lower epsilon below {min(d, 1 - d):g}"
            )
    return None


@dataclass(frozen=True)
class SparsifierSpec:
    """What a sparsifier takes, whether it draws uniforms, and the rules its values must keep."""

    params: tuple[ParamSpec, ...]
    random: bool = False
    constraints: tuple[Constraint, ...] = ()


SPARSIFIERS: dict[str, SparsifierSpec] = {
    "none": SparsifierSpec(()),
    "top_magnitude": SparsifierSpec((DENSITY,)),  # TIES trim: the top-density magnitudes per model
    "random": SparsifierSpec((DENSITY,), random=True),  # DARE drop
    "middle_magnitude": SparsifierSpec((DENSITY, GAMMA)),  # Breadcrumbs: drop the gamma largest and the smallest
    "rank_sampled": SparsifierSpec((DENSITY, EPSILON), random=True, constraints=(_della_window,)),  # DELLA MagPrune
}


@dataclass(frozen=True)
class TaskVectorMethod:
    """One row of the task-vector family (module docstring): sparsify, weight, elect, sum, normalize."""

    sparsifier: Sparsifier
    elect_sign: bool  # TIES sign election (mergekit consensus "sum")
    normalize: bool  # divide by the (agreeing) weights' sum
    rescale: bool  # L1 rescale of the kept entries back to the task vector's norm
    paper: str  # the docstring of the generated method


TASK_VECTOR_METHODS: dict[str, TaskVectorMethod] = {
    "task_arithmetic": TaskVectorMethod("none", False, False, False, "Task arithmetic (Ilharco et al. 2023): base + lambda_ * sum_i w_i d_i."),
    "ties": TaskVectorMethod("top_magnitude", True, True, False, "TIES-Merging (Yadav et al. 2023): trim to the top-density magnitudes per model, elect the sign of sum_i w_i d_i per entry, average the agreeing weighted deltas (divided by their weights)."),
    "dare_ties": TaskVectorMethod("random", True, False, True, "DARE (Yu et al. 2024) drop-and-rescale, then TIES sign election; not normalized (mergekit)."),
    "dare_linear": TaskVectorMethod("random", False, False, True, "DARE (Yu et al. 2024) drop-and-rescale, then task arithmetic."),
    "breadcrumbs": TaskVectorMethod("middle_magnitude", False, False, False, "Model Breadcrumbs (Davari & Belilovsky 2023): drop the gamma largest and the smallest magnitudes, keeping a density fraction, then task arithmetic."),
    "breadcrumbs_ties": TaskVectorMethod("middle_magnitude", True, False, False, "Model Breadcrumbs sparsification, then TIES sign election; not normalized (mergekit)."),
    "della": TaskVectorMethod("rank_sampled", True, True, True, "DELLA-Merging (Deep et al. 2024): MagPrune (keep probability rises with magnitude rank, density +- epsilon), L1 rescale, TIES sign election, normalized (mergekit)."),
    "della_linear": TaskVectorMethod("rank_sampled", False, False, True, "DELLA MagPrune and L1 rescale, then task arithmetic (no sign election, not normalized)."),
}


def _weights_not_all_zero(values: Resolved, n_models: int) -> str | None:
    if sum(values["weight"]) > 0:
        return None
    return (
        f"weight = {values['weight']}; the weights must not all be 0 (linear divides by their sum); "
        "raise one above 0"
    )


def _k_at_most_models(values: Resolved, n_models: int) -> str | None:
    if values["k"] <= n_models:
        return None
    return (
        f"k = {values['k']!r} with {n_models} models; k must be at most the number of models; "
        f"lower k to {n_models} or less"
    )


def _task_vector_spec(name: str, row: TaskVectorMethod) -> MethodSpec:
    sparsifier = SPARSIFIERS[row.sparsifier]
    return MethodSpec(name, None, (WEIGHT, *sparsifier.params, LAMBDA), True, random=sparsifier.random,
                      constraints=sparsifier.constraints)


METHODS: dict[str, MethodSpec] = {
    **{name: _task_vector_spec(name, row) for name, row in TASK_VECTOR_METHODS.items()},
    "linear": MethodSpec("linear", None, (ParamSpec("weight", 0.0, 1.0, 1.0, per_model=True),), True,
                         constraints=(_weights_not_all_zero,)),
    "slerp": MethodSpec("slerp", None, (ParamSpec("t", 0.0, 1.0, 0.5, per_model=False),), True, max_models=1),
    "model_stock": MethodSpec("model_stock", None, (), True, min_models=2),
    "consensus": MethodSpec(
        "consensus", None,
        (WEIGHT, ParamSpec("tall_lambda", 0.0, 1.0, 0.4, per_model=True), ParamSpec("k", 0.0, 8.0, 2.0, per_model=False), LAMBDA),
        True, min_models=2, constraints=(_k_at_most_models,),
    ),
}


def get_method(name: str) -> MethodSpec:
    """The catalogued method called `name`; unknown names get a did-you-mean error."""
    if name in METHODS:
        return METHODS[name]
    close = difflib.get_close_matches(name, list(METHODS), n=3, cutoff=0.5)
    if close:
        raise MergeParamError(f"unknown merge method {name!r} (did you mean: {', '.join(close)}?)")
    raise MergeParamError(f"unknown merge method {name!r}; known methods: {', '.join(sorted(METHODS))}")


def attach(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Bind a tensor function to its catalog entry (its name). Called once per method when the tensor
    side (`_methods`) is imported; the entry keeps its identity, so a spec held earlier sees its function."""
    spec = METHODS.get(fn.__name__)
    if spec is None:
        raise ValueError(f"merge method {fn.__name__!r} has no catalog entry; declare it in evomerge.merge.catalog")
    if spec.fn is not None:
        raise ValueError(f"merge method {fn.__name__!r} is implemented twice")
    object.__setattr__(spec, "fn", fn)  # frozen for users; bound here exactly once
    return fn
