"""Attention maps of one sequence, per layer and per source (the paper's Figure 7).

    python examples/visualize.py                        # trained DIF-SASRec on ML-100K, one user, head 0
    python examples/visualize.py --dataset beauty --length 15 --head 1
    python examples/visualize.py --init                 # the same model at initialisation (no training)
    python examples/visualize.py --show attention       # softmax weights instead of centred logits

Rows: layers. Columns: the decoupled maps of the item, position and each attribute, then the fused map.
``--show`` picks what is drawn of every map ``S`` (``S_s`` per source, ``fuse(S)`` for the fused column), always
restricted to the causal (allowed) cells, the others blank:

* ``logits`` (default): ``S / sqrt(d_h)`` minus its mean over each row's allowed keys -- exactly what the
  softmax responds to (it is shift-invariant per row), on a diverging scale centred at 0;
* ``attention``: ``softmax(S / sqrt(d_h))`` -- for a source, the attention it would give alone; for the fused
  column, the model's actual attention (rows dominated by 1/i under a causal mask);
* ``raw``: the raw scores ``S``.
The model and its checkpoint are the ones of ``examples/trained_rank.py`` (same flags; trained if absent).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from dif_attention import ScoreMaps

ROOT = Path(__file__).resolve().parents[1]


SHOW = ("logits", "attention", "raw")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="ml-100k")
    p.add_argument("--user", type=int, default=0, help="index among the users with at least --length test items")
    p.add_argument("--length", type=int, default=20, help="positions shown (the most recent items)")
    p.add_argument("--head", type=int, default=0)
    p.add_argument("--show", choices=SHOW, default="logits", help="logits (centred), attention or raw")
    p.add_argument("--init", action="store_true", help="the model at initialisation, no checkpoint")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--attr-dim", type=int, default=32)
    p.add_argument("--n", type=int, default=50, help="max_len of the model")
    p.add_argument("--fusion", default="gate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--train-seconds", type=float, default=0.0)
    p.add_argument("--runs", type=Path, default=ROOT / "runs")
    p.add_argument("--out", type=Path, default=None, help="PNG path (default docs/img/attention_<dataset>.png)")
    args = p.parse_args(argv)
    if args.out is None:
        suffix = ("_init" if args.init else "") + ("" if args.show == "logits" else f"_{args.show}")
        args.out = ROOT / "docs" / "img" / f"attention_{args.dataset}{suffix}.png"
    return args


def panels(maps: list, length: int, head: int, dim_head: int, show: str) -> list[dict[str, torch.Tensor]]:
    """Per layer (a ScoreMaps, or a dict of maps with ``"fused"``): source name -> ``(length, length)`` matrix
    to draw (NaN where the causal mask forbids)."""
    allowed = torch.ones(length, length, dtype=torch.bool).tril()
    out = []
    for layer in maps:
        row = {}
        scores = ({**layer.sources, "fused": layer.fused} if isinstance(layer, ScoreMaps)
                  else {k: v for k, v in layer.items() if k != "probs"})
        for name, s in scores.items():
            m = s[0, head, :length, :length].double()
            if show != "raw":
                m = m / math.sqrt(dim_head)
            if show == "attention":
                m = m.masked_fill(~allowed, float("-inf")).softmax(-1)
            elif show == "logits":
                m = m - (m * allowed).sum(-1, keepdim=True) / allowed.sum(-1, keepdim=True)
            row[name] = m.masked_fill(~allowed, float("nan"))
        fused = row.pop("fused")
        row["fused (model attention)" if show == "attention" else "fused"] = fused
        out.append(row)
    return out


def draw(rows: list[dict[str, torch.Tensor]], path: Path, title: str, show: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = list(rows[0])
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(2.6 * len(cols), 2.5 * len(rows)), squeeze=False)
    for i, row in enumerate(rows):
        for j, name in enumerate(cols):
            ax = axes[i][j]
            m = row[name].numpy()
            if show == "attention":
                im = ax.imshow(m, cmap="viridis", vmin=0.0)
            else:
                lim = float(row[name].nan_to_num().abs().max()) or 1.0
                im = ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim)
            ax.set_title(f"layer {i + 1}: {name}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03).ax.tick_params(labelsize=6)
    axes[-1][0].set_xlabel("key position", fontsize=7)
    axes[-1][0].set_ylabel("query position", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None, dataset=None) -> Path:
    """``dataset``: a ``data.Dataset`` to use instead of loading ``--dataset``."""
    args = parse(argv)
    from data import load_dataset
    from train import make_model
    from trained_rank import settings, trained_model

    dataset = load_dataset(args.dataset) if dataset is None else dataset
    cfg, model_settings = settings(args)
    if args.init:
        torch.manual_seed(args.seed)
        model = make_model(dataset, "DIFSASRec", model_settings).eval()
    else:
        model = trained_model(dataset, "DIFSASRec", cfg, model_settings)
    hist, _ = dataset.split("test", args.n)
    ids = torch.from_numpy(hist)
    long_enough = ((ids != 0).sum(1) >= args.length).nonzero().flatten()
    if args.user >= len(long_enough):
        raise SystemExit(f"--user: expected < {len(long_enough)} (users with >= {args.length} test items), "
                         f"got {args.user}")
    u = int(long_enough[args.user])
    seq = ids[u][ids[u] != 0][-args.length:][None]  # (1, length) the most recent items
    with torch.no_grad():
        _, maps = model.double()(seq, return_scores=True)
    rows = panels(maps, args.length, args.head, args.dim // args.heads, args.show)
    what = {"logits": "row-centred logits S/sqrt(d_h)", "raw": "raw scores S",
            "attention": "attention weights (each source alone; fused = the model's)"}[args.show]
    state = "at initialisation" if args.init else "trained"
    draw(rows, args.out, f"DIF-SASRec ({state}) on {dataset.name}, test user #{u}, last {args.length} items, "
                         f"head {args.head}: {what}", args.show)
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
