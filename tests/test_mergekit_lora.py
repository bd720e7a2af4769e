"""LoRA sources (`model+adapter`): applied as peft's merge_and_unload does, cached once, merged as mergekit does.

`scripts/make_parity_references.py` ran `vocab_models.LORA_CASES` through mergekit 0.1.5 (with
--lora-merge-cache) once; here `evomerge merge` builds them. The adapter is applied with peft's own
arithmetic, checked against peft itself on a transformers model (linear and embedding LoRAs, rank and
alpha patterns, rslora, modules_to_save), in fp32 and bf16.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evomerge.cli import main
from evomerge.errors import ConfigError, ModelError
from evomerge.export.checkpoint import checkpoint_parts
from evomerge.export.lora import lora_checkpoint, resolve_loras
from evomerge.export.mergekit import load_mergekit_recipe, recipe_from_mergekit
from evomerge.merge import TASK_VECTOR_METHODS
from evomerge.models.checkpoints import Checkpoint
from tiny_models import save_tiny
from vocab_models import KEPT, LORA_CASES, REFERENCES, render, write_models

REFS = load_file(str(REFERENCES))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_models(tmp_path_factory.mktemp("lora"))


def merged(config: str, variant: str, models: Path, arithmetic: str, cache: Path) -> dict[str, torch.Tensor]:
    recipe = resolve_loras(load_mergekit_recipe(render(config, variant, models), arithmetic=arithmetic), cache)
    return {n: t for n, t in checkpoint_parts(recipe).tensors if n in KEPT}


@pytest.mark.parametrize(("config", "variant"), LORA_CASES, ids=[f"{c}-{v}" for c, v in LORA_CASES])
def test_mergekit_arithmetic_is_bit_identical_to_mergekit(config: str, variant: str, models: Path, tmp_path: Path) -> None:
    ours = merged(config, variant, models, "mergekit", tmp_path)
    for name in KEPT:
        theirs = REFS[f"{config}/{variant}/{name}"]
        assert ours[name].dtype == theirs.dtype and torch.equal(ours[name], theirs), name


def test_default_arithmetic_with_fp32_inputs_matches_mergekit(models: Path, tmp_path: Path) -> None:
    recipe = load_mergekit_recipe(render("lora_ties", "fp32", models))
    assert recipe.method in TASK_VECTOR_METHODS and recipe.sources[1].endswith("base+" + str(models / "float32" / "lora"))
    ours = merged("lora_ties", "fp32", models, "evomerge", tmp_path)
    assert all(torch.equal(ours[n], REFS[f"lora_ties/fp32/{n}"]) for n in KEPT)


def peft_adapter(base: Path, out: Path, **config) -> Path:  # noqa: ANN003
    """A real peft adapter on `base` with non-zero (trained-looking) weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(lora_dropout=0.0, **config))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rslora", [False, True])
def test_the_adapter_is_applied_as_peft_merge_and_unload_does(dtype: torch.dtype, rslora: bool, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    save_tiny(tmp_path / "fp32", "llama", 0)
    AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", dtype=dtype).save_pretrained(tmp_path / "base")
    adapter = peft_adapter(tmp_path / "base", tmp_path / "adapter", r=4, lora_alpha=8, use_rslora=rslora,
                           target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"], modules_to_save=["lm_head"],
                           rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3})
    ours = Checkpoint.open(str(lora_checkpoint(str(tmp_path / "base"), str(adapter), tmp_path / "cache")))
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), adapter).merge_and_unload()
    state = reference.state_dict()
    assert all(torch.equal(ours.tensor(n), state[n]) for n in ours.names)
    assert not torch.equal(ours.tensor("lm_head.weight"), Checkpoint.open(str(tmp_path / "base")).tensor("lm_head.weight"))
    AutoModelForCausalLM.from_pretrained(ours.path)  # a plain checkpoint


def test_the_merged_model_is_written_once_and_again_when_the_adapter_changes(models: Path, tmp_path: Path) -> None:
    base, adapter = str(models / "float32" / "base"), models / "float32" / "lora"
    first = lora_checkpoint(base, str(adapter), tmp_path)
    written = (first / "model.safetensors").stat().st_mtime_ns
    assert lora_checkpoint(base, str(adapter), tmp_path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == written
    assert (first / "tokenizer.json").is_file() and "lora" in (first / "README.md").read_text()
    copy = copied(adapter, tmp_path / "lora-copy")
    before = lora_checkpoint(base, str(copy), tmp_path)
    config = json.loads((copy / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(json.dumps(config | {"lora_alpha": 16}))  # changed in place
    after = lora_checkpoint(base, str(copy), tmp_path)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert after != before and not torch.equal(Checkpoint.open(str(after)).tensor(name), Checkpoint.open(str(before)).tensor(name))


def copied(folder: Path, to: Path) -> Path:
    to.mkdir()
    for f in folder.iterdir():
        (to / f.name).write_bytes(f.read_bytes())
    return to


def test_evomerge_merge_takes_a_lora_merge_cache(models: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    config = tmp_path / "mk.yaml"
    config.write_text(render("lora_instruct_union", "bf16", models))
    cache = tmp_path / "cache"
    assert main(["merge", str(config), "--out", str(tmp_path / "out"), "--lora-merge-cache", str(cache)]) == 0
    assert len(list(cache.iterdir())) == 1
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.vocab_size == 34


def test_bad_adapters_are_refused_in_one_line(models: Path, tmp_path: Path) -> None:
    base = str(models / "float32" / "base")
    dora = copied(models / "float32" / "lora", tmp_path / "dora")
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(ModelError, match="a DoRA adapter"):
        lora_checkpoint(base, str(dora), tmp_path / "cache")
    with pytest.raises(ModelError, match="has no adapter_config.json"):
        lora_checkpoint(base, str(models / "float32" / "a"), tmp_path / "cache")
    with pytest.raises(ModelError, match=r"changes .lm_head.weight. as shape \[32, 16\], the model has \[34, 16\]"):
        lora_checkpoint(str(models / "float32" / "ia"), str(models / "float32" / "lora"), tmp_path / "cache")
    with pytest.raises(ConfigError, match="write MODEL\\+ADAPTER \\(one '\\+'\\)"):
        recipe_from_mergekit("merge_method: ties\nbase_model: B\nmodels: [{model: S+l+m, parameters: {weight: 1}}]", n_layers=4)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())  # nothing half-written


def test_a_study_config_resolves_both_sides_of_a_lora_source(tmp_path: Path) -> None:
    from evomerge.config import load_config

    (tmp_path / "base").mkdir()
    config = tmp_path / "study.yaml"
    config.write_text("models:\n  base: ./base\n  sources: ['./base+./adapters/rev', 'org/model+org/adapter']\n"
                      "  lora_merge_cache: ./cache\nsearch_space: global_ties\nevaluation: {tasks: [{name: zoo_rev}]}\n")
    models = load_config(config).models
    assert models.sources == [f"{tmp_path / 'base'}+{tmp_path / 'adapters' / 'rev'}", "org/model+org/adapter"]
    assert models.lora_merge_cache == str(tmp_path / "cache")


def test_a_search_with_a_missing_adapter_is_refused_in_one_line(models: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    base = models / "float32" / "base"
    config = tmp_path / "study.yaml"
    config.write_text(f"storage: sqlite:///{tmp_path / 'study.db'}\nmodels:\n  base: {base}\n  sources: ['{base}+{tmp_path / 'nope'}']\n"
                      "search_space: global_ties\nevaluation: {tasks: [{name: zoo_rev}]}\n")
    assert main(["search", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "models.sources[0]" in err and "nope" in err, err
