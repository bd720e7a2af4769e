"""Export a data-flow path as an ordinary checkpoint of its family: no custom modeling code.

Slot i of the path becomes decoder layer i, a copy of the layer it runs (renamed). Scales fold into the
weights: in a pre-norm block, h -> h + f(norm(h)), and norm(w h) = norm(h) for w > 0 (RMSNorm and
LayerNorm alike), so scaling the stream entering slot i by w_i is the same as dividing the tensors that
write into the stream (attention out, MLP down, and their biases) of slot i and of every later slot by
the running product P_i = w_0 ... w_i: the exported stream after slot i is the path's stream divided by
P_i, and the final norm removes what is left.

The limit is the norms' epsilon: norm_eps(h / P) = norm_{eps P^2}(h), so the export is exactly the path
model with slot i's norm eps multiplied by P_i^2 (the final norm's by P_last^2); tests/path_checks.py
undoes that and gets rounding-level agreement. With eps near 0 the two agree to float rounding (2e-7 on
logits of tiny random models); at eps 1e-6 to 1e-5 they differ by 5e-4 to 2e-3 on those random models
(tiny hidden states), and by up to 0.07 (logits up to 23) on the trained zoo Llama for an 8-slot path
whose running product fell to 0.25, with no greedy answer changed. Only positive scales fold (the config
refuses others), and only for pre-norm families whose residual writers are listed below; unscaled paths
need no folding and export for any family (bit-identical logits, tested on Qwen2).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import yaml

from evomerge.dtypes import is_float_name
from evomerge.errors import ModelError
from evomerge.models.checkpoints import Checkpoint, CheckpointParts, TensorInfo, dtype_of, torch_dtype
from evomerge.models.layout import LayerGroups, group_of_each, layer_index, module_in_layer, renumber_layer, residual_writers
from evomerge.models.path_model import check_path_model, path_config
from evomerge.recipe import PathRecipe
from evomerge.recipe.parameter import value_to_data


def running_products(recipe: PathRecipe) -> list[float]:
    """P_i = w_0 * ... * w_i: what slot i's residual writers are divided by."""
    out, product = [], 1.0
    for _, _, scale in recipe.slots:
        product *= scale
        out.append(product)
    return out


def path_checkpoint(recipe: PathRecipe, *, allow_pickle: bool = False) -> CheckpointParts:
    """The export of `recipe`: embeddings from the embed model, final norm and head from the head model
    (the embed model unless `head_from`), one layer per slot."""
    ckpts = [Checkpoint.open(ref, allow_pickle=allow_pickle) for ref in recipe.models]
    embed = ckpts[recipe.embed_from]
    check_path_model(embed.config)
    writers = residual_writers(embed.config) if recipe.scaled else ()
    config = path_config(embed.config, recipe.slots, [c.config for c in ckpts])
    forced = torch_dtype(recipe.dtype)
    if forced is not None:
        config["dtype"] = config["torch_dtype"] = recipe.dtype

    # (output name, checkpoint, source name, divisor, factor) for every output tensor, in output order
    jobs = _outside(recipe, embed, ckpts[recipe.head_model])
    for i, ((m, layer, _), product) in enumerate(zip(recipe.slots, running_products(recipe))):
        names = [n for n in ckpts[m].names if layer_index(n) == layer]
        if not names:
            raise ModelError(f"path slot {i}: {recipe.models[m]!r} has no layer {layer}")
        _check_writers(names, writers, recipe.models[m])
        jobs += [(renumber_layer(n, i), ckpts[m], n, product if _writes_residual(n, writers) else 1.0, recipe.tensor_scale(i, n))
                 for n in names]

    plan = [TensorInfo(out, tuple(c.shapes[n]), forced or dtype_of(c.dtypes[n])) for out, c, n, _, _ in jobs]
    extra = {"mergekit.yaml": mk} if (mk := path_to_mergekit(recipe, config)) else {}
    return CheckpointParts(config, _stream(jobs, forced), embed.path, plan, extra)


def _outside(recipe: PathRecipe, embed: Checkpoint, head: Checkpoint) -> list[tuple[str, Checkpoint, str, float, float]]:
    """The jobs of the tensors outside the layers, in the embed model's order: those before the layers
    (embeddings) from the embed model, those after them (final norm, head) from the head model."""
    outside = [n for n in embed.names if layer_index(n) is None]
    after = {n: g == 1 for n, g in group_of_each(outside, LayerGroups(2, 2)).items()}
    missing = [n for n in outside if after[n] and n not in head.shapes]
    if missing:
        raise ModelError(f"model {head.path}: has no tensor {missing[0]!r}, which the path's head takes from it")
    return [(n, head if after[n] else embed, n, 1.0, recipe.tensor_scale("head" if after[n] else "embed", n)) for n in outside]


