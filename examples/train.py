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
Recall@K / NDCG@K; the test metrics are those of the best-validation-NDCG@10 checkpoint (RecBole's convention).

Multi-process: run the same script under ``torchrun --nproc_per_node=N``; each global batch is split across
the processes (DistributedDataParallel, gloo on CPU / nccl on GPU), so the optimisation matches one process
on the same global batch.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    tqdm = None

from dif_attention import aap_loss, multi_hot
from dif_attention.models import build_model, full_softmax_cross_entropy, save_model

__all__ = ["TrainConfig", "run", "evaluate", "batch_metrics", "rank_metrics", "append_item", "make_model", "KS"]

KS = (10, 20)


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
    train_mode: str = "all"
    bucket: bool = True
    mask_ratio: float = 0.2
    ft_ratio: float = 0.5
    seed: int = 0
    precision: str = "fp32"  # training matmuls in "fp32" or "bf16" (CPU/CUDA autocast); evaluation is always fp32
    max_train_seconds: float = 0.0
    out_dir: str = "runs"
    tag: str = ""  # suffix of the run folder (keeps ablation variants apart)
    resume: bool = False
    save: bool = True
    progress: bool = True
    log: bool = True


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
    target). Recall@K = [rank < K]; NDCG@K = [rank < K] / log2(rank + 2). Returns per-row tensors."""
    scores = scores.clone()
    scores[:, 0] = -torch.inf
    target_score = scores.gather(1, targets[:, None])
    rank = (scores > target_score).sum(-1)
    out = {}
    for k in ks:
        hit = (rank < k).float()
        out[f"Recall@{k}"] = hit
        out[f"NDCG@{k}"] = hit / torch.log2(rank.float() + 2)
    return out


@torch.no_grad()
def batch_metrics(model, hist: np.ndarray, targets: np.ndarray, *, ks=KS, trim: bool = True) -> dict[str, Tensor]:
    """Per-row Recall@K / NDCG@K of one batch of users (full ranking; ``model`` in eval mode). Causal models
    read the last history position; masked models get ``[MASK]`` appended. ``trim`` drops all-padding columns."""
    ids, tgt = torch.from_numpy(hist), torch.from_numpy(targets)
    if model.causal:
        pos = lengths(ids) - 1
    else:
        ids, pos = append_item(ids, model.mask_id)
    if trim:
        ids = ids[:, :int(pos.max()) + 1]
    h = model(ids)[torch.arange(len(ids)), pos]
    return rank_metrics(model.item_scores(h), tgt, ks)


@torch.no_grad()
def evaluate(model, hist: np.ndarray, targets: np.ndarray, *, batch_size: int = 512, rank: int = 0,
             world: int = 1, ks=KS, trim: bool = True) -> dict[str, float]:
    """Mean Recall@K / NDCG@K over users (rows of ``hist``), full ranking; sharded over processes.
    ``trim``: batch users of similar length and drop all-padding columns (exact for length-agnostic fusions)."""
    model.eval()
    sums = torch.zeros(2 * len(ks) + 1, dtype=torch.float64)
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
    ids, tgt = ids[rank::world], tgt[rank::world]
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


# ---------------------------------------------------------------------------------------------- the loop
def run_dir(cfg: TrainConfig, dataset_name: str, model_name: str) -> Path:
    name = f"{model_name}-{cfg.tag}" if cfg.tag else model_name
    return Path(cfg.out_dir) / dataset_name / name / f"seed{cfg.seed}"


def model_settings(model) -> dict:
    """The model's hyper-parameters without its data (attribute tables, item count): what a run chose."""
    return {k: v for k, v in model.config().items() if k not in ("item_tables", "num_classes", "num_items", "name")}


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename: a kill during the write leaves the old file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def log(cfg, rank, *msg):
    if cfg.log and rank == 0:
        print(*msg, flush=True)


