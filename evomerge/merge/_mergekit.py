"""mergekit's arithmetic, for merges that must equal mergekit 0.1.5's (`Recipe.mergekit_dtype`).

evomerge's own arithmetic (`_methods`) forms fp32 task vectors and rounds once at the end. mergekit
casts every input to its config's `dtype` and computes in it: in bf16 a TIES merge then trims and elects
signs on bf16-rounded task vectors, and its tensors differ from evomerge's by more than rounding. This
module repeats mergekit's order of operations in the given dtype, method by method, so such a merge
equals mergekit's within the dtype's rounding (bit for bit where the same torch kernels run):

    task-vector family   mergekit `GeneralizedTaskArithmeticMerge.merge_group` and `sparsify.py`
    linear, slerp        fp32 inside (fp64 for fp64 inputs), rounded to the input dtype (mergekit does too)
    model_stock          in the input dtype
    other methods        their `_methods` kernel, which already computes in its inputs' dtype

Deliberate difference: DARE / DELLA keep masks come from evomerge's counter-based uniforms (`Noise`),
not from torch's generator, so random methods merge with the same parameters and different masks.
Every input is read, never written. The result is in the compute dtype; the caller rounds it to the
recipe's output dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from evomerge.merge import _methods
from evomerge.merge._methods import sign_mask
from evomerge.merge._random import Noise
from evomerge.merge.catalog import TASK_VECTOR_METHODS, MergeParamError, MethodSpec, ParamValue, TaskVectorMethod

RESCALE_EPS = 1e-7  # mergekit rescaled_masked_tensor


def merge_like_mergekit(
    spec: MethodSpec,
    base: Tensor,
    sources: Sequence[Tensor],
    params: Mapping[str, ParamValue],
    dtype: torch.dtype | None,
    noise: Noise | None = None,
) -> Tensor:
    """One merged tensor as mergekit computes it: inputs cast to `dtype` (None: their promoted dtype,
    mergekit's default without `dtype:`), the method run in it in mergekit's order; the result in that
    dtype. params are checked against the method's limits (one-line MergeParamError)."""
    resolved = spec.resolve(params, len(sources), strict=False)
    if dtype is None:
        dtype = base.dtype
        for s in sources:
            dtype = torch.promote_types(dtype, s.dtype)
    b, xs = base.to(dtype), [s.to(dtype) for s in sources]
    if spec.name in TASK_VECTOR_METHODS:
        return task_arithmetic(TASK_VECTOR_METHODS[spec.name], b, xs, noise or Noise(), **resolved)
    if spec.name in ORDERS:
        return ORDERS[spec.name](b, xs, **resolved)
    if spec.name not in _methods.FULL_WEIGHT_KERNELS:
        raise MergeParamError(f"{spec.name}: mergekit has no such method, so there is no mergekit arithmetic for it; drop mergekit_dtype")
    return _methods.full_weight_kernel(spec.name)(b, xs, **resolved)


# --- the task-vector family -------------------------------------------------------------------------


def task_arithmetic(
    row: TaskVectorMethod, base: Tensor, sources: Sequence[Tensor], noise: Noise, *, weight: list[float],
    lambda_: float, normalize: bool, rescale: bool, int8_mask: bool = False, **sparsifier: list[float],
) -> Tensor:
    """mergekit's generalized task arithmetic, in the inputs' dtype: sparsify each task vector, weight,
    elect signs (TIES), sum, divide by the (agreeing) weights' sum when normalize, times lambda."""
    deltas = base.new_empty((len(sources), *base.shape))  # (E, *S)
    for e, source in enumerate(sources):
        delta = source - base
        if row.sparsifier != "none":
            delta = _sparsify(row.sparsifier, delta, noise, e, rescale, **{k: v[e] for k, v in sparsifier.items()})
        deltas[e] = delta
    weights = torch.tensor(weight, dtype=deltas.dtype, device=deltas.device)
    while deltas.dim() > weights.dim():
        weights.unsqueeze_(-1)
    deltas.mul_(weights)
    if row.elect_sign:
        mask = sign_mask(deltas, torch.int8 if int8_mask else base.dtype)
        mixed = (deltas * mask).sum(dim=0)
        divisor = (weights * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lambda_ != 1:
        mixed *= lambda_
    return (base + mixed).to(base.dtype)


def _sparsify(kind: str, delta: Tensor, noise: Noise, e: int, rescale: bool, *, density: float,
              gamma: float = 0.01, epsilon: float = 0.15) -> Tensor:
    if density >= 1:
        return delta
    if kind == "top_magnitude":
        return _magnitude(delta, density, rescale)
    if kind == "middle_magnitude":
        return _magnitude_outliers(delta, density, gamma, rescale)
    if kind == "random":
        return _bernoulli(delta, density, noise, e, rescale)
    return _della(delta, density, epsilon, noise, e, rescale)


def rescaled(tensor: Tensor, mask: Tensor, rescale: bool) -> Tensor:
    """mergekit rescaled_masked_tensor with the L1 norm."""
    masked = tensor * mask
    if not rescale:
        return masked
    before, after = tensor.abs().sum(), masked.abs().sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return masked
    return masked * (before / after)


def _magnitude(tensor: Tensor, density: float, rescale: bool) -> Tensor:
    """mergekit `magnitude`: the top int(density * n) magnitudes (at least one), by torch's argsort."""
    if tensor.numel() == 0:
        return torch.zeros_like(tensor)
    k = max(1, int(density * tensor.numel()))
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    w = tensor.abs().reshape(-1)
    if w.device.type == "cpu":
        w = w.float()
    mask[torch.argsort(w, descending=True)[:k]] = 1
    return rescaled(tensor, mask.reshape_as(tensor), rescale)


def _magnitude_outliers(tensor: Tensor, density: float, gamma: float, rescale: bool) -> Tensor:
    """mergekit `magnitude_outliers` (Breadcrumbs): drop the gamma largest, then the smallest."""
    n = tensor.numel()
    target, top = int(density * n), int(gamma * n)
    bottom = max(0, n - target - top)
    w = tensor.abs().reshape(-1)
    if w.device.type == "cpu":
        w = w.float()
    order = torch.sort(w, descending=False).indices
    mask = torch.zeros(n, dtype=tensor.dtype, device=tensor.device)
    mask[order[bottom: bottom + target]] = 1
    return rescaled(tensor, mask.reshape_as(tensor), rescale)


def _work_dtype(tensor: Tensor) -> torch.dtype:
    """mergekit's: the tensor's dtype, except fp16 on the CPU, which it raises to fp32."""
    return tensor.dtype if tensor.device.type != "cpu" or tensor.dtype == torch.bfloat16 else torch.float32


def _bernoulli(tensor: Tensor, density: float, noise: Noise, e: int, rescale: bool) -> Tensor:
    """mergekit `bernoulli` (DARE), its keep mask drawn from evomerge's uniforms (module docstring)."""
    work = _work_dtype(tensor)
    u = noise.uniforms(e, tensor.numel(), tensor.device).view(tensor.shape)
    mask = (u < density).to(work)
    return rescaled(tensor.to(work), mask, rescale).to(tensor.dtype)


def _della(tensor: Tensor, density: float, epsilon: float, noise: Noise, e: int, rescale: bool) -> Tensor:
    """mergekit `della_magprune`: keep probability rising with magnitude rank within each row."""
    shape, work = tensor.shape, _work_dtype(tensor)
    rows = tensor.unsqueeze(0) if tensor.dim() < 2 else tensor
    ranks = torch.argsort(rows.abs(), dim=1, descending=False).argsort(dim=1).to(work) + 1
    low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    probs = (density - epsilon) + ((ranks - low) / (high - low)).clamp(0, 1) * 2 * epsilon
    u = noise.uniforms(e, rows.numel(), tensor.device).view(rows.shape)
    mask = (u < probs).to(work)
    return rescaled(rows.to(work), mask, rescale).to(tensor.dtype).reshape(shape)


# --- interpolation and geometric methods ------------------------------------------------------------


def linear(base: Tensor, sources: Sequence[Tensor], *, weight: list[float], normalize: bool = True) -> Tensor:
    """mergekit `linear_merge`: sum_i w_i x_i (divided by sum_i w_i) in fp32, rounded to the inputs' dtype."""
    dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    w = torch.tensor(weight, dtype=torch.float64).to(dtype)
    result = torch.zeros_like(sources[0], dtype=dtype)
    for x, coefficient in zip(sources, w.unbind(0)):
        result.addcmul_(x, coefficient)
    if normalize:
        result.div_(w.sum(dim=0))
    return result.to(sources[0].dtype)


SLERP_CHUNK = 1024 * 1024  # mergekit slerp's _CHUNK_ELEMENTS: norms and dots are summed per chunk


def slerp(base: Tensor, sources: Sequence[Tensor], *, t: float) -> Tensor:
    """mergekit `slerp` over the flattened tensor: chunked norms and dot, fp32 angle, lerp when
    |cos| > 0.9995; the result in the inputs' dtype."""
    v0, v1 = base, sources[0]
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    tt = torch.tensor([t], dtype=torch.float64).reshape(-1, 1).to(dtype)
    if not a.shape[1]:
        return ((1 - tt) * a + tt * b).reshape(v0.shape).to(v0.dtype)
    chunks = range(0, a.shape[1], SLERP_CHUNK)
    norm_a = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(a[:, i:i + SLERP_CHUNK].to(dtype), dim=1, keepdim=True) for i in chunks]), dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(b[:, i:i + SLERP_CHUNK].to(dtype), dim=1, keepdim=True) for i in chunks]), dim=0)
    norm_a = torch.where(norm_a > _methods.SLERP_NORM_EPS, norm_a, 1)
    norm_b = torch.where(norm_b > _methods.SLERP_NORM_EPS, norm_b, 1)
    dots = [((a[:, i:i + SLERP_CHUNK].to(dtype) / norm_a) * (b[:, i:i + SLERP_CHUNK].to(dtype) / norm_b)).sum(dim=1, keepdim=True) for i in chunks]
    dot = torch.stack(dots).sum(dim=0).clamp(-1, 1)
    lerp = dot.abs() > _methods.SLERP_DOT_THRESHOLD
    theta = torch.acos(torch.where(lerp, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(lerp, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(lerp, tt, torch.sin(tt * theta) / sin_theta)
    result = torch.empty_like(a)
    for i in chunks:
        result[:, i:i + SLERP_CHUNK] = coef_a * a[:, i:i + SLERP_CHUNK].to(dtype) + coef_b * b[:, i:i + SLERP_CHUNK].to(dtype)
    return result.reshape(v0.shape)


def model_stock(base: Tensor, sources: Sequence[Tensor], *, filter_wise: bool = False) -> Tensor:
    """mergekit `model_stock_merge_method`, in the inputs' dtype."""
    shape = base.shape
    if filter_wise:
        w0, ws = (base.unsqueeze(0), [w.unsqueeze(0) for w in sources]) if base.dim() == 1 else (base, list(sources))
    else:
        w0, ws = base.reshape(-1), [w.reshape(-1) for w in sources]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            product = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / product.clamp(min=_methods.STOCK_NORM_EPS)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    count = len(ws)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < _methods.STOCK_SINGULAR
    t = torch.where(singular, torch.zeros_like(cos), (count * cos) / torch.where(singular, torch.ones_like(denominator), denominator))
    average = sum(ws) / count
    return (t * average + (1 - t) * w0).reshape(shape)


ORDERS: dict[str, Callable[..., Tensor]] = {"linear": linear, "slerp": slerp, "model_stock": model_stock}
