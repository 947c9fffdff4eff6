"""Command-line plumbing shared by the entry points: flags from :class:`TrainConfig` and from the models'
own keywords, checked before any work, multi-seed runs, the comparison table (Markdown + JSON).

A bad flag ends the program before any data is read, with one line naming the flag, the value and what is
allowed (exit status 2); a data file or checkpoint that cannot be used ends it with one line naming the file
(exit status 1). Neither prints a traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from data import AMAZON, DataError, load_dataset
from dif_attention import DIFError
from dif_attention.models import MODELS
from dif_attention.models.base import hyper_parameters
from train import (CHOICES, DATA_KEYWORDS, KS, MODEL_FLAGS, RunError, SettingError, TrainConfig, atomic_write_text,
                   check_settings, dist_info, model_defaults, preflight, run)

__all__ = ["Parser", "parser", "config_from_args", "settings_from_args", "user_errors", "compare", "table",
           "results_file", "cpu_name", "machine", "load_data",
           "paper_config", "paper_key", "model_defaults", "flag", "MODEL_FLAGS", "DATA_KEYWORDS"]

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
TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
ALIASES = {"hidden_dropout": ["--dropout"]}


def paper_key(dataset) -> str | None:
    """The dataset whose ``--paper`` preset ``dataset`` takes: ``beauty`` or ``sports`` for their names and for
    a file or folder named after one (``.../Sports_and_Outdoors.txt``), None for any other."""
    stem = Path(str(dataset)).stem.lower()
    key = {file.lower(): name for name, file in AMAZON.items()}.get(stem, stem)
    return key if key in PAPER_PER_DATASET else None


def paper_config(dataset) -> dict:
    """The ``--paper`` preset for ``dataset`` (see :func:`paper_key`; any other dataset gets Beauty's)."""
    return {**PAPER, **PAPER_PER_DATASET[paper_key(dataset) or "beauty"]}


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr (``prog: error: message``), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def flag(name: str) -> str:
    """The command-line flag(s) of a setting: ``batch_size`` -> ``--batch-size``."""
    return "/".join(["--" + name.replace("_", "-")] + ALIASES.get(name, []))


def boolean(text: str) -> bool:
    """``true``/``false`` (also 1/0, yes/no, on/off)."""
    value = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False,
             "off": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value


def seed_list(text: str) -> list[int]:
    """``0,1,2`` -> ``[0, 1, 2]``: distinct ints >= 0."""
    parts = [t.strip() for t in text.split(",") if t.strip()]
    if not parts or not all(t.isdigit() for t in parts) or len(set(map(int, parts))) != len(parts):
        raise argparse.ArgumentTypeError(f"expected distinct comma-separated ints >= 0 (e.g. 0,1,2), got {text!r}")
    return [int(t) for t in parts]


def name_list(allowed) -> "callable":
    """A flag type: comma-separated names, each among ``allowed`` (None: any name, at least one)."""
    def parse(text: str) -> list[str]:
        names = [t.strip() for t in text.split(",") if t.strip()]
        if allowed is None and not names:
            raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
        unknown = [n for n in names if allowed is not None and n not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(map(repr, unknown))}; expected comma-separated "
                                             f"names among {', '.join(allowed)}")
        return names
    return parse


