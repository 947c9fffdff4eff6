"""Triton kernels of the fused decoupled attention (forward and FA2-style backward, no atomics).

Every kernel sees the fusion already folded into one attention (``reference/kernels.md`` section 0)::

    q      : (b, h, n, E)    concatenated per-source queries (gates already folded in), contiguous
    k      : (b, h, n, E)    concatenated per-source keys, contiguous
    v      : (b, h, n, EV)   item values, any strides with a unit last one (the (b, n, h, e) layout of a
                             head split needs no copy); EV may differ from E; dv and out share v's layout
    bias   : (h, n, n)       optional batch-independent raw-score table (the position stream)
    mask   : (b|1, h|1, n|1, n) uint8 view of a bool mask, broadcast by zero strides
    lengths: (b,) int32      optional: positions >= lengths[b] are padding (masked as keys and as queries)
    out    : (b, h, n, EV)
    lse    : (b, h, n) fp32  row log2-sum-exp of the logits (+inf for rows with no allowed key)

    logits = scale * (q @ k^T + bias), masked to -inf;  P = softmax(logits);  out = dropout(P) @ v

Widths are padded to powers of two (``BE``, ``BEV``) with masked loads; any ``n`` works (masked
boundary tiles). Softmax runs in base 2 (``qk_scale = scale * log2(e)``).

NaN safety: a query row (key column) that is masked for every entry of the tile being processed is
never loaded, so NaN/inf stored at masked padding positions cannot reach the arithmetic.

Dropout: Philox ``tl.rand(seed, ((b*h + head) * n + i) * n + j)`` -- the keep pattern depends only on
(seed, b, h, n), not on the tile sizes, and the backward regenerates it.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rows(bh, H, sb, sh, sn, offs):
    """Element offsets of rows ``offs`` of head ``bh`` in a (b, h, n, e) tensor with strides (sb, sh, sn, 1)."""
    return (bh // H) * sb + (bh % H) * sh + offs.to(tl.int64) * sn


@triton.jit
def _allowed(offs_m, offs_n, N, bh, H, Len, M, smb, smh, smi, smj,
             CAUSAL: tl.constexpr, HAS_LEN: tl.constexpr, HAS_MASK: tl.constexpr):
    """(BLOCK_M, BLOCK_N) bool: query i may attend key j (and both are inside 0..n-1)."""
    ok = (offs_m[:, None] < N) & (offs_n[None, :] < N)
    if CAUSAL:
        ok = ok & (offs_n[None, :] <= offs_m[:, None])
    if HAS_LEN:
        ln = tl.load(Len + bh // H)
        ok = ok & (offs_m[:, None] < ln) & (offs_n[None, :] < ln)
    if HAS_MASK:
        ptr = M + (bh // H) * smb + (bh % H) * smh + offs_m[:, None] * smi + offs_n[None, :] * smj
        ok = ok & (tl.load(ptr, mask=ok, other=0) != 0)
    return ok


@triton.jit
def _logits(q, k, Bias, bh, H, N, offs_m, offs_n, qk_scale, HAS_BIAS: tl.constexpr, PREC: tl.constexpr):
    """(BLOCK_M, BLOCK_N) fp32 logits in base-2 units, before masking."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC)
    if HAS_BIAS:
        ptr = Bias + (bh % H) * N * N + offs_m[:, None] * N + offs_n[None, :]
        s += tl.load(ptr, mask=(offs_m[:, None] < N) & (offs_n[None, :] < N), other=0.0).to(tl.float32)
    return s * qk_scale


@triton.jit
def _keep(seed, bh, N, offs_m, offs_n, p_drop):
    """(BLOCK_M, BLOCK_N) bool: the dropout keep pattern (depends only on seed, bh, i, j, n)."""
    off = (bh * N + offs_m[:, None].to(tl.int64)) * N + offs_n[None, :].to(tl.int64)
    return tl.rand(seed, off) >= p_drop