def _stream(jobs: list[tuple[str, Checkpoint, str, float, float]], forced: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    for out, ckpt, name, divisor, factor in jobs:
        tensor = ckpt.tensor(name)
        if divisor != 1.0:  # fold in fp32, round once
            tensor = (tensor.to(torch.float32) / divisor).to(tensor.dtype)
        tensor = tensor if forced is None else tensor.to(forced)
        yield out, tensor if factor == 1.0 else tensor * factor  # mergekit's passthrough scale: in the output dtype




def _writes_residual(name: str, writers: tuple[str, ...]) -> bool:
    return module_in_layer(name) in writers


def _check_writers(names: list[str], writers: tuple[str, ...], ref: str) -> None:
    have = {module_in_layer(n) for n in names}
    missing = [w for w in writers if w not in have]
    if missing:
        raise ModelError(f"model {ref!r}: a decoder layer has no {missing[0]!r} tensor, so its scale cannot be folded; is its config's model_type right?")



def path_to_mergekit(recipe: PathRecipe, config: dict | None = None) -> str | None:
    """A mergekit passthrough (`slices:`) YAML building the same model, or None when a slot is scaled.

    mergekit takes the embeddings from the first slice and the final norm and head from the last (with
    those slices' `scale`); when those are not the embed (head) model or scale, a zero-length slice of
    that model is added at that end.
    """
    if recipe.scaled:
        return None
    runs: list[list] = []  # [model index, first layer, end layer, tensor scale]
    for i, (m, layer, _) in enumerate(recipe.slots):
        factor = recipe.tensor_scales[i] if recipe.tensor_scales else 1.0
        if runs and runs[-1][0] == m and runs[-1][2] == layer and runs[-1][3] == factor:
            runs[-1][2] += 1
        else:
            runs.append([m, layer, layer + 1, factor])
    embed, head = recipe.end_scales or (1.0, 1.0)
    if (runs[0][0], runs[0][3]) != (recipe.embed_from, embed):
        runs.insert(0, [recipe.embed_from, 0, 0, embed])
    if (runs[-1][0], runs[-1][3]) != (recipe.head_model, head):
        runs.append([recipe.head_model, 0, 0, head])
    doc: dict = {"merge_method": "passthrough"}
    dtype = recipe.dtype if is_float_name(recipe.dtype) else (config or {}).get("torch_dtype") or (config or {}).get("dtype")
    if isinstance(dtype, str):
        doc["dtype"] = dtype
    doc["slices"] = [{"sources": [_passthrough_source(recipe.models[m], a, b, factor)]} for m, a, b, factor in runs]
    note = "# The same layer stack as this folder's weights, for mergekit-yaml (evomerge wrote these weights itself).\n"
    if (config or {}).get("layer_types") is not None:
        note += "# mergekit 0.1.5 under transformers 5 leaves layer_types unchanged: copy layer_types from config.json.\n"
    return note + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None)


def _passthrough_source(model: str, start: int, stop: int, factor) -> dict:
    source: dict = {"model": model, "layer_range": [start, stop]}
    if factor != 1.0:
        source["parameters"] = {"scale": value_to_data(factor)}
    return source


def path_card_lines(recipe: PathRecipe) -> list[str]:
    """Model-card lines describing the path: models, then one table row per exported layer."""
    products = running_products(recipe)
    rows = [f"| {i} | `{recipe.models[m]}` | {layer} | {scale:.4g} | {p:.4g} |"
            for i, ((m, layer, scale), p) in enumerate(zip(recipe.slots, products))]
    return [
        f"A data-flow path of {len(recipe.slots)} layers (Akiba et al. 2024), exported as a standard checkpoint; "
        f"embeddings from `{recipe.models[recipe.embed_from]}`, final norm and head from `{recipe.models[recipe.head_model]}`.",
        "Each input scale is folded into the layer's attention-out and MLP-down weights (divided by the running product).",
        "",
        "| layer | from model | its layer | input scale | running product |",
        "| --- | --- | --- | --- | --- |",
        *rows,
    ]
