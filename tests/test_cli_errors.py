"""Bad input is refused before Ray starts: one line on stderr, exit code 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import evomerge.search.run
from evomerge.cli import main
from study_configs import zoo_config
from tiny_models import save_tiny


@pytest.fixture(autouse=True)
def _ray_must_not_start(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started although the input is bad")

    monkeypatch.setattr(evomerge.search.run, "start_ray", refuse)


def edit(path: Path, change) -> Path:
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data))
    return path


def refused(config: Path, capsys, expected: str) -> None:
    capsys.readouterr()  # drop what building the fixtures printed
    assert main(["search", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith("evomerge: ") and expected in err, err
    assert not (config.parent / "study.db").exists()


def test_missing_model_path(zoo_llama, tmp_path, capsys) -> None:
    cfg = edit(zoo_config(zoo_llama, tmp_path), lambda d: d["models"]["sources"].append(str(tmp_path / "nope")))
    refused(cfg, capsys, "no such folder")


def test_sources_that_differ_from_the_base(zoo_llama, tmp_path, capsys) -> None:
    other = save_tiny(tmp_path / "gpt2", "gpt2")
    cfg = edit(zoo_config(zoo_llama, tmp_path), lambda d: d["models"]["sources"].append(str(other)))
    refused(cfg, capsys, "tensor names differ from the base")


def test_sources_with_other_shapes(zoo_llama, tmp_path, capsys) -> None:
    other = save_tiny(tmp_path / "small-llama", "llama")
    cfg = edit(zoo_config(zoo_llama, tmp_path), lambda d: d["models"]["sources"].append(str(other)))
    refused(cfg, capsys, "merge only models of the same size")


def test_unknown_lm_eval_task(zoo_llama, tmp_path, capsys) -> None:
    cfg = edit(zoo_config(zoo_llama, tmp_path), lambda d: d["evaluation"]["tasks"][0].update(name="zoo_arth"))
    refused(cfg, capsys, "zoo_arth")


def test_malformed_yaml(zoo_llama, tmp_path, capsys) -> None:
    cfg = zoo_config(zoo_llama, tmp_path)
    cfg.write_text(cfg.read_text() + "budget: {trials: [\n")
    refused(cfg, capsys, "malformed YAML at line")


def test_unknown_config_key(zoo_llama, tmp_path, capsys) -> None:
    cfg = edit(zoo_config(zoo_llama, tmp_path), lambda d: d["optimizer"].update(sigma=0.3))
    refused(cfg, capsys, "optimizer.sigma: unknown key (did you mean: sigma0?)")


def test_bound_with_low_above_high(zoo_llama, tmp_path, capsys) -> None:
    space = {"preset": "global_ties", "params": {"weight": {"low": 1.2, "high": 0.4}, "density": {"low": 0.2, "high": 1.0}}}
    cfg = edit(zoo_config(zoo_llama, tmp_path), lambda d: d.update(search_space=space))
    refused(cfg, capsys, "low = 1.2 > high = 0.4; set low <= high")


def test_density_bound_outside_the_method_range(zoo_llama, tmp_path, capsys) -> None:
    space = {"preset": "global_ties", "params": {"weight": {"low": 0, "high": 1}, "density": {"low": 0.0, "high": 1.0}}}
    cfg = edit(zoo_config(zoo_llama, tmp_path), lambda d: d.update(search_space=space))
    refused(cfg, capsys, "density must be in (0, 1]")


def test_existing_study_name(zoo_llama, tmp_path, capsys) -> None:
    from evomerge.config import load_config
    from evomerge.study import StudyStore

    cfg_path = zoo_config(zoo_llama, tmp_path)
    StudyStore.create(load_config(cfg_path), {})
    assert main(["search", str(cfg_path)]) == 2
    assert "already exists" in capsys.readouterr().err
