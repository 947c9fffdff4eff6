"""The SASRec / DIF-SR transformer block built on :class:`DecoupledAttention`, and a stack of them."""
from __future__ import annotations

import copy
from typing import Callable, Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .attention import DecoupledAttention, KVCache
from .errors import check_int, check_probability, fail
from .functional import ScoreMaps
from .fusion import Fusion

__all__ = ["FeedForward", "DecoupledEncoderLayer", "DecoupledEncoder"]

_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "swish": F.silu, "tanh": F.tanh}


class FeedForward(nn.Module):
    """``Linear(dim -> ff_dim) -> activation -> Linear(ff_dim -> dim) -> Dropout(hidden_dropout)``."""

    def __init__(self, dim: int, ff_dim: int, *, activation: str = "gelu", hidden_dropout: float = 0.0):
        super().__init__()
        if activation not in _ACTIVATIONS:
            fail("activation", f"one of {sorted(_ACTIVATIONS)}", repr(activation))
        check_int("ff_dim", ff_dim)
        self.up, self.down = nn.Linear(dim, ff_dim), nn.Linear(ff_dim, dim)
        self.act, self.drop = _ACTIVATIONS[activation], nn.Dropout(check_probability("hidden_dropout", hidden_dropout))

    def forward(self, x: Tensor) -> Tensor:
        """``(..., dim)`` -> ``(..., dim)``."""
        return self.drop(self.down(self.act(self.up(x))))


class DecoupledEncoderLayer(nn.Module):
    """Decoupled attention + feed-forward, each with dropout and a residual.

    ``norm_first=False`` (default, as the paper and the reference): post-LN,
    ``x = LN(x + Drop(Attn(x)))``, ``x = LN(x + FFN(x))``.
    ``norm_first=True``: pre-LN, ``x = x + Drop(Attn(LN(x)))``, ``x = x + FFN(LN(x))``.

    Side inputs (``attrs``, ``pos``) are used as given in every layer; only ``x`` is updated.
    ``hidden_dropout`` drops the residual branches, ``attn_dropout`` the attention probabilities.
    ``attention``: a module with :class:`DecoupledAttention`'s forward signature to use instead of one
    (e.g. :class:`~dif_attention.baselines.EarlyFusionAttention` for NOVA); the attention keywords are then unused.
    Keywords not listed go to :class:`DecoupledAttention` (``position``, ``max_len``, ``backend``, ...).
    The default fusion is ``"add"``, as :class:`DecoupledAttention`'s.
    """

    def __init__(self, dim: int, heads: int, *, attr_dims: Mapping[str, int] | None = None,
                 fusion: "str | Fusion" = "add", ff_dim: int | None = None, hidden_dropout: float = 0.0,
                 attn_dropout: float = 0.0, activation: str = "gelu", norm_first: bool = False,
                 eps: float = 1e-12, attention: nn.Module | None = None, **attention_kwargs):
        super().__init__()
        if attention is None:
            attention = DecoupledAttention(dim, heads, attr_dims=attr_dims, fusion=fusion, attn_dropout=attn_dropout,
                                           **attention_kwargs)
        self.attn = attention
        self.ff = FeedForward(dim, ff_dim or dim * 4, activation=activation, hidden_dropout=hidden_dropout)
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=eps), nn.LayerNorm(dim, eps=eps)
        self.drop = nn.Dropout(check_probability("hidden_dropout", hidden_dropout))
        self.norm_first = norm_first

    def forward(self, x: Tensor, *, attrs: Mapping[str, Tensor] | None = None, pos: Tensor | None = None,
                mask: Tensor | None = None, is_causal: bool = False, return_scores: bool = False,
                cache: KVCache | None = None) -> Tensor | tuple[Tensor, ScoreMaps] | tuple[Tensor, KVCache]:
        """``x (b, n, dim)`` -> ``(b, n, dim)``; with ``return_scores=True`` ``(x, maps)``, the attention's
        :class:`~dif_attention.ScoreMaps`; with ``cache=`` (this layer's :class:`~dif_attention.KVCache`) ``x`` is
        the new positions only and the result ``(x, grown cache)``. Keywords as :meth:`DecoupledAttention.forward`."""
        kw = dict(attrs=attrs, pos=pos, mask=mask, is_causal=is_causal, return_scores=return_scores)
        if cache is not None:
            kw["cache"] = cache
        extra = None  # the score maps or the grown cache
        if self.norm_first:
            a = self.attn(self.norm1(x), **kw)
            if return_scores or cache is not None:
                a, extra = a
            x = x + self.drop(a)
            x = x + self.ff(self.norm2(x))
        else:
            a = self.attn(x, **kw)
            if return_scores or cache is not None:
                a, extra = a
            x = self.norm1(x + self.drop(a))
            x = self.norm2(x + self.ff(x))
        return (x, extra) if return_scores or cache is not None else x


