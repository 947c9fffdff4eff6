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

The early-fusion baselines the paper compares against are here too, as score functions with the
same call signature as ``DecoupledAttention``: :class:`EarlyFusionAttention` (``style="sasrecf"``:
side information fused into the stream, then plain attention; ``style="nova"``: queries/keys from
the fused stream, values from the item stream) and the input fusion they share, :class:`InputFusion`.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from einops import rearrange
from torch import Tensor, nn

from .attention import check_attr_dims
from .errors import check_divisible, check_tensor, fail
from .functional import decoupled_attention, reference_attention

__all__ = ["numerical_rank", "effective_rank", "block_ranks", "layer_ranks", "summarize", "rank_bound",
           "head_widths", "InputFusion", "EarlyFusionAttention"]

MEASURES = ("numerical", "effective")
STYLES = ("sasrecf", "nova")
COMBINES = ("sum", "concat")


def _svdvals(m: Tensor) -> Tensor:
    return torch.linalg.svdvals(m.to(torch.float64))


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
    rtol = default_rtol(m) if rtol is None else float(rtol)
    if rtol < 0 or atol < 0:
        fail("rtol", "non-negative tolerances", f"rtol={rtol}, atol={atol}")
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
    check_tensor("lengths", lengths, ndim=1)
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


def layer_ranks(layer_maps: Sequence[Mapping[str, Tensor]], lengths: Tensor | None = None, *, key: str = "fused",
                measure: str = "numerical", rtol: float | None = None) -> Tensor:
    """Ranks of ``maps[key]`` for every layer: ``(l, b, h)`` float64.

    ``layer_maps`` is the per-layer list a ``DecoupledEncoder(..., return_scores=True)`` (or a model built on
    it) returns; ``key`` is ``"fused"`` or a source name (``"item"``, ``"position"``, an attribute).
    """
    if isinstance(layer_maps, Mapping):
        layer_maps = [layer_maps]
    if len(layer_maps) == 0:
        fail("layer_maps", "a non-empty list of per-layer score maps", "an empty list")
    for i, maps in enumerate(layer_maps):
        if key not in maps:
            fail(f"layer_maps[{i}]", f"a score map named {key!r}", f"keys {sorted(maps)}")
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
    if isinstance(lengths, int):
        lengths = torch.tensor([lengths])
    if not widths or any(int(w) < 1 for w in widths):
        fail("widths", "a non-empty list of positive head widths", list(widths))
    return lengths.to(torch.float64).clamp_max(float(sum(int(w) for w in widths)))


class InputFusion(nn.Module):
    """Early fusion of side information into one stream, as the baselines do.

    ``combine="sum"``: ``x + sum_j attrs[j]`` (every attribute width must be ``dim``).
    ``combine="concat"``: ``Linear([x, attrs[0], ...])`` to ``dim`` (RecBole's SASRecF).
    The position embedding, when given, is added after (``+ pos``).

    Shapes: ``x (b, n, dim)``, ``attrs[name] (b, n, attr_dims[name])``, ``pos (n, dim) | (b, n, dim)``
    -> ``(b, n, dim)``.
    """

    def __init__(self, dim: int, *, attr_dims: Mapping[str, int] | None = None, combine: str = "sum",
                 bias: bool = True):
        super().__init__()
        if combine not in COMBINES:
            fail("combine", f"one of {COMBINES}", repr(combine))
        self.dim, self.combine, self.attr_dims = dim, combine, dict(attr_dims or {})
        if combine == "sum":
            for a, d in self.attr_dims.items():
                if d != dim:
                    fail(f"attr_dims[{a!r}]", f"width {dim} (= dim) for combine='sum'; use combine='concat'", d)
            self.proj = None
        else:
            self.proj = nn.Linear(dim + sum(self.attr_dims.values()), dim, bias=bias)

    def forward(self, x: Tensor, *, attrs: Mapping[str, Tensor] | None = None, pos: Tensor | None = None) -> Tensor:
        check_tensor("x", x, ndim=3, floating=True)
        attrs = dict(attrs or {})
        if set(attrs) != set(self.attr_dims):
            fail("attrs", f"exactly the declared attributes {sorted(self.attr_dims)}", f"keys {sorted(attrs)}")
        b, n, _ = x.shape
        for a, width in self.attr_dims.items():
            if attrs[a].shape != (b, n, width):
                fail(f"attrs[{a!r}]", f"shape ({b}, {n}, {width}) = (b, n, attr_dims[{a!r}])", attrs[a].shape)
        side = [attrs[a] for a in self.attr_dims]
        if self.proj is None:
            out = x + sum(side) if side else x
        else:
            out = self.proj(torch.cat([x, *side], dim=-1))
        if pos is not None:
            if pos.shape[-2:] != (n, self.dim):
                fail("pos", f"shape ({n}, {self.dim}) or (b, {n}, {self.dim})", pos.shape)
            out = out + pos
        return out


