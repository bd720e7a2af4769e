"""A search over a LoRA source (MODEL+ADAPTER): the adapter applied once into a cache, real workers, export."""

from __future__ import annotations

from pathlib import Path

import pytest

from evomerge.cli import main
from evomerge.study import StudyStore
from study_configs import zoo_config
from vocab_models import extracted_adapter

pytestmark = pytest.mark.slow


def test_search_over_a_lora_source_exports_a_plain_checkpoint(zoo_llama, tmp_path: Path) -> None:
    adapter = extracted_adapter(zoo_llama.base, zoo_llama.specialists["rev"], tmp_path / "rev-lora")
    cache = tmp_path / "lora-cache"
    config = zoo_config(zoo_llama, tmp_path, name="lora", trials=4, popsize=4, limit=10,
                        models__sources=[str(zoo_llama.specialists["arith"]), f"{zoo_llama.base}+{adapter}"],
                        models__lora_merge_cache=str(cache))
    url = f"sqlite:///{tmp_path / 'study.db'}"
    assert main(["search", str(config)]) == 0
    merged = next(cache.iterdir())  # written once, before the workers started
    store = StudyStore.open(url, "lora")
    assert store.config.models.sources[1] == str(merged)  # the study names the merged model: resume needs no adapter
    best = store.trial(None)
    out = tmp_path / "best"
    assert main(["export", "lora", "--storage", url, "--out", str(out)]) == 0

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.config import load_config
    from evomerge.runtime.scoring import LmEvalScorer
    from evomerge.search import task_specs

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    cfg = load_config(config)
    scores = LmEvalScorer(task_specs(cfg), cfg.evaluation.include_paths).score(model, AutoTokenizer.from_pretrained(out), "fitness")
    assert scores == best.user_attrs["scores.fitness"]
