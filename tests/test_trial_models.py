"""PS+DFS plumbing: a model reference may name a trial of another study; it is materialized once, in a cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evomerge.models.checkpoints import Checkpoint
from evomerge.config import TrialRef, parse_config
from evomerge.errors import ConfigError
from evomerge.recipe import PathRecipe
from evomerge.recipe import Recipe
from evomerge.search.spaces._dataflow import DataFlowSpace
from evomerge.study import StudyStore
from evomerge.export.trial_models import materialize_trial_models
from tiny_models import save_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("trial_models")
    base = save_tiny(root / "base", "llama", seed=0)
    return {"base": str(base), **{n: str(save_tiny(root / n, "llama", seed=i + 1, perturb_from=base)) for i, n in enumerate(("a", "b"))}}


def _config(tiny: dict, storage: str, name: str, sources: list, **space) -> object:
    return parse_config({
        "name": name, "storage": storage,
        "models": {"base": tiny["base"], "sources": sources},
        "search_space": space or {"kind": "parameter", "params": {"weight": {"low": 0.0, "high": 1.0}}},
        "evaluation": {"tasks": [{"name": "zoo_arith", "limit": 4}]},
    })


def _study_with_trials(tiny: dict, storage: str, name: str, recipes_and_fitness: list) -> StudyStore:
    store = StudyStore.create(_config(tiny, storage, name, [tiny["a"], tiny["b"]]), {})
    for recipe, fitness in recipes_and_fitness:
        number, _ = store.start_trial(None, {}, {})
        store.set_recipe(number, recipe.to_dict())
        if fitness is not None:
            store.finish_trial(number, fitness, {"scores.fitness": {"zoo_arith": fitness}})
    return store


def _merge(tiny: dict, weight: float) -> Recipe:
    return Recipe(method="task_arithmetic", base=tiny["base"], sources=(tiny["a"], tiny["b"]), groups=({"weight": (weight, 1 - weight)},))


def test_trial_refs_parse_and_typos_name_the_fix(tiny, tmp_path) -> None:
    cfg = _config(tiny, "sqlite:///x.db", "t", [{"study": "ps", "storage": "sqlite:///ps.db", "trial": 3}, tiny["a"]])
    assert cfg.models.sources[0] == TrialRef(study="ps", storage="sqlite:///ps.db", trial=3)
    assert parse_config(cfg.model_dump()) == cfg  # survives the stored-config round trip
    with pytest.raises(ConfigError, match=r"models\.sources: item 0: unknown key 'stdy' in a trial reference \(did you mean: study\?\)"):
        _config(tiny, "sqlite:///x.db", "t", [{"stdy": "ps", "storage": "sqlite:///ps.db"}])
    with pytest.raises(ConfigError, match=r"models\.sources: item 1: trial reference storage: field required"):
        _config(tiny, "sqlite:///x.db", "t", [tiny["a"], {"study": "ps"}])


def test_best_trial_is_materialized_once_and_feeds_a_dfs_space(tiny, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))
    storage = f"sqlite:///{tmp_path / 'ps.db'}"
    _study_with_trials(tiny, storage, "ps", [(_merge(tiny, 0.3), 0.4), (_merge(tiny, 0.8), 0.9), (_merge(tiny, 0.5), None)])
    cfg = _config(tiny, storage, "ps_dfs", [{"study": "ps", "storage": storage}, tiny["b"]], kind="dfs")

    resolved = materialize_trial_models(cfg)
    folder = Path(resolved.models.sources[0])
    assert folder.parent == tmp_path / "cache" / "trials" and resolved.models.sources[1] == tiny["b"]
    assert Recipe.from_yaml((folder / "recipe.yaml").read_text()) == _merge(tiny, 0.8)  # the best trial
    assert "trial 1" in (folder / "README.md").read_text()
    name = "model.layers.0.mlp.down_proj.weight"
    base, a, b = (Checkpoint.open(tiny[k]).tensor(name) for k in ("base", "a", "b"))
    assert torch.allclose(Checkpoint.open(str(folder)).tensor(name), base + 0.8 * (a - base) + 0.2 * (b - base), atol=1e-6)

    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert materialize_trial_models(cfg) == resolved  # the second time: the cached folder, not rewritten
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    pinned = materialize_trial_models(_config(tiny, storage, "x", [{"study": "ps", "storage": storage, "trial": 0}], kind="dfs"))
    assert pinned.models.sources[0] != str(folder)  # another trial, another folder

    space = DataFlowSpace(resolved.search_space, resolved.models.base, list(resolved.models.sources), 4)
    assert space.decode({g.name: g.default for g in space.genes}).models[0] == str(folder)


def test_a_path_trial_materializes_as_a_standard_checkpoint(tiny, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))
    storage = f"sqlite:///{tmp_path / 'dfs.db'}"
    path = PathRecipe(models=(tiny["a"], tiny["b"]), slots=((0, 0, 1.0), (1, 1, 1.5), (1, 1, 1.0), (0, 3, 0.5)))
    _study_with_trials(tiny, storage, "dfs", [(path, 0.5)])
    cfg = _config(tiny, storage, "next", [{"study": "dfs", "storage": storage, "trial": 0}], kind="dfs")
    folder = Path(materialize_trial_models(cfg).models.sources[0])
    assert Checkpoint.open(str(folder)).config["num_hidden_layers"] == 4 and (folder / "recipe.yaml").is_file()


def test_missing_study_or_unfinished_trial_is_a_config_error(tiny, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))
    storage = f"sqlite:///{tmp_path / 'ps.db'}"
    _study_with_trials(tiny, storage, "ps", [(_merge(tiny, 0.3), 0.4), (_merge(tiny, 0.5), None)])
    with pytest.raises(ConfigError, match=r"models\.sources\[0\] \(study 'nope', trial best\): study 'nope' not found .*studies there: ps"):
        materialize_trial_models(_config(tiny, storage, "x", [{"study": "nope", "storage": storage}]))
    with pytest.raises(ConfigError, match=r"models\.base \(study 'ps', trial 1\): trial 1 is RUNNING, not COMPLETE"):
        materialize_trial_models(parse_config({**_config(tiny, storage, "x", [tiny["a"]]).model_dump(),
                                               "models": {"base": {"study": "ps", "storage": storage, "trial": 1}, "sources": [tiny["a"]]}}))


def test_prepare_resolves_trial_refs_before_anything_reads_the_models(tiny, tmp_path, monkeypatch) -> None:
    from evomerge.search import prepare

    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))
    storage = f"sqlite:///{tmp_path / 'ps.db'}"
    _study_with_trials(tiny, storage, "ps", [(_merge(tiny, 0.6), 0.5)])
    prepared = prepare(_config(tiny, storage, "ps_dfs", [{"study": "ps", "storage": storage}, tiny["a"]], kind="dfs", repeats=1))
    folder = prepared.cfg.models.sources[0]
    assert Path(folder).parent == tmp_path / "cache" / "trials" and prepared.setup.sources == (folder, tiny["a"])
    assert isinstance(prepared.space, DataFlowSpace) and prepared.space.models == (folder, tiny["a"])


def test_the_example_ps_dfs_configs_validate() -> None:
    from evomerge.config import load_config
    from evomerge.dirs import SEARCH_SPACES_DIR

    stage1 = load_config(SEARCH_SPACES_DIR / "examples" / "ps_dfs_stage1.yaml")
    chained = load_config(SEARCH_SPACES_DIR / "examples" / "ps_dfs.yaml")
    assert chained.models.sources[0] == TrialRef(study=stage1.name, storage=stage1.storage)
    assert chained.search_space.kind == "dfs" and stage1.search_space.kind == "parameter"
