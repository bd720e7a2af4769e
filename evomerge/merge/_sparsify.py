"""Sparsifiers for task vectors, as pure functions (mergekit ``sparsify.py`` semantics), and the
parameter-free facts about a tensor's task vectors that they need (`DeltaStats`).

Every sparsifier takes deltas (E, *S), one task vector per source model, with per-model values as (E,)
tensors, and returns one `Keep` per model (None: that model keeps everything): what survives of its
flattened task vector. Inputs are never written. `_methods._mix` applies the Keeps chunk by chunk, so
no (E, *S) sparsified copy is ever made. Masks are per model over the whole tensor, except DELLA's rank
sampling, which ranks within rows as mergekit does.

Magnitude ranks. TIES keeps the entries of magnitude rank N-k .. N-1 and Breadcrumbs a middle window,
where rank = position in the ascending order of |delta| with equal magnitudes ordered by flat index.
(mergekit sorts with an unstable argsort, so which of several equal magnitudes it keeps at the edge
of the window is arbitrary; ours is fixed. Equal magnitudes are common in task vectors of bf16 models.)
A window is two magnitude thresholds, found from the magnitudes at its edge ranks, plus, where the
edge magnitude is shared by entries both inside and outside the window, which of those (counted in
index order) it takes. Finding an edge costs a radix select (two histogram passes) per model,
or, once `DeltaStats(keep_sorted=True)` has sorted each task vector, a binary search: a worker that
builds many candidates from the same task vectors keeps one DeltaStats per tensor. Both ways find the
same edges, so the merges are bit-identical.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
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

    With keep_sorted=False (the default, one merge) magnitude edges come from a radix select per call.
    With keep_sorted=True each model's |delta| is sorted once, stably, and the sorted values and their
    flat indices are kept (8 bytes per entry per model, twice the task vectors): an edge is then a
    binary search and a cut point an index lookup. The L1 norms and DELLA's row ranks are kept too.
    """

    def __init__(self, deltas: Tensor, *, keep_sorted: bool = False) -> None:
        self.deltas = deltas
        self.keep_sorted = keep_sorted
        self._sorted: list[tuple[Tensor, Tensor] | None] = [None] * len(deltas)
        self._l1: Tensor | None = None
        self._row_ranks: list[Tensor | None] = [None] * len(deltas)

    def flat(self, e: int) -> Tensor:
        return self.deltas[e].reshape(-1)

    def magnitudes(self, e: int) -> Tensor | None:
        """Model e's |delta|, flat, for the calls below; None when the sorted copy answers them."""
        return None if self.keep_sorted else self.flat(e).float().abs()

    def edge(self, e: int, rank: int, magnitudes: Tensor | None = None) -> Edge:
        """The magnitude of ascending rank `rank` in model e's task vector (magnitudes: its |delta|, flat)."""
        if not self.keep_sorted:
            return select_edge(self.flat(e).float().abs() if magnitudes is None else magnitudes, rank)
        values, _ = self._sorted_of(e)
        value = values[rank]
        below = int(torch.searchsorted(values, value, right=False))
        return Edge(float(value), below, int(torch.searchsorted(values, value, right=True)) - below)

    def positions(self, e: int, edge: Edge, ordinals: Sequence[int], magnitudes: Tensor | None = None) -> list[int]:
        """Flat indices of the entries of rank edge.below + ordinal: the ordinal-th entries (in index
        order) whose magnitude is edge.value."""
        if self.keep_sorted:
            order = self._sorted_of(e)[1]
            return [int(order[edge.below + i]) for i in ordinals]
        magnitudes = self.flat(e).float().abs() if magnitudes is None else magnitudes
        where = (magnitudes == edge.value).nonzero().squeeze(1)
        return [int(where[i]) for i in ordinals]

    def _sorted_of(self, e: int) -> tuple[Tensor, Tensor]:
        if self._sorted[e] is None:  # non-negative floats sort like their int32 bit patterns, which sort faster
            bits, order = self.flat(e).float().abs().view(torch.int32).sort(stable=True)
            self._sorted[e] = bits.view(torch.float32), order.to(torch.int32)
        return self._sorted[e]

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


