"""Kernel benchmark: the decoupled attention op alone, every provider side by side in one run.

    python benchmarks/kernels.py                       # CUDA if present, else CPU (batch / 16)
    python benchmarks/kernels.py --out results/ --step # + a whole DIF-SASRec training step (Beauty size)
    python benchmarks/kernels.py --shapes 256,2,50 --fusions add --modes fwd --repeats 5

Providers (each timed call includes its own folding: q/k concatenation, gate weights, position table):
  eager  -- backend="torch": the oracle, one score matrix per source, as the official code
  sdpa   -- backend="sdpa": one scaled_dot_product_attention over concatenated q/k
  flex   -- FlexAttention (torch.compile'd) over the folded q/k, the position table as a score_mod,
            causal & padding as a BlockMask; forward only on CPU; no dropout (skipped when --dropout > 0)
  triton -- the fused kernel (dif_attention.ops), masks from per-sequence lengths; CUDA only (the CPU
            interpreter is for tests, far too slow for these shapes)

Setting: hidden 256 and one attribute of width 64 (the paper's widths), so per head the item and
position streams have 256/h columns, the attribute 64/h, the value 256/h; the position stream is
batch-independent. Right-padded random lengths in [1, n] with the causal mask, as SASRec training.
Fusions: add, gate (the paper-exact gate, GateFusion(max_len=n)), gate-any (the length-agnostic one).

Columns: ms (median of --repeats), GB/s = the bytes a fused kernel must move (q, k, v, out [+ lse], and
for fwd+bwd also d_out, dq, dk, dv) / time -- the same byte count for every provider, so it reads as an
effective bandwidth --, %HBM = GB/s over --peak-gbs (H200: 4800), TFLOP/s over the full n x n square
(2 n^2 (E + Ev) forward, 2 n^2 (3E + 2Ev) more backward), peak = extra CUDA memory of one call (MiB),
maxdiff = largest |output - first provider's output| over valid query rows (fwd rows, no dropout), a
sanity check that every provider computes the same attention.
Writes <out>/kernels.json, kernels.csv and kernels.png (the csv and kernels.partial.json after every row).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

from dif_attention import GateFusion, decoupled_attention, lengths_mask
from dif_attention.fusion import fold_sources, get_fusion
from dif_attention.masks import combine_masks

SHAPES = [(256, 2, 50), (256, 2, 200), (2048, 8, 50), (1024, 4, 200)]
PEAK_GBS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0, "L40S": 864.0, "A10G": 600.0}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def widths(h: int, hidden: int = 256, attr: int = 64):
    """(per-source q/k widths [item, position, attribute], value width) per head."""
    return [hidden // h, hidden // h, attr // h], hidden // h


def make_case(b, h, n, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    ws, ev = widths(h)
    qs, ks = [], []
    for s, e in enumerate(ws):
        bb = 1 if s == 1 else b  # the position stream is batch-independent
        qs.append(torch.randn(bb, h, n, e, generator=g).to(device, dtype).requires_grad_())
        ks.append(torch.randn(bb, h, n, e, generator=g).to(device, dtype).requires_grad_())
    v = torch.randn(b, h, n, ev, generator=g).to(device, dtype).requires_grad_()
    lengths = torch.randint(1, n + 1, (b,), generator=g).to(device)
    lengths[0] = n
    return qs, ks, v, lengths


def make_fusion(name, n, device):
    if name == "add":
        return "add"
    f = GateFusion(max_len=n if name == "gate" else None, num_sources=3)
    return f.to(device)


def model_bytes_flops(b, h, n, dtype, mode):
    ws, ev = widths(h)
    e = ws[0] + ws[2]  # the kernel's q/k width; the position stream is the shared (h, n, n) table
    size = torch.tensor([], dtype=dtype).element_size()
    rows = b * h * n
    fwd_bytes = rows * (2 * e + 2 * ev) * size + rows * 4 + h * n * n * size
    fwd_flops = 2 * b * h * n * n * (sum(ws) + ev)
    if mode == "fwd":
        return fwd_bytes, fwd_flops
    bwd_bytes = rows * (4 * e + 4 * ev) * size + rows * 8 + 2 * h * n * n * 4
    return fwd_bytes + bwd_bytes, fwd_flops + 2 * b * h * n * n * (3 * sum(ws) + 2 * ev)


def provider_fn(name, qs, ks, v, lengths, fusion, dropout, n):
    """A callable computing the attention output (b, h, n, ev), or a reason string when it cannot run."""
    kw = dict(fusion=fusion, dropout_p=dropout)
    if name in ("eager", "sdpa"):
        mask = lengths_mask(lengths, n)
        backend = "torch" if name == "eager" else "sdpa"
        return lambda: decoupled_attention(qs, ks, v, mask=mask, is_causal=True, backend=backend, **kw)
    if name == "triton":
        try:
            from dif_attention import ops
        except ImportError as err:
            return f"import failed: {err}"
        reasons = ops.unsupported_reasons(qs, ks, v, fusion=fusion)
        if v.device.type == "cpu" and not _INTERPRET_OK:
            reasons = reasons or ["CPU: the Triton interpreter is for tests only (--interpret to run it anyway)"]
        if reasons:
            return "; ".join(reasons)
        return lambda: triton_call(qs, ks, v, lengths, fusion, dropout)
    if name == "flex":
        return flex_fn(qs, ks, v, lengths, fusion, dropout, n)
    raise KeyError(name)


def triton_call(qs, ks, v, lengths, fusion, dropout):
    """The fused kernel with right-padding ``lengths`` (padded queries skipped): fold the fusion (the paper
    gate's energies from the fused energy kernel), then one kernel call."""
    from dif_attention import ops

    fusion = get_fusion(fusion)
    b, n = v.shape[0], v.shape[2]
    gates = ops.paper_gates(qs, ks, fusion) if isinstance(fusion, GateFusion) and fusion.max_len else None
    allowed = combine_masks(None, True, n, v.device, lengths=lengths) if needs_fold_mask(fusion) else None
    q, k, bias = fold_sources(qs, ks, allowed, fusion, batch=b, gates=gates)
    return ops.attention(q, k, v, bias=bias, lengths=lengths, is_causal=True, scale=qs[0].shape[-1] ** -0.5,
                         dropout_p=dropout)


def needs_fold_mask(fusion) -> bool:
    """The length-agnostic gate reads the mask while folding (its row means are over the allowed keys)."""
    return isinstance(fusion, GateFusion) and fusion.max_len is None


_FLEX = {}
_INTERPRET_OK = False  # set by --interpret


def flex_fn(qs, ks, v, lengths, fusion, dropout, n):
    if dropout > 0:
        return "FlexAttention has no attention dropout"
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as err:
        return f"FlexAttention unavailable: {err}"

    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    b, h = v.shape[:2]
    scale = 1.0 / math.sqrt(qs[0].shape[-1])
    fusion = get_fusion(fusion)
    lens = lengths

    def mask_mod(bi, hi, i, j):
        return (j <= i) & (j < lens[bi]) & (i < lens[bi])

    block_mask = create_block_mask(mask_mod, b, None, n, n, device=v.device)
    fold_mask = combine_masks(None, True, n, v.device, lengths=lengths) if needs_fold_mask(fusion) else None

    def run():
        q, k, bias = fold_sources(qs, ks, fold_mask, fusion, batch=b)
        score_mod = None
        if bias is not None:
            bias = bias.expand(1, h, n, n)[0]
            def score_mod(score, bi, hi, i, j):
                return score + bias[hi, i, j] * scale
        vv = v if torch.is_grad_enabled() else v.detach()  # CPU flex refuses any input requiring grad
        return _FLEX["fn"](q, k, vv.contiguous(), score_mod=score_mod, block_mask=block_mask, scale=scale)

    return run


def timer(device):
    if device.type == "cuda":
        def measure(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
    else:
        def measure(fn):
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
    return measure


def bench_one(fn, leaves, mode, device, repeats, warmup):
    """-> (median ms, peak extra MiB or None)."""
    if mode == "fwd":
        def call():
            with torch.no_grad():
                fn()
    else:
        def call():
            out = fn()
            torch.autograd.grad(out, leaves, torch.ones_like(out), allow_unused=True)
    for _ in range(warmup):
        call()
    peak = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        call()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    measure = timer(device)
    return statistics.median(measure(call) for _ in range(repeats)), peak


def run_kernels(args, device):
    rows = []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for (b0, h, n) in args.shapes:
            b = max(1, b0 // args.batch_div)
            for fusion_name in args.fusions:
                for mode in args.modes:
                    qs, ks, v, lengths = make_case(b, h, n, dtype, device)
                    fusion = make_fusion(fusion_name, n, device)
                    if isinstance(fusion, torch.nn.Module):
                        fusion = fusion.to(dtype)
                    leaves = qs + ks + [v] + (list(fusion.parameters()) if isinstance(fusion, torch.nn.Module) else [])
                    nbytes, flops = model_bytes_flops(b, h, n, dtype, mode)
                    valid = (torch.arange(n, device=device)[None, :] < lengths[:, None])[:, None, :, None]
                    ref = None
                    for prov in args.providers:
                        row = dict(dtype=dtype_name, b=b, h=h, n=n, fusion=fusion_name, mode=mode, provider=prov)
                        fn = provider_fn(prov, qs, ks, v, lengths, fusion, args.dropout, n)
                        if prov == "flex" and mode != "fwd" and device.type == "cpu" and callable(fn):
                            fn = "FlexAttention on CPU is forward-only"
                        if isinstance(fn, str):
                            row["skipped"] = fn
                        else:
                            try:
                                if args.dropout == 0 and mode == "fwd":  # each provider checked vs the first
                                    with torch.no_grad():
                                        out = fn().float().masked_fill(~valid, 0)  # valid query rows only
                                    ref = out if ref is None else ref
                                    row["maxdiff"] = (out - ref).abs().max().item()
                                ms, peak = bench_one(fn, leaves, mode, device, args.repeats, args.warmup)
                            except Exception as err:  # a provider failing must not hide the others
                                row["skipped"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
                            else:
                                gbs = nbytes / ms / 1e6
                                row.update(ms=ms, gbs=gbs, tflops=flops / ms / 1e9, peak_mib=peak,
                                           hbm=(gbs / args.peak_gbs) if args.peak_gbs else None)
                        rows.append(row)
                        print(format_row(row), flush=True)
                        if args.out:  # written as we go: a time limit keeps what was measured
                            save_table(rows, args.out)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    return rows


TABLE_KEYS = ["dtype", "b", "h", "n", "fusion", "mode", "provider", "ms", "gbs", "hbm", "tflops", "peak_mib",
              "maxdiff", "skipped"]


def save_table(rows, out):
    with open(os.path.join(out, "kernels.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, TABLE_KEYS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in TABLE_KEYS})
    with open(os.path.join(out, "kernels.partial.json"), "w") as fh:
        json.dump(rows, fh, indent=1)


def format_row(r):
    head = f"{r['dtype']:>4} b={r['b']:<5} h={r['h']} n={r['n']:<4} {r['fusion']:<8} {r['mode']:<7} {r['provider']:<7}"
    if "skipped" in r:
        return f"{head} skipped: {r['skipped']}"
    hbm = f"{100 * r['hbm']:5.1f}%" if r.get("hbm") is not None else "    -"
    peak = f"{r['peak_mib']:8.1f} MiB" if r.get("peak_mib") is not None else "       - MiB"
    diff = f"  maxdiff {r['maxdiff']:.1e}" if r.get("maxdiff") is not None else ""
    return f"{head} {r['ms']:9.3f} ms {r['gbs']:8.2f} GB/s {hbm} HBM {r['tflops']:7.3f} TFLOP/s {peak}{diff}"


def step_bench(args, device):
    """A whole DIF-SASRec training step (embeddings, 4 decoupled layers with the paper gate, CE over all
    items at the last valid position, Adam) at the paper's Beauty size, per attention backend."""
    from dif_attention import DecoupledEncoder

    b, n, dim, heads, layers, items, cats = 2048 // args.batch_div, 50, 256, 8, 4, 12102, 220
    results = []
    configs = [("eager fp32", "torch", None), ("sdpa fp32", "sdpa", None), ("triton fp32", "triton", None),
               ("triton bf16-autocast", "triton", torch.bfloat16), ("sdpa bf16-autocast", "sdpa", torch.bfloat16)]
    for label, backend, amp in configs:
        torch.manual_seed(0)
        item_emb = torch.nn.Embedding(items, dim).to(device)
        pos_emb = torch.nn.Embedding(n, dim).to(device)
        cat_emb = torch.nn.Embedding(cats, 64).to(device)
        enc = DecoupledEncoder(layers, dim, heads, attr_dims={"category": 64}, fusion="gate", max_len=n,
                               hidden_dropout=0.5, attn_dropout=0.3, backend=backend).to(device)
        params = list(item_emb.parameters()) + list(pos_emb.parameters()) + list(cat_emb.parameters()) + \
            list(enc.parameters())
        opt = torch.optim.Adam(params, lr=1e-3)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(1, items, (b, n), generator=g).to(device)
        cat_ids = torch.randint(0, cats, (b, n), generator=g).to(device)
        lengths = torch.randint(1, n + 1, (b,), generator=g).to(device)
        target = torch.randint(1, items, (b,), generator=g).to(device)
        mask = lengths_mask(lengths, n)

        def step():
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                x = item_emb(ids)
                h = enc(x, attrs={"category": cat_emb(cat_ids)}, pos=pos_emb.weight, mask=mask, is_causal=True)
                last = h[torch.arange(b, device=device), lengths - 1]
                loss = torch.nn.functional.cross_entropy(last @ item_emb.weight.t(), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        try:
            for _ in range(args.warmup):
                step()
            measure = timer(device)
            ms = statistics.median(measure(step) for _ in range(args.repeats))
        except Exception as err:
            results.append(dict(config=label, skipped=f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"))
        else:
            results.append(dict(config=label, ms=ms))
        print(f"step {label:<22} " + (f"{results[-1]['ms']:9.2f} ms" if "ms" in results[-1] else
                                      f"skipped: {results[-1]['skipped']}"), flush=True)
    base = next((r["ms"] for r in results if r["config"] == "eager fp32" and "ms" in r), None)
    for r in results:
        if base and "ms" in r:
            r["speedup_vs_eager_fp32"] = base / r["ms"]
            print(f"  {r['config']:<22} {r['speedup_vs_eager_fp32']:5.2f}x vs eager fp32")
    return dict(b=b, n=n, dim=dim, heads=heads, layers=layers, items=items, results=results)


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    done = [r for r in rows if "ms" in r]
    if not done:
        return
    groups = sorted({(r["dtype"], r["b"], r["h"], r["n"], r["fusion"], r["mode"]) for r in done},
                    key=lambda k: (k[5], k[4], k[0], k[3], k[1]))
    provs = [p for p in ("eager", "sdpa", "flex", "triton") if any(r["provider"] == p for r in done)]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(groups)), 4.5))
    width = 0.8 / max(1, len(provs))
    for pi, p in enumerate(provs):
        ys = []
        for gk in groups:
            hit = [r["ms"] for r in done if r["provider"] == p and (r["dtype"], r["b"], r["h"], r["n"],
                                                                       r["fusion"], r["mode"]) == gk]
            ys.append(hit[0] if hit else float("nan"))
        ax.bar([i + pi * width for i in range(len(groups))], ys, width, label=p)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
    ax.set_xticklabels([f"{d}\n{b}x{h}x{n}\n{f} {m}" for d, b, h, n, f, m in groups], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("ms (log)")
    ax.set_title("decoupled attention: time per call (lower is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def parse_shape(text):
    b, h, n = (int(x) for x in text.split(","))
    return b, h, n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=None,
                   help="default: bf16 fp32 on CUDA, fp32 on CPU")
    p.add_argument("--shapes", nargs="+", type=parse_shape, default=SHAPES, help="b,h,n triples")
    p.add_argument("--batch-div", type=int, default=None, help="divide every batch size (default 1 CUDA, 16 CPU)")
    p.add_argument("--fusions", nargs="+", choices=["add", "gate", "gate-any"], default=["add", "gate"])
    p.add_argument("--modes", nargs="+", choices=["fwd", "fwd+bwd"], default=["fwd", "fwd+bwd"])
    p.add_argument("--providers", nargs="+", choices=["eager", "sdpa", "flex", "triton"],
                   default=["eager", "sdpa", "flex", "triton"])
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--repeats", type=int, default=None, help="default 20 CUDA, 3 CPU")
    p.add_argument("--warmup", type=int, default=None, help="default 3 CUDA, 1 CPU")
    p.add_argument("--peak-gbs", type=float, default=None, help="HBM peak for the %%HBM column")
    p.add_argument("--step", action="store_true", help="also time a whole DIF-SASRec training step")
    p.add_argument("--no-kernels", action="store_true", help="skip the op table (with --step)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (on a shared machine 1 avoids OpenMP oversubscription)")
    p.add_argument("--out", default="kernels-bench", help="output folder")
    p.add_argument("--interpret", action="store_true",
                   help="CPU: also run the Triton provider in the interpreter (slow; tiny shapes only)")
    args = p.parse_args(argv)
    global _INTERPRET_OK
    _INTERPRET_OK = args.interpret
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before dif_attention.ops decorates its kernels
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.dtypes = args.dtypes or (["bf16", "fp32"] if cuda else ["fp32"])
    args.batch_div = args.batch_div or (1 if cuda else 16)
    args.repeats = args.repeats or (20 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine()
    if args.peak_gbs is None and cuda:
        args.peak_gbs = next((v for k, v in PEAK_GBS.items() if k in name), None)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)  # flex: one per shape
    info = dict(device=name, torch=torch.__version__, python=sys.version.split()[0], batch_div=args.batch_div,
                threads=torch.get_num_threads(),
                dropout=args.dropout, peak_gbs=args.peak_gbs, argv=sys.argv[1:])
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    print(json.dumps(info))
    os.makedirs(args.out, exist_ok=True)
    rows = [] if args.no_kernels else run_kernels(args, device)
    result = dict(info=info, rows=rows)
    if args.step:
        result["step"] = step_bench(args, device)
    with open(os.path.join(args.out, "kernels.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    if rows:
        save_table(rows, args.out)
        plot(rows, os.path.join(args.out, "kernels.png"))
    return result


if __name__ == "__main__":
    main()
