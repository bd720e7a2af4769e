"""Recipes as mergekit YAML (mergekit 0.1.5 `mergekit-yaml` configs), both ways, for the methods we share.

    text = recipe_to_mergekit(recipe, n_layers=32)      # mergekit-yaml text.yaml OUT builds the same merge
    recipe = recipe_from_mergekit(text)                 # evomerge merge / export build the same tensors
    mergekit_text(recipe, base_checkpoint)              # layers, names, dtype from the base; ConfigError without a form
    mergekit_text_for(recipe, base_checkpoint)          # for an export folder; None without a mergekit form
    load_mergekit_recipe(text)                          # for `evomerge merge`: slices checked against the base

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

Numbers. Both compute in fp32: the YAML says `dtype: float32` and, where the recipe names an output
dtype (or the caller passes the base's as `out_dtype`), `out_dtype`. Without it mergekit writes fp32.

What does not carry over. The recipe's `seed`: mergekit has no seed in its YAML (only `--random-seed`)
and draws DARE/DELLA masks from its own generator, so dare_*/della* exports merge with the same
parameters but different random masks (a comment in the YAML says so). `consensus` has no mergekit
counterpart and is refused. mergekit's `normalize` / `rescale` flags are fixed per method in evomerge,
so an import accepts them only at their defaults; `int8_mask` changes nothing numerically and is accepted.

Refused on import, each with a one-line ConfigError: methods evomerge lacks; `modules:`, tokenizer
settings other than `tokenizer_source: base`, LoRA (`model+lora`) references; `filter:` conditions that
do not name a tensor kind (`KIND_FILTERS`: attn, attention, mlp, ...); gradient lists (`[a, b,
c]`, interpolated layer by layer by mergekit, so not constant within a layer group: give one value per
slice instead); slices that do not tile the layers from 0 with every
model on the same layer range (layer stacking / passthrough). Slices whose ranges are not evomerge's
near-equal split become one layer group per layer, each with its slice's values: the same merge.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from evomerge.dtypes import is_float_name
from evomerge.errors import ConfigError
from evomerge.merge.catalog import TASK_VECTOR_METHODS, get_method
from evomerge.models.checkpoints import Checkpoint, dtype_of
from evomerge.models.layout import LayerGroups, num_layers, tensor_kind
from evomerge.recipe import OTHER, ParamValue, Recipe

# Methods evomerge and mergekit 0.1.5 both have, under the same name.
SHARED_METHODS = (
    "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
    "della", "della_linear", "slerp", "model_stock",
)
# mergekit's fixed flags per method: (normalize, rescale) defaults, which evomerge always uses.
_FLAGS = {name: (row.normalize, row.rescale) for name, row in TASK_VECTOR_METHODS.items()}
_TO_MERGEKIT = {"lambda_": "lambda"}
_FROM_MERGEKIT = {v: k for k, v in _TO_MERGEKIT.items()}
_TOP_KEYS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source")
# mergekit filters for a tensor kind, in order of preference: substrings of tensor names (`attn` covers
# Llama, Mistral, Qwen2 `self_attn` and GPT-2 `attn`; `attention.` GPT-NeoX and Falcon without matching
# Llama's `post_attention_layernorm`).
KIND_FILTERS = {"attention": ("attn", "attention.", "self_attn", "attention"), "mlp": ("mlp", "feed_forward", "ffn")}
_FILTER_KIND = {f: kind for kind, filters in KIND_FILTERS.items() for f in filters}
Conditions = tuple[tuple[str | None, float], ...]  # a filter list: (filter, or None for every tensor; value)


# --- export --------------------------------------------------------------------------------------


def recipe_to_mergekit(
    recipe: Recipe, n_layers: int, *, out_dtype: str | None = None, names: Sequence[str] | None = None
) -> str:
    """mergekit-yaml text for `recipe` over a base of `n_layers` decoder layers.

    out_dtype: the output dtype to write when the recipe's dtype is "auto" (pass the base's, e.g.
    "bfloat16", so mergekit writes what evomerge writes); ignored when the recipe names one.
    names: the base's tensor names, to check that each kind's filter selects exactly that kind's
    tensors (recipes with kinds; without names the first filter of `KIND_FILTERS` is used).
    """
    _shared_method(recipe.method, "recipe")
    filters = kind_filters(recipe.kinds, names)
    config: dict[str, Any] = {"merge_method": recipe.method, "base_model": recipe.base}
    if recipe.n_groups == 1:
        shared, own = _export_params(recipe, recipe.layer_group(0), filters)
        config["models"] = _export_models(recipe, own, None)
        config["parameters"] = shared
    else:
        ranges = layer_ranges(n_layers, recipe.n_groups)
        config["slices"] = [_export_slice(recipe, recipe.layer_group(g), r, filters) for g, r in enumerate(ranges)]
    if not config.get("parameters"):
        config.pop("parameters", None)
    config["dtype"] = "float32"
    chosen = recipe.dtype if is_float_name(recipe.dtype) else out_dtype
    if chosen:
        config["out_dtype"] = chosen
    return _header(recipe) + yaml.safe_dump(config, sort_keys=False, default_flow_style=None)


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
        if _per_model(spec, key) and any(_is_many(v) for v in values):
            for index, entry in enumerate(own):
                entry[_mk(key)] = _by_kind([v[index] if _is_many(v) else v for v in values], recipe.kinds, filters)
        else:
            shared[_mk(key)] = _by_kind(values, recipe.kinds, filters)
    return shared, own


def _by_kind(values: Sequence[Any], kinds: Sequence[str], filters: Mapping[str, str]) -> float | list[dict]:
    """One number when every kind has the same value, else mergekit conditions: one per split kind, then a default."""
    values = [float(v) for v in values]
    if len(set(values)) == 1:
        return values[0]
    return [{"filter": filters[k], "value": v} for k, v in zip(kinds[:-1], values[:-1])] + [{"value": values[-1]}]


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
    elif layer_range is not None:  # a slice lists its base among its sources
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
    return recipe_to_mergekit(
        recipe, num_layers(base.config), out_dtype=out_dtype if is_float_name(out_dtype) else None, names=base.names
    )


def mergekit_text_for(recipe: Recipe, base: Checkpoint) -> str | None:
    """`mergekit_text`, or None when the recipe has no mergekit form (to ship next to an export)."""
    try:
        return mergekit_text(recipe, base)
    except ConfigError:
        return None


# --- import --------------------------------------------------------------------------------------


def is_mergekit_config(text: str) -> bool:
    """Whether a YAML file is a mergekit config (it names merge_method) rather than an evomerge recipe."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return False
    return isinstance(data, Mapping) and "merge_method" in data


