"""numba building blocks shared by the fused merge kernels (`_fused`) and the sparsifiers' exact sums:
bit casts, bf16 loads and stores, `_random`'s uniform hash in 32-bit arithmetic, fixed-point sums.

Kept in one module so generated kernel modules import them by name (numba's on-disk cache of a kernel
refers to the functions it calls through their module).
"""

from __future__ import annotations

from contextlib import contextmanager

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from evomerge.merge._random import M32, MUL1, MUL2, UNIFORM_BITS, WEYL


@contextmanager
def torch_threads():
    """Run numba's parallel kernels on as many threads as torch uses, and keep torch's count.

    numba's OpenMP layer shares the OpenMP runtime with torch and resets torch's thread count when its
    pool starts (measured: torch.set_num_threads(1), one fused merge, torch.get_num_threads() == 2).
    Its workqueue layer does not, but costs about 200 us more per call (a merge makes one per tensor)."""
    threads = torch.get_num_threads()
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


@intrinsic
def float_of_bits(typingctx, bits):
    """uint32 bit pattern -> float32 (a bitcast, no conversion)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@intrinsic
def bits_of_float(typingctx, value):
    """float32 -> its uint32 bit pattern."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


def load(array, k):
    """Entry k as fp32: float32 arrays as they are, uint16 arrays as bf16 bit patterns."""


def sub_at(sub, k):
    """What entry k's task vector subtracts: load(sub, i), or 0 when sub is None (the array holds
    task vectors already; x - 0 is x, -0 included)."""


def delta_at(array, sub, k):
    """Entry k's task vector in fp32: load(array, k) - sub_at(sub, k), exact (see `_deltas`)."""


def store(array, k, value):
    """Write fp32 value as the array's dtype; uint16 arrays get bf16, rounded to nearest even as torch
    rounds (NaN: 0x7FC0)."""


# Parameters are named k, not i: inlined into a kernel's prange loop, a parameter named like the loop
# index would overwrite it.
@overload(load)
def _load_typed(array, k):
    if array.dtype == types.uint16:
        return lambda array, k: float_of_bits(np.uint32(array[k]) << np.uint32(16))
    return lambda array, k: np.float32(array[k])


# (not inlined at numba's IR level, which trips over nested inlining inside prange loops; LLVM inlines them)
@overload(sub_at)
def _sub_at_typed(sub, k):
    if isinstance(sub, (types.NoneType, types.Omitted)):
        return lambda sub, k: np.float32(0.0)
    return lambda sub, k: load(sub, k)


def base_or_zero(sub, value):
    """`value` (the base entry, already loaded) when sub is an array (then it is the base), else 0:
    what a fused kernel subtracts, without loading the base twice."""


@overload(base_or_zero)
def _base_or_zero_typed(sub, value):
    if isinstance(sub, (types.NoneType, types.Omitted)):
        return lambda sub, value: np.float32(0.0)
    return lambda sub, value: value


@overload(delta_at)
def _delta_at_typed(array, sub, k):
    return lambda array, sub, k: load(array, k) - sub_at(sub, k)


