"""A per-kind parameter search through the real pipeline on the zoo: Ray workers, lm-eval, the study,
export as a checkpoint and as mergekit YAML alone, which `evomerge merge` rebuilds to the same tensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evomerge.cli import main
from evomerge.study import StudyStore
from study_configs import zoo_config

pytestmark = pytest.mark.slow


def test_per_kind_search_exports_as_checkpoint_and_mergekit(zoo_llama, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    config = zoo_config(zoo_llama, tmp_path, name="kinds", trials=4, popsize=4, limit=10,
                        search_space={"preset": "ties_per_kind", "layer_groups": 1})
    url = f"sqlite:///{tmp_path / 'study.db'}"
    assert main(["search", str(config)]) == 0
    best = StudyStore.open(url, "kinds").trial(None)
    assert set(best.params) == {f"g0.{k}.{p}.{m}" for k in ("attention", "mlp", "other")
                                for p in ("weight", "density") for m in zoo_llama.specialists}
    recipe = StudyStore.recipe_of(best)
    assert recipe.kinds == ("attention", "mlp", "other") and len(set(map(str, recipe.groups))) == 3  # three distinct sets

    assert main(["export", "kinds", "--storage", url, "--out", str(tmp_path / "ckpt")]) == 0
    assert main(["export", "kinds", "--storage", url, "--out", str(tmp_path / "mk.yaml"), "--format", "mergekit"]) == 0
    assert (tmp_path / "mk.yaml").read_text() == (tmp_path / "ckpt" / "mergekit.yaml").read_text()
    assert main(["merge", str(tmp_path / "mk.yaml"), "--out", str(tmp_path / "again")]) == 0
    ours, again = load_file(tmp_path / "ckpt" / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert ours.keys() == again.keys() and all(torch.equal(ours[k], again[k]) for k in ours)
