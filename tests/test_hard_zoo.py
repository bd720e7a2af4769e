"""The hard zoo (issue 16): three specialists, one over-trained so that naive merges lose, and skills scored
by lm-eval generate_until with exact match through evomerge's scorer."""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.config import TaskConfig
from evomerge.runtime.scoring import LmEvalScorer
from evomerge.zoo import RECIPES, ZooBuildError, build_zoo, eval_examples, training_examples, validation_examples, zoo_fingerprint
from evomerge.zoo._build import Overtrain
from evomerge.zoo._train import Schedule, exact_match
from zoo_fixtures import EVALUATORS_DIR, REPO_ROOT, zoo_cache_dir, zoo_hard  # noqa: F401 (fixture)


def test_the_earlier_zoos_keep_their_fingerprints():
    # their checkpoints are cached on every machine: recipe fields added later (arch, overtrain) enter
    # the fingerprint only when set, so these zoos are not rebuilt
    assert {family: zoo_fingerprint(family, 0, RECIPES[family]) for family in ("llama", "qwen2", "gpt2")} == {
        "llama": "3e5b939a212788c3", "qwen2": "56279f8e18f8c371", "gpt2": "de47661eef8f7288"}
    assert zoo_fingerprint("hard", 0, RECIPES["hard"]) != zoo_fingerprint("hard", 0, dataclasses.replace(RECIPES["hard"], overtrain=None))


def test_the_hard_zoo_meets_its_targets_and_its_overtrained_specialist_poisons_naive_merges(zoo_hard):
    manifest = json.loads((zoo_hard.root / "zoo.json").read_text())
    recipe, scores = RECIPES["hard"], manifest["skill_scores"]
    assert recipe.skill_target is not None and recipe.base_ceiling is not None and recipe.overtrain is not None
    assert set(zoo_hard.specialists) == {"arith", "rev", "upper"}
    for skill in recipe.skills:
        assert scores[skill][skill] >= recipe.skill_target  # the over-trained one checked after over-training
        assert scores["base"][skill] <= recipe.base_ceiling
    assert manifest["overtrained"] == {"skill": "rev", **dataclasses.asdict(recipe.overtrain.schedule)}
    merged = {name: statistics.fmean(by_skill.values()) for name, by_skill in manifest["naive_merge_scores"].items()}
    assert merged["task_sum"] <= merged["task_sum_at_target"] - recipe.overtrain.poison_margin
    # the over-trained rev vector wins the sum: rev survives it, the other skills do not
    assert manifest["naive_merge_scores"]["task_sum"]["rev"] >= 0.8
    assert max(manifest["naive_merge_scores"]["task_sum"][skill] for skill in ("arith", "upper")) <= 0.2


def test_a_generate_until_task_scores_through_the_scorer_as_greedy_exact_match(zoo_hard):
    tasks = [TaskConfig(name="hard_upper", metric="exact_match", limit=60), TaskConfig(name="hard_arith", metric="exact_match", limit=60)]
    scorer = LmEvalScorer(tasks, [EVALUATORS_DIR])
    assert scorer.signs == {"hard_upper": 1.0, "hard_arith": 1.0}
    model = AutoModelForCausalLM.from_pretrained(zoo_hard.specialists["upper"]).eval()
    scores = scorer.score(model, AutoTokenizer.from_pretrained(zoo_hard.specialists["upper"]), "fitness")
    # the same examples, teacher-forced: is the whole target, "\n" included, the greedy continuation?
    expected = {f"hard_{skill}": exact_match(model, eval_examples(skill)["fitness"][:60]) for skill in ("upper", "arith")}
    assert scores == expected
    assert scores["hard_upper"] >= 0.8 and scores["hard_arith"] <= 0.2  # a specialist: the comparison can fail


def test_upper_splits_are_disjoint_and_never_trained_on():
    splits = {**eval_examples("upper"), "validation": validation_examples("upper")}
    prompts = [{ex.prompt for ex in split} for split in splits.values()]
    assert [len(p) for p in prompts] == [len(split) for split in splits.values()]
    assert not prompts[0] & prompts[1] and not prompts[0] & prompts[2] and not prompts[1] & prompts[2]
    stream = training_examples({"upper": 1.0, "upper_prose": 1.0}, seed=0)
    trained = {next(stream).prompt for _ in range(20_000)}
    assert not trained & set().union(*prompts)
    assert all(ex.target == ex.prompt[:-1].upper() + "\n" for ex in splits["heldout"])


def test_the_overtrained_skill_must_be_a_skill_of_the_recipe():
    with pytest.raises(ValueError, match=r"overtrain.skill = 'upper' is not one of the recipe's skills \(arith, rev\)"):
        dataclasses.replace(RECIPES["gpt2"], overtrain=Overtrain("upper", Schedule(steps=5, lr=1e-3)))


def _overtrained_gpt2(monkeypatch, margin: float) -> None:
    recipe = dataclasses.replace(RECIPES["gpt2"], overtrain=Overtrain("rev", Schedule(steps=10, lr=2e-3), poison_margin=margin))
    monkeypatch.setitem(RECIPES, "gpt2", recipe)


def test_an_overtrained_zoo_records_it_and_its_naive_merges(tmp_path, monkeypatch):
    _overtrained_gpt2(monkeypatch, margin=-1.0)  # a margin every build meets
    lines: list[str] = []
    zoo = build_zoo(tmp_path, family="gpt2", progress=lines.append)
    manifest = json.loads((zoo.root / "zoo.json").read_text())
    assert manifest["overtrained"] == {"skill": "rev", "steps": 10, "lr": 2e-3, "warmup_steps": 0, "cosine": False}
    assert set(manifest["naive_merge_scores"]) == {"plain_average", "task_sum", "task_sum_at_target"}
    assert all(set(scores) == {"arith", "rev"} for scores in manifest["naive_merge_scores"].values())
    assert any(line.startswith("zoo: over-training gpt2 rev") for line in lines)
    assert any(line.startswith("zoo:   task sum at target") for line in lines)


def test_a_zoo_whose_naive_merges_are_not_poisoned_fails_the_build(tmp_path, monkeypatch):
    _overtrained_gpt2(monkeypatch, margin=1.5)  # no build can be 1.5 below a score of at most 1
    with pytest.raises(ZooBuildError, match=r"^zoo build failed: the sum of the gpt2 specialists' task vectors scores \d\.\d{3} "
                                             r"mean exact match \(validation split\), not 1\.5 below the \d\.\d{3} it scores "
                                             r"with the rev specialist at its target: over-training it does not poison"):
        build_zoo(tmp_path, family="gpt2", progress=None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_the_reference_script_runs_end_to_end(zoo_hard, tmp_path):
    # one grid point (task arithmetic, weights 1) instead of 125: the script must not rot; its numbers are
    # docs/results/hard_zoo.md's business
    done = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "hard_zoo_references.py"), "--zoo", str(zoo_cache_dir()),
                           "--grid", "1", "--out", str(tmp_path)], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads((tmp_path / "hard_zoo.json").read_text())
    rows = {row["name"]: row for row in data["rows"]}
    assert data["reference"]["weights"] == [1.0, 1.0, 1.0] and data["reference"]["mean_heldout"] == rows["task arithmetic, weights 1"]["mean_heldout"]
    assert "| default TIES | ties (weight (1, 1, 1), density (0.5, 0.5, 0.5)) |" in (tmp_path / "hard_zoo.md").read_text()
