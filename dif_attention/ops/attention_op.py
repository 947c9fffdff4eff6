"""The fused attention as a torch op: kernel launchers, ``torch.library.custom_op`` registration (with
fake implementations, so ``torch.compile`` traces through it) and the autograd formula.

Shapes (see :mod:`dif_attention.ops.kernels`)::

    q, k : (b, h, n, e)   contiguous, same dtype as v
    v    : (b, h, n, ev)  dense with a unit last stride, dims in any order (a head split needs no copy);
                          out and dv are allocated in v's layout
    bias : (h, n, n)      or None: batch-independent raw-score table (gets a gradient)
    mask : bool, 4-d, broadcastable to (b, h, n, n), or None
    lengths : (b,) int32  or None: positions >= lengths[b] are padding
    seed : (1,) int64     or None: Philox seed of the attention dropout (required when dropout_p > 0)
    -> out (b, h, n, ev), lse (b, h, n) fp32 (base-2 log-sum-exp of the logits, +inf on empty rows)
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
from torch import Tensor

from ..errors import DIFError
from . import kernels

__all__ = ["fused_attention", "fused_attention_backward", "pick_block", "dot_precision", "LOG2E"]

LOG2E = 1.0 / math.log(2.0)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: fp32 inputs use 3xTF32 (about fp32 accuracy on tensor cores, and an
    sm_90 compile in ~10 s instead of up to minutes for "ieee"); ``DIF_ATTENTION_FP32_DOT=ieee`` forces
    exact fp32 FMA dots. Half inputs ignore it."""
    if dtype != torch.float32:
        return "tf32"
    return os.environ.get("DIF_ATTENTION_FP32_DOT", "tf32x3")


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(x))


def pick_block(n: int, e: int, ev: int, dtype: torch.dtype) -> int:
    """Tile rows/columns: 64 at recommendation lengths (one tile covers n <= 64), smaller for tiny n
    or very wide fp32 heads (register budget)."""
    width_bytes = _pow2(max(e, ev)) * (4 if dtype == torch.float32 else 2)
    # shared memory grows with tile x width: sm_90 cubins (compiled without a GPU) need 45-106 KiB at
    # 64-row tiles up to 512 bytes per row, 266 KiB (over the 227 KiB limit) for fp32 512-wide at 32 rows
    cap = 64 if width_bytes <= 512 else 32 if width_bytes <= 1024 else 16
    return min(cap, max(16, triton.next_power_of_2(n)))


def _mask_args(mask: Optional[Tensor], fallback: Tensor):
    """(uint8 view, stride_b, stride_h, stride_i, stride_j); broadcast dims get stride 0."""
    if mask is None:
        return fallback, 0, 0, 0, 0
    m = mask.view(torch.uint8)
    strides = [0 if size == 1 else stride for size, stride in zip(m.shape, m.stride())]
    return (m, *strides)


def _vstrides(t: Tensor):
    """(stride_b, stride_h, stride_n) of a (b, h, n, e) tensor whose last stride is 1."""
    return t.stride(0), t.stride(1), t.stride(2)


def _common(q, k, v, bias, mask, lengths, seed, causal, scale, dropout_p, block):
    if not (q.dtype == k.dtype == v.dtype):  # tl.dot needs equal operand dtypes (a compile error on GPU)
        raise DIFError(f"queries: expected q, k and v of one dtype for the fused kernel, got "
                       f"{q.dtype}, {k.dtype}, {v.dtype}")
    b, h, n, e = q.shape
    ev = v.shape[-1]
    blk = block if block > 0 else pick_block(n, e, ev, q.dtype)
    m, smb, smh, smi, smj = _mask_args(mask, q)
    ptrs = (q, k, v, q if bias is None else bias, m, q if lengths is None else lengths, q if seed is None else seed)
    scalars = dict(E=e, EV=ev, BE=_pow2(e), BEV=_pow2(ev), BLOCK_M=blk, BLOCK_N=blk, CAUSAL=bool(causal),
                   HAS_BIAS=bias is not None, HAS_LEN=lengths is not None, HAS_MASK=mask is not None,
                   DROPOUT=dropout_p > 0, PREC=dot_precision(q.dtype))
    keep = 1.0 / (1.0 - dropout_p)
    return b, h, n, blk, ptrs, (smb, smh, smi, smj), scalars, keep


def _num_warps(blk: int) -> int:
    return 4 if blk <= 64 else 8


@torch.library.custom_op("dif_attention::fused_attention", mutates_args=())
def fused_attention(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], mask: Optional[Tensor],
                    lengths: Optional[Tensor], seed: Optional[Tensor], causal: bool, scale: float,
                    dropout_p: float, block: int) -> tuple[Tensor, Tensor]:
    b, h, n, blk, ptrs, mstr, cfg, keep = _common(q, k, v, bias, mask, lengths, seed, causal, scale, dropout_p,
                                                  block)
    out = torch.empty_like(v)  # v's layout (the caller passes v dense with a unit last stride)
    lse = torch.empty(b, h, n, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(n, blk), b * h)
    kernels.attention_fwd[grid](*ptrs, out, lse, *mstr, *_vstrides(v), *_vstrides(out), h, n, scale * LOG2E,
                                dropout_p, keep, **cfg, num_warps=_num_warps(blk), num_stages=2)
    return out, lse


