"""Bad input raises DIFError (a ValueError) naming the argument, what was seen and what was expected.

The cases are tables: the arguments of every entry point (``CASES``), then the dtype, device and non-finite
checks of the modules' inputs (``MODULE_INPUT_CASES``; a ``meta`` tensor stands in for "another device" so
the device checks run without a GPU).
"""
from __future__ import annotations

import pytest
import torch

from dif_attention import (AttributeEmbedding, AttributePredictor, ConcatFusion, DecoupledAttention, DecoupledEncoder,
                           DIFError, EarlyFusionAttention, GateFusion, aap_loss, causal_mask, decoupled_attention,
                           item_attribute_table, lengths_mask, padding_mask, total_loss)

B, N, DIM = 2, 6, 16


def _attn(**kw):
    return DecoupledAttention(DIM, 4, attr_dims={"cat": 8}, **kw)


def _ok():
    return dict(x=torch.randn(B, N, DIM), attrs={"cat": torch.randn(B, N, 8)}, pos=torch.randn(N, DIM))


def _qkv(widths=(4, 4), n=N):
    return ([torch.randn(B, 2, n, e) for e in widths], [torch.randn(B, 2, n, e) for e in widths],
            torch.randn(B, 2, n, 3))


def _call_module(change, **module_kw):
    kw = _ok()
    kw.update(change)
    x = kw.pop("x")
    return _attn(**module_kw)(x, **kw)


