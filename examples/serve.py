"""Top-k recommendations from a finished run's best checkpoint.

Usage::

    python examples/serve.py --model DIFSASRec --users 0,5,17               # ML-100K users' test-time histories
    python examples/serve.py --model DIFSASRec --history 5,17,3 --k 5       # a typed-in history
    python examples/serve.py --dataset beauty --model SASRec --seed 1 --users 3 --history 5,17,3
    python examples/serve.py --run runs/ml-100k/DIFSASRec/seed0 --history 5,17,3    # a run folder directly

The checkpoint is ``<out-dir>/<dataset>/<model>/seed<seed>/best.pt`` (written by ``examples/train.py`` with
``dif_attention.models.save_model``), loaded with ``dif_attention.models.load_model``. A user is a row of the
dataset (0-based, in the order of the data file); their history is the test-time one, everything before the
held-out test item (``load_dataset(...).split("test", ...)``), of which the model reads the last ``max_len``
items. Item ids are the dataset's internal ids ``1..num_items``. The history is never recommended back.
Prints one Markdown row per query (history length, the top-k with scores, and for a user the held-out item and
whether it is among them).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from data import DataError, load_dataset
from dif_attention import DIFError
from dif_attention.models import MODELS, load_model

__all__ = ["main", "checkpoint_path", "parse_ids", "parse_items"]


def checkpoint_path(out_dir: str, dataset: str, model: str, seed: int) -> Path:
    """``<out_dir>/<dataset>/<model>/seed<seed>/best.pt``: where ``examples/train.py`` leaves a run's best weights."""
    return Path(out_dir) / dataset / model / f"seed{seed}" / "best.pt"


def parse_ids(text: str, minimum: int = 0) -> list[int]:
    """A flag type: comma-separated integers ``>= minimum`` (``5,17,3``)."""
    parts = [t.strip() for t in text.split(",") if t.strip()]
    if not parts or not all(p.isdigit() and int(p) >= minimum for p in parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= {minimum}, got {text!r}")
    return [int(p) for p in parts]


def parse_items(text: str) -> list[int]:
    """A flag type: comma-separated item ids ``>= 1`` (0 is padding)."""
    return parse_ids(text, minimum=1)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="ml-100k", help="the run's dataset: ml-100k (the default), beauty, sports, or "
                   "a path (as examples/sasrec.py); read for --users and to find the run folder")
    p.add_argument("--data", default=None, help="folder holding the dataset files (overrides the default location)")
    p.add_argument("--model", default="DIFSASRec", choices=sorted(MODELS), help="the run's model (default DIFSASRec)")
    p.add_argument("--tag", default="", help="the run's tag (its folder is <model>-<tag>)")
    p.add_argument("--seed", type=int, default=0, help="the run's seed (default 0)")
    p.add_argument("--out-dir", default="runs", help="where the runs are (default runs)")
    p.add_argument("--run", default=None, help="a run folder holding best.pt (instead of --out-dir/--dataset/--model/"
                   "--seed), or the checkpoint file itself")
    p.add_argument("--users", type=parse_ids, default=[], help="comma-separated user rows of the dataset (0-based)")
    p.add_argument("--history", type=parse_items, action="append", default=[],
                   help="a typed-in history of item ids, oldest first (repeat the flag for several)")
    p.add_argument("--k", type=int, default=10, help="how many items to recommend (default 10)")
    return p


def main(argv=None) -> list[dict]:
    """Answer every ``--users`` row and ``--history``; returns one dict per query (``user`` (or None), ``history``,
    ``items``, ``scores``, and for a user the held-out ``target`` and ``hit``)."""
    p = parser()
    args = p.parse_args(argv)
    if not args.users and not args.history:
        p.error("nothing to answer: give --users and/or --history")
    try:
        return answer(p, args)
    except (DIFError, DataError) as err:
        p.exit(1, f"{p.prog}: error: {err}\n")


def answer(p: argparse.ArgumentParser, args) -> list[dict]:
    dataset = load_dataset(args.dataset, data=args.data) if args.users or args.run is None else None
    if args.run is not None:
        path = Path(args.run)
        path = path / "best.pt" if path.is_dir() else path
    else:
        name = f"{args.model}-{args.tag}" if args.tag else args.model
        path = checkpoint_path(args.out_dir, dataset.name, name, args.seed)
    model = load_model(path, map_location="cpu")  # eval mode; torch.load(weights_only=True) inside
    if args.k < 1 or args.k > model.num_items:
        p.error(f"--k: expected an int in [1, {model.num_items}] (the model's item count), got {args.k}")
    for h in args.history:
        if max(h) > model.num_items:
            p.error(f"--history: expected item ids in [1, {model.num_items}] (the model's items), got {max(h)}")
    queries: list[tuple[int | None, list[int], int | None]] = []
    if args.users:
        if dataset.num_items != model.num_items:
            p.error(f"--dataset: expected the data {path} was trained on ({model.num_items} items), got {dataset.name} "
                    f"({dataset.num_items} items)")
        hist, targets = dataset.split("test", max(len(s) for s in dataset.sequences))  # every item before the test one
        for u in args.users:
            if u >= len(hist):
                p.error(f"--users: expected user rows in [0, {len(hist)}) of {dataset.name}, got {u}")
            queries.append((u, [int(i) for i in hist[u] if i], int(targets[u])))
    queries += [(None, h, None) for h in args.history]
    width = max(len(h) for _, h, _ in queries)
    histories = torch.tensor([h + [0] * (width - len(h)) for _, h, _ in queries])
    with torch.no_grad():
        items, scores = model.recommend(histories, k=args.k)  # the histories are excluded
    print(f"{path} ({type(model).__name__}, {model.num_items} items, max_len {model.max_len}): top {args.k}\n")
    print("| query | history | top-k (score) | held-out item |")
    print("|---|---|---|---|")
    out = []
    for (user, history, target), row_items, row_scores in zip(queries, items.tolist(), scores.tolist()):
        shown = ", ".join(map(str, history[-5:]))
        shown = f"{len(history)} items: ...{shown}" if len(history) > 5 else shown
        top = ", ".join(f"{i} ({s:.2f})" for i, s in zip(row_items, row_scores))
        result = {"user": user, "history": history, "items": row_items, "scores": row_scores}
        held = ""
        if user is not None:
            result.update(target=target, hit=target in row_items)
            held = f"{target} ({'in' if result['hit'] else 'not in'} the top {args.k})"
        print(f"| {'user ' + str(user) if user is not None else 'typed'} | {shown} | {top} | {held} |")
        out.append(result)
    return out


if __name__ == "__main__":
    main()
