"""The inference step of DecoupledEncoder (eval mode, no gradients, one new position over cached keys): the same
numbers as the general cached path, packed caches that are never changed once handed out, plans that follow the
weights, and the models' lean step inputs."""
from __future__ import annotations

import pytest
import torch

from dif_attention import DecoupledEncoder, KVCache, item_attribute_table
from dif_attention.models import build_model

V, MAX_LEN = 40, 8


def encoder(fusion, norm_first, bias=True, seed=0):
    torch.manual_seed(seed)
    enc = DecoupledEncoder(2, 16, 2, attr_dims={"c": 8, "d": 4}, fusion=fusion, norm_first=norm_first,
                           bias=bias).eval()
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return enc


def run(enc, x, attrs, pos, keep, chunks, lean):
    """The encoder over ``chunks`` of positions with a cache; ``lean`` lets the inference step run."""
    cache, outs = [KVCache()] * 2, []
    with torch.set_grad_enabled(not lean):
        for lo, hi in chunks:
            p = pos[lo:hi] if pos.ndim == 2 else pos[:, lo:hi]
            out, cache = enc(x[:, lo:hi], attrs={a: t[:, lo:hi] for a, t in attrs.items()}, pos=p,
                             mask=None if keep is None else keep[:, None, None, :hi], cache=cache)
            outs.append(out.detach())
    return torch.cat(outs, 1), cache


@pytest.mark.parametrize("fusion", ["add", "concat", "gate"])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("per_row_pos", [False, True])
def test_inference_step_equals_the_general_cached_path(fusion, norm_first, masked, per_row_pos):
    enc = encoder(fusion, norm_first)
    b, n = 3, 9
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, n, 16, generator=g)
    attrs = {"c": torch.randn(b, n, 8, generator=g), "d": torch.randn(b, n, 4, generator=g)}
    pos = torch.randn(b, n, 16, generator=g) if per_row_pos else torch.randn(n, 16, generator=g)
    keep = None
    if masked:
        keep = torch.ones(b, n, dtype=torch.bool)
        keep[1, 2] = keep[2, 0] = False  # padded slots in the middle
    chunks = [(0, 4)] + [(i, i + 1) for i in range(4, n)]  # a prefill, then one position at a time
    want, want_cache = run(enc, x, attrs, pos, keep, chunks, lean=False)
    got, got_cache = run(enc, x, attrs, pos, keep, chunks, lean=True)
    assert (got - want).abs().max() < 1e-5
    for gc, wc in zip(got_cache, want_cache):
        assert gc.packed_keys is not None and wc.packed_keys is None  # the step ran, and only where it may
        assert gc.length == wc.length == n
        for kg, kw in zip(gc.keys, wc.keys):
            assert kg.shape[1:] == kw.shape[1:]
            assert (kg - kw).abs().max() < 1e-5  # (b, h, m, e_s): the position stream per row
        assert (gc.value - wc.value).abs().max() < 1e-5


def test_inference_step_without_biases_and_a_fully_masked_row():
    enc = encoder("gate", False, bias=False)
    x, pos = torch.randn(2, 5, 16), torch.randn(5, 16)
    attrs = {"c": torch.randn(2, 5, 8), "d": torch.randn(2, 5, 4)}
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[1] = False  # a row that may attend nothing: zeros, as the general path
    chunks = [(0, 3), (3, 4), (4, 5)]
    want, _ = run(enc, x, attrs, pos, keep, chunks, lean=False)
    got, cache = run(enc, x, attrs, pos, keep, chunks, lean=True)
    assert cache[0].packed_keys is not None
    assert torch.isfinite(got).all() and (got - want).abs().max() < 1e-5


def test_training_mode_and_gradients_take_the_general_path():
    enc = encoder("gate", False)
    x, pos, attrs = torch.randn(1, 3, 16), torch.randn(3, 16), {"c": torch.randn(1, 3, 8), "d": torch.randn(1, 3, 4)}
    _, cache = enc(x[:, :2], attrs={a: t[:, :2] for a, t in attrs.items()}, pos=pos[:2], cache=[KVCache()] * 2)
    step = dict(attrs={a: t[:, 2:] for a, t in attrs.items()}, pos=pos[2:], cache=cache)
    _, grown = enc(x[:, 2:], **step)  # gradients on
    assert grown[0].packed_keys is None
    with torch.no_grad():
        _, grown = enc.train()(x[:, 2:], **step)
    assert grown[0].packed_keys is None
    with torch.inference_mode():
        _, grown = enc.eval()(x[:, 2:], **step)
    assert grown[0].packed_keys is not None


