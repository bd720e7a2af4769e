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
index order) it takes. Finding an edge costs a radix select per model: a histogram of the high 16 bits
of |delta| (which no merge parameter changes: a DeltaStats keeps it, a few KB, so a worker that keeps
one DeltaStats per tensor counts it once) and a pass over the low 16 bits within the edge's bucket; or,
once `DeltaStats(keep_sorted=True)` has sorted each task vector, a binary search. Every way finds the
same edges, so the merges are bit-identical.

Random keeps (DARE, DELLA) compare each entry's uniform, a hash of (recipe seed, tensor name, model,
entry) from `_random`, with its keep probability, so they are the same on every device. The uniforms
depend on no merge parameter: a DeltaStats with keep_sorted keeps them, and a mask is then one
comparison per candidate. The L1 rescale they need sums |delta| exactly, in int64 fixed point, so
DARE's cached lookup (entries bucketed by uniform) and a pass over the entries give the same integer.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numba
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from evomerge.merge._deltas import TaskVectors, array_of
from evomerge.merge._numba import (
    SUM_BUCKET_BITS,
    abs_max,
    boundary_fixed_sum,
    fixed_sum,
    fixed_sum_below,
    hash_bucket_sums,
    high_counts,
    low_counts,
    nth_equal,
    rank_digit_bits,
    ranked_fixed_sums,
    row_ranks,
    torch_threads,
    uniform_fixed_sums,
)
from evomerge.merge._random import UNIFORM_BITS, Noise

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

    `deltas`: a `TaskVectors` (sources read in their dtype), or materialised fp32 task vectors (E, *S).

    With keep_sorted=False (the default) magnitude edges come from a radix select per call. On the CPU
    its first pass, the histogram of |delta|'s high 16 bits, is counted once per model and kept
    (`MagnitudeHistogram`: its occupied buckets, per thread, a few KB), and its second pass records the
    entries of the edges' buckets where a bucket holds at most 1/8 of the tensor (10 bytes each, so at
    most 1.25 bytes per entry, for one model at a time: `rank_window` drops them). The L1 norms are kept
    too (two integers). So a DeltaStats kept per tensor across candidates costs KB, and saves a pass
    over the task vector per model per candidate.
    With keep_sorted=True each model's |delta| is sorted once, stably, and the sorted values and their
    flat indices are kept (8 bytes per entry per model, twice the task vectors): an edge is then a
    binary search and a cut point an index lookup. The L1 norms are kept too, and, made by the random
    methods on first use: the uniform levels of one noise stream (4 bytes per entry per model), DARE's
    order of entries by level (4 bytes) and DELLA's row ranks (4 bytes).
    """

    def __init__(self, deltas: TaskVectors | Tensor, *, keep_sorted: bool = False) -> None:
        self.tv = deltas if isinstance(deltas, TaskVectors) else TaskVectors.from_deltas(None, deltas)
        self.keep_sorted = keep_sorted
        n = self.tv.n_models
        self._sorted: list[tuple[Tensor, Tensor] | None] = [None] * n
        self._fixed_l1: list[tuple[int, int] | None] = [None] * n
        self._row_ranks: list[Tensor | None] = [None] * n
        self._noise: Noise | None = None  # the stream the levels below belong to
        self._levels: list[Tensor | None] = [None] * n
        self._buckets: list[_UniformBuckets | None] = [None] * n
        # the entries of the last edges' buckets, per model (compiled selections; see select_edges_compiled)
        self._records: list[dict[int, tuple[np.ndarray, np.ndarray]]] = [{} for _ in range(n)]
        self._histograms: list[MagnitudeHistogram | None] = [None] * n
        # DARE's kept norms by hash bucket, per model: (stream key, sums); made when a key is asked twice
        self._hash_sums: list[tuple[int, np.ndarray] | None] = [None] * n
        self._asked: list[int | None] = [None] * n

    @property
    def n_models(self) -> int:
        return self.tv.n_models

    def nbytes(self) -> int:
        """Bytes this object keeps (sorted magnitudes, levels, orders, ranks), not counting the inputs."""
        kept = [t for pair in self._sorted if pair for t in pair]
        kept += [t for t in (*self._levels, *self._row_ranks) if t is not None]
        kept += [b.order for b in self._buckets if b is not None]
        histograms = sum(h.nbytes() for h in self._histograms if h is not None)
        return sum(t.nbytes for t in kept) + histograms + sum(s.nbytes for _, s in filter(None, self._hash_sums))

    def flat(self, e: int) -> Tensor:
        """Model e's task vector, flat fp32 (formed for this one model when read from sources)."""
        return self.tv.row(e)

    def _compiled(self) -> bool:
        """CPU, fp32 or bf16 inputs: selections run as compiled passes over the inputs themselves."""
        return self.tv.compiled

    def magnitudes(self, e: int) -> Tensor | None:
        """What the eager selections of model e read, made once for all of them: its |delta|; None where
        the sorted copy answers or the compiled passes read the inputs themselves (sources in their
        dtype, or fp32 task vectors in place)."""
        if self.keep_sorted or self._compiled():
            return None
        return self.flat(e).float().abs()

    def edges(self, e: int, ranks: Sequence[int], magnitudes: Tensor | None = None) -> list[Edge]:
        """The magnitudes of ascending ranks `ranks` (one or two) in model e's task vector, with the
        counts below and equal (magnitudes: `self.magnitudes(e)`). Compiled, both come from one pass per
        radix digit, which also records the entries of the edges' buckets for `positions`."""
        if self.keep_sorted:
            values, _ = self._sorted_of(e)
            found = []
            for rank in ranks:
                value = values[rank]
                below = int(torch.searchsorted(values, value, right=False))
                found.append(Edge(float(value), below, int(torch.searchsorted(values, value, right=True)) - below))
            return found
        if self._compiled():  # the compiled passes take signed values and drop the sign themselves
            found, self._records[e] = select_edges_compiled(*self.tv.pair(e), ranks, self.histogram(e))
            return found
        magnitudes = self.flat(e).float().abs() if magnitudes is None else magnitudes
        return [select_edge(magnitudes, rank) for rank in ranks]

    def histogram(self, e: int) -> MagnitudeHistogram:
        """Model e's histogram of |delta|'s high 16 bits (compiled path), counted on first use and kept."""
        if self._histograms[e] is None:
            self._histograms[e] = MagnitudeHistogram.count(*self.tv.pair(e))
        return self._histograms[e]

    def forget_records(self, e: int) -> None:
        """Drop the entries `edges` recorded for model e (up to 1.25 bytes per entry of the tensor)."""
        self._records[e] = {}

    def positions(self, e: int, edge: Edge, ordinals: Sequence[int], magnitudes: Tensor | None = None) -> list[int]:
        """Flat indices of the entries of rank edge.below + ordinal: the ordinal-th entries (in index
        order) whose magnitude is edge.value."""
        if self.keep_sorted:
            order = self._sorted_of(e)[1]
            return [int(order[edge.below + i]) for i in ordinals]
        if self._compiled():
            bits = int(np.array(edge.value, dtype=np.float32).view(np.uint32))
            recorded = self._records[e].get(bits >> 16)
            if recorded is not None:  # the edge's bucket, recorded by the pass that found it
                index, low = recorded
                return index[np.flatnonzero(low == (bits & 0xFFFF))[list(ordinals)]].tolist()
            flat, sub = self.tv.pair(e)
            with torch_threads():
                return nth_equal(flat, np.float32(edge.value), np.array(ordinals, dtype=np.int64), sub).tolist()
        magnitudes = self.flat(e).float().abs() if magnitudes is None else magnitudes
        where = (magnitudes == edge.value).nonzero().squeeze(1)
        return [int(where[i]) for i in ordinals]

    def _sorted_of(self, e: int) -> tuple[Tensor, Tensor]:
        if self._sorted[e] is None:  # non-negative floats sort like their int32 bit patterns, which sort faster
            bits, order = self.flat(e).float().abs().view(torch.int32).sort(stable=True)
            self._sorted[e] = bits.view(torch.float32), order.to(torch.int32)
        return self._sorted[e]

    def fixed_l1(self, e: int) -> tuple[int, int]:
        """Model e's L1 norm as (total, shift): sum_i floor(|d_i| * 2^shift), exact in int64, with the
        shift that keeps the sum below 2^62; the norm is total * 2^-shift."""
        if self._fixed_l1[e] is None:
            if self._compiled():
                values, sub = self.tv.pair(e)
                with torch_threads():
                    shift = _fixed_shift(float(abs_max(values, sub)), self.tv.numel)
                    total = int(fixed_sum(values, 2.0**shift, sub))
            else:
                flat = self.flat(e)
                amax = float(torch.stack(torch.aminmax(flat)).abs().max()) if flat.numel() else 0.0  # one pass, no |d| copy
                shift = _fixed_shift(amax, flat.numel())
                total = _fixed_sum(flat, shift)
            self._fixed_l1[e] = (total, shift)
        return self._fixed_l1[e]

    def kept_fixed_l1(self, e: int, keep: Keep) -> int:
        """sum of floor(|d_i| * 2^shift) over the entries `keep` keeps (shift as in fixed_l1)."""
        shift = self.fixed_l1(e)[1]
        if self.keep_sorted and isinstance(keep, UniformKeep) and keep.ranks is None:
            buckets = self._uniform_buckets(e, keep.levels)
            if self._compiled():
                values, sub = self.tv.pair(e)
                return buckets.kept(values, keep.limit, shift, sub)
            return buckets.kept(self.flat(e), keep.limit, shift)
        if self._hashes_in_registers(keep):
            if keep.ranks is None and (kept := self._kept_from_buckets(e, keep, shift)) is not None:
                return kept
            return self._compiled_sums(e, keep, shift)[1]
        return _fixed_sum(self.flat(e), shift, keep)

    def _kept_from_buckets(self, e: int, keep: UniformKeep, shift: int) -> int | None:
        """DARE's kept norm of model e from its fixed-point |delta| sums per top SUM_BUCKET_BITS bits of
        the hash (32 KB, kept): the buckets below keep.top's, plus that bucket's share, which
        `boundary_fixed_sum` finds reading about 1 entry in 4096. The sums are counted when a second
        candidate asks with the same stream key (a DeltaStats kept across candidates); None before, and
        for a single merge, where one pass sums the kept norm directly."""
        held, key = self._hash_sums[e], keep.key
        values, sub = self.tv.pair(e)
        if held is None or held[0] != key:
            if self._asked[e] != key:
                self._asked[e] = key
                return None
            with torch_threads():
                held = self._hash_sums[e] = (key, hash_bucket_sums(values, np.uint32(key), 2.0**shift, numba.get_num_threads(), sub))
        with torch_threads():
            share = boundary_fixed_sum(values, np.uint32(key), np.uint32(keep.top), 2.0**shift, numba.get_num_threads(), sub)
        return int(held[1][: keep.top >> (32 - SUM_BUCKET_BITS)].sum()) + int(share)

    def l1_norms(self, e: int, keep: Keep | None) -> tuple[int, int, int]:
        """(whole, kept, shift): `fixed_l1` and `kept_fixed_l1` (kept = whole when keep is None). A random
        keep hashed in registers sums both in one compiled pass when the whole norm is not known yet."""
        if keep is not None and self._fixed_l1[e] is None and self._hashes_in_registers(keep):
            values, sub = self.tv.pair(e)
            with torch_threads():
                shift = _fixed_shift(float(abs_max(values, sub)), self.tv.numel)
            whole, kept = self._compiled_sums(e, keep, shift)
            self._fixed_l1[e] = (whole, shift)
            if keep.ranks is None:
                self._asked[e] = keep.key
            return whole, kept, shift
        whole, shift = self.fixed_l1(e)
        return whole, whole if keep is None else self.kept_fixed_l1(e, keep), shift

    def _hashes_in_registers(self, keep: Keep) -> bool:
        """Whether a compiled pass hashes this keep's uniforms itself (not DARE's cached buckets)."""
        cached = self.keep_sorted and isinstance(keep, UniformKeep) and keep.ranks is None
        return isinstance(keep, UniformKeep) and keep.key is not None and self._compiled() and not cached

    def _compiled_sums(self, e: int, keep: UniformKeep, shift: int) -> tuple[int, int]:
        """(whole, kept) fixed-point L1 sums of model e in one compiled pass, uniforms hashed in registers."""
        (values, sub), key = self.tv.pair(e), np.uint32(keep.key)
        with torch_threads():
            if keep.ranks is None:
                sums = uniform_fixed_sums(values, key, np.uint32(keep.top), 2.0**shift, sub)
            else:
                sums = ranked_fixed_sums(values, keep.ranks.numpy(), key, keep.low24, keep.span24, 2.0**shift, sub)
        return int(sums[0]), int(sums[1])

    def levels(self, e: int, noise: Noise) -> Tensor:
        """Model e's (N,) uniform levels of stream `noise` (`Noise.levels`); kept (4 bytes per entry)
        with keep_sorted."""
        if not self.keep_sorted:
            return noise.levels(e, self.tv.numel, self.tv.device)
        if noise != self._noise:  # another recipe seed: forget the old stream
            self._noise, self._levels, self._buckets = noise, [None] * self.n_models, [None] * self.n_models
        if self._levels[e] is None:
            self._levels[e] = noise.levels(e, self.tv.numel, self.tv.device)
        return self._levels[e]

    def _uniform_buckets(self, e: int, levels: Tensor) -> _UniformBuckets:
        if self._buckets[e] is None:
            self._buckets[e] = _UniformBuckets(levels, self.flat(e), self.fixed_l1(e)[1])
        return self._buckets[e]

    def row_ranks(self, e: int) -> Tensor:
        """Model e's DELLA rank in [0, 1] of each entry's magnitude within its row, (N,) in flat order."""
        ranks = self._row_ranks[e]
        if ranks is None:
            shape = self.tv.item_shape
            length = shape[-1] if len(shape) == 2 else self.tv.numel  # rows as _ranking_view makes them
            if self._compiled() and len(shape) <= 2 and 1 < length < 2**31:  # a compiled radix sort per row
                values, sub = self.tv.pair(e)
                out = np.empty(self.tv.numel, dtype=np.float32)
                with torch_threads():
                    row_ranks(values, sub, length, rank_digit_bits(length), numba.get_num_threads(), out)
                ranks = torch.from_numpy(out)
            else:
                one = self.flat(e).view(1, *shape)
                ranks = _undo_ranking_view(_normalized_row_ranks(_ranking_view(one)), one).reshape(-1)
            if self.keep_sorted:
                self._row_ranks[e] = ranks
        return ranks


