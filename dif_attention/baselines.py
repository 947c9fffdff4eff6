"""Early fusion, written once: the baselines DIF is compared with (SASRecF, NOVA) and Theorem 4.1's subject.

* :class:`InputFusion` -- side information fused into one stream before attention: ``combine="sum"``
  (``x + pos + sum_j attrs[j]``, NOVA) or ``combine="concat"`` (``Linear([x, attrs[0], ...]) + pos``,
  RecBole's SASRecF).
* :class:`EarlyFusionAttention` -- multi-head attention over that stream: ``style="sasrecf"`` takes queries,
  keys *and values* from it; ``style="nova"`` queries and keys from it, values from the item stream alone.
  Either way there is one score ``S = (F W_Q)(F W_K)^T`` per head, so ``rank(S) <= d_h = dim // heads``.

Shapes: ``x (b, n, dim)``, ``attrs[name] (b, n, attr_dims[name])``, ``pos (n, dim) | (b, n, dim)``.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
from einops import rearrange
from torch import Tensor, nn

from .attention import KVCache, check_attr_dims, check_cache
from .errors import check_bool, check_divisible, check_int, check_probability, check_tensor, fail
from .functional import BACKENDS, ScoreMaps, decoupled_attention, reference_attention

__all__ = ["InputFusion", "EarlyFusionAttention", "STYLES", "COMBINES"]

STYLES = ("sasrecf", "nova")
COMBINES = ("sum", "concat")


class InputFusion(nn.Module):
    """Early fusion of side information into one stream, as the baselines do.

    ``combine="sum"``: ``x + (pos + sum_j attrs[j])`` (every attribute width must be ``dim``).
    ``combine="concat"``: ``Linear([x, attrs[0], ...]) + pos`` (RecBole's SASRecF).
    ``pos`` is optional.

    Shapes: ``x (b, n, dim)``, ``attrs[name] (b, n, attr_dims[name])``, ``pos (n, dim) | (b, n, dim)``
    -> ``(b, n, dim)``.
    """

    def __init__(self, dim: int, *, attr_dims: Mapping[str, int] | None = None, combine: str = "sum",
                 bias: bool = True):
        super().__init__()
        if combine not in COMBINES:
            fail("combine", f"one of {COMBINES}", repr(combine))
        self.dim, self.combine, self.attr_dims = check_int("dim", dim), combine, check_attr_dims(attr_dims, 1)
        if combine == "sum":
            for a, d in self.attr_dims.items():
                if d != dim:
                    fail(f"attr_dims[{a!r}]", f"width {dim} (= dim) for combine='sum'; use combine='concat'", d)
            self.proj = None
        else:
            self.proj = nn.Linear(dim + sum(self.attr_dims.values()), dim, bias=bias)

    def forward(self, x: Tensor, *, attrs: Mapping[str, Tensor] | None = None, pos: Tensor | None = None) -> Tensor:
        """``(b, n, dim)`` fused stream (shapes in the class docstring)."""
        check_tensor("x", x, ndim=3, floating=True)
        if attrs is not None and not isinstance(attrs, Mapping):
            fail("attrs", "a mapping of attribute name -> (b, n, width) tensor", type(attrs).__name__)
        attrs = dict(attrs or {})
        if set(attrs) != set(self.attr_dims):
            fail("attrs", f"exactly the declared attributes {sorted(self.attr_dims)}", f"keys {sorted(attrs)}")
        b, n, _ = x.shape
        for a, width in self.attr_dims.items():
            if attrs[a].shape != (b, n, width):
                fail(f"attrs[{a!r}]", f"shape ({b}, {n}, {width}) = (b, n, attr_dims[{a!r}])", attrs[a].shape)
        if pos is not None and pos.shape[-2:] != (n, self.dim):
            fail("pos", f"shape ({n}, {self.dim}) or (b, {n}, {self.dim})", pos.shape)
        side = [attrs[a] for a in self.attr_dims]
        if self.proj is not None:
            out = self.proj(torch.cat([x, *side], dim=-1))
            return out if pos is None else out + pos
        total = sum(side) if side else None
        if pos is not None:
            total = pos if total is None else pos + total
        return x if total is None else x + total


class EarlyFusionAttention(nn.Module):
    """Multi-head attention over an early-fused stream: the baselines of Theorem 4.1.

    ``style="sasrecf"``: ``F = fuse(x, attrs, pos)``; queries, keys *and values* from ``F``.
    ``style="nova"``: queries and keys from ``F``, values from the item stream ``x`` alone (NOVA).

    Same forward signature as :class:`~dif_attention.DecoupledAttention`, so it can be the ``attention`` of a
    :class:`~dif_attention.DecoupledEncoderLayer`; with ``return_scores=True`` returns ``(out, maps)``, a
    :class:`~dif_attention.ScoreMaps` with no per-source maps (there is one stream): ``maps.fused`` is ``S``
    ``(b, heads, n, n)`` raw (pre-scale, pre-mask), ``maps.probs`` the attention. ``position=False``
    ignores ``pos`` (pass ``None``). ``cache=`` (a :class:`~dif_attention.KVCache`) as in
    :meth:`DecoupledAttention.forward`: the new positions only, returning ``(out, grown cache)``.
    """

    def __init__(self, dim: int, heads: int, *, attr_dims: Mapping[str, int] | None = None, style: str = "nova",
                 combine: str = "sum", position: bool = True, attn_dropout: float = 0.0, bias: bool = True,
                 backend: str = "auto"):
        super().__init__()
        if style not in STYLES:
            fail("style", f"one of {STYLES}", repr(style))
        if backend not in BACKENDS:
            fail("backend", f"one of {BACKENDS}", repr(backend))
        check_int("heads", heads)
        self.dim_head = check_divisible("dim", dim, heads)
        self.dim, self.heads, self.style, self.position = dim, heads, style, check_bool("position", position)
        self.attr_dims = check_attr_dims(attr_dims, 1)
        self.attn_dropout, self.backend = check_probability("attn_dropout", attn_dropout), backend
        self.fuse = InputFusion(dim, attr_dims=self.attr_dims, combine=combine, bias=bias)
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim, bias=bias) for _ in range(3))
        self.to_out = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: Tensor, *, attrs: Mapping[str, Tensor] | None = None, pos: Tensor | None = None,
                mask: Tensor | None = None, is_causal: bool = False, return_scores: bool = False,
                cache: KVCache | None = None) -> Tensor | tuple[Tensor, ScoreMaps] | tuple[Tensor, KVCache]:
        """``(b, n, dim)`` (and the :class:`ScoreMaps` with ``return_scores=True``, the grown
        :class:`~dif_attention.KVCache` with ``cache=``)."""
        check_tensor("x", x, ndim=3, floating=True)
        if x.shape[-1] != self.dim:
            fail("x", f"last dim {self.dim} (= dim)", x.shape)
        if self.position and pos is None:
            fail("pos", "the position embedding (n, dim) or (b, n, dim) because position=True", None)
        fused = self.fuse(x, attrs=attrs, pos=pos if self.position else None)
        split = lambda t: rearrange(t, "b n (h e) -> b h n e", h=self.heads)  # noqa: E731
        q, k = split(self.to_q(fused)), split(self.to_k(fused))
        v = split(self.to_v(x if self.style == "nova" else fused))
        kw = dict(mask=mask, is_causal=is_causal, scale=1.0 / math.sqrt(self.dim_head),
                  dropout_p=self.attn_dropout if self.training else 0.0)
        if cache is not None:
            cache = check_cache(cache, return_scores).append([k], v)
            out = decoupled_attention([q], list(cache.keys), cache.value, backend=self.backend, **kw)
            return self.to_out(rearrange(out, "b h n e -> b n (h e)")), cache
        if return_scores:
            out, maps = reference_attention([q], [k], v, **kw)
            maps = ScoreMaps({}, maps.fused, maps.probs)
        else:
            out = decoupled_attention([q], [k], v, backend=self.backend, **kw)
        out = self.to_out(rearrange(out, "b h n e -> b n (h e)"))
        return (out, maps) if return_scores else out

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, style={self.style!r}, attrs={sorted(self.attr_dims)}"