def make(name="DIFSASRec", pooling="sum", **kw):
    torch.manual_seed(0)
    table = item_attribute_table({i: [i % 5 + 1, i % 3 + 6][: 1 + i % 2] for i in range(1, V + 1)}, num_items=V + 1)
    model = build_model(name, strict=False, num_items=V, dim=16, heads=2, layers=2, max_len=MAX_LEN, attr_dim=8,
                        hidden_dropout=0.0, attn_dropout=0.0, item_tables={"c": table, "e": table % 4},
                        num_classes={"c": 9, "e": 4}, pooling=pooling, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


@pytest.mark.parametrize("pooling", ["sum", "mean", "max"])
@pytest.mark.parametrize("input_fusion", [False, True])
def test_step_inputs_equal_inputs(pooling, input_fusion):
    model = make(pooling=pooling, input_fusion=input_fusion)
    items, positions = torch.tensor([3, 8, 40]), torch.tensor([0, 5, 7])
    x, side = model.step_inputs(items, positions)
    wx, wside = model.inputs(items[:, None], positions=positions[:, None])
    torch.testing.assert_close(x, wx)
    torch.testing.assert_close(side["pos"], wside["pos"])
    for a in side["attrs"]:
        torch.testing.assert_close(side["attrs"][a], wside["attrs"][a])


def grown(rows, items):
    return [r + [i] for r, i in zip(rows, items.tolist())]


def padded(rows):
    width = max(len(r) for r in rows)
    return torch.tensor([r + [0] * (width - len(r)) for r in rows])


@pytest.mark.parametrize("name", ["SASRec", "DIFSASRec"])
def test_branching_states_stay_exact(name):
    """A state stepped twice (two different next items) and both branches stepped on: in-place appends never
    change a cache another state holds."""
    model = make(name)
    rows = [[1, 2, 3], [4, 5]]
    a = model.start(padded(rows))
    x, y, z = torch.tensor([6, 7]), torch.tensor([8, 9]), torch.tensor([10, 11])
    _, b = model.step(a, x)
    _, c = model.step(a, y)  # a second step from a: copies
    sb, b2 = model.step(b, z)  # b is still the latest of its buffer
    sc, c2 = model.step(c, z)
    sb_again, _ = model.step(b, y)
    for scores, hist in ((sb, grown(grown(rows, x), z)), (sc, grown(grown(rows, y), z)),
                         (sb_again, grown(grown(rows, x), y))):
        assert (scores - model.next_scores(padded(hist))).abs().max() < 1e-4
    assert b2.caches[0].packed_keys is not None


def test_plan_follows_the_weights():
    model = make()
    hist = torch.tensor([[1, 2, 3]])
    state = model.start(hist)
    model.step(state, torch.tensor([4]))  # builds the plan
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1)  # in place: a new version
    state = model.start(hist)
    scores, _ = model.step(state, torch.tensor([4]))
    assert (scores - model.next_scores(torch.tensor([[1, 2, 3, 4]]))).abs().max() < 1e-4
    model.load_state_dict(make().state_dict())
    state = model.start(hist)
    scores, _ = model.step(state, torch.tensor([4]))
    assert (scores - model.next_scores(torch.tensor([[1, 2, 3, 4]]))).abs().max() < 1e-4


def test_long_growth_reallocates_and_stays_exact():
    """More steps than the first buffer has room for (the buffer grows by a copy)."""
    model = make("DIFSASRec", fusion="gate")
    model.max_len = 80  # positions beyond the table are not read: the history stays below 8 + 40 positions
    model.pos_emb = torch.nn.Embedding(80, 16)
    rows = [[1]]
    state = model.start(padded(rows))
    g = torch.Generator().manual_seed(0)
    for _ in range(45):
        item = torch.randint(1, V + 1, (1,), generator=g)
        scores, state = model.step(state, item)
        rows = grown(rows, item)
    assert (scores - model.next_scores(padded(rows))).abs().max() < 1e-4
