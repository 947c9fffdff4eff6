"""The functional core: the oracle against hand-written loops, the fast path against the oracle."""
import copy
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dif_attention import (ConcatFusion, DIFError, GateFusion, causal_mask, decoupled_attention, lengths_mask,
                           reference_attention)
from helpers import FUSIONS, MASKS, make_fusion, make_inputs, make_mask
from precision import RATIO, assert_within, max_err


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


def _poison(qs, ks, v, allowed, value, *, keys=True):
    """``value`` (NaN or inf) at every position the mask makes irrelevant: keys/values no query may attend and
    queries with no allowed key (batch-independent sources are left alone: no per-batch mask can void them).
    ``keys=False`` leaves the keys clean: the paper-exact fusions read every key of a row, as the reference."""
    b = v.shape[0]
    a = allowed.expand(b, -1, -1, -1)
    key_dead = ~a.any(-2)[..., None]  # (b, h|1, n, 1)
    row_dead = ~a.any(-1, keepdim=True)

    def fill(t, dead):
        if t.shape[0] != b:
            return t.detach().clone().requires_grad_()
        return t.detach().masked_fill(dead, value).requires_grad_()

    bad_keys = [fill(k, key_dead) for k in ks] if keys else [k.detach().clone().requires_grad_() for k in ks]
    return [fill(q, row_dead) for q in qs], bad_keys, fill(v, key_dead)


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
@pytest.mark.parametrize("backend", ["torch", "sdpa", "math", "auto"])
@pytest.mark.parametrize("fusion_name", FUSIONS)
@pytest.mark.parametrize("n", [1, 7, 50])
def test_poisoned_masked_positions_never_leak(n, fusion_name, backend, poison):
    """NaN / inf wherever the mask forbids attending (padded keys, fully masked query rows): every backend gives
    the oracle's output on clean inputs, with finite gradients (flash-attn's padding-poisoning test). The
    paper-exact fusions (``-L``) read every key of a row, so only their values and queries are poisoned."""
    qs, ks, v = make_inputs(n=n, widths=(8, 8, 4), ev=6, dtype=torch.float64, seed=n)
    fusion = make_fusion(fusion_name, n, len(qs), dtype=torch.float64)
    mask, _ = make_mask("left-padded-causal", 2, n, seed=n + 1)  # padded keys and fully masked query rows
    bad_q, bad_k, bad_v = _poison(qs, ks, v, mask, poison, keys=not fusion_name.endswith("-L"))
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


# ---------------------------------------------------------------------------------------------- fewer queries
def _last_rows(mask, n_q):
    """The rows of a mask for the last ``n_q`` queries (masks without a query dim are kept)."""
    if mask is None or mask.ndim < 2 or mask.shape[-2] == 1:
        return mask
    return mask[..., -n_q:, :]


@pytest.mark.parametrize("backend", ["torch"] + FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 7, 50, 97])
@pytest.mark.parametrize("mask_name", MASKS)
@pytest.mark.parametrize("fusion_name", ["add", "concat", "gate"])
def test_fewer_queries_equal_the_last_rows(fusion_name, mask_name, n, dtype, backend):
    """Queries for the last n_q of n_k positions (new positions over cached keys): the last rows of the full
    computation by the oracle, values and gradients (of queries, keys, value and the fusion's parameters)."""
    n_q = n // 3 + 1
    qs, ks, v = make_inputs(n=n, widths=(8, 8, 4, 12), ev=6, dtype=dtype, seed=n)
    fusion = make_fusion(fusion_name, n, len(qs), dtype=dtype)
    mask, causal = make_mask(mask_name, 2, n, seed=n)
    params = [] if isinstance(fusion, str) else list(fusion.parameters())
    inputs = qs + ks + [v] + params
    full = decoupled_attention(qs, ks, v, mask=mask, is_causal=causal, fusion=fusion, backend="torch")[..., -n_q:, :]
    part = decoupled_attention([q[..., -n_q:, :] for q in qs], ks, v, mask=_last_rows(mask, n_q), is_causal=causal,
                               fusion=fusion, backend=backend)
    tol = dict(atol=2e-5, rtol=2e-4) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-9)
    assert part.shape == (2, 2, n_q, 6)
    torch.testing.assert_close(part, full, **tol)
    for a, b in zip(_grads(full, inputs), _grads(part, inputs)):
        if a is None:
            assert b is None or not b.abs().max() > 0
            continue
        assert b is not None and torch.isfinite(b).all()
        torch.testing.assert_close(b, a, **tol)


