"""Hugging Face checkpoints on disk: read tensors lazily, write merged results.

`headers.py` finds and indexes a checkpoint without torch; `Checkpoint` adds the reads. Tensors are read one at a
time with plain positioned reads at the offsets in the safetensors header, not through a memory map:
mapped pages a merge has touched stay resident (and count in its RSS) until the map closes, so a
streaming merge over four 1 GiB models would hold all four. Pickled `.bin` checkpoints (only when the
user opts in) are loaded with `torch.load(weights_only=True)` on the first read.

Writing streams too: each shard's header is written first (names, shapes and dtypes are known up front,
from a plan or, without one, once the shard is complete) and every tensor's bytes go straight to their
offset, so memory holds one tensor, never a shard.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evomerge.dtypes import is_float_name
from evomerge.errors import ModelError
from evomerge.models.headers import CheckpointHeader, check_mergeable, read_safetensors_index, resolve_model

__all__ = ["Checkpoint", "CheckpointParts", "TensorInfo", "check_mergeable", "dtype_of", "read_safetensors_index", "resolve_model",
           "torch_dtype", "write_checkpoint"]

# Files copied verbatim from the base checkpoint into an exported one (config.json is rewritten); all but
# the first are the tokenizer's, which an export with its own tokenizer writes instead.
SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)



@dataclass
class Checkpoint(CheckpointHeader):
    """A checkpoint whose tensors can be read, one at a time (see the module docstring)."""

    _handles: dict[Path, int] = field(default_factory=dict, init=False, repr=False)  # open file descriptors
    _state: dict[str, torch.Tensor] | None = field(default=None, init=False, repr=False)  # a pickled checkpoint, loaded
    _maps: dict[Path, mmap.mmap] = field(default_factory=dict, init=False, repr=False)  # read-only file maps

    def mapped(self, name: str) -> torch.Tensor:
        """Tensor `name` as a read-only view of the memory-mapped file: no copy, its pages live in the
        OS page cache, shared by every process on the node that maps the same file. Never write to it."""
        if self.pickled:
            raise ModelError(f"{self.path}: pickled (.bin) weights cannot be memory-mapped; convert them to "
                             "safetensors, or set workers.sources_on: host")
        file = self._files[name]
        if file not in self._maps:
            with open(file, "rb") as handle:
                self._maps[file] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        start, end = self._spans[name]
        data = np.frombuffer(self._maps[file], dtype=np.uint8, count=end - start, offset=start)
        with warnings.catch_warnings():  # read-only memory: torch warns that writes would fail, and none happen
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.from_numpy(data)
        return raw.view(dtype_of(self.dtypes[name])).reshape(self.shapes[name])

    @classmethod
    def open(cls, ref: str, *, allow_pickle: bool = False) -> Checkpoint:
        header = CheckpointHeader.open(ref, allow_pickle=allow_pickle)
        return cls(header.path, header.config, header.shapes, header.dtypes, header._files, header._spans)

    def tensor(self, name: str) -> torch.Tensor:
        """A fresh tensor (its own memory, not a view of the file), read with plain positioned reads."""
        if self.pickled:
            if self._state is None:
                self._state = {}
                for file in sorted(set(self._files.values())):
                    self._state.update(torch.load(file, map_location="cpu", weights_only=True))
            return self._state[name]
        file = self._files[name]
        fd = self._handles.get(file)
        if fd is None:
            fd = self._handles[file] = os.open(file, os.O_RDONLY)
        start, end = self._spans[name]
        data = torch.empty(end - start, dtype=torch.uint8)
        _pread_into(fd, memoryview(data.numpy()), start)
        return data.view(dtype_of(self.dtypes[name])).reshape(self.shapes[name])

    def __del__(self) -> None:
        for fd in getattr(self, "_handles", {}).values():
            try:
                os.close(fd)
            except (OSError, AttributeError):  # AttributeError: `os` already torn down at interpreter exit
                pass


# safetensors dtype names <-> torch dtypes (the ones torch has)
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_ST_NAMES = {dtype: name for name, dtype in _ST_DTYPES.items()}


def torch_dtype(name: str) -> torch.dtype | None:
    """torch's dtype for an `evomerge.dtypes` float name; None for "auto" (keep each tensor's own)."""
    return getattr(torch, name) if is_float_name(name) else None


def dtype_of(name: str) -> torch.dtype:
    """The torch dtype for a safetensors dtype name ("BF16") or a torch one ("bfloat16")."""
    if name in _ST_DTYPES:
        return _ST_DTYPES[name]
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ModelError(f"tensor dtype {name!r} is not one torch can hold")
    return dtype



def _pread_into(fd: int, buffer: memoryview, offset: int) -> None:
    done = 0
    while done < len(buffer):
        got = os.preadv(fd, [buffer[done:]], offset + done)
        if got <= 0:
            raise ModelError(f"file ended while reading a tensor at byte {offset + done}; is the checkpoint truncated?")
        done += got





@dataclass(frozen=True)
class TensorInfo:
    """What one output tensor will be, known before it is computed: enough to write headers first."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        numel = 1
        for dim in self.shape:
            numel *= dim
        return numel * self.dtype.itemsize


