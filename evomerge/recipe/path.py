"""A PathRecipe: the plain-data description of one data-flow (layer path) model, round-tripping through YAML.

It names the models whose layers the path uses, the path itself as (model index, layer index, scale)
slots in running order, and the model whose embeddings, final norm and head the path model uses (the
final norm and head may come from another model, `head_from`, as in a mergekit passthrough whose last
slice is another model's; searches never set it). A slot's scale multiplies the hidden state entering
that slot. A stored path recipe carries `kind: path`.

Tensor scales (mergekit passthrough's `scale`, which frankenmerges use to damp repeated layers) multiply
a slot's weights themselves: `tensor_scales` has one value per slot, a number or a `Filtered` list by
the source tensor's name (`[{filter: o_proj, value: 0.5}, {value: 1}]`), and `end_scales` the
embeddings' and the final norm's and head's. Empty means 1 everywhere; searches never set them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from evomerge.errors import ConfigError, refuse_unknown_keys
from evomerge.recipe.parameter import Filtered, Value, value_from_data, value_to_data, yaml_mapping

PATH_KIND = "path"
_KEYS = ("kind", "models", "embed_from", "dtype", "slots", "head_from", "tensor_scales", "end_scales")

Slot = tuple[int, int, float]  # (model index, layer index, scale of the hidden state entering the slot)


@dataclass(frozen=True)
class PathRecipe:
    models: tuple[str, ...]
    slots: tuple[Slot, ...]
    embed_from: int = 0  # index into `models`: embeddings, final norm and head come from this model
    dtype: str = "auto"
    head_from: int | None = None  # index into `models` of the final norm and head, when not embed_from
    tensor_scales: tuple[Value, ...] = ()  # per slot: a factor on its weights (module docstring); () = 1
    end_scales: tuple[Value, ...] = ()  # (embeddings, final norm and head) factors; () = 1

    def __post_init__(self) -> None:
        if not self.models:
            raise ConfigError("path recipe error: models is empty; name at least one model")
        if not self.slots:
            raise ConfigError("path recipe error: slots is empty; a path runs at least one layer")
        if not 0 <= self.embed_from < len(self.models):
            raise ConfigError(f"path recipe error: embed_from = {self.embed_from}; use a model index in 0..{len(self.models) - 1}")
        if self.tensor_scales and len(self.tensor_scales) != len(self.slots):
            raise ConfigError(f"path recipe error: {len(self.tensor_scales)} tensor_scales for {len(self.slots)} slots; give one per slot or none")
        if self.end_scales and len(self.end_scales) != 2:
            raise ConfigError("path recipe error: end_scales takes two values (embeddings; final norm and head) or none")
        if self.head_from is not None and not 0 <= self.head_from < len(self.models):
            raise ConfigError(f"path recipe error: head_from = {self.head_from}; use a model index in 0..{len(self.models) - 1}")
        for i, (model, layer, scale) in enumerate(self.slots):
            if not 0 <= model < len(self.models) or layer < 0:
                raise ConfigError(f"path recipe error: slots[{i}] = {[model, layer, scale]}; model must be in 0..{len(self.models) - 1} and layer >= 0")
            if not (math.isfinite(scale) and scale > 0):
                raise ConfigError(f"path recipe error: slots[{i}] scale = {scale}; a scale must be positive and finite to fold into the weights")

    kind = PATH_KIND

    @property
    def base_model(self) -> str:
        """The model whose embeddings and head the path uses: what a model card names as its base."""
        return self.models[self.embed_from]

    def describe(self) -> str:
        return f"path of {len(self.slots)} layers"

    @property
    def head_model(self) -> int:
        """The index of the model whose final norm and head the path uses."""
        return self.embed_from if self.head_from is None else self.head_from

    def tensor_scale(self, slot: int | str, name: str) -> float:
        """The factor on tensor `name` (its source name) of slot `slot`, or of "embed" / "head" tensors."""
        if isinstance(slot, str):
            values = self.end_scales
            value = values[0 if slot == "embed" else 1] if values else 1.0
        else:
            value = self.tensor_scales[slot] if self.tensor_scales else 1.0
        return value.value_for(name) if isinstance(value, Filtered) else value

    @property
    def scaled(self) -> bool:
        """True when some slot scales its input (then no mergekit passthrough YAML can express it)."""
        return any(scale != 1.0 for _, _, scale in self.slots)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "kind": PATH_KIND,
            "models": list(self.models),
            "embed_from": self.embed_from,
            "dtype": self.dtype,
            "slots": [[m, layer, scale] for m, layer, scale in self.slots],
        }
        if self.head_from is not None:
            out["head_from"] = self.head_from
        if self.tensor_scales:
            out["tensor_scales"] = [value_to_data(v) for v in self.tensor_scales]
        if self.end_scales:
            out["end_scales"] = [value_to_data(v) for v in self.end_scales]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PathRecipe:
        refuse_unknown_keys(data, _KEYS, "path recipe")
        try:
            slots = tuple(_slot(i, s) for i, s in enumerate(data["slots"]))
            return cls(
                models=tuple(str(m) for m in data["models"]),
                slots=slots,
                embed_from=int(data.get("embed_from", 0)),
                dtype=str(data.get("dtype", "auto")),
                head_from=None if data.get("head_from") is None else int(data["head_from"]),
                tensor_scales=tuple(value_from_data(v, "tensor_scales") for v in data.get("tensor_scales") or ()),
                end_scales=tuple(value_from_data(v, "end_scales") for v in data.get("end_scales") or ()),
            )
        except KeyError as exc:
            raise ConfigError(f"path recipe error: required key {exc.args[0]!r} is missing") from None

    def to_yaml(self) -> str:
        # Flow style for the innermost lists keeps one slot per line: `- [1, 3, 0.75]`.
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    @classmethod
    def from_yaml(cls, text: str) -> PathRecipe:
        return cls.from_dict(yaml_mapping(text, "path recipe error: expected a mapping with kind, models, slots"))


def _slot(index: int, slot: Any) -> Slot:
    if not isinstance(slot, (list, tuple)) or len(slot) != 3:
        raise ConfigError(f"path recipe error: slots[{index}] = {slot!r}; write each slot as [model index, layer index, scale]")
    model, layer, scale = slot
    return int(model), int(layer), float(scale)

