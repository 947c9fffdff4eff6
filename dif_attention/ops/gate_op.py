"""Paper-exact gate weights (``GateFusion(max_len=L)``) with a fused energy forward.

``gate_energy(q, k, w1, b1, w2, b2)`` is a ``torch.library.custom_op``: the forward runs
:func:`dif_attention.ops.gate_kernel.gate_energy` and writes only ``(b|1, h, n)`` numbers. The
backward is fused too for ``n <= 64`` (every paper configuration: n = 7, 10, 50), writing only
``dq``, ``dk`` and the small weight gradients; for longer rows it recomputes the score rows with torch
ops (materialising ``(b|1, h, n, n)`` per source, once, in the backward only).

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
from .attention_op import dot_precision

__all__ = ["gate_energy", "paper_gates"]


@torch.library.custom_op("dif_attention::gate_energy", mutates_args=())
def gate_energy(q: Tensor, k: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    bb, h, n, e = q.shape
    out = torch.empty(bb, h, n, device=q.device, dtype=torch.float32)
    block_m, block_n = gate_blocks(n, e, q.dtype)
    gate_kernel.gate_energy[(triton.cdiv(n, block_m), bb * h)](
        q, k, w1, b1, w2, b2, out, n, E=e, BE=max(16, triton.next_power_of_2(e)), BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_H=block_n, PREC=dot_precision(q.dtype), num_warps=4)
    return out


def gate_blocks(n: int, e: int, dtype: torch.dtype) -> tuple[int, int]:
    """(query rows, key/hidden chunk) of the energy forward. Wide fp32 rows get smaller tiles: the sm_90
    compile of fp32 width 512 at (16, 64) needed 288 KiB of shared memory (limit 227 KiB)."""
    row_bytes = max(16, triton.next_power_of_2(e)) * (4 if dtype == torch.float32 else 2)
    block_m = 16 if n <= 16 or row_bytes > 512 else 32
    block_n = max(16, min(64 if row_bytes <= 512 else 32, triton.next_power_of_2(n)))
    return block_m, block_n


@gate_energy.register_fake
def _gate_energy_fake(q, k, w1, b1, w2, b2):
    return q.new_empty(q.shape[:3], dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


#: the fused energy backward holds one (b, h) row set in a tile: n <= 64, per-source width <= 128
FUSED_BWD_MAX_N, FUSED_BWD_MAX_E = 64, 128


@torch.library.custom_op("dif_attention::gate_energy_backward", mutates_args=())
def gate_energy_backward(grad: Tensor, q: Tensor, k: Tensor, w1: Tensor, b1: Tensor,
                         w2: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dw1, db1, dw2), all fp32, from the fused kernel (n <= 64)."""
    bb, h, n, e = q.shape
    bh = bb * h
    groups = max(1, min(bh, 1024))
    rows = triton.cdiv(bh, groups)
    groups = triton.cdiv(bh, rows)
    dq = torch.empty(bb, h, n, e, device=q.device, dtype=torch.float32)
    dk = torch.empty_like(dq)
    dw1 = torch.empty(groups, n, n, device=q.device, dtype=torch.float32)
    db1 = torch.empty(groups, n, device=q.device, dtype=torch.float32)
    dw2 = torch.empty_like(db1)
    gate_kernel.gate_energy_bwd[(groups,)](
        q, k, w1, b1, w2, grad.contiguous(), dq, dk, dw1, db1, dw2, bh, n, rows, e,
        BE=max(16, triton.next_power_of_2(e)), BL=max(16, triton.next_power_of_2(n)),
        PREC=dot_precision(q.dtype), num_warps=4)
    return dq, dk, dw1.sum(0), db1.sum(0), dw2.sum(0)


@gate_energy_backward.register_fake
def _gate_energy_backward_fake(grad, q, k, w1, b1, w2):
    f32 = dict(dtype=torch.float32)
    return (q.new_empty(q.shape, **f32), k.new_empty(k.shape, **f32), w1.new_empty(w1.shape, **f32),
            b1.new_empty(b1.shape, **f32), w2.new_empty(w2.shape, **f32))


def _backward(ctx, grad):
    q, k, w1, b1, w2, b2 = ctx.saved_tensors
    n, e = q.shape[-2], q.shape[-1]
    db2 = grad.float().sum().reshape(1).to(b2.dtype)
    if n <= FUSED_BWD_MAX_N and e <= FUSED_BWD_MAX_E:
        dq, dk, dw1, db1, dw2 = gate_energy_backward(grad, q, k, w1, b1, w2)
        return (dq.to(q.dtype), dk.to(k.dtype), dw1.to(w1.dtype), db1.to(b1.dtype), dw2.to(w2.dtype), db2)
    return _backward_torch(q, k, w1, b1, w2, b2, grad)


def _backward_torch(q, k, w1, b1, w2, b2, grad):
    """Reference backward with torch ops (materialises (b|1, h, n, n) per source); used for n > 64."""
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
