"""Turn a Recipe into merged tensors, one tensor at a time.

Both paths that build a merge go through `merge_named`: the worker's in-memory build (sources resident
or memory-mapped, weights written into a live model) and the streaming export (tensors read one at a
time). Sharing it is what makes an exported checkpoint score exactly what its trial scored. Sources
stay in their checkpoint dtype: the task vectors are formed where a kernel uses them (`merge.TaskVectors`).

A recipe whose values depend on the tensor's name (`recipe.Filtered`, from mergekit filters) is resolved
here, per tensor, before the method sees it. A recipe with `mergekit_dtype` is merged with mergekit's
arithmetic (`merge._mergekit`) instead of evomerge's fp32 one. Either way the merged tensor is rounded
once, to the recipe's output dtype: a float32 output of bf16 sources keeps its fp32 values.

Sources whose vocabularies differ from the base's (an instruct fine-tune's added tokens), or a recipe
with tokenizer settings, have their embedding and head rows laid out by token before merging
(`models.vocab`): `MergeInputs` opens the models and plans that once; the plan's `size` is the output's
row count and its tokenizer the one an export writes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from evomerge.dirs import cache_root
from evomerge.merge import DeltaStats, MethodSpec, Noise, TaskVectors, all_finite, get_method, merge_tensor, use_kernel_dir
from evomerge.merge._mergekit import merge_like_mergekit
from evomerge.models.checkpoints import Checkpoint, TensorInfo, check_mergeable, dtype_of, torch_dtype
from evomerge.models.headers import vocab_differs
from evomerge.models.layout import LayerGroups, group_of_each, num_layers, tensor_kind
from evomerge.models.vocab import VocabPlan, plan_vocab, promoted_dtype, resolve_spec
from evomerge.recipe import Plain, Recipe

# Compiled merge kernels live in the machine's cache, shared by every process that merges here.
use_kernel_dir(cache_root() / "kernels")

DELTA_DTYPE = torch.float32  # materialised task vectors (the reference path) are fp32


def task_vectors(base: torch.Tensor, sources: Sequence[torch.Tensor | Callable[[], torch.Tensor]]) -> torch.Tensor:
    """(E, *S) materialised differences source - base, in DELTA_DTYPE: the reference path that the
    native-dtype merges (`TaskVectors(base, sources)`) are tested to equal bit for bit.

    A source may be a tensor or a function that reads it; each difference is written straight into
    the preallocated (E, *S) result.
    """
    base32 = base.to(torch.float32)
    out = torch.empty((len(sources), *base.shape), dtype=DELTA_DTYPE, device=base.device)
    for row, source in zip(out, sources):
        torch.sub(source() if callable(source) else source, base32, out=row)  # exact: s -> fp32, then fp32 sub
    return out


def tensor_noise(seed: int, name: str) -> Noise:
    """The uniforms random methods draw for tensor `name`: a hash of (recipe seed, name, model, entry),
    the same on every device and in every process (see evomerge.merge._random)."""
    return Noise(seed, name)


class MergeCache:
    """Per-worker facts about a worker's resident sources, reused by every candidate: one `DeltaStats`
    per tensor name, filled on first use by the methods that need it.

    Always kept (keep_sorted=False, what every worker keeps): facts no merge parameter changes that cost
    next to nothing, per tensor and source: the histogram of |delta|'s high 16 bits that TIES and
    Breadcrumbs select edges from (its occupied buckets, 2 + 4 x threads bytes each: about 10 KB at 2
    threads, 60 KB at 16), the L1 norm DARE and DELLA rescale by, and DARE's |delta| sums per 4096th of
    its hash range (32 KB, for the recipe seed in use), which make its kept norm a lookup plus one
    bucket's share. Each saves a pass over the task vector per source per candidate.

    With keep_sorted=True (opt-in: `workers.merge_cache`), per entry per source: TIES/Breadcrumbs keep
    the sorted |delta| and its order (8 bytes), so a density is a binary search instead of a selection
    per model per candidate; DARE/DELLA keep the entry's uniform (4 bytes; it depends on the recipe
    seed, tensor name and index only), DARE also the entries' order by uniform (4 bytes; its L1 rescale
    is then a lookup, not a pass), and DELLA its row ranks (4 bytes). The CPU's fused kernels hash the
    uniforms again in registers rather than read them (it is cheaper); the eager path (accelerators)
    reads them. So per parameter and per source: 8 bytes for TIES/Breadcrumbs, 8 for DARE, 8 for DELLA,
    once a method has run. Merges with and without a cache, of either kind, are bit-identical.
    """

    def __init__(self, *, keep_sorted: bool = True) -> None:
        self.keep_sorted = keep_sorted
        self._stats: dict[str, DeltaStats] = {}

    def nbytes(self) -> int:
        return sum(stats.nbytes() for stats in self._stats.values())

    def forget(self, names: Iterable[str]) -> None:
        """Drop the stats of these tensors (their inputs were replaced: the stats would keep the old ones alive)."""
        for name in names:
            self._stats.pop(name, None)

    def stats(self, name: str, deltas: TaskVectors | torch.Tensor) -> DeltaStats:
        """The stats of `name`, rebuilt when they were made for other tensors."""
        deltas = deltas if isinstance(deltas, TaskVectors) else TaskVectors.from_deltas(None, deltas)
        stats = self._stats.get(name)
        if stats is None or not stats.tv.same(deltas):
            stats = self._stats[name] = DeltaStats(deltas, keep_sorted=self.keep_sorted)
        return stats


def merge_named(
    recipe: Recipe,
    spec: MethodSpec,
    name: str,
    group: int,
    base: torch.Tensor,
    deltas: TaskVectors | torch.Tensor,
    *,
    cache: MergeCache | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The merged tensor `name` in the recipe's output dtype (the base's when it is "auto"), or written
    into `out` (a live model's tensor) and returned; bit-identical with or without `cache`, rounded once
    from fp32 either way. FloatingPointError (naming the tensor) when a merged value is NaN or inf."""
    dtype = torch_dtype(recipe.dtype) or base.dtype
    if out is not None and out.dtype != dtype:  # round to the output dtype first, as an export does
        return out.copy_(merge_named(recipe, spec, name, group, base, deltas, cache=cache))
    noise = tensor_noise(recipe.seed, name) if spec.random else None
    params = recipe.params_for(group, name)
    out = torch.empty(base.shape, dtype=dtype, device=base.device) if out is None else out
    try:
        if recipe.mergekit_dtype is not None:
            return _like_mergekit(recipe, spec, base, deltas, params, noise, out)
        stats = cache.stats(name, deltas) if cache is not None and spec.uses_stats else None
        return merge_tensor(spec, base, deltas, params, noise, stats=stats, out=out)
    except FloatingPointError as e:
        raise FloatingPointError(f"merged tensor {name!r}: {e}; the recipe is degenerate") from None


