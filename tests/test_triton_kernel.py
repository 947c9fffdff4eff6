"""The fused Triton kernel (backend="triton") against the oracle: values and gradients.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set below before the kernels are
decorated); shapes are tiny and bf16 is skipped (the interpreter's tl.dot mishandles it). With CUDA the
same tests run compiled on the GPU, bf16 included.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before dif_attention.ops decorates its kernels
triton = pytest.importorskip("triton")

from dif_attention import DecoupledAttention, DIFError, decoupled_attention, reference_attention  # noqa: E402
from dif_attention import ops  # noqa: E402
from dif_attention.fusion import fold_sources, get_fusion  # noqa: E402
from dif_attention.masks import causal_mask, combine_masks, lengths_allowed  # noqa: E402
from helpers import make_fusion, make_inputs, make_mask  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=2e-2, rtol=2e-2),
       torch.bfloat16: dict(atol=6e-2, rtol=6e-2)}

pytestmark = pytest.mark.skipif(not ops.available(), reason="no CUDA and the kernels are not interpreted")


def _to(tensors, dtype=None):
    return [t.detach().to(DEVICE, dtype or t.dtype).requires_grad_(t.requires_grad) for t in tensors]


def _inputs(b=2, h=2, n=7, widths=(8, 8, 4), ev=6, dtype=torch.float32, seed=0):
    qs, ks, v = make_inputs(b=b, h=h, n=n, widths=widths, ev=ev, dtype=torch.float32, seed=seed)
    return _to(qs, dtype), _to(ks, dtype), _to([v], dtype)[0]


def _kernel(qs, ks, v, *, fusion="add", lengths=None, is_causal=False, mask=None, **kw):
    """The kernel on folded sources, with its own ``lengths`` argument (padding masked as keys and queries)."""
    fusion = get_fusion(fusion)
    allowed = combine_masks(mask, is_causal, v.shape[2], v.device, lengths=lengths)  # the default gate reads it
    q, k, bias = fold_sources(qs, ks, allowed, fusion, batch=v.shape[0])
    kw.setdefault("scale", qs[0].shape[-1] ** -0.5)  # the dispatcher's default: the item source's width
    return ops.attention(q, k, v, bias=bias, mask=mask, lengths=lengths, is_causal=is_causal, **kw)


def _grads(out, leaves, seed=1):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
    return torch.autograd.grad((out * w).sum(), leaves, allow_unused=True)


def _compare(qs, ks, v, fusion, tol, **kw):
    """Kernel vs oracle (oracle in fp32 for half inputs): outputs and every input/parameter gradient."""
    params = [p for p in fusion.parameters()] if isinstance(fusion, torch.nn.Module) else []
    got = decoupled_attention(qs, ks, v, fusion=fusion, backend="triton", **kw)
    g_got = _grads(got, qs + ks + [v] + params)
    f32 = fusion.float() if isinstance(fusion, torch.nn.Module) else fusion
    rq, rk, rv = _to(qs, torch.float32), _to(ks, torch.float32), _to([v], torch.float32)[0]
    want = decoupled_attention(rq, rk, rv, fusion=f32, backend="torch", **kw)
    g_want = _grads(want.to(v.dtype).float(), rq + rk + [rv] + params)
    torch.testing.assert_close(got.float(), want, **tol)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a.float(), b.float(), **tol)


@pytest.mark.parametrize("fusion_name", ["add", "concat", "concat-L", "gate", "gate-L"])
def test_every_fusion_matches_oracle(fusion_name):
    n = 7
    qs, ks, v = _inputs(n=n)
    fusion = make_fusion(fusion_name, n, num_sources=3)
    fusion = fusion.to(DEVICE) if isinstance(fusion, torch.nn.Module) else fusion
    mask, causal = make_mask("causal+padding", 2, n)
    _compare(qs, ks, v, fusion, TOL[torch.float32], mask=mask.to(DEVICE), is_causal=causal, scale=0.3)


@pytest.mark.parametrize("n", [1, 7, 50, 97])
def test_odd_lengths_multi_tile(n):
    """16-wide tiles: n=50 and 97 cross several query and key tiles, boundary tiles are partial."""
    b, h = (2, 1) if n < 97 else (1, 1)
    qs, ks, v = _inputs(b=b, h=h, n=n, widths=(24, 8), ev=5)
    lengths = torch.tensor([n, max(1, n // 3)][:b], device=DEVICE)
    allowed = lengths_allowed(lengths, n) & causal_mask(n, device=DEVICE)
    got = _kernel(qs, ks, v, lengths=lengths, is_causal=True, block=16)
    want, _ = reference_attention(qs, ks, v, mask=allowed)
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    for a, c in zip(_grads(got, qs + ks + [v]), _grads(want, qs + ks + [v])):
        torch.testing.assert_close(a, c, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes_with_shared_position_table(dtype):
    """Source 1 is batch-independent (batch dim 1): it becomes the shared (h, n, n) table with a gradient."""
    qs, ks, v = _inputs(b=5, n=20, widths=(16, 16, 4), ev=16, dtype=dtype)  # b=5: a partial batch group
    v = v.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()  # a head split's layout
    assert qs[1].shape[0] == 1 and not v.is_contiguous()
    _compare(qs, ks, v, "add", TOL[dtype], is_causal=True)


def test_general_bool_mask_and_empty_rows():
    """Left-padded causal mask (a materialised (b, 1, n, n) mask): padded query rows have no allowed key
    and must give zeros with zero gradients."""
    n = 9
    qs, ks, v = _inputs(n=n)
    mask, _ = make_mask("left-padded-causal", 2, n, seed=3)
    mask = mask.to(DEVICE)
    empty = ~mask.any(-1)  # (b, 1, n)
    assert bool(empty.any())
    got = decoupled_attention(qs, ks, v, mask=mask, backend="triton")
    assert bool((got.masked_select(empty[..., None]) == 0).all())
    _compare(qs, ks, v, "add", TOL[torch.float32], mask=mask)


@pytest.mark.parametrize("route", ["lengths", "mask"])
def test_nan_poisoned_padding_never_leaks(route):
    """NaN at every padded position of q, k and v: valid outputs and all gradients stay finite and equal
    the oracle's on clean inputs."""
    n, b = 11, 2
    lengths = torch.tensor([n, 4], device=DEVICE)
    valid = torch.arange(n, device=DEVICE)[None, :] < lengths[:, None]  # (b, n)
    clean = _inputs(b=b, n=n)
    poisoned = []
    for group in clean[:2]:
        poisoned.append([(t.detach().masked_fill(~valid[:, None, :, None], float("nan")) if t.shape[0] == b
                          else t.detach().clone()).requires_grad_() for t in group])
    v_bad = clean[2].detach().masked_fill(~valid[:, None, :, None], float("nan")).requires_grad_()
    qs, ks = poisoned
    allowed = lengths_allowed(lengths, n)
    if route == "lengths":
        got = _kernel(qs, ks, v_bad, lengths=lengths, is_causal=True, block=16)
    else:
        got = decoupled_attention(qs, ks, v_bad, mask=allowed, is_causal=True, backend="triton")
    want, _ = reference_attention(*clean, mask=allowed, is_causal=True)
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    g_got = _grads(got, qs + ks + [v_bad])
    g_want = _grads(want, list(clean[0]) + list(clean[1]) + [clean[2]])
    for a, c in zip(g_got, g_want):
        assert bool(torch.isfinite(a).all())
        torch.testing.assert_close(a, c, **TOL[torch.float32])


