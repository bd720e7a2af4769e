"""`evomerge merge` against real mergekit 0.1.5, through stored reference tensors.

`scripts/make_parity_references.py` ran each case of `parity_models.CASES` once through mergekit's own
`run_merge` and kept five tensors of each result; here the same config goes through evomerge. With
`--arithmetic mergekit` every deterministic case is bit-identical (dtype included). Deliberate
differences, checked by their statistics instead: DARE/DELLA draw their masks from evomerge's own
counter-based uniforms (mergekit from torch's generator), and evomerge's default arithmetic (fp32 task
vectors, rounded once) is not mergekit's order of operations (linear, slerp, the geometric methods differ
by a few fp32 ulps; in bf16 the TIES family trims and elects on other values).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evomerge.export.checkpoint import checkpoint_parts
from evomerge.export.mergekit import load_mergekit_recipe
from evomerge.merge import TASK_VECTOR_METHODS
from parity_models import CASES, KEPT, REFERENCES, render, write_models

REFS = load_file(str(REFERENCES))
RANDOM = {"dare_ties", "dare_linear", "della", "della_linear"}
DETERMINISTIC = [c for c in CASES if c[0] not in RANDOM]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_models(tmp_path_factory.mktemp("parity"))


def merged(config: str, variant: str, models: Path, arithmetic: str) -> dict[str, torch.Tensor]:
    recipe = load_mergekit_recipe(render(config, variant, models), arithmetic=arithmetic)
    return {n: t for n, t in checkpoint_parts(recipe).tensors if n in KEPT}


def reference(config: str, variant: str) -> dict[str, torch.Tensor]:
    return {n: REFS[f"{config}/{variant}/{n}"] for n in KEPT}


def test_the_references_cover_every_case_and_stay_small() -> None:
    assert len(REFS) == len(CASES) * len(KEPT)
    assert REFERENCES.stat().st_size < 150_000


@pytest.mark.parametrize(("config", "variant"), DETERMINISTIC, ids=[f"{c}-{v}" for c, v in DETERMINISTIC])
def test_mergekit_arithmetic_is_bit_identical_to_mergekit(config: str, variant: str, models: Path) -> None:
    ours, theirs = merged(config, variant, models, "mergekit"), reference(config, variant)
    for name in KEPT:
        assert ours[name].dtype == theirs[name].dtype, name
        assert torch.equal(ours[name], theirs[name]), name


FP32 = [c for c in DETERMINISTIC if c[1] == "fp32"]


@pytest.mark.parametrize(("config", "variant"), FP32, ids=[c for c, _ in FP32])
def test_default_arithmetic_with_fp32_inputs_matches_mergekit(config: str, variant: str, models: Path) -> None:
    """Bit for bit for the task-vector family and passthrough; within 1e-6 where evomerge merges task
    vectors onto the base and mergekit weights the models themselves (linear, karcher)."""
    recipe = load_mergekit_recipe(render(config, variant, models))
    ours, theirs = merged(config, variant, models, "evomerge"), reference(config, variant)
    exact = getattr(recipe, "method", "passthrough") in (*TASK_VECTOR_METHODS, "passthrough")
    for name in KEPT:
        if exact:
            assert torch.equal(ours[name], theirs[name]), name
        else:
            assert (ours[name] - theirs[name]).abs().max() <= 1e-6 * theirs[name].abs().max(), name


def test_default_arithmetic_in_bf16_is_fp32_rounded_once_not_mergekits(models: Path) -> None:
    """The issue's example: TIES in bf16 trims and elects on other values than evomerge's fp32 task vectors."""
    ours, theirs = merged("examples_ties", "bf16", models, "evomerge"), reference("examples_ties", "bf16")
    name = "model.layers.1.self_attn.q_proj.weight"
    assert ours[name].dtype == torch.bfloat16 and not torch.equal(ours[name], theirs[name])
    exact = merged("examples_ties", "bf16", models, "mergekit")
    assert torch.equal(exact[name], theirs[name])


@pytest.mark.parametrize("arithmetic", ["evomerge", "mergekit"])
def test_dare_masks_differ_from_mergekits_but_keep_its_statistics(arithmetic: str, models: Path) -> None:
    """DARE keeps each entry with probability density and rescales by 1 / density: the kept fraction and
    the merged task vector's L1 norm agree with mergekit's, the masks (other random draws) do not."""
    base = load_file(str(models / "float32" / "base" / "model.safetensors"))
    ours, theirs = merged("dare_ties", "fp32", models, arithmetic), reference("dare_ties", "fp32")
    for name in ("model.embed_tokens.weight", "model.layers.3.mlp.down_proj.weight", "lm_head.weight"):
        d_ours, d_theirs = ours[name] - base[name], theirs[name] - base[name]
        assert not torch.equal(d_ours, d_theirs)
        kept_ours, kept_theirs = float((d_ours != 0).float().mean()), float((d_theirs != 0).float().mean())
        assert abs(kept_ours - kept_theirs) < 0.08, (name, kept_ours, kept_theirs)
        l1_ours, l1_theirs = float(d_ours.abs().sum()), float(d_theirs.abs().sum())
        assert abs(l1_ours - l1_theirs) < 0.15 * l1_theirs, (name, l1_ours, l1_theirs)
