"""Collect finished runs into one table: ``runs/<dataset>/<model>/seed<k>/result.json`` -> Markdown.

Usage::

    python examples/report.py runs/beauty                          # every model folder found
    python examples/report.py runs/beauty --models SASRec,SASRecF,DIFSASRec --seeds 0,1,2
    python examples/report.py runs/beauty --curves docs/img/beauty-valid.png   # + validation curves (PNG)

Useful when seeds ran as separate processes (one per core); rows are mean ± std over the seeds found.
"""
import json
import sys
from pathlib import Path

from cli import Parser, results_file, seed_list, table, user_errors
from data import DataError
from train import SILENT_SETTINGS


def collect(folder: Path, models: list[str] | None, seeds: list[int] | None) -> tuple[list[dict], list[str]]:
    """The ``result.json`` of every run under ``folder`` (of the ``models`` and ``seeds`` given) and the model
    names in table order. An unreadable file raises ``DataError`` naming it."""
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder")
    results = []
    for f in sorted(folder.glob("*/seed*/result.json")):
        try:
            r = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"{f}: not a readable result file ({err})") from None
        r["model"] = f.parent.parent.name  # includes a variant tag, e.g. DIFSASRec-wo_aap
        if (models is None or r["model"] in models) and (seeds is None or r["seed"] in seeds):
            results.append(r)
    names = models or sorted({r["model"] for r in results})
    return results, names


def mixed_settings(results: list[dict], name: str) -> list[str]:
    """The settings in which the seeds of run folder ``name`` differ (training settings other than the seed and
    :data:`train.SILENT_SETTINGS`, model settings, attributes): a mean over them mixes different runs."""
    runs = [r for r in results if r["model"] == name]
    seen = [{**{k: v for k, v in r["config"].items() if k not in SILENT_SETTINGS and k != "seed"},
             **r.get("model_config", {}), "attributes": r.get("attributes")} for r in runs]
    return sorted({k for s in seen for k in s if any(t.get(k) != s.get(k) for t in seen)})


def plot_curves(results: list[dict], names: list[str], path: str, metric: str = "NDCG@10") -> dict:
    """Validation ``metric`` at each evaluated epoch (the epoch number of the run, so `--eval-every 2` plots
    epochs 2, 4, ...), mean over the seeds evaluated at that epoch (thin lines: seeds). Returns the mean curves
    drawn: model name -> ``(epochs, means)``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = {}
    for i, name in enumerate(names):
        runs = [{h["epoch"]: h["valid"][metric] for h in r["history"] if "valid" in h}
                for r in results if r["model"] == name]
        if not runs:
            continue
        color = f"C{i}"
        for c in runs:
            ax.plot(list(c), list(c.values()), color=color, alpha=0.25, lw=0.8)
        epochs = sorted(set().union(*runs))
        mean = [sum(c[e] for c in runs if e in c) / sum(e in c for c in runs) for e in epochs]
        ax.plot(epochs, mean, color=color, lw=2, label=f"{name} ({len(runs)} seed{'s' if len(runs) > 1 else ''})")
        drawn[name] = (epochs, mean)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation {metric}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")
    return drawn


def main(argv=None):
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("folder")
    p.add_argument("--models", default=None, help="comma-separated run folders (default: all)")
    p.add_argument("--seeds", type=seed_list, default=None, help="comma-separated seeds (default: all)")
    p.add_argument("--curves", default=None, help="also plot the validation NDCG@10 curves to this PNG")
    p.add_argument("--results", default=None, help="also write RESULTS.md (the table) and RESULTS.json (each run's "
                   "model, seed, settings, test metrics, epochs and training time)")
    args = p.parse_args(argv)
    models = [m for m in args.models.split(",") if m] if args.models else None
    with user_errors(p):
        results, names = collect(Path(args.folder), models, args.seeds)
    if not results:
        p.exit(1, f"{p.prog}: error: {args.folder}: no finished run (no <model>/seed<k>/result.json)\n")
    md = table(results, names)
    for name in names:
        mixed = mixed_settings(results, name)
        if mixed:
            print(f"note: the seeds of {name} differ in {', '.join(mixed)}: its row averages different settings")
    total = sum(r["train_seconds"] for r in results)
    print(md + f"\n\n{len(results)} runs, {total:.0f} s of training in total.")
    if args.curves:
        plot_curves(results, names, args.curves)
    if args.results:
        write_results(Path(args.results), results, names, md)
    return md


def write_results(base: Path, results: list[dict], names: list[str], md: str) -> None:
    """``base.md``: the table and how it was made; ``base.json``: one record per run (no per-epoch history)."""
    base.parent.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(sys.argv)
    keys = ("model", "dataset", "attributes", "seed", "config", "model_config", "test", "epochs", "best_epoch",
            "best_valid", "best_valid_ndcg10", "train_seconds", "time_to_best_seconds", "seconds_per_epoch",
            "parameters", "device")
    runs = [{k: r.get(k) for k in keys} for r in results]
    rules = sorted({r["config"].get("valid_metric", "NDCG@10") for r in results})
    chosen = (f"best-validation-{rules[0]} checkpoint" if len(rules) == 1 else
              f"checkpoint with the best validation metric of its run ({', '.join(rules)}: `valid_metric` in the JSON)")
    text = f"{md}\n\nTest metrics of each run's {chosen} (mean ± sample std over seeds). Table: `{command}`.\n"
    results_file(base, ".md").write_text(text)
    results_file(base, ".json").write_text(json.dumps({"command": command, "models": names, "runs": runs}, indent=1))
    print(f"wrote {results_file(base, '.md')} and {results_file(base, '.json')}")


if __name__ == "__main__":
    main()
