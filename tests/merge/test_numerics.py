"""Hand-computed expectations for each method, derived from mergekit's definitions (and the papers'
for consensus). Each test names the rule it guards; the arithmetic is in the comments."""

from __future__ import annotations

import math

import pytest
import torch

from evomerge.merge import Noise, get_method, merge_tensor

T = torch.tensor


def merge(name: str, base, deltas, seed: int | None = 0, **params) -> torch.Tensor:
    return merge_tensor(get_method(name), base, deltas, params, None if seed is None else Noise(seed, "w"))


def close(actual, expected, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=torch.float32), rtol=0, atol=atol)


# --- task arithmetic and linear ---------------------------------------------------------------------

DELTAS_2 = T([[1.0, 2.0], [3.0, -4.0]])  # two models, 1-D tensors of 2


def test_task_arithmetic_is_lambda_times_weighted_sum():
    # 1 + 0.5 * (1 * [1, 2] + 0.5 * [3, -4]) = 1 + 0.5 * [2.5, 0] = [2.25, 1]
    close(merge("task_arithmetic", T([1.0, 1.0]), DELTAS_2, weight=[1.0, 0.5], lambda_=0.5), [2.25, 1.0])


def test_linear_is_the_normalized_weighted_average_of_the_sources():
    base = T([0.5, -1.0])
    # base + (1 * [1, 2] + 3 * [3, -4]) / (1 + 3) = base + [2.5, -2.5]
    out = merge("linear", base, DELTAS_2, weight=[0.25, 0.75])
    close(out, [3.0, -3.5])
    sources = base + DELTAS_2  # mergekit's form over full models: sum w_i x_i / sum w_i
    close(out, (0.25 * sources[0] + 0.75 * sources[1]) / 1.0)


# --- TIES ------------------------------------------------------------------------------------------

TIES_BASE = T([[0.5, -0.5, 1.0], [2.0, 0.0, -1.0]])
TIES_DELTAS = T(
    [
        [[3.0, -1.0, 2.0], [0.5, -4.0, 1.0]],  # top 3 |.|: 4, 3, 2  -> [[3, 0, 2], [0, -4, 0]]
        [[-2.0, 2.0, 1.0], [1.0, -3.0, -0.2]],  # top 3 |.|: 3, 2, 2  -> [[-2, 2, 0], [0, -3, 0]]
        [[4.0, -3.0, -5.0], [-0.1, 2.0, 0.3]],  # top 3 |.|: 5, 4, 3  -> [[4, -3, -5], [0, 0, 0]]
    ]
)


def test_ties_trims_elects_sign_and_averages_agreeing_weights():
    # weights [1, 0.5, 1], weighted kept deltas:
    #   m1 = [[3, 0, 2], [0, -4, 0]]   m2 = [[-1, 1, 0], [0, -1.5, 0]]   m3 = [[4, -3, -5], [0, 0, 0]]
    # sums [[6, -2, -3], [0, -5.5, 0]] elect [[+, -, -], [+, -, +]]; agreeing entries / their weights:
    #   (0,0) (3 + 4) / 2 = 3.5   (0,1) -3 / 1   (0,2) -5 / 1   (1,1) (-4 - 1.5) / 1.5 = -11/3   rest 0
    delta = T([[3.5, -3.0, -5.0], [0.0, -11 / 3, 0.0]])
    out = merge("ties", TIES_BASE, TIES_DELTAS, weight=[1.0, 0.5, 1.0], density=0.5)
    close(out, TIES_BASE + delta)
    out = merge("ties", TIES_BASE, TIES_DELTAS, weight=[1.0, 0.5, 1.0], density=0.5, lambda_=0.5)
    close(out, TIES_BASE + 0.5 * delta)


def test_ties_sign_election_breaks_a_zero_sum_towards_plus():
    # mergekit: elected sign = +1 where sum_i w_i d_i >= 0, so +1 and -1 elect +; the -1 is dropped
    close(merge("ties", T([0.0]), T([[1.0], [-1.0]])), [1.0])
    close(merge("dare_ties", T([0.0]), T([[2.0], [-1.0]]), weight=[0.5, 1.0]), [1.0])


