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
from evomerge.models.layout import layer_index, module_in_layer, renumber_layer, residual_writers
from evomerge.models.path_model import check_path_model, path_config
from evomerge.recipe import PathRecipe


def running_products(recipe: PathRecipe) -> list[float]:
    """P_i = w_0 * ... * w_i: what slot i's residual writers are divided by."""
    out, product = [], 1.0
    for _, _, scale in recipe.slots:
        product *= scale
        out.append(product)
    return out


def path_checkpoint(recipe: PathRecipe, *, allow_pickle: bool = False) -> CheckpointParts:
    """The export of `recipe`: embeddings, final norm and head from the embed model, one layer per slot."""
    ckpts = [Checkpoint.open(ref, allow_pickle=allow_pickle) for ref in recipe.models]
    embed = ckpts[recipe.embed_from]
    check_path_model(embed.config)
    writers = residual_writers(embed.config) if recipe.scaled else ()
    config = path_config(embed.config, recipe.slots, [c.config for c in ckpts])
    forced = torch_dtype(recipe.dtype)
    if forced is not None:
        config["dtype"] = config["torch_dtype"] = recipe.dtype

    # (output name, checkpoint, source name, divisor) for every output tensor, in output order
    jobs = [(n, embed, n, 1.0) for n in embed.names if layer_index(n) is None]
    for i, ((m, layer, _), product) in enumerate(zip(recipe.slots, running_products(recipe))):
        names = [n for n in ckpts[m].names if layer_index(n) == layer]
        if not names:
            raise ModelError(f"path slot {i}: {recipe.models[m]!r} has no layer {layer}")
        _check_writers(names, writers, recipe.models[m])
        jobs += [(renumber_layer(n, i), ckpts[m], n, product if _writes_residual(n, writers) else 1.0) for n in names]

    plan = [TensorInfo(out, tuple(c.shapes[n]), forced or dtype_of(c.dtypes[n])) for out, c, n, _ in jobs]
    extra = {"mergekit.yaml": mk} if (mk := path_to_mergekit(recipe, config)) else {}
    return CheckpointParts(config, _stream(jobs, forced), embed.path, plan, extra)


def _stream(jobs: list[tuple[str, Checkpoint, str, float]], forced: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    for out, ckpt, name, divisor in jobs:
        tensor = ckpt.tensor(name)
        if divisor != 1.0:  # fold in fp32, round once
            tensor = (tensor.to(torch.float32) / divisor).to(tensor.dtype)
        yield out, tensor if forced is None else tensor.to(forced)




def _writes_residual(name: str, writers: tuple[str, ...]) -> bool:
    return module_in_layer(name) in writers


def _check_writers(names: list[str], writers: tuple[str, ...], ref: str) -> None:
    have = {module_in_layer(n) for n in names}
    missing = [w for w in writers if w not in have]
    if missing:
        raise ModelError(f"model {ref!r}: a decoder layer has no {missing[0]!r} tensor, so its scale cannot be folded; is its config's model_type right?")



def path_to_mergekit(recipe: PathRecipe, config: dict | None = None) -> str | None:
    """A mergekit passthrough (`slices:`) YAML building the same model, or None when a slot is scaled.

    mergekit takes the embeddings from the first slice and the final norm and head from the last; when
    those are not the embed model, a zero-length slice of the embed model is added at that end.
    """
    if recipe.scaled:
        return None
    runs: list[list] = []  # [model index, first layer, end layer]
    for m, layer, _ in recipe.slots:
        if runs and runs[-1][0] == m and runs[-1][2] == layer:
            runs[-1][2] += 1
        else:
            runs.append([m, layer, layer + 1])
    e = recipe.embed_from
    if runs[0][0] != e:
        runs.insert(0, [e, 0, 0])
    if runs[-1][0] != e:
        runs.append([e, 0, 0])
    doc: dict = {"merge_method": "passthrough"}
    dtype = recipe.dtype if is_float_name(recipe.dtype) else (config or {}).get("torch_dtype") or (config or {}).get("dtype")
    if isinstance(dtype, str):
        doc["dtype"] = dtype
    doc["slices"] = [{"sources": [{"model": recipe.models[m], "layer_range": [a, b]}]} for m, a, b in runs]
    note = "# The same layer stack as this folder's weights, for mergekit-yaml (evomerge wrote these weights itself).\n"
    if (config or {}).get("layer_types") is not None:
        note += "# mergekit 0.1.5 under transformers 5 leaves layer_types unchanged: copy layer_types from config.json.\n"
    return note + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None)


def path_card_lines(recipe: PathRecipe) -> list[str]:
    """Model-card lines describing the path: models, then one table row per exported layer."""
    products = running_products(recipe)
    rows = [f"| {i} | `{recipe.models[m]}` | {layer} | {scale:.4g} | {p:.4g} |"
            for i, ((m, layer, scale), p) in enumerate(zip(recipe.slots, products))]
    return [
        f"A data-flow path of {len(recipe.slots)} layers (Akiba et al. 2024), exported as a standard checkpoint; "
        f"embeddings, final norm and head from `{recipe.models[recipe.embed_from]}`.",
        "Each input scale is folded into the layer's attention-out and MLP-down weights (divided by the running product).",
        "",
        "| layer | from model | its layer | input scale | running product |",
        "| --- | --- | --- | --- | --- |",
        *rows,
    ]