@overload(store)
def _store_typed(array, k, value):
    if array.dtype != types.uint16:

        def store_float(array, k, value):
            array[k] = value

        return store_float

    def store_bf16(array, k, value):
        bits = bits_of_float(value)
        rounded = np.uint16((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
        array[k] = np.uint16(0x7FC0) if value != value else rounded

    return store_bf16


def _hash_codegen(builder, index, index_type, key):
    """LLVM IR of `_random`'s hash of entry `index` with `key`, in 32-bit integer arithmetic (numba's own
    would widen every op to 64 bits, which vectorizes at half the width): hash32((index * WEYL) ^ key)."""
    i32 = ir.IntType(32)
    x = builder.trunc(index, i32) if index_type.bitwidth > 32 else index
    x = builder.xor(builder.mul(x, ir.Constant(i32, WEYL)), key)
    for shift, multiplier in ((16, MUL1), (15, MUL2)):
        x = builder.mul(builder.xor(x, builder.lshr(x, ir.Constant(i32, shift))), ir.Constant(i32, multiplier))
    return builder.xor(x, builder.lshr(x, ir.Constant(i32, 15)))


@intrinsic
def level(typingctx, index, key):
    """The uniform level (hash >> 8) of entry `index` (an integer below 2^32) in the stream with `key`
    (uint32), as fp32."""
    if not isinstance(index, types.Integer) or key != types.uint32:
        return None

    def codegen(context, builder, signature, args):
        x = _hash_codegen(builder, args[0], index, args[1])
        return builder.uitofp(builder.lshr(x, ir.Constant(ir.IntType(32), 32 - UNIFORM_BITS)), ir.FloatType())

    return types.float32(index, key), codegen


@intrinsic
def hash_at_most(typingctx, index, key, top):
    """hash <= top (uint32): level < limit is hash <= (limit << 8) - 1, two ops fewer than `level`."""
    if not isinstance(index, types.Integer) or key != types.uint32 or top != types.uint32:
        return None

    def codegen(context, builder, signature, args):
        return builder.icmp_unsigned("<=", _hash_codegen(builder, args[0], index, args[1]), args[2])

    return types.boolean(index, key, top), codegen


@intrinsic
def hash32(typingctx, index, key):
    """`_random`'s 32-bit hash of entry `index` in the stream with `key` (uint32); level = hash >> 8."""
    if not isinstance(index, types.Integer) or key != types.uint32:
        return None

    def codegen(context, builder, signature, args):
        return _hash_codegen(builder, args[0], index, args[1])

    return types.uint32(index, key), codegen


KEY_BLOCK = 1024  # entries a blocked pass forms at once in a vectorized loop (fp32 or uint32 keys: 4 KiB, in L1)


# Every helper below reads one model's task vector as (flat, sub): delta_at(flat, sub, i), i.e. a
# source minus the base in registers, or (sub None) task vectors already made.


@numba.njit(nogil=True, cache=True)
def fixed_sum_below(order, levels, flat, first, stop, limit, scale, sub=None):
    """sum of floor(|d[k]| * scale) (an fp32 product, as `_sparsify._to_fixed`) over k in
    order[first:stop] with levels[k] < limit."""
    limit32, scale32 = np.float32(limit), np.float32(scale)
    total = 0
    for j in range(first, stop):
        k = order[j]
        if levels[k] < limit32:
            total += np.int64(abs(delta_at(flat, sub, k)) * scale32)
    return total


@numba.njit(parallel=True, nogil=True, cache=True)
def fixed_sum(flat, scale, sub=None):
    """sum of floor(|d[i]| * scale) (fp32 products, as `_sparsify._to_fixed`), exact in int64."""
    scale32 = np.float32(scale)
    total = 0
    for i in numba.prange(len(flat)):
        total += np.int64(abs(delta_at(flat, sub, i)) * scale32)
    return total


@numba.njit(parallel=True, nogil=True, cache=True)
def form_row(flat, sub, out):
    """out[i] = d[i] in fp32: one model's task vector, formed in one vectorized pass."""
    for i in numba.prange(len(flat)):
        out[i] = delta_at(flat, sub, i)


@numba.njit(parallel=True, nogil=True, cache=True)
def abs_max(flat, sub=None):
    """max |d[i]| (NaN if any entry is NaN), as fp32. Taken over |d|'s bit patterns, which order like
    the values (NaN's above inf's): an integer max vectorizes, a float max with NaN checks does not
    (measured 16M entries, one thread: 1.5 ms against 12 ms from bf16 sources)."""
    top = np.uint32(0)
    for i in numba.prange(len(flat)):
        top = max(top, bits_of_float(delta_at(flat, sub, i)) & np.uint32(0x7FFFFFFF))
    return np.float32(np.nan) if top > np.uint32(0x7F800000) else float_of_bits(top)


@numba.njit(parallel=True, nogil=True, cache=True)
def any_nonfinite(flat, sub=None):
    """How many d[i] are NaN or inf."""
    count = 0
    for i in numba.prange(len(flat)):
        x = delta_at(flat, sub, i)
        count += x - x != np.float32(0.0)
    return count


@numba.njit(parallel=True, nogil=True, cache=True)
def uniform_fixed_sums(flat, key, top, scale, sub=None):
    """DARE's L1 norms in fixed point in one pass: (`fixed_sum`, the same sum over the entries whose
    uniform hash is at most `top`, i.e. those `UniformKeep` without ranks keeps, hashed in registers)."""
    scale32 = np.float32(scale)
    total, kept = 0, 0
    for i in numba.prange(len(flat)):
        value = np.int64(abs(delta_at(flat, sub, i)) * scale32)
        total += value
        kept += value if hash_at_most(i, key, top) else 0
    return total, kept


SUM_BUCKET_BITS = 12  # DARE's kept L1 norm: fixed-point sums kept per top 12 bits of the hash (32 KB)


@numba.njit(parallel=True, nogil=True, cache=True)
def hash_bucket_sums(flat, key, scale, parts, sub=None):
    """sum of floor(|d[i]| * scale) (as `fixed_sum`) per bucket hash(i) >> (32 - SUM_BUCKET_BITS), over
    the entries of task vector d: (2^SUM_BUCKET_BITS,) int64, exact. `parts` slices, one thread each."""
    n = len(flat)
    scale32 = np.float32(scale)
    sums = np.zeros((parts, 1 << SUM_BUCKET_BITS), np.int64)
    shift = np.uint32(32 - SUM_BUCKET_BITS)
    for p in numba.prange(parts):
        row = sums[p]
        lo, hi = _part(n, parts, p)
        for i in range(lo, hi):
            row[hash32(i, key) >> shift] += np.int64(abs(delta_at(flat, sub, i)) * scale32)
    return sums.sum(axis=0)


INVERSE_WEYL, INVERSE_MUL1, INVERSE_MUL2 = (np.uint64(pow(m, -1, 1 << 32)) for m in (WEYL, MUL1, MUL2))  # odd: invertible


@numba.njit(inline="always")
def _index_of_hash(h, key):
    """The entry index i (mod 2^32) whose hash in the stream with `key` is h: `_random`'s hash undone
    step by step (each xor-shift and each odd multiply is a bijection of 32-bit words; numba widens
    uint32 arithmetic to 64 bits, so every step is cut back to 32)."""
    x = np.uint64(h)
    x = x ^ (x >> 15) ^ (x >> 30)
    x = (x * INVERSE_MUL2) & M32
    x = x ^ (x >> 15) ^ (x >> 30)
    x = (x * INVERSE_MUL1) & M32
    x = x ^ (x >> 16)
    return ((x ^ np.uint64(key)) * INVERSE_WEYL) & M32


@numba.njit(parallel=True, nogil=True, cache=True)
def boundary_fixed_sum(flat, key, top, scale, parts, sub=None):
    """sum of floor(|d[i]| * scale) over the entries of top's hash bucket (hash(i) >> (32 -
    SUM_BUCKET_BITS) equal to top's) with hash(i) <= top: what `hash_bucket_sums` of the buckets below
    leaves out of DARE's kept norm.

    The hash is a bijection of 32-bit words, so where the bucket's hashes up to top (at most 2^20)
    are fewer than the entries, each is turned back into its index (kept when below n), and only
    those entries are read; else every entry's hash is tested. Integer sums: either way, the same."""
    n = len(flat)
    scale32 = np.float32(scale)
    shift = np.uint32(32 - SUM_BUCKET_BITS)
    first = (top >> shift) << shift
    span = np.int64(top - first) + 1  # signed, as _part's arithmetic expects (uint64 mixed with int64 is float64)
    totals = np.zeros(parts, np.int64)
    if span < n:
        for p in numba.prange(parts):
            lo, hi = _part(span, parts, p)
            total = 0
            for j in range(lo, hi):
                i = _index_of_hash(np.uint64(first) + j, key)
                if i < np.uint64(n):
                    total += np.int64(abs(delta_at(flat, sub, i)) * scale32)
            totals[p] = total
        return totals.sum()
    for p in numba.prange(parts):
        lo, hi = _part(n, parts, p)
        total = 0
        for i in range(lo, hi):
            h = hash32(i, key)
            if (h >= first) & (h <= top):
                total += np.int64(abs(delta_at(flat, sub, i)) * scale32)
        totals[p] = total
    return totals.sum()


@numba.njit(parallel=True, nogil=True, cache=True)
def ranked_fixed_sums(flat, ranks, key, low24, span24, scale, sub=None):
    """DELLA's L1 norms in fixed point in one pass: (`fixed_sum`, the same sum over the entries whose
    uniform level is below ceil(ranks[i] * span24 + low24), i.e. those `UniformKeep` with ranks keeps).
    Integer sums do not depend on order, so these equal the chunked eager sums."""
    low, span, scale32 = np.float32(low24), np.float32(span24), np.float32(scale)
    total, kept = 0, 0
    for i in numba.prange(len(flat)):
        value = np.int64(abs(delta_at(flat, sub, i)) * scale32)
        total += value
        kept += value if level(i, key) < np.ceil(ranks[i] * span + low) else 0
    return total, kept


@numba.njit(parallel=True, nogil=True, cache=True)
def slerp_sums(flat, sub, base, block):
    """SLERP's sums per block of `block` entries, (blocks, 3) fp64: v0^2, v1^2 and v0 * v1 with v0 the
    base entry and v1 = v0 + d rounded to fp32 (as the eager formula forms it). Each block is summed in
    index order, so the result does not depend on the thread count. v0 and v1 are formed KEY_BLOCK at a
    time in a vectorized loop before the (sequential) sums read them: from bf16 sources, forming them
    inside the sum loop took 18.8 ms per 16M entries against 10.6 (fp32 task vectors: 11.5 either way)."""
    n = len(flat)
    sums = np.zeros(((n + block - 1) // block, 3))
    for b in numba.prange(len(sums)):
        x0, x1 = np.empty(KEY_BLOCK, np.float32), np.empty(KEY_BLOCK, np.float32)
        squares0, squares1, product = 0.0, 0.0, 0.0
        lo, hi = np.uint64(b * block), np.uint64(min(n, (b + 1) * block))
        for start in range(lo, hi, np.uint64(KEY_BLOCK)):
            m = min(hi - start, np.uint64(KEY_BLOCK))
            for j in range(m):
                v0 = load(base, start + j)
                x0[j], x1[j] = v0, v0 + delta_at(flat, sub, start + j)
            for j in range(m):
                a, c = np.float64(x0[j]), np.float64(x1[j])
                squares0 += a * a
                squares1 += c * c
                product += a * c
        sums[b, 0], sums[b, 1], sums[b, 2] = squares0, squares1, product
    return sums


@numba.njit(parallel=True, nogil=True, cache=True)
def slerp_write(flat, sub, base, lerp, t, c0, c1, out):
    """SLERP's output, fp32, as the eager formula computes it: v0 + t * d when lerp, else
    c0 * v0 + c1 * (v0 + d) (t, c0, c1 as fp32 scalars, as torch multiplies a float32 tensor)."""
    t32, c032, c132 = np.float32(t), np.float32(c0), np.float32(c1)
    if lerp:
        for i in numba.prange(len(flat)):
            out[i] = load(base, i) + t32 * delta_at(flat, sub, i)
    else:
        for i in numba.prange(len(flat)):
            v0 = load(base, i)
            out[i] = c032 * v0 + c132 * (v0 + delta_at(flat, sub, i))


# --- magnitude selection: a two-pass radix select over |d|'s float32 bits (see _sparsify.select_edges)
#
# Loop indices are unsigned: a signed index makes numba wrap negative ones around (three more
# instructions per load, measured 5.7 -> 3.9 ms per 16M fp32 entries for the high counts, 2 threads).
# From sources, a pass forms each block of KEY_BLOCK keys in a vectorized loop, then counts them from
# L1: the count loop is scalar, and forming s - b there took 2.5x the fp32 time (measured 16M entries:
# high counts 12.1 ms scalar, 4.8 blocked, against 4.5 to form an fp32 row first plus 3.9 to count it).



@numba.njit(inline="always")
def abs_bits(flat, sub, k):
    """|d[k]|'s float32 bit pattern (the sign bit cleared): non-negative floats order like these."""
    return bits_of_float(delta_at(flat, sub, k)) & np.uint32(0x7FFFFFFF)


@numba.njit(inline="always")
def _part(n, parts, p):
    """[lo, hi) of part p when n entries split into `parts` slices, as unsigned loop bounds."""
    step = (n + parts - 1) // parts
    return np.uint64(min(n, p * step)), np.uint64(min(n, (p + 1) * step))


@numba.njit(inline="always")
def _key_block(flat, sub, start, m, keys):
    """keys[:m] = |d|'s bits for entries start .. start + m - 1, in one vectorized loop."""
    for j in range(m):
        keys[j] = abs_bits(flat, sub, start + j)


@numba.njit(parallel=True, nogil=True, cache=True)
def high_counts(flat, parts, sub=None):
    """Per-part counts of |d|'s bits >> 16 over the task vector d, (parts, 2^15): part p counts slice
    `_part(n, parts, p)`, one thread each."""
    n = len(flat)
    counts = np.zeros((parts, 1 << 15), np.int64)
    for p in numba.prange(parts):
        row = counts[p]
        lo, hi = _part(n, parts, p)
        if sub is None:
            for i in range(lo, hi):
                row[abs_bits(flat, sub, i) >> np.uint32(16)] += 1
        else:
            keys = np.empty(KEY_BLOCK, np.uint32)
            for start in range(lo, hi, np.uint64(KEY_BLOCK)):
                m = min(hi - start, np.uint64(KEY_BLOCK))
                _key_block(flat, sub, start, m, keys)
                for j in range(m):
                    row[keys[j] >> np.uint32(16)] += 1
    return counts


@numba.njit(inline="always")
def _count_low(bits, t, i, rows, cursor, stop, index, low):
    """Entry i of bucket t: count its low bits, and record it where the bucket is recorded and the
    part's share of the record buffer has room (it has, unless the counts it was sized by are stale)."""
    rows[t, bits & np.uint32(0xFFFF)] += 1
    if cursor[t] >= 0 and cursor[t] < stop[t]:
        index[cursor[t]] = i
        low[cursor[t]] = bits & np.uint32(0xFFFF)
        cursor[t] += 1


@numba.njit(parallel=True, nogil=True, cache=True)
def low_counts(flat, tops, starts, stops, index, low, sub=None):
    """Counts of the low 16 bits of |d|'s bits over the entries whose high 16 bits are tops[t], for one
    or two buckets in one pass: (T, 2^16), T = len(tops).

    starts, stops (parts, T) int64: part p (`_part` slices, parts = len(starts)) also records its
    entries of bucket t, in index order, their flat index into index[starts[p, t]:stops[p, t]] and low
    bits into low[...]; -1: not recorded. The recorded entries answer `Edge` positions without another
    pass (`nth_equal`). Keys are formed a block at a time for fp32 task vectors too (one loop body; 7.5
    vs 5.5 ms direct, 16M entries, 2 threads). Two buckets cost one more compare per entry (9 vs 7.5
    ms), less than a second pass."""
    n = len(flat)
    parts, two = len(starts), len(tops) > 1
    counts = np.zeros((parts, len(tops), 1 << 16), np.int64)
    t0, t1 = np.uint32(tops[0]), np.uint32(tops[len(tops) - 1])
    for p in numba.prange(parts):
        rows, stop = counts[p], stops[p]
        cursor = starts[p].copy()  # where part p records its next entry of each bucket
        lo, hi = _part(n, parts, p)
        keys = np.empty(KEY_BLOCK, np.uint32)
        for start in range(lo, hi, np.uint64(KEY_BLOCK)):
            m = min(hi - start, np.uint64(KEY_BLOCK))
            _key_block(flat, sub, start, m, keys)
            if two:
                for j in range(m):
                    high = keys[j] >> np.uint32(16)
                    if (high == t0) | (high == t1):
                        _count_low(keys[j], np.int64(high != t0), start + j, rows, cursor, stop, index, low)
            else:
                for j in range(m):
                    if keys[j] >> np.uint32(16) == t0:
                        _count_low(keys[j], 0, start + j, rows, cursor, stop, index, low)
    return counts.sum(axis=0)


@numba.njit(nogil=True, cache=True)
def nth_equal(flat, value, ordinals, sub=None):
    """Flat indices of the ordinals[k]-th entries (0-based, index order) with |d| == value; ordinals
    ascending. Stops after the last one. (Where `low_counts` recorded the bucket, the records answer.)"""
    found = np.full(len(ordinals), -1, np.int64)
    target = bits_of_float(np.float32(value))
    seen, k = 0, 0
    for i in range(np.uint64(0), np.uint64(len(flat))):
        if abs_bits(flat, sub, i) == target:
            while k < len(ordinals) and ordinals[k] == seen:
                found[k] = i
                k += 1
            if k == len(ordinals):
                break
            seen += 1
    return found


# --- DELLA's row ranks: a stable LSD radix sort of each row's |d| bits


def rank_digit_bits(row_length: int) -> int:
    """Radix digit width for rows of this length: a pass over the row per digit plus a count table of
    2^bits per digit, so short rows take 8-bit digits (4 passes) and long ones 11 (3 passes). Measured
    (16M entries, one thread, ms, 8 vs 11 bits): rows of 512 145 vs 153, 1024 138 vs 130, 4096 142 vs
    110, 14336 144 vs 103."""
    return 8 if row_length < 1024 else 11


@numba.njit(parallel=True, nogil=True, cache=True)
def row_ranks(flat, sub, row_length, digit_bits, parts, out):
    """out[r * L + j] = (ascending rank of |d| of entry j within row r) / (L - 1), fp32, for rows of
    L = row_length > 1 consecutive entries; equal magnitudes rank in index order (a stable argsort of
    |d|'s 31 bits, as `_sparsify._normalized_row_ranks`, which it equals bit for bit). Each thread sorts
    one row at a time (`parts` threads take a run of rows each): 16 bytes per entry of the row. A digit
    that all of a row's entries share is skipped."""
    n_rows = len(flat) // row_length
    n_digits = (31 + digit_bits - 1) // digit_bits
    size = 1 << digit_bits
    mask = np.uint32(size - 1)
    scale = np.float32(row_length - 1)
    parts = max(1, min(n_rows, parts))
    per_part = (n_rows + parts - 1) // parts
    for p in numba.prange(parts):
        keys, keys_next = np.empty(row_length, np.uint32), np.empty(row_length, np.uint32)
        order, order_next = np.empty(row_length, np.int32), np.empty(row_length, np.int32)
        counts = np.empty((n_digits, size), np.int32)
        for r in range(p * per_part, min(n_rows, (p + 1) * per_part)):
            start = r * row_length
            counts[:] = 0
            if sub is None:  # task vectors: load and count in one loop
                for j in range(row_length):
                    key = bits_of_float(load(flat, start + j)) & np.uint32(0x7FFFFFFF)
                    keys[j] = key
                    order[j] = j
                    for digit in range(n_digits):
                        counts[digit, (key >> np.uint32(digit * digit_bits)) & mask] += 1
            else:  # sources minus the base: form the keys in a loop that vectorizes, then count
                for j in range(row_length):
                    keys[j] = bits_of_float(delta_at(flat, sub, start + j)) & np.uint32(0x7FFFFFFF)
                    order[j] = j
                for j in range(row_length):
                    key = keys[j]
                    for digit in range(n_digits):
                        counts[digit, (key >> np.uint32(digit * digit_bits)) & mask] += 1
            for digit in range(n_digits):
                shift = np.uint32(digit * digit_bits)
                slots = counts[digit]
                if slots[(keys[0] >> shift) & mask] == row_length:  # one bin holds the row: order unchanged
                    continue
                total = 0
                for b in range(size):  # bin b's first slot
                    count = slots[b]
                    slots[b] = total
                    total += count
                for j in range(row_length):
                    b = (keys[j] >> shift) & mask
                    slot = slots[b]
                    slots[b] = slot + 1
                    keys_next[slot] = keys[j]
                    order_next[slot] = order[j]
                keys, keys_next = keys_next, keys
                order, order_next = order_next, order
            for j in range(row_length):
                out[start + order[j]] = np.float32(j) / scale
