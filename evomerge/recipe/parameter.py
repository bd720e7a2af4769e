"""A Recipe: the plain-data description of one merge, round-tripping through YAML.

It names the method, the base and source models, and the method's parameters for each layer group
(per-model parameters as one value per source, global parameters as one float). Random methods draw
uniforms hashed from `seed`, the tensor's name and each entry's index, so a recipe rebuilds the same
tensors anywhere, on any device.

Per tensor kind. With `kinds` (e.g. `("attention", "mlp", "other")`) each layer group has one parameter
mapping per kind, and `groups` holds them flat, layer group major: `groups[g * len(kinds) + k]`. The last
kind is always "other": every tensor whose kind is not listed before it (norms, embeddings, head, and
MLP tensors when only attention is split out). In YAML a split recipe lists `kinds:` and writes each
group as `{attention: {...}, mlp: {...}, other: {...}}`; a recipe without `kinds` reads and writes as before.

Per tensor name. A value may also be a `Filtered` list, mergekit's conditional parameter: the first
condition whose filter is a substring of the tensor's name gives the value, and the last condition has
no filter (every other tensor). In YAML it is mergekit's own spelling, `[{filter: o_proj, value: 0.3},
{value: 0.5}]`, for one model or for all. Imported mergekit configs use it for filters that are not a
tensor kind (o_proj, lm_head, embed_tokens, norms) and for tensors whose value differs from their layer
group's (the final norm and head of a gradient, which mergekit evaluates at the gradient's start).

Arithmetic. `mergekit_dtype` None (the default) is evomerge's arithmetic: fp32 task vectors, one rounding
to `dtype` at the end. A dtype name asks for mergekit's: inputs cast to that dtype and each method
computed in it in mergekit's own order (mergekit YAML's `dtype:`; "auto": the inputs' promoted dtype,
as mergekit does without one), for merges that must equal mergekit's.

Vocabulary. `tokenizer` (a `TokenizerSpec`, mergekit's tokenizer settings) says which tokens the merged
model has and how each model's embedding and head rows are aligned to them (`recipe.tokenizer`); None is
the default: rows merged by index where every model has the base's vocabulary shape, else the union.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from evomerge.errors import ConfigError, refuse_unknown_keys
from evomerge.recipe.tokenizer import TokenizerSpec




@dataclass(frozen=True)
class Filtered:
    """mergekit's conditional parameter: ((filter or None, value), ...); the last condition has no filter."""

    conditions: tuple[tuple[str | None, float], ...]

    def __post_init__(self) -> None:
        if not self.conditions or self.conditions[-1][0] is not None:
            raise ConfigError(
                f"recipe error: filter list {self.to_data()}; end it with a condition without filter (the value for every other tensor)"
            )

    def value_for(self, name: str) -> float:
        """The value for tensor `name`: the first condition whose filter is in the name."""
        return next(v for f, v in self.conditions if f is None or f in name)

    @property
    def values(self) -> tuple[float, ...]:
        return tuple(v for _, v in self.conditions)

    def to_data(self) -> list[dict[str, Any]]:
        return [{"value": v} if f is None else {"filter": f, "value": v} for f, v in self.conditions]


Value = float | Filtered  # one model's value, or one for all models
ParamValue = Value | tuple[Value, ...]
Plain = float | tuple[float, ...]  # a ParamValue for one tensor: filters resolved
SPLIT_KINDS = ("attention", "mlp")  # kinds that can have their own parameters; "other" takes the rest
OTHER = "other"
MERGE_KIND = "merge"  # a stored merge recipe carries no `kind:` key (recipes written before paths existed)
_KEYS = ("method", "base", "sources", "seed", "dtype", "kinds", "groups", "mergekit_dtype", "tokenizer")


