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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from evomerge.errors import ConfigError, refuse_unknown_keys

ParamValue = float | tuple[float, ...]
SPLIT_KINDS = ("attention", "mlp")  # kinds that can have their own parameters; "other" takes the rest
OTHER = "other"
MERGE_KIND = "merge"  # a stored merge recipe carries no `kind:` key (recipes written before paths existed)
_KEYS = ("method", "base", "sources", "seed", "dtype", "kinds", "groups")


@dataclass(frozen=True)
class Recipe:
    method: str
    base: str
    sources: tuple[str, ...]
    groups: tuple[Mapping[str, ParamValue], ...]  # per layer group (x per kind when `kinds`), in layer order
    seed: int = 0
    dtype: str = "auto"
    kinds: tuple[str, ...] = ()  # () = one mapping per layer group for every tensor

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

    def layer_group(self, g: int) -> tuple[Mapping[str, ParamValue], ...]:
        """The parameter mappings of layer group `g`, one per kind (one in all when the recipe has no kinds)."""
        width = max(1, len(self.kinds))
        return self.groups[g * width:(g + 1) * width]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method, "base": self.base, "sources": list(self.sources), "seed": self.seed, "dtype": self.dtype}
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


def _group_to_dict(group: Mapping[str, ParamValue]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in group.items()}


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
        out[str(key)] = tuple(float(v) for v in value) if isinstance(value, Sequence) else float(value)
    return out
