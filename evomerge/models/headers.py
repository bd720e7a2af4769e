"""What a checkpoint holds, read from its headers alone: config, tensor names, shapes and dtypes (no torch).

The controller checks models with this before any worker starts (a missing folder, a truncated file,
a shard that the index lists but the folder lacks, sources that do not fit the base), without loading
torch or any weight. `checkpoints.Checkpoint` adds the tensor reads on top. `nonfinite` counts NaN and
inf values of one tensor from its bytes (numpy), so the controller can tell a broken checkpoint from a
degenerate recipe.

A reference is a local folder or a Hub id `org/name[@revision]` resolved through huggingface_hub's
cache (a cluster downloads; offline, HF_HUB_OFFLINE=1 reads the cache only). Pickled `.bin`
checkpoints are refused unless the user opts in, since unpickling runs arbitrary code; their header is
read with an unpickler that only knows tensors and ordered dicts, so reading it runs no code either.
"""

from __future__ import annotations

import collections
import json
import os
import pickle
import re
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from evomerge.errors import ModelError
from evomerge.models.layout import layer_index

INDEX_FILE = "model.safetensors.index.json"


def resolve_model(ref: str) -> Path:
    """A local checkpoint folder for `ref`, or a ModelError that says how to make it available."""
    local = Path(ref).expanduser()
    if local.is_dir():
        return local.resolve()
    if ref.startswith((".", "/", "~")) or ref.count("/") != 1:
        raise ModelError(f"model {ref!r}: no such folder; pass an HF checkpoint folder or a Hub id 'org/name'")
    repo_id, _, revision = ref.partition("@")
    from huggingface_hub import snapshot_download  # lazy: only Hub ids need it

    try:
        return Path(snapshot_download(repo_id, revision=revision or None))
    except Exception as exc:  # noqa: BLE001 -- any hub failure means "not available here"
        offline = " (HF_HUB_OFFLINE is set: only the local cache is read)" if os.environ.get("HF_HUB_OFFLINE") else ""
        reason = str(exc).splitlines()[0][:160]
        raise ModelError(f"model {ref!r}: not a local folder and not available from the Hub{offline}: {reason}") from None


@dataclass
class CheckpointHeader:
    """One model folder: its config and an index of tensor name -> (file, shape, dtype, byte range)."""

    path: Path
    config: dict
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]  # safetensors dtype names ("BF16", "F32", ...); torch names for pickled ones
    _files: dict[str, Path] = field(repr=False)
    _spans: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False)  # absolute byte range

    @classmethod
    def open(cls, ref: str, *, allow_pickle: bool = False) -> CheckpointHeader:
        path = resolve_model(ref)
        config = read_config(path, ref)
        weight_map = read_weight_map(path, ref)
        files = sorted(path.glob("*.safetensors"))
        if not files and not weight_map:
            return cls(path, config, *_pickled_index(path, ref, allow_pickle))
        shapes, dtypes, where, spans = {}, {}, {}, {}
        for file in files:
            for name, (dtype, shape, span) in read_safetensors_index(file).items():
                shapes[name], dtypes[name], where[name], spans[name] = shape, dtype, file, span
        unlisted = [name for name in weight_map if name not in shapes]
        if unlisted:
            raise ModelError(f"model {ref!r}: tensor {unlisted[0]!r} is listed in {INDEX_FILE} (in {weight_map[unlisted[0]]}) "
                             f"but is in none of the shard files ({len(unlisted)} tensors missing); re-download the checkpoint")
        return cls(path=path, config=config, shapes=shapes, dtypes=dtypes, _files=where, _spans=spans)

    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    @property
    def pickled(self) -> bool:
        return not self._spans and bool(self.shapes)

    def nonfinite(self, name: str) -> int | None:
        """How many NaN or inf values tensor `name` holds, read from its file without torch; None when
        that cannot be told without unpickling (a .bin checkpoint)."""
        if self.pickled or name not in self._spans:
            return None
        layout = _FLOAT_BITS.get(self.dtypes[name])
        if layout is None:
            return 0  # integer and bool tensors hold no NaN
        bits, inf, magnitude = layout
        start, end = self._spans[name]
        if end == start:
            return 0
        data = np.memmap(self._files[name], dtype=np.uint8, mode="r", offset=start, shape=(end - start,)).view(bits)
        step = 1 << 24  # entries per pass: bounded temporaries for any tensor size
        return sum(int(np.count_nonzero((data[i:i + step] & magnitude) >= inf)) for i in range(0, len(data), step))


# safetensors float dtypes -> (unsigned view, the bits of +inf (NaN for e4m3, which has no inf), the
# mask that drops the sign): a value is NaN or inf when its magnitude bits are at least inf's
_FLOAT_BITS = {
    "F64": (np.uint64, np.uint64(0x7FF0000000000000), np.uint64(0x7FFFFFFFFFFFFFFF)),
    "F32": (np.uint32, np.uint32(0x7F800000), np.uint32(0x7FFFFFFF)),
    "F16": (np.uint16, np.uint16(0x7C00), np.uint16(0x7FFF)),
    "BF16": (np.uint16, np.uint16(0x7F80), np.uint16(0x7FFF)),
    "F8_E5M2": (np.uint8, np.uint8(0x7C), np.uint8(0x7F)),
    "F8_E4M3": (np.uint8, np.uint8(0x7F), np.uint8(0x7F)),
}


