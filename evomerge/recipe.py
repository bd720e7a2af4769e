"""A Recipe: the plain-data description of one merge, round-tripping through YAML.

It names the method, the base and source models, and the method's parameters for each layer group
(per-model parameters as one value per source, global parameters as one float). Random methods draw
from a generator seeded by `seed` and the tensor's name, so a recipe rebuilds the same tensors anywhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from evomerge.errors import ConfigError

ParamValue = float | tuple[float, ...]


@dataclass(frozen=True)
class Recipe:
    method: str
    base: str
    sources: tuple[str, ...]
    groups: tuple[Mapping[str, ParamValue], ...]  # one parameter mapping per layer group, in layer order
    seed: int = 0
    dtype: str = "auto"

    @property
    def n_groups(self) -> int:
        return len(self.groups)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "base": self.base,
            "sources": list(self.sources),
            "seed": self.seed,
            "dtype": self.dtype,
            "groups": [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in self.groups],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        unknown = set(data) - {"method", "base", "sources", "seed", "dtype", "groups"}
        if unknown:
            raise ConfigError(f"recipe error: unknown key {sorted(unknown)[0]!r}; allowed: method, base, sources, seed, dtype, groups")
        try:
            groups = tuple(_group_from_dict(g) for g in data["groups"])
            return cls(
                method=str(data["method"]),
                base=str(data["base"]),
                sources=tuple(str(s) for s in data["sources"]),
                groups=groups,
                seed=int(data.get("seed", 0)),
                dtype=str(data.get("dtype", "auto")),
            )
        except KeyError as exc:
            raise ConfigError(f"recipe error: required key {exc.args[0]!r} is missing") from None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> Recipe:
        data = yaml.safe_load(text)
        if not isinstance(data, Mapping):
            raise ConfigError("recipe error: expected a mapping with method, base, sources, groups")
        return cls.from_dict(data)


def _group_from_dict(group: Mapping[str, Any]) -> dict[str, ParamValue]:
    out: dict[str, ParamValue] = {}
    for key, value in group.items():
        out[str(key)] = tuple(float(v) for v in value) if isinstance(value, Sequence) else float(value)
    return out
