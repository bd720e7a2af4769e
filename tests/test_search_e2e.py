"""End to end on the zoo: real Ray workers, real lm-eval scoring, real SQLite study, real export."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from evomerge.cli import main
from evomerge.study import StudyStore
from study_configs import zoo_config

pytestmark = pytest.mark.slow


def test_search_then_export_rescored_exactly(zoo_llama, tmp_path: Path, capsys) -> None:
    config = zoo_config(zoo_llama, tmp_path, name="e2e", trials=6, popsize=4)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    assert main(["search", str(config)]) == 0
    out = capsys.readouterr().out
    assert "[6/6]" in out and "held-out: trial" in out

    store = StudyStore.open(url, "e2e")
    trials = store.study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 6
    best = store.trial(None)
    assert set(best.params) == {f"g0.{p}.{m}" for p in ("weight", "density") for m in zoo_llama.specialists}
    assert set(best.user_attrs["scores.fitness"]) == {f"zoo_{s}" for s in zoo_llama.specialists}
    assert best.user_attrs["merge_s"] > 0 and best.user_attrs["eval_s"] > 0
    assert store.heldout(best.number) is not None

    out_dir = tmp_path / "best"
    assert main(["export", "e2e", "--storage", url, "--out", str(out_dir)]) == 0
    assert (out_dir / "recipe.yaml").is_file() and "trial" in (out_dir / "README.md").read_text()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.config import load_config
    from evomerge.runtime.scoring import LmEvalScorer
    from evomerge.search import task_specs

    cfg = load_config(config)
    scorer = LmEvalScorer(task_specs(cfg), cfg.evaluation.include_paths)
    model = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    scores = scorer.score(model, AutoTokenizer.from_pretrained(out_dir), "fitness")
    assert scores == best.user_attrs["scores.fitness"]  # exactly, not approximately
    heldout = scorer.score(model, AutoTokenizer.from_pretrained(out_dir), "heldout")
    assert heldout == store.heldout(best.number)["scores"]

    assert main(["status", "--storage", url]) == 0
    assert "e2e" in capsys.readouterr().out
    assert main(["status", "--storage", url, "e2e"]) == 0
    assert "COMPLETE" in capsys.readouterr().out


def test_optuna_sampler_multi_objective_and_pareto_export(zoo_llama, tmp_path: Path, capsys) -> None:
    """TPE proposes trials asynchronously (no generations); each task is an objective."""
    config = zoo_config(zoo_llama, tmp_path, name="mo", trials=5, limit=20,
                        optimizer__kind="tpe", optimizer__objectives="per_task", optimizer__popsize=None)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    assert main(["search", str(config)]) == 0
    store = StudyStore.open(url, "mo")
    assert len(store.study.directions) == 2
    done = store.completed()
    assert len(done) == 5 and all(len(t.values) == 2 for t in done)
    assert {t.user_attrs["candidate"] for t in done} == set(range(5))
    front = store.pareto_front()
    capsys.readouterr()
    assert main(["export", "mo", "--storage", url, "--out", str(tmp_path / "front"), "--pareto"]) == 0
    out = capsys.readouterr().out
    assert out.count("exported trial") == len(front) >= 1
    assert all((tmp_path / "front" / f"trial-{t.number}" / "model.safetensors").is_file() for t in front)


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_other_tensor_naming_families_search_and_export(family, request, tmp_path: Path) -> None:
    """Qwen2 (q/k/v biases) and GPT-2 (transformer.h.N, fused c_attn) go through the same search and export."""
    zoo = request.getfixturevalue(f"zoo_{family}")
    config = zoo_config(zoo, tmp_path, name=family, trials=4, popsize=4, limit=10,
                        search_space={"preset": "ties", "layer_groups": 2})
    url = f"sqlite:///{tmp_path / 'study.db'}"
    assert main(["search", str(config)]) == 0
    store = StudyStore.open(url, family)
    best = store.trial(None)
    assert {n.split(".")[0] for n in best.params} == {"g0", "g1"}
    assert main(["export", family, "--storage", url, "--out", str(tmp_path / "out")]) == 0
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.model_type == family


def test_the_study_keeps_generation_history_and_worker_start_up(zoo_llama, tmp_path: Path) -> None:
    config = zoo_config(zoo_llama, tmp_path, name="hist", trials=8, popsize=4, limit=10)
    assert main(["search", str(config)]) == 0
    store = StudyStore.open(f"sqlite:///{tmp_path / 'study.db'}", "hist")
    history = store.history()
    assert [r["generation"] for r in history] == [0, 1]
    assert all(r["best"] >= r["median"] and r["failures"] == 0 and r["sigma"] > 0 for r in history)
    workers = store.study.user_attrs["workers"]
    assert len(workers) == 2 and all(w["startup_s"] > 0 and w["resident_bytes"] > 0 and w["rss_bytes"] > 0 for w in workers)
    assert store.load_controller()[0] == 2  # checkpointed as generation 2 opened (nothing left to ask)
