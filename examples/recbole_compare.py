"""Speed and quality of our SASRec against RecBole 1.2.1's SASRec on MovieLens-100K .

Same split (5-core, stable chronological leave-one-out), same model size (hidden 64, 2 layers, 2 heads,
inner 256, dropout 0.5, max_len 50), same optimiser (Adam, lr 1e-3), batch 2048, full-softmax CE, full ranking,
validation NDCG@10. Reports, in one run on one machine:

(a) seconds per epoch over the same one-sample-per-prefix training set (target: ours <= 0.25x RecBole's);
(b) wall time (training seconds, evaluation excluded) until the validation NDCG@10 first reaches RecBole's best;
(c) the same for our all-positions training option (``--train-mode all``), which is far cheaper per epoch.

RecBole is never a dependency of dif-attention. To install it next to torch 2.13 (in a separate venv is best)::

    pip install "recbole==1.2.1" "setuptools<81" "numpy<2" "pandas<2.3" scipy
    export TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1     # RecBole 1.2.1 loads its checkpoints with torch.load

Usage::

    python examples/recbole_compare.py --epochs 10 --threads 2          # writes runs/recbole_compare.{md,json}
    python examples/recbole_compare.py --skip-recbole --recbole-json old.json   # reuse a RecBole measurement
    python examples/recbole_compare.py --estimate-steps 4 --threads 2   # no RecBole: extrapolate our prefix epoch

Without RecBole installed the script prints these instructions and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: the model both sides train (RecBole's SASRec settings above)
MODEL = dict(dim=64, layers=2, heads=2, max_len=50, hidden_dropout=0.5, attn_dropout=0.5, ff_dim=256)
INSTALL = __doc__[__doc__.index("RecBole is never"):__doc__.index("Usage::")].strip()


def measure_recbole(epochs: int, seed: int, data_folder: Path) -> dict:
    """Train RecBole's SASRec, timing each training epoch and recording each validation NDCG@10."""
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.model.sequential_recommender import SASRec
    from recbole.trainer import Trainer
    from recbole.utils import init_seed

    ckpt = tempfile.mkdtemp(prefix="recbole_ckpt_")
    config = Config(model="SASRec", dataset="ml-100k", config_dict={
        "data_path": str(data_folder.parent), "checkpoint_dir": ckpt, "use_gpu": False, "device": "cpu",
        "seed": seed, "reproducibility": True, "show_progress": False,
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "user_inter_num_interval": "[5,inf)", "item_inter_num_interval": "[5,inf)",
        "MAX_ITEM_LIST_LENGTH": 50, "hidden_size": 64, "inner_size": 256, "n_layers": 2, "n_heads": 2,
        "hidden_dropout_prob": 0.5, "attn_dropout_prob": 0.5, "hidden_act": "gelu", "loss_type": "CE",
        "train_neg_sample_args": None, "learning_rate": 1e-3, "train_batch_size": 2048, "eval_batch_size": 2048,
        "epochs": epochs, "eval_step": 1, "stopping_step": epochs, "metrics": ["Recall", "NDCG"], "topk": [10, 20],
        "valid_metric": "NDCG@10",
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
    })
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    model = SASRec(config, train_data.dataset)
    trainer = Trainer(config, model)
    epochs_s, valid = [], []
    train_epoch, valid_epoch = trainer._train_epoch, trainer._valid_epoch

    def timed_train(*a, **k):
        t = time.perf_counter()
        out = train_epoch(*a, **k)
        epochs_s.append(time.perf_counter() - t)
        return out

    def recorded_valid(*a, **k):
        score, result = valid_epoch(*a, **k)
        valid.append(float(result["ndcg@10"]))
        return score, result

    trainer._train_epoch, trainer._valid_epoch = timed_train, recorded_valid
    trainer.fit(train_data, valid_data, saved=True, show_progress=False)
    test = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
    best = max(valid)
    cum = [sum(epochs_s[:i + 1]) for i in range(len(epochs_s))]
    return {"samples": len(train_data.dataset), "seconds_per_epoch": sorted(epochs_s)[len(epochs_s) // 2],
            "epoch_seconds": epochs_s, "valid_ndcg10": valid, "best_valid_ndcg10": best,
            "time_to_best": cum[valid.index(best)], "test": {k: float(v) for k, v in test.items()}}


def measure_ours(mode: str, epochs: int, seed: int, target: float | None, batch_size: int) -> dict:
    from data import load_dataset
    from train import TrainConfig, run
    ds = load_dataset("ml-100k")
    cfg = TrainConfig(lr=1e-3, batch_size=batch_size, epochs=epochs, patience=epochs, train_mode=mode, seed=seed,
                      save=False, progress=False, out_dir=str(ROOT / "runs" / "recbole_compare"))
    r = run(ds, "SASRec", cfg, MODEL)
    valid = [h["valid"]["NDCG@10"] for h in r["history"]]
    cum = [sum(h["epoch_seconds"] for h in r["history"][:i + 1]) for i in range(len(valid))]
    reach = next((c for v, c in zip(valid, cum) if target is not None and v >= target), None)
    samples = len(ds.prefix_samples(50)[1]) if mode == "prefix" else len(ds.window_samples(50)[0])
    return {"mode": mode, "samples": samples, "seconds_per_epoch": r["seconds_per_epoch"],
            "epoch_seconds": [h["epoch_seconds"] for h in r["history"]], "valid_ndcg10": valid,
            "best_valid_ndcg10": max(valid), "time_to_target": reach, "test": r["test"]}


def estimate_prefix_epoch(models: list[str], steps: int) -> list[dict]:
    """Without RecBole: time ``steps`` training steps (after one warm-up step) of our one-sample-per-prefix
    epoch (batch 2048) and extrapolate to a whole epoch; CPU time is reported too (less sensitive to a
    busy machine than wall time)."""
    import torch
    from data import load_dataset
    from train import TrainConfig, batch_loss, epoch_batches, make_model, trim_width
    ds = load_dataset("ml-100k")
    x, y = ds.prefix_samples(50)
    out = []
    for name in models:
        cfg = TrainConfig(batch_size=2048, train_mode="prefix")
        model = make_model(ds, name, MODEL)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        batches = epoch_batches(x, cfg, torch.Generator().manual_seed(0))
        for i, idx in enumerate(batches[:steps + 1]):
            if i == 1:
                c0, w0 = time.process_time(), time.perf_counter()
            w = trim_width(x[idx], model)
            loss, _ = batch_loss(model, model, (x[idx, :w], y[idx]), cfg, ds.tables, torch.Generator(), 0, 1)
            opt.zero_grad()
            loss.backward()
            opt.step()
        cpu, wall = (time.process_time() - c0) / steps, (time.perf_counter() - w0) / steps
        out.append({"model": name, "steps_per_epoch": len(batches), "cpu_per_step": cpu, "wall_per_step": wall,
                    "cpu_per_epoch": cpu * len(batches), "wall_per_epoch": wall * len(batches)})
        print(f"{name}: {len(batches)} steps/epoch; per step CPU {cpu:.2f} s, wall {wall:.2f} s -> epoch CPU "
              f"{cpu * len(batches):.0f} s, wall {wall * len(batches):.0f} s", flush=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10, help="epochs for RecBole and for our prefix run")
    p.add_argument("--all-epochs", type=int, default=0, help="epochs for our all-positions run (default 3x)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--skip-recbole", action="store_true", help="do not run RecBole; needs --recbole-json")
    p.add_argument("--recbole-json", default=None, help="a previous RecBole measurement (this script's JSON)")
    p.add_argument("--out", default=str(ROOT / "runs" / "recbole_compare"))
    p.add_argument("--estimate-steps", type=int, default=0,
                   help="no RecBole: time this many steps of our prefix epoch (SASRec, DIFSASRec) and extrapolate")
    args = p.parse_args(argv)
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.estimate_steps:
        estimate_prefix_epoch(["SASRec", "DIFSASRec"], args.estimate_steps)
        return 0
    from data import fetch_ml100k
    if args.skip_recbole:
        if not args.recbole_json:
            p.error("--skip-recbole needs --recbole-json")
        rb = json.loads(Path(args.recbole_json).read_text())["recbole"]
    else:
        try:
            import recbole  # noqa: F401
        except ImportError:
            print("RecBole is not installed; nothing to compare against.\n\n" + INSTALL, file=sys.stderr)
            return 2
        t = time.perf_counter()
        rb = measure_recbole(args.epochs, args.seed, fetch_ml100k())
        rb["wall_seconds"] = time.perf_counter() - t
    target = rb["best_valid_ndcg10"]
    prefix = measure_ours("prefix", args.epochs, args.seed, target, 2048)
    allpos = measure_ours("all", args.all_epochs or 3 * args.epochs, args.seed, target, 128)
    machine = (f"{platform.machine()} {platform.system()}, {torch.get_num_threads()} torch threads, "
               f"torch {torch.__version__}")
    fmt = lambda x: "not reached" if x is None else f"{x:.0f} s"  # noqa: E731
    rows = [("RecBole 1.2.1 SASRec (prefix samples)", rb["samples"], rb["seconds_per_epoch"], 1.0,
             rb["best_valid_ndcg10"], f"{rb['time_to_best']:.0f} s", rb["test"].get("ndcg@10")),
            ("ours SASRec, --train-mode prefix", prefix["samples"], prefix["seconds_per_epoch"],
             prefix["seconds_per_epoch"] / rb["seconds_per_epoch"], prefix["best_valid_ndcg10"],
             fmt(prefix["time_to_target"]), prefix["test"]["NDCG@10"]),
            ("ours SASRec, --train-mode all (batch 128 windows)", allpos["samples"], allpos["seconds_per_epoch"],
             allpos["seconds_per_epoch"] / rb["seconds_per_epoch"], allpos["best_valid_ndcg10"],
             fmt(allpos["time_to_target"]), allpos["test"]["NDCG@10"])]
    md = ["| run | training rows | s/epoch (median) | x RecBole | best valid NDCG@10 | train time to RecBole's best "
          "| test NDCG@10 |", "|---|---|---|---|---|---|---|"]
    md += [f"| {r[0]} | {r[1]} | {r[2]:.1f} | {r[3]:.2f} | {r[4]:.4f} | {r[5]} | {r[6]:.4f} |" for r in rows]
    text = "\n".join(md) + f"\n\nCommand: `python {' '.join(sys.argv)}`  \nMachine: {machine}\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"recbole": rb, "ours_prefix": prefix, "ours_all": allpos,
                                                    "machine": machine}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
