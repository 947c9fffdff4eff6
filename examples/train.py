"""Shared training loop: batches, losses, full-ranking evaluation, early stopping, checkpoints, DDP.

Usage (library-style, with ``examples/`` on the import path; the entry points are ``sasrec.py``,
``bert4rec.py``, ``ablation.py``)::

    from data import load_dataset
    from train import TrainConfig, run
    result = run(load_dataset("ml-100k"), "DIFSASRec", TrainConfig(epochs=50, seed=0), {"dim": 64, "fusion": "gate"})
    result["test"]["NDCG@10"]

Training settings live in :class:`TrainConfig`; model settings are a plain dict passed straight to
:func:`dif_attention.models.build_model` (keywords a model does not take are dropped, so one dict serves every
model of a comparison).

Losses (full softmax over all items, class 0 included as in RecBole, its score is -inf at evaluation):

* causal models, ``train_mode="prefix"``: one sample per prefix (RecBole / DIF-SR), loss at the last position;
* causal models, ``train_mode="all"``: windows of the training history, loss at every position (SASRec's
  original scheme, far cheaper; exact for causal models since position ``t`` sees items ``<= t`` only);
* BERT4Rec models: a fraction ``mask_ratio`` of the items is replaced by ``[MASK]`` (at least one per
  sequence); with probability ``ft_ratio`` a batch masks only the last item; loss at masked positions.
  ``train_mode="prefix"`` trains on every prefix (history + target), ``"all"`` on windows of the history.

DIF models add ``lamb * AAP`` (the target items' attributes, BCE). Evaluation: full ranking of all items,
Recall@K / NDCG@K; the test metrics are those of the checkpoint with the best validation ``valid_metric``
(NDCG@10 by default; RecBole's ``valid_metric``, which the official DIF-SR configs set to Recall@20).

Multi-process: run the same script under ``torchrun --nproc_per_node=N``; each global batch is split across
the processes (DistributedDataParallel, gloo on CPU / nccl on GPU), so the optimisation matches one process
on the same global batch.

Settings are checked before any work (:func:`check_settings`: ``SettingError``, a ``ValueError``, naming the
setting). Checkpoints: ``<run dir>/last.pt`` after every epoch and every ``checkpoint_every`` optimiser steps,
``best.pt`` and ``result.json`` at the end, each written to a temporary file and renamed. ``resume=True``
continues from ``last.pt`` exactly -- weights, optimiser, the position in the epoch and every random stream
(torch's CPU generator and CUDA's, NumPy's, Python's, the batch generator; each process's under DDP) -- so a run
killed at any step and resumed ends bit-identical to an uninterrupted one. A resume whose settings differ from
the checkpoint's (other than :data:`SILENT_SETTINGS`) is refused unless ``resume_override=True``, which records
the change and its step in ``result.json`` (``overrides``). A finished run extended with a larger ``epochs``
keeps the validation of its old last epoch (always evaluated) among its candidates for the best checkpoint, also
when that epoch is not a multiple of ``eval_every``: the uninterrupted longer run would not have evaluated it.
"""
from __future__ import annotations

import inspect
import json
import math
import os
import random
import re
import time
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    tqdm = None

from dif_attention import aap_loss, multi_hot
from dif_attention.embedding import POOLINGS
from dif_attention.functional import BACKENDS
from dif_attention.models import ATTRIBUTE_MODELS, MODELS, build_model, full_softmax_cross_entropy, save_model
from dif_attention.models.base import hyper_parameters
from dif_attention.models.sasrec import FUSIONS

__all__ = ["TrainConfig", "run", "evaluate", "batch_metrics", "rank_metrics", "append_item", "make_model",
           "prepare_model", "check_settings", "preflight", "load_checkpoint", "model_defaults", "RunError",
           "SettingError", "CheckpointError", "SILENT_SETTINGS", "KS", "VALID_METRICS"]

KS = (10, 20)
#: the validation metrics a run can select its best checkpoint by (``TrainConfig.valid_metric``)
VALID_METRICS = tuple(f"{m}@{k}" for k in KS for m in ("NDCG", "Recall"))


