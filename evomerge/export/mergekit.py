"""Recipes as mergekit YAML (mergekit 0.1.5 `mergekit-yaml` configs), both ways.

    text = recipe_to_mergekit(recipe, n_layers=32)      # mergekit-yaml text.yaml OUT builds the same merge
    recipe = recipe_from_mergekit(text)                 # evomerge merge / export build the same tensors
    mergekit_text(recipe, base_checkpoint)              # layers, names, dtype from the base; ConfigError without a form
    mergekit_text_for(recipe, base_checkpoint)          # for an export folder; None without a mergekit form
    load_mergekit_recipe(text, arithmetic="evomerge")   # for `evomerge merge`: read against the base's header

Forms. A recipe with one layer group is written in the `models:` form: per-model parameters (weight,
density, gamma, epsilon) under each model's `parameters:`, global ones (lambda, t) under the top-level
`parameters:`. With several groups it is written in the `slices:` form, one slice per layer group whose
`layer_range` is exactly that group's layers (`evomerge.models.layout.LayerGroups`), per-model values under each
slice source and global ones under the slice's `parameters:`. A per-model parameter the recipe gives as
one number for all models is written once at the top level (or the slice's level), where mergekit
applies it to every model.

Per tensor kind. A recipe with `kinds` writes a value that differs by kind as a mergekit filter list,
`[{filter: attn, value: a}, {filter: mlp, value: m}, {value: o}]`: mergekit applies the first condition
whose filter is a substring of the tensor name, and the unfiltered one to the rest ("other"). The filter
of each kind is the first of `KIND_FILTERS` that selects exactly the base's tensors of that kind
(`layout.tensor_kind`): `attn` and `mlp` for Llama, Mistral, Qwen2 and GPT-2 names. A recipe whose kinds no
filter separates has no mergekit form. Import reads such lists back into a recipe with kinds (the kinds
some filter names, then other) and, given the base's tensor names, checks each filter the same way.
Checked against mergekit-yaml 0.1.5 on tiny Llama and GPT-2 models (ties and task_arithmetic, values
differing by kind and layer group): every tensor bit-identical to evomerge's.

Tensors outside the layers. In the slices form mergekit merges the embeddings with the first slice's
parameters and the final norm and head with the last slice's (mergekit `MergePlanner.plan_module`);
evomerge puts embeddings in the first layer group and norm and head in the last, so the two agree. In
the models form there is one group and nothing to map.

Filter lists that name no kind (o_proj, lm_head, embed_tokens, a norm) are `recipe.Filtered` values and
are written back as the same lists; switches (normalize, rescale, filter_wise, ...) as true / false.
Import (`mergekit_import`) reads every mergekit 0.1.5 method, gradients, filters, switches, weights
outside the search ranges and passthrough slices (as a `PathRecipe`) with mergekit's semantics.

Numbers. The YAML says `dtype: float32` (evomerge's arithmetic computes in fp32 too) or, for a recipe
with `mergekit_dtype`, that dtype; where the recipe names an output dtype (or the caller passes the
base's as `out_dtype`), `out_dtype`. Without it mergekit writes the dtype it computed in.
`scripts/mergekit_parity.py` runs mergekit's examples and an option matrix through both tools
(`docs/results/mergekit_parity.md`).

What does not carry over. The recipe's `seed`: mergekit has no seed in its YAML (only `--random-seed`)
and draws DARE/DELLA masks from its own generator, so dare_*/della* exports merge with the same
parameters but different random masks (a comment in the YAML says so). `consensus` has no mergekit
counterpart and is refused. `int8_mask` changes nothing numerically and is dropped on import.

Tokenizer settings (`tokenizer_source`, `tokenizer:`, `chat_template`) are the recipe's `tokenizer`, and
written back; a recipe without them whose sources' vocabularies differ from the base's is written with
`tokenizer: {source: union}` (what evomerge merges it as; mergekit refuses it without). LoRA references
(`model+adapter`) are kept as written; `evomerge merge` applies them first (`export.lora`).

Refused on import, each with a one-line ConfigError: `modules:`, tokenizer settings on a passthrough; in a
merge (not a passthrough), slices whose models take different layer ranges or that do not tile the layers from 0. Slices whose ranges are not
evomerge's near-equal split become the fewest near-equal layer groups that fit (one per layer at most).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from evomerge.dtypes import is_float_name
from evomerge.errors import ConfigError
from evomerge.merge.catalog import get_method
from evomerge.models.checkpoints import Checkpoint, dtype_of
from evomerge.models.layout import LayerGroups, num_layers, tensor_kind
from evomerge.models.headers import CheckpointHeader, vocab_differs
from evomerge.recipe import Filtered, ParamValue, PathRecipe, Recipe
from evomerge.recipe.refs import split_lora
from evomerge.recipe.tokenizer import TokenizerSpec

# Methods evomerge and mergekit 0.1.5 both have, under the same name.
SHARED_METHODS = (
    "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
    "della", "della_linear", "slerp", "model_stock", "nuslerp", "multislerp", "karcher", "sce", "arcee_fusion",
    "nearswap", "ram", "ramplus_tl", "passthrough",
)
_TO_MERGEKIT = {"lambda_": "lambda"}
# mergekit filters for a tensor kind, in order of preference: substrings of tensor names (`attn` covers
# Llama, Mistral, Qwen2 `self_attn` and GPT-2 `attn`; `attention.` GPT-NeoX and Falcon without matching
# Llama's `post_attention_layernorm`).
KIND_FILTERS = {"attention": ("attn", "attention.", "self_attn", "attention"), "mlp": ("mlp", "feed_forward", "ffn")}
FILTER_KIND = {f: kind for kind, filters in KIND_FILTERS.items() for f in filters}


# --- export --------------------------------------------------------------------------------------


def recipe_to_mergekit(
    recipe: Recipe, n_layers: int, *, out_dtype: str | None = None, names: Sequence[str] | None = None,
    vocab_differs: bool = False,
) -> str:
    """mergekit-yaml text for `recipe` over a base of `n_layers` decoder layers.

    vocab_differs: some source's embeddings have other rows than the base's, so a recipe without tokenizer
    settings (evomerge merges it as the union) says `tokenizer: {source: union}` (mergekit refuses it without).

    out_dtype: the output dtype to write when the recipe's dtype is "auto" (pass the base's, e.g.
    "bfloat16", so mergekit writes what evomerge writes); ignored when the recipe names one.
    names: the base's tensor names, to check that each kind's filter selects exactly that kind's
    tensors (recipes with kinds; without names the first filter of `KIND_FILTERS` is used).
    """
    _shared_method(recipe.method, "recipe")
    filters = kind_filters(recipe.kinds, names)
    config: dict[str, Any] = {"merge_method": recipe.method}
    if not _baseless(recipe):
        config["base_model"] = recipe.base
    if recipe.n_groups == 1:
        shared, own = _export_params(recipe, recipe.layer_group(0), filters)
        config["models"] = _export_models(recipe, own, None)
        config["parameters"] = shared
    else:
        ranges = layer_ranges(n_layers, recipe.n_groups)
        config["slices"] = [_export_slice(recipe, recipe.layer_group(g), r, filters) for g, r in enumerate(ranges)]
    if not config.get("parameters"):
        config.pop("parameters", None)
    config["dtype"] = recipe.mergekit_dtype if is_float_name(recipe.mergekit_dtype) else "float32"
    chosen = recipe.dtype if is_float_name(recipe.dtype) else out_dtype
    if chosen:
        config["out_dtype"] = chosen
    config |= tokenizer_settings(recipe.tokenizer, vocab_differs)
    return _header(recipe) + yaml.safe_dump(config, sort_keys=False, default_flow_style=None)


def tokenizer_settings(spec: TokenizerSpec | None, vocab_differs: bool) -> dict[str, Any]:
    """The recipe's tokenizer settings in mergekit's keys: a `tokenizer:` block and `chat_template`."""
    spec = spec or TokenizerSpec()
    out: dict[str, Any] = {}
    source = spec.source or ("union" if vocab_differs else None)
    if source is not None:
        out["tokenizer"] = TokenizerSpec(source, spec.tokens, spec.pad_to_multiple_of).to_data()
    if spec.chat_template is not None:
        out["chat_template"] = spec.chat_template
    return out


def layer_ranges(n_layers: int, n_groups: int) -> list[tuple[int, int]]:
    """[start, end) of each layer group, as `LayerGroups` assigns layers."""
    groups = LayerGroups(n_layers, n_groups)
    starts = [next(i for i in range(n_layers) if groups.of_layer(i) == g) for g in range(n_groups)]
    return list(zip(starts, [*starts[1:], n_layers]))


def kind_filters(kinds: Sequence[str], names: Sequence[str] | None) -> dict[str, str]:
    """The mergekit filter (a substring of tensor names) for each kind split out, e.g. {"attention": "attn"}.

    With the base's tensor names, each filter must match exactly the tensors `layout.tensor_kind` puts in
    its kind (mergekit applies the first condition whose filter is in the name, then the unfiltered one).
    """
    out = {}
    for kind in kinds[:-1]:
        fits = [f for f in KIND_FILTERS[kind] if names is None or all((f in n) == (tensor_kind(n) == kind) for n in names)]
        if not fits:
            raise ConfigError(
                f"recipe error: no mergekit filter ({', '.join(KIND_FILTERS[kind])}) selects exactly this model's {kind} "
                "tensors, so its per-kind parameters have no mergekit form"
            )
        out[kind] = fits[0]
    return out


def _header(recipe: Recipe) -> str:
    lines = ["# mergekit-yaml config written by evomerge (mergekit 0.1.5 format)"]
    if get_method(recipe.method).random:
        lines.append(
            f"# {recipe.method} draws random masks: mergekit draws its own (evomerge seed {recipe.seed} does not carry "
            "over), so its merge has the same parameters but not the same tensors"
        )
    return "\n".join(lines) + "\n"


def _export_params(recipe: Recipe, slots: Sequence[Mapping[str, ParamValue]], filters: Mapping[str, str]) -> tuple[dict, list[dict]]:
    """One layer group's (shared, per-source) parameter settings in mergekit's spelling.

    slots: the group's mapping per kind (one without kinds). A per-model parameter given as one number
    for all models goes to the shared settings, where mergekit applies it to every model; one that
    differs by model goes to each model. A value that differs by kind becomes a filter list.
    """
    spec = get_method(recipe.method)
    keys = list(slots[0])
    if any(sorted(s) != sorted(keys) for s in slots):
        raise ConfigError(f"recipe error: the kinds of a layer group set different parameters ({[sorted(s) for s in slots]}); set the same ones for every kind")
    shared: dict[str, Any] = {}
    own: list[dict[str, Any]] = [{} for _ in recipe.sources]
    for key in keys:
        values = [s[key] for s in slots]
        if key == "use_base":
            continue  # evomerge's own switch: written as the absence of base_model
        if _is_switch(spec, key):
            shared[key] = bool(values[0])
        elif _per_model(spec, key) and any(_is_many(v) for v in values):
            for index, entry in enumerate(own):
                entry[_mk(key)] = _by_kind([v[index] if _is_many(v) else v for v in values], recipe.kinds, filters)
        else:
            shared[_mk(key)] = _by_kind(values, recipe.kinds, filters)
    return shared, own


def _is_switch(spec, name: str) -> bool:
    return any(s.name == name for s in spec.switches)


def _mk(name: str) -> str:
    return _TO_MERGEKIT.get(name, name)


def _by_kind(values: Sequence[Any], kinds: Sequence[str], filters: Mapping[str, str]) -> Any:
    """One number when every kind has the same value, else mergekit conditions: one per split kind, then a
    default. A filter list (`Filtered`) is written as it is; a switch as true / false."""
    if len(values) == 1 and isinstance(values[0], Filtered):
        return values[0].to_data()
    if any(isinstance(v, Filtered) for v in values):
        raise ConfigError("recipe error: a recipe with kinds has filter lists inside a kind; give each kind one number per model")
    values = [float(v) for v in values]
    if len(set(values)) == 1:
        return values[0]
    return [{"filter": filters[k], "value": v} for k, v in zip(kinds[:-1], values[:-1])] + [{"value": values[-1]}]


def _baseless(recipe: Recipe) -> bool:
    """Whether the recipe's base is only its template (mergekit has no base_model then): a passthrough, or
    a method told not to use the base (`use_base` false)."""
    return recipe.method == "passthrough" or any(not g.get("use_base", 1.0) for g in recipe.groups)


def _export_models(recipe: Recipe, own: list[dict], layer_range: tuple[int, int] | None) -> list[dict]:
    """The model entries of one group: sources with their per-model values, and the base where needed."""
    entries = []
    for source, params in zip(recipe.sources, own):
        entry: dict[str, Any] = {"model": source}
        if layer_range is not None:
            entry["layer_range"] = list(layer_range)
        if params:
            entry["parameters"] = params
        entries.append(entry)
    if recipe.method == "linear":  # mergekit averages every input, so the base is one, with weight 0
        base: dict[str, Any] = {"model": recipe.base, "parameters": {"weight": 0.0}}
        if layer_range is not None:
            base = {"model": recipe.base, "layer_range": list(layer_range), "parameters": {"weight": 0.0}}
        entries.append(base)
    elif layer_range is not None and not _baseless(recipe):  # a slice lists its base among its sources
        entries.insert(0, {"model": recipe.base, "layer_range": list(layer_range)})
    return entries


def _export_slice(recipe: Recipe, slots: Sequence[Mapping[str, ParamValue]], layer_range: tuple[int, int], filters: Mapping[str, str]) -> dict:
    shared, own = _export_params(recipe, slots, filters)
    out: dict[str, Any] = {"sources": _export_models(recipe, own, layer_range)}
    if shared:
        out["parameters"] = shared
    return out


def _is_many(value: ParamValue) -> bool:
    return isinstance(value, (tuple, list))


def _per_model(spec, name: str) -> bool:
    try:
        return spec.param(name).per_model
    except KeyError:
        raise ConfigError(f"recipe error: {spec.name} has no parameter {name!r}") from None


def _shared_method(method: str, where: str):
    if method not in SHARED_METHODS:
        hint = "" if method != "consensus" else " (consensus merging has no mergekit counterpart)"
        raise ConfigError(f"{where}: method {method!r} is not one mergekit and evomerge share{hint}; shared: {', '.join(SHARED_METHODS)}")
    return get_method(method)


def mergekit_text(recipe: Recipe, base: Checkpoint) -> str:
    """The mergekit YAML of `recipe` over `base` (layers, tensor names and output dtype come from the
    base checkpoint); a one-line ConfigError when the recipe has no mergekit form."""
    out_dtype = str(dtype_of(base.dtypes[base.names[0]])).removeprefix("torch.") if base.names else None
    differs = recipe.tokenizer is None and vocab_differs(base, [CheckpointHeader.open(s, allow_pickle=True) for s in recipe.sources])
    return recipe_to_mergekit(
        recipe, num_layers(base.config), out_dtype=out_dtype if is_float_name(out_dtype) else None, names=base.names,
        vocab_differs=differs,
    )


def mergekit_text_for(recipe: Recipe, base: Checkpoint) -> str | None:
    """`mergekit_text`, or None when the recipe has no mergekit form (to ship next to an export)."""
    try:
        return mergekit_text(recipe, base)
    except ConfigError:
        return None


# --- import (evomerge/export/mergekit_import.py) -----------------------------------------------------


def is_mergekit_config(text: str) -> bool:
    """Whether a YAML file is a mergekit config (it names merge_method) rather than an evomerge recipe."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return False
    return isinstance(data, Mapping) and "merge_method" in data


