"""Recipes: what one candidate is, as plain data that round-trips through YAML (no torch, no I/O).

Two kinds of candidate meet behind `CandidateRecipe`:

- `Recipe` (parameter.py): a merge of task vectors onto a base, per layer group (and tensor kind);
- `PathRecipe` (path.py): a data-flow path through the layers of several models (Akiba et al. 2024).

A merge recipe's `tokenizer` (`TokenizerSpec`, tokenizer.py) is mergekit's tokenizer settings: which
tokens the merged model has. Model references are strings; `MODEL+ADAPTER` is a LoRA source (refs.py).

Consumers that treat the kinds differently (building one into a worker's model, exporting it) dispatch
on the recipe's type in one registry each (`models.live`, `export.checkpoint`), never by `isinstance`
chains. Stored recipes tell their kind by `kind: path`; a merge recipe carries no kind.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from evomerge.errors import ConfigError
from evomerge.recipe.parameter import MERGE_KIND, OTHER, SPLIT_KINDS, Filtered, ParamValue, Plain, Recipe, check_kinds, yaml_mapping
from evomerge.recipe.path import PATH_KIND, PathRecipe, Slot
from evomerge.recipe.refs import is_lora, split_lora
from evomerge.recipe.tokenizer import TokenizerSpec, TokenSetting, TokenSource


@runtime_checkable
class CandidateRecipe(Protocol):
    """What every kind of candidate offers as data."""

    kind: str  # "merge" or "path"
    dtype: str  # an `evomerge.dtypes` name: the output dtype, or "auto" (each tensor keeps its own)

    @property
    def base_model(self) -> str:
        """The model this candidate is built on (a model card's base_model)."""
        ...

    def describe(self) -> str:
        """A few words for progress lines and tables: the method, or "path of N layers"."""
        ...

    def to_dict(self) -> dict[str, Any]: ...

    def to_yaml(self) -> str: ...


def recipe_from_dict(data: Mapping[str, Any]) -> Recipe | PathRecipe:
    """A stored recipe of either kind: `kind: path` is a PathRecipe, no kind a merge Recipe."""
    kind = data.get("kind")
    if kind is None:
        return Recipe.from_dict(data)
    if kind == PATH_KIND:
        return PathRecipe.from_dict(data)
    raise ConfigError(f"recipe error: kind = {kind!r}; allowed: {PATH_KIND} (a layer path), or no kind (a merge recipe)")


def recipe_from_yaml(text: str) -> Recipe | PathRecipe:
    return recipe_from_dict(yaml_mapping(text, "recipe error: expected a mapping (a merge recipe, or a path recipe with kind: path)"))


__all__ = [
    "MERGE_KIND", "OTHER", "PATH_KIND", "SPLIT_KINDS", "CandidateRecipe", "Filtered", "ParamValue", "PathRecipe", "Plain", "Recipe",
    "Slot", "TokenSetting", "TokenSource", "TokenizerSpec", "check_kinds", "is_lora", "recipe_from_dict", "recipe_from_yaml",
    "split_lora", "yaml_mapping",
]