def threads(text: str) -> int:
    """An int >= 0 (0 = torch's default)."""
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected an int >= 0 (0 = torch's default), got {text!r}")
    return int(text)


ATTRIBUTES_HELP = ("comma-separated item attributes to use (default: the dataset's; ml-100k: class; beauty, sports "
                   "and other S3-Rec files: attribute, their one field of brand and categories together, or brand "
                   "and / or categories, that field split apart; atomic files: token_seq fields of the .item file)")


def load_data(args):
    """The dataset of ``--dataset`` / ``--data`` / ``--attributes``. Without ``--attributes``, the attributes a
    ``--config`` file names (a search's choice) load by name and are the only ones kept (an S3-Rec file's brand /
    categories are split on request); ``--attributes`` given wins over the file."""
    chosen = None
    if not args.attributes and getattr(args, "config", None):
        from tune import read_config  # tune imports this module: import at call time
        chosen = read_config(args.config)["attributes"]
    dataset = load_dataset(args.dataset, data=args.data, attributes=args.attributes or chosen)
    if chosen is not None:
        from tune import with_attributes
        dataset = with_attributes(dataset, chosen)
    return dataset


def runs_parser(description: str, *, seeds: str, example: str) -> Parser:
    """The arguments of a script that reads finished runs: ``folder`` (``runs/<dataset>``), ``--dataset``,
    ``--models`` (run folders, e.g. ``example``) and ``--seeds`` (default ``seeds``)."""
    p = Parser(description=description)
    p.add_argument("folder", help="runs/<dataset>")
    p.add_argument("--dataset", default=None, help="dataset name (default: the folder's name)")
    p.add_argument("--attributes", type=name_list(None), default=None, help=ATTRIBUTES_HELP + "; as the runs had")
    p.add_argument("--models", required=True, help=f"comma-separated run folders, e.g. {example}")
    p.add_argument("--seeds", type=seed_list, default=seeds)
    return p


def parser(description: str, models: list[str], defaults: dict | None = None) -> Parser:
    """Flags: the run's own, one per :class:`TrainConfig` field, one per model setting. ``defaults``
    overrides the default of any of them by name (an entry point's own choices)."""
    defaults = dict(defaults or {})
    p = Parser(description=description)
    p.add_argument("--dataset", default="ml-100k", help="ml-100k (the default), beauty, sports, or a path (atomic / "
                   "S3-Rec files)")
    p.add_argument("--data", default=None, help="folder holding the dataset files (overrides the default location)")
    p.add_argument("--attributes", type=name_list(None), default=None, help=ATTRIBUTES_HELP)
    p.add_argument("--models", type=name_list(list(MODELS)), default=",".join(models),
                   help=f"comma-separated models to compare (default {','.join(models) or 'none'}; any of "
                        f"{', '.join(MODELS)})")
    p.add_argument("--seeds", type=seed_list, default="0", help="comma-separated seeds, e.g. 0,1,2 (default 0)")
    p.add_argument("--paper", action="store_true", help="the official DIF-SR config of the dataset (" +
                   ", ".join(f"{k}={v}" for k, v in PAPER.items()) + "; beauty: " +
                   ", ".join(f"{k}={v}" for k, v in PAPER_PER_DATASET["beauty"].items()) + "; sports: " +
                   ", ".join(f"{k}={v}" for k, v in PAPER_PER_DATASET["sports"].items()) +
                   "; other datasets: Beauty's); explicit flags still win")
    p.add_argument("--threads", type=threads, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--results", default=None, help="write the table to RESULTS.md and RESULTS.json "
                   "(default runs/<dataset>/<script>-results)")
    p.add_argument("--config", default=None, help="a JSON file of settings (examples/tune.py's best.json: its "
                   "train and model_settings, and its attributes); flags given still win")
    train = p.add_argument_group("training (TrainConfig)")
    base = dataclasses.replace(TrainConfig(), **{k: v for k, v in defaults.items() if k in TRAIN_FIELDS})
    for f in dataclasses.fields(TrainConfig):
        if f.name != "seed":  # --seeds sets it, one run per seed (``--seed 3`` abbreviates ``--seeds 3``)
            _add(train, f.name, getattr(base, f.name), type(f.default))
    model = p.add_argument_group("model settings (keywords of dif_attention.models; each model takes its own)")
    model_base = {}
    for name, (default, kind) in MODEL_FLAGS.items():
        model_base[name] = defaults.get(name, default)
        _add(model, name, model_base[name], kind)
    p.set_defaults(_base=base, _model_base=model_base)
    return p


def _add(group, name: str, default, kind) -> None:
    flags = ["--" + name.replace("_", "-")] + ALIASES.get(name, [])
    if kind is bool:
        group.add_argument(*flags, dest=name, type=boolean, default=None, metavar="BOOL", help=f"(default {default})")
    else:
        shown = "4 x dim" if name == "ff_dim" and default is None else default
        group.add_argument(*flags, dest=name, type=kind, default=None, choices=CHOICES.get(name),
                           help=f"(default {shown})")


def config_from_args(args) -> tuple[TrainConfig, dict]:
    """``(TrainConfig, model settings)``: defaults, then ``--paper``'s values, then the flags given."""
    cfg, model = args._base, dict(args._model_base)
    if args.paper:
        preset = paper_config(args.dataset)
        cfg = dataclasses.replace(cfg, **{k: v for k, v in preset.items() if k in TRAIN_FIELDS})
        model.update({k: v for k, v in preset.items() if k not in TRAIN_FIELDS})
    if getattr(args, "config", None):
        from tune import load_config  # tune imports this module: import at call time
        train, settings = load_config(args.config)
        cfg = dataclasses.replace(cfg, **train)
        model.update(settings)
    given = {name: getattr(args, name) for name in list(TRAIN_FIELDS) + list(MODEL_FLAGS)
             if getattr(args, name, None) is not None}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in given.items() if k in TRAIN_FIELDS})
    model.update({k: v for k, v in given.items() if k in MODEL_FLAGS})
    return cfg, model


