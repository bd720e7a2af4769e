"""Model Stock streamed over the task vectors (`_stock`) equals the formula computed whole in fp64, and
gives the same bits from native sources, materialised fp32 task vectors and the formed-buffer path."""

from __future__ import annotations

from itertools import combinations

import pytest
import torch

from evomerge.merge import METHODS, TaskVectors, _methods, _stock, merge_tensor
from evomerge.models.build import task_vectors


def inputs(shape: tuple[int, ...], n: int, seed: int, dtype: torch.dtype = torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    base32 = torch.randn(shape, generator=g) * 0.02
    base = base32.to(dtype)
    shared = torch.randn(shape, generator=g) * 0.002  # correlated task vectors: cos well inside (0, 1)
    sources = [(base32 + shared + torch.randn(shape, generator=g) * 0.002).to(dtype) for _ in range(n)]
    return base, sources


def reference(base: torch.Tensor, sources: list[torch.Tensor], filter_wise: bool) -> torch.Tensor:
    """mergekit's Model Stock, whole tensors in fp64."""
    d = torch.stack([s.double() - base.double() for s in sources])
    flat = d.reshape(len(d), -1, d.shape[-1]) if filter_wise and d.dim() > 2 else d.reshape(len(d), 1, -1)
    norms = flat.norm(dim=-1)
    cos = torch.stack([((flat[i] * flat[j]).sum(-1) / (norms[i] * norms[j]).clamp_min(_methods.STOCK_NORM_EPS)).clamp(-1, 1)
                       for i, j in combinations(range(len(d)), 2)]).mean(0)
    n = len(d)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < _methods.STOCK_SINGULAR
    t = torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, denominator))
    return (base.double() + (t.view(-1, 1) * flat.mean(0)).view(base.shape)).float()


def stock(base, deltas, filter_wise: bool) -> torch.Tensor:
    return merge_tensor(METHODS["model_stock"], base, deltas, {"filter_wise": filter_wise})


SHAPES = [(5,), (1000,), (37, 129), (3, 7, 11), (3, 70_001), (150_001,)]  # the last two: rows over one block


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_streamed_model_stock_equals_the_whole_tensor_formula(shape, filter_wise: bool) -> None:
    base, sources = inputs(shape, 3, seed=len(shape) + shape[-1])
    merged = stock(base, TaskVectors(base, sources), filter_wise)
    assert merged.dtype == torch.float32 and merged.shape == base.shape
    torch.testing.assert_close(merged, reference(base, sources, filter_wise), rtol=0, atol=1e-7)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_native_fp32_and_formed_paths_are_bit_identical_over_many_blocks(filter_wise: bool) -> None:
    """Rows of 200_003 entries (4 blocks each, a short tail) and 3 rows: the in-place kernels on bf16
    sources and on fp32 task vectors, and the formed-buffer path (fp16 would take it; here forced)."""
    assert 200_003 > 3 * _stock.BLOCK
    base, sources = inputs((3, 200_003), 4, seed=7)
    native = stock(base, TaskVectors(base, sources), filter_wise)
    fp32 = stock(base, task_vectors(base, sources), filter_wise)
    formed = TaskVectors(base, sources)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_stock, "_in_place", lambda deltas: False)
        chunked = stock(base, formed, filter_wise)
    assert torch.equal(native, fp32)
    assert torch.equal(native, chunked)
    torch.testing.assert_close(native, reference(base, sources, filter_wise), rtol=0, atol=1e-7)


def test_fp16_and_mixed_dtype_sources_are_bit_identical_to_fp32_task_vectors() -> None:
    base, sources = inputs((70, 1001), 3, seed=8, dtype=torch.float16)
    assert torch.equal(stock(base, TaskVectors(base, sources), True), stock(base, task_vectors(base, sources), True))
    base, sources = inputs((70, 1001), 3, seed=9)
    mixed = [sources[0].float(), *sources[1:]]
    assert torch.equal(stock(base, TaskVectors(base, mixed), False), stock(base, task_vectors(base, mixed), False))


def test_the_accelerator_path_matches_the_formula(monkeypatch: pytest.MonkeyPatch) -> None:
    """The chunked torch path (non-CPU devices), run here on the CPU with a small step."""
    monkeypatch.setattr(_stock, "EAGER_STEP", 1000)
    base, sources = inputs((4, 2500), 3, seed=10)
    for filter_wise in (False, True):
        deltas = TaskVectors(base, sources)
        row_len = 2500 if filter_wise else deltas.numel
        sums = _stock._eager_sums(deltas, row_len)
        assert torch.allclose(sums, _stock.pair_sums(deltas, row_len), rtol=1e-12, atol=0)
        t = torch.rand(len(sums), dtype=torch.float64)
        assert torch.equal(_stock._eager_write(base, deltas, t, row_len), _stock.write(base, deltas, t, row_len))


def test_opposite_task_vectors_keep_the_base_per_row() -> None:
    base = torch.zeros(2, 3)
    sources = [torch.tensor([[1.0, 2.0, 0.0], [1.0, 0.0, 0.0]]), torch.tensor([[1.0, 2.0, 0.0], [-1.0, 0.0, 0.0]])]
    merged = stock(base, TaskVectors(base, sources), True)
    assert torch.equal(merged, torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]]))  # t = 1 on row 0, singular row 1
