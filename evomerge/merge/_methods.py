"""The merge methods' tensor functions, each bound to its catalog entry (`catalog.attach`), with
mergekit semantics for shared names.

Every method: base (*S) any float dtype; deltas, the E task vectors (source - base) as `TaskVectors`
(formed from the sources in fp32 where used, never materialised whole, except by the methods that need
them all at once: consensus and the spectral ones; slerp forms its one row, model_stock streams);
per-model parameters as (E,) fp32 tensors, global ones as floats; returns the merged full weights (*S) in fp32.
Inputs are never written; randomness comes only from `noise` (counter-based uniforms, see `_random`).

The task-vector family is generated from the catalog's `TASK_VECTOR_METHODS` table: one function per
row, its sparsifier from `SPARSIFY`, then `_mix` (weight, sign election, normalize, lambda_, base); the
row's normalize / rescale are the defaults of switches a recipe may set.

mergekit 0.1.5's newer methods (nuslerp, multislerp, karcher, sce, arcee_fusion, nearswap, ram,
ramplus_tl, passthrough) are kernels on full weights in mergekit's order of operations, computing in
their inputs' dtype (`FULL_WEIGHT_KERNELS`): the catalog runs them on fp32 inputs, `_mergekit` on inputs
cast to a mergekit config's dtype. Where every source equals the base, multislerp and karcher return
the base itself (mergekit divides 0 by 0, resp. rounds the mean of equal directions).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from itertools import combinations

import numpy as np
import torch
from torch import Tensor

from evomerge.merge import _consensus, _fused, _stock
from evomerge.merge._apply import check_finite, copy_checked
from evomerge.merge._numba import slerp_sums, slerp_write, torch_threads
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

    def method(base: Tensor, deltas: TaskVectors, *, weight: Tensor, lambda_: float, normalize: bool = row.normalize,
               rescale: bool = row.rescale, int8_mask: bool = False, noise: Noise | None = None,
               stats: DeltaStats | None = None, out: Tensor | None = None, **sparsifier: Tensor) -> Tensor:
        stats = stats or DeltaStats(deltas)
        keeps = SPARSIFY[row.sparsifier](deltas, stats, noise or Noise(), **sparsifier)
        scale = rescale_l1(keeps, stats) if rescale and keeps is not None else None
        return _mix(base, deltas, weight, elect_sign=row.elect_sign, normalize=normalize, lambda_=lambda_,
                    keeps=keeps, scale=scale, out=out)

    method.__name__ = method.__qualname__ = name
    method.__doc__ = row.paper
    return method


for _name, _row in TASK_VECTOR_METHODS.items():
    attach(_task_vector_method(_name, _row))


# --- interpolation and geometric methods ----------------------------------------------------------


@attach
def linear(base: Tensor, deltas: TaskVectors, *, weight: Tensor, normalize: bool = True, noise: Noise | None = None,
           out: Tensor | None = None) -> Tensor:
    """Weighted average of the source models (model soups, Wortsman et al. 2022), normalized as in
    mergekit: sum_i w_i x_i / sum_i w_i = base + sum_i w_i d_i / sum_i w_i. The base gets no weight.
    With normalize false (mergekit's switch), the plain weighted sum sum_i w_i x_i = base + sum_i w_i d_i
    + (sum_i w_i - 1) base."""
    if normalize:
        return _mix(base, deltas, weight, elect_sign=False, normalize=True, lambda_=1.0, out=out)
    summed = _mix(base, deltas, weight, elect_sign=False, normalize=False, lambda_=1.0)
    merged = check_finite(summed.add_(base.float(), alpha=float(weight.sum()) - 1.0))
    return merged if out is None else copy_checked(out, merged)


@attach
def slerp(base: Tensor, deltas: TaskVectors, *, t: float, noise: Noise | None = None) -> Tensor:
    """Spherical interpolation from the base (t=0) to the one source (t=1), over the whole tensor
    flattened (mergekit): v0, v1 raw weights, angle from their normalized dot product; lerp when
    |cos| > 0.9995. Two passes (|v0|^2, |v1|^2 and v0.v1 summed in fp64, then the output; compiled on
    the CPU, chunked torch elsewhere), so no full-tensor temporary is made beyond the fp32 output."""
    squares0, squares1, product = _slerp_sums(base, deltas)
    n0, n1 = (norm if norm > SLERP_NORM_EPS else 1.0 for norm in (math.sqrt(squares0), math.sqrt(squares1)))
    dot = min(1.0, max(-1.0, product / (n0 * n1)))
    lerp, c0, c1 = abs(dot) > SLERP_DOT_THRESHOLD, 0.0, 0.0
    if not lerp:
        theta = torch.tensor(dot, dtype=torch.float64).acos()
        c0, c1 = (float(torch.sin(s * theta) / torch.sin(theta)) for s in (1 - t, t))
    base_flat, out = base.reshape(-1), torch.empty(deltas.numel, dtype=torch.float32, device=deltas.device)
    if deltas.compiled:  # the CPU: the same fp32 formula, entry by entry, in one compiled pass
        (flat,), sub = deltas.arrays()
        with torch_threads():
            slerp_write(flat, sub, _fused.as_array(base_flat), lerp, t, c0, c1, out.numpy())
        return out.view(base.shape)
    n, step = deltas.numel, _step(1, deltas.device)
    buffer = torch.empty((1, min(step, n)), dtype=torch.float32, device=deltas.device)
    for start in range(0, n, step):  # entry by entry: the fp32 arithmetic of the whole-tensor formula
        stop = min(n, start + step)
        v0, d = base_flat[start:stop].float(), deltas.rows(start, stop, buffer)[0].float()
        if lerp:
            torch.add(v0, t * d, out=out[start:stop])  # = (1 - t) v0 + t v1
        else:
            torch.add(c0 * v0, c1 * (v0 + d), out=out[start:stop])
    return out.view(base.shape)


SUM_BLOCK = 1 << 16  # entries per fp64 partial sum: the order of a sum does not depend on threads


def _slerp_sums(base: Tensor, deltas: TaskVectors) -> tuple[float, float, float]:
    """(|v0|^2, |v1|^2, v0.v1) in fp64, v0 = base and v1 = v0 + d in fp32, summed per block of
    SUM_BLOCK entries and then over blocks in a fixed order (a compiled pass on the CPU)."""
    if deltas.compiled:
        (flat,), sub = deltas.arrays()
        with torch_threads():
            blocks = slerp_sums(flat, sub, _fused.as_array(base.reshape(-1)), SUM_BLOCK)
    else:
        n, base_flat = deltas.numel, base.reshape(-1)
        buffer = torch.empty((1, min(SUM_BLOCK, n)), dtype=torch.float32, device=deltas.device)
        parts = []
        for start in range(0, n, SUM_BLOCK):
            v0 = base_flat[start : start + SUM_BLOCK].float()
            v1 = (v0 + deltas.rows(start, min(n, start + SUM_BLOCK), buffer)[0]).double()
            v0 = v0.double()
            parts.append(torch.stack([(v0 * v0).sum(), (v1 * v1).sum(), (v0 * v1).sum()]))
        blocks = torch.stack(parts).cpu().numpy() if parts else np.zeros((0, 3))
    return tuple(float(x) for x in blocks.sum(axis=0))


def _mean_pairwise_cosine(sums: Tensor, n_models: int) -> Tensor:
    """Mean cosine over all pairs of models per row, each clamped to [-1, 1] (mergekit), from the rows'
    sums (R, K) fp64 (`_stock.pair_sums`: E squared norms, then the pairs' dot products in order)."""
    norms = sums[:, :n_models].sqrt()  # (R, E)
    total = torch.zeros(len(sums), dtype=torch.float64)
    for p, (i, j) in enumerate(combinations(range(n_models), 2)):
        product = (norms[:, i] * norms[:, j]).clamp_min(STOCK_NORM_EPS)
        total += (sums[:, n_models + p] / product).clamp(-1, 1)
    return total / (n_models * (n_models - 1) // 2)


@attach
def model_stock(base: Tensor, deltas: TaskVectors, *, filter_wise: bool = False, noise: Noise | None = None) -> Tensor:
    """Model Stock (Jang et al. 2024) as in mergekit: cos = mean pairwise cosine of the deltas,
    t = N cos / (1 + (N - 1) cos), merged = base + t * mean(d); keeps the base where 1 + (N - 1) cos is
    about 0. Over the whole tensor, or with filter_wise (mergekit's switch) per row (per output filter).

    Two streamed passes (`_stock`): the rows' norms and dot products, then the merged tensor; sums and
    the merged value in fp64, rounded once to fp32. Working memory besides the (*S) fp32 output (4 bytes
    per entry, the result): K = E(E+1)/2 fp64 sums twice per row and once per 65536-entry block (0.0007
    bytes per entry for 3 models), an (E, 1024) fp64 tile per thread, and, where the kernels cannot read
    the inputs in place (fp16, mixed source dtypes), one (E, 65536) fp32 buffer: no (E, *S) copy."""
    n = deltas.n_models
    if deltas.numel == 0:
        return base.float().clone()
    shape = deltas.item_shape
    row_len = shape[-1] if filter_wise and len(shape) >= 2 else deltas.numel  # mergekit: norms over the last dim
    cos = _mean_pairwise_cosine(_stock.pair_sums(deltas, row_len), n)  # (R,)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < STOCK_SINGULAR
    t = torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, denominator))  # (R,) fp64
    return _stock.write(base, deltas, t, row_len)


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
    if deltas.compiled:  # the CPU: the same formula entry by entry in one compiled pass
        return _consensus.merge(base, deltas, weight, tall_lambda, k, lambda_)
    n_models, n, step = deltas.n_models, deltas.numel, _step(deltas.n_models, deltas.device)
    w = weight.to(device=deltas.device, dtype=torch.float32).view(n_models, 1)
    tall = tall_lambda.to(w).view(n_models, 1)
    base_flat, out = base.reshape(-1), torch.empty(n, dtype=torch.float32, device=deltas.device)
    buffer = torch.empty((n_models, min(step, n)), dtype=torch.float32, device=deltas.device)
    for start in range(0, n, step):  # entry by entry, so chunks of any size give the same bits
        stop = min(n, start + step)
        tau = deltas.rows(start, stop, buffer) * w  # (E, chunk)
        tau_mtl = functools.reduce(torch.add, tau)  # models summed left to right
        keep = (tau.abs() >= tall * (tau_mtl - tau).abs()).sum(0) >= k
        torch.add(base_flat[start:stop].float(), (tau_mtl * keep).mul_(lambda_), out=out[start:stop])
    return out.view(base.shape)


# --- spectral methods: an SVD per 2-D tensor ------------------------------------------------------------
# They materialise the E weighted task vectors of the tensor being merged (4E bytes per entry of it, in
# flight, as consensus does) and run fp32 SVDs on them; other tensors (norms, biases) take the mean of
# the weighted task vectors, as the papers' code does. SVDs are deterministic on one machine and thread
# count; a CPU and a GPU build agree to fp32 rounding, not bit for bit. Sign flips of singular vectors do
# not change the results (each flip cancels in U diag(s) V^T and in the polar factors).


def _weighted(deltas: TaskVectors, weight: Tensor) -> Tensor:
    """(E, *S) fp32: w_i * d_i."""
    tau = deltas.materialize()
    return tau * per_model(weight, tau)


def _polar(m: Tensor) -> Tensor:
    """The orthogonal factor of m (m = P S Q^T gives P Q^T): the nearest matrix with orthonormal columns (rows)."""
    p, _, qh = torch.linalg.svd(m, full_matrices=False)
    return p @ qh


def _top(m: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """m's top k singular triplets: (u (rows, k), s (k,), vh (k, cols))."""
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return u[:, :k], s[:k], vh[:k]


@attach
def tsv_merge(base: Tensor, deltas: TaskVectors, *, weight: Tensor, lambda_: float, noise: Noise | None = None) -> Tensor:
    """TSV-Merge (Gargiulo et al. 2025, "Task Singular Vectors: Reducing Task Interference in Model
    Merging", arXiv 2412.00081, TSV-M): per 2-D tensor of shape (m, n), r = min(m, n),

        (U_i, s_i, V_i) = top max(1, r // E) singular triplets of w_i d_i     each task's low-rank part
        U = [U_1 .. U_E], s = [s_1 .. s_E], V = [V_1 .. V_E]                    side by side
        merged = base + lambda_ * polar(U) diag(s) polar(V)^T                  decorrelated (polar factors)

    other tensors: base + lambda_ * mean_i(w_i d_i). The paper keeps r // E (0 when r < E); max(1, .)
    keeps each task's top direction in matrices narrower than the model count.
    """
    tau = _weighted(deltas, weight)
    if tau.dim() != 3:
        return base.float() + lambda_ * tau.mean(0)
    k = max(1, min(tau.shape[1:]) // tau.shape[0])
    parts = [_top(t, k) for t in tau]
    u, s, vh = torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts], 0)
    return base.float() + lambda_ * ((_polar(u) * s) @ _polar(vh))


@attach
def iso_c(base: Tensor, deltas: TaskVectors, *, weight: Tensor, lambda_: float, noise: Noise | None = None) -> Tensor:
    """Iso-C (Marczak et al. 2025, "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific
    Subspaces", arXiv 2502.04959): the task-arithmetic sum's spectrum made flat. Per 2-D tensor:

        U diag(s) V^T = sum_i w_i d_i;    merged = base + lambda_ * mean(s) U V^T

    other tensors: base + lambda_ * mean_i(w_i d_i), as the paper's code does.
    """
    tau = _weighted(deltas, weight)
    if tau.dim() != 3:
        return base.float() + lambda_ * tau.mean(0)
    u, s, vh = torch.linalg.svd(tau.sum(0), full_matrices=False)
    return base.float() + lambda_ * (s.mean() * (u @ vh))


@attach
def iso_cts(base: Tensor, deltas: TaskVectors, *, weight: Tensor, common_space_fraction: float, lambda_: float,
            noise: Noise | None = None) -> Tensor:
    """Iso-CTS (Marczak et al. 2025, arXiv 2502.04959): Iso-C on the common subspace (the sum's top
    directions) plus each task's own top directions outside it. Per 2-D tensor, r = min(m, n):

        t     = min(r, round(r (1 - f) / E) E),  c = r - t,  k = t // E      common size c, k per task
        (U_c, s_c, V_c) = top c of sum_i w_i d_i
        (U_i, s_i, V_i) = top k of (I - U_c U_c^T) w_i d_i                     what the common part misses
        U = [U_1 .. U_E, U_c], s = [s_1 .. s_E, s_c], V likewise
        merged = base + lambda_ * mean(s) polar(U) polar(V)^T

    f = common_space_fraction (the paper uses 0.8); other tensors: base + lambda_ * mean_i(w_i d_i).
    """
    tau = _weighted(deltas, weight)
    if tau.dim() != 3:
        return base.float() + lambda_ * tau.mean(0)
    n_models, r = tau.shape[0], min(tau.shape[1:])
    specific = min(r, round((r - int(r * common_space_fraction)) / n_models) * n_models)
    u_c, s_c, vh_c = _top(tau.sum(0), r - specific)
    parts = [_top(t - u_c @ (u_c.T @ t), specific // n_models) for t in tau] + [(u_c, s_c, vh_c)]
    u, s, vh = torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts], 0)
    return base.float() + lambda_ * (s.mean() * (_polar(u) @ _polar(vh)))


# --- methods on full weights (mergekit 0.1.5's newer methods) -----------------------------------------
# Each is a kernel on full weights that computes in its inputs' dtype, in mergekit's order of operations;
# the catalog function runs it on fp32 inputs (evomerge's arithmetic), `_mergekit` on inputs cast to a
# config's dtype (mergekit's). The base is the first input where a method takes one.


def _full(deltas: TaskVectors, e: int) -> Tensor:
    """Source e's full weights in fp32 (from the source, or base + delta for materialised task vectors)."""
    if deltas.sources is not None:
        return deltas.sources[e].to(torch.float32)
    return deltas.base.to(torch.float32) + deltas.deltas[e].to(torch.float32)


def _on_fp32(kernel: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """The catalog function of a full-weight kernel: fp32 base and sources, the result in fp32."""

    def method(base: Tensor, deltas: TaskVectors, *, noise: Noise | None = None, **params) -> Tensor:
        sources = [_full(deltas, e) for e in range(deltas.n_models)]
        return kernel(base.to(torch.float32), sources, **_plain(params)).to(torch.float32)

    method.__name__ = method.__qualname__ = kernel.__name__.removesuffix("_kernel")
    method.__doc__ = kernel.__doc__
    return method


def _plain(params: dict) -> dict:
    """Per-model values as Python floats (mergekit's kernels take lists)."""
    return {k: v.tolist() if isinstance(v, Tensor) else v for k, v in params.items()}


def _nuslerp_pair(t: float, v0: Tensor, v1: Tensor, row_wise: bool, flatten: bool, eps: float = 1e-8) -> Tensor:
    """mergekit `nuslerp`: slerp along the last dim (rows), dim 0 (row_wise) or the flattened tensor."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


def nuslerp_kernel(base: Tensor, sources: list[Tensor], *, weight: list[float], nuslerp_row_wise: bool = False,
                   nuslerp_flatten: bool = True, use_base: bool = True) -> Tensor:
    """NuSLERP (mergekit): slerp between two models' task vectors (use_base) or weights, at
    t = w_1 / (w_0 + w_1) (0.5 when the weights sum to about 0), over the flattened tensor or by rows."""
    total = sum(weight)
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    if use_base:
        return base + _nuslerp_pair(t, sources[0] - base, sources[1] - base, nuslerp_row_wise, nuslerp_flatten)
    return _nuslerp_pair(t, sources[0], sources[1], nuslerp_row_wise, nuslerp_flatten)


def multislerp_kernel(base: Tensor, sources: list[Tensor], *, weight: list[float], normalize_weights: bool = True,
                      eps: float = 1e-8, use_base: bool = True) -> Tensor:
    """Multi-SLERP (Goddard; mergekit): barycentric interpolation on the hypersphere of the task vectors
    (use_base) or the weights, through the tangent space at their weighted mean; norms averaged."""
    if len(sources) == 1:
        return sources[0]
    if use_base and all(torch.equal(x, base) for x in sources):
        return base.clone()  # no task vector to interpolate (mergekit would divide 0 by 0)
    tensors = torch.stack(sources, dim=0)
    if use_base:
        tensors -= base
    flat = tensors.view(tensors.shape[0], -1)
    w = torch.tensor(weight, dtype=tensors.dtype, device=tensors.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if tensors.shape[0] != 2:
            raise FloatingPointError("multislerp: the weighted mean of the task vectors is 0 (antipodal inputs); change the weights")
        res = (tensors[0] * w[0] + tensors[1] * w[1]).view(tensors.shape[1:])
        return res + base if use_base else res
    mean = mean / mean_norm
    tangent = units - (units * mean).sum(-1, keepdim=True) * mean
    tangent_sum = (tangent * w.view(-1, 1)).sum(0)
    tangent_norm = torch.norm(tangent_sum) + eps
    result = mean * torch.cos(tangent_norm) + tangent_sum * (torch.sin(tangent_norm) / tangent_norm)
    result = (result * (norms.squeeze(-1) * w).sum()).view(tensors.shape[1:])
    return result + base if use_base else result


def karcher_kernel(base: Tensor, sources: list[Tensor], *, max_iter: float = 10, tol: float = 1e-5) -> Tensor:
    """Karcher mean (mergekit): the Riemannian mean of the unit directions of the sources, with equal
    weights, scaled by their mean norm; fixed-point iteration. The base is only the template (mergekit
    adds base_model to the inputs; an import lists it among the sources)."""
    tensors = list(sources)
    if all(torch.equal(x, base) for x in sources):
        return base.clone()  # the mean of equal inputs is that input (the iteration would round it)
    alphas = [1.0 / len(tensors)] * len(tensors)
    dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    norms = [torch.linalg.vector_norm(x.to(dtype)) for x in tensors]
    units = [torch.zeros_like(x) if n.item() == 0.0 else (x / n).to(x.dtype) for x, n in zip(tensors, norms)]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return sum(x * 0 for x in tensors)
    total = sum(alphas[i] for i in valid)
    weights, dirs = [alphas[i] / total for i in valid], [units[i] for i in valid]
    mean = torch.zeros_like(dirs[0])
    for a, u in zip(weights, dirs):
        mean += a * u
    mean_norm = torch.linalg.vector_norm(mean.to(dtype))
    mean = dirs[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(int(max_iter)):
        mean, moved = _karcher_step(mean, weights, dirs, dtype, tol)
        if not moved:
            break
    return sum(a * n for a, n in zip(alphas, norms)) * mean


def _karcher_step(mean: Tensor, weights: list[float], dirs: list[Tensor], dtype: torch.dtype, tol: float) -> tuple[Tensor, bool]:
    """One fixed-point step of the Karcher mean: the exponential map of the mean log-map; (mean, moved)."""
    tangent = torch.zeros_like(mean)
    for a, u in zip(weights, dirs):
        dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
        theta = torch.arccos(dot)
        if theta.item() < tol:
            continue
        tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)
    norm = torch.linalg.vector_norm(tangent.to(dtype))
    if norm.item() < tol:
        return mean, False
    mean = (torch.cos(norm) * mean + torch.sin(norm) * (tangent / norm)).to(mean.dtype)
    unit = torch.linalg.vector_norm(mean.to(dtype))
    return ((mean / unit).to(mean.dtype) if unit.item() > tol else mean), True


def sce_kernel(base: Tensor, sources: list[Tensor], *, select_topk: float = 1.0, int8_mask: bool = False) -> Tensor:
    """SCE (Wan et al. 2024, FuseChat; mergekit): Select the top select_topk entries by variance across
    models, Calculate per-model weights from the mean squared task vector, Erase entries whose sign
    disagrees with the elected one; merged = base + sum_i w_i m_i d_i / sum_i w_i m_i."""
    mask_dtype = torch.int8 if int8_mask else base.dtype
    tvs = torch.stack([x - base for x in sources], dim=0)
    if select_topk < 1:
        tvs = tvs * _sce_select(tvs, select_topk, mask_dtype).unsqueeze(0)
    erase = sign_mask(tvs, mask_dtype)
    weights = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
    total = torch.sum(weights).item()
    weights = torch.ones_like(weights) / weights.shape[0] if abs(total) < 1e-6 else weights / total
    while weights.dim() < tvs.dim():
        weights = weights.unsqueeze(-1)
    erased = weights * erase
    return base + (tvs * erased).sum(dim=0) / torch.sum(erased, dim=0).clamp(min=1e-6)


def sign_mask(deltas: Tensor, mask_dtype: torch.dtype) -> Tensor:
    """mergekit get_mask(method="sum"): where each model's sign agrees with the sign of the sum (+ at 0)."""
    sign = deltas.sign().to(mask_dtype)
    majority = (deltas.sum(dim=0) >= 0).to(mask_dtype) * 2 - 1
    return sign == majority


def _sce_select(tvs: Tensor, density: float, mask_dtype: torch.dtype) -> Tensor:
    """mergekit sce_mask: the top density fraction of the entries with nonzero variance across models."""
    if density <= 0:
        return torch.zeros_like(tvs[0], dtype=mask_dtype)
    var = torch.var(tvs, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * density)
    mask = torch.zeros_like(var, dtype=mask_dtype)
    if k == 0:
        return mask
    _, indices = torch.topk(var.abs().view(-1), k=k, largest=True)
    mask.view(-1)[indices] = 1
    return mask


def arcee_fusion_kernel(base: Tensor, sources: list[Tensor]) -> Tensor:
    """Arcee Fusion (mergekit): importance = |d| * KL(softmax(source) || softmax(base)) per row; take
    the source's entries whose importance reaches median + 1.5 IQR, keep the base's elsewhere.

    Quantile q is the sorted importance at index floor(q (n - 1)), found by selection. mergekit sorts
    a random sample of 10^6 entries (torch's global RNG) for tensors above 10^6 entries; evomerge uses
    every entry, so it stays a pure function (the same below 10^6 entries, more exact above)."""
    model = sources[0]
    eps = 1e-8
    p = torch.softmax(model, dim=-1) + eps
    q = torch.softmax(base, dim=-1) + eps
    importance = (model - base).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    q1, median, q3 = (_quantile(importance, f) for f in (0.25, 0.5, 0.75))
    mask = (importance >= median + 1.5 * (q3 - q1)).float()
    return base + (model - base) * mask


def _quantile(values: Tensor, fraction: float) -> Tensor:
    """sorted(values)[floor(fraction * (n - 1))], without sorting (a selection, in fp32: exact for fp16 / bf16)."""
    flat = values.reshape(-1)
    index = int(torch.tensor(fraction) * (flat.numel() - 1))  # fp32 product, as mergekit indexes
    return torch.kthvalue(flat.to(torch.float32), index + 1).values.to(values.dtype)


def nearswap_kernel(base: Tensor, sources: list[Tensor], *, t: float) -> Tensor:
    """NearSwap (mergekit): take the source where it is within t of the base, interpolating by
    w = clamp(t / |base - source|, 0, 1): merged = w * source + (1 - w) * base."""
    b = sources[0]
    weight = (t / torch.abs(base - b).clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * b + (1 - weight) * base


def _ram_vectors(base: Tensor, sources: list[Tensor], epsilon: float) -> tuple[Tensor, ...]:
    """Flat task vectors, where each is above epsilon, how many models contribute, shared / unique masks."""
    tv = torch.stack([x - base for x in sources], dim=0).view(len(sources), -1)
    nonzero = tv.abs() > epsilon
    counts = nonzero.sum(dim=0, keepdim=True)
    return tv, nonzero, counts, counts > 1, counts == 1


def ram_kernel(base: Tensor, sources: list[Tensor], *, epsilon: float = 1e-5) -> Tensor:
    """RAM, Reinforced Agent Merging (mergekit): entries only one model changes (by more than epsilon)
    are taken whole; entries several change are averaged over those models."""
    tv, nonzero, counts, shared, unique = _ram_vectors(base, sources, epsilon)
    tv = tv * nonzero
    merged = ((tv * unique) + (tv * shared / counts.clamp(min=1))).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


def ramplus_tl_kernel(base: Tensor, sources: list[Tensor], *, r: float = 0.1, alpha: float = 0.2, epsilon: float = 1e-5) -> Tensor:
    """RAM+ tensor-local (mergekit): RAM with each model's unique entries scaled by
    1 + r * clamp(shared_i / unique_i, 0, alpha)."""
    tv, nonzero, counts, shared, unique = _ram_vectors(base, sources, epsilon)
    rho = (nonzero & shared).sum(dim=1) / (nonzero & unique).sum(dim=1).clamp(min=epsilon)
    lam = 1 + r * rho.clamp(min=0, max=alpha)
    tv = tv * nonzero
    merged = ((tv * unique * lam.unsqueeze(-1)) + (tv * shared / counts.clamp(min=1))).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


def passthrough_kernel(base: Tensor, sources: list[Tensor], *, scale: list[float] | None = None) -> Tensor:
    """Passthrough (mergekit): the one source's tensor, times its scale (1: unchanged)."""
    value = 1.0 if scale is None else scale[0]
    return sources[0] if value == 1.0 else sources[0] * value


FULL_WEIGHT_KERNELS: dict[str, Callable[..., Tensor]] = {
    "nuslerp": nuslerp_kernel, "multislerp": multislerp_kernel, "karcher": karcher_kernel, "sce": sce_kernel,
    "arcee_fusion": arcee_fusion_kernel, "nearswap": nearswap_kernel, "ram": ram_kernel,
    "ramplus_tl": ramplus_tl_kernel, "passthrough": passthrough_kernel,
}


def full_weight_kernel(name: str) -> Callable[..., Tensor]:
    """The full-weight kernel of method `name` (KeyError for the task-vector family and the older methods)."""
    return FULL_WEIGHT_KERNELS[name]


for _kernel in FULL_WEIGHT_KERNELS.values():
    attach(_on_fp32(_kernel))
