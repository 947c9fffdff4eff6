"""DecoupledAttention: backends, score maps, the shared position table, state dicts."""
import copy

import pytest
import torch
import torch.nn.functional as F

from dif_attention import ConcatFusion, DecoupledAttention, GateFusion, causal_mask, padding_mask
from helpers import FUSIONS, block_inputs as _inputs


def test_no_side_information_equals_plain_multihead_sdpa():
    torch.manual_seed(0)
    dim, heads = 32, 4
    m = DecoupledAttention(dim, heads, position=False)
    x, _, _, ids = _inputs()
    mask = padding_mask(ids)
    out = m(x, mask=mask, is_causal=True)

    def split(t):
        return t.view(3, 9, heads, dim // heads).transpose(1, 2)

    q, k, v = split(m.to_q(x)), split(m.to_k(x)), split(m.to_v(x))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask & causal_mask(9))
    ref = m.to_out(ref.transpose(1, 2).reshape(3, 9, dim))
    torch.testing.assert_close(out, ref)
    # and torch.nn.MultiheadAttention with the same weights agrees
    mha = torch.nn.MultiheadAttention(dim, heads, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([m.to_q.weight, m.to_k.weight, m.to_v.weight]))
        mha.in_proj_bias.copy_(torch.cat([m.to_q.bias, m.to_k.bias, m.to_v.bias]))
        mha.out_proj.weight.copy_(m.to_out.weight)
        mha.out_proj.bias.copy_(m.to_out.bias)
    ref2, _ = mha(x, x, x, attn_mask=~(mask & causal_mask(9)).repeat_interleave(heads, 0).squeeze(1)
                  .reshape(3 * heads, 9, 9), need_weights=False)
    valid = ids != 0
    torch.testing.assert_close(out[valid], ref2[valid], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("pos_batched", [False, True])
def test_module_backends_agree(fusion, pos_batched):
    torch.manual_seed(1)
    n = 9
    f = {"concat-L": ConcatFusion(max_len=n), "gate-L": GateFusion(max_len=n)}.get(fusion, fusion)
    m = DecoupledAttention(32, 4, attr_dims={"cat": 8, "brand": 16}, fusion=f).double()
    x, attrs, pos, ids = _inputs(n=n)
    x, pos = x.double().requires_grad_(), pos.double().requires_grad_()
    attrs = {a: t.double().requires_grad_() for a, t in attrs.items()}
    if pos_batched:
        pos = pos.detach().expand(3, -1, -1).clone().requires_grad_()
    kw = dict(attrs=attrs, pos=pos, mask=padding_mask(ids), is_causal=True)
    outs, grads = [], []
    for backend in ("torch", "sdpa", "math"):
        m.backend = backend
        out = m(x, **kw)
        leaves = [x, pos, *attrs.values(), *m.parameters()]
        outs.append(out)
        grads.append(torch.autograd.grad(out.square().sum(), leaves))
    for other in (1, 2):
        torch.testing.assert_close(outs[other], outs[0])
        for a, b in zip(grads[0], grads[other]):
            torch.testing.assert_close(b, a)
    # every parameter and every input receives a gradient
    assert all(g.abs().sum() > 0 for g in grads[1])


def test_return_scores_names_each_source():
    m = DecoupledAttention(32, 4, attr_dims={"cat": 8}, fusion="gate")
    x, attrs, pos, ids = _inputs(attr_dims={"cat": 8})
    out, maps = m(x, attrs=attrs, pos=pos, is_causal=True, return_scores=True)
    assert list(maps) == ["item", "position", "cat", "fused", "probs", "gates"]
    assert list(maps.sources) == ["item", "position", "cat"]
    assert maps["item"].shape == (3, 4, 9, 9) and maps["position"].shape == (1, 4, 9, 9)
    gates = maps.gates  # (b, h, n, s): per-row source weights, the fused scores are their mix
    assert gates.shape == (3, 4, 9, 3)
    torch.testing.assert_close(gates.sum(-1), torch.ones(3, 4, 9))
    mixed = sum(gates[..., s:s + 1] * maps[name] for s, name in enumerate(maps.sources))
    torch.testing.assert_close(maps.fused, mixed)
    torch.testing.assert_close(out, m(x, attrs=attrs, pos=pos, is_causal=True))
    probs = maps["probs"]
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 4, 9))
    assert probs.triu(1).abs().max() == 0
    assert DecoupledAttention(32, 4, fusion="add")(x, pos=pos, return_scores=True)[1].gates is None


def test_position_score_is_computed_once_per_forward():
    """The position projections run on (n, dim), not on (b, n, dim)."""
    m = DecoupledAttention(32, 4)
    x, _, pos, _ = _inputs(b=5)
    seen = []
    m.pos_q.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape)))
    m(x, pos=pos, is_causal=True)
    assert seen == [(9, 32)]


def test_deepcopy_and_state_dict_roundtrip():
    m = DecoupledAttention(32, 4, attr_dims={"cat": 8}, fusion="concat")
    m2 = DecoupledAttention(32, 4, attr_dims={"cat": 8}, fusion="concat")
    m2.load_state_dict(copy.deepcopy(m.state_dict()))
    x, attrs, pos, _ = _inputs(attr_dims={"cat": 8})
    torch.testing.assert_close(m(x, attrs=attrs, pos=pos), m2(x, attrs=attrs, pos=pos))
