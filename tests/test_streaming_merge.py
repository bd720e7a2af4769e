"""The streaming merge path: positioned reads, header-first safetensors writing, and the worker's cache.

Memory itself is measured by scripts (see the merge engine notes), not asserted here; these tests pin
what the low-memory path must not change: the bytes and tensors it writes and the merges it builds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from evomerge.models.build import MergeCache, check_recipe, group_map, merge_named, output_plan, stream_merge, task_vectors
from evomerge.models.checkpoints import Checkpoint, TensorInfo, write_checkpoint
from evomerge.merge import METHODS, DeltaStats, Noise, merge_tensor
from evomerge.merge import _fused, _methods
from evomerge.merge._sparsify import count_of, middle_magnitude_keep, top_magnitude_keep
from evomerge.recipe import Recipe
from tiny_models import save_tiny

MIXED = {  # every dtype a checkpoint commonly holds, odd sizes, a 0-d tensor, an empty one
    "a.weight": torch.randn(7, 5),
    "b.bf16": torch.randn(3, 3).bfloat16(),
    "c.half": torch.randn(5).half(),
    "d.ids": torch.arange(9, dtype=torch.int64),
    "e.mask": torch.tensor([True, False, True]),
    "f.scalar": torch.tensor(2.5),
    "g.empty": torch.zeros(0, 4),
}


def _write(folder: Path, tensors: dict[str, torch.Tensor], *, planned: bool, max_shard_bytes: int) -> list[Path]:
    folder.mkdir()
    plan = [TensorInfo(n, tuple(t.shape), t.dtype) for n, t in tensors.items()] if planned else None
    return write_checkpoint(iter(tensors.items()), folder, config={"num_hidden_layers": 1}, side_files_from=folder,
                            max_shard_bytes=max_shard_bytes, plan=plan)


@pytest.mark.parametrize("max_shard_bytes", [10**9, 120])
def test_planned_and_spooled_writes_give_the_same_files_as_safetensors(tmp_path: Path, max_shard_bytes: int) -> None:
    planned = _write(tmp_path / "planned", MIXED, planned=True, max_shard_bytes=max_shard_bytes)
    spooled = _write(tmp_path / "spooled", MIXED, planned=False, max_shard_bytes=max_shard_bytes)
    assert [p.name for p in planned] == [p.name for p in spooled]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(planned, spooled))
    assert not list((tmp_path / "spooled").glob("*.spool")) and not list((tmp_path / "planned").glob("*.tmp"))
    for file in planned:
        with safe_open(str(file), framework="pt") as handle:  # safetensors' own reader accepts them
            for name in handle.keys():
                assert torch.equal(handle.get_tensor(name), MIXED[name]) and handle.get_tensor(name).dtype == MIXED[name].dtype
    if len(planned) == 1:  # one shard is byte-for-byte what safetensors writes
        save_file(MIXED, str(tmp_path / "reference.safetensors"), metadata={"format": "pt"})
        assert planned[0].read_bytes() == (tmp_path / "reference.safetensors").read_bytes()
    else:
        index = json.loads((tmp_path / "planned" / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(MIXED)


def test_positioned_reads_equal_safetensors_reads(tmp_path: Path) -> None:
    _write(tmp_path / "m", MIXED, planned=True, max_shard_bytes=120)
    ck = Checkpoint.open(str(tmp_path / "m"))
    assert ck.names and set(ck.names) == set(MIXED)
    for name, expected in MIXED.items():
        got = ck.tensor(name)
        assert got.dtype == expected.dtype and got.shape == expected.shape and torch.equal(got, expected)
        if got.is_floating_point():
            got.add_(1)  # a fresh tensor: writing it leaves the file alone
    assert torch.equal(Checkpoint.open(str(tmp_path / "m")).tensor("a.weight"), MIXED["a.weight"])


def test_plan_mismatches_are_reported(tmp_path: Path) -> None:
    (tmp_path / "o").mkdir()
    plan = [TensorInfo("x", (2,), torch.float32), TensorInfo("y", (3,), torch.float32)]
    with pytest.raises(ValueError, match=r"got 'y' \[3\] torch.bfloat16, the plan says 'y' \[3\] torch.float32"):
        write_checkpoint(iter([("x", torch.zeros(2)), ("y", torch.zeros(3).bfloat16())]), tmp_path / "o",
                         config={}, side_files_from=tmp_path, plan=plan)
    with pytest.raises(ValueError, match="the plan lists 2 tensors, but 1 arrived"):
        write_checkpoint(iter([("x", torch.zeros(2))]), tmp_path / "o", config={}, side_files_from=tmp_path, plan=plan)


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, tuple[str, ...]]:
    root = tmp_path_factory.mktemp("family")
    base = save_tiny(root / "base", "llama", seed=0)
    return str(base), tuple(str(save_tiny(root / f"s{i}", "llama", seed=20 + i, perturb_from=base)) for i in range(3))


@pytest.mark.parametrize(("method", "dtype"), [("ties", "auto"), ("dare_ties", "bfloat16"), ("della", "float16")])
def test_streamed_checkpoint_holds_exactly_the_merged_tensors(tmp_path: Path, family, method: str, dtype: str) -> None:
    base, sources = family
    groups = ({"weight": (0.6, 0.3, 0.8), "density": 0.5}, {"weight": 1.0, "density": (0.4, 0.6, 0.5)})
    recipe = Recipe(method, base, sources, groups, seed=3, dtype=dtype)
    # today's path, in memory: each tensor merged from fully loaded checkpoints, then converted
    ck = Checkpoint.open(base)
    srcs = [Checkpoint.open(s) for s in sources]
    spec, where = check_recipe(recipe), group_map(recipe, ck)
    convert = (lambda t: t.to(getattr(torch, dtype))) if dtype != "auto" else (lambda t: t)
    expected = {
        n: convert(merge_named(recipe, spec, n, where[n], ck.tensor(n), task_vectors(ck.tensor(n), [s.tensor(n) for s in srcs])))
        for n in ck.names
    }
    out = tmp_path / "out"
    out.mkdir()
    tensors = ((n, convert(t)) for n, t in stream_merge(recipe))
    files = write_checkpoint(tensors, out, config=ck.config, side_files_from=ck.path, max_shard_bytes=40_000,
                             plan=output_plan(recipe, ck))
    assert len(files) > 1
    back = Checkpoint.open(str(out))
    assert set(back.names) == set(ck.names)
    assert all(torch.equal(back.tensor(n), expected[n]) and back.tensor(n).dtype == expected[n].dtype for n in ck.names)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)  # plain transformers loads it


def _bf16_family(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A bf16 base and three bf16 'fine-tunes': their task vectors repeat magnitudes a lot."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).bfloat16()
    sources = [(base.float() + 0.01 * torch.randn(shape, generator=g)).bfloat16() for _ in range(3)]
    return base, task_vectors(base, sources)


CACHED = {
    "ties": {"weight": [0.5, -0.4, 0.3], "density": [0.05, 0.5, 0.77]},
    "breadcrumbs": {"weight": [0.5, 0.4, 0.3], "density": [0.3, 0.5, 0.9], "gamma": [0.01, 0.1, 0.3]},
    "breadcrumbs_ties": {"weight": [0.5, 0.4, 0.3], "density": 0.6, "gamma": 0.05},
    "dare_ties": {"weight": [0.5, 0.4, 0.3], "density": [0.3, 0.5, 1.0]},
    "della": {"weight": [0.5, 0.4, 0.3], "density": [0.3, 0.5, 0.6], "epsilon": 0.1},
    "della_linear": {"weight": [0.5, 0.4, 0.3], "density": 0.5, "epsilon": 0.2},
}


def _eager_chunks(patch: pytest.MonkeyPatch, mix_chunk: int) -> list[int]:
    """Turn the fused CPU kernel off (so `_mix` runs its eager chunk loop, as on an accelerator) with
    `mix_chunk` entries per step; returns a list that grows by one per chunk merged."""
    starts: list[int] = []
    real = _methods._weighted_chunk
    patch.setattr(_fused, "usable", lambda *args, **kwargs: False)
    patch.setattr(_methods, "MIX_CHUNK", mix_chunk)
    patch.setattr(_methods, "_weighted_chunk", lambda rows, keeps, start, *rest: starts.append(start) or real(rows, keeps, start, *rest))
    return starts


@pytest.mark.parametrize("method", list(CACHED))
def test_cached_and_chunked_merges_are_bit_identical_to_plain_ones(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    base, deltas = _bf16_family((150, 70))  # edge magnitudes tie a lot, as in real bf16 task vectors
    stats = DeltaStats(deltas, keep_sorted=True)
    for density_scale in (1.0, 0.5):
        params = dict(CACHED[method])
        if isinstance(params["density"], list):
            params["density"] = [min(1.0, d * density_scale) for d in params["density"]]
        plain = merge_tensor(METHODS[method], base, deltas, params, Noise(1, "w"))  # fused kernel, one pass
        with monkeypatch.context() as patch:
            starts = _eager_chunks(patch, 999)  # 333 entries per model per step: partial edges counted across chunks
            cached = merge_tensor(METHODS[method], base, deltas, params, Noise(1, "w"), stats=stats)
            assert starts == list(range(0, 150 * 70, 333)), "the eager chunk loop did not run"  # 32 chunks
            starts.clear()
            chunked = merge_tensor(METHODS[method], base, deltas, params, Noise(1, "w"))
            assert len(starts) == 32
        assert torch.equal(plain.view(torch.int32), cached.view(torch.int32))  # bits, signed zeros included
        assert torch.equal(plain.view(torch.int32), chunked.view(torch.int32))


def test_merge_cache_is_per_tensor_and_rebuilt_for_new_deltas() -> None:
    base, deltas = _bf16_family((40, 30))
    recipe = Recipe("ties", "b", ("s1", "s2", "s3"), ({"weight": 0.5, "density": 0.3},))
    spec, cache = check_recipe(recipe), MergeCache()
    first = merge_named(recipe, spec, "w", 0, base, deltas, cache=cache)
    assert cache.stats("w", deltas) is cache.stats("w", deltas)
    assert torch.equal(first, merge_named(recipe, spec, "w", 0, base, deltas))
    other = deltas * 2
    assert torch.equal(merge_named(recipe, spec, "w", 0, base, other, cache=cache), merge_named(recipe, spec, "w", 0, base, other))
    with pytest.raises(ValueError, match="stats were built for other task vectors"):
        merge_tensor(spec, base, other, {"density": 0.5}, stats=DeltaStats(deltas))


def _stable_window(row: torch.Tensor, low: int, high: int) -> torch.Tensor:
    order = row.abs().sort(stable=True).indices  # ascending magnitude, equal ones by index
    mask = torch.zeros(row.numel(), dtype=torch.bool)
    mask[order[low:high]] = True
    return mask


def _kept(keep, row: torch.Tensor, chunk: int = 37) -> torch.Tensor:
    if keep is None:
        return torch.ones(row.numel(), dtype=torch.bool)
    return torch.cat([keep.apply(row[s : s + chunk], s) for s in range(0, row.numel(), chunk)]) != 0


@pytest.mark.parametrize("keep_sorted", [False, True])
def test_magnitude_windows_keep_exact_ranks_with_ties_broken_by_index(keep_sorted: bool) -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        n = int(torch.randint(1, 300, (), generator=g))
        deltas = torch.randint(-6, 7, (3, n), generator=g).float() * 0.25  # few distinct magnitudes, zeros
        density = torch.rand(3, generator=g) * 1.1
        gamma = torch.rand(3, generator=g) * 0.5
        stats = DeltaStats(deltas, keep_sorted=keep_sorted)
        tops = top_magnitude_keep(deltas, density, stats) or [None] * 3
        middles = middle_magnitude_keep(deltas, density, gamma, stats) or [None] * 3
        for e in range(3):
            d, gm, nonzero = density[e].item(), gamma[e].item(), deltas[e] != 0  # a kept 0 changes nothing
            k = n if d >= 1 else max(1, count_of(d, n))
            assert torch.equal(_stable_window(deltas[e], n - k, n) & nonzero, _kept(tops[e], deltas[e]) & nonzero)
            low = max(0, n - count_of(d, n) - count_of(gm, n))
            window = torch.ones(n, dtype=torch.bool) if d >= 1 else _stable_window(deltas[e], low, low + count_of(d, n))
            assert torch.equal(window & nonzero, _kept(middles[e], deltas[e]) & nonzero)
