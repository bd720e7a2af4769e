"""The tiny model zoo: real checkpoints, deterministic, cached, atomic; eval data matches its generator."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.errors import ConfigError
from evomerge.zoo import (
    EVAL_SPLITS,
    RECIPES,
    SKILLS,
    ZooBuildError,
    build_zoo,
    eval_examples,
    training_examples,
    validation_examples,
    write_eval_data,
)
from evomerge.zoo._build import build_threads, finetune_mix
from evomerge.zoo._data import in_prose
from evomerge.zoo._tokenizer import char_tokenizer, encode_line
from evomerge.zoo._train import Schedule, exact_match
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


def test_eval_and_validation_splits_are_disjoint_and_never_trained_on():
    held_out = set()
    for skill in SKILLS:
        splits = {**eval_examples(skill), "validation": validation_examples(skill)}
        prompts = {name: {ex.prompt for ex in split} for name, split in splits.items()}
        assert all(len(prompts[name]) == len(splits[name]) for name in splits)  # no duplicates within
        names = list(splits)
        assert all(not prompts[a] & prompts[b] for i, a in enumerate(names) for b in names[i + 1 :])
        held_out |= set().union(*prompts.values())
    mix = {skill: 1.0 for skill in SKILLS} | {f"{skill}_prose": 1.0 for skill in SKILLS}
    stream = training_examples(mix, seed=0)
    trained = {next(stream).prompt for _ in range(40_000)}  # ~10k arith draws would hit ~750 held-out prompts
    assert not trained & held_out


def test_prose_examples_end_like_text_lines():
    stream = training_examples({"rev_prose": 1.0}, seed=0)
    ex = next(stream)
    assert ex.target.endswith(".\n") and ex.prompt.endswith(">") and ex.target[:-2] == ex.prompt[:-1][::-1]
    assert in_prose(eval_examples("arith")["fitness"][0]).line.endswith(".\n")


def test_fine_tunes_replay_the_base_mix_without_their_own_skill_in_prose():
    mix = finetune_mix(RECIPES["llama"], "arith")
    assert set(mix) == {"arith", "text", "rev_prose"} and mix["arith"] == pytest.approx(0.8)
    assert sum(mix.values()) == pytest.approx(1.0) and mix["text"] / mix["rev_prose"] == pytest.approx(0.4 / 0.3)
    assert finetune_mix(dataclasses.replace(RECIPES["llama"], replay=0.0), "rev") == {"rev": 1.0}


def _recipe(monkeypatch, family: str = "gpt2", **changes) -> None:
    monkeypatch.setitem(RECIPES, family, dataclasses.replace(RECIPES[family], **changes))


def test_a_target_that_cannot_be_met_fails_the_build_in_one_line(tmp_path, monkeypatch):
    _recipe(monkeypatch, skill_target=0.99, finetune=Schedule(steps=10, lr=5e-4), check_every=5)
    with pytest.raises(ZooBuildError) as failed:
        build_zoo(tmp_path, family="gpt2", progress=None)
    message = str(failed.value)
    assert "\n" not in message
    assert message.startswith("zoo build failed: the gpt2 arith specialist reached 0.")
    assert "exact match on its validation split in 10 fine-tune steps (the cap), short of its target 0.99" in message
    assert list(tmp_path.iterdir()) == []  # no zoo, no temp dir: the next run builds again


def test_a_base_above_its_ceiling_fails_the_build(tmp_path, monkeypatch):
    _recipe(monkeypatch, base_ceiling=-1.0)  # a ceiling that no score can stay under
    with pytest.raises(ZooBuildError, match=r"the gpt2 base already scores 0\.\d{3} exact match on arith .*above its ceiling -1\.0"):
        build_zoo(tmp_path, family="gpt2", progress=None)
    assert list(tmp_path.iterdir()) == []


def test_a_met_target_stops_the_fine_tune_and_every_score_is_printed_and_kept(tmp_path, monkeypatch):
    _recipe(monkeypatch, skill_target=0.0, check_every=5)  # met at the first check
    lines: list[str] = []
    zoo = build_zoo(tmp_path, family="gpt2", progress=lines.append)
    manifest = json.loads((zoo.root / "zoo.json").read_text())
    assert manifest["finetune_steps"] == {"arith": 5, "rev": 5}
    assert set(manifest["skill_scores"]) == {"base", "arith", "rev"}
    printed = [line for line in lines if line.startswith("zoo:   ")]
    assert [line.split()[1] for line in printed] == ["base", "arith", "rev"]
    for line, name in zip(printed, ["base", "arith", "rev"]):
        assert all(f"{skill} {manifest['skill_scores'][name][skill]:.3f}" in line for skill in SKILLS)


def test_build_threads_come_from_the_argument_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("EVOMERGE_ZOO_THREADS", "3")
    assert build_threads() == 3
    monkeypatch.setenv("EVOMERGE_ZOO_THREADS", "two")
    with pytest.raises(ConfigError, match="EVOMERGE_ZOO_THREADS='two': give a whole number of torch threads"):
        build_zoo(tmp_path, family="gpt2", progress=None)
    zoo = build_zoo(tmp_path, family="gpt2", progress=None, threads=1)  # more would spin on a busy test machine
    assert json.loads((zoo.root / "zoo.json").read_text())["torch_threads"] == 1
    monkeypatch.delenv("EVOMERGE_ZOO_THREADS")
    assert build_threads() == 1


def test_llama_zoo_meets_its_targets(zoo_llama):
    manifest = json.loads((zoo_llama.root / "zoo.json").read_text())
    recipe, scores = RECIPES["llama"], manifest["skill_scores"]
    assert recipe.skill_target is not None and recipe.base_ceiling is not None
    for skill in SKILLS:
        assert scores[skill][skill] >= recipe.skill_target
        assert scores["base"][skill] <= recipe.base_ceiling


def test_exact_match_is_greedy_decoding_of_the_whole_target(zoo_llama):
    model = AutoModelForCausalLM.from_pretrained(zoo_llama.specialists["arith"]).eval()
    examples = eval_examples("arith")["fitness"][:40] + eval_examples("rev")["fitness"][:40]
    hits = []
    for ex in examples:  # one token at a time, independent of the batched teacher-forced check
        ids = torch.tensor([encode_line(ex.prompt)])
        for _ in range(len(ex.target)):
            with torch.no_grad():
                ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
        hits.append(ids[0, -len(ex.target) :].tolist() == encode_line(ex.target)[1:])
    assert 0 < sum(hits) < len(hits)  # some of each: the comparison below can fail
    assert exact_match(model, examples) == sum(hits) / len(hits)


def _rows(evolved: float, ties: float) -> list:
    from evomerge.zoo.demo import DEFAULT_TIES, EVOLVED, Row

    def row(name: str, arith: float, rev: float) -> Row:
        return Row(name, {"zoo_arith": arith, "zoo_rev": rev}, {"zoo_arith": arith, "zoo_rev": rev})

    return [row("base", 0.0, 0.0), row("specialist arith", 0.9, 0.0), row("specialist rev", 0.0, 0.96),
            row(DEFAULT_TIES, ties, ties), row(EVOLVED, evolved, evolved)]


def test_demo_verdict_names_the_best_source_and_the_margins():
    from evomerge.zoo.demo import verdict

    best_source, ties = verdict(_rows(evolved=0.8, ties=0.3))
    assert best_source.line() == ("verdict: held-out mean exact match, evolved merge 0.800 vs the best source model "
                                  "(specialist rev) 0.480: beat it (+0.320)")
    assert ties.line().endswith("vs default TIES 0.300: beat it (+0.500)")


def test_demo_verdict_says_so_when_the_evolved_merge_loses():
    from evomerge.zoo.demo import verdict

    best_source, ties = verdict(_rows(evolved=0.45, ties=0.6))
    assert best_source.line().endswith("0.480: did NOT beat it (-0.030)")
    assert ties.line().endswith("vs default TIES 0.600: did NOT beat it (-0.150)")