def load_mergekit_recipe(text: str, *, allow_pickle: bool = False) -> Recipe:
    """`recipe_from_mergekit`, with the slices checked against the base model's layer count and the
    filters against its tensor names."""
    recipe = recipe_from_mergekit(text)
    base = Checkpoint.open(recipe.base, allow_pickle=allow_pickle)
    return recipe_from_mergekit(text, n_layers=num_layers(base.config), names=base.names)



def recipe_from_mergekit(
    text: str, *, n_layers: int | None = None, seed: int = 0, names: Sequence[str] | None = None
) -> Recipe:
    """The Recipe for a mergekit-yaml config (models: or slices: form) of a method both tools share.

    n_layers: the base model's layer count, when known, to check that slices cover every layer.
    names: the base's tensor names, when known, to check that each filter selects exactly one tensor kind.
    Parameters filtered by tensor kind (`[{filter: attn, value: ..}, {value: ..}]`) give a recipe with
    `kinds`: the kinds some filter names, then other.
    """
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"mergekit YAML: does not parse: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, Mapping):
        raise ConfigError("mergekit YAML: expected a mapping with merge_method and models or slices")
    _check_keys(data, _TOP_KEYS, "mergekit YAML")
    method = _required(data, "merge_method", "mergekit YAML")
    spec = _shared_method(str(method), "mergekit YAML: merge_method")
    base = _reference(data.get("base_model"), "base_model") if data.get("base_model") is not None else None
    _check_tokenizer(data.get("tokenizer_source"))
    if ("models" in data) == ("slices" in data):
        raise ConfigError("mergekit YAML: give exactly one of models: or slices: (modules: is not supported)")
    top = _params(data.get("parameters"), "parameters")
    if "models" in data:
        parts = [([_model_entry(m, f"models[{i}]", with_range=False) for i, m in enumerate(_list(data["models"], "models"))], {})]
    else:
        parts = [_slice(s, f"slices[{i}]", base) for i, s in enumerate(_list(data["slices"], "slices"))]
        ranges = _check_tiling(parts, n_layers)
    kinds = _kinds_of(parts, top, names)
    base, sources, groups = _groups_of(parts, spec, base, top, kinds)
    if "slices" in data:
        groups = _regroup(groups, ranges)
    dtype = data.get("out_dtype") or data.get("dtype") or "auto"
    flat = tuple(slot for group in groups for slot in group)
    recipe = Recipe(method=spec.name, base=base, sources=tuple(sources), groups=flat, seed=seed, dtype=str(dtype), kinds=kinds)
    for params in recipe.groups:
        try:
            spec.check(params, len(recipe.sources))  # ranges, model counts: the usual one-line errors
        except ConfigError as exc:
            named = re.sub(r"models\[(\d+)\]", lambda m: f"model {recipe.sources[int(m.group(1))]!r}", str(exc))
            raise ConfigError(f"mergekit YAML: {named}") from None
    return recipe


