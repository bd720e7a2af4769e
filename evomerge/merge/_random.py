"""Counter-based uniforms for the random sparsifiers (DARE, DELLA): the same bits on every device.

The uniform of entry i (flat index) of model e's task vector in tensor `name` of a recipe with `seed`
is a hash of (seed, name, e, i), not a draw from a device's generator, so a recipe searched on a GPU
and exported on a CPU keeps the same entries:

    k_e  = blake2b(f"{seed}/{name}/{e}", digest_size=4), little-endian   (Python, once per tensor and model)
    x    = hash32(((i * 0x61C88647) mod 2^32) xor k_e)             (a Weyl step, then a keyed hash)
    u    = (x >> 8) / 2^24                                         in [0, 1), a multiple of 2^-24

hash32 is a low-bias two-multiply integer finalizer listed in Wellons' hash-prospector
([16 21f0aaad 15 735a2d97 15]). Both multipliers are below 2^31, so on int64 tensors every product of a 32-bit value
stays below 2^63: no overflow, no signed shift, and the same integer ops give the same bits on any
device. An entry is kept with probability p when u < p, so densities are quantized to 2^-24.
Tensors of 2^32 entries or more are refused (their indices would repeat).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor

M32 = 0xFFFFFFFF
WEYL = 0x61C88647  # 2^32 - 0x9E3779B9 (the golden-ratio constant): odd and < 2^31
MUL1, MUL2 = 0x21F0AAAD, 0x735A2D97
UNIFORM_BITS = 24
HASH_CHUNK = 1 << 16  # entries per CPU step: int64 temporaries stay in cache
HASH_CHUNK_ACCELERATOR = 1 << 24  # on a GPU, kernel launches cost more than memory


@dataclass(frozen=True)
class Noise:
    """The uniforms of one tensor's task vectors: a recipe seed and the tensor's name select them."""

    seed: int = 0
    name: str = ""

    def key(self, model: int) -> int:
        """32-bit key of model `model`'s stream."""
        digest = hashlib.blake2b(f"{self.seed}/{self.name}/{model}".encode(), digest_size=4).digest()
        return int.from_bytes(digest, "little")

    def levels(self, model: int, n: int, device: torch.device | str = "cpu") -> Tensor:
        """(n,) the uniforms of entries 0 .. n-1 of model `model`'s task vector times 2^24: whole
        numbers 0 .. 2^24 - 1, as fp32 (exact). An entry is kept with probability p where
        level < ceil(p * 2^24), which is u < p."""
        if n >= 1 << 32:
            raise ValueError(f"tensor {self.name!r} has {n} entries; random merge methods take tensors below 2^32 entries")
        key, out = self.key(model), torch.empty(n, dtype=torch.float32, device=device)
        step = HASH_CHUNK if out.device.type == "cpu" else HASH_CHUNK_ACCELERATOR
        for start in range(0, n, step):
            stop = min(n, start + step)
            x = torch.arange(start, stop, dtype=torch.int64, device=device).mul_(WEYL).bitwise_and_(M32).bitwise_xor_(key)
            out[start:stop] = hash32_(x) >> (32 - UNIFORM_BITS)
        return out

    def uniforms(self, model: int, n: int, device: torch.device | str = "cpu") -> Tensor:
        """(n,) fp32 uniforms in [0, 1): levels * 2^-24."""
        return self.levels(model, n, device).mul_(2.0**-UNIFORM_BITS)


def hash32_(x: Tensor) -> Tensor:
    """The 32-bit finalizer, in place on int64 values in [0, 2^32)."""
    x.bitwise_xor_(x >> 16).mul_(MUL1).bitwise_and_(M32)
    x.bitwise_xor_(x >> 15).mul_(MUL2).bitwise_and_(M32)
    return x.bitwise_xor_(x >> 15)


def hash32_int(x: int) -> int:
    """hash32 on a Python int (the reference the tensor version is tested against)."""
    x ^= x >> 16
    x = (x * MUL1) & M32
    x ^= x >> 15
    x = (x * MUL2) & M32
    return x ^ (x >> 15)


def uniform_int(noise: Noise, model: int, index: int) -> float:
    """The uniform of one entry, in Python ints and floats (reference)."""
    x = hash32_int(((index * WEYL) & M32) ^ noise.key(model))
    return (x >> (32 - UNIFORM_BITS)) * 2.0**-UNIFORM_BITS