@dataclass
class CheckpointParts:
    """Everything `write_checkpoint` needs for one exported model, its tensors still unread."""

    config: dict
    tensors: Iterator[tuple[str, torch.Tensor]]  # in `plan` order when a plan is given
    side_files_from: Path  # tokenizer and generation config are copied from this folder
    plan: list[TensorInfo] | None = None
    extra_files: dict[str, str] = field(default_factory=dict)  # file name -> text, written beside the weights
    tokenizer: Any = None  # a transformers tokenizer to save instead of copying the base's (a merged vocabulary)


def write_checkpoint(
    tensors: Iterator[tuple[str, torch.Tensor]],
    out: Path,
    *,
    config: dict,
    side_files_from: Path,
    max_shard_bytes: int = 2 * 1024**3,
    plan: Sequence[TensorInfo] | None = None,
    tokenizer: Any = None,
) -> list[Path]:
    """Stream named tensors into sharded safetensors in `out` (which must exist), plus config and tokenizer
    (the base's files from `side_files_from`, or `tokenizer` saved with transformers when given).

    Memory holds one tensor at a time. With `plan` (every tensor's name, shape and dtype, in the order
    they will arrive) each shard's header is written first and each tensor goes straight to its offset.
    Without it, a shard's bytes are spooled to a side file and copied (in the kernel) behind the header
    once the shard is complete: the same files, one extra disk pass. A shard closes before the tensor
    that would take it past `max_shard_bytes`.
    """
    if plan is not None:
        written = _write_planned(tensors, out, list(plan), max_shard_bytes)
    else:
        written = _write_spooled(tensors, out, max_shard_bytes)
    files = _name_shards(out, written)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in SIDE_FILES[:1] if tokenizer is not None else SIDE_FILES:
        if (side_files_from / name).is_file():
            shutil.copy2(side_files_from / name, out / name)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return files


def _split_shards(infos: list[TensorInfo], max_shard_bytes: int) -> list[list[TensorInfo]]:
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for info in infos:
        if shards[-1] and size + info.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(info)
        size += info.nbytes
    return shards if shards[-1] else []


def _header(infos: list[TensorInfo]) -> tuple[bytes, dict[str, int]]:
    """The safetensors header (length prefix included) and each tensor's absolute offset in the file.

    Data is laid out as safetensors itself does it: by dtype size, largest first, then by name, so
    every tensor starts aligned to its element size; the header is padded with spaces to 8 bytes.
    """
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    relative, at = {}, 0
    for info in sorted(infos, key=lambda i: (-i.dtype.itemsize, i.name)):
        entries[info.name] = {"dtype": _ST_NAMES[info.dtype], "shape": list(info.shape), "data_offsets": [at, at + info.nbytes]}
        relative[info.name] = at
        at += info.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    head = len(text).to_bytes(8, "little") + text
    return head, {name: len(head) + offset for name, offset in relative.items()}