def _like_mergekit(recipe: Recipe, spec: MethodSpec, base: torch.Tensor, deltas: TaskVectors | torch.Tensor,
                   params: Mapping[str, Plain], noise: Noise | None, out: torch.Tensor) -> torch.Tensor:
    """merge_named with mergekit's arithmetic in `recipe.mergekit_dtype` ("auto": the inputs' promoted dtype)."""
    if not isinstance(deltas, TaskVectors) or deltas.sources is None:
        raise ValueError("mergekit arithmetic reads the source tensors: pass TaskVectors(base, sources)")
    merged = merge_like_mergekit(spec, base, deltas.sources, params, torch_dtype(recipe.mergekit_dtype), noise)
    out.copy_(merged)
    if not all_finite(out):
        raise FloatingPointError("merged values are NaN or inf")
    return out


def check_recipe(recipe: Recipe) -> MethodSpec:
    """The recipe's method, after checking every group's parameters against it (one-line errors)."""
    spec = get_method(recipe.method)
    for slot in range(len(recipe.groups)):
        for params in recipe.variants(slot):
            spec.check(params, len(recipe.sources), strict=False)
    return spec


def group_map(recipe: Recipe, base: Checkpoint) -> dict[str, int]:
    """Index into `recipe.groups` for every tensor: its layer group's parameters, and within the layer
    group its tensor kind's when the recipe has kinds (`Recipe.slot`)."""
    layer_groups = group_of_each(base.names, LayerGroups(num_layers(base.config), recipe.n_groups))
    return {name: recipe.slot(g, tensor_kind(name)) for name, g in layer_groups.items()}