def test_fewer_queries_causal_alignment_and_shared_sources():
    """``is_causal`` puts query i at key position n_k - n_q + i; a batch-independent source may have n_q query rows
    and n_k key rows; the explicit mask ``causal_mask(n_q, n_keys=n_k)`` is the same thing."""
    qs, ks, v = make_inputs(n=9, dtype=torch.float64, shared=(1,), requires_grad=False)
    part = [q[..., -4:, :] for q in qs]
    assert part[1].shape[0] == 1
    want = decoupled_attention(qs, ks, v, is_causal=True, backend="torch")[..., -4:, :]
    explicit = causal_mask(4, n_keys=9)
    assert explicit.shape == (4, 9) and explicit[0].tolist() == [True] * 6 + [False] * 3
    for backend in ["torch"] + FAST:
        torch.testing.assert_close(decoupled_attention(part, ks, v, is_causal=True, backend=backend), want)
        torch.testing.assert_close(decoupled_attention(part, ks, v, mask=explicit, backend=backend), want)
        # without the causal mask every query sees every key
        torch.testing.assert_close(decoupled_attention(part, ks, v, backend=backend),
                                   decoupled_attention(qs, ks, v, backend="torch")[..., -4:, :])
    out, maps = reference_attention(part, ks, v, is_causal=True, names=["item", "position", "a", "b"])
    torch.testing.assert_close(out, want)
    assert maps["position"].shape == (1, 2, 4, 9) and maps.probs.shape == (2, 2, 4, 9)
    assert not maps.probs[..., 0, 6:].any() and maps.probs[..., 3, :].sum(-1).allclose(torch.ones(()).double())


@pytest.mark.parametrize("fusion_name", ["concat-L", "gate-L"])
def test_fewer_queries_refused_by_the_paper_exact_fusions(fusion_name):
    qs, ks, v = make_inputs(n=6)
    fusion = make_fusion(fusion_name, 6, len(qs))
    with pytest.raises(DIFError, match=r"^queries: expected as many query rows as keys .*paper-exact.*future"):
        decoupled_attention([q[..., -2:, :] for q in qs], ks, v, is_causal=True, fusion=fusion)


def test_more_queries_than_keys_and_mismatched_keys_raise():
    qs, ks, v = make_inputs(n=6, requires_grad=False)
    with pytest.raises(DIFError, match=r"^queries\[0\]: expected at most n_k=5 query rows"):
        decoupled_attention(qs, [k[..., :5, :] for k in ks], v[..., :5, :])
    with pytest.raises(DIFError, match=r"^keys\[1\]: expected shape \(2 or 1, 2, 6, e_1\)"):
        decoupled_attention([q[..., :3, :] for q in qs], [ks[0], ks[1][..., :3, :], ks[2], ks[3]], v)
    with pytest.raises(DIFError, match=r"^queries\[2\]: expected shape \(2 or 1, 2, 3, e_2\)"):
        decoupled_attention([qs[0][..., :3, :], qs[1][..., :3, :], qs[2], qs[3][..., :3, :]], ks, v)
    with pytest.raises(DIFError, match=r"^mask: expected a shape broadcastable to \(2, 2, 3, 6\)"):
        decoupled_attention([q[..., :3, :] for q in qs], ks, v, mask=torch.ones(6, 6, dtype=torch.bool))


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
@pytest.mark.parametrize("backend", ["torch", "sdpa", "math", "auto"])
@pytest.mark.parametrize("fusion_name", ["add", "concat", "gate"])
def test_fewer_queries_poisoned_masked_positions_never_leak(fusion_name, backend, poison):
    """The irrelevant positions are zeroed for n_q < n_k too: keys no remaining query may attend, rows with no key."""
    n, n_q = 12, 5
    qs, ks, v = make_inputs(n=n, widths=(8, 8, 4), ev=6, dtype=torch.float64, seed=3)
    fusion = make_fusion(fusion_name, n, len(qs), dtype=torch.float64)
    mask, _ = make_mask("left-padded-causal", 2, n, seed=4)
    mask = mask[..., -n_q:, :]
    part = [q[..., -n_q:, :].detach() for q in qs]
    bad_q, bad_k, bad_v = _poison(part, ks, v, mask, poison)
    assert not torch.isfinite(bad_v).all()
    want = decoupled_attention(part, ks, v, mask=mask, fusion=fusion, backend="torch")
    got = decoupled_attention(bad_q, bad_k, bad_v, mask=mask, fusion=fusion, backend=backend)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)
    assert all(g is None or torch.isfinite(g).all() for g in _grads(got, bad_q + bad_k + [bad_v]))


@pytest.mark.parametrize("backend", ["torch", "sdpa", "math"])
def test_fewer_queries_float16_scores_beyond_65504(backend):
    g = torch.Generator().manual_seed(0)
    q = (200 + torch.rand(2, 2, 2, 8, generator=g)).half()
    k = (200 + torch.rand(2, 2, 5, 8, generator=g)).half()
    v = torch.randn(2, 2, 5, 8, generator=g).half()
    want = decoupled_attention([q.float()], [k.float()], v.float(), is_causal=True, scale=1e-3, backend="torch")
    got = decoupled_attention([q], [k], v, is_causal=True, scale=1e-3, backend=backend)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


