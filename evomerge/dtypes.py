"""The one dtype vocabulary: the float dtypes a config, a recipe or a mergekit YAML may name.

Plain data (no torch), so the config and recipe layers can check names; `models.checkpoints.torch_dtype`
maps a name to torch's dtype where tensors are made. "auto" means: keep each checkpoint tensor's own dtype.
"""

from __future__ import annotations

from typing import Literal

FloatName = Literal["float32", "bfloat16", "float16"]
DtypeName = Literal["auto", "float32", "bfloat16", "float16"]
FLOAT_NAMES: tuple[FloatName, ...] = ("float32", "bfloat16", "float16")
AUTO = "auto"


def is_float_name(name: object) -> bool:
    """True for a float dtype name this project writes (not "auto", not an integer type)."""
    return name in FLOAT_NAMES

