"""Collect finished runs into one table: ``runs/<dataset>/<model>/seed<k>/result.json`` -> Markdown.

Usage::

    python examples/report.py runs/beauty                          # every model folder found
    python examples/report.py runs/beauty --models SASRec,SASRecF,DIFSASRec --seeds 0,1,2

Useful when seeds ran as separate processes (one per core); rows are mean ± std over the seeds found.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.cli import table  # noqa: E402


def collect(folder: Path, models: list[str] | None, seeds: list[int] | None) -> tuple[list[dict], list[str]]:
    results = []
    for f in sorted(folder.glob("*/seed*/result.json")):
        r = json.loads(f.read_text())
        r["model"] = f.parent.parent.name  # includes a variant tag, e.g. DIFSASRec-wo_aap
        if (models is None or r["model"] in models) and (seeds is None or r["seed"] in seeds):
            results.append(r)
    names = models or sorted({r["model"] for r in results})
    return results, names


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder")
    p.add_argument("--models", default=None)
    p.add_argument("--seeds", default=None)
    args = p.parse_args(argv)
    models = args.models.split(",") if args.models else None
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    results, names = collect(Path(args.folder), models, seeds)
    md = table(results, names)
    total = sum(r["train_seconds"] for r in results)
    print(md + f"\n\n{len(results)} runs, {total:.0f} s of training in total.")
    return md


if __name__ == "__main__":
    main()