class Keep(Protocol):
    """What one model keeps of its flattened task vector, applied to consecutive chunks of it."""

    def apply(self, row: Tensor, start: int) -> Tensor:
        """row: fp32 chunk of the flat task vector starting at entry `start`; kept entries, others 0."""
        ...


@dataclass(frozen=True)
class MaskKeep:
    """Keep where a bool mask (N,) is set (random sparsifiers)."""

    mask: Tensor

    def apply(self, row: Tensor, start: int) -> Tensor:
        return row * self.mask[start : start + len(row)]


@dataclass(frozen=True)
class Cut:
    """Of the entries whose |d| equals `value`, those with flat index in [start, stop) are kept.

    side: "lower" (the window's lower edge: inside the range the lower threshold may include the
    value), "upper" (its upper edge, likewise) or "only" (a window within one magnitude)."""

    value: float
    start: int
    stop: int
    side: str


class MagnitudeKeep:
    """Keep the entries with above < |d| <= up_to, plus the edge-valued entries each Cut takes.

    The thresholds make a chunk one or two hardshrinks (bool masks cost several times more per entry
    on the CPU); a chunk inside a Cut's index range just moves the threshold to include its value, and
    only a chunk that straddles the range's ends looks at single entries.
    """

    def __init__(self, above: float, up_to: float | None, cuts: Sequence[Cut] = ()) -> None:
        self.above = above  # < 0: no lower bound
        self.up_to = up_to  # None: no upper bound
        self.cuts = tuple(cuts)

    def apply(self, row: Tensor, start: int) -> Tensor:
        above, up_to, extra = self.above, self.up_to, []
        end = start + len(row)
        for cut in self.cuts:
            first, stop = max(cut.start, start), min(cut.stop, end)
            if first >= stop:
                continue
            if (first, stop) == (start, end) and cut.side == "lower":
                above = _below(cut.value)  # the whole chunk takes this value: include it
            elif (first, stop) == (start, end) and cut.side == "upper":
                up_to = cut.value
            else:
                extra.append((cut.value, first - start, stop - start))
        kept = F.hardshrink(row, above) if above >= 0 else row.clone()  # |d| > above, others +0
        if up_to is not None:
            kept -= F.hardshrink(row, up_to)  # |d| > up_to: d - d = 0
        for value, first, stop in extra:  # entries equal to value in [first, stop): 0 so far, now d
            part = row[first:stop]
            kept[first:stop] += F.hardshrink(part, _below(value)) - F.hardshrink(part, value)
        return kept


def _below(value: float) -> float:
    """The largest float32 below a non-negative float32 value (-1 for 0): `> _below(v)` means `>= v`."""
    if value <= 0:
        return -1.0
    return float(torch.nextafter(torch.tensor(value, dtype=torch.float32), torch.tensor(0.0)))


_NONE = float("inf")  # an `above` that keeps nothing


def select_edge(magnitudes: Tensor, rank: int) -> Edge:
    """The magnitude of ascending rank `rank`, with the counts below and equal to it, by a two-pass
    radix select: non-negative float32s order like their int32 bit patterns, so a histogram of the high
    16 bits finds the bucket, and one of the low 16 bits within it the exact value. Unlike kthvalue
    (quickselect), it does not slow down when many magnitudes are equal, as in bf16 task vectors."""
    bits = magnitudes.reshape(-1).view(torch.int32)
    high = bits >> 16  # (N,) 0 .. 0x7FC0 (NaN sorts last)
    cum = torch.bincount(high).cumsum(0)
    top = int(torch.searchsorted(cum, rank, right=True))  # first bucket whose running count passes rank
    before = int(cum[top - 1]) if top else 0
    low_counts = torch.bincount(bits[high == top] & 0xFFFF, minlength=1 << 16)
    low_cum = low_counts.cumsum(0)
    bottom = int(torch.searchsorted(low_cum, rank - before, right=True))
    value = torch.tensor((top << 16) | bottom, dtype=torch.int32).view(torch.float32)
    below = before + (int(low_cum[bottom - 1]) if bottom else 0)
    return Edge(float(value), below, int(low_counts[bottom]))


