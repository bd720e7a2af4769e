"""mergekit YAML import with mergekit's semantics (issue 13): gradients, filters, switches, wide weights,
ignored parameters, passthrough as a path, the new methods, and float32 outputs of bf16 sources.
No mergekit needed (tests/test_mergekit_parity.py compares with its tensors)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from evomerge.errors import ConfigError
from evomerge.export.mergekit import recipe_from_mergekit, recipe_to_mergekit
from evomerge.export.path import path_to_mergekit
from evomerge.merge import METHODS, get_method
from evomerge.models.build import stream_merge
from evomerge.recipe import Filtered, PathRecipe, Recipe, recipe_from_yaml
from tiny_models import save_tiny

LLAMA = [
    "model.embed_tokens.weight", *(f"model.layers.{i}.{m}.weight" for i in range(5) for m in (
        "self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj", "input_layernorm")),
    "model.norm.weight", "lm_head.weight",
]


def mergekit_point(points: list[float], t: float) -> float:
    """mergekit.config.evaluate_setting for a gradient, written out."""
    scaled = t * (len(points) - 1)
    i0 = int(scaled)
    i1 = min(len(points) - 1, i0 + 1)
    return (1 - (scaled - i0)) * points[i0] + (scaled - i0) * points[i1]


def test_a_gradient_is_interpolated_layer_by_layer_as_mergekit_does() -> None:
    text = "merge_method: ties\nbase_model: B\nmodels: [{model: S, parameters: {weight: 1, density: [1, 0.7, 0.1]}}]"
    recipe = recipe_from_mergekit(text, n_layers=5)
    assert recipe.n_groups == 5
    assert [g["density"] for g in recipe.groups] == [(mergekit_point([1, 0.7, 0.1], i / 4),) for i in range(5)]
    with pytest.raises(ConfigError, match="a gradient is read layer by layer; evomerge needs the base's layer count"):
        recipe_from_mergekit(text)


def test_a_gradient_in_a_slice_restarts_at_the_slice_and_one_layer_slices_read_t_1() -> None:
    text = """
merge_method: task_arithmetic
base_model: B
slices:
  - sources: [{model: B, layer_range: [0, 1]}, {model: S, layer_range: [0, 1]}]
  - sources: [{model: B, layer_range: [1, 4]}, {model: S, layer_range: [1, 4]}]
parameters: {weight: [0.2, 0.8]}
"""
    recipe = recipe_from_mergekit(text, n_layers=4)
    assert [g["weight"] for g in recipe.groups] == [0.8, 0.2, 0.5, 0.8]  # slice 0: t = 1; slice 1: t = 0, 1/2, 1


def test_the_embeddings_and_head_of_a_gradient_take_its_start_by_their_exact_names() -> None:
    """mergekit reads the final norm and head at t = 0 of the last slice, not at the last layer's t."""
    text = "merge_method: task_arithmetic\nbase_model: B\nmodels: [{model: S, parameters: {weight: [0.3, 0.9]}}]"
    recipe = recipe_from_mergekit(text, n_layers=5, names=LLAMA)
    last = recipe.n_groups - 1
    assert recipe.params_for(last, "lm_head.weight")["weight"] == pytest.approx((0.3,))
    assert recipe.params_for(last, "model.norm.weight")["weight"] == pytest.approx((0.3,))
    assert recipe.params_for(last, "model.layers.4.mlp.down_proj.weight")["weight"] == pytest.approx((0.9,))
    assert recipe.params_for(0, "model.embed_tokens.weight")["weight"] == pytest.approx((0.3,))


def test_filters_on_any_substring_and_precedence_across_scopes() -> None:
    text = """
merge_method: ties
base_model: B
models:
  - model: S1
    parameters: {weight: [{filter: o_proj, value: 0.2}, {filter: lm_head, value: 1.5}], density: 0.5}
  - model: S2
    parameters: {weight: 0.6, density: [{filter: embed_tokens, value: 0.9}, {filter: norm, value: 1.0}, {value: 0.4}]}
parameters: {weight: 0.8}
"""
    recipe = recipe_from_mergekit(text, n_layers=5, names=LLAMA)
    assert recipe.kinds == ()

    def at(name: str) -> dict:
        return dict(recipe.params_for(0, name))

    assert at("model.layers.0.self_attn.o_proj.weight") == {"weight": (0.2, 0.6), "density": (0.5, 0.4)}
    assert at("lm_head.weight") == {"weight": (1.5, 0.6), "density": (0.5, 0.4)}
    assert at("model.layers.2.input_layernorm.weight") == {"weight": (0.8, 0.6), "density": (0.5, 1.0)}  # S1 falls to the top level
    assert at("model.embed_tokens.weight")["density"] == (0.5, 0.9)