def test_dropout_matches_oracle_with_the_kernel_pattern():
    """The kernel's dropout == the oracle's probabilities times the kernel's own Philox keep pattern /
    (1 - p), for values and gradients (so the backward regenerates the forward's pattern)."""
    n, p = 13, 0.3
    qs, ks, v = _inputs(n=n)
    got = _kernel(qs, ks, v, is_causal=True, dropout_p=p, seed=1234, block=16)
    keep = ops.dropout_keep_mask(torch.tensor([1234], device=DEVICE), 2, 2, n, p)
    assert 0.55 < keep.float().mean().item() < 0.85
    _, maps = reference_attention(qs, ks, v, is_causal=True)
    want = (maps["probs"] * keep / (1 - p)) @ v
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    for a, c in zip(_grads(got, qs + ks + [v]), _grads(want, qs + ks + [v])):
        torch.testing.assert_close(a, c, **TOL[torch.float32])


def test_dropout_reproducible_with_manual_seed():
    qs, ks, v = _inputs(n=7)
    runs = []
    for s in (0, 0, 1):
        torch.manual_seed(s)
        runs.append(decoupled_attention(qs, ks, v, is_causal=True, dropout_p=0.3, backend="triton"))
    torch.testing.assert_close(runs[0], runs[1], atol=0, rtol=0)
    assert not torch.equal(runs[0], runs[2])