@dataclass
class MergeInputs:
    """A recipe's models, opened and checked, and its vocabulary plan (None: rows merge by index)."""

    base: Checkpoint
    sources: list[Checkpoint]
    vocab: VocabPlan | None
    mergekit_dtype: str | None = None  # the recipe's: the arithmetic of the vocabulary's fills

    @classmethod
    def open(cls, recipe: Recipe, *, allow_pickle: bool = False, trust_remote_code: bool = False) -> MergeInputs:
        base = Checkpoint.open(recipe.base, allow_pickle=allow_pickle)
        sources = [Checkpoint.open(s, allow_pickle=allow_pickle) for s in recipe.sources]
        check_mergeable(base, zip(recipe.sources, sources))
        spec = resolve_spec(recipe.tokenizer, vocab_differs(base, sources))
        plan = plan_vocab(spec, [(recipe.base, base), *zip(recipe.sources, sources)], trust_remote_code=trust_remote_code)
        return cls(base, sources, plan, recipe.mergekit_dtype)

    def tensors(self, name: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(base, sources) of tensor `name`, rows laid out by token where the plan says so: fills in fp32,
        rounded once (evomerge's arithmetic), or in mergekit's dtype (the inputs' promoted one for "auto")."""
        tensors = [self.base.tensor(name), *(s.tensor(name) for s in self.sources)]
        if self.vocab is not None and name in self.vocab.names:
            compute = None if self.mergekit_dtype is None else torch_dtype(self.mergekit_dtype) or promoted_dtype(tensors)
            tensors = self.vocab.align(tensors, compute)
        return tensors[0], tensors[1:]


def stream_merge(recipe: Recipe, *, allow_pickle: bool = False, inputs: MergeInputs | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, merged tensor) for every tensor of the base, in the base's order.

    Memory holds one tensor's worth at a time: the base tensor and the E source tensors in their
    dtype (2(E + 1) bytes per entry in bf16; the embeddings and head laid out by token when the
    vocabularies differ), and the method's working tensors.
    """
    spec = check_recipe(recipe)
    inputs = inputs or MergeInputs.open(recipe, allow_pickle=allow_pickle)
    groups = group_map(recipe, inputs.base)
    for name in inputs.base.names:
        base_t, sources = inputs.tensors(name)
        deltas = TaskVectors(base_t, sources)
        merged = merge_named(recipe, spec, name, groups[name], base_t, deltas)
        del base_t, sources, deltas  # free before the consumer writes, so two tensors' work never overlaps
        yield name, merged


def output_plan(recipe: Recipe, base: Checkpoint, vocab: VocabPlan | None = None) -> list[TensorInfo]:
    """Name, shape and dtype of every tensor `stream_merge` yields, in order, after the recipe's dtype
    (float32 / bfloat16 / float16; anything else keeps each base tensor's dtype, as export does; the
    embeddings and head have `vocab.size` rows). Passing it to `write_checkpoint(plan=...)` lets the
    writer put each shard's header first."""
    forced = torch_dtype(recipe.dtype)
    mergekit = torch_dtype(recipe.mergekit_dtype) if recipe.mergekit_dtype else None

    def info(name: str) -> TensorInfo:
        shape = tuple(base.shapes[name])
        if vocab is not None and name in vocab.names:
            return TensorInfo(name, (vocab.size, *shape[1:]), forced or mergekit or dtype_of(base.dtypes[name]))
        return TensorInfo(name, shape, forced or dtype_of(base.dtypes[name]))
    return [info(n) for n in base.names]
