"""Data-flow (layer path) models in memory: source models resident, each candidate a new list of slots.

A worker loads every model a path names once (`PathModels`). A candidate is built by giving one model
shell a new decoder-layer list of `PathSlot`s, each a thin wrapper that multiplies the hidden state
entering it by its scale and calls a resident layer, shared by reference: a path that runs layer 3 of
model B twice holds layer 3 once. Nothing is copied or written to disk, so a build takes milliseconds.

The shell is made once per embedding model (a structural copy of that model whose parameters and
buffers are the resident ones), so the scorer, which wraps the live model in lm-eval's HFLM once, sees
the same object for every candidate. Its config follows the path: the layer count and every per-layer
list (Qwen2's `layer_types`) are rewritten per candidate, exactly as the exported checkpoint's config is.

KV cache: lm-eval calls `generate(..., use_cache=True)` whatever the config says, so disabling the
cache in the config would not stop it. Instead each slot gives its attention modules the slot's index
as `layer_idx` while it runs, so a layer that runs twice writes two cache entries, as the exported
checkpoint's two separate layers do. With the cache off the indices are simply unused.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from evomerge.models.checkpoints import Checkpoint
from evomerge.errors import ModelError
from evomerge.models.layout import layer_count_key, layer_index, num_layers
from evomerge.recipe import PathRecipe, Slot

_NOT_PER_LAYER = frozenset({"architectures"})  # lists in a config that are not one entry per layer


class PathSlot(nn.Module):
    """Slot `index` of a path: scales its input by `scale`, then runs a shared decoder layer as layer `index`."""

    def __init__(self, layer: nn.Module, scale: float, index: int) -> None:
        super().__init__()
        self.layer = layer
        self.scale = float(scale)
        self.index = index
        self._indexed = [m for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)]

    def forward(self, *args, **kwargs):
        if self.scale != 1.0:  # the hidden state comes first, or by name
            if "hidden_states" in kwargs:
                kwargs["hidden_states"] = kwargs["hidden_states"] * self.scale
            else:
                args = (args[0] * self.scale, *args[1:])
        saved = [m.layer_idx for m in self._indexed]
        for m in self._indexed:
            m.layer_idx = self.index  # this slot's KV-cache entry, not the shared layer's own
        try:
            return self.layer(*args, **kwargs)
        finally:
            for m, idx in zip(self._indexed, saved):
                m.layer_idx = idx

    def __getattr__(self, name: str):
        # Model code may read attributes off its layers (`attention_type` in some families): answer for the wrapped one.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)


def path_config(embed_config: dict, slots: Sequence[Slot], configs: Sequence[dict]) -> dict:
    """The config of a path model: `embed_config` with the layer count and per-layer lists following `slots`.

    configs[m] is model m's config; a per-layer list entry of slot i comes from its own model and layer.
    A per-layer list is any list whose length is the layer count (`layer_types`, ...), `architectures` aside.
    """
    out = dict(embed_config)
    out[layer_count_key(embed_config)] = len(slots)
    for key in per_layer_keys(embed_config):
        out[key] = [configs[m][key][layer] for m, layer, _ in slots]
    return out


def per_layer_keys(config: dict) -> list[str]:
    n = num_layers(config)
    return [k for k, v in config.items() if isinstance(v, list) and len(v) == n and k not in _NOT_PER_LAYER]



def check_path_model(config: dict) -> None:
    """Refuse configs whose layers depend on their position in a way a path cannot keep."""
    if config.get("scale_attn_by_inverse_layer_idx"):
        raise ModelError(
            "config.scale_attn_by_inverse_layer_idx is true: attention is scaled by the layer's position, so a "
            "layer moved along a path computes something else; data-flow search does not support this model"
        )
    if config.get("add_cross_attention"):
        raise ModelError("config.add_cross_attention is true; data-flow search supports decoder-only models")


def layer_container(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """(parent module, attribute name, ModuleList) of the model's decoder layers."""
    n = num_layers(model.config.to_dict())
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and layer_index(f"{name}.0.") == 0:
            parent_name, _, attr = name.rpartition(".")
            return model.get_submodule(parent_name), attr, module
    raise ModelError(f"{type(model).__name__}: found no list of {n} decoder layers (model.layers / transformer.h)")