@dataclass(frozen=True)
class Recipe:
    method: str
    base: str
    sources: tuple[str, ...]
    groups: tuple[Mapping[str, ParamValue], ...]  # per layer group (x per kind when `kinds`), in layer order
    seed: int = 0
    dtype: str = "auto"
    kinds: tuple[str, ...] = ()  # () = one mapping per layer group for every tensor
    mergekit_dtype: str | None = None  # None: evomerge's arithmetic; else mergekit's, in this dtype (module docstring)
    tokenizer: TokenizerSpec | None = None  # the merged vocabulary (module docstring); None: the default

    def __post_init__(self) -> None:
        if self.kinds:
            check_kinds(self.kinds, "recipe error: kinds")
        if not self.groups:
            raise ConfigError("recipe error: groups is empty; give one parameter mapping per layer group")
        if len(self.groups) % max(1, len(self.kinds)):
            raise ConfigError(
                f"recipe error: {len(self.groups)} parameter groups for {len(self.kinds)} kinds; "
                "give one mapping per kind in every layer group"
            )

    kind = MERGE_KIND

    @property
    def base_model(self) -> str:
        return self.base

    def describe(self) -> str:
        return self.method

    @property
    def n_groups(self) -> int:
        """The number of layer groups."""
        return len(self.groups) // max(1, len(self.kinds))

    def slot(self, layer_group: int, kind: str) -> int:
        """Index into `groups` of the parameters for tensors of `kind` (a `layout.tensor_kind`) in `layer_group`."""
        if not self.kinds:
            return layer_group
        k = self.kinds.index(kind) if kind in self.kinds else len(self.kinds) - 1
        return layer_group * len(self.kinds) + k

    @property
    def filtered(self) -> bool:
        """Whether some value depends on the tensor's name (a `Filtered` list)."""
        return any(_has_filter(v) for group in self.groups for v in group.values())

    def params_for(self, slot: int, name: str) -> Mapping[str, Plain]:
        """The parameters of `groups[slot]` for tensor `name`, filter lists resolved."""
        group = self.groups[slot]
        if not any(_has_filter(v) for v in group.values()):
            return group
        return {k: _plain(v, name) for k, v in group.items()}

    def variants(self, slot: int) -> list[Mapping[str, Plain]]:
        """Plain mappings that together take every value of `groups[slot]`'s filter lists (to check ranges)."""
        group = self.groups[slot]
        width = max((len(_filters_in(v)[0].conditions) for v in group.values() if _has_filter(v)), default=1)
        return [{k: _plain_at(v, i) for k, v in group.items()} for i in range(width)]

    def layer_group(self, g: int) -> tuple[Mapping[str, ParamValue], ...]:
        """The parameter mappings of layer group `g`, one per kind (one in all when the recipe has no kinds)."""
        width = max(1, len(self.kinds))
        return self.groups[g * width:(g + 1) * width]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method, "base": self.base, "sources": list(self.sources), "seed": self.seed, "dtype": self.dtype}
        if self.mergekit_dtype is not None:
            out["mergekit_dtype"] = self.mergekit_dtype
        if self.tokenizer is not None:
            out["tokenizer"] = self.tokenizer.to_data()
        if not self.kinds:
            out["groups"] = [_group_to_dict(g) for g in self.groups]
            return out
        out["kinds"] = list(self.kinds)
        out["groups"] = [
            {kind: _group_to_dict(p) for kind, p in zip(self.kinds, self.layer_group(g))} for g in range(self.n_groups)
        ]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        refuse_unknown_keys(data, _KEYS, "recipe")
        try:
            kinds = tuple(str(k) for k in data.get("kinds") or ())
            if kinds:
                check_kinds(kinds, "recipe error: kinds")
            groups = _groups_from_dict(data["groups"], kinds)
            return cls(
                method=str(data["method"]),
                base=str(data["base"]),
                sources=tuple(str(s) for s in data["sources"]),
                groups=groups,
                seed=int(data.get("seed", 0)),
                dtype=str(data.get("dtype", "auto")),
                kinds=kinds,
                mergekit_dtype=None if data.get("mergekit_dtype") is None else str(data["mergekit_dtype"]),
                tokenizer=None if data.get("tokenizer") is None else TokenizerSpec.from_data(data["tokenizer"], "recipe tokenizer"),
            )
        except KeyError as exc:
            raise ConfigError(f"recipe error: required key {exc.args[0]!r} is missing") from None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> Recipe:
        return cls.from_dict(yaml_mapping(text, "recipe error: expected a mapping with method, base, sources, groups"))


