"""Model references as configs, recipes and mergekit YAML write them (plain strings, no I/O).

A reference is a local folder or a Hub id `org/name[@revision]`; `MODEL+ADAPTER` (mergekit's syntax) is a
LoRA adapter applied to its model before merging (`evomerge.export.lora` writes that model once).
"""

from __future__ import annotations

from evomerge.errors import ConfigError


def split_lora(ref: str) -> tuple[str, str | None]:
    """(model, adapter) of `MODEL+ADAPTER`, or (ref, None) for a plain reference."""
    parts = ref.split("+")
    if len(parts) == 1:
        return ref, None
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"model reference {ref!r}: write MODEL+ADAPTER (one '+'), e.g. ./base+./lora-adapter")
    return parts[0], parts[1]


def is_lora(ref: object) -> bool:
    """Whether `ref` is a `MODEL+ADAPTER` reference."""
    return isinstance(ref, str) and "+" in ref