class PathModels:
    """Resident source models (loaded on first use) and one path-model shell per embedding model."""

    def __init__(self, device: torch.device, dtype: torch.dtype | str = "auto", *, allow_pickle: bool = False,
                 trust_remote_code: bool = False) -> None:
        self.device, self.dtype = device, dtype
        self.allow_pickle, self.trust_remote_code = allow_pickle, trust_remote_code
        self._models: dict[str, nn.Module] = {}
        self._layers: dict[str, list[nn.Module]] = {}  # each model's own decoder layers, in order
        self._shells: dict[str, nn.Module] = {}  # embed ref -> path-model shell
        self._tokenizers: dict[str, object] = {}

    def model(self, ref: str) -> nn.Module:
        """The resident model `ref`, loaded on first use."""
        if ref not in self._models:
            from transformers import AutoModelForCausalLM

            path = Checkpoint.open(ref, allow_pickle=self.allow_pickle).path
            model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype, trust_remote_code=self.trust_remote_code)
            check_path_model(model.config.to_dict())
            self._models[ref] = model.to(self.device).eval()
            self._layers[ref] = list(layer_container(model)[2])
        return self._models[ref]

    def resident_bytes(self) -> int:
        """Bytes of the resident models' parameters and buffers (shells share them)."""
        return sum(t.nbytes for m in self._models.values() for t in (*m.parameters(), *m.buffers()))

    def build(self, recipe: PathRecipe) -> nn.Module:
        """The path model of `recipe`: the same shell object for every recipe with the same embedding model."""
        for m in sorted({m for m, _, _ in recipe.slots}):
            self.model(recipe.models[m])
        shell = self._shell(recipe.models[recipe.embed_from])
        slots = []
        for i, (m, layer, scale) in enumerate(recipe.slots):
            layers = self._layers[recipe.models[m]]
            if layer >= len(layers):
                raise ModelError(f"path slot {i}: {recipe.models[m]!r} has {len(layers)} layers, the path asks for layer {layer}")
            slots.append(PathSlot(layers[layer], scale, i))
        parent, attr = shell._evomerge_layers
        setattr(parent, attr, nn.ModuleList(slots))
        self._set_config(shell, recipe)
        return shell

    def tokenizer(self, recipe: PathRecipe) -> object:
        """The embedding model's tokenizer (loaded on first use)."""
        ref = recipe.models[recipe.embed_from]
        if ref not in self._tokenizers:
            from transformers import AutoTokenizer

            path = Checkpoint.open(ref, allow_pickle=self.allow_pickle).path
            self._tokenizers[ref] = AutoTokenizer.from_pretrained(path, trust_remote_code=self.trust_remote_code)
        return self._tokenizers[ref]

    def _shell(self, ref: str) -> nn.Module:
        if ref not in self._shells:
            source = self.model(ref)
            # A structural copy whose tensors are the source's own (memo maps each tensor to itself).
            memo = {id(t): t for t in (*source.parameters(), *source.buffers())}
            shell = copy.deepcopy(source, memo)
            shell._evomerge_layers = layer_container(shell)[:2]  # (parent, attr) of its layer list
            self._shells[ref] = shell.eval()
        return self._shells[ref]

    def _set_config(self, shell: nn.Module, recipe: PathRecipe) -> None:
        configs = [self._models[r].config.to_dict() if r in self._models else {} for r in recipe.models]
        embed = configs[recipe.embed_from]
        new = path_config(embed, recipe.slots, configs)
        for key in (layer_count_key(embed), *per_layer_keys(embed)):
            setattr(shell.config, key, new[key])