def read_weight_map(path: Path, ref: str) -> dict[str, str]:
    """Tensor name -> shard file from the folder's model.safetensors.index.json ({} without one); a
    ModelError when the index does not parse or names a shard the folder lacks."""
    index = path / INDEX_FILE
    if not index.is_file():
        return {}
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (ValueError, AttributeError):
        weight_map = None
    if not isinstance(weight_map, dict):
        raise ModelError(f"model {ref!r}: {index} is not a safetensors index (no weight_map mapping); re-download it")
    shards = sorted(set(map(str, weight_map.values())))
    missing = [shard for shard in shards if not (path / shard).is_file()]
    if missing:
        raise ModelError(f"model {ref!r}: shard {missing[0]} is listed in {INDEX_FILE} but missing from {path} "
                         f"({len(missing)} of {len(shards)} shards missing); re-download the checkpoint")
    return {str(k): str(v) for k, v in weight_map.items()}


def read_safetensors_index(file: Path) -> dict[str, tuple[str, tuple[int, ...], tuple[int, int]]]:
    """name -> (dtype name, shape, absolute byte range) from a safetensors header, names sorted (as
    safetensors' own `keys()` lists them)."""
    with open(file, "rb") as handle:
        head = handle.read(8)
        size = int.from_bytes(head, "little") if len(head) == 8 else -1
        text = handle.read(size) if 0 < size <= 100 * 1024**2 else b""
    try:
        header = json.loads(text)
    except ValueError:
        header = None
    if not isinstance(header, dict):
        raise ModelError(f"{file}: not a safetensors file (its header does not parse); re-save or re-download it")
    start = 8 + size
    out = {}
    try:
        for name in sorted(header):
            if name != "__metadata__":
                info = header[name]
                begin, end = info["data_offsets"]
                out[name] = (str(info["dtype"]), tuple(int(d) for d in info["shape"]), (start + int(begin), start + int(end)))
    except (KeyError, TypeError, ValueError):
        raise ModelError(f"{file}: tensor {name!r} has a malformed safetensors header entry; re-save or re-download it") from None
    _check_length(file, max((end for _, _, (_, end) in out.values()), default=start))
    return out


def _check_length(file: Path, data_end: int) -> None:
    """A file shorter than its header says (an interrupted download or copy) is refused up front."""
    size = file.stat().st_size
    if size < data_end:
        raise ModelError(f"{file}: truncated: its header says the tensor data ends at byte {data_end}, but the file has "
                         f"{size} bytes; re-download or re-save it")


def read_config(path: Path, ref: str) -> dict:
    return read_json_object(path / "config.json", f"model {ref!r}", "is it a Hugging Face checkpoint folder?")


def read_json_object(file: Path, label: str, missing_hint: str) -> dict:
    """A model folder's JSON file (config.json, adapter_config.json) as a dict, or a one-line ModelError
    that names the file and says how to fix it (`label`: whose file, e.g. "model 'x'")."""
    if not file.is_file():
        raise ModelError(f"{label}: {file.parent} has no {file.name}; {missing_hint}")
    try:
        config = json.loads(file.read_text())
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
        raise ModelError(f"{label}: {file} is not valid JSON ({str(exc).splitlines()[0]}); fix or re-download it") from None
    if not isinstance(config, dict):
        raise ModelError(f"{label}: {file} holds a {type(config).__name__}, not a JSON object; fix or re-download it")
    return config


def pickled_files(path: Path, ref: str, allow_pickle: bool) -> list[Path]:
    """The folder's pytorch_model*.bin files, or a ModelError: none there, or pickles not allowed."""
    bins = sorted(path.glob("pytorch_model*.bin"))
    if not bins:
        raise ModelError(f"model {ref!r}: {path} has no *.safetensors weights")
    if not allow_pickle:
        raise ModelError(
            f"model {ref!r}: weights are pickled (.bin), which can run code when loaded; "
            "convert them to safetensors, or set models.allow_pickle: true if you trust them"
        )
    return bins


def _pickled_index(path: Path, ref: str, allow_pickle: bool) -> tuple[dict, dict, dict]:
    """(shapes, dtypes, files) of a pickled checkpoint, read without running its pickle's code."""
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    files: dict[str, Path] = {}
    for file in pickled_files(path, ref, allow_pickle):
        for name, (dtype, shape) in _pickled_tensors(file).items():
            shapes[name], dtypes[name], files[name] = shape, dtype, file
    return shapes, dtypes, files


# torch's legacy storage class names (what torch.save pickles) -> torch dtype names
_STORAGE_DTYPES = {
    "FloatStorage": "float32", "HalfStorage": "float16", "BFloat16Storage": "bfloat16", "DoubleStorage": "float64",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool",
}