FIXED_CHUNK = 1 << 16  # entries per step of a fixed-point sum on the CPU (temporaries stay in cache)
MAX_BUCKET_BITS = 16  # DARE's cached kept-norm lookup groups entries by the top bits of u
SCALE24 = float(1 << UNIFORM_BITS)


def _fixed_shift(amax: float, n: int) -> int:
    """The power of two that makes floor(|d| * 2^shift) of n entries up to amax sum below 2^62."""
    if amax == 0 or not math.isfinite(amax):
        return 0
    return min(127, 62 - n.bit_length() - math.frexp(amax)[1])  # amax < 2^frexp exponent; 2^127: fp32's largest


def _to_fixed(values: Tensor, shift: int) -> Tensor:
    """floor(|values| * 2^shift) as int64 (scaling by a power of two is exact in fp32)."""
    return (values.float().abs() * 2.0**shift).long()


def _fixed_sum(flat: Tensor, shift: int, keep: Keep | None = None) -> int:
    """Exact sum of floor(|d| * 2^shift) over flat (N,), over the entries `keep` keeps if given."""
    step = FIXED_CHUNK if flat.device.type == "cpu" else 1 << 24
    total = torch.zeros((), dtype=torch.int64, device=flat.device)
    kept = torch.empty(min(step, flat.numel()), device=flat.device) if keep is not None else None
    for start in range(0, flat.numel(), step):
        row = flat[start : start + step]
        if kept is not None:  # dropped entries become +-0, whose fixed value is 0
            keep.write(row.float(), start, kept[: len(row)])
            row = kept[: len(row)]
        total += _to_fixed(row, shift).sum()
    return int(total)