def _check_keys(data: Mapping, allowed: Sequence[str], where: str) -> None:
    for key in data:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: key {key!r} is not supported{hint}; supported: {', '.join(allowed)}")


def _required(data: Mapping, key: str, where: str) -> Any:
    if data.get(key) is None:
        raise ConfigError(f"{where}: {key} is missing")
    return data[key]


def _list(value: Any, where: str) -> list:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"mergekit YAML: {where} must be a non-empty list")
    return value


def _reference(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"mergekit YAML: {where} = {value!r}; give a model path or Hub id as a string")
    if "+" in value:
        raise ConfigError(f"mergekit YAML: {where} = {value!r}; LoRA references (model+lora) are not supported; merge the LoRA first")
    return value


def _check_tokenizer(value: Any) -> None:
    if value not in (None, "base"):
        raise ConfigError(f"mergekit YAML: tokenizer_source = {value!r}; evomerge copies the base's tokenizer; use base or leave it out")


def _params(value: Any, where: str) -> dict[str, float]:
    """A parameters mapping with scalar values, names in evomerge's spelling."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"mergekit YAML: {where} must be a mapping of parameter names to numbers")
    out = {}
    for key, v in value.items():
        at = f"{where}.{key}"
        if isinstance(v, list) and v and all(isinstance(x, Mapping) for x in v) or isinstance(v, Mapping):
            out[_FROM_MERGEKIT.get(str(key), str(key))] = _conditions(v if isinstance(v, list) else [v], at)
            continue
        if isinstance(v, list):
            raise ConfigError(
                f"mergekit YAML: {at} = {v} is a gradient (mergekit interpolates it layer by layer); evomerge keeps "
                "parameters constant within a layer group: use slices: with one number per slice"
            )
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            if isinstance(v, bool) and str(key) in ("normalize", "rescale", "int8_mask", "filter_wise"):
                out[str(key)] = v
                continue
            raise ConfigError(f"mergekit YAML: {at} = {v!r}; expected a number")
        out[_FROM_MERGEKIT.get(str(key), str(key))] = float(v)
    return out


def _conditions(items: list[Mapping], at: str) -> Conditions:
    """mergekit's filter list as ((filter or None, value), ...); each filter must name one tensor kind."""
    out = []
    for i, item in enumerate(items):
        _check_keys(item, ("filter", "value"), f"mergekit YAML: {at}[{i}]")
        value, filt = item.get("value"), item.get("filter")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"mergekit YAML: {at}[{i}].value = {value!r}; expected one number (no gradients inside filters)")
        if filt is not None and filt != "*" and filt not in _FILTER_KIND:
            known = ", ".join(f"{f} ({k})" for f, k in _FILTER_KIND.items())
            raise ConfigError(
                f"mergekit YAML: {at}[{i}].filter = {filt!r}; evomerge takes parameters per tensor kind, "
                f"with the filters {known}, or one value per slice"
            )
        out.append((None if filt in (None, "*") else str(filt), float(value)))
    return tuple(out)


def _evaluate(setting: Any, kind: str | None) -> Any:
    """A setting's value for tensors of `kind` (mergekit: the first condition that matches), or None."""
    if not isinstance(setting, tuple):
        return setting
    return next((value for filt, value in setting if filt is None or _FILTER_KIND[filt] == kind), None)


def _kinds_of(parts: list[tuple[list, dict]], top: dict, names: Sequence[str] | None) -> tuple[str, ...]:
    """The recipe's kinds: those some filter names, in order, then other; () without filters."""
    scopes = [top, *(shared for _, shared in parts), *(p for inputs, _ in parts for _, _, p in inputs)]
    used = {f for scope in scopes for v in scope.values() if isinstance(v, tuple) for f, _ in v if f is not None}
    for filt in sorted(used):
        kind = _FILTER_KIND[filt]
        wrong = next((n for n in names or () if (filt in n) != (tensor_kind(n) == kind)), None)
        if wrong is not None:
            got = "matches" if filt in wrong else "misses"
            raise ConfigError(
                f"mergekit YAML: filter {filt!r} {got} {wrong!r}, which evomerge counts as {tensor_kind(wrong)}; "
                f"use a filter that selects exactly the {kind} tensors: {', '.join(KIND_FILTERS[kind])}"
            )
    split = tuple(k for k in KIND_FILTERS if k in {_FILTER_KIND[f] for f in used})
    return (*split, OTHER) if split else ()


