"""MethodSpec.check, get_method and merge_tensor: one-line errors a person can act on, and the call path."""

from __future__ import annotations

import pytest
import torch

from evomerge.merge import METHODS, MergeParamError, MethodSpec, Noise, ParamSpec, get_method, merge_tensor


def error_of(name: str, params: dict, n_models: int = 2) -> str:
    with pytest.raises(MergeParamError) as caught:
        get_method(name).check(params, n_models)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_merge_param_error_is_a_value_error():
    assert issubclass(MergeParamError, ValueError)


def test_unknown_method_suggests_close_names():
    with pytest.raises(MergeParamError) as caught:
        get_method("tie")
    assert str(caught.value) == "unknown merge method 'tie' (did you mean: ties, dare_ties?)"
    with pytest.raises(MergeParamError, match=r"unknown merge method 'xyzzy'; known methods: arcee_fusion, breadcrumbs, "):
        get_method("xyzzy")


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"density": [0.5, 0.0]}, "ties: density = 0.0 for models[1]; density must be in (0, 1]; raise it above 0"),
        ({"density": 1.5}, "ties: density = 1.5; density must be in (0, 1]; lower it to 1 or less"),
        ({"weight": [1.0, -3.0]}, "ties: weight = -3.0 for models[1]; weight must be in [-1, 2]; raise it to -1 or more"),
        ({"lambda_": float("nan")}, "ties: lambda_ = nan; lambda_ must be in [0, 2]; use a finite number"),
        ({"weight": [1.0, 1.0, 1.0]}, "ties: weight got 3 values for 2 models; give one value per model, or one number for all"),
        ({"lambda_": [1.0, 1.0]}, "ties: lambda_ got 2 values; lambda_ is one number shared by all models; give one number"),
        ({"weight": "heavy"}, "ties: weight = 'heavy'; weight must be a number or a list of numbers"),
        ({"densty": 0.5}, "ties: unknown parameter 'densty' (did you mean: density?); ties takes: weight, density, lambda_"),
    ],
)
def test_ties_errors_name_parameter_value_range_and_fix(params, message):
    assert error_of("ties", params) == message


def test_mergekit_spelling_of_lambda_points_to_lambda_():
    assert "unknown parameter 'lambda' (did you mean: lambda_?)" in error_of("task_arithmetic", {"lambda": 0.5})


@pytest.mark.parametrize(
    ("params", "n_models", "message"),
    [
        (
            {"density": 0.1},  # default epsilon 0.15: 0.1 - 0.15 < 0
            1,
            "della: density = 0.1, epsilon = 0.15; density - epsilon and density + epsilon must lie in (0, 1); "
            "lower epsilon below 0.1",
        ),
        (
            {"density": [0.5, 0.9], "epsilon": 0.1},
            2,
            "della: density = 0.9, epsilon = 0.1 for models[1]; density - epsilon and density + epsilon must lie "
            "in (0, 1); lower epsilon below 0.1",
        ),
    ],
)
def test_della_density_plus_minus_epsilon_must_stay_inside_0_1(params, n_models, message):
    assert error_of("della", params, n_models) == message
    get_method("della").check({"density": 1.0}, 1)  # density 1 keeps all; epsilon is unused (mergekit)
    get_method("della_linear").check({"density": 0.5, "epsilon": 0.3}, 1)


def test_model_counts():
    assert error_of("slerp", {}, 2) == (
        "slerp: got 2 source models; slerp takes exactly 1 source model besides the base; pass exactly 1"
    )
    assert error_of("model_stock", {}, 1) == (
        "model_stock: got 1 source model; model_stock takes at least 2 source models besides the base; add source models"
    )
    assert "got 0 source models" in error_of("ties", {}, 0)


def test_method_constraints():
    assert error_of("consensus", {"k": 3}) == (
        "consensus: k = 3.0 with 2 models; k must be at most the number of models; lower k to 2 or less"
    )
    assert error_of("linear", {"weight": 0.0}).startswith("linear: weight = [0.0, 0.0]; the weights must not all be 0")


def test_valid_values_pass_including_tensors_and_bounds():
    get_method("ties").check({"weight": torch.tensor([1.0, -1.0]), "density": 1.0, "lambda_": 2.0}, 2)
    get_method("breadcrumbs").check({"gamma": [0.0, 0.5]}, 2)
    get_method("slerp").check({"t": 0}, 1)
    get_method("model_stock").check({}, 5)


def test_merge_tensor_validates_before_merging():
    base, deltas = torch.zeros(3), torch.ones(2, 3)
    with pytest.raises(MergeParamError, match=r"^ties: density = 0.0;"):
        merge_tensor(METHODS["ties"], base, deltas, {"density": 0.0})
    with pytest.raises(MergeParamError, match=r"deltas shape \(2, 4\) does not fit base shape \(3,\)"):
        merge_tensor(METHODS["ties"], base, torch.ones(2, 4), {})


def test_merge_tensor_fills_defaults_and_passes_per_model_values_as_fp32_tensors():
    seen = {}

    def probe(base, deltas, *, noise=None, **params):
        seen.update(params, noise=noise)
        return base.float()

    spec = MethodSpec(
        "probe",
        probe,
        (ParamSpec("weight", -1, 2, 1.0, per_model=True), ParamSpec("lambda_", 0, 2, 1.0, per_model=False)),
        needs_base=True,
    )
    noise = Noise(7, "w")
    base, deltas = torch.zeros(4, dtype=torch.bfloat16), torch.zeros(3, 4, dtype=torch.bfloat16)
    merge_tensor(spec, base, deltas, {"lambda_": 0.5}, noise)
    assert seen["noise"] is noise
    assert seen["lambda_"] == 0.5 and isinstance(seen["lambda_"], float)
    weight = seen["weight"]
    assert weight.dtype == torch.float32 and weight.shape == (3,) and weight.device.type == "cpu"
    assert weight.tolist() == [1.0, 1.0, 1.0]
