"""Building a candidate into a live model in memory: one builder per recipe kind, looked up by type.

A worker holds one builder per kind it has met (`builder_for`): `LiveMerge` for merge recipes (the base
and the task vectors resident, merged weights written in place into one live model) and `LivePath`
for data-flow paths (resident models whose layers a path model points at). `build(recipe)` returns
the model and tokenizer to score; nothing is written to disk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from evomerge.errors import ModelError
from evomerge.merge import TaskVectors
from evomerge.models.build import MergeCache, check_recipe, group_map, merge_named
from evomerge.models.checkpoints import Checkpoint, check_mergeable, torch_dtype
from evomerge.models.headers import vocab_differs, vocab_names
from evomerge.models.vocab import output_tokenizer, plan_vocab, resolve_spec
from evomerge.models.path_model import PathModels
from evomerge.recipe import PathRecipe, Recipe
from evomerge.recipe.tokenizer import TokenizerSpec


@dataclass(frozen=True)
class LoadOptions:
    """How a worker loads models: where, in which dtype, and what it may trust."""

    device: torch.device
    dtype: str = "auto"  # an evomerge.dtypes name for the live model; "auto" keeps the checkpoint's
    allow_pickle: bool = False
    trust_remote_code: bool = False
    merge_cache: bool = False
    sources_on: str = "auto"  # device | host | mmap | auto (see config.WorkersConfig)
    spread: bool = False  # the live model spread over every visible GPU (transformers device_map)


class LiveBuilder(Protocol):
    def build(self, recipe: Any) -> tuple[torch.nn.Module, Any]:
        """Make the candidate current; returns (model, tokenizer) to score."""
        ...

    def resident_bytes(self) -> int:
        """Bytes of tensors this builder holds privately (models, copies of sources, caches)."""
        ...

    def mapped_bytes(self) -> int:
        """Bytes it reads through memory-mapped files (shared by every worker on the node)."""
        ...


class SourceTensors:
    """A worker's base and source tensors, by name, kept in their checkpoint dtype where `mode` says.

    device: resident on the device that holds each live tensor (2(E + 1) bytes per parameter in bf16, private).
    host:   resident in this process's host memory (the same bytes, in RAM; pinned when the device is a GPU,
            so copies run asynchronously) and copied to the device tensor by tensor for each candidate.
    mmap:   read-only views of the memory-mapped safetensors files: no private bytes; the page cache holds
            one copy per node, shared by every worker that maps the same files. On a GPU, copied tensor by
            tensor like host.
    On a CPU device, host and device are the same thing: private copies in RAM.
    Tensors `put` here (embeddings and head laid out by token, `models.vocab`) are private in every mode:
    in mmap mode their bytes move from the shared page cache to this process.
    """

    def __init__(self, base: Checkpoint, sources: Sequence[Checkpoint], mode: str, devices: dict[str, torch.device]) -> None:
        """base, sources: anything with `names`, `tensor(name)` and (for mmap) `mapped(name)`, like a Checkpoint."""
        self.mode, self.names = mode, list(base.names)
        self.devices = devices  # tensor name -> the device of its live tensor
        self.streamed = mode != "device" and any(d.type == "cuda" for d in devices.values())
        self.private: set[str] = set()  # names `put` here: held privately even in mmap mode

        def keep(ckpt: Checkpoint, name: str) -> torch.Tensor:
            if mode == "mmap":
                return ckpt.mapped(name)
            tensor = ckpt.tensor(name)
            if mode == "device":
                return tensor.to(devices[name])
            tensor = tensor.cpu()
            return tensor.pin_memory() if self.streamed else tensor

        self.base = {n: keep(base, n) for n in self.names}
        self.sources = {n: [keep(s, n) for s in sources] for n in self.names}

    def put(self, name: str, base: torch.Tensor, sources: Sequence[torch.Tensor]) -> None:
        """Replace tensor `name`'s inputs with these (private copies, placed as this mode places tensors)."""
        def place(t: torch.Tensor) -> torch.Tensor:
            if self.mode == "device":
                return t.to(self.devices[name])
            return t.cpu().pin_memory() if self.streamed else t.cpu()
        self.base[name], self.sources[name] = place(base), [place(t) for t in sources]
        self.private.add(name)

    def _bytes(self, names: Iterable[str]) -> int:
        return sum(t.nbytes for n in names for t in (self.base[n], *self.sources[n]))

    def resident_bytes(self) -> int:
        return self._bytes([n for n in self.names if n in self.private] if self.mode == "mmap" else self.names)

    def mapped_bytes(self) -> int:
        return self._bytes([n for n in self.names if n not in self.private]) if self.mode == "mmap" else 0

    def each(self) -> Iterator[tuple[str, torch.Tensor, list[torch.Tensor]]]:
        """(name, base, sources) for every tensor, on the device of its live tensor. Streamed modes copy
        the next tensor's inputs on a side stream while this one merges (double buffering)."""
        if not self.streamed:
            for name in self.names:
                yield name, self.base[name], self.sources[name]
            return
        copies = torch.cuda.Stream()
        pending = self._upload(self.names[0], copies) if self.names else None
        for i, name in enumerate(self.names):
            tensors, done = pending
            if i + 1 < len(self.names):
                pending = self._upload(self.names[i + 1], copies)
            compute = torch.cuda.current_stream(self.devices[name])
            compute.wait_event(done)
            for t in tensors:
                t.record_stream(compute)  # the allocator keeps its memory until this stream is done with it
            yield name, tensors[0], tensors[1:]

    def _upload(self, name: str, stream: torch.cuda.Stream) -> tuple[list[torch.Tensor], torch.cuda.Event]:
        device = self.devices[name]
        with torch.cuda.stream(stream):
            tensors = [t.to(device, non_blocking=True) for t in (self.base[name], *self.sources[name])]
            done = torch.cuda.Event()
            done.record(stream)
        return tensors, done