def _write_planned(
    tensors: Iterator[tuple[str, torch.Tensor]], out: Path, plan: list[TensorInfo], max_shard_bytes: int
) -> list[tuple[str, list[str]]]:
    where: dict[str, tuple[int, int]] = {}  # name -> (fd, absolute offset)
    fds, written = [], []
    try:
        for index, infos in enumerate(_split_shards(plan, max_shard_bytes)):
            tmp_name = f"shard-{index:05d}.tmp"
            fds.append(fd := os.open(out / tmp_name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
            head, offsets = _header(infos)
            _pwrite_all(fd, memoryview(head), 0)
            os.ftruncate(fd, len(head) + sum(i.nbytes for i in infos))
            where.update({name: (fd, offset) for name, offset in offsets.items()})
            written.append((tmp_name, [i.name for i in infos]))
        count = 0
        for name, tensor in tensors:
            _check_planned(name, tensor, plan[count] if count < len(plan) else None)
            _pwrite_all(where[name][0], _bytes_of(tensor), where[name][1])
            count += 1
        if count != len(plan):
            raise ValueError(f"write_checkpoint: the plan lists {len(plan)} tensors, but {count} arrived")
    finally:
        for fd in fds:
            os.close(fd)
    return written


def _check_planned(name: str, tensor: torch.Tensor, expected: TensorInfo | None) -> None:
    if expected is None:
        raise ValueError(f"write_checkpoint: got {name!r}, which the plan does not list (more tensors than planned)")
    if name != expected.name or tuple(tensor.shape) != expected.shape or tensor.dtype != expected.dtype:
        raise ValueError(
            f"write_checkpoint: got {name!r} {list(tensor.shape)} {tensor.dtype}, the plan says "
            f"{expected.name!r} {list(expected.shape)} {expected.dtype}; the plan must list the tensors in arrival order"
        )


def _write_spooled(tensors: Iterator[tuple[str, torch.Tensor]], out: Path, max_shard_bytes: int) -> list[tuple[str, list[str]]]:
    written: list[tuple[str, list[str]]] = []
    spool: _Spool | None = None
    for name, tensor in tensors:
        info = TensorInfo(name, tuple(tensor.shape), tensor.dtype)
        if spool is not None and spool.size + info.nbytes > max_shard_bytes:
            written.append(spool.close())
            spool = None
        if spool is None:
            spool = _Spool(out, len(written))
        spool.add(info, tensor)
    if spool is not None:
        written.append(spool.close())
    return written


class _Spool:
    """One shard's tensor bytes in arrival order, in a side file, until the header can be written."""

    def __init__(self, out: Path, index: int) -> None:
        self.tmp_name = f"shard-{index:05d}.tmp"
        self.out = out
        self.spool_path = out / f"shard-{index:05d}.spool"
        self.fd = os.open(self.spool_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self.infos: list[TensorInfo] = []
        self.at: dict[str, int] = {}
        self.size = 0

    def add(self, info: TensorInfo, tensor: torch.Tensor) -> None:
        self.at[info.name] = self.size
        _pwrite_all(self.fd, _bytes_of(tensor), self.size)
        self.infos.append(info)
        self.size += info.nbytes

    def close(self) -> tuple[str, list[str]]:
        head, offsets = _header(self.infos)
        dst = os.open(self.out / self.tmp_name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _pwrite_all(dst, memoryview(head), 0)
            for info in self.infos:
                _copy_range(self.fd, dst, self.at[info.name], offsets[info.name], info.nbytes)
        finally:
            os.close(dst)
            os.close(self.fd)
            self.spool_path.unlink()
        return self.tmp_name, [i.name for i in self.infos]


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """The tensor's raw little-endian bytes, without a copy when it is already contiguous on the CPU."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def _copy_range(src: int, dst: int, src_offset: int, dst_offset: int, count: int) -> None:
    done = 0
    while done < count:
        step = os.copy_file_range(src, dst, count - done, src_offset + done, dst_offset + done)
        if step <= 0:
            raise OSError(f"copy_file_range stopped after {done} of {count} bytes")
        done += step


def _name_shards(out: Path, written: list[tuple[str, list[str]]]) -> list[Path]:
    """Rename temporary shards to HF's names and write the index when there is more than one."""
    if len(written) == 1:
        final = out / "model.safetensors"
        (out / written[0][0]).rename(final)
        return [final]
    total = len(written)
    weight_map, files = {}, []
    for i, (tmp_name, names) in enumerate(written):
        final = out / f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        (out / tmp_name).rename(final)
        files.append(final)
        weight_map.update({n: final.name for n in names})
    size = sum(f.stat().st_size for f in files)
    index = {"metadata": {"total_size": size}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files
