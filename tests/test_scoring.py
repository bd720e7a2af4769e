"""LmEvalScorer over the zoo tasks: right numbers, right split, no stale results, useful errors."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.config import TaskConfig
from evomerge.runtime.scoring import LmEvalScorer
from evomerge.runtime.tasks import UnknownTaskError, check_tasks
from evomerge.zoo import eval_examples
from zoo_fixtures import EVALUATORS_DIR, zoo_llama  # noqa: F401 (fixture)

SPECS = (TaskConfig(name="zoo_arith"), TaskConfig(name="zoo_rev", weight=3.0))


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models gain nothing from threads, and on a busy machine 2 spinning threads run ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def scorer() -> LmEvalScorer:
    return LmEvalScorer(SPECS, [EVALUATORS_DIR])


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def _exact_match(model, tokenizer, skill: str, split: str, limit: int | None = None) -> float:
    """Reference, independent of lm-eval: is the target (answer + "\\n") the greedy continuation?"""
    examples = eval_examples(skill)[split][:limit]
    batch = tokenizer([ex.prompt + ex.target for ex in examples], return_tensors="pt", padding=True)  # right-padded
    with torch.no_grad():
        greedy = model(**batch).logits.argmax(-1)  # (N, T): the prediction for position t + 1
    hits = 0
    for i, ex in enumerate(examples):
        start, end = len(tokenizer.encode(ex.prompt)), len(tokenizer.encode(ex.prompt + ex.target))
        hits += bool(torch.equal(greedy[i, start - 1 : end - 1], batch.input_ids[i, start:end]))
    return hits / len(examples)


@pytest.mark.parametrize("split", ["fitness", "heldout"])
def test_scores_equal_exact_match_on_the_requested_split(scorer, zoo_llama, split):
    model, tok = _load(zoo_llama.specialists["arith"])
    scores = scorer.score(model, tok, split)
    assert scores == {
        "zoo_arith": pytest.approx(_exact_match(model, tok, "arith", split)),
        "zoo_rev": pytest.approx(_exact_match(model, tok, "rev", split)),
    }


def test_same_model_twice_gives_identical_scores(scorer, zoo_llama):
    model, tok = _load(zoo_llama.base)
    assert scorer.score(model, tok, "fitness") == scorer.score(model, tok, "fitness")


def test_weights_changed_in_place_change_the_scores(scorer, zoo_llama):
    model, tok = _load(zoo_llama.base)
    before = scorer.score(model, tok, "fitness")
    rev_model, _ = _load(zoo_llama.specialists["rev"])
    model.load_state_dict(rev_model.state_dict())  # a new candidate, same model object
    after = scorer.score(model, tok, "fitness")
    assert after == scorer.score(rev_model, tok, "fitness")  # what a fresh model of those weights scores
    assert after != before


def test_specialists_beat_the_base_on_their_own_skill(scorer, zoo_llama):
    scores = {name: scorer.score(*_load(path), "heldout") for name, path in [("base", zoo_llama.base), *zoo_llama.specialists.items()]}
    for skill, task in [("arith", "zoo_arith"), ("rev", "zoo_rev")]:
        other = "rev" if skill == "arith" else "arith"
        assert scores[skill][task] > scores["base"][task] + 0.05
        assert scores[skill][task] > scores[other][task] + 0.2


def test_limit_scores_the_first_examples(zoo_llama):
    scorer = LmEvalScorer([TaskConfig(name="zoo_arith", limit=7)], [EVALUATORS_DIR])
    model, tok = _load(zoo_llama.specialists["arith"])
    assert scorer.score(model, tok, "heldout")["zoo_arith"] == pytest.approx(_exact_match(model, tok, "arith", "heldout", 7))


def test_fitness_is_the_weighted_mean(scorer):
    assert scorer.fitness({"zoo_arith": 0.2, "zoo_rev": 0.6}) == pytest.approx((0.2 + 3 * 0.6) / 4)
    with pytest.raises(KeyError, match="zoo_rev"):
        scorer.fitness({"zoo_arith": 0.2})


def test_check_tasks_accepts_registered_names():
    check_tasks([TaskConfig(name="zoo_arith"), TaskConfig(name="zoo_rev")], [EVALUATORS_DIR])


def test_unknown_task_says_did_you_mean():
    with pytest.raises(UnknownTaskError, match=r"unknown lm-eval task 'zoo_arth' \(did you mean: zoo_arith"):
        check_tasks([TaskConfig(name="zoo_arith"), TaskConfig(name="zoo_arth")], [EVALUATORS_DIR])


def test_unknown_metric_and_split_name_the_choices(zoo_llama):
    scorer = LmEvalScorer([TaskConfig(name="zoo_rev", metric="accuracy", limit=2)], [EVALUATORS_DIR])
    with pytest.raises(ValueError, match=r"no metric 'accuracy'.*metrics: acc"):
        scorer.score(*_load(zoo_llama.base), "fitness")
    with pytest.raises(ValueError, match=r"no split 'dev' \(splits: fitness, heldout\); set fitness_split"):
        LmEvalScorer([TaskConfig(name="zoo_rev", fitness_split="dev")], [EVALUATORS_DIR])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"weight": -1.0}, "weight = -1.0"), ({"limit": 0}, "limit = 0"), ({"num_fewshot": -2}, "num_fewshot = -2")],
)
def test_task_spec_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TaskConfig(name="zoo_rev", **kwargs)


def test_duplicate_tasks_are_rejected():
    with pytest.raises(ValueError, match="listed more than once"):
        LmEvalScorer([TaskConfig(name="zoo_rev"), TaskConfig(name="zoo_rev")], [EVALUATORS_DIR])


def test_lower_is_better_metrics_count_negated_in_the_fitness(zoo_llama) -> None:
    """bits_per_byte is lower-is-better in lm-eval (its task declares nothing; lm-eval's metric registry
    says so): of two models, the one with the lower score gets the higher fitness."""
    specs = [TaskConfig(name="zoo_rev_ppl", metric="bits_per_byte", limit=30)]
    scorer = LmEvalScorer(specs, [EVALUATORS_DIR])
    assert scorer.signs == {"zoo_rev_ppl": -1.0}
    scores = sorted(scorer.score(*_load(path), "fitness")["zoo_rev_ppl"] for path in (zoo_llama.base, zoo_llama.specialists["rev"]))
    assert 0 < scores[0] < scores[1]
    fitness = [scorer.fitness({"zoo_rev_ppl": s}) for s in scores]
    assert fitness == [-scores[0], -scores[1]] and fitness[0] > fitness[1]
    mixed = LmEvalScorer([*specs, TaskConfig(name="zoo_rev", limit=30)], [EVALUATORS_DIR])
    assert mixed.fitness({"zoo_rev_ppl": 0.5, "zoo_rev": 0.9}) == pytest.approx((0.9 - 0.5) / 2)