def _model_entry(entry: Any, where: str, *, with_range: bool) -> tuple[str, tuple[int, int] | None, dict]:
    if not isinstance(entry, Mapping):
        raise ConfigError(f"mergekit YAML: {where} must be a mapping with model:")
    _check_keys(entry, ("model", "layer_range", "parameters") if with_range else ("model", "parameters"), f"mergekit YAML: {where}")
    model = _reference(_required(entry, "model", f"mergekit YAML: {where}"), f"{where}.model")
    layer_range = None
    if with_range:
        raw = _required(entry, "layer_range", f"mergekit YAML: {where}")
        if not (isinstance(raw, list) and len(raw) == 2 and all(isinstance(x, int) for x in raw) and raw[0] < raw[1]):
            raise ConfigError(f"mergekit YAML: {where}.layer_range = {raw!r}; expected [start, end] with start < end")
        layer_range = (raw[0], raw[1])
    return model, layer_range, _params(entry.get("parameters"), f"{where}.parameters")


def _slice(entry: Any, where: str, base: str | None) -> tuple[list, dict]:
    if not isinstance(entry, Mapping):
        raise ConfigError(f"mergekit YAML: {where} must be a mapping with sources:")
    _check_keys(entry, ("sources", "parameters", "base_model"), f"mergekit YAML: {where}")
    if entry.get("base_model") is not None and entry["base_model"] != base:
        raise ConfigError(f"mergekit YAML: {where}.base_model differs from base_model; evomerge merges every layer onto one base")
    inputs = [_model_entry(s, f"{where}.sources[{i}]", with_range=True) for i, s in enumerate(_list(entry.get("sources"), f"{where}.sources"))]
    return inputs, _params(entry.get("parameters"), f"{where}.parameters")


def _check_tiling(slices: list[tuple[list, dict]], n_layers: int | None) -> list[tuple[int, int]]:
    """Each slice's single layer range; together they must tile 0 .. n_layers in order."""
    ranges, end = [], 0
    for index, (inputs, _) in enumerate(slices):
        own = {r for _, r, _ in inputs}
        if len(own) != 1:
            raise ConfigError(f"mergekit YAML: slices[{index}] takes different layer ranges from its models; evomerge merges layer i of every model into layer i")
        (start, stop), = own
        if start != end:
            raise ConfigError(
                f"mergekit YAML: slices[{index}] starts at layer {start}, expected {end}; slices must cover the layers "
                "in order without gaps or repeats (no layer stacking)"
            )
        ranges.append((start, stop))
        end = stop
    if n_layers is not None and end != n_layers:
        raise ConfigError(f"mergekit YAML: slices cover layers 0 to {end}, the base has {n_layers}; evomerge keeps every layer")
    return ranges


def _groups_of(
    parts: list[tuple[list, dict]], spec, base: str | None, top: dict, kinds: tuple[str, ...]
) -> tuple[str, list[str], list[list[dict]]]:
    """Base, sources (the same in every part) and each part's parameters in recipe form, one mapping per kind."""
    base, sources = _roles(spec, parts[0][0], base, top, parts[0][1], kinds)
    groups = []
    for index, (inputs, shared) in enumerate(parts):
        base_i, sources_i = _roles(spec, inputs, base, top, shared, kinds)
        if sources_i != sources:
            raise ConfigError(f"mergekit YAML: slices[{index}] merges {sources_i}, slices[0] merges {sources}; every slice must merge the same models")
        groups.append([_group_params(spec, inputs, sources, shared, top, kind) for kind in kinds or (None,)])
    if spec.name == "linear":
        groups = [[_unit_weights(g) for g in slots] for slots in groups]
    return base, sources, groups


def _unit_weights(group: dict[str, ParamValue]) -> dict[str, ParamValue]:
    """linear divides by the summed weights, so only their ratios matter: evomerge takes weights in
    [0, 1], and larger mergekit weights are divided by the largest (same merge, up to rounding)."""
    weight = group.get("weight")
    values = weight if isinstance(weight, tuple) else (weight,) if weight is not None else ()
    top = max(values, default=0.0)
    if top <= 1:
        return group
    scaled = tuple(v / top for v in values)
    return group | {"weight": scaled if isinstance(weight, tuple) else scaled[0]}


