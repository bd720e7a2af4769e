"""Merge parameters per tensor kind (attention / MLP / other) within each layer group.

Genes and decoding, the recipe's YAML form (old recipes unchanged), which parameters each tensor of a
Llama and a GPT-2 model gets, merged tensors checked by hand, and the mergekit filter lists both ways.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from evomerge.models.build import group_map, stream_merge
from evomerge.models.checkpoints import Checkpoint
from evomerge.config import Bound, ParameterSpaceConfig, load_preset, parse_config
from evomerge.errors import ConfigError
from evomerge.export.mergekit import kind_filters, load_mergekit_recipe, mergekit_text, recipe_from_mergekit, recipe_to_mergekit
from evomerge.recipe import Recipe
from evomerge.search.spaces import ParameterSpace, decode_unit
from tiny_models import save_tiny

KINDS = ("attention", "mlp", "other")
LLAMA_NAMES = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight", "model.layers.0.input_layernorm.weight",
    "model.layers.0.post_attention_layernorm.weight",
    "model.layers.1.self_attn.o_proj.weight", "model.layers.1.mlp.gate_proj.weight", "model.layers.1.input_layernorm.weight",
    "model.norm.weight", "lm_head.weight",
]
GPT2_NAMES = [
    "transformer.wte.weight", "transformer.wpe.weight",
    "transformer.h.0.ln_1.weight", "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.bias",
    "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.weight",
    "transformer.h.1.attn.c_attn.bias", "transformer.h.1.ln_2.bias", "transformer.h.1.mlp.c_fc.bias",
    "transformer.ln_f.weight", "lm_head.weight",
]


def space(tensor_kinds, layer_groups: int = 2) -> ParameterSpace:
    cfg = ParameterSpaceConfig(methods=["ties"], layer_groups=layer_groups, tensor_kinds=tensor_kinds,
                               params={"weight": Bound(low=0.0, high=2.0), "density": Bound(low=0.2, high=1.0)})
    return ParameterSpace(cfg, "/m/base", ["/m/math", "/m/ja"], n_layers=4, seed=3)


# --- config and genes ----------------------------------------------------------------------------


def test_genes_are_named_per_group_kind_param_and_model() -> None:
    names = [g.name for g in space(True).genes]
    assert len(names) == 2 * 3 * 2 * 2  # layer groups x kinds x params x models
    assert names[:6] == ["g0.attention.weight.math", "g0.attention.weight.ja", "g0.attention.density.math",
                         "g0.attention.density.ja", "g0.mlp.weight.math", "g0.mlp.weight.ja"]
    assert names[-1] == "g1.other.density.ja"
    assert [g.name for g in space(["attention"], layer_groups=1).genes] == [
        "g0.attention.weight.math", "g0.attention.weight.ja", "g0.attention.density.math", "g0.attention.density.ja",
        "g0.other.weight.math", "g0.other.weight.ja", "g0.other.density.math", "g0.other.density.ja",
    ]
    assert [g.name for g in space(False, layer_groups=1).genes][0] == "g0.weight.math"  # unchanged without kinds


def test_decode_fills_each_kind_slot_from_its_own_genes() -> None:
    s = space(["mlp", "attention"], layer_groups=1)  # any order in the config; recipes list attention first
    values = {g.name: 0.5 for g in s.genes} | {"g0.mlp.weight.ja": 1.75, "g0.attention.density.math": 0.3}
    recipe = s.decode(values)
    assert recipe.kinds == KINDS and recipe.n_groups == 1 and len(recipe.groups) == 3
    attention, mlp, other = recipe.groups
    assert attention == {"weight": (0.5, 0.5), "density": (0.3, 0.5)}
    assert mlp == {"weight": (0.5, 1.75), "density": (0.5, 0.5)}
    assert other == {"weight": (0.5, 0.5), "density": (0.5, 0.5)}
    x = np.linspace(0, 1, len(s.genes))
    assert Recipe.from_yaml(s.decode(decode_unit(s.genes, x)).to_yaml()) == s.decode(decode_unit(s.genes, x))


def test_preset_loads_and_bad_kinds_fail_in_one_line() -> None:
    assert ParameterSpaceConfig(**load_preset("ties_per_kind")).kinds == KINDS
    base = {"models": {"base": "/m/b", "sources": ["/m/s"]}, "evaluation": {"tasks": [{"name": "t"}]}}
    for value, message in [
        (["other"], r"search_space.tensor_kinds: 'other' is not a kind to split out; use attention and/or mlp"),
        (["attn"], r"'attn' is not a kind to split out"),
        ([], r"search_space.tensor_kinds: is empty"),
        (["mlp", "mlp"], r"lists a kind twice"),
    ]:
        with pytest.raises(ConfigError, match=message) as info:
            parse_config({**base, "search_space": {"methods": ["ties"], "tensor_kinds": value}})
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=r"search_space.tensor_kind: unknown key \(did you mean: tensor_kinds"):
        parse_config({**base, "search_space": {"methods": ["ties"], "tensor_kind": True}})


# --- the recipe ----------------------------------------------------------------------------------


OLD_RECIPE = """method: ties
base: /m/base
sources: [/m/a, /m/b]
seed: 4
dtype: auto
groups:
- {weight: [0.5, 1.0], density: 0.4}
- {weight: [0.25, 0.75], density: 0.6}
"""


def test_old_recipes_load_and_write_unchanged() -> None:
    recipe = Recipe.from_yaml(OLD_RECIPE)
    assert recipe.kinds == () and recipe.n_groups == 2 and recipe.slot(1, "attention") == 1
    assert "kinds" not in recipe.to_dict()
    assert recipe.to_dict() == yaml.safe_load(OLD_RECIPE)


def test_split_recipe_round_trips_with_one_mapping_per_kind() -> None:
    groups = tuple({"weight": (0.1 * i, 0.2), "density": 0.5} for i in range(6))
    recipe = Recipe("ties", "/m/base", ("/m/a", "/m/b"), groups, kinds=KINDS)
    data = recipe.to_dict()
    assert data["kinds"] == list(KINDS) and len(data["groups"]) == 2
    assert data["groups"][1]["mlp"] == {"weight": [0.4, 0.2], "density": 0.5}
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe
    assert recipe.n_groups == 2 and recipe.layer_group(1) == groups[3:]
    assert [recipe.slot(1, k) for k in ("attention", "mlp", "other")] == [3, 4, 5]
    two = Recipe("ties", "B", ("S",), ({"weight": 1.0},) * 2, kinds=("attention", "other"))
    assert two.slot(0, "mlp") == 1  # MLP tensors share 'other' when only attention is split out


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d | {"kinds": ["mlp", "attention", "other"]}, r"kinds = \['mlp', 'attention', 'other'\]; write attention and/or mlp, in that order"),
    (lambda d: d | {"kinds": ["attention", "mlp"]}, r"then other"),
    (lambda d: d | {"groups": [{"attention": {}, "other": {}}]}, r"groups\[0\] has kinds \['attention', 'other'\]"),
    (lambda d: d | {"kind": "x"}, r"unknown key 'kind'"),
])
def test_bad_split_recipes_fail_in_one_line(change, message) -> None:
    data = Recipe("ties", "B", ("S",), ({"weight": 1.0},) * 3, kinds=KINDS).to_dict()
    with pytest.raises(ConfigError, match=message) as info:
        Recipe.from_dict(change(data))
    assert "\n" not in str(info.value)


# --- which parameters each tensor gets -----------------------------------------------------------


def fake_checkpoint(names: list[str], n_layers: int) -> SimpleNamespace:
    return SimpleNamespace(names=names, config={"num_hidden_layers": n_layers})


def test_group_map_of_llama_names() -> None:
    recipe = Recipe("ties", "B", ("S",), ({"weight": 1.0},) * 6, kinds=KINDS)
    slots = group_map(recipe, fake_checkpoint(LLAMA_NAMES, 2))
    assert slots == {
        "model.embed_tokens.weight": 2,  # layer group 0, other
        "model.layers.0.self_attn.q_proj.weight": 0, "model.layers.0.mlp.down_proj.weight": 1,
        "model.layers.0.input_layernorm.weight": 2, "model.layers.0.post_attention_layernorm.weight": 2,
        "model.layers.1.self_attn.o_proj.weight": 3, "model.layers.1.mlp.gate_proj.weight": 4,
        "model.layers.1.input_layernorm.weight": 5,
        "model.norm.weight": 5, "lm_head.weight": 5,  # last layer group, other
    }
    attention_only = Recipe("ties", "B", ("S",), ({"weight": 1.0},) * 4, kinds=("attention", "other"))
    assert set(group_map(attention_only, fake_checkpoint(LLAMA_NAMES, 2)).values()) == {0, 1, 2, 3}
    plain = Recipe("ties", "B", ("S",), ({"weight": 1.0},) * 2)
    assert group_map(plain, fake_checkpoint(LLAMA_NAMES, 2))["model.layers.1.mlp.gate_proj.weight"] == 1


def test_group_map_of_gpt2_names() -> None:
    recipe = Recipe("ties", "B", ("S",), ({"weight": 1.0},) * 3, kinds=KINDS)  # one layer group
    slots = group_map(recipe, fake_checkpoint(GPT2_NAMES, 2))
    attention = {n for n, s in slots.items() if s == 0}
    mlp = {n for n, s in slots.items() if s == 1}
    assert attention == {"transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.bias", "transformer.h.1.attn.c_attn.bias"}
    assert mlp == {"transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.weight", "transformer.h.1.mlp.c_fc.bias"}
    assert {n for n, s in slots.items() if s == 2} == set(GPT2_NAMES) - attention - mlp  # norms, embeddings, head


# --- merged tensors ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, tuple[str, ...]]]:
    root = tmp_path_factory.mktemp("kinds")
    out = {}
    for family in ("llama", "gpt2"):
        base = save_tiny(root / f"{family}-base", family, seed=0)
        sources = tuple(str(save_tiny(root / f"{family}-s{i}", family, seed=10 + i, perturb_from=base)) for i in range(2))
        out[family] = (str(base), sources)
    return out


def test_attention_and_mlp_weights_differ_as_computed_by_hand(tiny) -> None:
    """task_arithmetic with lambda 1: merged = base + sum_i w_i (s_i - base), w by the tensor's kind and group."""
    base, sources = tiny["llama"]
    weights = {("attention", 0): (1.0, 0.0), ("mlp", 0): (0.0, 1.0), ("other", 0): (0.5, 0.5),
               ("attention", 1): (0.25, 0.0), ("mlp", 1): (0.0, 0.0), ("other", 1): (1.0, 1.0)}
    groups = tuple({"weight": weights[(k, g)], "lambda_": 1.0} for g in range(2) for k in KINDS)
    recipe = Recipe("task_arithmetic", base, sources, groups, dtype="float32", kinds=KINDS)
    b, s = Checkpoint.open(base), [Checkpoint.open(p) for p in sources]
    kinds = {"self_attn": "attention", "mlp": "mlp"}
    for name, merged in stream_merge(recipe):
        layer = int(name.split(".")[2]) if ".layers." in name else (0 if "embed" in name else 3)
        kind = next((k for part, k in kinds.items() if f".{part}." in name), "other")
        w = weights[(kind, layer // 2)]
        expected = b.tensor(name) + w[0] * (s[0].tensor(name) - b.tensor(name)) + w[1] * (s[1].tensor(name) - b.tensor(name))
        torch.testing.assert_close(merged, expected, rtol=0, atol=1e-6, msg=name)
        if kind == "mlp" and layer >= 2:
            assert torch.equal(merged, b.tensor(name))  # weight 0: the base exactly


def test_a_small_tensor_by_hand() -> None:
    """One attention and one MLP tensor of the same layer, 2x2 each, through the same slot lookup."""
    from evomerge.models.build import check_recipe, merge_named

    recipe = Recipe("task_arithmetic", "B", ("S",), ({"weight": (2.0,), "lambda_": 1.0}, {"weight": (0.5,), "lambda_": 1.0},
                                                      {"weight": (0.0,), "lambda_": 1.0}), kinds=KINDS)
    names = ["model.layers.0.self_attn.v_proj.weight", "model.layers.0.mlp.up_proj.weight", "model.norm.weight"]
    slots = group_map(recipe, fake_checkpoint(names, 1))
    base = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    deltas = torch.tensor([[[1.0, -2.0], [0.5, 0.0]]])  # (E=1, 2, 2)
    spec = check_recipe(recipe)
    out = {n: merge_named(recipe, spec, n, slots[n], base, deltas) for n in names}
    assert out[names[0]].tolist() == [[3.0, -3.0], [2.0, 1.0]]   # base + 2.0 * delta
    assert out[names[1]].tolist() == [[1.5, 0.0], [1.25, 1.0]]   # base + 0.5 * delta
    assert out[names[2]].tolist() == [[1.0, 1.0], [1.0, 1.0]]    # base + 0 * delta


# --- mergekit ------------------------------------------------------------------------------------


def test_mergekit_filters_fit_each_family_and_refuse_unseparable_names() -> None:
    assert kind_filters(KINDS, LLAMA_NAMES) == {"attention": "attn", "mlp": "mlp"}
    assert kind_filters(KINDS, GPT2_NAMES) == {"attention": "attn", "mlp": "mlp"}
    neox = ["gpt_neox.layers.0.attention.query_key_value.weight", "gpt_neox.layers.0.post_attention_layernorm.weight",
            "gpt_neox.layers.0.mlp.dense_4h_to_h.weight"]
    assert kind_filters(KINDS, neox)["attention"] == "attention."  # 'attention' would also take the layernorm
    with pytest.raises(ConfigError, match=r"no mergekit filter .* selects exactly this model's attention tensors"):
        kind_filters(("attention", "other"), ["model.layers.0.q_proj.weight", "model.layers.0.norm.weight"])


def test_per_kind_recipe_writes_filter_lists_and_reads_them_back() -> None:
    groups = (
        {"weight": (0.5, 0.7), "density": 0.4, "lambda_": 1.0}, {"weight": (0.5, 0.7), "density": 0.6, "lambda_": 1.0},
        {"weight": (0.9, 0.8), "density": 0.5, "lambda_": 0.9},
    )
    recipe = Recipe("ties", "B", ("S1", "S2"), groups, dtype="float32", kinds=KINDS)
    config = yaml.safe_load(recipe_to_mergekit(recipe, n_layers=4, names=LLAMA_NAMES))
    assert config["parameters"]["density"] == [{"filter": "attn", "value": 0.4}, {"filter": "mlp", "value": 0.6}, {"value": 0.5}]
    assert config["models"][0]["parameters"]["weight"] == [{"filter": "attn", "value": 0.5}, {"filter": "mlp", "value": 0.5}, {"value": 0.9}]
    assert recipe_from_mergekit(recipe_to_mergekit(recipe, n_layers=4), n_layers=4, names=LLAMA_NAMES) == recipe
    sliced = Recipe("ties", "B", ("S1", "S2"), groups + groups[::-1], dtype="float32", kinds=KINDS)
    assert recipe_from_mergekit(recipe_to_mergekit(sliced, n_layers=4), n_layers=4) == sliced
    attention_only = Recipe("ties", "B", ("S1",), ({"weight": (0.3,), "density": 0.5}, {"weight": (1.0,), "density": 0.5}),
                            dtype="float32", kinds=("attention", "other"))
    assert recipe_from_mergekit(recipe_to_mergekit(attention_only, n_layers=4), n_layers=4) == attention_only


def test_hand_written_filter_lists_follow_mergekits_precedence() -> None:
    text = """
merge_method: ties
base_model: B
models:
  - model: S1
    parameters: {weight: [{filter: mlp, value: 0.2}]}   # no default: other kinds fall through to the top level
  - model: S2
    parameters: {weight: 0.6}
parameters: {weight: [{value: 0.9}, {filter: attn, value: 0.1}], density: 0.5}   # the default comes first: it wins
"""
    recipe = recipe_from_mergekit(text)
    assert recipe.kinds == KINDS
    assert recipe.groups == ({"weight": (0.9, 0.6), "density": 0.5}, {"weight": (0.2, 0.6), "density": 0.5},
                             {"weight": (0.9, 0.6), "density": 0.5})


@pytest.mark.parametrize(("params", "message"), [
    ("{weight: [{filter: mlp, valu: 0.5}]}", r"key 'valu' is not supported \(did you mean 'value'\?\)"),
    ("{weight: [{filter: mlp, value: [{value: 1}]}]}", r"a condition's value is a number or a gradient"),
])
def test_unusable_filters_are_refused_in_one_line(params: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        recipe_from_mergekit(f"merge_method: ties\nbase_model: B\nmodels: [{{model: S, parameters: {params}}}]")
    assert "\n" not in str(info.value)


def test_filters_that_name_no_kind_become_filter_lists_as_mergekit_reads_them() -> None:
    """Issue 13: q_proj (or o_proj, lm_head, embed_tokens, norms) is a substring filter, as in mergekit."""
    from evomerge.recipe import Filtered

    recipe = recipe_from_mergekit("merge_method: ties\nbase_model: B\nmodels: [{model: S, parameters: {weight: [{filter: q_proj, value: 0.5}, {value: 1}]}}]")
    assert recipe.kinds == () and recipe.groups[0]["weight"] == (Filtered((("q_proj", 0.5), (None, 1.0))),)
    assert recipe.params_for(0, "model.layers.0.self_attn.q_proj.weight")["weight"] == (0.5,)
    assert recipe.params_for(0, "model.layers.0.self_attn.k_proj.weight")["weight"] == (1.0,)


def test_a_filter_that_misses_the_bases_kind_keeps_mergekits_substring_meaning(tiny) -> None:
    """Without the base's names a kind filter is trusted as a kind; against GPT-2's names `self_attn`
    selects nothing, so (as in mergekit) every tensor takes the default."""
    from evomerge.recipe import Filtered

    base, sources = tiny["gpt2"]
    text = (f"merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {sources[0]}\n"
            "    parameters: {weight: [{filter: self_attn, value: 0.5}, {value: 1.0}]}\n")
    assert recipe_from_mergekit(text).kinds == ("attention", "other")  # without the base's names: trusted
    recipe = load_mergekit_recipe(text)
    assert recipe.kinds == () and recipe.groups[0]["weight"] == (Filtered((("self_attn", 0.5), (None, 1.0))),)
    assert recipe.params_for(0, "transformer.h.0.attn.c_attn.weight")["weight"] == (1.0,)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties", "task_arithmetic"])
def test_exported_mergekit_yaml_rebuilds_the_same_tensors(family: str, method: str, tiny) -> None:
    base, sources = tiny[family]
    extra = {"ties": {"density": 0.5}, "breadcrumbs_ties": {"density": 0.7, "gamma": 0.05}, "task_arithmetic": {}}[method]
    groups = tuple(
        {"weight": (0.2 + 0.1 * i, 1.0 - 0.1 * i), **{k: v * (1 - 0.1 * i) for k, v in extra.items()}} for i in range(6)
    )
    recipe = Recipe(method, base, sources, groups, seed=2, dtype="float32", kinds=KINDS)
    text = mergekit_text(recipe, Checkpoint.open(base))
    assert "filter: attn" in text and "filter: mlp" in text
    imported = load_mergekit_recipe(text)
    assert imported == replace(recipe, seed=0)  # mergekit has no seed
    ours, theirs = dict(stream_merge(recipe)), dict(stream_merge(imported))
    assert list(ours) == list(theirs) and all(torch.equal(ours[n], theirs[n]) for n in ours)
    flat = Recipe(method, base, sources, groups[:1] * 2, seed=2, dtype="float32")
    assert any(not torch.equal(ours[n], t) for n, t in stream_merge(flat))  # the kinds mattered


def test_checkpoint_export_ships_the_filtered_mergekit_yaml(tiny, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from evomerge.cli import main
    from evomerge.export import write_recipe_checkpoint

    base, sources = tiny["llama"]
    groups = tuple({"weight": (0.3 * (i + 1), 0.5), "density": 0.4 + 0.1 * i} for i in range(3))
    recipe = Recipe("ties", base, sources, groups, kinds=KINDS)
    write_recipe_checkpoint(recipe, tmp_path / "ours", card="# t\n")
    assert Recipe.from_yaml((tmp_path / "ours" / "recipe.yaml").read_text()) == recipe
    assert main(["merge", str(tmp_path / "ours" / "mergekit.yaml"), "--out", str(tmp_path / "again")]) == 0
    assert main(["merge", str(tmp_path / "ours" / "recipe.yaml"), "--out", str(tmp_path / "again2")]) == 0
    ours = load_file(tmp_path / "ours" / "model.safetensors")
    for other in ("again", "again2"):
        again = load_file(tmp_path / other / "model.safetensors")
        assert ours.keys() == again.keys() and all(torch.equal(ours[k], again[k]) for k in ours)
