"""benchmarks/rank.py, examples/trained_rank.py and examples/visualize.py end to end on tiny configurations."""
import json
import random

import torch

import rank
from dif_attention.analysis import valid_norms

TINY = ["--dim", "16", "--heads", "2", "--layers", "2", "--attr-dim", "8", "--n", "20", "--samples", "6"]


def test_rank_benchmark_at_init_end_to_end(tmp_path):
    rows = rank.main(TINY + ["--skip-trained", "--out", str(tmp_path), "--data", str(tmp_path / "no-data")])
    assert [(r["setting"], r["model"]) for r in rows] == [("init: random sequences", k) for k in rank.KINDS]
    by = {r["model"]: r for r in rows}
    # d_h = 8, n = 20: early fusion capped at 8 in every layer; DIF at min(20, 8 + 8 + 4 + 4) = 20
    for kind in ("SASRecF", "NOVA"):
        assert by[kind]["per_layer"] == [8.0, 8.0] and by[kind]["bound"] == 8.0 and by[kind]["widths"] == [8]
    assert by["DIF"]["per_layer"] == [20.0, 20.0] and by["DIF"]["bound"] == 20.0
    assert by["DIF"]["widths"] == [8, 8, 4, 4]
    src = by["DIF"]["sources"]
    assert list(src) == ["item", "position", "cat", "brand", "fused"] and "sources" not in by["NOVA"]
    assert "sources" not in by["SASRecF"]
    assert src["position"]["rank"] == 8.0 and src["cat"]["rank"] == 4.0 and src["fused"]["rank"] == 20.0
    assert src["item"]["norm"] > 0 and src["fused"]["norm"] > 0
    assert (tmp_path / "img" / "rank.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "rank.json").read_text())
    assert saved["ordering"] == ["init: random sequences: DIF 20.00 > NOVA 8.00 >= SASRecF 8.00 -> holds"]
    assert by["DIF"]["loose"] <= 20.0 and by["SASRecF"]["loose"] <= 8.0
    assert "| init: random sequences | DIF | 20.00 | 20.0 | 20.0 / 20.0 |" in (tmp_path / "rank_table.md").read_text()


def test_real_sequence_settings_respect_lengths(tmp_path):
    """A Beauty-format folder: longest users cut to n, a random sample at natural lengths (bound = L there)."""
    rng = random.Random(0)
    lines = [f"{u} " + " ".join(str(rng.randint(1, 40)) for _ in range(rng.randint(3, 30))) for u in range(1, 31)]
    (tmp_path / "Beauty.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "Beauty_item2attributes.json").write_text(
        json.dumps({str(i): [1 + i % 7, 8 + i % 3] for i in range(1, 41)}))
    settings = rank.beauty_settings(tmp_path, samples=6, n=20, seed=0)
    longest, sample = settings.values()
    assert (longest["lengths"] == 20).all() and sample["lengths"].max() <= 20
    assert longest["num_classes"] == {"attr": 11} and longest["tables"]["attr"].shape == (41, 2)
    rows = rank.run_init(rank.parse(TINY), {"natural": sample})
    for r in rows:
        assert r["mean"] <= r["bound"] + 1e-9
    assert rows[2]["mean"] > rows[0]["mean"]  # DIF > SASRecF where some L > d_h


def test_trained_part_and_visualisation_on_a_tiny_dataset(tmp_path):
    from data import from_sequences

    import trained_rank
    import visualize

    g = torch.Generator().manual_seed(0)
    users = {u: [int(i) for i in torch.randint(1, 31, (14,), generator=g)] for u in range(40)}
    cats = {i: [i % 5, 10 + i % 3] for i in range(1, 31)}
    ds = from_sequences("toy", users, {"cat": cats}, k=0)
    args = trained_rank.parse(TINY + ["--epochs", "1", "--runs", str(tmp_path / "runs")])
    args.datasets = [ds]
    rows = trained_rank.run_trained(args)
    assert [r["model"] for r in rows] == list(rank.KINDS)
    by = {r["model"]: r for r in rows}
    assert by["DIF"]["widths"] == [8, 8, 4]
    assert by["SASRecF"]["mean"] <= 8 and by["NOVA"]["mean"] <= 8 and by["DIF"]["mean"] <= min(14, 20)
    ckpt = list((tmp_path / "runs" / "toy").glob("DIFSASRec-rank-*/seed0/best.pt"))
    assert len(ckpt) == 1
    again = trained_rank.run_trained(args)  # reuses the checkpoints: same numbers
    assert [r["mean"] for r in again] == [r["mean"] for r in rows]

    out = visualize.main(TINY[:8] + ["--length", "10", "--runs", str(tmp_path / "runs"),
                                     "--out", str(tmp_path / "att.png")], dataset=ds)
    assert out.stat().st_size > 10_000


def test_panels_are_attention_rows_or_raw_scores():
    import visualize

    torch.manual_seed(0)
    maps = [{"item": torch.randn(1, 2, 6, 6), "cat": torch.randn(1, 2, 6, 6), "fused": torch.randn(1, 2, 6, 6),
             "probs": torch.rand(1, 2, 6, 6)}]
    rows = visualize.panels(maps, 5, head=1, dim_head=4, show="attention")
    assert list(rows[0]) == ["item", "cat", "fused (model attention)"]
    for m in rows[0].values():
        assert m.shape == (5, 5) and torch.isnan(m.triu(1)).sum() == 10
        torch.testing.assert_close(m.nan_to_num().sum(-1), torch.ones(5, dtype=torch.float64))
    raw = visualize.panels(maps, 5, head=1, dim_head=4, show="raw")[0]
    torch.testing.assert_close(raw["item"].tril(), maps[0]["item"][0, 1, :5, :5].double().tril())
    logits = visualize.panels(maps, 5, head=1, dim_head=4, show="logits")[0]
    assert list(logits) == ["item", "cat", "fused"]
    for name in ("item", "cat"):  # centring keeps the softmax: same attention as show="attention"
        torch.testing.assert_close(logits[name].nan_to_num(float("-inf")).softmax(-1), rows[0][name].nan_to_num())
        torch.testing.assert_close(logits[name].nan_to_num().sum(-1), torch.zeros(5, dtype=torch.float64))


def test_valid_norms_use_the_valid_block_only():
    torch.manual_seed(0)
    s = torch.randn(2, 3, 6, 6)
    norms = valid_norms([{"x": s}], torch.tensor([6, 4]), "x")
    assert norms.shape == (1, 2, 3)
    torch.testing.assert_close(norms[0, 1], s[1, :, :4, :4].double().flatten(-2).norm(dim=-1))
    torch.testing.assert_close(norms[0, 0], s[0].double().flatten(-2).norm(dim=-1))


def test_rank_benchmark_runs_its_trained_half_as_a_subprocess(tmp_path):
    from example_helpers import write_s3rec
    txt = write_s3rec(tmp_path)
    rows = rank.main(TINY + ["--out", str(tmp_path / "out"), "--data", str(tmp_path / "no-data"), "--epochs", "1",
                             "--runs", str(tmp_path / "runs"), "--datasets", str(txt)])
    trained = [r for r in rows if r["setting"].startswith("trained")]
    assert [r["model"] for r in trained] == list(rank.KINDS)
    assert all(r["mean"] <= r["bound"] + 1e-9 for r in trained)
    assert json.loads((tmp_path / "out" / "rank_trained.json").read_text())["rows"] == trained
