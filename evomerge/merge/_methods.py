"""The merge methods, as pure functions of (base, deltas), with mergekit semantics for shared names.

Every method: base (*S) any float dtype; deltas (E, *S) task vectors (source - base); per-model
parameters as (E,) fp32 tensors, global ones as floats; returns the merged full weights (*S) in fp32.
Inputs are never written; randomness comes only from `generator`.

The task-vector family is mergekit's generalized task arithmetic: sparsify each delta, weight it,
optionally elect signs (TIES), sum, optionally divide by the summed weights, scale by lambda_:

    merged = base + lambda_ * sum_i(w_i * m_i * sparse(d_i)) / (normalize ? sum_i(w_i * m_i) : 1)

where m_i is the sign-agreement mask (all ones without election). mergekit's ``normalize`` and
``rescale`` flags are fixed to mergekit's per-method defaults, not parameters:

    method            sparsifier             sign election  normalize  rescale (L1)
    task_arithmetic   -                      no             no         -
    ties              top magnitude          yes            yes        no
    dare_ties         random (DARE)          yes            no         yes
    dare_linear       random (DARE)          no             no         yes
    breadcrumbs       middle magnitude       no             no         no
    breadcrumbs_ties  middle magnitude       yes            no         no
    della             rank-sampled (DELLA)   yes            yes        yes
    della_linear      rank-sampled (DELLA)   no             no         yes

Parameter ranges are the valid values and the default search bounds: weight in [-1, 2] (negative
subtracts a task vector, Ilharco et al.'s negation; above 1 amplifies), linear's weight in [0, 1]
(it is normalized, so only ratios matter), density in (0, 1], lambda_ in [0, 2], gamma in [0, 0.5],
epsilon in [0, 0.5), t in [0, 1]. Defaults follow mergekit (density 1, gamma 0.01, epsilon 0.15,
lambda 1) and 1.0 for weight, which mergekit requires explicitly.
"""

from __future__ import annotations

from itertools import combinations

import torch
from torch import Tensor

from evomerge.merge._registry import ParamSpec, Resolved, register
from evomerge.merge._sparsify import (
    DeltaStats,
    Keep,
    middle_magnitude_keep,
    per_model,
    random_keep,
    rank_sampled_keep,
    rescale_l1,
    top_magnitude_keep,
)

WEIGHT = ParamSpec("weight", -1.0, 2.0, 1.0, per_model=True)
DENSITY = ParamSpec("density", 0.0, 1.0, 1.0, per_model=True, low_inclusive=False)
LAMBDA = ParamSpec("lambda_", 0.0, 2.0, 1.0, per_model=False)
GAMMA = ParamSpec("gamma", 0.0, 0.5, 0.01, per_model=True)
EPSILON = ParamSpec("epsilon", 0.0, 0.5, 0.15, per_model=True, high_inclusive=False)

SLERP_DOT_THRESHOLD = 0.9995  # mergekit: |cos| above this is colinear, so slerp falls back to lerp
SLERP_NORM_EPS = 1e-8  # mergekit: norms at or below this count as 1
STOCK_NORM_EPS = 1e-6  # mergekit model_stock: floor of |d_i| * |d_j| in the cosine
STOCK_SINGULAR = 1e-6  # mergekit model_stock: |1 + (N-1) cos| below this keeps the base
# Entries (all models together) per CPU step of _mix: the (E, chunk) temporaries stay in cache, and
# below torch's intra-op grain (32768) each op runs on one thread: no per-op thread barrier, which on a
# busy 2-core machine cost 4x (measured). On a GPU, kernel launches cost more than memory: large steps.
MIX_CHUNK = (1 << 15) - 1
MIX_CHUNK_ACCELERATOR = 1 << 24


