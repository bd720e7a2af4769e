"""The merge methods, as pure functions of (base, deltas), with mergekit semantics for shared names.

Every method: base (*S) any float dtype; deltas (E, *S) task vectors (source - base); per-model
parameters as (E,) fp32 tensors, global ones as floats; returns the merged full weights (*S) in fp32.
Inputs are never written; randomness comes only from `noise` (counter-based uniforms, see `_random`).

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

from evomerge.merge import _fused
from evomerge.merge._random import Noise
from evomerge.merge._registry import ParamSpec, Resolved, check_finite, copy_checked, register
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
# Entries (all models together) per CPU step of the eager _mix_chunks (CPUs run the fused kernels;
# the eager path serves what they do not cover, e.g. non-fp32 task vectors): large steps, since the per-op overhead of eager
# torch outweighs cache misses (3 << 17 measured best for 3 models: 2.5x faster than 32K steps on one
# thread, a CPU worker's default, and 2.9x on two threads of a 2-core machine at load 2, where the ops
# then run in parallel). When other processes oversubscribe the cores, the per-op thread barriers of
# parallel ops cost several times more (measured 3x slower than 32K steps at load 5): give such
# workers one thread. On a GPU, kernel launches cost more than memory: larger steps. Bits do not
# depend on the step.
MIX_CHUNK = 3 << 17
MIX_CHUNK_ACCELERATOR = 1 << 24


def _step(n_models: int, device: torch.device) -> int:
    """Entries per model per step of _mix."""
    return max(1, (MIX_CHUNK if device.type == "cpu" else MIX_CHUNK_ACCELERATOR) // n_models)


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
    out: Tensor | None = None,
) -> Tensor:
    """base + lambda_ * (weighted, optionally sign-elected, optionally normalized) sum of the kept deltas
    keep_e(d_e) * scale_e (keeps: one per model, None keeps all; scale (E,)), in fp32, or written into
    out (rounded once to its dtype); FloatingPointError if a value is NaN or inf.

    On the CPU the fused kernel (`_fused`) does it in one pass; `_mix_chunks`, eager torch ops, is the
    accelerator path and the reference the kernel is tested against. Both give equal tensors.
    """
    n_models = len(deltas)
    w = weight.to(device=deltas.device, dtype=torch.float32).view(n_models, 1)
    factor = w if scale is None else w * scale.to(w).view(n_models, 1)  # (E, 1): w_e * rescale_e
    plain_divisor = float(torch.where(w.sum(0).abs() < 1e-8, torch.ones_like(w[0]), w.sum(0)))
    # mergekit sets a zero divisor to 1; with no negative weight it is 0 only where no model agrees
    # (and the sum is 0 too), so a clamp at the smallest positive weight does the same in one op
    zero_fix = float(w[w > 0].min()) if normalize and bool((w >= 0).all() & (w > 0).any()) else None
    if _fused.usable(deltas, keeps, elect_sign=elect_sign, normalize=normalize, lambda_=lambda_):
        zero_divisor = 1.0 if zero_fix is None else zero_fix
        return _fused.mix(base, deltas, w, factor, keeps, elect_sign=elect_sign, normalize=normalize, lambda_=lambda_,
                          plain_divisor=plain_divisor, zero_divisor=zero_divisor, out=out)
    merged = check_finite(_mix_chunks(base, deltas, w, factor, keeps, elect_sign, normalize, lambda_, plain_divisor, zero_fix))
    return merged if out is None else copy_checked(out, merged)


def _mix_chunks(base, deltas, w, factor, keeps, elect_sign, normalize, lambda_, plain_divisor, zero_fix) -> Tensor:
    """`_mix` as eager torch ops over chunks of entries (arguments as `_mix` computes them), in fp32.

    Every step after sparsifying is per entry, so it runs over chunks of entries: the working
    tensors are (E, chunk) buffers made once and reused, so they stay in cache, and memory beyond the
    inputs is the output alone. Each chunk is about a dozen float ops, in place where they can be
    (bool tensors cost several times more per entry on the CPU); each equals mergekit's formula, as noted.
    """
    n_models = len(deltas)
    flat, base_flat = deltas.reshape(n_models, -1), base.reshape(-1)
    out = torch.empty(base_flat.shape, dtype=torch.float32, device=deltas.device)
    step = _step(n_models, deltas.device)
    work = torch.empty((n_models + 2, min(step, flat.shape[1])), dtype=torch.float32, device=deltas.device)
    one = torch.ones((), device=deltas.device)
    for start in range(0, flat.shape[1], step):
        rows = flat[:, start : start + step]
        weighted, (mixed, sign) = work[:n_models, : rows.shape[1]], work[n_models:, : rows.shape[1]]
        _weighted_chunk(rows, keeps, start, factor, weighted)  # (E, c)
        if elect_sign:
            divisor = _elect_and_sum(weighted, w, mixed, sign, one, normalize, zero_fix)
        else:
            torch.sum(weighted, 0, out=mixed)
            divisor = plain_divisor
        chunk = out[start : start + rows.shape[1]]
        chunk.copy_(base_flat[start : start + rows.shape[1]])
        if normalize and isinstance(divisor, Tensor):
            chunk.addcdiv_(mixed, divisor, value=lambda_)  # base + lambda_ * mixed / divisor
            continue
        if normalize:
            mixed.div_(divisor)
        if lambda_ != 1:
            mixed.mul_(lambda_)
        chunk.add_(mixed)
    return out.view(base.shape)


def _weighted_chunk(rows: Tensor, keeps: list[Keep | None] | None, start: int, factor: Tensor, out: Tensor) -> None:
    """out (E, c) = keep_e(rows_e) * factor_e: the sparsified, rescaled and weighted task vectors."""
    if keeps is None or all(k is None for k in keeps):
        torch.mul(rows, factor, out=out)
        return
    for e, keep in enumerate(keeps):  # indexing: iterating a tensor unbinds it, which costs more
        if keep is None:
            out[e].copy_(rows[e])
        else:
            keep.write(rows[e] if rows.dtype == torch.float32 else rows[e].float(), start, out[e])
    out.mul_(factor)


def _elect_and_sum(
    weighted: Tensor, w: Tensor, mixed: Tensor, sign: Tensor, one: Tensor, normalize: bool, zero_fix: float | None
) -> Tensor | None:
    """TIES sign election (mergekit consensus ``sum``) and the agreeing sum, into mixed (c,);
    returns the divisor (the agreeing weights' sum, 1 where it is 0) when normalize. weighted (E, c)
    is used up. zero_fix: a value to clamp the divisor at instead (see _mix), or None.

    The elected sign is that of sum_e weighted_e, + where the sum is 0 (mergekit: sum >= 0), as
    copysign(1, sum); a model agrees where weighted_e * sign > 0. (A sum of -0.0 elects -, but then
    every weighted_e is 0 and no model agrees either way.) With t_e = max(weighted_e * sign, 0), the
    agreeing sum is sign * sum_e t_e, and a model agrees exactly where t_e > 0."""
    torch.sum(weighted, 0, out=mixed)
    torch.copysign(one, mixed, out=sign)  # (c,) +-1
    weighted.mul_(sign).clamp_(min=0)  # t_e
    torch.sum(weighted, 0, out=mixed)
    mixed.mul_(sign)
    if not normalize:
        return None
    divisor = torch.sum(weighted.sign_().mul_(w), 0, out=sign)  # the agreeing models' weights, summed in model order
    if zero_fix is not None:
        return divisor.clamp_(min=zero_fix)  # 0 (mixed 0 there) -> zero_fix; others are >= it already
    return divisor.masked_fill_(divisor == 0, 1.0)  # mergekit: divisor[divisor == 0] = 1


# --- task-vector family (mergekit generalized_task_arithmetic) -----------------------------------


@register(WEIGHT, LAMBDA)
def task_arithmetic(
    base: Tensor, deltas: Tensor, *, weight: Tensor, lambda_: float, noise: Noise | None = None, out: Tensor | None = None
) -> Tensor:
    """Task arithmetic (Ilharco et al. 2023): base + lambda_ * sum_i w_i d_i."""
    return _mix(base, deltas, weight, elect_sign=False, normalize=False, lambda_=lambda_, out=out)


@register(WEIGHT, DENSITY, LAMBDA)
def ties(
    base: Tensor,
    deltas: Tensor,
    *,
    weight: Tensor,
    density: Tensor,
    lambda_: float,
    noise: Noise | None = None,
    stats: DeltaStats | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """TIES-Merging (Yadav et al. 2023): trim to the top-density magnitudes per model, elect the sign
    of sum_i w_i d_i per entry, average the agreeing weighted deltas (divided by their weights)."""
    keeps = top_magnitude_keep(deltas, density, stats or DeltaStats(deltas))
    return _mix(base, deltas, weight, elect_sign=True, normalize=True, lambda_=lambda_, keeps=keeps, out=out)


@register(WEIGHT, DENSITY, LAMBDA, random=True)
def dare_ties(
    base: Tensor,
    deltas: Tensor,
    *,
    weight: Tensor,
    density: Tensor,
    lambda_: float,
    noise: Noise | None = None,
    stats: DeltaStats | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """DARE (Yu et al. 2024) drop-and-rescale, then TIES sign election; not normalized (mergekit)."""
    stats = stats or DeltaStats(deltas)
    keeps = random_keep(density, noise or Noise(), stats)
    scale = rescale_l1(keeps, stats)
    return _mix(base, deltas, weight, elect_sign=True, normalize=False, lambda_=lambda_, keeps=keeps, scale=scale, out=out)


@register(WEIGHT, DENSITY, LAMBDA, random=True)
def dare_linear(
    base: Tensor,
    deltas: Tensor,
    *,
    weight: Tensor,
    density: Tensor,
    lambda_: float,
    noise: Noise | None = None,
    stats: DeltaStats | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """DARE (Yu et al. 2024) drop-and-rescale, then task arithmetic."""
    stats = stats or DeltaStats(deltas)
    keeps = random_keep(density, noise or Noise(), stats)
    scale = rescale_l1(keeps, stats)
    return _mix(base, deltas, weight, elect_sign=False, normalize=False, lambda_=lambda_, keeps=keeps, scale=scale, out=out)


@register(WEIGHT, DENSITY, GAMMA, LAMBDA)
def breadcrumbs(
    base: Tensor,
    deltas: Tensor,
    *,
    weight: Tensor,
    density: Tensor,
    gamma: Tensor,
    lambda_: float,
    noise: Noise | None = None,
    stats: DeltaStats | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2023): drop the gamma largest and the smallest
    magnitudes, keeping a density fraction, then task arithmetic."""
    keeps = middle_magnitude_keep(deltas, density, gamma, stats or DeltaStats(deltas))
    return _mix(base, deltas, weight, elect_sign=False, normalize=False, lambda_=lambda_, keeps=keeps, out=out)


@register(WEIGHT, DENSITY, GAMMA, LAMBDA)
def breadcrumbs_ties(
    base: Tensor,
    deltas: Tensor,
    *,
    weight: Tensor,
    density: Tensor,
    gamma: Tensor,
    lambda_: float,
    noise: Noise | None = None,
    stats: DeltaStats | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Model Breadcrumbs sparsification, then TIES sign election; not normalized (mergekit)."""
    keeps = middle_magnitude_keep(deltas, density, gamma, stats or DeltaStats(deltas))
    return _mix(base, deltas, weight, elect_sign=True, normalize=False, lambda_=lambda_, keeps=keeps, out=out)


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
    noise: Noise | None = None,
    stats: DeltaStats | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """DELLA-Merging (Deep et al. 2024): MagPrune (keep probability rises with magnitude rank,
    density +- epsilon), L1 rescale, TIES sign election, normalized (mergekit)."""
    stats = stats or DeltaStats(deltas)
    keeps = rank_sampled_keep(density, epsilon, noise or Noise(), stats)
    scale = rescale_l1(keeps, stats)
    return _mix(base, deltas, weight, elect_sign=True, normalize=True, lambda_=lambda_, keeps=keeps, scale=scale, out=out)


@register(WEIGHT, DENSITY, EPSILON, LAMBDA, random=True, constraints=(_della_window,))
def della_linear(
    base: Tensor,
    deltas: Tensor,
    *,
    weight: Tensor,
    density: Tensor,
    epsilon: Tensor,
    lambda_: float,
    noise: Noise | None = None,
    stats: DeltaStats | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """DELLA MagPrune and L1 rescale, then task arithmetic (no sign election, not normalized)."""
    stats = stats or DeltaStats(deltas)
    keeps = rank_sampled_keep(density, epsilon, noise or Noise(), stats)
    scale = rescale_l1(keeps, stats)
    return _mix(base, deltas, weight, elect_sign=False, normalize=False, lambda_=lambda_, keeps=keeps, scale=scale, out=out)


# --- interpolation and geometric methods ----------------------------------------------------------


def _weights_not_all_zero(values: Resolved, n_models: int) -> str | None:
    if sum(values["weight"]) > 0:
        return None
    return (
        f"weight = {values['weight']}; the weights must not all be 0 (linear divides by their sum); "
        "raise one above 0"
    )


@register(ParamSpec("weight", 0.0, 1.0, 1.0, per_model=True), constraints=(_weights_not_all_zero,))
def linear(base: Tensor, deltas: Tensor, *, weight: Tensor, noise: Noise | None = None, out: Tensor | None = None) -> Tensor:
    """Weighted average of the source models (model soups, Wortsman et al. 2022), normalized as in
    mergekit: sum_i w_i x_i / sum_i w_i = base + sum_i w_i d_i / sum_i w_i. The base gets no weight."""
    return _mix(base, deltas, weight, elect_sign=False, normalize=True, lambda_=1.0, out=out)


@register(ParamSpec("t", 0.0, 1.0, 0.5, per_model=False), max_models=1)
def slerp(base: Tensor, deltas: Tensor, *, t: float, noise: Noise | None = None) -> Tensor:
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
def model_stock(base: Tensor, deltas: Tensor, *, noise: Noise | None = None) -> Tensor:
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
    noise: Noise | None = None,
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