@triton.jit
def attention_fwd(Q, K, V, Bias, M, Len, Seed, O, Lse,
                  smb, smh, smi, smj, svb, svh, svn, sob, soh, son, H, N, qk_scale, p_drop, inv_keep,
                  E, EV, BE: tl.constexpr, BEV: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                  HAS_LEN: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr):
    """Grid (cdiv(n, BLOCK_M), b*h): one query tile streams the key/value tiles (online softmax)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BE)
    offs_ev = tl.arange(0, BEV)
    q_ptr = Q + bh * N * E + offs_m[:, None] * E + offs_e[None, :]
    q = tl.load(q_ptr, mask=(offs_m[:, None] < N) & (offs_e[None, :] < E), other=0.0)
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)
    hi = N
    if CAUSAL:
        hi = tl.minimum(hi, (pid_m + 1) * BLOCK_M)
    if HAS_LEN:
        hi = tl.minimum(hi, tl.load(Len + bh // H))
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BEV], tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        ok = _allowed(offs_m, offs_n, N, bh, H, Len, M, smb, smh, smi, smj, CAUSAL, HAS_LEN, HAS_MASK)
        col_ok = tl.max(ok.to(tl.int32), axis=0) > 0
        k = tl.load(K + bh * N * E + offs_n[:, None] * E + offs_e[None, :],
                    mask=col_ok[:, None] & (offs_e[None, :] < E), other=0.0)
        v = tl.load(V + _rows(bh, H, svb, svh, svn, offs_n)[:, None] + offs_ev[None, :],
                    mask=col_ok[:, None] & (offs_ev[None, :] < EV), other=0.0)
        s = _logits(q, k, Bias, bh, H, N, offs_m, offs_n, qk_scale, HAS_BIAS, PREC)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing allowed yet
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DROPOUT:
            p = tl.where(_keep(seed, bh, N, offs_m, offs_n, p_drop), p * inv_keep, 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log2(l_safe))
    tl.store(O + _rows(bh, H, sob, soh, son, offs_m)[:, None] + offs_ev[None, :], out.to(O.dtype.element_ty),
             mask=(offs_m[:, None] < N) & (offs_ev[None, :] < EV))
    tl.store(Lse + bh * N + offs_m, lse, mask=offs_m < N)


@triton.jit
def attention_bwd_delta(O, DO, Delta, sob, soh, son, sdb, sdh, sdn, H, N, EV, BEV: tl.constexpr,
                        BLOCK_M: tl.constexpr):
    """delta = rowsum(out * d_out): (b, h, n) fp32. Grid (cdiv(n, BLOCK_M), b*h)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_ev = tl.arange(0, BEV)
    msk = (offs_m[:, None] < N) & (offs_ev[None, :] < EV)
    o = tl.load(O + _rows(bh, H, sob, soh, son, offs_m)[:, None] + offs_ev[None, :], mask=msk,
                other=0.0).to(tl.float32)
    do = tl.load(DO + _rows(bh, H, sdb, sdh, sdn, offs_m)[:, None] + offs_ev[None, :], mask=msk,
                 other=0.0).to(tl.float32)
    tl.store(Delta + bh * N + offs_m, tl.sum(o * do, axis=1), mask=offs_m < N)


@triton.jit
def _dlogits(q, k, v, do, lse, delta, ok, Bias, bh, H, N, offs_m, offs_n, qk_scale, seed, p_drop, inv_keep,
             HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr):
    """Recompute one tile: returns (P after dropout, dS = d loss / d logits), both (BLOCK_M, BLOCK_N) fp32."""
    s = _logits(q, k, Bias, bh, H, N, offs_m, offs_n, qk_scale, HAS_BIAS, PREC)
    p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    if DROPOUT:
        keep = _keep(seed, bh, N, offs_m, offs_n, p_drop)
        pd = tl.where(keep, p * inv_keep, 0.0)
        dp = tl.where(keep, dp * inv_keep, 0.0)
    else:
        pd = p
    ds = tl.where(ok, p * (dp - delta[:, None]), 0.0)
    return pd, ds


