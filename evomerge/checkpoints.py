"""Hugging Face checkpoints on disk: resolve references, read tensors lazily, write merged results.

A reference is a local folder or a Hub id `org/name[@revision]` resolved through huggingface_hub's
cache (a cluster downloads; offline, HF_HUB_OFFLINE=1 reads the cache only). Tensors are read from
memory-mapped safetensors one at a time; pickled `.bin` checkpoints are refused unless the user opts in,
since unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from evomerge.errors import ModelError

# Files copied verbatim from the base checkpoint into an exported one (config.json is rewritten).
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
class Checkpoint:
    """One model folder: its config and an index of tensor name -> (file, shape, dtype), read lazily."""

    path: Path
    config: dict
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    _files: dict[str, Path] = field(repr=False)
    _handles: dict[Path, object] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, ref: str, *, allow_pickle: bool = False) -> Checkpoint:
        path = resolve_model(ref)
        config = _read_config(path, ref)
        files = sorted(path.glob("*.safetensors"))
        if not files:
            return _open_pickled(path, ref, config, allow_pickle)
        shapes, dtypes, where = {}, {}, {}
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    sl = handle.get_slice(name)
                    shapes[name], dtypes[name], where[name] = tuple(sl.get_shape()), sl.get_dtype(), file
        return cls(path=path, config=config, shapes=shapes, dtypes=dtypes, _files=where)

    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    def tensor(self, name: str) -> torch.Tensor:
        file = self._files[name]
        if isinstance(file, dict):  # pickled checkpoint, already loaded
            return file[name]
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = safe_open(str(file), framework="pt")
        return handle.get_tensor(name)


def _read_config(path: Path, ref: str) -> dict:
    file = path / "config.json"
    if not file.is_file():
        raise ModelError(f"model {ref!r}: {path} has no config.json; is it a Hugging Face checkpoint folder?")
    return json.loads(file.read_text())


def _open_pickled(path: Path, ref: str, config: dict, allow_pickle: bool) -> Checkpoint:
    bins = sorted(path.glob("pytorch_model*.bin"))
    if not bins:
        raise ModelError(f"model {ref!r}: {path} has no *.safetensors weights")
    if not allow_pickle:
        raise ModelError(
            f"model {ref!r}: weights are pickled (.bin), which can run code when loaded; "
            "convert them to safetensors, or set models.allow_pickle: true if you trust them"
        )
    state: dict[str, torch.Tensor] = {}
    for file in bins:
        state.update(torch.load(file, map_location="cpu", weights_only=True))
    return Checkpoint(
        path=path,
        config=config,
        shapes={k: tuple(v.shape) for k, v in state.items()},
        dtypes={k: str(v.dtype).removeprefix("torch.") for k, v in state.items()},
        _files={k: state for k in state},  # type: ignore[misc]
    )


def check_mergeable(base: Checkpoint, sources: Iterable[tuple[str, Checkpoint]]) -> None:
    """Every source must have exactly the base's tensor names and shapes."""
    for label, src in sources:
        missing = [n for n in base.names if n not in src.shapes]
        extra = [n for n in src.names if n not in base.shapes]
        if missing or extra:
            what = f"lacks {missing[0]!r}" if missing else f"has {extra[0]!r}, which the base lacks"
            count = len(missing) + len(extra)
            raise ModelError(
                f"model {label!r} {what} ({count} tensor names differ from the base); "
                "merge only models fine-tuned from the same base architecture"
            )
        for name in base.names:
            if src.shapes[name] != base.shapes[name]:
                raise ModelError(
                    f"model {label!r}: tensor {name!r} has shape {list(src.shapes[name])}, "
                    f"the base has {list(base.shapes[name])}; merge only models of the same size"
                )


def write_checkpoint(
    tensors: Iterator[tuple[str, torch.Tensor]],
    out: Path,
    *,
    config: dict,
    side_files_from: Path,
    max_shard_bytes: int = 2 * 1024**3,
) -> list[Path]:
    """Stream named tensors into sharded safetensors in `out` (which must exist), plus config and tokenizer.

    Only one shard is held in memory at a time; a shard closes once it reaches `max_shard_bytes`.
    """
    shards: list[dict[str, torch.Tensor]] = [{}]
    written: list[tuple[str, list[str]]] = []
    size = 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            written.append(_flush_shard(shards.pop(), out, len(written)))
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    if shards[-1]:
        written.append(_flush_shard(shards.pop(), out, len(written)))
    files = _name_shards(out, written)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in SIDE_FILES:
        if (side_files_from / name).is_file():
            shutil.copy2(side_files_from / name, out / name)
    return files


def _flush_shard(shard: dict[str, torch.Tensor], out: Path, index: int) -> tuple[str, list[str]]:
    tmp_name = f"shard-{index:05d}.tmp"
    save_file(shard, str(out / tmp_name), metadata={"format": "pt"})
    return tmp_name, list(shard)


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
