"""Input validation added with issue 6: each bad input raises DIFError naming the argument, with the
expected and the seen value. (The core cases are enumerated in test_errors.py; these are the dtype,
device, non-finite and value-type cases of the module-level entry points.) A ``meta`` tensor stands in
for "another device" so the device checks run without a GPU."""
from __future__ import annotations

import pytest
import torch

from dif_attention import (AttributeEmbedding, AttributePredictor, DecoupledAttention, DecoupledEncoder, DIFError,
                           aap_loss, causal_mask, decoupled_attention, lengths_mask, total_loss)


def module_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 5, 16, generator=g).to(dtype), {"cat": torch.randn(2, 5, 8, generator=g).to(dtype)},
            torch.randn(5, 16, generator=g).to(dtype))


ATTN = DecoupledAttention(16, 2, attr_dims={"cat": 8})
ATTN_FINITE = DecoupledAttention(16, 2, attr_dims={"cat": 8}, check_finite=True)


def call_with(arg, value, module=ATTN):
    x, attrs, pos = module_inputs()
    kw = {"x": x, "attrs": attrs, "pos": pos}
    if arg.startswith("attrs"):
        kw["attrs"] = {"cat": value}
    else:
        kw[arg] = value
    return module(kw.pop("x"), **kw)


def poisoned(t, value):
    t = t.clone()
    t.view(-1)[3] = value
    return t


X, ATTRS, POS = module_inputs()
CASES = [
    # (argument, bad value, module, the message must contain)
    ("x", X.double(), ATTN, "x: expected dtype torch.float32"),
    ("x", X.half(), ATTN, "the dtype of DecoupledAttention's parameters"),
    ("pos", POS.double(), ATTN, "pos: expected dtype torch.float32"),
    ("attrs", ATTRS["cat"].double(), ATTN, "attrs['cat']: expected dtype torch.float32"),
    ("x", X.to("meta"), ATTN, "x: expected device cpu"),
    ("pos", POS.to("meta"), ATTN, "pos: expected device cpu"),
    ("attrs", ATTRS["cat"].to("meta"), ATTN, "attrs['cat']: expected device cpu"),
    ("x", poisoned(X, float("nan")), ATTN_FINITE, "x: expected finite values (check_finite=True), got 1 non-finite"),
    ("pos", poisoned(POS, float("inf")), ATTN_FINITE, "pos: expected finite values"),
    ("attrs", poisoned(ATTRS["cat"], float("-inf")), ATTN_FINITE, "attrs['cat']: expected finite values"),
]


@pytest.mark.parametrize("arg, value, module, message", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_module_inputs_are_validated(arg, value, module, message):
    with pytest.raises(DIFError) as info:
        call_with(arg, value, module)
    assert message in str(info.value), str(info.value)


def test_non_finite_passes_without_the_flag():
    x, attrs, pos = module_inputs()
    out = ATTN(poisoned(x, float("nan")), attrs=attrs, pos=pos)
    assert bool(out.isnan().any())  # the flag is what turns a silent NaN into an error


def test_autocast_accepts_low_precision_inputs():
    x, attrs, pos = module_inputs(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ATTN(x, attrs=attrs, pos=pos).shape == (2, 5, 16)


def test_encoder_forwards_check_finite():
    enc = DecoupledEncoder(2, 16, 2, attr_dims={"cat": 8}, check_finite=True)
    x, attrs, pos = module_inputs()
    with pytest.raises(DIFError, match=r"^x: expected finite"):
        enc(poisoned(x, float("nan")), attrs=attrs, pos=pos)


def test_predictor_and_embedding_inputs():
    pred = AttributePredictor(16, {"cat": 5})
    with pytest.raises(DIFError, match=r"^h: expected dtype torch.float32 .*got dtype torch.float64"):
        pred(torch.randn(3, 16, dtype=torch.float64))
    emb = AttributeEmbedding({"cat": 5}, 8)
    with pytest.raises(DIFError, match=r"^ids\['cat'\]: expected device cpu .*got device meta"):
        emb({"cat": torch.ones(2, 3, dtype=torch.long, device="meta")})


def test_aap_loss_valid_must_be_bool():
    logits, targets = {"cat": torch.randn(2, 5)}, {"cat": torch.tensor([1, 2])}
    for valid in (torch.tensor([1, 0]), torch.tensor([1.0, 0.0])):  # an int tensor would index rows 1 and 0
        with pytest.raises(DIFError, match=r"^valid: expected a bool tensor of shape \(2,\), got dtype"):
            aap_loss(logits, targets, valid=valid)
    only_first = aap_loss(logits, targets, valid=torch.tensor([True, False]))["cat"]
    torch.testing.assert_close(only_first, aap_loss({"cat": logits["cat"][:1]}, {"cat": targets["cat"][:1]})["cat"])


def test_total_loss_needs_a_weight_per_attribute():
    with pytest.raises(DIFError, match=r"^lamb: expected a weight for every attribute \['cat'\], got keys \['brand'\]"):
        total_loss(torch.tensor(1.0), {"cat": torch.tensor(0.5)}, lamb={"brand": 1.0})


def test_lengths_mask_arguments():
    with pytest.raises(DIFError, match=r"^lengths: expected an integer tensor"):
        lengths_mask(torch.tensor([1.5, 2.0]), 3)
    with pytest.raises(DIFError, match=r"^n: expected a positive int, got 0"):
        lengths_mask(torch.tensor([1, 2]), 0)
    with pytest.raises(DIFError, match=r"^n: expected a positive int, got True"):
        causal_mask(True)

