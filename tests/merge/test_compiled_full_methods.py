"""The compiled CPU passes of consensus and slerp equal their chunked eager path (the accelerators' path)
bit for bit, from bf16 sources and from fp32 task vectors."""

from __future__ import annotations

import pytest
import torch

from evomerge.merge import TaskVectors, _methods


def chunked_eager(method, base, tv, params, monkeypatch):
    monkeypatch.setattr(TaskVectors, "compiled", property(lambda self: False))
    try:
        return method(base, tv, **params)
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
    eager = chunked_eager(_methods.consensus, base, native, params, monkeypatch)
    assert torch.equal(compiled.view(torch.int32), eager.view(torch.int32))
    kept = (compiled != base.float()).float().mean()
    assert 0.05 < kept < 0.95  # the masks keep some entries and drop others


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("colinear", [False, True])
def test_compiled_slerp_equals_the_chunked_eager_path(t, colinear, monkeypatch):
    g = torch.Generator().manual_seed(int(t * 10) + colinear)
    base = torch.randn((700, 1500), generator=g).to(torch.bfloat16)  # several eager chunks and sum blocks
    noise = 0.01 if colinear else 1.0  # nearly colinear: the lerp branch; else a wide angle
    source = (base.float() + torch.randn(base.shape, generator=g) * noise).to(torch.bfloat16)
    native = TaskVectors(base, [source])
    deltas = TaskVectors.from_deltas(base, (source.float() - base.float()).unsqueeze(0))
    compiled = _methods.slerp(base, native, t=t)
    assert torch.equal(compiled.view(torch.int32), _methods.slerp(base, deltas, t=t).view(torch.int32))
    eager = chunked_eager(_methods.slerp, base, native, {"t": t}, monkeypatch)
    assert torch.equal(compiled.view(torch.int32), eager.view(torch.int32))
