from pathlib import Path

import pytest

from evomerge.config import load_config
from evomerge.errors import ConfigError

GOOD = """
name: t
models: {base: ./base, sources: [./a, org/remote-model]}
search_space: ties
evaluation:
  tasks: [{name: zoo_arith}, {name: zoo_rev, weight: 2}]
budget: {trials: 4}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return path


def test_good_config_resolves_presets_and_paths(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.search_space.methods == ["ties"] and cfg.search_space.layer_groups == 2
    assert cfg.models.base == str((tmp_path / "base").resolve())  # './' paths are local even if missing
    assert cfg.models.sources == [str((tmp_path / "a").resolve()), "org/remote-model"]  # Hub id kept
    assert cfg.evaluation.tasks[1].weight == 2
    assert cfg.with_overrides(**{"budget.trials": 9, "name": None}).budget.trials == 9


def test_preset_fields_can_be_overridden(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD.replace("search_space: ties", "search_space: {preset: ties, layer_groups: 4}")))
    assert cfg.search_space.layer_groups == 4 and cfg.search_space.methods == ["ties"]


def test_a_config_without_a_space_gets_the_default_preset_written_out(tmp_path: Path) -> None:
    from evomerge.config import DEFAULT_SEARCH_SPACE, load_preset

    cfg = load_config(write(tmp_path, GOOD.replace("search_space: ties\n", "")))
    preset = load_preset(DEFAULT_SEARCH_SPACE)
    assert cfg.search_space.methods == preset["methods"] == ["task_arithmetic"]
    assert cfg.search_space.layer_groups == preset["layer_groups"]
    assert "methods:\n  - task_arithmetic" in cfg.to_yaml()  # stored expanded: a later default cannot change a study


@pytest.mark.parametrize("edit,message", [
    (("budget: {trials: 4}", "budget: {trials: 4, tirals: 3}"), r"budget\.tirals: unknown key \(did you mean: trials\?\)"),
    (("name: t", "nmae: t"), r"nmae: unknown key \(did you mean: name\?\)"),
    (("[{name: zoo_arith}", "[{nam: zoo_arith}"), r"evaluation\.tasks\.0\.nam: unknown key \(did you mean: name\?\)"),
    (("search_space: ties", "search_space: {preset: ties, params: {density: {low: 0.9, high: 0.2}}}"),
     r"search_space\.params\.density: low = 0\.9 > high = 0\.2; set low <= high"),
    (("search_space: ties", "search_space: tie"), r"search_space\.preset = 'tie' not found \(did you mean: ties"),
    (("weight: 2", "weight: -1"), r"evaluation\.tasks\.1\.weight: Input should be greater than 0"),
    (("{name: zoo_rev, weight: 2}", "{name: zoo_arith}"), r"task 'zoo_arith' is listed twice"),
    (("models: {base: ./base, sources: [./a, org/remote-model]}", "models: {sources: [./a]}"), r"models\.base: required key is missing"),
])
def test_bad_config_gives_one_line(tmp_path: Path, edit: tuple[str, str], message: str) -> None:
    text = GOOD.replace(*edit)
    assert text != GOOD
    with pytest.raises(ConfigError, match=message) as info:
        load_config(write(tmp_path, text))
    assert "\n" not in str(info.value)


def test_malformed_yaml_names_the_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"malformed YAML at line 3"):
        load_config(write(tmp_path, "name: t\nmodels:\n  base: x: y\n"))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml")


def test_space_kinds_and_their_typos(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD.replace("search_space: ties", "search_space: {kind: layer_swap, layer_groups: 2}")))
    assert cfg.search_space.kind == "layer_swap" and cfg.search_space.include_base
    with pytest.raises(ConfigError, match=r"search_space\.repeat: unknown key \(did you mean: repeats\?\)"):
        load_config(write(tmp_path, GOOD.replace("search_space: ties", "search_space: {kind: dfs, repeat: 2}")))
    with pytest.raises(ConfigError, match=r"search_space\.scale: low = 0\.0; a scale must be positive"):
        load_config(write(tmp_path, GOOD.replace("search_space: ties", "search_space: {kind: dfs, scale: {low: 0, high: 2}}")))