class _UniformBuckets:
    """One model's entries grouped by the top bits of their uniform, so DARE's kept L1 norm (the entries
    with level < limit) is a prefix sum over whole buckets plus the few entries of one bucket, instead
    of a pass over the task vector. Buckets hold about 256 entries (up to 2^16 buckets), so the lookup
    is a few hundred entries whatever the tensor's size. Keeps the entries' order by level (4 bytes
    per entry) and two int64 per bucket."""

    def __init__(self, levels: Tensor, flat: Tensor, shift: int) -> None:
        self.levels = levels
        self.order = levels.view(torch.int32).sort(stable=True)[1].to(torch.int32)  # levels >= 0 order like their bits
        self.bits = min(MAX_BUCKET_BITS, max(0, len(levels).bit_length() - 9))
        bucket = levels.long() >> (UNIFORM_BITS - self.bits)
        sums = torch.zeros(1 << self.bits, dtype=torch.int64, device=levels.device)
        step = FIXED_CHUNK if levels.device.type == "cpu" else 1 << 24
        for start in range(0, len(levels), step):
            sums.index_add_(0, bucket[start : start + step], _to_fixed(flat[start : start + step], shift))
        zero = torch.zeros(1, dtype=torch.int64, device=levels.device)
        self.starts = torch.cat([zero, torch.bincount(bucket, minlength=1 << self.bits).cumsum(0)]).cpu().numpy()
        self.below = torch.cat([zero, sums.cumsum(0)]).cpu().numpy()  # below[b]: fixed sum over buckets < b

    def kept(self, flat: Tensor | np.ndarray, limit: int, shift: int, sub: np.ndarray | None = None) -> int:
        """Fixed sum over the entries with level < limit of one model's task vector: `flat` (fp32),
        or, on the CPU, `flat` minus `sub` (arrays as `TaskVectors.pair` gives them)."""
        b = limit >> (UNIFORM_BITS - self.bits)
        if b >= len(self.starts) - 1:
            return int(self.below[-1])
        first, stop, below = int(self.starts[b]), int(self.starts[b + 1]), int(self.below[b])
        if isinstance(flat, np.ndarray) or flat.device.type == "cpu":  # one compiled loop over the bucket's members
            values = array_of(flat) if isinstance(flat, Tensor) else flat
            order, levels = self.order.numpy(), self.levels.numpy()
            return below + fixed_sum_below(order, levels, values, first, stop, float(limit), 2.0**shift, sub)
        members = self.order[first:stop].long()
        inside = members[self.levels[members] < limit]
        return below + int(_to_fixed(flat[inside], shift).sum())