class EarlyFusionAttention(nn.Module):
    """Multi-head attention over an early-fused stream: the baselines of Theorem 4.1.

    ``style="sasrecf"``: ``F = fuse(x, attrs, pos)``; queries, keys *and values* from ``F``.
    ``style="nova"``: queries and keys from ``F``, values from the item stream ``x`` alone (NOVA).
    Either way there is one score ``S = (F W_Q)(F W_K)^T`` per head: ``rank(S) <= d_h = dim // heads``.

    Same forward signature as :class:`~dif_attention.DecoupledAttention`, so it can replace the ``attn`` of a
    ``DecoupledEncoderLayer``; with ``return_scores=True`` returns ``(out, {"fused": S, "probs": P})``,
    ``S (b, heads, n, n)`` raw (pre-scale, pre-mask). ``position=False`` ignores ``pos`` (pass ``None``).
    """

    def __init__(self, dim: int, heads: int, *, attr_dims: Mapping[str, int] | None = None, style: str = "nova",
                 combine: str = "sum", position: bool = True, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if style not in STYLES:
            fail("style", f"one of {STYLES}", repr(style))
        if not isinstance(heads, int) or heads < 1:
            fail("heads", "a positive int", repr(heads))
        self.dim_head = check_divisible("dim", dim, heads)
        self.dim, self.heads, self.style, self.position = dim, heads, style, bool(position)
        self.attr_dims = check_attr_dims(attr_dims, 1)
        self.dropout = float(dropout)
        self.fuse = InputFusion(dim, attr_dims=self.attr_dims, combine=combine, bias=bias)
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim, bias=bias) for _ in range(3))
        self.to_out = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: Tensor, *, attrs: Mapping[str, Tensor] | None = None, pos: Tensor | None = None,
                mask: Tensor | None = None, is_causal: bool = False, return_scores: bool = False):
        check_tensor("x", x, ndim=3, floating=True)
        if x.shape[-1] != self.dim:
            fail("x", f"last dim {self.dim} (= dim)", x.shape)
        if self.position and pos is None:
            fail("pos", "the position embedding (n, dim) or (b, n, dim) because position=True", None)
        fused = self.fuse(x, attrs=attrs, pos=pos if self.position else None)
        split = lambda t: rearrange(t, "b n (h e) -> b h n e", h=self.heads)  # noqa: E731
        q, k = split(self.to_q(fused)), split(self.to_k(fused))
        v = split(self.to_v(x if self.style == "nova" else fused))
        p, scale = (self.dropout if self.training else 0.0), 1.0 / math.sqrt(self.dim_head)
        if return_scores:
            out, maps = reference_attention([q], [k], v, mask=mask, is_causal=is_causal, scale=scale, dropout_p=p)
            maps = {"fused": maps["fused"], "probs": maps["probs"]}
        else:
            out = decoupled_attention([q], [k], v, mask=mask, is_causal=is_causal, scale=scale, dropout_p=p)
        out = self.to_out(rearrange(out, "b h n e -> b n (h e)"))
        return (out, maps) if return_scores else out

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, style={self.style!r}, attrs={sorted(self.attr_dims)}"