class _HeaderUnpickler(pickle.Unpickler):
    """Reads a torch.save'd state dict as {name: (dtype, shape)}: knows tensors and ordered dicts only."""

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) in (("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")):
            return lambda storage, offset, size, *rest: (storage, tuple(int(d) for d in size))
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return lambda data, *rest: data
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(f"{module}.{name}")

    def persistent_load(self, pid):  # noqa: ANN001, ANN201 -- ('storage', dtype name, key, location, numel)
        return pid[1]


def _pickled_tensors(file: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    try:
        with zipfile.ZipFile(file) as archive:
            entry = next(n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl")
            state = _HeaderUnpickler(archive.open(entry)).load()
    except (zipfile.BadZipFile, StopIteration, pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise ModelError(f"{file}: not a state dict of tensors that evomerge can read ({exc}); "
                         "convert the checkpoint to safetensors") from None
    if not isinstance(state, dict):
        raise ModelError(f"{file}: holds a {type(state).__name__}, not a state dict; convert it to safetensors")
    return dict(state)


def check_mergeable(base: CheckpointHeader, sources: Iterable[tuple[str, CheckpointHeader]]) -> None:
    """Every source must have exactly the base's tensor names and shapes, except the rows (tokens) of its
    embeddings and head: an instruct fine-tune that added tokens is merged by token (`vocab_differs`)."""
    sources = list(sources)
    _refuse_base_lacking(base, sources)
    for label, src in sources:
        missing = [n for n in base.names if n not in src.shapes]
        extra = [n for n in src.names if n not in base.shapes]
        if missing or extra:
            what = f"lacks {missing[0]!r}" if missing else f"has {extra[0]!r}, which the base lacks"
            count = len(missing) + len(extra)
            shard = "" if missing else " (if the base is missing a shard file, re-download it)"
            raise ModelError(
                f"model {label!r} {what} ({count} tensor names differ from the base){shard}; "
                "merge only models fine-tuned from the same base architecture"
            )
        token_rows = set(vocab_names(base)) & set(vocab_names(src))
        for name in base.names:
            theirs, ours = src.shapes[name], base.shapes[name]
            if theirs != ours and not (name in token_rows and theirs[1:] == ours[1:]):
                raise ModelError(
                    f"model {label!r}: tensor {name!r} has shape {list(theirs)}, "
                    f"the base has {list(ours)}; merge only models of the same size"
                )


# Tensors whose first axis is the vocabulary (mergekit's `vocabulary_axis: 0`), by a part of their name.
VOCAB_TENSORS = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings", "lm_head", "embed_out")


def vocab_size(config: dict) -> int | None:
    """The config's vocab_size (a multimodal model's text_config's), or None."""
    size = config.get("vocab_size")
    if isinstance(size, int):
        return size
    text = config.get("text_config")
    return vocab_size(text) if isinstance(text, dict) else None


def vocab_names(header: CheckpointHeader) -> list[str]:
    """The embeddings and head: tensors outside the layers whose rows are the model's vocab_size tokens."""
    size = vocab_size(header.config)
    return [n for n in header.names if layer_index(n) is None and any(f in n for f in VOCAB_TENSORS)
            and header.shapes[n][:1] == (size,)]


def vocab_differs(base: CheckpointHeader, sources: Iterable[CheckpointHeader]) -> bool:
    """Whether some source's embeddings or head have other rows than the base's (`check_mergeable` passed)."""
    return any(src.shapes[n] != base.shapes[n] for src in sources for n in vocab_names(base))


def _refuse_base_lacking(base: CheckpointHeader, sources: list[tuple[str, CheckpointHeader]]) -> None:
    """Tensors that two or more sources all have and the base lacks are the base's fault (a shard file
    missing, most often), not a source's."""
    if len(sources) < 2:
        return
    lacking = set.intersection(*(set(src.shapes) - set(base.shapes) for _, src in sources))
    if lacking:
        raise ModelError(f"the base model {base.path} lacks {len(lacking)} tensors that every source has (e.g. "
                         f"{sorted(lacking)[0]!r}); is one of its shard files missing? re-download it")


_NAMED_TENSOR = re.compile(r"tensor '([^']+)'")


def broken_checkpoint_message(refs: Iterable[str], failure: str, *, allow_pickle: bool = False) -> str | None:
    """When a merge failed on NaN or inf (`failure`, its message) because a model holds such values, the
    one-line message that blames that checkpoint rather than the recipe; None when every model is finite.

    Looks at the tensor the failure names (`tensor 'NAME'`), or at every tensor when it names none."""
    if not re.search(r"\b(NaN|nan|inf)\b", failure):
        return None
    named = _NAMED_TENSOR.search(failure)
    for ref in refs:
        header = CheckpointHeader.open(str(ref), allow_pickle=allow_pickle)
        for name in [named.group(1)] if named else header.names:
            count = header.nonfinite(name) if name in header.shapes else None
            if count:
                return (f"model {ref!r}: tensor {name!r} holds {count} NaN or inf values, so every merge with it fails; "
                        "the checkpoint is broken, not the recipe: re-save or re-download it")
    return None