CASES = {
    # name: (callable, substrings the message must contain)
    "x last dim != dim": (lambda: _call_module({"x": torch.randn(B, N, 12)}), ["x", "(2, 6, 12)", "16"]),
    "x not 3-d": (lambda: _call_module({"x": torch.randn(N, DIM)}), ["x", "3-d", "(6, 16)"]),
    "x integer": (lambda: _call_module({"x": torch.ones(B, N, DIM, dtype=torch.long)}), ["x", "floating"]),
    "attribute (b, n) differs": (lambda: _call_module({"attrs": {"cat": torch.randn(B, N + 1, 8)}}),
                                 ["attrs['cat']", "(2, 7, 8)", "(2, 6, 8)"]),
    "attribute width differs": (lambda: _call_module({"attrs": {"cat": torch.randn(B, N, 4)}}),
                                ["attrs['cat']", "(2, 6, 4)", "(2, 6, 8)"]),
    "declared attribute missing": (lambda: _call_module({"attrs": {}}), ["attrs", "missing ['cat']"]),
    "undeclared attribute": (lambda: _call_module({"attrs": {"cat": torch.randn(B, N, 8),
                                                             "brand": torch.randn(B, N, 8)}}),
                             ["attrs", "undeclared ['brand']"]),
    "pos missing": (lambda: _call_module({"pos": None}), ["pos", "None"]),
    "pos wrong shape": (lambda: _call_module({"pos": torch.randn(N + 2, DIM)}), ["pos", "(8, 16)", "(6, 16)"]),
    "pos given with position=False": (lambda: _call_module({}, position=False), ["pos", "position=False"]),
    "dim not divisible by heads": (lambda: DecoupledAttention(18, 4), ["dim", "heads=4", "18"]),
    "attribute width not divisible": (lambda: DecoupledAttention(16, 4, attr_dims={"cat": 6}),
                                      ["attr_dims['cat']", "heads=4", "6"]),
    "reserved attribute name": (lambda: DecoupledAttention(16, 4, attr_dims={"item": 8}), ["attr_dims", "'item'"]),
    "mask not bool": (lambda: _call_module({"mask": torch.ones(B, 1, N, N)}), ["mask", "bool", "float32"]),
    "mask not broadcastable": (lambda: _call_module({"mask": torch.ones(B, 1, N, N + 1, dtype=torch.bool)}),
                               ["mask", "(2, 1, 6, 7)", "(2, 4, 6, 6)"]),
    "mask 5-d": (lambda: _call_module({"mask": torch.ones(1, B, 1, N, N, dtype=torch.bool)}), ["mask", "4 dims"]),
    "n != max_len (gate)": (lambda: _call_module({}, fusion=GateFusion(max_len=N + 4)),
                            ["n", "max_len=10", "n=6"]),
    "n != max_len (concat)": (lambda: _call_module({}, fusion="concat", max_len=N - 1), ["n", "max_len=5", "n=6"]),
    "fusion unknown": (lambda: _attn(fusion="mul"), ["fusion", "'mul'"]),
    "fusion built for other sources": (lambda: _attn(fusion=ConcatFusion(num_sources=5)),
                                       ["fusion", "3 sources", "num_sources=5"]),
    "backend unknown": (lambda: _attn(backend="cuda"), ["backend", "'cuda'"]),
    "queries and keys lists differ": (lambda: decoupled_attention(_qkv()[0], _qkv()[1][:1], _qkv()[2]),
                                      ["keys", "2 tensors", "1 tensors"]),
    "query/key widths differ": (lambda: decoupled_attention(_qkv((4, 4))[0], _qkv((4, 2))[1], _qkv()[2]),
                                ["keys[1]", "e_1=4", "(2, 2, 6, 2)"]),
    "source length differs from value": (lambda: decoupled_attention(_qkv(n=5)[0], _qkv(n=5)[1], _qkv()[2]),
                                         ["queries[0]", "(2, 2, 5, 4)"]),
    "empty sources": (lambda: decoupled_attention([], [], _qkv()[2]), ["queries", "at least one"]),
    "dtype mismatch": (lambda: decoupled_attention([q.double() for q in _qkv()[0]], _qkv()[1], _qkv()[2]),
                       ["queries[0]", "float32", "float64"]),
    "non-finite with check_finite": (
        lambda: decoupled_attention(_qkv()[0], _qkv()[1], torch.full((B, 2, N, 3), float("nan")), check_finite=True),
        ["value", "non-finite"]),
    "dropout_p out of range": (lambda: decoupled_attention(*_qkv(), dropout_p=1.5), ["dropout_p", "1.5"]),
    "padding_mask float ids": (lambda: padding_mask(torch.randn(2, 3)), ["ids", "integer"]),
    "causal_mask bad n": (lambda: causal_mask(0), ["n", "positive"]),
    "embedding token out of range": (lambda: AttributeEmbedding({"cat": 5}, 4)({"cat": torch.tensor([[7]])}),
                                     ["ids['cat']", "[0, 5)", "7"]),
    "embedding unknown pooling": (lambda: AttributeEmbedding({"cat": 5}, 4, pooling="median"), ["pooling"]),
    "embedding num_classes 0": (lambda: AttributeEmbedding({"cat": 0}, 4), ["num_classes['cat']", ">= 1", "0"]),
    "embedding num_classes float": (lambda: AttributeEmbedding({"cat": 5.0}, 4), ["num_classes['cat']", "5.0"]),
    "embedding num_classes empty": (lambda: AttributeEmbedding({}, 4), ["num_classes", "non-empty", "{}"]),
    "embedding num_classes not a mapping": (lambda: AttributeEmbedding([5], 4), ["num_classes", "[5]"]),
    "embedding dims 0": (lambda: AttributeEmbedding({"cat": 5}, 0), ["dims", ">= 1", "0"]),
    "embedding dims float": (lambda: AttributeEmbedding({"cat": 5}, 4.0), ["dims", "an int", "4.0"]),
    "embedding dims negative": (lambda: AttributeEmbedding({"cat": 5}, {"cat": -2}), ["dims['cat']", "-2"]),
    "embedding dims keys": (lambda: AttributeEmbedding({"cat": 5}, {"brand": 4}), ["dims", "['cat']", "['brand']"]),
    "embedding padding_idx = V": (lambda: AttributeEmbedding({"cat": 5}, 4, padding_idx=5),
                                  ["padding_idx", "[0, 5)", "num_classes['cat']=5", "got 5"]),
    "embedding padding_idx negative": (lambda: AttributeEmbedding({"cat": 5}, 4, padding_idx=-1),
                                       ["padding_idx", ">= 0", "-1"]),
    "embedding init_std negative": (lambda: AttributeEmbedding({"cat": 5}, 4, init_std=-1.0), ["init_std", "-1.0"]),
    "embedding item table float": (lambda: AttributeEmbedding({"cat": 5}, 4, item_tables={"cat": torch.ones(3, 2)}),
                                   ["item_tables['cat']", "integer", "float32"]),
    "embedding item table token out of range": (
        lambda: AttributeEmbedding({"cat": 5}, 4, item_tables={"cat": torch.tensor([[0], [7]])}),
        ["item_tables['cat']", "[0, 5)", "[0, 7]"]),
    "item table max_tokens negative": (lambda: item_attribute_table({1: [2, 3]}, 3, max_tokens=-1),
                                       ["max_tokens", ">= 0", "-1"]),
    "item table num_items 0": (lambda: item_attribute_table({}, 0), ["num_items", ">= 1", "0"]),
    "item table item out of range": (lambda: item_attribute_table({3: [1]}, 3), ["item_to_tokens", "[0, 3)", "3"]),
    "item table item not an int": (lambda: item_attribute_table({"1": [1]}, 3), ["item_to_tokens", "'1'"]),
    "item table nested tokens": (lambda: item_attribute_table({1: [1, [2]]}, 3), ["item_to_tokens[1]", "[1, [2]]"]),
    "item table negative token": (lambda: item_attribute_table({1: [-1]}, 3), ["item_to_tokens[1]", "non-negative"]),
    "item table tokens a string": (lambda: item_attribute_table({1: "ab"}, 3), ["item_to_tokens[1]", "'ab'"]),
    "item head width 0": (lambda: decoupled_attention([torch.randn(B, 2, N, 0)], [torch.randn(B, 2, N, 0)],
                                                      torch.randn(B, 2, N, 3)),
                          ["queries[0]", "e_0 >= 1", "(2, 2, 6, 0)"]),
    "padding_mask pad_id float": (lambda: padding_mask(torch.ones(2, 3, dtype=torch.long), pad_id=0.5),
                                  ["pad_id", "an int", "0.5"]),
    "embedding items float": (lambda: AttributeEmbedding({"cat": 5}, 4, item_tables={"cat": torch.ones(3, 1).long()})(
        items=torch.ones(2, 3)), ["items", "integer", "float32"]),
    "embedding items bool": (lambda: AttributeEmbedding({"cat": 5}, 4, item_tables={"cat": torch.ones(3, 1).long()})(
        items=torch.ones(2, 3, dtype=torch.bool)), ["items", "integer", "torch.bool"]),
    "embedding token ids bool": (lambda: AttributeEmbedding({"cat": 5}, 4)({"cat": torch.ones(2, 3, dtype=torch.bool)}),
                                 ["ids['cat']", "integer", "torch.bool"]),
    "embedding trainable a string": (lambda: AttributeEmbedding({"cat": 5}, 4, trainable="no"),
                                     ["trainable", "True or False", "'no'"]),
    "attention position a string": (lambda: _attn(position="false"), ["position", "True or False", "'false'"]),
    "early fusion position a string": (lambda: EarlyFusionAttention(DIM, 4, position="no"),
                                       ["position", "True or False", "'no'"]),
    "predictor wrong width": (lambda: AttributePredictor(8, {"cat": 5})(torch.randn(3, 6)), ["h", "8", "(3, 6)"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_raises_named_error(case):
    fn, needles = CASES[case]
    with pytest.raises(DIFError) as info:
        fn()
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, f"{case}: {needle!r} not in {msg!r}"
    assert isinstance(info.value, ValueError)


def test_good_input_passes():
    out = _call_module({"mask": padding_mask(torch.ones(B, N, dtype=torch.long))})
    assert out.shape == (B, N, DIM)


@pytest.mark.parametrize("pooling", ["sum", "mean", "max"])
def test_pooling_of_no_tokens_gives_zeros(pooling):
    """``k = 0`` tokens per position (an attribute no item has): zeros, as for a position whose tokens are all
    padding -- for ``max`` too, which has nothing to take the maximum of."""
    emb = AttributeEmbedding({"cat": 5}, 4, pooling=pooling)
    out = emb({"cat": torch.zeros(2, 3, 0, dtype=torch.long)})["cat"]
    assert out.shape == (2, 3, 4) and not out.any()
    padded = emb({"cat": torch.zeros(2, 3, 2, dtype=torch.long)})["cat"]
    assert torch.equal(out, padded)


def test_item_table_accepts_tensors_and_numpy_ints():
    import numpy as np
    table = item_attribute_table({np.int64(1): torch.tensor([2, 3]), 2: (np.int32(4),)}, 3, max_tokens=1)
    assert table.tolist() == [[0], [2], [4]]


# ---------------------------------------------------------------------------------------------- module inputs
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
MODULE_INPUT_CASES = [
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


@pytest.mark.parametrize("arg, value, module, message", MODULE_INPUT_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(MODULE_INPUT_CASES)])
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



def test_gates_from_means_refuses_the_paper_exact_gate():
    from dif_attention.fusion import GateFusion
    means = torch.zeros(1, 1, 3, 2)
    assert GateFusion(num_sources=2).gates_from_means(means).shape == (1, 1, 3, 2)
    with pytest.raises(DIFError, match="max_len=5"):
        GateFusion(num_sources=2, max_len=5).gates_from_means(means)