def test_switches_are_kept_where_they_differ_from_the_method_and_int8_mask_is_dropped() -> None:
    base = "merge_method: ties\nbase_model: B\nmodels: [{model: S, parameters: {weight: 1}}]\n"
    assert recipe_from_mergekit(base + "parameters: {normalize: false, int8_mask: true}").groups == ({"weight": (1.0,), "normalize": 0.0},)
    assert recipe_from_mergekit(base + "parameters: {normalize: true, rescale: true}").groups == ({"weight": (1.0,), "rescale": 1.0},)
    with pytest.raises(ConfigError, match="normalize is a switch: give true or false"):
        recipe_from_mergekit(base + "parameters: {normalize: [{filter: mlp, value: true}, {value: false}]}")


def test_weights_outside_the_search_range_run_and_search_ranges_stay_checked() -> None:
    recipe = recipe_from_mergekit("merge_method: ties\nbase_model: B\nmodels: [{model: S, parameters: {weight: 3.0}}]")
    assert recipe.groups[0]["weight"] == (3.0,)
    with pytest.raises(ConfigError, match=r"weight must be in \[-1, 2\]"):
        get_method("ties").check({"weight": 3.0}, 1)  # what a search may take


def test_parameters_a_method_lacks_are_ignored_as_mergekit_does_but_typos_are_not() -> None:
    slerp = "merge_method: slerp\nbase_model: B\nmodels: [{model: B}, {model: S, parameters: {weight: 0.7}}]\nparameters: {t: 0.3}"
    assert recipe_from_mergekit(slerp).groups == ({"t": 0.3},)
    stock = "merge_method: model_stock\nbase_model: B\nmodels: [{model: S1, parameters: {weight: 0.3}}, {model: S2}]"
    assert recipe_from_mergekit(stock).groups == ({},)
    with pytest.raises(ConfigError, match=r"slerp has no parameter 'tt' \(did you mean 't'\?\)"):
        recipe_from_mergekit(slerp.replace("{t: 0.3}", "{tt: 0.3}"))


def test_passthrough_slices_are_a_path_and_evomerges_own_passthrough_reimports() -> None:
    text = """
slices:
  - sources: [{model: A, layer_range: [0, 3]}]
  - sources: [{model: B, layer_range: [1, 4]}]
merge_method: passthrough
dtype: float16
"""
    path = recipe_from_mergekit(text)
    assert path == PathRecipe(models=("A", "B"), slots=((0, 0, 1.0), (0, 1, 1.0), (0, 2, 1.0), (1, 1, 1.0), (1, 2, 1.0), (1, 3, 1.0)),
                              embed_from=0, head_from=1, dtype="float16")
    assert recipe_from_mergekit(path_to_mergekit(path)) == path
    ours = PathRecipe(models=("A", "B"), slots=((1, 0, 1.0), (0, 1, 1.0), (1, 1, 1.0)), embed_from=0, dtype="bfloat16")
    assert recipe_from_mergekit(path_to_mergekit(ours)) == ours  # zero-length slices of the embed model at the ends
    with pytest.raises(ConfigError, match="passthrough takes one model per slice"):
        recipe_from_mergekit(text.replace("[{model: A, layer_range: [0, 3]}]", "[{model: A, layer_range: [0, 3]}, {model: B, layer_range: [0, 3]}]"))


def test_filtered_values_and_mergekit_arithmetic_round_trip_through_recipe_yaml_and_mergekit_yaml() -> None:
    weight = (Filtered((("o_proj", 0.2), (None, 0.8))), 0.6)
    recipe = Recipe("ties", "B", ("S1", "S2"), ({"weight": weight, "density": 0.5, "normalize": 0.0},),
                    dtype="bfloat16", mergekit_dtype="bfloat16")
    assert recipe_from_yaml(recipe.to_yaml()) == recipe
    text = recipe_to_mergekit(recipe, n_layers=4)
    config = yaml.safe_load(text)
    assert config["parameters"] == {"density": 0.5, "normalize": False} and config["dtype"] == "bfloat16"
    assert config["models"][0]["parameters"]["weight"] == [{"filter": "o_proj", "value": 0.2}, {"value": 0.8}]
    assert recipe_from_mergekit(text, arithmetic="mergekit") == recipe
    assert recipe_from_mergekit(text).mergekit_dtype is None


