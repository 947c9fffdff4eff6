"""Smoke runs of the examples on a tiny synthetic dataset: every model trains, learns, resumes, writes tables."""
import json

import pytest
import torch

from example_helpers import synthetic, write_s3rec
from dif_attention.models import MODELS, load_model
from train import TrainConfig, run

TINY = dict(batch_size=16, save=False, progress=False, log=False)
TINY_MODEL = dict(dim=16, heads=2, layers=1, attr_dim=8, max_len=12, hidden_dropout=0.1, attn_dropout=0.1)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_two_epoch_smoke_and_learning(name):
    ds = synthetic()
    cfg = TrainConfig(**TINY, epochs=2, lr=1e-2, lamb=1.0, patience=5)
    r = run(ds, name, cfg, TINY_MODEL)
    assert r["epochs"] == 2 and len(r["history"]) == 2
    assert all(0.0 <= v <= 1.0 for v in r["test"].values())
    assert r["test"]["Recall@20"] >= r["test"]["Recall@10"]


@pytest.mark.parametrize("name", ["SASRec", "DIFSASRec"])
def test_models_learn_the_walk(name):
    """The next item is a function of the last one: far above the random Recall@10 of 10/30."""
    ds = synthetic()
    cfg = TrainConfig(**TINY, epochs=12, lr=2e-2, lamb=1.0, patience=12)
    model = {**TINY_MODEL, "hidden_dropout": 0.0, "attn_dropout": 0.0}
    assert run(ds, name, cfg, model)["test"]["Recall@10"] > 0.6


def test_prefix_mode_and_resume(tmp_path):
    ds = synthetic()
    cfg = TrainConfig(**{**TINY, "save": True}, epochs=1, out_dir=str(tmp_path), train_mode="prefix", lamb=1.0)
    run(ds, "DIFSASRec", cfg, TINY_MODEL)
    assert (tmp_path / "synthetic" / "DIFSASRec" / "seed0" / "last.pt").exists()
    cfg2 = TrainConfig(**{**TINY, "save": True}, epochs=2, out_dir=str(tmp_path), train_mode="prefix", lamb=1.0,
                       resume=True)
    r = run(ds, "DIFSASRec", cfg2, TINY_MODEL)
    assert r["epochs"] == 2 and [h["epoch"] for h in r["history"]] == [1, 2]
    saved = json.loads((tmp_path / "synthetic" / "DIFSASRec" / "seed0" / "result.json").read_text())
    assert saved["test"] == r["test"] and saved["model_config"]["dim"] == 16
    best = load_model(tmp_path / "synthetic" / "DIFSASRec" / "seed0" / "best.pt")  # carries its own config
    assert type(best).__name__ == "DIFSASRec" and best.dim == 16 and best.max_len == 12


@pytest.mark.parametrize("metric, best, epochs", [("NDCG@10", 5, 5), ("Recall@20", 2, 4)])
def test_valid_metric_picks_the_checkpoint_and_stops(monkeypatch, metric, best, epochs):
    """Scripted validation curves: Recall@20 peaks at epoch 2, NDCG@10 rises to epoch 5. The run keeps the
    checkpoint of the chosen metric's best epoch and stops ``patience`` + 1 validations after it."""
    import numpy as np
    import train
    curve = {"NDCG@10": [0.1, 0.2, 0.3, 0.4, 0.5], "Recall@20": [0.3, 0.9, 0.5, 0.4, 0.2]}
    ds = synthetic()
    valid, test = (ds.split(name, TINY_MODEL["max_len"])[1] for name in ("valid", "test"))
    assert not np.array_equal(valid, test)
    real, seen = train.evaluate, []

    def scripted(model, hist, targets, **kw):
        metrics = real(model, hist, targets, **kw)
        if np.array_equal(targets, valid):
            metrics = {**metrics, **{k: v[len(seen)] for k, v in curve.items()}}
            seen.append(metrics)
        return metrics

    monkeypatch.setattr(train, "evaluate", scripted)
    r = run(ds, "SASRec", TrainConfig(**TINY, epochs=5, patience=1, valid_metric=metric), TINY_MODEL)
    assert r["best_epoch"] == best and r["epochs"] == epochs == len(seen)
    assert r["best_valid"] == curve[metric][best - 1]
    assert r["best_valid_ndcg10"] == curve["NDCG@10"][best - 1]
    assert r["config"]["valid_metric"] == metric


