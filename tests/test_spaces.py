import numpy as np
import pytest

from evomerge.config import Bound, ParameterSpaceConfig
from evomerge.errors import ConfigError
from evomerge.recipe import Recipe
from evomerge.search.spaces import Gene, ParameterSpace, decode_unit, encode_unit, model_labels

SOURCES = ["/m/math-7b", "org/ja-7b@main"]


def space(**kw) -> ParameterSpace:
    cfg = ParameterSpaceConfig(**{"methods": ["ties"], "layer_groups": 2,
                               "params": {"weight": Bound(low=0.0, high=2.0), "density": Bound(low=0.2, high=1.0)}, **kw})
    return ParameterSpace(cfg, "/m/base", SOURCES, n_layers=4, seed=7)


def test_genes_are_named_per_group_param_and_model() -> None:
    s = space()
    assert [g.name for g in s.genes] == [
        "g0.weight.math-7b", "g0.weight.ja-7b", "g0.density.math-7b", "g0.density.ja-7b",
        "g1.weight.math-7b", "g1.weight.ja-7b", "g1.density.math-7b", "g1.density.ja-7b",
    ]


def test_decode_maps_the_unit_cube_onto_the_bounds() -> None:
    s = space()
    x = np.array([0.0, 1.0, 0.0, 1.0, 0.5, 0.25, 0.5, 0.75])
    recipe = s.decode(decode_unit(s.genes, x))
    assert recipe.method == "ties" and recipe.seed == 7 and recipe.sources == tuple(SOURCES)
    assert recipe.groups[0] == {"weight": (0.0, 2.0), "density": (0.2, 1.0)}
    assert recipe.groups[1]["weight"] == (1.0, 0.5)
    assert recipe.groups[1]["density"] == pytest.approx((0.6, 0.8))
    assert np.allclose(encode_unit(s.genes, decode_unit(s.genes, x)), x)
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe


def test_out_of_cube_coordinates_are_clipped() -> None:
    gene = Gene("w", 0.0, 2.0)
    assert gene.from_unit(-0.3) == 0.0 and gene.from_unit(1.7) == 2.0


def test_method_choice_gene_and_fixed_params() -> None:
    s = space(methods=["ties", "dare_ties"])
    assert s.genes[0].name == "method" and s.genes[0].choices == ("ties", "dare_ties")
    values = decode_unit(s.genes, np.full(len(s.genes), 0.9))
    assert s.decode(values).method == "dare_ties"
    values = decode_unit(s.genes, np.full(len(s.genes), 0.1))
    assert s.decode(values).method == "ties"


def test_bound_outside_the_methods_range_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"search_space\.params\.density\.low = 0\.0; density must be in \(0"):
        space(params={"density": Bound(low=0.0, high=1.0)})


def test_unknown_parameter_and_method() -> None:
    with pytest.raises(ConfigError, match=r"search_space\.params\.dens: not a parameter of ties"):
        space(params={"dens": Bound(low=0.1, high=1.0)})
    with pytest.raises(ConfigError, match=r"unknown merge method 'tie' \(did you mean: ties"):
        space(methods=["tie"])


def test_too_many_groups_and_empty_space() -> None:
    with pytest.raises(ConfigError, match="layer_groups = 8, but the model has 4 layers"):
        space(layer_groups=8)
    with pytest.raises(ConfigError, match="search_space.params is empty"):
        space(params={})


def test_model_labels_are_unique_and_safe() -> None:
    assert model_labels(["/a/x y", "org/x y@v2", "/b/m/"]) == ["x_y", "x_y_1", "m"]


def test_layer_swap_decodes_to_one_hot_task_arithmetic() -> None:
    from evomerge.config import LayerSwapSpaceConfig
    from evomerge.search.spaces import LayerSwapSpace

    s = LayerSwapSpace(LayerSwapSpaceConfig(kind="layer_swap", layer_groups=2), "/m/base", SOURCES, n_layers=4)
    assert [g.name for g in s.genes] == ["g0.source", "g1.source"]
    assert s.genes[0].choices == ("base", "math-7b", "ja-7b")
    recipe = s.decode({"g0.source": "base", "g1.source": "ja-7b"})
    assert recipe.method == "task_arithmetic" and recipe.n_groups == 4  # one group per layer
    assert [g["weight"] for g in recipe.groups] == [(0.0, 0.0), (0.0, 0.0), (0.0, 1.0), (0.0, 1.0)]
    blended = LayerSwapSpace(LayerSwapSpaceConfig(kind="layer_swap", layer_groups=2, blend_boundaries=True),
                             "/m/base", SOURCES, n_layers=4).decode({"g0.source": "math-7b", "g1.source": "ja-7b"})
    assert [g["weight"] for g in blended.groups] == [(1.0, 0.0), (1.0, 0.0), (0.5, 0.5), (0.0, 1.0)]
    assert s.genes[0].from_unit(0.99) == "ja-7b" and s.genes[0].from_unit(0.0) == "base"
