"""Checks shared by the data-flow tests: undo the one approximation of folding scales into weights."""

from __future__ import annotations

import torch

from evomerge.export.path import running_products
from evomerge.models.path_model import layer_container
from evomerge.recipe import PathRecipe


def match_norm_eps(exported: torch.nn.Module, recipe: PathRecipe) -> None:
    """Give an exported path checkpoint the norm epsilons that make it equal the in-memory path model.

    Folding P_i (the running product of scales) into the weights divides the stream by P_i, which a norm
    sees as its eps times P_i^2; dividing slot i's norms' eps by P_i^2 (the final norm's by P_last^2) undoes it.
    """
    products = running_products(recipe)
    for layer, product in zip(layer_container(exported)[2], products):
        scale_norm_eps(layer, 1 / product**2)
    decoder = exported.get_decoder()
    scale_norm_eps(getattr(decoder, "norm", None) or decoder.ln_f, 1 / products[-1] ** 2)


def scale_norm_eps(module: torch.nn.Module, factor: float) -> None:
    for m in module.modules():
        for attr in ("variance_epsilon", "eps"):  # RMSNorm, LayerNorm
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, getattr(m, attr) * factor)