def test_entry_scripts_on_user_files(tmp_path, capsys):
    txt = write_s3rec(tmp_path)
    import bert4rec
    import sasrec
    common = ["--dataset", str(txt), "--epochs", "2", "--dim", "16", "--attr-dim", "8", "--max-len", "12",
              "--layers", "1", "--batch-size", "16", "--out-dir", str(tmp_path / "runs"), "--progress", "false",
              "--seeds", "0,1"]
    res = sasrec.main(common + ["--results", str(tmp_path / "s"), "--models", "SASRec,NOVA"])
    assert [r["model"] for r in res] == ["SASRec", "NOVA"] * 2
    md = (tmp_path / "s.md").read_text()
    assert all(f"| {m} | 2 |" in md for m in ("SASRec", "NOVA")) and "±" in md
    assert json.loads((tmp_path / "s.json").read_text())["results"][0]["dataset"] == "toy"
    res = bert4rec.main(common + ["--results", str(tmp_path / "b"), "--seeds", "0"])
    assert [r["model"] for r in res] == bert4rec.MODELS
    assert "| DIFBERT4Rec | 1 |" in capsys.readouterr().out


def test_ablation_runner(tmp_path):
    import ablation
    txt = write_s3rec(tmp_path)
    res = ablation.main(["--dataset", str(txt), "--epochs", "1", "--dim", "16", "--attr-dim", "8", "--max-len",
                         "12", "--layers", "1", "--batch-size", "32", "--out-dir", str(tmp_path / "runs"),
                         "--progress", "false", "--log", "false", "--results", str(tmp_path / "a"),
                         "--variants", "wo_aap,wo_dif,fusion_gate_exact,frozen_tables"])
    assert [r["variant"] for r in res] == ["wo_aap", "wo_dif", "fusion_gate_exact", "frozen_tables"]
    assert (tmp_path / "runs" / "toy" / "SASRecF-wo_dif" / "seed0" / "result.json").exists()
    md = (tmp_path / "a.md").read_text()
    assert "| wo_dif | 1 |" in md and "frozen" in md


def test_attribute_rates_and_prior_init():
    import numpy as np
    import train
    tables = {"cat": torch.tensor([[0, 0], [1, 2], [2, 0], [3, 3]])}  # item 3 lists token 3 twice: counted once
    items = np.array([[1, 2, 0], [3, 1, 0]])  # targets: items 1, 2, 3, 1 (0 = no target)
    rates = train.attribute_rates(items, tables, {"cat": 4})["cat"]
    torch.testing.assert_close(rates, torch.tensor([0.0, 2 / 4, 3 / 4, 1 / 4]))
    ds = synthetic()
    built = [train.prepare_model(ds, "DIFSASRec", TrainConfig(aap_init=init))[0] for init in ("prior", "zero")]
    prior, zero = (m.predictor.heads["residue"].bias for m in built)
    assert not zero.any()
    # 4 residues, each item has one: every class is positive for about a quarter of the targets
    torch.testing.assert_close(torch.sigmoid(prior[1:]), torch.full((4,), 0.25), atol=0.05, rtol=0)


