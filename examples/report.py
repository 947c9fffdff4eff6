"""Collect finished runs into one table: ``runs/<dataset>/<model>/seed<k>/result.json`` -> Markdown.

Usage::

    python examples/report.py runs/beauty                          # every model folder found
    python examples/report.py runs/beauty --models SASRec,SASRecF,DIFSASRec --seeds 0,1,2
    python examples/report.py runs/beauty --curves docs/img/beauty-valid.png   # + validation curves (PNG)

Useful when seeds ran as separate processes (one per core); rows are mean ± std over the seeds found.
"""
import argparse
import json
import sys
from pathlib import Path

from cli import table


def collect(folder: Path, models: list[str] | None, seeds: list[int] | None) -> tuple[list[dict], list[str]]:
    results = []
    for f in sorted(folder.glob("*/seed*/result.json")):
        r = json.loads(f.read_text())
        r["model"] = f.parent.parent.name  # includes a variant tag, e.g. DIFSASRec-wo_aap
        if (models is None or r["model"] in models) and (seeds is None or r["seed"] in seeds):
            results.append(r)
    names = models or sorted({r["model"] for r in results})
    return results, names


def plot_curves(results: list[dict], names: list[str], path: str, metric: str = "NDCG@10") -> None:
    """Validation ``metric`` after each epoch, mean over the seeds that reached that epoch (thin lines: seeds)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, name in enumerate(names):
        runs = [[h["valid"][metric] for h in r["history"] if "valid" in h] for r in results if r["model"] == name]
        if not runs:
            continue
        color = f"C{i}"
        for c in runs:
            ax.plot(range(1, len(c) + 1), c, color=color, alpha=0.25, lw=0.8)
        longest = max(len(c) for c in runs)
        mean = [sum(c[e] for c in runs if len(c) > e) / sum(len(c) > e for c in runs) for e in range(longest)]
        ax.plot(range(1, longest + 1), mean, color=color, lw=2, label=f"{name} ({len(runs)} seeds)")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation {metric}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder")
    p.add_argument("--models", default=None)
    p.add_argument("--seeds", default=None)
    p.add_argument("--curves", default=None, help="also plot the validation NDCG@10 curves to this PNG")
    args = p.parse_args(argv)
    models = args.models.split(",") if args.models else None
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    results, names = collect(Path(args.folder), models, seeds)
    md = table(results, names)
    total = sum(r["train_seconds"] for r in results)
    print(md + f"\n\n{len(results)} runs, {total:.0f} s of training in total.")
    if args.curves:
        plot_curves(results, names, args.curves)
    return md


if __name__ == "__main__":
    main()