def yaml_mapping(text: str, error: str) -> Mapping[str, Any]:
    """The mapping a YAML text holds; ConfigError(`error`) for anything else."""
    data = yaml.safe_load(text)
    if not isinstance(data, Mapping):
        raise ConfigError(error)
    return data


def check_kinds(kinds: Sequence[str], where: str) -> None:
    """Kinds are some of attention, mlp, in that order, then other (one-line ConfigError otherwise)."""
    kinds = tuple(kinds)
    split = kinds[:-1]
    if kinds[-1:] != (OTHER,) or not split or split != tuple(k for k in SPLIT_KINDS if k in split):
        raise ConfigError(
            f"{where} = {list(kinds)}; write attention and/or mlp, in that order, then other "
            "(other: every tensor of a kind not listed), e.g. [attention, mlp, other]"
        )


def _has_filter(value: ParamValue) -> bool:
    return isinstance(value, Filtered) or isinstance(value, tuple) and any(isinstance(v, Filtered) for v in value)


def _filters_in(value: ParamValue) -> list[Filtered]:
    return [v for v in (value if isinstance(value, tuple) else (value,)) if isinstance(v, Filtered)]


def _plain(value: ParamValue, name: str) -> Plain:
    if isinstance(value, tuple):
        return tuple(v.value_for(name) if isinstance(v, Filtered) else v for v in value)
    return value.value_for(name) if isinstance(value, Filtered) else value


def _plain_at(value: ParamValue, i: int) -> Plain:
    """Condition i of each filter list (its last where it has fewer)."""
    def one(v: Value) -> float:
        return v.values[min(i, len(v.values) - 1)] if isinstance(v, Filtered) else v
    return tuple(one(v) for v in value) if isinstance(value, tuple) else one(value)


def value_to_data(value: Value) -> Any:
    """One value as YAML data: a number, or mergekit's list of {filter, value} mappings."""
    return value.to_data() if isinstance(value, Filtered) else value


def value_from_data(data: Any, where: str) -> Value:
    """`value_to_data` backwards."""
    return _filtered_from_data(data, where) if _is_condition_list(data) else float(data)


def _group_to_dict(group: Mapping[str, ParamValue]) -> dict[str, Any]:
    return {k: [value_to_data(x) for x in v] if isinstance(v, tuple) else value_to_data(v) for k, v in group.items()}


def _groups_from_dict(groups: Any, kinds: tuple[str, ...]) -> tuple[dict[str, ParamValue], ...]:
    if not kinds:
        return tuple(_group_from_dict(g) for g in groups)
    out = []
    for index, group in enumerate(groups):
        if not isinstance(group, Mapping) or sorted(group) != sorted(kinds):
            got = sorted(group) if isinstance(group, Mapping) else group
            raise ConfigError(f"recipe error: groups[{index}] has kinds {got}; with kinds: {list(kinds)} give one parameter mapping per kind")
        out += [_group_from_dict(group[kind]) for kind in kinds]
    return tuple(out)


def _group_from_dict(group: Mapping[str, Any]) -> dict[str, ParamValue]:
    out: dict[str, ParamValue] = {}
    for key, value in group.items():
        if _is_condition_list(value):
            out[str(key)] = _filtered_from_data(value, str(key))
        elif isinstance(value, Sequence) and not isinstance(value, str):
            out[str(key)] = tuple(_filtered_from_data(v, str(key)) if _is_condition_list(v) else float(v) for v in value)
        else:
            out[str(key)] = float(value)
    return out


def _is_condition_list(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str) and bool(value) and all(isinstance(v, Mapping) for v in value)


def _filtered_from_data(items: Sequence[Mapping[str, Any]], where: str) -> Filtered:
    conditions = []
    for item in items:
        refuse_unknown_keys(item, ("filter", "value"), f"recipe {where}")
        filt = item.get("filter")
        conditions.append((None if filt is None else str(filt), float(item["value"])))
    return Filtered(tuple(conditions))