def test_module_backend_triton_matches_torch():
    torch.manual_seed(0)
    att = DecoupledAttention(16, 2, attr_dims={"cat": 8}, fusion="gate", max_len=10).to(DEVICE)
    x = torch.randn(3, 10, 16, device=DEVICE, requires_grad=True)
    attrs = {"cat": torch.randn(3, 10, 8, device=DEVICE)}
    pos = torch.randn(10, 16, device=DEVICE)
    outs, grads = [], []
    for backend in ("triton", "torch"):
        att.backend = backend
        out = att(x, attrs=attrs, pos=pos, is_causal=True)
        outs.append(out)
        grads.append(_grads(out, [x] + list(att.parameters())))
    torch.testing.assert_close(outs[0], outs[1], **TOL[torch.float32])
    for a, c in zip(*grads):
        torch.testing.assert_close(a, c, **TOL[torch.float32])


def test_compile_traces_through_the_custom_op():
    qs, ks, v = _inputs(n=7)

    def f(qs, ks, v):
        return decoupled_attention(qs, ks, v, is_causal=True, backend="triton").square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(qs, ks, v), qs + ks + [v])
    want = torch.autograd.grad(f(qs, ks, v), qs + ks + [v])
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c, **TOL[torch.float32])


def test_unsupported_cases_raise_or_fall_back():
    qs, ks, v = _inputs(n=5, dtype=torch.float64)
    reasons = ops.unsupported_reasons(qs, ks, v)
    assert any("float64" in r for r in reasons)
    with pytest.raises(DIFError, match="backend: .*float64"):
        decoupled_attention(qs, ks, v, backend="triton")
    if DEVICE == "cuda":  # auto asks the kernels first on CUDA, then falls back to sdpa
        os.environ["DIF_ATTENTION_TRITON"] = "1"
    try:
        got = decoupled_attention(qs, ks, v, is_causal=True)
        want, _ = reference_attention(qs, ks, v, is_causal=True)
        torch.testing.assert_close(got, want)
        custom = torch.rand(5, 5, generator=torch.Generator().manual_seed(0)) > 0.4  # 2-d, not causal
        got = decoupled_attention(qs, ks, v, mask=custom.to(DEVICE), is_causal=True)
        want, _ = reference_attention(qs, ks, v, mask=custom.to(DEVICE), is_causal=True)
        torch.testing.assert_close(got, want)
    finally:
        os.environ.pop("DIF_ATTENTION_TRITON", None)
    wide = [torch.zeros(1, 1, 4, ops.MAX_WIDTH + 1, device=DEVICE)]
    assert any("width" in r for r in ops.unsupported_reasons(wide, wide, torch.zeros(1, 1, 4, 8, device=DEVICE)))
    assert ops.unsupported_reasons(*_inputs(n=5)) == []


def test_environment_switch_turns_the_kernels_off(monkeypatch):
    qs, ks, v = _inputs(n=5)
    monkeypatch.setenv("DIF_ATTENTION_TRITON", "0")
    assert ops.available() and ops.unsupported_reasons(qs, ks, v) == []  # ops reports capability only
    with pytest.raises(DIFError, match="DIF_ATTENTION_TRITON=0"):  # the dispatcher owns the switch
        decoupled_attention(qs, ks, v, backend="triton")
    monkeypatch.delenv("DIF_ATTENTION_TRITON")
    torch.testing.assert_close(decoupled_attention(qs, ks, v, backend="triton"),
                               decoupled_attention(qs, ks, v, backend="torch"), **TOL[torch.float32])


