"""The merge methods' tensor functions, each bound to its catalog entry (`catalog.attach`), with
mergekit semantics for shared names.

Every method: base (*S) any float dtype; deltas, the E task vectors (source - base) as `TaskVectors`
(formed from the sources in fp32 where used, never materialised whole, except by the geometric methods
that need them all: slerp, model_stock, consensus); per-model parameters as (E,) fp32 tensors, global
ones as floats; returns the merged full weights (*S) in fp32.
Inputs are never written; randomness comes only from `noise` (counter-based uniforms, see `_random`).

The task-vector family is generated from the catalog's `TASK_VECTOR_METHODS` table: one function per
row, its sparsifier from `SPARSIFY`, then `_mix` (weight, sign election, normalize, lambda_, base).
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import combinations

import torch
from torch import Tensor

from evomerge.merge import _fused
from evomerge.merge._apply import check_finite, copy_checked
from evomerge.merge._deltas import TaskVectors
from evomerge.merge._random import Noise
from evomerge.merge.catalog import TASK_VECTOR_METHODS, TaskVectorMethod, attach
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
    deltas: TaskVectors,
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
    n_models = deltas.n_models
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
    n_models, n = deltas.n_models, deltas.numel
    base_flat = base.reshape(-1)
    out = torch.empty(base_flat.shape, dtype=torch.float32, device=deltas.device)
    step = _step(n_models, deltas.device)
    work = torch.empty((n_models + 2, min(step, n)), dtype=torch.float32, device=deltas.device)
    formed = None if deltas.deltas is not None else torch.empty((n_models, min(step, n)), dtype=torch.float32, device=deltas.device)
    one = torch.ones((), device=deltas.device)
    for start in range(0, n, step):
        rows = deltas.rows(start, min(n, start + step), formed)  # (E, c) fp32
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


# --- task-vector family (mergekit generalized_task_arithmetic), one function per catalog row ----------

SPARSIFY: dict[str, Callable[..., list[Keep | None] | None]] = {
    # (deltas, stats, noise, sparsifier params) -> one Keep per model (None: keep everything)
    "none": lambda deltas, stats, noise: None,
    "top_magnitude": lambda deltas, stats, noise, density: top_magnitude_keep(deltas, density, stats),
    "random": lambda deltas, stats, noise, density: random_keep(density, noise, stats),
    "middle_magnitude": lambda deltas, stats, noise, density, gamma: middle_magnitude_keep(deltas, density, gamma, stats),
    "rank_sampled": lambda deltas, stats, noise, density, epsilon: rank_sampled_keep(density, epsilon, noise, stats),
}


def _task_vector_method(name: str, row: TaskVectorMethod) -> Callable[..., Tensor]:
    """The tensor function of one `TASK_VECTOR_METHODS` row, named `name`."""

    def method(base: Tensor, deltas: TaskVectors, *, weight: Tensor, lambda_: float, noise: Noise | None = None,
               stats: DeltaStats | None = None, out: Tensor | None = None, **sparsifier: Tensor) -> Tensor:
        stats = stats or DeltaStats(deltas)
        keeps = SPARSIFY[row.sparsifier](deltas, stats, noise or Noise(), **sparsifier)
        scale = rescale_l1(keeps, stats) if row.rescale and keeps is not None else None
        return _mix(base, deltas, weight, elect_sign=row.elect_sign, normalize=row.normalize, lambda_=lambda_,
                    keeps=keeps, scale=scale, out=out)

    method.__name__ = method.__qualname__ = name
    method.__doc__ = row.paper
    return method


for _name, _row in TASK_VECTOR_METHODS.items():
    attach(_task_vector_method(_name, _row))


# --- interpolation and geometric methods ----------------------------------------------------------


@attach
def linear(base: Tensor, deltas: TaskVectors, *, weight: Tensor, noise: Noise | None = None, out: Tensor | None = None) -> Tensor:
    """Weighted average of the source models (model soups, Wortsman et al. 2022), normalized as in
    mergekit: sum_i w_i x_i / sum_i w_i = base + sum_i w_i d_i / sum_i w_i. The base gets no weight."""
    return _mix(base, deltas, weight, elect_sign=False, normalize=True, lambda_=1.0, out=out)


@attach
def slerp(base: Tensor, deltas: TaskVectors, *, t: float, noise: Noise | None = None) -> Tensor:
    """Spherical interpolation from the base (t=0) to the one source (t=1), over the whole tensor
    flattened (mergekit): v0, v1 raw weights, angle from their normalized dot product; lerp when
    |cos| > 0.9995."""
    v0 = base.float().reshape(-1)
    d = deltas.row(0)
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


@attach
def model_stock(base: Tensor, deltas: TaskVectors, *, noise: Noise | None = None) -> Tensor:
    """Model Stock (Jang et al. 2024), per whole tensor as in mergekit (filter_wise false):
    cos = mean pairwise cosine of the deltas, t = N cos / (1 + (N - 1) cos), merged = base + t * mean(d);
    keeps the base where 1 + (N - 1) cos is about 0."""
    flat = deltas.materialize().reshape(len(deltas), -1)  # (N, P)
    n, cos = len(flat), _mean_pairwise_cosine(flat)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < STOCK_SINGULAR
    t = torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, denominator))
    return base.float() + t * flat.mean(0).view(base.shape)


# --- consensus (TALL masks) -------------------------------------------------------------------------


@attach
def consensus(
    base: Tensor,
    deltas: TaskVectors,
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
    tau = deltas.materialize()
    tau = tau * per_model(weight, tau)  # (E, *S)
    tau_mtl = tau.sum(0)
    masks = tau.abs() >= per_model(tall_lambda, tau) * (tau_mtl - tau).abs()
    keep = masks.sum(0) >= k
    return base.float() + lambda_ * (tau_mtl * keep)
