"""Sparsifiers for task vectors, as pure functions (mergekit ``sparsify.py`` semantics), and the
parameter-free facts about a tensor's task vectors that they need (`DeltaStats`).

Every sparsifier takes deltas (E, *S), one task vector per source model, with per-model values as (E,)
tensors, and returns a keep-mask (E, N) over the flattened entries (None: keep everything); inputs are
never written. Masks are per model over the whole tensor, except DELLA's rank sampling, which ranks
within rows as mergekit does. Applying the masks, rescaling and mixing happen in `_methods._mix`.

Magnitude ranks. TIES keeps the entries of magnitude rank N-k .. N-1 and Breadcrumbs a middle window,
where rank = position in the ascending order of |delta| with equal magnitudes ordered by flat index
(mergekit sorts with an unstable argsort, so which of several equal magnitudes it keeps at the edge of
the window is arbitrary; ours is fixed). A window is found from the magnitudes at its two edge ranks,
so a mask costs a selection (kthvalue) per model, or, once `DeltaStats(keep_sorted=True)` has sorted
each task vector, a binary search: a worker that builds many candidates from the same task vectors
keeps one DeltaStats per tensor. Both ways give the same edges, so the same masks, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class Edge:
    """The magnitude at one rank of one task vector: its value, and how many entries are below / equal."""

    value: float
    below: int
    equal: int


class DeltaStats:
    """Facts about one tensor's task vectors (E, *S) that no merge parameter changes, computed on first use.

    With keep_sorted=False (the default, one merge) magnitude edges come from a selection per call. With
    keep_sorted=True each model's sorted |delta| is kept (4 bytes per entry per model, as much again as
    the task vectors) and an edge is a binary search; the L1 norms and DELLA's row ranks are kept too.
    """

    def __init__(self, deltas: Tensor, *, keep_sorted: bool = False) -> None:
        self.deltas = deltas
        self.keep_sorted = keep_sorted
        self._sorted: list[Tensor | None] = [None] * len(deltas)
        self._l1: Tensor | None = None
        self._row_ranks: list[Tensor | None] = [None] * len(deltas)

    def flat(self, e: int) -> Tensor:
        return self.deltas[e].reshape(-1)

    def edge(self, e: int, rank: int, magnitudes: Tensor | None = None) -> Edge:
        """The magnitude of ascending rank `rank` in model e's task vector (magnitudes: its |delta|, flat)."""
        if self.keep_sorted:
            s = self._sorted[e]
            if s is None:
                s = self._sorted[e] = self.flat(e).float().abs().sort().values
            value = s[rank]
            below = int(torch.searchsorted(s, value, right=False))
            return Edge(float(value), below, int(torch.searchsorted(s, value, right=True)) - below)
        if magnitudes is None:
            magnitudes = self.flat(e).float().abs()
        value = magnitudes.kthvalue(rank + 1).values
        return Edge(float(value), int((magnitudes < value).sum()), int((magnitudes == value).sum()))

    def l1(self) -> Tensor:
        """(E,) L1 norm of each model's task vector (mergekit rescale's `before`)."""
        if self._l1 is None:
            self._l1 = torch.stack([self.flat(e).float().abs().sum() for e in range(len(self.deltas))])
        return self._l1

    def row_ranks(self, e: int) -> Tensor:
        """Model e's DELLA rank in [0, 1] of each entry's magnitude within its row (ranking layout)."""
        ranks = self._row_ranks[e]
        if ranks is None:
            ranks = _normalized_row_ranks(_ranking_view(self.deltas[e : e + 1].float()))
            if self.keep_sorted:
                self._row_ranks[e] = ranks
        return ranks


def rank_window(magnitudes: Tensor, low: int, high: int, lo: Edge, hi: Edge) -> Tensor:
    """Bool mask (N,) of the entries whose magnitude rank lies in [low, high).

    lo is the edge at rank low, hi the edge at rank high - 1. Entries equal to an edge value hold the
    consecutive ranks below .. below + equal - 1 in index order, so only those straddling the window
    need their indices; everything else is a comparison.
    """
    n = magnitudes.numel()
    if low >= high:
        return torch.zeros(n, dtype=torch.bool, device=magnitudes.device)
    mask = magnitudes >= lo.value
    if high < n:
        mask &= magnitudes <= hi.value
    for edge in (lo,) if lo.value == hi.value else (lo, hi):
        drop_head = max(0, low - edge.below)  # equal entries ranked below the window
        keep = min(edge.equal, high - edge.below)  # equal entries ranked below its end
        if drop_head > 0 or keep < edge.equal:
            where = (magnitudes == edge.value).nonzero().squeeze(1)  # ascending index = ascending rank
            mask[where[:drop_head]] = False
            mask[where[keep:]] = False
    return mask


def top_magnitude_mask(deltas: Tensor, density: Tensor, stats: DeltaStats) -> Tensor | None:
    """TIES trim (mergekit ``magnitude``): per model keep the max(1, int(density * n)) largest |delta|."""
    densities = density.tolist()
    if all(d >= 1 for d in densities):
        return None
    flat = deltas.reshape(len(deltas), -1)  # (E, N)
    n = flat.shape[1]
    mask = torch.ones(flat.shape, dtype=torch.bool, device=deltas.device)
    for e, d in enumerate(densities):
        if d >= 1:
            continue
        k = 0 if d <= 0 else max(1, count_of(d, n))
        magnitudes = flat[e].float().abs()
        if k == 0:
            mask[e] = False
            continue
        lo = stats.edge(e, n - k, magnitudes)
        mask[e] = rank_window(magnitudes, n - k, n, lo, lo)
    return mask


