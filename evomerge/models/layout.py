"""Architecture introspection from tensor names and the config, for any decoder family.

Decoder layers are found by the `.<container>.<index>.` part of a tensor name, which covers Llama,
Mistral and Qwen2 (`model.layers.N.`), GPT-2 (`transformer.h.N.`), GPT-NeoX (`gpt_neox.layers.N.`),
Falcon and BLOOM (`transformer.h.N.`), MPT (`transformer.blocks.N.`) and Phi (`model.layers.N.`).
Everything else (embeddings, final norm, head) is "other": it belongs to the first layer group when it
sits before the layers (embeddings) and to the last group when it sits after them (norm, head).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from evomerge.errors import ModelError

LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|decoder_layers)\.(\d+)\.")  # group 1: the layer index
_HEAD_LIKE = ("lm_head", "embed_out", "norm", "ln_f", "final_layernorm", "output")
_ATTENTION = ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value", "c_attn")
_MLP = ("mlp", "feed_forward", "ffn", "gate_proj", "up_proj", "down_proj", "c_fc", "fc1", "fc2", "w1", "w2", "w3")

TensorKind = Literal["attention", "mlp", "other"]


def layer_index(name: str) -> int | None:
    """The decoder layer a tensor belongs to, or None for embeddings, final norm and head."""
    match = LAYER_RE.search(name)
    return int(match.group(1)) if match else None


_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
# Per model_type: the modules (relative to a decoder layer) whose outputs are added to the residual stream.
RESIDUAL_WRITERS: dict[str, tuple[str, ...]] = {
    "llama": ("self_attn.o_proj", "mlp.down_proj"),
    "mistral": ("self_attn.o_proj", "mlp.down_proj"),
    "qwen2": ("self_attn.o_proj", "mlp.down_proj"),
    "qwen3": ("self_attn.o_proj", "mlp.down_proj"),
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
}


def num_layers(config: dict) -> int:
    """Layer count from the config, under the key each family uses."""
    key = layer_count_key(config, required=False)
    if key is not None:
        return config[key]
    text = config.get("text_config")
    if isinstance(text, dict):
        return num_layers(text)
    raise ModelError("config.json names no layer count (num_hidden_layers / n_layer); is this a decoder LM?")


def layer_count_key(config: dict, *, required: bool = True) -> str | None:
    """The config key that holds the layer count in this family (num_hidden_layers, n_layer, ...)."""
    for key in _LAYER_COUNT_KEYS:
        if isinstance(config.get(key), int):
            return key
    if required:
        raise ModelError("config.json names no layer count (num_hidden_layers / n_layer); is this a decoder LM?")
    return None


def residual_writers(config: dict) -> tuple[str, ...]:
    """The modules of a decoder layer whose outputs add to the residual stream (what a path's input
    scale folds into); a ModelError for families not listed in RESIDUAL_WRITERS."""
    model_type = str(config.get("model_type"))
    writers = RESIDUAL_WRITERS.get(model_type)
    if writers is None:
        raise ModelError(
            f"model_type {model_type!r}: evomerge does not know which tensors write its residual stream, so a "
            f"scaled path cannot be folded into a standard checkpoint (known: {', '.join(RESIDUAL_WRITERS)}); "
            "search unscaled paths with search_space.scale: {low: 1.0, high: 1.0}"
        )
    return writers


def module_in_layer(name: str) -> str:
    """'model.layers.3.self_attn.o_proj.weight' -> 'self_attn.o_proj'."""
    return name[LAYER_RE.search(name).end():].rsplit(".", 1)[0]


def renumber_layer(name: str, new: int) -> str:
    """The tensor name with its decoder-layer index replaced by `new`."""
    match = LAYER_RE.search(name)
    return f"{name[: match.start(1)]}{new}{name[match.end(1):]}"


def tensor_kind(name: str) -> TensorKind:
    """Attention / MLP / other, for parameters that vary by tensor kind."""
    if layer_index(name) is None:
        return "other"
    tail = name.lower()
    if any(f".{k}" in tail or f"{k}." in tail for k in _ATTENTION):
        return "attention"
    if any(f".{k}" in tail or f"{k}." in tail for k in _MLP):
        return "mlp"
    return "other"


@dataclass(frozen=True)
class LayerGroups:
    """Splits n_layers decoder layers into n_groups contiguous groups of near-equal size."""

    n_layers: int
    n_groups: int

    def __post_init__(self) -> None:
        if not 1 <= self.n_groups <= self.n_layers:
            raise ModelError(
                f"layer_groups = {self.n_groups}, but the model has {self.n_layers} layers; "
                f"use 1 to {self.n_layers} groups"
            )

    def of_layer(self, layer: int) -> int:
        return layer * self.n_groups // self.n_layers

    def of_tensor(self, name: str, *, before_layers: bool) -> int:
        layer = layer_index(name)
        if layer is not None:
            return self.of_layer(layer)
        return 0 if before_layers else self.n_groups - 1


def group_of_each(names: list[str], groups: LayerGroups) -> dict[str, int]:
    """Layer group for every tensor name (embeddings first group; final norm and head last group)."""
    return {name: groups.of_tensor(name, before_layers=not _looks_like_head(name)) for name in names}


def _looks_like_head(name: str) -> bool:
    first = name.split(".")[0] if not name.startswith(("model.", "transformer.")) else name.split(".")[1]
    return first.startswith(_HEAD_LIKE)
