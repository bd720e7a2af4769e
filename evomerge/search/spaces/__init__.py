"""Search spaces: map a point of the unit cube (or an Optuna trial's params) to a candidate's recipe.

Every space has `genes` (named, bounded floats or choices), `kind` (the kind of recipe it makes) and
`decode(values) -> recipe`. Spaces read the merge-method catalog but no model weights: the model
configs they need come from headers the caller has read.
"""

from __future__ import annotations

from typing import Protocol

from collections.abc import Mapping

from evomerge.config import LayerSwapSpaceConfig, ParameterSpaceConfig
from evomerge.recipe import PathRecipe, Recipe
from evomerge.search.spaces._genes import Gene, decode_unit, encode_unit
from evomerge.search.spaces._layer_swap import LayerSwapSpace
from evomerge.search.spaces._parameter import ParameterSpace, model_labels


class SearchSpace(Protocol):
    genes: list[Gene]
    kind: str  # the `kind` of the recipes decode makes ("merge" or "path")

    def decode(self, values: Mapping[str, float | str]) -> Recipe | PathRecipe: ...


def build_space(cfg, base: str, sources: list[str], n_layers: int, *, seed: int = 0,
                configs: Mapping[str, dict] | None = None) -> SearchSpace:
    """The search space a study config's `search_space` section describes. `configs`: each model's
    config.json (by reference), which a data-flow space checks; read from disk when not given."""
    if isinstance(cfg, ParameterSpaceConfig):
        return ParameterSpace(cfg, base, sources, n_layers, seed=seed)
    if isinstance(cfg, LayerSwapSpaceConfig):
        return LayerSwapSpace(cfg, base, sources, n_layers, seed=seed)
    from evomerge.search.spaces._dataflow import DataFlowSpace

    return DataFlowSpace(cfg, base, sources, n_layers, seed=seed, configs=configs)


__all__ = ["Gene", "LayerSwapSpace", "ParameterSpace", "SearchSpace", "build_space", "decode_unit", "encode_unit", "model_labels"]
