"""End to end on the zoo for layer swap, DFS and PS+DFS: search (real Ray workers, lm-eval), export,
reload with plain transformers, re-score, and compare with what the trial recorded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evomerge.cli import main
from evomerge.config import load_config
from evomerge.recipe import PathRecipe, recipe_from_yaml
from evomerge.study import StudyStore
from path_checks import match_norm_eps
from study_configs import zoo_config

pytestmark = pytest.mark.slow
LIMIT = 20  # examples per task


def _search_export_rescore(config: Path, name: str, url: str, tmp_path: Path) -> tuple:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.runtime.scoring import LmEvalScorer
    from evomerge.search import task_specs

    assert main(["search", str(config)]) == 0
    store = StudyStore.open(url, name)
    best = store.trial(None)
    assert store.heldout(best.number) is not None  # held-out scoring rebuilt the recipe from the study
    out = tmp_path / f"{name}-best"
    assert main(["export", name, "--storage", url, "--out", str(out)]) == 0
    cfg = load_config(config)
    model = AutoModelForCausalLM.from_pretrained(out).eval()  # a standard checkpoint: no remote code
    scores = LmEvalScorer(task_specs(cfg), cfg.evaluation.include_paths).score(model, AutoTokenizer.from_pretrained(out), "fitness")
    return best, scores, model, out


def test_layer_swap_exports_exactly_what_it_scored(zoo_llama, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    config = zoo_config(zoo_llama, tmp_path, name="ls", trials=4, popsize=4, limit=LIMIT, search_space={"preset": "layer_swap"})
    best, scores, _, _ = _search_export_rescore(config, "ls", url, tmp_path)
    assert set(best.params) == {f"g{i}.source" for i in range(_n_layers(zoo_llama))}
    assert scores == best.user_attrs["scores.fitness"]  # exactly


def _n_layers(zoo) -> int:
    from evomerge.models.checkpoints import Checkpoint
    from evomerge.models.layout import num_layers

    return num_layers(Checkpoint.open(str(zoo.base)).config)


def _check_path_export(best, scores: dict, model, out: Path) -> None:
    """Scores within one example per task of the recorded ones, and the exported checkpoint equal to the
    in-memory path model once the norms' eps is matched (the raw difference is printed for the record)."""
    from transformers import AutoTokenizer

    from evomerge.models.path_model import PathModels

    recipe = recipe_from_yaml((out / "recipe.yaml").read_text())
    assert isinstance(recipe, PathRecipe) and model.config.num_hidden_layers == len(recipe.slots)
    assert (out / "mergekit.yaml").exists() == (not recipe.scaled)
    recorded = best.user_attrs["scores.fitness"]
    # Greedy exact match: the fold changes logits only through the norms' eps (see path_export), so an
    # answer flips only at a near-tie of two characters; allow one flipped example per task.
    assert all(abs(scores[t] - recorded[t]) <= 1 / LIMIT + 1e-9 for t in recorded), (scores, recorded)
    ids = AutoTokenizer.from_pretrained(out)(["12+34=46", "rev:abcd=dcba", "the cat sat on"], return_tensors="pt", padding=True).input_ids
    with torch.no_grad():
        path_logits = PathModels(torch.device("cpu")).build(recipe)(ids).logits
        raw = (path_logits - model(ids).logits).abs().max().item()
        match_norm_eps(model, recipe)
        matched = (path_logits - model(ids).logits).abs().max().item()
    print(f"{out.name}: {len(recipe.slots)} slots, scaled={recipe.scaled}, scores {scores} vs recorded {recorded}; "
          f"max |logit| {path_logits.abs().max().item():.3g}, max |logit diff| in-memory vs export {raw:.2e}, eps matched {matched:.2e}")
    assert matched <= 1e-5 * path_logits.abs().max().item()


def test_dfs_exports_a_standard_checkpoint_that_scores_what_it_scored(zoo_llama, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    config = zoo_config(zoo_llama, tmp_path, name="dfs", trials=6, popsize=6, limit=LIMIT, search_space={"preset": "dfs"})
    best, scores, model, out = _search_export_rescore(config, "dfs", url, tmp_path)
    assert len(best.params) == 2 * (2 * 2 * _n_layers(zoo_llama))  # repeats 2 x 2 sources x N layers, two genes per slot
    _check_path_export(best, scores, model, out)


def test_ps_dfs_chains_a_merge_study_into_a_path_study(zoo_llama, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))
    url = f"sqlite:///{tmp_path / 'study.db'}"
    ps = zoo_config(zoo_llama, tmp_path, name="ps", trials=4, popsize=4, limit=LIMIT)
    assert main(["search", str(ps)]) == 0
    arith = str(zoo_llama.specialists["arith"])
    config = zoo_config(zoo_llama, tmp_path, name="ps_dfs", trials=6, popsize=6, limit=LIMIT,
                        search_space={"preset": "dfs", "repeats": 1},
                        models__sources=[{"study": "ps", "storage": url}, arith])
    best, scores, model, out = _search_export_rescore(config, "ps_dfs", url, tmp_path)
    merged = StudyStore.open(url, "ps_dfs").config.models.sources[0]  # the stored config names the cache folder
    assert Path(merged).parent == tmp_path / "cache" / "trials"
    assert recipe_from_yaml((Path(merged) / "recipe.yaml").read_text()) == StudyStore.recipe_of(StudyStore.open(url, "ps").trial(None))
    assert recipe_from_yaml((out / "recipe.yaml").read_text()).models == (merged, arith)
    _check_path_export(best, scores, model, out)
