"""The full-softmax item loss of the models, fused: ``sum_r CE(h_r @ W^T + bias, target_r)`` over every item.

The forward works through row chunks (the float32 softmax of a chunk stays small and in cache) and keeps
only the gradient of the logits, ``softmax - onehot``, in the matmul dtype; the backward is two matmuls. No
``(rows, items)`` log-softmax buffer and no log-softmax backward pass (on CPU these cost more than the
matmuls at 12k items).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import check_tensor, fail

__all__ = ["full_softmax_cross_entropy"]

_CHUNK_ELEMENTS = 1 << 22  # logits per chunk: 16 MiB in float32


class _FullSoftmaxCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, target, dtype, chunk):
        hd, wd = h.to(dtype), weight.to(dtype)
        acc = torch.promote_types(dtype, torch.float32)  # softmax statistics in float32 (float64 stays)
        grad_logits = torch.empty(h.shape[0], weight.shape[0], dtype=dtype, device=h.device)
        loss = h.new_zeros((), dtype=acc)
        dbias = torch.zeros(weight.shape[0], dtype=acc, device=h.device) if bias is not None else None
        for s in range(0, h.shape[0], chunk):
            f = (hd[s:s + chunk] @ wd.T).to(acc)  # no copy when dtype is already acc
            if bias is not None:
                f += bias
            f.sub_(f.amax(-1, keepdim=True))
            t = target[s:s + chunk, None]
            picked = f.gather(1, t)
            total = f.exp_().sum(-1, keepdim=True)
            loss += (total.log() - picked).sum()
            f.div_(total).scatter_add_(1, t, torch.full_like(picked, -1.0))
            if dbias is not None:
                dbias += f.sum(0)
            grad_logits[s:s + chunk] = f
        ctx.save_for_backward(hd, wd, grad_logits, dbias)
        ctx.dtypes = (h.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad):
        hd, wd, g, dbias = ctx.saved_tensors
        dh = ((g @ wd) * grad).to(ctx.dtypes[0])  # the (r, V) buffer is scaled through the small outputs
        dw = ((g.T @ hd) * grad).to(ctx.dtypes[1])
        dbias = None if dbias is None else (dbias * grad).to(ctx.dtypes[1])
        return dh, dw, dbias, None, None, None


def full_softmax_cross_entropy(h: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor) -> Tensor:
    """Summed cross-entropy of ``h (r, d)`` against all ``V`` classes of ``weight (V, d)`` (+ ``bias (V,)``).

    Equal to ``F.cross_entropy(h @ weight.T + bias, target, reduction="sum")`` up to float rounding. Under
    autocast (CPU or CUDA) the matmuls run in the autocast dtype, the softmax in float32.
    """
    check_tensor("h", h, ndim=2, floating=True)
    check_tensor("weight", weight, ndim=2, floating=True)
    check_tensor("target", target, ndim=1)
    if weight.shape[1] != h.shape[1]:
        fail("weight", f"shape (V, {h.shape[1]}) (the width of h)", weight.shape)
    if target.shape[0] != h.shape[0] or target.is_floating_point():
        fail("target", f"integer class ids of shape ({h.shape[0]},)", f"{target.dtype} {tuple(target.shape)}")
    if not torch.compiler.is_compiling() and target.numel():  # reads values: eager mode only
        lo, hi = int(target.min()), int(target.max())
        if lo < 0 or hi >= weight.shape[0]:
            fail("target", f"class ids in [0, {weight.shape[0]})", f"ids in [{lo}, {hi}]")
    if bias is not None and bias.shape != (weight.shape[0],):
        fail("bias", f"shape ({weight.shape[0]},)", bias.shape)
    dev = h.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    with torch.autocast(dev, enabled=False):
        return _FullSoftmaxCE.apply(h, weight, bias, target, dtype, max(1, _CHUNK_ELEMENTS // weight.shape[0]))
