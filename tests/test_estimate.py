"""Anchor-based fitness estimates: stratified anchors from the known models' per-example results."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.config import TaskConfig
from evomerge.runtime.estimate import choose_anchors, choose_task_anchors, spearman
from evomerge.runtime.scoring import LmEvalScorer
from zoo_fixtures import EVALUATORS_DIR, zoo_llama  # noqa: F401 (fixture)


def test_anchors_cover_every_pattern_and_weigh_it_by_its_size() -> None:
    rng = np.random.default_rng(0)
    values = (rng.random((4, 400)) < [[0.2], [0.9], [0.5], [0.7]]).astype(float)
    anchors = choose_task_anchors(values, 0.2, seed=1)
    assert 80 <= len(anchors.indices) <= 100 and list(anchors.indices) == sorted(set(anchors.indices))
    assert sum(anchors.weights) == pytest.approx(1.0)
    patterns = {tuple(col) for col in values.T}
    assert {tuple(values[:, i]) for i in anchors.indices} == patterns  # every group has an anchor
    for model in values:  # the known models' own estimates are close to their full means
        assert anchors.estimate(model[list(anchors.indices)]) == pytest.approx(model.mean(), abs=0.02)


def test_a_whole_sample_is_exact_and_the_estimate_ranks_new_models_like_the_full_score() -> None:
    rng = np.random.default_rng(3)
    known = (rng.random((4, 300)) < [[0.2], [0.9], [0.5], [0.7]]).astype(float)
    exact = choose_task_anchors(known, 1.0, seed=0)
    assert exact.estimate(known[0]) == pytest.approx(known[0].mean())
    anchors = choose_anchors({"t": known}, 0.25, seed=0).tasks["t"]
    # candidates that mix the known models' skills: their full scores and estimates rank alike
    mixes = [np.where(rng.random(300) < p, known[0], known[1]) for p in np.linspace(0, 1, 12)]
    full = [m.mean() for m in mixes]
    estimated = [anchors.estimate(m[list(anchors.indices)]) for m in mixes]
    assert spearman(full, estimated) >= 0.9


def test_the_scorer_gives_per_example_values_at_anchor_indices(zoo_llama) -> None:
    torch.set_num_threads(1)
    scorer = LmEvalScorer([TaskConfig(name="zoo_arith", limit=40), TaskConfig(name="zoo_rev", limit=40)], [EVALUATORS_DIR])
    assert scorer.estimable() == ["zoo_arith", "zoo_rev"]
    model, tok = AutoModelForCausalLM.from_pretrained(zoo_llama.base), AutoTokenizer.from_pretrained(zoo_llama.base)
    values, others = scorer.example_values(model, tok, "fitness")
    assert others == {} and [len(v) for v in values.values()] == [40, 40]
    full = scorer.score(model, tok, "fitness")
    assert np.mean(values["zoo_rev"]) == pytest.approx(full["zoo_rev"])
    picked, _ = scorer.example_values(model, tok, "fitness", {"zoo_arith": [1, 5, 30], "zoo_rev": [0, 39]})
    assert picked == {"zoo_arith": [values["zoo_arith"][i] for i in (1, 5, 30)],
                      "zoo_rev": [values["zoo_rev"][i] for i in (0, 39)]}


@pytest.mark.slow
def test_a_search_with_estimated_fitness_reports_and_exports_full_scores(zoo_llama, tmp_path, capsys) -> None:
    from evomerge.cli import main
    from evomerge.study import StudyStore
    from study_configs import zoo_config

    config = zoo_config(zoo_llama, tmp_path, name="est", trials=8, popsize=4, limit=80,
                        evaluation__estimate={"anchors": 0.25, "rescore_top": 2})
    assert main(["search", str(config)]) == 0
    out = capsys.readouterr().out
    assert "anchor examples" in out and "full fitness" in out
    store = StudyStore.open(f"sqlite:///{tmp_path / 'study.db'}", "est")
    anchors = store.anchors()
    assert set(anchors) == {"zoo_arith", "zoo_rev"} and all(a["n"] == 80 for a in anchors.values())
    trials = store.completed()
    assert len(trials) == 8 and all(t.user_attrs["estimated"] for t in trials)
    per_candidate = trials[0].user_attrs["examples"]
    assert per_candidate == sum(len(a["indices"]) for a in anchors.values()) <= 0.4 * 160
    rescored = [t for t in trials if store.full(t.number) is not None]
    assert len(rescored) == 2
    best = store.trial(None)
    assert store.full(best.number) is not None and store.heldout(best.number) is not None
    assert main(["export", "est", "--storage", f"sqlite:///{tmp_path / 'study.db'}", "--out", str(tmp_path / "best")]) == 0
    assert f"**{store.full(best.number)['fitness']:.4f}**" in (tmp_path / "best" / "README.md").read_text()
