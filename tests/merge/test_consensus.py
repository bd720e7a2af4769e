"""The compiled consensus kernel equals the chunked eager path (the accelerators' path) bit for bit."""

from __future__ import annotations

import pytest
import torch

from evomerge.merge import TaskVectors, _methods


def chunked_eager(base, tv, params, monkeypatch):
    monkeypatch.setattr(TaskVectors, "compiled", property(lambda self: False))
    try:
        return _methods.consensus(base, tv, **params)
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("n_models", [1, 2, 3, 5])
def test_compiled_consensus_equals_the_chunked_eager_path(n_models, monkeypatch):
    g = torch.Generator().manual_seed(n_models)
    shape = (300, 1111)  # several eager chunks
    base = torch.randn(shape, generator=g).to(torch.bfloat16)
    sources = [(base.float() + torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16) for _ in range(n_models)]
    sources[0].view(-1)[:50] = base.view(-1)[:50]  # exact zeros in one task vector
    params = {"weight": torch.tensor([0.9, -0.4, 1.3, 0.5, 0.7][:n_models]), "tall_lambda": torch.tensor([0.4, 0.2, 0.6, 0.3, 0.5][:n_models]),
              "k": 2.0 if n_models > 1 else 1.0, "lambda_": 1.1}
    native = TaskVectors(base, sources)
    deltas = TaskVectors.from_deltas(base, torch.stack([s.float() - base.float() for s in sources]))
    compiled = _methods.consensus(base, native, **params)
    assert torch.equal(compiled, _methods.consensus(base, deltas, **params))
    eager = chunked_eager(base, native, params, monkeypatch)
    assert torch.equal(compiled.view(torch.int32), eager.view(torch.int32))
    kept = (compiled != base.float()).float().mean()
    assert 0.05 < kept < 0.95  # the masks keep some entries and drop others