class DecoupledEncoder(nn.Module):
    """``num_layers`` independent :class:`DecoupledEncoderLayer` s (no weight sharing).

    Takes the same keywords as the layer, and the same forward keywords as :class:`DecoupledAttention`.
    A :class:`Fusion` instance passed as ``fusion`` is deep-copied per layer (one fusion per layer, as
    the reference). ``attention``: a callable ``layer index -> attention module`` to build each layer's
    attention with (see :class:`DecoupledEncoderLayer`). With ``norm_first=True`` a final LayerNorm is applied.
    With ``return_scores=True`` returns ``(x, [maps of layer 0, maps of layer 1, ...])``. With ``cache=`` (one
    :class:`~dif_attention.KVCache` per layer, ``[KVCache()] * num_layers`` to start) ``x`` and the side inputs
    are the new positions only and the result is ``(x, [grown cache of each layer])``: exactly the rows of the
    full computation at those positions (the layers are position-wise but for attention).
    """

    def __init__(self, num_layers: int, dim: int, heads: int, *, attr_dims: Mapping[str, int] | None = None,
                 fusion: "str | Fusion" = "add", norm_first: bool = False, eps: float = 1e-12,
                 attention: Callable[[int], nn.Module] | None = None, **layer_kwargs):
        super().__init__()
        check_int("num_layers", num_layers)
        self.layers = nn.ModuleList(
            DecoupledEncoderLayer(dim, heads, attr_dims=attr_dims,
                                  fusion=copy.deepcopy(fusion) if isinstance(fusion, Fusion) else fusion,
                                  norm_first=norm_first, eps=eps,
                                  attention=None if attention is None else attention(i), **layer_kwargs)
            for i in range(num_layers))
        self.final_norm = nn.LayerNorm(dim, eps=eps) if norm_first else nn.Identity()

    def forward(self, x: Tensor, *, attrs: Mapping[str, Tensor] | None = None, pos: Tensor | None = None,
                mask: Tensor | None = None, is_causal: bool = False, return_scores: bool = False,
                cache: Sequence[KVCache] | None = None
                ) -> Tensor | tuple[Tensor, list[ScoreMaps]] | tuple[Tensor, list[KVCache]]:
        """``x (b, n, dim)`` -> ``(b, n, dim)``; with ``return_scores=True`` ``(x, per-layer ScoreMaps)``; with
        ``cache=`` (one :class:`~dif_attention.KVCache` per layer) ``(x, per-layer grown caches)``."""
        if cache is not None:
            if not isinstance(cache, (list, tuple)) or len(cache) != len(self.layers):
                fail("cache", f"a list of {len(self.layers)} KVCache (one per layer; [KVCache()] * "
                     f"{len(self.layers)} to start)",
                     f"{len(cache)} entries" if isinstance(cache, (list, tuple)) else type(cache).__name__)
            grown = []
            for layer, c in zip(self.layers, cache):
                x, c = layer(x, attrs=attrs, pos=pos, mask=mask, is_causal=is_causal, return_scores=return_scores,
                             cache=c)
                grown.append(c)
            return self.final_norm(x), grown
        all_maps = []
        for layer in self.layers:
            x = layer(x, attrs=attrs, pos=pos, mask=mask, is_causal=is_causal, return_scores=return_scores)
            if return_scores:
                x, maps = x
                all_maps.append(maps)
        x = self.final_norm(x)
        return (x, all_maps) if return_scores else x
