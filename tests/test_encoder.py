"""DecoupledEncoderLayer and DecoupledEncoder: the block's structure, independent layers and fusions."""
import pytest
import torch

from dif_attention import DecoupledEncoder, DecoupledEncoderLayer, GateFusion, padding_mask
from helpers import block_inputs as _inputs


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
