"""The per-entry part of `_methods._mix` as one fused CPU kernel (numba): the in-memory build's hot path.

Eager torch runs a chunk of `_mix` as about 25 ops, each a pass over (E, chunk) buffers with its own
dispatch: about 4x the time of reading the task vectors once. The fused kernel does everything for one
entry in registers: keep (magnitude window with its edge cuts, DARE or DELLA uniform), weight, sign
election, agreeing sum and weight sum, lambda_, base, and the rounding to the output dtype (bf16 bits
written directly, so no fp32 copy of the merged tensor is made).

Registers need the model count fixed, so the kernels are generated per model count E from the
templates below (one Python module per E, written once under `cache_root()/kernels`, so numba's
on-disk cache keeps the compiled code across processes and Ray workers).

The fp32 arithmetic is the eager path's, op for op and in the same order (sums over models left to
right, lambda_ * mixed before the division, as addcdiv), so the two give equal tensors (only the sign
of a zero may differ); tests/merge/test_fused.py checks every keep kind, method and output dtype against
the eager path, which stays for accelerators and as the reference.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import math
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload
from torch import Tensor

from evomerge.merge._random import M32, MUL1, MUL2, UNIFORM_BITS, WEYL
from evomerge.merge._registry import check_finite
from evomerge.merge._sparsify import Cut, Keep, MagnitudeKeep, UniformKeep, _below
from evomerge.paths import cache_root

# columns of the per-segment, per-model fp32 table
F_FACTOR, F_ABOVE, F_UP_TO, F_LOW24, F_SPAN24 = range(5)
KEEP_EVERYTHING_LEVEL = float(1 << 25)  # above every uniform level (< 2^24): a uniform keep that keeps all


@intrinsic
def _float_of_bits(typingctx, bits):
    """uint32 bit pattern -> float32 (a bitcast, no conversion)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@intrinsic