def _roles(spec, inputs: list, base: str | None, top: dict, shared: dict, kinds: tuple[str, ...]) -> tuple[str, list[str]]:
    models = [m for m, _, _ in inputs]
    if spec.name == "linear":
        base = base or models[0]
        weights = {m: {_resolve("weight", p, shared, top, k) for k in kinds or (None,)} for m, _, p in inputs}
        if base not in models:  # mergekit adds the base as an input, with the weight its settings give it
            weights[base] = {_resolve("weight", {}, shared, top, k) for k in kinds or (None,)}
            models = [*models, base]
        return base, [m for m in models if not (m == base and weights[m] == {0.0})]
    if base is None:
        raise ConfigError(f"mergekit YAML: {spec.name} needs base_model")
    return base, [m for m in models if m != base]


def _resolve(name: str, own: dict, shared: dict, top: dict, kind: str | None = None) -> Any:
    """mergekit's precedence: the model's setting, then the slice's, then the top level's; a filter list
    that has no condition for `kind` falls through to the next."""
    for scope in (own, shared, top):
        value = _evaluate(scope[name], kind) if name in scope else None
        if value is not None:
            return value
    return None


def _group_params(spec, inputs: list, sources: list[str], shared: dict, top: dict, kind: str | None) -> dict[str, ParamValue]:
    """One group's parameters for tensors of `kind`: per-model values by mergekit's precedence (model, slice, top level)."""
    own = {m: p for m, _, p in inputs}
    names = {k for scope in (*own.values(), shared, top) for k in scope}
    _check_flags(spec, names, own, shared, top)
    group: dict[str, ParamValue] = {}
    for name in sorted(names - {"normalize", "rescale", "int8_mask", "filter_wise"}):
        param = _param_spec(spec, name)
        if not param.per_model:
            misplaced = [m for m, p in own.items() if name in p]
            if misplaced:
                raise ConfigError(f"mergekit YAML: {_mk(name)} is set for model {misplaced[0]!r}; it is one value for all models: put it under parameters:")
            value = _resolve(name, {}, shared, top, kind)
            if value is not None:
                group[name] = value
            continue
        values = [_resolve(name, own.get(m, {}), shared, top, kind) for m in sources]
        if all(_evaluate(own.get(m, {}).get(name), kind) is None for m in sources) and values[0] is not None:
            group[name] = values[0]  # one number for every model
        elif any(v is None for v in values):
            missing = sources[values.index(None)]
            raise ConfigError(f"mergekit YAML: {_mk(name)} is set for some models but not for {missing!r}; set it for every model or under parameters:")
        else:
            group[name] = tuple(values)
    return group


def _check_flags(spec, names: set[str], own: dict, shared: dict, top: dict) -> None:
    for flag in ("normalize", "rescale", "int8_mask", "filter_wise"):
        if flag not in names:
            continue
        value = _resolve(flag, {}, shared, top)
        if any(flag in p for p in own.values()) or value is None:
            raise ConfigError(f"mergekit YAML: {flag} is one value for all models: put it under parameters:")
        if flag == "int8_mask" and spec.name in TASK_VECTOR_METHODS:
            continue  # mergekit's masks are bool either way: no numerical effect
        allowed = _allowed_flag(spec.name, flag)
        if allowed is None or value != allowed:
            fixed = "" if allowed is None else f"; evomerge's {spec.name} always uses {flag}: {str(allowed).lower()}"
            raise ConfigError(f"mergekit YAML: {flag}: {str(value).lower()} is not supported for {spec.name}{fixed}")


def _allowed_flag(method: str, flag: str) -> bool | None:
    if method in _FLAGS and flag in ("normalize", "rescale"):
        return _FLAGS[method][0 if flag == "normalize" else 1]
    if method == "linear" and flag == "normalize":
        return True
    if method == "model_stock" and flag == "filter_wise":
        return False
    return None


def _param_spec(spec, name: str):
    try:
        return spec.param(name)
    except KeyError:
        known = [_mk(p.name) for p in spec.params]
        close = difflib.get_close_matches(_mk(name), known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        takes = ", ".join(known) or "no parameters"
        raise ConfigError(f"mergekit YAML: {spec.name} has no parameter {_mk(name)!r}{hint}; it takes: {takes}") from None


def _mk(name: str) -> str:
    return _TO_MERGEKIT.get(name, name)


def _regroup(groups: list[dict], ranges: list[tuple[int, int]]) -> list[dict]:
    """Slices on evomerge's near-equal split stay one group each; other tilings get one group per layer."""
    n_layers = ranges[-1][1]
    if len(ranges) <= n_layers and ranges == layer_ranges(n_layers, len(ranges)):
        return groups
    return [groups[i] for i, (start, stop) in enumerate(ranges) for _ in range(start, stop)]
