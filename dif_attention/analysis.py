"""Rank analysis of attention score matrices (the paper's Theorem 4.1 and Figure 1).

Shape legend (einops style): ``b`` samples, ``h`` heads, ``n`` padded length, ``L`` a sample's valid
length (right padding: the valid block is ``[:L, :L]``), ``l`` layers.

What is measured is the *raw* score matrix ``S`` -- pre-scale, pre-mask, pre-softmax -- as
:class:`~dif_attention.DecoupledAttention` returns it with ``return_scores=True`` (``maps["fused"]``
and one map per source). Theorem 4.1 is about ``S``: for early fusion ``S = X W_Q W_K^T X^T`` has
``rank <= d_h``; decoupled fusion adds one such term per source, so
``rank <= min(L, d_h(item) + d_h(position) + sum_j d_hj)``.

Two measures:

* :func:`numerical_rank` -- the number of singular values above
  ``tol = max(atol, rtol * sigma_max)``, with ``rtol = max(r, c) * eps(dtype)`` by default: the
  tolerance of ``torch.linalg.matrix_rank`` / ``numpy.linalg.matrix_rank``, where ``dtype`` is the
  dtype the scores were *computed* in (float32 scores carry float32 round-off even if the SVD runs in
  float64). Compute the scores in float64 (``model.double()``) for the cleanest counts.
* :func:`effective_rank` -- ``exp(entropy(sigma / sum(sigma)))`` (Roy & Vetterli, 2007): a smooth,
  tolerance-free count that is small when a few directions dominate.

The early-fusion baselines the paper compares against live in :mod:`dif_attention.baselines`.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from .errors import check_finite, check_int, check_integer, check_tensor, fail
from .functional import ScoreMaps

__all__ = ["numerical_rank", "effective_rank", "block_ranks", "layer_ranks", "summarize", "rank_bound",
           "head_widths", "valid_norms", "rank_report", "source_spread"]

MEASURES = ("numerical", "effective")


def _svdvals(m: Tensor) -> Tensor:
    check_finite("m", m, expected="finite values (the SVD of NaN or inf has no rank)")
    return torch.linalg.svdvals(m.to(torch.float64))


def _check_tolerance(arg: str, tol) -> float:
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
        fail(arg, "a finite float >= 0", repr(tol))
    return float(tol)


def _check_lengths(lengths: Tensor) -> None:
    check_tensor("lengths", lengths, ndim=1)
    check_integer("lengths", lengths, "an integer tensor of valid lengths (b,)")


def default_rtol(m: Tensor) -> float:
    """``max(r, c) * eps(m.dtype)``: the ``matrix_rank`` default for the dtype the scores were computed in."""
    return max(m.shape[-2:]) * torch.finfo(m.dtype if m.is_floating_point() else torch.float64).eps


def numerical_rank(m: Tensor, *, rtol: float | None = None, atol: float = 0.0) -> Tensor:
    """Rank of each matrix in ``m (..., r, c)`` -> long ``(...)``.

    Counts singular values ``> max(atol, rtol * sigma_max)``; ``rtol`` defaults to
    ``max(r, c) * eps(m.dtype)`` (see the module docstring). An all-zero matrix has rank 0.
    """
    check_tensor("m", m, floating=True)
    if m.ndim < 2:
        fail("m", "a matrix or a batch of matrices (..., r, c)", m.shape)
    rtol = default_rtol(m) if rtol is None else _check_tolerance("rtol", rtol)
    atol = _check_tolerance("atol", atol)
    s = _svdvals(m)
    if s.shape[-1] == 0:
        return torch.zeros(m.shape[:-2], dtype=torch.long)
    tol = (rtol * s[..., :1]).clamp_min(atol)
    return (s > tol).sum(-1)


def effective_rank(m: Tensor) -> Tensor:
    """Entropy (effective) rank of each matrix in ``m (..., r, c)`` -> float64 ``(...)``.

    ``exp(-sum_i p_i log p_i)`` with ``p = sigma / sum(sigma)``; 1 for a rank-1 matrix, ``k`` for
    ``k`` equal singular values, 0 for the zero matrix.
    """
    check_tensor("m", m, floating=True)
    if m.ndim < 2:
        fail("m", "a matrix or a batch of matrices (..., r, c)", m.shape)
    s = _svdvals(m)
    total = s.sum(-1, keepdim=True)
    p = s / total.clamp_min(torch.finfo(torch.float64).tiny)
    h = -(p * p.clamp_min(torch.finfo(torch.float64).tiny).log()).sum(-1)
    return torch.where(total[..., 0] > 0, h.exp(), torch.zeros_like(h))


def _measure(m: Tensor, measure: str, rtol: float | None) -> Tensor:
    if measure == "numerical":
        return numerical_rank(m, rtol=rtol).to(torch.float64)
    return effective_rank(m)


def block_ranks(scores: Tensor, lengths: Tensor | None = None, *, measure: str = "numerical",
                rtol: float | None = None) -> Tensor:
    """Rank of the valid ``[:L, :L]`` block of every sample and head.

    ``scores``: ``(b|1, h, n, n)`` raw scores (a batch dim of 1 -- the position map -- is broadcast to
    ``len(lengths)``); ``lengths``: ``(b,)`` valid lengths of right-padded sequences (``None``: all ``n``).
    Returns float64 ``(b, h)``. Samples are grouped by length so each group is one batched SVD.
    """
    check_tensor("scores", scores, ndim=4, floating=True)
    if measure not in MEASURES:
        fail("measure", f"one of {MEASURES}", repr(measure))
    b, h, n, n2 = scores.shape
    if n != n2:
        fail("scores", "square score matrices (b, h, n, n)", scores.shape)
    if lengths is None:
        return _measure(scores, measure, rtol)
    _check_lengths(lengths)
    if scores.shape[0] not in (1, lengths.shape[0]):
        fail("lengths", f"one length per sample of scores (b={scores.shape[0]})", lengths.shape)
    if lengths.numel() and (int(lengths.min()) < 1 or int(lengths.max()) > n):
        fail("lengths", f"valid lengths in [1, {n}]", f"lengths in [{int(lengths.min())}, {int(lengths.max())}]")
    scores = scores.expand(lengths.shape[0], -1, -1, -1)
    out = torch.zeros(lengths.shape[0], h, dtype=torch.float64)
    for length in torch.unique(lengths).tolist():
        rows = (lengths == length).nonzero().flatten()
        block = scores[rows][..., :length, :length]
        out[rows] = _measure(block, measure, rtol)
    return out


def layer_ranks(layer_maps: "Sequence[ScoreMaps] | ScoreMaps", lengths: Tensor | None = None, *, key: str = "fused",
                measure: str = "numerical", rtol: float | None = None) -> Tensor:
    """Ranks of ``maps[key]`` for every layer: ``(l, b, h)`` float64.

    ``layer_maps`` is the per-layer list of :class:`~dif_attention.ScoreMaps` a
    ``DecoupledEncoder(..., return_scores=True)`` (or a model built on it) returns; ``key`` is ``"fused"`` or a
    source name (``"item"``, ``"position"``, an attribute).
    """
    if isinstance(layer_maps, ScoreMaps):
        layer_maps = [layer_maps]
    if len(layer_maps) == 0:
        fail("layer_maps", "a non-empty list of per-layer score maps", "an empty list")
    for i, maps in enumerate(layer_maps):
        if key not in maps:
            fail(f"layer_maps[{i}]", f"a score map named {key!r}", f"keys {maps.keys()}")
    return torch.stack([block_ranks(maps[key].detach(), lengths, measure=measure, rtol=rtol)
                        for maps in layer_maps])


def summarize(ranks: Tensor) -> dict:
    """Averages of ``ranks (l, b, h)``: ``mean`` (float), ``per_layer`` (list over l), ``per_head`` (list over h),
    ``std`` (over samples, of the per-sample mean over layers and heads)."""
    check_tensor("ranks", ranks, ndim=3)
    per_sample = ranks.mean(dim=(0, 2))
    return {"mean": float(ranks.mean()), "per_layer": ranks.mean(dim=(1, 2)).tolist(),
            "per_head": ranks.mean(dim=(0, 1)).tolist(),
            "std": float(per_sample.std()) if per_sample.numel() > 1 else 0.0}


def head_widths(module: nn.Module) -> list[int]:
    """Per-source head widths of a score function: ``[d_h(item), d_h(position), d_h(attr), ...]`` for
    :class:`~dif_attention.DecoupledAttention`, ``[d_h]`` for :class:`EarlyFusionAttention` or any module with
    a ``dim_head`` and no decoupled sources."""
    if hasattr(module, "sources") and hasattr(module, "attr_dims"):
        widths = [module.dim_head] * (2 if module.position else 1)
        return widths + [d // module.heads for d in module.attr_dims.values()]
    if hasattr(module, "dim_head"):
        return [module.dim_head]
    fail("module", "a DecoupledAttention, an EarlyFusionAttention or a module with .dim_head", type(module).__name__)


def rank_bound(lengths: "Tensor | int", widths: Sequence[int]) -> Tensor:
    """Theorem 4.1's bound per sample: ``min(L, sum(widths))`` -> ``(b,)`` float64 (``widths`` from
    :func:`head_widths`: ``[d_h]`` for early fusion, one width per source for decoupled fusion)."""
    if not isinstance(lengths, Tensor):
        lengths = torch.tensor([check_int("lengths", lengths, minimum=0)])
    _check_lengths(lengths)
    if lengths.numel() and int(lengths.min()) < 0:
        fail("lengths", "valid lengths >= 0", f"lengths in [{int(lengths.min())}, {int(lengths.max())}]")
    if not widths or any(int(w) < 1 for w in widths):
        fail("widths", "a non-empty list of positive head widths", list(widths))
    return lengths.to(torch.float64).clamp_max(float(sum(int(w) for w in widths)))


def valid_norms(layer_maps: Sequence[ScoreMaps], lengths: Tensor, key: str) -> Tensor:
    """Frobenius norm of each valid ``[:L, :L]`` block of ``maps[l][key]``: ``(l, b, h)`` float64."""
    n = layer_maps[0][key].shape[-1]
    valid = torch.arange(n)[None, :] < lengths[:, None]  # (b, n)
    block = (valid[:, :, None] & valid[:, None, :])[:, None]  # (b, 1, n, n)
    return torch.stack([(m[key].double() * block).flatten(-2).norm(dim=-1) for m in layer_maps])


def rank_report(forward: Callable[[Tensor], tuple[Tensor, Sequence[ScoreMaps]]], ids: Tensor, lengths: Tensor,
                widths: Sequence[int], *, batch: int = 64, loose_rtol: float = 1e-3) -> dict:
    """Rank summary of a model over samples: ``forward(ids) -> (hidden, per-layer ScoreMaps)`` (a model called
    with ``return_scores=True``), run on ``ids (b, n)`` right-padded with valid ``lengths (b,)``.

    Returns :func:`summarize` of the numerical ranks of the fused maps plus ``bound`` (Theorem 4.1's, averaged),
    ``effective``, ``loose`` (rank counting singular values above ``loose_rtol * sigma_max``),
    ``loose_per_layer``, ``mean_length``, ``samples``, ``widths`` and, for decoupled models, ``sources``:
    each source's mean rank and mean Frobenius norm of its valid block.
    """
    num, loose, eff, per_source = [], [], [], {}
    with torch.no_grad():
        for s in range(0, len(ids), batch):
            _, maps = forward(ids[s:s + batch])
            ln = lengths[s:s + batch]
            num.append(layer_ranks(maps, ln))
            loose.append(layer_ranks(maps, ln, rtol=loose_rtol))
            eff.append(layer_ranks(maps, ln, measure="effective"))
            for name in [*maps[0].sources, "fused"]:
                per_source.setdefault(name, []).append((layer_ranks(maps, ln, key=name), valid_norms(maps, ln, name)))
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


def source_spread(layer_maps: Sequence[ScoreMaps], allowed: Tensor) -> dict[str, Tensor]:
    """How much each source can move attention: per layer, the standard deviation of the source's raw scores
    ``S_s(i, j)`` over the keys ``j`` that row ``i`` may attend (a constant row changes no softmax), averaged over
    heads and over the rows with at least two allowed keys.

    ``allowed``: bool ``(b|1, 1|h, n, n)``, True where query ``i`` may attend key ``j`` (causal and not padding).
    Returns ``{source: (l,) float64}`` in source order; with the ``gate`` fusion also ``{"gate " + source: (l,)}``,
    the mean gate weight of that source over the same rows (the weight its scores enter the sum with).
    """
    if not layer_maps:
        fail("layer_maps", "a non-empty sequence of ScoreMaps (one per layer)", "an empty sequence")
    first = next(iter(layer_maps[0].sources.values()))
    check_tensor("allowed", allowed, ndim=4)
    if allowed.dtype != torch.bool:
        fail("allowed", "a bool mask (b|1, 1|h, n, n)", f"dtype {allowed.dtype}")
    if allowed.shape[-2:] != first.shape[-2:]:
        fail("allowed", f"the score maps' last two dimensions {tuple(first.shape[-2:])}", tuple(allowed.shape))
    a = allowed.double()
    count = a.sum(-1)  # (b|1, 1|h, n)
    rows = count > 1
    out: dict[str, list[Tensor]] = {}
    for maps in layer_maps:
        for name, s in maps.sources.items():
            s = s.detach().double()
            mean = (s * a).sum(-1) / count.clamp_min(1)
            var = ((s - mean[..., None]) ** 2 * a).sum(-1) / count.clamp_min(1)
            std, keep = torch.broadcast_tensors(var.sqrt(), rows)
            out.setdefault(name, []).append(std[keep].mean())
        if maps.gates is not None:
            for k, name in enumerate(maps.sources):
                g, keep = torch.broadcast_tensors(maps.gates[..., k].detach().double(), rows)
                out.setdefault("gate " + name, []).append(g[keep].mean())
    return {name: torch.stack(v) for name, v in out.items()}