@dataclass
class TrainConfig:
    """Every training knob of a run (keyword configuration; CLI flags mirror these names). Model settings
    (width, depth, fusion, dropout, ...) are the model's own keywords: see ``dif_attention.models``."""
    lamb: float = 10.0  # AAP weight lambda (DIF models; SASRecF with aap=True)
    aap_init: str = "prior"  # AAP head biases: "prior" (log-odds of each label's training rate) or "zero" (reference)
    lr: float = 1e-3
    warmup: int = 0  # optimiser steps of linear learning-rate warm-up from 0 (0 = none)
    optimizer: str = "adam"  # or "sgd" (plain SGD: used by the DDP test, where Adam would hide a gradient scale)
    weight_decay: float = 0.0
    batch_size: int = 64
    eval_batch_size: int = 512
    epochs: int = 20
    eval_every: int = 1
    patience: int = 5
    valid_metric: str = "NDCG@10"  # the validation metric that picks the best checkpoint and stops early
    train_mode: str = "all"
    bucket: bool = True
    mask_ratio: float = 0.2
    ft_ratio: float = 0.5
    seed: int = 0
    precision: str = "fp32"  # training matmuls in "fp32" or "bf16" (CPU/CUDA autocast); evaluation is always fp32
    device: str = "auto"  # "auto" (CUDA when there is one, else the CPU), "cpu", "cuda" or "cuda:N"
    max_train_seconds: float = 0.0
    out_dir: str = "runs"
    tag: str = ""  # suffix of the run folder (keeps ablation variants apart)
    resume: bool = False  # continue from <run dir>/last.pt (exactly: weights, optimiser, every RNG, the batch)
    resume_override: bool = False  # resume even if settings differ from the checkpoint's (recorded in result.json)
    save: bool = True
    checkpoint_every: int = 100  # also write last.pt every K optimiser steps inside an epoch (0 = at epoch ends)
    progress: bool = True
    log: bool = True


class RunError(ValueError):
    """A run cannot start: a bad setting, an unreadable checkpoint, a resume whose settings differ. The message
    is one line naming the setting or the file."""


class SettingError(RunError):
    """A setting out of range: ``name: expected X, got Y`` (``name`` a ``TrainConfig`` field or model setting)."""

    def __init__(self, name: str, expected: str, got: str):
        self.name, self.expected, self.got = name, expected, got
        super().__init__(f"{name}: expected {expected}, got {got}")


class CheckpointError(RunError):
    """A checkpoint file that cannot be read (truncated, foreign) or resumed; the message names the file."""


#: settings that do not change a run's math: a resumed run may change them freely (``epochs`` and ``patience``
#: extend or shorten the run, ``max_train_seconds`` its budget; the rest are where and how it reports)
SILENT_SETTINGS = ("out_dir", "progress", "log", "resume", "resume_override", "save", "checkpoint_every",
                   "max_train_seconds", "epochs", "patience", "device")


def model_defaults() -> dict[str, tuple[object, type]]:
    """Every model setting of the models in ``dif_attention.models``: name -> (default, type), read from their
    constructors (the data keywords ``num_items``, ``item_tables``, ``num_classes`` excluded)."""
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


#: model keywords that are data, not settings (they come from the dataset)
DATA_KEYWORDS = ("num_items", "item_tables", "num_classes")
#: every model setting: name -> (default, type)
MODEL_FLAGS = model_defaults()


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _at_least(minimum: int):
    return lambda v: _is_int(v) and v >= minimum, f"an int >= {minimum}"


def _one_of(options):
    return lambda v: isinstance(v, str) and v in options, "one of " + ", ".join(map(repr, options))


_POSITIVE = (lambda v: _is_real(v) and v > 0, "a finite number > 0")
_NON_NEGATIVE = (lambda v: _is_real(v) and v >= 0, "a finite number >= 0")
_FRACTION = (lambda v: _is_real(v) and 0 <= v <= 1, "a number in [0, 1]")
_DROPOUT = (lambda v: _is_real(v) and 0 <= v < 1, "a probability in [0, 1)")
_BOOL = (lambda v: isinstance(v, bool), "true or false")
_TEXT = (lambda v: isinstance(v, str), "a string")

#: the allowed values of the settings that take a name (the CLI's ``choices``)
CHOICES = {"aap_init": ("prior", "zero"), "optimizer": ("adam", "sgd"), "train_mode": ("all", "prefix"),
           "precision": ("fp32", "bf16"), "backend": BACKENDS, "pooling": POOLINGS, "fusion": FUSIONS,
           "valid_metric": VALID_METRICS}
#: what each TrainConfig field accepts: (test, what is allowed)
TRAIN_RULES = {
    "lamb": _NON_NEGATIVE, "aap_init": _one_of(CHOICES["aap_init"]), "lr": _POSITIVE, "warmup": _at_least(0),
    "optimizer": _one_of(CHOICES["optimizer"]), "weight_decay": _NON_NEGATIVE, "batch_size": _at_least(1),
    "eval_batch_size": _at_least(1), "epochs": _at_least(1), "eval_every": _at_least(1), "patience": _at_least(0),
    "valid_metric": _one_of(CHOICES["valid_metric"]), "train_mode": _one_of(CHOICES["train_mode"]), "bucket": _BOOL,
    "mask_ratio": _FRACTION, "ft_ratio": _FRACTION,
    "seed": _at_least(0), "precision": _one_of(CHOICES["precision"]), "max_train_seconds": _NON_NEGATIVE,
    "device": (lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None,
               "'auto', 'cpu', 'cuda' or 'cuda:N'"),
    "out_dir": (lambda v: isinstance(v, str) and v != "", "a folder name"), "tag": _TEXT, "resume": _BOOL,
    "resume_override": _BOOL, "save": _BOOL, "checkpoint_every": _at_least(0), "progress": _BOOL, "log": _BOOL,
}
#: what each model setting accepts
MODEL_RULES = {
    "dim": _at_least(1), "layers": _at_least(1), "heads": _at_least(1), "max_len": _at_least(1),
    "hidden_dropout": _DROPOUT, "attn_dropout": _DROPOUT,
    "ff_dim": (lambda v: v is None or (_is_int(v) and v >= 1), "an int >= 1 (or none: 4 x dim)"),
    "backend": _one_of(CHOICES["backend"]), "pooling": _one_of(CHOICES["pooling"]), "trainable_attributes": _BOOL,
    "attr_init_std": _NON_NEGATIVE, "aap": _BOOL, "attr_dim": _at_least(1), "fusion": _one_of(CHOICES["fusion"]),
    "exact_fusion": _BOOL, "input_fusion": _BOOL,
}


