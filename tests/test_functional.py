"""The functional core: the oracle against hand-written loops, the fast path against the oracle."""
import math

import pytest
import torch

from dif_attention import DIFError, decoupled_attention, reference_attention
from helpers import FUSIONS, MASKS, make_fusion, make_inputs, make_mask


def loop_attention(qs, ks, v, allowed, scale):
    """Add fusion, written with explicit loops over batch, head, query, key and source."""
    b, h, n, ev = v.shape
    out = torch.zeros(b, h, n, ev, dtype=v.dtype)
    for bi in range(b):
        for hi in range(h):
            for i in range(n):
                logits = []
                for j in range(n):
                    s = 0.0
                    for q, k in zip(qs, ks):
                        qb, kb = q[min(bi, q.shape[0] - 1)], k[min(bi, k.shape[0] - 1)]
                        s = s + float(qb[hi, i] @ kb[hi, j])
                    ok = allowed is None or bool(allowed.expand(b, h, n, n)[bi, hi, i, j])
                    logits.append(s * scale if ok else -math.inf)
                if all(l == -math.inf for l in logits):
                    continue
                m = max(logits)
                w = [math.exp(l - m) for l in logits]
                z = sum(w)
                for j in range(n):
                    out[bi, hi, i] += w[j] / z * v[bi, hi, j]
    return out


@pytest.mark.parametrize("mask_name", MASKS)
def test_oracle_matches_loops(mask_name):
    qs, ks, v = make_inputs(n=6, dtype=torch.float64, requires_grad=False)
    mask, causal = make_mask(mask_name, 2, 6)
    allowed = mask
    if causal:
        c = torch.ones(6, 6, dtype=torch.bool).tril()
        allowed = c if mask is None else mask & c
    want = loop_attention(qs, ks, v, allowed, 1 / math.sqrt(8))
    got, _ = reference_attention(qs, ks, v, mask=mask, is_causal=causal)
    torch.testing.assert_close(got, want)


def _loop_fused_scores(scores, fusion, n):
    """Hand-written fusions of per-source score rows, independent of the fusion modules' code paths."""
    b, h = max(s.shape[0] for s in scores), scores[0].shape[1]
    S = len(scores)
    sc = [s.expand(b, h, n, n) for s in scores]
    out = torch.zeros(b, h, n, n, dtype=scores[0].dtype)
    for bi in range(b):
        for hi in range(h):
            for i in range(n):
                rows = [sc[s][bi, hi, i] for s in range(S)]
                if fusion.max_len is not None and hasattr(fusion, "proj"):  # paper concat
                    out[bi, hi, i] = fusion.proj.weight @ torch.cat(rows) + fusion.proj.bias
                elif fusion.max_len is not None:  # paper gate
                    lin1, lin2 = fusion.mlp[0], fusion.mlp[2]
                    e = torch.stack([lin2(torch.relu(lin1(r)))[0] for r in rows])
                    g = torch.softmax(e, 0)
                    out[bi, hi, i] = sum(g[s] * rows[s] for s in range(S))
                else:  # default concat: weighted sum
                    out[bi, hi, i] = sum(fusion.weight[s] * rows[s] for s in range(S))
    return out


@pytest.mark.parametrize("name", ["concat", "concat-L", "gate-L"])
def test_fusion_combine_matches_loops(name):
    n = 5
    qs, ks, v = make_inputs(n=n, dtype=torch.float64, requires_grad=False)
    fusion = make_fusion(name, n, len(qs), dtype=torch.float64)
    scores = [q @ k.transpose(-1, -2) for q, k in zip(qs, ks)]
    with torch.no_grad():
        torch.testing.assert_close(fusion.combine(scores, None), _loop_fused_scores(scores, fusion, n))


def test_default_gate_uses_masked_row_means():
    n = 6
    qs, ks, v = make_inputs(n=n, dtype=torch.float64, requires_grad=False)
    fusion = make_fusion("gate", n, len(qs), dtype=torch.float64)
    allowed = torch.ones(n, n, dtype=torch.bool).tril()
    scores = [(q @ k.transpose(-1, -2)).expand(2, -1, -1, -1) for q, k in zip(qs, ks)]
    with torch.no_grad():
        got = fusion.combine(scores, allowed)
        for bi in range(2):
            for i in range(n):
                means = torch.stack([s[bi, :, i, : i + 1].mean(-1) for s in scores], -1)  # (h, S)
                e = fusion.mlp(means.unsqueeze(-1)).squeeze(-1) + fusion.source_bias
                g = e.softmax(-1)
                want = sum(g[:, s, None] * scores[s][bi, :, i] for s in range(len(scores)))
                torch.testing.assert_close(got[bi, :, i], want)
        # and the fast-path twin computes the same gates without score matrices
        torch.testing.assert_close(fusion.combine(scores, allowed), sum(
            fusion.gates(qs, ks, allowed)[..., s:s + 1] * scores[s] for s in range(len(scores))))


