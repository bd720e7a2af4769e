"""Search spaces: map a point of the unit cube (or an Optuna trial's params) to a merge Recipe.

Every space has `genes` (named, bounded floats or choices) and `decode(values) -> Recipe`.
"""

from __future__ import annotations

from typing import Protocol

from evomerge.config import LayerSwapSpaceConfig, ParameterSpaceConfig
from evomerge.recipe import Recipe
from evomerge.spaces._genes import Gene, decode_unit, encode_unit
from evomerge.spaces._layer_swap import LayerSwapSpace
from evomerge.spaces._parameter import ParameterSpace, model_labels


class SearchSpace(Protocol):
    genes: list[Gene]

    def decode(self, values: dict) -> Recipe: ...


def build_space(cfg, base: str, sources: list[str], n_layers: int, *, seed: int = 0) -> SearchSpace:
    """The search space a study config's `search_space` section describes."""
    if isinstance(cfg, ParameterSpaceConfig):
        return ParameterSpace(cfg, base, sources, n_layers, seed=seed)
    if isinstance(cfg, LayerSwapSpaceConfig):
        return LayerSwapSpace(cfg, base, sources, n_layers, seed=seed)
    from evomerge.spaces._dataflow import DataFlowSpace  # heavier: builds path models

    return DataFlowSpace(cfg, base, sources, n_layers, seed=seed)


__all__ = ["Gene", "LayerSwapSpace", "ParameterSpace", "SearchSpace", "build_space", "decode_unit", "encode_unit", "model_labels"]
