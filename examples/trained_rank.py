"""The "after training" half of ``benchmarks/rank.py``: SASRecF, NOVA and DIF-SASRec (the library's models),
trained with this folder's training loop (once; the checkpoint is reused) and measured on the test histories.

    python examples/trained_rank.py --json rank_trained.json      # ML-100K and Beauty, d=64, 4 heads, 2 layers

``benchmarks/rank.py`` runs this as a subprocess with its own settings and merges the rows. Checkpoints:
``<runs>/<dataset>/<model>-rank-d<dim>h<heads>l<layers>a<attr>n<n>/seed<seed>/best.pt`` (the tag keeps them apart
from the examples' own runs). Training: Adam 1e-3, dropout 0.5, every position of a window trained at once, AAP
lambda 10 for DIF, early stopping on validation NDCG@10 with patience 3, for ``--epochs`` epochs (default 10;
every family gets the same), optionally capped by a training-time budget per model (``--train-seconds``). A
checkpoint of a run that ended before ``--epochs`` without early stopping is continued to ``--epochs``.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from data import load_dataset
from dif_attention.analysis import head_widths, rank_report
from dif_attention.models import load_model
from train import TrainConfig, run, run_dir

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"SASRecF": "SASRecF", "NOVA": "NOVA", "DIF": "DIFSASRec"}  # the rank benchmark's family -> model
LOOSE_RTOL = 1e-3


def settings(args) -> tuple[TrainConfig, dict]:
    tag = f"rank-d{args.dim}h{args.heads}l{args.layers}a{args.attr_dim}n{args.n}"
    cfg = TrainConfig(epochs=args.epochs or 10, patience=3, seed=args.seed, max_train_seconds=args.train_seconds,
                      out_dir=str(args.runs), tag=tag, progress=False)
    model = dict(dim=args.dim, heads=args.heads, layers=args.layers, attr_dim=args.attr_dim, max_len=args.n,
                 fusion=args.fusion)
    return cfg, model


def trained_model(dataset, name: str, cfg: TrainConfig, model: dict):
    """The best checkpoint of ``name`` on ``dataset`` (trained now if absent), in eval mode."""
    folder = run_dir(cfg, dataset.name, name)
    path = folder / "best.pt"
    short = False
    if path.exists() and (folder / "result.json").exists() and (folder / "last.pt").exists():
        done = json.loads((folder / "result.json").read_text())
        stopped = done["epochs"] - done["best_epoch"] > cfg.patience
        short = done["epochs"] < cfg.epochs and not stopped
    if not path.exists() or short:
        what = "continuing the checkpoint" if short else f"no checkpoint at {path}"
        budget = f", <= {cfg.max_train_seconds:.0f} s" if cfg.max_train_seconds else ""
        print(f"[train] {name} on {dataset.name}: {what}, training to {cfg.epochs} epochs{budget}", flush=True)
        result = run(dataset, name, replace(cfg, resume=short), model)
        print(f"[train] {name} on {dataset.name}: test NDCG@10 {result['test']['NDCG@10']:.4f} "
              f"after {result['epochs']} epochs (best {result['best_epoch']})", flush=True)
    return load_model(path)


def run_trained(args) -> list[dict]:
    """Rows like ``benchmarks/rank.py``'s for each dataset in ``args.datasets`` and each family."""
    rows = []
    cfg, model_settings = settings(args)
    for ds_name in args.datasets:  # names for data.load_dataset, or Dataset objects (the tests)
        try:
            dataset = load_dataset(ds_name) if isinstance(ds_name, (str, Path)) else ds_name
        except Exception as e:  # a missing file or no network for the ML-100K download: say so, keep going
            print(f"[skip] {ds_name}: {e}", file=sys.stderr)
            continue
        hist, _ = dataset.split("test", args.n)  # (users, n) right-padded test histories
        ids = torch.from_numpy(hist)
        lengths = (ids != 0).sum(1)
        order = torch.argsort(lengths, descending=True, stable=True)[:args.samples]
        ids, lengths = ids[order], lengths[order]
        for kind, name in MODELS.items():
            model = trained_model(dataset, name, cfg, model_settings).double()
            widths = head_widths(model.encoder.layers[0].attn) if kind == "DIF" else [args.dim // args.heads]
            rows.append(dict(setting=f"trained: {dataset.name}, longest users", model=kind,
                             **rank_report(lambda x: model(x, return_scores=True), ids, lengths, widths,
                                           loose_rtol=LOOSE_RTOL)))
    return rows


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--attr-dim", type=int, default=32)
    p.add_argument("--n", type=int, default=50, help="max sequence length")
    p.add_argument("--fusion", default="gate")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--datasets", nargs="+", default=["ml-100k", "beauty"])
    p.add_argument("--epochs", type=int, default=None, help="epochs per model (default 10)")
    p.add_argument("--train-seconds", type=float, default=0.0, help="time budget per model (0: none)")
    p.add_argument("--runs", type=Path, default=ROOT / "runs", help="checkpoint root")
    p.add_argument("--json", type=Path, default=None, help="write {'rows': [...]} here")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse(argv)
    rows = run_trained(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
