"""The task vectors of one tensor, source_e - base, formed in fp32 only where they are used.

A merge reads its sources in their own dtype: no (E, *S) fp32 copy is ever made. The compiled CPU
kernels subtract in registers (`_numba.sub_at`); the eager path (accelerators, fp16 inputs) subtracts
chunk by chunk into a small buffer; a sparsifier that must see one model's whole task vector at once
on the eager path (its sort, its row ranks) forms that one row. s - b in fp32 is exact for bf16, fp16
and fp32 inputs (each converts to fp32 exactly, and the difference of two fp32 values rounds once, as
the materialised fp32 task vectors did), so both forms give bit-identical merges.

`TaskVectors.from_deltas` wraps task vectors that are already materialised in fp32 (the reference
path the tests compare with, and callers that hold deltas).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

_COMPILED_DTYPES = (torch.float32, torch.bfloat16)  # what the compiled kernels load (bf16 as its bits)


class TaskVectors:
    """E task vectors (E, *S) of one tensor: `base` (*S) and E `sources` (*S), read-only, any float
    dtypes on one device; or materialised fp32 `deltas` (E, *S) (then `base` may be None)."""

    def __init__(self, base: Tensor | None, sources: Sequence[Tensor] | None = None, *, deltas: Tensor | None = None) -> None:
        if (sources is None) == (deltas is None):
            raise ValueError("TaskVectors takes sources or deltas, not both")
        self.base = base
        self.sources = tuple(sources) if sources is not None else None
        self.deltas = deltas
        first = deltas[0] if deltas is not None else self.sources[0]
        self.item_shape = tuple(first.shape) if deltas is None else tuple(deltas.shape[1:])
        self.n_models = len(deltas) if deltas is not None else len(self.sources)
        self.numel = int(np.prod(self.item_shape, dtype=np.int64))
        self.device = first.device if self.n_models else (base.device if base is not None else torch.device("cpu"))
        if self.sources is not None and any(tuple(s.shape) != self.item_shape for s in self.sources):
            raise ValueError(f"sources differ in shape: {[tuple(s.shape) for s in self.sources]}")
        if self.sources is not None and base is not None and tuple(base.shape) != self.item_shape:
            raise ValueError(f"sources have shape {self.item_shape}, the base {tuple(base.shape)}")

    @classmethod
    def from_deltas(cls, base: Tensor | None, deltas: Tensor) -> TaskVectors:
        return cls(base, deltas=deltas)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.n_models, *self.item_shape)

    def __len__(self) -> int:
        return self.n_models

    def same(self, other: TaskVectors) -> bool:
        """True when both read the same tensors (a cache built on one serves the other)."""
        if self.deltas is not None or other.deltas is not None:
            return self.deltas is other.deltas
        return self.base is other.base and len(self.sources) == len(other.sources) and all(
            a is b for a, b in zip(self.sources, other.sources))

    # --- eager access ------------------------------------------------------------------------------

    def row(self, e: int) -> Tensor:
        """Model e's whole task vector, flat (N,) fp32: a view of the deltas, or formed (one model only:
        4 bytes per entry of this tensor, by a compiled pass on the CPU)."""
        if self.deltas is not None:
            return self.deltas[e].reshape(-1).to(torch.float32)
        if self.compiled:
            from evomerge.merge._numba import form_row, torch_threads

            out = np.empty(self.numel, dtype=np.float32)
            with torch_threads():
                form_row(*self.pair(e), out)
            return torch.from_numpy(out)
        return torch.sub(self.sources[e].reshape(-1), self.base.reshape(-1).to(torch.float32))

    def rows(self, start: int, stop: int, buffer: Tensor) -> Tensor:
        """(E, stop - start) fp32 task-vector entries [start, stop): a view of the deltas, or formed in
        `buffer` ((E, >= stop - start) fp32)."""
        if self.deltas is not None:
            return self.deltas.reshape(self.n_models, -1)[:, start:stop]
        out = buffer[:, : stop - start]
        if self.compiled and out.device.type == "cpu" and out.dtype == torch.float32:  # a compiled pass per model
            from evomerge.merge._numba import form_row, torch_threads

            arrays, sub = self.arrays()
            with torch_threads():
                for e, flat in enumerate(arrays):
                    form_row(flat[start:stop], sub[start:stop], out[e].numpy())
            return out
        base32 = self.base.reshape(-1)[start:stop].to(torch.float32)
        for e, source in enumerate(self.sources):
            torch.sub(source.reshape(-1)[start:stop], base32, out=out[e])  # s promoted to fp32 exactly
        return out

    def materialize(self) -> Tensor:
        """(E, *S) fp32 task vectors (methods that need them all at once: consensus, the spectral methods)."""
        if self.deltas is not None:
            return self.deltas.float()
        base32 = self.base.to(torch.float32)
        return torch.stack([torch.sub(s, base32) for s in self.sources])

    # --- compiled access (CPU) ---------------------------------------------------------------------

    @property
    def compiled(self) -> bool:
        """Whether the compiled kernels can read these tensors in place (CPU; fp32 or bf16; contiguous)."""
        if self.device.type != "cpu" or self.numel == 0:
            return False
        if self.deltas is not None:
            return self.deltas.dtype == torch.float32 and self.deltas.is_contiguous()
        tensors = (self.base, *self.sources)
        return all(t.dtype in _COMPILED_DTYPES and t.is_contiguous() for t in tensors)

    def arrays(self) -> tuple[tuple[np.ndarray, ...], np.ndarray | None]:
        """For the compiled kernels: each model's flat array (fp32 deltas, or a source: fp32, or bf16
        as uint16 bits), and the flat base to subtract (None when the arrays are deltas already)."""
        if self.deltas is not None:
            flat = self.deltas.reshape(self.n_models, -1).numpy()
            return tuple(flat[e] for e in range(self.n_models)), None
        return tuple(array_of(s) for s in self.sources), array_of(self.base)

    def pair(self, e: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(model e's flat array, the flat base to subtract or None), as `arrays`."""
        rows, sub = self.arrays()
        return rows[e], sub


def array_of(t: Tensor) -> np.ndarray:
    """A flat numpy view the kernels read: fp32 as is, bf16 as its uint16 bits."""
    flat = t.reshape(-1)
    return flat.view(torch.uint16).numpy() if flat.dtype == torch.bfloat16 else flat.numpy()
