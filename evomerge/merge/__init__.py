"""Merge methods as pure tensor functions, with mergekit semantics for shared names.

    spec = get_method("ties")
    merged = merge_tensor(spec, base, deltas, {"weight": [1.0, 0.5], "density": 0.5}, Noise(seed, name))

base is one tensor (*S) of the base model, deltas (E, *S) the task vectors (source - base) of E source
models; the result is the merged tensor (*S) in fp32. The catalog (`catalog.py`: methods, parameters,
ranges) is plain data and loads without torch, so the controller can check recipes; the tensor side
(`merge_tensor`, `DeltaStats`, `Noise`, `use_kernel_dir`) loads torch on first use. `_methods.py` has
the formulas and which mergekit behaviour each one matches; `_random.py` the device-independent
uniforms that random methods (dare_*, della*) draw; `_fused.py` the compiled CPU kernels.

This package imports only itself and `evomerge.errors` (an import-linter contract).
"""

from __future__ import annotations

import importlib
from typing import Any

from evomerge.merge.catalog import (
    METHODS,
    TASK_VECTOR_METHODS,
    MergeParamError,
    MethodSpec,
    ParamSpec,
    TaskVectorMethod,
    get_method,
)

_TENSOR_SIDE = {  # name -> module: loaded (with torch) on first access
    "merge_tensor": "evomerge.merge._apply",
    "all_finite": "evomerge.merge._apply",
    "DeltaStats": "evomerge.merge._sparsify",
    "TaskVectors": "evomerge.merge._deltas",
    "Noise": "evomerge.merge._random",
    "use_kernel_dir": "evomerge.merge._fused",
}


def __getattr__(name: str) -> Any:
    module = _TENSOR_SIDE.get(name)
    if module is None:
        raise AttributeError(f"module 'evomerge.merge' has no attribute {name!r}")
    importlib.import_module("evomerge.merge._methods")  # binds every method's function to the catalog
    return getattr(importlib.import_module(module), name)


__all__ = [
    "METHODS", "TASK_VECTOR_METHODS", "DeltaStats", "MergeParamError", "MethodSpec", "Noise", "ParamSpec",
    "TaskVectorMethod", "TaskVectors", "all_finite", "get_method", "merge_tensor", "use_kernel_dir",
]
