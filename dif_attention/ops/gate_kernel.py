"""Triton kernel for the paper-exact gate energies (``GateFusion(max_len=L)``).

The energy of one source is a row-MLP on its raw, *unmasked* score row::

    S      = q @ k^T                                   (b|1, h, n, n)   never stored
    energy = relu(S @ W1^T + b1) @ w2 + b2             (b|1, h, n)      the only output

    q, k : (b|1, h, n, E) contiguous;  W1 : (n, n);  b1 : (n,);  w2 : (n,);  b2 : (1,)

Grid (cdiv(n, BLOCK_M), (b|1)*h). Hidden units are processed in chunks of ``BLOCK_H`` and keys in
chunks of ``BLOCK_N``, so any ``n`` fits in registers (the score tile is recomputed per hidden chunk;
at recommendation lengths there is a single chunk).
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
            hidden += tl.dot(s, tl.trans(w1), input_precision="ieee")
        b1 = tl.load(B1 + offs_c, mask=offs_c < N, other=0.0).to(tl.float32)
        w2 = tl.load(W2 + offs_c, mask=offs_c < N, other=0.0).to(tl.float32)
        hidden = tl.maximum(hidden + b1[None, :], 0.0)
        energy += tl.sum(hidden * w2[None, :], axis=1)
    energy += tl.load(B2).to(tl.float32)
    tl.store(Out + bh * N + offs_m, energy, mask=offs_m < N)
