"""Multi-fidelity: a first pass on part of the fitness examples, full scoring only for promising candidates."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import optuna
import pytest

from evomerge.config import load_config
from evomerge.search import prepare, run_search
from evomerge.study import FIRST_PASS_ATTR, StudyStore
from evomerge.runtime.messages import FirstPass
from evomerge.runtime.worker import CandidateWorker
from study_configs import zoo_config

PRUNED, COMPLETE = optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.COMPLETE


@pytest.fixture(scope="module")
def worker(zoo_llama, tmp_path_factory) -> CandidateWorker:
    tmp = tmp_path_factory.mktemp("fp")
    prepared = prepare(load_config(zoo_config(zoo_llama, tmp, limit=40)))
    return CandidateWorker(prepared.setup)


@pytest.fixture(scope="module")
def recipe(zoo_llama, tmp_path_factory):
    prepared = prepare(load_config(zoo_config(zoo_llama, tmp_path_factory.mktemp("fpr"), limit=40)))
    return prepared.space.decode({g.name: g.default for g in prepared.space.genes})


def test_first_pass_scores_the_first_part_of_each_task(worker: CandidateWorker) -> None:
    split = worker.scorer._splits["fitness"]
    assert worker.scorer._counts(split, 0.25) == {"zoo_arith": 10, "zoo_rev": 10}
    assert worker.scorer._counts(split, 1.0) == {"zoo_arith": 40, "zoo_rev": 40}
    with pytest.raises(ValueError, match="fraction"):
        worker.scorer._counts(split, 0.0)


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.6])
def test_two_passes_give_exactly_the_full_scores(worker: CandidateWorker, recipe, fraction: float) -> None:
    """The full pass after a first pass scores only the remaining examples and aggregates all of them."""
    worker.build(recipe)
    model, tokenizer, scorer = worker.model, worker.tokenizer, worker.scorer
    full = scorer.score(model, tokenizer, "fitness")
    first = scorer.score_first_pass(model, tokenizer, "fitness", fraction)
    assert set(first.items) == {"zoo_arith", "zoo_rev"}  # zero-shot leaf tasks: combinable
    assert [len(v) for v in first.items.values()] == [math.ceil(fraction * 40)] * 2
    assert scorer.score_rest(model, tokenizer, first) == full  # exactly


def test_promoted_candidate_gets_exactly_the_full_scores(worker: CandidateWorker, recipe) -> None:
    plain = worker.evaluate(recipe)
    promoted = worker.evaluate(recipe, first_pass=FirstPass(0.25, -math.inf))
    assert promoted.full and promoted.scores == plain.scores and promoted.fitness == plain.fitness
    assert promoted.first_pass is not None and promoted.first_pass_fitness == worker.scorer.fitness(promoted.first_pass)
    held = worker.evaluate(recipe, first_pass=FirstPass(0.25, math.inf))
    assert not held.full and held.scores == promoted.first_pass and held.fitness == promoted.first_pass_fitness


@pytest.mark.slow
def test_search_with_a_first_pass_prunes_deterministically(zoo_llama, tmp_path: Path) -> None:
    """Generation 0 is scored in full (no earlier first passes); later candidates below the median
    first pass of the generations complete when they were dispatched are PRUNED with their first-pass
    fitness; the best trial is a full one; a run of 12 trials and a run of 8 resumed for 4 more give the
    same trials (the bar is rebuilt from the study on resume)."""
    from evomerge.search import resume_search

    runs, summaries = [], []
    for name, trials_first in (("fp-a", 12), ("fp-b", 8)):
        cfg = load_config(zoo_config(zoo_llama, tmp_path, name=name, trials=trials_first, popsize=4,
                                     evaluation__first_pass={"fraction": 0.25, "promote": 0.5}))
        summaries.append(run_search(prepare(cfg), progress=lambda s: None))
        if trials_first < 12:
            resume_search(StudyStore.open(cfg.storage, name), 12 - trials_first, progress=lambda s: None)
        store = StudyStore.open(cfg.storage, name)
        runs.append({(t.user_attrs["generation"], t.user_attrs["candidate"]): t for t in store.study.get_trials()})
    assert [{k: (t.state, t.params, t.user_attrs["fitness"]) for k, t in run.items()} for run in runs][0] == \
        {k: (t.state, t.params, t.user_attrs["fitness"]) for k, t in runs[1].items()}
    trials, summary, store = runs[0], summaries[0], StudyStore.open(cfg.storage, "fp-a")

    assert sorted(trials) == [(g, c) for g in range(3) for c in range(4)]
    assert all(trials[(0, c)].state == COMPLETE for c in range(4))
    pruned = [t for t in trials.values() if t.state == PRUNED]
    assert pruned and summary.pruned == len(pruned)
    lookahead = 2  # popsize 4 with 2 workers
    for t in trials.values():
        g, c = t.user_attrs["generation"], t.user_attrs["candidate"]
        assert FIRST_PASS_ATTR in t.user_attrs and set(t.user_attrs["scores.first_pass"]) == {"zoo_arith", "zoo_rev"}
        earlier = [u.user_attrs[FIRST_PASS_ATTR] for (h, _), u in trials.items() if h <= g - (2 if c < lookahead else 1)]
        bar = float(np.quantile(earlier, 0.5)) if earlier else -math.inf
        assert (t.state == PRUNED) == (t.user_attrs[FIRST_PASS_ATTR] < bar), (g, c)
        if t.state == PRUNED:
            assert t.value == t.user_attrs["fitness"] == t.user_attrs[FIRST_PASS_ATTR]
    best = store.trial(None)
    assert best.state == COMPLETE and summary.best_number == best.number

    from evomerge.study.status import studies_table, trials_table

    assert "first pass)" in trials_table(cfg.storage, "fp-a")
    header, *rows = studies_table(cfg.storage).splitlines()
    assert "pruned" in header.split() and any(row.split()[2] == str(len(pruned)) for row in rows if row.startswith("fp-a"))


def test_few_shot_tasks_are_scored_again_in_full(worker: CandidateWorker) -> None:
    """Few-shot contexts come from one random sequence over the scored examples, so a pass starting mid-way
    would see other contexts: such tasks are rescored whole, and the result is still exactly `score`'s."""
    from evomerge.config import TaskConfig
    from evomerge.runtime.scoring import LmEvalScorer
    from zoo_fixtures import EVALUATORS_DIR

    scorer = LmEvalScorer([TaskConfig(name="zoo_arith", num_fewshot=2, limit=12)], [EVALUATORS_DIR])
    first = scorer.score_first_pass(worker.model, worker.tokenizer, "fitness", 0.25)
    assert first.items == {} and first.counts == {"zoo_arith": 3}
    assert scorer.score_rest(worker.model, worker.tokenizer, first) == scorer.score(worker.model, worker.tokenizer, "fitness")


@pytest.mark.slow
def test_optuna_sampler_with_a_first_pass(zoo_llama, tmp_path: Path) -> None:
    """Samplers compare with every first pass known so far, after `warmup` candidates scored in full.

    Which first passes are known at dispatch depends on timing, so the bar is set high (top 10%): a
    candidate below the best of those known is pruned, and ten random TPE start-up candidates do not
    come in increasing order of fitness."""
    cfg = load_config(zoo_config(zoo_llama, tmp_path, name="fp-tpe", trials=10, optimizer__kind="tpe",
                                 evaluation__first_pass={"fraction": 0.25, "promote": 0.1, "warmup": 3}))
    summary = run_search(prepare(cfg), progress=lambda s: None)
    trials = StudyStore.open(cfg.storage, "fp-tpe").study.get_trials()
    assert len(trials) == 10 and summary.trials == 10
    assert {t.state for t in trials} <= {COMPLETE, PRUNED} and summary.pruned == sum(t.state == PRUNED for t in trials) > 0
    assert all(t.state == COMPLETE for t in sorted(trials, key=lambda t: t.number)[:3])  # the warm-up
    assert all(t.value == t.user_attrs[FIRST_PASS_ATTR] for t in trials if t.state == PRUNED)
