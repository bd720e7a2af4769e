"""mergekit YAML both ways: round trips, both forms, refusals, and merges through an imported recipe.

These need no mergekit. The side-by-side check against real mergekit-yaml is in the merge engine notes
(scripts/bench_merge.py's docstring says how to make a mergekit environment).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from evomerge.models.build import stream_merge
from evomerge.errors import ConfigError
from evomerge.models.checkpoints import Checkpoint
from evomerge.export.mergekit import (
    is_mergekit_config,
    layer_ranges,
    load_mergekit_recipe,
    mergekit_text,
    mergekit_text_for,
    recipe_from_mergekit,
    recipe_to_mergekit,
)
from evomerge.recipe import Recipe
from tiny_models import save_tiny

W3 = (0.6, 0.3, 0.8)
ROUND_TRIPS = [
    Recipe("ties", "B", ("S1", "S2", "S3"), ({"weight": W3, "density": 0.4, "lambda_": 1.1},), dtype="bfloat16"),
    Recipe("ties", "B", ("S1", "S2", "S3"), ({"weight": W3, "density": (0.5, 0.3, 0.7)}, {"weight": 1.0, "density": 0.2, "lambda_": 0.8}), dtype="float32"),
    Recipe("task_arithmetic", "B", ("S1", "S2"), ({"weight": (0.5, 1.5), "lambda_": 0.7},) * 3, dtype="float16"),
    Recipe("breadcrumbs_ties", "B", ("S1", "S2"), ({"weight": (0.5, 0.2), "density": 0.6, "gamma": (0.01, 0.1)},) * 2, dtype="bfloat16"),
    Recipe("della", "B", ("S1", "S2"), ({"weight": 1.0, "density": (0.5, 0.4), "epsilon": 0.1, "lambda_": 1.0},), seed=7, dtype="bfloat16"),
    Recipe("linear", "B", ("S1", "S2"), ({"weight": (0.25, 0.75)}, {"weight": 0.5}), dtype="bfloat16"),
    Recipe("slerp", "B", ("S1",), ({"t": 0.3}, {"t": 0.6}), dtype="float32"),
    Recipe("model_stock", "B", ("S1", "S2"), ({},), dtype="bfloat16"),
]


@pytest.mark.parametrize("recipe", ROUND_TRIPS, ids=lambda r: f"{r.method}-{r.n_groups}")
def test_recipe_round_trips_through_mergekit_yaml(recipe: Recipe) -> None:
    text = recipe_to_mergekit(recipe, n_layers=5)
    config = yaml.safe_load(text)
    assert config["merge_method"] == recipe.method and config["base_model"] == "B"
    assert ("models" in config) == (recipe.n_groups == 1) and ("slices" in config) == (recipe.n_groups > 1)
    assert recipe_from_mergekit(text, n_layers=5, seed=recipe.seed) == recipe


def test_slices_follow_the_layer_groups_and_lambda_is_spelled_as_mergekit_does() -> None:
    recipe = ROUND_TRIPS[1]
    config = yaml.safe_load(recipe_to_mergekit(recipe, n_layers=5))
    assert [s["sources"][0]["layer_range"] for s in config["slices"]] == [[0, 3], [3, 5]] == [list(r) for r in layer_ranges(5, 2)]
    first, second = config["slices"]
    assert first["sources"][0] == {"model": "B", "layer_range": [0, 3]}  # the base is a source of each slice
    assert first["sources"][1]["parameters"] == {"weight": 0.6, "density": 0.5}
    assert second["parameters"] == {"weight": 1.0, "density": 0.2, "lambda": 0.8}  # one number for all models
    assert config["dtype"] == "float32" and config["out_dtype"] == "float32"


def test_auto_dtype_writes_the_given_output_dtype_and_random_methods_say_the_seed_does_not_carry() -> None:
    recipe = Recipe("dare_ties", "B", ("S1", "S2"), ({"weight": 1.0, "density": 0.5},), seed=3)
    text = recipe_to_mergekit(recipe, n_layers=4, out_dtype="bfloat16")
    assert yaml.safe_load(text)["out_dtype"] == "bfloat16"
    assert "seed 3 does not carry" in text
    assert "out_dtype" not in yaml.safe_load(recipe_to_mergekit(recipe, n_layers=4))


def test_models_form_with_top_level_parameters_and_the_base_listed() -> None:
    text = """
