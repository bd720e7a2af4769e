"""mergekit-yaml configs (mergekit 0.1.5) as evomerge recipes, with mergekit's semantics.

    recipe_from_mergekit(text, n_layers=.., names=..)   # Recipe (a merge) or PathRecipe (passthrough)

How mergekit reads a parameter, and how it lands in a recipe:

- Precedence: a model's own setting, then its slice's, then the top level's; within a filter list the
  first condition whose filter is a substring of the tensor name wins; a list with no match falls
  through to the next scope, and then to the method's default (`mergekit.parameter_resolver`).
- Gradients: a list of numbers is interpolated over the layers of its slice, layer i of n at
  t = i / (n - 1) (t = 1 for a one-layer slice), between the two nearest points
  (`mergekit.config.evaluate_setting`). The embeddings take the first slice's values at t = 0, the final
  norm and head the last slice's, also at t = 0 (`MergePlanner.plan_module`).

A recipe gets one layer group per run of layers that share their values (the fewest near-equal groups
that fit, or one per layer), values that depend on the tensor's name as `recipe.Filtered` lists, and,
where the embeddings or head take other values than their group (gradients), conditions on their exact
names. Filters that select exactly a tensor kind (attn, mlp, ...) give a recipe with `kinds`, as
evomerge's own exports write them. mergekit's switches (normalize, rescale, filter_wise) are kept where
they differ from the method's default; int8_mask changes nothing and is dropped.

Layer stacking (`merge_method: passthrough`, slices that repeat or reorder layers) becomes a `PathRecipe`:
one slot per output layer, embeddings from the first slice's model and final norm and head from the
last slice's, as mergekit lays them out.

What mergekit ignores, we ignore: parameters some mergekit method takes but this method does not (a
`weight` on slerp or model_stock). A name no mergekit method takes is refused as a typo (did-you-mean).
Tokenizer settings (`tokenizer_source`, the `tokenizer:` block, `chat_template`) become the recipe's
`TokenizerSpec`; LoRA references (`model+adapter`) stay as written and are applied before merging
(`export.lora.resolve_loras`). The `modules:` form of a decoder-only model (one module, `default`) reads as
the top-level form, its parameters a scope between the slices' and the top level's. Refused, each in one
line: `modules:` naming other modules (multimodal architectures), tokenizer settings on a passthrough,
slices whose models take different layer ranges in a merge.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from evomerge.errors import ConfigError
from evomerge.merge.catalog import MethodSpec, get_method
from evomerge.models.layout import LayerGroups, group_of_each, layer_index
from evomerge.recipe import OTHER, Filtered, ParamValue, PathRecipe, Recipe
from evomerge.recipe.refs import split_lora
from evomerge.recipe.tokenizer import TokenizerSpec

TOP_KEYS = ("merge_method", "base_model", "models", "slices", "modules", "parameters", "dtype", "out_dtype", "tokenizer_source",
            "tokenizer", "chat_template")
MODULE = "default"  # mergekit's name for the one module of a decoder-only architecture
# Every parameter name some mergekit 0.1.5 method takes: a method that lacks one ignores it, as mergekit does.
MERGEKIT_PARAMETERS = frozenset({
    "weight", "density", "gamma", "epsilon", "lambda", "t", "normalize", "rescale", "int8_mask", "filter_wise",
    "select_topk", "nuslerp_row_wise", "nuslerp_flatten", "normalize_weights", "eps", "max_iter", "tol", "scale",
    "r", "alpha",
})
FROM_MERGEKIT = {"lambda": "lambda_"}
BASE_OPTIONAL = ("nuslerp", "multislerp")  # without base_model they work on the weights (use_base false)
FP32_RESULT = ("arcee_fusion", "ramplus_tl")  # mergekit's kernels return fp32 (fp32 masks, scales): without out_dtype it writes fp32
INPUTS_ONLY = ("karcher", "passthrough")  # every model (the base too, last, where mergekit adds it) is an input
ANCHORED = ("linear", *INPUTS_ONLY, *BASE_OPTIONAL)  # base_model optional: else the first model is the template
TO_MERGEKIT = {v: k for k, v in FROM_MERGEKIT.items()}
Chain = tuple[tuple[str | None, Any], ...]  # (filter or None, value): a filter list evaluated at one t


@dataclass(frozen=True)
class Conditions:
    """A filter list as written: ((filter or None, number or gradient), ...)."""

    items: tuple[tuple[str | None, Any], ...]


Setting = float | bool | tuple[float, ...] | Conditions  # a number, a switch, a gradient, or a filter list


@dataclass
class Slice:
    """One output slice: its inputs (model, layer range or None, own settings) and its settings."""

    inputs: list[tuple[str, tuple[int, int] | None, dict[str, Setting]]]
    params: dict[str, Setting] = field(default_factory=dict)

    def own(self, model: str) -> dict[str, Setting]:
        return next((p for m, _, p in self.inputs if m == model), {})

    @property
    def length(self) -> int | None:
        ranges = {r for _, r, _ in self.inputs}
        return None if None in ranges else next(iter(ranges))[1] - next(iter(ranges))[0]


@dataclass(frozen=True)
class Planned:
    """What every layer of the output needs: its slice and the t its gradients are read at."""

    slice: int
    t: float


def recipe_from_mergekit(
    text: str, *, n_layers: int | None = None, seed: int = 0, names: Sequence[str] | None = None,
    arithmetic: str = "evomerge",
) -> Recipe | PathRecipe:
    """The recipe of a mergekit-yaml config.

    n_layers: the base's layer count (needed for gradients in the models: form; checks slice coverage).
    names: the base's tensor names (checks kind filters; places the embeddings' and head's own values).
    arithmetic: "evomerge" (fp32, rounded once) or "mergekit" (mergekit's, in the config's `dtype`).
    """
    data = _mapping(text)
    method = str(_required(data, "merge_method", "mergekit YAML"))
    if method == "passthrough" and "slices" in data:
        return _path_recipe(data, n_layers)
    spec = _method(method)
    slices, top = _slices_of(data), _params(data.get("parameters"), "parameters")
    base, sources = _roles(spec, slices, _base_of(data), top)
    if spec.name in BASE_OPTIONAL and _base_of(data) is None:
        top = {**top, "use_base": False}  # no base_model: mergekit interpolates the weights themselves
    plan = _plan(slices, n_layers, _has_gradient(slices, top))
    per_layer = [_group(spec, slices[p.slice], sources, top, p.t) for p in plan]
    groups = _grouping(per_layer, slices, plan)
    if names is not None and len(plan) > 1:
        groups = _place_outside(groups, spec, slices, sources, top, names, len(plan))
    kinds, flat = _as_kinds(groups, _filters_used(slices, top), names)
    dtype = data.get("out_dtype") or ("float32" if spec.name in FP32_RESULT else data.get("dtype")) or "auto"
    recipe = Recipe(method=spec.name, base=base, sources=tuple(sources), groups=flat, seed=seed, dtype=str(dtype), kinds=kinds,
                    mergekit_dtype=_arithmetic(arithmetic, data), tokenizer=tokenizer_of(data))
    _check_values(spec, recipe)
    return recipe


def base_reference(text: str) -> str:
    """The model a config's tensor names and layer count come from: base_model, else the first model."""
    data = _mapping(text)
    if data.get("base_model") is not None:
        return _reference(data["base_model"], "base_model")
    slices = _slices_of(data)
    return slices[0].inputs[0][0]


