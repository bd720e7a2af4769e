"""Parameter-space search: the merge method's parameters per layer group and per source model.

Genes are named `g<group>.<param>.<model>` for per-model parameters (weight, density) and
`g<group>.<param>` for global ones (lambda_, epsilon); with several methods a categorical `method` gene
picks one, and parameters the picked method does not take are ignored. With `tensor_kinds`, each layer
group has a set per tensor kind, named `g<group>.<kind>.<param>[.<model>]` (kinds: attention, mlp,
other; `other` covers every tensor of a kind not split out: norms, embeddings, head).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import PurePath

from evomerge.config import ParameterSpaceConfig
from evomerge.errors import ConfigError
from evomerge.models.layout import LayerGroups
from evomerge.merge.catalog import MergeParamError, MethodSpec, ParamSpec, get_method
from evomerge.recipe import ParamValue, Recipe
from evomerge.search.spaces._genes import Gene


class ParameterSpace:
    kind = Recipe.kind

    def __init__(self, cfg: ParameterSpaceConfig, base: str, sources: list[str], n_layers: int, *, seed: int = 0) -> None:
        self.cfg, self.base, self.sources, self.seed = cfg, base, tuple(sources), seed
        self.labels = model_labels(sources)
        self.specs = {name: _method(name, len(sources)) for name in cfg.methods}
        try:
            LayerGroups(n_layers, cfg.layer_groups)
        except Exception as exc:
            raise ConfigError(f"config error: search_space.{exc}") from None
        self.param_specs = _check_params(cfg, self.specs)
        self.genes = self._make_genes()
        if not self.genes:
            raise ConfigError("config error: search_space.params is empty; list at least one parameter to search, e.g. density: {low: 0.1, high: 1.0}")

    def _slots(self) -> list[str]:
        """Gene-name prefixes, one per parameter set, in `Recipe.groups` order: `g0`, ... or `g0.attention`, ..."""
        kinds = self.cfg.kinds
        return [f"g{g}.{kind}" if kinds else f"g{g}" for g in range(self.cfg.layer_groups) for kind in kinds or ("",)]

    def _make_genes(self) -> list[Gene]:
        genes = []
        if len(self.specs) > 1:
            genes.append(Gene("method", choices=tuple(self.specs), default=next(iter(self.specs))))
        for slot in self._slots():
            for pname, bound in self.cfg.params.items():
                p = self.param_specs[pname]
                default = min(max(p.default, bound.low), bound.high)
                names = [f"{slot}.{pname}.{label}" for label in self.labels] if p.per_model else [f"{slot}.{pname}"]
                genes += [Gene(n, bound.low, bound.high, default) for n in names]
        return genes

    def decode(self, values: Mapping[str, float | str]) -> Recipe:
        method = str(values.get("method", next(iter(self.specs))))
        spec = self.specs[method]
        groups = tuple(self._group_params(spec, slot, values) for slot in self._slots())
        return Recipe(method=method, base=self.base, sources=self.sources, groups=groups, seed=self.seed, kinds=self.cfg.kinds)

    def _group_params(self, spec: MethodSpec, slot: str, values: Mapping[str, float | str]) -> dict[str, ParamValue]:
        out: dict[str, ParamValue] = {}
        for p in spec.params:
            if p.name in self.cfg.params:
                if p.per_model:
                    out[p.name] = tuple(float(values[f"{slot}.{p.name}.{label}"]) for label in self.labels)
                else:
                    out[p.name] = float(values[f"{slot}.{p.name}"])
            elif p.name in self.cfg.fixed:
                value = float(self.cfg.fixed[p.name])
                out[p.name] = tuple([value] * len(self.labels)) if p.per_model else value
        for switch in spec.switches:  # mergekit's switches (normalize, rescale, ...) can be fixed, not searched
            if switch.name in self.cfg.fixed:
                out[switch.name] = float(self.cfg.fixed[switch.name])
        return out


def model_labels(refs: list[str]) -> list[str]:
    """Short, unique, gene-safe names for models: the folder or repo name ('math-7b'), deduplicated."""
    labels: list[str] = []
    for ref in refs:
        stem = PurePath(ref.split("@")[0].rstrip("/")).name or "model"
        label = re.sub(r"[^A-Za-z0-9_-]+", "_", stem)
        labels.append(label if label not in labels else f"{label}_{len(labels)}")
    return labels


def _method(name: str, n_models: int) -> MethodSpec:
    try:
        spec = get_method(name)
    except MergeParamError as exc:
        raise ConfigError(f"config error: search_space.methods: {exc}") from None
    if n_models < spec.min_models or (spec.max_models is not None and n_models > spec.max_models):
        most = "" if spec.max_models is None else f" and at most {spec.max_models}"
        raise ConfigError(
            f"config error: search_space.methods: {name} needs at least {spec.min_models}{most} source models, "
            f"got {n_models}; change models.sources or the method"
        )
    return spec


def _check_params(cfg: ParameterSpaceConfig, specs: Mapping[str, MethodSpec]) -> dict[str, ParamSpec]:
    """Every searched or fixed parameter must belong to a chosen method and stay inside its range."""
    known = {p.name: p for spec in specs.values() for p in spec.params}
    switches = {s.name for spec in specs.values() for s in spec.switches}
    for section, names in (("params", cfg.params), ("fixed", cfg.fixed)):
        for name in names:
            if name not in known and not (section == "fixed" and name in switches):
                raise ConfigError(
                    f"config error: search_space.{section}.{name}: not a parameter of "
                    f"{', '.join(specs)} (parameters: {', '.join(known)})"
                )
    for name, bound in cfg.params.items():
        _check_in_range(f"search_space.params.{name}.low", bound.low, known[name])
        _check_in_range(f"search_space.params.{name}.high", bound.high, known[name])
    for name, value in cfg.fixed.items():
        if name in switches:
            if value not in (0, 1):
                raise ConfigError(f"config error: search_space.fixed.{name} = {value}; {name} is a switch: give 0 or 1")
            continue
        _check_in_range(f"search_space.fixed.{name}", value, known[name])
    return known


def _check_in_range(where: str, value: float, p: ParamSpec) -> None:
    if not p.contains(value):
        raise ConfigError(f"config error: {where} = {value}; {p.name} must be in {p.interval()}; {p.fix(value)}")