def _mix(
    base: Tensor,
    deltas: Tensor,
    weight: Tensor,
    *,
    elect_sign: bool,
    normalize: bool,
    lambda_: float,
    keeps: list[Keep | None] | None = None,
    scale: Tensor | None = None,
) -> Tensor:
    """base + lambda_ * (weighted, optionally sign-elected, optionally normalized) sum of the kept deltas
    keep_e(d_e) * scale_e (keeps: one per model, None keeps all; scale (E,)), in fp32.

    Every step after sparsifying is per entry, so it runs over chunks of entries: the working
    tensors are (E, chunk) and stay in cache, and memory beyond the inputs is the output alone. The
    chunk steps are float arithmetic only (bool tensors cost several times more per entry on the CPU);
    each equals mergekit's formula exactly, as noted.
    """
    n_models = len(deltas)
    flat, base_flat = deltas.reshape(n_models, -1), base.reshape(-1)
    out = torch.empty(base_flat.shape, dtype=torch.float32, device=deltas.device)
    w = weight.to(device=deltas.device, dtype=torch.float32).view(n_models, 1)
    s = None if scale is None else scale.to(w).view(n_models, 1)
    plain_divisor = torch.where(w.sum(0).abs() < 1e-8, torch.ones_like(w[0]), w.sum(0))  # (1,)
    step = max(1024, MIX_CHUNK // n_models) if deltas.device.type == "cpu" else MIX_CHUNK_ACCELERATOR  # same bits
    for start in range(0, flat.shape[1], step):
        chunk = slice(start, start + step)
        kept = _kept_chunk(flat[:, chunk].float(), keeps, start)
        if s is not None:
            kept = kept * s
        weighted = kept * w  # (E, c)
        if elect_sign:
            agree = _agreeing(weighted)  # (E, c), 1.0 where a model agrees with the elected sign, else 0
            mixed = (weighted * agree).sum(0)
            divisor = _nonzero_or_one((agree.mul_(w)).sum(0))
        else:
            mixed, divisor = weighted.sum(0), plain_divisor
        if normalize:
            mixed = mixed / divisor
        out[chunk] = base_flat[chunk].float() + lambda_ * mixed
    return out.view(base.shape)


def _kept_chunk(rows: Tensor, keeps: list[Keep | None] | None, start: int) -> Tensor:
    """(E, c) chunk of the sparsified task vectors (a fresh tensor when any model sparsifies)."""
    if keeps is None or all(k is None for k in keeps):
        return rows
    return torch.stack([row if keep is None else keep.apply(row, start) for row, keep in zip(rows, keeps)])


def _agreeing(weighted: Tensor) -> Tensor:
    """TIES sign election (mergekit consensus ``sum``): the elected sign is that of the sum of weighted
    deltas, + where the sum is 0 (mergekit: sum >= 0); a model agrees where its weighted delta is
    nonzero with that sign. Returns 1.0 / 0.0 as fp32 (E, c).

    sign(2 * sign(sum) + 1) is +1 for sum >= 0 (-0.0 included) and -1 below; weighted * elected > 0
    is agreement, and clamping at 0 then taking the sign turns it into 1.0 / 0.0."""
    elected = (weighted.sum(0).sign() * 2 + 1).sign_()  # (c,)
    return (weighted * elected).clamp_(min=0).sign_()


def _nonzero_or_one(divisor: Tensor) -> Tensor:
    """mergekit's divisor[divisor == 0] = 1, in float ops: d + (1 - sign(|d|)) is d, or 1 where d is 0."""
    return divisor + (1 - divisor.abs().sign())


# --- task-vector family (mergekit generalized_task_arithmetic) -----------------------------------


@register(WEIGHT, LAMBDA)
def task_arithmetic(
    base: Tensor, deltas: Tensor, *, weight: Tensor, lambda_: float, generator: torch.Generator | None = None
) -> Tensor:
    """Task arithmetic (Ilharco et al. 2023): base + lambda_ * sum_i w_i d_i."""
    return _mix(base, deltas, weight, elect_sign=False, normalize=False, lambda_=lambda_)


@register(WEIGHT, DENSITY, LAMBDA)
def ties(
    base: Tensor,
    deltas: Tensor,
    *,
    weight: Tensor,
    density: Tensor,
    lambda_: float,
    generator: torch.Generator | None = None,
    stats: DeltaStats | None = None,
) -> Tensor:
    """TIES-Merging (Yadav et al. 2023): trim to the top-density magnitudes per model, elect the sign
    of sum_i w_i d_i per entry, average the agreeing weighted deltas (divided by their weights)."""
    keeps = top_magnitude_keep(deltas, density, stats or DeltaStats(deltas))
    return _mix(base, deltas, weight, elect_sign=True, normalize=True, lambda_=lambda_, keeps=keeps)


@register(WEIGHT, DENSITY, LAMBDA, random=True)
def dare_ties(
    base: Tensor,
    deltas: Tensor,
    *,
    weight: Tensor,
    density: Tensor,
    lambda_: float,
    generator: torch.Generator | None = None,
    stats: DeltaStats | None = None,
) -> Tensor:
    """DARE (Yu et al. 2024) drop-and-rescale, then TIES sign election; not normalized (mergekit)."""
    keeps = random_keep(deltas, density, generator)
    scale = rescale_l1(deltas, keeps, stats or DeltaStats(deltas))
    return _mix(base, deltas, weight, elect_sign=True, normalize=False, lambda_=lambda_, keeps=keeps, scale=scale)


@register(WEIGHT, DENSITY, LAMBDA, random=True)
def dare_linear(
    base: Tensor,
    deltas: Tensor,
    *,
    weight: Tensor,
    density: Tensor,
    lambda_: float,
    generator: torch.Generator | None = None,
    stats: DeltaStats | None = None,
) -> Tensor:
    """DARE (Yu et al. 2024) drop-and-rescale, then task arithmetic."""
    keeps = random_keep(deltas, density, generator)
    scale = rescale_l1(deltas, keeps, stats or DeltaStats(deltas))
    return _mix(base, deltas, weight, elect_sign=False, normalize=False, lambda_=lambda_, keeps=keeps, scale=scale)


@register(WEIGHT, DENSITY, GAMMA, LAMBDA)
def breadcrumbs(
    base: Tensor,
    deltas: Tensor,
    *,
    weight: Tensor,
    density: Tensor,
    gamma: Tensor,
    lambda_: float,
    generator: torch.Generator | None = None,
    stats: DeltaStats | None = None,
) -> Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2023): drop the gamma largest and the smallest
    magnitudes, keeping a density fraction, then task arithmetic."""
    keeps = middle_magnitude_keep(deltas, density, gamma, stats or DeltaStats(deltas))
    return _mix(base, deltas, weight, elect_sign=False, normalize=False, lambda_=lambda_, keeps=keeps)


@register(WEIGHT, DENSITY, GAMMA, LAMBDA)
def breadcrumbs_ties(
    base: Tensor,
    deltas: Tensor,
    *,
    weight: Tensor,
    density: Tensor,
    gamma: Tensor,
    lambda_: float,
    generator: torch.Generator | None = None,
    stats: DeltaStats | None = None,
) -> Tensor:
    """Model Breadcrumbs sparsification, then TIES sign election; not normalized (mergekit)."""
    keeps = middle_magnitude_keep(deltas, density, gamma, stats or DeltaStats(deltas))
    return _mix(base, deltas, weight, elect_sign=True, normalize=False, lambda_=lambda_, keeps=keeps)


def _della_window(values: Resolved, n_models: int) -> str | None:
    """mergekit raises unless density - epsilon > 0 and density + epsilon < 1 (density < 1 only)."""
    for index, (d, eps) in enumerate(zip(values["density"], values["epsilon"])):
        if d < 1 and not (d - eps > 0 and d + eps < 1):
            where = f" for models[{index}]" if n_models > 1 else ""
            return (
                f"density = {d!r}, epsilon = {eps!r}{where}; density - epsilon and density + epsilon must lie "
                f"in (0, 1); lower epsilon below {min(d, 1 - d):g}"
            )
    return None


@register(WEIGHT, DENSITY, EPSILON, LAMBDA, random=True, constraints=(_della_window,))
def della(
    base: Tensor,
    deltas: Tensor,
    *,
    weight: Tensor,
    density: Tensor,
    epsilon: Tensor,
    lambda_: float,
    generator: torch.Generator | None = None,
    stats: DeltaStats | None = None,
) -> Tensor:
    """DELLA-Merging (Deep et al. 2024): MagPrune (keep probability rises with magnitude rank,
    density +- epsilon), L1 rescale, TIES sign election, normalized (mergekit)."""
    stats = stats or DeltaStats(deltas)
    keeps = rank_sampled_keep(deltas, density, epsilon, generator, stats)
    scale = rescale_l1(deltas, keeps, stats)
    return _mix(base, deltas, weight, elect_sign=True, normalize=True, lambda_=lambda_, keeps=keeps, scale=scale)


@register(WEIGHT, DENSITY, EPSILON, LAMBDA, random=True, constraints=(_della_window,))
def della_linear(
    base: Tensor,
    deltas: Tensor,
    *,
    weight: Tensor,
    density: Tensor,
    epsilon: Tensor,
    lambda_: float,
    generator: torch.Generator | None = None,
    stats: DeltaStats | None = None,
) -> Tensor:
    """DELLA MagPrune and L1 rescale, then task arithmetic (no sign election, not normalized)."""
    stats = stats or DeltaStats(deltas)
    keeps = rank_sampled_keep(deltas, density, epsilon, generator, stats)
    scale = rescale_l1(deltas, keeps, stats)
    return _mix(base, deltas, weight, elect_sign=False, normalize=False, lambda_=lambda_, keeps=keeps, scale=scale)


# --- interpolation and geometric methods ----------------------------------------------------------


def _weights_not_all_zero(values: Resolved, n_models: int) -> str | None:
    if sum(values["weight"]) > 0:
        return None
    return (
        f"weight = {values['weight']}; the weights must not all be 0 (linear divides by their sum); "
        "raise one above 0"
    )


@register(ParamSpec("weight", 0.0, 1.0, 1.0, per_model=True), constraints=(_weights_not_all_zero,))
def linear(base: Tensor, deltas: Tensor, *, weight: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Weighted average of the source models (model soups, Wortsman et al. 2022), normalized as in
    mergekit: sum_i w_i x_i / sum_i w_i = base + sum_i w_i d_i / sum_i w_i. The base gets no weight."""
    return _mix(base, deltas, weight, elect_sign=False, normalize=True, lambda_=1.0)


