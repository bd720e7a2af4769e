"""`evomerge export --format mergekit`: the mergekit YAML alone, no weights; refused in one line, with
nothing written, when a trial's recipe has no mergekit form."""

from __future__ import annotations

import re
from pathlib import Path

import optuna
import pytest
import torch
import yaml

from evomerge.cli import main
from evomerge.config import parse_config
from evomerge.export.mergekit import load_mergekit_recipe
from evomerge.recipe import PathRecipe
from evomerge.recipe import Recipe
from evomerge.study import StudyStore
from tiny_models import save_tiny

KINDS = ("attention", "mlp", "other")


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Recipe | PathRecipe]]:
    """A study with four completed trials: a per-kind TIES merge, consensus (the best), a scaled and an unscaled path."""
    root = tmp_path_factory.mktemp("export")
    base = str(save_tiny(root / "base", "llama", seed=0))
    a, b = (str(save_tiny(root / n, "llama", seed=i, perturb_from=Path(base))) for i, n in ((1, "a"), (2, "b")))
    url = f"sqlite:///{root / 'study.db'}"
    cfg = parse_config({
        "name": "mk", "storage": url, "models": {"base": base, "sources": [a, b]},
        "search_space": {"methods": ["ties"], "params": {"weight": {"low": 0, "high": 1}}},
        "evaluation": {"tasks": [{"name": "zoo_arith"}]},
    })
    recipes = {
        "kinds": Recipe("ties", base, (a, b), tuple({"weight": (0.2 * (i + 1), 0.7), "density": 0.5 + 0.1 * i} for i in range(3)),
                        dtype="float32", kinds=KINDS),
        "consensus": Recipe("consensus", base, (a, b), ({},)),
        "scaled": PathRecipe(models=(a, b), slots=((0, 0, 1.0), (1, 1, 0.5), (0, 2, 1.0), (0, 3, 1.0))),
        "path": PathRecipe(models=(a, b), slots=((0, 0, 1.0), (1, 1, 1.0), (0, 2, 1.0), (0, 3, 1.0))),
    }
    store = StudyStore.create(cfg, {"g0.weight.a": 1.0})
    dists = {"g0.weight.a": optuna.distributions.FloatDistribution(0, 1)}
    for i, (key, recipe) in enumerate(recipes.items()):
        number, _ = store.start_trial({"g0.weight.a": 0.1 * i}, dists, {"recipe": recipe.to_dict()})
        store.finish_trial(number, 0.9 if key == "consensus" else 0.1 * i, {"scores.fitness": {"zoo_arith": 0.5}})
    return url, recipes


def export(url: str, out: Path, *extra: str) -> int:
    return main(["export", "mk", "--storage", url, "--out", str(out), "--format", "mergekit", *extra])


def test_yaml_out_is_the_file_and_it_rebuilds_the_checkpoint_exports_tensors(study, tmp_path: Path, capsys) -> None:
    from safetensors.torch import load_file

    url, recipes = study
    assert export(url, tmp_path / "merge.yaml", "--trial", "0") == 0
    assert "exported trial 0 as mergekit YAML" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["merge.yaml"]  # no weights, no folder
    text = (tmp_path / "merge.yaml").read_text()
    assert load_mergekit_recipe(text) == recipes["kinds"]
    assert main(["export", "mk", "--storage", url, "--out", str(tmp_path / "ckpt"), "--trial", "0"]) == 0
    assert main(["merge", str(tmp_path / "merge.yaml"), "--out", str(tmp_path / "again")]) == 0
    ours, again = load_file(tmp_path / "ckpt" / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert ours.keys() == again.keys() and all(torch.equal(ours[k], again[k]) for k in ours)
    assert (tmp_path / "ckpt" / "mergekit.yaml").read_text() == text  # the same YAML either way


def test_folder_out_gets_mergekit_yaml_and_an_existing_one_needs_force(study, tmp_path: Path, capsys) -> None:
    url, _ = study
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "notes.txt").write_text("kept")
    assert export(url, tmp_path / "dir", "--trial", "0") == 0
    written = (tmp_path / "dir" / "mergekit.yaml").read_text()
    assert yaml.safe_load(written)["merge_method"] == "ties"
    (tmp_path / "dir" / "mergekit.yaml").write_text("mine")
    capsys.readouterr()
    assert export(url, tmp_path / "dir", "--trial", "0") == 2
    assert "mergekit.yaml: already exists; choose another path or pass --force" in capsys.readouterr().err
    assert (tmp_path / "dir" / "mergekit.yaml").read_text() == "mine"
    assert export(url, tmp_path / "dir", "--trial", "0", "--force") == 0
    assert (tmp_path / "dir" / "mergekit.yaml").read_text() == written and (tmp_path / "dir" / "notes.txt").is_file()


@pytest.mark.parametrize(("trial", "message"), [
    ([], r"trial 1 has no mergekit form: .*consensus merging has no mergekit counterpart.*; export it with --format checkpoint"),
    (["--trial", "2"], r"trial 2 has no mergekit form: a path with scaled slots cannot be written as a mergekit passthrough"),
])
def test_recipes_without_a_mergekit_form_are_refused_and_nothing_is_written(study, tmp_path: Path, capsys, trial, message) -> None:
    url, _ = study
    capsys.readouterr()
    assert export(url, tmp_path / "out", *trial) == 2  # no --trial: the best trial, consensus here
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err)
    assert list(tmp_path.iterdir()) == []


def test_unscaled_path_exports_as_a_passthrough(study, tmp_path: Path) -> None:
    url, recipes = study
    assert export(url, tmp_path / "path.yml", "--trial", "3") == 0
    config = yaml.safe_load((tmp_path / "path.yml").read_text())
    assert config["merge_method"] == "passthrough" and len(config["slices"]) == 3  # a0, b1, a2-a3


def test_pareto_needs_a_folder(study, tmp_path: Path, capsys) -> None:
    url, _ = study
    assert export(url, tmp_path / "x.yaml", "--pareto") == 2
    assert "with --pareto, give a folder" in capsys.readouterr().err