def choose_sources_on(options: LoadOptions, source_bytes: int, live_bytes: int) -> str:
    """The `sources_on` mode for "auto": mmap on CPUs; device on a GPU when base, sources and the live
    model fit in 90% of its free memory; else mmap (one copy per node, streamed tensor by tensor)."""
    if options.sources_on != "auto":
        return options.sources_on
    if options.device.type != "cuda":
        return "mmap"
    free, _ = torch.cuda.mem_get_info(options.device)
    return "device" if source_bytes + live_bytes <= 0.9 * free else "mmap"


class LiveMerge:
    """Merge recipes: merged weights written in place into one live model, from base and sources kept in
    their own dtype (`SourceTensors`); task vectors are never materialised.

    Resident per parameter, for E bf16 sources and a bf16 live model: 2 bytes (the live model) plus
    2(E + 1) on the device (sources_on: device), or in host memory (host), or nothing private (mmap);
    per tensor and source a few KB of facts no candidate changes (`MergeCache`); with `merge_cache`,
    its 8 bytes per parameter per source on top.

    Vocabularies. When the sources' embeddings have other rows than the base's (added tokens), or a recipe
    has tokenizer settings, the live model is resized to the merged vocabulary, its tokenizer is the
    merged one, and the embeddings and head of base and sources are laid out by token once (`models.vocab`),
    not per candidate: 2(E + 1) bytes per embedding and head parameter (bf16), private in every
    sources_on mode (in mmap mode they leave the page cache for this process); nothing for other tensors.
    A recipe with other settings than the last one re-aligns once.
    """

    def __init__(self, base: str, sources: Sequence[str], options: LoadOptions) -> None:
        self.options, self.device = options, options.device
        self.model, self.tokenizer = load_model(base, options)
        self.base_tokenizer = self.tokenizer
        self.base = Checkpoint.open(base, allow_pickle=options.allow_pickle)
        opened = [Checkpoint.open(s, allow_pickle=options.allow_pickle) for s in sources]
        check_mergeable(self.base, zip(sources, opened))
        self.opened, self.refs = opened, (base, *sources)
        self.live = _live_tensors(self.model, self.base.names)
        source_bytes = sum(len(opened) * t.nbytes + t.nbytes for t in self.live.values())  # base and sources, about
        self.sources_on = choose_sources_on(options, source_bytes, sum(t.nbytes for t in self.live.values()))
        if self.sources_on == "mmap" and (self.base.pickled or any(s.pickled for s in opened)):
            self.sources_on = "host"  # pickled weights cannot be mapped
        devices = {n: t.device for n, t in self.live.items()}
        self.inputs = SourceTensors(self.base, opened, self.sources_on, devices)
        # Facts about the task vectors that no candidate changes, per tensor and source: KB by default;
        # with merge_cache also sorted |delta| (TIES/Breadcrumbs thresholds become lookups: 8 bytes per
        # entry per source). None when sources stream to the device: what the stats hold would pin them.
        self.merge_cache = None if self.inputs.streamed else MergeCache(keep_sorted=options.merge_cache)
        self._group_maps: dict[tuple[int, tuple[str, ...]], dict[str, int]] = {}
        self.vocab_differs = vocab_differs(self.base, opened)
        self.vocab = resolve_spec(None, self.vocab_differs)  # the settings the live model is aligned for
        if self.vocab.rebuilds:
            self._align(self.vocab)

    def _align(self, spec: TokenizerSpec) -> None:
        """Resize the live model to `spec`'s vocabulary, take its tokenizer, lay out every model's
        embeddings and head by token (once: candidates reuse them)."""
        plan = plan_vocab(spec, list(zip(self.refs, [self.base, *self.opened])), trust_remote_code=self.options.trust_remote_code)
        names = sorted(plan.names) if plan is not None else vocab_names(self.base)
        rows = plan.size if plan is not None else self.base.shapes[names[0]][0] if names else None
        if rows is not None and self.model.get_input_embeddings().weight.shape[0] != rows:
            self.model.resize_token_embeddings(rows, mean_resizing=False)
            self.live = _live_tensors(self.model, self.base.names)
            self.inputs.devices.update({n: self.live[n].device for n in names})
        if self.merge_cache is not None:
            self.merge_cache.forget(names)
        for name in names:
            tensors = [self.base.tensor(name), *(s.tensor(name) for s in self.opened)]
            if plan is not None:
                tensors = plan.align(tensors)
            self.inputs.put(name, tensors[0], tensors[1:])
        if plan is not None:
            self.tokenizer = plan.tokenizer
        else:  # rows by index: the base's tokenizer, with the spec's chat template if it names one
            self.tokenizer = output_tokenizer(spec, self.base, self.opened, trust_remote_code=self.options.trust_remote_code) or self.base_tokenizer
        self.vocab = spec

    @torch.no_grad()
    def build(self, recipe: Recipe) -> tuple[torch.nn.Module, Any]:
        spec = check_recipe(recipe)
        vocab = resolve_spec(recipe.tokenizer, self.vocab_differs)
        if vocab != self.vocab:
            self._align(vocab)
        key = (recipe.n_groups, recipe.kinds)  # a group map depends on nothing else in the recipe
        groups = self._group_maps.get(key) or self._group_maps.setdefault(key, group_map(recipe, self.base))
        for name, base, sources in self.inputs.each():
            # raises FloatingPointError on NaN or inf; the next build overwrites every tensor, this one included
            merge_named(recipe, spec, name, groups[name], base, TaskVectors(base, sources),
                        cache=self.merge_cache, out=self.live[name])
        return self.model, self.tokenizer

    def resident_bytes(self) -> int:
        cached = self.merge_cache.nbytes() if self.merge_cache is not None else 0
        return sum(t.nbytes for t in self.live.values()) + self.inputs.resident_bytes() + cached

    def mapped_bytes(self) -> int:
        return self.inputs.mapped_bytes()


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

    def mapped_bytes(self) -> int:
        return 0


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
    spread = {"device_map": "auto"} if options.spread else {}  # over every GPU this worker sees
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(options.dtype) or "auto",
                                                 trust_remote_code=options.trust_remote_code, **spread)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=options.trust_remote_code)
    return (model if options.spread else model.to(options.device)).eval(), tokenizer


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
