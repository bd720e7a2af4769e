"""The tiny model zoo: real checkpoints, deterministic, cached, atomic; eval data matches its generator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.zoo import EVAL_SPLITS, SKILLS, build_zoo, eval_examples, training_examples, write_eval_data
from evomerge.zoo._tokenizer import char_tokenizer, encode_line
from zoo_fixtures import EVALUATORS_DIR, zoo_gpt2, zoo_llama, zoo_qwen2  # noqa: F401 (fixtures)

FAMILY_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel"}


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


def _all_tensors(zoo) -> dict[str, dict[str, torch.Tensor]]:
    return {"base": _tensors(zoo.base), **{s: _tensors(p) for s, p in zoo.specialists.items()}}


@pytest.mark.parametrize("fixture", ["zoo_llama", "zoo_qwen2", "zoo_gpt2"])
def test_checkpoints_load_with_auto_classes_and_are_fine_tunes_of_the_base(fixture, request):
    zoo = request.getfixturevalue(fixture)
    assert set(zoo.specialists) == set(SKILLS)
    base = AutoModelForCausalLM.from_pretrained(zoo.base)
    assert type(base).__name__ == FAMILY_CLASSES[zoo.family]
    base_sd = base.state_dict()
    for skill, path in zoo.specialists.items():
        spec_sd = AutoModelForCausalLM.from_pretrained(path).state_dict()
        assert {k: v.shape for k, v in spec_sd.items()} == {k: v.shape for k, v in base_sd.items()}
        assert any(not torch.equal(spec_sd[k], base_sd[k]) for k in base_sd), f"{skill} equals the base"
        tok = AutoTokenizer.from_pretrained(path)  # transformers may rebuild it per family (Qwen2 does)
        text = "12+34=46\nabc>cba\n Hi!"
        assert tok.encode(text) == encode_line(text)  # what the model was trained on
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == text


def test_family_naming_schemes(zoo_qwen2, zoo_gpt2):
    qwen = _tensors(zoo_qwen2.base)
    assert "model.layers.0.self_attn.q_proj.bias" in qwen
    gpt2 = _tensors(zoo_gpt2.base)
    assert "transformer.h.1.attn.c_attn.weight" in gpt2


def test_same_seed_same_tensors_other_seed_differs(tmp_path):
    first = _all_tensors(build_zoo(tmp_path / "a", seed=3, family="gpt2", progress=None))
    again = _all_tensors(build_zoo(tmp_path / "b", seed=3, family="gpt2", progress=None))
    other = _all_tensors(build_zoo(tmp_path / "c", seed=4, family="gpt2", progress=None))
    for model, tensors in first.items():
        assert tensors.keys() == again[model].keys()
        assert all(torch.equal(t, again[model][k]) for k, t in tensors.items()), model
        assert not all(torch.equal(t, other[model][k]) for k, t in tensors.items()), model


def test_second_call_reuses_and_other_seed_rebuilds(tmp_path):
    lines: list[str] = []
    zoo = build_zoo(tmp_path, family="qwen2", progress=lines.append)
    assert any("pretraining" in line for line in lines) and any("fine-tuning" in line for line in lines)
    weights = zoo.base / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    lines.clear()
    assert build_zoo(tmp_path, family="qwen2", progress=lines.append) == zoo
    assert lines == [] and weights.stat().st_mtime_ns == stamp  # nothing retrained, nothing rewritten
    build_zoo(tmp_path, seed=1, family="qwen2", progress=lines.append)
    assert lines and json.loads((zoo.root / "zoo.json").read_text())["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qwen2"]  # no temp or old dirs left behind


def test_interrupted_build_leaves_nothing(tmp_path):
    def interrupt(line: str) -> None:
        if "fine-tuning" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_zoo(tmp_path, family="gpt2", progress=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_build_keeps_callers_torch_state(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    n_threads = torch.get_num_threads()
    torch.manual_seed(123)
    build_zoo(tmp_path, family="gpt2", progress=None)
    assert torch.equal(torch.rand(3), expected)
    assert torch.get_num_threads() == n_threads


def test_unknown_family_names_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="unknown zoo family 'lama'; known families: llama, qwen2, gpt2"):
        build_zoo(tmp_path, family="lama")


def test_tokenizer_is_prefix_consistent():
    tok = char_tokenizer()
    whole = tok.encode("12+34=46\n")
    assert whole[0] == tok.bos_token_id and len(whole) == 1 + len("12+34=46\n")
    assert tok.encode("12+34=") + tok.encode("46\n", add_special_tokens=False) == whole
    assert tok.decode(tok.encode("Hello, world!"), skip_special_tokens=True) == "Hello, world!"


def test_committed_eval_data_equals_generator(tmp_path):
    written = write_eval_data(tmp_path)
    committed = EVALUATORS_DIR / "zoo" / "data"
    assert sorted(p.name for p in written) == sorted(p.name for p in committed.glob("*.jsonl"))
    for path in written:
        assert (committed / path.name).read_bytes() == path.read_bytes(), f"regenerate {committed / path.name}"


def test_eval_splits_are_disjoint_and_never_trained_on():
    eval_prompts = set()
    for skill in SKILLS:
        splits = eval_examples(skill)
        prompts = [{ex.prompt for ex in splits[split]} for split in EVAL_SPLITS]
        assert all(len(p) == len(splits[s]) for p, s in zip(prompts, EVAL_SPLITS))  # no duplicates within
        assert not prompts[0] & prompts[1]
        eval_prompts |= prompts[0] | prompts[1]
    stream = training_examples({skill: 1.0 for skill in SKILLS}, seed=0)
    trained = {next(stream).prompt for _ in range(20_000)}  # ~10k arith draws would hit ~500 eval prompts
    assert not trained & eval_prompts
