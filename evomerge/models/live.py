"""Building a candidate into a live model in memory: one builder per recipe kind, looked up by type.

A worker holds one builder per kind it has met (`builder_for`): `LiveMerge` for merge recipes (the base
and the task vectors resident, merged weights written in place into one live model) and `LivePath`
for data-flow paths (resident models whose layers a path model points at). `build(recipe)` returns
the model and tokenizer to score; nothing is written to disk.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from evomerge.errors import ModelError
from evomerge.models.build import MergeCache, check_recipe, group_map, merge_named, task_vectors
from evomerge.models.checkpoints import Checkpoint, check_mergeable, torch_dtype
from evomerge.models.path_model import PathModels
from evomerge.recipe import PathRecipe, Recipe


@dataclass(frozen=True)
class LoadOptions:
    """How a worker loads models: where, in which dtype, and what it may trust."""

    device: torch.device
    dtype: str = "auto"  # an evomerge.dtypes name for the live model; "auto" keeps the checkpoint's
    allow_pickle: bool = False
    trust_remote_code: bool = False
    merge_cache: bool = False


class LiveBuilder(Protocol):
    def build(self, recipe: Any) -> tuple[torch.nn.Module, Any]:
        """Make the candidate current; returns (model, tokenizer) to score."""
        ...

    def resident_bytes(self) -> int:
        """Bytes this builder keeps resident (models, task vectors, caches)."""
        ...


class LiveMerge:
    """Merge recipes: base and task vectors resident, merged weights written in place into a live model.

    Resident per parameter, for E sources: the live model (its dtype, 2 bytes in bf16), a copy of the
    base (its checkpoint dtype) and E fp32 task vectors (4E bytes); with `merge_cache`, the MergeCache too.
    """

    def __init__(self, base: str, sources: Sequence[str], options: LoadOptions) -> None:
        self.options, self.device = options, options.device
        self.model, self.tokenizer = load_model(base, options)
        self.base = Checkpoint.open(base, allow_pickle=options.allow_pickle)
        opened = [Checkpoint.open(s, allow_pickle=options.allow_pickle) for s in sources]
        check_mergeable(self.base, zip(sources, opened))
        self.live = _live_tensors(self.model, self.base.names)
        self.base_tensors = {n: self.base.tensor(n).to(self.device) for n in self.base.names}
        self.deltas = {n: task_vectors(self.base.tensor(n), [s.tensor(n) for s in opened]).to(self.device) for n in self.base.names}
        # Sorted |delta| per tensor and source: TIES/Breadcrumbs thresholds become lookups (8 bytes per
        # entry per source, built on the first candidate that needs it); off by default for large models.
        self.merge_cache = MergeCache() if options.merge_cache else None
        self._group_maps: dict[tuple[int, tuple[str, ...]], dict[str, int]] = {}

    @torch.no_grad()
    def build(self, recipe: Recipe) -> tuple[torch.nn.Module, Any]:
        spec = check_recipe(recipe)
        key = (recipe.n_groups, recipe.kinds)  # a group map depends on nothing else in the recipe
        groups = self._group_maps.get(key) or self._group_maps.setdefault(key, group_map(recipe, self.base))
        for name, target in self.live.items():
            # raises FloatingPointError on NaN or inf; the next build overwrites every tensor, this one included
            merge_named(recipe, spec, name, groups[name], self.base_tensors[name], self.deltas[name],
                        cache=self.merge_cache, out=target)
        return self.model, self.tokenizer

    def resident_bytes(self) -> int:
        tensors = [*self.live.values(), *self.base_tensors.values(), *self.deltas.values()]
        return sum(t.nbytes for t in tensors)


class LivePath:
    """Data-flow paths: models a path names load on first use; one path-model shell is reused."""

    def __init__(self, base: str, sources: Sequence[str], options: LoadOptions) -> None:
        del base, sources  # a path names its own models
        self.paths = PathModels(options.device, torch_dtype(options.dtype) or "auto", allow_pickle=options.allow_pickle,
                                trust_remote_code=options.trust_remote_code)

    def build(self, recipe: PathRecipe) -> tuple[torch.nn.Module, Any]:
        return self.paths.build(recipe), self.paths.tokenizer(recipe)

    def resident_bytes(self) -> int:
        return self.paths.resident_bytes()


BUILDERS: dict[type, Callable[[str, Sequence[str], LoadOptions], LiveBuilder]] = {Recipe: LiveMerge, PathRecipe: LivePath}
KINDS: dict[str, type] = {Recipe.kind: Recipe, PathRecipe.kind: PathRecipe}


def builder_type(recipe_type: type) -> Callable[[str, Sequence[str], LoadOptions], LiveBuilder]:
    """The builder class for a recipe type (a ValueError names the known kinds)."""
    try:
        return BUILDERS[recipe_type]
    except KeyError:
        raise ValueError(f"no live builder for {recipe_type.__name__}; known: {', '.join(t.__name__ for t in BUILDERS)}") from None


def load_model(ref: str, options: LoadOptions) -> tuple[torch.nn.Module, Any]:
    """A model and its tokenizer from a checkpoint folder, on the options' device, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Checkpoint.open(ref, allow_pickle=options.allow_pickle).path
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(options.dtype) or "auto",
                                                 trust_remote_code=options.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=options.trust_remote_code)
    return model.to(options.device).eval(), tokenizer


def _live_tensors(model: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """The live model's tensors under the checkpoint's names (state_dict tensors share storage)."""
    state = model.state_dict()
    missing = [n for n in names if n not in state]
    if missing:
        raise ModelError(
            f"the loaded model has no tensor {missing[0]!r} that the checkpoint has ({len(missing)} such); "
            "its modeling code renames weights, which evomerge does not support yet"
        )
    return {n: state[n] for n in names}
