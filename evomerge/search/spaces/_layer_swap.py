"""Layer swap: each layer group takes its weights from one source model, or the base.

One categorical gene per group (`g<group>.source`); CMA-ES sees it as a coordinate in [0, 1] cut into
equal bins, Optuna samplers as a categorical choice. A candidate decodes to a task-arithmetic recipe with
one group per layer and one-hot weights (all zero picks the base), so it is built, exported and
rebuilt by the same machinery as any parameter-space merge. With `blend_boundaries`, the first layer
after a change of source gets weight 1/2 on each of the two sources. Embeddings follow layer 0's
choice, the final norm and head the last layer's. A chosen source's weights come back as
base + (source - base) in fp32, equal to the source up to one rounding.
"""

from __future__ import annotations

from collections.abc import Mapping

from evomerge.config import LayerSwapSpaceConfig
from evomerge.errors import ConfigError
from evomerge.models.layout import LayerGroups
from evomerge.recipe import Recipe
from evomerge.search.spaces._genes import Gene
from evomerge.search.spaces._parameter import model_labels

BASE = "base"


class LayerSwapSpace:
    kind = Recipe.kind

    def __init__(self, cfg: LayerSwapSpaceConfig, base: str, sources: list[str], n_layers: int, *, seed: int = 0) -> None:
        self.cfg, self.base, self.sources, self.seed, self.n_layers = cfg, base, tuple(sources), seed, n_layers
        self.labels = model_labels(sources)
        if BASE in self.labels:
            raise ConfigError("config error: models.sources: a source folder is named 'base', which layer swap reserves; rename it")
        try:
            self.groups = LayerGroups(n_layers, cfg.layer_groups or n_layers)
        except Exception as exc:
            raise ConfigError(f"config error: search_space.{exc}") from None
        choices = ([BASE] if cfg.include_base else []) + self.labels
        self.genes = [Gene(f"g{g}.source", choices=tuple(choices), default=choices[0]) for g in range(self.groups.n_groups)]

    def decode(self, values: Mapping[str, float | str]) -> Recipe:
        per_group = [str(values[f"g{g}.source"]) for g in range(self.groups.n_groups)]
        per_layer = [per_group[self.groups.of_layer(i)] for i in range(self.n_layers)]
        weights = [self._one_hot(choice) for choice in per_layer]
        if self.cfg.blend_boundaries:
            for i in range(1, self.n_layers):
                if per_layer[i] != per_layer[i - 1] and self.groups.of_layer(i) != self.groups.of_layer(i - 1):
                    weights[i] = tuple(0.5 * (a + b) for a, b in zip(self._one_hot(per_layer[i - 1]), self._one_hot(per_layer[i])))
        groups = tuple({"weight": w} for w in weights)
        return Recipe(method="task_arithmetic", base=self.base, sources=self.sources, groups=groups, seed=self.seed)

    def _one_hot(self, choice: str) -> tuple[float, ...]:
        return tuple(1.0 if label == choice else 0.0 for label in self.labels)