def test_ties_divides_by_one_where_the_agreeing_weights_cancel():
    # weights [1, -1]: both weighted deltas are +1, both agree, their weights sum to 0; mergekit then
    # divides by 1, so 1 + 1 = 2; a zero sum with no agreement stays 0 (no 0 / 0)
    close(merge("ties", T([0.0, 0.0]), T([[1.0, 0.0], [-1.0, 0.0]]), weight=[1.0, -1.0]), [2.0, 0.0])


def test_ties_keeps_int_density_times_n_like_python_floats():
    # fp32 0.7 is 0.69999999, yet mergekit computes int(0.7 * 10) = 7 in Python floats; and at least 1.
    delta = torch.arange(1.0, 11.0)[None]
    assert int((merge("ties", torch.zeros(10), delta, density=0.7) != 0).sum()) == 7
    assert int((merge("ties", torch.zeros(10), delta, density=0.01) != 0).sum()) == 1
    close(merge("ties", torch.zeros(10), delta, density=0.3), [0] * 7 + [8, 9, 10])


# --- Model Breadcrumbs -------------------------------------------------------------------------------

CRUMBS = T([[4.0, -7.0, 1.0, 9.0, -3.0, 6.0, -10.0, 2.0, -5.0, 8.0]])  # magnitudes 1..10


@pytest.mark.parametrize(
    ("density", "gamma", "expected"),
    [
        # keep int(0.5*10) = 5 after dropping int(0.2*10) = 2 largest, so 3 smallest go: |.| 4..8 stay
        (0.5, 0.2, [4.0, -7.0, 0, 0, 0, 6.0, 0, 0, -5.0, 8.0]),
        # keep 9: only 10 - 9 = 1 entry may go, so only the largest (-10) is dropped
        (0.9, 0.2, [4.0, -7.0, 1.0, 9.0, -3.0, 6.0, 0, 2.0, -5.0, 8.0]),
        # gamma 0 is plain top-magnitude trimming: |.| 6..10 stay
        (0.5, 0.0, [0, -7.0, 0, 9.0, 0, 6.0, -10.0, 0, 0, 8.0]),
        # density 1 keeps everything, whatever gamma is
        (1.0, 0.2, CRUMBS[0].tolist()),
    ],
)
def test_breadcrumbs_drops_largest_gamma_then_smallest(density, gamma, expected):
    close(merge("breadcrumbs", torch.zeros(10), CRUMBS, density=density, gamma=gamma), expected)


def test_breadcrumbs_ties_elects_sign_without_normalizing():
    deltas = T([[4.0, -2.5, 3.0, 1.0], [-3.0, 2.0, 1.0, -5.0]])
    # density 0.5, gamma 0.25 on 4 entries: drop 1 largest and 1 smallest, keep 2:
    #   model 1 keeps [0, -2.5, 3, 0], model 2 keeps [-3, 2, 0, 0]; sums [-3, -0.5, 3, 0]
    params = {"density": 0.5, "gamma": 0.25}
    close(merge("breadcrumbs", torch.zeros(4), deltas, **params), [-3.0, -0.5, 3.0, 0.0])
    # elected [-, -, +, +]: entry 1 keeps only model 1's -2.5; no division by the weights
    close(merge("breadcrumbs_ties", torch.zeros(4), deltas, **params), [-3.0, -2.5, 3.0, 0.0])
    close(merge("breadcrumbs_ties", torch.zeros(4), deltas, weight=[2.0, 2.0], **params), [-6.0, -5.0, 6.0, 0.0])


# --- DARE and DELLA ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sparse", "dense"),
    [
        ("dare_linear", "task_arithmetic"),
        ("della_linear", "task_arithmetic"),
        ("breadcrumbs", "task_arithmetic"),
        ("dare_ties", "breadcrumbs_ties"),  # both: sign election, not normalized
        ("della", "ties"),  # both: sign election, normalized
    ],
)
def test_density_one_reduces_to_the_dense_method(sparse, dense):
    params = {"weight": [1.0, 0.5, 1.5], "lambda_": 0.7}
    expected = merge(dense, TIES_BASE, TIES_DELTAS, **params)  # ties' default density is 1 too
    close(merge(sparse, TIES_BASE, TIES_DELTAS, density=1.0, **params), expected)