@register(ParamSpec("t", 0.0, 1.0, 0.5, per_model=False), max_models=1)
def slerp(base: Tensor, deltas: Tensor, *, t: float, generator: torch.Generator | None = None) -> Tensor:
    """Spherical interpolation from the base (t=0) to the one source (t=1), over the whole tensor
    flattened (mergekit): v0, v1 raw weights, angle from their normalized dot product; lerp when
    |cos| > 0.9995."""
    v0 = base.float().reshape(-1)
    d = deltas[0].float().reshape(-1)
    v1 = v0 + d
    n0, n1 = (torch.where(n > SLERP_NORM_EPS, n, torch.ones_like(n)) for n in (v0.norm(), v1.norm()))
    dot = ((v0 / n0) * (v1 / n1)).sum().clamp(-1, 1).item()
    if abs(dot) > SLERP_DOT_THRESHOLD:
        return (v0 + t * d).view(base.shape)  # = (1 - t) v0 + t v1
    theta = torch.tensor(dot, dtype=torch.float64).acos()
    c0, c1 = (float(torch.sin(s * theta) / torch.sin(theta)) for s in (1 - t, t))
    return (c0 * v0 + c1 * v1).view(base.shape)


def _mean_pairwise_cosine(flat: Tensor) -> Tensor:
    """Mean cosine over all pairs of rows of flat (N, P), each clamped to [-1, 1] (mergekit)."""
    norms = torch.linalg.vector_norm(flat, dim=1)
    cosines = [
        ((flat[i] * flat[j]).sum() / (norms[i] * norms[j]).clamp_min(STOCK_NORM_EPS)).clamp(-1, 1)
        for i, j in combinations(range(len(flat)), 2)
    ]
    return torch.stack(cosines).mean()