@triton.jit
def attention_bwd_dkdv(Q, K, V, Bias, M, Len, Seed, DO, Lse, Delta, DK, DV,
                       smb, smh, smi, smj, svb, svh, svn, sdb, sdh, sdn, H, N, qk_scale, scale, p_drop, inv_keep,
                       E, EV, BE: tl.constexpr, BEV: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                       HAS_BIAS: tl.constexpr, HAS_LEN: tl.constexpr, HAS_MASK: tl.constexpr,
                       DROPOUT: tl.constexpr, PREC: tl.constexpr):
    """Grid (cdiv(n, BLOCK_N), b*h): one key tile accumulates dK, dV over the query tiles."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BE)
    offs_ev = tl.arange(0, BEV)
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)
    lo = 0
    if CAUSAL:
        lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
    hi = N
    if HAS_LEN:
        hi = tl.minimum(hi, tl.load(Len + bh // H))
    dk = tl.zeros([BLOCK_N, BE], tl.float32)
    dv = tl.zeros([BLOCK_N, BEV], tl.float32)
    k = tl.load(K + bh * N * E + offs_n[:, None] * E + offs_e[None, :],
                mask=(offs_n[:, None] < N) & (offs_e[None, :] < E), other=0.0)
    v = tl.load(V + _rows(bh, H, svb, svh, svn, offs_n)[:, None] + offs_ev[None, :],
                mask=(offs_n[:, None] < N) & (offs_ev[None, :] < EV), other=0.0)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        ok = _allowed(offs_m, offs_n, N, bh, H, Len, M, smb, smh, smi, smj, CAUSAL, HAS_LEN, HAS_MASK)
        row_ok = tl.max(ok.to(tl.int32), axis=1) > 0
        q = tl.load(Q + bh * N * E + offs_m[:, None] * E + offs_e[None, :],
                    mask=row_ok[:, None] & (offs_e[None, :] < E), other=0.0)
        do = tl.load(DO + _rows(bh, H, sdb, sdh, sdn, offs_m)[:, None] + offs_ev[None, :],
                     mask=row_ok[:, None] & (offs_ev[None, :] < EV), other=0.0)
        lse = tl.load(Lse + bh * N + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(Delta + bh * N + offs_m, mask=row_ok, other=0.0)
        pd, ds = _dlogits(q, k, v, do, lse, delta, ok, Bias, bh, H, N, offs_m, offs_n, qk_scale, seed, p_drop,
                          inv_keep, HAS_BIAS, DROPOUT, PREC)
        dv += tl.dot(tl.trans(pd.to(do.dtype)), do, input_precision=PREC)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
    tl.store(DK + bh * N * E + offs_n[:, None] * E + offs_e[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=(offs_n[:, None] < N) & (offs_e[None, :] < E))
    tl.store(DV + _rows(bh, H, svb, svh, svn, offs_n)[:, None] + offs_ev[None, :], dv.to(DV.dtype.element_ty),
             mask=(offs_n[:, None] < N) & (offs_ev[None, :] < EV))


@triton.jit
def attention_bwd_dq(Q, K, V, Bias, M, Len, Seed, DO, Lse, Delta, DQ,
                     smb, smh, smi, smj, svb, svh, svn, sdb, sdh, sdn, H, N, qk_scale, scale, p_drop, inv_keep,
                     E, EV, BE: tl.constexpr, BEV: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                     HAS_BIAS: tl.constexpr, HAS_LEN: tl.constexpr, HAS_MASK: tl.constexpr,
                     DROPOUT: tl.constexpr, PREC: tl.constexpr):
    """Grid (cdiv(n, BLOCK_M), b*h): one query tile accumulates dQ over the key tiles."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BE)
    offs_ev = tl.arange(0, BEV)
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)
    hi = N
    if CAUSAL:
        hi = tl.minimum(hi, (pid_m + 1) * BLOCK_M)
    if HAS_LEN:
        hi = tl.minimum(hi, tl.load(Len + bh // H))
    q = tl.load(Q + bh * N * E + offs_m[:, None] * E + offs_e[None, :],
                mask=(offs_m[:, None] < N) & (offs_e[None, :] < E), other=0.0)
    do = tl.load(DO + _rows(bh, H, sdb, sdh, sdn, offs_m)[:, None] + offs_ev[None, :],
                 mask=(offs_m[:, None] < N) & (offs_ev[None, :] < EV), other=0.0)
    lse = tl.load(Lse + bh * N + offs_m, mask=offs_m < N, other=float("inf"))
    delta = tl.load(Delta + bh * N + offs_m, mask=offs_m < N, other=0.0)
    dq = tl.zeros([BLOCK_M, BE], tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        ok = _allowed(offs_m, offs_n, N, bh, H, Len, M, smb, smh, smi, smj, CAUSAL, HAS_LEN, HAS_MASK)
        col_ok = tl.max(ok.to(tl.int32), axis=0) > 0
        k = tl.load(K + bh * N * E + offs_n[:, None] * E + offs_e[None, :],
                    mask=col_ok[:, None] & (offs_e[None, :] < E), other=0.0)
        v = tl.load(V + _rows(bh, H, svb, svh, svn, offs_n)[:, None] + offs_ev[None, :],
                    mask=col_ok[:, None] & (offs_ev[None, :] < EV), other=0.0)
        pd, ds = _dlogits(q, k, v, do, lse, delta, ok, Bias, bh, H, N, offs_m, offs_n, qk_scale, seed, p_drop,
                          inv_keep, HAS_BIAS, DROPOUT, PREC)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    tl.store(DQ + bh * N * E + offs_m[:, None] * E + offs_e[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=(offs_m[:, None] < N) & (offs_e[None, :] < E))


@triton.jit
def attention_bwd_dbias(Q, K, V, Bias, M, Len, Seed, DO, Lse, Delta, DBias,
                        smb, smh, smi, smj, svb, svh, svn, sdb, sdh, sdn, B, H, N, rows_per_group, qk_scale, scale,
                        p_drop, inv_keep,
                        E, EV, BE: tl.constexpr, BEV: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                        HAS_BIAS: tl.constexpr, HAS_LEN: tl.constexpr, HAS_MASK: tl.constexpr,
                        DROPOUT: tl.constexpr, PREC: tl.constexpr):
    """Gradient of the shared (h, n, n) table, summed over a group of batch rows without atomics.

    Grid (cdiv(n, BLOCK_M), cdiv(n, BLOCK_N), groups*h); writes ``DBias[group, head]`` (fp32); the
    caller sums the groups.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2) // H
    head = tl.program_id(2) % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BE)
    offs_ev = tl.arange(0, BEV)
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    b_lo = g.to(tl.int64) * rows_per_group
    rows = rows_per_group
    if CAUSAL:  # tiles strictly above the diagonal have no allowed entry
        rows = tl.where(pid_n * BLOCK_N > pid_m * BLOCK_M + BLOCK_M - 1, 0, rows)
    for r in range(0, rows):
        bi = b_lo + r
        bh = tl.minimum(bi, B - 1) * H + head
        ok = _allowed(offs_m, offs_n, N, bh, H, Len, M, smb, smh, smi, smj, CAUSAL, HAS_LEN, HAS_MASK)
        ok = ok & (bi < B)
        row_ok = tl.max(ok.to(tl.int32), axis=1) > 0
        col_ok = tl.max(ok.to(tl.int32), axis=0) > 0
        q = tl.load(Q + bh * N * E + offs_m[:, None] * E + offs_e[None, :],
                    mask=row_ok[:, None] & (offs_e[None, :] < E), other=0.0)
        do = tl.load(DO + _rows(bh, H, sdb, sdh, sdn, offs_m)[:, None] + offs_ev[None, :],
                     mask=row_ok[:, None] & (offs_ev[None, :] < EV), other=0.0)
        lse = tl.load(Lse + bh * N + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(Delta + bh * N + offs_m, mask=row_ok, other=0.0)
        k = tl.load(K + bh * N * E + offs_n[:, None] * E + offs_e[None, :],
                    mask=col_ok[:, None] & (offs_e[None, :] < E), other=0.0)
        v = tl.load(V + _rows(bh, H, svb, svh, svn, offs_n)[:, None] + offs_ev[None, :],
                    mask=col_ok[:, None] & (offs_ev[None, :] < EV), other=0.0)
        pd, ds = _dlogits(q, k, v, do, lse, delta, ok, Bias, bh, H, N, offs_m, offs_n, qk_scale, seed,
                          p_drop, inv_keep, HAS_BIAS, DROPOUT, PREC)
        acc += ds
    ptr = DBias + (g.to(tl.int64) * H + head) * N * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(ptr, acc * scale, mask=(offs_m[:, None] < N) & (offs_n[None, :] < N))


@triton.jit
def dropout_keep(Seed, Out, N, p_drop, BLOCK: tl.constexpr):
    """The keep pattern of the attention kernels as a (b, h, n, n) uint8 tensor (for tests/inspection).
    Grid (cdiv(n, BLOCK), cdiv(n, BLOCK), b*h)."""
    bh = tl.program_id(2).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    keep = _keep(tl.load(Seed), bh, N, offs_m, offs_n, p_drop)
    tl.store(Out + (bh * N + offs_m[:, None]) * N + offs_n[None, :], keep.to(tl.uint8),
             mask=(offs_m[:, None] < N) & (offs_n[None, :] < N))