merge_method: ties
base_model: org/base
models:
  - model: org/base
  - model: org/a
    parameters: {weight: 0.7, density: 0.5}
  - model: org/b
    parameters: {weight: 0.4}
parameters: {density: 0.3, lambda: 0.9, normalize: true, int8_mask: true}
dtype: bfloat16
"""
    recipe = recipe_from_mergekit(text)
    assert recipe.base == "org/base" and recipe.sources == ("org/a", "org/b") and recipe.dtype == "bfloat16"
    assert recipe.groups == ({"weight": (0.7, 0.4), "density": (0.5, 0.3), "lambda_": 0.9},)


def test_slices_form_even_split_keeps_groups_and_uneven_split_becomes_one_group_per_layer() -> None:
    def slices(ranges: list[tuple[int, int]]) -> str:
        parts = [
            f"  - sources:\n      - {{model: B, layer_range: [{a}, {b}]}}\n"
            f"      - {{model: S, layer_range: [{a}, {b}], parameters: {{weight: {0.1 * (i + 1):.1f}}}}}\n"
            for i, (a, b) in enumerate(ranges)
        ]
        return "merge_method: task_arithmetic\nbase_model: B\nslices:\n" + "".join(parts)

    even = recipe_from_mergekit(slices([(0, 3), (3, 5)]), n_layers=5)
    assert [g["weight"] for g in even.groups] == [(0.1,), (0.2,)]
    uneven = recipe_from_mergekit(slices([(0, 1), (1, 5)]), n_layers=5)
    assert [g["weight"] for g in uneven.groups] == [(0.1,), (0.2,), (0.2,), (0.2,), (0.2,)]  # layer i: its slice's


def test_linear_weights_above_one_are_kept_as_written() -> None:
    """mergekit normalizes them; dividing them by the largest (as evomerge did) changed the rounding."""
    text = "merge_method: linear\nmodels:\n  - {model: A, parameters: {weight: 1.0}}\n  - {model: C, parameters: {weight: 3.0}}\n"
    recipe = recipe_from_mergekit(text)
    assert recipe.base == "A" and recipe.sources == ("A", "C")  # no base_model: the first model anchors the deltas
    assert recipe.groups[0]["weight"] == (1.0, 3.0)


REFUSALS = [
    ("merge_method: ties\nbase_model: B\nmodels: [{model: S}]\nparamters: {lambda: 1}",
     r"key 'paramters' is not supported \(did you mean 'parameters'\?\)"),
    ("merge_method: ties\nbase_model: B\nmodules: {vision_tower: {models: [{model: S}]}}",
     r"modules = \['vision_tower'\]; evomerge merges decoder-only models, whose one module is 'default'"),
    ("merge_method: nuslurp\nbase_model: B\nmodels: [{model: S}]", r"unknown merge method 'nuslurp' \(did you mean: nuslerp"),
    ("merge_method: ties\nbase_model: B\nmodels: [{model: S+lora+x, parameters: {weight: 1}}]", r"write MODEL\+ADAPTER \(one '\+'\)"),
    ("merge_method: ties\nmodels: [{model: S, parameters: {weight: 1}}]", r"ties needs base_model"),
    ("merge_method: ties\nbase_model: B\nmodels: [{model: S, parameters: {weight: 1}}]\nparameters: {normalize: 0.5}",
     r"normalize is a switch: give true or false"),
    ("merge_method: ties\nbase_model: B\nmodels: [{model: S, parameters: {weight: 1, lambda: 2}}]",
     r"lambda is set for model 'S'; it is one value for all models"),
    ("merge_method: ties\nbase_model: B\nmodels: [{model: S, parameters: {weight: 1, densty: 0.5}}]",
     r"ties has no parameter 'densty' \(did you mean 'density'\?\)"),
    ("merge_method: ties\nbase_model: B\nmodels: [{model: S, parameters: {weight: 1}}]\ntokenizer: {source: union, pad_to_multiple: 8}",
     r"tokenizer: key 'pad_to_multiple' is not supported \(did you mean 'pad_to_multiple_of'\?\)"),
    ("merge_method: ties\nbase_model: B\nmodels: [{model: S, parameters: {weight: 1, density: 1.5}}]",
     r"mergekit YAML: ties: density = 1.5 for model 'S'; density must be in \(0, 1\]"),
    ("merge_method: task_arithmetic\nbase_model: B\nslices:\n"
     "  - sources: [{model: B, layer_range: [0, 2]}, {model: S, layer_range: [0, 2]}]\n"
     "  - sources: [{model: B, layer_range: [1, 3]}, {model: S, layer_range: [1, 3]}]",
     r"slices\[1\] starts at layer 1, expected 2; .*no layer stacking in a merge"),
    ("merge_method: task_arithmetic\nbase_model: B\nslices:\n"
     "  - sources: [{model: B, layer_range: [0, 2]}, {model: S, layer_range: [2, 4]}]",
     r"slices\[0\] takes different layer ranges from its models"),
    ("merge_method: task_arithmetic\nbase_model: B\nslices:\n  - sources: [{model: B, layer_range: [0, 3]}, {model: S, layer_range: [0, 3]}]",
     r"slices cover layers 0 to 3, the base has 4"),
]


@pytest.mark.parametrize(("text", "message"), REFUSALS, ids=[m[:30] for _, m in REFUSALS])
def test_unsupported_mergekit_configs_are_refused_in_one_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        recipe_from_mergekit(text, n_layers=4)
    assert "\n" not in str(info.value)


def test_consensus_has_no_mergekit_form() -> None:
    recipe = Recipe("consensus", "B", ("S1", "S2"), ({},))
    with pytest.raises(ConfigError, match="consensus merging has no mergekit counterpart"):
        recipe_to_mergekit(recipe, n_layers=4)


@pytest.fixture(scope="module")
def tiny_family(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, tuple[str, ...]]:
    root = tmp_path_factory.mktemp("mk")
    base = save_tiny(root / "base", "llama", seed=0)
    return str(base), tuple(str(save_tiny(root / f"s{i}", "llama", seed=10 + i, perturb_from=base)) for i in range(3))


@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "dare_ties", "linear", "slerp"])
def test_a_merge_through_the_imported_recipe_equals_the_original(method: str, tiny_family) -> None:
    base, sources = tiny_family
    groups = {
        "ties": ({"weight": W3, "density": (0.5, 0.3, 0.7)}, {"weight": 1.0, "density": 0.3, "lambda_": 0.8}),
        "breadcrumbs": ({"weight": W3, "density": 0.5, "gamma": 0.05}, {"weight": W3, "density": 0.7}),
        "dare_ties": ({"weight": W3, "density": 0.5}, {"weight": W3, "density": 0.3}),
        "linear": ({"weight": (0.2, 0.5, 0.3)}, {"weight": (0.6, 0.1, 0.3)}),
        "slerp": ({"t": 0.3}, {"t": 0.8}),
    }[method]
    original = Recipe(method, base, sources[:1] if method == "slerp" else sources, groups, seed=5, dtype="float32")
    imported = recipe_from_mergekit(recipe_to_mergekit(original, n_layers=4), n_layers=4, seed=5)
    ours, theirs = dict(stream_merge(original)), dict(stream_merge(imported))
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)
    first = original.groups[0]
    changed = Recipe(method, base, original.sources, (first, first), seed=5, dtype="float32")
    assert any(not torch.equal(ours[n], t) for n, t in stream_merge(changed))  # the second group mattered


def test_import_then_export_keeps_a_users_slices(tmp_path: Path) -> None:
    text = (
        "merge_method: ties\nbase_model: B\nslices:\n"
        "  - sources: [{model: B, layer_range: [0, 2]}, {model: S, layer_range: [0, 2], parameters: {weight: 0.5, density: 0.4}}]\n"
        "  - sources: [{model: B, layer_range: [2, 4]}, {model: S, layer_range: [2, 4], parameters: {weight: 0.9, density: 0.6}}]\n"
        "dtype: float32\n"
    )
    recipe = recipe_from_mergekit(text, n_layers=4)
    again = yaml.safe_load(recipe_to_mergekit(recipe, n_layers=4))
    assert again["slices"] == yaml.safe_load(text)["slices"]


def test_export_and_cli_helpers_read_layers_and_dtype_from_the_base(tiny_family) -> None:
    base, sources = tiny_family
    recipe = Recipe("ties", base, sources, ({"weight": W3, "density": 0.5},) * 2)
    text = mergekit_text_for(recipe, Checkpoint.open(base))
    config = yaml.safe_load(text)
    assert config["out_dtype"] == "float32" and config["slices"][-1]["sources"][0]["layer_range"] == [2, 4]
    assert is_mergekit_config(text) and not is_mergekit_config(recipe.to_yaml()) and not is_mergekit_config("a: [")
    assert load_mergekit_recipe(text) == Recipe("ties", base, sources, recipe.groups, dtype="float32")
    assert mergekit_text_for(Recipe("consensus", base, sources, ({},)), Checkpoint.open(base)) is None
    with pytest.raises(ConfigError, match="consensus merging has no mergekit counterpart"):
        mergekit_text(Recipe("consensus", base, sources, ({},)), Checkpoint.open(base))
    short = text.replace("[2, 4]", "[2, 3]")
    with pytest.raises(ConfigError, match="slices cover layers 0 to 3, the base has 4"):
        load_mergekit_recipe(short)


def test_cli_merge_accepts_a_mergekit_yaml_and_export_ships_one(tmp_path) -> None:
    """`evomerge merge` on our exported mergekit.yaml rebuilds exactly the tensors of the recipe."""
    from safetensors.torch import load_file

    from evomerge.cli import main
    from evomerge.export import write_recipe_checkpoint
    from evomerge.recipe import Recipe
    from tiny_models import save_tiny

    base = save_tiny(tmp_path / "base", "llama", 0)
    a = save_tiny(tmp_path / "a", "llama", 1, perturb_from=base)
    b = save_tiny(tmp_path / "b", "llama", 2, perturb_from=base)
    recipe = Recipe("ties", str(base), (str(a), str(b)),
                    ({"weight": (1.0, 0.5), "density": (0.6, 0.8)}, {"weight": (0.3, 1.2), "density": (1.0, 0.4)}))
    write_recipe_checkpoint(recipe, tmp_path / "ours", card="# t\n")
    assert (tmp_path / "ours" / "mergekit.yaml").is_file()
    assert main(["merge", str(tmp_path / "ours" / "mergekit.yaml"), "--out", str(tmp_path / "again")]) == 0
    ours, again = load_file(tmp_path / "ours" / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert ours.keys() == again.keys() and all(torch.equal(ours[k], again[k]) for k in ours)


def test_the_modules_form_reads_as_the_top_level_form() -> None:
    """mergekit's `modules: {default: ...}` (the one module of a decoder-only model): its parameters rank
    between a model's own and the top level's (mergekit's ConfigReader), gradients and filters included."""
    modules = """merge_method: ties
base_model: B
modules:
  default:
    models:
      - {model: S, parameters: {weight: 1, density: [{filter: mlp, value: 0.3}]}}
      - {model: T, parameters: {weight: [0.2, 0.8]}}
    parameters: {density: [0.4, 0.6], normalize: false}
parameters: {density: 0.9, lambda: 2}
"""
    flat = """merge_method: ties
base_model: B
models:
  - {model: S, parameters: {weight: 1, density: [{filter: mlp, value: 0.3}, {value: [0.4, 0.6]}]}}
  - {model: T, parameters: {weight: [0.2, 0.8], density: [0.4, 0.6]}}
parameters: {normalize: false, lambda: 2}
"""
    assert recipe_from_mergekit(modules, n_layers=4) == recipe_from_mergekit(flat, n_layers=4)