def _grads(out, tensors, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, tensors, g, allow_unused=True)


FAST = ["sdpa", "math"]


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 7, 50, 97])
@pytest.mark.parametrize("mask_name", MASKS)
@pytest.mark.parametrize("fusion_name", FUSIONS)
def test_fast_path_matches_oracle(fusion_name, mask_name, n, dtype, backend):
    qs, ks, v = make_inputs(n=n, widths=(8, 8, 4, 12), ev=6, dtype=dtype, seed=n)
    fusion = make_fusion(fusion_name, n, len(qs), dtype=dtype)
    mask, causal = make_mask(mask_name, 2, n, seed=n)
    kw = dict(mask=mask, is_causal=causal, fusion=fusion)
    params = [] if isinstance(fusion, str) else list(fusion.parameters())
    inputs = qs + ks + [v] + params
    ref = decoupled_attention(qs, ks, v, backend="torch", **kw)
    fast = decoupled_attention(qs, ks, v, backend=backend, **kw)
    tol = dict(atol=2e-5, rtol=2e-4) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(fast, ref, **tol)
    assert torch.isfinite(fast).all()
    for a, b in zip(_grads(ref, inputs), _grads(fast, inputs)):
        if a is None:
            assert b is None or not b.abs().max() > 0
            continue
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, **tol)


@pytest.mark.parametrize("fusion_name", FUSIONS)
@pytest.mark.parametrize("backend", ["torch"] + FAST)
def test_gradcheck_float64(fusion_name, backend):
    n = 4
    qs, ks, v = make_inputs(b=2, h=1, n=n, widths=(3, 3, 2), ev=2, dtype=torch.float64, seed=3)
    fusion = make_fusion(fusion_name, n, len(qs), dtype=torch.float64)
    mask, causal = make_mask("causal+padding", 2, n, seed=5)

    def f(*t):
        return decoupled_attention(list(t[:3]), list(t[3:6]), t[6], mask=mask, is_causal=causal, fusion=fusion,
                                   backend=backend)

    assert torch.autograd.gradcheck(f, (*qs, *ks, v))


def test_scale_is_item_head_width_and_applied_after_fusion():
    qs, ks, v = make_inputs(n=5, widths=(16, 4), ev=3, dtype=torch.float64, shared=())
    want = decoupled_attention(qs, ks, v, scale=0.25, backend="torch")
    for backend in ["torch"] + FAST:
        torch.testing.assert_close(decoupled_attention(qs, ks, v, backend=backend), want)  # 1/sqrt(16)
    # the same as one softmax over the summed, then scaled, score matrices
    s = sum(q @ k.transpose(-1, -2) for q, k in zip(qs, ks))
    torch.testing.assert_close(want, (s * 0.25).softmax(-1) @ v)


def test_fully_masked_rows_are_zero_with_finite_gradients():
    qs, ks, v = make_inputs(n=7, dtype=torch.float64)
    mask = torch.ones(2, 1, 7, 7, dtype=torch.bool)
    mask[0, :, 2] = False  # query row 2 of sample 0 sees nothing
    for backend in ["torch"] + FAST:
        for fusion_name in FUSIONS:
            fusion = make_fusion(fusion_name, 7, len(qs), dtype=torch.float64)
            out = decoupled_attention(qs, ks, v, mask=mask, fusion=fusion, backend=backend)
            assert torch.isfinite(out).all()
            assert out[0, :, 2].abs().max() == 0
            for g in _grads(out, qs + ks + [v]):
                assert g is None or torch.isfinite(g).all()


def test_dropout_is_applied_and_unbiased():
    qs, ks, v = make_inputs(b=64, h=2, n=9, dtype=torch.float64, requires_grad=False)
    clean = decoupled_attention(qs, ks, v, backend="sdpa")
    for backend in ["torch"] + FAST:
        torch.manual_seed(0)
        outs = torch.stack([decoupled_attention(qs, ks, v, dropout_p=0.3, backend=backend) for _ in range(200)])
        assert not torch.allclose(outs[0], clean)
        # inverted dropout keeps the expectation: the mean over 200 draws approaches the clean output
        err = (outs.mean(0) - clean).abs().mean() / clean.abs().mean()
        assert err < 0.05, (backend, float(err))


