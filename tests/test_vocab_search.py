"""A search over a base and an instruct fine-tune that added 2 tokens: real Ray workers, lm-eval, export."""

from __future__ import annotations

from pathlib import Path

import pytest

from evomerge.cli import main
from evomerge.study import StudyStore
from study_configs import zoo_config
from vocab_models import instruct_copy

pytestmark = pytest.mark.slow


def test_search_over_a_source_with_added_tokens_exports_the_union(zoo_llama, tmp_path: Path) -> None:
    """Workers merge into the union vocabulary (the base's 260 tokens and the instruct model's 2), aligned once;
    the export writes that tokenizer and vocab_size, loads with plain transformers and scores what the trial scored."""
    instruct = instruct_copy(zoo_llama.specialists["rev"], tmp_path / "rev-instruct")
    config = zoo_config(zoo_llama, tmp_path, name="vocab", trials=4, popsize=4, limit=10,
                        models__sources=[str(zoo_llama.specialists["arith"]), str(instruct)])
    url = f"sqlite:///{tmp_path / 'study.db'}"
    assert main(["search", str(config)]) == 0
    store = StudyStore.open(url, "vocab")
    best = store.trial(None)
    out = tmp_path / "best"
    assert main(["export", "vocab", "--storage", url, "--out", str(out)]) == 0

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.config import load_config
    from evomerge.runtime.scoring import LmEvalScorer
    from evomerge.search import task_specs

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == 262 and model.config.vocab_size == 262
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [260, 261]
    cfg = load_config(config)
    scores = LmEvalScorer(task_specs(cfg), cfg.evaluation.include_paths).score(model, tokenizer, "fitness")
    assert scores == best.user_attrs["scores.fitness"]  # the worker built exactly what the export wrote