@fused_attention.register_fake
def _fused_attention_fake(q, k, v, bias, mask, lengths, seed, causal, scale, dropout_p, block):
    b, h, n, _ = q.shape
    return torch.empty_like(v), q.new_empty((b, h, n), dtype=torch.float32)


@torch.library.custom_op("dif_attention::fused_attention_backward", mutates_args=())
def fused_attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor],
                             mask: Optional[Tensor], lengths: Optional[Tensor], seed: Optional[Tensor],
                             out: Tensor, lse: Tensor, causal: bool, scale: float, dropout_p: float, block: int,
                             bias_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv, dbias); dbias is (h, n, n) fp32 when ``bias_grad`` else an empty tensor."""
    b, h, n, blk, ptrs, mstr, cfg, keep = _common(q, k, v, bias, mask, lengths, seed, causal, scale, dropout_p,
                                                  block)
    nw = _num_warps(blk)
    delta = torch.empty(b, h, n, device=q.device, dtype=torch.float32)
    kernels.attention_bwd_delta[(triton.cdiv(n, blk), b * h)](out, dout, delta, *_vstrides(out), *_vstrides(dout),
                                                               h, n, EV=cfg["EV"], BEV=cfg["BEV"], BLOCK_M=blk,
                                                               num_warps=nw)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if dv.stride() != v.stride():  # the kernels write dv with v's strides
        dv = torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device)
    args = (*ptrs, dout, lse, delta)
    vd = (*mstr, *_vstrides(v), *_vstrides(dout))
    kernels.attention_bwd_dkdv[(triton.cdiv(n, blk), b * h)](*args, dk, dv, *vd, h, n, scale * LOG2E, scale,
                                                             dropout_p, keep, **cfg, num_warps=nw, num_stages=2)
    kernels.attention_bwd_dq[(triton.cdiv(n, blk), b * h)](*args, dq, *vd, h, n, scale * LOG2E, scale,
                                                           dropout_p, keep, **cfg, num_warps=nw, num_stages=2)
    if not bias_grad:
        return dq, dk, dv, q.new_empty((0,), dtype=torch.float32)
    tiles = triton.cdiv(n, blk) ** 2
    # enough programs to fill a GPU, but >= 4 batch rows per group so the partials stay << (b, h, n, n)
    groups = max(1, min(triton.cdiv(b, 4), triton.cdiv(1024, tiles * h)))
    rows = triton.cdiv(b, groups)
    groups = triton.cdiv(b, rows)
    partial = torch.empty(groups, h, n, n, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(n, blk), triton.cdiv(n, blk), groups * h)
    kernels.attention_bwd_dbias[grid](*args, partial, *vd, b, h, n, rows, scale * LOG2E, scale, dropout_p, keep,
                                      **cfg, num_warps=nw, num_stages=2)
    return dq, dk, dv, partial.sum(0)


@fused_attention_backward.register_fake
def _fused_attention_backward_fake(dout, q, k, v, bias, mask, lengths, seed, out, lse, causal, scale, dropout_p,
                                   block, bias_grad):
    h, n = q.shape[1], q.shape[2]
    db = q.new_empty((h, n, n) if bias_grad else (0,), dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), db


def _setup_context(ctx, inputs, output):
    q, k, v, bias, mask, lengths, seed, causal, scale, dropout_p, block = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, bias, mask, lengths, seed, out, lse)
    ctx.config = (causal, scale, dropout_p, block)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, bias, mask, lengths, seed, out, lse = ctx.saved_tensors
    causal, scale, dropout_p, block = ctx.config
    bias_grad = bias is not None and ctx.needs_input_grad[3]
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    dq, dk, dv, db = fused_attention_backward(dout, q, k, v, bias, mask, lengths, seed, out, lse,
                                              causal, scale, dropout_p, block, bias_grad)
    dbias = db.to(bias.dtype) if bias_grad else None
    return dq, dk, dv, dbias, None, None, None, None, None, None, None


fused_attention.register_autograd(_backward, setup_context=_setup_context)


def dropout_keep_mask(seed: Tensor, b: int, h: int, n: int, dropout_p: float) -> Tensor:
    """The kernels' dropout keep pattern for ``seed`` as a ``(b, h, n, n)`` bool tensor (for tests)."""
    out = torch.empty(b, h, n, n, device=seed.device, dtype=torch.uint8)
    blk = 32
    kernels.dropout_keep[(triton.cdiv(n, blk), triton.cdiv(n, blk), b * h)](seed, out, n, dropout_p, BLOCK=blk)
    return out.bool()
