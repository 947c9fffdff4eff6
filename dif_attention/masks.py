"""Attention masks. Convention (as ``scaled_dot_product_attention``): a bool tensor
broadcastable to ``(b, h, n, n)`` -- query rows ``i``, key columns ``j`` -- where
``True`` means *query i may attend to key j*. Masks combine with ``&``::

    mask = causal_mask(n) & padding_mask(ids)        # (b, 1, n, n)

A query row with no allowed key (a padded query under a left-padded causal mask,
say) is legal: its output is the zero vector and its gradients are zero.
"""
from __future__ import annotations

import torch

from .errors import check_tensor, fail

__all__ = ["causal_mask", "padding_mask", "lengths_mask", "check_mask", "combine_masks"]


def causal_mask(n: int, *, device: torch.device | str | None = None) -> torch.Tensor:
    """``(n, n)`` bool, True on and below the diagonal (key j <= query i)."""
    if not isinstance(n, (int, torch.SymInt)) or isinstance(n, bool) or n < 1:  # SymInt: traced (dynamic) n
        fail("n", "a positive int", repr(n))
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


def padding_mask(ids: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """Key-padding mask from token ids ``(b, n)``: ``(b, 1, 1, n)`` bool, False at padded keys."""
    check_tensor("ids", ids, ndim=2)
    if ids.is_floating_point():
        fail("ids", "an integer tensor of token ids", f"dtype {ids.dtype}")
    return (ids != pad_id)[:, None, None, :]


def lengths_mask(lengths: torch.Tensor, n: int) -> torch.Tensor:
    """Key-padding mask for right-padded sequences of the given ``lengths (b,)``: ``(b, 1, 1, n)``."""
    check_tensor("lengths", lengths, ndim=1)
    if lengths.is_floating_point() or lengths.dtype == torch.bool:
        fail("lengths", "an integer tensor of sequence lengths", f"dtype {lengths.dtype}")
    if not isinstance(n, (int, torch.SymInt)) or isinstance(n, bool) or n < 1:
        fail("n", "a positive int", repr(n))
    return (torch.arange(n, device=lengths.device)[None, :] < lengths[:, None])[:, None, None, :]


def check_mask(mask: torch.Tensor | None, b: int, h: int, n: int, arg: str = "mask") -> torch.Tensor | None:
    """Validate a mask and return it as a 4-d bool tensor broadcastable to ``(b, h, n, n)``."""
    if mask is None:
        return None
    check_tensor(arg, mask)
    if mask.dtype != torch.bool:
        fail(arg, "a bool tensor (True = may attend)", f"dtype {mask.dtype}")
    target = (b, h, n, n)
    if mask.ndim > 4:
        fail(arg, f"at most 4 dims, broadcastable to ({b}, {h}, {n}, {n})", mask.shape)
    m = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
    for got, want in zip(m.shape, target):
        if got not in (1, want):
            fail(arg, f"a shape broadcastable to ({b}, {h}, {n}, {n})", mask.shape)
    return m


def combine_masks(mask: torch.Tensor | None, is_causal: bool, n: int, device) -> torch.Tensor | None:
    """``mask & causal_mask(n)`` (either may be absent)."""
    if not is_causal:
        return mask
    c = causal_mask(n, device=device)
    return c if mask is None else mask & c
