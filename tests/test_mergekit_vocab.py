"""Sources whose vocabularies differ, and mergekit's tokenizer settings, against real mergekit 0.1.5.

`scripts/make_parity_references.py` ran each `vocab_models.CASES` config (tokenizer_source union / base /
a model, the tokenizer block with per-token sources, force and padding, chat templates) through mergekit's
own `run_merge` and kept three tensors and the merged tokenizer of each; here `evomerge merge` builds the
same configs. With `--arithmetic mergekit` every case is bit-identical; with evomerge's default arithmetic
the fp32 cases are too where mergekit's rows are copies or fp32 means (task-vector methods), and within
1e-6 for linear and slerp (weights merged as task vectors, as in `test_mergekit_parity.py`).
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.cli import main
from evomerge.errors import ConfigError
from evomerge.export.checkpoint import checkpoint_parts
from evomerge.export.mergekit import load_mergekit_recipe, mergekit_text, recipe_from_mergekit
from evomerge.merge import TASK_VECTOR_METHODS
from evomerge.models.build import MergeInputs
from evomerge.models.checkpoints import Checkpoint
from evomerge.models.live import LiveMerge, LoadOptions
from evomerge.recipe import Recipe, recipe_from_yaml
from vocab_models import CASES, CHATML, KEPT, LORA_CASES, REFERENCES, render, write_models

REFS = load_file(str(REFERENCES))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_models(tmp_path_factory.mktemp("vocab"))


def merged(config: str, variant: str, models: Path, arithmetic: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The KEPT tensors and the merged config of `evomerge merge`'s build, and its tokenizer summary."""
    parts = checkpoint_parts(load_mergekit_recipe(render(config, variant, models), arithmetic=arithmetic))
    tensors = {n: t for n, t in parts.tensors if n in KEPT}
    return tensors, {"config": parts.config, "tokenizer": summary(parts.tokenizer)}


def summary(tokenizer) -> dict:  # noqa: ANN001
    special = sorted(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
    return {"vocab": tokenizer.get_vocab(), "special": special, "chat_template": tokenizer.chat_template}


def reference(config: str, variant: str) -> tuple[dict[str, torch.Tensor], dict]:
    tokenizer = json.loads(bytes(REFS[f"{config}/{variant}/tokenizer"].tolist()).decode())
    return {n: REFS[f"{config}/{variant}/{n}"] for n in KEPT}, tokenizer


def test_the_references_cover_every_case_and_stay_small() -> None:
    assert len(REFS) == (len(CASES) + len(LORA_CASES)) * (len(KEPT) + 1)  # LoRA cases: tests/test_mergekit_lora.py
    assert REFERENCES.stat().st_size < 80_000


@pytest.mark.parametrize(("config", "variant"), CASES, ids=[f"{c}-{v}" for c, v in CASES])
def test_mergekit_arithmetic_is_bit_identical_to_mergekit_tokenizer_included(config: str, variant: str, models: Path) -> None:
    (ours, info), (theirs, tokenizer) = merged(config, variant, models, "mergekit"), reference(config, variant)
    for name in KEPT:
        assert ours[name].dtype == theirs[name].dtype and torch.equal(ours[name], theirs[name]), name
    assert info["tokenizer"] == tokenizer
    assert info["config"]["vocab_size"] == theirs["lm_head.weight"].shape[0]


FP32 = [c for c, v in CASES if v == "fp32"]


@pytest.mark.parametrize("config", FP32)
def test_default_arithmetic_with_fp32_inputs_matches_mergekit(config: str, models: Path) -> None:
    recipe = load_mergekit_recipe(render(config, "fp32", models))
    (ours, _), (theirs, _) = merged(config, "fp32", models, "evomerge"), reference(config, "fp32")
    for name in KEPT:
        if recipe.method in TASK_VECTOR_METHODS:
            assert torch.equal(ours[name], theirs[name]), name
        else:
            assert (ours[name] - theirs[name]).abs().max() <= 1e-6 * theirs[name].abs().max(), name


def test_the_union_takes_each_tokens_row_as_mergekit_says(models: Path) -> None:
    """A token only ib has takes ib's row in every model; one that ia and ib both have (not the base) their
    mean; the merged vocabulary is the base's, then the added tokens in the models' order."""
    recipe = load_mergekit_recipe(render("vocab_union_ties", "fp32", models))
    parts = checkpoint_parts(recipe)
    vocab = parts.tokenizer.get_vocab()
    assert [vocab[t] for t in ("<|im_start|>", "<|im_end|>", "<|tool|>")] == [32, 33, 34]
    assert parts.config["vocab_size"] == 35
    rows = {n: load_file(str(models / "float32" / n / "model.safetensors"))["lm_head.weight"] for n in ("ia", "ib")}
    base_row, _ = MergeInputs.open(recipe).tensors("lm_head.weight")
    assert torch.equal(base_row[34], rows["ib"][34])
    assert torch.equal(base_row[32], (rows["ia"][32] + rows["ib"][32]) / 2)


def test_without_tokenizer_settings_differing_vocabularies_merge_as_the_union(models: Path) -> None:
    """mergekit 0.1.5 refuses such a config (tensor size mismatch); evomerge merges it as tokenizer_source: union."""
    text = re.sub(r"^(tokenizer_source|chat_template): .*\n", "", render("vocab_union_ties", "fp32", models), flags=re.M)
    implicit = load_mergekit_recipe(text)
    assert implicit.tokenizer is None
    explicit = load_mergekit_recipe(render("vocab_union_ties", "fp32", models))
    ours = dict(checkpoint_parts(implicit).tensors)
    theirs = dict(checkpoint_parts(replace(explicit, tokenizer=replace(explicit.tokenizer, chat_template=None))).tensors)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[n], theirs[n]) for n in ours)
    written = yaml.safe_load(mergekit_text(implicit, Checkpoint.open(implicit.base)))
    assert written["tokenizer"] == {"source": "union"}  # so mergekit runs it too


