"""examples/attribute_check.py: the tables of each variant, the evaluation of a finished run, the command line."""
import pytest
import torch

import attribute_check
from attribute_check import VARIANTS, check_run, check_sources, removed_tables, shuffled_tables, variant_tables
from dif_attention import DIFError
from example_helpers import synthetic, write_s3rec
from train import TrainConfig, run

TINY_MODEL = dict(dim=16, heads=2, layers=1, attr_dim=8, max_len=12, hidden_dropout=0.1, attn_dropout=0.1)


def test_shuffled_tables_permute_the_items_and_keep_padding():
    a = torch.arange(11)[:, None].repeat(1, 2)  # item i has tokens (i, i)
    b = a * 2 + 1
    b[0] = 0
    out = shuffled_tables({"a": a, "b": b}, seed=3)
    assert out["a"][0].tolist() == [0, 0] and out["b"][0].tolist() == [0, 0]
    assert sorted(out["a"][1:, 0].tolist()) == list(range(1, 11))  # a permutation of the items' rows
    assert not torch.equal(out["a"], a)
    assert torch.equal(out["b"][1:], out["a"][1:] * 2 + 1)  # one permutation for every attribute
    assert torch.equal(shuffled_tables({"a": a}, seed=3)["a"], out["a"])  # seeded


def test_removed_and_named_variants():
    t = torch.ones(7, 3, dtype=torch.long)
    assert removed_tables({"a": t})["a"].tolist() == [[0]] * 7
    assert variant_tables("trained", {"a": t})["a"] is t
    with pytest.raises(DIFError, match=r"^variant: expected one of \('trained', 'shuffled', 'removed'\)"):
        variant_tables("none", {"a": t})


def test_check_run_reproduces_the_runs_validation(tmp_path):
    ds = synthetic()
    cfg = TrainConfig(batch_size=16, progress=False, log=False, epochs=3, lr=1e-2, lamb=1.0, out_dir=str(tmp_path))
    result = run(ds, "SASRecF", cfg, TINY_MODEL)
    checked = check_run(tmp_path / "synthetic" / "SASRecF" / "seed0" / "best.pt", ds, repeats=2)
    assert list(checked) == list(VARIANTS)
    assert checked["trained"]["NDCG@10"] == pytest.approx(result["best_valid_ndcg10"], abs=1e-6)
    assert checked["shuffled"] != checked["trained"] and checked["removed"] != checked["trained"]
    run(ds, "SASRec", cfg, TINY_MODEL)
    assert check_run(tmp_path / "synthetic" / "SASRec" / "seed0" / "best.pt", ds) is None


def test_check_sources_of_a_decoupled_model(tmp_path):
    ds = synthetic()
    cfg = TrainConfig(batch_size=16, progress=False, log=False, epochs=1, lr=1e-2, lamb=1.0, out_dir=str(tmp_path))
    run(ds, "DIFSASRec", cfg, TINY_MODEL)
    spread = check_sources(tmp_path / "synthetic" / "DIFSASRec" / "seed0" / "best.pt", ds, users=8)
    assert set(spread) == {"item", "position", *ds.num_classes, "gate item", "gate position",
                           *(f"gate {a}" for a in ds.num_classes)}
    assert all(len(v) == TINY_MODEL["layers"] for v in spread.values())
    assert sum(v[0] for k, v in spread.items() if k.startswith("gate ")) == pytest.approx(1.0)
    run(ds, "SASRecF", cfg, TINY_MODEL)
    assert check_sources(tmp_path / "synthetic" / "SASRecF" / "seed0" / "best.pt", ds) is None


def test_command_line(tmp_path, capsys):
    txt = write_s3rec(tmp_path)
    import sasrec
    sasrec.main(["--dataset", str(txt), "--epochs", "1", "--dim", "16", "--attr-dim", "8", "--max-len", "12",
                 "--layers", "1", "--batch-size", "16", "--out-dir", str(tmp_path / "runs"), "--progress", "false",
                 "--models", "SASRec,DIFSASRec"])
    folder = str(tmp_path / "runs" / "toy")
    text = attribute_check.main([folder, "--dataset", str(txt), "--models", "SASRec,DIFSASRec"])
    rows = [line for line in text.splitlines() if line.startswith("| DIFSASRec | 0 |")]
    assert [r.split(" | ")[2] for r in rows] == list(VARIANTS)
    assert "no attributes" in capsys.readouterr().err  # SASRec is skipped
    text = attribute_check.main([folder, "--dataset", str(txt), "--models", "DIFSASRec", "--sources", "true",
                                 "--users", "5"])
    header = [line for line in text.splitlines() if line.startswith("| model | seed | layer |")]
    assert header and "spread item" in header[0] and "gate position" in header[0]
    layers = [line for line in text.splitlines() if line.startswith("| DIFSASRec | 0 | 0 |")]
    assert len(layers) == 1 and all(float(v) >= 0 for v in layers[0].strip("| ").split(" | ")[3:])
    for argv, message in (([folder, "--dataset", str(txt), "--models", ","], "--models: expected"),
                          ([folder, "--dataset", str(txt), "--models", "NOVA"], "no finished runs"),
                          ([folder, "--dataset", str(txt), "--models", "DIFSASRec", "--repeats", "0"],
                           "--repeats: expected an integer >= 1"),
                          ([folder, "--dataset", str(txt), "--models", "DIFSASRec", "--users", "0"],
                           "--users: expected an integer >= 1")):
        with pytest.raises(SystemExit) as e:
            attribute_check.main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
