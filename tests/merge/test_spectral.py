"""The spectral methods (TSV-Merge, Iso-C, Iso-CTS) against the properties their papers define them by."""

from __future__ import annotations

import pytest
import torch

from evomerge.merge import get_method, merge_tensor


def inputs(shape: tuple[int, ...], n_models: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), 0.1 * torch.randn((n_models, *shape), generator=g)


def merged(method: str, base: torch.Tensor, deltas: torch.Tensor, **params) -> torch.Tensor:  # noqa: ANN003
    return merge_tensor(get_method(method), base, deltas, params)


def test_iso_c_flattens_the_spectrum_of_the_task_arithmetic_sum() -> None:
    base, deltas = inputs((24, 16), 3)
    weight = [0.5, 1.0, 1.5]
    out = merged("iso_c", base, deltas, weight=weight, lambda_=1.3) - base
    summed = (deltas * torch.tensor(weight).view(-1, 1, 1)).sum(0)
    s_sum, s_out = torch.linalg.svdvals(summed), torch.linalg.svdvals(out)
    torch.testing.assert_close(s_out, torch.full_like(s_out, 1.3 * float(s_sum.mean())), rtol=1e-4, atol=1e-6)
    u, _, vh = torch.linalg.svd(summed, full_matrices=False)
    torch.testing.assert_close(out, 1.3 * float(s_sum.mean()) * (u @ vh), rtol=1e-4, atol=1e-6)  # same singular vectors


def test_iso_cts_with_the_whole_space_common_is_iso_c() -> None:
    base, deltas = inputs((20, 12), 3)
    ours = merged("iso_cts", base, deltas, weight=[1.0, 0.7, 1.2], common_space_fraction=1.0, lambda_=1.0)
    theirs = merged("iso_c", base, deltas, weight=[1.0, 0.7, 1.2], lambda_=1.0)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_iso_cts_keeps_each_tasks_own_directions() -> None:
    """A task whose update is orthogonal to the others' and small: Iso-C's common subspace (top directions of
    the sum) can drop it, Iso-CTS with a task-specific part keeps it."""
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    big = torch.stack([5 * torch.outer(q[:, i], q[:, i]) for i in range(4)]).sum(0)
    small = 0.5 * torch.outer(q[:, 12], q[:, 12])
    deltas, base = torch.stack([big, big, small]), torch.zeros(16, 16)
    out = merged("iso_cts", base, deltas, weight=[1.0, 1.0, 1.0], common_space_fraction=0.25, lambda_=1.0)
    assert float(q[:, 12] @ out @ q[:, 12]) > 0.1  # the small task's direction is in the merge
    spectrum = torch.linalg.svdvals(out)
    assert float(spectrum.max() - spectrum[spectrum > 1e-4].min()) < 1e-3  # isotropic on what it keeps


def test_tsv_merge_of_one_task_is_task_arithmetic() -> None:
    """With one model the task's singular vectors are already orthonormal: the merge is base + lambda_ w d."""
    base, deltas = inputs((12, 8), 1)
    torch.testing.assert_close(merged("tsv_merge", base, deltas, weight=[0.8], lambda_=1.5), base + 1.2 * deltas[0],
                               rtol=1e-4, atol=1e-5)


def test_tsv_merge_keeps_r_over_e_directions_per_task() -> None:
    """Each task contributes its top r // E singular values; the merge's spectrum is made of them."""
    base, deltas = inputs((16, 8), 2)
    out = merged("tsv_merge", base, deltas, weight=[1.0, 1.0], lambda_=1.0) - base
    kept = torch.cat([torch.linalg.svdvals(d)[:4] for d in deltas])
    torch.testing.assert_close(torch.linalg.svdvals(out).sort(descending=True).values, kept.sort(descending=True).values,
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["tsv_merge", "iso_c", "iso_cts"])
def test_vectors_take_the_mean_of_the_weighted_task_vectors(method: str) -> None:
    base, deltas = inputs((16,), 3)
    extra = {"common_space_fraction": 0.8} if method == "iso_cts" else {}
    out = merged(method, base, deltas, weight=[1.0, 2.0, 0.0], lambda_=1.5, **extra)
    torch.testing.assert_close(out, base + 1.5 * (deltas[0] + 2 * deltas[1]) / 3)
