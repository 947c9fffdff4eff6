"""How close one paper-scale training epoch on this CPU comes to its matmul floor.

    python examples/paper_epoch.py                         # Beauty, DIF-SASRec, fp32 and bf16, 2 threads
    python examples/paper_epoch.py --models SASRec,DIFSASRec --precisions bf16 --threads 1
    python examples/paper_epoch.py --modes all,prefix --max-batches 20   # a quick look (part of an epoch)
    python examples/paper_epoch.py --modes prefix --exact-fusion true --max-batches 6   # the paper-exact gate

What it prints:

* this machine's fp32 (and bf16) GEMM rate at the model's own matmul shapes;
* the matmul FLOPs of one epoch of the ``--paper`` model (Beauty: hidden 256, FFN 256, 4 layers, 8 heads,
  attribute width 64), counted per batch from the shapes the step really runs (rows x trimmed width, the
  supervised positions, the full-softmax output over every item); forward + backward = 3 x forward;
* the floor, ``FLOPs / fp32 GEMM rate``, and the measured epoch time as a multiple of it.

Levers: ``--modes all`` (every position of a window, exact for causal models) or ``prefix`` (one sample per
prefix, the paper's protocol); ``--precisions fp32,bf16`` (CPU autocast); length bucketing is on (``--bucket
false`` to see what it saves); ``--exact-fusion true`` times the paper-exact gate, which reads every key of its
score row and so runs every batch at the full ``max_len`` (prefix mode only, as in training). Each
configuration runs one epoch (or ``--max-batches``) after one warm-up batch.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cli import TRAIN_FIELDS, boolean, cpu_name, paper_config
from data import load_dataset
from train import TrainConfig, batch_loss, epoch_batches, make_model, training_arrays, trim_width


def gemm_rate(shapes, dtype, repeats: int = 5) -> float:
    """Median FLOP/s of ``(m, k) @ (k, n)`` over ``shapes`` (weighted by their FLOPs)."""
    flops = secs = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        a @ b
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        flops += 2.0 * m * k * n
        secs += float(np.median(times))
    return flops / secs


def batch_flops(model, cfg: TrainConfig, rows: int, width: int, supervised: int) -> float:
    """Matmul FLOPs of one training step of the example models (forward + backward = 3 x forward), counted
    from the shapes: ``rows`` x ``width`` token slots, ``supervised`` positions scored against every item."""
    d, L, V = model.dim, model.layers, model.num_items + 1
    f = model.ff_dim or 4 * d
    num_classes = getattr(model, "num_classes", {})
    T = rows * width
    per_layer = 2 * T * d * d * 4 + 2 * T * d * f * 2  # q, k, v, out projections; feed-forward
    qk = d
    name = type(model).__name__
    if name.startswith("DIF"):
        a = model.attr_dim * len(num_classes)
        per_layer += 2 * T * model.attr_dim ** 2 * 2 * len(num_classes)  # attribute q, k projections
        per_layer += 2 * width * d * d * 2 + 2 * width * width * d  # position q, k and its (n, n) table, once
        qk = d + a
        if model.fusion == "gate":  # each source's masked row mean q . (A K): one (n, n) @ (n, e) per source
            per_layer += 2 * rows * width * width * (2 * d + a)
    per_layer += 2 * rows * width * width * (qk + d)  # scores and probs @ v
    total = L * per_layer
    if name == "SASRecF":
        total += 2 * T * d * (1 + len(num_classes)) * d  # the fusion Linear of the inputs
    total += 2 * supervised * d * V  # full-softmax output layer
    if getattr(model, "has_aap", False) and cfg.lamb:
        total += 2 * supervised * d * sum(num_classes.values())
    return 3.0 * total


def run_epoch(dataset, name: str, cfg: TrainConfig, model: dict, max_batches: int) -> dict:
    torch.manual_seed(0)
    core = make_model(dataset, name, model)
    core.train()
    opt = torch.optim.Adam([p for p in core.parameters() if p.requires_grad], lr=cfg.lr)
    inputs, targets = training_arrays(dataset, core, cfg)
    gen = torch.Generator().manual_seed(0)
    batches = epoch_batches(inputs, cfg, gen)
    if max_batches:
        batches = batches[:max_batches]

    def step(idx):
        width = trim_width(inputs[idx], core)
        tgt = targets[idx] if targets.ndim == 1 else targets[idx, :width]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            loss, _ = batch_loss(core, core, (inputs[idx, :width], tgt), cfg, dataset.tables, gen, 0, 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        supervised = len(idx) if targets.ndim == 1 else int((tgt != 0).sum())
        return batch_flops(core, cfg, len(idx), width, supervised), len(idx) * width

    step(batches[0])  # warm-up (allocator, oneDNN primitives)
    flops = slots = 0.0
    t0 = time.perf_counter()
    for idx in batches:
        f, s = step(idx)
        flops += f
        slots += s
    seconds = time.perf_counter() - t0
    tokens = int((inputs[np.concatenate(batches)] != 0).sum())
    return {"model": name, "mode": cfg.train_mode, "precision": cfg.precision, "batch_size": cfg.batch_size,
            "batches": len(batches), "of_batches": len(epoch_batches(inputs, cfg, torch.Generator().manual_seed(0))),
            "seconds": seconds, "flops": flops, "padding": 1.0 - tokens / slots}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="beauty")
    p.add_argument("--models", default="DIFSASRec")
    p.add_argument("--modes", default="all")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--batch-size", type=int, default=256, help="rows per batch (windows or prefixes)")
    p.add_argument("--bucket", type=boolean, default=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--exact-fusion", type=boolean, default=False,
                   help="the paper-exact fusion (full max_len per row; needs --modes prefix)")
    p.add_argument("--max-batches", type=int, default=0, help="time only the first N batches (0 = the epoch)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.exact_fusion and "all" in args.modes.split(","):
        p.error(f"--exact-fusion true needs --modes prefix, got --modes {args.modes}: the paper-exact fusion reads "
                "later keys of a window, so all-positions training would let a position see its future")
    torch.set_num_threads(args.threads)
    dataset = load_dataset(args.dataset)
    preset = paper_config(args.dataset)
    base = dataclasses.replace(TrainConfig(), **{k: v for k, v in preset.items() if k in TRAIN_FIELDS})
    base = dataclasses.replace(base, batch_size=args.batch_size, bucket=args.bucket, progress=False, log=False)
    model = {k: v for k, v in preset.items() if k not in TRAIN_FIELDS} | {"exact_fusion": args.exact_fusion}
    shapes = [(4096, model["dim"], model["dim"]), (4096, model["dim"], model["ff_dim"]),
              (2048, model["dim"], dataset.num_items + 1)]
    rates = {dt: gemm_rate(shapes, getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[dt]))
             for dt in ("fp32", "bf16")}
    command = "python " + " ".join(sys.argv)
    cpu = cpu_name()
    print(f"{command}\n{cpu}, {args.threads} torch threads, torch {torch.__version__}")
    print(f"GEMM rate at the model's shapes {shapes}: fp32 {rates['fp32'] / 1e9:.0f} GFLOP/s, "
          f"bf16 {rates['bf16'] / 1e9:.0f} GFLOP/s")
    print(f"{dataset.stats()}\nmodel: " + ", ".join(f"{k}={v}" for k, v in model.items()) + f", lamb={base.lamb}")
    rows = []
    print("| model | mode | precision | batches | seconds | epoch seconds | epoch TFLOP | floor s (fp32) "
          "| x floor | padding |\n|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        for mode in args.modes.split(","):
            for prec in args.precisions.split(","):
                cfg = dataclasses.replace(base, train_mode=mode, precision=prec)
                r = run_epoch(dataset, name, cfg, model, args.max_batches)
                share = r["batches"] / r["of_batches"]
                r["epoch_seconds"] = r["seconds"] / share  # extrapolated when --max-batches cuts the epoch
                r["epoch_flops"] = r["flops"] / share
                r["floor_seconds"] = r["epoch_flops"] / rates["fp32"]
                rows.append(r)
                print(f"| {name} | {mode} | {prec} | {r['batches']} of {r['of_batches']} | {r['seconds']:.1f} | "
                      f"{r['epoch_seconds']:.1f} | {r['epoch_flops'] / 1e12:.2f} | {r['floor_seconds']:.1f} | "
                      f"{r['epoch_seconds'] / r['floor_seconds']:.2f} | {r['padding']:.1%} |", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"command": command, "machine": cpu, "threads": args.threads,
                                              "torch": torch.__version__, "gemm_flops_per_s": rates,
                                              "gemm_shapes": shapes, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