def test_dare_keeps_density_fraction_and_rescales_to_the_l1_norm():
    delta = torch.randn(1, 200, 300, generator=torch.Generator().manual_seed(123))  # not the mask's seed
    out = merge("dare_linear", torch.zeros(200, 300), delta, seed=0, density=0.3)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01
    # mergekit rescale = match the L1 norm: every kept entry scaled by the same |d|_1 / |kept|_1
    scale = delta.abs().sum() / delta[0][kept].abs().sum()
    close(out[kept], delta[0][kept] * scale, atol=1e-5)
    assert scale.item() == pytest.approx(1 / 0.3, rel=0.05)  # about 1 / density, as in DARE


def test_dare_is_unbiased_over_draws():
    delta = torch.randn(1, 10, 20, generator=torch.Generator().manual_seed(1234))
    draws = torch.stack([merge("dare_linear", torch.zeros(10, 20), delta, seed=s, density=0.5) for s in range(400)])
    error = (draws.mean(0) - delta[0]).norm() / delta.norm()
    assert error < 0.15  # one draw is off by about 1; 400 draws by about 1 / sqrt(400)


def test_della_keep_probability_rises_with_magnitude_rank_within_rows():
    # 4000 rows of magnitudes 1..5: the rank-r entry is kept with p = 0.5 - 0.2 + 0.4 * r / 4
    rows = T([1.0, -2.0, 3.0, -4.0, 5.0]).repeat(4000, 1)
    out = merge("della_linear", torch.zeros_like(rows), rows[None], density=0.5, epsilon=0.2)
    rates = (out != 0).float().mean(0)
    close(rates, [0.3, 0.4, 0.5, 0.6, 0.7], atol=0.03)
    assert out.abs().sum().item() == pytest.approx(rows.abs().sum().item(), rel=1e-5)  # L1 rescale


def test_della_ranks_a_1d_tensor_as_one_row():
    delta = T([[5.0, -1.0, 3.0]])  # ranks 2, 0, 1 -> keep p = 0.7, 0.3, 0.5
    params = {"density": 0.5, "epsilon": 0.2}
    draws = torch.stack([merge("della_linear", torch.zeros(3), delta, seed=s, **params) for s in range(600)])
    close((draws != 0).float().mean(0), [0.7, 0.3, 0.5], atol=0.08)


def test_della_density_one_keeps_that_model_whole():
    deltas = T([[1.0, -2.0, 3.0, -4.0], [9.0, 9.0, 9.0, 9.0]])
    out = merge("della_linear", torch.zeros(4), deltas, weight=[1.0, 0.0], density=[1.0, 0.5], epsilon=[0.15, 0.2])
    close(out, deltas[0])


# --- SLERP -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("t", "expected"),
    [
        (0.5, [math.sqrt(0.5), math.sqrt(0.5)]),  # 90 degrees apart: sin(pi/4) / sin(pi/2) each
        (0.25, [math.cos(math.pi / 8), math.sin(math.pi / 8)]),
        (0.0, [1.0, 0.0]),
        (1.0, [0.0, 1.0]),
    ],
)
def test_slerp_on_the_unit_circle(t, expected):
    close(merge("slerp", T([1.0, 0.0]), T([[-1.0, 1.0]]), t=t), expected)


def test_slerp_interpolates_raw_weights_with_the_angle_of_normalized_ones():
    # v0 = [2, 0], v1 = [0, 1]: theta = pi/2, so sin(pi/4) * v0 + sin(pi/4) * v1
    close(merge("slerp", T([2.0, 0.0]), T([[-2.0, 1.0]]), t=0.5), [math.sqrt(2), math.sqrt(0.5)])


def test_slerp_flattens_the_whole_tensor():
    # flattened v0 = [1, 0, 1, 0], v1 = [0, 1, 1, 0]: cos = 1/2, theta = pi/3,
    # t = 0.5: sin(pi/6) / sin(pi/3) * (v0 + v1); row by row would give [[.707, .707], [1, 0]]
    c = 0.5 / math.sin(math.pi / 3)
    out = merge("slerp", T([[1.0, 0.0], [1.0, 0.0]]), T([[[-1.0, 1.0], [0.0, 0.0]]]), t=0.5)
    close(out, [[c, c], [2 * c, 0.0]])