def _bits_of_float(typingctx, value):
    """float32 -> its uint32 bit pattern."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


def _load(array, i):
    """Entry i as fp32: float32 arrays as they are, uint16 arrays as bf16 bit patterns."""


def _store(array, i, value):
    """Write fp32 value as the array's dtype; uint16 arrays get bf16, rounded to nearest even as torch
    rounds (NaN: 0x7FC0)."""


@overload(_load, inline="always")
def _load_typed(array, i):
    if array.dtype == types.uint16:
        return lambda array, i: _float_of_bits(np.uint32(array[i]) << np.uint32(16))
    return lambda array, i: np.float32(array[i])


@overload(_store, inline="always")
def _store_typed(array, i, value):
    if array.dtype != types.uint16:

        def store_float(array, i, value):
            array[i] = value

        return store_float

    def store_bf16(array, i, value):
        bits = _bits_of_float(value)
        rounded = np.uint16((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
        array[i] = np.uint16(0x7FC0) if value != value else rounded

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
def _level(typingctx, index, key):
    """The uniform level (hash >> 8) of entry `index` (an integer below 2^32) in the stream with `key`
    (uint32), as fp32."""
    if not isinstance(index, types.Integer) or key != types.uint32:
        return None

    def codegen(context, builder, signature, args):
        x = _hash_codegen(builder, args[0], index, args[1])
        return builder.uitofp(builder.lshr(x, ir.Constant(ir.IntType(32), 32 - UNIFORM_BITS)), ir.FloatType())

    return types.float32(index, key), codegen


@intrinsic
def _hash_at_most(typingctx, index, key, top):
    """hash <= top (uint32): level < limit is hash <= (limit << 8) - 1, two ops fewer than `_level`."""
    if not isinstance(index, types.Integer) or key != types.uint32 or top != types.uint32:
        return None

    def codegen(context, builder, signature, args):
        return builder.icmp_unsigned("<=", _hash_codegen(builder, args[0], index, args[1]), args[2])

    return types.boolean(index, key, top), codegen


# --- kernel templates ----------------------------------------------------------------------------

_MODULE = '''\
"""Generated by evomerge.merge._fused for {n} models: do not edit (rewritten when the templates change)."""
import numba
import numpy as np

from evomerge.merge._fused import _hash_at_most, _level, _load, _store
'''

# rows: tuple of E (N,) fp32 task vectors; base, out (N,) fp32 or uint16 (bf16 bits); ranks:
# tuples of E (N,) fp32; fp (E, 5) fp32 per-model parameters (columns F_*); keys (E,) uint32 noise
# stream keys, tops (E,) uint32 the largest hash a uniform keep keeps, offset: the flat index of entry 0 (levels are hashed from it); w (E,) fp32 weights;
# normalize: divide by the agreeing weights' sum; scalars: lambda_, plain divisor, divisor where no
# model agrees. Returns how many merged values are NaN or inf. A segment of entries with its own parameters is a call on slices: a loop over segments
# around the prange, or a prange(lo, hi), measured 2-4x slower (numba no longer vectorizes the loop).
_KERNEL = '''

@numba.njit(parallel=True, cache=True, nogil=True, error_model="numpy")
def {name}(rows, base, out, ranks, fp, keys, tops, offset, w, normalize, scalars):
    zero, one = np.float32(0.0), np.float32(1.0)
    lam, plain_divisor, zero_divisor = scalars[0], scalars[1], scalars[2]
{rows}
{setup}
    nonfinite = 0
    for i in numba.prange(len(base)):
{body}
    return nonfinite
'''

_ROWS = {  # per model e: its arrays
    "all": "    d{e} = rows[{e}]",
    "magnitude": "    d{e} = rows[{e}]",
    "uniform": "    d{e}, key{e}, top{e} = rows[{e}], keys[{e}], tops[{e}]",
    "ranked": "    d{e}, key{e}, rank{e} = rows[{e}], keys[{e}], ranks[{e}]",
}

_SETUP = {  # per model e: its parameters in this segment
    "all": "    f{e} = fp[{e}, 0]",
    "magnitude": "    f{e}, above{e}, up_to{e} = fp[{e}, 0], fp[{e}, 1], fp[{e}, 2]",
    "uniform": "    f{e} = fp[{e}, 0]",
    "ranked": "    f{e}, low{e}, span{e} = fp[{e}, 0], fp[{e}, 3], fp[{e}, 4]",
}

_KEEP = {  # per model e: v{e} = kept entry times its factor, with the eager path's zeros
    "all": "        v{e} = d{e}[i] * f{e}",
    "magnitude": (  # above < |d| <= up_to, NaN kept (as eager: hardshrink(d, above) - hardshrink(d, up_to))
        "        x{e} = d{e}[i]\n"
        "        a{e} = abs(x{e})\n"
        "        v{e} = (zero if (a{e} <= above{e}) | (a{e} > up_to{e}) else x{e}) * f{e}"
    ),
    "uniform": "        v{e} = (d{e}[i] * (one if _hash_at_most(offset + i, key{e}, top{e}) else zero)) * f{e}",
    "ranked": (
        "        limit{e} = np.ceil(rank{e}[i] * span{e} + low{e})\n"
        "        v{e} = (d{e}[i] * (one if _level(offset + i, key{e}) < limit{e} else zero)) * f{e}"
    ),
}

# sign election (mergekit consensus "sum"): sign of the sum, + at 0; t_e = max(v_e * sign, 0);
# agreeing sum sign * sum t_e; the agreeing weights' sum, 0 replaced (see _methods._elect_and_sum)
_ELECT = (
    "        sign = np.float32(np.copysign(one, {sum_v}))\n"
    "{clamps}\n"
    "        mixed = ({sum_t}) * sign\n"
    "        weights = {sum_w}\n"
    "        divisor = (zero_divisor if weights == zero else weights) if normalize else plain_divisor"
)
_CLAMP = "        t{e} = v{e} * sign\n        t{e} = zero if t{e} < zero else t{e}"
_PLAIN = "        mixed = {sum_v}\n        divisor = plain_divisor"
_FINISH = (
    "        merged = _load(base, i) + lam * mixed / divisor\n"
    "        nonfinite += merged - merged != zero  # NaN for NaN and inf\n"
    "        _store(out, i, merged)"
)

_BOUND = '''

@numba.njit(parallel=True, cache=True, nogil=True)
def traffic_bound(rows, out):
    """One pass that reads every task vector once and writes the output: what a merge cannot beat."""
{setup}
    for i in numba.prange(len(out)):
        _store(out, i, {sum_d})
'''

FAMILIES = tuple(_KEEP)


def _kernel_source(n: int, family: str, elect: bool) -> str:
    models = range(n)
    arrays = "\n".join(_ROWS[family].format(e=e) for e in models)
    setup = "\n".join(_SETUP[family].format(e=e) for e in models)
    keep = "\n".join(_KEEP[family].format(e=e) for e in models)
    sum_v = " + ".join(f"v{e}" for e in models)
    if elect:
        combine = _ELECT.format(
            sum_v=sum_v,
            clamps="\n".join(_CLAMP.format(e=e) for e in models),
            sum_t=" + ".join(f"t{e}" for e in models),
            sum_w=" + ".join(f"w[{e}] * (one if t{e} > zero else zero)" for e in models),
        )
    else:
        combine = _PLAIN.format(sum_v=sum_v)
    return _KERNEL.format(name=f"{family}_{'elect' if elect else 'sum'}", rows=arrays, setup=setup, body=f"{keep}\n{combine}\n{_FINISH}")


def _module_source(n: int) -> str:
    kernels = [_kernel_source(n, family, elect) for family in FAMILIES for elect in (False, True)]
    bound = _BOUND.format(
        setup="\n".join(f"    d{e} = rows[{e}]" for e in range(n)), sum_d=" + ".join(f"d{e}[i]" for e in range(n))
    )
    return _MODULE.format(n=n) + "".join(kernels) + bound


@functools.cache
def kernels(n_models: int) -> ModuleType:
    """The generated kernels for n_models models, written once per machine and imported."""
    source = _module_source(n_models)
    name = f"fused_{n_models}_{hashlib.sha256(source.encode()).hexdigest()[:12]}"
    path = _kernel_dir() / f"{name}.py"
    if not path.exists():  # write then rename: a process importing it never sees half a file
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(source)
        os.replace(tmp, path)
    spec = importlib.util.spec_from_file_location(f"evomerge_kernels_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # numba's cache finds the kernels' globals by module name
    spec.loader.exec_module(module)
    return module


def _kernel_dir() -> Path:
    folder = cache_root() / "kernels"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    except OSError:  # a read-only home: compile per process from a temporary folder
        return Path(tempfile.mkdtemp(prefix="evomerge-kernels-"))


# --- the entry point ------------------------------------------------------------------------------


def usable(deltas: Tensor, keeps: list[Keep | None] | None, *, elect_sign: bool, normalize: bool, lambda_: float) -> bool:
    """Whether the fused kernel covers this merge: CPU, fp32 task vectors, keeps of one known kind.
    (Normalizing without sign election divides before lambda_; no method does that with lambda_ != 1.)"""
    if deltas.device.type != "cpu" or deltas.dtype != torch.float32 or deltas.numel() == 0:
        return False
    if normalize and not elect_sign and lambda_ != 1:
        return False
    return _family(keeps) is not None


def _family(keeps: list[Keep | None] | None) -> str | None:
    kinds = {type(k) for k in keeps or [] if k is not None}
    if not kinds:
        return "all"
    if kinds == {MagnitudeKeep}:
        return "magnitude"
    if kinds == {UniformKeep}:
        if any(k.key is None for k in keeps if k is not None):
            return None
        ranked = {k.ranks is not None for k in keeps if k is not None}
        return None if len(ranked) > 1 else "ranked" if ranked == {True} else "uniform"
    return None


def mix(
    base: Tensor,
    deltas: Tensor,
    weight: Tensor,
    factor: Tensor,
    keeps: list[Keep | None] | None,
    *,
    elect_sign: bool,
    normalize: bool,
    lambda_: float,
    plain_divisor: float,
    zero_divisor: float,
    out: Tensor | None = None,
) -> Tensor:
    """`_methods._mix` on the CPU in one pass (see `usable`): (*S) fp32, or written into out (fp32 and
    bf16 directly, other dtypes through an fp32 copy). Raises FloatingPointError for NaN or inf results.

    factor (E,): weight times rescale per model; zero_divisor: the divisor where no model agrees."""
    n_models = len(deltas)
    family = _family(keeps)
    flat = deltas.reshape(n_models, -1).numpy()
    rows = tuple(flat[e] for e in range(n_models))
    bounds, fp, keys, tops, ranks = _tables(keeps, factor, rows)
    target = out if out is not None and out.dtype in (torch.float32, torch.bfloat16) and out.is_contiguous() else None
    result = torch.empty(base.shape, dtype=torch.float32) if target is None else target
    scalars = np.array([lambda_, plain_divisor if normalize and not elect_sign else 1.0, zero_divisor], dtype=np.float32)
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    kernel = getattr(kernels(n_models), f"{family}_{'elect' if elect_sign else 'sum'}")
    base_array, out_array, w = _as_array(base.reshape(-1)), _as_array(result.view(-1)), weight.reshape(-1).float().numpy()
    nonfinite = 0
    for s, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        part = slice(lo, hi)
        nonfinite += kernel(tuple(r[part] for r in rows), base_array[part], out_array[part], tuple(r[part] for r in ranks), fp[s],
               keys, tops, lo, w, normalize and elect_sign, scalars)
    if nonfinite:
        raise FloatingPointError(f"{nonfinite} merged values are NaN or inf")
    return result if out is None or target is not None else check_finite(out.copy_(result))  # fp16 may overflow


def _as_array(t: Tensor) -> np.ndarray:
    """A numpy view the kernels read: fp32 as is, bf16 as its uint16 bits; other dtypes as an fp32 copy."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy()
    return t.numpy() if t.dtype == torch.float32 else t.float().numpy()