def _check(name: str, value, rule) -> None:
    test, expected = rule
    if not test(value):
        raise SettingError(name, expected, repr(value))


def check_settings(cfg: "TrainConfig", model: dict | None = None, models=()) -> None:
    """Every training setting (``cfg``), every model setting (``model``) and the model names ``models``, before
    any work: :class:`SettingError` (a ``ValueError``) ``name: expected X, got Y`` for the first bad one.
    Model settings unknown to every model are refused (a typo would silently be dropped)."""
    if not isinstance(cfg, TrainConfig):
        raise SettingError("cfg", "a TrainConfig", type(cfg).__name__)
    for f in fields(TrainConfig):
        _check(f.name, getattr(cfg, f.name), TRAIN_RULES[f.name])
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise SettingError("models", "names among " + ", ".join(MODELS), ", ".join(map(repr, unknown)))
    settings = dict(model or {})
    unknown = sorted(set(settings) - set(MODEL_RULES))
    if unknown:
        raise SettingError("model", "settings among " + ", ".join(MODEL_RULES), f"unknown {unknown}")
    for name, value in settings.items():
        _check(name, value, MODEL_RULES[name])
    full = {**{k: d for k, (d, _) in MODEL_FLAGS.items()}, **settings}
    if cfg.device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if train_device(cfg).index >= count:
            raise SettingError("device", f"'auto' or 'cpu' (this machine has {count} CUDA devices)"
                               if not count else f"a CUDA device index < {count}", repr(cfg.device))
    if full["backend"] == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise SettingError("backend", "'triton' only on a CUDA device or under TRITON_INTERPRET=1 (else auto, sdpa "
                           "or math)", "'triton' on a machine without CUDA")
    if full["dim"] % full["heads"]:
        raise SettingError("dim", f"a multiple of heads={full['heads']}", repr(full["dim"]))
    uses_attr_dim = not models or any("attr_dim" in hyper_parameters(MODELS[m]) for m in models)
    if uses_attr_dim and full["attr_dim"] % full["heads"]:
        raise SettingError("attr_dim", f"a multiple of heads={full['heads']}", repr(full["attr_dim"]))
    # the paper-exact fusions read every key of a score row: in all-positions training a causal model's position
    # t would see the later items of its window through the fusion weights
    causal_exact = [m for m in models or MODELS if MODELS[m].causal and "exact_fusion" in hyper_parameters(MODELS[m])]
    if full["exact_fusion"] and full["fusion"] != "add" and cfg.train_mode == "all" and causal_exact:
        raise SettingError("exact_fusion", "false with train_mode='all' (the paper-exact fusions read later keys of "
                           f"the window; use train_mode='prefix' for {', '.join(causal_exact)})",
                           f"True with fusion={full['fusion']!r}")


def make_model(dataset, model_name: str, model: dict | None = None):
    """``build_model(model_name, ...)`` for ``dataset`` (its item count and attribute tables) with the model
    settings ``model``; settings the model does not take are dropped."""
    return build_model(model_name, num_items=dataset.num_items, item_tables=dataset.tables or None,
                       num_classes=dataset.num_classes or None, strict=False, **(model or {}))


