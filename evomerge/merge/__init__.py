"""Merge methods as pure tensor functions, registered by name, with mergekit semantics for shared names.

    spec = get_method("ties")
    merged = merge_tensor(spec, base, deltas, {"weight": [1.0, 0.5], "density": 0.5}, Noise(seed, name))

base is one tensor (*S) of the base model, deltas (E, *S) the task vectors (source - base) of E source
models; the result is the merged tensor (*S) in fp32. Methods, their parameters and ranges are in
``METHODS``; see ``_methods.py`` for the formulas and which mergekit behaviour each one matches, and
``_random.py`` for the device-independent uniforms that random methods (dare_*, della*) draw.
"""

from evomerge.merge import _methods  # noqa: F401  (registers every method in METHODS)
from evomerge.merge._random import Noise
from evomerge.merge._registry import METHODS, MergeParamError, MethodSpec, ParamSpec, get_method, merge_tensor
from evomerge.merge._sparsify import DeltaStats

__all__ = ["METHODS", "DeltaStats", "MergeParamError", "MethodSpec", "Noise", "ParamSpec", "get_method", "merge_tensor"]