def test_tokenizer_settings_round_trip_through_recipes_and_mergekit_yaml(models: Path) -> None:
    recipe = load_mergekit_recipe(render("vocab_tokens_block", "fp32", models))
    assert recipe_from_yaml(recipe.to_yaml()) == recipe
    back = load_mergekit_recipe(mergekit_text(recipe, Checkpoint.open(recipe.base)))
    assert back.tokenizer == recipe.tokenizer
    assert recipe.tokenizer.pad_to_multiple_of == 8 and len(recipe.tokenizer.tokens) == 4


def test_merged_checkpoint_loads_with_plain_transformers(models: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = tmp_path / "mk.yaml"
    config.write_text(render("vocab_tokens_block", "bf16", models))
    assert main(["merge", str(config), "--out", str(tmp_path / "out")]) == 0
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert len(tokenizer) == 36 and model.config.vocab_size == 40  # 36 tokens padded to a multiple of 8
    ids = tokenizer("w1 <|tool|> <|new|>", return_tensors="pt").input_ids
    assert ids.tolist() == [[5, 34, 35]]
    assert model(ids).logits.shape == (1, 3, 40)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "w1"}], tokenize=False) == "user: w1"


def test_a_worker_aligns_once_and_builds_what_the_export_writes(models: Path) -> None:
    """LiveMerge lays out the embeddings by token at start (the union: the sources differ from the base),
    keeps them privately (mmap mode), and re-aligns once for a recipe with other settings."""
    union = load_mergekit_recipe(render("vocab_union_ties", "fp32", models))
    union = replace(union, tokenizer=None)
    live = LiveMerge(union.base, union.sources, LoadOptions(torch.device("cpu")))
    assert live.vocab.source == "union" and len(live.tokenizer) == 35
    assert live.inputs.resident_bytes() == sum(4 * 4 * 35 * 16 for _ in range(2))  # base + 3 sources, embeddings and head
    model, tokenizer = live.build(union)
    exported = dict(checkpoint_parts(union).tensors)
    state = model.state_dict()
    assert all(torch.equal(state[n], t) for n, t in exported.items())
    base_only = load_mergekit_recipe(render("vocab_base_task_arithmetic", "fp32", models))
    model, tokenizer = live.build(replace(base_only, sources=union.sources, groups=({"weight": 0.3}, )))
    assert len(tokenizer) == 32 and model.get_input_embeddings().weight.shape == (32, 16)
    model(torch.tensor([[1, 5, 31]]))


REFUSED = [
    ("tokenizer_source: union", "tokenizer:\n  tokens:\n    \"<|tool|>\": {force: true}", r"tokens\['<\|tool\|>'\]: .* has no source"),
    ("tokenizer_source: union", "tokenizer:\n  tokens:\n    \"<|tool|>\": {source: ./elsewhere}",
     r"model './elsewhere' is not one of the merged models"),
    ("chat_template: auto", "chat_template: chatml", r"chat_template = 'chatml': evomerge takes auto or a Jinja template"),
]


@pytest.mark.parametrize(("old", "new", "message"), REFUSED, ids=[m[:20] for *_, m in REFUSED])
def test_bad_tokenizer_settings_are_refused_in_one_line(old: str, new: str, message: str, models: Path) -> None:
    recipe = load_mergekit_recipe(re.sub(f"^{re.escape(old)}$", new, render("vocab_union_ties", "fp32", models), flags=re.M))
    with pytest.raises(ConfigError, match=message) as info:
        checkpoint_parts(recipe)
    assert "\n" not in str(info.value)


def test_a_passthrough_with_tokenizer_settings_is_refused() -> None:
    text = ("merge_method: passthrough\nslices:\n  - sources: [{model: A, layer_range: [0, 2]}]\n"
            "  - sources: [{model: A, layer_range: [1, 4]}]\ntokenizer_source: union\n")
    with pytest.raises(ConfigError, match="a passthrough .* takes its models' own tokenizer"):
        recipe_from_mergekit(text, n_layers=4)


def test_chat_template_auto_takes_the_common_template(models: Path) -> None:
    parts = checkpoint_parts(load_mergekit_recipe(render("vocab_union_ties", "fp32", models)))
    assert parts.tokenizer.chat_template == CHATML


def test_an_evomerge_recipe_takes_a_tokenizer_mapping(models: Path) -> None:
    folder = models / "float32"
    recipe = Recipe.from_dict({"method": "task_arithmetic", "base": str(folder / "base"), "sources": [str(folder / "ia")],
                               "groups": [{"weight": [0.5]}], "tokenizer": {"source": "base", "pad_to_multiple_of": 16}})
    parts = checkpoint_parts(recipe)
    assert parts.config["vocab_size"] == 32 and dict(parts.tensors)["lm_head.weight"].shape == (32, 16)