class Keep(Protocol):
    """What one model keeps of its flattened task vector, applied to consecutive chunks of it."""

    def write(self, row: Tensor, start: int, out: Tensor) -> None:
        """row: fp32 chunk of the flat task vector starting at entry `start`; writes into out (same
        shape, not row) the kept entries, others 0."""
        ...

    def apply(self, row: Tensor, start: int) -> Tensor:
        """Like write, into a new tensor (for any numeric dtype)."""
        ...


class UniformKeep:
    """Keep where the entry's uniform is below its keep probability p: p = `low` (DARE), or
    low + ranks * span per entry (DELLA, ranks (N,) in [0, 1]), in fp32. levels: (N,) the uniforms
    times 2^24 (`Noise.levels`), so u < p is level < ceil(p * 2^24), and with both whole numbers,
    clamp(ceil(p * 2^24) - level, 0, 1) is the mask as 1.0 / 0.0: three float ops, no bool tensor.
    key: the stream key the levels hash with (`Noise.key`), so the fused kernels recompute each level
    in registers instead of reading it (None: they cannot, and the eager path runs)."""

    def __init__(
        self,
        levels: Tensor | Callable[[], Tensor],
        low: float,
        ranks: Tensor | None = None,
        span: float = 0.0,
        *,
        key: int | None = None,
    ) -> None:
        self._levels, self.low, self.ranks, self.key = levels, low, ranks, key
        self.limit = math.ceil(low * SCALE24)  # DARE: keep level < limit
        self.low24, self.span24 = low * SCALE24, span * SCALE24  # exact: powers of two
        self.top = min(self.limit << (32 - UNIFORM_BITS), 1 << 32) - 1  # level < limit <=> hash <= top

    @property
    def levels(self) -> Tensor:
        """(N,) the uniform levels; made on first use when given as a function (the compiled CPU
        paths hash them in registers and never ask)."""
        if callable(self._levels):
            self._levels = self._levels()
        return self._levels

    def _limits(self, start: int, stop: int, out: Tensor) -> Tensor:
        """DELLA: ceil(p * 2^24) of entries [start, stop), into out (fp32; p * 2^24 exactly, as
        ranks * span * 2^24 + low * 2^24 rounds like ranks * span + low, scaled)."""
        return torch.mul(self.ranks[start:stop], self.span24, out=out).add_(self.low24).ceil_()

    def write(self, row: Tensor, start: int, out: Tensor) -> None:
        stop = start + len(row)
        if self.ranks is None:
            torch.sub(self.levels[start:stop], float(self.limit), out=out).neg_()  # limit - level: whole numbers, exact
        else:
            self._limits(start, stop, out).sub_(self.levels[start:stop])
        out.clamp_(0, 1).mul_(row)

    def apply(self, row: Tensor, start: int) -> Tensor:
        stop = start + len(row)
        if self.ranks is None:
            return row * (self.levels[start:stop] < self.limit)
        return row * (self.levels[start:stop] < self._limits(start, stop, torch.empty(stop - start, device=row.device)))


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

    def write(self, row: Tensor, start: int, out: Tensor) -> None:
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
        if above >= 0:
            torch.ops.aten.hardshrink.out(row, above, out=out)  # |d| > above, others +0
        else:
            out.copy_(row)
        if up_to is not None:
            out.sub_(F.hardshrink(row, up_to))  # |d| > up_to: d - d = 0
        for value, first, stop in extra:  # entries equal to value in [first, stop): 0 so far, now d
            part = row[first:stop]
            out[first:stop] += F.hardshrink(part, _below(value)) - F.hardshrink(part, value)

    def apply(self, row: Tensor, start: int) -> Tensor:
        out = torch.empty_like(row)
        self.write(row, start, out)
        return out


