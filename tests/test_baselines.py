"""dif_attention.baselines: early fusion of side information (SASRecF's and NOVA's inputs and attention)."""
import pytest
import torch

from dif_attention import DIFError
from dif_attention.baselines import EarlyFusionAttention, InputFusion


def test_nova_values_come_from_items_only_sasrecf_from_the_fused_stream():
    torch.manual_seed(0)
    dim, n = 16, 6
    x, pos = torch.randn(1, n, dim), torch.randn(n, dim)
    a1 = {"c": torch.randn(1, n, dim)}
    for style in ("nova", "sasrecf"):
        m = EarlyFusionAttention(dim, 2, attr_dims={"c": dim}, style=style)
        _, m1 = m(x, attrs=a1, pos=pos, return_scores=True)
        shifted = {"c": a1["c"] - x}  # x' = 2x, c' = c - x: the same fused stream x' + c' = x + c
        out2, m2 = m(2 * x, attrs=shifted, pos=pos, return_scores=True)
        out1 = m(x, attrs=a1, pos=pos)
        torch.testing.assert_close(m1["fused"], m2["fused"])
        if style == "sasrecf":
            torch.testing.assert_close(out1, out2)  # depends on x + c only
        else:
            assert not torch.allclose(out1, out2)  # values from the item stream alone


def test_input_fusion_modes_and_errors():
    x, c = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    torch.testing.assert_close(InputFusion(8, attr_dims={"c": 8})(x, attrs={"c": c}), x + c)
    f = InputFusion(8, attr_dims={"c": 4}, combine="concat")
    assert f(x, attrs={"c": torch.randn(2, 5, 4)}, pos=torch.randn(5, 8)).shape == (2, 5, 8)
    with pytest.raises(DIFError, match="attr_dims\\['c'\\]: expected width 8"):
        InputFusion(8, attr_dims={"c": 4})
    with pytest.raises(DIFError, match="attrs: expected exactly the declared attributes"):
        InputFusion(8, attr_dims={"c": 8})(x, attrs={})
    with pytest.raises(DIFError, match="style: expected one of"):
        EarlyFusionAttention(8, 2, style="late")
    with pytest.raises(DIFError, match="pos: expected the position embedding"):
        EarlyFusionAttention(8, 2)(x)


def test_sum_fusion_adds_position_and_attributes_to_the_stream():
    x, pos = torch.randn(2, 5, 8), torch.randn(5, 8)
    a, c = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    f = InputFusion(8, attr_dims={"a": 8, "c": 8})
    torch.testing.assert_close(f(x, attrs={"a": a, "c": c}, pos=pos), x + (pos + (a + c)))
    torch.testing.assert_close(InputFusion(8)(x, pos=pos), x + pos)
    torch.testing.assert_close(InputFusion(8)(x), x)