def test_batch_independent_source_equals_expanded():
    qs, ks, v = make_inputs(n=9, dtype=torch.float64, shared=(1,))
    qe = [q.expand(2, -1, -1, -1) for q in qs]
    ke = [k.expand(2, -1, -1, -1) for k in ks]
    mask, causal = make_mask("causal+padding", 2, 9)
    for backend in ["torch"] + FAST:
        a = decoupled_attention(qs, ks, v, mask=mask, is_causal=causal, backend=backend)
        b = decoupled_attention(qe, ke, v, mask=mask, is_causal=causal, backend=backend)
        torch.testing.assert_close(a, b)


def test_functional_gate_and_concat_by_name_need_a_module():
    qs, ks, v = make_inputs(n=4)
    for name in ("gate", "concat"):
        with pytest.raises(DIFError, match="fusion"):
            decoupled_attention(qs, ks, v, fusion=name)


def _poison(qs, ks, v, allowed, value):
    """``value`` (NaN or inf) at every position the mask makes irrelevant: keys/values no query may attend and
    queries with no allowed key (batch-independent sources are left alone: no per-batch mask can void them)."""
    b = v.shape[0]
    a = allowed.expand(b, -1, -1, -1)
    key_dead = ~a.any(-2)[..., None]  # (b, h|1, n, 1)
    row_dead = ~a.any(-1, keepdim=True)

    def fill(t, dead):
        if t.shape[0] != b:
            return t.detach().clone().requires_grad_()
        return t.detach().masked_fill(dead, value).requires_grad_()

    return [fill(q, row_dead) for q in qs], [fill(k, key_dead) for k in ks], fill(v, key_dead)


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
@pytest.mark.parametrize("backend", ["torch", "sdpa", "math", "auto"])
@pytest.mark.parametrize("fusion_name", FUSIONS)
@pytest.mark.parametrize("n", [1, 7, 50])
def test_poisoned_masked_positions_never_leak(n, fusion_name, backend, poison):
    """NaN / inf wherever the mask forbids attending (padded keys, fully masked query rows): every backend gives
    the oracle's output on clean inputs, with finite gradients (flash-attn's padding-poisoning test)."""
    qs, ks, v = make_inputs(n=n, widths=(8, 8, 4), ev=6, dtype=torch.float64, seed=n)
    fusion = make_fusion(fusion_name, n, len(qs), dtype=torch.float64)
    mask, _ = make_mask("left-padded-causal", 2, n, seed=n + 1)  # padded keys and fully masked query rows
    bad_q, bad_k, bad_v = _poison(qs, ks, v, mask, poison)
    want = decoupled_attention(qs, ks, v, mask=mask, fusion=fusion, backend="torch")
    got = decoupled_attention(bad_q, bad_k, bad_v, mask=mask, fusion=fusion, backend=backend)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)
    grads = _grads(got, bad_q + bad_k + [bad_v])
    assert all(g is None or torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backend", ["torch", "sdpa", "math"])
def test_float16_scores_beyond_65504_do_not_overflow(backend):
    """q . k = 2 * 200**2 * 8 > 65504: every backend forms fp16 scores in fp32 and agrees with the fp32 oracle."""
    g = torch.Generator().manual_seed(0)
    q = (200 + torch.rand(2, 2, 5, 8, generator=g)).half()
    k = (200 + torch.rand(2, 2, 5, 8, generator=g)).half()
    v = torch.randn(2, 2, 5, 8, generator=g).half()
    assert float((q.float() @ k.float().transpose(-1, -2)).max()) > 65504
    want = decoupled_attention([q.float()], [k.float()], v.float(), is_causal=True, scale=1e-3, backend="torch")
    got = decoupled_attention([q], [k], v, is_causal=True, scale=1e-3, backend=backend)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


def test_scale_must_keep_the_scaled_scores_finite():
    qs, ks, v = make_inputs(n=4)
    for bad in (1e38, float("inf"), float("nan"), 0.0, -1.0, True, "2"):
        with pytest.raises(DIFError, match=r"^scale: expected a positive float <= 10000"):
            decoupled_attention(qs, ks, v, scale=bad)
    assert torch.isfinite(decoupled_attention(qs, ks, v, scale=1e4)).all()
