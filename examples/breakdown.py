"""Where do two models differ? Test NDCG@10 of finished runs, split by how often the test
target item occurs in the users' histories (rare targets are where attributes should help most).

Usage::

    python examples/breakdown.py runs/beauty --models SASRec,SASRecF,DIFSASRec-prior --seeds 0,1,2
    python examples/breakdown.py runs/beauty --models SASRec,DIFSASRec --png docs/img/beauty-breakdown.png

Reads ``<folder>/<model>/seed<k>/{result.json,best.pt}`` (written by ``sasrec.py`` / ``ablation.py``), rebuilds
each model from its recorded config and evaluates the best checkpoint on the test split again (full ranking,
as in training). Prints a Markdown table: one row per model, mean over seeds per bucket of target frequency.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from cli import runs_parser, threads, user_errors
from data import load_dataset
from dif_attention.models import load_model
from train import batch_metrics

EDGES = (0, 5, 10, 20, 50, 10**9)  # target-frequency buckets: (0, 5], (5, 10], ...


def per_user_metrics(model, hist: np.ndarray, targets: np.ndarray, batch_size: int = 512) -> dict[str, np.ndarray]:
    """NDCG@10 of every user (row), full ranking, in row order."""
    model.eval()
    parts = [batch_metrics(model, hist[s:s + batch_size], targets[s:s + batch_size], ks=(10,))["NDCG@10"]
             for s in range(0, len(hist), batch_size)]
    return {"NDCG@10": torch.cat(parts).numpy()}


def load_run(folder: Path) -> torch.nn.Module:
    """The run's best checkpoint (written by ``dif_attention.models.save_model``: it carries its own config)."""
    return load_model(folder / "best.pt")


def main(argv=None):
    p = runs_parser(__doc__.splitlines()[0], seeds="0,1,2", example="SASRec,DIFSASRec-prior")
    p.add_argument("--threads", type=threads, default=0)
    p.add_argument("--png", default=None, help="also plot NDCG@10 per bucket to this PNG (needs matplotlib)")
    args = p.parse_args(argv)
    models, seeds = [m for m in args.models.split(",") if m], args.seeds
    if not models:
        p.error(f"--models: expected comma-separated run folders, got {args.models!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = Path(args.folder)
    with user_errors(p):
        dataset = load_dataset(args.dataset or folder.name, attributes=args.attributes)
        return report(p, args, folder, dataset, models, seeds)


def report(p, args, folder: Path, ds, models: list[str], seeds: list[int]) -> str:
    """The breakdown table of the runs ``folder/<model>/seed<k>`` (and the PNG of ``args.png``)."""
    counts = None
    rows = {}
    for name in models:
        per_seed = []
        for seed in seeds:
            run = folder / name / f"seed{seed}"
            if not (run / "best.pt").exists():
                print(f"skipping {run}: no best.pt", file=sys.stderr)
                continue
            model = load_run(run)
            hist, tgt = ds.split("test", model.max_len)
            if counts is None:
                counts = np.bincount(hist[hist != 0], minlength=ds.num_items + 1)
                bucket = np.digitize(counts[tgt], EDGES[1:-1], right=True)
            per_seed.append(per_user_metrics(model, hist, tgt))
        if per_seed:
            rows[name] = per_seed
    if not rows:
        p.error("no finished runs found")
    labels = [f"({lo}, {hi}]" if hi < 10**9 else f"> {lo}" for lo, hi in zip(EDGES[:-1], EDGES[1:])]
    sizes = [int((bucket == b).sum()) for b in range(len(labels))]
    head = "| model | seeds | " + " | ".join(f"{lab} ({n} users)" for lab, n in zip(labels, sizes)) + " | all |"
    lines = ["Test NDCG@10 by how often the target item occurs in the test histories (mean over seeds).", "",
             head, "|---|---|" + "---|" * (len(labels) + 1)]
    curves = {}
    for name, per_seed in rows.items():
        cells = []
        for b in range(len(labels)):
            vals = [m["NDCG@10"][bucket == b].mean() for m in per_seed] if sizes[b] else [np.nan]
            cells.append(float(np.mean(vals)))
        curves[name] = cells
        overall = float(np.mean([m["NDCG@10"].mean() for m in per_seed]))
        shown = " | ".join("-" if np.isnan(c) else f"{c:.4f}" for c in cells)
        lines.append(f"| {name} | {len(per_seed)} | {shown} | {overall:.4f} |")
    text = "\n".join(lines) + f"\n\nCommand: `python {' '.join(sys.argv)}`\n"
    print(text)
    if args.png:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4))
        x = np.arange(len(labels))
        width = 0.8 / len(curves)
        for i, (name, cells) in enumerate(curves.items()):
            ax.bar(x + i * width - 0.4 + width / 2, cells, width, label=name)
        ax.set_xticks(x, [f"{lab}\n{n} users" for lab, n in zip(labels, sizes)])
        ax.set_xlabel("occurrences of the test target in the histories")
        ax.set_ylabel("test NDCG@10")
        ax.set_title(f"{ds.name}: NDCG@10 by target frequency")
        ax.legend()
        fig.tight_layout()
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.png, dpi=120)
        print(f"wrote {args.png}")
    return text


if __name__ == "__main__":
    main()
