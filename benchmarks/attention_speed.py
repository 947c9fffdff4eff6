"""CPU/GPU speed of DecoupledAttention against plain multi-head SDPA attention.

    python benchmarks/attention_speed.py                 # the issue's setting, n in {50, 200}
    python benchmarks/attention_speed.py --n 50 --repeats 5 --batch 64

Providers (all are whole attention layers: projections + attention + output projection):
  (i)   vanilla  -- q/k/v projections of the item stream, one SDPA call (no side information)
  (ii)  dif-auto -- DecoupledAttention, backend="auto" (the default; what a user gets)
        dif-sdpa -- backend="sdpa": one SDPA call over concatenated per-source q/k
        dif-math -- backend="math": one materialised score matrix over the folded q/k
  (iii) dif-torch -- DecoupledAttention, the oracle that materialises every score matrix
Masks: right-padded random lengths (key padding) & causal, as in SASRec training.
Each provider is timed `--repeats` times, interleaved with the others; the median is printed with
the ratio to (i) measured in the same run.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from dif_attention import DecoupledAttention, lengths_mask


class VanillaAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.ModuleList(nn.Linear(dim, dim) for _ in range(3))
        self.out = nn.Linear(dim, dim)

    def forward(self, x, mask):
        b, n, d = x.shape
        q, k, v = (lin(x).view(b, n, self.heads, -1).transpose(1, 2) for lin in self.qkv)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(o.transpose(1, 2).reshape(b, n, d))


def timeit(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[50, 200])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--attr-dim", type=int, default=32)
    p.add_argument("--fusion", default="add")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, python {platform.python_version()}")
    print(f"b={args.batch} dim={args.dim} heads={args.heads} position + 2 attributes of width {args.attr_dim}, "
          f"fusion={args.fusion}, fp32, median of {args.repeats}\n")
    rows = []
    for n in args.n:
        attr_dims = {"cat": args.attr_dim, "brand": args.attr_dim}
        vanilla = VanillaAttention(args.dim, args.heads)
        dif = DecoupledAttention(args.dim, args.heads, attr_dims=attr_dims, fusion=args.fusion)
        x = torch.randn(args.batch, n, args.dim, requires_grad=True)
        attrs = {a: torch.randn(args.batch, n, d, requires_grad=True) for a, d in attr_dims.items()}
        pos = torch.randn(n, args.dim, requires_grad=True)
        lengths = torch.randint(1, n + 1, (args.batch,))
        pad = lengths_mask(lengths, n)
        full = pad & torch.ones(n, n, dtype=torch.bool).tril()

        def run(which, backward):
            if which == "vanilla":
                out = vanilla(x, full)
            else:
                dif.backend = which[len("dif-"):]
                out = dif(x, attrs=attrs, pos=pos, mask=pad, is_causal=True)
            if backward:
                out.sum().backward()

        providers = ["vanilla", "dif-auto", "dif-sdpa", "dif-math", "dif-torch"]
        for mode in ("fwd", "fwd+bwd"):
            bw = mode == "fwd+bwd"
            ctx = torch.enable_grad if bw else torch.no_grad
            with ctx():
                for prov in providers:  # warm-up
                    run(prov, bw)
                times = {prov: [] for prov in providers}
                for _ in range(args.repeats):
                    for prov in providers:
                        times[prov] += timeit(lambda: run(prov, bw), 1)
            med = {prov: statistics.median(t) * 1e3 for prov, t in times.items()}
            for prov in providers:
                rows.append((n, mode, prov, med[prov], med[prov] / med["vanilla"]))
    print("| n | pass | provider | ms (median) | x vanilla |")
    print("|---|---|---|---|---|")
    for n, mode, prov, ms, ratio in rows:
        print(f"| {n} | {mode} | {prov} | {ms:.2f} | {ratio:.2f} |")
    return rows


if __name__ == "__main__":
    main()