def test_slerp_falls_back_to_lerp_when_nearly_colinear():
    base = T([1.0, 0.0])
    close(merge("slerp", base, T([[1.0, 0.0]]), t=0.3), [1.3, 0.0])  # v1 = 2 v0: (1 - t) v0 + t v1
    close(merge("slerp", base, T([[0.0, 0.02]]), t=0.5), [1.0, 0.01])  # cos 0.9998 > 0.9995: lerp
    # cos 0.99875 < 0.9995: true slerp, slightly off the chord: sin(theta/2) / sin(theta) * (v0 + v1)
    theta = math.acos(1 / math.sqrt(1 + 0.05**2))
    c = math.sin(theta / 2) / math.sin(theta)
    out = merge("slerp", base, T([[0.0, 0.05]]), t=0.5)
    close(out, [2 * c, 0.05 * c])
    assert out[0].item() > 1.0002  # lerp would give exactly 1


# --- Model Stock -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("deltas", "t", "mean"),
    [
        # cos = 1/sqrt(2); t = 2c / (1 + c)
        ([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]], 2 * math.sqrt(0.5) / (1 + math.sqrt(0.5)), [1.0, 0.5, 0.0]),
        # pairwise cos 0, 1/sqrt(2), 1/sqrt(2): mean c = sqrt(2)/3; t = 3c / (1 + 2c)
        (
            [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]],
            math.sqrt(2) / (1 + 2 * math.sqrt(2) / 3),
            [2 / 3, 2 / 3, 0.0],
        ),
        ([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], 0.0, [0.5, 0.5, 0.0]),  # orthogonal: t = 0, the base
        ([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]], 0.0, [0.0, 0.0, 0.0]),  # opposite: 1 + cos = 0, the base
    ],
)
def test_model_stock_interpolates_base_and_average_by_the_angle(deltas, t, mean):
    base = T([0.5, -1.0, 2.0])
    out = merge("model_stock", base, T(deltas))
    close(out, base + t * T(mean))
    sources = base + T(deltas)  # mergekit's form: t * average + (1 - t) * w0
    close(out, t * sources.mean(0) + (1 - t) * base)


# --- Consensus (TALL masks) ------------------------------------------------------------------------

TAUS = T([[1.0, 0.0, 2.0, -1.0], [1.0, 3.0, -2.0, 0.0], [0.0, 1.0, 0.0, -1.0]])  # tau_MTL = [2, 4, 0, -2]


@pytest.mark.parametrize(
    ("k", "lambda_", "expected"),
    [
        # tall_lambda 0.5: m1 = [T, F, T, T], m2 = [T, T, T, F], m3 = [F, F, T, T]; counts [2, 1, 3, 2]
        (2.0, 1.0, [2.0, 0.0, 0.0, -2.0]),  # entry 1 matters to one task only: dropped
        (2.0, 0.5, [1.0, 0.0, 0.0, -1.0]),
        (1.0, 1.0, [2.0, 4.0, 0.0, -2.0]),  # k = 1 keeps every entry some task needs
        (3.0, 1.0, [0.0, 0.0, 0.0, 0.0]),  # only entry 2 is in all three masks, and tau_MTL is 0 there
    ],
)
def test_consensus_keeps_entries_in_at_least_k_tall_masks(k, lambda_, expected):
    close(merge("consensus", torch.zeros(4), TAUS, tall_lambda=0.5, k=k, lambda_=lambda_), expected)


def test_consensus_masks_use_weighted_task_vectors():
    # weight [2, 1, 1]: tau_1 = [2, 0, 4, -2], tau_MTL = [3, 4, 2, -3];
    # m1 = [T, F, T, T], m2 = [T, T, T, F], m3 = [F, F, F, T]; counts [2, 1, 2, 2]
    out = merge("consensus", torch.zeros(4), TAUS, weight=[2.0, 1.0, 1.0], tall_lambda=0.5, k=2.0)
    close(out, [3.0, 0.0, 2.0, -3.0])