def test_fewer_queries_are_reported_by_the_kernels():
    """The fused kernel takes as many queries as keys: it says so, and the dispatcher falls back (or raises under
    backend="triton")."""
    pytest.importorskip("triton", reason="triton is in the optional [triton] extra")
    from dif_attention import ops
    qs, ks, v = make_inputs(n=8, requires_grad=False)
    part = [q[..., -3:, :] for q in qs]
    assert not any("query rows" in r for r in ops.unsupported_reasons(qs, ks, v))
    assert any("3 query rows over 8 keys" in r for r in ops.unsupported_reasons(part, ks, v))
    with pytest.raises(DIFError, match=r"^backend: expected a case the Triton kernel supports.*3 query rows over 8"):
        decoupled_attention(part, ks, v, is_causal=True, backend="triton")
    torch.testing.assert_close(decoupled_attention(part, ks, v, is_causal=True),
                               decoupled_attention(qs, ks, v, is_causal=True)[..., -3:, :])


# hypothesis: random problems with fewer queries than keys against the fp64 full computation (precision.py's rule)
FEWER_EXAMPLES = max(int(os.environ.get("DIF_PROPERTY_EXAMPLES", "200")) // 4, 1)
#: gradient floors (ulps of max(1, |ref|)) of the property below: about 3x the largest need measured over 4500
#: random cases of it (fp32 130, on the fusion parameters' gradient, a sum over every score with cancellation whose
#: rounding follows the summands, not the result; fp16 12; bf16 18). Values keep precision.py's floors (largest
#: need: fp32 6, fp16 2.5, bf16 2).
GRAD_FLOOR_ULPS = {torch.float32: 400.0, torch.float16: 36.0, torch.bfloat16: 56.0}


def _grad_within(name, fast, oracle, ref, dtype):
    assert fast.shape == ref.shape and bool(torch.isfinite(fast).all()), name
    scale = max(1.0, ref.detach().abs().max().item() if ref.numel() else 0.0)
    bound = RATIO * max_err(oracle, ref) + GRAD_FLOOR_ULPS[dtype] * torch.finfo(dtype).eps * scale
    assert max_err(fast, ref) <= bound, (f"{name} ({dtype}): error {max_err(fast, ref):.3g} vs fp64 exceeds "
                                         f"{RATIO}x the oracle's {max_err(oracle, ref):.3g} + floor ({bound:.3g})")


@st.composite
def fewer_query_cases(draw):
    n_k = draw(st.integers(2, 9))
    sources = draw(st.integers(1, 4))
    return dict(
        b=draw(st.integers(1, 3)), h=draw(st.integers(1, 3)), n_k=n_k, n_q=draw(st.integers(1, n_k - 1)),
        widths=[draw(st.integers(1, 9)) for _ in range(sources)], ev=draw(st.integers(1, 9)),
        shared=[draw(st.booleans()) if draw(st.integers(0, 2)) == 0 else False for _ in range(sources)],
        mask=draw(st.sampled_from(["none", "causal", "padding", "causal+padding", "random", "random+causal"])),
        mask_shape=draw(st.sampled_from(["nn", "b1nn", "1hnn", "bhnn", "b11n"])),
        fusion=draw(st.sampled_from(["add", "concat", "gate"])),
        scale=draw(st.one_of(st.none(), st.floats(0.05, 2.0))),
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])),
        seed=draw(st.integers(0, 2 ** 31 - 1)))


def _fewer_case_inputs(case):
    """fp64 full-length problem (queries for all n_k positions; the mask over all rows) and its grad."""
    g = torch.Generator().manual_seed(case["seed"])
    b, h, n, nq = case["b"], case["h"], case["n_k"], case["n_q"]
    qs = [torch.randn(1 if s else b, h, n, e, generator=g, dtype=torch.float64)
          for e, s in zip(case["widths"], case["shared"])]
    ks = [torch.randn(1 if s else b, h, n, e, generator=g, dtype=torch.float64)
          for e, s in zip(case["widths"], case["shared"])]
    v = torch.randn(b, h, n, case["ev"], generator=g, dtype=torch.float64)
    kind, mask = case["mask"], None
    if kind in ("padding", "causal+padding"):
        mask = lengths_mask(torch.randint(1, n + 1, (b,), generator=g), n)
    elif kind.startswith("random"):
        shape = {"nn": (n, n), "b1nn": (b, 1, n, n), "1hnn": (1, h, n, n), "bhnn": (b, h, n, n),
                 "b11n": (b, 1, 1, n)}[case["mask_shape"]]
        mask = torch.rand(shape, generator=g) < 0.6
    if case["fusion"] == "add":
        fusion = "add"
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2 ** 31 - 1, (), generator=g)))
            fusion = (ConcatFusion if case["fusion"] == "concat" else GateFusion)(num_sources=len(qs)).double()
        with torch.no_grad():
            for p in fusion.parameters():
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    grad_out = torch.randn(b, h, nq, case["ev"], generator=g, dtype=torch.float64)
    return qs, ks, v, mask, case["mask"].endswith("causal"), fusion, grad_out