# ---------------------------------------------------------------------------------------------- distributed
def dist_info() -> tuple[int, int]:
    """(rank, world size); initialises the process group under torchrun (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if world > 1:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def train_device(cfg: "TrainConfig") -> torch.device:
    """Where a run trains: ``cfg.device``, with ``"auto"`` = CUDA when there is one, else the CPU. Under torchrun
    on CUDA each process takes the GPU of its ``LOCAL_RANK``."""
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if cfg.device in ("auto", "cuda") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cuda", int(cfg.device.partition(":")[2] or 0))


def describe_device(device: torch.device) -> str:
    """``cpu`` or ``cuda:0 (NVIDIA H100 80GB HBM3)``: what result.json records."""
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)


def all_sum(t: Tensor, world: int) -> Tensor:
    if world > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t


# ---------------------------------------------------------------------------------------------- helpers
def lengths(ids: Tensor) -> Tensor:
    return (ids != 0).sum(-1)


def append_item(hist: Tensor, item: "Tensor | int") -> tuple[Tensor, Tensor]:
    """Put ``item`` right after each right-padded history ``(b, n)``; a full history is shifted left by one
    (dropping its oldest item). Returns (new ids, position of the appended item ``(b,)``)."""
    n = hist.shape[1]
    ln = lengths(hist)
    full = ln >= n
    out = torch.where(full[:, None], torch.roll(hist, -1, dims=1), hist).clone()
    pos = torch.where(full, torch.full_like(ln, n - 1), ln)
    item = torch.as_tensor(item, dtype=hist.dtype, device=hist.device).expand(hist.shape[0])
    out[torch.arange(hist.shape[0], device=hist.device), pos] = item
    return out, pos


def bert_mask(seqs: Tensor, *, mask_id: int, ratio: float, last_only: bool, gen: torch.Generator):
    """Masked inputs and targets ``(b, n)`` (target 0 = no loss). At least one item per sequence is masked."""
    valid = seqs != 0
    if last_only:
        chosen = torch.zeros_like(valid)
    else:
        chosen = (torch.rand(seqs.shape, generator=gen) < ratio) & valid
    last = (lengths(seqs) - 1).clamp_min(0)
    none = ~chosen.any(-1)
    chosen[torch.arange(len(seqs))[none], last[none]] = True
    chosen &= valid
    inputs = torch.where(chosen, torch.full_like(seqs, mask_id), seqs)
    return inputs, torch.where(chosen, seqs, torch.zeros_like(seqs))


def rank_metrics(scores: Tensor, targets: Tensor, ks=KS) -> dict[str, Tensor]:
    """Full-ranking metrics per row: ``scores (b, num_items + 1)`` with column 0 = padding (ignored),
    ``targets (b,)``. Rank = number of items scored strictly higher than the target (ties favour the
    target). Recall@K = [rank < K]; NDCG@K = [rank < K] / log2(rank + 2). Returns per-row tensors. A row whose
    target score is not finite is a miss, and a NaN score counts as above the target: a diverged model scores 0,
    never 1."""
    scores = scores.clone()
    scores[:, 0] = -torch.inf
    target_score = scores.gather(1, targets[:, None])
    rank = ((scores > target_score) | scores.isnan()).sum(-1)
    finite = target_score[:, 0].isfinite()
    out = {}
    for k in ks:
        hit = ((rank < k) & finite).float()
        out[f"Recall@{k}"] = hit
        out[f"NDCG@{k}"] = hit / torch.log2(rank.float() + 2)
    return out


@torch.no_grad()
def batch_metrics(model, hist: np.ndarray, targets: np.ndarray, *, ks=KS, trim: bool = True) -> dict[str, Tensor]:
    """Per-row Recall@K / NDCG@K of one batch of users (full ranking; ``model`` in eval mode). Causal models
    read the last history position; masked models get ``[MASK]`` appended. ``trim`` drops all-padding columns."""
    device = next(model.parameters()).device
    ids, tgt = torch.from_numpy(hist).to(device), torch.from_numpy(targets).to(device)
    if model.causal:
        pos = lengths(ids) - 1
    else:
        ids, pos = append_item(ids, model.mask_id)
    if trim:
        ids = ids[:, :int(pos.max()) + 1]
    h = model(ids)[torch.arange(len(ids), device=device), pos]
    return rank_metrics(model.item_scores(h), tgt, ks)


@torch.no_grad()
def evaluate(model, hist: np.ndarray, targets: np.ndarray, *, batch_size: int = 512, rank: int = 0,
             world: int = 1, ks=KS, trim: bool = True) -> dict[str, float]:
    """Mean Recall@K / NDCG@K over users (rows of ``hist``), full ranking; sharded over processes.
    ``trim``: batch users of similar length and drop all-padding columns (exact for length-agnostic fusions)."""
    model.eval()
    sums = torch.zeros(2 * len(ks) + 1, dtype=torch.float64, device=next(model.parameters()).device)
    rows = np.arange(rank, len(hist), world)
    if trim:
        rows = rows[np.argsort((hist[rows] != 0).sum(-1), kind="stable")]
    names = [f"{m}@{k}" for k in ks for m in ("Recall", "NDCG")]
    for start in range(0, len(rows), batch_size):
        idx = rows[start:start + batch_size]
        m = batch_metrics(model, hist[idx], targets[idx], ks=ks, trim=trim)
        sums[:-1] += torch.stack([m[n].sum().double() for n in names])
        sums[-1] += len(idx)
    sums = all_sum(sums, world)
    return {n: float(sums[i] / sums[-1]) for i, n in enumerate(names)}


# ---------------------------------------------------------------------------------------------- training data
def training_arrays(dataset, model, cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray | None]:
    """(inputs, targets) for causal models; (sequences, None) for masked models."""
    if cfg.train_mode not in ("all", "prefix"):
        raise ValueError(f"train_mode: expected 'all' or 'prefix', got {cfg.train_mode!r}")
    if model.causal:
        if cfg.train_mode == "all":
            return dataset.window_samples(model.max_len)
        return dataset.prefix_samples(model.max_len)
    if cfg.train_mode == "all":
        return dataset.train_windows(model.max_len), None
    hist, tgt = dataset.prefix_samples(model.max_len)
    seqs, pos = append_item(torch.from_numpy(hist), torch.from_numpy(tgt))
    seqs[torch.arange(len(seqs)), pos] = torch.from_numpy(tgt)
    return seqs.numpy(), None


def attribute_rates(items: np.ndarray, tables: dict, num_classes: dict) -> dict[str, Tensor]:
    """Rate at which each attribute class is positive among the training targets ``items`` (item ids, 0 =
    none): ``{name: (V,)}`` -- for :meth:`AttributePredictor.init_prior_`."""
    items = np.asarray(items)
    ids = torch.from_numpy(items[items != 0]).long()
    out = {}
    for a, table in tables.items():
        counts = torch.bincount(ids, minlength=table.shape[0]).double()
        hot = multi_hot(table, num_classes[a]).double()  # (num_items + 1, V)
        out[a] = (counts @ hot / max(len(ids), 1)).float()
    return out


def batch_loss(model, core, batch: tuple, cfg: TrainConfig, tables: dict, gen: torch.Generator, rank: int,
               world: int) -> tuple[Tensor, Tensor]:
    """Loss to backpropagate (scaled for DDP's gradient averaging) and the global-batch loss to report.

    ``batch``: global-batch arrays; targets are prepared on the whole global batch (same generator on
    every process), then each process takes rows ``rank::world``.
    """
    if core.causal:
        ids, tgt = (torch.from_numpy(a) for a in batch)
        if tgt.ndim == 1:  # prefix samples: supervise the last real position only
            full = torch.zeros_like(ids)
            full[torch.arange(len(ids)), lengths(ids) - 1] = tgt
            tgt = full
    else:
        last_only = bool(torch.rand((), generator=gen) < cfg.ft_ratio)
        ids, tgt = bert_mask(torch.from_numpy(batch[0]), mask_id=core.mask_id, ratio=cfg.mask_ratio,
                             last_only=last_only, gen=gen)
    global_count = int((tgt != 0).sum())
    device = next(core.parameters()).device
    ids, tgt = ids[rank::world].to(device), tgt[rank::world].to(device)
    h = model(ids)
    sel = tgt != 0
    rows, y = h[sel], tgt[sel]  # (r, dim), (r,)
    item = full_softmax_cross_entropy(*core.output_layer(rows), y) / global_count
    loss = item
    if core.has_aap and cfg.lamb:
        logits = core.attribute_logits(rows)
        parts = aap_loss(logits, {a: tables[a][y] for a in logits})
        loss = loss + cfg.lamb * sum(parts.values()) * (len(y) / global_count)
    report = all_sum(loss.detach(), world)
    return loss * world, report


def epoch_batches(inputs: np.ndarray, cfg: TrainConfig, gen: torch.Generator) -> list[np.ndarray]:
    """Row indices of each batch. ``bucket``: rows are shuffled, then sorted by length inside pools of 50
    batches and the batches shuffled -- batches of similar lengths waste less compute on padding."""
    order = torch.randperm(len(inputs), generator=gen).numpy()
    size = cfg.batch_size
    if not cfg.bucket:
        return [order[s:s + size] for s in range(0, len(order), size)]
    lens = (inputs != 0).sum(-1)
    batches = []
    for p in range(0, len(order), size * 50):
        pool = order[p:p + size * 50]
        pool = pool[np.argsort(-lens[pool], kind="stable")]
        batches += [pool[s:s + size] for s in range(0, len(pool), size)]
    perm = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in perm]


def trim_width(ids: np.ndarray, model) -> int:
    """Columns to keep: right-padded batches drop trailing all-padding columns (exact for length-agnostic
    fusions; the paper-exact fusions, ``model.length_bound``, need the full ``max_len``)."""
    if getattr(model, "length_bound", False):
        return ids.shape[1]
    return max(int((ids != 0).sum(-1).max()), 1)


# ---------------------------------------------------------------------------------------------- checkpoints
def run_dir(cfg: TrainConfig, dataset_name: str, model_name: str) -> Path:
    name = f"{model_name}-{cfg.tag}" if cfg.tag else model_name
    return Path(cfg.out_dir) / dataset_name / name / f"seed{cfg.seed}"


def model_settings(model) -> dict:
    """The model's hyper-parameters without its data (attribute tables, item count): what a run chose."""
    return {k: v for k, v in model.config().items() if k not in ("item_tables", "num_classes", "num_items", "name")}


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` to a temporary file, flushed to disk, then renamed: a kill during the write leaves the
    previous file intact."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file, then rename it to ``path`` (never a half-written file)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


CHECKPOINT_FORMAT = "dif-attention-train"
CHECKPOINT_KEYS = ("model", "optimizer", "state", "config", "model_config")


def load_checkpoint(path: Path) -> dict:
    """A ``last.pt`` written by :func:`run` (``torch.load(weights_only=True)``: it cannot run code). A truncated,
    foreign or corrupted file raises :class:`CheckpointError` naming it."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated zip, a pickle with code, not a torch file at all
        first = (str(err).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}: {first}); delete it to "
                              "start the run afresh") from None
    if not isinstance(ck, dict) or not all(k in ck for k in CHECKPOINT_KEYS):
        found = sorted(ck) if isinstance(ck, dict) else type(ck).__name__
        raise CheckpointError(f"{path}: not a training checkpoint (expected one written by train.run with "
                              f"{', '.join(CHECKPOINT_KEYS)}; found {found})")
    return ck


def rng_state() -> dict:
    """Every random stream of this process: torch's CPU generator (dropout), CUDA's (when initialised), NumPy's
    and Python's global generators."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return {"torch": torch.get_rng_state(), "cuda": cuda, "python": random.getstate(),
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                      "gauss": float(gauss)}}


def set_rng_state(state: dict) -> None:
    """Restore the streams saved by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))


def changed_settings(ck: dict, cfg: TrainConfig, settings: dict, world: int) -> dict:
    """Settings that change the math and differ from the checkpoint's: name -> (checkpoint's, now)."""
    def of_math(config: dict) -> dict:
        return {k: v for k, v in config.items() if k not in SILENT_SETTINGS}

    # a setting added after the checkpoint was written takes its default: the behaviour the checkpoint trained with
    saved = {**of_math(asdict(TrainConfig())), **of_math(ck["config"]), **ck["model_config"],
             "world_size": ck.get("world_size", 1)}
    now = {**of_math(asdict(cfg)), **settings, "world_size": world}
    missing = "(unset)"
    return {k: (saved.get(k, missing), now.get(k, missing)) for k in sorted(set(saved) | set(now))
            if k not in saved or k not in now or saved[k] != now[k]}


def _show(v) -> str:
    return "(none)" if v is None else repr(v) if isinstance(v, str) and v != "(unset)" else str(v)


def resume_point(out: Path, cfg: TrainConfig, settings: dict, world: int) -> tuple[dict, dict] | None:
    """``(checkpoint, changed settings)`` to resume from, or None (no ``resume`` or no ``last.pt``). A run whose
    settings differ from the checkpoint's raises :class:`CheckpointError` naming them, unless
    ``cfg.resume_override`` (settings in :data:`SILENT_SETTINGS` may always differ)."""
    path = out / "last.pt"
    if not cfg.resume or not path.exists():
        return None
    ck = load_checkpoint(path)
    changed = changed_settings(ck, cfg, settings, world)
    if changed and not cfg.resume_override:
        diff = ", ".join(f"{k} {_show(a)} -> {_show(b)}" for k, (a, b) in changed.items())
        raise CheckpointError(f"{path}: the settings differ from the checkpoint's ({diff}); use the checkpoint's "
                              "settings, or resume_override=True (--resume-override true) to continue with the new "
                              "ones")
    return ck, changed


def preflight(dataset, model_name: str, cfg: TrainConfig, model_config: dict | None = None) -> None:
    """What :func:`run` refuses, checked without training: bad settings, an attribute model on data without
    attributes, an unreadable checkpoint or one whose settings differ (``cfg.resume``)."""
    check_settings(cfg, model_config, [model_name])
    if model_name in ATTRIBUTE_MODELS:
        dataset.require_attributes(model_name)
    settings = model_settings(make_model(dataset, model_name, model_config))
    resume_point(run_dir(cfg, dataset.name, model_name), cfg, settings, dist_info()[1])


def log(cfg, rank, *msg):
    if cfg.log and rank == 0:
        print(*msg, flush=True)


# ---------------------------------------------------------------------------------------------- the loop
def prepare_model(dataset, model_name: str, cfg: TrainConfig, model_config: dict | None = None):
    """The model (seeded with ``cfg.seed``, AAP heads at the label prior for ``aap_init="prior"``) and its
    training arrays: ``(model, inputs, targets)`` (see :func:`training_arrays`)."""
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    core = make_model(dataset, model_name, model_config)
    inputs, targets = training_arrays(dataset, core, cfg)
    if core.has_aap and cfg.aap_init == "prior":
        core.predictor.init_prior_(attribute_rates(inputs if targets is None else targets, dataset.tables,
                                                   dataset.num_classes))
    return core, inputs, targets


def run(dataset, model_name: str, cfg: TrainConfig, model_config: dict | None = None, *,
        on_eval: Callable[[int, dict], None] | None = None) -> dict:
    """Train ``model_name`` (built with the settings ``model_config``) on ``dataset`` with early stopping,
    restore the best checkpoint, test it. Returns (and writes to ``<run dir>/result.json``) the configs,
    metrics and timings; ``best.pt`` is written with ``dif_attention.models.save_model``.

    Bad settings raise :class:`SettingError`, an attribute model on data without attributes a ``DataError``,
    before any work. ``last.pt`` is written at every epoch end and every ``cfg.checkpoint_every`` steps; with
    ``cfg.resume`` the run continues from it exactly (weights, optimiser, every random stream, the position in
    the epoch): a run killed at any step and resumed ends bit-identical to an uninterrupted one.
    ``on_eval(epoch, metrics)`` is called after each validation with its metrics (e.g. an Optuna pruner); an
    exception it raises ends the run and propagates.
    """
    check_settings(cfg, model_config, [model_name])
    if model_name in ATTRIBUTE_MODELS:
        dataset.require_attributes(model_name)
    rank, world = dist_info()
    core, inputs, targets = prepare_model(dataset, model_name, cfg, model_config)
    device = train_device(cfg)
    core.to(device)
    model = core
    if world > 1:
        gpus = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(core, device_ids=gpus,
                                                          find_unused_parameters=core.has_aap and not cfg.lamb)
    params = [p for p in core.parameters() if p.requires_grad]
    opt = (torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay) if cfg.optimizer == "adam" else
           torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay))
    valid = dataset.split("valid", core.max_len)
    test = dataset.split("test", core.max_len)
    out = run_dir(cfg, dataset.name, model_name)
    settings = model_settings(core)
    # position: `epoch` epochs done, then `batch` batches of the next one (loss sum and time so far alongside)
    state = {"epoch": 0, "batch": 0, "step": 0, "best": -1.0, "best_epoch": 0, "bad": 0, "history": [],
             "train_seconds": 0.0, "time_to_best": 0.0, "epoch_loss": 0.0, "epoch_seconds": 0.0, "overrides": []}
    best_state = None
    gen = torch.Generator().manual_seed(cfg.seed * 1000)  # batch order and BERT masking, one stream for the run
    gen_epoch = None  # the batch generator's state when the current epoch drew its batches
    resumed = resume_point(out, cfg, settings, world)
    if resumed is not None:
        ck, changed = resumed
        try:
            core.load_state_dict(ck["model"])
        except RuntimeError as err:
            raise CheckpointError(f"{out / 'last.pt'}: the checkpoint's weights do not fit this model "
                                  f"({str(err).splitlines()[0]})") from None
        if ck["config"].get("optimizer") == cfg.optimizer:
            opt.load_state_dict(ck["optimizer"])
        for group in opt.param_groups:  # the settings in force (they differ only with resume_override)
            group["lr"] = cfg.lr * (min(1.0, ck["state"].get("step", 0) / cfg.warmup) if cfg.warmup else 1.0)
            group["weight_decay"] = cfg.weight_decay
        state = {**state, **ck["state"]}
        best_state = ck.get("best_model")
        if changed:
            state["overrides"] = state["overrides"] + [
                {"step": state["step"], "epoch": state["epoch"], "batch": state["batch"],
                 "changed": {k: {"checkpoint": a, "used": b} for k, (a, b) in changed.items()}}]
        if "rng" in ck:
            gen.set_state(ck["gen"])
            gen_epoch = ck.get("gen_epoch")
        else:  # a checkpoint of an older version (epoch ends only, no random streams): continue, not exactly
            gen.manual_seed(cfg.seed * 1000 + state["epoch"])
        log(cfg, rank, f"resumed {out} at epoch {state['epoch']}, batch {state['batch']} (step {state['step']})" +
            ("" if "rng" in ck else "; the checkpoint holds no random streams: not bit-identical") +
            (f"; settings changed: {', '.join(changed)}" if changed else ""))
    tables = {a: t.to(device) for a, t in dataset.tables.items()}
    n_params = sum(p.numel() for p in core.parameters() if p.requires_grad)
    log(cfg, rank, f"[{model_name} seed {cfg.seed}] {n_params} trainable parameters, {len(inputs)} training rows "
                   f"({cfg.train_mode}), world {world}, {describe_device(device)}")

    def save_last():
        """last.pt: weights, optimiser, position, every random stream (each process's, gathered)."""
        if not cfg.save:
            return
        streams = [rng_state()]
        if world > 1:
            streams = [None] * world
            dist.all_gather_object(streams, rng_state())
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            atomic_save({"format": CHECKPOINT_FORMAT, "version": 2, "model": core.state_dict(),
                         "optimizer": opt.state_dict(), "state": state, "best_model": best_state,
                         "config": asdict(cfg), "model_config": settings, "world_size": world, "rng": streams,
                         "gen": gen.get_state(), "gen_epoch": gen_epoch}, out / "last.pt")

    if resumed is not None and "rng" in resumed[0]:  # last: nothing may draw between this and the first step
        streams = resumed[0]["rng"]
        set_rng_state(streams[rank] if len(streams) == world else streams[rank % len(streams)])
    stop = state["bad"] > cfg.patience
    while state["epoch"] < cfg.epochs and not stop:
        epoch = state["epoch"] + 1
        model.train()
        t0 = time.perf_counter() - state["epoch_seconds"]
        if state["batch"] and gen_epoch is not None:  # mid-epoch: draw the epoch's batches again, then go on
            current = gen.get_state()
            gen.set_state(gen_epoch)
            batches = epoch_batches(inputs, cfg, gen)
            gen.set_state(current)
        else:
            state["batch"], state["epoch_loss"] = 0, 0.0
            gen_epoch = gen.get_state()
            batches = epoch_batches(inputs, cfg, gen)
        todo = batches[state["batch"]:]
        bar = tqdm(todo, desc=f"{model_name} ep{epoch}", leave=False,
                   disable=not cfg.progress or rank != 0 or None) if tqdm else todo
        for idx in bar:
            width = trim_width(inputs[idx], core)
            batch = (inputs[idx, :width],) if targets is None else (inputs[idx, :width],
                                                                   targets[idx] if targets.ndim == 1 else
                                                                   targets[idx, :width])
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                loss, report = batch_loss(model, core, batch, cfg, tables, gen, rank, world)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            state["step"] += 1
            if cfg.warmup:
                for group in opt.param_groups:
                    group["lr"] = cfg.lr * min(1.0, state["step"] / cfg.warmup)
            opt.step()
            value = float(report)
            if not math.isfinite(value):  # before any save: last.pt keeps the last finite weights
                raise RunError(f"{out}: the training loss is {value} at epoch {epoch}, step {state['step']}: "
                               "training diverged (lower --lr, or add --warmup)")
            state["epoch_loss"] += value
            state["batch"] += 1
            if cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0 and state["batch"] < len(batches):
                state["epoch_seconds"] = time.perf_counter() - t0
                save_last()
        seconds = time.perf_counter() - t0
        state["train_seconds"] += seconds
        record = {"epoch": epoch, "loss": state["epoch_loss"] / max(len(batches), 1), "epoch_seconds": seconds}
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            t1 = time.perf_counter()
            metrics = evaluate(core, *valid, batch_size=cfg.eval_batch_size, rank=rank, world=world,
                               trim=not getattr(core, "length_bound", False))
            record.update(valid=metrics, eval_seconds=time.perf_counter() - t1)
            if on_eval is not None:
                on_eval(epoch, metrics)
            if metrics[cfg.valid_metric] > state["best"]:
                state.update(best=metrics[cfg.valid_metric], best_epoch=epoch, bad=0,
                             time_to_best=state["train_seconds"])
                best_state = {k: v.detach().clone() for k, v in core.state_dict().items()}
            else:
                state["bad"] += 1
            stop = state["bad"] > cfg.patience
        state.update(epoch=epoch, batch=0, epoch_loss=0.0, epoch_seconds=0.0)
        gen_epoch = None
        state["history"].append(record)
        v = record.get("valid")
        log(cfg, rank, f"[{model_name} seed {cfg.seed}] epoch {epoch} loss {record['loss']:.4f} "
                       f"{seconds:.1f}s" + (f" valid R@10 {v['Recall@10']:.4f} N@10 {v['NDCG@10']:.4f}" if v else ""))
        save_last()
        if cfg.max_train_seconds and state["train_seconds"] > cfg.max_train_seconds:
            log(cfg, rank, f"[{model_name} seed {cfg.seed}] time budget {cfg.max_train_seconds:.0f}s reached")
            break
    if best_state is not None:
        core.load_state_dict(best_state)
    test_metrics = evaluate(core, *test, batch_size=cfg.eval_batch_size, rank=rank, world=world,
                            trim=not getattr(core, "length_bound", False))
    epochs_timed = [r["epoch_seconds"] for r in state["history"]]
    chosen = next((r["valid"] for r in state["history"] if r["epoch"] == state["best_epoch"] and "valid" in r), {})
    result = {"dataset": dataset.name, "attributes": {a: dataset.num_classes[a] - 1 for a in dataset.tables},
              "model": model_name, "seed": cfg.seed, "config": asdict(cfg),
              "model_config": settings, "overrides": state["overrides"],
              "parameters": n_params, "world_size": world, "device": describe_device(device),
              "epochs": state["epoch"],
              "best_epoch": state["best_epoch"], "best_valid": state["best"],
              "best_valid_ndcg10": chosen.get("NDCG@10", state["best"]), "test": test_metrics,
              "train_seconds": state["train_seconds"], "time_to_best_seconds": state["time_to_best"],
              "seconds_per_epoch": float(np.median(epochs_timed)) if epochs_timed else 0.0,
              "history": state["history"]}
    if cfg.save and rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_model(core, out / "best.pt")
        atomic_write_text(out / "result.json", json.dumps(result, indent=1))
    log(cfg, rank, f"[{model_name} seed {cfg.seed}] test " + " ".join(f"{k} {v:.4f}" for k, v in test_metrics.items()))
    return result
