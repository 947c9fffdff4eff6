"""Bad input raises DIFError (a ValueError) naming the argument, what was seen and what was expected."""
import pytest
import torch

from dif_attention import (AttributeEmbedding, AttributePredictor, ConcatFusion, DecoupledAttention, DIFError,
                           GateFusion, causal_mask, decoupled_attention, padding_mask)

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