def test_bad_arguments_are_named():
    qs, ks, v = _inputs(n=5)
    with pytest.raises(DIFError, match="lengths"):
        _kernel(qs, ks, v, lengths=torch.tensor([5.0, 2.0], device=DEVICE))
    with pytest.raises(DIFError, match="block"):
        _kernel(qs, ks, v, block=24)


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementations, autograd registration and AOT dispatch of both custom ops."""
    from dif_attention.ops.attention_op import fused_attention
    from dif_attention.ops.gate_op import gate_energy

    g = torch.Generator().manual_seed(0)
    b, h, n = 2, 1, 5

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE).requires_grad_()

    q, k, v, bias = rnd(b, h, n, 16), rnd(b, h, n, 16), rnd(b, h, n, 8), rnd(h, n, n)
    mask = (torch.rand(b, 1, n, n, generator=g) > 0.3).to(DEVICE)
    lengths = torch.tensor([5, 3], dtype=torch.int32, device=DEVICE)
    seed = torch.tensor([7], device=DEVICE)
    for op, args in [(fused_attention, (q, k, v, bias, mask, lengths, seed, True, 0.5, 0.2, 16)),
                     (gate_energy, (q, k, rnd(n, n), rnd(n), rnd(n), rnd(1)))]:
        result = torch.library.opcheck(op, args)
        assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("n", [7, 50, 70])
def test_paper_gate_energies_and_gradients(n):
    """The energy op (fused forward; fused backward for n <= 64, torch backward above) against the row-MLP
    written with torch autograd on the materialised, unmasked score rows."""
    from dif_attention.ops.gate_op import gate_energy

    g = torch.Generator().manual_seed(n)

    def rnd(*shape, s=1.0):
        return (s * torch.randn(*shape, generator=g)).to(DEVICE).requires_grad_()

    b, h, e = (2, 2, 12) if n <= 50 else (1, 1, 12)
    q, k = rnd(b, h, n, e), rnd(b, h, n, e)
    w1, b1, w2, b2 = rnd(n, n, s=0.3), rnd(n, s=0.3), rnd(n), rnd(1)
    leaves = [q, k, w1, b1, w2, b2]
    got = gate_energy(q, k, w1, b1, w2, b2)
    want = torch.relu((q @ k.transpose(-1, -2)) @ w1.t() + b1) @ w2 + b2
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    for a, c in zip(_grads(got, leaves), _grads(want, leaves)):
        torch.testing.assert_close(a, c, atol=1e-4, rtol=1e-4)


def test_autocast_half_matches_torch_backend():
    """DecoupledAttention under fp16 autocast (fp32 parameters, half activations): triton == torch backend."""
    torch.manual_seed(0)
    att = DecoupledAttention(16, 2, attr_dims={"c": 8}, fusion="concat").to(DEVICE)
    x, c, pos = (torch.randn(*s, device=DEVICE) for s in [(3, 10, 16), (3, 10, 8), (10, 16)])
    outs = []
    for backend in ("triton", "torch"):
        att.backend = backend
        with torch.autocast(DEVICE, dtype=torch.float16):
            outs.append(att(x, attrs={"c": c}, pos=pos, is_causal=True))
    assert outs[0].dtype == outs[1].dtype == torch.float16
    torch.testing.assert_close(outs[0], outs[1], **TOL[torch.float16])


def test_one_dtype_reaches_the_kernel():
    """A source promoted to fp32 (e.g. by an fp32 fusion parameter) is cast to v's dtype by the launcher, and
    the op itself refuses mixed dtypes with a named error instead of a GPU compile error."""
    from dif_attention.ops.attention_op import fused_attention

    qs, ks, v = _inputs(n=5, dtype=torch.float16)
    qs[2] = qs[2].float()
    ks[2] = ks[2].float()
    q, k, bias = fold_sources(qs, ks, None, get_fusion("add"), batch=2)
    assert q.dtype == torch.float32  # torch.cat promoted the folded q
    want, _ = reference_attention([t.float() for t in qs], [t.float() for t in ks], v.float())
    got = ops.attention(q, k, v, bias=bias, scale=8 ** -0.5)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), want, **TOL[torch.float16])
    with pytest.raises(DIFError, match="one dtype"):
        fused_attention(q.float(), k, v, None, None, None, None, True, 0.5, 0.0, 0)


@pytest.mark.parametrize("shape", ["nn", "1hnn", "b11n"])
def test_broadcast_masks_with_causal(shape):
    """Masks of every broadcast shape (read through zero strides), combined with is_causal."""
    b, h, n = 2, 2, 9
    qs, ks, v = _inputs(b=b, h=h, n=n)
    full = {"nn": (n, n), "1hnn": (1, h, n, n), "b11n": (b, 1, 1, n)}[shape]
    mask = (torch.rand(*full, generator=torch.Generator().manual_seed(1)) > 0.3).to(DEVICE)
    _compare(qs, ks, v, "add", TOL[torch.float32], mask=mask, is_causal=True)