def test_methods_without_a_base_model_work_on_the_weights_and_export_without_one() -> None:
    text = "merge_method: nuslerp\nmodels: [{model: A, parameters: {weight: 0.6}}, {model: C, parameters: {weight: 0.4}}]"
    recipe = recipe_from_mergekit(text)
    assert (recipe.base, recipe.sources) == ("A", ("A", "C")) and recipe.groups[0]["use_base"] == 0.0
    exported = yaml.safe_load(recipe_to_mergekit(recipe, n_layers=4))
    assert "base_model" not in exported and [m["model"] for m in exported["models"]] == ["A", "C"]
    assert recipe_from_mergekit(recipe_to_mergekit(recipe, n_layers=4)) == replace(recipe, dtype="float32")  # dtype: float32 written


@pytest.mark.parametrize(("method", "searched"), [
    ("nuslerp", "weight"), ("multislerp", "weight"), ("karcher", "max_iter"), ("sce", "select_topk"),
    ("nearswap", "t"), ("ram", "epsilon"), ("ramplus_tl", "r"), ("passthrough", "scale"),
])
def test_the_new_methods_are_catalogued_with_search_ranges(method: str, searched: str) -> None:
    spec = METHODS[method]
    p = spec.param(searched)
    assert p.low < p.high and p.contains(p.default)
    assert "arcee_fusion" in METHODS and METHODS["arcee_fusion"].params == ()


def test_a_float32_output_of_bf16_sources_keeps_fp32_values(tmp_path: Path) -> None:
    """Issue 13: bf16 sources with `dtype: float32` were rounded to bf16 before the cast."""
    base = save_tiny(tmp_path / "base", "llama", 0)
    sources = [save_tiny(tmp_path / f"s{i}", "llama", 1 + i, perturb_from=base) for i in range(2)]
    from transformers import AutoModelForCausalLM

    for folder in (base, *sources):
        AutoModelForCausalLM.from_pretrained(folder).to(torch.bfloat16).save_pretrained(folder)
    recipe = Recipe("ties", str(base), tuple(map(str, sources)), ({"weight": (0.7, 0.4), "density": 0.5},), dtype="float32")
    merged = dict(stream_merge(recipe))
    name = "model.layers.0.mlp.down_proj.weight"
    assert merged[name].dtype == torch.float32
    assert not torch.equal(merged[name], merged[name].to(torch.bfloat16).float())  # not rounded to bf16 first
    rounded = dict(stream_merge(replace(recipe, dtype="auto")))
    assert rounded[name].dtype == torch.bfloat16 and torch.equal(rounded[name], merged[name].to(torch.bfloat16))


def test_passthrough_scale_is_read_per_layer_and_reaches_the_ends_and_exports_back() -> None:
    text = """
slices:
  - sources: [{model: A, layer_range: [0, 2], parameters: {scale: [0.5, 1.0]}}]
  - sources: [{model: A, layer_range: [1, 3], parameters: {scale: [{filter: o_proj, value: 0.0}, {value: 1.0}]}}]
merge_method: passthrough
"""
    path = recipe_from_mergekit(text)
    damp = Filtered((("o_proj", 0.0), (None, 1.0)))
    assert path.tensor_scales == (0.5, 1.0, damp, damp) and path.end_scales == (0.5, damp)
    assert path.tensor_scale(2, "model.layers.1.self_attn.o_proj.weight") == 0.0
    assert path.tensor_scale("head", "lm_head.weight") == 1.0 and path.tensor_scale("embed", "model.embed_tokens.weight") == 0.5
    assert recipe_from_mergekit(path_to_mergekit(path)) == path
    assert recipe_from_yaml(path.to_yaml()) == path


def test_a_search_may_fix_a_switch_and_search_a_new_methods_parameter() -> None:
    from evomerge.config import ParameterSpaceConfig
    from evomerge.search.spaces import ParameterSpace

    cfg = ParameterSpaceConfig(methods=["ties"], params={"density": {"low": 0.2, "high": 1.0}}, fixed={"normalize": 0})
    recipe = ParameterSpace(cfg, "/m/base", ["/m/a", "/m/b"], n_layers=4).decode({"g0.density.a": 0.5, "g0.density.b": 0.7})
    assert recipe.groups == ({"density": (0.5, 0.7), "normalize": 0.0},)
    with pytest.raises(ConfigError, match="normalize is a switch: give 0 or 1"):
        ParameterSpace(ParameterSpaceConfig(methods=["ties"], params={"density": {"low": 0.2, "high": 1.0}}, fixed={"normalize": 0.5}),
                       "/m/base", ["/m/a", "/m/b"], n_layers=4)
    sce = ParameterSpace(ParameterSpaceConfig(methods=["sce"], params={"select_topk": {"low": 0.1, "high": 1.0}}), "/m/base", ["/m/a", "/m/b"], n_layers=4)
    assert sce.decode({"g0.select_topk": 0.4}).groups == ({"select_topk": 0.4},)
