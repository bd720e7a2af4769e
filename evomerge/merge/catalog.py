"""The merge-method catalog: every method's parameters, ranges and model counts, as plain data (no torch).

The controller (search spaces, config checks, mergekit import) reads this catalog without loading
torch; the tensor functions in `_methods` attach themselves to their entries (`MethodSpec.fn`) when
the tensor side is imported. A method's registry id is its function's name.

The task-vector family is one table, `TASK_VECTOR_METHODS`: mergekit's generalized task arithmetic

    merged = base + lambda_ * sum_i(w_i * m_i * sparse(d_i)) / (normalize ? sum_i(w_i * m_i) : 1)

parameterised by its sparsifier, sign election (m_i: the sign-agreement mask), normalize and the L1
rescale of the kept entries. Each row gives mergekit's defaults for its `normalize` and `rescale`
switches; a recipe may set them (mergekit's bio-merge example runs ties with `normalize: false`).
Adding a method of this family is one row.

Parameter ranges are the values a search may take (and the ranges search configs are checked
against): weight in [-1, 2] (negative subtracts a task vector, Ilharco et al.'s negation; above 1
amplifies), linear's weight in [0, 1] (it is normalized, so only ratios matter), density in (0, 1],
lambda_ in [0, 2], gamma in [0, 0.5], epsilon in [0, 0.5), t in [0, 1]. A merge itself accepts the
wider `limits` where the formula is defined for them (any finite weight, lambda_ or t, as mergekit
does), so a mergekit config with `weight: 3` runs; `MethodSpec.check` keeps the search ranges.
Defaults follow mergekit (density 1, gamma 0.01, epsilon 0.15, lambda 1) and 1.0 for weight, which
mergekit requires explicitly.

mergekit 0.1.5's newer methods keep mergekit's parameter names and defaults, with search ranges where
they have parameters: nuslerp and multislerp weight (per model), multislerp eps, karcher max_iter in
[1, 50] and tol, sce select_topk in [0, 1], nearswap t in [0, 0.01] (a distance in weight units; mergekit
requires it, 1e-4 here), ram / ramplus_tl epsilon in [0, 1e-3] (default 1e-5), ramplus_tl r and alpha in
[0, 1], passthrough scale in [0, 2].

Spectral methods (no mergekit counterpart), searchable: tsv_merge (TSV-Merge, Gargiulo et al. 2025),
iso_c and iso_cts (Marczak et al. 2025), each with a per-model weight in [-1, 2] and lambda_ in [0, 2]
(the papers' scaling coefficient alpha; FusionBench runs Iso-C/CTS at 1.5, TSV-Merge at 1); iso_cts also
common_space_fraction in [0, 1] (0.8 in the paper).

Switches are mergekit's boolean options (normalize, rescale, filter_wise, int8_mask): 0.0 or 1.0 in a
recipe, never searched, and not listed among a method's parameters.
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
Resolved: TypeAlias = dict[str, float | list[float] | bool]  # per-model -> one float per model; switches bool
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
    limits: tuple[float, float] | None = None  # what a merge accepts, when wider than [low, high] (inclusive)

    def interval(self) -> str:
        """The valid range in interval notation, e.g. '(0, 1]'."""
        left = "[" if self.low_inclusive else "("
        right = "]" if self.high_inclusive else ")"
        return f"{left}{self.low:g}, {self.high:g}{right}"

    def contains(self, value: float) -> bool:
        above = value >= self.low if self.low_inclusive else value > self.low
        below = value <= self.high if self.high_inclusive else value < self.high
        return above and below  # False for NaN

    def accepts(self, value: float, *, strict: bool = True) -> bool:
        """In the search range (strict), or within the wider `limits` a merge accepts."""
        if strict or self.limits is None:
            return self.contains(value)
        return self.limits[0] <= value <= self.limits[1]  # False for NaN

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
    switches: tuple[Switch, ...] = ()  # mergekit's boolean options (module docstring)

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

    def check(self, params: Mapping[str, ParamValue], n_models: int, *, strict: bool = True) -> None:
        """Raise MergeParamError (one line: method, parameter, value, allowed range, fix) on any
        wrong model count, unknown parameter name, out-of-range value or broken constraint.
        strict: values must lie in the search ranges; otherwise in the wider limits a merge accepts."""
        self.resolve(params, n_models, strict=strict)

    def switch(self, name: str) -> Switch:
        """The Switch called `name`; KeyError if this method has none."""
        for s in self.switches:
            if s.name == name:
                return s
        raise KeyError(f"{self.name} has no switch {name!r}")

    def resolve(self, params: Mapping[str, ParamValue], n_models: int, *, strict: bool = False) -> Resolved:
        """Values checked against what a merge accepts (the limits; strict: the search ranges), with
        defaults filled in: a list of n_models floats for per-model params, and each switch as a bool."""
        self._check_model_count(n_models)
        self._check_names(params)
        resolved = {p.name: _resolve_one(self.name, p, params.get(p.name, p.default), n_models, strict) for p in self.params}
        resolved |= {s.name: _switch_value(self.name, s, params.get(s.name, s.default)) for s in self.switches}
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
        switches = [s.name for s in self.switches]
        for name in params:
            if name not in known and name not in switches:
                close = difflib.get_close_matches(name, known + switches, n=3, cutoff=0.5)
                hint = f" (did you mean: {', '.join(close)}?)" if close else ""
                takes = ", ".join(known) if known else "no parameters"
                raise MergeParamError(f"{self.name}: unknown parameter {name!r}{hint}; {self.name} takes: {takes}")


@cache
def _parameters(fn: Callable[..., Any]) -> frozenset[str]:
    import inspect

    return frozenset(inspect.signature(fn).parameters)


def _models(count: int | None) -> str:
    return "model" if count == 1 else "models"


@dataclass(frozen=True)
class Switch:
    """A boolean option of a method (mergekit's normalize, rescale, filter_wise, int8_mask): 0 or 1 in a recipe."""

    name: str
    default: bool
    effect: bool = True  # False: accepted for mergekit compatibility, changes nothing (int8_mask)


def _switch_value(method: str, switch: Switch, value: Any) -> bool:
    if isinstance(value, bool) or value in (0, 1, 0.0, 1.0):
        return bool(value)
    raise MergeParamError(f"{method}: {switch.name} = {value!r}; {switch.name} is a switch: give true or false (1 or 0)")


def _resolve_one(method: str, spec: ParamSpec, value: ParamValue, n_models: int, strict: bool = True) -> float | list[float]:
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
        if not spec.accepts(v, strict=strict):
            where = f" for models[{index}]" if isinstance(values, list) else ""
            if strict or spec.limits is None:
                raise MergeParamError(
                    f"{method}: {spec.name} = {v!r}{where}; {spec.name} must be in {spec.interval()}; {spec.fix(v)}"
                )
            low, high = spec.limits
            raise MergeParamError(f"{method}: {spec.name} = {v!r}{where}; {spec.name} must be in [{low:g}, {high:g}]; use a value inside it")
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

FINITE = (-1e30, 1e30)  # limits of parameters whose formula takes any finite value
WEIGHT = ParamSpec("weight", -1.0, 2.0, 1.0, per_model=True, limits=FINITE)
DENSITY = ParamSpec("density", 0.0, 1.0, 1.0, per_model=True, low_inclusive=False)
LAMBDA = ParamSpec("lambda_", 0.0, 2.0, 1.0, per_model=False, limits=FINITE)
GAMMA = ParamSpec("gamma", 0.0, 0.5, 0.01, per_model=True, limits=(0.0, 1.0))
EPSILON = ParamSpec("epsilon", 0.0, 0.5, 0.15, per_model=True, high_inclusive=False)

RAM_EPSILON = ParamSpec("epsilon", 0.0, 1e-3, 1e-5, per_model=False, limits=(0.0, 1e30))  # RAM: |d| above it counts

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
    normalize: bool  # default of the normalize switch: divide by the (agreeing) weights' sum
    rescale: bool  # default of the rescale switch: L1 rescale of the kept entries back to the task vector's norm
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
    if sum(values["weight"]) != 0 or not values.get("normalize", True):
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
    switches = (Switch("normalize", row.normalize), Switch("rescale", row.rescale), Switch("int8_mask", False, effect=False))
    return MethodSpec(name, None, (WEIGHT, *sparsifier.params, LAMBDA), True, random=sparsifier.random,
                      constraints=sparsifier.constraints, switches=switches)


METHODS: dict[str, MethodSpec] = {
    **{name: _task_vector_spec(name, row) for name, row in TASK_VECTOR_METHODS.items()},
    "linear": MethodSpec("linear", None, (ParamSpec("weight", 0.0, 1.0, 1.0, per_model=True, limits=FINITE),), True,
                         constraints=(_weights_not_all_zero,), switches=(Switch("normalize", True),)),
    "slerp": MethodSpec("slerp", None, (ParamSpec("t", 0.0, 1.0, 0.5, per_model=False, limits=FINITE),), True, max_models=1),
    "model_stock": MethodSpec("model_stock", None, (), True, min_models=2, switches=(Switch("filter_wise", False),)),
    # mergekit 0.1.5's newer methods (mergekit's parameter names; `use_base` false: the base is only the
    # template, and the method works on the sources' weights, as mergekit does without base_model)
    "nuslerp": MethodSpec("nuslerp", None, (WEIGHT,), True, min_models=2, max_models=2, switches=(
        Switch("nuslerp_row_wise", False), Switch("nuslerp_flatten", True), Switch("use_base", True))),
    "multislerp": MethodSpec("multislerp", None, (WEIGHT, ParamSpec("eps", 0.0, 1e-4, 1e-8, per_model=False, limits=(0.0, 1.0))),
                             True, switches=(Switch("normalize_weights", True), Switch("use_base", True))),
    "karcher": MethodSpec("karcher", None, (ParamSpec("max_iter", 1.0, 50.0, 10.0, per_model=False, limits=(0.0, 1e6)),
                                            ParamSpec("tol", 0.0, 1e-3, 1e-5, per_model=False, limits=(0.0, 1.0))), True),
    "sce": MethodSpec("sce", None, (ParamSpec("select_topk", 0.0, 1.0, 1.0, per_model=False),), True,
                      switches=(Switch("int8_mask", False, effect=False),)),
    "arcee_fusion": MethodSpec("arcee_fusion", None, (), True, max_models=1),
    "nearswap": MethodSpec("nearswap", None, (ParamSpec("t", 0.0, 0.01, 0.0001, per_model=False, limits=(0.0, 1e30)),), True, max_models=1),
    "ram": MethodSpec("ram", None, (RAM_EPSILON,), True),
    "ramplus_tl": MethodSpec("ramplus_tl", None, (ParamSpec("r", 0.0, 1.0, 0.1, per_model=False, limits=FINITE),
                                                  ParamSpec("alpha", 0.0, 1.0, 0.2, per_model=False, limits=FINITE), RAM_EPSILON), True),
    "passthrough": MethodSpec("passthrough", None, (ParamSpec("scale", 0.0, 2.0, 1.0, per_model=True, limits=FINITE),), True, max_models=1),
    # spectral merges (module docstring): per 2-D tensor an SVD of the task vectors; no mergekit counterpart
    "tsv_merge": MethodSpec("tsv_merge", None, (WEIGHT, LAMBDA), True),
    "iso_c": MethodSpec("iso_c", None, (WEIGHT, LAMBDA), True),
    "iso_cts": MethodSpec("iso_cts", None, (WEIGHT, ParamSpec("common_space_fraction", 0.0, 1.0, 0.8, per_model=False), LAMBDA), True),
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