@functools.lru_cache(maxsize=4096)  # called per chunk for the edge values of a window
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


RECORD_FRACTION = 8  # record an edge's bucket while it holds at most 1/8 of the entries (10 bytes each)


@dataclass(frozen=True)
class MagnitudeHistogram:
    """How many entries of one task vector have each high-16-bit pattern of |d|, in each of `parts`
    index slices (`_numba._part`): the first pass of a radix select, which no merge parameter changes.

    Only occupied buckets are kept: `buckets` (K,) their patterns ascending, `per_part` (parts, K) their
    counts per slice (int32 where a slice cannot overflow it). Task vectors of bf16 models occupy about a
    thousand of the 32768 patterns (940 on average over a synthetic 1.1B model's tensors): 2 + 4 x parts
    bytes each, about 6 KB per tensor per model at one thread, 10 KB at 2, 60 KB at 16."""

    buckets: np.ndarray
    per_part: np.ndarray

    @classmethod
    def count(cls, flat: np.ndarray, sub: np.ndarray | None) -> MagnitudeHistogram:
        """One compiled pass over the task vector (flat, minus sub when given), a slice per thread."""
        with torch_threads():
            parts = max(1, min(numba.get_num_threads(), len(flat) // 65536))
            per_part = high_counts(flat, parts, sub)
        buckets = np.flatnonzero(per_part.sum(axis=0))
        counts = per_part[:, buckets]
        fits = -(-len(flat) // parts) < 2**31
        return cls(buckets.astype(np.uint16), counts.astype(np.int32) if fits else counts)

    @property
    def parts(self) -> int:
        return len(self.per_part)

    def nbytes(self) -> int:
        return self.buckets.nbytes + self.per_part.nbytes


def select_edges_compiled(flat: np.ndarray, sub: np.ndarray | None, ranks: Sequence[int],
                          histogram: MagnitudeHistogram | None = None) -> tuple[list[Edge], dict]:
    """`select_edge` for one or two ranks of one model's task vector (flat, minus sub when given; not
    magnitudes) by two compiled passes: the high 16 bits' histogram (or `histogram`, counted before),
    then the low 16 bits' within the one or two buckets the ranks fall in. Returns the edges and, per
    bucket, its entries' flat indices and low bits in index order (int64, uint16), where the bucket is
    small enough to record."""
    histogram = histogram or MagnitudeHistogram.count(flat, sub)
    cum = np.cumsum(histogram.per_part.sum(axis=0, dtype=np.int64))
    buckets = histogram.buckets.astype(np.int64)
    with torch_threads():
        # k: a rank's bucket among the occupied ones (first whose running count passes the rank)
        ks = sorted({int(np.searchsorted(cum, rank, side="right")) for rank in ranks})
        tops = [int(buckets[k]) for k in ks]
        sizes = histogram.per_part[:, ks].astype(np.int64)  # (parts, T): each part's entries in each bucket
        starts = np.full(sizes.shape, -1, dtype=np.int64)
        kept, total = [], 0
        for t, size in enumerate(sizes.sum(axis=0).tolist()):
            if size <= len(flat) // RECORD_FRACTION:
                starts[:, t] = total + np.concatenate(([0], np.cumsum(sizes[:-1, t])))
                kept.append((tops[t], total, total + size))
                total += size
        index, low = np.empty(total, dtype=np.int64), np.empty(total, dtype=np.uint16)
        lows = low_counts(flat, np.array(tops, dtype=np.uint32), starts, starts + sizes, index, low, sub)
    if lows.sum(axis=1).tolist() != sizes.sum(axis=0).tolist():
        raise RuntimeError("a kept magnitude histogram does not match its task vectors: were the sources "
                           "written after the DeltaStats was made? Make a new one")
    edges = []
    for rank in ranks:
        k = int(np.searchsorted(cum, rank, side="right"))
        top, before = int(buckets[k]), int(cum[k - 1]) if k else 0
        counts = lows[ks.index(k)]
        low_cum = np.cumsum(counts)
        bottom = int(np.searchsorted(low_cum, rank - before, side="right"))
        value = np.array([(top << 16) | bottom], dtype=np.int32).view(np.float32)[0]
        below = before + (int(low_cum[bottom - 1]) if bottom else 0)
        edges.append(Edge(float(value), below, int(counts[bottom])))
    return edges, {top: (index[a:b], low[a:b]) for top, a, b in kept}


def rank_window(stats: DeltaStats, e: int, low: int, high: int) -> MagnitudeKeep:
    """`_rank_window`, then drop what its compiled selection recorded: one model's records at a time."""
    try:
        return _rank_window(stats, e, low, high)
    finally:
        stats.forget_records(e)


def _rank_window(stats: DeltaStats, e: int, low: int, high: int) -> MagnitudeKeep:
    """Keep the entries of model e whose magnitude rank lies in [low, high) (0 < high - low <= n).

    Entries equal to an edge value hold the consecutive ranks below .. below + equal - 1 in index
    order; when the window takes only some of them, the thresholds leave that value out and a Cut
    takes back the index range of the ones inside. An edge of 0 is never cut: a kept zero adds nothing.
    """
    n = stats.tv.numel
    magnitudes = stats.magnitudes(e)  # one |d| for both edges and their cuts
    edges = stats.edges(e, [low] if high - 1 == low or high == n else [low, high - 1], magnitudes)
    lo, hi = edges[0], edges[-1]
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
    stop = found[last - 1] + 1 if last < edge.equal else stats.tv.numel
    return [Cut(edge.value, start, stop, side)]


def top_magnitude_keep(deltas: TaskVectors | Tensor, density: Tensor, stats: DeltaStats) -> list[Keep | None] | None:
    """TIES trim (mergekit ``magnitude``): per model keep the max(1, int(density * n)) largest |delta|."""
    densities = density.tolist()
    if all(d >= 1 for d in densities):
        return None
    n = stats.tv.numel
    keeps: list[Keep | None] = []
    for e, d in enumerate(densities):
        k = n if d >= 1 else 0 if d <= 0 else max(1, count_of(d, n))
        if k in (0, n):
            keeps.append(None if k == n else MagnitudeKeep(_NONE, None))
            continue
        keeps.append(rank_window(stats, e, n - k, n))
    return keeps


def middle_magnitude_keep(deltas: TaskVectors | Tensor, density: Tensor, gamma: Tensor, stats: DeltaStats) -> list[Keep | None] | None:
    """Model Breadcrumbs (mergekit ``magnitude_outliers``): per model drop the int(gamma * n) largest
    |delta|, then enough of the smallest to keep int(density * n); fewer large ones are dropped when
    density + gamma > 1. density >= 1 keeps everything, whatever gamma is."""
    pairs = list(zip(density.tolist(), gamma.tolist()))
    if all(d >= 1 for d, _ in pairs):
        return None
    n = stats.tv.numel
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


def random_keep(density: Tensor, noise: Noise, stats: DeltaStats) -> list[Keep | None]:
    """DARE drop (mergekit ``random``): keep each entry whose uniform (see `_random`) is below density.
    density >= 1 keeps everything."""
    return [
        None if d >= 1 else UniformKeep(functools.partial(stats.levels, e, noise), _fp32(d), key=noise.key(e))
        for e, d in enumerate(density.tolist())
    ]


def rank_sampled_keep(density: Tensor, epsilon: Tensor, noise: Noise, stats: DeltaStats) -> list[Keep | None]:
    """DELLA MagPrune (mergekit ``della_magprune``): within each row, the entry of magnitude rank r
    (0 = smallest) of n is kept with probability density - epsilon + 2 * epsilon * r / (n - 1).

    Rows are the ranking axis mergekit uses: a 1-D tensor is one row; otherwise dim 1 of the weight
    (the input features of a Linear weight), with the other dims as batch. density >= 1 keeps all.
    """
    keeps: list[Keep | None] = []
    for e, (d, eps) in enumerate(zip(density.tolist(), epsilon.tolist())):
        if d >= 1:
            keeps.append(None)
            continue
        levels = functools.partial(stats.levels, e, noise)
        keeps.append(UniformKeep(levels, _fp32(d - eps), stats.row_ranks(e), _fp32(2 * eps), key=noise.key(e)))
    return keeps


def _fp32(value: float) -> float:
    return float(np.float32(value))


def _normalized_row_ranks(rows: Tensor) -> Tensor:
    """rank / (n - 1) of each |entry| within its last-dim row (0.5 when a row has one entry)."""
    n = rows.shape[-1]
    if n == 1:
        return torch.full(rows.shape, 0.5, device=rows.device)
    order = rows.abs().view(torch.int32).argsort(dim=-1, stable=True)  # |x| orders like its int32 bits, sorts faster
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(n, device=rows.device).expand_as(order))
    return ranks.float() / (n - 1)


def rescale_l1(keeps: Sequence[Keep | None], stats: DeltaStats) -> Tensor:
    """(E,) factor that brings each model's kept entries back to the L1 norm of its whole task vector
    (mergekit ``rescale: true`` = RescaleNorm.l1; about 1/density in expectation, as in DARE); 1 where
    either norm is below NORM_EPS. The norms are exact sums in fixed point (`DeltaStats.fixed_l1`), so
    they do not depend on summation order: a cached lookup and a pass over the entries agree."""
    factors = []
    for e, keep in enumerate(keeps):
        before, after, shift = stats.l1_norms(e, keep)
        usable = min(before, after) * 2.0**-shift >= NORM_EPS
        factors.append(before / after if usable else 1.0)  # a ratio of ints: correctly rounded
    return torch.tensor(factors, dtype=torch.float32, device=stats.tv.device)


def _ranking_view(deltas: Tensor) -> Tensor:
    if deltas.dim() == 1:  # scalar weights: one row of one entry
        return deltas.unsqueeze(-1)
    return deltas if deltas.dim() <= 3 else deltas.movedim(2, -1)


def _undo_ranking_view(mask: Tensor, deltas: Tensor) -> Tensor:
    if deltas.dim() == 1:
        return mask.squeeze(-1)
    return mask if deltas.dim() <= 3 else mask.movedim(-1, 2)
