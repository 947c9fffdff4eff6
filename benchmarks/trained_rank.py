"""The "after training" half of benchmarks/rank.py: SASRecF, NOVA and DIF-SASRec from examples/models.py,
trained with examples/train.py (once; the checkpoint is reused) and measured on the test histories.

Checkpoints: ``<runs>/<dataset>/<model>-rank-d<dim>h<heads>l<layers>a<attr>n<n>/seed<seed>/best.pt`` (the
tag keeps them apart from the examples' own runs, which use other settings). Training: the examples' defaults
(Adam 1e-3, dropout 0.5, all-position causal training, AAP lambda 10 for DIF, early stopping on validation
NDCG@10, patience 3) for ``--epochs`` epochs (default 10; every family gets the same number), optionally capped
by a training-time budget per model (``--train-seconds``, default 0 = none). A checkpoint of a run that ended
before ``--epochs`` without early stopping (a time budget, an interrupted run) is continued to ``--epochs``.
"""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from dif_attention.analysis import head_widths

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODELS = {"SASRecF": "SASRecF", "NOVA": "NOVA", "DIF": "DIFSASRec"}  # rank.py's name -> examples' name


def config(args):
    from examples.train import TrainConfig

    tag = f"rank-d{args.dim}h{args.heads}l{args.layers}a{args.attr_dim}n{args.n}"
    return TrainConfig(dim=args.dim, heads=args.heads, layers=args.layers, attr_dim=args.attr_dim, max_len=args.n,
                       fusion=args.fusion, epochs=args.epochs or 10, patience=3, seed=args.seed,
                       max_train_seconds=float(getattr(args, "train_seconds", 0.0)), out_dir=str(args.runs),
                       extra={"tag": tag})


def trained_model(dataset, name: str, cfg):
    """The best checkpoint of ``name`` on ``dataset`` (trained now if absent), in eval mode."""
    from examples.models import build_model
    from examples.train import run, run_dir

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
        result = run(dataset, name, replace(cfg, resume=short))
        print(f"[train] {name} on {dataset.name}: test NDCG@10 {result['test']['NDCG@10']:.4f} "
              f"after {result['epochs']} epochs (best {result['best_epoch']})", flush=True)
    model = build_model(name, dataset.info, **cfg.model_kwargs())
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


def run_trained(args, measure) -> list[dict]:
    """Rows like ``rank.run_init``'s for each dataset in ``args.datasets`` and each family."""
    from examples.data import load_dataset

    rows = []
    cfg = config(args)
    for ds_name in args.datasets:  # names for examples.data.load_dataset, or Dataset objects (the tests)
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
            model = trained_model(dataset, name, cfg).double()
            widths = head_widths(model.encoder.layers[0].attn) if kind == "DIF" else [args.dim // args.heads]
            rows.append(dict(setting=f"trained: {dataset.name}, longest users", model=kind,
                             **measure(lambda x: model(x, return_scores=True), ids, lengths, widths)))
    return rows