def _tables(keeps: list[Keep | None] | None, factor: Tensor, rows: tuple[np.ndarray, ...]):
    """The kernels' segment bounds, parameter table, noise keys and rank arrays (see `_KERNEL`).

    A model that keeps everything gets parameters that keep every entry in its family (its own row
    stands in for ranks). Magnitude windows with edge cuts split the entries into segments
    at the cuts' index ranges, inside which a cut's value is simply inside the thresholds (as eager
    `MagnitudeKeep.write` does for a chunk inside the range), so the kernels compare thresholds only.
    """
    n_models, n = len(rows), len(rows[0])
    keeps = keeps or [None] * n_models
    cuts = [(e, cut) for e, k in enumerate(keeps) if isinstance(k, MagnitudeKeep) for cut in k.cuts]
    bounds = sorted({0, n, *(min(max(x, 0), n) for _, c in cuts for x in (c.start, c.stop))})
    fp = np.zeros((len(bounds) - 1, n_models, 5), dtype=np.float32)
    fp[:, :, F_FACTOR] = factor.reshape(-1).float().numpy()
    fp[:, :, F_ABOVE], fp[:, :, F_UP_TO] = -math.inf, math.inf
    fp[:, :, F_LOW24] = KEEP_EVERYTHING_LEVEL
    keys, ranks = np.zeros(n_models, dtype=np.uint32), list(rows)
    tops = np.full(n_models, M32, dtype=np.uint32)
    for e, keep in enumerate(keeps):
        if isinstance(keep, MagnitudeKeep):
            fp[:, e, F_ABOVE] = keep.above
            fp[:, e, F_UP_TO] = math.inf if keep.up_to is None else keep.up_to
        elif isinstance(keep, UniformKeep):
            keys[e] = keep.key
            if keep.ranks is None:
                tops[e] = min(keep.limit << (32 - UNIFORM_BITS), 1 << 32) - 1
            else:
                fp[:, e, F_LOW24], fp[:, e, F_SPAN24] = keep.low24, keep.span24
                ranks[e] = keep.ranks.numpy()
    for e, cut in cuts:  # segments inside the cut's range take its value
        for s in range(len(bounds) - 1):
            if cut.start <= bounds[s] and bounds[s + 1] <= cut.stop:
                _take_value(fp[s, e], cut)
    return bounds, fp, keys, tops, tuple(ranks)


def _take_value(params: np.ndarray, cut: Cut) -> None:
    """Widen one model's thresholds in one segment to keep |d| == cut.value. Two "only" cuts (a window
    of two adjacent magnitudes) may share a segment: it then keeps both values, and no magnitude lies
    between them, so one interval [lower value, upper value] keeps exactly those."""
    if cut.side == "lower":
        params[F_ABOVE] = _below(cut.value)
    elif cut.side == "upper":
        params[F_UP_TO] = cut.value
    else:
        params[F_ABOVE] = min(params[F_ABOVE], _below(cut.value))
        params[F_UP_TO] = cut.value if params[F_UP_TO] == math.inf else max(params[F_UP_TO], cut.value)