def rank_window(stats: DeltaStats, e: int, low: int, high: int) -> MagnitudeKeep:
    """Keep the entries of model e whose magnitude rank lies in [low, high) (0 < high - low <= n).

    Entries equal to an edge value hold the consecutive ranks below .. below + equal - 1 in index
    order; when the window takes only some of them, the thresholds leave that value out and a Cut
    takes back the index range of the ones inside. An edge of 0 is never cut: a kept zero adds nothing.
    """
    n = stats.deltas[e].numel()
    magnitudes = stats.magnitudes(e)  # one |d| for both edges and their cuts
    lo = stats.edge(e, low, magnitudes)
    hi = lo if high - 1 == low or high == n else stats.edge(e, high - 1, magnitudes)
    up_to = None if high == n else hi.value
    if lo.value == hi.value and high < n:  # the window lies within one magnitude
        if (low, high) == (lo.below, lo.below + lo.equal):
            return MagnitudeKeep(_below(lo.value), lo.value)
        return MagnitudeKeep(_NONE, None, _cuts(stats, e, lo, low - lo.below, high - lo.below, "only", magnitudes))
    above, cuts = _below(lo.value), []
    if low > lo.below:  # the window starts among the entries equal to lo
        above = lo.value
        cuts += _cuts(stats, e, lo, low - lo.below, lo.equal, "lower", magnitudes)
    if high < n and hi.below + hi.equal > high:  # it ends among the entries equal to hi (> lo >= 0)
        up_to = _below(hi.value)
        cuts += _cuts(stats, e, hi, 0, high - hi.below, "upper", magnitudes)
    if up_to is not None and up_to <= above:  # nothing strictly inside: only the cuts, taken entry by entry
        return MagnitudeKeep(_NONE, None, [Cut(c.value, c.start, c.stop, "only") for c in cuts])
    return MagnitudeKeep(above, up_to, cuts)


def _cuts(stats: DeltaStats, e: int, edge: Edge, first: int, last: int, side: str, magnitudes: Tensor | None) -> list[Cut]:
    """The index range of the entries equal to edge.value with ordinals first .. last - 1."""
    if last <= first or edge.value <= 0:
        return []
    wanted = [i for i, needed in ((first, first > 0), (last - 1, last < edge.equal)) if needed]
    found = dict(zip(wanted, stats.positions(e, edge, wanted, magnitudes))) if wanted else {}
    start = found.get(first, 0) if first > 0 else 0
    stop = found[last - 1] + 1 if last < edge.equal else stats.deltas[e].numel()
    return [Cut(edge.value, start, stop, side)]


def top_magnitude_keep(deltas: Tensor, density: Tensor, stats: DeltaStats) -> list[Keep | None] | None:
    """TIES trim (mergekit ``magnitude``): per model keep the max(1, int(density * n)) largest |delta|."""
    densities = density.tolist()
    if all(d >= 1 for d in densities):
        return None
    flat = deltas.reshape(len(deltas), -1)  # (E, N)
    n = flat.shape[1]
    keeps: list[Keep | None] = []
    for e, d in enumerate(densities):
        k = n if d >= 1 else 0 if d <= 0 else max(1, count_of(d, n))
        if k in (0, n):
            keeps.append(None if k == n else MagnitudeKeep(_NONE, None))
            continue
        keeps.append(rank_window(stats, e, n - k, n))
    return keeps