# --- reading the YAML ----------------------------------------------------------------------------


def _mapping(text: str) -> Mapping[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"mergekit YAML: does not parse: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, Mapping):
        raise ConfigError("mergekit YAML: expected a mapping with merge_method and models or slices")
    check_keys(data, TOP_KEYS, "mergekit YAML")
    if "modules" in data:
        data = _without_modules(data)
    if ("models" in data) == ("slices" in data):
        raise ConfigError("mergekit YAML: give exactly one of models:, slices: or modules:")
    return data


def _without_modules(data: Mapping[str, Any]) -> dict[str, Any]:
    """The `modules:` form as the top-level form: its one module's models or slices, its parameters a scope
    between the slices' and the top level's (mergekit's ConfigReader precedence)."""
    modules = data["modules"]
    if not isinstance(modules, Mapping) or list(modules) != [MODULE]:
        names = list(modules) if isinstance(modules, Mapping) else modules
        raise ConfigError(f"mergekit YAML: modules = {names!r}; evomerge merges decoder-only models, whose one module is "
                          f"{MODULE!r}: write modules: {{{MODULE}: {{models: ... or slices: ...}}}}, or models: / slices: at the top")
    module = modules[MODULE]
    if not isinstance(module, Mapping):
        raise ConfigError(f"mergekit YAML: modules.{MODULE} must be a mapping with models: or slices:")
    check_keys(module, ("models", "slices", "parameters"), f"mergekit YAML: modules.{MODULE}")
    if "models" in data or "slices" in data:
        raise ConfigError("mergekit YAML: give exactly one of models:, slices: or modules:")
    out = {k: v for k, v in data.items() if k != "modules"} | {k: v for k, v in module.items() if k != "parameters"}
    inner, outer = _raw_params(module.get("parameters"), f"modules.{MODULE}.parameters"), _raw_params(data.get("parameters"), "parameters")
    out["parameters"] = {k: _stacked(inner[k], outer[k]) if k in inner and k in outer else inner.get(k, outer.get(k))
                         for k in (*inner, *(k for k in outer if k not in inner))}
    return out


def _raw_params(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"mergekit YAML: {where} must be a mapping of parameter names to values")
    return value


def _stacked(inner: Any, outer: Any) -> list[dict[str, Any]]:
    """Two scopes' settings of one parameter as one filter list: the inner scope's conditions first."""
    def items(value: Any) -> list[dict[str, Any]]:
        if isinstance(value, Mapping):
            return [dict(value)]
        if isinstance(value, list) and value and all(isinstance(x, Mapping) for x in value):
            return [dict(x) for x in value]
        return [{"value": value}]
    return [*items(inner), *items(outer)]


def tokenizer_of(data: Mapping[str, Any]) -> TokenizerSpec | None:
    """`tokenizer_source`, the `tokenizer:` block (its source wins, and defaults to union, as in mergekit) and
    `chat_template` as one TokenizerSpec; None when the config has none of them."""
    block, source, template = data.get("tokenizer"), data.get("tokenizer_source"), data.get("chat_template")
    if block is None and source is None and template is None:
        return None
    if block is not None:
        if not isinstance(block, Mapping):
            raise ConfigError("mergekit YAML: tokenizer must be a mapping with source, tokens, pad_to_multiple_of")
        check_keys(block, ("source", "tokens", "pad_to_multiple_of"), "mergekit YAML: tokenizer")
        spec = TokenizerSpec.from_data({"source": "union", **block}, "mergekit YAML: tokenizer")
    else:
        spec = TokenizerSpec(source=None if source is None else _reference(source, "tokenizer_source"))
    if template is not None and not isinstance(template, str):
        raise ConfigError(f"mergekit YAML: chat_template = {template!r}; give auto or a Jinja template text")
    return TokenizerSpec(spec.source, spec.tokens, spec.pad_to_multiple_of, template)


def _method(name: str) -> MethodSpec:
    try:
        return get_method(name)
    except ConfigError as exc:
        raise ConfigError(f"mergekit YAML: merge_method: {exc}") from None


def _base_of(data: Mapping[str, Any]) -> str | None:
    return _reference(data["base_model"], "base_model") if data.get("base_model") is not None else None


def _slices_of(data: Mapping[str, Any]) -> list[Slice]:
    if "models" in data:
        return [Slice([_input(m, f"models[{i}]", with_range=False) for i, m in enumerate(_list(data["models"], "models"))])]
    return [_slice(s, f"slices[{i}]", _base_of(data)) for i, s in enumerate(_list(data["slices"], "slices"))]


def _slice(entry: Any, where: str, base: str | None) -> Slice:
    if not isinstance(entry, Mapping):
        raise ConfigError(f"mergekit YAML: {where} must be a mapping with sources:")
    check_keys(entry, ("sources", "parameters", "base_model"), f"mergekit YAML: {where}")
    if entry.get("base_model") is not None and entry["base_model"] != base:
        raise ConfigError(f"mergekit YAML: {where}.base_model differs from base_model; evomerge merges every layer onto one base")
    inputs = [_input(s, f"{where}.sources[{i}]", with_range=True) for i, s in enumerate(_list(entry.get("sources"), f"{where}.sources"))]
    return Slice(inputs, _params(entry.get("parameters"), f"{where}.parameters"))


def _input(entry: Any, where: str, *, with_range: bool) -> tuple[str, tuple[int, int] | None, dict[str, Setting]]:
    if not isinstance(entry, Mapping):
        raise ConfigError(f"mergekit YAML: {where} must be a mapping with model:")
    check_keys(entry, ("model", "layer_range", "parameters") if with_range else ("model", "parameters"), f"mergekit YAML: {where}")
    model = _reference(_required(entry, "model", f"mergekit YAML: {where}"), f"{where}.model")
    layer_range = None
    if with_range:
        raw = _required(entry, "layer_range", f"mergekit YAML: {where}")
        if not (isinstance(raw, list) and len(raw) == 2 and all(isinstance(x, int) for x in raw) and 0 <= raw[0] <= raw[1]):
            raise ConfigError(f"mergekit YAML: {where}.layer_range = {raw!r}; expected [start, end] with 0 <= start <= end")
        layer_range = (raw[0], raw[1])
    return model, layer_range, _params(entry.get("parameters"), f"{where}.parameters")


def _params(value: Any, where: str) -> dict[str, Setting]:
    """A parameters mapping: each value a number, a switch, a gradient or a filter list."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"mergekit YAML: {where} must be a mapping of parameter names to values")
    return {str(k): _setting(v, f"{where}.{k}") for k, v in value.items()}


def _setting(value: Any, at: str) -> Setting:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, Mapping) or isinstance(value, list) and value and all(isinstance(x, Mapping) for x in value):
        return Conditions(tuple(_condition(item, f"{at}[{i}]") for i, item in enumerate(value if isinstance(value, list) else [value])))
    if isinstance(value, list) and value and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
        return tuple(float(x) for x in value)
    raise ConfigError(f"mergekit YAML: {at} = {value!r}; expected a number, a gradient (a list of numbers), true/false, or a filter list")


def _condition(item: Mapping, at: str) -> tuple[str | None, Any]:
    check_keys(item, ("filter", "value"), f"mergekit YAML: {at}")
    value = _setting(_required(item, "value", f"mergekit YAML: {at}"), f"{at}.value")
    if isinstance(value, Conditions):
        raise ConfigError(f"mergekit YAML: {at}.value is a filter list; a condition's value is a number or a gradient")
    filt = item.get("filter")
    if filt is not None and not isinstance(filt, str):
        raise ConfigError(f"mergekit YAML: {at}.filter = {filt!r}; a filter is a substring of tensor names")
    return (None if filt in (None, "*") else filt), value


def _list(value: Any, where: str) -> list:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"mergekit YAML: {where} must be a non-empty list")
    return value


def _reference(value: Any, where: str) -> str:
    """A model reference as written: a path or Hub id, or MODEL+ADAPTER (a LoRA, applied before merging)."""
    if not isinstance(value, str):
        raise ConfigError(f"mergekit YAML: {where} = {value!r}; give a model path or Hub id as a string")
    try:
        split_lora(value)
    except ConfigError as exc:
        raise ConfigError(f"mergekit YAML: {where}: {exc}") from None
    return value


def _required(data: Mapping, key: str, where: str) -> Any:
    if data.get(key) is None:
        raise ConfigError(f"{where}: {key} is missing")
    return data[key]


def check_keys(data: Mapping, allowed: Sequence[str], where: str) -> None:
    for key in data:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: key {key!r} is not supported{hint}; supported: {', '.join(allowed)}")


def _arithmetic(arithmetic: str, data: Mapping[str, Any]) -> str | None:
    if arithmetic == "evomerge":
        return None
    if arithmetic != "mergekit":
        raise ConfigError(f"arithmetic = {arithmetic!r}; use evomerge (fp32, rounded once) or mergekit (mergekit's, in its dtype)")
    return str(data.get("dtype") or "auto")


# --- models and layers ---------------------------------------------------------------------------


def _roles(spec: MethodSpec, slices: list[Slice], base: str | None, top: dict) -> tuple[str, list[str]]:
    """The base and the sources (the same models in every slice); linear keeps a weighted base as a source."""
    models = [m for m, _, _ in slices[0].inputs]
    for index, s in enumerate(slices):
        if sorted({m for m, _, _ in s.inputs}) != sorted(set(models)):
            raise ConfigError(f"mergekit YAML: slices[{index}] merges other models than slices[0]; every slice must merge the same models")
    if spec.name not in ANCHORED and base is None:
        raise ConfigError(f"mergekit YAML: {spec.name} needs base_model")
    if spec.name in BASE_OPTIONAL and base is None or spec.name in INPUTS_ONLY:
        inputs = models if base is None or base in models else [*models, base]
        return base or models[0], inputs  # the base (or first model) is the template; the inputs are sources
    base = base or models[0]
    if spec.name != "linear":
        return base, [m for m in models if m != base]
    if base not in models:  # mergekit adds the base as an input, with the weight its settings give it
        models = [*models, base]
    weights = [_chain(s.own(base).get("weight"), s.params.get("weight"), top.get("weight"), t=t) for s in slices for t in (0.0, 1.0)]
    unweighted = all(c and c[0] == (None, 0.0) for c in weights)
    return base, [m for m in models if not (m == base and unweighted)]


def _has_gradient(slices: list[Slice], top: dict) -> bool:
    def gradient(s: Setting) -> bool:
        return isinstance(s, tuple) or isinstance(s, Conditions) and any(isinstance(v, tuple) for _, v in s.items)
    scopes = [top, *(s.params for s in slices), *(p for s in slices for _, _, p in s.inputs)]
    return any(gradient(v) for scope in scopes for v in scope.values())


def _plan(slices: list[Slice], n_layers: int | None, gradient: bool) -> list[Planned]:
    """One entry per output layer (a single one for a gradient-free models: form)."""
    if slices[0].length is None:  # models: form
        if not gradient:
            return [Planned(0, 0.0)]
        if n_layers is None:
            raise ConfigError("mergekit YAML: a gradient is read layer by layer; evomerge needs the base's layer count (evomerge merge reads it from the base)")
        return [Planned(0, _t(i, n_layers)) for i in range(n_layers)]
    _check_tiling(slices, n_layers)
    return [Planned(k, _t(i, s.length)) for k, s in enumerate(slices) for i in range(s.length)]


def _t(index: int, length: int) -> float:
    return index / (length - 1) if length > 1 else 1.0


def _check_tiling(slices: list[Slice], n_layers: int | None) -> None:
    """In a merge, output layer i merges layer i of every model: the slices tile 0 .. n_layers in order."""
    end = 0
    for index, s in enumerate(slices):
        ranges = {r for _, r, _ in s.inputs}
        if len(ranges) != 1:
            raise ConfigError(
                f"mergekit YAML: slices[{index}] takes different layer ranges from its models; evomerge merges layer i of every "
                "model into layer i (to stack layers, use merge_method: passthrough with one model per slice)"
            )
        (start, stop), = ranges
        if start != end:
            raise ConfigError(
                f"mergekit YAML: slices[{index}] starts at layer {start}, expected {end}; a merge's slices cover the layers in "
                "order without gaps or repeats (no layer stacking in a merge: use merge_method: passthrough for that)"
            )
        end = stop
    if n_layers is not None and end != n_layers:
        raise ConfigError(f"mergekit YAML: slices cover layers 0 to {end}, the base has {n_layers}; evomerge keeps every layer")


# --- values --------------------------------------------------------------------------------------


def _at(setting: Setting | None, t: float) -> Chain:
    """A setting read at t, filters kept: mergekit's evaluate_setting without the tensor name."""
    if setting is None:
        return ()
    if isinstance(setting, Conditions):
        return tuple((f, _point(v, t)) for f, v in setting.items)
    return ((None, _point(setting, t)),)


def _point(value: Any, t: float) -> Any:
    """mergekit's gradient rule: linear between the two nearest of the n points spread over [0, 1]."""
    if not isinstance(value, tuple):
        return value
    scaled = t * (len(value) - 1)
    i0 = int(scaled)
    i1 = min(len(value) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * value[i0] + frac * value[i1]


def _chain(*scopes: Setting | None, t: float) -> Chain:
    """The scopes' filter lists in precedence order, cut after the first condition without a filter."""
    out: list[tuple[str | None, Any]] = []
    for scope in scopes:
        for condition in _at(scope, t):
            out.append(condition)
            if condition[0] is None:
                return tuple(out)
    return tuple(out)


def _value(chain: Chain, default: float, where: str) -> float | Filtered:
    """A chain as a recipe value: one number, or a Filtered list ending in the default where none matches."""
    if any(isinstance(v, bool) for _, v in chain):
        raise ConfigError(f"mergekit YAML: {where} = {chain[0][1]!r}; expected a number")
    if chain and chain[0][0] is None:
        return float(chain[0][1])
    ends = chain if chain and chain[-1][0] is None else (*chain, (None, default))
    return Filtered(tuple((f, float(v)) for f, v in ends))


def _group(spec: MethodSpec, s: Slice, sources: list[str], top: dict, t: float) -> dict[str, ParamValue]:
    """One layer's parameters (read at t): per-model values by mergekit's precedence (model, slice, top)."""
    names = {k for scope in (top, s.params, *(s.own(m) for m in sources)) for k in scope}
    group: dict[str, ParamValue] = {}
    for name in sorted(names):
        key = FROM_MERGEKIT.get(name, name)
        if any(p.name == key for p in spec.params):
            value = _param_value(spec, key, name, s, sources, top, t)
            if value is not None:
                group[key] = value
        elif any(sw.name == key for sw in spec.switches):
            value = _switch_value(spec, key, s, sources, top)
            if value is not None:
                group[key] = value
        elif name not in MERGEKIT_PARAMETERS:
            _unknown(spec, name)
    return group


def _param_value(spec: MethodSpec, key: str, name: str, s: Slice, sources: list[str], top: dict, t: float) -> ParamValue | None:
    param = spec.param(key)
    own = [m for m in sources if name in s.own(m)]
    if not param.per_model:
        if own:
            raise ConfigError(f"mergekit YAML: {name} is set for model {own[0]!r}; it is one value for all models: put it under parameters:")
        chain = _chain(s.params.get(name), top.get(name), t=t)
        return _value(chain, param.default, name) if chain else None
    if not own:
        chain = _chain(s.params.get(name), top.get(name), t=t)
        return _value(chain, param.default, name) if chain else None
    return tuple(_value(_chain(s.own(m).get(name), s.params.get(name), top.get(name), t=t), param.default, f"{name} of {m!r}") for m in sources)


def _switch_value(spec: MethodSpec, key: str, s: Slice, sources: list[str], top: dict) -> float | None:
    """A switch (normalize, rescale, ...) as 0.0 / 1.0 where it differs from the method's default."""
    switch = spec.switch(key)
    if any(key in s.own(m) for m in sources):
        raise ConfigError(f"mergekit YAML: {key} is one value for all models: put it under parameters:")
    chain = _chain(s.params.get(key), top.get(key), t=0.0)
    if not chain:
        return None
    if len(chain) > 1 or chain[0][0] is not None or chain[0][1] not in (True, False):
        raise ConfigError(f"mergekit YAML: {key} is a switch: give true or false, the same for every tensor")
    value = bool(chain[0][1])
    return None if value == switch.default or not switch.effect else float(value)


def _unknown(spec: MethodSpec, name: str) -> None:
    known = [TO_MERGEKIT.get(p.name, p.name) for p in spec.params] + [sw.name for sw in spec.switches]
    close = difflib.get_close_matches(name, sorted({*known, *MERGEKIT_PARAMETERS}), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    takes = ", ".join(known) or "no parameters"
    raise ConfigError(f"mergekit YAML: {spec.name} has no parameter {name!r}{hint}; it takes: {takes}")


def _check_values(spec: MethodSpec, recipe: Recipe) -> None:
    """Ranges and model counts against what a merge accepts; errors name the model, not its index."""
    for slot in range(len(recipe.groups)):
        for params in recipe.variants(slot):
            try:
                spec.check(params, len(recipe.sources), strict=False)
            except ConfigError as exc:
                named = re.sub(r"models\[(\d+)\]", lambda m: f"model {recipe.sources[int(m.group(1))]!r}", str(exc))
                raise ConfigError(f"mergekit YAML: {named}") from None


# --- layer groups --------------------------------------------------------------------------------


def _grouping(per_layer: list[dict], slices: list[Slice], plan: list[Planned]) -> list[dict]:
    """Layer groups: slices on evomerge's near-equal split stay one group each (when nothing varies
    within them); otherwise the fewest near-equal groups whose layers share their values."""
    n = len(per_layer)
    if slices[0].length is not None and len(slices) <= n:
        starts = [plan.index(next(p for p in plan if p.slice == k)) for k in range(len(slices))]
        even = [next(i for i in range(n) if LayerGroups(n, len(slices)).of_layer(i) == g) for g in range(len(slices))]
        if starts == even and all(per_layer[i] == per_layer[starts[plan[i].slice]] for i in range(n)):
            return [per_layer[i] for i in starts]
    for count in range(1, n + 1):
        groups = LayerGroups(n, count)
        firsts = [next(i for i in range(n) if groups.of_layer(i) == g) for g in range(count)]
        if all(per_layer[i] == per_layer[firsts[groups.of_layer(i)]] for i in range(n)):
            return [per_layer[i] for i in firsts]
    return per_layer


def _place_outside(groups: list[dict], spec: MethodSpec, slices: list[Slice], sources: list[str], top: dict,
                   names: Sequence[str], n_layers: int) -> list[dict]:
    """Give the embeddings and the final norm and head mergekit's values (the first, resp. last slice at
    t = 0) where their layer group's differ: conditions on their exact names, first in the group's lists."""
    ends = group_of_each([n for n in names if layer_index(n) is None], LayerGroups(n_layers, n_layers))
    out = [dict(g) for g in groups]
    for name, layer in ends.items():
        after = layer == n_layers - 1  # the final norm and head; the embeddings sit before layer 0
        g = len(groups) - 1 if after else 0
        wanted = _group(spec, slices[-1] if after else slices[0], sources, top, 0.0)
        for key, value in wanted.items():
            if not any(p.name == key for p in spec.params) or _for_name(out[g].get(key), name) == _for_name(value, name):
                continue
            _check_exact(name, names)
            out[g][key] = _prepend(out[g].get(key), value, name, spec.param(key).default)
    return out


def _for_name(value: ParamValue | None, name: str) -> Any:
    if isinstance(value, tuple):
        return tuple(v.value_for(name) if isinstance(v, Filtered) else v for v in value)
    return value.value_for(name) if isinstance(value, Filtered) else value


def _prepend(have: ParamValue | None, wanted: ParamValue, name: str, default: float) -> ParamValue:
    """`have`, with `name` taking `wanted`'s value for it first."""
    if isinstance(wanted, tuple) or isinstance(have, tuple):
        count = len(wanted) if isinstance(wanted, tuple) else len(have)
        wants = wanted if isinstance(wanted, tuple) else (wanted,) * count
        haves = have if isinstance(have, tuple) else (have,) * count
        return tuple(_prepend_one(h, w, name, default) for h, w in zip(haves, wants))
    return _prepend_one(have, wanted, name, default)


def _prepend_one(have: float | Filtered | None, wanted: float | Filtered, name: str, default: float) -> float | Filtered:
    value = wanted.value_for(name) if isinstance(wanted, Filtered) else wanted
    rest = have.conditions if isinstance(have, Filtered) else ((None, default if have is None else have),)
    return Filtered(((name, value), *rest))


def _check_exact(name: str, names: Sequence[str]) -> None:
    other = next((n for n in names if n != name and name in n), None)
    if other is not None:
        raise ConfigError(f"mergekit YAML: the values of {name!r} differ from its layer group's, and its name is part of {other!r}, so no filter selects it alone")


# --- kinds ---------------------------------------------------------------------------------------


def _filters_used(slices: list[Slice], top: dict) -> set[str]:
    scopes = [top, *(s.params for s in slices), *(p for s in slices for _, _, p in s.inputs)]
    return {f for scope in scopes for v in scope.values() if isinstance(v, Conditions) for f, _ in v.items if f is not None}


def _as_kinds(groups: list[dict], used: set[str], names: Sequence[str] | None) -> tuple[tuple[str, ...], tuple[dict, ...]]:
    """groups with `kinds` when every filter selects exactly one tensor kind (evomerge's per-kind form),
    else as they are (Filtered values)."""
    from evomerge.export.mergekit import FILTER_KIND, KIND_FILTERS
    from evomerge.models.layout import tensor_kind

    filtered = any(isinstance(x, Filtered) for g in groups for v in g.values() for x in (v if isinstance(v, tuple) else (v,)))
    if not filtered or not used or not used <= set(FILTER_KIND):
        return (), tuple(groups)
    if names is not None and any((f in n) != (tensor_kind(n) == FILTER_KIND[f]) for f in used for n in names):
        return (), tuple(groups)
    if any(not set(_filters_of(g)) <= used for g in groups):
        return (), tuple(groups)
    split = tuple(k for k in KIND_FILTERS if k in {FILTER_KIND[f] for f in used})
    kinds = (*split, OTHER)
    return kinds, tuple({k: _for_kind(v, kind) for k, v in g.items()} for g in groups for kind in kinds)


def _filters_of(group: dict) -> list[str]:
    values = [x for v in group.values() for x in (v if isinstance(v, tuple) else (v,))]
    return [f for x in values if isinstance(x, Filtered) for f, _ in x.conditions if f is not None]


def _for_kind(value: ParamValue, kind: str) -> ParamValue:
    from evomerge.export.mergekit import FILTER_KIND

    def one(x: float | Filtered) -> float:
        if not isinstance(x, Filtered):
            return x
        return next(v for f, v in x.conditions if f is None or FILTER_KIND[f] == kind)
    return tuple(one(x) for x in value) if isinstance(value, tuple) else one(value)


# --- passthrough ---------------------------------------------------------------------------------


def _path_recipe(data: Mapping[str, Any], n_layers: int | None) -> PathRecipe:
    """A passthrough (layer stacking) as a PathRecipe: each slice's layers in order, its `scale` (read
    per layer, gradients included) as the slots' tensor scales; the embeddings take the first slice's
    scale at t = 0, the final norm and head the last slice's."""
    slices, top = _slices_of(data), _params(data.get("parameters"), "parameters")
    if tokenizer_of(data) is not None:
        raise ConfigError("mergekit YAML: a passthrough (layer stacking) takes its models' own tokenizer; remove tokenizer_source, "
                          "tokenizer and chat_template, or merge models that share one vocabulary")
    models: list[str] = []
    slots, scales = [], []
    for index, s in enumerate(slices):
        if len(s.inputs) != 1:
            raise ConfigError(f"mergekit YAML: passthrough slices[{index}] has {len(s.inputs)} sources; passthrough takes one model per slice")
        model, (start, stop), own = s.inputs[0]
        _check_passthrough_names(own, s.params, top)
        if model not in models:
            models.append(model)
        slots += [(models.index(model), layer, 1.0) for layer in range(start, stop)]
        scales += [_scale(own, s, top, _t(i, stop - start)) for i in range(stop - start)]
    if not slots:
        raise ConfigError("mergekit YAML: the passthrough slices hold no layers; give each a layer_range [start, end] with start < end")
    ends = (_scale(slices[0].inputs[0][2], slices[0], top, 0.0), _scale(slices[-1].inputs[0][2], slices[-1], top, 0.0))
    first, last = models.index(slices[0].inputs[0][0]), models.index(slices[-1].inputs[0][0])
    dtype = str(data.get("out_dtype") or data.get("dtype") or "auto")
    plain = all(v == 1.0 for v in (*scales, *ends))
    return PathRecipe(models=tuple(models), slots=tuple(slots), embed_from=first, head_from=None if last == first else last,
                      dtype=dtype, tensor_scales=() if plain else tuple(scales), end_scales=() if plain else ends)


def _scale(own: dict, s: Slice, top: dict, t: float) -> float | Filtered:
    chain = _chain(own.get("scale"), s.params.get("scale"), top.get("scale"), t=t)
    return _value(chain, 1.0, "scale") if chain else 1.0


def _check_passthrough_names(*scopes: dict) -> None:
    for scope in scopes:
        for name in scope:
            if name != "scale" and name not in MERGEKIT_PARAMETERS:
                _unknown(get_method("passthrough"), name)
