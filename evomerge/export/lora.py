"""LoRA sources: `MODEL+ADAPTER` references, each written once as a merged checkpoint in a cache folder.

    folder = lora_checkpoint("./base", "./adapter")         # $EVOMERGE_CACHE/lora/<name>, written on first use
    recipe = resolve_loras(recipe)                          # every MODEL+ADAPTER in a recipe -> its folder

As mergekit does (`--lora-merge-cache`, its `ModelReference.merged`), an adapter is applied to its model
before merging, and the result is an ordinary checkpoint that workers and exports read like any other (a
worker keeps nothing more per parameter than for any source; the cache holds one copy of the model on
disk per adapter, in the model's dtype). The cache folder's name holds the model's and adapter's folder
names and a hash of their paths and of the adapter's files, so an adapter changed in place is merged
again; a folder is complete once it exists (written under a temporary name, renamed at the end).

The arithmetic is peft's `merge_and_unload` (what mergekit runs), read from adapter_config.json and
adapter_model.safetensors directly and streamed one tensor at a time: for a LoRA on a linear layer
W += (B @ A) * s (A and B in fp32, as peft upcasts adapter weights; the sum rounded once to W's dtype), on
an embedding W += round((B @ A)^T * s) (rounded to W's dtype before the sum, as peft does); s = lora_alpha / r (/ sqrt(r) with use_rslora;
alpha_pattern per module, r from A's rows); tensors the adapter saves whole (modules_to_save, embedding
base layers) replace the model's. Memory while writing: one tensor of the model, its fp32 delta (4 bytes
per entry) and its A and B. Refused, one line each: DoRA, adapters that resize the vocabulary, adapter
types other than LoRA.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from evomerge.dirs import cache_root
from evomerge.errors import ConfigError, ModelError
from evomerge.models.checkpoints import Checkpoint, TensorInfo, dtype_of, write_checkpoint
from evomerge.models.headers import read_json_object, resolve_model
from evomerge.recipe import PathRecipe, Recipe
from evomerge.recipe.refs import is_lora, split_lora
from evomerge.recipe.tokenizer import TokenizerSpec, TokenSetting

PREFIX = "base_model.model."  # how peft names the wrapped model's modules in a saved adapter
_LINEAR = (".lora_A.weight", ".lora_B.weight")
_EMBEDDING = (".lora_embedding_A", ".lora_embedding_B")


def default_cache() -> Path:
    return cache_root() / "lora"


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter as saved by peft: its config and tensors, keyed by the model's module names."""

    folder: Path
    config: dict
    tensors: dict[str, torch.Tensor]  # names relative to the model (peft's prefix removed)

    @classmethod
    def open(cls, ref: str, *, allow_pickle: bool = False) -> Adapter:
        folder = resolve_model(ref)
        config = _adapter_config(folder, ref)
        return cls(folder, config, _adapter_tensors(folder, ref, allow_pickle))

    def scaling(self, module: str, rank: int) -> float:
        """peft's scaling of `module`: its alpha (alpha_pattern, else lora_alpha) over r (or sqrt(r), rslora)."""
        alpha = self.config.get("lora_alpha", 8)
        for pattern, value in (self.config.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                alpha = value
                break
        return alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank

    def apply(self, module: str, weight: torch.Tensor) -> torch.Tensor:
        """`module`'s weight with its LoRA added in place, as peft merges: a linear layer's fp32 update summed
        in fp32 and rounded to the weight's dtype; an embedding's update rounded to it first, then added."""
        if module + _LINEAR[0] in self.tensors:
            a, b = (self.tensors[module + s].float() for s in _LINEAR)
            return weight.add_((b @ a) * self.scaling(module, a.shape[0]))
        if module + _EMBEDDING[0] in self.tensors:
            a, b = (self.tensors[module + s].float() for s in _EMBEDDING)
            return weight.add_(((b @ a).T * self.scaling(module, a.shape[0])).to(weight.dtype))
        return weight

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The model tensors this adapter changes, with the shape it assumes for each."""
        out = {name: tuple(t.shape) for name, t in self.whole().items()}
        for name, a in self.tensors.items():
            if name.endswith(_LINEAR[0]):
                module = name.removesuffix(_LINEAR[0])
                out[module + ".weight"] = (self.tensors[module + _LINEAR[1]].shape[0], a.shape[1])
            elif name.endswith(_EMBEDDING[0]):
                module = name.removesuffix(_EMBEDDING[0])
                out[module + ".weight"] = (a.shape[1], self.tensors[module + _EMBEDDING[1]].shape[0])
        return out

    def changes(self, module: str) -> bool:
        return any(module + s in self.tensors for s in (_LINEAR[0], _EMBEDDING[0], ".lora_B.bias"))

    def whole(self) -> dict[str, torch.Tensor]:
        """Tensors the adapter saves whole (modules_to_save, embedding base layers), by the model's names."""
        lora = (*_LINEAR, *_EMBEDDING, ".lora_B.bias")
        out = {}
        for name, tensor in self.tensors.items():
            if not name.endswith(lora):
                out[name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")] = tensor
        return out


def _adapter_config(folder: Path, ref: str) -> dict:
    config = read_json_object(folder / "adapter_config.json", f"adapter {ref!r}", "is it a peft LoRA adapter folder?")
    if config.get("peft_type", "LORA") != "LORA":
        raise ModelError(f"adapter {ref!r}: peft_type {config.get('peft_type')!r}; evomerge applies LoRA adapters only")
    if config.get("use_dora"):
        raise ModelError(f"adapter {ref!r}: a DoRA adapter (use_dora: true); merge it into its model with peft first")
    if config.get("fan_in_fan_out"):
        raise ModelError(f"adapter {ref!r}: fan_in_fan_out adapters (GPT-2 Conv1D) are not supported; merge it with peft first")
    return config


def _adapter_tensors(folder: Path, ref: str, allow_pickle: bool) -> dict[str, torch.Tensor]:
    file = folder / "adapter_model.safetensors"
    if file.is_file():
        from safetensors.torch import load_file

        raw = load_file(str(file))
    elif (folder / "adapter_model.bin").is_file() and allow_pickle:
        raw = torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ModelError(f"adapter {ref!r}: {folder} has no adapter_model.safetensors"
                         + (" (adapter_model.bin is pickled: set models.allow_pickle: true if you trust it)"
                            if (folder / "adapter_model.bin").is_file() else ""))
    if any(name.endswith("lora_magnitude_vector") for name in raw):
        raise ModelError(f"adapter {ref!r}: holds DoRA magnitude vectors; merge it into its model with peft first")
    return {name.removeprefix(PREFIX): tensor for name, tensor in raw.items()}


def merged_tensors(model: Checkpoint, adapter: Adapter) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the model with the adapter applied, one tensor at a time, in the model's dtypes
    (`check_targets` first)."""
    whole = adapter.whole()
    for name in model.names:
        tensor = whole[name].to(dtype_of(model.dtypes[name])) if name in whole else model.tensor(name)
        module, _, kind = name.rpartition(".")
        if kind == "weight" and adapter.changes(module):
            tensor = adapter.apply(module, tensor.clone() if name in whole else tensor)
        elif kind == "bias" and module + ".lora_B.bias" in adapter.tensors:
            tensor = (tensor.clone() if name in whole else tensor).add_(_bias_delta(adapter, module))
        yield name, tensor


def _bias_delta(adapter: Adapter, module: str) -> torch.Tensor:
    """peft's lora_bias: the bias += B's bias * scaling."""
    return adapter.tensors[module + ".lora_B.bias"].float() * adapter.scaling(module, adapter.tensors[module + _LINEAR[0]].shape[0])


def check_targets(model: Checkpoint, adapter: Adapter, ref: str) -> None:
    """Every tensor the adapter changes is one of the model's, with the model's shape."""
    for name, shape in sorted(adapter.shapes().items()):
        if name not in model.shapes:
            raise ModelError(f"adapter {ref!r}: changes {name!r}, which model {str(model.path)!r} lacks; is it this model's adapter?")
        if shape != tuple(model.shapes[name]):
            raise ModelError(f"adapter {ref!r}: changes {name!r} as shape {list(shape)}, the model has {list(model.shapes[name])} "
                             "; is it this model's adapter? (one trained after resize_token_embeddings needs that resized model as MODEL)")


def lora_checkpoint(model_ref: str, adapter_ref: str, cache: Path | None = None, *, allow_pickle: bool = False) -> Path:
    """The cache folder holding `model_ref` with `adapter_ref` applied, written on first use (module docstring)."""
    model = Checkpoint.open(model_ref, allow_pickle=allow_pickle)
    adapter_folder = resolve_model(adapter_ref)
    folder = (cache or default_cache()) / _folder_name(model.path, adapter_folder)
    if folder.is_dir():
        return folder
    adapter = Adapter.open(adapter_ref, allow_pickle=allow_pickle)
    check_targets(model, adapter, f"{model_ref}+{adapter_ref}")
    _write(model, adapter, folder, f"{model_ref}+{adapter_ref}")
    return folder


def _folder_name(model: Path, adapter: Path) -> str:
    """`<model>_<adapter>_<hash>`: the hash covers both paths and the adapter's files (size, mtime)."""
    files = sorted(p for p in adapter.iterdir() if p.name.startswith("adapter_"))
    stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    key = json.dumps([str(model), str(adapter), stamp])
    return f"{model.name}_{adapter.name}_{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _write(model: Checkpoint, adapter: Adapter, folder: Path, ref: str) -> None:
    plan = [TensorInfo(n, tuple(model.shapes[n]), dtype_of(model.dtypes[n])) for n in model.names]
    tmp = folder.parent / f".{folder.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write_checkpoint(merged_tensors(model, adapter), tmp, config=dict(model.config), side_files_from=model.path, plan=plan)
        (tmp / "README.md").write_text(f"# {ref}\n\nModel `{model.path}` with LoRA adapter `{adapter.folder}` applied "
                                       "(peft's merge_and_unload arithmetic), written by evomerge.\n")
        try:
            tmp.rename(folder)
        except OSError:
            if not folder.is_dir():  # another process finished first: its folder is the same model
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- references in recipes -----------------------------------------------------------------------


def resolve_loras(recipe: Recipe | PathRecipe, cache: Path | None = None, *, allow_pickle: bool = False) -> Recipe | PathRecipe:
    """`recipe` with every `MODEL+ADAPTER` reference (models, tokenizer sources) replaced by its merged folder."""
    refs = _refs(recipe)
    done = {r: str(lora_checkpoint(*split_lora(r), cache, allow_pickle=allow_pickle)) for r in refs if is_lora(r)}
    if not done:
        return recipe
    if isinstance(recipe, PathRecipe):
        return replace(recipe, models=tuple(done.get(m, m) for m in recipe.models))
    return replace(recipe, base=done.get(recipe.base, recipe.base), sources=tuple(done.get(s, s) for s in recipe.sources),
                   tokenizer=_tokenizer_refs(recipe.tokenizer, done))


def _refs(recipe: Recipe | PathRecipe) -> list[str]:
    if isinstance(recipe, PathRecipe):
        return list(recipe.models)
    spec = recipe.tokenizer or TokenizerSpec()
    named = [spec.source, *(t.source.model for t in spec.tokens if t.source is not None)]
    return [recipe.base, *recipe.sources, *(r for r in named if r is not None)]


def _tokenizer_refs(spec: TokenizerSpec | None, done: Mapping[str, str]) -> TokenizerSpec | None:
    if spec is None:
        return None

    def token(t: TokenSetting) -> TokenSetting:
        if t.source is None or t.source.model is None:
            return t
        return replace(t, source=replace(t.source, model=done.get(t.source.model, t.source.model)))
    return replace(spec, source=done.get(spec.source, spec.source) if spec.source else None, tokens=tuple(map(token, spec.tokens)))


def check_adapter_ref(ref: str, where: str) -> None:
    """A one-line ConfigError for a `MODEL+ADAPTER` whose adapter folder has no adapter_config.json."""
    _, adapter = split_lora(ref)
    if adapter is not None and not (resolve_model(adapter) / "adapter_config.json").is_file():
        raise ConfigError(f"{where} = {ref!r}: {adapter!r} is not a peft adapter folder (no adapter_config.json)")