def test_breakdown_reproduces_the_test_metric(tmp_path, capsys):
    import breakdown
    import sasrec
    txt = write_s3rec(tmp_path)
    res = sasrec.main(["--dataset", str(txt), "--epochs", "1", "--dim", "16", "--attr-dim", "8", "--max-len", "12",
                       "--layers", "1", "--batch-size", "16", "--out-dir", str(tmp_path / "runs"), "--progress",
                       "false", "--log", "false", "--models", "SASRec,DIFSASRec", "--results", str(tmp_path / "s")])
    text = breakdown.main([str(tmp_path / "runs" / "toy"), "--dataset", str(txt), "--models", "SASRec,DIFSASRec",
                           "--seeds", "0"])
    for r in res:  # the rebuilt best checkpoint gives the run's own test NDCG@10 in the "all" column
        row = next(line for line in text.splitlines() if line.startswith(f"| {r['model']} |"))
        assert row.rstrip(" |").endswith(f"{r['test']['NDCG@10']:.4f}")
        assert len(row.split("|")) == 3 + (len(breakdown.EDGES) - 1) + 2  # model, seeds, buckets, all
    import report
    png = tmp_path / "curves.png"
    md = report.main([str(tmp_path / "runs" / "toy"), "--curves", str(png), "--results", str(tmp_path / "r")])
    saved = json.loads((tmp_path / "r.json").read_text())
    assert {r["model"] for r in saved["runs"]} == {"SASRec", "DIFSASRec"}
    assert (tmp_path / "r.md").read_text().startswith(md)
    metrics = {"Recall@10", "Recall@20", "NDCG@10", "NDCG@20"}
    assert all(set(r["test"]) == metrics and r["config"] for r in saved["runs"])
    assert "| DIFSASRec | 1 |" in md
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_curves_are_drawn_at_the_evaluated_epochs(tmp_path):
    """With validation every 2 epochs the curve's x values are the epochs 2, 4, ... of the run, and the mean over
    seeds is taken per epoch, over the seeds evaluated there."""
    import report

    def run_record(seed, values):
        history = [{"epoch": e, "loss": 1.0} for e in range(1, 2 * len(values) + 1)]
        for h, v in zip(history[1::2], values):
            h["valid"] = {"NDCG@10": v}
        return {"model": "DIFSASRec", "seed": seed, "history": history}

    results = [run_record(0, [0.1, 0.3, 0.2]), run_record(1, [0.3, 0.5])]
    drawn = report.plot_curves(results, ["DIFSASRec"], str(tmp_path / "c.png"))
    epochs, mean = drawn["DIFSASRec"]
    assert epochs == [2, 4, 6]
    assert mean == pytest.approx([0.2, 0.4, 0.2])
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_gpu_grid_script_runs_its_grid_and_writes_both_tables(tmp_path):
    """``examples/paper_grid.sh`` (the prepared paper-scale GPU grid) on toy files, on the CPU, one tiny epoch per
    run: every run of the grid ends, each dataset gets its table, and a failing run makes the script fail."""
    import os
    import subprocess
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    data = tmp_path / "data"
    data.mkdir()
    toy = write_s3rec(data, users=50, items=30)
    for name in ("Beauty", "Sports_and_Outdoors"):
        (data / f"{name}.txt").write_text(toy.read_text())
        (data / f"{name}_item2attributes.json").write_text((data / "toy_item2attributes.json").read_text())
    env = {**os.environ, "DATA": str(data), "DEVICE": "cpu", "SEEDS": "0", "JOBS": "5",
           "EXTRA": "--dim 16 --ff-dim 16 --attr-dim 8 --layers 1 --heads 2 --max-len 8 --epochs 1 --eval-every 1"}
    out = tmp_path / "grid"
    proc = subprocess.run(["bash", str(root / "examples" / "paper_grid.sh"), str(out)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for dataset, models in (("beauty", ["SASRec", "SASRecF", "DIFSASRec"]), ("sports", ["SASRec", "DIFSASRec"])):
        rows = json.loads((out / f"{dataset}-paper-gpu.json").read_text())["runs"]
        assert sorted(r["model"] for r in rows) == sorted(f"{m}-gpu-lr0.0003" for m in models), rows
        result = json.loads(next((out / "runs" / dataset).glob("*/seed0/result.json")).read_text())
        assert all(r["device"] == "cpu" for r in rows)
        assert result["config"]["lr"] == 3e-4 and result["model_config"]["dim"] == 16
    (data / "Sports_and_Outdoors.txt").write_text("")
    proc = subprocess.run(["bash", str(root / "examples" / "paper_grid.sh"), str(out)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 1 and "sports-SASRec-seed0: exit 1" in (out / "grid.log").read_text()
