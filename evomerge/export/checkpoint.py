"""Export a trial's recipe as a Hugging Face checkpoint folder, with its recipe YAML and a model card,
or (`export_mergekit`) as a mergekit-yaml config alone, without building weights.

Each kind of recipe has its parts (config, tensors, extra files) and its mergekit form registered by
type (`functools.singledispatch`): a merge streams through `models.build`, a path through `export.path`.

The merge streams tensor by tensor from the memory-mapped sources through the same `merge_named` the
workers use, so the exported weights equal the ones the trial was scored with. The folder is written
under a temporary name and renamed at the end: an interrupted export (Ctrl-C, a full disk) leaves
nothing half-written. `--force` replaces an earlier export, never anything else: an output folder that
holds the study's storage or its artifacts, or any file an export does not write, is refused.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from functools import singledispatch
from pathlib import Path

from evomerge.errors import ConfigError, EvomergeError, ModelError
from evomerge.export.card import model_card
from evomerge.export.mergekit import mergekit_text, mergekit_text_for
from evomerge.export.path import path_checkpoint, path_to_mergekit
from evomerge.models.build import MergeInputs, check_recipe, stream_merge
from evomerge.models.checkpoints import SIDE_FILES, Checkpoint, CheckpointParts, torch_dtype, write_checkpoint
from evomerge.models.headers import broken_checkpoint_message
from evomerge.models.vocab import output_tokenizer, with_vocab_size
from evomerge.recipe import CandidateRecipe, PathRecipe, Recipe
from evomerge.recipe.tokenizer import TokenizerSpec
from evomerge.study.store import StudyStore


@dataclass(frozen=True)
class Exported:
    out: Path
    trial: int
    files: list[Path]


# What an export writes into its folder; --force replaces a folder holding these and nothing else.
EXPORT_FILES = frozenset({"config.json", "recipe.yaml", "README.md", "mergekit.yaml", "model.safetensors",
                          "model.safetensors.index.json", *SIDE_FILES})
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def check_out_dir(out: Path, force: bool, protect: Sequence[Path] = ()) -> None:
    """Refuse an --out that an export must not write: a file, a folder holding (or inside) a `protect`ed
    path (the study's storage file, its artifacts), or, unless `force`, a non-empty folder; with `force`,
    a folder holding anything an export does not write (a one-line ConfigError, before any work)."""
    refuse_protected(out, protect)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file; give a folder path (export writes a checkpoint folder)")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not force:
        raise ConfigError(f"--out {out}: already exists and is not empty; choose a new folder or pass --force")
    foreign = sorted(entry.name for entry in out.iterdir() if not _written_by_export(entry))
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise ConfigError(f"--out {out}: holds {foreign[0]!r}{more}, which no export writes; "
                          "--force only replaces an earlier export: choose a new folder, or move those files away")


def refuse_protected(out: Path, protect: Sequence[Path]) -> None:
    """A ConfigError when `out` is, holds, or lies inside a protected path."""
    target = out.expanduser().resolve()
    for path in protect:
        guarded = Path(path).expanduser().resolve()
        if target == guarded or target in guarded.parents or guarded in target.parents:
            raise ConfigError(f"--out {out}: holds or is inside {guarded}, the study's storage or its artifacts, which an "
                              "export must never overwrite; choose a folder outside it")


def _written_by_export(entry: Path) -> bool:
    return entry.is_file() and (entry.name in EXPORT_FILES or _SHARD.fullmatch(entry.name) is not None)


def export_trial(store: StudyStore, number: int | None, out: Path, *, force: bool = False,
                 protect: Sequence[Path] = ()) -> Exported:
    trial = store.completed_trial(number)
    check_out_dir(out, force, protect)
    recipe = StudyStore.recipe_of(trial)
    card = model_card(recipe, store.study.study_name, trial, store.heldout(trial.number), store.full(trial.number))
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
        trial = store.completed_trial(number)
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


@singledispatch
def checkpoint_parts(recipe: CandidateRecipe, allow_pickle: bool = False) -> CheckpointParts:
    raise TypeError(f"no export for {type(recipe).__name__}")


@checkpoint_parts.register
def _merge_parts(recipe: Recipe, allow_pickle: bool = False) -> CheckpointParts:
    """A merge: the base's config (dtype and vocabulary size as the recipe says), tensors streamed from
    `models.build`, the merged tokenizer where the vocabulary was rebuilt (else the base's files), and
    mergekit.yaml where mergekit can rebuild it. The recipe is checked here, before anything is written."""
    check_recipe(recipe)
    inputs = MergeInputs.open(recipe, allow_pickle=allow_pickle)
    base = inputs.base
    config = dict(base.config)
    tensors = stream_merge(recipe, inputs=inputs)
    dtype = torch_dtype(recipe.dtype)
    if dtype is not None:
        tensors = ((n, t.to(dtype)) for n, t in tensors)
        config["dtype"] = config["torch_dtype"] = recipe.dtype
    if inputs.vocab is not None:
        config = with_vocab_size(config, inputs.vocab.size)
        tokenizer = inputs.vocab.tokenizer
    else:
        tokenizer = output_tokenizer(recipe.tokenizer or TokenizerSpec(), base, inputs.sources)
    text = mergekit_text_for(recipe, base)
    return CheckpointParts(config, tensors, base.path, extra_files={} if text is None else {"mergekit.yaml": text},
                           tokenizer=tokenizer)


@checkpoint_parts.register
def _path_parts(recipe: PathRecipe, allow_pickle: bool = False) -> CheckpointParts:
    return path_checkpoint(recipe, allow_pickle=allow_pickle)


@singledispatch
def mergekit_text_of(recipe: CandidateRecipe, *, allow_pickle: bool = False) -> str:
    """The mergekit YAML of a recipe, read against its base's header; ConfigError without one."""
    raise TypeError(f"no mergekit form for {type(recipe).__name__}")


@mergekit_text_of.register
def _merge_mergekit(recipe: Recipe, *, allow_pickle: bool = False) -> str:
    return mergekit_text(recipe, Checkpoint.open(recipe.base, allow_pickle=allow_pickle))


@mergekit_text_of.register
def _path_mergekit(recipe: PathRecipe, *, allow_pickle: bool = False) -> str:
    config = Checkpoint.open(recipe.base_model, allow_pickle=allow_pickle).config
    text = path_to_mergekit(recipe, config)
    if text is None:
        raise ConfigError("a path with scaled slots cannot be written as a mergekit passthrough")
    return text


def write_recipe_checkpoint(recipe: CandidateRecipe, out: Path, *, card: str, allow_pickle: bool = False) -> list[Path]:
    """Merge `recipe` (or lay out a path recipe's layers) into a new checkpoint folder `out`, replaced
    atomically. An existing `out` must hold an earlier export only (`check_out_dir`); nothing of it is
    touched until the new folder is complete, and nothing else is ever removed."""
    parts = checkpoint_parts(recipe, allow_pickle)
    out = out.resolve()
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        try:
            files = write_checkpoint(parts.tensors, tmp, config=parts.config, side_files_from=parts.side_files_from, plan=parts.plan,
                                     tokenizer=parts.tokenizer)
        except FloatingPointError as exc:  # a merged value is NaN or inf: a broken checkpoint, or a degenerate recipe
            raise _nonfinite_error(recipe, exc, allow_pickle) from None
        (tmp / "recipe.yaml").write_text(recipe.to_yaml())
        (tmp / "README.md").write_text(card)
        for name, text in parts.extra_files.items():  # mergekit.yaml where mergekit can rebuild it
            (tmp / name).write_text(text)
        _replace(out, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [out / f.name for f in files]


def _replace(out: Path, new: Path) -> None:
    """Put the finished folder `new` at `out`. An earlier export there (checked again: nothing else may
    have appeared in it) is moved aside first and its files removed once `new` is in place, so a failure
    at any step leaves one whole export at `out`."""
    if not out.exists():
        new.rename(out)
        return
    check_out_dir(out, force=True)
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    out.rename(old)
    try:
        new.rename(out)
    except BaseException:
        old.rename(out)
        raise
    for entry in old.iterdir():
        if _written_by_export(entry):
            entry.unlink()
    old.rmdir()


def _nonfinite_error(recipe: CandidateRecipe, exc: FloatingPointError, allow_pickle: bool) -> EvomergeError:
    """A ModelError naming the checkpoint when a NaN or inf in one of the recipe's models caused `exc`,
    else a ConfigError that the recipe itself is degenerate."""
    models = [m for m in (getattr(recipe, "base", None), *getattr(recipe, "sources", ())) if m is not None]
    broken = broken_checkpoint_message(models, str(exc), allow_pickle=allow_pickle)
    if broken is not None:
        return ModelError(broken)
    return ConfigError(f"recipe error: {exc}")
