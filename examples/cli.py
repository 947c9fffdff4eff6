"""Command-line plumbing shared by the entry points: flags from :class:`TrainConfig`, multi-seed runs,
the comparison table (Markdown + JSON)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from .data import load_dataset
from .train import KS, TrainConfig, dist_info, run

__all__ = ["parser", "config_from_args", "compare", "table"]

METRICS = [f"{m}@{k}" for m in ("Recall", "NDCG") for k in KS]

#: the official DIF-SR configs (hidden 256, FFN 256, attribute width 64, gate fusion, dropout 0.5 / 0.3, Adam lr 1e-4,
#: 2048 prefixes a batch, validation every 2 epochs, stop after 10 evaluations without gain); depth, heads and
#: lambda per dataset, every other dataset takes Beauty's. Every model of a run takes the same values.
PAPER = {
    "dim": 256, "ff_dim": 256, "attr_dim": 64, "batch_size": 2048, "lr": 1e-4, "fusion": "gate",
    "train_mode": "prefix", "dropout": 0.5, "attn_dropout": 0.3, "patience": 10, "epochs": 200, "eval_every": 2,
}
PAPER_PER_DATASET = {
    "beauty": {"layers": 4, "heads": 8, "lamb": 10.0},
    "sports": {"layers": 3, "heads": 8, "lamb": 5.0},
}


def paper_config(dataset: str) -> dict:
    """The ``--paper`` preset for ``dataset`` (``beauty``, ``sports``; any other name gets Beauty's)."""
    return {**PAPER, **PAPER_PER_DATASET.get(str(dataset).lower(), PAPER_PER_DATASET["beauty"])}


def parser(description: str, models: list[str], defaults: dict | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="ml-100k", help="ml-100k, beauty, sports, or a path (atomic / S3-Rec files)")
    p.add_argument("--data", default=None, help="folder holding the dataset files (overrides the default location)")
    p.add_argument("--models", default=",".join(models), help="comma-separated models to compare")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument("--paper", action="store_true", help="the official DIF-SR config of the dataset (" +
                   ", ".join(f"{k}={v}" for k, v in PAPER.items()) + "; beauty: " +
                   ", ".join(f"{k}={v}" for k, v in PAPER_PER_DATASET["beauty"].items()) + "; sports: " +
                   ", ".join(f"{k}={v}" for k, v in PAPER_PER_DATASET["sports"].items()) +
                   "; other datasets: Beauty's); explicit flags still win")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--results", default=None, help="write the table to RESULTS.md and RESULTS.json "
                   "(default runs/<dataset>/<script>-results)")
    base = dataclasses.replace(TrainConfig(), **(defaults or {}))
    for f in dataclasses.fields(TrainConfig):
        if f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        value = getattr(base, f.name)
        if isinstance(value, bool):
            p.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes", "on"), default=None,
                           metavar="BOOL", help=f"(default {value})")
        else:
            p.add_argument(flag, type=type(value), default=None, help=f"(default {value})")
    p.set_defaults(_base=base)
    p.add_argument("--tag", default=None, help="suffix of the run folders (keeps ablation variants apart)")
    return p


def config_from_args(args) -> TrainConfig:
    cfg = args._base
    if args.paper:
        cfg = dataclasses.replace(cfg, **paper_config(Path(str(args.dataset)).name))
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if f.name != "extra" and getattr(args, f.name, None) is not None}
    cfg = dataclasses.replace(cfg, **given)
    if args.tag:
        cfg = dataclasses.replace(cfg, extra={"tag": args.tag})
    return cfg


def table(results: list[dict], models: list[str], key: str = "model") -> str:
    """Markdown table, one row per model (or per ``key``), mean ± std over seeds (sample std)."""
    lines = [f"| {key} | seeds | " + " | ".join(METRICS) + " | s/epoch | epochs (best) |",
             "|---|---|" + "---|" * len(METRICS) + "---|---|"]
    for name in models:
        rs = [r for r in results if r[key] == name]
        if not rs:
            continue
        cells = []
        for m in METRICS:
            vals = [r["test"][m] for r in rs]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):.4f} ± {sd:.4f}" if len(vals) > 1 else f"{vals[0]:.4f}")
        spe = statistics.mean(r["seconds_per_epoch"] for r in rs)
        ep = ", ".join(f"{r['epochs']} ({r['best_epoch']})" for r in rs)
        lines.append(f"| {name} | {len(rs)} | " + " | ".join(cells) + f" | {spe:.1f} | {ep} |")
    return "\n".join(lines)


def machine() -> str:
    return f"{platform.machine()} {platform.system()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def compare(args, script: str) -> list[dict]:
    """Run every (model, seed), print and write the comparison table."""
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config_from_args(args)
    rank, world = dist_info()
    models = [m for m in args.models.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",") if s != ""]
    dataset = load_dataset(args.dataset, data=args.data)
    if rank == 0:
        print(dataset.stats() + (f"; {dataset.notes}" if dataset.notes else ""), flush=True)
        print("config: " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items()), flush=True)
    t0 = time.perf_counter()
    results = []
    for seed in seeds:
        for name in models:
            results.append(run(dataset, name, dataclasses.replace(cfg, seed=seed)))
    wall = time.perf_counter() - t0
    if rank != 0:
        return results
    md = table(results, models)
    command = "python " + " ".join(sys.argv) if world == 1 else f"torchrun --nproc_per_node={world} " + " ".join(sys.argv)
    header = (f"{dataset.stats()}\n\nTest metrics of the best-validation-NDCG@10 checkpoint, full ranking, "
              f"leave-one-out; mean ± std over seeds {seeds}.\n\n")
    footer = f"\n\nCommand: `{command}`  \nWall time: {wall:.0f} s on {machine()}, {world} process(es).\n"
    print("\n" + header + md + footer, flush=True)
    base = Path(args.results) if args.results else Path(cfg.out_dir) / dataset.name / f"{script}-results"
    base.parent.mkdir(parents=True, exist_ok=True)
    base.with_suffix(".md").write_text(header + md + footer)
    slim = [{k: v for k, v in r.items() if k != "history"} for r in results]
    base.with_suffix(".json").write_text(json.dumps({"command": command, "wall_seconds": wall, "machine": machine(),
                                                     "dataset": dataset.stats(), "results": slim}, indent=1))
    print(f"wrote {base.with_suffix('.md')} and {base.with_suffix('.json')}", flush=True)
    return results