def load_mergekit_recipe(text: str, *, allow_pickle: bool = False, arithmetic: str = "evomerge") -> Recipe | PathRecipe:
    """`recipe_from_mergekit` against the base model's header: its layer count (slices, gradients) and
    tensor names (filters, the embeddings' and head's own values)."""
    from evomerge.export.mergekit_import import base_reference

    base = Checkpoint.open(split_lora(base_reference(text))[0], allow_pickle=allow_pickle)  # an adapter keeps its model's names
    return recipe_from_mergekit(text, n_layers=num_layers(base.config), names=base.names, arithmetic=arithmetic)


def recipe_from_mergekit(
    text: str, *, n_layers: int | None = None, seed: int = 0, names: Sequence[str] | None = None,
    arithmetic: str = "evomerge",
) -> Recipe | PathRecipe:
    """The recipe of a mergekit-yaml config: a Recipe for a merge, a PathRecipe for a passthrough
    (`mergekit_import` says how each mergekit setting lands). n_layers and names come from the base;
    arithmetic "mergekit" computes as mergekit does in the config's dtype (default: evomerge's fp32)."""
    from evomerge.export.mergekit_import import recipe_from_mergekit as convert

    return convert(text, n_layers=n_layers, seed=seed, names=names, arithmetic=arithmetic)