def _fewer_run(case, tensors, fusion, mask, is_causal, grad_out, backend, rows):
    """``backend`` on the last ``rows`` queries (or, with ``rows=None``, the full problem's last n_q rows)."""
    s, nq = len(case["widths"]), case["n_q"]
    qs, ks, v = tensors[:s], tensors[s:2 * s], tensors[2 * s]
    kw = dict(is_causal=is_causal, fusion=fusion, scale=case["scale"], backend=backend)
    if rows is None:
        out = decoupled_attention(qs, ks, v, mask=mask, **kw)[..., -nq:, :]
    else:
        out = decoupled_attention([q[..., -nq:, :] for q in qs], ks, v, mask=_last_rows(mask, nq), **kw)
    leaves = tensors + ([] if isinstance(fusion, str) else list(fusion.parameters()))
    grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    return out, [torch.zeros_like(t) if gr is None else gr for t, gr in zip(leaves, grads)]


@settings(max_examples=FEWER_EXAMPLES, deadline=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=fewer_query_cases())
def test_fewer_queries_property(case):
    """Every backend on the last n_q < n_k queries vs the fp64 full computation's last rows, within 2x the oracle's
    own error at the case's dtype plus a floor (values and every gradient); rows with no allowed key are exactly
    zero. (n_q == n_k is tests/test_properties.py's.)"""
    qs, ks, v, mask, is_causal, fusion, grad_out = _fewer_case_inputs(case)
    dtype = case["dtype"]

    def at(dt):
        tensors = [t.to(dtype).to(dt).requires_grad_() for t in (*qs, *ks, v)]
        f = fusion if isinstance(fusion, str) else copy.deepcopy(fusion).to(dtype).to(dt)
        return tensors, f, grad_out.to(dtype).to(dt)

    hi, f_hi, g_hi = at(torch.float64)
    low, f_low, g_low = at(dtype)
    ref, ref_grads = _fewer_run(case, hi, f_hi, mask, is_causal, g_hi, "torch", None)
    oracle, oracle_grads = _fewer_run(case, low, f_low, mask, is_causal, g_low, "torch", None)
    nq, nk = case["n_q"], case["n_k"]
    allowed = torch.ones(case["b"], case["h"], nq, nk, dtype=torch.bool)
    if mask is not None:
        allowed = allowed & _last_rows(mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape)), nq)
    if is_causal:
        allowed = allowed & causal_mask(nq, n_keys=nk)
    empty = ~allowed.any(-1)
    names = ["out"] + [f"d input {i}" for i in range(len(low))] + ["d fusion params"] * 8
    for backend in ["torch"] + FAST:
        out, grads = _fewer_run(case, low, f_low, mask, is_causal, g_low, backend, nq)
        assert out.dtype == dtype
        assert_within(f"[{backend}] out", out, oracle, ref, dtype)
        for name, g, o, r in zip(names[1:], grads, oracle_grads, ref_grads):
            _grad_within(f"[{backend}] {name}", g, o, r, dtype)
        assert not bool(out[empty].any()), f"[{backend}] rows with no allowed key must give exactly 0"


def test_paper_exact_fusions_see_padded_keys_as_the_reference_does():
    """Masked keys are not zeroed for the paper-exact fusions: their gates / concat map read the whole row."""
    n = 6
    qs, ks, v = make_inputs(n=n, widths=(8, 8, 4), ev=6, dtype=torch.float64, seed=0)
    keep = torch.arange(n)[None, :] >= torch.tensor([0, 3])[:, None]  # row 1: three left-padded positions
    mask = keep[:, None, None, :] & causal_mask(n)
    for name in ("gate-L", "concat-L"):
        fusion = make_fusion(name, n, len(qs), dtype=torch.float64)
        out = decoupled_attention(qs, ks, v, mask=mask, fusion=fusion, backend="torch")
        moved = [k.detach().clone() for k in ks]
        dead = ~mask.expand(2, -1, -1, -1).any(-2)[..., None]  # keys no query attends
        assert dead.any()
        moved[0] = moved[0].masked_fill(dead, 3.0)
        assert not torch.allclose(decoupled_attention(qs, moved, v, mask=mask, fusion=fusion, backend="torch"), out)
