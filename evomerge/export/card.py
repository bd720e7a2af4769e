"""The model card (README.md) of an exported checkpoint: where it came from, its scores, its recipe."""

from __future__ import annotations

from functools import singledispatch

import optuna

from evomerge.export.path import path_card_lines
from evomerge.recipe import CandidateRecipe, PathRecipe, Recipe
from evomerge.study.store import fitness_of


def model_card(recipe: CandidateRecipe, study: str, trial: optuna.trial.FrozenTrial, heldout: dict | None,
               full: dict | None = None) -> str:
    """full: the trial's full-set scores where its fitness was estimated during the search."""
    fitness = full["scores"] if full else trial.user_attrs.get("scores.fitness", {})
    overall = full["fitness"] if full else fitness_of(trial)
    rows = [f"| {task} | {score:.4f} | {_heldout_cell(heldout, task)} |" for task, score in fitness.items()]
    return "\n".join([
        "---",
        "library_name: transformers",
        "tags: [merge, evomerge]",
        f"base_model: {recipe.base_model}",
        "---",
        f"# Merged model: study `{study}`, trial {trial.number}",
        "",
        *card_description(recipe),
        "",
        f"Fitness (weighted mean over tasks, fitness split): **{overall:.4f}**"
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


@singledispatch
def card_description(recipe: CandidateRecipe) -> list[str]:
    """Model-card lines that say what the candidate is."""
    return [f"Built by evomerge: {recipe.describe()}."]


card_description.register(PathRecipe, path_card_lines)


@card_description.register
def _merge_description(recipe: Recipe) -> list[str]:
    kinds = ["", f"Parameters differ by tensor kind ({', '.join(recipe.kinds)}) within each layer group."] if recipe.kinds else []
    return [f"Built by evomerge with `{recipe.method}` from base `{recipe.base}` and sources:", *[f"- `{s}`" for s in recipe.sources], *kinds]


def _heldout_cell(heldout: dict | None, task: str) -> str:
    if not heldout or task not in heldout.get("scores", {}):
        return "not scored"
    return f"{heldout['scores'][task]:.4f}"
