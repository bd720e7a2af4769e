"""Export a trial's recipe as a Hugging Face checkpoint folder, with its recipe YAML and a model card,
or (`export_mergekit`) as a mergekit-yaml config alone, without building weights.

The merge streams tensor by tensor from the memory-mapped sources through the same `merge_named` the
workers use, so the exported weights equal the ones the trial was scored with. The folder is written
under a temporary name and renamed at the end: an interrupted export leaves nothing half-written.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from evomerge.build import stream_merge
from evomerge.checkpoints import Checkpoint, write_checkpoint
from evomerge.errors import ConfigError
from evomerge.path_recipe import PathRecipe
from evomerge.recipe import Recipe
from evomerge.study import StudyStore, fitness_of

_DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


@dataclass(frozen=True)
class Exported:
    out: Path
    trial: int
    files: list[Path]


def check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ConfigError(f"--out {out}: already exists and is not empty; choose a new folder or pass --force")


def export_trial(store: StudyStore, number: int | None, out: Path, *, force: bool = False) -> Exported:
    trial = store.trial(number)
    if trial.state != optuna.trial.TrialState.COMPLETE:
        raise ConfigError(f"trial {trial.number} is {trial.state.name}, not COMPLETE; export a completed trial")
    check_out_dir(out, force)
    recipe = StudyStore.recipe_of(trial)
    card = model_card(recipe, store.study.study_name, trial, store.heldout(trial.number))
    files = write_recipe_checkpoint(recipe, out, card=card)
    return Exported(out=out, trial=trial.number, files=files)


def mergekit_target(out: Path) -> Path:
    """Where `export --format mergekit` writes: OUT itself when it ends in .yaml/.yml, else OUT/mergekit.yaml."""
    return out if out.suffix in (".yaml", ".yml") else out / "mergekit.yaml"


def export_mergekit(store: StudyStore, jobs: Sequence[tuple[int | None, Path]], *, force: bool = False) -> list[Exported]:
    """Write trials' recipes as mergekit YAML only (no weights): each (trial number, out) pair to
    `mergekit_target(out)`; trial None is the best.

    Every trial is checked before anything is written: a one-line ConfigError, with nothing written,
    when a target exists (without `force`) or a recipe has no mergekit form (consensus, a scaled
    data-flow path, kinds no filter separates).
    """
    planned = []
    for number, out in jobs:
        trial = store.trial(number)
        if trial.state != optuna.trial.TrialState.COMPLETE:
            raise ConfigError(f"trial {trial.number} is {trial.state.name}, not COMPLETE; export a completed trial")
        target = mergekit_target(out)
        if target.parent.exists() and not target.parent.is_dir():
            raise ConfigError(f"--out {out}: is a file; give a folder, or a path ending in .yaml")
        if target.exists() and not force:
            raise ConfigError(f"--out {target}: already exists; choose another path or pass --force")
        try:
            text = mergekit_text_of(StudyStore.recipe_of(trial))
        except ConfigError as exc:
            raise ConfigError(f"trial {trial.number} has no mergekit form: {exc}; export it with --format checkpoint") from None
        planned.append((trial.number, target, text))
    for number, target, text in planned:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return [Exported(out=target, trial=number, files=[target]) for number, target, _ in planned]


def mergekit_text_of(recipe: Recipe | PathRecipe, *, allow_pickle: bool = False) -> str:
    """The mergekit YAML of a merge or path recipe, read against its base's header; ConfigError without one."""
    if isinstance(recipe, PathRecipe):
        from evomerge.path_export import path_to_mergekit

        config = Checkpoint.open(recipe.models[recipe.embed_from], allow_pickle=allow_pickle).config
        text = path_to_mergekit(recipe, config)
        if text is None:
            raise ConfigError("a path with scaled slots cannot be written as a mergekit passthrough")
        return text
    from evomerge.mergekit_yaml import mergekit_text

    return mergekit_text(recipe, Checkpoint.open(recipe.base, allow_pickle=allow_pickle))


