"""Turn a Recipe into merged tensors, one tensor at a time.

Both paths that build a merge go through `merge_named`: the worker's in-memory build (task vectors
resident, weights written into a live model) and the streaming export (tensors read from memory-mapped
checkpoints). Sharing it is what makes an exported checkpoint score exactly what its trial scored.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import torch

from evomerge.checkpoints import Checkpoint, check_mergeable
from evomerge.layout import LayerGroups, group_of_each, num_layers
from evomerge.merge import MethodSpec, get_method, merge_tensor
from evomerge.recipe import Recipe

DELTA_DTYPE = torch.float32  # task vectors are kept in fp32 so every build path rounds the same way


def task_vectors(base: torch.Tensor, sources: list[torch.Tensor]) -> torch.Tensor:
    """(E, *S) differences source - base, in DELTA_DTYPE."""
    base32 = base.to(torch.float32)
    return torch.stack([s.to(torch.float32) - base32 for s in sources]).to(DELTA_DTYPE)


def tensor_generator(seed: int, name: str, device: torch.device) -> torch.Generator:
    """A generator seeded by the recipe seed and the tensor name (stable across processes)."""
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return gen


def merge_named(
    recipe: Recipe, spec: MethodSpec, name: str, group: int, base: torch.Tensor, deltas: torch.Tensor
) -> torch.Tensor:
    """The merged tensor `name` in the base's dtype."""
    gen = tensor_generator(recipe.seed, name, deltas.device) if spec.random else None
    merged = merge_tensor(spec, base, deltas, recipe.groups[group], gen)
    return merged.to(base.dtype)


def check_recipe(recipe: Recipe) -> MethodSpec:
    """The recipe's method, after checking every group's parameters against it (one-line errors)."""
    spec = get_method(recipe.method)
    for params in recipe.groups:
        spec.check(params, len(recipe.sources))
    return spec


def group_map(recipe: Recipe, base: Checkpoint) -> dict[str, int]:
    return group_of_each(base.names, LayerGroups(num_layers(base.config), recipe.n_groups))


def stream_merge(recipe: Recipe, *, allow_pickle: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, merged tensor) for every tensor of the base, reading one tensor per model at a time."""
    spec = check_recipe(recipe)
    base = Checkpoint.open(recipe.base, allow_pickle=allow_pickle)
    sources = [Checkpoint.open(s, allow_pickle=allow_pickle) for s in recipe.sources]
    check_mergeable(base, zip(recipe.sources, sources))
    groups = group_map(recipe, base)
    for name in base.names:
        base_t = base.tensor(name)
        deltas = task_vectors(base_t, [s.tensor(name) for s in sources])
        yield name, merge_named(recipe, spec, name, groups[name], base_t, deltas)
