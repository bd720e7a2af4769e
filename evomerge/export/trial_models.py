"""Trials of other studies (PS+DFS) and LoRA sources as models: each is written once as a checkpoint in a cache folder.

A study config may name a model as `{study: NAME, storage: URL, trial: N}` (trial omitted = the best
completed trial). Before a search starts, `materialize_trial_models` exports every such trial (merge or
path recipe alike, through `export.write_recipe_checkpoint`) to

    $EVOMERGE_CACHE/trials/<hash>      ($EVOMERGE_CACHE defaults to ~/.cache/evomerge)

and puts that folder in the config, so workers, export and resume see an ordinary local model. A LoRA
source `MODEL+ADAPTER` is written the same way, by `export.lora` (to `models.lora_merge_cache`, default
$EVOMERGE_CACHE/lora). The
controller, which never loads torch, runs this module as a child process (`python -m
evomerge.export.trial_models` reads the study config as YAML on stdin and prints the folders as JSON on
stdout, or a one-line error on stderr with exit code 2). The hash
covers the storage URL, study name, trial number and the recipe, so a folder is never reused for another
model; a folder is complete once it exists (the export renames it into place at the end). The stored
config of the new study names the folder; its README.md says which study and trial it came from.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import yaml

from evomerge.config import ModelsConfig, StudyConfig, TrialRef, parse_config
from evomerge.dirs import cache_root
from evomerge.errors import ConfigError, EvomergeError
from evomerge.export.card import model_card
from evomerge.export.checkpoint import write_recipe_checkpoint
from evomerge.export.lora import lora_checkpoint
from evomerge.recipe.refs import is_lora, split_lora
from evomerge.study.store import StudyStore


def materialize_trial_models(cfg: StudyConfig) -> StudyConfig:
    """`cfg` with every trial reference and LoRA source in `models` replaced by the folder of its checkpoint."""
    models = cfg.models
    if not any(isinstance(ref, TrialRef) or is_lora(ref) for ref in (models.base, *models.sources)):
        return cfg
    base = _local(models.base, "models.base", models)
    sources = [_local(ref, f"models.sources[{i}]", models) for i, ref in enumerate(models.sources)]
    return cfg.with_overrides(**{"models.base": base, "models.sources": sources})


def _local(ref: str | TrialRef, where: str, models: ModelsConfig) -> str:
    if isinstance(ref, str) and is_lora(ref):
        cache = Path(models.lora_merge_cache) if models.lora_merge_cache else None
        try:
            return str(lora_checkpoint(*split_lora(ref), cache, allow_pickle=models.allow_pickle))
        except EvomergeError as exc:
            raise ConfigError(f"config error: {where}: {exc}") from None
    if isinstance(ref, str):
        return ref
    try:
        return str(trial_checkpoint(ref))
    except EvomergeError as exc:
        raise ConfigError(f"config error: {where} (study {ref.study!r}, trial {_trial_text(ref)}): {exc}") from None


def trial_checkpoint(ref: TrialRef) -> Path:
    """The cache folder holding `ref`'s trial as a checkpoint, written on first use."""
    store = StudyStore.open(ref.storage, ref.study)
    trial = store.completed_trial(ref.trial)
    recipe = StudyStore.recipe_of(trial)
    key = json.dumps({"storage": ref.storage, "study": ref.study, "trial": trial.number, "recipe": recipe.to_dict()}, sort_keys=True)
    folder = cache_root() / "trials" / hashlib.sha256(key.encode()).hexdigest()[:20]
    if not folder.is_dir():
        card = model_card(recipe, ref.study, trial, store.heldout(trial.number), store.full(trial.number))
        write_recipe_checkpoint(recipe, folder, card=card, allow_pickle=store.config.models.allow_pickle)
    return folder


def _trial_text(ref: TrialRef) -> str:
    return "best" if ref.trial is None else str(ref.trial)


def main() -> int:
    """Child-process entry point (see the module docstring)."""
    try:
        cfg = materialize_trial_models(parse_config(yaml.safe_load(sys.stdin.read()), source="config"))
    except EvomergeError as exc:
        print(f"evomerge: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"base": str(cfg.models.base), "sources": [str(s) for s in cfg.models.sources]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
