"""DecoupledAttention, the encoder, embeddings and AAP heads."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from dif_attention import (DIFError, AttributeEmbedding, AttributePredictor, ConcatFusion, DecoupledAttention,
                           DecoupledEncoder, DecoupledEncoderLayer, GateFusion, aap_loss, causal_mask,
                           item_attribute_table, multi_hot, padding_mask, total_loss)
from helpers import FUSIONS


def _inputs(b=3, n=9, dim=32, attr_dims={"cat": 8, "brand": 16}, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, dim, generator=g)
    attrs = {a: torch.randn(b, n, d, generator=g) for a, d in attr_dims.items()}
    pos = torch.randn(n, dim, generator=g)
    ids = torch.randint(1, 50, (b, n), generator=g)
    ids[1, 5:] = 0
    return x, attrs, pos, ids


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


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_structure(norm_first):
    torch.manual_seed(0)
    layer = DecoupledEncoderLayer(32, 4, attr_dims={"cat": 8}, ff_dim=64, norm_first=norm_first).eval()
    x, attrs, pos, _ = _inputs(attr_dims={"cat": 8})
    kw = dict(attrs=attrs, pos=pos, is_causal=True)
    out = layer(x, **kw)
    if norm_first:
        h = x + layer.attn(layer.norm1(x), **kw)
        want = h + layer.ff(layer.norm2(h))
    else:
        h = layer.norm1(x + layer.attn(x, **kw))
        want = layer.norm2(h + layer.ff(h))
    torch.testing.assert_close(out, want)


def test_encoder_stack_has_independent_layers_and_fusions():
    enc = DecoupledEncoder(3, 32, 4, attr_dims={"cat": 8}, fusion=GateFusion(max_len=9), ff_dim=64)
    fusions = [layer.attn.fusion for layer in enc.layers]
    assert len({id(f) for f in fusions}) == 3
    x, attrs, pos, ids = _inputs(attr_dims={"cat": 8})
    out, maps = enc(x, attrs=attrs, pos=pos, mask=padding_mask(ids), is_causal=True, return_scores=True)
    assert out.shape == x.shape and len(maps) == 3
    out.sum().backward()
    assert all(p.grad is not None for p in enc.parameters())


def test_attribute_embedding_pooling_and_padding():
    torch.manual_seed(0)
    emb = AttributeEmbedding({"cat": 6}, 4, pooling="sum")
    tok = torch.tensor([[[1, 2, 0], [0, 0, 0], [3, 3, 5]]])  # (b=1, n=3, k=3)
    out = emb({"cat": tok})["cat"]
    w = emb.tables["cat"].weight
    torch.testing.assert_close(out[0, 0], w[1] + w[2])
    assert out[0, 1].abs().max() == 0
    torch.testing.assert_close(out[0, 2], 2 * w[3] + w[5])
    emb.pooling = "mean"
    torch.testing.assert_close(emb({"cat": tok})["cat"][0, 0], (w[1] + w[2]) / 2)
    emb.pooling = "max"
    mx = emb({"cat": tok})["cat"]
    torch.testing.assert_close(mx[0, 0], torch.maximum(w[1], w[2]))
    assert mx[0, 1].abs().max() == 0
    # tables are trainable (the reference's were frozen by accident); the padding row gets no gradient
    emb.pooling = "sum"
    emb({"cat": tok})["cat"].sum().backward()
    g = emb.tables["cat"].weight.grad
    assert g[1].abs().sum() > 0 and g[0].abs().sum() == 0
    assert any(p is emb.tables["cat"].weight for p in emb.parameters())


def test_attribute_embedding_item_tables():
    table = item_attribute_table({1: [2, 3], 2: [4], 3: []}, num_items=5)
    assert table.tolist() == [[0, 0], [2, 3], [4, 0], [0, 0], [0, 0]]
    emb = AttributeEmbedding({"cat": 6}, 4, item_tables={"cat": table})
    items = torch.tensor([[1, 2, 0]])
    torch.testing.assert_close(emb(items=items)["cat"], emb({"cat": table[items]})["cat"])
    frozen = AttributeEmbedding({"cat": 6}, 4, trainable=False, init_std=1.0)
    assert not any(p.requires_grad for p in frozen.parameters())


def test_aap_loss_matches_hand_computation():
    torch.manual_seed(0)
    pred = AttributePredictor(8, {"cat": 5})
    h = torch.randn(3, 8)
    logits = pred(h)
    targets = {"cat": torch.tensor([[1, 3, 0], [2, 0, 0], [4, 4, 1]])}
    loss = pred.loss(logits, targets)["cat"]
    y = torch.tensor([[0, 1, 0, 1, 0], [0, 0, 1, 0, 0], [0, 1, 0, 0, 1]], dtype=torch.float)
    lg = logits["cat"]
    want = -(y * F.logsigmoid(lg) + (1 - y) * F.logsigmoid(-lg))[:, 1:].mean()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(multi_hot(targets["cat"], 5), y)
    valid = torch.tensor([True, False, True])
    torch.testing.assert_close(aap_loss(logits, targets, valid=valid)["cat"],
                               -(y * F.logsigmoid(lg) + (1 - y) * F.logsigmoid(-lg))[valid][:, 1:].mean())
    item = torch.tensor(2.0)
    torch.testing.assert_close(total_loss(item, {"cat": loss}, lamb=10.0), item + 10 * loss)
    torch.testing.assert_close(total_loss(item, {"cat": loss}, lamb={"cat": 0.5}), item + 0.5 * loss)


def test_aap_prior_init_starts_at_the_label_rates():
    pred = AttributePredictor(8, {"cat": 4})
    rates = torch.tensor([0.0, 0.5, 0.1, 1.0])  # pad column 0 and a class that is always on get clamped
    assert pred.init_prior_({"cat": rates}, eps=1e-3) is pred
    probs = torch.sigmoid(pred(torch.zeros(2, 8))["cat"])  # h = 0: the logits are the biases
    torch.testing.assert_close(probs[0], torch.tensor([1e-3, 0.5, 0.1, 1 - 1e-3]))
    # the BCE at the prior is the rates' entropy, below the zero-init's log 2 per label
    y = torch.tensor([[0.0, 1, 0, 1], [0.0, 0, 0, 1]])
    init = aap_loss(pred(torch.zeros(2, 8)), {"cat": y})["cat"]
    assert init < math.log(2) - 0.2
    with pytest.raises(DIFError, match=r"^rates\['cat'\]: expected shape \(4,\), got"):
        pred.init_prior_({"cat": torch.full((3,), 0.5)})
    with pytest.raises(DIFError, match=r"^rates\['cat'\]: expected rates in \[0, 1\]"):
        pred.init_prior_({"cat": torch.tensor([0.0, 1.5, 0.1, 0.2])})
    with pytest.raises(DIFError, match=r"^rates: expected the attributes \['cat'\]"):
        pred.init_prior_({"brand": rates})


def test_deepcopy_and_state_dict_roundtrip():
    m = DecoupledAttention(32, 4, attr_dims={"cat": 8}, fusion="concat")
    m2 = DecoupledAttention(32, 4, attr_dims={"cat": 8}, fusion="concat")
    m2.load_state_dict(copy.deepcopy(m.state_dict()))
    x, attrs, pos, _ = _inputs(attr_dims={"cat": 8})
    torch.testing.assert_close(m(x, attrs=attrs, pos=pos), m2(x, attrs=attrs, pos=pos))
