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
natural lengths, where L is the binding bound); (b) after training on MovieLens-100K and Beauty with the
example models (examples/models.py), trained by examples/train.py if no checkpoint exists under runs/.
Columns: mean numerical rank (default tolerance, see dif_attention.analysis), the bound averaged over samples,
the mean per layer, the rank counting only singular values above 1e-3 * sigma_max, the effective (entropy) rank.
Writes the table (markdown) and a bar chart PNG (and the numbers as JSON) to --out.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from torch import nn

from dif_attention import AttributeEmbedding, DecoupledEncoder, item_attribute_table, padding_mask
from dif_attention.analysis import (EarlyFusionAttention, InputFusion, head_widths, layer_ranks, rank_bound,
                                    summarize)

ROOT = Path(__file__).resolve().parents[1]
AMAZON = ROOT.parent / "shared" / "data" / "amazon"
KINDS = ("SASRecF", "NOVA", "DIF")
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
class RankModel(nn.Module):
    """Embeddings + a ``layers``-deep post-LN encoder of one family (see the module docstring).

    Forward: item ids ``(b, n)`` right-padded -> ``(hidden (b, n, dim), maps)``, maps a per-layer list of dicts
    with ``"fused"`` raw scores ``(b, heads, n, n)`` (DIF also has one map per source). Causal + key padding mask.
    """

    def __init__(self, kind: str, *, num_items: int, tables, num_classes, dim: int = 64, heads: int = 4,
                 layers: int = 2, attr_dim: int = 32, max_len: int = 50, fusion: str = "gate",
                 attr_init_std: float = 0.02):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
        self.kind = kind
        side = attr_dim if kind == "DIF" else dim  # the baselines embed side information at the item width
        self.items = nn.Embedding(num_items + 1, dim, padding_idx=0)
        self.pos = nn.Embedding(max_len, dim)
        for emb in (self.items, self.pos):
            nn.init.normal_(emb.weight, std=0.02)
        self.attrs = AttributeEmbedding(num_classes, side, item_tables=tables, init_std=attr_init_std)
        self.norm = nn.LayerNorm(dim, eps=1e-12)
        attr_dims = {a: side for a in num_classes}
        if kind == "SASRecF":
            self.fuse = InputFusion(dim, attr_dims=attr_dims, combine="concat")
            self.encoder = DecoupledEncoder(layers, dim, heads, position=False)
        elif kind == "NOVA":
            self.encoder = DecoupledEncoder(layers, dim, heads, position=False)
            for layer in self.encoder.layers:  # same block, NOVA's score function in place of the attention
                layer.attn = EarlyFusionAttention(dim, heads, attr_dims=attr_dims, style="nova", combine="sum")
        else:
            self.encoder = DecoupledEncoder(layers, dim, heads, attr_dims=attr_dims, fusion=fusion)

    def widths(self) -> list[int]:
        return head_widths(self.encoder.layers[0].attn)

    def forward(self, ids: torch.Tensor):
        n = ids.shape[1]
        pos, attrs, mask = self.pos.weight[:n], self.attrs(items=ids), padding_mask(ids)
        if self.kind == "SASRecF":
            x = self.norm(self.fuse(self.items(ids), attrs=attrs, pos=pos))
            return self.encoder(x, mask=mask, is_causal=True, return_scores=True)
        return self.encoder(self.norm(self.items(ids)), attrs=attrs, pos=pos, mask=mask, is_causal=True,
                            return_scores=True)


def measure(forward, ids, lengths, widths, batch: int = 64) -> dict:
    """Rank summary of ``forward(ids) -> (hidden, per-layer maps)`` over all samples, with Theorem 4.1's bound."""
    num, loose, eff, per_source = [], [], [], {}
    with torch.no_grad():
        for s in range(0, len(ids), batch):
            _, maps = forward(ids[s:s + batch])
            ln = lengths[s:s + batch]
            num.append(layer_ranks(maps, ln))
            loose.append(layer_ranks(maps, ln, rtol=LOOSE_RTOL))
            eff.append(layer_ranks(maps, ln, measure="effective"))
            for name in maps[0]:
                if name != "probs":
                    per_source.setdefault(name, []).append((layer_ranks(maps, ln, key=name),
                                                            valid_norms(maps, ln, name)))
    num, loose, eff = torch.cat(num, 1), torch.cat(loose, 1), torch.cat(eff, 1)
    out = summarize(num)
    if set(per_source) - {"item", "fused"}:  # decoupled: each source's own rank and size (Frobenius norm)
        out["sources"] = {name: {"rank": float(torch.cat([r for r, _ in v], 1).mean()),
                                 "norm": float(torch.cat([f for _, f in v], 1).mean())}
                          for name, v in per_source.items()}
    out.update(bound=float(rank_bound(lengths, widths).mean()), effective=float(eff.mean()),
               loose=float(loose.mean()), loose_per_layer=summarize(loose)["per_layer"],
               mean_length=float(lengths.double().mean()), samples=len(ids), widths=list(widths))
    return out


def valid_norms(maps, lengths, key: str) -> torch.Tensor:
    """Frobenius norm of each valid ``[:L, :L]`` block of ``maps[l][key]``: ``(l, b, h)``."""
    n = maps[0][key].shape[-1]
    valid = torch.arange(n)[None, :] < lengths[:, None]  # (b, n)
    block = (valid[:, :, None] & valid[:, None, :])[:, None]  # (b, 1, n, n)
    return torch.stack([(m[key].double() * block).flatten(-2).norm(dim=-1) for m in maps])


def run_init(args, settings) -> list[dict]:
    rows = []
    for name, data in settings.items():
        for kind in KINDS:
            torch.manual_seed(args.seed)
            model = RankModel(kind, num_items=data["num_items"], tables=data["tables"],
                              num_classes=data["num_classes"], dim=args.dim, heads=args.heads, layers=args.layers,
                              attr_dim=args.attr_dim, max_len=args.n, fusion=args.fusion,
                              attr_init_std=args.attr_init_std).double().eval()
            rows.append(dict(setting=f"init: {name}", model=kind,
                             **measure(model, data["ids"], data["lengths"], model.widths())))
    return rows


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
        from trained_rank import run_trained  # benchmarks/trained_rank.py: needs the examples
        rows += run_trained(args, measure)
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
