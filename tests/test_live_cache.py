"""What a worker keeps between candidates (its `MergeCache`) follows the tensors it merges."""

from __future__ import annotations

from pathlib import Path

import torch

from evomerge.merge import TaskVectors
from evomerge.models.live import LiveMerge, LoadOptions
from evomerge.recipe import Recipe
from evomerge.recipe.tokenizer import TokenizerSpec
from vocab_models import instruct_copy


def test_a_realigned_vocabulary_drops_the_stats_of_the_old_rows(zoo_llama, tmp_path: Path) -> None:
    """A recipe with other tokenizer settings lays out embeddings and head again; the cache must not keep
    the previous layout's tensors alive (E + 1 copies of them) through its stats, and later candidates
    must match a fresh worker's."""
    instruct = instruct_copy(zoo_llama.specialists["rev"], tmp_path / "rev-instruct")
    base, sources = str(zoo_llama.base), (str(zoo_llama.specialists["arith"]), str(instruct))
    live = LiveMerge(base, sources, LoadOptions(torch.device("cpu")))
    assert live.merge_cache is not None and not live.merge_cache.keep_sorted  # the default: KB per tensor
    params = {"weight": [0.7, 0.5], "density": [0.4, 0.6]}
    union = Recipe("ties", base, sources, (params,), seed=3)
    live.build(union)
    embeddings = sorted(n for n in live.inputs.names if "embed" in n or "lm_head" in n)
    held = {n: live.merge_cache._stats[n].tv for n in embeddings}
    live._align(TokenizerSpec("base"))  # what a build with these settings does first: new rows for each
    assert not any(n in live.merge_cache._stats for n in embeddings)  # let go before the build merges anything
    by_base = Recipe("ties", base, sources, (params,), seed=3, tokenizer=TokenizerSpec("base"))
    live.build(by_base)
    for name in embeddings:
        current = TaskVectors(live.inputs.base[name], live.inputs.sources[name])
        assert not held[name].same(current)
        assert live.merge_cache._stats[name].tv.same(current)  # rebuilt on the new rows, the old ones let go
    again = {n: t.clone() for n, t in live.build(union)[0].state_dict().items()}
    fresh = LiveMerge(base, sources, LoadOptions(torch.device("cpu"))).build(union)[0].state_dict()
    assert all(torch.equal(again[n], fresh[n]) for n in fresh)
