"""Command-line plumbing shared by the entry points: flags from :class:`TrainConfig` and from the models'
own keywords, multi-seed runs, the comparison table (Markdown + JSON)."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import platform
import statistics
import sys
import time
import typing
from pathlib import Path

import torch

from data import load_dataset
from dif_attention.models import MODELS
from train import KS, TrainConfig, dist_info, run

__all__ = ["parser", "config_from_args", "compare", "table", "paper_config", "model_defaults", "MODEL_FLAGS"]

METRICS = [f"{m}@{k}" for m in ("Recall", "NDCG") for k in KS]

#: the official DIF-SR configs (hidden 256, FFN 256, attribute width 64, gate fusion, dropout 0.5 / 0.3, Adam lr 1e-4,
#: 2048 prefixes a batch, validation every 2 epochs, stop after 10 evaluations without gain); depth, heads and
#: lambda per dataset, every other dataset takes Beauty's. Every model of a run takes the same values.
PAPER = {
    "dim": 256, "ff_dim": 256, "attr_dim": 64, "batch_size": 2048, "lr": 1e-4, "fusion": "gate",
    "train_mode": "prefix", "hidden_dropout": 0.5, "attn_dropout": 0.3, "patience": 10, "epochs": 200,
    "eval_every": 2,
}
PAPER_PER_DATASET = {
    "beauty": {"layers": 4, "heads": 8, "lamb": 10.0},
    "sports": {"layers": 3, "heads": 8, "lamb": 5.0},
}
#: model keywords that are data, not settings (they come from the dataset)
DATA_KEYWORDS = ("num_items", "item_tables", "num_classes")


def paper_config(dataset: str) -> dict:
    """The ``--paper`` preset for ``dataset`` (``beauty``, ``sports``; any other name gets Beauty's)."""
    return {**PAPER, **PAPER_PER_DATASET.get(str(dataset).lower(), PAPER_PER_DATASET["beauty"])}


def model_defaults() -> dict[str, tuple[object, type]]:
    """Every model setting of the six models: name -> (default, type), read from their constructors."""
    out: dict[str, tuple[object, type]] = {}
    for cls in MODELS.values():
        for klass in cls.__mro__:
            init = vars(klass).get("__init__")
            if init is None or klass is torch.nn.Module:
                continue
            hints = typing.get_type_hints(init)
            for p in inspect.signature(init).parameters.values():
                if p.kind != p.KEYWORD_ONLY or p.name.startswith("_") or p.name in DATA_KEYWORDS or p.name in out:
                    continue
                kind = next((t for t in typing.get_args(hints.get(p.name)) if t is not type(None)),
                            hints.get(p.name))
                out[p.name] = (p.default, kind)
    return out


MODEL_FLAGS = model_defaults()


def _bool(text: str) -> bool:
    return text.lower() in ("1", "true", "yes", "on")


def parser(description: str, models: list[str], defaults: dict | None = None) -> argparse.ArgumentParser:
    """Flags: the run's own, one per :class:`TrainConfig` field, one per model setting. ``defaults``
    overrides the default of any of them by name (an entry point's own choices)."""
    defaults = dict(defaults or {})
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--dataset", default="ml-100k", help="ml-100k (the default), beauty, sports, or a path (atomic / "
                   "S3-Rec files)")
    p.add_argument("--data", default=None, help="folder holding the dataset files (overrides the default location)")
    p.add_argument("--models", default=",".join(models), help=f"comma-separated models to compare (default "
                   f"{','.join(models) or 'none'}; any of {', '.join(MODELS)})")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2 (default 0)")
    p.add_argument("--paper", action="store_true", help="the official DIF-SR config of the dataset (" +
                   ", ".join(f"{k}={v}" for k, v in PAPER.items()) + "; beauty: " +
                   ", ".join(f"{k}={v}" for k, v in PAPER_PER_DATASET["beauty"].items()) + "; sports: " +
                   ", ".join(f"{k}={v}" for k, v in PAPER_PER_DATASET["sports"].items()) +
                   "; other datasets: Beauty's); explicit flags still win")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--results", default=None, help="write the table to RESULTS.md and RESULTS.json "
                   "(default runs/<dataset>/<script>-results)")
    train = p.add_argument_group("training (TrainConfig)")
    base = dataclasses.replace(TrainConfig(), **{k: v for k, v in defaults.items() if k in TRAIN_FIELDS})
    for f in dataclasses.fields(TrainConfig):
        _add(train, f.name, getattr(base, f.name), type(f.default))
    model = p.add_argument_group("model settings (keywords of dif_attention.models; each model takes its own)")
    model_base = {}
    for name, (default, kind) in MODEL_FLAGS.items():
        model_base[name] = defaults.get(name, default)
        _add(model, name, model_base[name], kind)
    p.set_defaults(_base=base, _model_base=model_base)
    return p


def _add(group, name: str, default, kind) -> None:
    flags = ["--" + name.replace("_", "-")] + (["--dropout"] if name == "hidden_dropout" else [])
    if kind is bool:
        group.add_argument(*flags, dest=name, type=_bool, default=None, metavar="BOOL", help=f"(default {default})")
    else:
        shown = "4 x dim" if name == "ff_dim" and default is None else default
        group.add_argument(*flags, dest=name, type=kind, default=None, help=f"(default {shown})")


TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def config_from_args(args) -> tuple[TrainConfig, dict]:
    """``(TrainConfig, model settings)``: defaults, then ``--paper``'s values, then the flags given."""
    cfg, model = args._base, dict(args._model_base)
    if args.paper:
        preset = paper_config(Path(str(args.dataset)).name)
        cfg = dataclasses.replace(cfg, **{k: v for k, v in preset.items() if k in TRAIN_FIELDS})
        model.update({k: v for k, v in preset.items() if k not in TRAIN_FIELDS})
    given = {name: getattr(args, name) for name in list(TRAIN_FIELDS) + list(MODEL_FLAGS)
             if getattr(args, name, None) is not None}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in given.items() if k in TRAIN_FIELDS})
    model.update({k: v for k, v in given.items() if k in MODEL_FLAGS})
    return cfg, model


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
    cfg, model = config_from_args(args)
    rank, world = dist_info()
    models = [m for m in args.models.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",") if s != ""]
    dataset = load_dataset(args.dataset, data=args.data)
    if rank == 0:
        print(dataset.stats() + (f"; {dataset.notes}" if dataset.notes else ""), flush=True)
        print("training: " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items()), flush=True)
        print("model: " + ", ".join(f"{k}={v}" for k, v in model.items()), flush=True)
    t0 = time.perf_counter()
    results = []
    for seed in seeds:
        for name in models:
            results.append(run(dataset, name, dataclasses.replace(cfg, seed=seed), model))
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