def unused_flags(args, models, model: dict) -> list[str]:
    """The flags given that no model of ``models`` takes (with the resolved model settings ``model``). They are
    accepted, so that one command serves a comparison of models, and named in a note so none looks in force."""
    used = set().union(*(hyper_parameters(MODELS[m]) for m in models))
    if any("attr_dim" in hyper_parameters(MODELS[m]) or ("aap" in hyper_parameters(MODELS[m]) and model.get("aap"))
           for m in models):  # a model with attribute predictors
        used |= {"lamb", "aap_init"}
    if not all(MODELS[m].causal for m in models):
        used |= {"mask_ratio", "ft_ratio"}
    candidates = [*MODEL_FLAGS, "lamb", "aap_init", "mask_ratio", "ft_ratio"]
    return [flag(k) for k in candidates if getattr(args, k, None) is not None and k not in used]


def setting_message(err: SettingError) -> str:
    """A :class:`SettingError` in terms of the flags: ``--batch-size: expected an int >= 1, got 0``."""
    return f"{flag(err.name)}: expected {err.expected}, got {err.got}"


def settings_from_args(p: argparse.ArgumentParser, args, models=None) -> tuple[TrainConfig, dict]:
    """``config_from_args``, checked (:func:`train.check_settings` with the models ``models``, default
    ``args.models``): a bad value ends the program with one line naming its flag."""
    config = getattr(args, "config", None)
    if config and args.paper:
        p.error(f"--paper, --config: expected one of the two, got both (the file {config} sets every setting "
                "--paper would)")
    try:
        cfg, model = config_from_args(args)
    except RunError as err:  # an unreadable --config
        p.error(str(err))
    try:
        check_settings(cfg, model, args.models if models is None else models)
    except SettingError as err:
        if config and getattr(args, err.name, None) is None:  # the value came from the file, not a flag
            p.error(f"{config}: {err.name}: expected {err.expected}, got {err.got}")
        p.error(setting_message(err))
    return cfg, model


@contextlib.contextmanager
def user_errors(p: argparse.ArgumentParser):
    """Turn the errors a user can fix (a data file, a checkpoint, a setting, a library argument) into one line on
    stderr and exit status 1."""
    try:
        yield
    except SettingError as err:
        p.exit(1, f"{p.prog}: error: {setting_message(err)}\n")
    except (DataError, RunError, DIFError) as err:
        p.exit(1, f"{p.prog}: error: {err}\n")


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


def results_file(base, suffix: str) -> Path:
    """The file ``--results base`` names for ``suffix`` (``".md"`` or ``".json"``): ``base`` with ``suffix``
    appended, so a dot inside the name survives (``runs/full-lr0.001`` -> ``runs/full-lr0.001.md``); a ``base``
    already ending in ``.md`` or ``.json`` has that ending replaced."""
    base = Path(base)
    if base.suffix in (".md", ".json"):
        base = base.with_suffix("")
    return base.with_name(base.name + suffix)


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's processor string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """The machine line of a results file: CPU, OS, torch threads and version."""
    return (f"{cpu_name()} ({platform.machine()} {platform.system()}), {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}")


def compare(p: argparse.ArgumentParser, args, script: str) -> list[dict]:
    """Check every flag, load the data, check every run (attributes, checkpoints), then run every (model,
    seed), print and write the comparison table."""
    cfg, model = settings_from_args(p, args)
    models, seeds = args.models, args.seeds
    if not models:
        p.error(f"--models: expected at least one of {', '.join(MODELS)}, got none")
    if args.threads:
        torch.set_num_threads(args.threads)
    with user_errors(p):
        rank, world = dist_info()
        dataset = load_data(args)
        for seed in seeds:
            for name in models:
                preflight(dataset, name, dataclasses.replace(cfg, seed=seed), model)
        if rank == 0:
            print(dataset.stats() + (f"; {dataset.notes}" if dataset.notes else ""), flush=True)
            unused = unused_flags(args, models, model)
            if unused:
                print(f"note: {', '.join(unused)}: not used by {', '.join(models)}", flush=True)
            print("training: " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items() if k != "seed")
                  + f", seeds={','.join(map(str, seeds))}", flush=True)
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
    launcher = "python" if world == 1 else f"torchrun --nproc_per_node={world}"
    command = launcher + " " + " ".join(sys.argv)
    header = (f"{dataset.stats()}\n\nTest metrics of the best-validation-NDCG@10 checkpoint, full ranking, "
              f"leave-one-out; mean ± std over seeds {seeds}.\n\n")
    footer = f"\n\nCommand: `{command}`  \nWall time: {wall:.0f} s on {machine()}, {world} process(es).\n"
    print("\n" + header + md + footer, flush=True)
    base = Path(args.results) if args.results else Path(cfg.out_dir) / dataset.name / f"{script}-results"
    base.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(results_file(base, ".md"), header + md + footer)
    slim = [{k: v for k, v in r.items() if k != "history"} for r in results]
    atomic_write_text(results_file(base, ".json"), json.dumps({"command": command, "wall_seconds": wall,
                                                             "machine": machine(), "dataset": dataset.stats(),
                                                             "results": slim}, indent=1))
    print(f"wrote {results_file(base, '.md')} and {results_file(base, '.json')}", flush=True)
    return results