@register(min_models=2)
def model_stock(base: Tensor, deltas: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """Model Stock (Jang et al. 2024), per whole tensor as in mergekit (filter_wise false):
    cos = mean pairwise cosine of the deltas, t = N cos / (1 + (N - 1) cos), merged = base + t * mean(d);
    keeps the base where 1 + (N - 1) cos is about 0."""
    flat = deltas.float().reshape(len(deltas), -1)  # (N, P)
    n, cos = len(flat), _mean_pairwise_cosine(flat)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < STOCK_SINGULAR
    t = torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, denominator))
    return base.float() + t * flat.mean(0).view(base.shape)


# --- consensus (TALL masks) -------------------------------------------------------------------------


def _k_at_most_models(values: Resolved, n_models: int) -> str | None:
    if values["k"] <= n_models:
        return None
    return (
        f"k = {values['k']!r} with {n_models} models; k must be at most the number of models; "
        f"lower k to {n_models} or less"
    )


@register(
    WEIGHT,
    ParamSpec("tall_lambda", 0.0, 1.0, 0.4, per_model=True),
    ParamSpec("k", 0.0, 8.0, 2.0, per_model=False),
    LAMBDA,
    min_models=2,
    constraints=(_k_at_most_models,),
)
def consensus(
    base: Tensor,
    deltas: Tensor,
    *,
    weight: Tensor,
    tall_lambda: Tensor,
    k: float,
    lambda_: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Consensus Merging with TALL masks (Wang et al. 2024, "Localizing Task Information for Improved
    Model Merging and Compression"), on task arithmetic:

        tau_t   = w_t * d_t                                    weighted task vectors
        tau_MTL = sum_t tau_t                                  multi-task vector
        m_t     = |tau_t| >= tall_lambda_t * |tau_MTL - tau_t|  TALL mask: entries that matter to task t
        keep    = (sum_t m_t) >= k                             drop "selfish" (1 task) and unused entries
        merged  = base + lambda_ * keep * tau_MTL

    tall_lambda in [0, 1] (the paper tunes lambda_t in [0.2, 0.6]; default 0.4); k in [0, 8], at
    most the number of models, default 2 as in the paper (k = 0 is plain task arithmetic). The
    paper's reference code uses a strict > in m_t; the two differ only on exact ties.
    """
    tau = deltas.float() * per_model(weight, deltas)  # (E, *S)
    tau_mtl = tau.sum(0)
    masks = tau.abs() >= per_model(tall_lambda, tau) * (tau_mtl - tau).abs()
    keep = masks.sum(0) >= k
    return base.float() + lambda_ * (tau_mtl * keep)