def middle_magnitude_mask(deltas: Tensor, density: Tensor, gamma: Tensor, stats: DeltaStats) -> Tensor | None:
    """Model Breadcrumbs (mergekit ``magnitude_outliers``): per model drop the int(gamma * n) largest
    |delta|, then enough of the smallest to keep int(density * n); fewer large ones are dropped when
    density + gamma > 1. density >= 1 keeps everything, whatever gamma is."""
    pairs = list(zip(density.tolist(), gamma.tolist()))
    if all(d >= 1 for d, _ in pairs):
        return None
    flat = deltas.reshape(len(deltas), -1)  # (E, N)
    n = flat.shape[1]
    mask = torch.ones(flat.shape, dtype=torch.bool, device=deltas.device)
    for e, (d, g) in enumerate(pairs):
        if d >= 1:
            continue
        n_keep, n_top = count_of(d, n), count_of(g, n)
        low = max(0, n - n_keep - n_top)
        high = min(n, low + n_keep)
        if high <= low:
            mask[e] = False
            continue
        magnitudes = flat[e].float().abs()
        lo = stats.edge(e, low, magnitudes)
        hi = lo if high - 1 == low else stats.edge(e, high - 1, magnitudes)
        mask[e] = rank_window(magnitudes, low, high, lo, hi)
    return mask


def uniform(like: Tensor, generator: torch.Generator | None) -> Tensor:
    """U[0, 1) noise shaped like `like`, drawn on the generator's device, returned on like's device."""
    device = generator.device if generator is not None else like.device
    return torch.rand(like.shape, generator=generator, device=device, dtype=torch.float32).to(like.device)


def random_mask(deltas: Tensor, density: Tensor, generator: torch.Generator | None) -> Tensor:
    """DARE drop (mergekit ``random``): keep each entry with probability density. The noise is drawn
    one model at a time, which is the same stream as one (E, *S) draw."""
    flat = deltas.reshape(len(deltas), -1)
    mask = torch.empty(flat.shape, dtype=torch.bool, device=deltas.device)
    for e, d in enumerate(density.tolist()):
        mask[e] = uniform(flat[e], generator) < d
    return mask


def rank_sampled_mask(deltas: Tensor, density: Tensor, epsilon: Tensor, generator: torch.Generator | None, stats: DeltaStats) -> Tensor:
    """DELLA MagPrune (mergekit ``della_magprune``): within each row, the entry of magnitude rank r
    (0 = smallest) of n is kept with probability density - epsilon + 2 * epsilon * r / (n - 1).

    Rows are the ranking axis mergekit uses: a 1-D tensor is one row; otherwise dim 1 of the weight
    (the input features of a Linear weight), with the other dims as batch. density >= 1 keeps all
    (its noise is still drawn, so the other models' draws do not depend on it).
    """
    mask = torch.empty((len(deltas), deltas[0].numel()), dtype=torch.bool, device=deltas.device)
    for e, (d, eps) in enumerate(zip(density.tolist(), epsilon.tolist())):
        noise = uniform(_ranking_view(deltas[e : e + 1]), generator)  # (1, ..., n)
        keep = noise < 1 if d >= 1 else noise < (d - eps) + stats.row_ranks(e) * (2 * eps)
        mask[e] = _undo_ranking_view(keep, deltas[e : e + 1]).reshape(-1)
    return mask


def _normalized_row_ranks(rows: Tensor) -> Tensor:
    """rank / (n - 1) of each |entry| within its last-dim row (0.5 when a row has one entry)."""
    n = rows.shape[-1]
    if n == 1:
        return torch.full(rows.shape, 0.5, device=rows.device)
    order = rows.abs().argsort(dim=-1, stable=True)
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(n, device=rows.device).expand_as(order))
    return ranks.float() / (n - 1)


def rescale_l1(deltas: Tensor, mask: Tensor, stats: DeltaStats) -> Tensor:
    """(E,) factor that brings each model's kept entries back to the L1 norm of its whole task vector
    (mergekit ``rescale: true`` = RescaleNorm.l1; about 1/density in expectation, as in DARE); 1 where
    either norm is below NORM_EPS."""
    flat = deltas.reshape(len(deltas), -1)
    before = stats.l1()  # (E,)
    after = torch.stack([(flat[e].float() * mask[e]).abs().sum() for e in range(len(flat))])
    usable = (before >= NORM_EPS) & (after >= NORM_EPS)
    return torch.where(usable, before / after.clamp_min(NORM_EPS), torch.ones_like(before))


def _ranking_view(deltas: Tensor) -> Tensor:
    if deltas.dim() == 1:  # scalar weights: one row of one entry
        return deltas.unsqueeze(-1)
    return deltas if deltas.dim() <= 3 else deltas.movedim(2, -1)


def _undo_ranking_view(mask: Tensor, deltas: Tensor) -> Tensor:
    if deltas.dim() == 1:
        return mask.squeeze(-1)
    return mask if deltas.dim() <= 3 else mask.movedim(-1, 2)
