"""dif_attention.analysis: rank measures, valid blocks, bounds (Theorem 4.1), and the early-fusion baselines' rank."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dif_attention import DIFError, DecoupledAttention, DecoupledEncoder, ScoreMaps
from dif_attention.analysis import (block_ranks, effective_rank, head_widths, layer_ranks, numerical_rank, rank_bound,
                                    source_spread, summarize)
from dif_attention.baselines import EarlyFusionAttention


def low_rank(r, n, m=None, *, batch=(), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*batch, n, r, generator=g, dtype=dtype) @
            torch.randn(*batch, r, m or n, generator=g, dtype=dtype))


@settings(max_examples=25, deadline=None)
@given(r=st.integers(0, 12), n=st.integers(12, 30), m=st.integers(12, 30), seed=st.integers(0, 10_000))
def test_numerical_rank_recovers_known_rank(r, n, m, seed):
    a = low_rank(r, n, m, seed=seed) if r else torch.zeros(n, m, dtype=torch.float64)
    assert int(numerical_rank(a)) == r
    assert int(numerical_rank(a.float())) == r  # float32 round-off stays under the float32 tolerance


def test_numerical_rank_tolerance_is_documented_default_and_overridable():
    s = torch.tensor([1.0, 1e-3, 1e-9, 0.0], dtype=torch.float64)
    a = torch.diag(s)
    assert int(numerical_rank(a)) == 3  # 1e-9 > 4 * eps64 * 1
    assert int(numerical_rank(a.float())) == 2  # 1e-9 < 4 * eps32: float32 scores cannot resolve it
    assert int(numerical_rank(a, rtol=1e-2)) == 1
    assert int(numerical_rank(a, atol=1e-4)) == 2
    assert numerical_rank(low_rank(3, 8, batch=(2, 5))).shape == (2, 5)
    assert (numerical_rank(low_rank(3, 8, batch=(2, 5))) == 3).all()


def test_effective_rank_values():
    assert float(effective_rank(torch.eye(7, dtype=torch.float64))) == pytest.approx(7.0)
    assert float(effective_rank(low_rank(1, 9))) == pytest.approx(1.0)
    assert float(effective_rank(torch.zeros(4, 4))) == 0.0
    skewed = torch.diag(torch.tensor([1.0, 1.0, 1e-3], dtype=torch.float64))
    assert 2.0 < float(effective_rank(skewed)) < 2.05
    a = low_rank(5, 20)
    assert 1.0 <= float(effective_rank(a)) <= 5.0 + 1e-9


def test_block_ranks_use_only_the_valid_block_of_each_sample():
    n, lengths = 20, torch.tensor([20, 13, 4, 13])
    s = low_rank(10, n, batch=(4, 2))  # (b, h, n, n) rank 10 everywhere
    s[:, :, 15:, :] = 0.0  # rows past 15 carry nothing
    r = block_ranks(s, lengths)
    assert r.shape == (4, 2) and r.dtype == torch.float64
    assert r[:, 0].tolist() == [10, 10, 4, 10]
    pos = low_rank(6, n, batch=(1, 2))  # batch-independent map (position) broadcasts over the samples
    assert block_ranks(pos, lengths).tolist() == [[6, 6], [6, 6], [4, 4], [6, 6]]
    assert block_ranks(s).tolist() == [[10, 10]] * 4  # no lengths: the full n x n


def test_block_ranks_errors_name_the_argument():
    s = torch.zeros(2, 1, 5, 5)
    with pytest.raises(DIFError, match="lengths: expected valid lengths in \\[1, 5\\]"):
        block_ranks(s, torch.tensor([6, 2]))
    with pytest.raises(DIFError, match="lengths: expected one length per sample"):
        block_ranks(s, torch.tensor([5, 2, 1]))
    with pytest.raises(DIFError, match="measure: expected one of"):
        block_ranks(s, measure="nuclear")
    with pytest.raises(DIFError, match="scores: expected square"):
        block_ranks(torch.zeros(2, 1, 5, 4))
    with pytest.raises(DIFError, match="layer_maps\\[0\\]: expected a score map named 'fused'"):
        layer_ranks([{"item": s}])


def test_summarize_and_bound():
    ranks = torch.tensor([[[2.0, 4.0], [6.0, 8.0]], [[4.0, 6.0], [8.0, 10.0]]])  # (l=2, b=2, h=2)
    out = summarize(ranks)
    assert out["mean"] == 6.0 and out["per_layer"] == [5.0, 7.0] and out["per_head"] == [5.0, 7.0]
    assert out["std"] == pytest.approx(torch.tensor([4.0, 8.0]).std().item())
    assert rank_bound(torch.tensor([50, 10, 30]), [16, 16, 8]).tolist() == [40, 10, 30]
    assert rank_bound(50, [16]).tolist() == [16]
    with pytest.raises(DIFError, match="widths"):
        rank_bound(50, [])


def test_rank_arguments_are_checked():
    m = torch.eye(3, dtype=torch.float64)
    poisoned = m.clone()
    poisoned[0, 1] = float("nan")
    with pytest.raises(DIFError, match=r"^m: expected finite values .*got 1 non-finite entries in shape \(3, 3\)"):
        numerical_rank(poisoned)
    with pytest.raises(DIFError, match=r"^m: expected finite values"):
        effective_rank(m * float("inf"))
    for kw in (dict(rtol=float("nan")), dict(rtol=-1e-3), dict(atol=float("nan")), dict(atol=-1.0),
               dict(atol=float("inf")), dict(rtol="1e-3")):
        (arg, value), = kw.items()
        with pytest.raises(DIFError, match=rf"^{arg}: expected a finite float >= 0, got {value!r}$"):
            numerical_rank(m, **kw)
    for lengths in (-3, 3.5, True):
        with pytest.raises(DIFError, match=rf"^lengths: expected an int >= 0, got {lengths!r}$"):
            rank_bound(lengths, [4])
    with pytest.raises(DIFError, match=r"^lengths: expected valid lengths >= 0, got lengths in \[-3, 2\]"):
        rank_bound(torch.tensor([2, -3]), [4])
    for bad in (torch.tensor([2.0, 3.0]), torch.tensor([True, True])):
        with pytest.raises(DIFError, match=rf"^lengths: expected an integer tensor .*got dtype {bad.dtype}$"):
            rank_bound(bad, [4])
        with pytest.raises(DIFError, match=rf"^lengths: expected an integer tensor .*got dtype {bad.dtype}$"):
            block_ranks(torch.randn(2, 1, 3, 3), bad)
    assert rank_bound(0, [4]).tolist() == [0.0]


@pytest.mark.parametrize("style,combine", [("sasrecf", "sum"), ("sasrecf", "concat"), ("nova", "sum"),
                                           ("nova", "concat")])
def test_early_fusion_rank_never_exceeds_head_width(style, combine):
    """Theorem 4.1, first claim, for both baselines and both input fusions: rank = min(L, d_h) on random inputs."""
    torch.manual_seed(0)
    b, n, dim, heads = 3, 40, 48, 4
    attr_dims = {"cat": dim, "brand": dim} if combine == "sum" else {"cat": 16, "brand": 8}
    m = EarlyFusionAttention(dim, heads, attr_dims=attr_dims, style=style, combine=combine).double()
    assert head_widths(m) == [12]
    x = torch.randn(b, n, dim, dtype=torch.float64)
    attrs = {a: torch.randn(b, n, d, dtype=torch.float64) for a, d in attr_dims.items()}
    lengths = torch.tensor([40, 25, 7])
    out, maps = m(x, attrs=attrs, pos=torch.randn(n, dim, dtype=torch.float64), is_causal=True, return_scores=True)
    assert out.shape == (b, n, dim) and set(maps) == {"fused", "probs"}
    r = layer_ranks([maps], lengths)
    assert r.shape == (1, b, heads)
    assert torch.equal(r[0], rank_bound(lengths, head_widths(m))[:, None].expand(b, heads))
    assert r[0, 0].tolist() == [12] * heads  # L = 40 > d_h: capped at d_h


@pytest.mark.parametrize("fusion", ["add", "gate", "concat"])
def test_decoupled_rank_reaches_sum_of_head_widths_when_n_allows(fusion):
    """Theorem 4.1, second claim, on random inputs: DIF scores reach min(L, d_h + d_h + sum_j d_hj) > d_h."""
    torch.manual_seed(1)
    n, dim, heads, attr_dims = 50, 32, 4, {"cat": 16, "brand": 8}
    m = DecoupledAttention(dim, heads, attr_dims=attr_dims, fusion=fusion).double()
    assert head_widths(m) == [8, 8, 4, 2]
    lengths = torch.tensor([50, 30, 15])
    x = torch.randn(3, n, dim, dtype=torch.float64)
    attrs = {a: torch.randn(3, n, d, dtype=torch.float64) for a, d in attr_dims.items()}
    _, maps = m(x, attrs=attrs, pos=torch.randn(n, dim, dtype=torch.float64), is_causal=True, return_scores=True)
    r = layer_ranks([maps], lengths)[0]
    assert r.tolist() == [[22] * heads, [22] * heads, [15] * heads]
    assert (layer_ranks([maps], lengths, key="item")[0] <= 8).all()
    assert (layer_ranks([maps], lengths, key="brand")[0] <= 2).all()


def test_encoder_maps_give_one_rank_per_layer():
    torch.manual_seed(0)
    enc = DecoupledEncoder(3, 16, 2, attr_dims={"c": 8}).double()
    x, c = torch.randn(2, 20, 16, dtype=torch.float64), torch.randn(2, 20, 8, dtype=torch.float64)
    _, maps = enc(x, attrs={"c": c}, pos=torch.randn(20, 16, dtype=torch.float64), is_causal=True,
                  return_scores=True)
    r = layer_ranks(maps, torch.tensor([20, 11]))
    assert r.shape == (3, 2, 2)
    assert r[:, 0].unique().tolist() == [20] and r[:, 1].unique().tolist() == [11]  # bound 8 + 8 + 4 = 20
    eff = layer_ranks(maps, torch.tensor([20, 11]), measure="effective")
    assert (eff > 1).all() and (eff <= r).all()


def test_source_spread_is_the_row_std_over_allowed_keys():
    item = torch.tensor([[1.0, 3.0, 100.0], [2.0, 2.0, -50.0], [0.0, 4.0, 8.0]])[None, None]  # (1, 1, 3, 3)
    flat = torch.full((1, 1, 3, 3), 7.0)
    allowed = torch.tensor([[True, True, False], [True, True, False], [True, False, False]])[None, None]
    gates = torch.tensor([[0.25, 0.75], [0.5, 0.5], [1.0, 0.0]])[None, None]
    maps = ScoreMaps(sources={"item": item, "cat": flat}, fused=item, probs=item, gates=gates)
    out = source_spread([maps, maps], allowed)
    assert list(out) == ["item", "cat", "gate item", "gate cat"]
    # row 0: std of (1, 3) = 1; row 1: std of (2, 2) = 0; row 2 has one allowed key and is left out
    assert out["item"].tolist() == [0.5, 0.5] and out["cat"].tolist() == [0.0, 0.0]
    assert out["gate item"].tolist() == [0.375, 0.375] and out["gate cat"].tolist() == [0.625, 0.625]
    no_gates = source_spread([ScoreMaps(sources={"item": item}, fused=item, probs=item)], allowed)
    assert list(no_gates) == ["item"]


def test_source_spread_sees_a_source_that_cannot_move_attention():
    """Every key with the same attribute: the attribute source's rows are constant, whatever its size."""
    torch.manual_seed(0)
    m = DecoupledAttention(16, 2, attr_dims={"cat": 8}, fusion="gate").double()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    same = torch.randn(1, 1, 8, dtype=torch.float64).expand(2, 9, 8) * 10
    _, maps = m(x, attrs={"cat": same}, pos=torch.randn(9, 16, dtype=torch.float64), is_causal=True,
                return_scores=True)
    allowed = torch.ones(9, 9, dtype=torch.bool).tril()[None, None]
    out = source_spread([maps], allowed)
    assert out["cat"].item() < 1e-12 < out["item"].item() and out["position"].item() > 1e-6
    assert out["gate item"] + out["gate position"] + out["gate cat"] == pytest.approx(1.0)


def test_source_spread_errors_name_the_argument():
    s = torch.zeros(1, 1, 3, 3)
    maps = ScoreMaps(sources={"item": s}, fused=s, probs=s)
    ok = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    with pytest.raises(DIFError, match="^layer_maps: expected a non-empty"):
        source_spread([], ok)
    with pytest.raises(DIFError, match="^allowed: expected a bool mask"):
        source_spread([maps], ok.float())
    with pytest.raises(DIFError, match=r"^allowed: expected the score maps' last two dimensions \(3, 3\)"):
        source_spread([maps], torch.ones(1, 1, 4, 4, dtype=torch.bool))
    with pytest.raises(DIFError, match="^allowed"):
        source_spread([maps], torch.ones(3, 3, dtype=torch.bool))
