"""Data-flow space (DFS) after Akiba et al. 2024: the path tokens take through the layers of several models.

The M models (the base first when `include_base`, then the sources) have N layers each; their layers
are laid out in order and the whole sequence repeated r times, giving T = r * M * N slots:

    slot t = (repeat t // (M N), model (t // N) % M, layer t % N)

Each slot has an indicator gene `slot<t>.on` in [-1, 1] (the slot runs when it is > 0, as in the paper)
and a scale gene `slot<t>.scale` in `scale` (default 1.0) that multiplies the hidden state entering
the slot when it runs. The running slots, in slot order, are the path; at most `max_path_layers` of
them run (default 2 N), the earliest win. When no indicator is on, the single slot with the highest
indicator runs (the earliest on ties): the path is never empty, and which slot runs still follows the
genes rather than a fixed fallback.

The paper scales the hidden state passed from slot i to slot j by W[i, j], an (M N) x (M N) matrix.
Along one realised path only the entries (previous running slot, next running slot) are used, so a
scale per slot expresses every path the matrix can, with T genes instead of (M N)^2 (for three 32-layer
models: 192 instead of 9216), and a positive per-slot scale folds into the exported weights
(evomerge.export.path). What it gives up: the scale into a slot cannot depend on which slot ran before.

The start is a real model: the first source's own layers in the first repeat are on (indicator +0.5),
every other slot off (-0.5), all scales 1. Half a unit from the threshold, so CMA-ES's default step
(sigma0 = 0.25 of the range = 0.5 in gene units) flips about one slot in six at first.
Embeddings, final norm and head come from `embed_from` (a model label; default the first source).
"""

from __future__ import annotations

from collections.abc import Mapping

from evomerge.config import DataFlowSpaceConfig
from evomerge.errors import ConfigError, ModelError
from evomerge.models.headers import read_config, resolve_model
from evomerge.models.layout import residual_writers
from evomerge.recipe import PathRecipe
from evomerge.search.spaces._genes import Gene
from evomerge.search.spaces._parameter import model_labels

ON, OFF = 0.5, -0.5


class DataFlowSpace:
    kind = PathRecipe.kind

    def __init__(self, cfg: DataFlowSpaceConfig, base: str, sources: list[str], n_layers: int, *, seed: int = 0,
                 configs: Mapping[str, dict] | None = None) -> None:
        self.cfg, self.n_layers, self.seed = cfg, n_layers, seed
        self.models = ((base,) if cfg.include_base else ()) + tuple(sources)
        self.labels = model_labels(list(self.models))
        first = 1 if cfg.include_base else 0
        self.embed_from = self._embed_index(first)
        self.max_path_layers = cfg.max_path_layers or 2 * n_layers
        m_count = len(self.models)
        self.slots = [(m, layer) for _ in range(cfg.repeats) for m in range(m_count) for layer in range(n_layers)]
        scale_default = min(max(1.0, cfg.scale.low), cfg.scale.high)
        self.genes: list[Gene] = []
        for t, (m, _) in enumerate(self.slots):
            starts_on = t < m_count * n_layers and m == first
            self.genes.append(Gene(f"slot{t}.on", -1.0, 1.0, ON if starts_on else OFF))
            self.genes.append(Gene(f"slot{t}.scale", cfg.scale.low, cfg.scale.high, scale_default))
        if (cfg.scale.low, cfg.scale.high) != (1.0, 1.0):
            _check_foldable(self.models[self.embed_from], configs)

    def _embed_index(self, first: int) -> int:
        if self.cfg.embed_from is None:
            return first
        if self.cfg.embed_from in self.labels:
            return self.labels.index(self.cfg.embed_from)
        hint = "" if self.cfg.include_base else "; to use the base model's, set search_space.include_base: true"
        raise ConfigError(
            f"config error: search_space.embed_from = {self.cfg.embed_from!r} is not one of the laid-out models "
            f"({', '.join(self.labels)}){hint}"
        )

    def decode(self, values: Mapping[str, float | str]) -> PathRecipe:
        on = [float(values[f"slot{t}.on"]) for t in range(len(self.slots))]
        running = [t for t, v in enumerate(on) if v > 0][: self.max_path_layers]
        if not running:
            running = [max(range(len(on)), key=lambda t: (on[t], -t))]
        slots = tuple((*self.slots[t], float(values[f"slot{t}.scale"])) for t in running)
        return PathRecipe(models=self.models, slots=slots, embed_from=self.embed_from)


def _check_foldable(ref: str, configs: Mapping[str, dict] | None) -> None:
    """A scaled path must fold into a standard checkpoint of this family: refuse before the search starts."""
    try:
        config = configs[ref] if configs and ref in configs else read_config(resolve_model(ref), ref)
        residual_writers(config)
    except ModelError as exc:
        raise ConfigError(f"config error: search_space.scale: {exc}") from None