def run(dataset, model_name: str, cfg: TrainConfig, model_config: dict | None = None) -> dict:
    """Train ``model_name`` (built with the settings ``model_config``) on ``dataset`` with early stopping,
    restore the best checkpoint, test it. Returns (and writes to ``<run dir>/result.json``) the configs,
    metrics and timings; ``best.pt`` is written with ``dif_attention.models.save_model``."""
    rank, world = dist_info()
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    core = make_model(dataset, model_name, model_config)
    model = core
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(core, find_unused_parameters=core.has_aap and not cfg.lamb)
    if cfg.optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer: expected 'adam' or 'sgd', got {cfg.optimizer!r}")
    params = [p for p in core.parameters() if p.requires_grad]
    opt = (torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay) if cfg.optimizer == "adam" else
           torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay))
    inputs, targets = training_arrays(dataset, core, cfg)
    if cfg.precision not in ("fp32", "bf16"):
        raise ValueError(f"precision: expected 'fp32' or 'bf16', got {cfg.precision!r}")
    device = next(core.parameters()).device
    if cfg.aap_init not in ("prior", "zero"):
        raise ValueError(f"aap_init: expected 'prior' or 'zero', got {cfg.aap_init!r}")
    if core.has_aap and cfg.aap_init == "prior":
        core.predictor.init_prior_(attribute_rates(inputs if targets is None else targets, dataset.tables,
                                                   dataset.num_classes))
    valid = dataset.split("valid", core.max_len)
    test = dataset.split("test", core.max_len)
    out = run_dir(cfg, dataset.name, model_name)
    state = {"epoch": 0, "step": 0, "best": -1.0, "best_epoch": 0, "bad": 0, "history": [], "train_seconds": 0.0,
             "time_to_best": 0.0}
    best_state = None
    if cfg.resume and (out / "last.pt").exists():
        ck = torch.load(out / "last.pt", weights_only=True)
        core.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        state = ck["state"]
        best_state = ck.get("best_model")
        log(cfg, rank, f"resumed {out} at epoch {state['epoch']}")
    tables = dataset.tables
    n_params = sum(p.numel() for p in core.parameters() if p.requires_grad)
    log(cfg, rank, f"[{model_name} seed {cfg.seed}] {n_params} trainable parameters, {len(inputs)} training rows "
                   f"({cfg.train_mode}), world {world}")
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + state["epoch"])
    stop = state["bad"] > cfg.patience
    while state["epoch"] < cfg.epochs and not stop:
        epoch = state["epoch"] + 1
        model.train()
        t0 = time.perf_counter()
        total, steps = 0.0, 0
        batches = epoch_batches(inputs, cfg, gen)
        bar = tqdm(batches, desc=f"{model_name} ep{epoch}", leave=False,
                   disable=not cfg.progress or rank != 0 or None) if tqdm else batches
        for idx in bar:
            width = trim_width(inputs[idx], core)
            batch = (inputs[idx, :width],) if targets is None else (inputs[idx, :width],
                                                                   targets[idx] if targets.ndim == 1 else
                                                                   targets[idx, :width])
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                loss, report = batch_loss(model, core, batch, cfg, tables, gen, rank, world)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            state["step"] = state.get("step", 0) + 1
            if cfg.warmup:
                for group in opt.param_groups:
                    group["lr"] = cfg.lr * min(1.0, state["step"] / cfg.warmup)
            opt.step()
            total += float(report)
            steps += 1
        seconds = time.perf_counter() - t0
        state["train_seconds"] += seconds
        record = {"epoch": epoch, "loss": total / max(steps, 1), "epoch_seconds": seconds}
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            t1 = time.perf_counter()
            metrics = evaluate(core, *valid, batch_size=cfg.eval_batch_size, rank=rank, world=world,
                               trim=not getattr(core, "length_bound", False))
            record.update(valid=metrics, eval_seconds=time.perf_counter() - t1)
            if metrics["NDCG@10"] > state["best"]:
                state.update(best=metrics["NDCG@10"], best_epoch=epoch, bad=0, time_to_best=state["train_seconds"])
                best_state = {k: v.detach().clone() for k, v in core.state_dict().items()}
            else:
                state["bad"] += 1
            stop = state["bad"] > cfg.patience
        state["epoch"] = epoch
        state["history"].append(record)
        v = record.get("valid")
        log(cfg, rank, f"[{model_name} seed {cfg.seed}] epoch {epoch} loss {record['loss']:.4f} "
                       f"{seconds:.1f}s" + (f" valid R@10 {v['Recall@10']:.4f} N@10 {v['NDCG@10']:.4f}" if v else ""))
        if cfg.save and rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            atomic_save({"model": core.state_dict(), "optimizer": opt.state_dict(), "state": state,
                         "best_model": best_state, "config": asdict(cfg),
                         "model_config": model_settings(core)}, out / "last.pt")
        if cfg.max_train_seconds and state["train_seconds"] > cfg.max_train_seconds:
            log(cfg, rank, f"[{model_name} seed {cfg.seed}] time budget {cfg.max_train_seconds:.0f}s reached")
            break
    if best_state is not None:
        core.load_state_dict(best_state)
    test_metrics = evaluate(core, *test, batch_size=cfg.eval_batch_size, rank=rank, world=world,
                            trim=not getattr(core, "length_bound", False))
    epochs_timed = [r["epoch_seconds"] for r in state["history"]]
    result = {"dataset": dataset.name, "model": model_name, "seed": cfg.seed, "config": asdict(cfg),
              "model_config": model_settings(core),
              "parameters": n_params, "world_size": world, "epochs": state["epoch"],
              "best_epoch": state["best_epoch"], "best_valid_ndcg10": state["best"], "test": test_metrics,
              "train_seconds": state["train_seconds"], "time_to_best_seconds": state["time_to_best"],
              "seconds_per_epoch": float(np.median(epochs_timed)) if epochs_timed else 0.0,
              "history": state["history"]}
    if cfg.save and rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_model(core, out / "best.pt")
        (out / "result.json").write_text(json.dumps(result, indent=1))
    log(cfg, rank, f"[{model_name} seed {cfg.seed}] test " + " ".join(f"{k} {v:.4f}" for k, v in test_metrics.items()))
    return result
