"""Search spaces: map a point of the unit cube (or an Optuna trial's params) to a merge Recipe."""

from evomerge.spaces._genes import Gene, decode_unit, encode_unit
from evomerge.spaces._parameter import ParameterSpace, model_labels

__all__ = ["Gene", "ParameterSpace", "decode_unit", "encode_unit", "model_labels"]