def write_recipe_checkpoint(recipe: Recipe | PathRecipe, out: Path, *, card: str, allow_pickle: bool = False) -> list[Path]:
    """Merge `recipe` (or lay out a path recipe's layers) into a new checkpoint folder `out`, replaced atomically."""
    plan, extra_files = None, {}
    if isinstance(recipe, PathRecipe):
        from evomerge.path_export import path_checkpoint

        parts = path_checkpoint(recipe, allow_pickle=allow_pickle)
        config, tensors, side_from, plan, extra_files = parts.config, parts.tensors, parts.side_files_from, parts.plan, parts.extra_files
    else:
        config, tensors, side_from = _merged_parts(recipe, allow_pickle)
        extra_files = _mergekit_files(recipe, allow_pickle)
    out = out.resolve()
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        files = write_checkpoint(tensors, tmp, config=config, side_files_from=side_from, plan=plan)
        (tmp / "recipe.yaml").write_text(recipe.to_yaml())
        (tmp / "README.md").write_text(card)
        for name, text in extra_files.items():  # a path's mergekit.yaml when all its scales are 1
            (tmp / name).write_text(text)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return [out / f.name for f in files]


def _mergekit_files(recipe: Recipe, allow_pickle: bool) -> dict[str, str]:
    """mergekit.yaml for recipes mergekit can rebuild (shared methods), so a mergekit user can rerun it."""
    from evomerge.mergekit_yaml import mergekit_text_for

    text = mergekit_text_for(recipe, Checkpoint.open(recipe.base, allow_pickle=allow_pickle))
    return {} if text is None else {"mergekit.yaml": text}


def _merged_parts(recipe: Recipe, allow_pickle: bool) -> tuple[dict, Iterator[tuple[str, Any]], Path]:
    base = Checkpoint.open(recipe.base, allow_pickle=allow_pickle)
    config = dict(base.config)
    tensors = stream_merge(recipe, allow_pickle=allow_pickle)
    if recipe.dtype in _DTYPE_NAMES:
        import torch

        dtype = getattr(torch, recipe.dtype)
        tensors = ((n, t.to(dtype)) for n, t in tensors)
        config["dtype"] = config["torch_dtype"] = recipe.dtype
    return config, tensors, base.path


def model_card(recipe: Recipe | PathRecipe, study: str, trial: optuna.trial.FrozenTrial, heldout: dict | None) -> str:
    fitness = trial.user_attrs.get("scores.fitness", {})
    rows = [f"| {task} | {score:.4f} | {_heldout_cell(heldout, task)} |" for task, score in fitness.items()]
    return "\n".join([
        "---",
        "library_name: transformers",
        "tags: [merge, evomerge]",
        f"base_model: {_card_base(recipe)}",
        "---",
        f"# Merged model: study `{study}`, trial {trial.number}",
        "",
        *_card_description(recipe),
        "",
        f"Fitness (weighted mean over tasks, fitness split): **{fitness_of(trial):.4f}**"
        + (f"; held-out: **{heldout['fitness']:.4f}**" if heldout else ""),
        "",
        "| task | fitness split | held-out split |",
        "| --- | --- | --- |",
        *rows,
        "",
        "## Recipe",
        "",
        "```yaml",
        recipe.to_yaml().rstrip(),
        "```",
        "",
        "Rebuild it with `evomerge merge recipe.yaml --out DIR`.",
        "",
    ])


def _card_base(recipe: Recipe | PathRecipe) -> str:
    return recipe.models[recipe.embed_from] if isinstance(recipe, PathRecipe) else recipe.base


def _card_description(recipe: Recipe | PathRecipe) -> list[str]:
    if isinstance(recipe, PathRecipe):
        from evomerge.path_export import path_card_lines

        return path_card_lines(recipe)
    kinds = ["", f"Parameters differ by tensor kind ({', '.join(recipe.kinds)}) within each layer group."] if recipe.kinds else []
    return [f"Built by evomerge with `{recipe.method}` from base `{recipe.base}` and sources:", *[f"- `{s}`" for s in recipe.sources], *kinds]


def _heldout_cell(heldout: dict | None, task: str) -> str:
    if not heldout or task not in heldout.get("scores", {}):
        return "not scored"
    return f"{heldout['scores'][task]:.4f}"
