"""The lean paper-scale step: the fused full-softmax loss, the ``--paper`` presets and the FLOP count of
``examples/paper_epoch.py``."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from cli import paper_config
from dif_attention.models import full_softmax_cross_entropy
from example_helpers import synthetic
from train import TrainConfig, batch_loss, make_model


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 50])
def test_full_softmax_loss_matches_cross_entropy(bias, rows):
    g = torch.Generator().manual_seed(rows)
    h = torch.randn(rows, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2000, 16, generator=g, dtype=torch.float64, requires_grad=True)  # > one chunk of rows
    b = torch.randn(2000, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    t = torch.randint(0, 2000, (rows,), generator=g)
    ours = full_softmax_cross_entropy(h, w, b, t)
    (3.0 * ours).backward()
    got = [x.grad.clone() for x in (h, w, b) if x is not None]
    for x in (h, w, b):
        if x is not None:
            x.grad = None
    ref = F.cross_entropy(h @ w.T + (0 if b is None else b), t, reduction="sum")
    (3.0 * ref).backward()
    want = [x.grad for x in (h, w, b) if x is not None]
    torch.testing.assert_close(ours, ref)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)


def test_full_softmax_loss_under_bf16_autocast_is_close():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(64, 32, generator=g, requires_grad=True)
    w = (0.3 * torch.randn(500, 32, generator=g)).requires_grad_()
    t = torch.randint(0, 500, (64,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = full_softmax_cross_entropy(h, w, None, t)
    assert ours.dtype == torch.float32
    ours.backward()
    ref = F.cross_entropy(h @ w.T, t, reduction="sum")
    dh = torch.autograd.grad(ref, h)[0]
    assert abs(float(ours.detach() - ref.detach())) / float(ref.detach()) < 1e-2
    assert float((h.grad - dh).abs().max()) < 0.02 * float(dh.abs().max())


def test_paper_presets_per_dataset():
    beauty, sports, other = paper_config("beauty"), paper_config("sports"), paper_config("my-data")
    assert (beauty["layers"], beauty["heads"], beauty["lamb"]) == (4, 8, 10.0)
    assert (sports["layers"], sports["heads"], sports["lamb"]) == (3, 8, 5.0)
    assert other == beauty
    assert beauty["dim"] == beauty["ff_dim"] == 256 and beauty["attr_dim"] == 64


def test_paper_flag_resolves_the_dataset_config():
    from cli import config_from_args, parser
    args = parser("t", ["DIFSASRec"]).parse_args(["--dataset", "sports", "--paper", "--lr", "0.001"])
    cfg, model = config_from_args(args)
    assert (model["layers"], model["heads"], cfg.lamb, model["ff_dim"], cfg.lr) == (3, 8, 5.0, 256, 0.001)
    assert (model["hidden_dropout"], model["attn_dropout"], model["fusion"]) == (0.5, 0.3, "gate")


@pytest.mark.parametrize("name, exact", [("SASRec", False), ("SASRecF", False), ("DIFSASRec", False),
                                         ("DIFSASRec", True)])
def test_epoch_flop_count_matches_the_flop_counter(name, exact):
    from paper_epoch import batch_flops
    ds = synthetic()
    cfg = TrainConfig(lamb=1.0)
    model = make_model(ds, name, dict(dim=32, ff_dim=48, layers=2, heads=2, attr_dim=8, max_len=6 if exact else 12,
                                      hidden_dropout=0.0, attn_dropout=0.0, backend="math", exact_fusion=exact))
    ids = torch.tensor([[1, 2, 3, 4, 5, 0], [6, 7, 8, 9, 10, 11]])
    tgt = torch.tensor([[2, 3, 4, 5, 6, 0], [7, 8, 9, 10, 11, 12]])
    with FlopCounterMode(display=False) as counter:
        loss, _ = batch_loss(model, model, (ids.numpy(), tgt.numpy()), cfg, ds.tables, torch.Generator(), 0, 1)
        loss.backward()
    counted = counter.get_total_flops()
    ours = batch_flops(model, cfg, 2, 6, int((tgt != 0).sum()))
    assert abs(ours - counted) / counted < 0.1, (ours, counted)


def test_paper_epoch_refuses_the_exact_fusion_in_all_positions_mode(capsys):
    from paper_epoch import main
    with pytest.raises(SystemExit) as e:
        main(["--modes", "prefix,all", "--exact-fusion", "true"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--exact-fusion true needs --modes prefix" in err and "prefix,all" in err
