"""Attention masks. Convention (as ``scaled_dot_product_attention``): a bool tensor
broadcastable to ``(b, h, n, n)`` -- query rows ``i``, key columns ``j`` -- where
``True`` means *query i may attend to key j*. Masks combine with ``&``::

    mask = causal_mask(n) & padding_mask(ids)        # (b, 1, n, n)

With fewer queries than keys (``n_q <= n_k``: new positions attending a cache of earlier keys) masks
broadcast to ``(b, h, n_q, n_k)`` and the queries are the *last* ``n_q`` positions: query ``i`` sits at
key position ``n_k - n_q + i`` (as FlashAttention aligns causal masks), ``causal_mask(n_q, n_keys=n_k)``.

A query row with no allowed key (a padded query under a left-padded causal mask,
say) is legal: its output is the zero vector and its gradients are zero.
"""
from __future__ import annotations

import torch

from .errors import check_int, check_integer, check_tensor, fail

__all__ = ["causal_mask", "padding_mask", "lengths_mask", "lengths_allowed", "check_mask", "combine_masks", "as_4d"]


def _check_length(arg: str, n) -> None:
    if not isinstance(n, (int, torch.SymInt)) or isinstance(n, bool) or n < 1:  # SymInt: traced (dynamic) n
        fail(arg, "a positive int", repr(n))


def causal_mask(n: int, *, n_keys: int | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """``(n, n_keys)`` bool: query ``i`` sits at key position ``n_keys - n + i`` (the queries are the last ``n``
    of ``n_keys`` positions) and may attend the keys at or before it. ``n_keys`` defaults to ``n``: the square
    mask, True on and below the diagonal (key ``j <= i``)."""
    _check_length("n", n)
    if n_keys is None:
        return torch.ones(n, n, dtype=torch.bool, device=device).tril()
    _check_length("n_keys", n_keys)
    if n_keys < n:
        fail("n_keys", f"at least n={n} keys (the queries are the last n key positions)", repr(n_keys))
    return torch.ones(n, n_keys, dtype=torch.bool, device=device).tril(n_keys - n)


def padding_mask(ids: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """Key-padding mask from token ids ``(b, n)``: ``(b, 1, 1, n)`` bool, False at padded keys."""
    check_tensor("ids", ids, ndim=2)
    if ids.is_floating_point():
        fail("ids", "an integer tensor of token ids", f"dtype {ids.dtype}")
    check_int("pad_id", pad_id, minimum=None)
    return (ids != pad_id)[:, None, None, :]


def _check_lengths(lengths: torch.Tensor, n: int) -> None:
    check_tensor("lengths", lengths, ndim=1)
    check_integer("lengths", lengths, "an integer tensor of sequence lengths")
    _check_length("n", n)
    # value checks read the tensor (a host sync): eager mode only
    if not torch.compiler.is_compiling() and lengths.numel() and isinstance(n, int):
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 0 or hi > n:
            fail("lengths", f"lengths in [0, {n}] (= n)", f"lengths in [{lo}, {hi}]")


def lengths_mask(lengths: torch.Tensor, n: int) -> torch.Tensor:
    """Key-padding mask for right-padded sequences of the given ``lengths (b,)``: ``(b, 1, 1, n)``."""
    _check_lengths(lengths, n)
    return (torch.arange(n, device=lengths.device)[None, :] < lengths[:, None])[:, None, None, :]


def lengths_allowed(lengths: torch.Tensor, n: int) -> torch.Tensor:
    """Padding masked as keys *and* as queries: ``(b, 1, n, n)``, True where both ``i`` and ``j`` are
    ``< lengths[b]`` (padded query rows have no allowed key, so they return zeros)."""
    _check_lengths(lengths, n)
    valid = torch.arange(n, device=lengths.device)[None, :] < lengths[:, None]  # (b, n)
    return valid[:, None, :, None] & valid[:, None, None, :]


def as_4d(mask: torch.Tensor) -> torch.Tensor:
    """A mask broadcastable to ``(b, h, n, n)`` with leading unit dims added: 4-d."""
    return mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))


def check_mask(mask: torch.Tensor | None, b: int, h: int, n: int, arg: str = "mask", *,
               n_keys: int | None = None) -> torch.Tensor | None:
    """Validate a mask and return it as a 4-d bool tensor broadcastable to ``(b, h, n, n_keys)``
    (``n_keys`` defaults to ``n``)."""
    if mask is None:
        return None
    check_tensor(arg, mask)
    if mask.dtype != torch.bool:
        fail(arg, "a bool tensor (True = may attend)", f"dtype {mask.dtype}")
    n_keys = n if n_keys is None else n_keys
    target = (b, h, n, n_keys)
    if mask.ndim > 4:
        fail(arg, f"at most 4 dims, broadcastable to ({b}, {h}, {n}, {n_keys})", mask.shape)
    m = as_4d(mask)
    for got, want in zip(m.shape, target):
        if got not in (1, want):
            fail(arg, f"a shape broadcastable to ({b}, {h}, {n}, {n_keys})", mask.shape)
    return m


def combine_masks(mask: torch.Tensor | None, is_causal: bool, n: int, device, *,
                  lengths: torch.Tensor | None = None, n_keys: int | None = None) -> torch.Tensor | None:
    """``mask & causal_mask(n, n_keys=n_keys) & lengths_allowed(lengths, n)`` (each may be absent; ``None`` if
    all are; ``lengths`` only with as many queries as keys). Keeps a lone causal mask 2-d ``(n, n_keys)``,
    which fast paths recognise as causal-only."""
    parts = []
    if mask is not None:
        parts.append(mask)
    if lengths is not None:
        if n_keys is not None and n_keys != n:
            fail("lengths", "as many queries as keys (pass a mask when n_q < n_k)", f"{n} queries and {n_keys} keys")
        parts.append(lengths_allowed(lengths, n))
    if is_causal:
        parts.append(causal_mask(n, n_keys=n_keys, device=device))
    if not parts:
        return None
    out = parts[0]
    for p in parts[1:]:
        out = out & p
    return out
