"""Does a trained model use its item attributes? Metrics of finished runs with the item -> attribute assignment
as trained, shuffled among the items, and removed.

Usage::

    python examples/attribute_check.py runs/beauty --models SASRecF,DIFSASRec --seeds 0
    python examples/attribute_check.py runs/beauty --models DIFSASRec --split test --repeats 3

Reads ``<folder>/<model>/seed<k>/best.pt`` (written by ``sasrec.py`` / ``bert4rec.py``), and evaluates it
(full ranking, as in training) three ways:

* ``trained``: the attribute tables the model was trained with;
* ``shuffled``: every item gets another item's attribute tokens (a random permutation of the items' rows):
  the same token statistics, the wrong assignment -- a model that relies on *which* item has which
  attributes loses here, one that uses only their overall statistics does not;
* ``removed``: every item gets no attribute token (the padding embedding).

Prints a Markdown table with the change of NDCG@10 against ``trained``. Models without attributes are skipped.

``--sources true`` adds, for decoupled models, each score source's spread per layer on the first ``--users``
histories of the split (:func:`dif_attention.analysis.source_spread`: the standard deviation of a source's raw
scores along a query's row of allowed keys, and its mean gate weight): a source whose rows are flat does not
move the attention, however its gate weights it.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from cli import boolean, runs_parser, threads, user_errors
from data import load_dataset
from dif_attention import DIFError
from dif_attention.analysis import source_spread
from dif_attention.masks import causal_mask
from dif_attention.models import load_model
from train import evaluate

__all__ = ["VARIANTS", "shuffled_tables", "removed_tables", "variant_tables", "check_run", "check_sources", "main"]

VARIANTS = ("trained", "shuffled", "removed")


def shuffled_tables(tables: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Each table ``(num_items + 1, k)`` with its item rows ``1..num_items`` permuted (one permutation for every
    attribute, so an item keeps a consistent set); row 0 (padding) stays."""
    n = next(iter(tables.values())).shape[0]
    gen = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(n - 1, generator=gen)])
    return {a: t[order] for a, t in tables.items()}


def removed_tables(tables: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tables in which no item has a token: ``(num_items + 1, 1)`` zeros (padding)."""
    return {a: torch.zeros(t.shape[0], 1, dtype=t.dtype) for a, t in tables.items()}


def variant_tables(variant: str, tables: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """The item tables of ``variant`` (one of :data:`VARIANTS`)."""
    if variant == "trained":
        return tables
    if variant == "shuffled":
        return shuffled_tables(tables, seed)
    if variant == "removed":
        return removed_tables(tables)
    raise DIFError(f"variant: expected one of {VARIANTS}, got {variant!r}")


def check_run(path: Path, dataset, *, split: str = "valid", repeats: int = 1) -> dict[str, dict[str, float]] | None:
    """Metrics of the model file ``path`` per variant (``shuffled``: the mean over ``repeats`` permutations);
    None for a model without attributes."""
    model = load_model(path)
    tables = getattr(model, "item_tables", None)
    if not tables:
        return None
    hist, targets = dataset.split(split, model.max_len)
    out = {}
    for variant in VARIANTS:
        runs = []
        for r in range(repeats if variant == "shuffled" else 1):
            runs.append(evaluate(load_model(path, item_tables=variant_tables(variant, tables, seed=r)), hist, targets))
        out[variant] = {k: float(np.mean([m[k] for m in runs])) for k in runs[0]}
    return out


def check_sources(path: Path, dataset, *, split: str = "valid", users: int = 256) -> dict[str, list[float]] | None:
    """Per layer, each score source's spread and gate weight (:func:`~dif_attention.analysis.source_spread`) of the
    model file ``path`` on the first ``users`` histories of ``split``; None for a model with one score source."""
    model = load_model(path).eval()
    hist, _ = dataset.split(split, model.max_len)
    ids = torch.as_tensor(np.asarray(hist[:users]))
    with torch.no_grad():
        _, maps = model(ids, return_scores=True)
    if len(maps[0].sources) < 2:
        return None
    real = ids != 0
    allowed = real[:, None, :, None] & real[:, None, None, :]  # (b, 1, n, n): real queries and keys
    if model.causal:
        allowed = allowed & causal_mask(ids.shape[1])
    return {name: v.tolist() for name, v in source_spread(maps, allowed).items()}


def sources_table(name: str, seed: int, spread: dict[str, list[float]]) -> list[str]:
    """Markdown rows ``| model | seed | layer | <source spreads> | <gate weights> |`` (with a header)."""
    cols = list(spread)
    titles = [c if c.startswith("gate ") else f"spread {c}" for c in cols]
    lines = ["| model | seed | layer | " + " | ".join(titles) + " |", "|---" * (3 + len(cols)) + "|"]
    for layer in range(len(spread[cols[0]])):
        lines.append(f"| {name} | {seed} | {layer} | " + " | ".join(f"{spread[c][layer]:.3g}" for c in cols) + " |")
    return lines


def main(argv=None):
    p = runs_parser(__doc__.splitlines()[0], seeds="0", example="SASRecF,DIFSASRec")
    p.add_argument("--split", choices=("valid", "test"), default="valid",
                   help="the split to evaluate (default valid: a check of the model, not a result)")
    p.add_argument("--repeats", type=int, default=1, help="permutations averaged for 'shuffled' (default 1)")
    p.add_argument("--sources", type=boolean, default=False, metavar="BOOL",
                   help="also print each score source's spread and gate weight per layer (default false)")
    p.add_argument("--users", type=int, default=256, help="histories used by --sources (default 256)")
    p.add_argument("--threads", type=threads, default=0)
    args = p.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    if not models:
        p.error(f"--models: expected comma-separated run folders, got {args.models!r}")
    if args.repeats < 1:
        p.error(f"--repeats: expected an integer >= 1, got {args.repeats}")
    if args.users < 1:
        p.error(f"--users: expected an integer >= 1, got {args.users}")
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = Path(args.folder)
    with user_errors(p):
        dataset = load_dataset(args.dataset or folder.name, attributes=args.attributes)
        lines = [f"| model | seed | {args.split} | Recall@10 | NDCG@10 | NDCG@10 change |", "|---|---|---|---|---|---|"]
        found, source_lines = False, []
        for name in models:
            for seed in args.seeds:
                path = folder / name / f"seed{seed}" / "best.pt"
                if not path.exists():
                    print(f"skipping {path.parent}: no best.pt", file=sys.stderr)
                    continue
                result = check_run(path, dataset, split=args.split, repeats=args.repeats)
                if result is None:
                    print(f"skipping {path.parent}: the model has no attributes", file=sys.stderr)
                    continue
                found = True
                base = result["trained"]["NDCG@10"]
                for variant, m in result.items():
                    change = "" if variant == "trained" else f"{(m['NDCG@10'] - base) / base:+.1%}"
                    lines.append(f"| {name} | {seed} | {variant} | {m['Recall@10']:.4f} | {m['NDCG@10']:.4f} | "
                                 f"{change} |")
                if args.sources:
                    spread = check_sources(path, dataset, split=args.split, users=args.users)
                    if spread is not None:
                        source_lines += ["", *sources_table(name, seed, spread)]
        if not found:
            p.error("no finished runs of attribute models found")
    text = "\n".join(lines + source_lines) + f"\n\nCommand: `python {' '.join(sys.argv)}`\n"
    print(text)
    return text


if __name__ == "__main__":
    main()
