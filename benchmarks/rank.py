"""Rank of attention score matrices: SASRecF vs NOVA vs DIF (the paper's Figure 1, Theorem 4.1).

    python benchmarks/rank.py                    # d=64, 4 heads (d_h=16), n=50, 2 layers; init + trained
    python benchmarks/rank.py --skip-trained     # at initialisation only (seconds)
    python benchmarks/rank.py --paper            # the paper's Beauty setting: d=256, 8 heads, 4 layers, attr 64

Three families with the same d and d_h, all measured on the raw (pre-scale, pre-mask, pre-softmax) score
matrix of every layer and head, restricted to each sample's valid L x L block (dif_attention.analysis):

  SASRecF  side information concatenated into the item stream (Linear), + position, then plain attention
  NOVA     queries/keys from item + position + side information (sum), values from the item stream
  DIF      decoupled scores: item, position and each attribute with its own Q/K, fused (--fusion)

Theorem 4.1: early fusion has rank <= min(L, d_h); DIF has rank <= min(L, d_h + d_h + sum_j d_a/heads).

Settings: (a) at initialisation (float64) on random sequences of synthetic items (two attributes) and on real
Beauty histories (the `--samples` longest, cut to the last n items, so L = n; and a random sample at their
natural lengths, where L is the binding bound); (b) after training on MovieLens-100K and Beauty: the same
library models (dif_attention.models), trained and measured by `python examples/trained_rank.py`, which this
script runs as a subprocess (it trains once; the checkpoints under runs/ are reused).
Columns: mean numerical rank (default tolerance, see dif_attention.analysis), the bound averaged over samples,
the mean per layer, the rank counting only singular values above 1e-3 * sigma_max, the effective (entropy) rank.
Writes the table (markdown) and a bar chart PNG (and the numbers as JSON) to --out.
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

from dif_attention import item_attribute_table
from dif_attention.analysis import head_widths, rank_report
from dif_attention.models import build_model

ROOT = Path(__file__).resolve().parents[1]
AMAZON = ROOT.parent / "shared" / "data" / "amazon"
KINDS = ("SASRecF", "NOVA", "DIF")
MODELS = {"SASRecF": "SASRecF", "NOVA": "NOVA", "DIF": "DIFSASRec"}  # the families' library models
LOOSE_RTOL = 1e-3  # a second, coarse count: singular values above 0.1% of the largest
COLORS = {"SASRecF": "#9ecae1", "NOVA": "#4292c6", "DIF": "#d94801"}


# ------------------------------------------------------------------------------------------------ data
def read_beauty(folder: Path):
    """``Beauty.txt`` ("user item item ..." in time order) and ``Beauty_item2attributes.json``:
    returns (list of item-id lists, {item id: [attribute ids]}); ids are used as they are (from 1)."""
    seqs = [[int(t) for t in line.split()[1:]] for line in (folder / "Beauty.txt").read_text().splitlines()
            if line.strip()]
    attrs = {int(k): v for k, v in json.loads((folder / "Beauty_item2attributes.json").read_text()).items()}
    return seqs, attrs


def right_pad(seqs, n: int):
    """``(b, n)`` long ids (the last ``n`` items of each sequence, right-padded with 0) and lengths ``(b,)``."""
    ids = torch.zeros(len(seqs), n, dtype=torch.long)
    for r, s in enumerate(seqs):
        s = s[-n:]
        ids[r, :len(s)] = torch.as_tensor(s)
    return ids, (ids != 0).sum(1)


def random_setting(samples: int, n: int, seed: int):
    """Synthetic items with two attributes ("cat": 3 of 50 tokens, "brand": 1 of 100); full-length sequences."""
    g = torch.Generator().manual_seed(seed)
    num_items = 1000
    cat = {i: torch.randint(1, 51, (3,), generator=g).tolist() for i in range(1, num_items + 1)}
    brand = {i: [int(torch.randint(1, 101, (1,), generator=g))] for i in range(1, num_items + 1)}
    tables = {"cat": item_attribute_table(cat, num_items + 1), "brand": item_attribute_table(brand, num_items + 1)}
    ids = torch.randint(1, num_items + 1, (samples, n), generator=g)
    return dict(ids=ids, lengths=torch.full((samples,), n), num_items=num_items, tables=tables,
                num_classes={"cat": 51, "brand": 101})


def beauty_settings(folder: Path, samples: int, n: int, seed: int):
    """Two Beauty settings on test histories (``s[:-1]``): the longest users cut to L = n, and a random sample."""
    seqs, item_attrs = read_beauty(folder)
    num_items = max(max(s) for s in seqs)
    info = dict(num_items=num_items, tables={"attr": item_attribute_table(item_attrs, num_items + 1)},
                num_classes={"attr": max(t for v in item_attrs.values() for t in v) + 1})
    hist = [s[:-1] for s in seqs]
    longest = sorted(hist, key=len, reverse=True)[:samples]
    sample = random.Random(seed).sample(hist, samples)
    out = {}
    for name, chosen in (("Beauty, longest users (L = n)", longest), ("Beauty, random users (natural L)", sample)):
        ids, lengths = right_pad(chosen, n)
        out[name] = dict(ids=ids, lengths=lengths, **info)
    return out


# ------------------------------------------------------------------------------------------------ models
def family_model(kind: str, *, num_items: int, tables, num_classes, dim: int = 64, heads: int = 4, layers: int = 2,
                 attr_dim: int = 32, max_len: int = 50, fusion: str = "gate", attr_init_std: float = 0.02):
    """The library model of one family (SASRecF, NOVA, DIF-SASRec) with the same d and d_h; the baselines embed
    side information at the item width ``dim``, DIF at ``attr_dim``."""
    return build_model(MODELS[kind], num_items=num_items, item_tables=tables, num_classes=num_classes, dim=dim,
                       heads=heads, layers=layers, attr_dim=attr_dim, max_len=max_len, fusion=fusion,
                       attr_init_std=attr_init_std, strict=False)


def widths_of(kind: str, model) -> list[int]:
    """Theorem 4.1's per-source head widths: ``[d_h]`` for early fusion, one per source for DIF."""
    return head_widths(model.encoder.layers[0].attn) if kind == "DIF" else [model.dim // model.heads]


def measure(model, ids, lengths, widths, batch: int = 64) -> dict:
    """:func:`dif_attention.analysis.rank_report` of ``model`` (called with ``return_scores=True``)."""
    return rank_report(lambda x: model(x, return_scores=True), ids, lengths, widths, batch=batch,
                       loose_rtol=LOOSE_RTOL)


def run_init(args, settings) -> list[dict]:
    rows = []
    for name, data in settings.items():
        for kind in KINDS:
            torch.manual_seed(args.seed)
            model = family_model(kind, num_items=data["num_items"], tables=data["tables"],
                                 num_classes=data["num_classes"], dim=args.dim, heads=args.heads, layers=args.layers,
                                 attr_dim=args.attr_dim, max_len=args.n, fusion=args.fusion,
                                 attr_init_std=args.attr_init_std).double().eval()
            rows.append(dict(setting=f"init: {name}", model=kind,
                             **measure(model, data["ids"], data["lengths"], widths_of(kind, model))))
    return rows


def run_trained(args) -> list[dict]:
    """The trained half: ``python examples/trained_rank.py`` with the same settings, rows read from its JSON."""
    out = args.out / f"rank{args.tag}_trained.json"
    cmd = [sys.executable, str(ROOT / "examples" / "trained_rank.py"), "--json", str(out), "--dim", str(args.dim),
           "--heads", str(args.heads), "--layers", str(args.layers), "--attr-dim", str(args.attr_dim),
           "--n", str(args.n), "--fusion", args.fusion, "--samples", str(args.samples), "--seed", str(args.seed),
           "--runs", str(args.runs), "--train-seconds", str(args.train_seconds), "--datasets", *args.datasets]
    if args.epochs:
        cmd += ["--epochs", str(args.epochs)]
    print("[trained] " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())["rows"]


# ------------------------------------------------------------------------------------------------ report
def table(rows) -> str:
    lines = ["| setting | model | mean rank | bound | per layer | rank, rtol 1e-3 | effective rank | mean L |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per = " / ".join(f"{v:.1f}" for v in r["per_layer"])
        lines.append(f"| {r['setting']} | {r['model']} | {r['mean']:.2f} | {r['bound']:.1f} | {per} | "
                     f"{r['loose']:.2f} | {r['effective']:.2f} | {r['mean_length']:.1f} |")
    return "\n".join(lines)


def source_table(rows) -> str:
    """DIF rows only: rank and mean Frobenius norm of each source's score block, and of the fused block."""
    lines = ["| setting | source | mean rank | mean norm of the score block | norm / item norm |",
             "|---|---|---|---|---|"]
    for r in rows:
        for name, v in r.get("sources", {}).items():
            ratio = v["norm"] / r["sources"]["item"]["norm"] if r["sources"]["item"]["norm"] else float("nan")
            lines.append(f"| {r['setting']} | {name} | {v['rank']:.2f} | {v['norm']:.3g} | {ratio:.3g} |")
    return "\n".join(lines)


def ordering(rows) -> list[str]:
    """One line per setting: does DIF > NOVA >= SASRecF hold (mean rank)?"""
    out = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        m = {r["model"]: r["mean"] for r in rows if r["setting"] == setting}
        if set(KINDS) <= set(m):
            ok = m["DIF"] > m["NOVA"] >= m["SASRecF"]
            out.append(f"{setting}: DIF {m['DIF']:.2f} {'>' if m['DIF'] > m['NOVA'] else '<='} NOVA {m['NOVA']:.2f} "
                       f"{'>=' if m['NOVA'] >= m['SASRecF'] else '<'} SASRecF {m['SASRecF']:.2f}"
                       f" -> {'holds' if ok else 'does NOT hold'}")
    return out


def bar_chart(rows, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(r["setting"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 2.2 * len(settings)), 4.2))
    width = 0.8 / len(KINDS)
    for k, kind in enumerate(KINDS):
        for s, setting in enumerate(settings):
            r = next((r for r in rows if r["setting"] == setting and r["model"] == kind), None)
            if r is None:
                continue
            x = s + (k - (len(KINDS) - 1) / 2) * width
            ax.bar(x, r["mean"], width * 0.95, color=COLORS[kind], label=kind if s == 0 else None)
            ax.hlines(r["bound"], x - width / 2, x + width / 2, colors="black", linestyles="--", linewidth=1,
                      label="bound (Thm 4.1)" if s == 0 and k == 0 else None)
            ax.text(x, max(r["mean"], r["bound"]), f"{r['mean']:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(settings)))
    ax.set_xticklabels([s.replace(": ", ":\n").replace(" (", "\n(") for s in settings], fontsize=8)
    ax.set_ylabel("mean rank of attention score matrices")
    ax.set_title(title, fontsize=9)
    top = max(max(r["mean"], r["bound"]) for r in rows)
    ax.set_ylim(0, top * 1.22)
    ax.legend(fontsize=8, loc="upper center", ncol=4, frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main
def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--attr-dim", type=int, default=32, help="DIF attribute width (baselines embed at --dim)")
    p.add_argument("--n", type=int, default=50, help="max sequence length")
    p.add_argument("--fusion", default="gate", help="DIF fusion: add, concat, gate (the paper's configs: gate)")
    p.add_argument("--attr-init-std", type=float, default=0.02,
                   help="init std of the attribute tables, at-initialisation part only (the reference: 1.0)")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--paper", action="store_true", help="d=256, 8 heads, 4 layers, attr 64 (DIF-SR Beauty config)")
    p.add_argument("--data", type=Path, default=AMAZON, help="folder with Beauty.txt and its attributes json")
    p.add_argument("--skip-trained", action="store_true", help="only the at-initialisation part")
    p.add_argument("--datasets", nargs="+", default=["ml-100k", "beauty"], help="trained part: datasets")
    p.add_argument("--epochs", type=int, default=None, help="trained part: epochs per model (default 10)")
    p.add_argument("--train-seconds", type=float, default=0.0, help="trained part: time budget per model (0: none)")
    p.add_argument("--runs", type=Path, default=ROOT / "runs", help="trained part: checkpoint root")
    p.add_argument("--out", type=Path, default=ROOT / "docs", help="writes img/rank*.png and rank*.json/md here")
    p.add_argument("--tag", default=None, help="file name suffix (default: '' or '_paper')")
    args = p.parse_args(argv)
    if args.paper:
        args.dim, args.heads, args.layers, args.attr_dim = 256, 8, 4, 64
    if args.tag is None:
        args.tag = "_paper" if args.paper else ""
    return args


def main(argv=None) -> list[dict]:
    args = parse(argv)
    t0 = time.time()
    d_h = args.dim // args.heads
    print(f"d={args.dim}, heads={args.heads} (d_h={d_h}), layers={args.layers}, attr={args.attr_dim} "
          f"(d_a/heads={args.attr_dim // args.heads}), n={args.n}, DIF fusion={args.fusion}, samples={args.samples}")
    settings = {"random sequences": random_setting(args.samples, args.n, args.seed)}
    if (args.data / "Beauty.txt").exists():
        settings.update(beauty_settings(args.data, args.samples, args.n, args.seed))
    else:
        print(f"[skip] no Beauty.txt under {args.data}: real sequences skipped (pass --data)", file=sys.stderr)
    rows = run_init(args, settings)
    if not args.skip_trained:
        rows += run_trained(args)
    title = (f"d={args.dim}, heads={args.heads} (d_h={d_h}), n={args.n}, {args.layers} layers; "
             f"dashes: Theorem 4.1 bound")
    text = table(rows) + "\n\nDIF, per source:\n\n" + source_table(rows)
    verdict = ordering(rows)
    print(text)
    print("\n".join(verdict))
    args.out.mkdir(parents=True, exist_ok=True)
    bar_chart(rows, args.out / "img" / f"rank{args.tag}.png", title)
    (args.out / f"rank{args.tag}.json").write_text(json.dumps(
        {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "rows": rows,
         "ordering": verdict}, indent=1))
    (args.out / f"rank{args.tag}_table.md").write_text(text + "\n\n" + "\n".join(f"- {v}" for v in verdict) + "\n")
    print(f"wrote {args.out / 'img' / f'rank{args.tag}.png'} ({time.time() - t0:.0f} s)")
    return rows


if __name__ == "__main__":
    main()
