"""Triton kernel for the paper-exact gate energies (``GateFusion(max_len=L)``).

The energy of one source is a row-MLP on its raw, *unmasked* score row::

    S      = q @ k^T                                   (b|1, h, n, n)   never stored
    energy = relu(S @ W1^T + b1) @ w2 + b2             (b|1, h, n)      the only output

    q, k : (b|1, h, n, E) contiguous;  W1 : (n, n);  b1 : (n,);  w2 : (n,);  b2 : (1,)

Forward grid (cdiv(n, BLOCK_M), (b|1)*h). Hidden units are processed in chunks of ``BLOCK_H`` and
keys in chunks of ``BLOCK_N``, so any ``n`` fits in registers (the score tile is recomputed per hidden
chunk; at recommendation lengths there is a single chunk).

Backward (``n <= 64``, a whole score row set of one (b, h) fits one tile): one program walks a group of
(b, h) rows; per row it recomputes ``S`` and the hidden pre-activations and writes ``dq``, ``dk``
directly; the weight gradients accumulate in registers and are written once per group (partial sums,
no atomics)::

    dpre = dE * w2 * (pre > 0);  dS = dpre @ W1;  dq = dS @ k;  dk = dS^T @ q
    dW1 += dpre^T @ S;  db1 += sum_i dpre;  dw2 += sum_i relu(pre) * dE
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def gate_energy(Q, K, W1, B1, W2, B2, Out, N,
                E, BE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_H: tl.constexpr, PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BE)
    q = tl.load(Q + bh * N * E + offs_m[:, None] * E + offs_e[None, :],
                mask=(offs_m[:, None] < N) & (offs_e[None, :] < E), other=0.0)
    energy = tl.zeros([BLOCK_M], tl.float32)
    for c0 in range(0, N, BLOCK_H):
        offs_c = c0 + tl.arange(0, BLOCK_H)
        hidden = tl.zeros([BLOCK_M, BLOCK_H], tl.float32)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            k = tl.load(K + bh * N * E + offs_n[:, None] * E + offs_e[None, :],
                        mask=(offs_n[:, None] < N) & (offs_e[None, :] < E), other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PREC)  # (BLOCK_M, BLOCK_N) fp32
            w1 = tl.load(W1 + offs_c[:, None] * N + offs_n[None, :],
                         mask=(offs_c[:, None] < N) & (offs_n[None, :] < N), other=0.0).to(tl.float32)
            hidden += tl.dot(s, tl.trans(w1), input_precision=PREC)
        b1 = tl.load(B1 + offs_c, mask=offs_c < N, other=0.0).to(tl.float32)
        w2 = tl.load(W2 + offs_c, mask=offs_c < N, other=0.0).to(tl.float32)
        hidden = tl.maximum(hidden + b1[None, :], 0.0)
        energy += tl.sum(hidden * w2[None, :], axis=1)
    energy += tl.load(B2).to(tl.float32)
    tl.store(Out + bh * N + offs_m, energy, mask=offs_m < N)


@triton.jit
def gate_energy_bwd(Q, K, W1, B1, W2, DE, DQ, DK, DW1, DB1, DW2, BH, N, rows_per_group,
                    E, BE: tl.constexpr, BL: tl.constexpr, PREC: tl.constexpr):
    """Grid (groups,). ``BL`` >= n (power of two); DQ, DK fp32 (bh, n, E); DW1 (groups, n, n), DB1 and
    DW2 (groups, n), fp32."""
    g = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BL)
    offs_e = tl.arange(0, BE)
    inside = offs < N
    w1 = tl.load(W1 + offs[:, None] * N + offs[None, :], mask=inside[:, None] & inside[None, :],
                 other=0.0).to(tl.float32)  # [hidden c, key l]
    b1 = tl.load(B1 + offs, mask=inside, other=0.0).to(tl.float32)
    w2 = tl.load(W2 + offs, mask=inside, other=0.0).to(tl.float32)
    dw1 = tl.zeros([BL, BL], tl.float32)
    db1 = tl.zeros([BL], tl.float32)
    dw2 = tl.zeros([BL], tl.float32)
    for r in range(0, rows_per_group):
        bh = g * rows_per_group + r
        rows_here = offs < tl.where(bh < BH, N, 0)  # all False past the last (b, h) row
        bh = tl.minimum(bh, BH - 1)
        qk_mask = rows_here[:, None] & (offs_e[None, :] < E)
        q = tl.load(Q + bh * N * E + offs[:, None] * E + offs_e[None, :], mask=qk_mask, other=0.0)
        k = tl.load(K + bh * N * E + offs[:, None] * E + offs_e[None, :], mask=qk_mask, other=0.0)
        de = tl.load(DE + bh * N + offs, mask=rows_here, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC)  # [query i, key l]
        pre = tl.dot(s, tl.trans(w1), input_precision=PREC) + b1[None, :]  # [i, hidden c]
        dpre = tl.where(pre > 0.0, de[:, None] * w2[None, :], 0.0)
        dw2 += tl.sum(tl.maximum(pre, 0.0) * de[:, None], axis=0)
        db1 += tl.sum(dpre, axis=0)
        dw1 += tl.dot(tl.trans(dpre), s, input_precision=PREC)
        ds = tl.dot(dpre, w1, input_precision=PREC)  # [i, l]
        dq = tl.dot(ds, k.to(tl.float32), input_precision=PREC)
        dk = tl.dot(tl.trans(ds), q.to(tl.float32), input_precision=PREC)
        out = bh * N * E + offs[:, None] * E + offs_e[None, :]
        tl.store(DQ + out, dq, mask=qk_mask)
        tl.store(DK + out, dk, mask=qk_mask)
    tl.store(DW1 + g * N * N + offs[:, None] * N + offs[None, :], dw1, mask=inside[:, None] & inside[None, :])
    tl.store(DB1 + g * N + offs, db1, mask=inside)
    tl.store(DW2 + g * N + offs, dw2, mask=inside)
