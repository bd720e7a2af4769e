"""Sparsifiers and sign election for task vectors, as pure functions (mergekit ``sparsify.py`` semantics).

Every function takes deltas (E, *S), one task vector per source model, with per-model values as (E,)
tensors, and returns a new (E, *S) tensor; inputs are never written. Sparsifiers work per model on the
whole tensor, except DELLA's rank sampling, which ranks within rows as mergekit does.
"""

from __future__ import annotations

import torch
from torch import Tensor

NORM_EPS = 1e-7  # mergekit rescaled_masked_tensor: below this L1 norm, a task vector is not rescaled


def per_model(values: Tensor, like: Tensor) -> Tensor:
    """(E,) -> (E, 1, ..., 1), so one value per model broadcasts over (E, *S)."""
    return values.to(like).view(-1, *[1] * (like.dim() - 1))


def count_of(fraction: float, n: int) -> int:
    """int(fraction * n), as mergekit computes it from the decimal a user wrote.

    Per-model values reach us as fp32 (0.7 -> 0.699999988), whose product with n can floor one lower
    than Python's 0.7 * n; 7 significant digits recover the decimal for any value written that short.
    """
    return int(float(f"{fraction:.7g}") * n)


def keep_top_magnitude(deltas: Tensor, density: Tensor) -> Tensor:
    """TIES trim (mergekit ``magnitude``): per model keep the max(1, int(density * n)) largest |delta|."""
    flat = deltas.reshape(len(deltas), -1)  # (E, N)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    for e, d in enumerate(density.tolist()):
        k = flat.shape[1] if d >= 1 else 0 if d <= 0 else max(1, count_of(d, flat.shape[1]))
        mask[e, flat[e].abs().topk(k).indices] = True
    return deltas * mask.view_as(deltas)


def keep_middle_magnitude(deltas: Tensor, density: Tensor, gamma: Tensor) -> Tensor:
    """Model Breadcrumbs (mergekit ``magnitude_outliers``): per model drop the int(gamma * n) largest
    |delta|, then enough of the smallest to keep int(density * n); fewer large ones are dropped when
    density + gamma > 1. density >= 1 keeps everything, whatever gamma is."""
    flat = deltas.reshape(len(deltas), -1)  # (E, N)
    n = flat.shape[1]
    mask = torch.zeros_like(flat, dtype=torch.bool)
    for e, (d, g) in enumerate(zip(density.tolist(), gamma.tolist())):
        if d >= 1:
            mask[e] = True
            continue
        n_keep, n_top = count_of(d, n), count_of(g, n)
        n_bottom = max(0, n - n_keep - n_top)
        mask[e, flat[e].abs().argsort()[n_bottom : n_bottom + n_keep]] = True
    return deltas * mask.view_as(deltas)


def uniform(like: Tensor, generator: torch.Generator | None) -> Tensor:
    """U[0, 1) noise shaped like `like`, drawn on the generator's device, returned on like's device."""
    device = generator.device if generator is not None else like.device
    return torch.rand(like.shape, generator=generator, device=device, dtype=torch.float32).to(like.device)


def rescale_l1(deltas: Tensor, kept: Tensor) -> Tensor:
    """Scale each model's kept entries so its L1 norm matches the unpruned task vector's
    (mergekit ``rescale: true`` = RescaleNorm.l1; about 1/density in expectation, as in DARE)."""
    before = deltas.abs().reshape(len(deltas), -1).sum(1)  # (E,)
    after = kept.abs().reshape(len(kept), -1).sum(1)
    usable = (before >= NORM_EPS) & (after >= NORM_EPS)
    scale = torch.where(usable, before / after.clamp_min(NORM_EPS), torch.ones_like(before))
    return kept * per_model(scale, kept)


def random_keep(deltas: Tensor, density: Tensor, generator: torch.Generator | None, rescale: bool = True) -> Tensor:
    """DARE drop (mergekit ``random``): keep each entry with probability density, then rescale."""
    kept = deltas * (uniform(deltas, generator) < per_model(density, deltas))
    return rescale_l1(deltas, kept) if rescale else kept


def rank_sampled_keep(
    deltas: Tensor, density: Tensor, epsilon: Tensor, generator: torch.Generator | None, rescale: bool = True
) -> Tensor:
    """DELLA MagPrune (mergekit ``della_magprune``): within each row, the entry of magnitude rank r
    (0 = smallest) of n is kept with probability density - epsilon + 2 * epsilon * r / (n - 1).

    Rows are the ranking axis mergekit uses: a 1-D tensor is one row; otherwise dim 1 of the weight
    (the input features of a Linear weight), with the other dims as batch. density >= 1 keeps all.
    """
    rows = _ranking_view(deltas)  # (E, ..., n): ranking along the last dim
    n = rows.shape[-1]
    order = rows.abs().argsort(dim=-1)
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(n, device=rows.device).expand_as(order))
    rank_norm = ranks.float() / (n - 1) if n > 1 else torch.full(ranks.shape, 0.5, device=rows.device)
    d, eps = per_model(density, rows), per_model(epsilon, rows)
    probs = torch.where(d >= 1, torch.ones_like(rank_norm), d - eps + rank_norm * 2 * eps)
    keep = _undo_ranking_view(uniform(rows, generator) < probs, deltas)
    kept = deltas * keep
    return rescale_l1(deltas, kept) if rescale else kept


def _ranking_view(deltas: Tensor) -> Tensor:
    if deltas.dim() == 1:  # scalar weights: one row of one entry
        return deltas.unsqueeze(-1)
    return deltas if deltas.dim() <= 3 else deltas.movedim(2, -1)


def _undo_ranking_view(mask: Tensor, deltas: Tensor) -> Tensor:
    if deltas.dim() == 1:
        return mask.squeeze(-1)
    return mask if deltas.dim() <= 3 else mask.movedim(-1, 2)


def sign_consensus(weighted: Tensor) -> Tensor:
    """TIES sign election (mergekit consensus ``sum``): the elected sign is that of the sum of weighted
    deltas (+ on ties at 0); returns where each model agrees with it (zeros never agree). (E, *S) bool."""
    elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    return weighted.sign() == elected