def middle_magnitude_keep(deltas: Tensor, density: Tensor, gamma: Tensor, stats: DeltaStats) -> list[Keep | None] | None:
    """Model Breadcrumbs (mergekit ``magnitude_outliers``): per model drop the int(gamma * n) largest
    |delta|, then enough of the smallest to keep int(density * n); fewer large ones are dropped when
    density + gamma > 1. density >= 1 keeps everything, whatever gamma is."""
    pairs = list(zip(density.tolist(), gamma.tolist()))
    if all(d >= 1 for d, _ in pairs):
        return None
    flat = deltas.reshape(len(deltas), -1)  # (E, N)
    n = flat.shape[1]
    keeps: list[Keep | None] = []
    for e, (d, g) in enumerate(pairs):
        n_keep, n_top = count_of(d, n), count_of(g, n)
        low = max(0, n - n_keep - n_top)
        high = min(n, low + n_keep)
        if d >= 1 or (low, high) == (0, n):
            keeps.append(None)
            continue
        if high <= low:
            keeps.append(MagnitudeKeep(_NONE, None))
            continue
        keeps.append(rank_window(stats, e, low, high))
    return keeps


def uniform(like: Tensor, generator: torch.Generator | None) -> Tensor:
    """U[0, 1) noise shaped like `like`, drawn on the generator's device, returned on like's device."""
    device = generator.device if generator is not None else like.device
    return torch.rand(like.shape, generator=generator, device=device, dtype=torch.float32).to(like.device)


def random_keep(deltas: Tensor, density: Tensor, generator: torch.Generator | None) -> list[MaskKeep]:
    """DARE drop (mergekit ``random``): keep each entry with probability density. The noise is drawn
    one model at a time, which is the same stream as one (E, *S) draw."""
    flat = deltas.reshape(len(deltas), -1)
    return [MaskKeep(uniform(flat[e], generator) < d) for e, d in enumerate(density.tolist())]


def rank_sampled_keep(
    deltas: Tensor, density: Tensor, epsilon: Tensor, generator: torch.Generator | None, stats: DeltaStats
) -> list[MaskKeep]:
    """DELLA MagPrune (mergekit ``della_magprune``): within each row, the entry of magnitude rank r
    (0 = smallest) of n is kept with probability density - epsilon + 2 * epsilon * r / (n - 1).

    Rows are the ranking axis mergekit uses: a 1-D tensor is one row; otherwise dim 1 of the weight
    (the input features of a Linear weight), with the other dims as batch. density >= 1 keeps all
    (its noise is still drawn, so the other models' draws do not depend on it).
    """
    keeps = []
    for e, (d, eps) in enumerate(zip(density.tolist(), epsilon.tolist())):
        noise = uniform(_ranking_view(deltas[e : e + 1]), generator)  # (1, ..., n)
        keep = noise < 1 if d >= 1 else noise < (d - eps) + stats.row_ranks(e) * (2 * eps)
        keeps.append(MaskKeep(_undo_ranking_view(keep, deltas[e : e + 1]).reshape(-1)))
    return keeps


def _normalized_row_ranks(rows: Tensor) -> Tensor:
    """rank / (n - 1) of each |entry| within its last-dim row (0.5 when a row has one entry)."""
    n = rows.shape[-1]
    if n == 1:
        return torch.full(rows.shape, 0.5, device=rows.device)
    order = rows.abs().view(torch.int32).argsort(dim=-1, stable=True)  # |x| orders like its int32 bits, sorts faster
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(n, device=rows.device).expand_as(order))
    return ranks.float() / (n - 1)


def rescale_l1(deltas: Tensor, keeps: list[MaskKeep], stats: DeltaStats) -> Tensor:
    """(E,) factor that brings each model's kept entries back to the L1 norm of its whole task vector
    (mergekit ``rescale: true`` = RescaleNorm.l1; about 1/density in expectation, as in DARE); 1 where
    either norm is below NORM_EPS."""
    flat = deltas.reshape(len(deltas), -1)
    before = stats.l1()  # (E,)
    after = torch.stack([keeps[e].apply(flat[e].float(), 0).abs().sum() for e in range(len(flat))])
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
