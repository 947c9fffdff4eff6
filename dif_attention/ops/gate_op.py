"""Paper-exact gate weights (``GateFusion(max_len=L)``) with a fused energy forward.

``gate_energy(q, k, w1, b1, w2, b2)`` is a ``torch.library.custom_op``: the forward runs
:func:`dif_attention.ops.gate_kernel.gate_energy` and writes only ``(b|1, h, n)`` numbers; the
backward recomputes the score rows with torch ops (it materialises ``(b|1, h, n, n)`` per source,
once, in the backward only).

Shapes::

    q, k   : (b|1, h, n, e)  one source
    w1     : (n, n), b1 : (n,), w2 : (n,), b2 : (1,)   the fusion's row-MLP, shared by sources and heads
    energy : (b|1, h, n) fp32
    gates  : (b|1, h, n, s) in q's dtype, softmax over the sources s
"""
from __future__ import annotations

import torch
import triton
from torch import Tensor

from . import gate_kernel

__all__ = ["gate_energy", "paper_gates"]


@torch.library.custom_op("dif_attention::gate_energy", mutates_args=())
def gate_energy(q: Tensor, k: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    bb, h, n, e = q.shape
    out = torch.empty(bb, h, n, device=q.device, dtype=torch.float32)
    block_m = 16 if n <= 16 else 32
    block_n = max(16, min(64, triton.next_power_of_2(n)))
    gate_kernel.gate_energy[(triton.cdiv(n, block_m), bb * h)](
        q, k, w1, b1, w2, b2, out, n, E=e, BE=max(16, triton.next_power_of_2(e)), BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_H=block_n, PREC="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4)
    return out


@gate_energy.register_fake
def _gate_energy_fake(q, k, w1, b1, w2, b2):
    return q.new_empty(q.shape[:3], dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    q, k, w1, b1, w2, b2 = ctx.saved_tensors
    qf, kf, w1f, w2f = q.float(), k.float(), w1.float(), w2.float()
    s = qf @ kf.transpose(-1, -2)  # (bb, h, n, n)
    pre = s @ w1f.t() + b1.float()  # (bb, h, n, hidden)
    hid = pre.clamp_min(0.0)
    g = grad.float().unsqueeze(-1)  # (bb, h, n, 1)
    dpre = g * w2f * (pre > 0)
    ds = dpre @ w1f
    dq = ds @ kf
    dk = ds.transpose(-1, -2) @ qf
    dw1 = torch.einsum("bhic,bhil->cl", dpre, s)
    db1 = dpre.sum((0, 1, 2))
    dw2 = (hid * g).sum((0, 1, 2))
    db2 = g.sum().reshape(1)
    return (dq.to(q.dtype), dk.to(k.dtype), dw1.to(w1.dtype), db1.to(b1.dtype), dw2.to(w2.dtype),
            db2.to(b2.dtype))


gate_energy.register_autograd(_backward, setup_context=_setup_context)


def paper_gates(queries: list[Tensor], keys: list[Tensor], fusion) -> Tensor:
    """Gate weights ``(b|1, h, n, s)`` of a paper-exact ``GateFusion`` from per-source q/k, with the
    energies computed by the fused kernel (no score matrix in the forward)."""
    first, relu, last = fusion.mlp
    energies = []
    for q, k in zip(queries, keys):
        bb = max(q.shape[0], k.shape[0])
        q = q.expand(bb, -1, -1, -1).contiguous()
        k = k.expand(bb, -1, -1, -1).contiguous()
        energies.append(gate_energy(q, k, first.weight, first.bias, last.weight.reshape(-1), last.bias))
    e = torch.stack(torch.broadcast_tensors(*energies), dim=-1)  # (b|1, h, n, s)
    return e.softmax(-1).to(queries[0].dtype)
